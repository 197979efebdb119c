//! Runtime around the sans-I/O `GroupCoordinator`: one mutex, the pending long-polls,
//! and the `__consumer_offsets` topic its records go to.
//!
//! A group lives in partition `abs(javaHash(group)) % offsets.topic.num.partitions` of
//! `__consumer_offsets`, as in Kafka, and its coordinator is that partition's leader.
//! Coordinators move with leadership (Kafka's GroupMetadataManager): a broker that leads
//! a partition in a leader epoch it has not loaded replays the partition's log from its
//! start before answering for its groups ([`GroupManagerState::check`], and the ticker
//! every [`GROUP_TICK_INTERVAL_MS_MAX`]); one that no longer leads it forgets them and
//! answers NOT_COORDINATOR, so clients find the new coordinator.
//!
//! Writes are acks=all on the group's partition (`offsets.commit.timeout.ms`): a commit
//! is answered once every in-sync replica has it, so a new leader, which is in the ISR,
//! has every commit a client was told succeeded. Records a write replays (committed
//! offsets, deletions) are applied in log order once the high watermark passes them
//! (`unreplicated`), so nothing a failover could take back is ever answered by
//! OffsetFetch.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use ferrite_coordinator::records::RecordFormat;
use ferrite_coordinator::{Effect, GroupCoordinator, GroupRecord, Token};
use ferrite_replication::ReplicationError;
use kafka_protocol::messages::{JoinGroupResponse, SyncGroupResponse};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use kafka_protocol::ResponseError;
use tokio::sync::oneshot;

use crate::replica_manager::{Partition, ProduceError, ProduceWaiter, TxnWrite};
use crate::{now_ms, Broker};

pub use ferrite_coordinator::partition_for_group;

pub const OFFSETS_TOPIC: &str = "__consumer_offsets";

/// Writes of one `__consumer_offsets` partition appended and waiting for the high
/// watermark, at most: past it new commits are refused (COORDINATOR_NOT_AVAILABLE)
/// until replication catches up, instead of the queue growing.
pub const UNREPLICATED_WRITES_MAX: usize = 10_000;

pub enum Waiter {
    Join(oneshot::Sender<JoinGroupResponse>),
    Sync(oneshot::Sender<SyncGroupResponse>),
}

pub struct GroupManagerState {
    pub coordinator: GroupCoordinator,
    pending: HashMap<Token, Waiter>,
    persist_errors: crate::RateLimitedLog,
    load_errors: crate::RateLimitedLog,
    /// TxnOffsetCommit records written but not yet committed, by producer id: applied
    /// when the COMMIT marker of their `__consumer_offsets` partition is replicated,
    /// dropped on ABORT (Kafka's pending transactional offsets). Rebuilt at load.
    pending_txn_offsets: HashMap<i64, Vec<GroupRecord>>,
    /// The `__consumer_offsets` partitions whose groups are loaded here, with the leader
    /// epoch they were loaded in.
    loaded: HashMap<i32, i32>,
    /// Per partition, in log order: records appended as leader that are replayed once
    /// the high watermark reaches `end_offset` (every in-sync replica has them).
    unreplicated: HashMap<i32, VecDeque<Unreplicated>>,
    partitions: i32,
}

struct Unreplicated {
    end_offset: i64,
    records: Vec<GroupRecord>,
    /// `Some` for an end-transaction marker (true: COMMIT): `records` are the offsets of
    /// the transaction it ends, still pending (UNSTABLE_OFFSET_COMMIT) until it is
    /// replicated, then committed offsets (COMMIT) or dropped (ABORT).
    txn_marker: Option<bool>,
}

pub struct GroupManager {
    state: Mutex<GroupManagerState>,
    next_token: AtomicU64,
    partitions: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum GroupLoadError {
    #[error("{OFFSETS_TOPIC}-{partition}: {reason}")]
    Load { partition: i32, reason: String },
    #[error("{OFFSETS_TOPIC}-{partition}: cannot migrate Ferrite's JSON records to Kafka's format: {reason}; the data directory is unchanged past the last completed step, and the next load retries")]
    Migrate { partition: i32, reason: String },
}

/// Why a group coordinator's write to `__consumer_offsets` failed.
#[derive(Debug, thiserror::Error)]
pub enum GroupWriteError {
    #[error("{OFFSETS_TOPIC}-{0} is not hosted here")]
    NotHosted(i32),
    #[error("cannot encode group records: {0}")]
    Encode(String),
    #[error("{OFFSETS_TOPIC}-{partition} has {queued} writes waiting for replication")]
    Backlog { partition: i32, queued: usize },
    #[error(transparent)]
    Produce(#[from] ProduceError),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
}

impl GroupWriteError {
    /// The append's own error code, as a produce would get it.
    fn append_code(&self) -> i16 {
        match self {
            GroupWriteError::NotHosted(_) => ResponseError::NotLeaderOrFollower.code(),
            GroupWriteError::Encode(_) => ResponseError::UnknownServerError.code(),
            GroupWriteError::Backlog { .. } => ResponseError::NotEnoughReplicas.code(),
            GroupWriteError::Produce(e) => crate::error::produce_error_code(e),
            GroupWriteError::Replication(e) => crate::error::replication_error_code(e),
        }
    }

