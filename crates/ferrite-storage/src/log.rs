//! A partition's log: an ordered set of segments, the last one active.
//!
//! Invariants (asserted where they can break):
//! - offsets are dense and increasing: each appended batch starts at `log_end_offset`;
//! - a produce request's batches for one partition are appended whole or not at all
//!   (one validation pass, then one write; a failed write is truncated away);
//! - `log_start_offset <= log_end_offset`, and no segment lies wholly below
//!   `log_start_offset` after [`PartitionLog::tick`].
//!
//! This type is not synchronized: the broker wraps each log in a mutex and keeps the
//! critical section to metadata work. Reads copy an immutable range out of the segment
//! files without holding the lock ([`ReadPlan`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::batch::{
    assign_offset_and_epoch, check_producer_timestamps, end_txn_marker_batch, set_max_timestamp,
    stamp_log_append_time, validate_batch, validate_producer_batch, BatchHeader, BatchIter,
    ControlType, TimestampRules, HEADER_BYTES,
};
use crate::error::{BatchError, Result, StorageError};
use crate::fd_cache::{DescriptorCache, SegmentFile};
use crate::leader_epoch::{
    read_leader_epoch_checkpoint, write_leader_epoch_checkpoint, EpochEntry,
};
use crate::producer_state::{
    AbortedTxn, ProducerBatch, ProducerStateError, ProducerStateManager, Validated,
    PRODUCER_ID_EXPIRATION_MS_DEFAULT, PRODUCER_SNAPSHOT_BYTES_MAX,
};
use crate::segment::{parse_segment_file_name, segment_file_name, Segment, LOG_SUFFIX};
#[cfg(test)]
use crate::segment::{INDEX_SUFFIX, TIME_INDEX_SUFFIX};
use ferrite_replication::LeaderEpochCache;

/// Per-partition settings, from topic configs over broker defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// `segment.bytes`
    pub segment_bytes: u64,
    /// `segment.ms`
    pub segment_ms: i64,
    /// `retention.ms`; negative means unlimited.
    pub retention_ms: i64,
    /// `retention.bytes`; negative means unlimited.
    pub retention_bytes: i64,
    /// `max.message.bytes`: the largest batch accepted.
    pub max_message_bytes: usize,
    /// `flush.messages`: fsync after this many messages; `u64::MAX` leaves it to the OS.
    pub flush_messages: u64,
    /// `flush.ms`: fsync when the oldest unflushed append is this old; negative disables.
    pub flush_ms: i64,
    /// `index.interval.bytes`: bytes between offset index entries.
    pub index_interval_bytes: u64,
    /// `message.timestamp.type=LogAppendTime`
    pub log_append_time: bool,
    /// `message.timestamp.before.max.ms` (KIP-937); `i64::MAX` is unbounded.
    pub message_timestamp_before_max_ms: i64,
    /// `message.timestamp.after.max.ms` (KIP-937); `i64::MAX` is unbounded.
    pub message_timestamp_after_max_ms: i64,
    /// The log is compacted, so its offsets may have gaps (recovery then only requires
    /// them to increase).
    pub compacted: bool,
    /// `producer.id.expiration.ms`: a producer whose last batch is this old is forgotten.
    pub producer_id_expiration_ms: i64,
    /// `compression.type` other than `producer`: the codec (batch attribute bits 0-2) the
    /// broker rewrites produced batches in before appending them. `None` (`producer`)
    /// stores batches as sent. Storage itself does not read it.
    pub recompress_codec: Option<u8>,
}

impl LogConfig {
    pub fn timestamp_rules(&self) -> TimestampRules {
        TimestampRules {
            log_append_time: self.log_append_time,
            before_max_ms: self.message_timestamp_before_max_ms,
            after_max_ms: self.message_timestamp_after_max_ms,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 1024 * 1024 * 1024,
            segment_ms: 7 * 24 * 60 * 60 * 1000,
            retention_ms: 7 * 24 * 60 * 60 * 1000,
            retention_bytes: -1,
            max_message_bytes: 1024 * 1024 + 12,
            flush_messages: u64::MAX,
            flush_ms: -1,
            index_interval_bytes: 4096,
            log_append_time: false,
            message_timestamp_before_max_ms: i64::MAX,
            message_timestamp_after_max_ms: i64::MAX,
            compacted: false,
            producer_id_expiration_ms: PRODUCER_ID_EXPIRATION_MS_DEFAULT,
            recompress_codec: None,
        }
    }
}

/// Segment positions are u32 in the index, so a segment never grows past this.
pub const SEGMENT_BYTES_MAX: u64 = i32::MAX as u64;
const CHECKPOINT_FILE: &str = "partition.checkpoint";
/// Producer state snapshots: `<offset>.snapshot` (docs/storage-format.md).
pub const SNAPSHOT_SUFFIX: &str = "snapshot";
/// Bytes read at a time while replaying batch headers into the producer state.
const REPLAY_WINDOW_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    pub base_offset: i64,
    pub last_offset: i64,
    /// The broker's timestamp when the topic uses LogAppendTime, else -1.
    pub log_append_time_ms: i64,
    pub log_start_offset: i64,
    /// Records written; 0 for a duplicate.
    pub record_count: i64,
    /// The batch was a retry of one already in the log: nothing was written and the
    /// offsets are the original's.
    pub duplicate: bool,
}

/// What happened while opening a log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    pub segments: usize,
    pub recovered_segments: usize,
    pub truncated_bytes: u64,
    /// Segments after a truncated one, set aside as `<base>.log.dropped` (a segment
    /// after a cut would leave a hole in the offsets). They are kept for the operator.
    pub dropped_segments_after_corruption: usize,
    /// Offsets recovery cut off, as far as the damaged headers still tell.
    pub offsets_lost: i64,
    /// `[from, to)` ranges of offsets no segment holds (a missing segment file).
    pub missing_offsets: Vec<(i64, i64)>,
    /// Offset of the producer state snapshot loaded, if any.
    pub producer_snapshot_offset: Option<i64>,
    /// Batches read from the log after the snapshot to rebuild the producer state.
    pub producer_batches_replayed: usize,
}

/// Suffix given to a segment file that recovery could not keep in the log.
pub const DROPPED_SEGMENT_SUFFIX: &str = "dropped";

/// What a compaction pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Segments rewritten or removed.
    pub segments: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// A range of one segment file to copy out without the log's lock.
#[derive(Debug, Clone)]
pub struct ReadPlan {
    file: Arc<File>,
    path: PathBuf,
    start_position: u64,
    end_position: u64,
    fetch_offset: i64,
    index_interval_bytes: u64,
    /// Batches starting at or after this offset are not read: a consumer's fetch stops
    /// at the high watermark ([`ReadPlan::up_to`]). `i64::MAX` otherwise.
    max_offset: i64,
}

#[derive(Debug)]
pub struct PartitionLog {
    dir: PathBuf,
    config: LogConfig,
    segments: BTreeMap<i64, Segment>,
    log_start_offset: i64,
    /// Everything below this offset is known to be on disk (fsynced).
    recovery_point: i64,
    unflushed_messages: u64,
    first_unflushed_ms: Option<i64>,
    /// Rolled segments whose data has not been fsynced yet: `(file, next_offset)`.
    pending_syncs: Vec<(SegmentFile, i64)>,
    /// Where the segments' descriptors are kept (shared by the broker's logs).
    files: Arc<DescriptorCache>,
    /// Reused buffer for the one write of an append.
    write_buf: Vec<u8>,
    offline: bool,
    /// Idempotent producers' sequence state, derived from the log.
    producers: ProducerStateManager,
    /// Offsets of the `.snapshot` files in `dir`.
    snapshots: BTreeSet<i64>,
    /// Leader epoch → start offset of the records in this log, mirrored durably in
    /// `leader-epoch-checkpoint` before the first append of a new epoch.
    leader_epochs: LeaderEpochCache,
    /// The checkpoint file still holds entries that open dropped from `leader_epochs`
    /// (at or past the log end). Open does not rewrite the file, because a start that is
    /// refused later must leave the data directory unchanged (issue 14); it is rewritten
    /// before the next append or truncation, so the stale entries never outlive a write.
    leader_epochs_unsynced: bool,
}

impl PartitionLog {
    /// Opens or creates the log in `dir`. `clean` says the broker shut down cleanly, so
    /// that only the tail after the last index entry of the active segment is read.
    /// Its segment files are opened through the process's shared [`DescriptorCache`].
    pub fn open(dir: &Path, config: LogConfig, clean: bool) -> Result<(PartitionLog, OpenReport)> {
        Self::open_with_cache(dir, config, clean, DescriptorCache::shared().clone())
    }

