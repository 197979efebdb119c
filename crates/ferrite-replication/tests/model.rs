//! A model of one partition replicated on several brokers, driven only through
//! ferrite-replication's public API: a leader (`PartitionLeader`), followers that fetch
//! with `LastFetchedEpoch` or ask OffsetForLeaderEpoch after a restart and truncate with
//! `follower_truncation`, a controller that commits AlterPartition, fences crashed
//! brokers and elects only ISR members (clean election), crashes that may lose the
//! unflushed tail, restarts with a new broker epoch, leader moves.
//!
//! Invariants checked after every step:
//! - log matching: two replicas holding a record of the same epoch at the same offset
//!   hold identical logs up to it (no divergence);
//! - committed data: the longest prefix any high watermark ever covered never changes,
//!   and every ISR member holds it; every acks=all acknowledgement is inside it;
//! - each leader's high watermark is monotonic and at most its log end offset; a
//!   follower's high watermark covers only records it holds and that are committed.
//!
//! After the ops, everything heals (restarts, fetch rounds, ISR expansion) and all logs
//! must be identical, with every acknowledged record at its offset.
//!
//! The precondition of "committed data survives" is Kafka's: a crash that loses the
//! unflushed tail never hits the last ISR member (with min.insync.replicas 2 and RF 3 that
//! is "any one broker"); the model turns such a crash into a kill -9 (page cache kept).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;

use ferrite_replication::{
    follower_high_watermark, follower_truncation, AlterPartitionProposal, BrokerState,
    FetchOutcome, FollowerFetch, LeaderEpochCache, PartitionLeader, PartitionState,
    ReplicationConfig, UNDEFINED_EPOCH,
};
use proptest::prelude::*;

const LAG_MS: u64 = 100;
const PRODUCE_TIMEOUT_MS: u64 = 300;
/// Rounds of OffsetForLeaderEpoch a truncation may take: each incomplete round lowers
/// the follower's latest epoch, so it is bounded by the number of epochs.
const TRUNCATION_ROUNDS_MAX: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rec {
    epoch: i32,
    value: u64,
}

#[derive(Debug)]
struct Replica {
    id: i32,
    log: Vec<Rec>,
    flushed: usize,
    cache: LeaderEpochCache,
    high_watermark: i64,
    alive: bool,
    broker_epoch: i64,
    leader: Option<PartitionLeader>,
    /// Restarted or became follower with the OffsetForLeaderEpoch path pending.
    truncating: bool,
    /// The highest high watermark this replica's leader role reported, per epoch.
    last_leader_hw: Option<(i32, i64)>,
}

impl Replica {
    fn leo(&self) -> i64 {
        self.log.len() as i64
    }

    fn truncate_to(&mut self, offset: i64) {
        let offset = offset.max(0);
        assert!(offset <= self.leo());
        self.log.truncate(offset as usize);
        self.flushed = self.flushed.min(self.log.len());
        let _ = self.cache.truncate_from_end(offset);
        self.high_watermark = self.high_watermark.min(offset);
    }

    fn append(&mut self, rec: Rec) {
        let offset = self.leo();
        self.cache
            .assign(rec.epoch, offset)
            .expect("the leader's epochs never go back");
        self.log.push(rec);
    }
}

#[derive(Debug, Clone)]
enum Op {
    Produce {
        count: u8,
        acks_all: bool,
    },
    Fetch {
        node: usize,
        records_max: u8,
        response_lost: bool,
    },
    Flush {
        node: usize,
    },
    Crash {
        node: usize,
        lose_unflushed: bool,
    },
    Restart {
        node: usize,
    },
    Tick {
        ms: u64,
    },
    Controller,
    MoveLeader {
        node: usize,
    },
}

struct Model {
    replicas: Vec<Replica>,
    config: ReplicationConfig,
    // Controller state.
    leader: Option<usize>,
    leader_epoch: i32,
    partition_epoch: i32,
    isr: Vec<i32>,
    fenced: Vec<bool>,
    inbox: Vec<(i32, AlterPartitionProposal)>,
    next_broker_epoch: i64,
    now_ms: u64,
    next_value: u64,
    next_token: u64,
    /// token -> (offset, value) of each record of a waiting acks=all produce.
    waiting: BTreeMap<u64, Vec<(i64, u64)>>,
    acknowledged: BTreeMap<i64, u64>,
    committed: Vec<Rec>,
    /// KRaft's controller refuses ISR members with a stale broker epoch (KIP-903); a
    /// test turns it off to show the leader's own check suffices.
    controller_checks_broker_epochs: bool,
}