    /// Kafka's `GroupMetadataManager` mapping of an append error to a group API's code.
    /// Its two uses (storeOffsets, storeGroup) differ only in what a timeout and a
    /// too-large write become.
    fn store_code(&self, timed_out: Option<ResponseError>, too_large: ResponseError) -> i16 {
        let c = self.append_code();
        let is = |e: ResponseError| c == e.code();
        let mapped = if is(ResponseError::UnknownTopicOrPartition)
            || is(ResponseError::NotEnoughReplicas)
            || is(ResponseError::NotEnoughReplicasAfterAppend)
        {
            ResponseError::CoordinatorNotAvailable
        } else if is(ResponseError::NotLeaderOrFollower) || is(ResponseError::KafkaStorageError) {
            ResponseError::NotCoordinator
        } else if is(ResponseError::MessageTooLarge)
            || is(ResponseError::RecordListTooLarge)
            || is(ResponseError::InvalidFetchSize)
        {
            too_large
        } else if let Some(t) = timed_out.filter(|_| is(ResponseError::RequestTimedOut)) {
            t
        } else {
            return c;
        };
        mapped.code()
    }

    /// The code an OffsetCommit, OffsetDelete or DeleteGroups answers (storeOffsets).
    pub fn offset_commit_code(&self) -> i16 {
        self.store_code(None, ResponseError::InvalidCommitOffsetSize)
    }

    /// The code a SyncGroup answers when the group record cannot be written
    /// (storeGroup).
    pub fn group_code(&self) -> i16 {
        self.store_code(
            Some(ResponseError::RebalanceInProgress),
            ResponseError::UnknownServerError,
        )
    }
}

/// A write appended as leader, waiting for every in-sync replica.
pub struct GroupWrite {
    pub partition: i32,
    p: Arc<Partition>,
    waiter: ProduceWaiter,
}

impl GroupWrite {
    /// The outcome if already decided (on one node, at once).
    pub fn try_result(&mut self) -> Option<Result<(), GroupWriteError>> {
        self.waiter
            .try_result()
            .map(|r| r.map_err(GroupWriteError::from))
    }

    /// Waits until every in-sync replica has the write, or it failed.
    pub async fn wait(mut self) -> Result<(), GroupWriteError> {
        if let Some(r) = self.try_result() {
            return r;
        }
        self.p
            .wait(self.waiter)
            .await
            .map_err(GroupWriteError::from)
    }
}

impl GroupManager {
    /// The end of every handler whose records are applied once replicated
    /// (OffsetCommit, OffsetDelete, DeleteGroups): waits for the write's in-sync
    /// replicas, then applies whatever of the partition's queue they have, this write's
    /// records included when it succeeded.
    pub async fn finish_write(
        &self,
        broker: &Broker,
        write: Result<Option<GroupWrite>, GroupWriteError>,
    ) -> Result<(), GroupWriteError> {
        let w = match write {
            Ok(None) => return Ok(()),
            Ok(Some(w)) => w,
            Err(e) => return Err(e),
        };
        let partition = w.partition;
        let r = w.wait().await;
        self.lock().replay_replicated(broker, partition, now_ms());
        r
    }

