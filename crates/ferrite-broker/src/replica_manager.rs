//! The partitions this broker hosts: their logs, their role in replication (leader or
//! follower, from the metadata image) and the watch channels that wake long-polling
//! fetches.
//!
//! A partition this broker leads holds a `ferrite_replication::PartitionLeader`: the
//! followers' log end offsets (from their fetches), the high watermark, ISR change
//! proposals and the acks=all purgatory. On one node the ISR is this broker alone, so
//! the high watermark is the log end offset after every append and nothing is ever
//! proposed. Lock order: `replication`, then `log`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use ferrite_metadata::{MetadataImage, PartitionImage};
use ferrite_replication::{
    AlterPartitionProposal, BrokerState, EpochEndOffset, FetchOutcome, FollowerFetch,
    PartitionLeader, PartitionState, ProduceCompletion, ReplicationConfig, ReplicationError,
};
use ferrite_storage::{AppendInfo, LogConfig, PartitionLog, ReadPlan, StorageError};
use kafka_protocol::ResponseError;
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::config::BrokerConfig;

pub type TopicPartition = (Arc<str>, i32);

/// AlterPartition requests waiting to be sent to the active controller, at most.
pub const ALTER_PARTITION_QUEUED_MAX: usize = 1024;

/// An ISR change this broker, as leader, asks the controller for (Kafka's
/// AlterPartition, one partition per item). The broker's controller wiring takes these
/// from [`ReplicaManager::take_alter_partition_receiver`], sends them to the active
/// controller and reports the outcome with [`ReplicaManager::alter_partition_done`]
/// (the committed partition state, or the error code). Until then the partition sends
/// no other change (one AlterPartition in flight per partition); the metadata image
/// settles it too when it shows a newer partition epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlterPartitionItem {
    pub topic: Arc<str>,
    pub topic_id: Uuid,
    pub partition: i32,
    pub proposal: AlterPartitionProposal,
}

/// See [`Partition::follower_of`]: the partition stays a follower of one leader epoch
/// while this is held.
pub struct FollowerGuard<'a>(#[allow(dead_code)] MutexGuard<'a, Replication>);

/// This broker's part in one partition.
enum Role {
    Leader(Box<LeaderRole>),
    /// Following `leader` (-1: none elected); its high watermark as last fetched.
    Follower,
}

struct LeaderRole {
    state: PartitionLeader,
    /// acks=all produces waiting for the high watermark, by token.
    waiters: HashMap<u64, oneshot::Sender<Result<(), ReplicationError>>>,
    /// KIP-890 part 1's verification guards (Kafka's `VerificationStateEntry`), by
    /// producer id: a verification with another broker's transaction coordinator in
    /// progress or done, for a producer with no transaction ongoing here. A marker or
    /// any transactional write of the producer removes its guard, so a batch verified
    /// before the transaction ended cannot open a new one afterwards (KAFKA-17754).
    /// Leader state only: a new leader starts with none and verifies again.
    verification_guards: HashMap<i64, VerificationGuard>,
}

/// Verification guards one partition's leader holds at most; a verification beyond
/// it is refused with a retriable error (NOT_ENOUGH_REPLICAS, as Kafka maps retriable
/// verification errors), after guards older than [`VERIFICATION_GUARD_EXPIRY_MS`]
/// are dropped.
pub const VERIFICATION_GUARDS_MAX: usize = 4096;
/// A verification guard older than this is dropped when the table is full: its
/// producer's verified batch either arrived long ago or never will.
pub const VERIFICATION_GUARD_EXPIRY_MS: i64 = 60_000;

#[derive(Debug, Clone, Copy)]
struct VerificationGuard {
    token: u64,
    created_ms: i64,
}

/// How a leader's write takes part in KIP-890 part 1's verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnWrite {
    /// Not transactional.
    None,
    /// A transactional write (data batch or marker) of this producer that needs no
    /// guard: a marker, or a batch checked under the local coordinator's lock. It ends
    /// the producer's verification here.
    Producer(i64),
    /// A transactional write checked by another broker's coordinator: accepted only if
    /// the producer's transaction is ongoing here, or `guard` (from
    /// [`Partition::begin_txn_verification`]) is still the producer's guard, i.e. no
    /// marker or other transactional write came since the verification began.
    Verified {
        producer_id: i64,
        guard: Option<u64>,
    },
}

impl TxnWrite {
    /// A producer's transactional batch ([`TxnWrite::Producer`]) or not.
    pub fn of(records: &[u8]) -> TxnWrite {
        ferrite_storage::BatchHeader::parse(records)
            .ok()
            .map_or(TxnWrite::None, |h| TxnWrite::of_header(&h))
    }

    /// [`TxnWrite::of`] from a parsed header.
    pub fn of_header(h: &ferrite_storage::BatchHeader) -> TxnWrite {
        if h.attributes & ferrite_storage::batch::ATTR_TRANSACTIONAL != 0 {
            TxnWrite::Producer(h.producer_id)
        } else {
            TxnWrite::None
        }
    }

    fn producer_id(self) -> Option<i64> {
        match self {
            TxnWrite::None => None,
            TxnWrite::Producer(id)
            | TxnWrite::Verified {
                producer_id: id, ..
            } => Some(id),
        }
    }
}

struct Replication {
    role: Role,
    next_token: u64,
}

/// An acks=all produce appended and waiting in the purgatory.
pub struct ProduceWaiter {
    deadline_ms: i64,
    rx: oneshot::Receiver<Result<(), ReplicationError>>,
}

impl ProduceWaiter {
    /// The outcome if it is already decided (one node: the append itself completes it).
    pub fn try_result(&mut self) -> Option<Result<(), ReplicationError>> {
        self.rx.try_recv().ok()
    }
}

/// Why a produce to this partition is refused before or after the append.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// KIP-890 part 1: the batch's transaction is not ongoing here and its verification
    /// does not hold (never verified, or a marker came since).
    #[error("transactional batch of producer {producer_id} is not part of an ongoing transaction: not verified with the coordinator, or the transaction ended since")]
    NotInTransaction { producer_id: i64 },
    #[error("{0} transaction verifications already in progress on this partition")]
    VerificationsFull(usize),
}

pub struct Partition {
    pub topic: Arc<str>,
    pub topic_id: Uuid,
    pub index: i32,
    log: Mutex<PartitionLog>,
    leader_epoch: AtomicI32,
    /// The leader as the metadata image says (-1: none).
    leader_id: AtomicI32,
    replication: Mutex<Replication>,
    /// The high watermark: the leader's, or on a follower the leader's as last fetched
    /// (never above its own log end).
    high_watermark: AtomicI64,
    /// Bumped after every append and every high watermark change, for long-polling
    /// fetches (consumers wait for the high watermark, followers for the log end).
    high_watermark_tx: watch::Sender<i64>,
    /// Closed-segment bytes after the last compaction pass; no new pass until they grow.
    pub compacted_closed_bytes: AtomicU64,
    /// Shared by every partition of the log directory: whether it is full.
    log_dir_full: Arc<AtomicBool>,
}

