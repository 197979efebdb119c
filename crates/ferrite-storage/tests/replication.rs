//! The storage side of replication: the leader-epoch checkpoint, follower appends that
//! keep the leader's bytes, and truncation that never changes bytes a zero-copy region
//! may still send.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ferrite_storage::test_support::{make_batch, make_producer_batch, Producer};
use ferrite_storage::{
    read_leader_epoch_checkpoint, BatchHeader, BatchIter, EpochEntry, FileRegion, LogConfig,
    PartitionLog, StorageError, LEADER_EPOCH_CHECKPOINT_FILE,
};
use proptest::prelude::*;

fn cfg() -> LogConfig {
    LogConfig {
        segment_bytes: 2048,
        index_interval_bytes: 256,
        ..LogConfig::default()
    }
}

fn all_bytes(log: &PartitionLog) -> Vec<u8> {
    let mut out = Vec::new();
    let mut offset = log.log_start_offset();
    while offset < log.log_end_offset() {
        let Some(plan) = log.read_plan(offset).unwrap() else {
            break;
        };
        let bytes = plan.read(usize::MAX / 2, true).unwrap();
        assert!(!bytes.is_empty());
        for item in BatchIter::new(&bytes) {
            let (_, h, _) = item.unwrap();
            offset = h.last_offset() + 1;
        }
        out.extend_from_slice(&bytes);
    }
    out
}

fn entries(log: &PartitionLog) -> Vec<(i32, i64)> {
    log.leader_epochs().entries().to_vec()
}

#[test]
fn leader_epoch_checkpoint_is_written_before_a_new_epochs_first_append_and_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = PartitionLog::open(dir.path(), cfg(), true).unwrap();
    assert!(entries(&log).is_empty());
    for _ in 0..5 {
        log.append(&make_batch(2, 1, b"a"), 0, 0).unwrap();
    }
    log.append(&make_batch(2, 1, b"b"), 3, 0).unwrap();
    assert_eq!(
        read_leader_epoch_checkpoint(dir.path()).unwrap(),
        vec![
            EpochEntry {
                epoch: 0,
                start_offset: 0
            },
            EpochEntry {
                epoch: 3,
                start_offset: 10
            }
        ]
    );
    // An older epoch than the latest cannot append (a stale leader).
    assert!(matches!(
        log.append(&make_batch(1, 1, b"c"), 2, 0),
        Err(StorageError::LeaderEpoch { .. })
    ));
    assert_eq!(log.log_end_offset(), 12);
    drop(log);
    for clean in [true, false] {
        let (log, _) = PartitionLog::open(dir.path(), cfg(), clean).unwrap();
        assert_eq!(entries(&log), vec![(0, 0), (3, 10)]);
        assert_eq!(log.last_leader_epoch(), Some(3));
    }
    // A log written before the file existed gets its history from the batch headers.
    std::fs::remove_file(dir.path().join(LEADER_EPOCH_CHECKPOINT_FILE)).unwrap();
    let (log, _) = PartitionLog::open(dir.path(), cfg(), false).unwrap();
    assert_eq!(entries(&log), vec![(0, 0), (3, 10)]);
    assert!(dir.path().join(LEADER_EPOCH_CHECKPOINT_FILE).exists());
}

#[test]
fn an_epoch_whose_first_append_was_lost_is_dropped_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = PartitionLog::open(dir.path(), cfg(), true).unwrap();
    log.append(&make_batch(2, 1, b"a"), 1, 0).unwrap();
    drop(log);
    // As if the checkpoint for epoch 4 was written and the append then lost in a crash.
    ferrite_storage::write_leader_epoch_checkpoint(
        dir.path(),
        &[
            EpochEntry {
                epoch: 1,
                start_offset: 0,
            },
            EpochEntry {
                epoch: 4,
                start_offset: 2,
            },
        ],
    )
    .unwrap();
    let (mut log, _) = PartitionLog::open(dir.path(), cfg(), false).unwrap();
    assert_eq!(entries(&log), vec![(1, 0)]);
    // Open leaves the file as it was (a refused start must change nothing); the next
    // append rewrites it first.
    assert_eq!(read_leader_epoch_checkpoint(dir.path()).unwrap().len(), 2);
    log.append(&make_batch(2, 1, b"b"), 1, 0).unwrap();
    assert_eq!(
        read_leader_epoch_checkpoint(dir.path()).unwrap(),
        vec![EpochEntry {
            epoch: 1,
            start_offset: 0
        }]
    );
}

