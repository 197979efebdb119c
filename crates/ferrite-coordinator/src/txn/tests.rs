#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

type Coord = TransactionCoordinator<CountingAllocator>;

/// A coordinator leading every partition, plus the bytes of every record it wrote.
struct Harness {
    c: Coord,
    log: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    markers: Vec<Effect>,
}

impl Harness {
    fn new() -> Harness {
        Harness::with(TxnConfig::default())
    }
    fn with(config: TxnConfig) -> Harness {
        let parts = config.transaction_state_partitions;
        let mut c = TransactionCoordinator::new(config, CountingAllocator(1000));
        for p in 0..parts {
            c.begin_load(p);
            assert!(c.complete_load(p).is_empty());
        }
        Harness {
            c,
            log: vec![],
            markers: vec![],
        }
    }
    /// Append (encode), then replay the record, as the broker will.
    fn apply(&mut self, effects: Vec<Effect>) -> Vec<Effect> {
        for e in &effects {
            match e {
                Effect::Persist(r) => {
                    self.log.push(r.encode());
                    self.c.replay(r);
                }
                m @ Effect::WriteMarkers { .. } => self.markers.push(m.clone()),
            }
        }
        effects
    }
    fn init(
        &mut self,
        id: &str,
        expected: Option<ProducerIdAndEpoch>,
        now: i64,
    ) -> Result<ProducerIdAndEpoch, TxnError> {
        let o = self.c.init_producer_id(id, 60_000, expected, now);
        self.apply(o.effects);
        o.result
    }
    fn add(
        &mut self,
        id: &str,
        p: ProducerIdAndEpoch,
        parts: &[(&str, i32)],
        now: i64,
    ) -> Result<(), TxnError> {
        let parts: Vec<(String, i32)> = parts.iter().map(|(t, i)| (t.to_string(), *i)).collect();
        let o = self
            .c
            .add_partitions(id, p.producer_id, p.producer_epoch, &parts, now);
        self.apply(o.effects);
        o.result
    }
    fn end(
        &mut self,
        id: &str,
        p: ProducerIdAndEpoch,
        r: TxnResult,
        now: i64,
    ) -> (Result<(), TxnError>, Vec<Effect>) {
        let o = self.c.end_txn(id, p.producer_id, p.producer_epoch, r, now);
        let e = self.apply(o.effects);
        (o.result, e)
    }
    fn confirm_markers(&mut self, now: i64) {
        for m in std::mem::take(&mut self.markers) {
            if let Effect::WriteMarkers {
                transactional_id,
                producer_id,
                producer_epoch,
                ..
            } = m
            {
                let o = self
                    .c
                    .markers_written(&transactional_id, producer_id, producer_epoch, now);
                self.apply(o.effects);
            }
        }
    }
    fn state(&self, id: &str) -> TxnState {
        self.c.get(id).unwrap().state
    }
    /// A fresh coordinator loading the log bytes.
    fn reload(&self) -> (Coord, Vec<Effect>) {
        let config = self.c.config().clone();
        let parts = config.transaction_state_partitions;
        let mut c = TransactionCoordinator::new(config, self.c.allocator().clone());
        for p in 0..parts {
            c.begin_load(p);
        }
        for (k, v) in &self.log {
            c.replay(&TxnRecord::decode(k, v.as_deref()).unwrap());
        }
        let mut effects = vec![];
        for p in 0..parts {
            effects.extend(c.complete_load(p));
        }
        (c, effects)
    }
}

fn pe(producer_id: i64, producer_epoch: i16) -> ProducerIdAndEpoch {
    ProducerIdAndEpoch {
        producer_id,
        producer_epoch,
    }
}

fn snapshot(c: &Coord) -> Vec<TxnMetadata> {
    // last_producer_epoch is memory-only (Kafka reloads it as -1).
    c.transactions()
        .map(|m| TxnMetadata {
            last_producer_epoch: NO_PRODUCER_EPOCH,
            ..m.clone()
        })
        .collect()
}

