//! Per-partition state of idempotent producers: for each producer id its epoch and the
//! sequence numbers and offsets of its last [`PRODUCER_BATCHES_RETAINED`] batches, so that
//! a retried batch is answered with the offsets it got the first time instead of being
//! appended twice (Kafka's `ProducerStateManager`).
//!
//! Sans-I/O: [`ProducerStateManager::validate`] decides what to do with a batch before
//! anything is written, [`ProducerStateManager::update`] folds a batch in after it was
//! written (the same call replays the log at open), and the snapshot codec turns the state
//! into bytes and back. The log (`crate::log`) owns the files; time is an argument.
//!
//! The rules are Kafka's (`ProducerAppendInfo`, `ProducerStateEntry`):
//! - a batch whose epoch and sequence range equal one of the last five batches of its
//!   producer is a duplicate: not appended, answered with the original offsets;
//! - an epoch below the producer's current one is INVALID_PRODUCER_EPOCH;
//! - a new (higher) epoch must start at sequence 0, else OUT_OF_ORDER_SEQUENCE_NUMBER;
//! - in the current epoch the first sequence must follow the last one (wrapping from
//!   `i32::MAX` to 0), else OUT_OF_ORDER_SEQUENCE_NUMBER;
//! - a producer id the partition has no state for (new, or expired) may start at any
//!   sequence and epoch. Since Kafka 2.5 (KIP-360) brokers no longer answer
//!   UNKNOWN_PRODUCER_ID for that: state that was lost to retention or expiration is not
//!   an error the producer could fix, and the old error made idempotent producers fail.
//!
//! Transactions (issue 12) add, per partition, the open transaction of each producer
//! (the offset of its first transactional batch here) and the list of aborted
//! transactions (Kafka's `.txnindex` entries: producer id, first offset, offset of the
//! ABORT marker). Both are functions of the log like the rest: a transactional batch
//! opens a transaction, an end-transaction marker (control batch) closes it, and the
//! snapshot (version 2) carries them, so recovery rebuilds them from the newest
//! snapshot plus the batches after it. The first open transaction bounds the
//! partition's last stable offset (read_committed).

use std::collections::{BTreeMap, VecDeque};

use crate::batch::{BatchHeader, ATTR_TRANSACTIONAL};

/// Batches remembered per producer: Kafka's `NUM_BATCHES_TO_RETAIN`, which bounds
/// `max.in.flight.requests.per.connection` of idempotent producers.
pub const PRODUCER_BATCHES_RETAINED: usize = 5;
/// Kafka's `producer.id.expiration.ms` default: one day.
pub const PRODUCER_ID_EXPIRATION_MS_DEFAULT: i64 = 86_400_000;
/// Largest snapshot file read at open. One producer takes at most 187 bytes, so this is
/// several million producers; a larger file is treated as damaged.
pub const PRODUCER_SNAPSHOT_BYTES_MAX: usize = 1024 * 1024 * 1024;

/// Version of the snapshot format written (docs/storage-format.md); version 1 (no
/// transactions) is still read.
const SNAPSHOT_VERSION: i16 = 2;
const SNAPSHOT_VERSION_V1: i16 = 1;
/// An open transaction in a version 2 snapshot: producer id i64, first offset i64.
const SNAPSHOT_ONGOING_BYTES: usize = 8 + 8;
/// An aborted transaction: producer id i64, first offset i64, last offset i64.
const SNAPSHOT_ABORTED_BYTES: usize = 8 + 8 + 8;
/// version i16, crc u32, offset i64, producer count u32.
const SNAPSHOT_HEADER_BYTES: usize = 2 + 4 + 8 + 4;
/// producer id i64, epoch i16, last timestamp i64, batch count u8.
const SNAPSHOT_PRODUCER_BYTES: usize = 8 + 2 + 8 + 1;
/// first seq i32, last seq i32, first offset i64, last offset i64, max timestamp i64.
const SNAPSHOT_BATCH_BYTES: usize = 4 + 4 + 8 + 8 + 8;

/// Where one batch of a producer went: its sequence range and offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchMetadata {
    pub first_seq: i32,
    pub last_seq: i32,
    pub first_offset: i64,
    pub last_offset: i64,
    pub max_timestamp: i64,
}

/// What the partition knows of one producer id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerStateEntry {
    pub producer_id: i64,
    pub producer_epoch: i16,
    /// Oldest first, at most [`PRODUCER_BATCHES_RETAINED`], all of `producer_epoch`.
    batches: VecDeque<BatchMetadata>,
    /// Max timestamp of the producer's last batch; expiration is measured from it.
    pub last_timestamp: i64,
}

impl ProducerStateEntry {
    pub fn batches(&self) -> impl Iterator<Item = &BatchMetadata> {
        self.batches.iter()
    }

    /// Sequence of the last record appended in the current epoch, -1 when none.
    pub fn last_seq(&self) -> i32 {
        self.batches.back().map_or(-1, |b| b.last_seq)
    }

    /// Offset of the last record appended in the current epoch, -1 when none.
    pub fn last_offset(&self) -> i64 {
        self.batches.back().map_or(-1, |b| b.last_offset)
    }

    fn find_duplicate(&self, batch: &ProducerBatch) -> Option<BatchMetadata> {
        if batch.producer_epoch != self.producer_epoch {
            return None;
        }
        let last_seq = batch.last_seq();
        self.batches
            .iter()
            .find(|b| b.first_seq == batch.base_sequence && b.last_seq == last_seq)
            .copied()
    }
}

