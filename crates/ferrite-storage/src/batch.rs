//! The record batch (magic v2) header: the only place that knows its byte layout.
//!
//! The broker never decodes records on the produce or fetch path. It reads the fixed
//! 61-byte header, checks it, and writes `base_offset` and `partition_leader_epoch`
//! in place: the CRC-32C starts at `attributes`, so those two fields are outside it.

use crate::error::BatchError;

/// Byte offsets of the header fields (Kafka's `DefaultRecordBatch`).
pub const BASE_OFFSET_AT: usize = 0;
pub const BATCH_LENGTH_AT: usize = 8;
pub const PARTITION_LEADER_EPOCH_AT: usize = 12;
pub const MAGIC_AT: usize = 16;
pub const CRC_AT: usize = 17;
pub const ATTRIBUTES_AT: usize = 21;
pub const LAST_OFFSET_DELTA_AT: usize = 23;
pub const BASE_TIMESTAMP_AT: usize = 27;
pub const MAX_TIMESTAMP_AT: usize = 35;
pub const PRODUCER_ID_AT: usize = 43;
pub const PRODUCER_EPOCH_AT: usize = 51;
pub const BASE_SEQUENCE_AT: usize = 53;
pub const RECORD_COUNT_AT: usize = 57;
/// Size of the v2 header, records start here.
pub const HEADER_BYTES: usize = 61;
/// `base_offset` and `batch_length` precede the part that `batch_length` counts.
pub const LOG_OVERHEAD_BYTES: usize = 12;

pub const ATTR_COMPRESSION_MASK: i16 = 0x07;
pub const ATTR_TIMESTAMP_TYPE_LOG_APPEND: i16 = 0x08;
pub const ATTR_TRANSACTIONAL: i16 = 0x10;
pub const ATTR_CONTROL: i16 = 0x20;

#[allow(clippy::indexing_slicing)] // Callers check the bounds.
fn read_i64(buf: &[u8], at: usize) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    i64::from_be_bytes(b)
}
#[allow(clippy::indexing_slicing)]
fn read_i32(buf: &[u8], at: usize) -> i32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    i32::from_be_bytes(b)
}
#[allow(clippy::indexing_slicing)]
fn read_i16(buf: &[u8], at: usize) -> i16 {
    let mut b = [0u8; 2];
    b.copy_from_slice(&buf[at..at + 2]);
    i16::from_be_bytes(b)
}

/// The fields of a v2 batch header that storage needs. Built only by [`BatchHeader::parse`],
/// which guarantees the buffer held at least [`HEADER_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    /// Bytes after the `batch_length` field; the whole batch is `batch_length + 12` bytes.
    pub batch_length: i32,
    pub partition_leader_epoch: i32,
    pub magic: i8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub record_count: i32,
}

impl BatchHeader {
    /// Parses the header at the start of `buf`. Checks only what is needed to know the
    /// batch's extent; [`validate_batch`] checks the rest.
    #[allow(clippy::indexing_slicing)] // Bounds checked on the first line.
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        if buf.len() < HEADER_BYTES {
            return Err(BatchError::Truncated {
                have: buf.len(),
                need: HEADER_BYTES,
            });
        }
        Ok(BatchHeader {
            base_offset: read_i64(buf, BASE_OFFSET_AT),
            batch_length: read_i32(buf, BATCH_LENGTH_AT),
            partition_leader_epoch: read_i32(buf, PARTITION_LEADER_EPOCH_AT),
            magic: buf[MAGIC_AT] as i8,
            crc: read_i32(buf, CRC_AT) as u32,
            attributes: read_i16(buf, ATTRIBUTES_AT),
            last_offset_delta: read_i32(buf, LAST_OFFSET_DELTA_AT),
            base_timestamp: read_i64(buf, BASE_TIMESTAMP_AT),
            max_timestamp: read_i64(buf, MAX_TIMESTAMP_AT),
            producer_id: read_i64(buf, PRODUCER_ID_AT),
            producer_epoch: read_i16(buf, PRODUCER_EPOCH_AT),
            base_sequence: read_i32(buf, BASE_SEQUENCE_AT),
            record_count: read_i32(buf, RECORD_COUNT_AT),
        })
    }

    /// Total size of the batch on disk and on the wire.
    pub fn total_bytes(&self) -> Result<usize, BatchError> {
        let len = usize::try_from(self.batch_length)
            .map_err(|_| BatchError::BadLength(self.batch_length))?;
        let total = len + LOG_OVERHEAD_BYTES;
        if total < HEADER_BYTES {
            return Err(BatchError::BadLength(self.batch_length));
        }
        Ok(total)
    }

    pub fn last_offset(&self) -> i64 {
        self.base_offset + i64::from(self.last_offset_delta)
    }

    pub fn is_control(&self) -> bool {
        self.attributes & ATTR_CONTROL != 0
    }
}

