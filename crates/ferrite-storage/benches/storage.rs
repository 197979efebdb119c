//! Storage micro-benchmarks: producer batch validation (CRC-32C over a 16 KiB batch),
//! `PartitionLog::append`, sequential reads through `read_plan(..).read(..)`, and index
//! lookups (one-batch reads at random offsets).
//!
//! Run: `cargo bench -p ferrite-storage -p ferrite-protocol`
//! Files go to a temporary directory (page cache; nothing is fsynced).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrite_storage::{validate_producer_batch, LogConfig, PartitionLog};

/// Size of the batches the benchmarks use, as a producer with batch.size=16384 sends.
const BATCH_BYTES: usize = 16 * 1024;
/// Offset of each v2 header field (Kafka's DefaultRecordBatch).
const BATCH_LENGTH_AT: usize = 8;
const MAGIC_AT: usize = 16;
const CRC_AT: usize = 17;
const ATTRIBUTES_AT: usize = 21;
const LAST_OFFSET_DELTA_AT: usize = 23;
const BASE_TIMESTAMP_AT: usize = 27;
const MAX_TIMESTAMP_AT: usize = 35;
const PRODUCER_ID_AT: usize = 43;
const PRODUCER_EPOCH_AT: usize = 51;
const BASE_SEQUENCE_AT: usize = 53;
const RECORD_COUNT_AT: usize = 57;
const HEADER_BYTES: usize = 61;

fn push_varint(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// One record: length, attributes, timestamp delta, offset delta, null key, value, no
/// headers.
fn record(offset_delta: i64, value_len: usize) -> Vec<u8> {
    let mut rec = vec![0u8];
    push_varint(&mut rec, 0);
    push_varint(&mut rec, offset_delta);
    push_varint(&mut rec, -1);
    push_varint(&mut rec, value_len as i64);
    rec.extend((0..value_len).map(|j| (j % 251) as u8));
    push_varint(&mut rec, 0);
    let mut out = Vec::with_capacity(rec.len() + 2);
    push_varint(&mut out, rec.len() as i64);
    out.extend_from_slice(&rec);
    out
}

/// A magic-2, uncompressed, non-idempotent batch of exactly `BATCH_BYTES` bytes: 16
/// records of ~1 KiB values (the last one sized to fill) and a correct CRC-32C.
fn batch_16k(timestamp: i64) -> Vec<u8> {
    let count = 16i32;
    let mut out = vec![0u8; HEADER_BYTES];
    for i in 0..count - 1 {
        out.extend_from_slice(&record(i64::from(i), 1000));
    }
    let room = BATCH_BYTES - out.len();
    let mut value_len = room - 9;
    let mut last = record(i64::from(count - 1), value_len);
    for _ in 0..8 {
        match last.len().cmp(&room) {
            std::cmp::Ordering::Equal => break,
            std::cmp::Ordering::Less => value_len += room - last.len(),
            std::cmp::Ordering::Greater => value_len -= last.len() - room,
        }
        last = record(i64::from(count - 1), value_len);
    }
    assert_eq!(last.len(), room);
    out.extend_from_slice(&last);
    let batch_length = (out.len() - 12) as i32;
    out[BATCH_LENGTH_AT..BATCH_LENGTH_AT + 4].copy_from_slice(&batch_length.to_be_bytes());
    out[MAGIC_AT] = 2;
    out[LAST_OFFSET_DELTA_AT..LAST_OFFSET_DELTA_AT + 4].copy_from_slice(&(count - 1).to_be_bytes());
    out[BASE_TIMESTAMP_AT..BASE_TIMESTAMP_AT + 8].copy_from_slice(&timestamp.to_be_bytes());
    out[MAX_TIMESTAMP_AT..MAX_TIMESTAMP_AT + 8].copy_from_slice(&timestamp.to_be_bytes());
    out[PRODUCER_ID_AT..PRODUCER_ID_AT + 8].copy_from_slice(&(-1i64).to_be_bytes());
    out[PRODUCER_EPOCH_AT..PRODUCER_EPOCH_AT + 2].copy_from_slice(&(-1i16).to_be_bytes());
    out[BASE_SEQUENCE_AT..BASE_SEQUENCE_AT + 4].copy_from_slice(&(-1i32).to_be_bytes());
    out[RECORD_COUNT_AT..RECORD_COUNT_AT + 4].copy_from_slice(&count.to_be_bytes());
    let crc = crc32c::crc32c(&out[ATTRIBUTES_AT..]);
    out[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
    out
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 64 * 1024 * 1024,
        ..LogConfig::default()
    }
}

fn validation(c: &mut Criterion) {
    let batch = batch_16k(now_ms());
    assert_eq!(batch.len(), BATCH_BYTES);
    validate_producer_batch(&batch).unwrap();
    let mut g = c.benchmark_group("storage");
    g.throughput(Throughput::Bytes(batch.len() as u64));
    g.bench_function("validate_producer_batch_16KiB", |b| {
        b.iter(|| validate_producer_batch(black_box(&batch)).unwrap())
    });
    g.finish();
}

/// Appends 16 KiB batches. The log is recreated (outside the timed part) every 256 MiB so
/// that a long measurement does not fill the disk.
fn append(c: &mut Criterion) {
    let batch = batch_16k(now_ms());
    let mut g = c.benchmark_group("storage");
    g.throughput(Throughput::Bytes(batch.len() as u64));
    g.bench_function("partition_log_append_16KiB", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            let mut done = 0u64;
            while done < iters {
                let dir = tempfile::tempdir().unwrap();
                let (mut log, _) = PartitionLog::open(dir.path(), config(), true).unwrap();
                let now = now_ms();
                let n = (iters - done).min((256 * 1024 * 1024 / batch.len()) as u64);
                let t = Instant::now();
                for _ in 0..n {
                    black_box(log.append(black_box(&batch), 0, now).unwrap());
                }
                elapsed += t.elapsed();
                done += n;
                drop(log);
            }
            elapsed
        })
    });
    g.finish();
}