#[test]
fn state_table_is_kafkas() {
    use TxnState::*;
    assert!(Ongoing.can_transition_from(Empty));
    assert!(!PrepareCommit.can_transition_from(Empty));
    assert!(PrepareAbort.can_transition_from(PrepareEpochFence));
    assert!(!CompleteCommit.can_transition_from(PrepareAbort));
    assert!(Dead.can_transition_from(CompleteCommit));
    assert!(!Dead.can_transition_from(Ongoing));
    assert!(PrepareEpochFence.can_transition_from(Ongoing));
    for s in TxnState::ALL {
        assert_eq!(TxnState::from_id(s.id()), Some(s));
    }
    assert_eq!(TxnState::from_id(8), None);
    assert_eq!(PrepareEpochFence.id(), 7);
    assert_eq!(Dead.id(), 6);
}

#[test]
fn error_codes_are_kafkas() {
    assert_eq!(TxnError::CoordinatorLoadInProgress.code(), 14);
    assert_eq!(TxnError::NotCoordinator.code(), 16);
    assert_eq!(TxnError::InvalidProducerEpoch.code(), 47);
    assert_eq!(TxnError::InvalidTxnState.code(), 48);
    assert_eq!(TxnError::InvalidProducerIdMapping.code(), 49);
    assert_eq!(TxnError::InvalidTransactionTimeout.code(), 50);
    assert_eq!(TxnError::ConcurrentTransactions.code(), 51);
    assert_eq!(TxnError::ProducerFenced.code(), 90);
    assert_eq!(TxnError::TransactionalIdNotFound.code(), 105);
    assert_eq!(
        TxnError::ProducerFenced.for_version(false),
        TxnError::InvalidProducerEpoch
    );
    assert_eq!(
        TxnError::ProducerFenced.for_version(true),
        TxnError::ProducerFenced
    );
}

#[test]
fn partitioning_matches_java_hash() {
    // "a".hashCode() == 97; "tx".hashCode() == 116 * 31 + 120 == 3716
    assert_eq!(partition_for("a", 50), 47);
    assert_eq!(partition_for("tx", 50), 3716 % 50);
}

#[test]
fn init_new_id_then_bump_fences_the_first_producer() {
    let mut h = Harness::new();
    let p0 = h.init("tx", None, 10).unwrap();
    assert_eq!(p0, pe(1000, 0));
    assert_eq!(h.state("tx"), TxnState::Empty);
    h.add("tx", p0, &[("t", 0)], 11).unwrap();
    h.end("tx", p0, TxnResult::Commit, 12).0.unwrap();
    h.confirm_markers(13);
    let p1 = h.init("tx", None, 20).unwrap();
    assert_eq!(p1, pe(1000, 1));
    assert_eq!(
        h.add("tx", p0, &[("t", 0)], 21),
        Err(TxnError::ProducerFenced)
    );
    assert_eq!(
        h.end("tx", p0, TxnResult::Commit, 21).0,
        Err(TxnError::ProducerFenced)
    );
    assert_eq!(
        h.add("tx", pe(7, 1), &[("t", 0)], 21),
        Err(TxnError::InvalidProducerIdMapping)
    );
    h.add("tx", p1, &[("t", 0)], 22).unwrap();
}

#[test]
fn timeout_cap_and_request_shape() {
    let mut h = Harness::new();
    assert_eq!(
        h.c.init_producer_id("tx", 900_001, None, 0).result,
        Err(TxnError::InvalidTransactionTimeout)
    );
    assert_eq!(
        h.c.init_producer_id("tx", 0, None, 0).result,
        Err(TxnError::InvalidTransactionTimeout)
    );
    assert!(h.c.init_producer_id("tx", 900_000, None, 0).result.is_ok());
    assert_eq!(
        h.c.init_producer_id("", 1000, None, 0).result,
        Err(TxnError::InvalidRequest)
    );
}

#[test]
fn not_coordinator_and_loading() {
    let mut c = TransactionCoordinator::new(TxnConfig::default(), CountingAllocator(1));
    assert_eq!(
        c.init_producer_id("tx", 1000, None, 0).result,
        Err(TxnError::NotCoordinator)
    );
    let p = c.partition_for("tx");
    c.begin_load(p);
    assert_eq!(
        c.init_producer_id("tx", 1000, None, 0).result,
        Err(TxnError::CoordinatorLoadInProgress)
    );
    c.complete_load(p);
    assert!(c.init_producer_id("tx", 1000, None, 0).result.is_ok());
    c.unload(p);
    assert_eq!(
        c.end_txn("tx", 1, 0, TxnResult::Abort, 0).result,
        Err(TxnError::NotCoordinator)
    );
}

