//! Random event sequences (registrations, heartbeats, time passing, shutdowns,
//! AlterPartition, topic creation, elections, unregistration) with the invariants
//! checked after every step on the image replayed from the emitted records alone.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;

use ferrite_metadata::{MetadataImage, MetadataRecord, NO_LEADER_CHANGE};
use proptest::prelude::*;
use uuid::Uuid;

use crate::tests::Harness;
use crate::*;

const BROKERS: i32 = 5;

#[derive(Debug, Clone)]
enum Op {
    Register {
        broker: i32,
        new_incarnation: bool,
    },
    Heartbeat {
        broker: i32,
        caught_up: bool,
        want_fence: bool,
        want_shut_down: bool,
    },
    Advance {
        ms: i64,
    },
    Alter {
        pick: usize,
        members: u8,
        tamper: u8,
    },
    Create {
        partitions: i32,
        rf: i16,
        unclean: bool,
    },
    AddPartitions {
        pick: usize,
        add: i32,
    },
    Elect {
        unclean: bool,
    },
    Unregister {
        broker: i32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..BROKERS, any::<bool>()).prop_map(|(broker, new_incarnation)| Op::Register { broker, new_incarnation }),
        8 => (0..BROKERS, prop::bool::weighted(0.85), prop::bool::weighted(0.1), prop::bool::weighted(0.1))
            .prop_map(|(broker, caught_up, want_fence, want_shut_down)| Op::Heartbeat { broker, caught_up, want_fence, want_shut_down }),
        3 => (0i64..12_000).prop_map(|ms| Op::Advance { ms }),
        4 => (any::<usize>(), any::<u8>(), 0u8..6).prop_map(|(pick, members, tamper)| Op::Alter { pick, members, tamper }),
        2 => (1i32..4, 1i16..4, prop::bool::weighted(0.3)).prop_map(|(partitions, rf, unclean)| Op::Create { partitions, rf, unclean }),
        1 => (any::<usize>(), 1i32..3).prop_map(|(pick, add)| Op::AddPartitions { pick, add }),
        1 => any::<bool>().prop_map(|unclean| Op::Elect { unclean }),
        1 => (0..BROKERS).prop_map(|broker| Op::Unregister { broker }),
    ]
}

struct Run {
    h: Harness,
    topics: usize,
}