/// CRC-32C of a whole batch, computed over `attributes..end` as Kafka defines it.
#[allow(clippy::indexing_slicing)] // Callers pass a batch of at least HEADER_BYTES.
pub fn compute_crc(batch: &[u8]) -> u32 {
    assert!(batch.len() >= HEADER_BYTES);
    crc32c::crc32c(&batch[ATTRIBUTES_AT..])
}

/// Checks one complete batch, as produced by a client or read back from disk:
/// magic 2, a length that matches the buffer, a CRC that matches, and a record count that
/// agrees with `last_offset_delta`.
pub fn validate_batch(batch: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::parse(batch)?;
    if header.magic != 2 {
        return Err(BatchError::UnsupportedMagic(header.magic));
    }
    let total = header.total_bytes()?;
    if total != batch.len() {
        return Err(BatchError::BadLength(header.batch_length));
    }
    let actual = compute_crc(batch);
    if actual != header.crc {
        return Err(BatchError::CrcMismatch {
            expected: header.crc,
            actual,
        });
    }
    if header.record_count < 0 || header.last_offset_delta < 0 {
        return Err(BatchError::BadRecordCount {
            record_count: header.record_count,
            last_offset_delta: header.last_offset_delta,
        });
    }
    Ok(header)
}

/// Validation for batches arriving from a producer, stricter than for batches on disk:
/// a producer batch holds at least one record and its offsets are dense (compaction may
/// later leave gaps, but a producer never does).
pub fn validate_producer_batch(batch: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = validate_batch(batch)?;
    if header.record_count == 0 || header.record_count - 1 != header.last_offset_delta {
        return Err(BatchError::BadRecordCount {
            record_count: header.record_count,
            last_offset_delta: header.last_offset_delta,
        });
    }
    if header.is_control() {
        return Err(BatchError::ControlFromProducer);
    }
    Ok(header)
}

/// Kafka's `ControlRecordType` of an end-transaction marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlType {
    Abort,
    Commit,
}

