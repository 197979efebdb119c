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
use ferrite_storage::batch::HEADER_BYTES;
use ferrite_storage::test_support::{batch_around, record};
use ferrite_storage::{validate_producer_batch, LogConfig, PartitionLog};

/// Size of the batches the benchmarks use, as a producer with batch.size=16384 sends.
const BATCH_BYTES: usize = 16 * 1024;
/// A magic-2, uncompressed, non-idempotent batch of exactly `BATCH_BYTES` bytes: 16
/// records of ~1 KiB values (the last one sized to fill) and a correct CRC-32C.
fn batch_16k(timestamp: i64) -> Vec<u8> {
    let count = 16i32;
    let value = |len: usize| (0..len).map(|j| (j % 251) as u8).collect::<Vec<u8>>();
    let mut records = Vec::new();
    for i in 0..count - 1 {
        records.extend_from_slice(&record(i64::from(i), &value(1000)));
    }
    let room = BATCH_BYTES - HEADER_BYTES - records.len();
    let mut value_len = room - 9;
    let mut last = record(i64::from(count - 1), &value(value_len));
    for _ in 0..8 {
        match last.len().cmp(&room) {
            std::cmp::Ordering::Equal => break,
            std::cmp::Ordering::Less => value_len += room - last.len(),
            std::cmp::Ordering::Greater => value_len -= last.len() - room,
        }
        last = record(i64::from(count - 1), &value(value_len));
    }
    assert_eq!(last.len(), room);
    records.extend_from_slice(&last);
    let out = batch_around(0, count, timestamp, timestamp, &records);
    assert_eq!(out.len(), BATCH_BYTES);
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
