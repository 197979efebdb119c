//! The leader-epoch cache: for each leader epoch that wrote records to this replica's
//! log, the offset of its first record (Kafka's `LeaderEpochFileCache`). Entries are
//! strictly increasing in both epoch and start offset. The cache changes only when the
//! log does (a new epoch's first append, a truncation, retention), and the caller makes
//! each change durable (`ferrite_storage::write_leader_epoch_checkpoint`) before the
//! append that depends on it.

use crate::error::ReplicationError;

/// "No epoch": OffsetForLeaderEpoch's answer when the requested epoch is unknown.
pub const UNDEFINED_EPOCH: i32 = -1;
/// "No offset", paired with [`UNDEFINED_EPOCH`].
pub const UNDEFINED_EPOCH_OFFSET: i64 = -1;

/// An OffsetForLeaderEpoch answer (and a Fetch `DivergingEpoch`): the largest epoch at
/// most the requested one, and the offset where it ended (the next epoch's start, or
/// the log end offset for the latest epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochEndOffset {
    pub leader_epoch: i32,
    pub end_offset: i64,
}

impl EpochEndOffset {
    pub const UNDEFINED: EpochEndOffset = EpochEndOffset {
        leader_epoch: UNDEFINED_EPOCH,
        end_offset: UNDEFINED_EPOCH_OFFSET,
    };
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderEpochCache {
    /// `(epoch, start_offset)`, strictly increasing in both.
    entries: Vec<(i32, i64)>,
}

impl LeaderEpochCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the cache from a checkpoint's entries, refusing a history that is not
    /// strictly increasing (a corrupt or hand-edited file).
    pub fn from_entries(
        entries: impl IntoIterator<Item = (i32, i64)>,
    ) -> Result<Self, ReplicationError> {
        let mut cache = Self::new();
        for (epoch, start_offset) in entries {
            let ok = epoch >= 0
                && start_offset >= 0
                && cache
                    .entries
                    .last()
                    .is_none_or(|&(e, s)| e < epoch && s < start_offset);
            if !ok {
                return Err(ReplicationError::InvalidEpochHistory {
                    epoch,
                    start_offset,
                });
            }
            cache.entries.push((epoch, start_offset));
        }
        Ok(cache)
    }

    /// The entries as `(epoch, start_offset)`, oldest first: what the checkpoint holds.
    pub fn entries(&self) -> &[(i32, i64)] {
        &self.entries
    }

    pub fn latest_epoch(&self) -> Option<i32> {
        self.entries.last().map(|&(e, _)| e)
    }

    pub fn epoch_start_offset(&self, epoch: i32) -> Option<i64> {
        self.entries
            .iter()
            .find(|&&(e, _)| e == epoch)
            .map(|&(_, s)| s)
    }

    /// The epoch that wrote `offset`, if the cache covers it.
    pub fn epoch_for_offset(&self, offset: i64) -> Option<i32> {
        self.entries
            .iter()
            .rev()
            .find(|&&(_, s)| s <= offset)
            .map(|&(e, _)| e)
    }

    /// Records that `epoch` starts at `start_offset`: called when a leader takes a new
    /// epoch (at its log end offset) and when a follower appends a batch whose epoch is
    /// newer than its latest. Returns whether the cache changed (the caller persists it
    /// then). As in Kafka, entries at or after `start_offset` are replaced; the same
    /// epoch again at a later offset is no change. An epoch older than the latest is the
    /// leader's log going backwards in epochs, refused (a peer's data may not panic us).
    pub fn assign(&mut self, epoch: i32, start_offset: i64) -> Result<bool, ReplicationError> {
        assert!(
            epoch >= 0 && start_offset >= 0,
            "assign({epoch}, {start_offset})"
        );
        if let Some(&(latest, latest_start)) = self.entries.last() {
            if epoch < latest {
                return Err(ReplicationError::EpochRegression {
                    epoch,
                    start_offset,
                    latest,
                });
            }
            if epoch == latest && start_offset >= latest_start {
                return Ok(false);
            }
        }
        while self
            .entries
            .last()
            .is_some_and(|&(e, s)| e >= epoch || s >= start_offset)
        {
            self.entries.pop();
        }
        self.entries.push((epoch, start_offset));
        Ok(true)
    }

    /// OffsetForLeaderEpoch for `requested_epoch` on a log ending at `log_end_offset`:
    /// the largest known epoch at most `requested_epoch` and where it ended. For the
    /// latest epoch that is the log end offset; for an epoch older than every entry, the
    /// requested epoch with the first entry's start; for an epoch newer than every
    /// entry (or an empty cache), [`EpochEndOffset::UNDEFINED`].
    pub fn end_offset_for(&self, requested_epoch: i32, log_end_offset: i64) -> EpochEndOffset {
        if requested_epoch == UNDEFINED_EPOCH {
            return EpochEndOffset::UNDEFINED;
        }
        if self.latest_epoch() == Some(requested_epoch) {
            return EpochEndOffset {
                leader_epoch: requested_epoch,
                end_offset: log_end_offset,
            };
        }
        let Some(&(_, higher_start)) = self.entries.iter().find(|&&(e, _)| e > requested_epoch)
        else {
            return EpochEndOffset::UNDEFINED;
        };
        let floor = self
            .entries
            .iter()
            .rev()
            .find(|&&(e, _)| e <= requested_epoch)
            .map_or(requested_epoch, |&(e, _)| e);
        EpochEndOffset {
            leader_epoch: floor,
            end_offset: higher_start,
        }
    }