impl Partition {
    /// The log, even if a thread panicked while holding it: the log's own invariants are
    /// checked by assertions, and a poisoned mutex must not take the broker down.
    pub fn log(&self) -> MutexGuard<'_, PartitionLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn leader_epoch(&self) -> i32 {
        self.leader_epoch.load(Ordering::Acquire)
    }

    /// The leader the metadata names, -1 if none.
    pub fn leader_id(&self) -> i32 {
        self.leader_id.load(Ordering::Acquire)
    }

    fn replication(&self) -> MutexGuard<'_, Replication> {
        self.replication.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this broker leads the partition now.
    /// Whether this broker already leads `leader_epoch` (no new epoch to record).
    fn leads_epoch(&self, leader_epoch: i32) -> bool {
        matches!(&self.replication().role, Role::Leader(l) if l.state.leader_epoch() == leader_epoch)
    }

    pub fn is_leader(&self) -> bool {
        matches!(self.replication().role, Role::Leader(_))
    }

    /// The leader epoch this broker leads the partition in, if it leads it.
    pub fn led_epoch(&self) -> Option<i32> {
        match &self.replication().role {
            Role::Leader(l) => Some(l.state.leader_epoch()),
            Role::Follower => None,
        }
    }

    /// KIP-392, on the leader: the in-sync follower in `client_rack` that a consumer
    /// fetching at `fetch_offset` should read from instead (Kafka's
    /// `RackAwareReplicaSelector`), `None` to keep it here. `rack_of` gives a broker's
    /// registered rack. Followers are taken at their log end offset as last fetched,
    /// their log start offset is not known here: a consumer sent to one whose log starts
    /// later gets OFFSET_OUT_OF_RANGE there and comes back to the leader (librdkafka and
    /// the Java client both do).
    pub fn preferred_read_replica(
        &self,
        node_id: i32,
        client_rack: &str,
        fetch_offset: i64,
        rack_of: impl Fn(i32) -> Option<String>,
    ) -> Option<i32> {
        let repl = self.replication();
        let Role::Leader(leader) = &repl.role else {
            return None;
        };
        let state = &leader.state;
        let me = ferrite_replication::ReadReplica {
            broker_id: node_id,
            rack: rack_of(node_id),
            log_end_offset: state.log_end_offset(),
        };
        let followers: Vec<ferrite_replication::ReadReplica> = state
            .isr()
            .iter()
            .filter(|id| **id != node_id)
            .filter_map(|id| {
                Some(ferrite_replication::ReadReplica {
                    broker_id: *id,
                    rack: rack_of(*id),
                    log_end_offset: state.follower_log_end_offset(*id)?,
                })
            })
            .collect();
        ferrite_replication::preferred_read_replica(client_rack, &me, &followers, fetch_offset)
    }

    /// An append by this broker as leader with acks=1 semantics (a start-up migration of
    /// `__consumer_offsets`, which runs before any follower can fetch). Refused with
    /// NOT_LEADER_OR_FOLLOWER when this broker does not lead.
    pub fn append(&self, records: &[u8], now_ms: i64) -> Result<AppendInfo, ProduceError> {
        self.leader_write(now_ms, 1, 0, TxnWrite::of(records), |log, epoch| {
            log.append_coordinator(records, epoch, now_ms)
        })
        .map(|(info, _)| info)
    }

    /// A group coordinator's write (`__consumer_offsets`) as leader with acks=all
    /// semantics, as Kafka's GroupMetadataManager appends: refused with
    /// NOT_ENOUGH_REPLICAS below min.insync.replicas, and answered through the waiter
    /// once every ISR member has it (or REQUEST_TIMED_OUT after `timeout_ms`).
    /// `txn` is the write's part in transaction verification (TxnOffsetCommit's
    /// transactional offsets).
    pub fn append_coordinator(
        &self,
        records: &[u8],
        now_ms: i64,
        timeout_ms: i64,
        txn: TxnWrite,
    ) -> Result<(AppendInfo, ProduceWaiter), ProduceError> {
        let (info, waiter) = self.leader_write(now_ms, -1, timeout_ms, txn, |log, epoch| {
            log.append_coordinator(records, epoch, now_ms)
        })?;
        // acks=-1 always returns a waiter.
        let Some(waiter) = waiter else {
            return Err(ReplicationError::NotLeaderOrFollower(self.leader_id()).into());
        };
        Ok((info, waiter))
    }

    /// The transaction coordinator's end-transaction marker, appended as leader with
    /// acks=all semantics, as Kafka writes markers (`PartitionLog::append_marker`):
    /// refused below min.insync.replicas; the waiter completes when the ISR has it.
    pub fn append_marker(
        &self,
        producer_id: i64,
        producer_epoch: i16,
        control: ferrite_storage::ControlType,
        coordinator_epoch: i32,
        now_ms: i64,
        timeout_ms: i64,
    ) -> Result<(AppendInfo, ProduceWaiter), ProduceError> {
        let txn = TxnWrite::Producer(producer_id);
        let (info, waiter) = self.leader_write(now_ms, -1, timeout_ms, txn, |log, epoch| {
            log.append_marker(
                producer_id,
                producer_epoch,
                control,
                coordinator_epoch,
                epoch,
                now_ms,
            )
        })?;
        let Some(waiter) = waiter else {
            return Err(ReplicationError::NotLeaderOrFollower(self.leader_id()).into());
        };
        Ok((info, waiter))
    }

    /// A coordinator's append that must reach the ISR (refused with NOT_ENOUGH_REPLICAS
    /// below min.insync.replicas) but is waited for later, with
    /// [`Self::replicated_waiter`], by whatever answer depends on it.
    pub fn append_coordinator_unwaited(
        &self,
        records: &[u8],
        now_ms: i64,
    ) -> Result<AppendInfo, ProduceError> {
        {
            let repl = self.replication();
            let Role::Leader(leader) = &repl.role else {
                return Err(ReplicationError::NotLeaderOrFollower(self.leader_id()).into());
            };
            leader.state.check_acks_all()?;
        }
        self.leader_write(now_ms, 1, 0, TxnWrite::None, |log, epoch| {
            log.append_coordinator(records, epoch, now_ms)
        })
        .map(|(info, _)| info)
    }

    /// A waiter that completes when the high watermark reaches `end_offset` (an offset
    /// this leader appended up to), as an acks=all produce's would; refused when not
    /// leader.
    pub fn replicated_waiter(
        &self,
        end_offset: i64,
        now_ms: i64,
        timeout_ms: i64,
    ) -> Result<ProduceWaiter, ReplicationError> {
        let mut repl = self.replication();
        let Replication { role, next_token } = &mut *repl;
        let Role::Leader(leader) = role else {
            return Err(ReplicationError::NotLeaderOrFollower(self.leader_id()));
        };
        if end_offset > leader.state.log_end_offset() {
            // Not appended by this leader (truncated away after a leader change).
            return Err(ReplicationError::NotLeaderOrFollower(self.leader_id()));
        }
        let token = *next_token;
        *next_token += 1;
        let deadline_ms = now_ms.saturating_add(timeout_ms.max(0));
        leader
            .state
            .add_pending_produce(token, end_offset, clock(deadline_ms))?;
        let (tx, rx) = oneshot::channel();
        leader.waiters.insert(token, tx);
        let completions = leader.state.poll_produces(clock(now_ms));
        complete(leader, completions);
        Ok(ProduceWaiter { deadline_ms, rx })
    }

    /// The last stable offset (read_committed's bound): the high watermark, or the first
    /// offset of the earliest open transaction if that is lower.
    pub fn last_stable_offset(&self) -> i64 {
        let log = self.log();
        let hw = self.high_watermark();
        log.first_unstable_offset().map_or(hw, |f| f.min(hw))
    }

    /// A produce: appended under the leader's epoch. With `acks` -1 it is refused with
    /// NOT_ENOUGH_REPLICAS while the ISR is below min.insync.replicas, and otherwise
    /// returns a waiter that completes when the ISR has the batch ([`Self::wait`]).
    pub fn append_as_leader(
        &self,
        records: &[u8],
        now_ms: i64,
        acks: i16,
        timeout_ms: i64,
    ) -> Result<(AppendInfo, Option<ProduceWaiter>), ProduceError> {
        self.append_as_leader_txn(records, now_ms, acks, timeout_ms, TxnWrite::of(records))
    }

    /// [`Self::append_as_leader`] with the batch's part in transaction verification.
    pub fn append_as_leader_txn(
        &self,
        records: &[u8],
        now_ms: i64,
        acks: i16,
        timeout_ms: i64,
        txn: TxnWrite,
    ) -> Result<(AppendInfo, Option<ProduceWaiter>), ProduceError> {
        self.leader_write(now_ms, acks, timeout_ms, txn, |log, epoch| {
            log.append(records, epoch, now_ms)
        })
    }

    /// KIP-890 part 1, before asking another broker's transaction coordinator whether
    /// this partition is in the producer's transaction: None if the producer's
    /// transaction is ongoing here already (no verification needed; the append checks
    /// it still is), otherwise the producer's verification guard, created if it has
    /// none (Kafka's `maybeStartTransactionVerification`). The verified append passes
    /// it back in [`TxnWrite::Verified`].
    pub fn begin_txn_verification(
        &self,
        producer_id: i64,
        now_ms: i64,
    ) -> Result<Option<u64>, ProduceError> {
        let mut repl = self.replication();
        let Replication { role, next_token } = &mut *repl;
        let Role::Leader(leader) = role else {
            return Err(ReplicationError::NotLeaderOrFollower(self.leader_id()).into());
        };
        if self
            .log()
            .producers()
            .ongoing_txn_first_offset(producer_id)
            .is_some()
        {
            return Ok(None);
        }
        let guards = &mut leader.verification_guards;
        if let Some(g) = guards.get(&producer_id) {
            return Ok(Some(g.token));
        }
        if guards.len() >= VERIFICATION_GUARDS_MAX {
            guards
                .retain(|_, g| now_ms.saturating_sub(g.created_ms) < VERIFICATION_GUARD_EXPIRY_MS);
            if guards.len() >= VERIFICATION_GUARDS_MAX {
                return Err(ProduceError::VerificationsFull(guards.len()));
            }
        }
        let token = *next_token;
        *next_token += 1;
        guards.insert(
            producer_id,
            VerificationGuard {
                token,
                created_ms: now_ms,
            },
        );
        Ok(Some(token))
    }

    /// An append as leader through `write` (given the log and the leader epoch), with
    /// the acks handling of [`Self::append_as_leader`].
    fn leader_write(
        &self,
        now_ms: i64,
        acks: i16,
        timeout_ms: i64,
        txn: TxnWrite,
        write: impl FnOnce(&mut PartitionLog, i32) -> Result<AppendInfo, StorageError>,
    ) -> Result<(AppendInfo, Option<ProduceWaiter>), ProduceError> {
        let mut repl = self.replication();
        let Replication { role, next_token } = &mut *repl;
        let Role::Leader(leader) = role else {
            return Err(ReplicationError::NotLeaderOrFollower(self.leader_id()).into());
        };
        if acks == -1 {
            leader.state.check_acks_all()?;
        }
        let epoch = leader.state.leader_epoch();
        let (info, leo) = {
            let mut log = self.log();
            // Checked and appended under the log's lock, as markers are: nothing ends
            // the transaction in between.
            if let TxnWrite::Verified { producer_id, guard } = txn {
                let ongoing = log
                    .producers()
                    .ongoing_txn_first_offset(producer_id)
                    .is_some();
                let guarded = guard.is_some()
                    && leader
                        .verification_guards
                        .get(&producer_id)
                        .map(|g| g.token)
                        == guard;
                if !ongoing && !guarded {
                    return Err(ProduceError::NotInTransaction { producer_id });
                }
            }
            let info = write(&mut log, epoch);
            self.note_disk_space(&log, &info);
            (info?, log.log_end_offset())
        };
        if let Some(producer_id) = txn.producer_id() {
            // Ongoing here now (a data batch) or ended (a marker): either way the
            // verification is spent.
            leader.verification_guards.remove(&producer_id);
        }
        leader.state.on_append(leo);
        let now = clock(now_ms);
        let waiter = if acks == -1 {
            let token = *next_token;
            *next_token += 1;
            let deadline_ms = now_ms.saturating_add(timeout_ms.max(0));
            leader
                .state
                .add_pending_produce(token, info.last_offset + 1, clock(deadline_ms))?;
            let (tx, rx) = oneshot::channel();
            leader.waiters.insert(token, tx);
            Some(ProduceWaiter { deadline_ms, rx })
        } else {
            None
        };
        let completions = leader.state.poll_produces(now);
        complete(leader, completions);
        self.publish(leader.state.high_watermark());
        Ok((info, waiter))
    }

    /// Waits until an acks=all produce is acknowledged, refused
    /// (NOT_ENOUGH_REPLICAS_AFTER_APPEND, NOT_LEADER_OR_FOLLOWER) or times out
    /// (REQUEST_TIMED_OUT). Woken by the events that decide it, never by polling; the
    /// deadline itself is a timer.
    pub async fn wait(&self, waiter: ProduceWaiter) -> Result<(), ReplicationError> {
        let ProduceWaiter {
            deadline_ms,
            mut rx,
        } = waiter;
        let wait_ms = u64::try_from(deadline_ms.saturating_sub(crate::now_ms())).unwrap_or(0);
        if let Ok(result) =
            tokio::time::timeout(std::time::Duration::from_millis(wait_ms), &mut rx).await
        {
            return result.unwrap_or(Err(ReplicationError::NotLeaderOrFollower(self.leader_id())));
        }
        {
            let mut repl = self.replication();
            if let Role::Leader(leader) = &mut repl.role {
                // Past the deadline by the clock the purgatory is given: it answers this
                // produce (and any other due) now.
                let now = clock(deadline_ms.max(crate::now_ms()));
                let completions = leader.state.poll_produces(now);
                complete(leader, completions);
            }
        }
        match rx.try_recv() {
            Ok(result) => result,
            Err(_) => Err(ReplicationError::RequestTimedOut {
                required_offset: -1,
            }),
        }
    }

    /// A follower's fetch at this leader: checks its epochs, records its log end offset,
    /// advances the high watermark, answers produces that waited for it and proposes an
    /// ISR change if one is due. Returns what to answer and the high watermark.
    pub fn on_follower_fetch(
        &self,
        fetch: FollowerFetch,
        now_ms: i64,
        brokers: impl Fn(i32) -> Option<BrokerState>,
    ) -> Result<(FetchOutcome, Option<AlterPartitionProposal>), ReplicationError> {
        let mut repl = self.replication();
        let Role::Leader(leader) = &mut repl.role else {
            return Err(ReplicationError::NotLeaderOrFollower(self.leader_id()));
        };
        let now = clock(now_ms);
        let outcome = {
            let log = self.log();
            leader
                .state
                .on_follower_fetch(fetch, log.leader_epochs(), now)?
        };
        let completions = leader.state.poll_produces(now);
        complete(leader, completions);
        let proposal = leader.state.isr_proposal(now, brokers);
        self.publish(leader.state.high_watermark());
        Ok((outcome, proposal))
    }

    /// Periodic ISR check of a leader (followers that stopped fetching leave the ISR).
    pub fn isr_proposal(
        &self,
        now_ms: i64,
        brokers: impl Fn(i32) -> Option<BrokerState>,
    ) -> Option<AlterPartitionProposal> {
        let mut repl = self.replication();
        let Role::Leader(leader) = &mut repl.role else {
            return None;
        };
        leader.state.isr_proposal(clock(now_ms), brokers)
    }

    /// The controller answered an AlterPartition of this partition.
    pub fn alter_partition_done(
        &self,
        proposal: &AlterPartitionProposal,
        result: Result<PartitionState, i16>,
        now_ms: i64,
    ) {
        let mut repl = self.replication();
        let Role::Leader(leader) = &mut repl.role else {
            return;
        };
        if result
            .as_ref()
            .is_ok_and(|s| s.leader_epoch != leader.state.leader_epoch())
        {
            return; // A new epoch: the metadata image makes the next role.
        }
        if let Err(code) = result {
            if !alter_partition_refusal_is_definitive(code) {
                // Kafka's Partition.handleAlterPartitionError: only INELIGIBLE_REPLICA and
                // OPERATION_NOT_ATTEMPTED say the change was not applied. After any other
                // error (no answer, NOT_CONTROLLER, INVALID_UPDATE_VERSION) it may have
                // been, so the proposal stays in flight and the high watermark keeps
                // counting a member it adds, until the metadata log brings the partition's
                // next state. Clearing it let a member the controller had added miss an
                // acknowledged record and then be elected (ferrite-sim seed 7405).
                return;
            }
        }
        leader.state.on_alter_partition_response(proposal, result);
        let completions = leader.state.poll_produces(clock(now_ms));
        complete(leader, completions);
        self.publish(leader.state.high_watermark());
    }

    /// This proposal is still the leader's AlterPartition in flight (not answered, not
    /// superseded by the metadata log): a sender retries it after a transient error.
    pub fn alter_partition_in_flight(&self, proposal: &AlterPartitionProposal) -> bool {
        match &self.replication().role {
            Role::Leader(leader) => leader.state.alter_partition_in_flight() == Some(proposal),
            Role::Follower => false,
        }
    }

    /// OffsetForLeaderEpoch: the largest epoch at most `epoch` and where it ends in this
    /// log (the log end offset for the latest epoch).
    pub fn end_offset_for_epoch(&self, epoch: i32) -> EpochEndOffset {
        let log = self.log();
        log.leader_epochs()
            .end_offset_for(epoch, log.log_end_offset())
    }

    /// ListOffsets latest for a client: the high watermark; on a new leader whose high
    /// watermark has not reached its epoch's start, OFFSET_NOT_AVAILABLE (KIP-207).
    pub fn list_offsets_latest(&self) -> Result<i64, ReplicationError> {
        match &self.replication().role {
            Role::Leader(leader) => leader.state.list_offsets_latest(),
            Role::Follower => Ok(self.high_watermark()),
        }
    }

    /// Holds this partition in its follower role of `leader_epoch`, or `None` if it
    /// now leads or follows another epoch. A replica fetcher's response or truncation
    /// answer was asked under the epoch it knew: the image may have moved on since (a
    /// reassignment or election made this broker the leader), and applying it then
    /// would append an old leader's batches to, or truncate, the new leader's log. The
    /// guard keeps the image from changing the role until the append or cut is done.
    pub fn follower_of(&self, leader_epoch: i32) -> Option<FollowerGuard<'_>> {
        let repl = self.replication();
        (matches!(repl.role, Role::Follower) && self.leader_epoch() == leader_epoch)
            .then_some(FollowerGuard(repl))
    }

    /// A follower's append of the leader's batches, then its high watermark from the
    /// leader's (never above its own log end).
    pub fn append_as_follower(
        &self,
        records: &[u8],
        leader_high_watermark: i64,
        now_ms: i64,
    ) -> Result<Option<AppendInfo>, StorageError> {
        let mut log = self.log();
        let info = if records.is_empty() {
            None
        } else {
            let info = log.append_as_follower(records, now_ms);
            self.note_disk_space(&log, &info);
            Some(info?)
        };
        let hw = ferrite_replication::follower_high_watermark(
            leader_high_watermark,
            log.log_end_offset(),
        );
        drop(log);
        if hw > self.high_watermark() || info.is_some() {
            self.publish(hw.max(self.high_watermark()));
        }
        Ok(info)
    }

    /// A follower's truncation (KIP-101/279): the log, its epochs and producer state end
    /// at `offset`, and the high watermark is kept at or below it.
    pub fn truncate_to(&self, offset: i64) -> Result<bool, StorageError> {
        let mut log = self.log();
        let cut = log.truncate_to(offset)?;
        let leo = log.log_end_offset();
        drop(log);
        if self.high_watermark() > leo {
            self.high_watermark.store(leo, Ordering::Release);
        }
        Ok(cut)
    }

    /// Empties a follower's log to start at `offset` (its log lies wholly outside the
    /// leader's).
    pub fn truncate_fully_and_start_at(&self, offset: i64) -> Result<(), StorageError> {
        let mut log = self.log();
        log.truncate_fully_and_start_at(offset)?;
        drop(log);
        self.high_watermark.store(offset, Ordering::Release);
        self.high_watermark_tx.send_modify(|v| *v = offset);
        Ok(())
    }

    fn publish(&self, high_watermark: i64) {
        self.high_watermark.store(high_watermark, Ordering::Release);
        // Wake fetches whatever moved: consumers wait for the high watermark, followers
        // for the log end.
        self.high_watermark_tx.send_modify(|v| *v = high_watermark);
    }

    /// Makes this broker's role match the image's partition: leader (a new
    /// `PartitionLeader` for a new leader epoch, an update of the ISR within one) or
    /// follower. Leaving leadership answers every waiting produce NOT_LEADER_OR_FOLLOWER.
    /// Returns whether this broker now follows a leader it must fetch from.
    fn apply_image(
        &self,
        node_id: i32,
        broker_epoch: i64,
        config: ReplicationConfig,
        image: &PartitionImage,
        now_ms: i64,
    ) {
        self.leader_epoch
            .store(image.leader_epoch, Ordering::Release);
        self.leader_id.store(image.leader, Ordering::Release);
        let state = PartitionState {
            leader_epoch: image.leader_epoch,
            partition_epoch: image.partition_epoch,
            replicas: image.replicas.clone(),
            isr: image.isr.clone(),
        };
        let mut repl = self.replication();
        let leads = image.leader == node_id
            && image.replicas.contains(&node_id)
            && image.isr.contains(&node_id);
        if leads {
            if let Role::Leader(leader) = &mut repl.role {
                if leader.state.leader_epoch() == image.leader_epoch {
                    leader.state.update_partition_state(state);
                    let completions = leader.state.poll_produces(clock(now_ms));
                    complete(leader, completions);
                    let hw = leader.state.high_watermark();
                    drop(repl);
                    self.publish(hw);
                    return;
                }
            }
            let (leo, hw) = {
                let mut log = self.log();
                if let Err(e) = log.begin_leader_epoch(image.leader_epoch) {
                    // The first append of the epoch retries the write and fails the
                    // produce if it still cannot be made durable.
                    tracing::error!(topic = %self.topic, partition = self.index, epoch = image.leader_epoch, error = %e, "cannot record the new leader epoch");
                }
                (
                    log.log_end_offset(),
                    self.high_watermark().min(log.log_end_offset()),
                )
            };
            let state = PartitionLeader::become_leader(
                node_id,
                broker_epoch,
                config,
                state,
                leo,
                hw.max(0),
                clock(now_ms),
            );
            let previous = std::mem::replace(
                &mut repl.role,
                Role::Leader(Box::new(LeaderRole {
                    state,
                    waiters: HashMap::new(),
                    verification_guards: HashMap::new(),
                })),
            );
            resign(previous);
            if let Role::Leader(leader) = &repl.role {
                let hw = leader.state.high_watermark();
                drop(repl);
                self.publish(hw);
            }
        } else {
            if image.leader == node_id {
                tracing::error!(topic = %self.topic, partition = self.index, isr = ?image.isr, "the metadata names this broker leader outside its ISR; not leading");
            }
            let previous = std::mem::replace(&mut repl.role, Role::Follower);
            resign(previous);
        }
    }
}

