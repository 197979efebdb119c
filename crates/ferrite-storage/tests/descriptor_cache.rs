//! Segment files opened through a bounded descriptor cache (issue 14 item 3): logs with
//! many more segments than the cache holds read, write, recover, retain and compact the
//! same bytes as with every file open, and a read in flight keeps its file through
//! eviction and deletion.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ferrite_storage::fd_cache::SEGMENT_FDS_MIN;
use ferrite_storage::test_support::make_batch;
use ferrite_storage::{BatchIter, DescriptorCache, LogConfig, PartitionLog};
use proptest::prelude::*;

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 2048,
        index_interval_bytes: 256,
        ..LogConfig::default()
    }
}

fn open(dir: &Path, cache: &Arc<DescriptorCache>, clean: bool) -> PartitionLog {
    PartitionLog::open_with_cache(dir, config(), clean, cache.clone())
        .unwrap()
        .0
}

/// Every batch of the log, by base offset, read through read plans.
fn all_batches(log: &PartitionLog) -> BTreeMap<i64, Bytes> {
    let mut out = BTreeMap::new();
    let mut offset = log.log_start_offset();
    while let Some(plan) = log.read_plan(offset).unwrap() {
        let bytes = plan.read(usize::MAX, true).unwrap();
        if bytes.is_empty() {
            break;
        }
        for item in BatchIter::new(&bytes) {
            let (at, h, batch) = item.unwrap();
            let _ = at;
            out.insert(h.base_offset, Bytes::copy_from_slice(batch));
            offset = h.last_offset() + 1;
        }
    }
    out
}

fn value(log: usize, i: usize, len: usize) -> Vec<u8> {
    format!("log {log} batch {i} ")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(len)
        .collect()
}

#[test]
fn many_more_segments_than_descriptors_read_back_the_same_bytes_before_and_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cache = DescriptorCache::new(SEGMENT_FDS_MIN);
    let mut logs: Vec<PartitionLog> = (0..6)
        .map(|l| open(&dir.path().join(format!("p-{l}")), &cache, true))
        .collect();
    // Interleaved appends, so every append finds its active segment evicted by the others.
    for i in 0..60 {
        for (l, log) in logs.iter_mut().enumerate() {
            log.append(&make_batch(2, 1000 + i as i64, &value(l, i, 300)), 0, 0)
                .unwrap();
        }
    }
    assert!(logs.iter().all(|l| l.segment_count() > SEGMENT_FDS_MIN));
    assert!(cache.stats().open <= SEGMENT_FDS_MIN);
    let before: Vec<_> = logs.iter().map(all_batches).collect();
    assert!(cache.stats().reopened > 0, "the bound was never exercised");
    for (l, batches) in before.iter().enumerate() {
        assert_eq!(batches.len(), 60, "log {l}");
        for (n, (base, batch)) in batches.iter().enumerate() {
            assert_eq!(*base, 2 * n as i64);
            let wanted = value(l, n, 300);
            assert!(
                batch.windows(wanted.len()).any(|w| w == wanted),
                "log {l} batch {n} holds another log's bytes"
            );
        }
    }
    // A clean close and reopen, then a crash-style recovery of every segment.
    for log in &mut logs {
        log.close().unwrap();
    }
    drop(logs);
    assert_eq!(
        cache.stats().open,
        0,
        "dropped logs left files in the cache"
    );
    for clean in [true, false] {
        let logs: Vec<PartitionLog> = (0..6)
            .map(|l| open(&dir.path().join(format!("p-{l}")), &cache, clean))
            .collect();
        let after: Vec<_> = logs.iter().map(all_batches).collect();
        assert_eq!(before, after, "clean start: {clean}");
        assert!(cache.stats().open <= SEGMENT_FDS_MIN);
    }
}

#[test]
fn a_region_in_flight_keeps_its_file_through_eviction_and_retention() {
    let dir = tempfile::tempdir().unwrap();
    let cache = DescriptorCache::new(SEGMENT_FDS_MIN);
    let mut log = open(dir.path(), &cache, true);
    for i in 0..80 {
        log.append(&make_batch(1, 1000 + i, &value(0, i as usize, 400)), 0, 0)
            .unwrap();
    }
    let expected = all_batches(&log);
    let region = log
        .read_plan(0)
        .unwrap()
        .unwrap()
        .locate(1 << 20, true)
        .unwrap()
        .unwrap();
    // Touch every other segment: the first one's descriptor leaves the cache...
    let _ = all_batches(&log);
    let mut offset = 40;
    while let Some(plan) = log.read_plan(offset).unwrap() {
        let bytes = plan.read(usize::MAX, true).unwrap();
        if bytes.is_empty() {
            break;
        }
        offset = BatchIter::new(&bytes)
            .last()
            .unwrap()
            .unwrap()
            .1
            .last_offset()
            + 1;
    }
    // ...and DeleteRecords removes its file.
    log.advance_log_start_offset(20).unwrap();
    assert!(!region.path.exists(), "the first segment was not deleted");
    let mut sent = vec![0u8; region.len as usize];
    std::os::unix::fs::FileExt::read_exact_at(&*region.file, &mut sent, region.position).unwrap();
    let first = expected.get(&0).unwrap();
    assert_eq!(&sent[..first.len()], &first[..]);
}