/// A replica that became leader of epoch 1 and lost leadership before appending: its
/// epoch 1 entry at the log end must go at the follower's truncation to the log end,
/// or its `LastFetchedEpoch` (1) diverges from a leader that never had epoch 1 at every
/// fetch (ferrite-sim seed 5: a follower stuck out of the ISR).
#[test]
fn truncation_to_the_log_end_drops_an_epoch_without_records() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = PartitionLog::open(dir.path(), cfg(), true).unwrap();
    for _ in 0..3 {
        log.append(&make_batch(2, 1, b"a"), 0, 0).unwrap();
    }
    log.begin_leader_epoch(1).unwrap();
    assert_eq!(entries(&log), vec![(0, 0), (1, 6)]);
    assert_eq!(log.last_leader_epoch(), Some(1));
    assert!(!log.truncate_to(6).unwrap(), "no record removed");
    assert_eq!(entries(&log), vec![(0, 0)]);
    assert_eq!(log.last_leader_epoch(), Some(0));
    assert_eq!(log.log_end_offset(), 6);
    assert_eq!(
        read_leader_epoch_checkpoint(dir.path()).unwrap(),
        vec![EpochEntry {
            epoch: 0,
            start_offset: 0
        }],
        "the checkpoint follows"
    );
    // A truncation beyond the log end keeps epochs that describe records.
    assert!(!log.truncate_to(100).unwrap());
    assert_eq!(entries(&log), vec![(0, 0)]);
}

#[test]
fn a_follower_appends_the_leaders_batches_byte_for_byte() {
    let leader_dir = tempfile::tempdir().unwrap();
    let follower_dir = tempfile::tempdir().unwrap();
    let (mut leader, _) = PartitionLog::open(leader_dir.path(), cfg(), true).unwrap();
    let (mut follower, _) = PartitionLog::open(follower_dir.path(), cfg(), true).unwrap();
    let producer = Producer {
        producer_id: 7,
        producer_epoch: 0,
        base_sequence: 0,
    };
    leader
        .append(&make_producer_batch(3, 5, b"p", producer), 0, 100)
        .unwrap();
    for i in 0..20 {
        leader
            .append(
                &make_batch(4, 10 + i, b"0123456789abcdef"),
                i as i32 / 7,
                100,
            )
            .unwrap();
    }
    let bytes = all_bytes(&leader);
    // In two pieces, as two fetches would bring them.
    let mut cut = 0;
    for item in BatchIter::new(&bytes).take(9) {
        let (at, _, b) = item.unwrap();
        cut = at + b.len();
    }
    follower.append_as_follower(&bytes[..cut], 200).unwrap();
    follower.append_as_follower(&bytes[cut..], 200).unwrap();
    assert_eq!(follower.log_end_offset(), leader.log_end_offset());
    assert_eq!(all_bytes(&follower), bytes);
    assert_eq!(entries(&follower), entries(&leader));
    assert_eq!(entries(&follower), vec![(0, 0), (1, 31), (2, 59)]);
    assert!(
        follower.producers().get(7).is_some(),
        "producer state follows"
    );

    // The same batches again do not continue the log.
    assert!(matches!(
        follower.append_as_follower(&bytes[..cut], 0),
        Err(StorageError::NonContiguousFollowerAppend { .. })
    ));
    // A batch with a bad CRC is refused, nothing written.
    let mut bad = bytes[..cut].to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    let (mut fresh, _) =
        PartitionLog::open(tempfile::tempdir().unwrap().path(), cfg(), true).unwrap();
    assert!(matches!(
        fresh.append_as_follower(&bad, 0),
        Err(StorageError::CorruptBatch(_))
    ));
    assert_eq!(fresh.log_end_offset(), 0);
    drop(follower);
    let (follower, _) = PartitionLog::open(follower_dir.path(), cfg(), false).unwrap();
    assert_eq!(all_bytes(&follower), bytes);
    assert_eq!(entries(&follower), entries(&leader));
}

#[test]
fn truncation_never_changes_bytes_a_zero_copy_region_can_still_send() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = PartitionLog::open(dir.path(), cfg(), true).unwrap();
    for i in 0..6 {
        log.append(&make_batch(2, i, b"old-old-old-old"), 0, 0)
            .unwrap();
    }
    // A region planned (lock released) over the tail, as a fetch holds it.
    let region = log
        .read_plan(6)
        .unwrap()
        .unwrap()
        .locate(1 << 20, true)
        .unwrap()
        .unwrap();
    let region = FileRegion {
        prefetched: None,
        ..region
    };
    let before = region.read().unwrap();
    assert!(log.truncate_to(6).unwrap());
    assert_eq!(log.log_end_offset(), 6);
    for i in 0..3 {
        log.append(&make_batch(2, 100 + i, b"NEW-NEW-NEW-NEW"), 1, 0)
            .unwrap();
    }
    // The region still reads the old bytes: the cut segment was replaced, not cut.
    assert_eq!(region.read().unwrap(), before);
    assert!(before.windows(3).any(|w| w == b"old"));
    let now = all_bytes(&log);
    assert!(now.windows(3).any(|w| w == b"NEW"));
    assert_eq!(entries(&log), vec![(0, 0), (1, 6)]);
}

