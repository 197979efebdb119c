//! One test per rule, through the public API, checking the image the records build.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;

use ferrite_metadata::{BrokerEndpoint, MetadataImage, MetadataRecord, PartitionImage};
use uuid::Uuid;

use crate::*;

pub(crate) struct Harness {
    pub c: Controller,
    pub now: i64,
    /// Every entry appended, in order: replaying it from scratch must give `c.image()`.
    pub log: Vec<Vec<MetadataRecord>>,
    pub incarnations: BTreeMap<i32, u64>,
}

impl Harness {
    pub fn new(config: ControllerConfig) -> Harness {
        Harness {
            c: Controller::new(config, MetadataImage::default(), 0, 0, 42),
            now: 0,
            log: Vec::new(),
            incarnations: BTreeMap::new(),
        }
    }

    pub fn default() -> Harness {
        Harness::new(ControllerConfig::default())
    }

    pub fn run(&mut self, event: Event) -> Reply {
        let expected = self.c.next_offset();
        let out = self.c.handle(event, self.now);
        if out.records.is_empty() {
            assert_eq!(out.offset, None);
        } else {
            assert_eq!(out.offset, Some(expected));
            assert_eq!(self.log.len() as i64, expected, "one entry per offset");
            self.log.push(out.records);
        }
        out.reply
    }

    pub fn replayed(&self) -> MetadataImage {
        let mut image = MetadataImage::default();
        for entry in &self.log {
            image.apply_all(entry);
        }
        image
    }

    pub fn registration(&mut self, id: i32, incarnation: u64) -> BrokerRegistration {
        BrokerRegistration {
            broker_id: id,
            cluster_id: "c".into(),
            incarnation_id: Uuid::from_u64_pair(incarnation, id as u64 + 1),
            listeners: vec![BrokerEndpoint {
                name: "PLAINTEXT".into(),
                host: "127.0.0.1".into(),
                port: 9000 + id as u16,
                security_protocol: 0,
            }],
            rack: Some(format!("rack{}", id % 2)),
        }
    }

    pub fn register(&mut self, id: i32) -> Result<i64, ControllerError> {
        let inc = *self
            .incarnations
            .entry(id)
            .and_modify(|i| *i += 1)
            .or_insert(1);
        self.register_as(id, inc)
    }

    pub fn register_as(&mut self, id: i32, incarnation: u64) -> Result<i64, ControllerError> {
        let r = self.registration(id, incarnation);
        match self.run(Event::RegisterBroker(r)) {
            Reply::RegisterBroker(r) => r.map(|r| r.broker_epoch),
            other => panic!("{other:?}"),
        }
    }

    pub fn epoch(&self, id: i32) -> i64 {
        self.c.image().broker(id).unwrap().broker_epoch
    }

    /// A heartbeat from a broker that has applied everything committed so far.
    pub fn heartbeat(
        &mut self,
        id: i32,
        want_fence: bool,
        want_shut_down: bool,
    ) -> BrokerHeartbeatReply {
        let offset = self.c.next_offset() - 1;
        self.heartbeat_at(id, offset, want_fence, want_shut_down)
            .unwrap()
    }

    pub fn heartbeat_at(
        &mut self,
        id: i32,
        current_metadata_offset: i64,
        want_fence: bool,
        want_shut_down: bool,
    ) -> Result<BrokerHeartbeatReply, ControllerError> {
        let hb = BrokerHeartbeat {
            broker_id: id,
            broker_epoch: self.epoch(id),
            current_metadata_offset,
            want_fence,
            want_shut_down,
        };
        match self.run(Event::Heartbeat(hb)) {
            Reply::Heartbeat(r) => r,
            other => panic!("{other:?}"),
        }
    }

    /// Registers and unfences brokers `ids`.
    pub fn start(&mut self, ids: &[i32]) {
        for &id in ids {
            self.register(id).unwrap();
            let r = self.heartbeat(id, false, false);
            assert!(r.is_caught_up && !r.is_fenced, "{r:?}");
        }
    }

