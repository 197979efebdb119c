//! The follower's side of the epoch protocol: where to cut its log so that it never
//! diverges from the leader's, and its high watermark.
//!
//! A follower learns the leader's view of an epoch either from an OffsetForLeaderEpoch
//! answer (for its latest epoch) or from a Fetch response's `DivergingEpoch` (KIP-320:
//! the leader found the follower's `LastFetchedEpoch` diverging). Both give an
//! [`EpochEndOffset`]; [`follower_truncation`] turns it into a truncation point. The
//! caller truncates the log and the cache ([`LeaderEpochCache::truncate_from_end`]) to
//! it, persists the cache, and either fetches from there (`complete`) or asks again with
//! its new latest epoch.
//!
//! Why not the high watermark: truncating to it loses records that were committed but
//! whose high watermark had not reached this follower yet (KAFKA-1211, fixed by
//! KIP-101), and keeping records up to the leader's end of an epoch the follower only
//! partly shares makes logs diverge after back-to-back leader changes (KAFKA-6361,
//! fixed by KIP-279, which this implements).

use crate::epoch_cache::{
    EpochEndOffset, LeaderEpochCache, UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET,
};

/// Where to truncate, and whether the follower may fetch from there (`complete`) or
/// must ask the leader again about its (now lower) latest epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncation {
    pub offset: i64,
    pub complete: bool,
}

/// The truncation point for a follower whose log ends at `log_end_offset`, with
/// `high_watermark` and epoch history `cache`, given the leader's `leader` answer for
/// the follower's latest epoch (or the `DivergingEpoch` of a fetch).
///
/// - The leader knows no epoch at all (`end_offset` undefined): truncate to the high
///   watermark, which is committed and therefore on the leader (Kafka's rule).
/// - The leader answers epoch E ending at O and the follower knows E, ending at F:
///   truncate to min(F, O, log end) and fetch.
/// - The follower does not know E: truncate to the end of its largest epoch below E,
///   not yet complete, and ask again (KIP-279).
pub fn follower_truncation(
    cache: &LeaderEpochCache,
    log_end_offset: i64,
    high_watermark: i64,
    leader: EpochEndOffset,
) -> Truncation {
    assert!(
        high_watermark <= log_end_offset,
        "follower HW {high_watermark} above its LEO {log_end_offset}"
    );
    if leader.end_offset == UNDEFINED_EPOCH_OFFSET {
        return Truncation {
            offset: high_watermark.max(0),
            complete: true,
        };
    }
    if leader.leader_epoch == UNDEFINED_EPOCH {
        return Truncation {
            offset: leader.end_offset.min(log_end_offset),
            complete: true,
        };
    }
    let ours = cache.end_offset_for(leader.leader_epoch, log_end_offset);
    if ours.end_offset == UNDEFINED_EPOCH_OFFSET {
        // We track no epoch at or below the leader's (a new or wiped replica): the leader
        // answered with an epoch not newer than ours, so its end offset is safe.
        return Truncation {
            offset: leader.end_offset.min(log_end_offset),
            complete: true,
        };
    }
    if ours.leader_epoch != leader.leader_epoch {
        Truncation {
            offset: ours.end_offset.min(log_end_offset),
            complete: false,
        }
    } else {
        Truncation {
            offset: ours.end_offset.min(leader.end_offset).min(log_end_offset),
            complete: true,
        }
    }
}

/// A follower's high watermark: the leader's, but never above what it holds.
pub fn follower_high_watermark(leader_high_watermark: i64, log_end_offset: i64) -> i64 {
    leader_high_watermark.min(log_end_offset)
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
    fn same_epoch_truncates_to_the_smaller_end() {
        // Follower has epoch 1 up to its LEO 10; the leader's epoch 1 ended at 8.
        let c = cache(&[(0, 0), (1, 5)]);
        assert_eq!(
            follower_truncation(&c, 10, 4, eo(1, 8)),
            Truncation {
                offset: 8,
                complete: true
            }
        );
        // The leader's epoch went further than ours: nothing to cut.
        assert_eq!(
            follower_truncation(&c, 10, 4, eo(1, 15)),
            Truncation {
                offset: 10,
                complete: true
            }
        );
    }

    #[test]
    fn unknown_leader_epoch_truncates_to_our_lower_epoch_and_asks_again() {
        // KAFKA-6361 shape: we have epochs 1 (from 0) and 2 (from 8) up to 10; the leader
        // never had epoch 2 and answers epoch 1 ending at 10 (its epoch 3 starts there).
        let c = cache(&[(1, 0), (2, 8)]);
        // The leader answered epoch 1 for our epoch 2: we know epoch 1, ending at 8.
        assert_eq!(
            follower_truncation(&c, 10, 5, eo(1, 10)),
            Truncation {
                offset: 8,
                complete: true
            }
        );
        // The leader answers epoch 2, which we never had: cut at the end of our epoch 1
        // (where our epoch 4 starts) and ask again about epoch 1.
        let c = cache(&[(1, 3), (4, 8)]);
        assert_eq!(
            follower_truncation(&c, 10, 2, eo(2, 9)),
            Truncation {
                offset: 8,
                complete: false
            }
        );
    }

    #[test]
    fn undefined_answers() {
        let c = cache(&[(0, 0), (1, 5)]);
        // The leader has no epochs: our high watermark is the safe point.
        assert_eq!(
            follower_truncation(&c, 10, 4, EpochEndOffset::UNDEFINED),
            Truncation {
                offset: 4,
                complete: true
            }
        );
        // An empty cache (wiped replica) trusts the leader's end offset.
        assert_eq!(
            follower_truncation(&LeaderEpochCache::new(), 6, 0, eo(3, 4)),
            Truncation {
                offset: 4,
                complete: true
            }
        );
    }

    #[test]
    fn follower_high_watermark_never_exceeds_its_log() {
        assert_eq!(follower_high_watermark(10, 7), 7);
        assert_eq!(follower_high_watermark(5, 7), 5);
    }
}