#[test]
fn pending_write_gives_concurrent_transactions_until_replayed_or_failed() {
    let mut h = Harness::new();
    let o = h.c.init_producer_id("tx", 1000, None, 0);
    assert!(o.result.is_ok());
    assert_eq!(
        h.c.init_producer_id("tx", 1000, None, 0).result,
        Err(TxnError::ConcurrentTransactions)
    );
    h.c.write_failed("tx");
    assert!(h.c.get("tx").is_none(), "nothing was written");
    let p = h.init("tx", None, 1).unwrap();
    assert_eq!(p.producer_epoch, 0);
}

#[test]
fn add_partitions_and_verification() {
    let mut h = Harness::new();
    let p = h.init("tx", None, 0).unwrap();
    let v =
        h.c.verify_partitions("tx", p.producer_id, p.producer_epoch, &[("t".into(), 0)]);
    assert_eq!(v[0].1, Err(TxnError::PartitionNotInTxn));
    assert_eq!(TxnError::PartitionNotInTxn.code(), 48);
    h.add("tx", p, &[("t", 0), ("t", 1)], 5).unwrap();
    let m = h.c.get("tx").unwrap();
    assert_eq!(m.state, TxnState::Ongoing);
    assert_eq!(m.txn_start_timestamp_ms, 5);
    assert_eq!(m.partitions.len(), 2);
    // A subset is a no-op: no record.
    let o =
        h.c.add_partitions("tx", p.producer_id, p.producer_epoch, &[("t".into(), 1)], 6);
    assert!(o.result.is_ok() && o.effects.is_empty());
    h.add("tx", p, &[("u", 0)], 7).unwrap();
    assert_eq!(
        h.c.get("tx").unwrap().txn_start_timestamp_ms,
        5,
        "start kept"
    );
    let v = h.c.verify_partitions(
        "tx",
        p.producer_id,
        p.producer_epoch,
        &[("u".into(), 0), ("u".into(), 1)],
    );
    assert_eq!(v[0].1, Ok(()));
    assert_eq!(v[1].1, Err(TxnError::PartitionNotInTxn));
    let v =
        h.c.verify_partitions("tx", p.producer_id, 9, &[("u".into(), 0)]);
    assert_eq!(v[0].1, Err(TxnError::ProducerFenced));
    // AddOffsetsToTxn adds the group's __consumer_offsets partition.
    let o = h.c.add_offsets("tx", p.producer_id, p.producer_epoch, 7, 8);
    h.apply(o.effects);
    assert!(h
        .c
        .get("tx")
        .unwrap()
        .partitions
        .contains(&(CONSUMER_OFFSETS_TOPIC.to_string(), 7)));
}