    pub fn create(
        &mut self,
        name: &str,
        partitions: i32,
        rf: i16,
        configs: &[(&str, &str)],
    ) -> Result<CreatedTopic, ControllerError> {
        self.create_topic(CreatableTopic {
            name: name.into(),
            num_partitions: partitions,
            replication_factor: rf,
            assignments: None,
            configs: configs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    pub fn create_topic(&mut self, t: CreatableTopic) -> Result<CreatedTopic, ControllerError> {
        match self.run(Event::CreateTopics(CreateTopics {
            topics: vec![t],
            validate_only: false,
        })) {
            Reply::CreateTopics(mut r) => r.remove(0).result,
            other => panic!("{other:?}"),
        }
    }

    pub fn partition(&self, topic: &str, p: i32) -> PartitionImage {
        self.c.image().topic(topic).unwrap().partitions[&p].clone()
    }

    pub fn tick(&mut self, advance_ms: i64) {
        self.now += advance_ms;
        self.run(Event::Tick);
    }

    pub fn alter(
        &mut self,
        req: AlterPartition,
    ) -> Result<Vec<AlterPartitionResult>, ControllerError> {
        match self.run(Event::AlterPartition(req)) {
            Reply::AlterPartition(r) => r,
            other => panic!("{other:?}"),
        }
    }

    /// An AlterPartition from the current leader of `topic`-`p` with the current epochs.
    pub fn shrink_request(&self, topic: &str, p: i32, isr: &[i32]) -> AlterPartition {
        let part = self.partition(topic, p);
        let topic_id = self.c.image().topic(topic).unwrap().topic_id;
        AlterPartition {
            broker_id: part.leader,
            broker_epoch: self.epoch(part.leader),
            topics: vec![AlterPartitionTopic {
                topic_id,
                partitions: vec![AlterPartitionData {
                    partition: p,
                    leader_epoch: part.leader_epoch,
                    new_isr: isr
                        .iter()
                        .map(|&b| IsrMember {
                            broker_id: b,
                            broker_epoch: self.c.image().broker(b).map_or(-1, |r| r.broker_epoch),
                        })
                        .collect(),
                    partition_epoch: part.partition_epoch,
                }],
            }],
        }
    }

    pub fn alter_one(&mut self, req: AlterPartition) -> Result<PartitionState, ControllerError> {
        let mut r = self.alter(req)?;
        assert_eq!(r.len(), 1);
        r.remove(0).result
    }

    pub fn elect(
        &mut self,
        election_type: ElectionType,
        partitions: Option<Vec<(String, Vec<i32>)>>,
    ) -> Vec<ElectionResult> {
        match self.run(Event::ElectLeaders(ElectLeaders {
            election_type,
            partitions,
        })) {
            Reply::ElectLeaders(r) => r,
            other => panic!("{other:?}"),
        }
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, ControllerError>) -> i16 {
    r.expect_err("expected an error").code()
}

#[test]
fn registration_starts_fenced_with_the_entry_offset_as_epoch() {
    let mut h = Harness::default();
    let e0 = h.register(0).unwrap();
    let e1 = h.register(1).unwrap();
    assert_eq!(
        (e0, e1),
        (0, 1),
        "broker epoch = offset of the registration entry"
    );
    let b = h.c.image().broker(1).unwrap();
    assert!(b.fenced);
    assert_eq!(b.endpoints[0].port, 9001);
    assert_eq!(b.rack.as_deref(), Some("rack1"));
    assert_eq!(h.replayed(), *h.c.image());
}

#[test]
fn unfenced_only_once_caught_up_and_not_wanting_fence() {
    let mut h = Harness::default();
    h.register(0).unwrap();
    h.register(1).unwrap();
    // Broker 1 registered at offset 1; having applied only offset 0 it is behind.
    let r = h.heartbeat_at(1, 0, false, false).unwrap();
    assert!(!r.is_caught_up && r.is_fenced);
    assert!(h.c.image().broker(1).unwrap().fenced);
    let r = h.heartbeat_at(1, 1, true, false).unwrap();
    assert!(r.is_caught_up && r.is_fenced, "wants fence: stays fenced");
    let r = h.heartbeat_at(1, 1, false, false).unwrap();
    assert!(r.is_caught_up && !r.is_fenced);
    assert!(h.c.image().broker(1).unwrap().is_active());
    // An unfenced broker asking to be fenced is.
    let r = h.heartbeat(1, true, false);
    assert!(r.is_fenced);
    assert!(h.c.image().broker(1).unwrap().fenced);
}

#[test]
fn heartbeat_with_a_stale_epoch_or_unknown_broker_is_refused() {
    let mut h = Harness::default();
    h.register(0).unwrap();
    let hb = BrokerHeartbeat {
        broker_id: 0,
        broker_epoch: 7,
        current_metadata_offset: 0,
        want_fence: false,
        want_shut_down: false,
    };
    let Reply::Heartbeat(r) = h.run(Event::Heartbeat(hb)) else {
        panic!()
    };
    assert_eq!(code(r), 77);
    let Reply::Heartbeat(r) = h.run(Event::Heartbeat(BrokerHeartbeat { broker_id: 5, ..hb }))
    else {
        panic!()
    };
    assert_eq!(code(r), 77);
}

#[test]
fn duplicate_registration_while_the_session_lives() {
    let mut h = Harness::default();
    h.start(&[0]);
    h.now += 5_000;
    h.heartbeat(0, false, false);
    h.now += 8_000;
    // Another incarnation within the session: refused.
    assert_eq!(code(h.register_as(0, 99)), 101);
    // The same incarnation may re-register (a retried request): new epoch, fenced.
    let inc = h.incarnations[&0];
    let epoch = h.register_as(0, inc).unwrap();
    assert_eq!(h.epoch(0), epoch);
    assert!(h.c.image().broker(0).unwrap().fenced);
    h.heartbeat(0, false, false);
    // Once the session has expired, a new incarnation replaces the old one.
    h.now += 9_001;
    let epoch = h.register_as(0, 99).unwrap();
    let b = h.c.image().broker(0).unwrap();
    assert_eq!(b.incarnation_id, Uuid::from_u64_pair(99, 1));
    assert_eq!(b.broker_epoch, epoch);
    assert!(b.fenced);
}

#[test]
fn a_fenced_registration_does_not_block_a_new_incarnation() {
    let mut h = Harness::default();
    h.start(&[0, 1]);
    h.heartbeat(1, true, false);
    assert!(h.c.image().broker(1).unwrap().fenced);
    h.register_as(1, 50).unwrap();
}

#[test]
fn a_new_controller_gives_sessions_a_grace_period_but_no_veto() {
    let mut h = Harness::default();
    h.start(&[0, 1]);
    h.create("t", 2, 2, &[]).unwrap();
    // Fail over: a controller built from the committed image at a later time.
    let image = h.replayed();
    h.c = Controller::new(
        ControllerConfig::default(),
        image,
        h.log.len() as i64,
        100_000,
        7,
    );
    h.now = 100_000;
    // Nobody is fenced at once, though nobody has heartbeated to this controller.
    h.tick(9_000);
    assert!(h.c.image().broker(0).unwrap().is_active());
    // A restarted broker 1 (new incarnation) is not blocked by the inherited session.
    h.heartbeat(0, false, false);
    h.register_as(1, 77).unwrap();
    // Broker 0 keeps heartbeating; the session of 1 is the new one.
    h.tick(1);
    assert!(h.c.image().broker(0).unwrap().is_active());
    assert_eq!(h.replayed(), *h.c.image());
}

#[test]
fn missed_heartbeats_fence_after_the_session_timeout_and_leadership_moves() {
    let mut h = Harness::default();
    h.start(&[0, 1, 2]);
    h.create("t", 6, 3, &[]).unwrap();
    let led_by_0: Vec<i32> = (0..6)
        .filter(|&p| h.partition("t", p).leader == 0)
        .collect();
    assert!(!led_by_0.is_empty());
    let before: Vec<PartitionImage> = (0..6).map(|p| h.partition("t", p)).collect();
    h.now += 4_000;
    h.heartbeat(1, false, false);
    h.heartbeat(2, false, false);
    h.now += 5_000;
    h.heartbeat(1, false, false);
    h.heartbeat(2, false, false);
    // Exactly broker.session.timeout.ms since broker 0's last contact: still alive.
    h.tick(0);
    assert!(h.c.image().broker(0).unwrap().is_active());
    h.tick(1);
    assert!(h.c.image().broker(0).unwrap().fenced);
    for (p, old) in before.iter().enumerate() {
        let new = h.partition("t", p as i32);
        assert!(!new.isr.contains(&0), "fenced broker left the ISR: {new:?}");
        assert_eq!(new.partition_epoch, old.partition_epoch + 1);
        if old.leader == 0 {
            // The first replica in Replicas order that is still in sync.
            let expected = *old.replicas.iter().find(|&&b| b != 0).unwrap();
            assert_eq!(new.leader, expected);
            assert_eq!(new.leader_epoch, old.leader_epoch + 1);
        } else {
            assert_eq!(
                (new.leader, new.leader_epoch),
                (old.leader, old.leader_epoch)
            );
        }
    }
    assert_eq!(h.replayed(), *h.c.image());
}

#[test]
fn the_last_isr_member_stays_and_the_partition_goes_offline_then_back() {
    let mut h = Harness::default();
    h.start(&[0]);
    h.create("t", 1, 1, &[]).unwrap();
    let p = h.partition("t", 0);
    assert_eq!((p.leader, p.leader_epoch, p.isr.clone()), (0, 0, vec![0]));
    h.tick(9_001);
    let p = h.partition("t", 0);
    assert_eq!((p.leader, p.leader_epoch, p.isr.clone()), (-1, 1, vec![0]));
    // Unfencing re-elects leaderless partitions whose ISR holds the broker.
    let r = h.heartbeat(0, false, false);
    assert!(!r.is_fenced);
    let p = h.partition("t", 0);
    assert_eq!((p.leader, p.leader_epoch, p.isr.clone()), (0, 2, vec![0]));
}

#[test]
fn an_out_of_sync_replica_leads_only_when_unclean_election_is_enabled() {
    for unclean in [false, true] {
        let mut h = Harness::default();
        h.start(&[0, 1]);
        let cfg: &[(&str, &str)] = if unclean {
            &[("unclean.leader.election.enable", "true")]
        } else {
            &[]
        };
        h.create_topic(CreatableTopic {
            name: "t".into(),
            num_partitions: -1,
            replication_factor: -1,
            assignments: Some(vec![vec![0, 1]]),
            configs: cfg
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
        .unwrap();
        // The leader drops 1 from the ISR, then dies.
        h.alter_one(h.shrink_request("t", 0, &[0])).unwrap();
        h.heartbeat(1, false, false);
        h.now += 9_001;
        h.heartbeat(1, false, false);
        h.tick(0);
        let p = h.partition("t", 0);
        if unclean {
            assert_eq!((p.leader, p.isr.clone()), (1, vec![1]));
        } else {
            assert_eq!((p.leader, p.isr.clone()), (-1, vec![0]));
        }
    }
}

#[test]
fn controlled_shutdown_moves_leadership_then_lets_the_broker_go() {
    let mut h = Harness::default();
    h.start(&[0, 1, 2]);
    h.create("t", 3, 2, &[]).unwrap();
    h.create("solo", 1, 1, &[]).unwrap();
    let victim = h.partition("t", 0).leader;
    let r = h.heartbeat(victim, false, true);
    assert!(
        r.in_controlled_shutdown && !r.should_shut_down && !r.is_fenced,
        "{r:?}"
    );
    let b = h.c.image().broker(victim).unwrap();
    assert!(b.in_controlled_shutdown && !b.fenced);
    for p in 0..3 {
        let part = h.partition("t", p);
        assert_ne!(part.leader, victim);
        assert!(part.leader >= 0, "another ISR member took over");
        assert!(!part.isr.contains(&victim));
    }
    // Others have not yet seen the shutdown start: wait.
    let others: Vec<i32> = [0, 1, 2].into_iter().filter(|&b| b != victim).collect();
    let r = h.heartbeat(victim, false, true);
    assert!(!r.should_shut_down);
    for &b in &others {
        h.heartbeat(b, false, false);
    }
    let r = h.heartbeat(victim, false, true);
    assert!(r.should_shut_down && r.is_fenced, "{r:?}");
    assert!(h.c.image().broker(victim).unwrap().fenced);
    // The next start registers at once (the old registration is fenced).
    h.register_as(victim, 1234).unwrap();
    assert_eq!(h.replayed(), *h.c.image());
}

#[test]
fn shutdown_without_leaderships_is_immediate() {
    let mut h = Harness::default();
    h.start(&[0, 1]);
    let r = h.heartbeat(1, false, true);
    assert!(r.should_shut_down && r.is_fenced);
    // A fenced broker asking to shut down is told to.
    let r = h.heartbeat(1, false, true);
    assert!(r.should_shut_down);
}

#[test]
fn alter_partition_checks_in_kafkas_order() {
    let mut h = Harness::default();
    h.start(&[0, 1, 2]);
    h.create_topic(CreatableTopic {
        name: "t".into(),
        num_partitions: -1,
        replication_factor: -1,
        assignments: Some(vec![vec![0, 1, 2]]),
        configs: BTreeMap::new(),
    })
    .unwrap();
    let ok = h.shrink_request("t", 0, &[0, 1]);
    let with = |f: &dyn Fn(&mut AlterPartitionData)| {
        let mut r = ok.clone();
        f(&mut r.topics[0].partitions[0]);
        r
    };
    // Whole request: the sender's broker epoch.
    let mut stale = ok.clone();
    stale.broker_epoch += 100;
    assert_eq!(code(h.alter(stale)), 77);
    // Per partition, in order.
    let one = |h: &mut Harness, r| code(h.alter_one(r));
    assert_eq!(one(&mut h, with(&|d| d.leader_epoch += 1)), 41);
    assert_eq!(one(&mut h, with(&|d| d.partition_epoch += 1)), 41);
    assert_eq!(
        one(
            &mut h,
            with(&|d| {
                d.leader_epoch -= 1;
                d.partition_epoch -= 1;
            })
        ),
        74,
        "an older leader epoch is fenced before the partition epoch is looked at"
    );
    let mut not_leader = ok.clone();
    not_leader.broker_id = 1;
    not_leader.broker_epoch = h.epoch(1);
    assert_eq!(one(&mut h, not_leader), 42);
    assert_eq!(one(&mut h, with(&|d| d.partition_epoch -= 1)), 95);
    assert_eq!(
        one(
            &mut h,
            with(&|d| d.new_isr.push(IsrMember {
                broker_id: 9,
                broker_epoch: -1
            }))
        ),
        42,
        "not a replica"
    );
    assert_eq!(
        one(
            &mut h,
            with(&|d| d.new_isr.push(IsrMember {
                broker_id: 1,
                broker_epoch: -1
            }))
        ),
        42,
        "duplicate"
    );
    assert_eq!(
        one(
            &mut h,
            with(&|d| {
                d.new_isr.remove(0);
            })
        ),
        42,
        "without the leader"
    );
    assert_eq!(
        one(&mut h, with(&|d| d.new_isr[1].broker_epoch += 5)),
        107,
        "KIP-903: a stale broker epoch"
    );
    let mut unknown = ok.clone();
    unknown.topics[0].topic_id = Uuid::from_u64_pair(9, 9);
    assert_eq!(one(&mut h, unknown), 100);
    assert_eq!(one(&mut h, with(&|d| d.partition = 5)), 3);
    // Fenced and shutting-down replicas are ineligible.
    h.heartbeat(2, true, false);
    let ok = h.shrink_request("t", 0, &[0, 1, 2]);
    assert_eq!(one(&mut h, ok), 107);
    // Nothing was changed by the refusals.
    let p = h.partition("t", 0);
    assert_eq!((p.leader_epoch, p.isr.clone()), (0, vec![0, 1]));
}

#[test]
fn alter_partition_changes_the_isr_and_bumps_only_the_partition_epoch() {
    let mut h = Harness::default();
    h.start(&[0, 1, 2]);
    h.create_topic(CreatableTopic {
        name: "t".into(),
        num_partitions: -1,
        replication_factor: -1,
        assignments: Some(vec![vec![0, 1, 2]]),
        configs: BTreeMap::new(),
    })
    .unwrap();
    let s = h.alter_one(h.shrink_request("t", 0, &[0, 2])).unwrap();
    assert_eq!(
        s,
        PartitionState {
            leader: 0,
            leader_epoch: 0,
            isr: vec![0, 2],
            partition_epoch: 1
        }
    );
    let s = h.alter_one(h.shrink_request("t", 0, &[0, 2, 1])).unwrap();
    assert_eq!((s.isr, s.partition_epoch), (vec![0, 2, 1], 2));
    // The same ISR again changes nothing and writes nothing.
    let entries = h.log.len();
    let s = h.alter_one(h.shrink_request("t", 0, &[0, 2, 1])).unwrap();
    assert_eq!(s.partition_epoch, 2);
    assert_eq!(h.log.len(), entries);
}

#[test]
fn placement_uses_usable_brokers_rack_aware() {
    let mut h = Harness::default();
    h.start(&[0, 1, 2, 3]);
    h.register(4).unwrap(); // fenced: never placed on
    let t = h.create("t", 8, 2, &[]).unwrap();
    assert_eq!((t.num_partitions, t.replication_factor), (8, 2));
    for p in 0..8 {
        let part = h.partition("t", p);
        assert!(!part.replicas.contains(&4));
        assert_eq!(part.isr, part.replicas);
        assert_eq!(part.leader, part.replicas[0]);
        // Racks alternate (rack0: 0,2; rack1: 1,3): the two replicas span both.
        assert_ne!(part.replicas[0] % 2, part.replicas[1] % 2, "{part:?}");
    }
    assert_eq!(code(h.create("big", 1, 5, &[])), 38);
    assert_eq!(code(h.create("zero", 1, 0, &[])), 38);
    assert_eq!(code(h.create("nopart", 0, 1, &[])), 37);
    assert_eq!(code(h.create("t", 1, 1, &[])), 36);
    h.create("a.b", 1, 1, &[]).unwrap();
    assert_eq!(
        code(h.create("a_b", 1, 1, &[])),
        17,
        "collides with a.b in metric names"
    );
    assert_eq!(code(h.create("a/b", 1, 1, &[])), 17);
    assert_eq!(h.c.config().default_replication_factor, 1);
    let d = h
        .create("defaults", -1, -1, &[("retention.ms", "5")])
        .unwrap();
    assert_eq!((d.num_partitions, d.replication_factor), (1, 1));
    assert_eq!(
        h.c.image()
            .topic("defaults")
            .unwrap()
            .configs
            .get("retention.ms")
            .map(String::as_str),
        Some("5")
    );
}

#[test]
fn internal_topics_get_min_of_three_and_the_usable_brokers() {
    let mut h = Harness::default();
    h.start(&[0, 1]);
    let t = h.create("__consumer_offsets", 5, -1, &[]).unwrap();
    assert_eq!(t.replication_factor, 2);
    let mut h = Harness::default();
    h.start(&[0, 1, 2, 3, 4]);
    let t = h.create("__consumer_offsets", 5, -1, &[]).unwrap();
    assert_eq!(t.replication_factor, 3);
    let t = h.create("user", 5, -1, &[]).unwrap();
    assert_eq!(t.replication_factor, 1);
}

#[test]
fn transaction_state_gets_transaction_state_log_min_isr_at_most_its_replicas() {
    let min_isr = |h: &Harness, name: &str| {
        h.c.image()
            .topic(name)
            .unwrap()
            .configs
            .get("min.insync.replicas")
            .cloned()
    };
    let mut h = Harness::default();
    h.start(&[0, 1, 2]);
    let t = h.create("__transaction_state", 3, -1, &[]).unwrap();
    assert_eq!(t.replication_factor, 3);
    assert_eq!(min_isr(&h, "__transaction_state").as_deref(), Some("2"));
    // Only the transaction coordinator's topic: others keep the broker default.
    h.create("__consumer_offsets", 3, -1, &[]).unwrap();
    assert_eq!(min_isr(&h, "__consumer_offsets"), None);
    // One broker: clamped to the one replica, so that transactions still run.
    let mut h = Harness::default();
    h.start(&[0]);
    h.create("__transaction_state", 3, -1, &[]).unwrap();
    assert_eq!(min_isr(&h, "__transaction_state").as_deref(), Some("1"));
    // A config in the request wins; so does the broker's setting.
    let mut h = Harness::default();
    h.start(&[0, 1, 2]);
    h.create(
        "__transaction_state",
        3,
        -1,
        &[("min.insync.replicas", "3")],
    )
    .unwrap();
    assert_eq!(min_isr(&h, "__transaction_state").as_deref(), Some("3"));
    let mut h = Harness::new(ControllerConfig {
        transaction_state_log_min_isr: 3,
        ..ControllerConfig::default()
    });
    h.start(&[0, 1, 2, 3]);
    h.create("__transaction_state", 3, -1, &[]).unwrap();
    assert_eq!(min_isr(&h, "__transaction_state").as_deref(), Some("3"));
}

#[test]
fn transaction_state_takes_its_own_replication_factor() {
    let mut h = Harness::new(ControllerConfig {
        transaction_state_log_replication_factor: 2,
        ..ControllerConfig::default()
    });
    h.start(&[0, 1, 2, 3]);
    let t = h.create("__transaction_state", 3, -1, &[]).unwrap();
    assert_eq!(t.replication_factor, 2);
    let t = h.create("__consumer_offsets", 3, -1, &[]).unwrap();
    assert_eq!(t.replication_factor, 3, "offsets.topic.replication.factor");
    // Clamped to the usable brokers, as the offsets topic is.
    let mut h = Harness::new(ControllerConfig {
        transaction_state_log_replication_factor: 5,
        ..ControllerConfig::default()
    });
    h.start(&[0, 1]);
    let t = h.create("__transaction_state", 3, -1, &[]).unwrap();
    assert_eq!(t.replication_factor, 2);
    // An explicit replication factor in the request wins.
    let mut h = Harness::default();
    h.start(&[0, 1, 2]);
    let t = h.create("__transaction_state", 3, 1, &[]).unwrap();
    assert_eq!(t.replication_factor, 1);
}

#[test]
fn manual_assignments_are_validated() {
    let mut h = Harness::default();
    h.start(&[0, 1, 2]);
    h.register(3).unwrap(); // registered but fenced
    let topic = |a: Vec<Vec<i32>>, n: i32| CreatableTopic {
        name: "m".into(),
        num_partitions: n,
        replication_factor: -1,
        assignments: Some(a),
        configs: BTreeMap::new(),
    };
    assert_eq!(
        code(h.create_topic(topic(vec![vec![0, 9]], -1))),
        39,
        "unregistered"
    );
    assert_eq!(
        code(h.create_topic(topic(vec![vec![0, 0]], -1))),
        39,
        "duplicate"
    );
    assert_eq!(
        code(h.create_topic(topic(vec![vec![0, 1], vec![2]], -1))),
        39,
        "uneven"
    );
    assert_eq!(
        code(h.create_topic(topic(vec![vec![0]], 3))),
        42,
        "both given"
    );
    assert_eq!(
        code(h.create_topic(topic(vec![vec![3]], -1))),
        39,
        "only fenced replicas"
    );
    let t = h
        .create_topic(topic(vec![vec![2, 3], vec![1, 0]], -1))
        .unwrap();
    assert_eq!((t.num_partitions, t.replication_factor), (2, 2));
    let p = h.partition("m", 0);
    assert_eq!(
        (p.replicas.clone(), p.isr.clone(), p.leader),
        (vec![2, 3], vec![2], 2)
    );
}

#[test]
fn duplicate_names_in_one_request_and_validate_only() {
    let mut h = Harness::default();
    h.start(&[0]);
    let t = |name: &str| CreatableTopic {
        name: name.into(),
        num_partitions: 1,
        replication_factor: 1,
        assignments: None,
        configs: BTreeMap::new(),
    };
    let Reply::CreateTopics(r) = h.run(Event::CreateTopics(CreateTopics {
        topics: vec![t("a"), t("a"), t("b")],
        validate_only: false,
    })) else {
        panic!()
    };
    assert_eq!(code(r[0].result.clone()), 42);
    assert_eq!(code(r[1].result.clone()), 42);
    assert!(r[2].result.is_ok());
    let entries = h.log.len();
    let Reply::CreateTopics(r) = h.run(Event::CreateTopics(CreateTopics {
        topics: vec![t("c")],
        validate_only: true,
    })) else {
        panic!()
    };
    assert!(r[0].result.is_ok());
    assert_eq!(h.log.len(), entries);
    assert!(h.c.image().topic("c").is_none());
}

#[test]
fn create_partitions_keeps_the_replication_factor() {
    let mut h = Harness::default();
    h.start(&[0, 1, 2]);
    h.create("t", 2, 2, &[]).unwrap();
    let req = |count: i32, assignments: Option<Vec<Vec<i32>>>| {
        Event::CreatePartitions(CreatePartitions {
            topics: vec![CreatePartitionsTopic {
                name: "t".into(),
                count,
                assignments,
            }],
            validate_only: false,
        })
    };
    let result = |h: &mut Harness, e| match h.run(e) {
        Reply::CreatePartitions(mut r) => r.remove(0).result,
        other => panic!("{other:?}"),
    };
    assert_eq!(code(result(&mut h, req(2, None))), 37);
    assert_eq!(code(result(&mut h, req(1, None))), 37);
    assert_eq!(code(result(&mut h, req(4, Some(vec![vec![0, 1]])))), 39);
    assert_eq!(
        code(result(&mut h, req(3, Some(vec![vec![0]])))),
        39,
        "wrong rf"
    );
    result(&mut h, req(3, Some(vec![vec![2, 0]]))).unwrap();
    result(&mut h, req(6, None)).unwrap();
    let topic = h.c.image().topic("t").unwrap();
    assert_eq!(topic.partitions.len(), 6);
    assert!(topic.partitions.values().all(|p| p.replicas.len() == 2));
    assert_eq!(h.partition("t", 2).replicas, vec![2, 0]);
    let missing = Event::CreatePartitions(CreatePartitions {
        topics: vec![CreatePartitionsTopic {
            name: "nope".into(),
            count: 3,
            assignments: None,
        }],
        validate_only: false,
    });
    assert_eq!(code(result(&mut h, missing)), 3);
}

/// Broker 0 fenced and back: partition t-0 (replicas [0, 1]) is led by 1, with 0 back
/// in the ISR.
fn preferred_leader_displaced(config: ControllerConfig) -> Harness {
    let mut h = Harness::new(config);
    h.start(&[0, 1]);
    h.create_topic(CreatableTopic {
        name: "t".into(),
        num_partitions: -1,
        replication_factor: -1,
        assignments: Some(vec![vec![0, 1]]),
        configs: BTreeMap::new(),
    })
    .unwrap();
    h.heartbeat(0, true, false);
    assert_eq!(h.partition("t", 0).leader, 1);
    h.heartbeat(0, false, false);
    // The leader (1) lets 0 back into the ISR once it has caught up.
    h.alter_one(h.shrink_request("t", 0, &[1, 0])).unwrap();
    assert_eq!(h.partition("t", 0).leader, 1);
    h
}

#[test]
fn preferred_election_on_request() {
    let mut h = preferred_leader_displaced(ControllerConfig {
        auto_leader_rebalance_enable: false,
        ..ControllerConfig::default()
    });
    let epoch = h.partition("t", 0).leader_epoch;
    let all = h.elect(ElectionType::Preferred, None);
    assert_eq!(all.len(), 1);
    assert!(all[0].result.is_ok());
    let p = h.partition("t", 0);
    assert_eq!((p.leader, p.leader_epoch), (0, epoch + 1));
    let named = Some(vec![("t".to_string(), vec![0, 7])]);
    let r = h.elect(ElectionType::Preferred, named.clone());
    assert_eq!(code(r[0].result.clone()), 84);
    assert_eq!(code(r[1].result.clone()), 3);
    // Every partition, when none needs an election: nothing listed.
    assert!(h.elect(ElectionType::Preferred, None).is_empty());
    // Preferred replica out of the ISR: not available.
    h.alter_one(h.shrink_request("t", 0, &[0])).unwrap();
    h.heartbeat(1, true, false);
    h.heartbeat(1, false, false);
    h.heartbeat(0, true, false);
    let p = h.partition("t", 0);
    assert_eq!((p.leader, p.isr.clone()), (-1, vec![0]));
    let r = h.elect(ElectionType::Preferred, named.clone());
    assert_eq!(code(r[0].result.clone()), 80);
    // Unclean on request: the out-of-sync 1 takes over, ISR [1].
    let r = h.elect(ElectionType::Unclean, named.clone());
    assert!(r[0].result.is_ok(), "{r:?}");
    let p = h.partition("t", 0);
    assert_eq!((p.leader, p.isr.clone()), (1, vec![1]));
    let r = h.elect(ElectionType::Unclean, named);
    assert_eq!(code(r[0].result.clone()), 84);
    assert_eq!(h.replayed(), *h.c.image());
}

#[test]
fn unclean_election_with_no_usable_replica() {
    let mut h = Harness::default();
    h.start(&[0]);
    h.create("t", 1, 1, &[]).unwrap();
    h.heartbeat(0, true, false);
    let r = h.elect(ElectionType::Unclean, Some(vec![("t".into(), vec![0])]));
    assert_eq!(code(r[0].result.clone()), 83);
}

#[test]
fn automatic_rebalance_brings_preferred_leaders_back() {
    let mut h = preferred_leader_displaced(ControllerConfig {
        leader_imbalance_check_interval_ms: 10_000,
        ..ControllerConfig::default()
    });
    h.heartbeat(0, false, false);
    h.heartbeat(1, false, false);
    h.tick(1_000);
    assert_eq!(h.partition("t", 0).leader, 1, "not due yet");
    h.heartbeat(0, false, false);
    h.heartbeat(1, false, false);
    h.tick(8_999);
    assert_eq!(h.partition("t", 0).leader, 1, "1 ms early");
    h.tick(1);
    assert_eq!(h.partition("t", 0).leader, 0);
}

#[test]
fn unregister_leaves_isrs_and_removes_the_registration() {
    let mut h = Harness::default();
    h.start(&[0, 1]);
    h.create("t", 2, 2, &[]).unwrap();
    let Reply::UnregisterBroker(r) = h.run(Event::UnregisterBroker { broker_id: 1 }) else {
        panic!()
    };
    r.unwrap();
    assert!(h.c.image().broker(1).is_none());
    for p in 0..2 {
        let part = h.partition("t", p);
        assert_eq!((part.leader, part.isr.clone()), (0, vec![0]));
    }
    let Reply::UnregisterBroker(r) = h.run(Event::UnregisterBroker { broker_id: 1 }) else {
        panic!()
    };
    assert_eq!(code(r), 102);
}

#[test]
fn re_registering_a_live_looking_broker_moves_its_leaderships_first() {
    // The old incarnation's session expired but no tick fenced it yet.
    let mut h = Harness::default();
    h.start(&[0, 1]);
    h.create_topic(CreatableTopic {
        name: "t".into(),
        num_partitions: -1,
        replication_factor: -1,
        assignments: Some(vec![vec![0, 1]]),
        configs: BTreeMap::new(),
    })
    .unwrap();
    h.now += 9_001;
    h.heartbeat(1, false, false);
    h.register_as(0, 555).unwrap();
    let p = h.partition("t", 0);
    assert_eq!((p.leader, p.isr.clone(), p.leader_epoch), (1, vec![1], 1));
}

#[test]
fn a_metadata_log_written_by_the_single_node_broker_still_works() {
    // Today's broker writes Topic/Partition records led by its node id, no brokers.
    let id = Uuid::from_u64_pair(3, 3);
    let mut image = MetadataImage::default();
    image.apply_all(&[
        MetadataRecord::Topic {
            name: "old".into(),
            topic_id: id,
        },
        MetadataRecord::Partition {
            topic_id: id,
            partition: 0,
            replicas: vec![0],
            isr: vec![0],
            leader: 0,
            leader_epoch: 0,
            partition_epoch: 0,
        },
    ]);
    let mut h = Harness::default();
    h.c = Controller::new(ControllerConfig::default(), image, 1, 0, 1);
    h.log.push(vec![]); // offset 0: the imported entry (replayed separately below)
    h.register(0).unwrap();
    // The registration starts fenced, so the imported leadership waits for unfencing.
    assert_eq!(h.partition("old", 0).leader, -1);
    h.heartbeat(0, false, false);
    let p = h.partition("old", 0);
    assert_eq!((p.leader, p.leader_epoch, p.isr.clone()), (0, 2, vec![0]));
}

#[test]
fn registration_from_another_cluster_is_refused() {
    let mut h = Harness::new(ControllerConfig {
        cluster_id: Some("c".into()),
        ..ControllerConfig::default()
    });
    assert!(
        h.register(0).is_ok(),
        "the harness registers with cluster id `c`"
    );
    let mut r = h.registration(1, 1);
    r.cluster_id = "another".into();
    match h.run(Event::RegisterBroker(r)) {
        Reply::RegisterBroker(r) => assert_eq!(code(r), 104, "INCONSISTENT_CLUSTER_ID"),
        other => panic!("{other:?}"),
    }
    assert!(h.c.image().broker(1).is_none());
}

impl Harness {
    pub fn reassign(
        &mut self,
        topic: &str,
        partition: i32,
        replicas: Option<Vec<i32>>,
        allow_replication_factor_change: bool,
    ) -> Result<(), ControllerError> {
        match self.run(Event::AlterPartitionReassignments(
            AlterPartitionReassignments {
                partitions: vec![ReassignablePartition {
                    topic: topic.into(),
                    partition,
                    replicas,
                }],
                allow_replication_factor_change,
            },
        )) {
            Reply::AlterPartitionReassignments(mut r) => r.remove(0).result,
            other => panic!("{other:?}"),
        }
    }

    fn create_on(&mut self, name: &str, replicas: Vec<i32>) {
        self.create_topic(CreatableTopic {
            name: name.into(),
            num_partitions: -1,
            replication_factor: -1,
            assignments: Some(vec![replicas]),
            configs: BTreeMap::new(),
        })
        .unwrap();
    }
}

fn replica_sets(p: &PartitionImage) -> (Vec<i32>, Vec<i32>, Vec<i32>, Vec<i32>, i32) {
    (
        p.replicas.clone(),
        p.adding_replicas.clone(),
        p.removing_replicas.clone(),
        p.isr.clone(),
        p.leader,
    )
}

#[test]
fn a_reassignment_adds_replicas_then_completes_when_they_are_in_sync() {
    let mut h = Harness::default();
    h.start(&[0, 1, 2, 3]);
    h.create_on("t", vec![0, 1]);
    // Move [0, 1] to [2, 1]: 2 is added, 0 (the leader) goes once 2 is in sync.
    h.reassign("t", 0, Some(vec![2, 1]), true).unwrap();
    let p = h.partition("t", 0);
    assert_eq!(
        replica_sets(&p),
        (vec![2, 1, 0], vec![2], vec![0], vec![0, 1], 0)
    );
    assert!(p.is_reassigning());
    assert_eq!(p.original_replicas(), vec![1, 0]);
    assert_eq!(p.target_replicas(), vec![2, 1]);
    let (leader_epoch, partition_epoch) = (p.leader_epoch, p.partition_epoch);
    assert_eq!(
        partition_epoch, 1,
        "a replica change bumps the partition epoch"
    );
    // Sending the same plan again changes nothing (2 is still being added).
    let entries = h.log.len();
    h.reassign("t", 0, Some(vec![2, 1]), true).unwrap();
    assert_eq!(h.log.len(), entries);
    // The leader brings 2 into the ISR: that change completes the reassignment and
    // moves the leadership off the removed replica, to the target's first in sync.
    let s = h.alter_one(h.shrink_request("t", 0, &[0, 1, 2])).unwrap();
    let p = h.partition("t", 0);
    assert_eq!(
        replica_sets(&p),
        (vec![2, 1], vec![], vec![], vec![1, 2], 2)
    );
    assert!(!p.is_reassigning());
    assert_eq!(p.leader_epoch, leader_epoch + 1);
    assert_eq!((s.leader, s.isr.clone()), (2, vec![1, 2]));
    assert_eq!(h.replayed(), *h.c.image());
}

#[test]
fn a_reassignment_that_adds_nothing_completes_at_once() {
    let mut h = Harness::default();
    h.start(&[0, 1, 2]);
    h.create_on("t", vec![0, 1, 2]);
    // A removal of the leader: done in one change, leadership moves.
    h.reassign("t", 0, Some(vec![1, 2]), true).unwrap();
    let p = h.partition("t", 0);
    assert_eq!(
        replica_sets(&p),
        (vec![1, 2], vec![], vec![], vec![1, 2], 1)
    );
    // A new order only: the replicas change, the leader stays.
    h.reassign("t", 0, Some(vec![2, 1]), true).unwrap();
    let p = h.partition("t", 0);
    assert_eq!(
        replica_sets(&p),
        (vec![2, 1], vec![], vec![], vec![1, 2], 1)
    );
    // The same replicas again: no record.
    let entries = h.log.len();
    h.reassign("t", 0, Some(vec![2, 1]), true).unwrap();
    assert_eq!(h.log.len(), entries);
    assert_eq!(h.replayed(), *h.c.image());
}

#[test]
fn a_reassignment_is_cancelled_back_to_the_original_replicas() {
    let mut h = Harness::default();
    h.start(&[0, 1, 2, 3]);
    h.create_on("t", vec![0, 1]);
    assert_eq!(
        code(h.reassign("t", 0, None, true)),
        85,
        "NO_REASSIGNMENT_IN_PROGRESS"
    );
    h.reassign("t", 0, Some(vec![2, 3]), true).unwrap();
    // 2 catches up (in the ISR), 3 not yet: still in progress.
    h.alter_one(h.shrink_request("t", 0, &[0, 1, 2])).unwrap();
    let p = h.partition("t", 0);
    assert_eq!(
        replica_sets(&p),
        (vec![2, 3, 0, 1], vec![2, 3], vec![0, 1], vec![0, 1, 2], 0)
    );
    h.reassign("t", 0, None, true).unwrap();
    let p = h.partition("t", 0);
    assert_eq!(
        replica_sets(&p),
        (vec![0, 1], vec![], vec![], vec![0, 1], 0)
    );
    assert_eq!(h.replayed(), *h.c.image());
}

#[test]
fn a_new_target_replaces_the_reassignment_in_progress() {
    let mut h = Harness::default();
    h.start(&[0, 1, 2, 3]);
    h.create_on("t", vec![0, 1]);
    h.reassign("t", 0, Some(vec![0, 2]), true).unwrap();
    h.reassign("t", 0, Some(vec![0, 3]), true).unwrap();
    let p = h.partition("t", 0);
    // 2, added by the first plan, is removed again; 3 is added; 1 still goes.
    assert_eq!(
        replica_sets(&p),
        (vec![0, 3, 2, 1], vec![3], vec![2, 1], vec![0, 1], 0)
    );
    h.alter_one(h.shrink_request("t", 0, &[0, 1, 3])).unwrap();
    let p = h.partition("t", 0);
    assert_eq!(
        replica_sets(&p),
        (vec![0, 3], vec![], vec![], vec![0, 3], 0)
    );
}

#[test]
fn reassignments_are_validated() {
    let mut h = Harness::default();
    h.start(&[0, 1, 2]);
    h.create_on("t", vec![0, 1]);
    assert_eq!(code(h.reassign("nope", 0, Some(vec![0]), true)), 3);
    assert_eq!(code(h.reassign("t", 7, Some(vec![0]), true)), 3);
    // Unregistered broker, duplicate, empty: INVALID_REPLICA_ASSIGNMENT.
    assert_eq!(code(h.reassign("t", 0, Some(vec![0, 9]), true)), 39);
    assert_eq!(code(h.reassign("t", 0, Some(vec![1, 1]), true)), 39);
    assert_eq!(code(h.reassign("t", 0, Some(vec![]), true)), 39);
    // KIP-860: another replication factor only when allowed.
    assert_eq!(code(h.reassign("t", 0, Some(vec![0, 1, 2]), false)), 38);
    h.reassign("t", 0, Some(vec![1, 2]), false).unwrap();
    h.reassign("t", 0, Some(vec![0, 1, 2]), true).unwrap();
    assert!(h.c.image().topic("t").unwrap().partitions[&0].is_reassigning());
}

#[test]
fn a_reassignment_does_not_complete_into_replicas_that_cannot_lead() {
    let mut h = Harness::default();
    h.start(&[0, 1, 2]);
    h.create_on("t", vec![0, 1]);
    // Grow to [0, 1, 2] first.
    h.reassign("t", 0, Some(vec![0, 1, 2]), true).unwrap();
    h.alter_one(h.shrink_request("t", 0, &[0, 1, 2])).unwrap();
    let p = h.partition("t", 0);
    assert!(!p.is_reassigning());
    assert_eq!(p.replicas, vec![0, 1, 2]);
    // Broker 2 shuts down; a move to [2] alone must wait: 2 may not lead now.
    h.heartbeat(2, false, true);
    let p = h.partition("t", 0);
    assert_eq!(p.isr, vec![0, 1]);
    h.reassign("t", 0, Some(vec![2]), true).unwrap();
    let p = h.partition("t", 0);
    assert!(p.is_reassigning(), "{p:?}");
    assert_eq!(p.leader, 0);
}