    /// [`PartitionLog::open`] with segment descriptors kept in `files`.
    pub fn open_with_cache(
        dir: &Path,
        config: LogConfig,
        clean: bool,
        files: Arc<DescriptorCache>,
    ) -> Result<(PartitionLog, OpenReport)> {
        std::fs::create_dir_all(dir).map_err(|e| StorageError::io(dir, e))?;
        let checkpoint_on_disk = read_checkpoint(dir)?;
        let (mut log_start_offset, mut recovery_point) = checkpoint_on_disk.unwrap_or((0, 0));
        let mut bases = Vec::new();
        let mut snapshots = BTreeSet::new();
        for entry in std::fs::read_dir(dir).map_err(|e| StorageError::io(dir, e))? {
            let path = entry.map_err(|e| StorageError::io(dir, e))?.path();
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or_default();
            if ext == LOG_SUFFIX {
                let base = parse_segment_file_name(&path)
                    .ok_or_else(|| StorageError::InvalidFileName(path.clone()))?;
                bases.push((base, path));
            } else if ext == SNAPSHOT_SUFFIX {
                match parse_segment_file_name(&path) {
                    Some(offset) => {
                        snapshots.insert(offset);
                    }
                    None => {
                        tracing::warn!(file = %path.display(), "ignoring a snapshot file with a bad name")
                    }
                }
            } else if ext == "tmp" || ext == "cleaned" {
                // Leftovers of an interrupted checkpoint write or compaction pass: the
                // originals were only replaced by an atomic rename, so these are garbage.
                let _ = std::fs::remove_file(&path);
            }
        }
        bases.sort();
        let mut report = OpenReport::default();
        let mut segments = BTreeMap::new();
        let count = bases.len();
        let mut corrupt_from: Option<i64> = None;
        for (i, (base, path)) in bases.iter().enumerate() {
            if let Some(log_end_offset) = corrupt_from {
                // A segment after a truncated one would leave a hole in the offsets. It
                // is set aside, never deleted: the operator may still want its bytes.
                let claimed = File::open(path).ok().and_then(|f| {
                    let len = f.metadata().ok()?.len();
                    crate::segment::claimed_end_offset(&f, 0, len)
                });
                let mut dropped = path.clone().into_os_string();
                dropped.push(".");
                dropped.push(DROPPED_SEGMENT_SUFFIX);
                std::fs::rename(path, &dropped).map_err(|e| StorageError::io(path, e))?;
                let _ = std::fs::remove_file(path.with_extension("index"));
                let _ = std::fs::remove_file(path.with_extension("timeindex"));
                let lost = claimed.map_or(0, |c| c.saturating_sub((*base).max(log_end_offset)));
                tracing::warn!(
                    segment = %path.display(), kept_as = %std::path::Path::new(&dropped).display(),
                    base_offset = base, claimed_end_offset = claimed, offsets_lost = lost,
                    "recovery dropped a segment that follows a corrupt one"
                );
                report.offsets_lost = report.offsets_lost.saturating_add(lost);
                report.dropped_segments_after_corruption += 1;
                continue;
            }
            let is_last = i + 1 == count;
            let next_base = bases.get(i + 1).map(|(b, _)| *b);
            let recover = !clean && (is_last || next_base.is_none_or(|n| n > recovery_point));
            let (seg, outcome) = Segment::open(
                path.clone(),
                *base,
                recover,
                config.index_interval_bytes,
                !config.compacted,
                &files,
            )?;
            if recover {
                report.recovered_segments += 1;
            }
            if outcome.truncated_bytes > 0 {
                let lost = outcome
                    .claimed_end_offset
                    .map_or(0, |c| c.saturating_sub(seg.next_offset));
                tracing::warn!(
                    segment = %path.display(), bytes = outcome.truncated_bytes,
                    reason = outcome.reason.as_deref().unwrap_or(""),
                    log_end_offset = seg.next_offset, offsets_lost = lost,
                    "recovery truncated a torn or corrupt tail"
                );
                report.truncated_bytes += outcome.truncated_bytes;
                report.offsets_lost = report.offsets_lost.saturating_add(lost);
                if !is_last {
                    corrupt_from = Some(seg.next_offset);
                }
            } else if let Some(next) = next_base.filter(|_| !config.compacted) {
                // Segments of an uncompacted log follow each other exactly; anything else
                // is a segment file gone missing (or two that overlap).
                if seg.next_offset < next {
                    tracing::warn!(
                        dir = %dir.display(), from = seg.next_offset, to = next,
                        "offsets [from, to) are missing from the log: a segment file is gone; fetches there skip ahead to offset `to`"
                    );
                    report.missing_offsets.push((seg.next_offset, next));
                } else if seg.next_offset > next {
                    return Err(StorageError::Corruption {
                        path: path.clone(),
                        position: seg.size,
                        reason: format!(
                            "segment holds offsets up to {} but the next segment starts at {next}",
                            seg.next_offset
                        ),
                    });
                }
            }
            segments.insert(*base, seg);
        }
        if segments.is_empty() {
            let base = log_start_offset.max(0);
            segments.insert(base, Segment::create(dir, base, &files)?);
        }
        report.segments = segments.len();
        let log_end_offset = segments
            .values()
            .next_back()
            .map(|s| s.next_offset)
            .unwrap_or(0);
        let first_base = segments.keys().next().copied().unwrap_or(0);
        log_start_offset = log_start_offset.clamp(first_base, log_end_offset);
        recovery_point = recovery_point.min(log_end_offset);
        let checkpoint = (log_start_offset, recovery_point);
        if clean {
            // A clean shutdown made every log durable to its end before it wrote the
            // marker, so that is the recovery point, whatever the checkpoint says: the
            // shutdown does not write one checkpoint per partition after its sync (19,000
            // file writes, issue 14). The file may keep a lower recovery point until its
            // next write; lower only means that a crash before then recovers more.
            recovery_point = log_end_offset;
        }
        let mut log = PartitionLog {
            dir: dir.to_path_buf(),
            config,
            segments,
            log_start_offset,
            recovery_point,
            unflushed_messages: 0,
            first_unflushed_ms: None,
            pending_syncs: Vec::new(),
            files,
            write_buf: Vec::new(),
            offline: false,
            producers: ProducerStateManager::default(),
            snapshots,
            leader_epochs: LeaderEpochCache::new(),
            leader_epochs_unsynced: false,
        };
        // Only a changed (or missing) checkpoint is written: an open after a clean
        // shutdown writes no file per partition.
        if checkpoint_on_disk != Some(checkpoint) {
            log.write_checkpoint()?;
        }
        log.load_producer_state(&mut report)?;
        log.load_leader_epochs()?;
        Ok((log, report))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn config(&self) -> &LogConfig {
        &self.config
    }
    pub fn set_config(&mut self, config: LogConfig) {
        self.config = config;
    }
    pub fn log_start_offset(&self) -> i64 {
        self.log_start_offset
    }
    /// One past the last offset in the log (Kafka's LEO).
    pub fn log_end_offset(&self) -> i64 {
        self.active().next_offset
    }
    pub fn size_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.size).sum()
    }
    /// Bytes in segments other than the active one (what compaction can work on).
    pub fn closed_bytes(&self) -> u64 {
        self.size_bytes() - self.active().size
    }
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
    pub fn is_offline(&self) -> bool {
        self.offline
    }
    /// The idempotent producers this partition knows (DescribeProducers).
    pub fn producers(&self) -> &ProducerStateManager {
        &self.producers
    }
    /// The leader epochs of this log's records (OffsetForLeaderEpoch, truncation).
    pub fn leader_epochs(&self) -> &LeaderEpochCache {
        &self.leader_epochs
    }
    /// The epoch of the last record, `None` for a log without records of a known epoch
    /// (a follower's `LastFetchedEpoch`).
    pub fn last_leader_epoch(&self) -> Option<i32> {
        self.leader_epochs.latest_epoch()
    }
    /// Offsets of the producer state snapshots on disk.
    pub fn producer_snapshot_offsets(&self) -> impl Iterator<Item = i64> + '_ {
        self.snapshots.iter().copied()
    }

    #[allow(clippy::expect_used)] // `segments` is never empty: open and roll keep one.
    fn active(&self) -> &Segment {
        self.segments
            .values()
            .next_back()
            .expect("a log always has an active segment")
    }
    #[allow(clippy::expect_used)]
    fn active_mut(&mut self) -> &mut Segment {
        self.segments
            .values_mut()
            .next_back()
            .expect("a log always has an active segment")
    }

    /// Validates and appends the batches in `records` (as a producer sent them) in one
    /// write, assigning offsets from `log_end_offset`.
    pub fn append(&mut self, records: &[u8], leader_epoch: i32, now_ms: i64) -> Result<AppendInfo> {
        self.append_from(records, leader_epoch, now_ms, false)
    }

    /// [`Self::append`] for the broker's coordinators (Kafka's `AppendOrigin.COORDINATOR`):
    /// a batch with a producer id but no sequence (a transactional offset commit) is
    /// not sequence-checked; it still opens the producer's transaction here.
    pub fn append_coordinator(
        &mut self,
        records: &[u8],
        leader_epoch: i32,
        now_ms: i64,
    ) -> Result<AppendInfo> {
        self.append_from(records, leader_epoch, now_ms, true)
    }

    fn append_from(
        &mut self,
        records: &[u8],
        leader_epoch: i32,
        now_ms: i64,
        coordinator: bool,
    ) -> Result<AppendInfo> {
        if self.offline {
            return Err(StorageError::LogOffline(self.dir.clone()));
        }
        self.sync_leader_epochs()?;
        if records.is_empty() {
            return Err(BatchError::Truncated {
                have: 0,
                need: HEADER_BYTES,
            }
            .into());
        }
        // Pass 1: validate everything before touching the log.
        let mut record_count = 0i64;
        let rules = self.config.timestamp_rules();
        // `(position, maxTimestamp)` of the batches whose header maximum is replaced; empty
        // (no allocation) for well-formed batches.
        let mut max_timestamp_repairs: Vec<(usize, i64)> = Vec::new();
        let mut batch_count = 0usize;
        let mut producer_batch: Option<ProducerBatch> = None;
        let mut iter = BatchIter::new(records);
        for item in iter.by_ref() {
            let (at, _, batch) = item?;
            if batch.len() > self.config.max_message_bytes {
                return Err(StorageError::MessageTooLarge {
                    size: batch.len(),
                    max: self.config.max_message_bytes,
                });
            }
            let header = validate_producer_batch(batch)?;
            batch_count += 1;
            if let Some(pb) = ProducerBatch::from_header(&header) {
                producer_batch = Some(pb);
            }
            if let Some(max) = check_producer_timestamps(batch, &header, &rules, now_ms)? {
                max_timestamp_repairs.push((at, max));
            }
            record_count += i64::from(header.last_offset_delta) + 1;
        }
        assert_eq!(iter.position(), records.len());
        // The state records the maxTimestamp that is stored (replay reads it back).
        if let (Some(pb), Some(&(_, max))) =
            (producer_batch.as_mut(), max_timestamp_repairs.first())
        {
            pb.max_timestamp = max;
        }
        if let Some(pb) = &producer_batch {
            // Kafka accepts exactly one v2 batch per partition and request; with several,
            // a retry could be part duplicate and part new.
            if batch_count > 1 {
                return Err(ProducerStateError::MultipleBatches(batch_count).into());
            }
            let unsequenced = coordinator && pb.base_sequence < 0;
            let validated = if unsequenced {
                Validated::Append
            } else {
                self.producers.validate(pb)?
            };
            if let Validated::Duplicate(original) = validated {
                return Ok(AppendInfo {
                    base_offset: original.first_offset,
                    last_offset: original.last_offset,
                    log_append_time_ms: if self.config.log_append_time {
                        original.max_timestamp
                    } else {
                        -1
                    },
                    log_start_offset: self.log_start_offset,
                    record_count: 0,
                    duplicate: true,
                });
            }
        }

        let total = records.len() as u64;
        self.maybe_roll(total, record_count, now_ms)?;

        // Pass 2: copy, assign offsets, write once.
        let base_offset = self.log_end_offset();
        if leader_epoch >= 0 {
            // Durable before the epoch's first record, so that after a crash the history
            // covers every record on disk (KIP-101).
            self.assign_leader_epoch(leader_epoch, base_offset)?;
        }
        let mut buf = std::mem::take(&mut self.write_buf);
        buf.clear();
        buf.extend_from_slice(records);
        let mut next = base_offset;
        let mut pos = 0usize;
        while let Some(batch) = buf.get_mut(pos..) {
            if batch.is_empty() {
                break;
            }
            let header = BatchHeader::parse(batch)?;
            let len = header.total_bytes()?;
            let Some(batch) = batch.get_mut(..len) else {
                break;
            };
            assign_offset_and_epoch(batch, next, leader_epoch);
            if self.config.log_append_time {
                stamp_log_append_time(batch, now_ms);
            } else if let Some((_, max)) = max_timestamp_repairs.iter().find(|(at, _)| *at == pos) {
                set_max_timestamp(batch, *max);
            }
            next += i64::from(header.last_offset_delta) + 1;
            pos += len;
        }
        let result = self.write_active(&buf, now_ms);
        self.write_buf = buf;
        result?;
        assert_eq!(self.log_end_offset(), next, "offsets must stay dense");
        // The state follows the log: only a batch that was written is folded in.
        if let Some(mut pb) = producer_batch {
            if self.config.log_append_time {
                pb.max_timestamp = now_ms;
            }
            self.producers.update(&pb, base_offset);
        }

        self.unflushed_messages += record_count as u64;
        self.first_unflushed_ms.get_or_insert(now_ms);
        if self.unflushed_messages >= self.config.flush_messages {
            self.flush()?;
        }
        Ok(AppendInfo {
            base_offset,
            last_offset: next - 1,
            log_append_time_ms: if self.config.log_append_time {
                now_ms
            } else {
                -1
            },
            log_start_offset: self.log_start_offset,
            record_count,
            duplicate: false,
        })
    }

    /// Appends an end-transaction marker (COMMIT or ABORT control batch) for a
    /// producer, as the transaction coordinator asks (Kafka's WriteTxnMarkers on the
    /// partition leader). A marker whose epoch is older than the producer's here is
    /// refused (INVALID_PRODUCER_EPOCH): a fenced coordinator's late write. The
    /// producer's open transaction here closes; an ABORT is remembered for
    /// read_committed fetches.
    pub fn append_marker(
        &mut self,
        producer_id: i64,
        producer_epoch: i16,
        control: ControlType,
        coordinator_epoch: i32,
        leader_epoch: i32,
        now_ms: i64,
    ) -> Result<AppendInfo> {
        if self.offline {
            return Err(StorageError::LogOffline(self.dir.clone()));
        }
        self.sync_leader_epochs()?;
        self.producers
            .validate_marker(producer_id, producer_epoch)?;
        let mut batch = end_txn_marker_batch(
            producer_id,
            producer_epoch,
            control,
            coordinator_epoch,
            now_ms,
        );
        self.maybe_roll(batch.len() as u64, 1, now_ms)?;
        let base_offset = self.log_end_offset();
        if leader_epoch >= 0 {
            self.assign_leader_epoch(leader_epoch, base_offset)?;
        }
        assign_offset_and_epoch(&mut batch, base_offset, leader_epoch);
        self.write_active(&batch, now_ms)?;
        assert_eq!(
            self.log_end_offset(),
            base_offset + 1,
            "offsets must stay dense"
        );
        self.producers
            .complete_txn(producer_id, producer_epoch, control, base_offset, now_ms);
        self.unflushed_messages += 1;
        self.first_unflushed_ms.get_or_insert(now_ms);
        if self.unflushed_messages >= self.config.flush_messages {
            self.flush()?;
        }
        Ok(AppendInfo {
            base_offset,
            last_offset: base_offset,
            log_append_time_ms: -1,
            log_start_offset: self.log_start_offset,
            record_count: 1,
            duplicate: false,
        })
    }

    /// Offset of the first batch of the earliest open transaction (the last stable
    /// offset is at most this), `None` when none is open.
    pub fn first_unstable_offset(&self) -> Option<i64> {
        self.producers.first_unstable_offset()
    }

    /// The aborted transactions a read_committed fetch from `fetch_offset` needs, up to
    /// `upper_bound` (exclusive).
    pub fn aborted_txns(&self, fetch_offset: i64, upper_bound: i64) -> Vec<AbortedTxn> {
        self.producers.aborted_in_range(fetch_offset, upper_bound)
    }

    /// Writes already-offset batches at the end of the active segment and indexes them.
    fn write_active(&mut self, buf: &[u8], now_ms: i64) -> Result<()> {
        let interval = self.config.index_interval_bytes;
        let seg = self.active_mut();
        let start = seg.size;
        // Nothing is written when the file cannot be (re)opened: nothing to undo.
        let file = seg.file.get()?;
        if let Err(e) = file.write_all_at(buf, start) {
            // Nothing partial may stay behind: cut back to the last whole batch.
            let err = StorageError::io(&seg.log_path, e);
            if file.set_len(start).is_err() {
                tracing::error!(log = %seg.log_path.display(), "cannot truncate after failed write; log offline");
                self.offline = true;
            }
            return Err(err);
        }
        seg.first_append_ms.get_or_insert(now_ms);
        let mut pos = 0usize;
        for item in BatchIter::new(buf) {
            let (at, header, _) = item?;
            seg.note_batch(start + at as u64, &header, interval);
            pos = at;
        }
        let _ = pos;
        Ok(())
    }

    fn maybe_roll(
        &mut self,
        incoming_bytes: u64,
        incoming_records: i64,
        now_ms: i64,
    ) -> Result<()> {
        let segment_bytes = self.config.segment_bytes.min(SEGMENT_BYTES_MAX);
        let segment_ms = self.config.segment_ms;
        let seg = self.active();
        if seg.is_empty() {
            return Ok(());
        }
        let too_big = seg.size + incoming_bytes > segment_bytes;
        let too_old = seg
            .first_append_ms
            .is_some_and(|t| now_ms - t >= segment_ms);
        let offsets_overflow =
            seg.next_offset + incoming_records - seg.base_offset > i64::from(i32::MAX);
        if too_big || too_old || offsets_overflow {
            self.roll()?;
        }
        Ok(())
    }

    /// Closes the active segment and starts a new one at `log_end_offset`.
    pub fn roll(&mut self) -> Result<()> {
        let base = self.log_end_offset();
        let old = self.active_mut();
        if old.base_offset == base {
            return Ok(()); // Empty active segment: nothing to roll.
        }
        old.write_index_files()?;
        let file = old.file.clone();
        let next_offset = old.next_offset;
        self.pending_syncs.push((file, next_offset));
        let seg = Segment::create(&self.dir, base, &self.files)?;
        self.segments.insert(base, seg);
        // Recovery then replays only the segments after this one (Kafka snapshots at
        // every roll too). Not fsynced: a damaged snapshot fails its CRC and recovery
        // reads from an older one instead.
        self.write_producer_snapshot(base, false);
        Ok(())
    }

    /// Plans a read starting at the batch that holds `fetch_offset`. `None` when the
    /// offset is the log end (nothing to read yet).
    pub fn read_plan(&self, fetch_offset: i64) -> Result<Option<ReadPlan>> {
        let leo = self.log_end_offset();
        if fetch_offset < self.log_start_offset || fetch_offset > leo {
            return Err(StorageError::OffsetOutOfRange {
                offset: fetch_offset,
                log_start_offset: self.log_start_offset,
                log_end_offset: leo,
            });
        }
        if fetch_offset == leo {
            return Ok(None);
        }
        let seg = self
            .segments
            .range(..=fetch_offset)
            .next_back()
            .map(|(_, s)| s)
            .filter(|s| fetch_offset < s.next_offset)
            .or_else(|| self.segments.range(fetch_offset..).next().map(|(_, s)| s));
        let Some(seg) = seg else { return Ok(None) };
        Ok(Some(ReadPlan {
            // The plan holds its own descriptor: eviction cannot close it under the read.
            file: seg.file.get()?,
            path: seg.log_path.clone(),
            start_position: seg.lookup(fetch_offset),
            end_position: seg.size,
            fetch_offset,
            index_interval_bytes: self.config.index_interval_bytes,
            max_offset: i64::MAX,
        }))
    }

    /// Plans the scan for the first batch whose max timestamp is >= `timestamp`.
    pub fn time_plan(&self, timestamp: i64) -> Result<Option<ReadPlan>> {
        let Some(seg) = self
            .segments
            .values()
            .find(|s| !s.is_empty() && s.max_timestamp >= timestamp)
        else {
            return Ok(None);
        };
        Ok(Some(ReadPlan {
            file: seg.file.get()?,
            path: seg.log_path.clone(),
            start_position: seg.lookup_time(timestamp),
            end_position: seg.size,
            fetch_offset: self.log_start_offset.max(seg.base_offset),
            index_interval_bytes: self.config.index_interval_bytes,
            max_offset: i64::MAX,
        }))
    }

    /// The largest timestamp in the log and the batch that holds it (ListOffsets -3, KIP-734).
    pub fn max_timestamp(&self) -> i64 {
        self.segments
            .values()
            .map(|s| s.max_timestamp)
            .max()
            .unwrap_or(-1)
    }

    /// Moves `log_start_offset` forward (DeleteRecords). Whole segments below it go at
    /// the next [`Self::tick`].
    pub fn advance_log_start_offset(&mut self, offset: i64) -> Result<i64> {
        let leo = self.log_end_offset();
        if offset < 0 || offset > leo {
            return Err(StorageError::OffsetOutOfRange {
                offset,
                log_start_offset: self.log_start_offset,
                log_end_offset: leo,
            });
        }
        if offset > self.log_start_offset {
            self.log_start_offset = offset;
            self.write_checkpoint()?;
            self.delete_segments_below_start()?;
        }
        Ok(self.log_start_offset)
    }

    fn delete_segments_below_start(&mut self) -> Result<usize> {
        let mut deleted = 0;
        while self.segments.len() > 1 {
            let Some((&base, seg)) = self.segments.iter().next() else {
                break;
            };
            if seg.next_offset > self.log_start_offset {
                break;
            }
            seg.delete_files()?;
            self.segments.remove(&base);
            deleted += 1;
        }
        if deleted > 0 {
            self.delete_snapshots_below_first_segment();
        }
        Ok(deleted)
    }

    /// Periodic work: roll by age, retention by time and size, flush by time.
    /// Returns the number of segments deleted.
    pub fn tick(&mut self, now_ms: i64) -> Result<usize> {
        if self.offline {
            return Ok(0);
        }
        self.maybe_roll(0, 0, now_ms)?;
        let mut deleted = 0;
        if self.config.retention_ms >= 0 {
            let limit = now_ms - self.config.retention_ms;
            while let Some(oldest) = self.segments.values_mut().next() {
                if oldest.is_empty() || oldest.retention_timestamp()? >= limit {
                    break;
                }
                if self.segments.len() == 1 {
                    self.roll()?; // Kafka rolls so that an expired active segment can go.
                }
                deleted += self.delete_oldest()?;
            }
        }
        if self.config.retention_bytes >= 0 {
            let limit = self.config.retention_bytes as u64;
            while self.segments.len() > 1 {
                let Some(oldest) = self.segments.values().next() else {
                    break;
                };
                if self.size_bytes() - oldest.size < limit {
                    break;
                }
                deleted += self.delete_oldest()?;
            }
        }
        deleted += self.delete_segments_below_start()?;
        self.producers.remove_aborted_below(self.log_start_offset);
        let expired = self
            .producers
            .remove_expired(now_ms, self.config.producer_id_expiration_ms);
        if expired > 0 {
            tracing::debug!(log = %self.dir.display(), expired, "expired idle producers");
        }
        if self.config.flush_ms >= 0
            && self
                .first_unflushed_ms
                .is_some_and(|t| now_ms - t >= self.config.flush_ms)
        {
            self.flush()?;
        }
        Ok(deleted)
    }

    fn delete_oldest(&mut self) -> Result<usize> {
        if self.segments.len() <= 1 {
            return Ok(0);
        }
        let Some((&base, seg)) = self.segments.iter().next() else {
            return Ok(0);
        };
        let next_offset = seg.next_offset;
        seg.delete_files()?;
        self.segments.remove(&base);
        self.delete_snapshots_below_first_segment();
        let new_start = self.segments.keys().next().copied().unwrap_or(next_offset);
        if new_start > self.log_start_offset {
            self.log_start_offset = new_start;
            self.write_checkpoint()?;
        }
        Ok(1)
    }

    /// Compaction: rewrites every closed segment keeping only the batches `keep`
    /// accepts. Offsets do not change, so a compacted log has gaps, as in Kafka; readers
    /// skip them. Each segment is replaced by an atomic rename of a fully written and
    /// fsynced `.cleaned` file, so a crash leaves either the old or the new segment.
    /// The active segment is never touched.
    pub fn compact(&mut self, mut keep: impl FnMut(&[u8]) -> bool) -> Result<CompactReport> {
        // Gaps in a log not marked compacted would be truncated as damage at recovery.
        assert!(
            self.config.compacted,
            "compact() on a log not configured as compacted"
        );
        let mut report = CompactReport::default();
        let active_base = self.active().base_offset;
        let bases: Vec<i64> = self
            .segments
            .keys()
            .copied()
            .filter(|b| *b != active_base)
            .collect();
        for base in bases {
            let Some(seg) = self.segments.get(&base) else {
                continue;
            };
            let raw = FileRegion {
                file: seg.file.get()?,
                path: seg.log_path.clone(),
                position: 0,
                len: seg.size,
                prefetched: None,
            }
            .read()?;
            let mut kept = Vec::with_capacity(raw.len());
            for item in BatchIter::new(&raw) {
                let (at, _, batch) = item.map_err(|e| StorageError::Corruption {
                    path: seg.log_path.clone(),
                    position: 0,
                    reason: e.to_string(),
                })?;
                // The CRC is checked after the read, before the batch is copied on.
                crate::batch::validate_batch(batch).map_err(|e| StorageError::Corruption {
                    path: seg.log_path.clone(),
                    position: at as u64,
                    reason: e.to_string(),
                })?;
                if keep(batch) {
                    kept.extend_from_slice(batch);
                }
            }
            report.bytes_before += raw.len() as u64;
            report.bytes_after += kept.len() as u64;
            if kept.len() == raw.len() {
                continue;
            }
            report.segments += 1;
            let log_path = seg.log_path.clone();
            if kept.is_empty() {
                seg.delete_files()?;
                self.segments.remove(&base);
                continue;
            }
            // Compacted: offsets have gaps, so not dense.
            let new_seg = self.replace_segment_file(log_path, base, &kept, false)?;
            self.segments.insert(base, new_seg);
        }
        Ok(report)
    }

    /// Records that `epoch` starts at `start_offset` and, if that changed the history,
    /// writes the checkpoint (fsynced) before returning.
    fn assign_leader_epoch(&mut self, epoch: i32, start_offset: i64) -> Result<()> {
        let changed = self
            .leader_epochs
            .assign(epoch, start_offset)
            .map_err(|source| StorageError::LeaderEpoch {
                path: self.dir.clone(),
                source,
            })?;
        if changed {
            self.write_leader_epochs()?;
        }
        Ok(())
    }

    /// This replica became leader of `epoch`: the epoch starts at the log end offset,
    /// recorded durably now (Kafka's `makeLeader`), so that OffsetForLeaderEpoch answers
    /// a follower about the new epoch before its first append.
    pub fn begin_leader_epoch(&mut self, epoch: i32) -> Result<()> {
        let leo = self.log_end_offset();
        self.assign_leader_epoch(epoch, leo)
    }

    fn write_leader_epochs(&self) -> Result<()> {
        let entries: Vec<EpochEntry> = self
            .leader_epochs
            .entries()
            .iter()
            .map(|&(epoch, start_offset)| EpochEntry {
                epoch,
                start_offset,
            })
            .collect();
        write_leader_epoch_checkpoint(&self.dir, &entries)
    }

    /// Loads `leader-epoch-checkpoint` at open. Entries at or past the log end go (the
    /// checkpoint is written before an epoch's first append, which a crash may have
    /// lost). A log with records but no checkpoint (written before the file existed)
    /// gets its history from the batch headers, once.
    fn load_leader_epochs(&mut self) -> Result<()> {
        let leo = self.log_end_offset();
        let entries = read_leader_epoch_checkpoint(&self.dir)?;
        let missing = entries.is_empty()
            && !self
                .dir
                .join(crate::leader_epoch::LEADER_EPOCH_CHECKPOINT_FILE)
                .exists();
        let cache =
            LeaderEpochCache::from_entries(entries.iter().map(|e| (e.epoch, e.start_offset)))
                .map_err(|source| StorageError::LeaderEpoch {
                    path: self.dir.clone(),
                    source,
                })?;
        self.leader_epochs = cache;
        if missing && leo > self.log_start_offset {
            for seg in self.segments.values() {
                scan_leader_epochs(seg, &mut self.leader_epochs).map_err(|e| match e {
                    ScanError::Storage(e) => e,
                    ScanError::Epoch(source) => StorageError::LeaderEpoch {
                        path: seg.log_path.clone(),
                        source,
                    },
                })?;
            }
            self.write_leader_epochs()?;
        } else if self.leader_epochs.truncate_from_end(leo) {
            self.leader_epochs_unsynced = true;
        }
        Ok(())
    }

    /// Rewrites the checkpoint if open dropped entries from it (see `leader_epochs_unsynced`).
    fn sync_leader_epochs(&mut self) -> Result<()> {
        if self.leader_epochs_unsynced {
            self.write_leader_epochs()?;
            self.leader_epochs_unsynced = false;
        }
        Ok(())
    }

    /// Appends batches exactly as the leader wrote them (a follower's append): offsets,
    /// leader epochs, timestamps and every other byte unchanged. Each batch is checked
    /// (magic 2, length, CRC-32C) and the offsets must continue this log: the first batch
    /// starts at the log end offset (a compacted log may skip offsets, never go back).
    /// A batch of a newer leader epoch is recorded in the epoch history, durably, before
    /// the write.
    pub fn append_as_follower(&mut self, records: &[u8], now_ms: i64) -> Result<AppendInfo> {
        if self.offline {
            return Err(StorageError::LogOffline(self.dir.clone()));
        }
        self.sync_leader_epochs()?;
        let leo = self.log_end_offset();
        let non_contiguous = |reason: String| StorageError::NonContiguousFollowerAppend {
            log_end_offset: leo,
            reason,
        };
        let mut next = leo;
        let mut base_offset = None;
        let mut epochs: Vec<(i32, i64)> = Vec::new();
        let mut record_count = 0i64;
        let mut iter = BatchIter::new(records);
        for item in iter.by_ref() {
            let (_, _, batch) = item?;
            let header = validate_batch(batch)?;
            if header.last_offset_delta < 0 {
                return Err(BatchError::BadRecordCount {
                    record_count: header.record_count,
                    last_offset_delta: header.last_offset_delta,
                }
                .into());
            }
            let dense = !self.config.compacted;
            if header.base_offset < next || (dense && header.base_offset != next) {
                return Err(non_contiguous(format!(
                    "batch at offset {} where offset {next} was expected",
                    header.base_offset
                )));
            }
            base_offset.get_or_insert(header.base_offset);
            let epoch = header.partition_leader_epoch;
            if epoch >= 0
                && epochs.last().map_or(
                    self.leader_epochs.latest_epoch() != Some(epoch),
                    |&(e, _)| e != epoch,
                )
            {
                epochs.push((epoch, header.base_offset));
            }
            record_count += i64::from(header.last_offset_delta) + 1;
            next = header.last_offset() + 1;
        }
        if iter.position() != records.len() {
            return Err(BatchError::Truncated {
                have: records.len() - iter.position(),
                need: HEADER_BYTES,
            }
            .into());
        }
        let Some(base_offset) = base_offset else {
            return Err(BatchError::Truncated {
                have: 0,
                need: HEADER_BYTES,
            }
            .into());
        };
        self.maybe_roll(records.len() as u64, next - leo, now_ms)?;
        for (epoch, start_offset) in epochs {
            self.assign_leader_epoch(epoch, start_offset)?;
        }
        self.write_active(records, now_ms)?;
        assert_eq!(
            self.log_end_offset(),
            next,
            "follower offsets as the leader's"
        );
        for item in BatchIter::new(records) {
            let (_, header, batch) = item?;
            fold_batch(&mut self.producers, &header, Some(batch));
        }
        self.unflushed_messages += record_count as u64;
        self.first_unflushed_ms.get_or_insert(now_ms);
        if self.unflushed_messages >= self.config.flush_messages {
            self.flush()?;
        }
        Ok(AppendInfo {
            base_offset,
            last_offset: next - 1,
            log_append_time_ms: -1,
            log_start_offset: self.log_start_offset,
            record_count,
            duplicate: false,
        })
    }

    /// Removes every record at or after `offset` (a follower's truncation, KIP-101), and
    /// the epochs and producer state that described them. Returns whether anything was
    /// removed. The log then ends at `offset`, or at the start of the batch holding it.
    ///
    /// Zero-copy safety: a `FileRegion` handed to `sendfile` after the lock is released
    /// must never see bytes change under it. So bytes are never cut in place: segments
    /// wholly at or after `offset` are unlinked (open handles keep their inode), and the
    /// segment that holds `offset` is replaced by a new file with its kept prefix,
    /// fsynced and renamed over it, as compaction does. New appends go to the new inode;
    /// a region planned before sees the old file to its old end.
    pub fn truncate_to(&mut self, offset: i64) -> Result<bool> {
        let leo = self.log_end_offset();
        if offset >= leo {
            // No record goes, but epochs starting at the log end do (Kafka's
            // `UnifiedLog.truncateTo`): a replica that became leader (its epoch assigned at
            // the log end) and lost leadership before appending keeps an epoch no record
            // has; as its `LastFetchedEpoch` every fetch would diverge at the same offset,
            // forever (found by ferrite-sim, seed 5).
            if self.leader_epochs.truncate_from_end(leo) || self.leader_epochs_unsynced {
                self.write_leader_epochs()?;
                self.leader_epochs_unsynced = false;
            }
            return Ok(false);
        }
        if offset <= self.log_start_offset {
            self.truncate_fully_and_start_at(offset.max(0))?;
            return Ok(true);
        }
        let dense = !self.config.compacted;
        let doomed: Vec<i64> = self.segments.range(offset..).map(|(b, _)| *b).collect();
        for base in doomed {
            if let Some(seg) = self.segments.remove(&base) {
                seg.delete_files()?;
            }
        }
        if let Some((&base, seg)) = self.segments.iter().next_back() {
            if seg.next_offset > offset {
                // Where the first batch holding `offset` or later starts.
                let cut = batch_position_at(seg, offset)?;
                let kept = FileRegion {
                    file: seg.file.get()?,
                    path: seg.log_path.clone(),
                    position: 0,
                    len: cut,
                    prefetched: None,
                }
                .read()?;
                let log_path = seg.log_path.clone();
                let new_seg = self.replace_segment_file(log_path, base, &kept, dense)?;
                self.segments.insert(base, new_seg);
            }
        }
        if self.segments.is_empty() {
            let seg = Segment::create(&self.dir, offset, &self.files)?;
            self.segments.insert(offset, seg);
        }
        self.after_truncation()?;
        Ok(true)
    }

    /// Replaces the segment file at `log_path` with `kept` (whole batches) without ever
    /// cutting bytes in place: a `.cleaned` copy is written and fsynced, renamed over the
    /// original and the directory fsynced, so a crash leaves the old or the new file
    /// (open removes a leftover `.cleaned`); regions planned on the old inode stay valid.
    /// The new segment is opened by a full scan and its indexes written.
    fn replace_segment_file(
        &self,
        log_path: PathBuf,
        base: i64,
        kept: &[u8],
        dense: bool,
    ) -> Result<Segment> {
        let cleaned = log_path.with_extension("cleaned");
        {
            let mut f = File::create(&cleaned).map_err(|e| StorageError::io(&cleaned, e))?;
            std::io::Write::write_all(&mut f, kept).map_err(|e| StorageError::io(&cleaned, e))?;
            f.sync_all().map_err(|e| StorageError::io(&cleaned, e))?;
        }
        std::fs::rename(&cleaned, &log_path).map_err(|e| StorageError::io(&log_path, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StorageError::io(&self.dir, e))?;
        let interval = self.config.index_interval_bytes;
        let (mut seg, outcome) = Segment::open(log_path, base, true, interval, dense, &self.files)?;
        assert_eq!(
            outcome.truncated_bytes, 0,
            "a freshly written copy of whole batches must scan clean"
        );
        seg.write_index_files()?;
        Ok(seg)
    }

    /// Empties the log and makes it start at `offset` (a follower whose log is entirely
    /// below, or entirely beyond, the leader's: Kafka's `truncateFullyAndStartAt`).
    /// Segments are unlinked, never cut, so zero-copy regions in flight stay valid.
    pub fn truncate_fully_and_start_at(&mut self, offset: i64) -> Result<()> {
        assert!(offset >= 0);
        for (_, seg) in std::mem::take(&mut self.segments) {
            seg.delete_files()?;
        }
        let seg = Segment::create(&self.dir, offset, &self.files)?;
        self.segments.insert(offset, seg);
        self.log_start_offset = offset;
        // No record is left, so no epoch describes any (Kafka's `clearAndFlush`).
        self.leader_epochs = LeaderEpochCache::new();
        self.write_leader_epochs()?;
        self.after_truncation()
    }

    /// The log end moved back: the recovery point, the producer state (rebuilt from the
    /// snapshots that are still below the log end) and the epoch history follow it.
    fn after_truncation(&mut self) -> Result<()> {
        let leo = self.log_end_offset();
        self.log_start_offset = self.log_start_offset.min(leo);
        self.recovery_point = self.recovery_point.min(leo);
        self.unflushed_messages = 0;
        self.first_unflushed_ms = None;
        self.write_checkpoint()?;
        self.producers = ProducerStateManager::default();
        self.load_producer_state(&mut OpenReport::default())?;
        if self.leader_epochs.truncate_from_end(leo) || self.leader_epochs_unsynced {
            self.write_leader_epochs()?;
            self.leader_epochs_unsynced = false;
        }
        Ok(())
    }

    /// Files of rolled segments that still need an fsync; the caller syncs them outside
    /// the lock and reports back with [`Self::mark_synced`].
    pub fn take_pending_syncs(&mut self) -> Vec<(SegmentFile, i64)> {
        std::mem::take(&mut self.pending_syncs)
    }

    pub fn mark_synced(&mut self, up_to_offset: i64) -> Result<()> {
        if up_to_offset > self.recovery_point {
            self.recovery_point = up_to_offset;
            self.write_checkpoint()?;
        }
        Ok(())
    }

    /// fsyncs everything appended so far.
    pub fn flush(&mut self) -> Result<()> {
        for (file, _) in std::mem::take(&mut self.pending_syncs) {
            file.sync_data()?;
        }
        let seg = self.active();
        seg.file
            .get()?
            .sync_data()
            .map_err(|e| StorageError::io(&seg.log_path, e))?;
        self.unflushed_messages = 0;
        self.first_unflushed_ms = None;
        let leo = self.log_end_offset();
        self.mark_synced(leo)
    }

    /// Flushes data and writes the active segment's indexes, for a clean shutdown.
    pub fn close(&mut self) -> Result<()> {
        self.flush()?;
        self.active_mut().write_index_files()?;
        self.snapshot_at_close(true);
        self.write_checkpoint()
    }

    /// First half of a fast clean shutdown: writes the active segment's indexes without
    /// fsyncing anything. The caller makes the files durable at once (`syncfs`), then
    /// calls [`PartitionLog::mark_closed`].
    pub fn close_unsynced(&mut self) -> Result<()> {
        self.pending_syncs.clear();
        self.active_mut().write_index_files_synced(false)?;
        // Made durable by the caller's `syncfs` with the rest.
        self.snapshot_at_close(false);
        Ok(())
    }

    /// A snapshot at the log end, so that a clean start reads no batch to rebuild the
    /// producer state. An idle partition has one already and writes nothing; nor does
    /// one whose start would replay only the active segment while that segment's index
    /// holds at most its first entry (a few KiB of batch headers, no more than reading
    /// the snapshot): creating the file is what a shutdown of many small partitions
    /// waited on.
    fn snapshot_at_close(&mut self, sync: bool) {
        let leo = self.log_end_offset();
        if self.snapshots.contains(&leo) {
            return;
        }
        let first_base = self.segments.keys().next().copied().unwrap_or(0);
        let replay_from = self
            .snapshots
            .range(..=leo)
            .next_back()
            .copied()
            .unwrap_or(first_base)
            .max(first_base);
        let active = self.active();
        if replay_from >= active.base_offset && active.index.len() <= 1 {
            return;
        }
        self.write_producer_snapshot(leo, sync);
    }

    /// Second half: everything is on disk, so the recovery point is the log end. Not
    /// written to the checkpoint: the caller's clean-shutdown marker says it for every
    /// log at once, and the next clean open takes the log end as its recovery point.
    pub fn mark_closed(&mut self) {
        self.unflushed_messages = 0;
        self.first_unflushed_ms = None;
        self.recovery_point = self.log_end_offset();
    }

    /// Deletes the whole partition directory (DeleteTopics).
    pub fn delete(self) -> Result<()> {
        std::fs::remove_dir_all(&self.dir).map_err(|e| StorageError::io(&self.dir, e))
    }

    fn snapshot_path(&self, offset: i64) -> PathBuf {
        self.dir.join(segment_file_name(offset, SNAPSHOT_SUFFIX))
    }

    /// Writes the producer state as of `offset` (which must be the log end offset) to
    /// `<offset>.snapshot`, through a temporary file and a rename. A failure is logged
    /// and otherwise ignored: the snapshot only shortens recovery, the log is the truth.
    fn write_producer_snapshot(&mut self, offset: i64, sync: bool) {
        assert_eq!(
            offset,
            self.log_end_offset(),
            "a snapshot is taken at the log end"
        );
        let path = self.snapshot_path(offset);
        let tmp = path.with_extension(format!("{SNAPSHOT_SUFFIX}.tmp"));
        let bytes = self.producers.encode_snapshot(offset);
        match write_and_rename(&tmp, &path, &bytes, sync) {
            Ok(()) => {
                self.snapshots.insert(offset);
            }
            Err(e) => {
                tracing::warn!(snapshot = %path.display(), error = %e, "cannot write producer state snapshot");
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }

    /// Snapshots below the oldest segment describe batches that are gone; the newest
    /// snapshot is never among them (every roll writes one at the new segment's base).
    fn delete_snapshots_below_first_segment(&mut self) {
        let first_base = self.segments.keys().next().copied().unwrap_or(0);
        let stale: Vec<i64> = self.snapshots.range(..first_base).copied().collect();
        for offset in stale {
            let path = self.snapshot_path(offset);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(snapshot = %path.display(), error = %e, "cannot delete producer state snapshot");
                    continue;
                }
            }
            self.snapshots.remove(&offset);
        }
    }

    /// Rebuilds the producer state at open: the newest usable snapshot at or below the
    /// log end, then the batch headers after it. Snapshots past the log end (the log was
    /// truncated by recovery after they were taken), below the oldest segment, or
    /// damaged are deleted.
    fn load_producer_state(&mut self, report: &mut OpenReport) -> Result<()> {
        let leo = self.log_end_offset();
        let first_base = self.segments.keys().next().copied().unwrap_or(0);
        let mut loaded: Option<(i64, ProducerStateManager)> = None;
        for offset in self.snapshots.iter().rev().copied().collect::<Vec<_>>() {
            let path = self.snapshot_path(offset);
            let usable = if offset < first_base {
                Err("below the oldest segment".to_string())
            } else if loaded.is_some() {
                continue; // An older snapshot stays as a fallback.
            } else if offset > leo {
                Err(format!("past the log end offset {leo}"))
            } else {
                read_snapshot(&path).and_then(|(at, state)| {
                    if at == offset {
                        Ok(state)
                    } else {
                        Err(format!("says offset {at}, named {offset}"))
                    }
                })
            };
            match usable {
                Ok(state) => loaded = Some((offset, state)),
                Err(reason) => {
                    tracing::warn!(snapshot = %path.display(), %reason, "deleting unusable producer state snapshot");
                    let _ = std::fs::remove_file(&path);
                    self.snapshots.remove(&offset);
                }
            }
        }
        let from = match loaded {
            Some((offset, state)) => {
                self.producers = state;
                report.producer_snapshot_offset = Some(offset);
                offset
            }
            None => first_base,
        };
        let mut replayed = 0;
        for seg in self.segments.values() {
            if seg.next_offset > from {
                replayed += replay_producer_batches(seg, from, &mut self.producers)?;
            }
        }
        report.producer_batches_replayed = replayed;
        Ok(())
    }

    fn write_checkpoint(&self) -> Result<()> {
        let path = self.dir.join(CHECKPOINT_FILE);
        let tmp = self.dir.join(format!("{CHECKPOINT_FILE}.tmp"));
        let body = format!("v1 {} {}\n", self.log_start_offset, self.recovery_point);
        std::fs::write(&tmp, body).map_err(|e| StorageError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| StorageError::io(&path, e))
    }
}

