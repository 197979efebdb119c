//! The leader's side of one partition (Kafka's `Partition` on its leader): what each
//! follower has, the high watermark, ISR shrink and expand proposals, follower fetch
//! validation, the acks=all purgatory, ListOffsets latest.
//!
//! Rules, each with the Kafka change that motivated it:
//! - high_watermark = min log_end_offset over the leader and the maximal ISR (the
//!   committed ISR plus members an in-flight AlterPartition adds); it never goes back,
//!   and never advances while the committed ISR is smaller than `min.insync.replicas`
//!   (the KIP-966 rule: the last replica standing then holds everything committed).
//! - A follower leaves the ISR when it has not caught up for `replica.lag.time.max.ms`;
//!   it rejoins only with log_end_offset ≥ high_watermark and ≥ the start offset of the
//!   current leader epoch (KAFKA-7128), unfenced, not shutting down, and fetching with
//!   its current broker epoch (KIP-903: a broker whose disk was wiped re-registers with a
//!   new epoch and must not count as in sync on the strength of an old fetch).
//! - At most one AlterPartition is in flight per partition; the ISR changes only when the
//!   controller commits it (through the response or the metadata log).
//! - A follower fetch with an older leader epoch is FENCED_LEADER_EPOCH, with a newer one
//!   UNKNOWN_LEADER_EPOCH; one whose `LastFetchedEpoch` diverges from the leader's log
//!   gets `DivergingEpoch` and changes no state (KIP-320).

use std::collections::{BTreeMap, BTreeSet};

use crate::epoch_cache::{EpochEndOffset, LeaderEpochCache};
use crate::error::ReplicationError;
use crate::BrokerId;

/// Produces waiting for the high watermark on one partition, at most. The broker's own
/// request limits keep far fewer in flight; this bounds the purgatory by itself.
pub const PENDING_PRODUCES_MAX: usize = 100_000;

/// The configs replication reads, with Kafka's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// `replica.lag.time.max.ms` (default 30000).
    pub replica_lag_time_max_ms: u64,
    /// `min.insync.replicas` (default 1).
    pub min_insync_replicas: usize,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            replica_lag_time_max_ms: 30_000,
            min_insync_replicas: 1,
        }
    }
}

/// The partition as committed in the metadata log (`PartitionRecord` and its changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionState {
    pub leader_epoch: i32,
    pub partition_epoch: i32,
    pub replicas: Vec<BrokerId>,
    pub isr: Vec<BrokerId>,
}

/// A broker as the metadata image knows it (`RegisterBrokerRecord` and changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerState {
    pub broker_epoch: i64,
    pub fenced: bool,
    pub in_controlled_shutdown: bool,
}

/// One member of a proposed ISR with the broker epoch it fetched with (AlterPartition
/// v3+ `NewIsrWithEpochs`), so that the controller can refuse a stale one (KIP-903).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IsrMember {
    pub broker_id: BrokerId,
    pub broker_epoch: i64,
}

/// An AlterPartition the broker should send to the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlterPartitionProposal {
    pub leader_epoch: i32,
    /// The partition epoch the change is based on; the controller refuses a stale one
    /// with INVALID_UPDATE_VERSION.
    pub partition_epoch: i32,
    pub new_isr: Vec<IsrMember>,
}

/// A follower's Fetch for this partition (fields of FetchRequest v12+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowerFetch {
    pub replica_id: BrokerId,
    /// `ReplicaState.ReplicaEpoch` (v15+): the follower's broker epoch, -1 if unknown.
    pub replica_epoch: i64,
    /// `CurrentLeaderEpoch`, -1 when the follower did not send one (no check).
    pub current_leader_epoch: i32,
    /// The follower's log end offset.
    pub fetch_offset: i64,
    /// `LastFetchedEpoch`: the epoch of the follower's last record, `None` when it has
    /// none (or an older version).
    pub last_fetched_epoch: Option<i32>,
}

/// What to answer a valid follower fetch with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    /// Read records from `fetch_offset` and send this high watermark.
    Read { high_watermark: i64 },
    /// No records: the follower must truncate first (KIP-320).
    Diverging(EpochEndOffset),
}