    pub fn new(coordinator: GroupCoordinator, partitions: i32) -> Self {
        GroupManager {
            state: Mutex::new(GroupManagerState {
                coordinator,
                pending: HashMap::new(),
                persist_errors: crate::RateLimitedLog::default(),
                load_errors: crate::RateLimitedLog::default(),
                pending_txn_offsets: HashMap::new(),
                loaded: HashMap::new(),
                unreplicated: HashMap::new(),
                partitions,
            }),
            next_token: AtomicU64::new(1),
            partitions,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, GroupManagerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    pub fn next_token(&self) -> Token {
        self.next_token.fetch_add(1, Ordering::Relaxed)
    }

    /// Loads every `__consumer_offsets` partition led here in an epoch not loaded yet,
    /// and forgets those no longer led here (start-up, then every tick).
    pub fn sync_leadership(&self, broker: &Broker) {
        let mut state = self.lock();
        for partition in 0..self.partitions {
            let _ = state.sync_partition(broker, partition);
        }
    }
}

impl GroupManagerState {
    /// Whether this broker is the coordinator of `group` now: it leads the group's
    /// partition and has its groups loaded (loading them first if it has not).
    /// NOT_COORDINATOR otherwise, or COORDINATOR_LOAD_IN_PROGRESS while the partition
    /// cannot be read (retried).
    pub fn check(&mut self, broker: &Broker, group: &str) -> Result<(), ResponseError> {
        let partition = partition_for_group(group, self.partitions);
        self.sync_partition(broker, partition)
    }

    /// Loads or unloads `partition` to match this broker's leadership of it.
    fn sync_partition(&mut self, broker: &Broker, partition: i32) -> Result<(), ResponseError> {
        let led = broker
            .replicas
            .get(OFFSETS_TOPIC, partition)
            .and_then(|p| p.led_epoch().map(|epoch| (p, epoch)));
        let loaded = self.loaded.get(&partition).copied();
        let Some((p, epoch)) = led else {
            if loaded.is_some() {
                tracing::info!(
                    partition,
                    "{OFFSETS_TOPIC} partition no longer led here; its groups are unloaded"
                );
                self.unload(partition);
            }
            return Err(ResponseError::NotCoordinator);
        };
        if loaded == Some(epoch) {
            return Ok(());
        }
        if loaded.is_some() {
            self.unload(partition);
        }
        let now = now_ms();
        let started = std::time::Instant::now();
        match self.load_partition(&p, partition, now) {
            Ok(records) => {
                self.loaded.insert(partition, epoch);
                tracing::info!(
                    partition,
                    leader_epoch = epoch,
                    records,
                    load_ms = started.elapsed().as_millis(),
                    "{OFFSETS_TOPIC} partition loaded; coordinating its groups"
                );
                Ok(())
            }
            Err(e) => {
                self.unload(partition);
                if let Some(suppressed) = self.load_errors.ready(now) {
                    tracing::error!(error = %e, suppressed, "cannot load {OFFSETS_TOPIC} partition; its groups answer COORDINATOR_LOAD_IN_PROGRESS and the load is retried");
                }
                Err(ResponseError::CoordinatorLoadInProgress)
            }
        }
    }

    /// Forgets the groups of `partition`; their waiting members hear NOT_COORDINATOR.
    fn unload(&mut self, partition: i32) {
        let n = self.partitions;
        let effects = self.coordinator.unload_partition(partition, n);
        self.loaded.remove(&partition);
        self.unreplicated.remove(&partition);
        for records in self.pending_txn_offsets.values_mut() {
            records.retain(|r| partition_for_group(r.group(), n) != partition);
        }
        self.pending_txn_offsets.retain(|_, r| !r.is_empty());
        for effect in effects {
            self.deliver(effect, None);
        }
    }

    /// Replays `partition`'s log from its start into the coordinator: the same `replay`
    /// that applies records as they are written. A partition holding Ferrite's JSON
    /// records from before Kafka's binary format is then migrated (see
    /// [`migrate_partition`]).
    fn load_partition(
        &mut self,
        p: &Partition,
        partition: i32,
        now: i64,
    ) -> Result<usize, GroupLoadError> {
        let err = |reason: String| GroupLoadError::Load { partition, reason };
        let (start, end) = {
            let log = p.log();
            (log.log_start_offset(), log.log_end_offset())
        };
        let mut count = 0usize;
        let mut offset = start;
        let mut legacy_records = 0usize;
        while offset < end {
            let (_, _, plan) = p.read_plan(offset);
            let Some(plan) = plan.map_err(|e| err(e.to_string()))? else {
                break;
            };
            let mut bytes = plan
                .read(1024 * 1024, true)
                .map_err(|e| err(e.to_string()))?;
            if bytes.is_empty() {
                break;
            }
            let sets =
                RecordBatchDecoder::decode_all(&mut bytes).map_err(|e| err(e.to_string()))?;
            let mut last = offset;
            for set in sets {
                for r in set.records {
                    last = last.max(r.offset);
                    if r.control {
                        // An end-transaction marker: the producer's pending offsets are
                        // applied (COMMIT) or dropped (ABORT).
                        let commit =
                            r.key.as_deref().and_then(|k| k.get(2..4)) == Some(&[0u8, 1][..]);
                        self.complete_txn_offsets(partition, r.producer_id, commit, now);
                        continue;
                    }
                    let Some(key) = r.key else { continue };
                    if r.transactional {
                        if let Ok((rec, _)) = GroupRecord::decode_any(&key, r.value.as_deref()) {
                            self.add_txn_offsets(r.producer_id, vec![rec]);
                        }
                        continue;
                    }
                    match GroupRecord::decode_any(&key, r.value.as_deref()) {
                        Ok((rec, format)) => {
                            self.coordinator.replay(&rec, now);
                            count += 1;
                            if format == RecordFormat::LegacyJson {
                                legacy_records += 1;
                            }
                        }
                        // Other record types (Kafka 4.x's KIP-848 and share group
                        // records) describe groups Ferrite does not have.
                        Err(e) => {
                            tracing::warn!(partition, offset = r.offset, error = %e, "skipping record")
                        }
                    }
                }
            }
            offset = last + 1;
        }
        if legacy_records > 0 {
            tracing::info!(
                partition,
                legacy_records,
                "{OFFSETS_TOPIC} holds Ferrite's JSON records; rewriting in Kafka's format"
            );
            let mine: Vec<GroupRecord> = self
                .coordinator
                .state_records()
                .into_iter()
                .filter(|r| partition_for_group(r.group(), self.partitions) == partition)
                .collect();
            let written = migrate_partition(p, &mine, now)
                .map_err(|reason| GroupLoadError::Migrate { partition, reason })?;
            tracing::info!(
                partition,
                records = mine.len(),
                log_start_offset = written,
                "{OFFSETS_TOPIC} partition migrated to Kafka's record format"
            );
        }
        Ok(count)
    }

    /// Appends `records` (one group's) to the group's partition as leader, acks=all.
    /// With `replay`, they are applied to the coordinator once every in-sync replica
    /// has them ([`Self::replay_replicated`]); without, the coordinator changed its
    /// state already (a rebalance's group record) and only the answer waits.
    pub fn write(
        &mut self,
        broker: &Broker,
        records: &[GroupRecord],
        now: i64,
        replay: bool,
    ) -> Result<Option<GroupWrite>, GroupWriteError> {
        self.write_as(broker, records, now, replay, None, TxnWrite::None)
    }

    /// A TxnOffsetCommit's records: one transactional batch of
    /// `producer_id`/`producer_epoch` without a sequence (the coordinator's own write, as
    /// Kafka's), so the partition's producer state sees the open transaction and a load
    /// finds the offsets pending until their marker. Held as pending here at once.
    pub fn write_txn_offsets(
        &mut self,
        broker: &Broker,
        records: Vec<GroupRecord>,
        producer_id: i64,
        producer_epoch: i16,
        now: i64,
        verified: TxnWrite,
    ) -> Result<Option<GroupWrite>, GroupWriteError> {
        let write = self.write_as(
            broker,
            &records,
            now,
            false,
            Some((producer_id, producer_epoch)),
            verified,
        )?;
        self.add_txn_offsets(producer_id, records);
        Ok(write)
    }

    fn write_as(
        &mut self,
        broker: &Broker,
        records: &[GroupRecord],
        now: i64,
        replay: bool,
        txn: Option<(i64, i16)>,
        txn_write: TxnWrite,
    ) -> Result<Option<GroupWrite>, GroupWriteError> {
        let Some(first) = records.first() else {
            return Ok(None);
        };
        let partition = partition_for_group(first.group(), self.partitions);
        let queued = self.unreplicated.get(&partition).map_or(0, VecDeque::len);
        if queued >= UNREPLICATED_WRITES_MAX {
            return Err(GroupWriteError::Backlog { partition, queued });
        }
        let p = broker
            .replicas
            .get(OFFSETS_TOPIC, partition)
            .ok_or(GroupWriteError::NotHosted(partition))?;
        let batch = encode_batch(records, now, txn).map_err(GroupWriteError::Encode)?;
        let (info, waiter) = p.append_coordinator(
            &batch,
            now,
            broker.config.offsets_commit_timeout_ms,
            txn_write,
        )?;
        if replay {
            self.unreplicated
                .entry(partition)
                .or_default()
                .push_back(Unreplicated {
                    end_offset: info.last_offset + 1,
                    records: records.to_vec(),
                    txn_marker: None,
                });
        }
        let mut write = GroupWrite {
            partition,
            p,
            waiter,
        };
        if replay {
            match write.try_result() {
                // One node (or an ISR of this broker alone): replicated by the append.
                Some(Ok(())) => {
                    self.replay_replicated(broker, partition, now);
                    return Ok(None);
                }
                // Decided already, and not replicated: the records stay queued and are
                // replayed if the high watermark passes them after all (they are in
                // the log a new leader would load).
                Some(Err(e)) => return Err(e),
                None => {}
            }
        }
        Ok(Some(write))
    }

    /// Replays, in log order, the writes of `partition` the high watermark has passed.
    pub fn replay_replicated(&mut self, broker: &Broker, partition: i32, now: i64) {
        let Some(queue) = self.unreplicated.get_mut(&partition) else {
            return;
        };
        let Some(p) = broker.replicas.get(OFFSETS_TOPIC, partition) else {
            return;
        };
        let high_watermark = p.high_watermark();
        let mut replicated = Vec::new();
        while queue
            .front()
            .is_some_and(|w| w.end_offset <= high_watermark)
        {
            if let Some(w) = queue.pop_front() {
                replicated.push(w);
            }
        }
        if queue.is_empty() {
            self.unreplicated.remove(&partition);
        }
        for w in replicated {
            if w.txn_marker != Some(false) {
                for r in &w.records {
                    self.coordinator.replay(r, now);
                }
            }
        }
    }

    /// An end-transaction marker of `producer_id` was appended to `partition` as leader,
    /// ending at `end_offset`: the producer's pending offsets become committed offsets
    /// (COMMIT) or are dropped (ABORT) once the high watermark passes it, as Kafka's
    /// `onTransactionCompleted` runs after the marker's acks=all append. Until then
    /// OffsetFetch answers the offsets committed before and UNSTABLE_OFFSET_COMMIT, so
    /// it never shows an offset a failover could take back. The entry takes this
    /// transaction's offsets with it: a next transaction's, pending before the entry is
    /// replayed, stay pending. The caller holds this lock across the append, so the
    /// queue stays in log order.
    pub fn txn_marker_appended(
        &mut self,
        broker: &Broker,
        partition: i32,
        end_offset: i64,
        producer_id: i64,
        commit: bool,
        now: i64,
    ) {
        let records = self.take_txn_offsets(partition, producer_id);
        self.unreplicated
            .entry(partition)
            .or_default()
            .push_back(Unreplicated {
                end_offset,
                records,
                txn_marker: Some(commit),
            });
        self.replay_replicated(broker, partition, now);
    }

    fn replay_all_replicated(&mut self, broker: &Broker, now: i64) {
        let partitions: Vec<i32> = self.unreplicated.keys().copied().collect();
        for partition in partitions {
            self.replay_replicated(broker, partition, now);
        }
    }

    /// Offsets of a TxnOffsetCommit, written to the log as transactional records and
    /// held until the transaction ends.
    pub fn add_txn_offsets(&mut self, producer_id: i64, records: Vec<GroupRecord>) {
        self.pending_txn_offsets
            .entry(producer_id)
            .or_default()
            .extend(records);
    }

    /// The transaction of `producer_id` ended in `partition` (its marker there): its
    /// pending offsets of that partition's groups become committed offsets (COMMIT) or
    /// are dropped (ABORT). Those of other partitions wait for their own marker.
    fn complete_txn_offsets(&mut self, partition: i32, producer_id: i64, commit: bool, now: i64) {
        let ended = self.take_txn_offsets(partition, producer_id);
        if commit {
            for r in &ended {
                self.coordinator.replay(r, now);
            }
        }
    }

    /// Removes and returns the pending offsets of `producer_id` for the groups of
    /// `partition`.
    fn take_txn_offsets(&mut self, partition: i32, producer_id: i64) -> Vec<GroupRecord> {
        let Some(pending) = self.pending_txn_offsets.get_mut(&producer_id) else {
            return Vec::new();
        };
        let n = self.partitions;
        let (ended, kept): (Vec<GroupRecord>, Vec<GroupRecord>) = std::mem::take(pending)
            .into_iter()
            .partition(|r| partition_for_group(r.group(), n) == partition);
        if kept.is_empty() {
            self.pending_txn_offsets.remove(&producer_id);
        } else {
            *pending = kept;
        }
        ended
    }

    /// Whether an open transaction holds an offset for this group and partition
    /// (OffsetFetch's UNSTABLE_OFFSET_COMMIT, KIP-447).
    pub fn has_pending_txn_offset(&self, group: &str, topic: &str, partition: i32) -> bool {
        // Also those of a transaction whose marker is not replicated yet.
        let ending = self
            .unreplicated
            .values()
            .flatten()
            .filter(|w| w.txn_marker.is_some())
            .flat_map(|w| &w.records);
        self.pending_txn_offsets
            .values()
            .flatten()
            .chain(ending)
            .any(|r| {
                matches!(r, GroupRecord::Offset { group: g, topic: t, partition: p, .. }
                if g == group && t == topic && *p == partition)
            })
    }

    pub fn register(&mut self, token: Token, waiter: Waiter) {
        self.pending.insert(token, waiter);
    }

    pub fn forget(&mut self, token: Token) {
        self.pending.remove(&token);
    }

    /// Runs the coordinator's timeouts due at `now` and carries out their effects, and
    /// replays writes the high watermark has passed.
    pub fn tick(&mut self, broker: &Arc<Broker>, now: i64) {
        self.replay_all_replicated(broker, now);
        let effects = self.coordinator.tick(now);
        if !effects.is_empty() {
            self.apply(broker, effects);
        }
    }

    /// Hands a JoinGroup/SyncGroup answer to its waiting request; with `error`, the
    /// answer is that error instead (the group record before it was not written).
    fn deliver(&mut self, effect: Effect, error: Option<i16>) {
        match effect {
            Effect::JoinDone(token, mut resp) => {
                if let Some(code) = error {
                    resp = resp.with_error_code(code);
                }
                if let Some(Waiter::Join(tx)) = self.pending.remove(&token) {
                    let _ = tx.send(resp);
                }
            }
            Effect::SyncDone(token, mut resp) => {
                if let Some(code) = error {
                    resp = resp.with_error_code(code).with_assignment(Bytes::new());
                }
                if let Some(Waiter::Sync(tx)) = self.pending.remove(&token) {
                    let _ = tx.send(resp);
                }
            }
            Effect::Persist(_) => {
                debug_assert!(false, "records are written by apply, not delivered")
            }
        }
    }

    fn persist_failed(
        &mut self,
        record: &GroupRecord,
        e: &GroupWriteError,
        now: i64,
    ) -> Vec<Effect> {
        if let Some(suppressed) = self.persist_errors.ready(now) {
            tracing::error!(group = record.group(), error = %e, suppressed, "cannot persist group record; the group rebalances again");
        }
        if matches!(record, GroupRecord::Group { .. }) {
            self.coordinator.persist_failed(record.group(), now)
        } else {
            Vec::new()
        }
    }

    /// Carries out effects in order: records are appended (acks=all) before any later
    /// answer is released, so a client never sees state that a failover could take
    /// back. An answer that follows a write still waiting for its in-sync replicas is
    /// released by a task once they have it. A group record that cannot be written sends
    /// the group back to rebalance (see `GroupCoordinator::persist_failed`), and the
    /// answers after it carry Kafka's `storeGroup` error (NOT_COORDINATOR when this
    /// broker no longer leads the partition): members back off, find the coordinator
    /// again and rejoin.
    pub fn apply(&mut self, broker: &Arc<Broker>, effects: Vec<Effect>) {
        let now = now_ms();
        let mut error: Option<i16> = None;
        let mut waiting: Vec<(GroupWrite, GroupRecord)> = Vec::new();
        let mut deferred: Vec<Effect> = Vec::new();
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::Persist(record) => {
                    // Offset records (expiry tombstones) apply once replicated; a group
                    // record describes what the coordinator already holds.
                    let replay = matches!(record, GroupRecord::Offset { .. });
                    match self.write(broker, std::slice::from_ref(&record), now, replay) {
                        Ok(None) => {}
                        Ok(Some(mut w)) => match w.try_result() {
                            Some(Ok(())) => {}
                            Some(Err(e)) => {
                                error.get_or_insert(e.group_code());
                                queue.extend(self.persist_failed(&record, &e, now));
                            }
                            None => waiting.push((w, record)),
                        },
                        Err(e) => {
                            error.get_or_insert(e.group_code());
                            queue.extend(self.persist_failed(&record, &e, now));
                        }
                    }
                }
                answer if waiting.is_empty() => self.deliver(answer, error),
                answer => deferred.push(answer),
            }
        }
        if waiting.is_empty() {
            return;
        }
        let broker = broker.clone();
        tokio::spawn(async move {
            let mut failed: Vec<(GroupRecord, GroupWriteError)> = Vec::new();
            for (w, record) in waiting {
                if let Err(e) = w.wait().await {
                    failed.push((record, e));
                }
            }
            let mut state = broker.groups.lock();
            let now = now_ms();
            state.replay_all_replicated(&broker, now);
            let mut more = Vec::new();
            for (record, e) in &failed {
                error.get_or_insert(e.group_code());
                more.extend(state.persist_failed(record, e, now));
            }
            for answer in deferred {
                state.deliver(answer, error);
            }
            if !more.is_empty() {
                state.apply(&broker, more);
            }
        });
    }
}

/// Rewrites one `__consumer_offsets` partition that holds Ferrite's old JSON records:
/// rolls the log, appends `records` (the whole loaded state of the partition's groups) in
/// Kafka's format, fsyncs them, and only then moves the log start offset past everything
/// older, which deletes the old segments. Crash-safe by construction: until the log start
/// offset moves (one checkpoint write), the old records are still read first and the new
/// ones, read later, supersede them; a crash anywhere before finds JSON again at the next
/// start and repeats the migration. Returns the new log start offset.
pub fn migrate_partition(p: &Partition, records: &[GroupRecord], now: i64) -> Result<i64, String> {
    let first = {
        let mut log = p.log();
        log.roll().map_err(|e| e.to_string())?;
        log.log_end_offset()
    };
    let mut by_group: std::collections::BTreeMap<&str, Vec<GroupRecord>> = Default::default();
    for r in records {
        by_group.entry(r.group()).or_default().push(r.clone());
    }
    for group_records in by_group.values() {
        append_records_to(p, group_records, now)?;
    }
    let mut log = p.log();
    log.flush().map_err(|e| e.to_string())?;
    log.advance_log_start_offset(first)
        .map_err(|e| e.to_string())
}

/// Appends one group's records to `p` as one batch, acks=1 (the start-up migration).
fn append_records_to(p: &Partition, records: &[GroupRecord], now: i64) -> Result<(), String> {
    if records.is_empty() {
        return Ok(());
    }
    let batch = encode_batch(records, now, None)?;
    p.append(&batch, now).map(|_| ()).map_err(|e| e.to_string())
}

/// One group's records as one batch, transactional for `txn` (producer id, epoch).
fn encode_batch(
    records: &[GroupRecord],
    now: i64,
    txn: Option<(i64, i16)>,
) -> Result<BytesMut, String> {
    let first_group = records.first().map(GroupRecord::group);
    let encoded: Vec<Record> = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            debug_assert_eq!(
                Some(r.group()),
                first_group,
                "one batch holds one group's records"
            );
            let (key, value) = r.encode();
            Record {
                transactional: txn.is_some(),
                control: false,
                delete_horizon: false,
                partition_leader_epoch: -1,
                producer_id: txn.map_or(-1, |t| t.0),
                producer_epoch: txn.map_or(-1, |t| t.1),
                timestamp_type: TimestampType::Creation,
                offset: i as i64,
                // The encoder keeps records in one batch while offset - sequence is
                // constant: base sequence -1 (none) for a transactional batch.
                sequence: if txn.is_some() { i as i32 - 1 } else { -1 },
                timestamp: now,
                key: Some(Bytes::from(key)),
                value: value.map(Bytes::from),
                headers: Default::default(),
            }
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        encoded.iter(),
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(buf)
}

/// How long a tombstone stays after it is the latest record for its key, so that a
/// reader that saw the old value also sees the delete (Kafka's delete.retention.ms).
const TOMBSTONE_RETENTION_MS: i64 = 24 * 60 * 60 * 1000;

/// Compacts one `__consumer_offsets` partition: a batch survives if it holds the latest
/// record of some key (and that record is not an old tombstone). The latest offsets are
/// computed first without the log lock; a record written meanwhile is only in the active
/// segment, which compaction never touches, so nothing newer can be lost.
pub fn compact_offsets_partition(p: &Partition) {
    let (start, end, closed_bytes) = {
        let log = p.log();
        (
            log.log_start_offset(),
            log.log_end_offset(),
            log.closed_bytes(),
        )
    };
    if closed_bytes == 0
        || closed_bytes
            == p.compacted_closed_bytes
                .load(std::sync::atomic::Ordering::Relaxed)
    {
        return;
    }
    let mut latest: HashMap<Bytes, (i64, bool, i64)> = HashMap::new();
    // Transactional records count only once committed; until their marker they are
    // kept whole, and aborted ones never shadow an older committed value.
    let mut open: HashMap<i64, Vec<(Bytes, i64, bool, i64)>> = HashMap::new();
    let mut offset = start;
    while offset < end {
        let (_, _, plan) = p.read_plan(offset);
        let Ok(Some(plan)) = plan else { break };
        let Ok(mut bytes) = plan.read(1024 * 1024, true) else {
            return;
        };
        if bytes.is_empty() {
            break;
        }
        let Ok(sets) = RecordBatchDecoder::decode_all(&mut bytes) else {
            return;
        };
        let mut last = offset;
        for set in sets {
            for r in set.records {
                last = last.max(r.offset);
                if r.control {
                    let commit = r.key.as_deref().and_then(|k| k.get(2..4)) == Some(&[0u8, 1][..]);
                    for (k, o, tombstone, ts) in open.remove(&r.producer_id).unwrap_or_default() {
                        if commit {
                            latest.insert(k, (o, tombstone, ts));
                        }
                    }
                } else if let Some(k) = r.key {
                    if r.transactional {
                        open.entry(r.producer_id).or_default().push((
                            k,
                            r.offset,
                            r.value.is_none(),
                            r.timestamp,
                        ));
                    } else {
                        latest.insert(k, (r.offset, r.value.is_none(), r.timestamp));
                    }
                }
            }
        }
        offset = last + 1;
    }
    let now = now_ms();
    let keep = |batch: &[u8]| {
        let mut b = Bytes::copy_from_slice(batch);
        let Ok(set) = RecordBatchDecoder::decode(&mut b) else {
            return true;
        };
        // Markers stay (a kept transactional batch needs its marker at the next load).
        if set
            .records
            .iter()
            .any(|r| r.control || (r.transactional && open.contains_key(&r.producer_id)))
        {
            return true;
        }
        set.records.iter().any(|r| {
            let Some(k) = &r.key else { return false };
            match latest.get(k) {
                Some((o, tombstone, ts)) if *o == r.offset => {
                    !*tombstone || now - ts < TOMBSTONE_RETENTION_MS
                }
                Some(_) => false,
                // Not seen by the first pass: keep, to be safe.
                None => true,
            }
        })
    };
    let mut log = p.log();
    let result = log.compact(keep);
    p.compacted_closed_bytes
        .store(log.closed_bytes(), std::sync::atomic::Ordering::Relaxed);
    drop(log);
    match result {
        Ok(r) if r.segments > 0 => tracing::info!(
            partition = p.index,
            segments = r.segments,
            bytes_before = r.bytes_before,
            bytes_after = r.bytes_after,
            "compacted offsets partition"
        ),
        Ok(_) => {}
        Err(e) => tracing::error!(partition = p.index, error = %e, "compaction failed"),
    }
}

pub fn str_bytes(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

/// Longest the ticker sleeps: offset expiry and anything without a known deadline are
/// checked at least this often.
const GROUP_TICK_INTERVAL_MS_MAX: i64 = 100;

/// Drives timeouts: session expiry, rebalance deadlines, offset expiry. It wakes at the
/// coordinator's next deadline (a session expires at `last heartbeat + session.timeout.ms`,
/// as Kafka's timer fires, not up to a period later), and at least every
/// [`GROUP_TICK_INTERVAL_MS_MAX`]. Requests that report group state tick first too
/// ([`GroupManagerState::tick`]), so they never see a member past its deadline.
pub async fn run_ticker(broker: Arc<Broker>) {
    loop {
        // Coordinators follow leadership (loads are file reads: off the async workers).
        let b = broker.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || b.groups.sync_leadership(&b)).await {
            tracing::error!(error = %e, "group coordinator leadership check failed");
        }
        let wait_ms = {
            let mut state = broker.groups.lock();
            let now = now_ms();
            state.tick(&broker, now);
            state
                .coordinator
                .next_deadline_ms(now)
                .map_or(GROUP_TICK_INTERVAL_MS_MAX, |d| d - now)
                .clamp(1, GROUP_TICK_INTERVAL_MS_MAX)
        };
        tokio::time::sleep(std::time::Duration::from_millis(wait_ms as u64)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::GroupWriteError;
    use ferrite_replication::ReplicationError;
    use kafka_protocol::ResponseError;

    /// Kafka's storeOffsets and storeGroup mappings: the same but for a timeout (a
    /// SyncGroup retries it as a rebalance) and a too-large write.
    #[test]
    fn write_errors_map_as_kafkas_group_metadata_manager() {
        let cases = [
            (
                GroupWriteError::Backlog {
                    partition: 0,
                    queued: 1,
                },
                ResponseError::CoordinatorNotAvailable,
                ResponseError::CoordinatorNotAvailable,
            ),
            (
                GroupWriteError::Replication(ReplicationError::NotEnoughReplicasAfterAppend {
                    isr: 1,
                    min_insync_replicas: 2,
                }),
                ResponseError::CoordinatorNotAvailable,
                ResponseError::CoordinatorNotAvailable,
            ),
            (
                GroupWriteError::NotHosted(3),
                ResponseError::NotCoordinator,
                ResponseError::NotCoordinator,
            ),
            (
                GroupWriteError::Replication(ReplicationError::RequestTimedOut {
                    required_offset: 7,
                }),
                ResponseError::RequestTimedOut,
                ResponseError::RebalanceInProgress,
            ),
            (
                GroupWriteError::Produce(crate::replica_manager::ProduceError::Storage(
                    ferrite_storage::StorageError::MessageTooLarge { size: 2, max: 1 },
                )),
                ResponseError::InvalidCommitOffsetSize,
                ResponseError::UnknownServerError,
            ),
            (
                GroupWriteError::Replication(ReplicationError::FencedLeaderEpoch {
                    request: 1,
                    current: 2,
                }),
                ResponseError::FencedLeaderEpoch,
                ResponseError::FencedLeaderEpoch,
            ),
        ];
        for (e, offsets, group) in cases {
            assert_eq!(e.offset_commit_code(), offsets.code(), "{e}: storeOffsets");
            assert_eq!(e.group_code(), group.code(), "{e}: storeGroup");
        }
    }
}