/// The producer fields of one batch header with a producer id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerBatch {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub last_offset_delta: i32,
    pub max_timestamp: i64,
    pub transactional: bool,
}

impl ProducerBatch {
    /// `None` for a batch without a producer id (a plain, non-idempotent producer).
    pub fn from_header(h: &BatchHeader) -> Option<ProducerBatch> {
        (h.producer_id >= 0).then_some(ProducerBatch {
            producer_id: h.producer_id,
            producer_epoch: h.producer_epoch,
            base_sequence: h.base_sequence,
            last_offset_delta: h.last_offset_delta,
            max_timestamp: h.max_timestamp,
            transactional: h.attributes & ATTR_TRANSACTIONAL != 0,
        })
    }

    /// Sequence of the batch's last record: sequences wrap from `i32::MAX` to 0
    /// (Kafka's `DefaultRecordBatch.incrementSequence`).
    pub fn last_seq(&self) -> i32 {
        increment_sequence(self.base_sequence, self.last_offset_delta)
    }
}

/// `sequence + increment`, wrapping past `i32::MAX` to 0.
pub fn increment_sequence(sequence: i32, increment: i32) -> i32 {
    let sum = i64::from(sequence) + i64::from(increment);
    // Sequences are non-negative, so the wrap is modulo 2^31.
    (sum % (i64::from(i32::MAX) + 1)) as i32
}

/// Whether `next` is the sequence right after `last` (wrapping at `i32::MAX`).
pub fn in_sequence(last: i32, next: i32) -> bool {
    i64::from(next) == i64::from(last) + 1 || (next == 0 && last == i32::MAX)
}

/// What to do with a batch that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validated {
    /// Write it.
    Append,
    /// Already in the log: answer with these offsets, write nothing.
    Duplicate(BatchMetadata),
}

/// A transaction that ended with an ABORT marker in this partition (Kafka's
/// `AbortedTxn`): a read_committed consumer drops this producer's batches from
/// `first_offset` up to the marker at `last_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbortedTxn {
    pub producer_id: i64,
    pub first_offset: i64,
    pub last_offset: i64,
}

/// Why a producer's batch is refused. The broker maps each to its Kafka error code.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ProducerStateError {
    #[error("out of order sequence number for producer {producer_id} epoch {producer_epoch}: got {base_sequence}, expected {expected}")]
    OutOfOrderSequence {
        producer_id: i64,
        producer_epoch: i16,
        base_sequence: i32,
        expected: i32,
    },
    #[error("producer {producer_id} has epoch {producer_epoch}, older than the current epoch {current_epoch}")]
    InvalidProducerEpoch {
        producer_id: i64,
        producer_epoch: i16,
        current_epoch: i16,
    },
    #[error("invalid producer epoch {producer_epoch} or base sequence {base_sequence} in a batch of producer {producer_id}")]
    InvalidSequence {
        producer_id: i64,
        producer_epoch: i16,
        base_sequence: i32,
    },
    #[error(
        "non-transactional batch of producer {0}, which has an open transaction in this partition"
    )]
    NonTransactionalInTxn(i64),
    #[error("a produce request carries {0} batches for one partition; an idempotent producer sends exactly one")]
    MultipleBatches(usize),
}

/// Why a snapshot file cannot be used; the log falls back to an older one or the log.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("snapshot truncated")]
    Truncated,
    #[error("unknown snapshot version {0}")]
    Version(i16),
    #[error("snapshot CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Crc { stored: u32, computed: u32 },
    #[error("invalid snapshot: {0}")]
    Invalid(&'static str),
}

/// All producers of one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerStateManager {
    producers: BTreeMap<i64, ProducerStateEntry>,
    /// Open transactions: producer id → offset of its first transactional batch here.
    ongoing: BTreeMap<i64, i64>,
    /// Aborted transactions, in the order of their markers (so by `last_offset`).
    aborted: Vec<AbortedTxn>,
}