#[test]
fn end_txn_commit_path_retries_and_mismatches() {
    let mut h = Harness::new();
    let p = h.init("tx", None, 0).unwrap();
    assert_eq!(
        h.end("tx", p, TxnResult::Commit, 1).0,
        Err(TxnError::InvalidTxnState),
        "nothing to commit in Empty"
    );
    h.add("tx", p, &[("t", 0), ("t", 3)], 1).unwrap();
    let (r, effects) = h.end("tx", p, TxnResult::Commit, 2);
    r.unwrap();
    assert_eq!(h.state("tx"), TxnState::PrepareCommit);
    match &effects[1] {
        Effect::WriteMarkers {
            result,
            partitions,
            producer_epoch,
            ..
        } => {
            assert_eq!(*result, TxnResult::Commit);
            assert_eq!(partitions.len(), 2);
            assert_eq!(*producer_epoch, 0);
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(
        h.end("tx", p, TxnResult::Commit, 3).0,
        Err(TxnError::ConcurrentTransactions)
    );
    assert_eq!(
        h.end("tx", p, TxnResult::Abort, 3).0,
        Err(TxnError::InvalidTxnState)
    );
    assert_eq!(
        h.add("tx", p, &[("t", 9)], 3),
        Err(TxnError::ConcurrentTransactions)
    );
    assert_eq!(h.init("tx", None, 3), Err(TxnError::ConcurrentTransactions));
    h.confirm_markers(4);
    let m = h.c.get("tx").unwrap();
    assert_eq!(m.state, TxnState::CompleteCommit);
    assert!(m.partitions.is_empty());
    let (r, e) = h.end("tx", p, TxnResult::Commit, 5);
    assert!(r.is_ok() && e.is_empty(), "retried commit is idempotent");
    assert_eq!(
        h.end("tx", p, TxnResult::Abort, 5).0,
        Err(TxnError::InvalidTxnState)
    );
    // The next transaction starts from CompleteCommit.
    h.add("tx", p, &[("t", 1)], 6).unwrap();
    h.end("tx", p, TxnResult::Abort, 7).0.unwrap();
    h.confirm_markers(8);
    assert_eq!(h.state("tx"), TxnState::CompleteAbort);
    assert!(h.end("tx", p, TxnResult::Abort, 9).0.is_ok());
    assert_eq!(
        h.c.markers_written("tx", p.producer_id, p.producer_epoch, 9)
            .result,
        Err(TxnError::InvalidTxnState),
        "a stale marker confirmation changes nothing"
    );
}

#[test]
fn init_during_ongoing_aborts_with_a_fencing_epoch() {
    let mut h = Harness::new();
    let p = h.init("tx", None, 0).unwrap();
    h.add("tx", p, &[("t", 0)], 1).unwrap();
    assert_eq!(h.init("tx", None, 2), Err(TxnError::ConcurrentTransactions));
    let m = h.c.get("tx").unwrap();
    assert_eq!(m.state, TxnState::PrepareAbort);
    assert_eq!(m.producer_epoch, 1, "the zombie's epoch is fenced");
    match &h.markers[0] {
        Effect::WriteMarkers {
            producer_epoch,
            result,
            ..
        } => assert_eq!((*producer_epoch, *result), (1, TxnResult::Abort)),
        e => panic!("{e:?}"),
    }
    assert_eq!(
        h.end("tx", p, TxnResult::Commit, 3).0,
        Err(TxnError::ProducerFenced)
    );
    h.confirm_markers(3);
    assert_eq!(h.state("tx"), TxnState::CompleteAbort);
    let p2 = h.init("tx", None, 4).unwrap();
    assert_eq!(p2, pe(p.producer_id, 2));
}

#[test]
fn epoch_exhaustion_rotates_the_producer_id() {
    let mut h = Harness::new();
    let p = h.init("tx", None, 0).unwrap();
    let mut v = h.c.get("tx").unwrap().to_value();
    v.producer_epoch = i16::MAX - 1;
    h.c.replay(&TxnRecord {
        transactional_id: "tx".into(),
        value: Some(v),
        last_producer_epoch: NO_PRODUCER_EPOCH,
    });
    let old = pe(p.producer_id, i16::MAX - 1);
    let n = h.init("tx", Some(old), 1).unwrap();
    assert_ne!(n.producer_id, p.producer_id);
    assert_eq!(n.producer_epoch, 0);
    let m = h.c.get("tx").unwrap();
    assert_eq!(m.previous_producer_id, p.producer_id);
    // KIP-360: the retry of that request (its answer lost) gets the same answer.
    assert_eq!(h.init("tx", Some(old), 2).unwrap(), n);
    // The old id with a non-exhausted epoch is a zombie.
    assert_eq!(
        h.init("tx", Some(pe(p.producer_id, 5)), 3),
        Err(TxnError::ProducerFenced)
    );
}

#[test]
fn kip360_expected_producer_id_and_epoch() {
    let mut h = Harness::new();
    let p0 = h.init("tx", None, 0).unwrap();
    let p1 = h.init("tx", Some(p0), 1).unwrap();
    assert_eq!(p1, pe(p0.producer_id, 1));
    // A retry carrying the previous epoch is answered with the current one.
    assert_eq!(h.init("tx", Some(p0), 2).unwrap(), p1);
    assert_eq!(
        h.init("tx", Some(pe(4242, 0)), 3),
        Err(TxnError::ProducerFenced)
    );
    assert_eq!(
        h.init("tx", Some(pe(p0.producer_id, 9)), 3),
        Err(TxnError::ProducerFenced)
    );
}

#[test]
fn timed_out_transaction_is_aborted_and_its_producer_fenced() {
    let mut h = Harness::new();
    let o = h.c.init_producer_id("tx", 1000, None, 0);
    h.apply(o.effects);
    let p = o.result.unwrap();
    h.add("tx", p, &[("t", 0)], 100).unwrap();
    assert!(h.c.tick(1100).is_empty(), "not older than its timeout yet");
    let effects = h.c.tick(1101);
    assert_eq!(effects.len(), 2);
    h.apply(effects);
    let m = h.c.get("tx").unwrap();
    assert_eq!((m.state, m.producer_epoch), (TxnState::PrepareAbort, 1));
    h.confirm_markers(1102);
    assert_eq!(
        h.add("tx", p, &[("t", 0)], 1103),
        Err(TxnError::ProducerFenced)
    );
    assert_eq!(
        h.end("tx", p, TxnResult::Commit, 1103).0,
        Err(TxnError::ProducerFenced)
    );
}

#[test]
fn idle_ids_expire_with_a_tombstone() {
    let mut h = Harness::with(TxnConfig {
        transactional_id_expiration_ms: 1000,
        ..TxnConfig::default()
    });
    let p = h.init("idle", None, 0).unwrap();
    let q = h.init("busy", None, 0).unwrap();
    h.add("busy", q, &[("t", 0)], 0).unwrap();
    let _ = p;
    assert!(h.c.tick(999).is_empty());
    let effects = h.c.tick(1000);
    // busy is Ongoing with a 60 s timeout: neither aborted nor expired.
    assert_eq!(effects.len(), 1);
    match &effects[0] {
        Effect::Persist(r) => assert!(r.transactional_id == "idle" && r.value.is_none()),
        e => panic!("{e:?}"),
    }
    h.apply(effects);
    assert!(h.c.get("idle").is_none());
    assert!(h.c.get("busy").is_some());
    let (reloaded, _) = h.reload();
    assert!(reloaded.get("idle").is_none());
}

#[test]
fn restart_in_prepare_resumes_markers() {
    let mut h = Harness::new();
    let p = h.init("a", None, 0).unwrap();
    h.add("a", p, &[("t", 0)], 1).unwrap();
    h.end("a", p, TxnResult::Commit, 2).0.unwrap();
    let q = h.init("b", None, 0).unwrap();
    h.add("b", q, &[("t", 1)], 1).unwrap();
    h.end("b", q, TxnResult::Abort, 2).0.unwrap();
    h.confirm_markers(3);
    let r = h.init("c", None, 0).unwrap();
    h.add("c", r, &[("u", 0), ("u", 1)], 4).unwrap();
    h.end("c", r, TxnResult::Commit, 5).0.unwrap();
    // Crash before c's markers were confirmed.
    let (mut c, effects) = h.reload();
    assert_eq!(snapshot(&c), snapshot(&h.c));
    assert_eq!(effects.len(), 1);
    match &effects[0] {
        Effect::WriteMarkers {
            transactional_id,
            result,
            partitions,
            ..
        } => {
            assert_eq!(transactional_id, "c");
            assert_eq!(*result, TxnResult::Commit);
            assert_eq!(partitions.len(), 2);
        }
        e => panic!("{e:?}"),
    }
    let o = c.markers_written("c", r.producer_id, r.producer_epoch, 6);
    for e in &o.effects {
        if let Effect::Persist(rec) = e {
            c.replay(rec);
        }
    }
    assert_eq!(c.get("c").unwrap().state, TxnState::CompleteCommit);
}

#[test]
fn describe_and_list_transactions() {
    let mut h = Harness::new();
    let p = h.init("a", None, 0).unwrap();
    h.add("a", p, &[("t", 0), ("t", 1), ("u", 0)], 100).unwrap();
    let q = h.init("b", None, 0).unwrap();
    h.add("b", q, &[("t", 2)], 500).unwrap();
    h.end("b", q, TxnResult::Commit, 600).0.unwrap();
    h.confirm_markers(601);
    let r = h.init("c", None, 0).unwrap();

    let a = h.c.describe("a").unwrap();
    assert_eq!(
        (a.state, a.producer_id, a.txn_start_timestamp_ms),
        (TxnState::Ongoing, p.producer_id, 100)
    );
    assert_eq!(a.partitions.len(), 3);
    assert_eq!(h.c.describe("b").unwrap().state, TxnState::CompleteCommit);
    assert!(h.c.describe("b").unwrap().partitions.is_empty());
    assert_eq!(h.c.describe("zzz"), Err(TxnError::TransactionalIdNotFound));
    assert_eq!(h.c.describe(""), Err(TxnError::InvalidRequest));

    let ids = |l: (Vec<&TxnMetadata>, Vec<String>)| {
        (
            l.0.iter()
                .map(|m| m.transactional_id.clone())
                .collect::<Vec<_>>(),
            l.1,
        )
    };
    let none: Vec<String> = vec![];
    let all = h.c.list_transactions(&[], &[], -1, 1000).unwrap();
    assert_eq!(
        ids(all),
        (vec!["a".into(), "b".into(), "c".into()], none.clone())
    );
    let ongoing =
        h.c.list_transactions(&["Ongoing".into()], &[], -1, 1000)
            .unwrap();
    assert_eq!(ids(ongoing), (vec!["a".into()], none.clone()));
    let by_pid =
        h.c.list_transactions(&[], &[r.producer_id], -1, 1000)
            .unwrap();
    assert_eq!(ids(by_pid), (vec!["c".into()], none.clone()));
    // Running longer than 850 ms at 1000: a started at 100; b at 500 (no longer running
    // but its start is kept, as Kafka's filter compares the start only).
    let long =
        h.c.list_transactions(&["Ongoing".into()], &[], 850, 1000)
            .unwrap();
    assert_eq!(ids(long), (vec!["a".into()], none.clone()));
    let long =
        h.c.list_transactions(&["Ongoing".into()], &[], 950, 1000)
            .unwrap();
    assert_eq!(ids(long).0, Vec::<String>::new());
    let unknown =
        h.c.list_transactions(&["Ongoing".into(), "Bogus".into()], &[], -1, 1000)
            .unwrap();
    assert_eq!(ids(unknown), (vec!["a".into()], vec!["Bogus".into()]));
    let only_unknown =
        h.c.list_transactions(&["Bogus".into()], &[], -1, 1000)
            .unwrap();
    assert_eq!(ids(only_unknown), (vec![], vec!["Bogus".into()]));

    // Not led here, or loading.
    let mut c = TransactionCoordinator::new(TxnConfig::default(), CountingAllocator(1));
    assert_eq!(c.describe("a").err(), Some(TxnError::NotCoordinator));
    assert_eq!(c.list_transactions(&[], &[], -1, 0).unwrap().0.len(), 0);
    c.begin_load(c.partition_for("a"));
    assert_eq!(
        c.describe("a").err(),
        Some(TxnError::CoordinatorLoadInProgress)
    );
    assert_eq!(
        c.list_transactions(&[], &[], -1, 0).err(),
        Some(TxnError::CoordinatorLoadInProgress)
    );
}

// ---- property test over random operation sequences ----

#[derive(Debug, Clone)]
enum Op {
    Init {
        id: usize,
        timeout_ms: i32,
        expected: Option<usize>,
    },
    Add {
        id: usize,
        who: usize,
        partition: i32,
    },
    Verify {
        id: usize,
        who: usize,
        partition: i32,
    },
    End {
        id: usize,
        who: usize,
        commit: bool,
    },
    Markers,
    Tick {
        advance_ms: i64,
    },
    Reload,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..2usize, 1..5000i32, proptest::option::of(0..4usize)).prop_map(
            |(id, timeout_ms, expected)| Op::Init {
                id,
                timeout_ms,
                expected
            }
        ),
        (0..2usize, 0..4usize, 0..3i32).prop_map(|(id, who, partition)| Op::Add {
            id,
            who,
            partition
        }),
        (0..2usize, 0..4usize, 0..3i32).prop_map(|(id, who, partition)| Op::Verify {
            id,
            who,
            partition
        }),
        (0..2usize, 0..4usize, any::<bool>()).prop_map(|(id, who, commit)| Op::End {
            id,
            who,
            commit
        }),
        Just(Op::Markers),
        (0..3000i64).prop_map(|advance_ms| Op::Tick { advance_ms }),
        Just(Op::Reload),
    ]
}