/// A 64 MiB log (two segments of 16 KiB batches, 16 records each) for the read benchmarks.
fn filled_log() -> (tempfile::TempDir, PartitionLog, i64) {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = PartitionLog::open(dir.path(), config(), true).unwrap();
    let batch = batch_16k(now_ms());
    let now = now_ms();
    for _ in 0..(64 * 1024 * 1024 / batch.len()) {
        log.append(&batch, 0, now).unwrap();
    }
    let end = log.log_end_offset();
    (dir, log, end)
}

fn read(c: &mut Criterion) {
    let (_dir, log, end) = filled_log();
    let mut g = c.benchmark_group("storage");
    // Sequential: 1 MiB reads from the start, wrapping around, as a consumer fetches.
    let read_bytes = 1024 * 1024;
    g.throughput(Throughput::Bytes(read_bytes as u64));
    let mut offset = 0i64;
    g.bench_function("read_plan_read_1MiB_sequential", |b| {
        b.iter(|| {
            let plan = log.read_plan(offset).unwrap().unwrap();
            let bytes = plan.read(read_bytes, true).unwrap();
            // Every batch is BATCH_BYTES long and holds 16 records.
            offset += (bytes.len() / BATCH_BYTES) as i64 * 16;
            if offset >= end {
                offset = 0;
            }
            black_box(bytes)
        })
    });
    // The zero-copy fetch path: the same 1 MiB located by batch headers only.
    let mut offset = 0i64;
    g.bench_function("read_plan_locate_1MiB_sequential", |b| {
        b.iter(|| {
            let plan = log.read_plan(offset).unwrap().unwrap();
            let region = plan.locate(read_bytes, true).unwrap().unwrap();
            offset += (region.len as usize / BATCH_BYTES) as i64 * 16;
            if offset >= end {
                offset = 0;
            }
            black_box(region)
        })
    });
    // Random offsets: the index lookup finds the batch, then one batch is read.
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    g.throughput(Throughput::Elements(1));
    g.bench_function("index_lookup_read_one_batch_random_offset", |b| {
        b.iter(|| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let offset = (rng % end as u64) as i64;
            let plan = log.read_plan(offset).unwrap().unwrap();
            black_box(plan.read(1, true).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, validation, append, read);
criterion_main!(benches);
