//! Property tests: random appends, rolls, retention and restarts against a simple model,
//! and recovery from a torn or bit-flipped tail at a random point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::Path;

use ferrite_storage::test_support::make_batch;
use ferrite_storage::{BatchHeader, BatchIter, LogConfig, PartitionLog};
use proptest::prelude::*;

/// A valid v2 batch of `count` records whose payload bytes all equal `fill`.
fn batch(count: i32, timestamp: i64, fill: u8, payload_len: usize) -> Vec<u8> {
    make_batch(count, timestamp, &vec![fill; payload_len])
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 2048,
        index_interval_bytes: 128,
        ..LogConfig::default()
    }
}

/// Everything readable from `from`, as `(base_offset, record_count, first payload byte)`.
fn read_all(log: &PartitionLog) -> Vec<(i64, i32, u8)> {
    let mut out = Vec::new();
    let mut offset = log.log_start_offset();
    while offset < log.log_end_offset() {
        let Some(plan) = log.read_plan(offset).unwrap() else {
            break;
        };
        let bytes = plan.read(4096, true).unwrap();
        assert!(!bytes.is_empty(), "no progress at {offset}");
        for item in BatchIter::new(&bytes) {
            let (_, h, b) = item.unwrap();
            ferrite_storage::validate_batch(b).unwrap();
            if h.last_offset() >= offset {
                out.push((h.base_offset, h.record_count, b[b.len() - 2]));
            }
            offset = h.last_offset() + 1;
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Op {
    Append { count: i32, fill: u8, len: usize },
    Roll,
    CleanRestart,
    CrashRestart,
    DeleteRecords(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1i32..5, any::<u8>(), 0usize..200).prop_map(|(count, fill, len)| Op::Append { count, fill, len }),
        1 => Just(Op::Roll),
        1 => Just(Op::CleanRestart),
        1 => Just(Op::CrashRestart),
        1 => any::<u8>().prop_map(Op::DeleteRecords),
    ]
}

fn reopen(dir: &Path, clean: bool) -> PartitionLog {
    PartitionLog::open(dir, config(), clean).unwrap().0
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// The log and a Vec model agree after any sequence of appends, rolls, restarts
    /// (clean or not) and DeleteRecords.
    #[test]
    fn log_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut log = reopen(dir.path(), true);
        let mut model: Vec<(i64, i32, u8)> = Vec::new();
        let mut next = 0i64;
        let mut start = 0i64;
        for op in ops {
            match op {
                Op::Append { count, fill, len } => {
                    let info = log.append(&batch(count, 1_000, fill, len.max(1)), 0, 0).unwrap();
                    prop_assert_eq!(info.base_offset, next);
                    model.push((next, count, fill));
                    next += i64::from(count);
                }
                Op::Roll => log.roll().unwrap(),
                Op::CleanRestart => {
                    log.close().unwrap();
                    drop(log);
                    log = reopen(dir.path(), true);
                }
                Op::CrashRestart => {
                    drop(log);
                    log = reopen(dir.path(), false);
                }
                Op::DeleteRecords(frac) => {
                    let target = start + (next - start) * i64::from(frac) / 255;
                    start = log.advance_log_start_offset(target).unwrap().max(start);
                }
            }
            prop_assert_eq!(log.log_end_offset(), next);
            prop_assert_eq!(log.log_start_offset(), start);
        }
        let expected: Vec<_> = model.into_iter().filter(|(b, c, _)| b + i64::from(*c) > start).collect();
        prop_assert_eq!(read_all(&log), expected);
    }

    /// A torn tail (truncation at any byte) or a flipped byte in the last segment is cut
    /// back to the last whole valid batch; everything before it survives, new appends
    /// continue densely, nothing panics.
    #[test]
    fn damaged_tail_is_dropped(
        sizes in proptest::collection::vec((1i32..4, 1usize..150), 2..25),
        damage_at in any::<prop::sample::Index>(),
        flip in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut log = reopen(dir.path(), true);
        let mut batches = Vec::new();
        for (i, (count, len)) in sizes.iter().enumerate() {
            let info = log.append(&batch(*count, 1_000, i as u8, *len), 0, 0).unwrap();
            batches.push((info.base_offset, *count, i as u8));
        }
        drop(log); // crash: no clean shutdown
        // Damage the last segment.
        let mut segs: Vec<_> = std::fs::read_dir(dir.path()).unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        segs.sort();
        let last = segs.last().unwrap().clone();
        let mut bytes = std::fs::read(&last).unwrap();
        let at = damage_at.index(bytes.len());
        if flip {
            bytes[at] ^= 0x40;
        } else {
            bytes.truncate(at);
        }
        std::fs::write(&last, &bytes).unwrap();
        // Which batches are whole and valid before the damage in that segment?
        let seg_base: i64 = last.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        let mut survivors: Vec<(i64, i32, u8)> = batches.iter().copied().filter(|(b, _, _)| *b < seg_base).collect();
        let mut pos = 0usize;
        for (b, c, f) in batches.iter().copied().filter(|(b, _, _)| *b >= seg_base) {
            let Some(h) = bytes.get(pos..).and_then(|r| BatchHeader::parse(r).ok()) else { break };
            // A flipped length byte makes the header itself invalid: the tail starts here.
            let Ok(total) = h.total_bytes() else { break };
            let Some(whole) = bytes.get(pos..pos + total) else { break };
            if ferrite_storage::validate_batch(whole).is_err() || h.base_offset != b {
                break;
            }
            survivors.push((b, c, f));
            pos += total;
        }
        let log = reopen(dir.path(), false);
        let expected_end = survivors.last().map_or(seg_base, |(b, c, _)| b + i64::from(*c));
        prop_assert_eq!(log.log_end_offset(), expected_end);
        prop_assert_eq!(read_all(&log), survivors);
        let mut log = log;
        let info = log.append(&batch(1, 1_000, 0xee, 10), 0, 0).unwrap();
        prop_assert_eq!(info.base_offset, expected_end);
    }
}