impl Run {
    fn apply(&mut self, op: &Op) {
        let h = &mut self.h;
        match *op {
            Op::Register {
                broker,
                new_incarnation,
            } => {
                let inc = if new_incarnation || !h.incarnations.contains_key(&broker) {
                    *h.incarnations
                        .entry(broker)
                        .and_modify(|i| *i += 1)
                        .or_insert(1)
                } else {
                    h.incarnations[&broker]
                };
                let _ = h.register_as(broker, inc);
            }
            Op::Heartbeat {
                broker,
                caught_up,
                want_fence,
                want_shut_down,
            } => {
                let Some(epoch) = h.c.image().broker(broker).map(|b| b.broker_epoch) else {
                    let hb = BrokerHeartbeat {
                        broker_id: broker,
                        broker_epoch: 0,
                        current_metadata_offset: 0,
                        want_fence,
                        want_shut_down,
                    };
                    let Reply::Heartbeat(r) = h.run(Event::Heartbeat(hb)) else {
                        panic!()
                    };
                    assert_eq!(r.unwrap_err().code(), 77);
                    return;
                };
                let offset = if caught_up {
                    h.c.next_offset() - 1
                } else {
                    epoch - 1
                };
                let was_fenced = h.c.image().broker(broker).unwrap().fenced;
                let r = h
                    .heartbeat_at(broker, offset, want_fence, want_shut_down)
                    .unwrap();
                let b = h.c.image().broker(broker).unwrap();
                assert_eq!(r.is_fenced, b.fenced, "reply and image agree: {r:?} {b:?}");
                assert_eq!(r.is_caught_up, offset >= epoch);
                if was_fenced && !r.is_fenced {
                    assert!(
                        r.is_caught_up && !want_fence,
                        "only a caught-up broker is unfenced"
                    );
                }
                if r.should_shut_down {
                    assert!(b.fenced);
                    assert!(!leads_anything(h.c.image(), broker));
                }
            }
            Op::Advance { ms } => h.tick(ms),
            Op::Alter {
                pick,
                members,
                tamper,
            } => {
                let parts = all_partitions(h.c.image());
                if parts.is_empty() {
                    return;
                }
                let (name, p) = parts[pick % parts.len()].clone();
                let part = h.partition(&name, p);
                if part.leader < 0 {
                    return;
                }
                let isr: Vec<i32> = part
                    .replicas
                    .iter()
                    .enumerate()
                    .filter(|&(i, &b)| b == part.leader || members & (1 << i) != 0)
                    .map(|(_, &b)| b)
                    .collect();
                let mut req = h.shrink_request(&name, p, &isr);
                let d = &mut req.topics[0].partitions[0];
                match tamper {
                    0 => d.leader_epoch -= 1,
                    1 => d.partition_epoch -= 1,
                    2 => {
                        if let Some(m) = d.new_isr.last_mut() {
                            m.broker_epoch += 1
                        }
                    }
                    _ => {}
                }
                let _ = h.alter(req);
            }
            Op::Create {
                partitions,
                rf,
                unclean,
            } => {
                self.topics += 1;
                let configs: &[(&str, &str)] = if unclean {
                    &[("unclean.leader.election.enable", "true")]
                } else {
                    &[]
                };
                let name = format!("t{}", self.topics);
                let usable = h.c.image().brokers().filter(|b| b.is_active()).count();
                let r = h.create(&name, partitions, rf, configs);
                assert_eq!(
                    r.is_ok(),
                    rf as usize <= usable,
                    "{r:?} with {usable} usable"
                );
            }
            Op::AddPartitions { pick, add } => {
                let names: Vec<String> = h.c.image().topics().map(|t| t.name.clone()).collect();
                if names.is_empty() {
                    return;
                }
                let name = names[pick % names.len()].clone();
                let count = h.c.image().topic(&name).unwrap().partitions.len() as i32 + add;
                let _ = h.run(Event::CreatePartitions(CreatePartitions {
                    topics: vec![CreatePartitionsTopic {
                        name,
                        count,
                        assignments: None,
                    }],
                    validate_only: false,
                }));
            }
            Op::Elect { unclean } => {
                let t = if unclean {
                    ElectionType::Unclean
                } else {
                    ElectionType::Preferred
                };
                h.elect(t, None);
            }
            Op::Unregister { broker } => {
                let _ = h.run(Event::UnregisterBroker { broker_id: broker });
            }
        }
    }
}

fn all_partitions(image: &MetadataImage) -> Vec<(String, i32)> {
    image
        .topics()
        .flat_map(|t| t.partitions.keys().map(move |&p| (t.name.clone(), p)))
        .collect()
}

fn leads_anything(image: &MetadataImage, broker: i32) -> bool {
    image
        .topics()
        .any(|t| t.partitions.values().any(|p| p.leader == broker))
}

type Epochs = BTreeMap<(Uuid, i32), (i32, i32, i32, Vec<i32>)>;

fn epochs(image: &MetadataImage) -> Epochs {
    image
        .topics()
        .flat_map(|t| {
            t.partitions.values().map(move |p| {
                (
                    (t.topic_id, p.partition),
                    (p.leader, p.leader_epoch, p.partition_epoch, p.isr.clone()),
                )
            })
        })
        .collect()
}

/// The invariants of one image.
fn check_image(image: &MetadataImage) -> Result<(), TestCaseError> {
    for t in image.topics() {
        for p in t.partitions.values() {
            let at = format!("{}-{} {p:?}", t.name, p.partition);
            prop_assert!(!p.isr.is_empty(), "ISR never empty: {}", at);
            let mut dedup = p.isr.clone();
            dedup.sort_unstable();
            dedup.dedup();
            prop_assert_eq!(dedup.len(), p.isr.len(), "ISR without duplicates: {}", at);
            prop_assert!(
                p.isr.iter().all(|b| p.replicas.contains(b)),
                "ISR ⊆ replicas: {}",
                at
            );
            prop_assert!(
                p.leader == -1 || p.isr.contains(&p.leader),
                "leader ∈ ISR ∪ {{-1}}: {}",
                at
            );
            if p.leader >= 0 {
                let b = image.broker(p.leader);
                prop_assert!(
                    b.is_some_and(|b| b.is_active()),
                    "only an active broker leads: {} {:?}",
                    at,
                    b
                );
            }
        }
    }
    Ok(())
}

