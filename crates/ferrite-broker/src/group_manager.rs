//! Runtime around the sans-I/O `GroupCoordinator`: one mutex, the pending long-polls,
//! and the `__consumer_offsets` topic its records go to.
//!
//! A group lives in partition `abs(javaHash(group)) % offsets.topic.num.partitions` of
//! `__consumer_offsets`, as in Kafka, and its coordinator is that partition's leader, so
//! the multi-broker work moves coordinators with partition leadership.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use ferrite_coordinator::records::RecordFormat;
use ferrite_coordinator::{Effect, GroupCoordinator, GroupRecord, Token};
use kafka_protocol::messages::{JoinGroupResponse, SyncGroupResponse};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use tokio::sync::oneshot;

use crate::replica_manager::{Partition, ReplicaManager};
use crate::{now_ms, Broker};

pub const OFFSETS_TOPIC: &str = "__consumer_offsets";

/// Kafka's `Utils.abs(groupId.hashCode()) % partitions`, with Java's UTF-16 string hash.
pub fn partition_for_group(group: &str, partitions: i32) -> i32 {
    let mut h: i32 = 0;
    for unit in group.encode_utf16() {
        h = h.wrapping_mul(31).wrapping_add(i32::from(unit));
    }
    let abs = if h == i32::MIN { 0 } else { h.abs() };
    abs % partitions.max(1)
}

pub enum Waiter {
    Join(oneshot::Sender<JoinGroupResponse>),
    Sync(oneshot::Sender<SyncGroupResponse>),
}

pub struct GroupManagerState {
    pub coordinator: GroupCoordinator,
    pending: HashMap<Token, Waiter>,
    persist_errors: crate::RateLimitedLog,
    /// TxnOffsetCommit records written but not yet committed, by producer id: applied
    /// when the COMMIT marker is written to their `__consumer_offsets` partition,
    /// dropped on ABORT (Kafka's pending transactional offsets). Rebuilt at load.
    pending_txn_offsets: HashMap<i64, Vec<GroupRecord>>,
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
    #[error("{OFFSETS_TOPIC}-{partition}: cannot migrate Ferrite's JSON records to Kafka's format: {reason}; the data directory is unchanged past the last completed step, and the next start retries")]
    Migrate { partition: i32, reason: String },
}

