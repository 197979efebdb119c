//! Recovery time of one partition with many idempotent producers (issue 11's benchmark):
//! appends one single-record batch for each of N producer ids through
//! `PartitionLog::append`, closes the log (which writes a producer state snapshot at the
//! log end), then times `PartitionLog::open` in alternation:
//! - `snapshot`: clean restart, state read from the snapshot, no batch replayed;
//! - `no-snapshot`: the snapshot files moved away, state rebuilt from every batch header;
//! - `kill-9`: no snapshot and not clean: segments are also recovered (CRC of every batch).
//!
//! Run: `cargo run --release -p ferrite-storage --example producer_recovery -- [PRODUCERS] [RUNS] [DIR]`
//! (defaults 1000000, 5, a temporary directory). The files stay in the page cache between
//! runs, so this measures the CPU work of recovery, not the disk.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use ferrite_storage::test_support::{make_producer_batch, Producer};
use ferrite_storage::{LogConfig, PartitionLog};

fn snapshots(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|x| x.to_str()) == Some("snapshot"))
        .collect()
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let producers: i64 = args.get(1).map_or(1_000_000, |a| a.parse().unwrap());
    let runs: usize = args.get(2).map_or(5, |a| a.parse().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let dir = args.get(3).map_or(tmp.path().to_path_buf(), PathBuf::from);
    let config = LogConfig::default;
    // Batches stamped now, so that none is past producer.id.expiration.ms.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;

    let t = Instant::now();
    let (mut log, _) = PartitionLog::open(&dir, config(), true).unwrap();
    for producer_id in 0..producers {
        let batch = make_producer_batch(
            1,
            now_ms,
            b"v",
            Producer {
                producer_id,
                producer_epoch: 0,
                base_sequence: 0,
            },
        );
        log.append(&batch, 0, now_ms).unwrap();
    }
    let appended_s = t.elapsed().as_secs_f64();
    assert_eq!(log.producers().len() as i64, producers);
    let t = Instant::now();
    log.close().unwrap();
    let close_s = t.elapsed().as_secs_f64();
    drop(log);
    let snapshot_files = snapshots(&dir);
    let snapshot_bytes: u64 = snapshot_files
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let log_bytes: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|x| x.to_str()) == Some("log"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    println!(
        "{producers} producers: appended in {appended_s:.2} s; close (snapshot write) {close_s:.2} s; \
         log {:.1} MB, snapshot {:.1} MB",
        log_bytes as f64 / 1e6,
        snapshot_bytes as f64 / 1e6
    );
    let aside = dir.join("snapshots-aside");
    std::fs::create_dir_all(&aside).unwrap();

    let mut times: [Vec<f64>; 3] = Default::default();
    let names = ["snapshot", "no-snapshot", "kill-9"];
    for run in 0..runs {
        for (case, name) in names.iter().enumerate() {
            // Snapshots in place only for the first case.
            for p in snapshots(&dir) {
                std::fs::rename(&p, aside.join(p.file_name().unwrap())).unwrap();
            }
            if case == 0 {
                for p in snapshots(&aside) {
                    std::fs::rename(&p, dir.join(p.file_name().unwrap())).unwrap();
                }
            }
            let t = Instant::now();
            let (log, report) = PartitionLog::open(&dir, config(), case != 2).unwrap();
            let secs = t.elapsed().as_secs_f64();
            assert_eq!(log.producers().len() as i64, producers, "{name}");
            println!(
                "run {run} {name}: open {secs:.3} s (snapshot {:?}, batches replayed {})",
                report.producer_snapshot_offset, report.producer_batches_replayed
            );
            times[case].push(secs);
            // Dropped without close: nothing is rewritten (no new snapshot).
            drop(log);
        }
    }
    for (case, name) in names.iter().enumerate() {
        let runs = times[case]
            .iter()
            .map(|s| format!("{s:.3}"))
            .collect::<Vec<_>>()
            .join(" / ");
        println!(
            "{name}: median open {:.3} s; runs {runs}",
            median(times[case].clone())
        );
    }
    println!("peak RSS {:.0} MiB", peak_rss_mib());
}