impl ProducerStateManager {
    pub fn len(&self) -> usize {
        self.producers.len()
    }
    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }
    pub fn get(&self, producer_id: i64) -> Option<&ProducerStateEntry> {
        self.producers.get(&producer_id)
    }
    /// Active producers in producer id order (DescribeProducers).
    pub fn producers(&self) -> impl Iterator<Item = &ProducerStateEntry> {
        self.producers.values()
    }

    /// Checks a client's batch against the producer's state; nothing changes.
    pub fn validate(&self, batch: &ProducerBatch) -> Result<Validated, ProducerStateError> {
        if batch.producer_epoch < 0 || batch.base_sequence < 0 {
            return Err(ProducerStateError::InvalidSequence {
                producer_id: batch.producer_id,
                producer_epoch: batch.producer_epoch,
                base_sequence: batch.base_sequence,
            });
        }
        if !batch.transactional && self.ongoing.contains_key(&batch.producer_id) {
            // Kafka's INVALID_TXN_STATE: a producer mixing plain and transactional batches.
            return Err(ProducerStateError::NonTransactionalInTxn(batch.producer_id));
        }
        let Some(entry) = self.producers.get(&batch.producer_id) else {
            // No state (never seen, or expired): any sequence starts it (KIP-360).
            return Ok(Validated::Append);
        };
        if let Some(original) = entry.find_duplicate(batch) {
            // A transactional batch is a retry of one in the log only within the
            // transaction that wrote it. One matching a batch of a transaction that a
            // marker already ended (none is open here, or the open one began after it)
            // cannot be its retry: a client ends a transaction only once its batches
            // are answered. It is a new batch that reuses the sequence, as librdkafka's
            // abort_transaction() does when it purges a message that was sent, timed
            // out and queued again (rdkafka_partition.c advances the epoch's base msgid
            // past purged messages). Answered as a duplicate it would be acknowledged at
            // the aborted batch's offset and never be in the log; refused, the client
            // learns its sequence is out of step and the transaction fails instead.
            let open_since = self.ongoing.get(&batch.producer_id);
            if batch.transactional && open_since.is_none_or(|first| original.first_offset < *first)
            {
                return Err(ProducerStateError::OutOfOrderSequence {
                    producer_id: batch.producer_id,
                    producer_epoch: batch.producer_epoch,
                    base_sequence: batch.base_sequence,
                    expected: increment_sequence(entry.last_seq(), 1),
                });
            }
            return Ok(Validated::Duplicate(original));
        }
        if batch.producer_epoch < entry.producer_epoch {
            return Err(ProducerStateError::InvalidProducerEpoch {
                producer_id: batch.producer_id,
                producer_epoch: batch.producer_epoch,
                current_epoch: entry.producer_epoch,
            });
        }
        let out_of_order = |expected| ProducerStateError::OutOfOrderSequence {
            producer_id: batch.producer_id,
            producer_epoch: batch.producer_epoch,
            base_sequence: batch.base_sequence,
            expected,
        };
        if batch.producer_epoch > entry.producer_epoch {
            // A bumped epoch restarts the sequence.
            if batch.base_sequence != 0 {
                return Err(out_of_order(0));
            }
        } else if let Some(last) = entry.batches.back() {
            if !in_sequence(last.last_seq, batch.base_sequence) {
                return Err(out_of_order(increment_sequence(last.last_seq, 1)));
            }
        }
        Ok(Validated::Append)
    }

    /// Folds in a batch that is now in the log at `first_offset`. Also used to replay the
    /// log at open, where batches are not validated again (they were before the write).
    pub fn update(&mut self, batch: &ProducerBatch, first_offset: i64) {
        if batch.transactional {
            self.ongoing
                .entry(batch.producer_id)
                .or_insert(first_offset);
        }
        let entry = self
            .producers
            .entry(batch.producer_id)
            .or_insert_with(|| ProducerStateEntry {
                producer_id: batch.producer_id,
                producer_epoch: batch.producer_epoch,
                batches: VecDeque::with_capacity(PRODUCER_BATCHES_RETAINED),
                last_timestamp: batch.max_timestamp,
            });
        if entry.producer_epoch != batch.producer_epoch {
            entry.batches.clear();
            entry.producer_epoch = batch.producer_epoch;
        }
        if batch.base_sequence < 0 {
            // The transaction coordinator's own writes (transactional offset commits)
            // carry no sequence: nothing to deduplicate.
            entry.last_timestamp = batch.max_timestamp;
            return;
        }
        if entry.batches.len() == PRODUCER_BATCHES_RETAINED {
            entry.batches.pop_front();
        }
        entry.batches.push_back(BatchMetadata {
            first_seq: batch.base_sequence,
            last_seq: batch.last_seq(),
            first_offset,
            last_offset: first_offset + i64::from(batch.last_offset_delta),
            max_timestamp: batch.max_timestamp,
        });
        entry.last_timestamp = batch.max_timestamp;
    }

    /// Forgets producers whose last batch is at least `expiration_ms` older than `now_ms`
    /// (`producer.id.expiration.ms`). Returns how many were removed.
    pub fn remove_expired(&mut self, now_ms: i64, expiration_ms: i64) -> usize {
        let before = self.producers.len();
        let ongoing = &self.ongoing;
        // A producer with an open transaction stays until the marker (as in Kafka).
        self.producers.retain(|id, e| {
            ongoing.contains_key(id) || now_ms.saturating_sub(e.last_timestamp) < expiration_ms
        });
        before - self.producers.len()
    }

    /// Checks an end-transaction marker of the coordinator: its epoch may not be older
    /// than the producer's (a fenced coordinator's late marker), Kafka's
    /// `checkProducerEpoch` for markers.
    pub fn validate_marker(
        &self,
        producer_id: i64,
        producer_epoch: i16,
    ) -> Result<(), ProducerStateError> {
        match self.producers.get(&producer_id) {
            Some(e) if producer_epoch < e.producer_epoch => {
                Err(ProducerStateError::InvalidProducerEpoch {
                    producer_id,
                    producer_epoch,
                    current_epoch: e.producer_epoch,
                })
            }
            _ => Ok(()),
        }
    }

    /// Folds in an end-transaction marker written at `marker_offset`: the producer's
    /// transaction here is closed; an ABORT of a transaction that wrote here is
    /// remembered for read_committed fetches. The producer's epoch becomes the
    /// marker's (an abort on timeout carries the fencing epoch).
    pub fn complete_txn(
        &mut self,
        producer_id: i64,
        producer_epoch: i16,
        control: crate::batch::ControlType,
        marker_offset: i64,
        timestamp: i64,
    ) {
        let entry = self
            .producers
            .entry(producer_id)
            .or_insert_with(|| ProducerStateEntry {
                producer_id,
                producer_epoch,
                batches: VecDeque::with_capacity(PRODUCER_BATCHES_RETAINED),
                last_timestamp: timestamp,
            });
        if entry.producer_epoch != producer_epoch {
            entry.batches.clear();
            entry.producer_epoch = producer_epoch;
        }
        entry.last_timestamp = entry.last_timestamp.max(timestamp);
        if let Some(first_offset) = self.ongoing.remove(&producer_id) {
            if control == crate::batch::ControlType::Abort {
                self.aborted.push(AbortedTxn {
                    producer_id,
                    first_offset,
                    last_offset: marker_offset,
                });
            }
        }
    }

    /// Offset of the first batch of the earliest open transaction: the last stable
    /// offset cannot pass it. `None` when no transaction is open here.
    pub fn first_unstable_offset(&self) -> Option<i64> {
        self.ongoing.values().copied().min()
    }

    /// Open transactions: `(producer id, first offset)`.
    pub fn ongoing_txns(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        self.ongoing.iter().map(|(p, o)| (*p, *o))
    }

    /// The producer's open transaction here, its first offset.
    pub fn ongoing_txn_first_offset(&self, producer_id: i64) -> Option<i64> {
        self.ongoing.get(&producer_id).copied()
    }

    /// Aborted transactions a read_committed fetch of `[fetch_offset, upper_bound)`
    /// needs (Kafka's `collectAbortedTxns`): those ending at or after the fetch offset
    /// and starting before the upper bound.
    pub fn aborted_in_range(&self, fetch_offset: i64, upper_bound: i64) -> Vec<AbortedTxn> {
        let from = self
            .aborted
            .partition_point(|a| a.last_offset < fetch_offset);
        self.aborted
            .get(from..)
            .unwrap_or_default()
            .iter()
            .filter(|a| a.first_offset < upper_bound)
            .copied()
            .collect()
    }

    /// Forgets aborted transactions wholly below the log start offset (retention,
    /// DeleteRecords): no fetch can reach them.
    pub fn remove_aborted_below(&mut self, log_start_offset: i64) {
        let below = self
            .aborted
            .partition_point(|a| a.last_offset < log_start_offset);
        self.aborted.drain(..below);
    }

    /// Encodes the state as of log offset `offset` (every batch below it folded in).
    pub fn encode_snapshot(&self, offset: i64) -> Vec<u8> {
        let mut body = Vec::with_capacity(
            8 + 4 + self.producers.len() * (SNAPSHOT_PRODUCER_BYTES + SNAPSHOT_BATCH_BYTES),
        );
        body.extend_from_slice(&offset.to_be_bytes());
        body.extend_from_slice(&(self.producers.len() as u32).to_be_bytes());
        for e in self.producers.values() {
            body.extend_from_slice(&e.producer_id.to_be_bytes());
            body.extend_from_slice(&e.producer_epoch.to_be_bytes());
            body.extend_from_slice(&e.last_timestamp.to_be_bytes());
            body.push(e.batches.len() as u8);
            for b in &e.batches {
                body.extend_from_slice(&b.first_seq.to_be_bytes());
                body.extend_from_slice(&b.last_seq.to_be_bytes());
                body.extend_from_slice(&b.first_offset.to_be_bytes());
                body.extend_from_slice(&b.last_offset.to_be_bytes());
                body.extend_from_slice(&b.max_timestamp.to_be_bytes());
            }
        }
        body.extend_from_slice(&(self.ongoing.len() as u32).to_be_bytes());
        for (producer_id, first_offset) in &self.ongoing {
            body.extend_from_slice(&producer_id.to_be_bytes());
            body.extend_from_slice(&first_offset.to_be_bytes());
        }
        body.extend_from_slice(&(self.aborted.len() as u32).to_be_bytes());
        for a in &self.aborted {
            body.extend_from_slice(&a.producer_id.to_be_bytes());
            body.extend_from_slice(&a.first_offset.to_be_bytes());
            body.extend_from_slice(&a.last_offset.to_be_bytes());
        }
        let mut out = Vec::with_capacity(6 + body.len());
        out.extend_from_slice(&SNAPSHOT_VERSION.to_be_bytes());
        out.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes a snapshot: `(offset, state)`. Never panics on any input.
    pub fn decode_snapshot(bytes: &[u8]) -> Result<(i64, ProducerStateManager), SnapshotError> {
        if bytes.len() < SNAPSHOT_HEADER_BYTES {
            return Err(SnapshotError::Truncated);
        }
        let mut r = Reader { buf: bytes, pos: 0 };
        let version = r.i16()?;
        if version != SNAPSHOT_VERSION && version != SNAPSHOT_VERSION_V1 {
            return Err(SnapshotError::Version(version));
        }
        let stored = r.i32()? as u32;
        let computed = crc32c::crc32c(bytes.get(r.pos..).unwrap_or_default());
        if stored != computed {
            return Err(SnapshotError::Crc { stored, computed });
        }
        let offset = r.i64()?;
        let count = r.i32()? as u32 as usize;
        if count > r.remaining() / SNAPSHOT_PRODUCER_BYTES {
            return Err(SnapshotError::Invalid("producer count exceeds the file"));
        }
        let mut state = ProducerStateManager::default();
        for _ in 0..count {
            let producer_id = r.i64()?;
            let producer_epoch = r.i16()?;
            let last_timestamp = r.i64()?;
            let batch_count = usize::from(r.u8()?);
            if batch_count > PRODUCER_BATCHES_RETAINED || producer_id < 0 {
                return Err(SnapshotError::Invalid("bad producer entry"));
            }
            let mut batches = VecDeque::with_capacity(batch_count);
            for _ in 0..batch_count {
                batches.push_back(BatchMetadata {
                    first_seq: r.i32()?,
                    last_seq: r.i32()?,
                    first_offset: r.i64()?,
                    last_offset: r.i64()?,
                    max_timestamp: r.i64()?,
                });
            }
            let entry = ProducerStateEntry {
                producer_id,
                producer_epoch,
                batches,
                last_timestamp,
            };
            if state.producers.insert(producer_id, entry).is_some() {
                return Err(SnapshotError::Invalid("producer id twice"));
            }
        }
        if version >= SNAPSHOT_VERSION {
            let ongoing = r.i32()? as u32 as usize;
            if ongoing > r.remaining() / SNAPSHOT_ONGOING_BYTES {
                return Err(SnapshotError::Invalid(
                    "open transaction count exceeds the file",
                ));
            }
            for _ in 0..ongoing {
                let producer_id = r.i64()?;
                let first_offset = r.i64()?;
                if state.ongoing.insert(producer_id, first_offset).is_some() {
                    return Err(SnapshotError::Invalid("open transaction twice"));
                }
            }
            let aborted = r.i32()? as u32 as usize;
            if aborted > r.remaining() / SNAPSHOT_ABORTED_BYTES {
                return Err(SnapshotError::Invalid(
                    "aborted transaction count exceeds the file",
                ));
            }
            state.aborted.reserve(aborted);
            for _ in 0..aborted {
                let a = AbortedTxn {
                    producer_id: r.i64()?,
                    first_offset: r.i64()?,
                    last_offset: r.i64()?,
                };
                if state
                    .aborted
                    .last()
                    .is_some_and(|l| l.last_offset > a.last_offset)
                {
                    return Err(SnapshotError::Invalid("aborted transactions out of order"));
                }
                state.aborted.push(a);
            }
        }
        if r.remaining() != 0 {
            return Err(SnapshotError::Invalid("bytes after the last producer"));
        }
        Ok((offset, state))
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }
    fn take<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let bytes = self
            .buf
            .get(self.pos..self.pos + N)
            .ok_or(SnapshotError::Truncated)?;
        self.pos += N;
        bytes.try_into().map_err(|_| SnapshotError::Truncated)
    }
    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take::<1>()?[0])
    }
    fn i16(&mut self) -> Result<i16, SnapshotError> {
        Ok(i16::from_be_bytes(self.take()?))
    }
    fn i32(&mut self) -> Result<i32, SnapshotError> {
        Ok(i32::from_be_bytes(self.take()?))
    }
    fn i64(&mut self) -> Result<i64, SnapshotError> {
        Ok(i64::from_be_bytes(self.take()?))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn batch(producer_id: i64, epoch: i16, seq: i32, records: i32) -> ProducerBatch {
        ProducerBatch {
            producer_id,
            producer_epoch: epoch,
            base_sequence: seq,
            last_offset_delta: records - 1,
            max_timestamp: 1000,
            transactional: false,
        }
    }

    /// Validates and, when it is to be appended, appends at `*leo`.
    fn send(
        s: &mut ProducerStateManager,
        leo: &mut i64,
        b: ProducerBatch,
    ) -> Result<Validated, ProducerStateError> {
        let v = s.validate(&b)?;
        if v == Validated::Append {
            s.update(&b, *leo);
            *leo += i64::from(b.last_offset_delta) + 1;
        }
        Ok(v)
    }

    #[test]
    fn in_order_batches_append_and_retries_of_the_last_five_are_duplicates() {
        let mut s = ProducerStateManager::default();
        let mut leo = 0;
        for i in 0..8 {
            assert_eq!(
                send(&mut s, &mut leo, batch(7, 0, i * 2, 2)),
                Ok(Validated::Append)
            );
        }
        assert_eq!(leo, 16);
        // The last five (seq 6..15) are remembered with their offsets.
        for i in 3..8 {
            match send(&mut s, &mut leo, batch(7, 0, i * 2, 2)) {
                Ok(Validated::Duplicate(m)) => {
                    assert_eq!(
                        (m.first_offset, m.last_offset),
                        (i64::from(i) * 2, i64::from(i) * 2 + 1)
                    )
                }
                other => panic!("retry of batch {i}: {other:?}"),
            }
        }
        // Older than the last five: out of order, as in Kafka.
        assert!(matches!(
            send(&mut s, &mut leo, batch(7, 0, 4, 2)),
            Err(ProducerStateError::OutOfOrderSequence { expected: 16, .. })
        ));
        // A retry with a different range is not a duplicate.
        assert!(matches!(
            send(&mut s, &mut leo, batch(7, 0, 14, 1)),
            Err(ProducerStateError::OutOfOrderSequence { .. })
        ));
        assert_eq!(leo, 16, "nothing appended twice");
        assert_eq!(s.get(7).unwrap().last_seq(), 15);
    }

    /// A transactional batch that repeats the sequence of a batch of a transaction
    /// already ended by a marker is a new batch, not a retry: refused, never answered
    /// with the old batch's offset (which would acknowledge a record not in the log).
    /// Within the open transaction a retry is still a duplicate.
    #[test]
    fn a_duplicate_from_an_ended_transaction_is_refused() {
        let mut s = ProducerStateManager::default();
        let mut leo = 0;
        let txn = |seq| ProducerBatch {
            transactional: true,
            ..batch(9, 0, seq, 1)
        };
        assert_eq!(send(&mut s, &mut leo, txn(0)), Ok(Validated::Append));
        assert!(matches!(
            send(&mut s, &mut leo, txn(0)),
            Ok(Validated::Duplicate(m)) if m.first_offset == 0
        ));
        // The transaction is aborted (marker at 1); the client reuses sequence 0.
        s.complete_txn(9, 0, crate::batch::ControlType::Abort, 1, 1000);
        leo = 2;
        assert!(matches!(
            send(&mut s, &mut leo, txn(0)),
            Err(ProducerStateError::OutOfOrderSequence { expected: 1, .. })
        ));
        // The next transaction opens with sequence 1 at offset 2; a batch repeating the
        // aborted one's sequence 0 is still refused, a retry of its own batch is not.
        assert_eq!(send(&mut s, &mut leo, txn(1)), Ok(Validated::Append));
        assert!(matches!(
            send(&mut s, &mut leo, txn(0)),
            Err(ProducerStateError::OutOfOrderSequence { .. })
        ));
        assert!(matches!(
            send(&mut s, &mut leo, txn(1)),
            Ok(Validated::Duplicate(m)) if m.first_offset == 2
        ));
        // Not transactional: duplicates as before.
        let mut s = ProducerStateManager::default();
        let mut leo = 0;
        send(&mut s, &mut leo, batch(3, 0, 0, 1)).unwrap();
        assert!(matches!(
            send(&mut s, &mut leo, batch(3, 0, 0, 1)),
            Ok(Validated::Duplicate(_))
        ));
    }

    #[test]
    fn gaps_old_epochs_and_new_epochs() {
        let mut s = ProducerStateManager::default();
        let mut leo = 0;
        send(&mut s, &mut leo, batch(1, 3, 0, 1)).unwrap();
        assert!(matches!(
            send(&mut s, &mut leo, batch(1, 3, 2, 1)),
            Err(ProducerStateError::OutOfOrderSequence { expected: 1, .. })
        ));
        assert!(matches!(
            send(&mut s, &mut leo, batch(1, 2, 1, 1)),
            Err(ProducerStateError::InvalidProducerEpoch {
                current_epoch: 3,
                ..
            })
        ));
        // A new epoch must start at 0...
        assert!(matches!(
            send(&mut s, &mut leo, batch(1, 4, 1, 1)),
            Err(ProducerStateError::OutOfOrderSequence { expected: 0, .. })
        ));
        assert_eq!(
            send(&mut s, &mut leo, batch(1, 4, 0, 1)),
            Ok(Validated::Append)
        );
        // ...and then the old epoch is fenced, even for its former duplicates.
        assert!(matches!(
            send(&mut s, &mut leo, batch(1, 3, 0, 1)),
            Err(ProducerStateError::InvalidProducerEpoch { .. })
        ));
        assert_eq!(leo, 2);
    }

    #[test]
    fn unknown_producers_start_at_any_sequence_kip_360() {
        let mut s = ProducerStateManager::default();
        let mut leo = 0;
        assert_eq!(
            send(&mut s, &mut leo, batch(9, 5, 42, 3)),
            Ok(Validated::Append)
        );
        assert_eq!(
            send(&mut s, &mut leo, batch(9, 5, 45, 1)),
            Ok(Validated::Append)
        );
        // Expired after a day of silence, then any sequence is accepted again.
        assert_eq!(
            s.remove_expired(
                1000 + PRODUCER_ID_EXPIRATION_MS_DEFAULT - 1,
                PRODUCER_ID_EXPIRATION_MS_DEFAULT
            ),
            0
        );
        assert_eq!(
            s.remove_expired(
                1000 + PRODUCER_ID_EXPIRATION_MS_DEFAULT,
                PRODUCER_ID_EXPIRATION_MS_DEFAULT
            ),
            1
        );
        assert_eq!(
            send(&mut s, &mut leo, batch(9, 5, 100, 1)),
            Ok(Validated::Append)
        );
    }

    #[test]
    fn sequences_wrap_at_i32_max() {
        assert_eq!(increment_sequence(i32::MAX, 1), 0);
        assert_eq!(increment_sequence(i32::MAX - 1, 3), 1);
        assert!(in_sequence(i32::MAX, 0));
        assert!(!in_sequence(i32::MAX, 1));
        let mut s = ProducerStateManager::default();
        let mut leo = 0;
        send(&mut s, &mut leo, batch(2, 0, i32::MAX - 1, 4)).unwrap();
        // MAX-1, MAX, 0, 1.
        assert_eq!(s.get(2).unwrap().last_seq(), 1);
        assert_eq!(
            send(&mut s, &mut leo, batch(2, 0, 2, 1)),
            Ok(Validated::Append)
        );
        assert!(matches!(
            send(&mut s, &mut leo, batch(2, 0, i32::MAX - 1, 4)),
            Ok(Validated::Duplicate(_))
        ));
    }

    #[test]
    fn bad_fields_are_refused() {
        let s = ProducerStateManager::default();
        assert!(matches!(
            s.validate(&batch(1, 0, -1, 1)),
            Err(ProducerStateError::InvalidSequence { .. })
        ));
        assert!(matches!(
            s.validate(&batch(1, -1, 0, 1)),
            Err(ProducerStateError::InvalidSequence { .. })
        ));
    }

    #[test]
    fn transactions_open_close_and_bound_the_last_stable_offset() {
        use crate::batch::ControlType;
        let mut s = ProducerStateManager::default();
        let mut leo = 0;
        let txn = |pid, epoch, seq, n| {
            let mut b = batch(pid, epoch, seq, n);
            b.transactional = true;
            b
        };
        send(&mut s, &mut leo, batch(9, 0, 0, 2)).unwrap(); // 0..2 idempotent
        send(&mut s, &mut leo, txn(1, 0, 0, 3)).unwrap(); // 2..5
        send(&mut s, &mut leo, txn(2, 0, 0, 1)).unwrap(); // 5
        send(&mut s, &mut leo, txn(1, 0, 3, 1)).unwrap(); // 6
        assert_eq!(s.first_unstable_offset(), Some(2));
        // A plain batch of a producer inside a transaction is refused.
        assert_eq!(
            s.validate(&batch(1, 0, 4, 1)),
            Err(ProducerStateError::NonTransactionalInTxn(1))
        );
        // Producer 1 aborts at offset 7: its range is remembered, the LSO moves to 5.
        s.complete_txn(1, 0, ControlType::Abort, 7, 1000);
        leo += 1;
        assert_eq!(s.first_unstable_offset(), Some(5));
        // Producer 2 commits at 8: nothing open.
        s.complete_txn(2, 0, ControlType::Commit, 8, 1000);
        leo += 1;
        assert_eq!(s.first_unstable_offset(), None);
        let aborted = vec![AbortedTxn {
            producer_id: 1,
            first_offset: 2,
            last_offset: 7,
        }];
        assert_eq!(s.aborted_in_range(0, leo), aborted);
        assert_eq!(s.aborted_in_range(7, leo), aborted);
        assert_eq!(s.aborted_in_range(8, leo), vec![]);
        assert_eq!(s.aborted_in_range(0, 2), vec![]);
        // A fencing marker (timeout) bumps the epoch: the zombie's batches are refused.
        send(&mut s, &mut leo, txn(1, 1, 0, 1)).unwrap();
        s.complete_txn(1, 2, ControlType::Abort, leo, 1000);
        leo += 1;
        assert!(matches!(
            s.validate(&txn(1, 1, 1, 1)),
            Err(ProducerStateError::InvalidProducerEpoch { .. })
        ));
        assert!(s.validate_marker(1, 1).is_err());
        assert!(s.validate_marker(1, 2).is_ok());
        // Everything round-trips through a snapshot, open transactions included.
        send(&mut s, &mut leo, txn(3, 0, 0, 1)).unwrap();
        let (_, decoded) = ProducerStateManager::decode_snapshot(&s.encode_snapshot(leo)).unwrap();
        assert_eq!(decoded, s);
        assert_eq!(decoded.first_unstable_offset(), Some(leo - 1));
        // Retention forgets aborted ranges below the log start.
        s.remove_aborted_below(8);
        assert_eq!(s.aborted_in_range(0, leo).len(), 1);
        s.remove_aborted_below(leo);
        assert!(s.aborted_in_range(0, leo).is_empty());
    }

    #[test]
    fn version_1_snapshots_still_load() {
        let mut s = ProducerStateManager::default();
        let mut leo = 0;
        send(&mut s, &mut leo, batch(4, 1, 0, 2)).unwrap();
        let mut v2 = s.encode_snapshot(leo);
        // A version 1 file is the version 2 body without the two trailing counts.
        v2.truncate(v2.len() - 8);
        v2[0..2].copy_from_slice(&1i16.to_be_bytes());
        let crc = crc32c::crc32c(&v2[6..]);
        v2[2..6].copy_from_slice(&crc.to_be_bytes());
        let (offset, decoded) = ProducerStateManager::decode_snapshot(&v2).unwrap();
        assert_eq!((offset, decoded), (leo, s));
    }

    #[test]
    fn snapshot_round_trips_and_detects_damage() {
        let mut s = ProducerStateManager::default();
        let mut leo = 0;
        for p in 0..20 {
            for i in 0..(p % 7) {
                send(&mut s, &mut leo, batch(p, (p % 3) as i16, i as i32, 1)).unwrap();
            }
        }
        let bytes = s.encode_snapshot(leo);
        assert_eq!(
            ProducerStateManager::decode_snapshot(&bytes),
            Ok((leo, s.clone()))
        );
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x04;
            assert!(
                ProducerStateManager::decode_snapshot(&bad).is_err(),
                "flip at {i}"
            );
        }
        for len in 0..bytes.len() {
            assert!(ProducerStateManager::decode_snapshot(&bytes[..len]).is_err());
        }
        let empty = ProducerStateManager::default().encode_snapshot(5);
        assert_eq!(
            ProducerStateManager::decode_snapshot(&empty),
            Ok((5, ProducerStateManager::default()))
        );
    }

    /// What a producer client does next (the sequence numbers are the model's).
    #[derive(Debug, Clone)]
    enum Op {
        /// The producer's next batch, in order.
        Next { producer: usize, records: i32 },
        /// A retry of one of the producer's last five acknowledged batches.
        Retry { producer: usize, back: usize },
        /// A batch that skips sequence numbers.
        Gap { producer: usize, skip: i32 },
        /// A batch with an epoch below the current one.
        OldEpoch { producer: usize },
        /// The producer bumps its epoch (KIP-360) and restarts at sequence 0, or, wrongly,
        /// at another sequence.
        Bump { producer: usize, first_seq: i32 },
        /// The broker restarts: state rebuilt from the log, with or without a snapshot
        /// taken at some earlier point.
        Restart { snapshot_at: Option<usize> },
    }

    fn op() -> impl Strategy<Value = Op> {
        let p = 0..3usize;
        prop_oneof![
            4 => (p.clone(), 1..4i32).prop_map(|(producer, records)| Op::Next { producer, records }),
            3 => (p.clone(), 0..5usize).prop_map(|(producer, back)| Op::Retry { producer, back }),
            1 => (p.clone(), 1..10i32).prop_map(|(producer, skip)| Op::Gap { producer, skip }),
            1 => p.clone().prop_map(|producer| Op::OldEpoch { producer }),
            1 => (p, prop_oneof![3 => Just(0), 1 => 1..5i32])
                .prop_map(|(producer, first_seq)| Op::Bump { producer, first_seq }),
            1 => proptest::option::of(0..64usize).prop_map(|snapshot_at| Op::Restart { snapshot_at }),
        ]
    }

    /// The client's view: its epoch, its next sequence, and every batch acknowledged in
    /// the current epoch with the offset it was acknowledged at.
    #[derive(Debug, Clone, Default)]
    struct Client {
        epoch: i16,
        next_seq: i32,
        acked: Vec<(i32, i32, i64)>, // (base sequence, records, base offset)
    }

    proptest! {
        #[test]
        fn sequence_rules_match_a_client_model(
            ops in proptest::collection::vec(op(), 1..120),
            // Producer 2 starts near i32::MAX so that its sequences wrap.
            start in prop_oneof![Just(0), Just(i32::MAX - 3)],
        ) {
            let mut state = ProducerStateManager::default();
            // The "log": every batch appended, in order, with its base offset.
            let mut log: Vec<(ProducerBatch, i64)> = Vec::new();
            let mut leo = 0i64;
            let mut clients = vec![Client::default(); 3];
            clients[2].next_seq = start;
            for op in ops {
                match op {
                    Op::Next { producer, records } => {
                        let c = &mut clients[producer];
                        let b = batch(producer as i64, c.epoch, c.next_seq, records);
                        prop_assert_eq!(state.validate(&b), Ok(Validated::Append));
                        state.update(&b, leo);
                        log.push((b, leo));
                        c.acked.push((c.next_seq, records, leo));
                        c.next_seq = increment_sequence(c.next_seq, records);
                        leo += i64::from(records);
                    }
                    Op::Retry { producer, back } => {
                        let c = &clients[producer];
                        let Some(&(seq, records, offset)) =
                            c.acked.iter().rev().take(PRODUCER_BATCHES_RETAINED).nth(back)
                        else { continue };
                        let b = batch(producer as i64, c.epoch, seq, records);
                        match state.validate(&b) {
                            Ok(Validated::Duplicate(m)) => {
                                prop_assert_eq!(m.first_offset, offset);
                                prop_assert_eq!(m.last_offset, offset + i64::from(records) - 1);
                            }
                            other => prop_assert!(false, "retry answered {:?}", other),
                        }
                    }
                    Op::Gap { producer, skip } => {
                        let c = &clients[producer];
                        if c.acked.is_empty() { continue } // no state: any sequence is fine
                        let b = batch(producer as i64, c.epoch, increment_sequence(c.next_seq, skip), 1);
                        let is_out_of_order = matches!(state.validate(&b), Err(ProducerStateError::OutOfOrderSequence { .. }));
                        prop_assert!(is_out_of_order);
                    }
                    Op::OldEpoch { producer } => {
                        let c = &clients[producer];
                        if c.epoch == 0 || c.acked.is_empty() { continue }
                        let b = batch(producer as i64, c.epoch - 1, c.next_seq, 1);
                        let is_fenced = matches!(state.validate(&b), Err(ProducerStateError::InvalidProducerEpoch { .. }));
                        prop_assert!(is_fenced);
                    }
                    Op::Bump { producer, first_seq } => {
                        let c = &mut clients[producer];
                        if c.epoch == i16::MAX { continue }
                        let b = batch(producer as i64, c.epoch + 1, first_seq, 1);
                        let known = !c.acked.is_empty() || state.get(producer as i64).is_some();
                        let v = state.validate(&b);
                        if first_seq == 0 || !known {
                            prop_assert_eq!(v, Ok(Validated::Append));
                            state.update(&b, leo);
                            log.push((b, leo));
                            c.epoch += 1;
                            c.acked = vec![(first_seq, 1, leo)];
                            c.next_seq = increment_sequence(first_seq, 1);
                            leo += 1;
                        } else {
                            let is_out_of_order = matches!(v, Err(ProducerStateError::OutOfOrderSequence { expected: 0, .. }));
                            prop_assert!(is_out_of_order);
                        }
                    }
                    Op::Restart { snapshot_at } => {
                        // Rebuilt from a snapshot of the state after the first `at`
                        // batches plus the rest of the log, or from the whole log.
                        let at = snapshot_at.map_or(0, |a| a.min(log.len()));
                        let mut rebuilt = ProducerStateManager::default();
                        for (b, offset) in log.iter().take(at) {
                            rebuilt.update(b, *offset);
                        }
                        if snapshot_at.is_some() {
                            let snap_offset = log.get(at).map_or(leo, |(_, o)| *o);
                            let bytes = rebuilt.encode_snapshot(snap_offset);
                            let (decoded_offset, decoded) = ProducerStateManager::decode_snapshot(&bytes).unwrap();
                            prop_assert_eq!(decoded_offset, snap_offset);
                            rebuilt = decoded;
                        }
                        for (b, offset) in log.iter().skip(at) {
                            rebuilt.update(b, *offset);
                        }
                        prop_assert_eq!(&rebuilt, &state);
                        state = rebuilt;
                    }
                }
            }
            // No sequence of any epoch is in the log twice, and each epoch's sequences
            // are contiguous from where they started.
            for p in 0..3i64 {
                let mut seen = std::collections::BTreeSet::new();
                let mut prev: Option<(i16, i32)> = None;
                for (b, _) in log.iter().filter(|(b, _)| b.producer_id == p) {
                    for i in 0..=b.last_offset_delta {
                        prop_assert!(seen.insert((b.producer_epoch, increment_sequence(b.base_sequence, i))));
                    }
                    if let Some((epoch, last)) = prev {
                        if epoch == b.producer_epoch {
                            prop_assert!(in_sequence(last, b.base_sequence));
                        }
                    }
                    prev = Some((b.producer_epoch, b.last_seq()));
                }
            }
        }
    }
}