impl Model {
    fn new(n: usize, min_insync_replicas: usize) -> Self {
        let replicas = (0..n)
            .map(|i| Replica {
                id: i as i32 + 1,
                log: Vec::new(),
                flushed: 0,
                cache: LeaderEpochCache::new(),
                high_watermark: 0,
                alive: true,
                broker_epoch: i as i64 + 1,
                leader: None,
                truncating: false,
                last_leader_hw: None,
            })
            .collect();
        let mut m = Self {
            replicas,
            config: ReplicationConfig {
                replica_lag_time_max_ms: LAG_MS,
                min_insync_replicas,
            },
            leader: None,
            leader_epoch: -1,
            partition_epoch: 0,
            isr: (1..=n as i32).collect(),
            fenced: vec![false; n],
            inbox: Vec::new(),
            next_broker_epoch: 100,
            now_ms: 0,
            next_value: 1,
            next_token: 1,
            waiting: BTreeMap::new(),
            acknowledged: BTreeMap::new(),
            committed: Vec::new(),
            controller_checks_broker_epochs: true,
        };
        m.elect(Some(0));
        // Fresh replicas have nothing to truncate.
        for r in &mut m.replicas {
            r.truncating = false;
        }
        m
    }

    fn state(&self) -> PartitionState {
        PartitionState {
            leader_epoch: self.leader_epoch,
            partition_epoch: self.partition_epoch,
            replicas: self.replicas.iter().map(|r| r.id).collect(),
            isr: self.isr.clone(),
        }
    }

    fn idx(id: i32) -> usize {
        (id - 1) as usize
    }

    /// A leader change (any, including to none) bumps the leader epoch; every live
    /// replica learns it at once (the model's metadata propagation is synchronous; the
    /// AlterPartition in flight is what stays asynchronous).
    fn elect(&mut self, new_leader: Option<usize>) {
        self.leader_epoch += 1;
        self.partition_epoch += 1;
        if let Some(old) = self.leader {
            if let Some(l) = self.replicas[old].leader.take() {
                // The deposed leader's log keeps the high watermark it reached (capped
                // by what a crash left of it).
                let r = &mut self.replicas[old];
                r.high_watermark = l.high_watermark().min(r.leo());
                for c in l.resign() {
                    assert!(c.result.is_err());
                    self.waiting.remove(&c.token);
                }
            }
        }
        self.leader = new_leader;
        let state = self.state();
        let now = self.now_ms;
        for (i, r) in self.replicas.iter_mut().enumerate() {
            if !r.alive {
                continue;
            }
            if Some(i) == new_leader {
                assert!(self.isr.contains(&r.id));
                let leo = r.leo();
                let _ = r.cache.assign(self.leader_epoch, leo).unwrap();
                r.leader = Some(PartitionLeader::become_leader(
                    r.id,
                    r.broker_epoch,
                    self.config,
                    state.clone(),
                    leo,
                    r.high_watermark,
                    now,
                ));
                r.last_leader_hw = None;
                r.truncating = false;
            } else {
                r.truncating = true;
            }
        }
    }

    /// The ISR changed without a leader change.
    fn isr_changed(&mut self) {
        self.partition_epoch += 1;
        let state = self.state();
        if let Some(l) = self.leader.and_then(|i| self.replicas[i].leader.as_mut()) {
            l.update_partition_state(state);
        }
    }

    fn broker_state(&self, id: i32) -> Option<BrokerState> {
        let r = &self.replicas[Self::idx(id)];
        Some(BrokerState {
            broker_epoch: r.broker_epoch,
            fenced: self.fenced[Self::idx(id)],
            in_controlled_shutdown: false,
        })
    }