/// A produce that stopped waiting: `Ok` is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceCompletion {
    pub token: u64,
    pub result: Result<(), ReplicationError>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FollowerState {
    /// -1 until the follower fetched from this leader.
    log_end_offset: i64,
    last_fetch_time_ms: Option<u64>,
    /// The leader's log end offset at the follower's previous fetch.
    last_fetch_leader_log_end_offset: i64,
    last_caught_up_time_ms: u64,
    /// The broker epoch of its last fetch, -1 if unknown.
    broker_epoch: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PendingProduce {
    required_offset: i64,
    deadline_ms: u64,
}

#[derive(Debug, Clone)]
pub struct PartitionLeader {
    local_broker_id: BrokerId,
    local_broker_epoch: i64,
    config: ReplicationConfig,
    state: PartitionState,
    in_flight: Option<AlterPartitionProposal>,
    followers: BTreeMap<BrokerId, FollowerState>,
    leader_epoch_start_offset: i64,
    log_end_offset: i64,
    high_watermark: i64,
    pending: BTreeMap<u64, PendingProduce>,
}

impl PartitionLeader {
    /// This broker became leader of `state.leader_epoch`. `log_end_offset` and
    /// `high_watermark` are its log's; the new epoch starts at `log_end_offset` (the
    /// caller assigns it in its [`LeaderEpochCache`] and persists that before the
    /// epoch's first append). Followers start unknown; ISR members get a full
    /// `replica.lag.time.max.ms` to fetch before they count as lagging.
    pub fn become_leader(
        local_broker_id: BrokerId,
        local_broker_epoch: i64,
        config: ReplicationConfig,
        state: PartitionState,
        log_end_offset: i64,
        high_watermark: i64,
        now_ms: u64,
    ) -> Self {
        assert!(state.replicas.contains(&local_broker_id));
        assert!(
            state.isr.contains(&local_broker_id),
            "only an ISR member may lead (clean election)"
        );
        assert!(0 <= high_watermark && high_watermark <= log_end_offset);
        let followers = state
            .replicas
            .iter()
            .filter(|&&id| id != local_broker_id)
            .map(|&id| {
                let in_isr = state.isr.contains(&id);
                (
                    id,
                    FollowerState {
                        log_end_offset: -1,
                        last_fetch_time_ms: None,
                        last_fetch_leader_log_end_offset: -1,
                        last_caught_up_time_ms: if in_isr { now_ms } else { 0 },
                        broker_epoch: -1,
                    },
                )
            })
            .collect();
        let mut leader = Self {
            local_broker_id,
            local_broker_epoch,
            config,
            state,
            in_flight: None,
            followers,
            leader_epoch_start_offset: log_end_offset,
            log_end_offset,
            high_watermark,
            pending: BTreeMap::new(),
        };
        leader.maybe_advance_high_watermark();
        leader
    }

    pub fn leader_epoch(&self) -> i32 {
        self.state.leader_epoch
    }

    pub fn partition_state(&self) -> &PartitionState {
        &self.state
    }

    pub fn high_watermark(&self) -> i64 {
        self.high_watermark
    }

    pub fn log_end_offset(&self) -> i64 {
        self.log_end_offset
    }

    pub fn leader_epoch_start_offset(&self) -> i64 {
        self.leader_epoch_start_offset
    }

    /// The committed ISR.
    pub fn isr(&self) -> &[BrokerId] {
        &self.state.isr
    }

    /// The committed ISR plus what the in-flight AlterPartition adds: the set the high
    /// watermark waits for, so that an expansion can never commit records the new member
    /// lacks, and a shrink takes effect only once committed.
    pub fn maximal_isr(&self) -> BTreeSet<BrokerId> {
        let mut isr: BTreeSet<BrokerId> = self.state.isr.iter().copied().collect();
        if let Some(p) = &self.in_flight {
            isr.extend(p.new_isr.iter().map(|m| m.broker_id));
        }
        isr
    }

    pub fn alter_partition_in_flight(&self) -> Option<&AlterPartitionProposal> {
        self.in_flight.as_ref()
    }

    /// The follower's log end offset as last fetched, -1 if unknown.
    pub fn follower_log_end_offset(&self, broker_id: BrokerId) -> Option<i64> {
        self.followers.get(&broker_id).map(|f| f.log_end_offset)
    }

    /// Checks a request's `CurrentLeaderEpoch` (-1: not sent, no check).
    pub fn validate_leader_epoch(&self, current_leader_epoch: i32) -> Result<(), ReplicationError> {
        let current = self.state.leader_epoch;
        if current_leader_epoch == -1 || current_leader_epoch == current {
            Ok(())
        } else if current_leader_epoch < current {
            Err(ReplicationError::FencedLeaderEpoch {
                request: current_leader_epoch,
                current,
            })
        } else {
            Err(ReplicationError::UnknownLeaderEpoch {
                request: current_leader_epoch,
                current,
            })
        }
    }

    /// The leader appended: its log now ends at `log_end_offset`.
    pub fn on_append(&mut self, log_end_offset: i64) {
        assert!(
            log_end_offset >= self.log_end_offset,
            "the leader's log never shrinks while it leads"
        );
        self.log_end_offset = log_end_offset;
        self.maybe_advance_high_watermark();
    }

    /// Validates a follower's fetch against `cache` (this leader's epoch history) and
    /// records its progress. A diverging or invalid fetch changes nothing.
    pub fn on_follower_fetch(
        &mut self,
        fetch: FollowerFetch,
        cache: &LeaderEpochCache,
        now_ms: u64,
    ) -> Result<FetchOutcome, ReplicationError> {
        self.validate_leader_epoch(fetch.current_leader_epoch)?;
        let leader_log_end_offset = self.log_end_offset;
        if !self.followers.contains_key(&fetch.replica_id) {
            return Err(ReplicationError::NotLeaderOrFollower(fetch.replica_id));
        }
        if let Some(last_fetched_epoch) = fetch.last_fetched_epoch {
            let ours = cache.end_offset_for(last_fetched_epoch, leader_log_end_offset);
            if ours.leader_epoch < last_fetched_epoch || ours.end_offset < fetch.fetch_offset {
                return Ok(FetchOutcome::Diverging(ours));
            }
        }
        if fetch.fetch_offset > leader_log_end_offset || fetch.fetch_offset < 0 {
            return Err(ReplicationError::OffsetOutOfRange {
                fetch_offset: fetch.fetch_offset,
                log_end_offset: leader_log_end_offset,
            });
        }
        if let Some(f) = self.followers.get_mut(&fetch.replica_id) {
            // Kafka's `ReplicaState.updateFetchState`: caught up when it fetched from our
            // log end, or from at least where our log ended at its previous fetch (then
            // it was caught up as of that fetch).
            if fetch.fetch_offset >= leader_log_end_offset {
                f.last_caught_up_time_ms = f.last_caught_up_time_ms.max(now_ms);
            } else if fetch.fetch_offset >= f.last_fetch_leader_log_end_offset {
                if let Some(previous) = f.last_fetch_time_ms {
                    f.last_caught_up_time_ms = f.last_caught_up_time_ms.max(previous);
                }
            }
            f.log_end_offset = fetch.fetch_offset;
            f.last_fetch_time_ms = Some(now_ms);
            f.last_fetch_leader_log_end_offset = leader_log_end_offset;
            f.broker_epoch = fetch.replica_epoch;
        }
        self.maybe_advance_high_watermark();
        Ok(FetchOutcome::Read {
            high_watermark: self.high_watermark,
        })
    }

    fn maybe_advance_high_watermark(&mut self) {
        // KIP-966: with fewer in-sync replicas than min.insync.replicas, nothing more is
        // committed, so that losing the remaining ones cannot lose committed records.
        if self.state.isr.len() < self.config.min_insync_replicas {
            return;
        }
        let mut candidate = self.log_end_offset;
        for id in self.maximal_isr() {
            if id == self.local_broker_id {
                continue;
            }
            // A member that has not fetched from this leader yet is at -1: the high
            // watermark waits for it.
            let follower_leo = self.followers.get(&id).map_or(-1, |f| f.log_end_offset);
            candidate = candidate.min(follower_leo);
        }
        if candidate > self.high_watermark {
            self.high_watermark = candidate;
        }
        assert!(self.high_watermark <= self.log_end_offset);
    }

    /// acks=all, before the append: refused while the ISR is below min.insync.replicas.
    pub fn check_acks_all(&self) -> Result<(), ReplicationError> {
        let isr = self.state.isr.len();
        if isr < self.config.min_insync_replicas {
            return Err(ReplicationError::NotEnoughReplicas {
                isr,
                min_insync_replicas: self.config.min_insync_replicas,
            });
        }
        Ok(())
    }

    /// acks=all, after the append: the produce `token` (chosen by the caller) waits until
    /// the high watermark reaches `required_offset` (its last offset + 1) or
    /// `deadline_ms`. Answers come from [`Self::poll_produces`].
    pub fn add_pending_produce(
        &mut self,
        token: u64,
        required_offset: i64,
        deadline_ms: u64,
    ) -> Result<(), ReplicationError> {
        assert!(
            required_offset <= self.log_end_offset,
            "a produce waits only for what was appended"
        );
        if self.pending.len() >= PENDING_PRODUCES_MAX {
            return Err(ReplicationError::TooManyPendingProduces(self.pending.len()));
        }
        let previous = self.pending.insert(
            token,
            PendingProduce {
                required_offset,
                deadline_ms,
            },
        );
        assert!(previous.is_none(), "produce token {token} reused");
        Ok(())
    }

    pub fn pending_produces(&self) -> usize {
        self.pending.len()
    }

    /// The produces that are answered now: acknowledged once the high watermark reached
    /// them; NOT_ENOUGH_REPLICAS_AFTER_APPEND once the ISR is below min.insync.replicas
    /// (the high watermark cannot advance then, so waiting would only time out);
    /// REQUEST_TIMED_OUT at the deadline. The broker calls this after every event that
    /// can change the answer (a follower fetch, an append, an ISR change) and at the
    /// earliest deadline.
    pub fn poll_produces(&mut self, now_ms: u64) -> Vec<ProduceCompletion> {
        let isr = self.state.isr.len();
        let min_insync_replicas = self.config.min_insync_replicas;
        let high_watermark = self.high_watermark;
        let mut done = Vec::new();
        self.pending.retain(|&token, p| {
            let result = if high_watermark >= p.required_offset {
                Ok(())
            } else if isr < min_insync_replicas {
                Err(ReplicationError::NotEnoughReplicasAfterAppend {
                    isr,
                    min_insync_replicas,
                })
            } else if now_ms >= p.deadline_ms {
                Err(ReplicationError::RequestTimedOut {
                    required_offset: p.required_offset,
                })
            } else {
                return true;
            };
            done.push(ProduceCompletion { token, result });
            false
        });
        done
    }

    /// The earliest deadline of a waiting produce: when to call `poll_produces` next.
    pub fn next_produce_deadline_ms(&self) -> Option<u64> {
        self.pending.values().map(|p| p.deadline_ms).min()
    }

    /// Leadership moved away: every waiting produce is answered NOT_LEADER_OR_FOLLOWER.
    pub fn resign(self) -> Vec<ProduceCompletion> {
        let local = self.local_broker_id;
        self.pending
            .into_keys()
            .map(|token| ProduceCompletion {
                token,
                result: Err(ReplicationError::NotLeaderOrFollower(local)),
            })
            .collect()
    }

    /// ListOffsets "latest" for a client: the high watermark, or OFFSET_NOT_AVAILABLE
    /// while a new leader's high watermark has not reached the start of its epoch, since
    /// it may be below what the previous leader already reported (KIP-207).
    pub fn list_offsets_latest(&self) -> Result<i64, ReplicationError> {
        if self.high_watermark < self.leader_epoch_start_offset {
            return Err(ReplicationError::OffsetNotAvailable {
                high_watermark: self.high_watermark,
                leader_epoch_start_offset: self.leader_epoch_start_offset,
            });
        }
        Ok(self.high_watermark)
    }

    /// The next ISR change to ask the controller for, if none is in flight: first the
    /// members that have not caught up for `replica.lag.time.max.ms` leave, else the
    /// followers eligible to join are added. `brokers` is the metadata image's view.
    /// The returned proposal is in flight until [`Self::on_alter_partition_response`]
    /// or a metadata update settles it.
    pub fn isr_proposal(
        &mut self,
        now_ms: u64,
        brokers: impl Fn(BrokerId) -> Option<BrokerState>,
    ) -> Option<AlterPartitionProposal> {
        if self.in_flight.is_some() {
            return None;
        }
        let lagging: BTreeSet<BrokerId> = self
            .state
            .isr
            .iter()
            .copied()
            .filter(|&id| id != self.local_broker_id && !self.is_caught_up(id, now_ms))
            .collect();
        let new_isr: Vec<BrokerId> = if !lagging.is_empty() {
            self.state
                .isr
                .iter()
                .copied()
                .filter(|id| !lagging.contains(id))
                .collect()
        } else {
            let joining: Vec<BrokerId> = self
                .followers
                .keys()
                .copied()
                .filter(|id| !self.state.isr.contains(id) && self.may_join_isr(*id, &brokers))
                .collect();
            if joining.is_empty() {
                return None;
            }
            self.state.isr.iter().copied().chain(joining).collect()
        };
        let proposal = AlterPartitionProposal {
            leader_epoch: self.state.leader_epoch,
            partition_epoch: self.state.partition_epoch,
            new_isr: new_isr
                .into_iter()
                .map(|broker_id| IsrMember {
                    broker_id,
                    broker_epoch: if broker_id == self.local_broker_id {
                        self.local_broker_epoch
                    } else {
                        self.followers
                            .get(&broker_id)
                            .map_or(-1, |f| f.broker_epoch)
                    },
                })
                .collect(),
        };
        assert!(proposal
            .new_isr
            .iter()
            .any(|m| m.broker_id == self.local_broker_id));
        self.in_flight = Some(proposal.clone());
        Some(proposal)
    }

    /// Kafka's `isCaughtUp`: at the leader's log end, or caught up within the lag time.
    fn is_caught_up(&self, id: BrokerId, now_ms: u64) -> bool {
        self.followers.get(&id).is_some_and(|f| {
            f.log_end_offset == self.log_end_offset
                || now_ms.saturating_sub(f.last_caught_up_time_ms)
                    <= self.config.replica_lag_time_max_ms
        })
    }

    fn may_join_isr(
        &self,
        id: BrokerId,
        brokers: &impl Fn(BrokerId) -> Option<BrokerState>,
    ) -> bool {
        let Some(f) = self.followers.get(&id) else {
            return false;
        };
        let Some(broker) = brokers(id) else {
            return false;
        };
        // KAFKA-7128: at the high watermark is not enough; the follower must also hold
        // everything of the previous epochs, which a new leader's lagging high watermark
        // may not cover yet.
        f.log_end_offset >= self.high_watermark
            && f.log_end_offset >= self.leader_epoch_start_offset
            && !broker.fenced
            && !broker.in_controlled_shutdown
            // KIP-903: the fetch must come from the broker's current incarnation.
            && f.broker_epoch == broker.broker_epoch
    }

    /// The controller answered `proposal`: `Ok` with the committed partition state, or
    /// an error (the change was refused; the next [`Self::isr_proposal`] reconsiders).
    /// An answer to a proposal that is no longer the one in flight (a metadata update
    /// superseded it and a newer one was sent) is ignored, as Kafka does: clearing the
    /// newer one would let the high watermark stop waiting for the members it adds.
    pub fn on_alter_partition_response<E>(
        &mut self,
        proposal: &AlterPartitionProposal,
        result: Result<PartitionState, E>,
    ) {
        if self.in_flight.as_ref() != Some(proposal) {
            if let Ok(state) = result {
                self.update_partition_state(state);
            }
            return;
        }
        self.in_flight = None;
        if let Ok(state) = result {
            self.update_partition_state(state);
        }
    }

    /// A newer partition state for this leader epoch arrived from the metadata log (an
    /// ISR change, ours or the controller's own, e.g. a fenced broker removed). An
    /// older or equal partition epoch is ignored. A change of leader epoch is not an
    /// update: the broker resigns this leader and builds the next role.
    pub fn update_partition_state(&mut self, state: PartitionState) {
        assert_eq!(
            state.leader_epoch, self.state.leader_epoch,
            "a new leader epoch needs a new PartitionLeader"
        );
        if state.partition_epoch <= self.state.partition_epoch {
            return;
        }
        assert!(
            state.isr.contains(&self.local_broker_id),
            "the leader is always in its ISR"
        );
        if self
            .in_flight
            .as_ref()
            .is_some_and(|p| p.partition_epoch < state.partition_epoch)
        {
            // The proposal was based on an older state: committed or superseded.
            self.in_flight = None;
        }
        for &id in &state.replicas {
            if id != self.local_broker_id {
                self.followers.entry(id).or_insert(FollowerState {
                    log_end_offset: -1,
                    last_fetch_time_ms: None,
                    last_fetch_leader_log_end_offset: -1,
                    last_caught_up_time_ms: 0,
                    broker_epoch: -1,
                });
            }
        }
        self.followers.retain(|id, _| state.replicas.contains(id));
        self.state = state;
        self.maybe_advance_high_watermark();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    const LAG_MS: u64 = 30_000;

    fn state(isr: &[BrokerId], partition_epoch: i32) -> PartitionState {
        PartitionState {
            leader_epoch: 5,
            partition_epoch,
            replicas: vec![1, 2, 3],
            isr: isr.to_vec(),
        }
    }

    fn leader(isr: &[BrokerId], min_isr: usize, leo: i64, hw: i64) -> PartitionLeader {
        PartitionLeader::become_leader(
            1,
            100,
            ReplicationConfig {
                replica_lag_time_max_ms: LAG_MS,
                min_insync_replicas: min_isr,
            },
            state(isr, 7),
            leo,
            hw,
            0,
        )
    }

    fn epochs() -> LeaderEpochCache {
        LeaderEpochCache::from_entries([(0, 0), (3, 10), (5, 20)]).unwrap()
    }

    fn fetch(replica_id: BrokerId, fetch_offset: i64) -> FollowerFetch {
        FollowerFetch {
            replica_id,
            replica_epoch: 200 + i64::from(replica_id),
            current_leader_epoch: 5,
            fetch_offset,
            last_fetched_epoch: None,
        }
    }

    fn live(id: BrokerId) -> Option<BrokerState> {
        Some(BrokerState {
            broker_epoch: 200 + i64::from(id),
            fenced: false,
            in_controlled_shutdown: false,
        })
    }

    fn read(l: &mut PartitionLeader, f: FollowerFetch, now: u64) -> i64 {
        match l.on_follower_fetch(f, &epochs(), now).unwrap() {
            FetchOutcome::Read { high_watermark } => high_watermark,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn high_watermark_is_the_minimum_over_the_isr_and_monotonic() {
        let mut l = leader(&[1, 2, 3], 1, 20, 20);
        l.on_append(30);
        assert_eq!(l.high_watermark(), 20, "followers not fetched yet");
        assert_eq!(read(&mut l, fetch(2, 25), 1), 20);
        assert_eq!(read(&mut l, fetch(3, 27), 1), 25);
        assert_eq!(read(&mut l, fetch(2, 30), 2), 27);
        assert_eq!(read(&mut l, fetch(3, 30), 2), 30);
        // A follower that fetches from lower (it truncated) never moves the HW back.
        let _ = read(&mut l, fetch(3, 28), 3);
        assert_eq!(l.high_watermark(), 30);
    }

    #[test]
    fn followers_outside_the_isr_do_not_hold_the_high_watermark() {
        let mut l = leader(&[1, 2], 1, 20, 20);
        l.on_append(30);
        assert_eq!(read(&mut l, fetch(2, 30), 1), 30);
        assert_eq!(read(&mut l, fetch(3, 0), 1), 30);
    }

    #[test]
    fn high_watermark_does_not_advance_below_min_isr() {
        // KIP-966: ISR {1} with min.insync.replicas 2.
        let mut l = leader(&[1], 2, 20, 20);
        l.on_append(30);
        assert_eq!(l.high_watermark(), 20);
        assert_eq!(read(&mut l, fetch(2, 30), 1), 20);
        // Once the ISR is back to two, it advances.
        l.update_partition_state(state(&[1, 2], 8));
        assert_eq!(l.high_watermark(), 30);
    }

    #[test]
    fn acks_all_refused_before_the_append_below_min_isr() {
        let l = leader(&[1, 2], 3, 20, 20);
        assert_eq!(
            l.check_acks_all(),
            Err(ReplicationError::NotEnoughReplicas {
                isr: 2,
                min_insync_replicas: 3
            })
        );
        assert_eq!(leader(&[1, 2], 2, 20, 20).check_acks_all(), Ok(()));
    }

    #[test]
    fn acks_all_completes_when_the_high_watermark_reaches_the_batch() {
        let mut l = leader(&[1, 2], 2, 20, 20);
        l.on_append(25);
        l.add_pending_produce(1, 25, 1_000).unwrap();
        l.on_append(26);
        l.add_pending_produce(2, 26, 1_000).unwrap();
        assert!(l.poll_produces(10).is_empty());
        let _ = read(&mut l, fetch(2, 25), 10);
        assert_eq!(
            l.poll_produces(10),
            vec![ProduceCompletion {
                token: 1,
                result: Ok(())
            }]
        );
        assert_eq!(l.pending_produces(), 1);
        assert_eq!(l.next_produce_deadline_ms(), Some(1_000));
    }

    #[test]
    fn acks_all_times_out_at_the_deadline() {
        let mut l = leader(&[1, 2], 2, 20, 20);
        l.on_append(25);
        l.add_pending_produce(9, 25, 1_000).unwrap();
        assert!(l.poll_produces(999).is_empty());
        assert_eq!(
            l.poll_produces(1_000),
            vec![ProduceCompletion {
                token: 9,
                result: Err(ReplicationError::RequestTimedOut {
                    required_offset: 25
                })
            }]
        );
    }

    #[test]
    fn acks_all_fails_after_append_when_the_isr_shrinks_below_min() {
        let mut l = leader(&[1, 2], 2, 20, 20);
        l.on_append(25);
        l.add_pending_produce(4, 25, 1_000).unwrap();
        l.update_partition_state(state(&[1], 8));
        assert_eq!(
            l.poll_produces(10),
            vec![ProduceCompletion {
                token: 4,
                result: Err(ReplicationError::NotEnoughReplicasAfterAppend {
                    isr: 1,
                    min_insync_replicas: 2
                })
            }]
        );
    }

    #[test]
    fn an_already_committed_produce_is_acknowledged_even_if_the_isr_shrank_since() {
        let mut l = leader(&[1, 2], 2, 20, 20);
        l.on_append(25);
        l.add_pending_produce(4, 25, 1_000).unwrap();
        let _ = read(&mut l, fetch(2, 25), 5);
        l.update_partition_state(state(&[1], 8));
        assert_eq!(l.poll_produces(10)[0].result, Ok(()));
    }

    #[test]
    fn resigning_fails_every_waiting_produce() {
        let mut l = leader(&[1, 2], 2, 20, 20);
        l.on_append(25);
        l.add_pending_produce(1, 25, 1_000).unwrap();
        l.add_pending_produce(2, 25, 1_000).unwrap();
        let done = l.resign();
        assert_eq!(done.len(), 2);
        assert!(done
            .iter()
            .all(|c| c.result == Err(ReplicationError::NotLeaderOrFollower(1))));
    }

    #[test]
    fn follower_fetch_epoch_checks() {
        let mut l = leader(&[1, 2, 3], 1, 30, 20);
        let mut f = fetch(2, 25);
        f.current_leader_epoch = 4;
        assert_eq!(
            l.on_follower_fetch(f, &epochs(), 1),
            Err(ReplicationError::FencedLeaderEpoch {
                request: 4,
                current: 5
            })
        );
        f.current_leader_epoch = 6;
        assert_eq!(
            l.on_follower_fetch(f, &epochs(), 1),
            Err(ReplicationError::UnknownLeaderEpoch {
                request: 6,
                current: 5
            })
        );
        // A stale fetch updated nothing.
        assert_eq!(l.follower_log_end_offset(2), Some(-1));
        assert_eq!(
            l.on_follower_fetch(fetch(9, 0), &epochs(), 1),
            Err(ReplicationError::NotLeaderOrFollower(9))
        );
        assert_eq!(
            l.on_follower_fetch(fetch(2, 31), &epochs(), 1),
            Err(ReplicationError::OffsetOutOfRange {
                fetch_offset: 31,
                log_end_offset: 30
            })
        );
    }

    #[test]
    fn diverging_last_fetched_epoch_answers_the_epoch_end_and_changes_nothing() {
        // Leader epochs 0@0, 3@10, 5@20, log end 30.
        let mut l = leader(&[1, 2, 3], 1, 30, 20);
        // The follower's last record is of epoch 4 at offset 22: the leader never had
        // epoch 4; its largest lower epoch 3 ended at 20.
        let mut f = fetch(2, 23);
        f.last_fetched_epoch = Some(4);
        assert_eq!(
            l.on_follower_fetch(f, &epochs(), 1),
            Ok(FetchOutcome::Diverging(EpochEndOffset {
                leader_epoch: 3,
                end_offset: 20
            }))
        );
        // Epoch 3 known, but the follower has more of it than the leader had.
        f.last_fetched_epoch = Some(3);
        f.fetch_offset = 21;
        assert!(matches!(
            l.on_follower_fetch(f, &epochs(), 1),
            Ok(FetchOutcome::Diverging(EpochEndOffset {
                leader_epoch: 3,
                end_offset: 20
            }))
        ));
        assert_eq!(l.follower_log_end_offset(2), Some(-1));
        // Matching: epoch 3 up to 20 exactly is a normal fetch.
        f.fetch_offset = 20;
        assert_eq!(
            l.on_follower_fetch(f, &epochs(), 1),
            Ok(FetchOutcome::Read { high_watermark: 20 })
        );
        assert_eq!(l.follower_log_end_offset(2), Some(20));
    }

    #[test]
    fn shrinks_followers_not_caught_up_for_the_lag_time() {
        let mut l = leader(&[1, 2, 3], 1, 20, 20);
        l.on_append(30);
        let _ = read(&mut l, fetch(2, 30), 1_000);
        let _ = read(&mut l, fetch(3, 22), 1_000);
        // Within the lag time, nobody leaves.
        assert_eq!(l.isr_proposal(LAG_MS, live), None);
        // Follower 3 last caught up at 0 (become_leader), follower 2 at 1000.
        let p = l.isr_proposal(LAG_MS + 1, live).unwrap();
        assert_eq!(
            p.new_isr.iter().map(|m| m.broker_id).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!((p.leader_epoch, p.partition_epoch), (5, 7));
        assert_eq!(p.new_isr[0].broker_epoch, 100);
        // One in flight at a time.
        assert_eq!(l.isr_proposal(LAG_MS + 2, live), None);
        l.on_alter_partition_response::<()>(&p, Ok(state(&[1, 2], 8)));
        assert_eq!(l.isr(), &[1, 2]);
        assert!(l.alter_partition_in_flight().is_none());
    }

    #[test]
    fn a_follower_at_the_leaders_end_is_caught_up_however_long_ago_it_fetched() {
        let mut l = leader(&[1, 2], 1, 20, 20);
        let _ = read(&mut l, fetch(2, 20), 1);
        assert_eq!(l.isr_proposal(10 * LAG_MS, live), None);
        // Until the leader appends: then its last caught-up time counts.
        l.on_append(21);
        assert!(l.isr_proposal(10 * LAG_MS, live).is_some());
    }

    #[test]
    fn caught_up_as_of_the_previous_fetch_counts() {
        let mut l = leader(&[1, 2], 1, 20, 20);
        let _ = read(&mut l, fetch(2, 20), 1_000);
        l.on_append(25);
        // Fetching from 20 at 2000: not at the end (25), but from where the leader ended
        // at the previous fetch (20), so caught up as of that fetch (1000). Fetching from
        // 25 at 3000 (the leader's end at 2000): caught up as of 2000.
        let _ = read(&mut l, fetch(2, 20), 2_000);
        l.on_append(30);
        let _ = read(&mut l, fetch(2, 25), 3_000);
        assert_eq!(l.isr_proposal(2_000 + LAG_MS, live), None);
        assert!(l.isr_proposal(2_000 + LAG_MS + 1, live).is_some());
    }

    #[test]
    fn expands_only_at_the_high_watermark_and_the_epoch_start() {
        // New leader at LEO 30 (epoch start 30) with a lagging HW 20 (KAFKA-7128).
        let l = leader(&[1], 1, 30, 20);
        assert_eq!(l.high_watermark(), 30, "alone in the ISR with min.isr 1");
        let mut l = leader(&[1, 2], 1, 30, 20);
        let _ = read(&mut l, fetch(3, 25), 1);
        assert_eq!(l.high_watermark(), 20);
        // Follower 3 is above the high watermark but below the epoch start: not in sync.
        assert_eq!(l.isr_proposal(2, live), None);
        let _ = read(&mut l, fetch(3, 30), 3);
        let p = l.isr_proposal(4, live).unwrap();
        assert_eq!(
            p.new_isr,
            vec![
                IsrMember {
                    broker_id: 1,
                    broker_epoch: 100
                },
                IsrMember {
                    broker_id: 2,
                    broker_epoch: -1
                },
                IsrMember {
                    broker_id: 3,
                    broker_epoch: 203
                },
            ]
        );
        // While the expansion is in flight the high watermark waits for 3 as well.
        assert!(l.maximal_isr().contains(&3));
    }

    #[test]
    fn expansion_requires_unfenced_current_broker_epoch() {
        let mut l = leader(&[1, 2], 1, 30, 30);
        let _ = read(&mut l, fetch(2, 30), 1);
        let _ = read(&mut l, fetch(3, 30), 1);
        let fenced = |id| {
            live(id).map(|b| BrokerState {
                fenced: id == 3,
                ..b
            })
        };
        assert_eq!(l.isr_proposal(2, fenced), None);
        let shutting = |id| {
            live(id).map(|b| BrokerState {
                in_controlled_shutdown: id == 3,
                ..b
            })
        };
        assert_eq!(l.isr_proposal(2, shutting), None);
        // KIP-903: broker 3 re-registered (wiped disk) with epoch 999; its fetches came
        // from epoch 203.
        let reregistered = |id| {
            live(id).map(|b| {
                if id == 3 {
                    BrokerState {
                        broker_epoch: 999,
                        ..b
                    }
                } else {
                    b
                }
            })
        };
        assert_eq!(l.isr_proposal(2, reregistered), None);
        assert_eq!(l.isr_proposal(2, |_| None), None);
        assert!(l.isr_proposal(2, live).is_some());
    }

    #[test]
    fn a_refused_alter_partition_can_be_proposed_again() {
        let mut l = leader(&[1, 2], 1, 30, 30);
        let _ = read(&mut l, fetch(3, 30), 1);
        let p = l.isr_proposal(2, live).unwrap();
        l.on_alter_partition_response(&p, Err("INVALID_UPDATE_VERSION"));
        assert_eq!(l.isr(), &[1, 2]);
        assert!(l.isr_proposal(3, live).is_some());
    }

    #[test]
    fn a_metadata_update_supersedes_the_in_flight_change() {
        let mut l = leader(&[1, 2, 3], 1, 30, 30);
        l.on_append(31);
        let stale = l.isr_proposal(LAG_MS + 1, live).unwrap();
        // The controller fenced broker 3 meanwhile (partition epoch 8).
        l.update_partition_state(state(&[1, 2], 8));
        assert!(l.alter_partition_in_flight().is_none());
        // An old state is ignored.
        l.update_partition_state(state(&[1, 2, 3], 6));
        assert_eq!(l.isr(), &[1, 2]);
        // A new proposal goes out; the refusal of the stale one must not clear it.
        let _ = read(&mut l, fetch(2, 31), 1);
        let _ = read(&mut l, fetch(3, 31), 1);
        let current = l.isr_proposal(LAG_MS + 2, live).unwrap();
        assert_ne!(current, stale);
        l.on_alter_partition_response(&stale, Err("INVALID_UPDATE_VERSION"));
        assert_eq!(l.alter_partition_in_flight(), Some(&current));
        assert!(l.maximal_isr().contains(&3));
    }

    #[test]
    fn list_offsets_latest_waits_for_the_epoch_start() {
        // KIP-207: new leader, LEO 30, HW 20 inherited from when it followed.
        let mut l = leader(&[1, 2], 1, 30, 20);
        assert_eq!(
            l.list_offsets_latest(),
            Err(ReplicationError::OffsetNotAvailable {
                high_watermark: 20,
                leader_epoch_start_offset: 30
            })
        );
        let _ = read(&mut l, fetch(2, 30), 1);
        assert_eq!(l.list_offsets_latest(), Ok(30));
    }

    #[test]
    fn the_purgatory_is_bounded() {
        let mut l = leader(&[1, 2], 2, 20, 20);
        for token in 0..PENDING_PRODUCES_MAX as u64 {
            l.add_pending_produce(token, 20, 10).unwrap();
        }
        assert_eq!(
            l.add_pending_produce(u64::MAX, 20, 10),
            Err(ReplicationError::TooManyPendingProduces(
                PENDING_PRODUCES_MAX
            ))
        );
    }
}