/// Builds an end-transaction marker (Kafka's `EndTransactionMarker` in a control batch):
/// one record whose key is `(version 0, type)` and whose value is `(version 0,
/// coordinator_epoch)`, attributes transactional + control, no compression, base
/// sequence -1. `base_offset` and `partition_leader_epoch` are assigned at append.
pub fn end_txn_marker_batch(
    producer_id: i64,
    producer_epoch: i16,
    control: ControlType,
    coordinator_epoch: i32,
    timestamp: i64,
) -> Vec<u8> {
    let kind: i16 = match control {
        ControlType::Abort => 0,
        ControlType::Commit => 1,
    };
    let mut key = Vec::with_capacity(4);
    key.extend_from_slice(&0i16.to_be_bytes());
    key.extend_from_slice(&kind.to_be_bytes());
    let mut value = Vec::with_capacity(6);
    value.extend_from_slice(&0i16.to_be_bytes());
    value.extend_from_slice(&coordinator_epoch.to_be_bytes());
    let mut body = vec![0u8]; // record attributes
    push_zigzag(&mut body, 0); // timestamp delta
    push_zigzag(&mut body, 0); // offset delta
    push_zigzag(&mut body, key.len() as i64);
    body.extend_from_slice(&key);
    push_zigzag(&mut body, value.len() as i64);
    body.extend_from_slice(&value);
    push_zigzag(&mut body, 0); // headers
    let mut record = Vec::with_capacity(body.len() + 1);
    push_zigzag(&mut record, body.len() as i64);
    record.extend_from_slice(&body);

    let mut b = Vec::with_capacity(HEADER_BYTES + record.len());
    b.extend_from_slice(&0i64.to_be_bytes());
    let batch_length = (HEADER_BYTES - LOG_OVERHEAD_BYTES + record.len()) as i32;
    b.extend_from_slice(&batch_length.to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.push(2);
    b.extend_from_slice(&0u32.to_be_bytes()); // CRC, below
    b.extend_from_slice(&(ATTR_TRANSACTIONAL | ATTR_CONTROL).to_be_bytes());
    b.extend_from_slice(&0i32.to_be_bytes()); // last offset delta
    b.extend_from_slice(&timestamp.to_be_bytes());
    b.extend_from_slice(&timestamp.to_be_bytes());
    b.extend_from_slice(&producer_id.to_be_bytes());
    b.extend_from_slice(&producer_epoch.to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.extend_from_slice(&1i32.to_be_bytes());
    b.extend_from_slice(&record);
    let crc = compute_crc(&b);
    if let Some(field) = b.get_mut(CRC_AT..CRC_AT + 4) {
        field.copy_from_slice(&crc.to_be_bytes());
    }
    b
}

fn push_zigzag(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn read_zigzag(buf: &[u8], pos: &mut usize) -> Option<i64> {
    let mut z: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        z |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(((z >> 1) as i64) ^ -((z & 1) as i64));
        }
    }
    None
}

/// The marker type of a control batch (the key of its first record), `None` when the
/// batch is not a control batch, is compressed, or its key is not an end-transaction
/// marker's (Kafka skips unknown control types too).
pub fn control_type(batch: &[u8]) -> Option<ControlType> {
    let header = BatchHeader::parse(batch).ok()?;
    if !header.is_control() || header.attributes & ATTR_COMPRESSION_MASK != 0 {
        return None;
    }
    let mut pos = HEADER_BYTES;
    read_zigzag(batch, &mut pos)?; // record length
    pos += 1; // attributes
    read_zigzag(batch, &mut pos)?; // timestamp delta
    read_zigzag(batch, &mut pos)?; // offset delta
    let key_len = read_zigzag(batch, &mut pos)?;
    if key_len < 4 {
        return None;
    }
    let key = batch.get(pos..pos + 4)?;
    match i16::from_be_bytes([*key.get(2)?, *key.get(3)?]) {
        0 => Some(ControlType::Abort),
        1 => Some(ControlType::Commit),
        _ => None,
    }
}

/// Splits a buffer of concatenated batches into whole batches. Stops with an error at the
/// first batch whose header or extent is bad; the caller decides what that means
/// (produce: reject all; recovery: truncate).
pub struct BatchIter<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> BatchIter<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        BatchIter { buf, pos: 0 }
    }
    /// Bytes consumed by the batches returned so far.
    pub fn position(&self) -> usize {
        self.pos
    }
}

impl<'a> Iterator for BatchIter<'a> {
    /// `(position in buffer, header, whole batch bytes)`
    type Item = Result<(usize, BatchHeader, &'a [u8]), BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.buf.get(self.pos..)?;
        if rest.is_empty() {
            return None;
        }
        // After an error the iterator is finished (fused), so that a caller that keeps
        // pulling, or `flatten`s, cannot spin on the same bad bytes.
        let header = match BatchHeader::parse(rest) {
            Ok(h) => h,
            Err(e) => {
                self.pos = self.buf.len();
                return Some(Err(e));
            }
        };
        let total = match header.total_bytes() {
            Ok(t) => t,
            Err(e) => {
                self.pos = self.buf.len();
                return Some(Err(e));
            }
        };
        let Some(batch) = rest.get(..total) else {
            self.pos = self.buf.len();
            return Some(Err(BatchError::Truncated {
                have: rest.len(),
                need: total,
            }));
        };
        let at = self.pos;
        self.pos += total;
        Some(Ok((at, header, batch)))
    }
}

/// Writes the broker-assigned fields into a batch header. Neither is covered by the CRC.
#[allow(clippy::indexing_slicing)] // Caller passes a validated batch.
pub fn assign_offset_and_epoch(batch: &mut [u8], base_offset: i64, leader_epoch: i32) {
    assert!(batch.len() >= HEADER_BYTES);
    batch[BASE_OFFSET_AT..BASE_OFFSET_AT + 8].copy_from_slice(&base_offset.to_be_bytes());
    batch[PARTITION_LEADER_EPOCH_AT..PARTITION_LEADER_EPOCH_AT + 4]
        .copy_from_slice(&leader_epoch.to_be_bytes());
}

/// For `message.timestamp.type=LogAppendTime`: the broker stamps the batch with its own
/// clock. Attributes and max timestamp are inside the CRC, so it is recomputed; records
/// are untouched (their deltas are ignored by readers of a LogAppendTime batch).
#[allow(clippy::indexing_slicing)] // Caller passes a validated batch.
pub fn stamp_log_append_time(batch: &mut [u8], now_ms: i64) {
    assert!(batch.len() >= HEADER_BYTES);
    let attributes = read_i16(batch, ATTRIBUTES_AT) | ATTR_TIMESTAMP_TYPE_LOG_APPEND;
    batch[ATTRIBUTES_AT..ATTRIBUTES_AT + 2].copy_from_slice(&attributes.to_be_bytes());
    set_max_timestamp(batch, now_ms);
}