    fn apply(&mut self, op: &Op) {
        let n = self.replicas.len();
        match *op {
            Op::Produce { count, acks_all } => self.produce(count, acks_all),
            Op::Fetch {
                node,
                records_max,
                response_lost,
            } => self.fetch(node % n, records_max as usize, response_lost),
            Op::Flush { node } => {
                let r = &mut self.replicas[node % n];
                r.flushed = r.log.len();
            }
            Op::Crash {
                node,
                lose_unflushed,
            } => self.crash(node % n, lose_unflushed),
            Op::Restart { node } => self.restart(node % n),
            Op::Tick { ms } => {
                self.now_ms += ms;
                let now = self.now_ms;
                let brokers: Vec<Option<BrokerState>> =
                    (1..=n as i32).map(|id| self.broker_state(id)).collect();
                if let Some(i) = self.leader {
                    let r = &mut self.replicas[i];
                    let id = r.id;
                    if let Some(l) = r.leader.as_mut() {
                        if let Some(p) =
                            l.isr_proposal(now, |b| brokers.get(Self::idx(b)).copied().flatten())
                        {
                            self.inbox.push((id, p));
                        }
                    }
                }
            }
            Op::Controller => self.controller(),
            Op::MoveLeader { node } => {
                let node = node % n;
                let id = node as i32 + 1;
                if self.replicas[node].alive
                    && !self.fenced[node]
                    && self.isr.contains(&id)
                    && self.leader != Some(node)
                {
                    self.elect(Some(node));
                }
            }
        }
        self.poll_produces();
        self.check();
    }

    fn produce(&mut self, count: u8, acks_all: bool) {
        let Some(i) = self.leader else { return };
        let epoch = self.leader_epoch;
        let deadline = self.now_ms + PRODUCE_TIMEOUT_MS;
        let r = &mut self.replicas[i];
        let Some(l) = r.leader.as_ref() else { return };
        if acks_all && l.check_acks_all().is_err() {
            return;
        }
        let mut records = Vec::new();
        for _ in 0..count.max(1) {
            let value = self.next_value;
            self.next_value += 1;
            records.push((r.leo(), value));
            r.append(Rec { epoch, value });
        }
        let leo = r.leo();
        let l = r.leader.as_mut().unwrap();
        l.on_append(leo);
        if acks_all {
            let token = self.next_token;
            self.next_token += 1;
            l.add_pending_produce(token, leo, deadline).unwrap();
            self.waiting.insert(token, records);
        }
    }

    fn fetch(&mut self, f: usize, records_max: usize, response_lost: bool) {
        let Some(li) = self.leader else { return };
        if f == li || !self.replicas[f].alive || !self.replicas[li].alive {
            return;
        }
        let now = self.now_ms;
        let epoch = self.leader_epoch;
        if self.replicas[f].truncating {
            // The OffsetForLeaderEpoch path (a restarted or new follower).
            for _ in 0..TRUNCATION_ROUNDS_MAX {
                let requested = self.replicas[f]
                    .cache
                    .latest_epoch()
                    .unwrap_or(UNDEFINED_EPOCH);
                let leader = &self.replicas[li];
                let l = leader.leader.as_ref().unwrap();
                l.validate_leader_epoch(epoch).unwrap();
                let answer = leader.cache.end_offset_for(requested, leader.leo());
                let r = &mut self.replicas[f];
                let t = follower_truncation(&r.cache, r.leo(), r.high_watermark, answer);
                r.truncate_to(t.offset);
                if t.complete {
                    r.truncating = false;
                    break;
                }
            }
            assert!(!self.replicas[f].truncating, "truncation did not finish");
            return;
        }
        let request = {
            let r = &self.replicas[f];
            FollowerFetch {
                replica_id: r.id,
                replica_epoch: r.broker_epoch,
                current_leader_epoch: epoch,
                fetch_offset: r.leo(),
                last_fetched_epoch: if r.log.is_empty() {
                    None
                } else {
                    r.cache.latest_epoch()
                },
            }
        };
        let (leader_cache, leader_log) = {
            let leader = &self.replicas[li];
            (leader.cache.clone(), leader.log.clone())
        };
        let l = self.replicas[li].leader.as_mut().unwrap();
        let outcome = l.on_follower_fetch(request, &leader_cache, now).unwrap();
        if response_lost {
            return;
        }
        let r = &mut self.replicas[f];
        match outcome {
            FetchOutcome::Diverging(end) => {
                let t = follower_truncation(&r.cache, r.leo(), r.high_watermark, end);
                r.truncate_to(t.offset);
            }
            FetchOutcome::Read { high_watermark } => {
                let from = request.fetch_offset as usize;
                let to = leader_log.len().min(from + records_max.max(1));
                for rec in leader_log.get(from..to).unwrap_or_default() {
                    r.append(*rec);
                }
                let hw = follower_high_watermark(high_watermark, r.leo());
                r.high_watermark = r.high_watermark.max(hw);
            }
        }
    }