#[test]
fn truncation_drops_the_producer_state_of_what_it_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = PartitionLog::open(dir.path(), cfg(), true).unwrap();
    log.append(&make_batch(2, 1, b"x"), 0, 0).unwrap();
    let p = |seq| Producer {
        producer_id: 9,
        producer_epoch: 0,
        base_sequence: seq,
    };
    log.append(&make_producer_batch(2, 1, b"y", p(0)), 0, 0)
        .unwrap();
    assert!(log.truncate_to(2).unwrap());
    assert!(log.producers().get(9).is_none());
    // The batch is new again, not a duplicate.
    let info = log
        .append(&make_producer_batch(2, 1, b"y", p(0)), 1, 0)
        .unwrap();
    assert!(!info.duplicate);
    assert_eq!(info.base_offset, 2);
}

#[test]
fn truncation_to_below_the_log_start_empties_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = PartitionLog::open(dir.path(), cfg(), true).unwrap();
    for _ in 0..30 {
        log.append(&make_batch(3, 1, b"0123456789"), 2, 0).unwrap();
    }
    log.truncate_fully_and_start_at(500).unwrap();
    assert_eq!(log.log_start_offset(), 500);
    assert_eq!(log.log_end_offset(), 500);
    assert!(entries(&log).is_empty());
    drop(log);
    let (log, _) = PartitionLog::open(dir.path(), cfg(), false).unwrap();
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (500, 500));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random appends (leader epochs growing) and truncations against a model: the list
    /// of batches. After every step the log's bytes, end offset and epoch history are the
    /// model's, and after a reopen too.
    #[test]
    fn appends_and_truncations_match_a_model(
        steps in proptest::collection::vec((0u8..4, 1i32..6, 0usize..40), 1..40)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = PartitionLog::open(dir.path(), cfg(), true).unwrap();
        // (base_offset, epoch, bytes as stored)
        let mut model: Vec<(i64, i32, Vec<u8>)> = Vec::new();
        let mut epoch = 0i32;
        for (kind, count, pick) in steps {
            if kind == 0 && !model.is_empty() {
                let idx = pick % model.len();
                let offset = model[idx].0 + i64::from(pick as i32 % count);
                log.truncate_to(offset).unwrap();
                // Cut at the batch holding `offset`.
                let keep = model.iter().position(|(b, _, bytes)| {
                    let h = BatchHeader::parse(bytes).unwrap();
                    *b + i64::from(h.last_offset_delta) >= offset
                }).unwrap_or(model.len());
                model.truncate(keep);
            } else {
                if kind == 1 { epoch += 1; }
                let info = log.append(&make_batch(count, 1, &vec![b'v'; pick]), epoch, 0).unwrap();
                let plan = log.read_plan(info.base_offset).unwrap().unwrap();
                let stored = plan.read(1, true).unwrap().to_vec();
                model.push((info.base_offset, epoch, stored));
            }
            let expected: Vec<u8> = model.iter().flat_map(|(_, _, b)| b.clone()).collect();
            prop_assert_eq!(all_bytes(&log), expected.clone());
            let leo = model.last().map_or(0, |(b, _, bytes)| {
                b + i64::from(BatchHeader::parse(bytes).unwrap().last_offset_delta) + 1
            });
            prop_assert_eq!(log.log_end_offset(), leo);
            let mut history: Vec<(i32, i64)> = Vec::new();
            for (b, e, _) in &model {
                if history.last().is_none_or(|(le, _)| le != e) {
                    history.push((*e, *b));
                }
            }
            prop_assert_eq!(entries(&log), history.clone());
            epoch = epoch.max(history.last().map_or(0, |h| h.0));
        }
        let expected = all_bytes(&log);
        let history = entries(&log);
        drop(log);
        let (log, _) = PartitionLog::open(dir.path(), cfg(), false).unwrap();
        prop_assert_eq!(all_bytes(&log), expected);
        prop_assert_eq!(entries(&log), history);
    }
}