/// `(log_start_offset, recovery_point)`, `None` when there is no checkpoint yet.
fn read_checkpoint(dir: &Path) -> Result<Option<(i64, i64)>> {
    let path = dir.join(CHECKPOINT_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StorageError::io(path, e)),
    };
    let mut parts = text.split_whitespace();
    let parsed = match (parts.next(), parts.next(), parts.next()) {
        (Some("v1"), Some(a), Some(b)) => a.parse().ok().zip(b.parse().ok()),
        _ => None,
    };
    parsed.map(Some).ok_or(StorageError::Corruption {
        path,
        position: 0,
        reason: "bad checkpoint".into(),
    })
}

fn write_and_rename(tmp: &Path, path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    let mut f = File::create(tmp)?;
    std::io::Write::write_all(&mut f, bytes)?;
    if sync {
        f.sync_data()?;
    }
    std::fs::rename(tmp, path)
}

fn read_snapshot(path: &Path) -> std::result::Result<(i64, ProducerStateManager), String> {
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if len > PRODUCER_SNAPSHOT_BYTES_MAX as u64 {
        return Err(format!(
            "{len} bytes, more than {PRODUCER_SNAPSHOT_BYTES_MAX}"
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    ProducerStateManager::decode_snapshot(&bytes).map_err(|e| e.to_string())
}

/// Folds the producer batches of `seg` at or after `from_offset` into `producers`,
/// reading only batch headers. Returns the number of producer batches folded in.
fn replay_producer_batches(
    seg: &Segment,
    from_offset: i64,
    producers: &mut ProducerStateManager,
) -> Result<usize> {
    let corrupt = |position: u64, reason: String| StorageError::Corruption {
        path: seg.log_path.clone(),
        position,
        reason,
    };
    let mut window = vec![0u8; REPLAY_WINDOW_BYTES];
    let (mut window_at, mut window_len) = (0u64, 0usize);
    let mut pos = seg.lookup(from_offset);
    let mut replayed = 0;
    let file = seg.file.get()?;
    while pos < seg.size {
        if seg.size - pos < HEADER_BYTES as u64 {
            return Err(corrupt(
                pos,
                "partial batch header at the segment end".into(),
            ));
        }
        if !(pos >= window_at && pos + HEADER_BYTES as u64 <= window_at + window_len as u64) {
            window_len = (seg.size - pos).min(REPLAY_WINDOW_BYTES as u64) as usize;
            let buf = window.get_mut(..window_len).unwrap_or_default();
            file.read_exact_at(buf, pos)
                .map_err(|e| StorageError::io(&seg.log_path, e))?;
            window_at = pos;
        }
        let at = (pos - window_at) as usize;
        let header = BatchHeader::parse(window.get(at..window_len).unwrap_or_default())
            .map_err(|e| corrupt(pos, e.to_string()))?;
        if header.base_offset >= from_offset && header.producer_id >= 0 {
            let total = header.total_bytes()?;
            // An end-transaction marker is tiny: read it whole for its type.
            let marker = if header.is_control() {
                let mut buf = vec![0u8; total.min(CONTROL_BATCH_READ_BYTES_MAX)];
                file.read_exact_at(&mut buf, pos)
                    .map_err(|e| StorageError::io(&seg.log_path, e))?;
                Some(buf)
            } else {
                None
            };
            fold_batch(producers, &header, marker.as_deref());
            replayed += 1;
        }
        pos += header.total_bytes()? as u64;
    }
    Ok(replayed)
}

/// Bytes read of a control batch at recovery to learn its marker type (a marker is 78
/// bytes; only its first record's key matters).
const CONTROL_BATCH_READ_BYTES_MAX: usize = 4096;

/// Folds one batch that is in the log into the producer state: a data batch with a
/// producer id (sequences, an open transaction), or an end-transaction marker (`batch`
/// holds its bytes; a control batch of another type changes nothing).
fn fold_batch(producers: &mut ProducerStateManager, header: &BatchHeader, batch: Option<&[u8]>) {
    if header.is_control() {
        if let Some(control) = batch.and_then(crate::batch::control_type) {
            producers.complete_txn(
                header.producer_id,
                header.producer_epoch,
                control,
                header.base_offset,
                header.max_timestamp,
            );
        }
    } else if let Some(pb) = ProducerBatch::from_header(header) {
        producers.update(&pb, header.base_offset);
    }
}

enum ScanError {
    Storage(StorageError),
    Epoch(ferrite_replication::ReplicationError),
}

/// Walks the batch headers of `seg` from position `from`, calling `visit` with each header and its
/// position until it returns `false`.
fn walk_headers(
    seg: &Segment,
    from: u64,
    mut visit: impl FnMut(u64, &BatchHeader) -> std::result::Result<bool, ScanError>,
) -> std::result::Result<(), ScanError> {
    let corrupt = |position: u64, reason: String| {
        ScanError::Storage(StorageError::Corruption {
            path: seg.log_path.clone(),
            position,
            reason,
        })
    };
    let mut window = vec![0u8; REPLAY_WINDOW_BYTES];
    let (mut window_at, mut window_len) = (0u64, 0usize);
    let mut pos = from;
    while pos < seg.size {
        if seg.size - pos < HEADER_BYTES as u64 {
            return Err(corrupt(
                pos,
                "partial batch header at the segment end".into(),
            ));
        }
        if !(pos >= window_at && pos + HEADER_BYTES as u64 <= window_at + window_len as u64) {
            window_len = (seg.size - pos).min(REPLAY_WINDOW_BYTES as u64) as usize;
            let buf = window.get_mut(..window_len).unwrap_or_default();
            seg.file
                .get()
                .map_err(ScanError::Storage)?
                .read_exact_at(buf, pos)
                .map_err(|e| ScanError::Storage(StorageError::io(&seg.log_path, e)))?;
            window_at = pos;
        }
        let at = (pos - window_at) as usize;
        let header = BatchHeader::parse(window.get(at..window_len).unwrap_or_default())
            .map_err(|e| corrupt(pos, e.to_string()))?;
        if !visit(pos, &header)? {
            return Ok(());
        }
        pos += header
            .total_bytes()
            .map_err(|e| ScanError::Storage(e.into()))? as u64;
    }
    Ok(())
}

/// Folds the leader epochs of `seg`'s batches into `cache` (a log without checkpoint).
fn scan_leader_epochs(
    seg: &Segment,
    cache: &mut LeaderEpochCache,
) -> std::result::Result<(), ScanError> {
    walk_headers(seg, 0, |_, header| {
        if header.partition_leader_epoch >= 0 {
            cache
                .assign(header.partition_leader_epoch, header.base_offset)
                .map_err(ScanError::Epoch)?;
        }
        Ok(true)
    })
}

/// The position in `seg` of the first batch whose last offset is at least `offset` (or
/// the segment's end).
fn batch_position_at(seg: &Segment, offset: i64) -> Result<u64> {
    let mut found = seg.size;
    // The offset index points at a batch at or before `offset`.
    walk_headers(seg, seg.lookup(offset), |pos, header| {
        if header.last_offset() >= offset {
            found = pos;
            return Ok(false);
        }
        Ok(true)
    })
    .map_err(|e| match e {
        ScanError::Storage(e) => e,
        ScanError::Epoch(source) => StorageError::LeaderEpoch {
            path: seg.log_path.clone(),
            source,
        },
    })?;
    Ok(found)
}

/// Where whole batches lie in one segment file: what a zero-copy fetch hands to
/// `sendfile(2)`. The file handle keeps the bytes readable even if retention or
/// compaction unlinks the segment meanwhile.
#[derive(Debug, Clone)]
pub struct FileRegion {
    pub file: Arc<File>,
    pub path: PathBuf,
    pub position: u64,
    pub len: u64,
    /// The region's bytes when locating it already read them all (small batches fit in
    /// the header window), so that copying it needs no second read. Segment bytes below
    /// the log end are never rewritten in place, so these equal the file's.
    pub prefetched: Option<Bytes>,
}

impl FileRegion {
    /// Copies the region into memory: the path for transports that cannot splice
    /// (and for tests comparing both paths).
    pub fn read(&self) -> Result<Bytes> {
        if let Some(bytes) = &self.prefetched {
            return Ok(bytes.clone());
        }
        let len = usize::try_from(self.len).map_err(|_| StorageError::Corruption {
            path: self.path.clone(),
            position: self.position,
            reason: "region larger than memory".into(),
        })?;
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, self.position)
            .map_err(|e| StorageError::io(&self.path, e))?;
        Ok(Bytes::from(buf))
    }
}

/// Bytes read at a time while walking batch headers to locate a region.
const LOCATE_WINDOW_BYTES: usize = 8 * 1024;

impl ReadPlan {
    /// The plan, reading no batch that starts at or after `max_offset` (the high
    /// watermark of a consumer's fetch: whole batches, which the leader's high watermark
    /// never splits since followers fetch whole batches).
    pub fn up_to(mut self, max_offset: i64) -> ReadPlan {
        self.max_offset = max_offset;
        self
    }

    /// The same batches [`ReadPlan::read`] returns, located by reading only their
    /// headers: nothing of the records is copied into user space.
    pub fn locate(&self, max_bytes: usize, min_one_batch: bool) -> Result<Option<FileRegion>> {
        let corrupt = |position: u64, reason: String| StorageError::Corruption {
            path: self.path.clone(),
            position,
            reason,
        };
        let mut window = vec![0u8; LOCATE_WINDOW_BYTES];
        let (mut window_at, mut window_len) = (0u64, 0usize);
        let mut pos = self.start_position;
        let mut first: Option<u64> = None;
        let mut end = pos;
        let mut last_batch_bytes = 0u64;
        while pos < self.end_position {
            if self.end_position - pos < HEADER_BYTES as u64 {
                return Err(corrupt(
                    pos,
                    "partial batch header at the segment end".into(),
                ));
            }
            let in_window =
                pos >= window_at && pos + HEADER_BYTES as u64 <= window_at + window_len as u64;
            if !in_window {
                // After a large batch the next header is far away: read just the header
                // rather than a window of record bytes that will be skipped.
                let read_bytes = if last_batch_bytes > LOCATE_WINDOW_BYTES as u64 / 2 {
                    HEADER_BYTES
                } else {
                    LOCATE_WINDOW_BYTES
                };
                window_len = (self.end_position - pos).min(read_bytes as u64) as usize;
                let buf = window.get_mut(..window_len).unwrap_or_default();
                self.file
                    .read_exact_at(buf, pos)
                    .map_err(|e| StorageError::io(&self.path, e))?;
                window_at = pos;
            }
            let at = (pos - window_at) as usize;
            let header = BatchHeader::parse(window.get(at..window_len).unwrap_or_default())
                .map_err(|e| corrupt(pos, e.to_string()))?;
            if header.base_offset >= self.max_offset {
                break;
            }
            let total = header.total_bytes()? as u64;
            if pos + total > self.end_position {
                return Err(corrupt(pos, "batch runs past the segment".into()));
            }
            last_batch_bytes = total;
            match first {
                None if header.last_offset() < self.fetch_offset => {}
                None => {
                    if total > max_bytes as u64 && !min_one_batch {
                        return Ok(None);
                    }
                    first = Some(pos);
                    end = pos + total;
                }
                Some(start) => {
                    if end + total - start > max_bytes as u64 {
                        break;
                    }
                    end += total;
                }
            }
            pos += total;
            if let Some(start) = first {
                if end - start >= max_bytes as u64 {
                    break;
                }
            }
        }
        Ok(first.map(|start| {
            let window_end = window_at + window_len as u64;
            let prefetched = (start >= window_at && end <= window_end)
                .then(|| {
                    let from = usize::try_from(start - window_at).ok()?;
                    let to = usize::try_from(end - window_at).ok()?;
                    window.get(from..to).map(Bytes::copy_from_slice)
                })
                .flatten();
            FileRegion {
                file: self.file.clone(),
                path: self.path.clone(),
                position: start,
                len: end - start,
                prefetched,
            }
        }))
    }

    /// Copies whole batches starting with the one holding the plan's fetch offset, up to
    /// `max_bytes`; with `min_one_batch` the first batch is returned even when larger
    /// (Kafka's KIP-74 rule, so that a consumer can always make progress).
    pub fn read(&self, max_bytes: usize, min_one_batch: bool) -> Result<Bytes> {
        self.read_until(max_bytes, min_one_batch, |h| {
            h.last_offset() >= self.fetch_offset
        })
    }

    /// The first whole batch whose max timestamp is at least `timestamp`.
    pub fn read_first_batch_at_time(&self, timestamp: i64) -> Result<Option<Bytes>> {
        let bytes = self.read_until(1, true, |h| {
            h.max_timestamp >= timestamp && h.last_offset() >= self.fetch_offset
        })?;
        Ok(if bytes.is_empty() { None } else { Some(bytes) })
    }

    fn read_until(
        &self,
        max_bytes: usize,
        min_one_batch: bool,
        start_at: impl Fn(&BatchHeader) -> bool,
    ) -> Result<Bytes> {
        let mut pos = self.start_position;
        let chunk_bytes_max = (max_bytes as u64)
            .saturating_add(self.index_interval_bytes)
            .max(HEADER_BYTES as u64);
        loop {
            if pos >= self.end_position {
                return Ok(Bytes::new());
            }
            let len = (self.end_position - pos).min(chunk_bytes_max) as usize;
            let mut chunk = vec![0u8; len];
            self.file
                .read_exact_at(&mut chunk, pos)
                .map_err(|e| StorageError::io(&self.path, e))?;
            let mut skipped = 0usize;
            let mut first: Option<(usize, usize)> = None; // (start, end) of whole batches taken
            let mut at_max_offset = false;
            for item in BatchIter::new(&chunk) {
                let (at, header, batch) = match item {
                    Ok(x) => x,
                    Err(BatchError::Truncated { .. }) => break,
                    Err(e) => {
                        return Err(StorageError::Corruption {
                            path: self.path.clone(),
                            position: pos + skipped as u64,
                            reason: e.to_string(),
                        })
                    }
                };
                if header.base_offset >= self.max_offset {
                    at_max_offset = true;
                    break;
                }
                match first {
                    None if !start_at(&header) => skipped = at + batch.len(),
                    None => first = Some((at, at + batch.len())),
                    Some((s, e)) => {
                        if e + batch.len() - s > max_bytes {
                            break;
                        }
                        first = Some((s, e + batch.len()));
                    }
                }
                if let Some((s, e)) = first {
                    if e - s >= max_bytes {
                        break;
                    }
                }
            }
            if let Some((s, e)) = first {
                if e - s > max_bytes && !min_one_batch {
                    return Ok(Bytes::new());
                }
                return Ok(Bytes::from(chunk).slice(s..e));
            }
            if at_max_offset {
                return Ok(Bytes::new());
            }
            // The batch we need starts at `skipped` but is not whole in the chunk.
            let next_pos = pos + skipped as u64;
            let header_bytes = chunk.get(skipped..).unwrap_or_default();
            let header = match BatchHeader::parse(header_bytes) {
                Ok(h) => Some(h),
                Err(_)
                    if next_pos + (HEADER_BYTES as u64) <= self.end_position
                        && header_bytes.len() < HEADER_BYTES =>
                {
                    None
                }
                Err(e) => {
                    return Err(StorageError::Corruption {
                        path: self.path.clone(),
                        position: next_pos,
                        reason: e.to_string(),
                    })
                }
            };
            match header {
                Some(h) if h.base_offset >= self.max_offset => return Ok(Bytes::new()),
                Some(h) if start_at(&h) => {
                    let total = h.total_bytes()? as u64;
                    if total as usize > max_bytes && !min_one_batch {
                        return Ok(Bytes::new());
                    }
                    if next_pos + total > self.end_position {
                        return Err(StorageError::Corruption {
                            path: self.path.clone(),
                            position: next_pos,
                            reason: "batch runs past the segment".into(),
                        });
                    }
                    let mut whole = vec![0u8; total as usize];
                    self.file
                        .read_exact_at(&mut whole, next_pos)
                        .map_err(|e| StorageError::io(&self.path, e))?;
                    return Ok(Bytes::from(whole));
                }
                Some(h) => pos = next_pos + h.total_bytes()? as u64,
                None => pos = next_pos,
            }
            if pos == self.start_position && skipped == 0 && header.is_none() {
                return Ok(Bytes::new());
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::batch::validate_batch;
    use crate::test_support::make_batch;

    fn cfg() -> LogConfig {
        LogConfig {
            segment_bytes: 4096,
            index_interval_bytes: 256,
            ..LogConfig::default()
        }
    }

    fn offsets_in(bytes: &[u8]) -> Vec<i64> {
        BatchIter::new(bytes)
            .map(|b| b.unwrap().1)
            .flat_map(|h| h.base_offset..=h.last_offset())
            .collect()
    }

    /// Zero-copy fetch sends `locate`'s region; it must be exactly what `read` copies.
    #[test]
    fn locate_matches_read_for_every_offset_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 64 * 1024,
            ..cfg()
        };
        let (mut log, _) = PartitionLog::open(dir.path(), config, true).unwrap();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for i in 0..120 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            // Mostly small batches (several headers per locate window), some larger than
            // half a window (header-only reads).
            let size = if rng.is_multiple_of(5) {
                rng % 9000
            } else {
                rng % 700
            };
            let value = vec![b'v'; size as usize];
            let records = 1 + (rng % 4) as i32;
            log.append(&make_batch(records, 1000 + i, &value), 1, 0)
                .unwrap();
        }
        let leo = log.log_end_offset();
        let mut prefetched = 0;
        for fetch_offset in 0..leo {
            let plan = log.read_plan(fetch_offset).unwrap().unwrap();
            for max_bytes in [0, 1, 61, 200, 700, 1500, 4096, 20_000, usize::MAX] {
                for min_one in [false, true] {
                    let copied = plan.read(max_bytes, min_one).unwrap();
                    let region = plan.locate(max_bytes, min_one).unwrap();
                    let located = region
                        .clone()
                        .map(|r| r.read().unwrap())
                        .unwrap_or_default();
                    assert_eq!(
                        copied, located,
                        "fetch_offset {fetch_offset} max_bytes {max_bytes} min_one {min_one}"
                    );
                    // The bytes handed over from the locate window equal the file's.
                    if let Some(mut r) = region.filter(|r| r.prefetched.is_some()) {
                        prefetched += 1;
                        r.prefetched = None;
                        assert_eq!(r.read().unwrap(), copied, "fetch_offset {fetch_offset}");
                    }
                }
            }
        }
        assert!(
            prefetched > 0,
            "no small region was handed over from its window"
        );
    }

    #[test]
    fn append_read_roll_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = PartitionLog::open(dir.path(), cfg(), true).unwrap();
        for i in 0..100 {
            let info = log
                .append(&make_batch(3, 1000 + i, b"0123456789"), 5, 0)
                .unwrap();
            assert_eq!(info.base_offset, i * 3);
            assert_eq!(info.last_offset, i * 3 + 2);
        }
        assert!(log.segment_count() > 1, "small segment.bytes rolls");
        for start in [0, 1, 2, 3, 150, 299] {
            let plan = log.read_plan(start).unwrap().unwrap();
            let bytes = plan.read(1_000_000, true).unwrap();
            let offs = offsets_in(&bytes);
            assert!(
                offs[0] <= start && offs.contains(&start),
                "start {start} got {offs:?}"
            );
            let h = validate_batch(
                &bytes[..bytes.len().min(bytes.len())]
                    [..BatchHeader::parse(&bytes).unwrap().total_bytes().unwrap()],
            )
            .unwrap();
            assert_eq!(h.partition_leader_epoch, 5);
        }
        assert!(log.read_plan(300).unwrap().is_none());
        assert!(matches!(
            log.read_plan(301),
            Err(StorageError::OffsetOutOfRange { .. })
        ));
        log.close().unwrap();
        drop(log);
        for clean in [true, false] {
            let (log, _) = PartitionLog::open(dir.path(), cfg(), clean).unwrap();
            assert_eq!(log.log_end_offset(), 300);
            let all = log.read_plan(0).unwrap().unwrap().read(100, true).unwrap();
            assert_eq!(offsets_in(&all)[0], 0);
        }
    }

    /// A clean shutdown of a partition with nothing new since its open writes no index
    /// file (19,000 idle partitions, issue 14); one with new batches writes them again,
    /// and either way the next open finds the whole log.
    #[test]
    fn an_idle_close_rewrites_no_index_file_and_a_written_one_does() {
        let dir = tempfile::tempdir().unwrap();
        let close = |log: &mut PartitionLog| {
            log.close_unsynced().unwrap();
            log.mark_closed();
        };
        let (mut log, _) = PartitionLog::open(dir.path(), cfg(), true).unwrap();
        for i in 0..20 {
            log.append(&make_batch(3, 1000 + i, b"0123456789"), 1, 0)
                .unwrap();
        }
        assert_eq!(log.segment_count(), 1);
        close(&mut log);
        drop(log);
        let index = dir.path().join(segment_file_name(0, INDEX_SUFFIX));
        let time_index = dir.path().join(segment_file_name(0, TIME_INDEX_SUFFIX));
        assert!(index.exists() && time_index.exists());

        // Idle: the files read at open are still what the log holds, so none is written
        // (removed here behind the log's back to see that).
        let (mut log, _) = PartitionLog::open(dir.path(), cfg(), true).unwrap();
        std::fs::remove_file(&index).unwrap();
        std::fs::remove_file(&time_index).unwrap();
        close(&mut log);
        drop(log);
        assert!(!index.exists() && !time_index.exists());

        // Missing index files are rebuilt from the log at open, and written at close.
        let (mut log, _) = PartitionLog::open(dir.path(), cfg(), true).unwrap();
        assert_eq!(log.log_end_offset(), 60);
        close(&mut log);
        drop(log);
        assert!(index.exists() && time_index.exists());

        // Written since the open: the indexes are written again.
        let (mut log, _) = PartitionLog::open(dir.path(), cfg(), true).unwrap();
        std::fs::remove_file(&index).unwrap();
        std::fs::remove_file(&time_index).unwrap();
        log.append(&make_batch(3, 2000, b"0123456789"), 1, 0)
            .unwrap();
        close(&mut log);
        drop(log);
        assert!(index.exists() && time_index.exists());
        for clean in [true, false] {
            let (log, _) = PartitionLog::open(dir.path(), cfg(), clean).unwrap();
            assert_eq!(log.log_end_offset(), 63);
            let all = log
                .read_plan(0)
                .unwrap()
                .unwrap()
                .read(100_000, true)
                .unwrap();
            assert_eq!(offsets_in(&all), (0..63).collect::<Vec<_>>());
            let tail = log
                .read_plan(61)
                .unwrap()
                .unwrap()
                .read(100_000, true)
                .unwrap();
            assert_eq!(offsets_in(&tail), vec![60, 61, 62]);
            let plan = log.time_plan(2000).unwrap().unwrap();
            let batch = plan.read_first_batch_at_time(2000).unwrap().unwrap();
            assert_eq!(BatchHeader::parse(&batch).unwrap().base_offset, 60);
            assert_eq!(log.max_timestamp(), 2002, "three records from 2000");
        }
    }

    #[test]
    fn max_bytes_smaller_than_batch_returns_one_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = PartitionLog::open(dir.path(), LogConfig::default(), true).unwrap();
        log.append(&make_batch(10, 0, &[7u8; 500]), 0, 0).unwrap();
        let plan = log.read_plan(0).unwrap().unwrap();
        let one = plan.read(10, true).unwrap();
        assert_eq!(offsets_in(&one).len(), 10);
        assert!(plan.read(10, false).unwrap().is_empty());
    }

    #[test]
    fn bad_batch_appends_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = PartitionLog::open(dir.path(), LogConfig::default(), true).unwrap();
        let good = make_batch(2, 0, b"ok");
        let mut bad = make_batch(2, 0, b"no");
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let mut both = good.clone();
        both.extend_from_slice(&bad);
        assert!(matches!(
            log.append(&both, 0, 0),
            Err(StorageError::CorruptBatch(_))
        ));
        assert_eq!(log.log_end_offset(), 0);
        assert_eq!(log.size_bytes(), 0);
        let big = make_batch(1, 0, &vec![0u8; 2_000_000]);
        assert!(matches!(
            log.append(&big, 0, 0),
            Err(StorageError::MessageTooLarge { .. })
        ));
    }

    #[test]
    fn retention_by_size_time_and_delete_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg();
        c.retention_bytes = 8192;
        let (mut log, _) = PartitionLog::open(dir.path(), c, true).unwrap();
        for i in 0..200 {
            log.append(&make_batch(1, i, &[1u8; 100]), 0, 0).unwrap();
        }
        log.tick(0).unwrap();
        assert!(log.size_bytes() < 8192 + 4096);
        assert!(log.log_start_offset() > 0);
        assert!(matches!(
            log.read_plan(0),
            Err(StorageError::OffsetOutOfRange { .. })
        ));
        let start = log.advance_log_start_offset(190).unwrap();
        assert_eq!(start, 190);
        let bytes = log
            .read_plan(190)
            .unwrap()
            .unwrap()
            .read(1 << 20, true)
            .unwrap();
        assert_eq!(offsets_in(&bytes)[0], 190);
        // Time: everything has timestamps < 1000, so retention.ms=1 at now=10_000 empties it.
        let mut c2 = log.config().clone();
        c2.retention_ms = 1;
        log.set_config(c2);
        log.tick(10_000).unwrap();
        assert_eq!(log.log_start_offset(), 200);
        assert_eq!(log.log_end_offset(), 200);
        log.append(&make_batch(1, 20_000, b"after"), 0, 10_000)
            .unwrap();
        assert_eq!(log.log_end_offset(), 201);
        drop(log);
        let (log, _) = PartitionLog::open(dir.path(), cfg(), false).unwrap();
        assert_eq!(log.log_start_offset(), 200);
        assert_eq!(log.log_end_offset(), 201);
    }

    #[test]
    fn compaction_keeps_chosen_batches_and_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = PartitionLog::open(
            dir.path(),
            LogConfig {
                compacted: true,
                ..cfg()
            },
            true,
        )
        .unwrap();
        for i in 0..200 {
            log.append(&make_batch(1, i, &[(i % 256) as u8; 64]), 0, 0)
                .unwrap();
        }
        let segments_before = log.segment_count();
        assert!(segments_before > 2);
        let leo = log.log_end_offset();
        // Keep every tenth batch of the closed segments.
        let report = log
            .compact(|b| BatchHeader::parse(b).unwrap().base_offset % 10 == 0)
            .unwrap();
        assert!(report.bytes_after < report.bytes_before / 5);
        assert_eq!(log.log_end_offset(), leo);
        let active_base = log.segments.keys().next_back().copied().unwrap();
        let mut got = Vec::new();
        let mut offset = 0;
        while offset < leo {
            let Some(plan) = log.read_plan(offset).unwrap() else {
                break;
            };
            let bytes = plan.read(1 << 20, true).unwrap();
            let offs = offsets_in(&bytes);
            offset = offs.last().unwrap() + 1;
            got.extend(offs);
        }
        for o in 0..leo {
            let expected = o >= active_base || o % 10 == 0;
            assert_eq!(got.contains(&o), expected, "offset {o}");
        }
        // Survives a restart, clean or not.
        drop(log);
        for clean in [false, true] {
            let (log, _) = PartitionLog::open(
                dir.path(),
                LogConfig {
                    compacted: true,
                    ..cfg()
                },
                clean,
            )
            .unwrap();
            assert_eq!(log.log_end_offset(), leo);
            let first = log.read_plan(0).unwrap().unwrap().read(1, true).unwrap();
            assert_eq!(offsets_in(&first), vec![0]);
            let tenth = log.read_plan(1).unwrap().unwrap().read(1, true).unwrap();
            assert_eq!(offsets_in(&tenth), vec![10], "reads skip the gap");
        }
    }

    fn pbatch(producer_id: i64, epoch: i16, seq: i32, records: i32) -> Vec<u8> {
        crate::test_support::make_producer_batch(
            records,
            1_000,
            b"idem",
            crate::test_support::Producer {
                producer_id,
                producer_epoch: epoch,
                base_sequence: seq,
            },
        )
    }

    fn snapshot_files(dir: &Path) -> Vec<i64> {
        let mut v: Vec<i64> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| {
                let p = e.unwrap().path();
                (p.extension().and_then(|x| x.to_str()) == Some(SNAPSHOT_SUFFIX))
                    .then(|| parse_segment_file_name(&p).unwrap())
            })
            .collect();
        v.sort();
        v
    }

    fn txn_batch(producer_id: i64, epoch: i16, seq: i32, records: i32) -> Vec<u8> {
        let recs: Vec<u8> = (0..records)
            .flat_map(|i| crate::test_support::record(i64::from(i), b"txn"))
            .collect();
        crate::test_support::batch_around_producer(
            crate::batch::ATTR_TRANSACTIONAL,
            records,
            1_000,
            1_000 + i64::from(records) - 1,
            &recs,
            crate::test_support::Producer {
                producer_id,
                producer_epoch: epoch,
                base_sequence: seq,
            },
        )
    }

    /// Open transactions and aborted ranges follow markers, survive restarts (from a
    /// snapshot, or by replay after a crash) and replicate to a follower's log.
    #[test]
    fn transactions_markers_lso_and_aborted_index_survive_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let expected_aborted = vec![AbortedTxn {
            producer_id: 1,
            first_offset: 1,
            last_offset: 5,
        }];
        {
            let (mut log, _) = PartitionLog::open(dir.path(), cfg(), true).unwrap();
            log.append(&make_batch(1, 0, b"plain"), 0, 0).unwrap(); // 0
            log.append(&txn_batch(1, 0, 0, 2), 0, 0).unwrap(); // 1..3
            log.append(&txn_batch(2, 0, 0, 1), 0, 0).unwrap(); // 3
            assert_eq!(log.first_unstable_offset(), Some(1));
            log.append(&txn_batch(1, 0, 2, 1), 0, 0).unwrap(); // 4
            let m = log
                .append_marker(1, 0, ControlType::Abort, 0, 0, 10)
                .unwrap(); // 5
            assert_eq!(m.base_offset, 5);
            assert_eq!(log.first_unstable_offset(), Some(3));
            assert_eq!(log.aborted_txns(0, 100), expected_aborted);
            // A marker of an older epoch than the producer's is refused.
            log.append_marker(2, 0, ControlType::Commit, 0, 0, 10)
                .unwrap(); // 6
            assert_eq!(log.first_unstable_offset(), None);
            log.append(&txn_batch(3, 0, 0, 1), 0, 0).unwrap(); // 7, left open
            log.append_marker(3, 2, ControlType::Abort, 0, 0, 10)
                .unwrap(); // 8: fencing epoch 2
            assert!(matches!(
                log.append_marker(3, 1, ControlType::Abort, 0, 0, 10),
                Err(StorageError::Producer(
                    ProducerStateError::InvalidProducerEpoch { .. }
                ))
            ));
            log.append(&txn_batch(4, 0, 0, 1), 0, 0).unwrap(); // 9, left open
                                                               // The marker is Kafka's control batch, read back byte for byte.
            let bytes = log.read_plan(5).unwrap().unwrap().read(1, true).unwrap();
            let h = validate_batch(&bytes).unwrap();
            assert!(h.is_control());
            assert_eq!(crate::batch::control_type(&bytes), Some(ControlType::Abort));
            log.close().unwrap();
        }
        let aborted_3 = AbortedTxn {
            producer_id: 3,
            first_offset: 7,
            last_offset: 8,
        };
        let mut all = expected_aborted.clone();
        all.push(aborted_3);
        for clean in [true, false] {
            if !clean {
                // A crash: no snapshot at the log end, replay from the log itself.
                for off in snapshot_files(dir.path()) {
                    std::fs::remove_file(dir.path().join(segment_file_name(off, SNAPSHOT_SUFFIX)))
                        .unwrap();
                }
            }
            let (log, _) = PartitionLog::open(dir.path(), cfg(), clean).unwrap();
            assert_eq!(log.first_unstable_offset(), Some(9), "clean {clean}");
            assert_eq!(log.aborted_txns(0, 100), all, "clean {clean}");
            assert_eq!(log.aborted_txns(6, 100), vec![aborted_3]);
            assert_eq!(log.producers().get(3).unwrap().producer_epoch, 2);
        }
        // A follower appending the leader's bytes gets the same state.
        let (leader, _) = PartitionLog::open(dir.path(), cfg(), true).unwrap();
        let bytes = leader
            .read_plan(0)
            .unwrap()
            .unwrap()
            .read(1 << 20, true)
            .unwrap();
        let fdir = tempfile::tempdir().unwrap();
        let (mut follower, _) = PartitionLog::open(fdir.path(), cfg(), true).unwrap();
        follower.append_as_follower(&bytes, 0).unwrap();
        assert_eq!(follower.first_unstable_offset(), Some(9));
        assert_eq!(follower.aborted_txns(0, 100), all);
    }

    #[test]
    fn idempotent_retry_is_answered_with_the_first_offsets_and_not_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = PartitionLog::open(dir.path(), cfg(), true).unwrap();
        log.append(&make_batch(2, 0, b"plain"), 0, 0).unwrap();
        let first = log.append(&pbatch(5, 0, 0, 3), 0, 0).unwrap();
        assert_eq!(
            (first.base_offset, first.last_offset, first.duplicate),
            (2, 4, false)
        );
        let size = log.size_bytes();
        let again = log.append(&pbatch(5, 0, 0, 3), 0, 0).unwrap();
        assert_eq!(
            (again.base_offset, again.last_offset, again.duplicate),
            (2, 4, true)
        );
        assert_eq!(again.record_count, 0);
        assert_eq!(log.size_bytes(), size, "a duplicate writes nothing");
        assert_eq!(log.log_end_offset(), 5);
        assert!(matches!(
            log.append(&pbatch(5, 0, 7, 1), 0, 0),
            Err(StorageError::Producer(
                ProducerStateError::OutOfOrderSequence { .. }
            ))
        ));
        // Two batches in one request with a producer id: refused, nothing written.
        let mut two = pbatch(5, 0, 3, 1);
        two.extend_from_slice(&pbatch(5, 0, 4, 1));
        assert!(matches!(
            log.append(&two, 0, 0),
            Err(StorageError::Producer(ProducerStateError::MultipleBatches(
                2
            )))
        ));
        assert_eq!(log.log_end_offset(), 5);
        let p = log.producers().get(5).unwrap();
        assert_eq!((p.producer_epoch, p.last_seq(), p.last_offset()), (0, 2, 4));
    }

    /// The state after a restart equals the state before it, whatever the shutdown and
    /// whatever snapshots survived; recovery reads only the batches after the snapshot.
    #[test]
    fn producer_state_survives_restarts_with_and_without_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = PartitionLog::open(dir.path(), cfg(), true).unwrap();
        for i in 0..60 {
            log.append(&pbatch(i % 4, 0, (i / 4) as i32, 1), 0, 0)
                .unwrap();
        }
        assert!(log.segment_count() > 1);
        let before = log.producers().clone();
        let snapshots = snapshot_files(dir.path());
        assert!(!snapshots.is_empty(), "every roll writes a snapshot");
        let active_base = *log.segments.keys().next_back().unwrap();
        assert_eq!(snapshots.last(), Some(&active_base));
        drop(log); // kill -9: no close

        let (log, report) = PartitionLog::open(dir.path(), cfg(), false).unwrap();
        assert_eq!(log.producers(), &before);
        assert_eq!(report.producer_snapshot_offset, Some(active_base));
        let in_active = (log.log_end_offset() - active_base) as usize;
        assert_eq!(
            report.producer_batches_replayed, in_active,
            "only the tail is read"
        );
        // A retry of the last batch before the "crash" is still a duplicate.
        let mut log = log;
        assert!(log.append(&pbatch(3, 0, 14, 1), 0, 0).unwrap().duplicate);
        log.close().unwrap();
        drop(log);

        let (log, report) = PartitionLog::open(dir.path(), cfg(), true).unwrap();
        assert_eq!(log.producers(), &before);
        // The active segment holds only a few batches (its index no more than the first
        // entry): the clean close wrote no snapshot, and the start replays just those.
        let active_base = *log.segments.keys().next_back().unwrap();
        assert!(log.active().index.len() <= 1);
        assert!(!snapshot_files(dir.path()).contains(&log.log_end_offset()));
        assert_eq!(
            report.producer_batches_replayed,
            (log.log_end_offset() - active_base) as usize,
            "only the small active segment is read"
        );
        drop(log);

        // Without any snapshot the whole log is replayed, to the same state.
        for offset in snapshot_files(dir.path()) {
            std::fs::remove_file(dir.path().join(segment_file_name(offset, SNAPSHOT_SUFFIX)))
                .unwrap();
        }
        let (log, report) = PartitionLog::open(dir.path(), cfg(), false).unwrap();
        assert_eq!(log.producers(), &before);
        assert_eq!(report.producer_snapshot_offset, None);
        assert_eq!(report.producer_batches_replayed, 60);
        drop(log);

        // A damaged snapshot is dropped for an older one (or the log).
        let (mut log, _) = PartitionLog::open(dir.path(), cfg(), false).unwrap();
        log.roll().unwrap();
        let newest = *snapshot_files(dir.path()).last().unwrap();
        drop(log);
        let path = dir.path().join(segment_file_name(newest, SNAPSHOT_SUFFIX));
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let (log, report) = PartitionLog::open(dir.path(), cfg(), false).unwrap();
        assert_eq!(log.producers(), &before);
        assert_ne!(report.producer_snapshot_offset, Some(newest));
        assert!(!path.exists(), "the damaged snapshot is deleted");
    }

    /// A partition with little data (one segment whose index has only the first batch's
    /// entry) writes neither index files nor a snapshot at a clean close, and its next
    /// start rebuilds the same indexes and producer state from the log; once the segment
    /// holds more, the close writes them again.
    #[test]
    fn a_small_log_writes_no_index_or_snapshot_at_close_and_reopens_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            index_interval_bytes: 4096,
            segment_bytes: 1 << 20,
            ..cfg()
        };
        let (mut log, _) = PartitionLog::open(dir.path(), cfg.clone(), true).unwrap();
        log.append(&pbatch(7, 0, 0, 2), 0, 0).unwrap();
        log.append(&pbatch(7, 0, 2, 1), 0, 0).unwrap();
        let before = log.producers().clone();
        log.close_unsynced().unwrap();
        log.mark_closed();
        drop(log);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.ends_with(".index")
                && !n.ends_with(".timeindex")
                && !n.ends_with(".snapshot")),
            "{names:?}"
        );
        let (mut log, report) = PartitionLog::open(dir.path(), cfg.clone(), true).unwrap();
        assert_eq!(log.producers(), &before);
        assert_eq!(report.producer_batches_replayed, 2);
        assert_eq!(log.log_end_offset(), 3);
        // A retry of the last batch is still a duplicate after the restart.
        assert!(log.append(&pbatch(7, 0, 2, 1), 0, 0).unwrap().duplicate);
        // More than `index.interval.bytes`: a second index entry, so files and a snapshot.
        let mut seq = 3;
        while log.active().index.len() < 2 {
            assert!(seq < 1_000, "no second index entry");
            assert_eq!(log.segment_count(), 1);
            log.append(&pbatch(7, 0, seq, 1), 0, 0).unwrap();
            seq += 1;
        }
        log.close_unsynced().unwrap();
        log.mark_closed();
        let leo = log.log_end_offset();
        drop(log);
        assert!(dir.path().join(segment_file_name(0, INDEX_SUFFIX)).exists());
        assert!(snapshot_files(dir.path()).contains(&leo));
        let (log, report) = PartitionLog::open(dir.path(), cfg, true).unwrap();
        assert_eq!(report.producer_batches_replayed, 0);
        assert_eq!(log.log_end_offset(), leo);
    }

    /// A snapshot past the log end (the tail it covered was lost and truncated) must not
    /// be loaded: it would dedup retries of batches that are not in the log.
    #[test]
    fn snapshot_past_a_truncated_log_end_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = PartitionLog::open(dir.path(), LogConfig::default(), true).unwrap();
        log.append(&pbatch(1, 0, 0, 1), 0, 0).unwrap();
        let cut_at = log.size_bytes();
        log.append(&pbatch(1, 0, 1, 1), 0, 0).unwrap();
        log.close().unwrap(); // snapshot at 2
        drop(log);
        // The machine lost the second batch.
        let seg = dir.path().join(segment_file_name(0, LOG_SUFFIX));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(cut_at)
            .unwrap();
        let (mut log, report) =
            PartitionLog::open(dir.path(), LogConfig::default(), false).unwrap();
        assert_eq!(log.log_end_offset(), 1);
        assert_eq!(report.producer_snapshot_offset, None);
        assert_eq!(log.producers().get(1).unwrap().last_seq(), 0);
        // The lost batch, retried, is appended rather than answered as a duplicate.
        let retry = log.append(&pbatch(1, 0, 1, 1), 0, 0).unwrap();
        assert_eq!((retry.base_offset, retry.duplicate), (1, false));
    }

    #[test]
    fn retention_drops_old_snapshots_and_keeps_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg();
        c.retention_bytes = 4096;
        let (mut log, _) = PartitionLog::open(dir.path(), c.clone(), true).unwrap();
        for i in 0..120 {
            log.append(&pbatch(0, 0, i, 1), 0, 0).unwrap();
        }
        log.append(&pbatch(9, 2, 0, 1), 0, 0).unwrap();
        log.tick(0).unwrap();
        let first_base = *log.segments.keys().next().unwrap();
        assert!(first_base > 0);
        assert!(snapshot_files(dir.path()).iter().all(|o| *o >= first_base));
        let before = log.producers().clone();
        assert_eq!(before.len(), 2);
        // DeleteRecords to the end: the producers' batches are gone, their state is not
        // (KIP-360: state outlives the log; only expiration removes it).
        let leo = log.log_end_offset();
        log.advance_log_start_offset(leo).unwrap();
        assert_eq!(log.producers(), &before);
        drop(log);
        let (mut log, _) = PartitionLog::open(dir.path(), c, false).unwrap();
        assert_eq!(log.producers(), &before);
        // producer.id.expiration.ms: batches stamped 1000, so a day later they expire.
        log.tick(1_000 + PRODUCER_ID_EXPIRATION_MS_DEFAULT).unwrap();
        assert!(log.producers().is_empty());
    }

    #[test]
    fn timestamp_lookup_finds_first_batch_at_or_after() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = PartitionLog::open(dir.path(), cfg(), true).unwrap();
        for i in 0..100 {
            log.append(&make_batch(1, i * 10, &[1u8; 50]), 0, 0)
                .unwrap();
        }
        for target in [0, 5, 10, 455, 990] {
            let plan = log.time_plan(target).unwrap().unwrap();
            let batch = plan.read_first_batch_at_time(target).unwrap().unwrap();
            let h = BatchHeader::parse(&batch).unwrap();
            assert_eq!(h.base_offset, (target + 9) / 10, "target {target}");
        }
        assert!(log.time_plan(991).unwrap().is_none());
    }
}