/// Rewrites a batch's `maxTimestamp` and the CRC that covers it.
#[allow(clippy::indexing_slicing)] // Caller passes a validated batch.
pub fn set_max_timestamp(batch: &mut [u8], max_timestamp: i64) {
    assert!(batch.len() >= HEADER_BYTES);
    batch[MAX_TIMESTAMP_AT..MAX_TIMESTAMP_AT + 8].copy_from_slice(&max_timestamp.to_be_bytes());
    let crc = compute_crc(batch);
    batch[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
}

/// Kafka's `RecordBatch.NO_TIMESTAMP`: a record or batch without a timestamp.
pub const NO_TIMESTAMP: i64 = -1;

/// The timestamp rules of a topic, for [`check_producer_timestamps`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimestampRules {
    /// `message.timestamp.type=LogAppendTime`: the broker stamps every batch itself.
    pub log_append_time: bool,
    /// `message.timestamp.before.max.ms` (KIP-937): how far a CreateTime record may lie
    /// behind the broker's clock; `i64::MAX` (the default) is unbounded.
    pub before_max_ms: i64,
    /// `message.timestamp.after.max.ms` (KIP-937): how far ahead of it.
    pub after_max_ms: i64,
}

impl Default for TimestampRules {
    fn default() -> Self {
        TimestampRules {
            log_append_time: false,
            before_max_ms: i64::MAX,
            after_max_ms: i64::MAX,
        }
    }
}

/// Header-only: whether the producer's `maxTimestamp` can be stored as sent. A producer
/// writes the first record's timestamp as `baseTimestamp`, so a true maximum is never
/// below it; -1, 0 or anything under `baseTimestamp` (sarama before IBM/sarama#3108)
/// is not a maximum and would let retention delete the batch early.
pub fn max_timestamp_plausible(header: &BatchHeader) -> bool {
    header.base_timestamp >= 0 && header.max_timestamp >= header.base_timestamp
}