/// `now_ms` for the sans-I/O state machines (wall clock, never negative).
fn clock(now_ms: i64) -> u64 {
    u64::try_from(now_ms).unwrap_or(0)
}

fn complete(leader: &mut LeaderRole, completions: Vec<ProduceCompletion>) {
    for c in completions {
        if let Some(tx) = leader.waiters.remove(&c.token) {
            // The produce may have stopped waiting (its connection closed): nothing to do.
            let _ = tx.send(c.result);
        }
    }
}

fn resign(previous: Role) {
    if let Role::Leader(leader) = previous {
        let LeaderRole {
            state, mut waiters, ..
        } = *leader;
        for c in state.resign() {
            if let Some(tx) = waiters.remove(&c.token) {
                let _ = tx.send(c.result);
            }
        }
    }
}

impl Partition {
    /// One WARN when the log directory fills up and one when an append succeeds again,
    /// however many produce requests fail in between.
    fn note_disk_space<T>(&self, log: &PartitionLog, result: &Result<T, StorageError>) {
        match result {
            Err(e) if e.is_disk_full() => {
                if !self.log_dir_full.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        log_dir = %log.dir().parent().unwrap_or(log.dir()).display(),
                        error = %e,
                        "log directory is full: produce answers KAFKA_STORAGE_ERROR and group changes are refused until space is freed; reads go on"
                    );
                }
            }
            Ok(_) => {
                if self.log_dir_full.load(Ordering::Acquire)
                    && self.log_dir_full.swap(false, Ordering::AcqRel)
                {
                    tracing::warn!(
                        log_dir = %log.dir().parent().unwrap_or(log.dir()).display(),
                        "log directory has space again: appends succeed"
                    );
                }
            }
            Err(_) => {}
        }
    }

    pub fn high_watermark(&self) -> i64 {
        self.high_watermark.load(Ordering::Acquire)
    }

    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.high_watermark_tx.subscribe()
    }

    /// `(log_start_offset, high_watermark, read plan)` taken under one lock; the plan
    /// reads to the log end (followers, the coordinator's load).
    pub fn read_plan(
        &self,
        fetch_offset: i64,
    ) -> (i64, i64, Result<Option<ReadPlan>, StorageError>) {
        let log = self.log();
        let hw = self.high_watermark();
        (log.log_start_offset(), hw, log.read_plan(fetch_offset))
    }

    /// A consumer's read: nothing at or above the high watermark. A fetch offset between
    /// the high watermark and the log end reads nothing (not out of range), as in Kafka.
    pub fn consumer_read_plan(
        &self,
        fetch_offset: i64,
    ) -> (i64, i64, Result<Option<ReadPlan>, StorageError>) {
        let log = self.log();
        let hw = self.high_watermark();
        let plan = if fetch_offset >= hw && fetch_offset <= log.log_end_offset() {
            log.read_plan(fetch_offset).map(|_| None)
        } else {
            log.read_plan(fetch_offset)
                .map(|plan| plan.map(|plan| plan.up_to(hw)))
        };
        (log.log_start_offset(), hw, plan)
    }

    /// [`Self::consumer_read_plan`] for read_committed (isolation level 1): nothing at or
    /// above the last stable offset, plus the aborted transactions from `fetch_offset`
    /// up to it. Returns `(log_start_offset, high_watermark, last_stable_offset, plan,
    /// aborted)`, all under one lock.
    #[allow(clippy::type_complexity)]
    pub fn committed_read_plan(
        &self,
        fetch_offset: i64,
    ) -> (
        i64,
        i64,
        i64,
        Result<Option<ReadPlan>, StorageError>,
        Vec<ferrite_storage::AbortedTxn>,
    ) {
        let log = self.log();
        let hw = self.high_watermark();
        let lso = log.first_unstable_offset().map_or(hw, |f| f.min(hw));
        let plan = if fetch_offset >= lso && fetch_offset <= log.log_end_offset() {
            log.read_plan(fetch_offset).map(|_| None)
        } else {
            log.read_plan(fetch_offset)
                .map(|plan| plan.map(|plan| plan.up_to(lso)))
        };
        let aborted = log.aborted_txns(fetch_offset, lso);
        (log.log_start_offset(), hw, lso, plan, aborted)
    }

    /// `(log_start_offset, log_end_offset, last fetched epoch)` of a follower.
    pub fn follower_position(&self) -> (i64, i64, Option<i32>) {
        let log = self.log();
        (
            log.log_start_offset(),
            log.log_end_offset(),
            log.last_leader_epoch(),
        )
    }
}