impl GroupManager {
    pub fn new(coordinator: GroupCoordinator, partitions: i32) -> Self {
        GroupManager {
            state: Mutex::new(GroupManagerState {
                coordinator,
                pending: HashMap::new(),
                persist_errors: crate::RateLimitedLog::default(),
                pending_txn_offsets: HashMap::new(),
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

    /// Replays every partition of `__consumer_offsets` into the coordinator, reading the
    /// logs from their start: the same `replay` that applies records as they are written.
    /// A partition holding Ferrite's JSON records from before Kafka's binary format is
    /// then migrated (see [`migrate_partition`]).
    pub fn load(&self, replicas: &ReplicaManager) -> Result<usize, GroupLoadError> {
        let mut state = self.lock();
        let now = now_ms();
        let mut count = 0usize;
        let mut legacy: Vec<(i32, Arc<Partition>)> = Vec::new();
        for partition in 0..self.partitions {
            let Some(p) = replicas.get(OFFSETS_TOPIC, partition) else {
                continue;
            };
            let err = |reason: String| GroupLoadError::Load { partition, reason };
            let (start, end) = {
                let log = p.log();
                (log.log_start_offset(), log.log_end_offset())
            };
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
                            // An end-transaction marker: the producer's pending offsets
                            // are applied (COMMIT) or dropped (ABORT).
                            let commit =
                                r.key.as_deref().and_then(|k| k.get(2..4)) == Some(&[0u8, 1][..]);
                            state.complete_txn_offsets(r.producer_id, commit, now);
                            continue;
                        }
                        let Some(key) = r.key else { continue };
                        if r.transactional {
                            if let Ok((rec, _)) = GroupRecord::decode_any(&key, r.value.as_deref())
                            {
                                state.add_txn_offsets(r.producer_id, vec![rec]);
                            }
                            continue;
                        }
                        match GroupRecord::decode_any(&key, r.value.as_deref()) {
                            Ok((rec, format)) => {
                                state.coordinator.replay(&rec, now);
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
                legacy.push((partition, p));
            }
        }
        if !legacy.is_empty() {
            let records = state.coordinator.state_records();
            for (partition, p) in legacy {
                let mine: Vec<GroupRecord> = records
                    .iter()
                    .filter(|r| partition_for_group(r.group(), self.partitions) == partition)
                    .cloned()
                    .collect();
                let written = migrate_partition(&p, &mine, now)
                    .map_err(|reason| GroupLoadError::Migrate { partition, reason })?;
                tracing::info!(
                    partition,
                    records = mine.len(),
                    log_start_offset = written,
                    "{OFFSETS_TOPIC} partition migrated to Kafka's record format"
                );
            }
        }
        Ok(count)
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

impl GroupManagerState {
    /// Offsets of a TxnOffsetCommit, written to the log as transactional records and
    /// held until the transaction ends.
    pub fn add_txn_offsets(&mut self, producer_id: i64, records: Vec<GroupRecord>) {
        self.pending_txn_offsets
            .entry(producer_id)
            .or_default()
            .extend(records);
    }

    /// The transaction of `producer_id` ended: its pending offsets become committed
    /// offsets (COMMIT) or are dropped (ABORT).
    pub fn complete_txn_offsets(&mut self, producer_id: i64, commit: bool, now: i64) {
        let Some(records) = self.pending_txn_offsets.remove(&producer_id) else {
            return;
        };
        if commit {
            for r in &records {
                self.coordinator.replay(r, now);
            }
        }
    }

    /// Whether an open transaction holds an offset for this group and partition
    /// (OffsetFetch's UNSTABLE_OFFSET_COMMIT, KIP-447).
    pub fn has_pending_txn_offset(&self, group: &str, topic: &str, partition: i32) -> bool {
        self.pending_txn_offsets.values().flatten().any(|r| {
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

    /// Runs the coordinator's timeouts due at `now` and carries out their effects.
    pub fn tick(&mut self, broker: &Broker, now: i64) {
        let effects = self.coordinator.tick(now);
        if !effects.is_empty() {
            self.apply(broker, effects);
        }
    }

    /// Carries out effects in order: records are appended before any later response is
    /// released, so a client never sees state that a crash could take back. A group
    /// record that cannot be appended sends the group back to rebalance (see
    /// `GroupCoordinator::persist_failed`), and its waiting members hear NOT_COORDINATOR,
    /// Kafka's answer when the group's log cannot be written: they back off, find the
    /// coordinator again and rejoin.
    pub fn apply(&mut self, broker: &Broker, effects: Vec<Effect>) {
        let now = now_ms();
        let mut failed = false;
        let mut queue: std::collections::VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::Persist(record) => {
                    if let Err(e) = append_records(broker, std::slice::from_ref(&record), now) {
                        let ready = self.persist_errors.ready(now);
                        if let Some(suppressed) = ready {
                            tracing::error!(group = record.group(), error = %e, suppressed, "cannot persist group record; the group rebalances again");
                        }
                        failed = true;
                        if matches!(record, GroupRecord::Group { .. }) {
                            queue.extend(self.coordinator.persist_failed(record.group(), now));
                        }
                    } else if matches!(record, GroupRecord::Offset { .. }) {
                        self.coordinator.replay(&record, now);
                    }
                }
                Effect::JoinDone(token, mut resp) => {
                    if failed {
                        resp = resp
                            .with_error_code(kafka_protocol::ResponseError::NotCoordinator.code());
                    }
                    if let Some(Waiter::Join(tx)) = self.pending.remove(&token) {
                        let _ = tx.send(resp);
                    }
                }
                Effect::SyncDone(token, mut resp) => {
                    if failed {
                        resp = resp
                            .with_error_code(kafka_protocol::ResponseError::NotCoordinator.code())
                            .with_assignment(Bytes::new());
                    }
                    if let Some(Waiter::Sync(tx)) = self.pending.remove(&token) {
                        let _ = tx.send(resp);
                    }
                }
            }
        }
    }
}

/// Appends group records to the group's `__consumer_offsets` partition as one batch.
pub fn append_records(broker: &Broker, records: &[GroupRecord], now: i64) -> Result<(), String> {
    let Some(first) = records.first() else {
        return Ok(());
    };
    let partition = partition_for_group(first.group(), broker.groups.partitions());
    let p = broker
        .replicas
        .get(OFFSETS_TOPIC, partition)
        .ok_or_else(|| format!("{OFFSETS_TOPIC}-{partition} is not hosted here"))?;
    append_records_to(&p, records, now)
}

/// Appends a TxnOffsetCommit's records to the group's `__consumer_offsets` partition as
/// one transactional batch of `producer_id`/`producer_epoch` without a sequence (the
/// coordinator's own write, as Kafka's), so the partition's producer state sees the open
/// transaction and a restart finds the offsets pending until their marker.
pub fn append_txn_offsets(
    broker: &Broker,
    records: &[GroupRecord],
    producer_id: i64,
    producer_epoch: i16,
    now: i64,
) -> Result<(), String> {
    let Some(first) = records.first() else {
        return Ok(());
    };
    let partition = partition_for_group(first.group(), broker.groups.partitions());
    let p = broker
        .replicas
        .get(OFFSETS_TOPIC, partition)
        .ok_or_else(|| format!("{OFFSETS_TOPIC}-{partition} is not hosted here"))?;
    encode_and_append(&p, records, now, Some((producer_id, producer_epoch)))
}

/// Appends one group's records to `p` as one batch.
fn append_records_to(p: &Partition, records: &[GroupRecord], now: i64) -> Result<(), String> {
    encode_and_append(p, records, now, None)
}

fn encode_and_append(
    p: &Partition,
    records: &[GroupRecord],
    now: i64,
    txn: Option<(i64, i16)>,
) -> Result<(), String> {
    let Some(first) = records.first() else {
        return Ok(());
    };
    let encoded: Vec<Record> = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            debug_assert_eq!(
                r.group(),
                first.group(),
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
    p.append(&buf, now).map(|_| ()).map_err(|e| e.to_string())
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
    use super::*;

    #[test]
    fn java_hash_partitioning() {
        // "".hashCode() == 0; "a".hashCode() == 97; "ab" == 3105.
        assert_eq!(partition_for_group("", 50), 0);
        assert_eq!(partition_for_group("a", 50), 97 % 50);
        assert_eq!(partition_for_group("ab", 50), 3105 % 50);
        // "polygenelubricants".hashCode() == i32::MIN, which Kafka's abs maps to 0.
        assert_eq!(partition_for_group("polygenelubricants", 50), 0);
    }
}
