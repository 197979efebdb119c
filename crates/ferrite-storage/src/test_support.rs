//! Builders of valid magic-2 record batches, shared by the tests and benchmarks of the
//! workspace. The broker itself never builds a batch (it stores what producers send), so
//! nothing here runs on a request path.

use crate::batch::{ATTRIBUTES_AT, HEADER_BYTES, LOG_OVERHEAD_BYTES};

/// Appends `v` as a zigzag varint, the encoding of record fields (Kafka's
/// `ByteUtils.writeVarlong`).
pub fn push_varint(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// One length-prefixed record: attributes 0, timestamp delta 0, `offset_delta`, a null
/// key, `value`, no headers.
pub fn record(offset_delta: i64, value: &[u8]) -> Vec<u8> {
    record_at(offset_delta, 0, value)
}

/// Like [`record`], with the record's timestamp `base_timestamp + timestamp_delta`.
pub fn record_at(offset_delta: i64, timestamp_delta: i64, value: &[u8]) -> Vec<u8> {
    let mut body = vec![0u8];
    push_varint(&mut body, timestamp_delta);
    push_varint(&mut body, offset_delta);
    push_varint(&mut body, -1);
    push_varint(&mut body, value.len() as i64);
    body.extend_from_slice(value);
    push_varint(&mut body, 0);
    let mut out = Vec::with_capacity(body.len() + 3);
    push_varint(&mut out, body.len() as i64);
    out.extend_from_slice(&body);
    out
}

/// The v2 batch header (base offset 0, no producer id) around `records`, already
/// encoded and, if `attributes` says so, compressed; the CRC-32C covers attributes on.
pub fn batch_around(
    attributes: i16,
    record_count: i32,
    base_timestamp: i64,
    max_timestamp: i64,
    records: &[u8],
) -> Vec<u8> {
    batch_around_producer(
        attributes,
        record_count,
        base_timestamp,
        max_timestamp,
        records,
        Producer::NONE,
    )
}

/// The producer fields of a batch header: id, epoch and the first record's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Producer {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
}

impl Producer {
    /// A plain (non-idempotent) producer: Kafka's NO_PRODUCER_ID, NO_PRODUCER_EPOCH,
    /// NO_SEQUENCE.
    pub const NONE: Producer = Producer {
        producer_id: -1,
        producer_epoch: -1,
        base_sequence: -1,
    };
}

/// [`batch_around`] with the producer fields of an idempotent producer.
pub fn batch_around_producer(
    attributes: i16,
    record_count: i32,
    base_timestamp: i64,
    max_timestamp: i64,
    records: &[u8],
    producer: Producer,
) -> Vec<u8> {
    let mut after_crc = Vec::with_capacity(HEADER_BYTES - ATTRIBUTES_AT + records.len());
    after_crc.extend_from_slice(&attributes.to_be_bytes());
    after_crc.extend_from_slice(&(record_count - 1).to_be_bytes()); // last offset delta
    after_crc.extend_from_slice(&base_timestamp.to_be_bytes());
    after_crc.extend_from_slice(&max_timestamp.to_be_bytes());
    after_crc.extend_from_slice(&producer.producer_id.to_be_bytes());
    after_crc.extend_from_slice(&producer.producer_epoch.to_be_bytes());
    after_crc.extend_from_slice(&producer.base_sequence.to_be_bytes());
    after_crc.extend_from_slice(&record_count.to_be_bytes());
    after_crc.extend_from_slice(records);
    let batch_length = (HEADER_BYTES - LOG_OVERHEAD_BYTES + records.len()) as i32;
    let mut batch = Vec::with_capacity(HEADER_BYTES + records.len());
    batch.extend_from_slice(&0i64.to_be_bytes()); // base offset
    batch.extend_from_slice(&batch_length.to_be_bytes());
    batch.extend_from_slice(&0i32.to_be_bytes()); // partition leader epoch
    batch.push(2); // magic
    batch.extend_from_slice(&crc32c::crc32c(&after_crc).to_be_bytes());
    batch.extend_from_slice(&after_crc);
    assert_eq!(batch.len(), HEADER_BYTES + records.len());
    batch
}

/// An uncompressed batch of `count` records, each holding `payload`; its max timestamp
/// is `base_timestamp + count - 1`.
pub fn make_batch(count: i32, base_timestamp: i64, payload: &[u8]) -> Vec<u8> {
    let records: Vec<u8> = (0..count)
        .flat_map(|i| record(i64::from(i), payload))
        .collect();
    batch_around(
        0,
        count,
        base_timestamp,
        base_timestamp + i64::from(count) - 1,
        &records,
    )
}

/// An uncompressed batch of `count` records from an idempotent producer.
pub fn make_producer_batch(
    count: i32,
    base_timestamp: i64,
    payload: &[u8],
    producer: Producer,
) -> Vec<u8> {
    let records: Vec<u8> = (0..count)
        .flat_map(|i| record(i64::from(i), payload))
        .collect();
    batch_around_producer(
        0,
        count,
        base_timestamp,
        base_timestamp + i64::from(count) - 1,
        &records,
        producer,
    )
}