    fn crash(&mut self, node: usize, lose_unflushed: bool) {
        if !self.replicas[node].alive {
            return;
        }
        let id = node as i32 + 1;
        let last_isr_member = self.isr == [id];
        let r = &mut self.replicas[node];
        r.alive = false;
        if lose_unflushed && !last_isr_member {
            let flushed = r.flushed as i64;
            r.truncate_to(flushed);
        }
        // The controller fences it: it leaves the ISR unless it is the last member.
        self.fenced[node] = true;
        if self.leader == Some(node) {
            self.isr.retain(|&b| b != id || last_isr_member);
            let next = self.choose_leader();
            self.elect(next);
        } else if !last_isr_member && self.isr.contains(&id) {
            self.isr.retain(|&b| b != id);
            self.isr_changed();
        }
    }

    fn choose_leader(&self) -> Option<usize> {
        self.isr
            .iter()
            .map(|&id| Self::idx(id))
            .find(|&i| self.replicas[i].alive && !self.fenced[i])
    }

    fn restart(&mut self, node: usize) {
        let r = &mut self.replicas[node];
        if r.alive {
            return;
        }
        r.alive = true;
        r.broker_epoch = self.next_broker_epoch;
        self.next_broker_epoch += 1;
        r.truncating = true;
        r.leader = None;
        self.fenced[node] = false;
        if self.leader.is_none() {
            let next = self.choose_leader();
            if next.is_some() {
                self.elect(next);
            }
        }
    }

    /// The controller handles the oldest AlterPartition (KRaft's checks, in order).
    fn controller(&mut self) {
        if self.inbox.is_empty() {
            return;
        }
        let (from, p) = self.inbox.remove(0);
        let ok = p.leader_epoch == self.leader_epoch
            && self.leader == Some(Self::idx(from))
            && p.partition_epoch == self.partition_epoch
            && p.new_isr.iter().any(|m| m.broker_id == from)
            && p.new_isr.iter().all(|m| {
                let i = Self::idx(m.broker_id);
                !self.fenced[i]
                    && (!self.controller_checks_broker_epochs
                        || m.broker_epoch == -1
                        || m.broker_epoch == self.replicas[i].broker_epoch)
            });
        let leader = self.replicas[Self::idx(from)].leader.as_mut();
        if !ok {
            if let Some(l) = leader {
                if l.leader_epoch() == p.leader_epoch {
                    l.on_alter_partition_response(&p, Err(()));
                }
            }
            return;
        }
        self.isr = p.new_isr.iter().map(|m| m.broker_id).collect();
        self.partition_epoch += 1;
        let state = self.state();
        if let Some(l) = self.replicas[Self::idx(from)].leader.as_mut() {
            l.on_alter_partition_response::<()>(&p, Ok(state));
        }
    }

    fn poll_produces(&mut self) {
        let Some(i) = self.leader else { return };
        let now = self.now_ms;
        let Some(l) = self.replicas[i].leader.as_mut() else {
            return;
        };
        for c in l.poll_produces(now) {
            let records = self.waiting.remove(&c.token).unwrap();
            if c.result.is_ok() {
                for (offset, value) in records {
                    self.acknowledged.insert(offset, value);
                }
            }
        }
    }