const IDS: [&str; 2] = ["tx-a", "tx-b"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn random_operations_keep_the_invariants(ops in proptest::collection::vec(op(), 1..60)) {
        let mut h = Harness::with(TxnConfig {
            transactional_id_expiration_ms: 20_000,
            ..TxnConfig::default()
        });
        let mut now = 0i64;
        // Every (id, producer id, epoch) a client was handed, in order.
        let mut handed: BTreeMap<usize, Vec<ProducerIdAndEpoch>> = BTreeMap::new();
        // Highest epoch seen per producer id.
        let mut max_epoch: BTreeMap<i64, i16> = BTreeMap::new();
        for op in ops {
            now += 1;
            let before = snapshot(&h.c);
            let log_len = h.log.len();
            let pick = |handed: &BTreeMap<usize, Vec<ProducerIdAndEpoch>>, id: usize, who: usize| {
                handed.get(&id).and_then(|v| v.get(who % v.len().max(1)).copied())
                    .unwrap_or(pe(1, 0))
            };
            // A success by a producer epoch older than the newest one of its id is a zombie.
            let zombie = |h: &Harness, id: usize, p: ProducerIdAndEpoch| {
                h.c.get(IDS[id]).is_some_and(|m| m.producer_id != p.producer_id || m.producer_epoch != p.producer_epoch)
            };
            match op {
                Op::Init { id, timeout_ms, expected } => {
                    let exp = expected.map(|w| pick(&handed, id, w));
                    let o = h.c.init_producer_id(IDS[id], timeout_ms, exp, now);
                    h.apply(o.effects);
                    if let Ok(p) = o.result {
                        let m = h.c.get(IDS[id]).unwrap();
                        prop_assert_eq!((m.producer_id, m.producer_epoch), (p.producer_id, p.producer_epoch));
                        handed.entry(id).or_default().push(p);
                    }
                }
                Op::Add { id, who, partition } => {
                    let p = pick(&handed, id, who);
                    let z = zombie(&h, id, p);
                    let r = h.add(IDS[id], p, &[("t", partition)], now);
                    prop_assert!(!(z && r.is_ok()), "zombie {:?} added a partition", p);
                }
                Op::Verify { id, who, partition } => {
                    let p = pick(&handed, id, who);
                    let z = zombie(&h, id, p);
                    let v = h.c.verify_partitions(IDS[id], p.producer_id, p.producer_epoch, &[("t".into(), partition)]);
                    prop_assert!(!(z && v[0].1.is_ok()), "zombie {:?} verified", p);
                }
                Op::End { id, who, commit } => {
                    let p = pick(&handed, id, who);
                    let z = zombie(&h, id, p);
                    let r = if commit { TxnResult::Commit } else { TxnResult::Abort };
                    let (res, _) = h.end(IDS[id], p, r, now);
                    prop_assert!(!(z && res.is_ok()), "zombie {:?} ended a transaction", p);
                }
                Op::Markers => h.confirm_markers(now),
                Op::Tick { advance_ms } => {
                    now += advance_ms;
                    let e = h.c.tick(now);
                    h.apply(e);
                }
                Op::Reload => {
                    let (c, effects) = h.reload();
                    h.c = c;
                    // Markers of Prepare* transactions come back from the load.
                    h.markers = effects;
                }
            }
            // State moves only along valid transitions.
            for (i, (k, v)) in h.log[log_len..].iter().enumerate() {
                let r = TxnRecord::decode(k, v.as_deref()).unwrap();
                let prev = before.iter().find(|m| m.transactional_id == r.transactional_id);
                match (prev, &r.value) {
                    (Some(p), Some(v)) => {
                        let s = v.transaction_status;
                        prop_assert!(s.can_transition_from(p.state), "{:?} -> {:?} at {}", p.state, s, i);
                        // Epochs never decrease for a producer id.
                        if v.producer_id == p.producer_id {
                            prop_assert!(v.producer_epoch >= p.producer_epoch);
                        }
                    }
                    (Some(p), None) => prop_assert!(TxnState::Dead.can_transition_from(p.state)),
                    (None, Some(v)) => prop_assert_eq!(v.transaction_status, TxnState::Empty),
                    (None, None) => prop_assert!(false, "tombstone for an unknown id"),
                }
            }
            for m in h.c.transactions() {
                let e = max_epoch.entry(m.producer_id).or_insert(m.producer_epoch);
                prop_assert!(m.producer_epoch >= *e, "epoch of {} went down", m.producer_id);
                *e = m.producer_epoch;
                prop_assert!(m.state != TxnState::Ongoing || !m.partitions.is_empty());
                prop_assert!(!matches!(m.state, TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort) || m.partitions.is_empty());
            }
            // Replaying every record written so far from scratch gives the same state.
            let (c, _) = h.reload();
            prop_assert_eq!(snapshot(&c), snapshot(&h.c));
        }
    }
}