    /// The log was truncated to end at `end_offset`: epochs that started at or after it
    /// wrote nothing that is left. Returns whether the cache changed.
    pub fn truncate_from_end(&mut self, end_offset: i64) -> bool {
        let before = self.entries.len();
        self.entries.retain(|&(_, s)| s < end_offset);
        self.entries.len() != before
    }

    /// The log now starts at `start_offset` (retention, DeleteRecords): entries wholly
    /// below it go, and the epoch covering it now starts there. Returns whether the
    /// cache changed.
    pub fn truncate_from_start(&mut self, start_offset: i64) -> bool {
        let Some(covering) = self.entries.iter().rposition(|&(_, s)| s <= start_offset) else {
            return false;
        };
        let before = self.entries.clone();
        self.entries.drain(..covering);
        if let Some(first) = self.entries.first_mut() {
            first.1 = start_offset;
        }
        self.entries != before
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn cache(entries: &[(i32, i64)]) -> LeaderEpochCache {
        LeaderEpochCache::from_entries(entries.iter().copied()).unwrap()
    }

    fn eo(leader_epoch: i32, end_offset: i64) -> EpochEndOffset {
        EpochEndOffset {
            leader_epoch,
            end_offset,
        }
    }

    #[test]
    fn assign_appends_new_epochs_and_ignores_the_same_epoch_later() {
        let mut c = LeaderEpochCache::new();
        assert!(c.assign(0, 0).unwrap());
        assert!(!c.assign(0, 5).unwrap());
        assert!(c.assign(2, 10).unwrap());
        assert_eq!(c.entries(), &[(0, 0), (2, 10)]);
        assert_eq!(c.latest_epoch(), Some(2));
        assert_eq!(c.epoch_start_offset(2), Some(10));
        assert_eq!(c.epoch_for_offset(9), Some(0));
        assert_eq!(c.epoch_for_offset(10), Some(2));
    }

    #[test]
    fn assign_replaces_an_epoch_that_wrote_nothing() {
        // A leader took epoch 3 at offset 10 but appended nothing; epoch 4 starts at 10.
        let mut c = cache(&[(0, 0), (3, 10)]);
        assert!(c.assign(4, 10).unwrap());
        assert_eq!(c.entries(), &[(0, 0), (4, 10)]);
    }

    #[test]
    fn assign_refuses_an_older_epoch() {
        let mut c = cache(&[(0, 0), (3, 10)]);
        assert_eq!(
            c.assign(2, 20),
            Err(ReplicationError::EpochRegression {
                epoch: 2,
                start_offset: 20,
                latest: 3
            })
        );
        assert_eq!(c.entries(), &[(0, 0), (3, 10)]);
    }

    #[test]
    fn from_entries_refuses_non_monotonic_histories() {
        assert!(LeaderEpochCache::from_entries([(0, 0), (0, 5)]).is_err());
        assert!(LeaderEpochCache::from_entries([(0, 5), (1, 5)]).is_err());
        assert!(LeaderEpochCache::from_entries([(2, 5), (1, 6)]).is_err());
        assert!(LeaderEpochCache::from_entries([(-1, 0)]).is_err());
        assert!(LeaderEpochCache::from_entries([(0, 0), (1, 6)]).is_ok());
    }

    #[test]
    fn end_offset_for_answers_like_offset_for_leader_epoch() {
        let c = cache(&[(1, 0), (3, 10), (5, 20)]);
        // The latest epoch ends at the log end offset.
        assert_eq!(c.end_offset_for(5, 27), eo(5, 27));
        // A known older epoch ends where the next one starts.
        assert_eq!(c.end_offset_for(3, 27), eo(3, 20));
        // An unknown epoch between two known ones: the largest lower epoch, ending where
        // the next higher starts (KIP-279).
        assert_eq!(c.end_offset_for(4, 27), eo(3, 20));
        assert_eq!(c.end_offset_for(2, 27), eo(1, 10));
        // Older than every entry: the requested epoch, ending at the first start.
        assert_eq!(c.end_offset_for(0, 27), eo(0, 0));
        // Newer than every entry, or undefined: undefined.
        assert_eq!(c.end_offset_for(6, 27), EpochEndOffset::UNDEFINED);
        assert_eq!(
            c.end_offset_for(UNDEFINED_EPOCH, 27),
            EpochEndOffset::UNDEFINED
        );
        assert_eq!(
            LeaderEpochCache::new().end_offset_for(0, 0),
            EpochEndOffset::UNDEFINED
        );
    }

    #[test]
    fn truncate_from_end_drops_epochs_starting_at_or_after_the_point() {
        let mut c = cache(&[(1, 0), (3, 10), (5, 20)]);
        assert!(!c.truncate_from_end(21));
        assert!(c.truncate_from_end(20));
        assert_eq!(c.entries(), &[(1, 0), (3, 10)]);
        assert!(c.truncate_from_end(5));
        assert_eq!(c.entries(), &[(1, 0)]);
        assert!(c.truncate_from_end(0));
        assert!(c.entries().is_empty());
    }

    #[test]
    fn truncate_from_start_moves_the_covering_epoch_to_the_new_start() {
        let mut c = cache(&[(1, 0), (3, 10), (5, 20)]);
        assert!(c.truncate_from_start(15));
        assert_eq!(c.entries(), &[(3, 15), (5, 20)]);
        assert!(!c.truncate_from_start(15));
        assert!(c.truncate_from_start(20));
        assert_eq!(c.entries(), &[(5, 20)]);
        assert!(!c.truncate_from_start(3));
    }
}