/// Producers' max timestamps do not decide retention (sarama before IBM/sarama#3108 sent
/// -1; others 0 or values below the base timestamp).
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod timestamp_tests {
    use super::*;
    use crate::batch::{compute_crc, CRC_AT, MAX_TIMESTAMP_AT};
    use crate::test_support::{batch_around, make_batch, record_at};

    const DAY_MS: i64 = 24 * 60 * 60 * 1000;

    fn wall_ms() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    }

    /// Four records 10 ms apart from `base`, uncompressed or zstd, with the header
    /// claiming `max_timestamp`.
    fn batch(base: i64, max_timestamp: i64, zstd: bool) -> Vec<u8> {
        let records: Vec<u8> = (0..4)
            .flat_map(|i| record_at(i, i * 10, b"value"))
            .collect();
        if zstd {
            let compressed = zstd::encode_all(&records[..], 3).unwrap();
            batch_around(4, 4, base, max_timestamp, &compressed)
        } else {
            batch_around(0, 4, base, max_timestamp, &records)
        }
    }

    fn stored_max_timestamp(log: &PartitionLog, offset: i64) -> i64 {
        let bytes = log
            .read_plan(offset)
            .unwrap()
            .unwrap()
            .read(1, true)
            .unwrap();
        let h = crate::batch::validate_batch(&bytes).unwrap();
        h.max_timestamp
    }

    #[test]
    fn bad_max_timestamps_are_recomputed_and_nothing_is_deleted_early() {
        let now = wall_ms();
        let base = now - 1000;
        for zstd in [false, true] {
            for claimed in [-1, 0, base - 5000, base + 30] {
                let dir = tempfile::tempdir().unwrap();
                let config = LogConfig {
                    retention_ms: DAY_MS,
                    ..LogConfig::default()
                };
                let (mut log, _) = PartitionLog::open(dir.path(), config, true).unwrap();
                log.append(&batch(base, claimed, zstd), 0, now).unwrap();
                log.roll().unwrap();
                log.append(&make_batch(1, now, b"later"), 0, now).unwrap();
                let case = format!("zstd {zstd} claimed {claimed}");
                // Whatever the producer claimed, the stored maximum is the records'.
                assert_eq!(stored_max_timestamp(&log, 0), base + 30, "{case}");
                // Not deleted before its time...
                assert_eq!(log.tick(now + DAY_MS - 60_000).unwrap(), 0, "{case}");
                assert_eq!(log.log_start_offset(), 0, "{case}");
                // ...and deleted after it.
                assert_eq!(log.tick(base + 30 + DAY_MS + 1).unwrap(), 1, "{case}");
                assert_eq!(log.log_start_offset(), 4, "{case}");
            }
        }
    }

    #[test]
    fn offsets_for_times_finds_repaired_batches() {
        let now = wall_ms();
        let base = now - 1000;
        for zstd in [false, true] {
            for claimed in [-1, 0, base - 5000] {
                let dir = tempfile::tempdir().unwrap();
                let (mut log, _) =
                    PartitionLog::open(dir.path(), LogConfig::default(), true).unwrap();
                log.append(&batch(base, claimed, zstd), 0, now).unwrap();
                log.append(&batch(base + 100, claimed, zstd), 0, now)
                    .unwrap();
                for (target, want) in [(base, 0), (base + 25, 0), (base + 31, 4), (base + 130, 4)] {
                    let plan = log.time_plan(target).unwrap().unwrap();
                    let found = plan.read_first_batch_at_time(target).unwrap().unwrap();
                    let h = BatchHeader::parse(&found).unwrap();
                    assert_eq!(
                        h.base_offset, want,
                        "zstd {zstd} claimed {claimed} t {target}"
                    );
                }
                assert!(log.time_plan(base + 131).unwrap().is_none());
                assert_eq!(log.max_timestamp(), base + 130);
            }
        }
    }

    #[test]
    fn kip_937_bounds_refuse_out_of_range_records() {
        let now = wall_ms();
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            message_timestamp_before_max_ms: 60_000,
            message_timestamp_after_max_ms: 1_000,
            ..LogConfig::default()
        };
        let (mut log, _) = PartitionLog::open(dir.path(), config, true).unwrap();
        // The header says "now", the records say otherwise: the records decide.
        for (base, zstd) in [(now - 120_000, false), (now + 5_000, true)] {
            let err = log.append(&batch(base, now, zstd), 0, now).unwrap_err();
            assert!(
                matches!(
                    err,
                    StorageError::CorruptBatch(BatchError::TimestampOutOfRange { .. })
                ),
                "{err}"
            );
        }
        assert_eq!(log.log_end_offset(), 0);
        // Within the bounds, records without a timestamp (-1) are not checked.
        log.append(&batch(now - 30_000, -1, false), 0, now).unwrap();
        let no_ts: Vec<u8> = record_at(0, 0, b"x");
        log.append(&batch_around(0, 1, -1, -1, &no_ts), 0, now)
            .unwrap();
        assert_eq!(log.log_end_offset(), 5);
    }

    #[test]
    fn log_append_time_and_producer_set_log_append_time() {
        let now = wall_ms();
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            log_append_time: true,
            message_timestamp_before_max_ms: 1,
            ..LogConfig::default()
        };
        let (mut log, _) = PartitionLog::open(dir.path(), config, true).unwrap();
        // LogAppendTime ignores the bounds and the producer's timestamps.
        let info = log.append(&batch(5, -1, true), 0, now).unwrap();
        assert_eq!(info.log_append_time_ms, now);
        assert_eq!(stored_max_timestamp(&log, 0), now);
        let records = record_at(0, 0, b"x");
        let forged = batch_around(ATTR_LOG_APPEND, 1, now, now, &records);
        assert!(matches!(
            log.append(&forged, 0, now),
            Err(StorageError::CorruptBatch(
                BatchError::LogAppendTimeFromProducer
            ))
        ));
    }
    const ATTR_LOG_APPEND: i16 = crate::batch::ATTR_TIMESTAMP_TYPE_LOG_APPEND;

    #[test]
    fn undecodable_records_behind_a_bad_header_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = PartitionLog::open(dir.path(), LogConfig::default(), true).unwrap();
        // Valid CRC, garbage "zstd" records, max timestamp -1: cannot be verified.
        let bad = batch_around(4, 1, 1000, -1, b"not zstd at all");
        assert!(matches!(
            log.append(&bad, 0, 0),
            Err(StorageError::CorruptBatch(BatchError::Undecodable { .. }))
        ));
    }

    /// A segment written before the broker repaired max timestamps (rewritten here in
    /// place to carry -1) is not deleted by its other batches' old timestamps: its age
    /// counts from the file's last write, as Kafka does for segments without timestamps.
    #[test]
    fn segments_on_disk_with_impossible_max_timestamps_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            retention_ms: DAY_MS,
            index_interval_bytes: 1,
            ..LogConfig::default()
        };
        {
            let (mut log, _) = PartitionLog::open(dir.path(), config.clone(), true).unwrap();
            for _ in 0..3 {
                log.append(&make_batch(2, 1000, b"old"), 0, 0).unwrap();
            }
            log.roll().unwrap();
            log.append(&make_batch(1, 2000, b"next"), 0, 0).unwrap();
            log.close().unwrap();
        }
        // Make the first batch of segment 0 look like sarama's: max timestamp -1.
        let path = dir.path().join("00000000000000000000.log");
        let mut raw = std::fs::read(&path).unwrap();
        let len = BatchHeader::parse(&raw).unwrap().total_bytes().unwrap();
        raw[MAX_TIMESTAMP_AT..MAX_TIMESTAMP_AT + 8].copy_from_slice(&(-1i64).to_be_bytes());
        let crc = compute_crc(&raw[..len]);
        raw[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
        std::fs::write(&path, &raw).unwrap();

        for clean in [true, false] {
            let (mut log, _) = PartitionLog::open(dir.path(), config.clone(), clean).unwrap();
            let now = wall_ms();
            assert_eq!(log.tick(now + DAY_MS - 60_000).unwrap(), 0, "clean {clean}");
            assert_eq!(log.log_start_offset(), 0);
            // A day after its last write it goes (with segment 1, whose timestamps are old).
            assert!(
                log.tick(now + DAY_MS + 60_000).unwrap() >= 1,
                "clean {clean}"
            );
            assert!(log.log_start_offset() >= 6, "clean {clean}");
            drop(log);
            // Put segment 0 back for the next round.
            if clean {
                std::fs::write(&path, &raw).unwrap();
                std::fs::write(dir.path().join(CHECKPOINT_FILE), "v1 0 0\n").unwrap();
            }
        }
    }
}