pub struct ReplicaManager {
    partitions: RwLock<HashMap<TopicPartition, Arc<Partition>>>,
    log_dir_full: Arc<AtomicBool>,
    alter_partition_tx: mpsc::Sender<AlterPartitionItem>,
    alter_partition_rx: Mutex<Option<mpsc::Receiver<AlterPartitionItem>>>,
    /// Brokers as the last applied image knows them (ISR expansion checks, KIP-903).
    brokers: RwLock<HashMap<i32, BrokerState>>,
    /// Partitions this broker follows, by leader: what the replica fetchers fetch.
    followed: watch::Sender<HashMap<TopicPartition, FollowedPartition>>,
}

/// A partition this broker follows: fetched from `leader` at `leader_epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowedPartition {
    pub leader: i32,
    pub leader_epoch: i32,
    pub topic_id: Uuid,
    /// A reassignment is adding this broker to the partition: its fetches count
    /// against `follower.replication.throttled.rate`.
    pub throttled: bool,
}

impl Default for ReplicaManager {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(ALTER_PARTITION_QUEUED_MAX);
        Self {
            partitions: RwLock::default(),
            log_dir_full: Arc::default(),
            alter_partition_tx: tx,
            alter_partition_rx: Mutex::new(Some(rx)),
            brokers: RwLock::default(),
            followed: watch::channel(HashMap::new()).0,
        }
    }
}

/// Logs opened for partitions an admin change is about to add, before the change is
/// committed: if any cannot be opened (a full disk, no descriptors left), none is kept
/// and nothing is committed.
#[derive(Default)]
pub struct Prepared {
    logs: HashMap<TopicPartition, (PartitionLog, bool)>,
}

impl Prepared {
    /// Closes the logs and removes the directories this preparation created (they are
    /// new and empty: no data of anyone's is lost).
    pub fn discard(self) {
        for (_, (log, created)) in self.logs {
            let dir = log.dir().to_path_buf();
            drop(log);
            if created {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::error!(dir = %dir.display(), error = %e, "cannot remove a partition directory of a failed admin change");
                }
            }
        }
    }
}

/// File descriptors kept free beyond the segment file cache: connections, reads and
/// fsyncs in flight (each holds its file), index and checkpoint writes.
pub const FILE_DESCRIPTORS_RESERVED: u64 = 1024;

/// `(open descriptors, soft RLIMIT_NOFILE)` of this process, when they can be read.
pub fn file_descriptors() -> Option<(u64, u64)> {
    let open = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current?;
    Some((open, limit))
}

/// Threads that open or close partition logs at once (start-up, CreateTopics, clean
/// shutdown). Each log costs a handful of small file operations (an open, a directory
/// read, checkpoint and index writes) that are system-call bound, and on a slow disk
/// wait on its latency: a few threads per core overlap them. Bounded, so that 19,000
/// partitions never mean 19,000 threads.
pub const LOG_IO_THREADS_MAX: usize = 8;

/// `f` over every item on up to [`LOG_IO_THREADS_MAX`] threads (the caller's included),
/// results in the order of `items`. A thread that cannot be spawned leaves its share to
/// the others, so this never fails for want of threads.
fn for_each_log<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get().saturating_mul(2))
        .min(LOG_IO_THREADS_MAX);
    for_each_log_on(threads, items, f)
}