    fn check(&mut self) {
        // Each leader's high watermark: monotonic in its epoch, within its log; what it
        // covers becomes committed, and committed never changes.
        if let Some(i) = self.leader {
            let r = &mut self.replicas[i];
            let l = r.leader.as_ref().unwrap();
            let hw = l.high_watermark();
            assert!(hw <= r.leo());
            if let Some((epoch, last)) = r.last_leader_hw {
                if epoch == l.leader_epoch() {
                    assert!(hw >= last, "leader HW went back from {last} to {hw}");
                }
            }
            r.last_leader_hw = Some((l.leader_epoch(), hw));
            let hw = hw as usize;
            let common = hw.min(self.committed.len());
            assert_eq!(
                r.log[..common],
                self.committed[..common],
                "committed records changed"
            );
            if hw > self.committed.len() {
                self.committed = r.log[..hw].to_vec();
            }
            // KIP-207: "latest" answered to a client never goes below what was already
            // committed (and so possibly consumed), even right after a leader change.
            if let Ok(latest) = l.list_offsets_latest() {
                assert!(
                    latest as usize >= self.committed.len(),
                    "ListOffsets latest {latest} below the committed {}",
                    self.committed.len()
                );
            }
            // KIP-966: a new commit happens only with a large enough ISR.
        }
        for r in &self.replicas {
            let hw = r.high_watermark as usize;
            assert!(hw <= r.log.len());
            if r.leader.is_none() {
                assert!(
                    hw <= self.committed.len(),
                    "follower HW beyond anything committed"
                );
                assert_eq!(
                    r.log[..hw],
                    self.committed[..hw],
                    "follower HW over uncommitted data"
                );
            }
        }
        // Every ISR member holds the committed prefix.
        for &id in &self.isr {
            let r = &self.replicas[Self::idx(id)];
            let c = self.committed.len();
            assert!(
                r.log.len() >= c,
                "ISR member {id} lacks committed records: {} < {c}",
                r.log.len()
            );
            assert_eq!(
                r.log[..c],
                self.committed[..],
                "ISR member {id} diverges in committed records"
            );
        }
        for (&offset, &value) in &self.acknowledged {
            let rec = self
                .committed
                .get(offset as usize)
                .expect("acknowledged but not committed");
            assert_eq!(rec.value, value);
        }
        // Log matching: same epoch at the same offset implies identical prefixes.
        for a in &self.replicas {
            for b in &self.replicas {
                if a.id >= b.id {
                    continue;
                }
                let len = a.log.len().min(b.log.len());
                if let Some(o) = (0..len).rev().find(|&o| a.log[o].epoch == b.log[o].epoch) {
                    assert_eq!(
                        a.log[..=o],
                        b.log[..=o],
                        "replicas {} and {} diverge below offset {o}",
                        a.id,
                        b.id
                    );
                }
            }
        }
    }