/// Epochs only grow, and grow with every change; a new leader came from the ISR unless
/// the election was unclean (then the ISR is the leader alone).
fn check_entry(
    before: &MetadataImage,
    entry: &[MetadataRecord],
    unclean_request: bool,
) -> Result<(), TestCaseError> {
    let mut image = before.clone();
    for r in entry {
        if let MetadataRecord::PartitionChange {
            topic_id,
            partition,
            leader,
            ..
        } = r
        {
            let pre = image.partition(topic_id, *partition).cloned();
            let unclean_topic = image.topic_by_id(topic_id).is_some_and(|t| {
                t.configs
                    .get("unclean.leader.election.enable")
                    .map(String::as_str)
                    == Some("true")
            });
            image.apply(r);
            let (Some(pre), Some(post)) = (pre, image.partition(topic_id, *partition)) else {
                continue;
            };
            prop_assert_eq!(post.partition_epoch, pre.partition_epoch + 1);
            if *leader != NO_LEADER_CHANGE {
                prop_assert_ne!(pre.leader, post.leader, "a leader field means a new leader");
                prop_assert_eq!(post.leader_epoch, pre.leader_epoch + 1);
                if post.leader >= 0 && !pre.isr.contains(&post.leader) {
                    prop_assert!(
                        unclean_topic || unclean_request,
                        "out-of-sync replica {} elected without unclean election: {:?} -> {:?}",
                        post.leader,
                        pre,
                        post
                    );
                    prop_assert_eq!(&post.isr, &vec![post.leader]);
                }
            } else {
                prop_assert_eq!(post.leader_epoch, pre.leader_epoch);
            }
        } else {
            image.apply(r);
        }
    }
    Ok(())
}

fn check_monotonic(before: &Epochs, after: &Epochs) -> Result<(), TestCaseError> {
    for (key, (leader, le, pe, isr)) in after {
        if let Some((l0, le0, pe0, isr0)) = before.get(key) {
            prop_assert!(le >= le0 && pe >= pe0, "epochs monotonic for {:?}", key);
            if leader != l0 {
                prop_assert!(le > le0, "a leader change bumps the leader epoch");
            }
            if leader != l0 || isr != isr0 {
                prop_assert!(pe > pe0, "any change bumps the partition epoch");
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_after_every_event(ops in prop::collection::vec(op(), 1..80)) {
        let config = ControllerConfig {
            leader_imbalance_check_interval_ms: 5_000,
            ..ControllerConfig::default()
        };
        let mut run = Run { h: Harness::new(config), topics: 0 };
        let mut replayed = MetadataImage::default();
        for op in &ops {
            let before_epochs = epochs(&replayed);
            let entries = run.h.log.len();
            run.apply(op);
            let unclean_request = matches!(op, Op::Elect { unclean: true });
            for entry in &run.h.log[entries..] {
                check_entry(&replayed, entry, unclean_request)?;
                replayed.apply_all(entry);
            }
            // The records alone rebuild the controller's state, step by step and from
            // scratch (the same code at start-up and on a follower).
            prop_assert_eq!(&replayed, run.h.c.image());
            prop_assert_eq!(&run.h.replayed(), run.h.c.image());
            check_image(&replayed)?;
            check_monotonic(&before_epochs, &epochs(&replayed))?;
        }
    }

    /// A controller rebuilt from the replayed log at any point (a failover) carries on
    /// with the same image and keeps the invariants.
    #[test]
    fn failover_rebuilds_from_the_log(ops in prop::collection::vec(op(), 1..60), cut in any::<prop::sample::Index>()) {
        let mut run = Run { h: Harness::default(), topics: 0 };
        let cut = cut.index(ops.len());
        for (i, op) in ops.iter().enumerate() {
            if i == cut {
                let image = run.h.replayed();
                let next = run.h.log.len() as i64;
                run.h.c = Controller::new(ControllerConfig::default(), image, next, run.h.now, i as u64);
            }
            run.apply(op);
            prop_assert_eq!(&run.h.replayed(), run.h.c.image());
            check_image(run.h.c.image())?;
        }
    }
}