/// [`for_each_log`] on up to `threads` threads (at most [`LOG_IO_THREADS_MAX`]).
fn for_each_log_on<T: Sync, R: Send>(
    threads: usize,
    items: &[T],
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let threads = threads.min(LOG_IO_THREADS_MAX).min(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else { break };
            done.push((i, f(item)));
        }
        done
    };
    let mut results: Vec<(usize, R)> = std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads)
            .filter_map(|n| {
                std::thread::Builder::new()
                    .name(format!("log-io-{n}"))
                    .spawn_scoped(scope, work)
                    .ok()
            })
            .collect();
        let mut all = work();
        for h in helpers {
            match h.join() {
                Ok(done) => all.extend(done),
                // A panic in `f` is a programmer error: raise it here, as inline would.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        all
    });
    results.sort_unstable_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

impl ReplicaManager {
    pub fn get(&self, topic: &str, partition: i32) -> Option<Arc<Partition>> {
        let map = self.partitions.read().unwrap_or_else(|p| p.into_inner());
        map.get(&(Arc::from(topic), partition)).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Partition>> {
        let map = self.partitions.read().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    /// The AlterPartition requests leaders here propose; taken once by the broker's
    /// controller wiring. Until it is taken (one node) nothing is ever proposed anyway:
    /// a partition without followers has no ISR change to make.
    pub fn take_alter_partition_receiver(&self) -> Option<mpsc::Receiver<AlterPartitionItem>> {
        self.alter_partition_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The controller's answer to an [`AlterPartitionItem`]: the partition state it
    /// committed, or its error code (the leader may propose again later).
    /// The ISR change `item` is still waiting for a definitive answer.
    pub fn alter_partition_in_flight(&self, item: &AlterPartitionItem) -> bool {
        self.get(&item.topic, item.partition).is_some_and(|p| {
            p.topic_id == item.topic_id && p.alter_partition_in_flight(&item.proposal)
        })
    }

    pub fn alter_partition_done(
        &self,
        item: &AlterPartitionItem,
        result: Result<PartitionState, i16>,
    ) {
        if let Some(p) = self.get(&item.topic, item.partition) {
            if p.topic_id == item.topic_id {
                p.alter_partition_done(&item.proposal, result, crate::now_ms());
            }
        }
    }

    /// Queues an ISR change for the controller; when the queue is full the proposal is
    /// dropped as refused, so that the leader proposes again later.
    pub fn send_alter_partition(&self, p: &Partition, proposal: AlterPartitionProposal) {
        let item = AlterPartitionItem {
            topic: p.topic.clone(),
            topic_id: p.topic_id,
            partition: p.index,
            proposal,
        };
        tracing::info!(topic = %item.topic, partition = item.partition, isr = ?item.proposal.new_isr, "proposing an ISR change");
        if let Err(e) = self.alter_partition_tx.try_send(item) {
            let item = match e {
                mpsc::error::TrySendError::Full(i) | mpsc::error::TrySendError::Closed(i) => i,
            };
            tracing::warn!(topic = %item.topic, partition = item.partition, "AlterPartition queue full or closed; the ISR change waits for the next check");
            p.alter_partition_done(
                &item.proposal,
                Err(kafka_protocol::ResponseError::RequestTimedOut.code()),
                crate::now_ms(),
            );
        }
    }

    /// The image's view of broker `id` for ISR decisions.
    pub fn broker_state(&self, id: i32) -> Option<BrokerState> {
        self.brokers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .copied()
    }

    /// Periodic ISR check of every partition led here (Kafka's `isr-expiration`
    /// task, every `replica.lag.time.max.ms / 2`).
    pub fn check_isr(&self, now_ms: i64) {
        for p in self.all() {
            if let Some(proposal) = p.isr_proposal(now_ms, |id| self.broker_state(id)) {
                self.send_alter_partition(&p, proposal);
            }
        }
    }

    /// The partitions this broker follows, by leader; changes with every image.
    pub fn subscribe_followed(
        &self,
    ) -> watch::Receiver<HashMap<TopicPartition, FollowedPartition>> {
        self.followed.subscribe()
    }

    fn wanted(
        image: &MetadataImage,
        config: &BrokerConfig,
    ) -> HashMap<TopicPartition, (Uuid, i32, LogConfig)> {
        let mut wanted: HashMap<TopicPartition, (Uuid, i32, LogConfig)> = HashMap::new();
        for topic in image.topics() {
            let mut log_config = config.log_config(&topic.configs);
            // The offsets topic is the one compacted log (see group_manager).
            log_config.compacted = topic.name == crate::group_manager::OFFSETS_TOPIC
                || topic.name == ferrite_coordinator::txn::TRANSACTION_STATE_TOPIC;
            let name: Arc<str> = Arc::from(topic.name.as_str());
            for p in topic.partitions.values() {
                if p.replicas.contains(&config.node_id) {
                    wanted.insert(
                        (name.clone(), p.partition),
                        (topic.topic_id, p.leader_epoch, log_config.clone()),
                    );
                }
            }
        }
        wanted
    }

    /// Opens the logs of partitions that `next` adds and this broker does not host yet,
    /// before `next` is committed. Refuses, before opening anything, a change that
    /// would need more file descriptors than the process may open. All or nothing.
    pub fn prepare(
        &self,
        next: &MetadataImage,
        config: &BrokerConfig,
    ) -> Result<Prepared, crate::controller::AdminError> {
        let new: Vec<(TopicPartition, LogConfig)> = {
            let map = self.partitions.read().unwrap_or_else(|p| p.into_inner());
            Self::wanted(next, config)
                .into_iter()
                .filter(|(k, _)| !map.contains_key(k))
                .map(|(k, (_, _, c))| (k, c))
                .collect()
        };
        if new.is_empty() {
            return Ok(Prepared::default());
        }
        if let Some((open, limit)) = file_descriptors() {
            // Segment files are opened through a bounded cache, so new partitions need no
            // descriptor of their own: past the cache's capacity they share its slots.
            // What must fit is the cache itself, beside everything else open now and the
            // descriptors kept for connections.
            let files = ferrite_storage::DescriptorCache::shared();
            let cache = files.stats();
            let others = open.saturating_sub(cache.open as u64);
            let room = limit.saturating_sub(others.saturating_add(FILE_DESCRIPTORS_RESERVED));
            let room = usize::try_from(room).unwrap_or(usize::MAX);
            if room < ferrite_storage::fd_cache::SEGMENT_FDS_MIN {
                let message = format!(
                    "this broker cannot create {} more partitions now: {others} of the process's {limit} file descriptors (RLIMIT_NOFILE) are in use besides segment files and {FILE_DESCRIPTORS_RESERVED} are kept for connections, which leaves {room} for segment files (at least {} are needed). Close connections, or raise `ulimit -n` (the hard limit) and restart",
                    new.len(),
                    ferrite_storage::fd_cache::SEGMENT_FDS_MIN
                );
                tracing::warn!("{message}");
                return Err(crate::controller::AdminError::new(
                    kafka_protocol::ResponseError::InvalidPartitions,
                    message,
                ));
            }
            let growth = new.len().min(cache.capacity.saturating_sub(cache.open));
            if cache.open.saturating_add(growth) > room {
                // More is open besides segment files than at start (connections), and
                // this change would fill the cache into the descriptors kept for them:
                // the cache gives way instead. A few descriptors' difference is routine.
                if cache.capacity.saturating_sub(room) > FILE_DESCRIPTORS_RESERVED as usize / 16 {
                    tracing::warn!(
                        from = cache.capacity,
                        to = room,
                        open,
                        limit,
                        "segment file cache lowered to fit the file descriptor limit"
                    );
                }
                files.set_capacity(room);
            }
        }
        let opened = for_each_log(&new, |(key, log_config)| {
            let dir = partition_dir(&config.data_dir, &key.0, key.1);
            let created = !dir.exists();
            let log = PartitionLog::open(&dir, log_config.clone(), true);
            (dir, created, log)
        });
        let mut prepared = Prepared::default();
        let mut first_err = None;
        for ((key, _), (dir, created, log)) in new.into_iter().zip(opened) {
            match log {
                Ok((log, _)) => {
                    prepared.logs.insert(key, (log, created));
                }
                Err(e) => {
                    if created {
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                    first_err.get_or_insert((key, e));
                }
            }
        }
        if let Some((key, e)) = first_err {
            prepared.discard();
            tracing::error!(topic = %key.0, partition = key.1, error = %e, "cannot create a partition log; the admin change is not made");
            return Err(crate::controller::AdminError {
                code: crate::error::storage_error_code(&e),
                message: format!("cannot create partition {}-{}: {e}", key.0, key.1),
            });
        }
        Ok(prepared)
    }

    /// Makes the hosted partitions match the image: opens logs for new partitions this
    /// node leads, updates configs and epochs, deletes logs of removed topics.
    pub fn reconcile(
        &self,
        image: &MetadataImage,
        config: &BrokerConfig,
        clean: bool,
    ) -> Result<(), StorageError> {
        self.install(image, config, clean, Prepared::default())
    }

    /// [`ReplicaManager::reconcile`] that takes new partitions' logs from `prepared`.
    pub fn install(
        &self,
        image: &MetadataImage,
        config: &BrokerConfig,
        clean: bool,
        mut prepared: Prepared,
    ) -> Result<(), StorageError> {
        let wanted = Self::wanted(image, config);
        let mut map = self.partitions.write().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<TopicPartition> = map
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(p) = map.remove(&key) {
                // A produce waiting for the ISR holds the partition: answer it now
                // (NOT_LEADER_OR_FOLLOWER, the client retries at the new leader) rather
                // than let it wait out its timeout on a replica that no longer exists.
                let previous = std::mem::replace(&mut p.replication().role, Role::Follower);
                resign(previous);
                let dir = p.log().dir().to_path_buf();
                tracing::info!(topic = %key.0, partition = key.1, "deleting partition log");
                delete_partition_dir(&dir);
            }
        }
        // The logs to open from disk (at start-up, all of them), opened in parallel
        // before anything below looks at them.
        let mut to_open = Vec::new();
        for (key, (topic_id, _, log_config)) in &wanted {
            let existing = map.get(key);
            if existing.is_some_and(|p| p.topic_id == *topic_id) {
                continue;
            }
            let dir = partition_dir(&config.data_dir, &key.0, key.1);
            if existing.is_some() {
                // The topic was deleted and created again under the same name.
                delete_partition_dir(&dir);
            } else if prepared.logs.contains_key(key) {
                continue;
            }
            to_open.push((key.clone(), dir, log_config.clone()));
        }
        let opened = for_each_log(&to_open, |(_, dir, log_config)| {
            PartitionLog::open(dir, log_config.clone(), clean)
        });
        let mut opened: HashMap<TopicPartition, _> = to_open
            .into_iter()
            .map(|(key, _, _)| key)
            .zip(opened)
            .collect();
        // (partitions, segments checked, bytes truncated): one summary line, not one per
        // partition.
        let mut recovered = (0usize, 0usize, 0u64);
        for (key, (topic_id, epoch, log_config)) in wanted {
            match map.get(&key) {
                Some(p) if p.topic_id == topic_id => {
                    p.leader_epoch.store(epoch, Ordering::Release);
                    let mut log = p.log();
                    if *log.config() != log_config {
                        log.set_config(log_config);
                    }
                }
                existing => {
                    let log = match prepared.logs.remove(&key) {
                        Some((log, _)) if existing.is_none() => log,
                        _ => {
                            let (log, report) = match opened.remove(&key) {
                                Some(result) => result?,
                                // Listed above for every key that gets here.
                                None => {
                                    let dir = partition_dir(&config.data_dir, &key.0, key.1);
                                    PartitionLog::open(&dir, log_config, clean)?
                                }
                            };
                            if report.truncated_bytes > 0 || report.recovered_segments > 0 {
                                recovered.0 += 1;
                                recovered.1 += report.recovered_segments;
                                recovered.2 += report.truncated_bytes;
                            }
                            log
                        }
                    };
                    let (tx, _) = watch::channel(log.log_end_offset());
                    // Nothing is known committed until a leader says so (a follower's
                    // fetch) or, leading, until the ISR has it: the high watermark
                    // starts at the log start (Kafka keeps a checkpoint of it; Ferrite
                    // does not yet). On one node the ISR is this broker alone, so
                    // becoming leader moves it to the log end at once.
                    let hw = log.log_start_offset();
                    let partition = Partition {
                        topic: key.0.clone(),
                        topic_id,
                        index: key.1,
                        log: Mutex::new(log),
                        leader_epoch: AtomicI32::new(epoch),
                        leader_id: AtomicI32::new(-1),
                        replication: Mutex::new(Replication {
                            role: Role::Follower,
                            next_token: 0,
                        }),
                        high_watermark: AtomicI64::new(hw),
                        high_watermark_tx: tx,
                        compacted_closed_bytes: AtomicU64::new(0),
                        log_dir_full: self.log_dir_full.clone(),
                    };
                    map.insert(key, Arc::new(partition));
                }
            }
        }
        // Roles from the image: lead, or follow (and tell the fetchers).
        let now = crate::now_ms();
        let broker_epoch = image.broker(config.node_id).map_or(-1, |b| b.broker_epoch);
        {
            let mut brokers = self.brokers.write().unwrap_or_else(|p| p.into_inner());
            brokers.clear();
            for b in image.brokers() {
                brokers.insert(
                    b.broker_id,
                    BrokerState {
                        broker_epoch: b.broker_epoch,
                        fenced: b.fenced,
                        in_controlled_shutdown: b.in_controlled_shutdown,
                    },
                );
            }
        }
        // A new leader epoch is recorded durably (two fsyncs) before the partition
        // leads it. One at a time, a restart that moves 1,500 leaderships waited on
        // 3,000 fsyncs in a row (13.6 s on the shared disk): the writes go first, on
        // the pool, so the journal commits them together; `apply_image` then finds
        // each epoch recorded and writes nothing.
        let new_epochs: Vec<(Arc<Partition>, i32)> = image
            .topics()
            .flat_map(|topic| {
                let map = &map;
                topic.partitions.values().filter_map(move |pi| {
                    let leads = pi.leader == config.node_id
                        && pi.replicas.contains(&config.node_id)
                        && pi.isr.contains(&config.node_id);
                    let p = map.get(&(Arc::from(topic.name.as_str()), pi.partition))?;
                    (leads && !p.leads_epoch(pi.leader_epoch)).then(|| (p.clone(), pi.leader_epoch))
                })
            })
            .collect();
        // Waiting on the disk, not the CPU: as many threads as the pool allows.
        for_each_log_on(LOG_IO_THREADS_MAX, &new_epochs, |(p, epoch)| {
            // A failure is retried, and logged, by `apply_image` below.
            let _ = p.log().begin_leader_epoch(*epoch);
        });
        let mut followed = HashMap::new();
        for topic in image.topics() {
            let min_insync_replicas = topic
                .configs
                .get("min.insync.replicas")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(config.replication.min_insync_replicas);
            let replication = ReplicationConfig {
                replica_lag_time_max_ms: config.replication.replica_lag_time_max_ms,
                min_insync_replicas,
            };
            for pi in topic.partitions.values() {
                let key: TopicPartition = (Arc::from(topic.name.as_str()), pi.partition);
                let Some(p) = map.get(&key) else { continue };
                p.apply_image(config.node_id, broker_epoch, replication, pi, now);
                if pi.leader >= 0 && pi.leader != config.node_id {
                    followed.insert(
                        key,
                        FollowedPartition {
                            leader: pi.leader,
                            leader_epoch: pi.leader_epoch,
                            topic_id: topic.topic_id,
                            throttled: pi.adding_replicas.contains(&config.node_id),
                        },
                    );
                }
            }
        }
        self.followed.send_if_modified(|f| {
            if *f == followed {
                false
            } else {
                *f = followed;
                true
            }
        });
        if recovered.0 > 0 {
            tracing::info!(
                partitions = recovered.0,
                segments = recovered.1,
                truncated_bytes = recovered.2,
                "recovered partition logs"
            );
        }
        Ok(())
    }

    /// Whether the log directory was full at the last append.
    pub fn log_dir_full(&self) -> bool {
        self.log_dir_full.load(Ordering::Acquire)
    }

    /// Clean shutdown: write every log's indexes and producer snapshot, then make
    /// everything durable with one `syncfs(2)` of the data directory's filesystem (one
    /// fsync per file took 1.3 ms per partition, 25 s at 19,000 partitions). The caller
    /// writes the clean-shutdown marker only after this; the marker, not a checkpoint per
    /// log, records that every log is durable to its end (see `PartitionLog::open`).
    /// The file writes run on [`LOG_IO_THREADS_MAX`] threads: they are independent per
    /// log, and one thread leaves the cores idle between its system calls.
    pub fn close_all(&self, data_dir: &Path) -> Result<(), StorageError> {
        let all = self.all();
        let started = std::time::Instant::now();
        let results = for_each_log(&all, |p| p.log().close_unsynced());
        let mut first_err = None;
        for (p, result) in all.iter().zip(results) {
            if let Err(e) = result {
                tracing::error!(topic = %p.topic, partition = p.index, error = %e, "close failed");
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let closed = started.elapsed();
        let dir = std::fs::File::open(data_dir).map_err(|e| StorageError::Io {
            path: data_dir.to_path_buf(),
            source: e,
        })?;
        rustix::fs::syncfs(&dir).map_err(|e| StorageError::Io {
            path: data_dir.to_path_buf(),
            source: e.into(),
        })?;
        for p in &all {
            p.log().mark_closed();
        }
        // Where a slow shutdown's time goes (issue 14: 19,000 partitions in under 5 s).
        tracing::info!(
            partitions = all.len(),
            close_ms = closed.as_millis(),
            sync_ms = (started.elapsed() - closed).as_millis(),
            "partition logs closed"
        );
        Ok(())
    }
}

/// A directory of the data directory named like a partition log (`<topic>-<n>`).
#[derive(Debug, Clone)]
pub struct PartitionDir {
    pub path: PathBuf,
    pub topic: String,
    pub partition: i32,
}

impl PartitionDir {
    /// Whether `image` has this partition with `node_id` among its replicas. A
    /// directory of a partition reassigned away while this broker was down (or before a
    /// crash let it delete the log) is not owned: it is set aside, not opened.
    pub fn owned_by(&self, image: &MetadataImage, node_id: i32) -> bool {
        image
            .topic(&self.topic)
            .and_then(|t| t.partitions.get(&self.partition))
            .is_some_and(|p| p.replicas.contains(&node_id))
    }
}

/// Suffix of a partition directory whose topic was deleted (renamed at DeleteTopics,
/// then removed; a crash in between leaves it for the next start to remove).
const DELETE_SUFFIX: &str = "-delete";
/// Suffix of a partition directory no topic owns, set aside at start (Kafka 3.7+'s name).
const STRAY_SUFFIX: &str = "-stray";

/// The partition-like directories of `data_dir`. Set-aside (`-stray`) and deleted
/// (`-delete`) ones do not parse as partitions, so they are not listed.
pub fn partition_dirs(data_dir: &Path) -> std::io::Result<Vec<PartitionDir>> {
    let entries = match std::fs::read_dir(data_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        // The type from the directory read itself: no stat per entry (19,000 partitions
        // are 19,000 stats at start-up). A symbolic link is followed, as before.
        let file_type = entry.file_type()?;
        let path = entry.path();
        if !(file_type.is_dir() || file_type.is_symlink() && path.is_dir()) {
            continue;
        }
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some((topic, partition)) = name.rsplit_once('-') else {
            continue;
        };
        let Ok(partition) = partition.parse::<i32>() else {
            continue;
        };
        if partition < 0 || crate::config::validate_topic_name(topic).is_err() {
            continue;
        }
        out.push(PartitionDir {
            topic: topic.to_string(),
            partition,
            path,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Sets aside a partition directory that no topic owns, as Kafka 3.7+ does with stray
/// logs: renamed to `<topic>-<n>.<uuid>-stray`, kept, and reported. Ferrite cannot tell a
/// deleted topic's leftovers from data whose metadata was lost, so it keeps both.
pub fn set_aside_stray(dir: &PartitionDir) {
    let Some(name) = dir.path.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let to = dir
        .path
        .with_file_name(format!("{name}.{}{STRAY_SUFFIX}", Uuid::new_v4().simple()));
    match std::fs::rename(&dir.path, &to) {
        Ok(()) => tracing::warn!(
            dir = %dir.path.display(), kept_as = %to.display(),
            "partition directory the metadata does not place on this broker (an unknown topic or partition, or a replica reassigned away): set aside, not deleted; delete it if that was on purpose, or restore the metadata log"
        ),
        Err(e) => {
            tracing::error!(dir = %dir.path.display(), error = %e, "cannot set aside a stray partition directory")
        }
    }
}

/// Removes directories renamed at DeleteTopics whose removal a crash interrupted: the
/// metadata log says these topics are gone, so their data is accounted for.
pub fn finish_pending_deletes(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for path in entries.flatten().map(|e| e.path()) {
        let deleted = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(DELETE_SUFFIX));
        if deleted && path.is_dir() {
            tracing::info!(dir = %path.display(), "removing the directory of a deleted topic");
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::error!(dir = %path.display(), error = %e, "cannot remove the directory of a deleted topic");
            }
        }
    }
}

/// Deletes a partition directory of a deleted topic: renamed first (one atomic step that
/// takes it out of the log set), then removed.
fn delete_partition_dir(dir: &Path) {
    let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let to = dir.with_file_name(format!("{name}.{}{DELETE_SUFFIX}", Uuid::new_v4().simple()));
    let target = match std::fs::rename(dir, &to) {
        Ok(()) => to,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot rename partition directory for deletion");
            dir.to_path_buf()
        }
    };
    if let Err(e) = std::fs::remove_dir_all(&target) {
        tracing::error!(dir = %target.display(), error = %e, "cannot delete partition directory");
    }
}

pub fn partition_dir(data_dir: &Path, topic: &str, partition: i32) -> PathBuf {
    data_dir.join(format!("{topic}-{partition}"))
}

/// An AlterPartition error that says the controller did not apply the change (Kafka's
/// `Partition.handleAlterPartitionError`): the leader may go back to its committed ISR.
pub fn alter_partition_refusal_is_definitive(code: i16) -> bool {
    code == ResponseError::IneligibleReplica.code()
        || code == ResponseError::OperationNotAttempted.code()
}

/// An AlterPartition error after which the same request is sent again: the controller
/// moved or did not answer, or this broker registered again (a new broker epoch, read
/// afresh for the retry).
pub fn alter_partition_error_is_transient(code: i16) -> bool {
    code == ResponseError::RequestTimedOut.code()
        || code == ResponseError::NotController.code()
        || code == ResponseError::StaleBrokerEpoch.code()
        || code == ResponseError::UnknownServerError.code()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    //! Two replica managers (two brokers' partitions) with the follower's fetches
    //! carried out by hand: the leader's purgatory, high watermark, ISR proposals and
    //! the follower's truncation, without sockets. The socket path is the replica
    //! fetcher's, tested with real processes.
    use super::*;
    use ferrite_metadata::{BrokerEndpoint, MetadataRecord};
    use ferrite_storage::test_support::make_batch;
    use kafka_protocol::ResponseError;

    struct Node {
        _dir: tempfile::TempDir,
        config: BrokerConfig,
        rm: ReplicaManager,
    }

    fn node(id: i32) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let config = BrokerConfig {
            node_id: id,
            data_dir: dir.path().to_path_buf(),
            ..BrokerConfig::default()
        };
        Node {
            _dir: dir,
            config,
            rm: ReplicaManager::default(),
        }
    }

    fn image(topic_id: Uuid, isr: Vec<i32>, leader: i32, leader_epoch: i32) -> MetadataImage {
        let mut img = MetadataImage::default();
        let mut records = Vec::new();
        for id in [0, 1] {
            records.push(MetadataRecord::RegisterBroker {
                broker_id: id,
                incarnation_id: Uuid::new_v4(),
                broker_epoch: 10 + i64::from(id),
                endpoints: vec![BrokerEndpoint {
                    name: "PLAINTEXT".into(),
                    host: "127.0.0.1".into(),
                    port: 9092,
                    security_protocol: 0,
                }],
                rack: None,
                fenced: false,
            });
        }
        records.push(MetadataRecord::Topic {
            name: "t".into(),
            topic_id,
        });
        records.push(MetadataRecord::TopicConfig {
            topic_id,
            key: "min.insync.replicas".into(),
            value: Some("2".into()),
        });
        records.push(MetadataRecord::Partition {
            topic_id,
            partition: 0,
            replicas: vec![0, 1],
            isr,
            leader,
            leader_epoch,
            partition_epoch: leader_epoch,
        });
        img.apply_all(&records);
        for b in [0, 1] {
            img.apply(&MetadataRecord::BrokerRegistrationChange {
                broker_id: b,
                broker_epoch: 10 + i64::from(b),
                fenced: Some(false),
                in_controlled_shutdown: None,
            });
        }
        img
    }

    /// One follower fetch by hand: the leader records it, the follower appends what the
    /// leader's log holds from its log end.
    fn replicate(leader: &Partition, follower: &Partition, follower_id: i32) -> FetchOutcome {
        let (_, leo, last) = follower.follower_position();
        let (outcome, _) = leader
            .on_follower_fetch(
                FollowerFetch {
                    replica_id: follower_id,
                    replica_epoch: 10 + i64::from(follower_id),
                    current_leader_epoch: leader.leader_epoch(),
                    fetch_offset: leo,
                    last_fetched_epoch: last,
                },
                crate::now_ms(),
                |_| {
                    Some(BrokerState {
                        broker_epoch: 10 + i64::from(follower_id),
                        fenced: false,
                        in_controlled_shutdown: false,
                    })
                },
            )
            .unwrap();
        if let FetchOutcome::Read { high_watermark } = outcome {
            let (_, _, plan) = leader.read_plan(leo);
            let bytes = match plan.unwrap() {
                Some(plan) => plan.read(1 << 30, true).unwrap().to_vec(),
                None => Vec::new(),
            };
            follower
                .append_as_follower(&bytes, high_watermark, crate::now_ms())
                .unwrap();
        }
        outcome
    }

    fn bytes_of(p: &Partition) -> Vec<u8> {
        let (_, _, plan) = p.read_plan(0);
        plan.unwrap()
            .map(|plan| plan.read(1 << 30, true).unwrap().to_vec())
            .unwrap_or_default()
    }

    /// KIP-890 part 1's guard: a transactional batch verified with another broker's
    /// coordinator is appended only if no marker of its producer came since the
    /// verification began (the KAFKA-17754 race: the transaction ended meanwhile, and
    /// the late batch would open one that no marker closes).
    #[test]
    fn a_marker_voids_a_transaction_verification_in_progress() {
        use ferrite_storage::test_support::{batch_around_producer, record, Producer};
        let n0 = node(0);
        let img = image(Uuid::new_v4(), vec![0, 1], 0, 1);
        n0.rm.reconcile(&img, &n0.config, true).unwrap();
        let p = n0.rm.get("t", 0).unwrap();
        let now = crate::now_ms();
        let pid = 7;
        let batch = |seq: i32| {
            batch_around_producer(
                ferrite_storage::batch::ATTR_TRANSACTIONAL,
                1,
                now,
                now,
                &record(0, b"v"),
                Producer {
                    producer_id: pid,
                    producer_epoch: 0,
                    base_sequence: seq,
                },
            )
        };
        let verified = |guard| TxnWrite::Verified {
            producer_id: pid,
            guard,
        };
        let refused = |r: Result<(AppendInfo, Option<ProduceWaiter>), ProduceError>| matches!(r, Err(ProduceError::NotInTransaction { producer_id }) if producer_id == pid);
        // Nothing ongoing and no verification: refused, nothing appended.
        assert!(refused(p.append_as_leader_txn(
            &batch(0),
            now,
            1,
            0,
            verified(None)
        )));
        // A verification begins; the transaction ends before the verified batch lands.
        let guard = p.begin_txn_verification(pid, now).unwrap();
        assert!(guard.is_some());
        assert_eq!(
            p.begin_txn_verification(pid, now).unwrap(),
            guard,
            "one guard per producer"
        );
        p.append_marker(pid, 0, ferrite_storage::ControlType::Abort, 0, now, 30_000)
            .unwrap();
        assert!(refused(p.append_as_leader_txn(
            &batch(0),
            now,
            1,
            0,
            verified(guard)
        )));
        assert_eq!(p.log().log_end_offset(), 1, "only the marker");
        // A verification that holds: appended; the transaction is then ongoing here and
        // the next batch needs none.
        let guard = p.begin_txn_verification(pid, now).unwrap();
        p.append_as_leader_txn(&batch(0), now, 1, 0, verified(guard))
            .unwrap();
        assert_eq!(p.begin_txn_verification(pid, now).unwrap(), None);
        p.append_as_leader_txn(&batch(1), now, 1, 0, verified(None))
            .unwrap();
        // After the commit marker, neither the spent guard nor "ongoing" lets a batch in.
        p.append_marker(pid, 0, ferrite_storage::ControlType::Commit, 0, now, 30_000)
            .unwrap();
        assert!(refused(p.append_as_leader_txn(
            &batch(2),
            now,
            1,
            0,
            verified(guard)
        )));
        assert!(refused(p.append_as_leader_txn(
            &batch(2),
            now,
            1,
            0,
            verified(None)
        )));
        assert_eq!(p.log().log_end_offset(), 4);
        assert_eq!(
            p.log().first_unstable_offset(),
            None,
            "no transaction left open"
        );
    }

    #[tokio::test]
    async fn acks_all_waits_for_the_isr_and_the_high_watermark_bounds_consumers() {
        let (n0, n1) = (node(0), node(1));
        let id = Uuid::new_v4();
        let img = image(id, vec![0, 1], 0, 1);
        n0.rm.reconcile(&img, &n0.config, true).unwrap();
        n1.rm.reconcile(&img, &n1.config, true).unwrap();
        let leader = n0.rm.get("t", 0).unwrap();
        let follower = n1.rm.get("t", 0).unwrap();
        assert!(leader.is_leader() && !follower.is_leader());

        let (info, waiter) = leader
            .append_as_leader(&make_batch(3, 1, b"v"), crate::now_ms(), -1, 30_000)
            .unwrap();
        assert_eq!(info.base_offset, 0);
        let waiter = waiter.expect("acks=all waits");
        assert_eq!(leader.high_watermark(), 0);
        // A consumer sees nothing yet; a follower reads to the log end.
        let (_, hw, plan) = leader.consumer_read_plan(0);
        assert_eq!(hw, 0);
        assert!(plan.unwrap().is_none());
        // A non-leader refuses produces.
        assert!(matches!(
            follower.append_as_leader(&make_batch(1, 1, b"x"), 0, 1, 0),
            Err(ProduceError::Replication(
                ReplicationError::NotLeaderOrFollower(0)
            ))
        ));

        replicate(&leader, &follower, 1); // brings the batch
        assert_eq!(
            leader.high_watermark(),
            0,
            "the follower has not confirmed yet"
        );
        replicate(&leader, &follower, 1); // fetches from 3: confirms it
        assert_eq!(leader.high_watermark(), 3);
        assert_eq!(leader.wait(waiter).await, Ok(()));
        // The follower learns the high watermark from the leader's answer.
        assert_eq!(follower.high_watermark(), 3);
        assert_eq!(bytes_of(&leader), bytes_of(&follower));
        assert_eq!(
            leader.log().leader_epochs().entries(),
            follower.log().leader_epochs().entries()
        );
        let (_, _, plan) = leader.consumer_read_plan(0);
        assert!(plan.unwrap().is_some());

        // The ISR shrinks to the leader: below min.insync.replicas 2.
        let (_, waiter) = leader
            .append_as_leader(&make_batch(1, 1, b"w"), crate::now_ms(), -1, 30_000)
            .unwrap();
        let mut img2 = img.clone();
        img2.apply(&MetadataRecord::PartitionChange {
            topic_id: id,
            partition: 0,
            leader: ferrite_metadata::records::NO_LEADER_CHANGE,
            isr: Some(vec![0]),
            replicas: None,
            adding_replicas: None,
            removing_replicas: None,
        });
        n0.rm.reconcile(&img2, &n0.config, true).unwrap();
        assert!(matches!(
            leader.wait(waiter.unwrap()).await,
            Err(ReplicationError::NotEnoughReplicasAfterAppend { .. })
        ));
        let before = leader.log().log_end_offset();
        assert!(matches!(
            leader.append_as_leader(&make_batch(1, 1, b"z"), crate::now_ms(), -1, 30_000),
            Err(ProduceError::Replication(
                ReplicationError::NotEnoughReplicas { .. }
            ))
        ));
        assert_eq!(
            leader.log().log_end_offset(),
            before,
            "refused before the append"
        );
        // acks=1 still works.
        assert!(leader
            .append_as_leader(&make_batch(1, 1, b"one"), crate::now_ms(), 1, 30_000)
            .is_ok());
    }

    #[tokio::test]
    async fn a_follower_at_the_high_watermark_is_proposed_for_the_isr() {
        let (n0, n1) = (node(0), node(1));
        let id = Uuid::new_v4();
        let img = image(id, vec![0], 0, 1);
        n0.rm.reconcile(&img, &n0.config, true).unwrap();
        n1.rm.reconcile(&img, &n1.config, true).unwrap();
        let mut rx = n0.rm.take_alter_partition_receiver().unwrap();
        let leader = n0.rm.get("t", 0).unwrap();
        leader
            .append_as_leader(&make_batch(2, 1, b"v"), crate::now_ms(), 1, 0)
            .unwrap();
        // The high watermark does not move while the ISR is below min.insync.replicas
        // (KIP-966), so a follower at it is in sync (Kafka's rule: log end offset at
        // least the high watermark and the epoch's start offset).
        assert_eq!(leader.high_watermark(), 0);
        let fetch = |fetch_offset| FollowerFetch {
            replica_id: 1,
            replica_epoch: 11,
            current_leader_epoch: 1,
            fetch_offset,
            last_fetched_epoch: None,
        };
        let (_, proposal) = leader
            .on_follower_fetch(fetch(0), crate::now_ms(), |id| n0.rm.broker_state(id))
            .unwrap();
        let proposal = proposal.expect("in sync: join the ISR");
        let members: Vec<i32> = proposal.new_isr.iter().map(|m| m.broker_id).collect();
        assert_eq!(members, vec![0, 1]);
        assert_eq!(
            proposal.new_isr[1].broker_epoch, 11,
            "KIP-903: its broker epoch"
        );
        n0.rm.send_alter_partition(&leader, proposal.clone());
        let item = rx.try_recv().unwrap();
        assert_eq!(item.proposal, proposal);
        assert_eq!((item.topic.as_ref(), item.partition), ("t", 0));
        // One AlterPartition in flight: no second proposal.
        let (_, again) = leader
            .on_follower_fetch(fetch(0), crate::now_ms(), |id| n0.rm.broker_state(id))
            .unwrap();
        assert!(again.is_none());
        // A stale broker epoch (a wiped disk re-registered) never joins (KIP-903); the
        // controller's refusal is definitive, so the leader goes back to its ISR.
        n0.rm
            .alter_partition_done(&item, Err(ResponseError::IneligibleReplica.code()));
        let stale = FollowerFetch {
            replica_epoch: 3,
            ..fetch(0)
        };
        let (_, proposal) = leader
            .on_follower_fetch(stale, crate::now_ms(), |id| n0.rm.broker_state(id))
            .unwrap();
        assert!(proposal.is_none());
    }

    #[tokio::test]
    async fn a_deposed_leader_truncates_its_unreplicated_tail_by_epoch() {
        let (n0, n1) = (node(0), node(1));
        let id = Uuid::new_v4();
        let img = image(id, vec![0, 1], 0, 1);
        n0.rm.reconcile(&img, &n0.config, true).unwrap();
        n1.rm.reconcile(&img, &n1.config, true).unwrap();
        let p0 = n0.rm.get("t", 0).unwrap();
        let p1 = n1.rm.get("t", 0).unwrap();
        p0.append_as_leader(&make_batch(2, 1, b"a"), crate::now_ms(), 1, 0)
            .unwrap();
        replicate(&p0, &p1, 1);
        replicate(&p0, &p1, 1);
        // Appended at the old leader, never replicated, while an acks=all waits.
        let (_, waiter) = p0
            .append_as_leader(&make_batch(3, 1, b"lost"), crate::now_ms(), -1, 30_000)
            .unwrap();
        // Broker 1 becomes leader of epoch 2 (broker 0 fenced, say).
        let mut img2 = img.clone();
        img2.apply(&MetadataRecord::PartitionChange {
            topic_id: id,
            partition: 0,
            leader: 1,
            isr: Some(vec![1]),
            replicas: None,
            adding_replicas: None,
            removing_replicas: None,
        });
        n0.rm.reconcile(&img2, &n0.config, true).unwrap();
        n1.rm.reconcile(&img2, &n1.config, true).unwrap();
        assert!(matches!(
            p0.wait(waiter.unwrap()).await,
            Err(ReplicationError::NotLeaderOrFollower(_))
        ));
        assert!(p1.is_leader() && !p0.is_leader());
        p1.append_as_leader(&make_batch(1, 1, b"new"), crate::now_ms(), 1, 0)
            .unwrap();
        // The old leader truncates as its fetcher would: OffsetForLeaderEpoch for its
        // last epoch (1) at the new leader.
        let (_, leo, last) = p0.follower_position();
        assert_eq!((leo, last), (5, Some(1)));
        let answer = p1.end_offset_for_epoch(1);
        assert_eq!(answer.end_offset, 2, "epoch 1 ended at 2 on the new leader");
        let t = {
            let log = p0.log();
            ferrite_replication::follower_truncation(
                log.leader_epochs(),
                leo,
                p0.high_watermark().min(leo),
                answer,
            )
        };
        assert!(t.complete);
        assert!(p0.truncate_to(t.offset).unwrap());
        replicate(&p1, &p0, 0);
        assert_eq!(bytes_of(&p0), bytes_of(&p1));
        assert_eq!(
            p0.log().leader_epochs().entries(),
            p1.log().leader_epochs().entries()
        );
    }
}