#[test]
fn concurrent_reads_and_appends_under_eviction_return_the_bytes_written() {
    let dir = tempfile::tempdir().unwrap();
    let cache = DescriptorCache::new(SEGMENT_FDS_MIN);
    let logs: Vec<Arc<Mutex<PartitionLog>>> = (0..4)
        .map(|l| {
            Arc::new(Mutex::new(open(
                &dir.path().join(format!("p-{l}")),
                &cache,
                true,
            )))
        })
        .collect();
    for (l, log) in logs.iter().enumerate() {
        let mut log = log.lock().unwrap();
        for i in 0..30 {
            log.append(&make_batch(1, 0, &value(l, i, 500)), 0, 0)
                .unwrap();
        }
    }
    let readers: Vec<_> = (0..4)
        .map(|t| {
            let logs = logs.clone();
            std::thread::spawn(move || {
                let mut checked = 0;
                for round in 0..40 {
                    let l = (t + round) % logs.len();
                    // The plan is taken under the lock, the read done without it, as the
                    // broker's fetch does.
                    let plan = {
                        let log = logs[l].lock().unwrap();
                        log.read_plan((round * 7 % 30) as i64).unwrap().unwrap()
                    };
                    let region = plan.locate(4096, true).unwrap().unwrap();
                    let copied = plan.read(4096, true).unwrap();
                    assert_eq!(region.read().unwrap(), copied);
                    for item in BatchIter::new(&copied) {
                        let (_, h, batch) = item.unwrap();
                        let wanted = value(l, h.base_offset as usize, 500);
                        assert!(batch.windows(wanted.len()).any(|w| w == wanted));
                        ferrite_storage::validate_batch(batch).unwrap();
                        checked += 1;
                    }
                }
                checked
            })
        })
        .collect();
    let writer = {
        let logs = logs.clone();
        std::thread::spawn(move || {
            for i in 30..90 {
                for (l, log) in logs.iter().enumerate() {
                    log.lock()
                        .unwrap()
                        .append(&make_batch(1, 0, &value(l, i, 500)), 0, 0)
                        .unwrap();
                }
            }
        })
    };
    writer.join().unwrap();
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    assert!(cache.stats().reopened > 0);
    for (l, log) in logs.iter().enumerate() {
        let batches = all_batches(&log.lock().unwrap());
        assert_eq!(batches.len(), 90);
        for (base, batch) in batches {
            let wanted = value(l, base as usize, 500);
            assert!(batch.windows(wanted.len()).any(|w| w == wanted));
        }
    }
}

#[test]
fn retention_and_compaction_work_on_evicted_segments() {
    let dir = tempfile::tempdir().unwrap();
    let cache = DescriptorCache::new(SEGMENT_FDS_MIN);
    let compacted = LogConfig {
        compacted: true,
        ..config()
    };
    let (mut log, _) =
        PartitionLog::open_with_cache(&dir.path().join("c"), compacted, true, cache.clone())
            .unwrap();
    for i in 0..60 {
        log.append(&make_batch(1, 0, &value(0, i, 300)), 0, 0)
            .unwrap();
    }
    // Other logs push every segment of `log` out of the cache.
    let mut others: Vec<PartitionLog> = (0..3)
        .map(|l| open(&dir.path().join(format!("o-{l}")), &cache, true))
        .collect();
    for o in &mut others {
        for i in 0..30 {
            o.append(&make_batch(1, 0, &value(9, i, 300)), 0, 0)
                .unwrap();
        }
    }
    // Keep every other batch: compaction reads and rewrites evicted segments.
    let mut n = 0;
    let report = log
        .compact(|_| {
            n += 1;
            n % 2 == 0
        })
        .unwrap();
    assert!(report.segments > 0);
    let kept = all_batches(&log);
    assert!(kept.len() < 60 && kept.len() > 20, "{} kept", kept.len());
    for (base, batch) in &kept {
        let wanted = value(0, *base as usize, 300);
        assert!(batch.windows(wanted.len()).any(|w| w == wanted));
    }
    // Size retention deletes evicted segments by path.
    let mut o = others.pop().unwrap();
    let mut small = o.config().clone();
    small.retention_bytes = 4096;
    o.set_config(small);
    assert!(o.tick(0).unwrap() > 0);
    assert_eq!(all_batches(&o).keys().last().copied(), Some(29));
    assert!(cache.stats().open <= SEGMENT_FDS_MIN);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Any interleaving of appends to and reads of several logs sharing a tiny cache reads
    /// back exactly what was appended.
    #[test]
    fn interleaved_appends_and_reads_match_a_model(ops in prop::collection::vec((0usize..5, any::<bool>(), 40usize..900), 1..120)) {
        let dir = tempfile::tempdir().unwrap();
        let cache = DescriptorCache::new(SEGMENT_FDS_MIN);
        let mut logs: Vec<PartitionLog> = (0..5)
            .map(|l| open(&dir.path().join(format!("p-{l}")), &cache, true))
            .collect();
        let mut model: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 5];
        for (l, append, len) in ops {
            if append || model[l].is_empty() {
                let v = value(l, model[l].len(), len);
                logs[l].append(&make_batch(1, 0, &v), 0, 0).unwrap();
                model[l].push(v);
            } else {
                let offset = (len % model[l].len()) as i64;
                let plan = logs[l].read_plan(offset).unwrap().unwrap();
                let bytes = plan.read(1, true).unwrap();
                let (_, h, batch) = BatchIter::new(&bytes).next().unwrap().unwrap();
                prop_assert_eq!(h.base_offset, offset);
                let wanted = &model[l][offset as usize];
                prop_assert!(batch.windows(wanted.len()).any(|w| w == &wanted[..]));
            }
            prop_assert!(cache.stats().open <= SEGMENT_FDS_MIN);
        }
    }
}