    /// Heals everything and replicates until all logs are equal.
    fn converge(&mut self) {
        let n = self.replicas.len();
        for i in 0..n {
            self.apply(&Op::Restart { node: i });
        }
        if self.leader.is_none() {
            let next = self.choose_leader();
            self.elect(next);
        }
        assert!(self.leader.is_some(), "no leader after healing");
        for _ in 0..200 {
            for i in 0..n {
                self.apply(&Op::Fetch {
                    node: i,
                    records_max: 50,
                    response_lost: false,
                });
            }
            self.apply(&Op::Tick { ms: 1 });
            self.apply(&Op::Controller);
            let li = self.leader.unwrap();
            let leader_log = &self.replicas[li].log;
            let leader_hw = self.replicas[li].leader.as_ref().unwrap().high_watermark();
            if self.replicas.iter().all(|r| &r.log == leader_log)
                && self.isr.len() == n
                && leader_hw == leader_log.len() as i64
            {
                break;
            }
        }
        let li = self.leader.unwrap();
        let leader_log = self.replicas[li].log.clone();
        for r in &self.replicas {
            assert_eq!(r.log, leader_log, "replica {} did not converge", r.id);
        }
        assert_eq!(self.isr.len(), n, "not every replica rejoined the ISR");
        for (&offset, &value) in &self.acknowledged {
            assert_eq!(
                leader_log[offset as usize].value, value,
                "acknowledged record lost"
            );
        }
        assert_eq!(leader_log[..self.committed.len()], self.committed[..]);
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..4, any::<bool>()).prop_map(|(count, acks_all)| Op::Produce { count, acks_all }),
        6 => (0usize..3, 1u8..5, prop::bool::weighted(0.1)).prop_map(|(node, records_max, response_lost)| Op::Fetch { node, records_max, response_lost }),
        1 => (0usize..3).prop_map(|node| Op::Flush { node }),
        1 => (0usize..3, any::<bool>()).prop_map(|(node, lose_unflushed)| Op::Crash { node, lose_unflushed }),
        1 => (0usize..3).prop_map(|node| Op::Restart { node }),
        2 => (1u64..150).prop_map(|ms| Op::Tick { ms }),
        2 => Just(Op::Controller),
        1 => (0usize..3).prop_map(|node| Op::MoveLeader { node }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn replicas_never_diverge_and_never_lose_committed_records(
        min_isr in 1usize..=2,
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mut m = Model::new(3, min_isr);
        for op in &ops {
            m.apply(op);
        }
        m.converge();
    }
}

/// KAFKA-1211 (KIP-101, scenario 1): a follower holds records the leader committed but
/// has not yet learned the new high watermark; it restarts. Truncating to its high
/// watermark would drop them, and if the leader then dies they are lost. The epoch
/// protocol keeps them.
#[test]
fn kafka_1211_restarted_follower_keeps_committed_records() {
    let mut m = Model::new(2, 1);
    m.apply(&Op::Produce {
        count: 2,
        acks_all: true,
    });
    m.apply(&Op::Fetch {
        node: 1,
        records_max: 5,
        response_lost: false,
    });
    // The follower's next fetch tells the leader it has both; the leader commits and
    // acknowledges, but the response with the new high watermark is lost.
    m.apply(&Op::Fetch {
        node: 1,
        records_max: 5,
        response_lost: true,
    });
    assert_eq!(m.acknowledged.len(), 2);
    assert_eq!(
        m.replicas[1].high_watermark, 0,
        "the trap: the follower's HW lags"
    );
    m.apply(&Op::Crash {
        node: 1,
        lose_unflushed: false,
    });
    m.apply(&Op::Restart { node: 1 });
    // The restarted follower asks OffsetForLeaderEpoch (truncating to its HW would
    // leave offset 0 only).
    m.apply(&Op::Fetch {
        node: 1,
        records_max: 5,
        response_lost: false,
    });
    assert_eq!(
        m.replicas[1].log.len(),
        2,
        "truncation by epoch kept both records"
    );
    // It fetches again and rejoins the ISR; then the leader dies and it takes over.
    m.apply(&Op::Fetch {
        node: 1,
        records_max: 5,
        response_lost: false,
    });
    m.apply(&Op::Tick { ms: 1 });
    m.apply(&Op::Controller);
    assert_eq!(m.isr, vec![1, 2]);
    m.apply(&Op::Crash {
        node: 0,
        lose_unflushed: false,
    });
    assert_eq!(m.leader, Some(1));
    m.converge();
}

/// KIP-101 scenario 2: both replicas crash; the one with fewer records becomes leader
/// and writes at an offset the other also wrote (uncommitted). The other must truncate
/// by epoch, not keep its record at that offset.
#[test]
fn kip_101_divergent_offset_after_double_crash_is_truncated() {
    let mut m = Model::new(2, 1);
    m.apply(&Op::Produce {
        count: 1,
        acks_all: false,
    });
    m.apply(&Op::Fetch {
        node: 1,
        records_max: 5,
        response_lost: false,
    });
    m.apply(&Op::Fetch {
        node: 1,
        records_max: 5,
        response_lost: false,
    });
    m.apply(&Op::Produce {
        count: 1,
        acks_all: false,
    });
    // Leader 1 has offsets 0 and 1, follower 2 only 0 (committed: 0).
    m.apply(&Op::Crash {
        node: 0,
        lose_unflushed: false,
    });
    assert_eq!(m.leader, Some(1));
    m.apply(&Op::Produce {
        count: 1,
        acks_all: false,
    });
    assert_ne!(
        m.replicas[0].log[1], m.replicas[1].log[1],
        "the trap: offset 1 differs"
    );
    m.apply(&Op::Restart { node: 0 });
    m.apply(&Op::Fetch {
        node: 0,
        records_max: 5,
        response_lost: false,
    });
    assert_eq!(
        m.replicas[0].log.len(),
        1,
        "truncated to the end of the common epoch"
    );
    m.converge();
}

/// KAFKA-6361 (KIP-279): back-to-back leader changes. Node 2 leads epoch 1 briefly and
/// writes offsets 2..4; leadership returns to node 1 (epoch 2) before node 1 ever fetched
/// from node 2. Node 2 then learns "epoch 0 ended at 4" (the leader never had epoch 1):
/// truncating to min(leader's end, own end) = 4 would keep its epoch-1 records at 2 and 3,
/// diverging; KIP-279 truncates to the end of its own epoch 0, offset 2.
#[test]
fn kafka_6361_back_to_back_leader_changes_do_not_diverge() {
    let mut m = Model::new(3, 1);
    m.apply(&Op::Produce {
        count: 4,
        acks_all: false,
    });
    m.apply(&Op::Fetch {
        node: 1,
        records_max: 2,
        response_lost: false,
    });
    m.apply(&Op::MoveLeader { node: 1 });
    m.apply(&Op::Produce {
        count: 2,
        acks_all: false,
    });
    m.apply(&Op::MoveLeader { node: 0 });
    m.apply(&Op::Produce {
        count: 1,
        acks_all: false,
    });
    assert_eq!(m.replicas[1].log.len(), 4);
    assert_eq!(m.replicas[1].log[2].epoch, 1);
    assert_eq!(
        m.replicas[0].log[2].epoch, 0,
        "the trap: same offsets, other epochs"
    );
    // Node 2 was told it is a follower again; its first exchange truncates.
    m.apply(&Op::Fetch {
        node: 1,
        records_max: 10,
        response_lost: false,
    });
    assert_eq!(
        m.replicas[1].log.len(),
        2,
        "truncated to the end of the common epoch 0"
    );
    m.apply(&Op::Fetch {
        node: 1,
        records_max: 10,
        response_lost: false,
    });
    assert_eq!(m.replicas[1].log, m.replicas[0].log);
    m.converge();
}

/// The same KAFKA-6361 history through the fetch path (KIP-320 `DivergingEpoch`) instead
/// of OffsetForLeaderEpoch.
#[test]
fn kafka_6361_through_diverging_epoch() {
    let mut m = Model::new(3, 1);
    m.apply(&Op::Produce {
        count: 4,
        acks_all: false,
    });
    m.apply(&Op::Fetch {
        node: 1,
        records_max: 2,
        response_lost: false,
    });
    m.apply(&Op::MoveLeader { node: 1 });
    m.apply(&Op::Produce {
        count: 2,
        acks_all: false,
    });
    m.apply(&Op::MoveLeader { node: 0 });
    m.apply(&Op::Produce {
        count: 1,
        acks_all: false,
    });
    m.replicas[1].truncating = false;
    m.apply(&Op::Fetch {
        node: 1,
        records_max: 10,
        response_lost: false,
    });
    assert_eq!(m.replicas[1].log.len(), 2);
    m.apply(&Op::Fetch {
        node: 1,
        records_max: 10,
        response_lost: false,
    });
    assert_eq!(m.replicas[1].log, m.replicas[0].log);
    m.converge();
}

/// KIP-966: with min.insync.replicas 2 and the ISR shrunk to the leader alone, nothing
/// more is committed or acknowledged, so losing the leader's tail later loses nothing
/// acknowledged.
#[test]
fn below_min_isr_nothing_is_committed() {
    let mut m = Model::new(3, 2);
    m.apply(&Op::Produce {
        count: 1,
        acks_all: true,
    });
    for node in [1, 2] {
        m.apply(&Op::Fetch {
            node,
            records_max: 5,
            response_lost: false,
        });
        m.apply(&Op::Fetch {
            node,
            records_max: 5,
            response_lost: false,
        });
    }
    assert_eq!(m.acknowledged.len(), 1);
    m.apply(&Op::Crash {
        node: 1,
        lose_unflushed: true,
    });
    m.apply(&Op::Crash {
        node: 2,
        lose_unflushed: true,
    });
    assert_eq!(m.isr, vec![1]);
    let before = m.committed.len();
    m.apply(&Op::Produce {
        count: 3,
        acks_all: false,
    });
    m.apply(&Op::Tick { ms: 1 });
    assert_eq!(
        m.committed.len(),
        before,
        "HW advanced below min.insync.replicas"
    );
    m.apply(&Op::Produce {
        count: 1,
        acks_all: true,
    });
    assert!(m.waiting.is_empty(), "acks=all refused before the append");
    m.converge();
}

/// Leader 1 commits offsets 0..2 with ISR {1, 2}; broker 3, outside the ISR, has offset 0
/// only. Leadership moves to 2, whose own high watermark lags at 0. Broker 3 fetches
/// from offset 1, at or above that high watermark: joining the ISR then would make an ISR
/// member that lacks committed offset 1. It must wait for the epoch start (KAFKA-7128).
#[test]
fn kafka_7128_follower_joins_only_from_the_epoch_start() {
    let mut m = Model::new(3, 1);
    m.apply(&Op::Produce {
        count: 2,
        acks_all: false,
    });
    m.apply(&Op::Fetch {
        node: 1,
        records_max: 5,
        response_lost: false,
    });
    m.apply(&Op::Fetch {
        node: 1,
        records_max: 5,
        response_lost: false,
    });
    m.apply(&Op::Tick { ms: LAG_MS + 1 });
    m.apply(&Op::Controller);
    assert_eq!(m.isr, vec![1, 2]);
    assert_eq!(m.committed.len(), 2);
    m.apply(&Op::Fetch {
        node: 2,
        records_max: 1,
        response_lost: false,
    });
    m.apply(&Op::MoveLeader { node: 1 });
    assert_eq!(
        m.replicas[1].leader.as_ref().unwrap().high_watermark(),
        0,
        "the trap: a lagging HW"
    );
    m.apply(&Op::Fetch {
        node: 2,
        records_max: 1,
        response_lost: false,
    }); // OffsetForLeaderEpoch
    m.apply(&Op::Fetch {
        node: 2,
        records_max: 1,
        response_lost: true,
    });
    m.apply(&Op::Tick { ms: 1 });
    m.apply(&Op::Controller);
    assert_eq!(m.isr, vec![1, 2], "broker 3 joined below the epoch start");
    m.converge();
}

/// Broker 3 fetched offsets 0..2 (the leader recorded it), then crashed losing its
/// unflushed log and came back with a new broker epoch. Until it fetches again the leader
/// still believes it holds offset 2: only the broker epoch (KIP-903) stops the leader
/// from proposing it as in sync, even with a controller that does not check.
#[test]
fn kip_903_a_wiped_broker_does_not_rejoin_on_an_old_fetch() {
    let mut m = Model::new(3, 1);
    m.controller_checks_broker_epochs = false;
    m.apply(&Op::Produce {
        count: 2,
        acks_all: false,
    });
    m.apply(&Op::Fetch {
        node: 1,
        records_max: 5,
        response_lost: false,
    });
    m.apply(&Op::Fetch {
        node: 1,
        records_max: 5,
        response_lost: false,
    });
    m.apply(&Op::Tick { ms: LAG_MS + 1 });
    m.apply(&Op::Controller);
    assert_eq!(m.isr, vec![1, 2]);
    m.apply(&Op::Fetch {
        node: 2,
        records_max: 5,
        response_lost: false,
    });
    m.apply(&Op::Fetch {
        node: 2,
        records_max: 5,
        response_lost: true,
    });
    m.apply(&Op::Crash {
        node: 2,
        lose_unflushed: true,
    });
    m.apply(&Op::Restart { node: 2 });
    assert!(m.replicas[2].log.is_empty());
    m.apply(&Op::Tick { ms: 1 });
    m.apply(&Op::Controller);
    assert_eq!(m.isr, vec![1, 2], "a wiped broker rejoined the ISR");
    m.converge();
}