/// Checks the timestamps of a producer batch the way Kafka's `LogValidator` does and
/// returns the `maxTimestamp` to store when it differs from the header's (the caller
/// rewrites it with [`set_max_timestamp`]).
///
/// A well-formed CreateTime batch under the default (unbounded) KIP-937 limits costs
/// only the header check: its records are not read. The records are decoded, within
/// the vendored decoder's 64 MiB decompression bound, only when the header's maximum is
/// implausible (then the maximum is recomputed from them, as Kafka does for every batch)
/// or when the topic bounds record timestamps (then each record is checked, as Kafka
/// does). A batch that cannot be decoded for that is refused, never stored with a
/// maximum the broker could not verify.
pub fn check_producer_timestamps(
    batch: &[u8],
    header: &BatchHeader,
    rules: &TimestampRules,
    now_ms: i64,
) -> Result<Option<i64>, BatchError> {
    // Only a broker writes LogAppendTime batches; Kafka answers INVALID_TIMESTAMP. (On a
    // CreateTime topic Kafka would reinterpret such a batch; Ferrite refuses it too.)
    if header.attributes & ATTR_TIMESTAMP_TYPE_LOG_APPEND != 0 {
        return Err(BatchError::LogAppendTimeFromProducer);
    }
    if rules.log_append_time {
        return Ok(None); // Stamped with the broker's clock at append.
    }
    let bounded = rules.before_max_ms != i64::MAX || rules.after_max_ms != i64::MAX;
    if max_timestamp_plausible(header) && !bounded {
        return Ok(None);
    }
    let mut bytes = bytes::Bytes::copy_from_slice(batch);
    let set = kafka_protocol::records::RecordBatchDecoder::decode(&mut bytes).map_err(|e| {
        BatchError::Undecodable {
            max_timestamp: header.max_timestamp,
            base_timestamp: header.base_timestamp,
            reason: format!("{e:#}"),
        }
    })?;
    if set.records.len() != usize::try_from(header.record_count).unwrap_or(usize::MAX) {
        return Err(BatchError::Undecodable {
            max_timestamp: header.max_timestamp,
            base_timestamp: header.base_timestamp,
            reason: format!(
                "{} records decoded, header says {}",
                set.records.len(),
                header.record_count
            ),
        });
    }
    let mut max = NO_TIMESTAMP;
    for (index, r) in set.records.iter().enumerate() {
        if r.timestamp != NO_TIMESTAMP {
            // i128: `now - timestamp` overflows i64 for timestamps near i64::MIN/MAX.
            let behind = i128::from(now_ms) - i128::from(r.timestamp);
            if behind > i128::from(rules.before_max_ms) || -behind > i128::from(rules.after_max_ms)
            {
                return Err(BatchError::TimestampOutOfRange {
                    index,
                    timestamp: r.timestamp,
                    earliest: now_ms.saturating_sub(rules.before_max_ms),
                    latest: now_ms.saturating_add(rules.after_max_ms),
                });
            }
        }
        max = max.max(r.timestamp);
    }
    Ok((max != header.max_timestamp).then_some(max))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::test_support::make_batch;
    use proptest::prelude::*;

    #[test]
    fn end_txn_marker_is_kafkas_control_batch() {
        for (control, kind) in [(ControlType::Abort, 0i16), (ControlType::Commit, 1)] {
            let b = end_txn_marker_batch(7, 3, control, 5, 1234);
            let h = validate_batch(&b).unwrap();
            assert!(h.is_control());
            assert_ne!(h.attributes & ATTR_TRANSACTIONAL, 0);
            assert_eq!(
                (h.producer_id, h.producer_epoch, h.base_sequence),
                (7, 3, -1)
            );
            assert_eq!((h.record_count, h.last_offset_delta), (1, 0));
            assert_eq!(control_type(&b), Some(control));
            // Kafka's own record decoder reads it as a control record with that key.
            let mut bytes = bytes::Bytes::from(b.clone());
            let set = kafka_protocol::records::RecordBatchDecoder::decode(&mut bytes).unwrap();
            let r = &set.records[0];
            assert!(r.control && r.transactional);
            let key = r.key.as_ref().unwrap();
            assert_eq!(&key[..], &[0, 0, 0, kind as u8][..]);
            let value = r.value.as_ref().unwrap();
            assert_eq!(&value[..], &[0, 0, 0, 0, 0, 5][..]);
        }
        assert_eq!(control_type(&make_batch(1, 0, b"x")), None);
    }

    #[test]
    fn valid_batch_passes_and_flipped_bit_fails() {
        let b = make_batch(3, 1000, b"hello");
        let h = validate_producer_batch(&b).unwrap();
        assert_eq!(h.record_count, 3);
        assert_eq!(h.last_offset_delta, 2);
        for i in ATTRIBUTES_AT..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert!(
                validate_producer_batch(&c).is_err(),
                "flip at {i} not caught"
            );
        }
    }

    #[test]
    fn offset_and_epoch_are_outside_the_crc() {
        let mut b = make_batch(2, 0, b"x");
        assign_offset_and_epoch(&mut b, 12345, 7);
        let h = validate_batch(&b).unwrap();
        assert_eq!(h.base_offset, 12345);
        assert_eq!(h.partition_leader_epoch, 7);
        assert_eq!(h.last_offset(), 12346);
    }

    #[test]
    fn log_append_time_keeps_crc_valid() {
        let mut b = make_batch(2, 0, b"x");
        stamp_log_append_time(&mut b, 99);
        let h = validate_batch(&b).unwrap();
        assert_eq!(h.max_timestamp, 99);
        assert!(h.attributes & ATTR_TIMESTAMP_TYPE_LOG_APPEND != 0);
    }

    #[test]
    fn record_count_must_match_delta() {
        let mut b = make_batch(2, 0, b"x");
        b[RECORD_COUNT_AT..RECORD_COUNT_AT + 4].copy_from_slice(&5i32.to_be_bytes());
        let crc = compute_crc(&b);
        b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            validate_producer_batch(&b),
            Err(BatchError::BadRecordCount { .. })
        ));
    }

    #[test]
    fn iterator_is_fused_after_an_error() {
        let mut it = BatchIter::new(&[0u8; 10]);
        assert!(matches!(it.next(), Some(Err(_))));
        assert!(it.next().is_none());
    }

    proptest! {
        // No input may panic the validator or the iterator (the fuzz target runs the same),
        // and the iterator always ends.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = validate_producer_batch(&data);
            let steps = BatchIter::new(&data).take(data.len() + 2).count();
            prop_assert!(steps <= data.len() / HEADER_BYTES + 1);
        }
    }
}
