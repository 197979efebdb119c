//! The metadata image: what the records say the cluster looks like now.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::records::{BrokerEndpoint, MetadataRecord, NO_LEADER_CHANGE};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionImage {
    pub partition: i32,
    pub replicas: Vec<i32>,
    pub isr: Vec<i32>,
    pub leader: i32,
    pub leader_epoch: i32,
    pub partition_epoch: i32,
    /// A reassignment in progress (KIP-455): the replicas being added, not yet all in
    /// the ISR. Empty when none is (and in images snapshotted before reassignments).
    #[serde(default)]
    pub adding_replicas: Vec<i32>,
    /// The replicas a reassignment in progress removes once it completes.
    #[serde(default)]
    pub removing_replicas: Vec<i32>,
}

impl PartitionImage {
    /// True while a reassignment is in progress (Kafka's `isReassigning`).
    pub fn is_reassigning(&self) -> bool {
        !self.adding_replicas.is_empty() || !self.removing_replicas.is_empty()
    }

    /// The replicas the partition had before the reassignment in progress (all of them
    /// when none is): what a cancellation goes back to.
    pub fn original_replicas(&self) -> Vec<i32> {
        self.replicas
            .iter()
            .copied()
            .filter(|r| !self.adding_replicas.contains(r))
            .collect()
    }

    /// The replicas the reassignment in progress moves to (all of them when none is).
    pub fn target_replicas(&self) -> Vec<i32> {
        self.replicas
            .iter()
            .copied()
            .filter(|r| !self.removing_replicas.contains(r))
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicImage {
    pub name: String,
    pub topic_id: Uuid,
    pub partitions: BTreeMap<i32, PartitionImage>,
    /// Topic-level overrides only; defaults come from the broker config.
    pub configs: BTreeMap<String, String>,
}

/// A registered broker (KRaft's `BrokerRegistration`), as the records say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerRegistration {
    pub broker_id: i32,
    pub incarnation_id: Uuid,
    /// The offset of the metadata log entry that registered this incarnation.
    pub broker_epoch: i64,
    pub endpoints: Vec<BrokerEndpoint>,
    pub rack: Option<String>,
    pub fenced: bool,
    pub in_controlled_shutdown: bool,
}

impl BrokerRegistration {
    /// Unfenced and not shutting down: may lead partitions and join ISRs (Kafka's
    /// `ClusterControlManager.isActive`).
    pub fn is_active(&self) -> bool {
        !self.fenced && !self.in_controlled_shutdown
    }
}

/// Serializable because the metadata quorum (`ferrite-raft`) snapshots it whole: a
/// snapshot is this image as of a log index, so every field must round-trip.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataImage {
    topics: BTreeMap<String, TopicImage>,
    names_by_id: HashMap<Uuid, String>,
    brokers: BTreeMap<i32, BrokerRegistration>,
    /// Number of record batches applied; bumps on every change.
    pub version: u64,
    /// The first producer id not yet handed out in a block (ProducerIds records).
    next_producer_id: i64,
}

impl MetadataImage {
    pub fn topic(&self, name: &str) -> Option<&TopicImage> {
        self.topics.get(name)
    }

    pub fn topic_by_id(&self, id: &Uuid) -> Option<&TopicImage> {
        self.names_by_id.get(id).and_then(|n| self.topics.get(n))
    }

    pub fn topics(&self) -> impl Iterator<Item = &TopicImage> {
        self.topics.values()
    }

    /// Registered brokers by id, fenced or not.
    pub fn brokers(&self) -> impl Iterator<Item = &BrokerRegistration> {
        self.brokers.values()
    }

    pub fn broker(&self, broker_id: i32) -> Option<&BrokerRegistration> {
        self.brokers.get(&broker_id)
    }

    pub fn partition(&self, topic_id: &Uuid, partition: i32) -> Option<&PartitionImage> {
        self.topic_by_id(topic_id)
            .and_then(|t| t.partitions.get(&partition))
    }

    /// The first producer id no broker has been given yet.
    pub fn next_producer_id(&self) -> i64 {
        self.next_producer_id
    }

    /// Folds one record into the image. Records are facts already validated by the
    /// handler that wrote them; one that refers to an unknown topic is a programming
    /// error in that handler, but replay must not crash on a log written by an older
    /// version, so it is logged and skipped.
    pub fn apply(&mut self, record: &MetadataRecord) {
        match record {
            MetadataRecord::Topic { name, topic_id } => {
                self.names_by_id.insert(*topic_id, name.clone());
                self.topics.insert(
                    name.clone(),
                    TopicImage {
                        name: name.clone(),
                        topic_id: *topic_id,
                        partitions: BTreeMap::new(),
                        configs: BTreeMap::new(),
                    },
                );
            }
            MetadataRecord::Partition {
                topic_id,
                partition,
                replicas,
                isr,
                leader,
                leader_epoch,
                partition_epoch,
            } => match self.topic_mut(topic_id) {
                Some(t) => {
                    t.partitions.insert(
                        *partition,
                        PartitionImage {
                            partition: *partition,
                            replicas: replicas.clone(),
                            isr: isr.clone(),
                            leader: *leader,
                            leader_epoch: *leader_epoch,
                            partition_epoch: *partition_epoch,
                            adding_replicas: Vec::new(),
                            removing_replicas: Vec::new(),
                        },
                    );
                }
                None => {
                    tracing::warn!(%topic_id, partition, "partition record for unknown topic skipped")
                }
            },
            MetadataRecord::TopicConfig {
                topic_id,
                key,
                value,
            } => match self.topic_mut(topic_id) {
                Some(t) => match value {
                    Some(v) => {
                        t.configs.insert(key.clone(), v.clone());
                    }
                    None => {
                        t.configs.remove(key);
                    }
                },
                None => tracing::warn!(%topic_id, key, "config record for unknown topic skipped"),
            },
            MetadataRecord::RemoveTopic { topic_id } => {
                if let Some(name) = self.names_by_id.remove(topic_id) {
                    self.topics.remove(&name);
                }
            }
            MetadataRecord::RegisterBroker {
                broker_id,
                incarnation_id,
                broker_epoch,
                endpoints,
                rack,
                fenced,
            } => {
                self.brokers.insert(
                    *broker_id,
                    BrokerRegistration {
                        broker_id: *broker_id,
                        incarnation_id: *incarnation_id,
                        broker_epoch: *broker_epoch,
                        endpoints: endpoints.clone(),
                        rack: rack.clone(),
                        fenced: *fenced,
                        in_controlled_shutdown: false,
                    },
                );
            }
            MetadataRecord::BrokerRegistrationChange {
                broker_id,
                broker_epoch,
                fenced,
                in_controlled_shutdown,
            } => match self.brokers.get_mut(broker_id) {
                Some(b) if b.broker_epoch == *broker_epoch => {
                    if let Some(f) = fenced {
                        b.fenced = *f;
                    }
                    if let Some(s) = in_controlled_shutdown {
                        b.in_controlled_shutdown = *s;
                    }
                }
                _ => tracing::warn!(
                    broker_id,
                    broker_epoch,
                    "registration change for an unknown broker or epoch skipped"
                ),
            },
            MetadataRecord::UnregisterBroker {
                broker_id,
                broker_epoch,
            } => {
                if self
                    .brokers
                    .get(broker_id)
                    .is_some_and(|b| b.broker_epoch == *broker_epoch)
                {
                    self.brokers.remove(broker_id);
                } else {
                    tracing::warn!(
                        broker_id,
                        broker_epoch,
                        "unregistration of an unknown broker or epoch skipped"
                    );
                }
            }
            MetadataRecord::PartitionChange {
                topic_id,
                partition,
                leader,
                isr,
                replicas,
                adding_replicas,
                removing_replicas,
            } => match self
                .topic_mut(topic_id)
                .and_then(|t| t.partitions.get_mut(partition))
            {
                Some(p) => {
                    if *leader != NO_LEADER_CHANGE {
                        p.leader = *leader;
                        p.leader_epoch += 1;
                    }
                    if let Some(isr) = isr {
                        p.isr = isr.clone();
                    }
                    if let Some(replicas) = replicas {
                        p.replicas = replicas.clone();
                    }
                    if let Some(adding) = adding_replicas {
                        p.adding_replicas = adding.clone();
                    }
                    if let Some(removing) = removing_replicas {
                        p.removing_replicas = removing.clone();
                    }
                    p.partition_epoch += 1;
                }
                None => {
                    tracing::warn!(%topic_id, partition, "partition change for unknown partition skipped")
                }
            },
            MetadataRecord::ProducerIds {
                next_producer_id, ..
            } => {
                // Blocks are handed out in increasing order; a record that would move
                // the counter back is a bug in its writer and must not cause reuse.
                if *next_producer_id < self.next_producer_id {
                    tracing::warn!(
                        next_producer_id,
                        current = self.next_producer_id,
                        "producer ids record moving backwards ignored"
                    );
                } else {
                    self.next_producer_id = *next_producer_id;
                }
            }
        }
    }

    pub fn apply_all(&mut self, records: &[MetadataRecord]) {
        for r in records {
            self.apply(r);
        }
        self.version += 1;
    }

    fn topic_mut(&mut self, id: &Uuid) -> Option<&mut TopicImage> {
        let name = self.names_by_id.get(id)?;
        self.topics.get_mut(name)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn topic_lifecycle() {
        let id = Uuid::new_v4();
        let mut img = MetadataImage::default();
        img.apply_all(&[
            MetadataRecord::Topic {
                name: "t".into(),
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
            MetadataRecord::TopicConfig {
                topic_id: id,
                key: "retention.ms".into(),
                value: Some("5".into()),
            },
        ]);
        let t = img.topic("t").unwrap();
        assert_eq!(t.partitions.len(), 1);
        assert_eq!(t.configs.get("retention.ms").map(String::as_str), Some("5"));
        assert_eq!(img.topic_by_id(&id).unwrap().name, "t");
        img.apply_all(&[MetadataRecord::TopicConfig {
            topic_id: id,
            key: "retention.ms".into(),
            value: None,
        }]);
        assert!(img.topic("t").unwrap().configs.is_empty());
        img.apply_all(&[MetadataRecord::RemoveTopic { topic_id: id }]);
        assert!(img.topic("t").is_none());
        assert!(img.topic_by_id(&id).is_none());
    }

    #[test]
    fn producer_id_blocks_only_move_forward() {
        let block = |next| MetadataRecord::ProducerIds {
            broker_id: 0,
            broker_epoch: -1,
            next_producer_id: next,
        };
        let mut img = MetadataImage::default();
        assert_eq!(img.next_producer_id(), 0);
        img.apply_all(&[block(1000)]);
        img.apply_all(&[block(2000)]);
        assert_eq!(img.next_producer_id(), 2000);
        img.apply_all(&[block(1000)]);
        assert_eq!(
            img.next_producer_id(),
            2000,
            "never back: ids would be reused"
        );
    }

    #[test]
    fn producer_ids_record_round_trips_through_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = crate::MetadataLog::open(dir.path()).unwrap();
        let rec = MetadataRecord::ProducerIds {
            broker_id: 3,
            broker_epoch: -1,
            next_producer_id: 5000,
        };
        log.append(std::slice::from_ref(&rec)).unwrap();
        drop(log);
        let (_, entries) = crate::MetadataLog::open(dir.path()).unwrap();
        assert_eq!(entries, vec![vec![rec]]);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod cluster_tests {
    use super::*;
    use crate::records::NO_LEADER;

    fn register(id: i32, epoch: i64) -> MetadataRecord {
        MetadataRecord::RegisterBroker {
            broker_id: id,
            incarnation_id: Uuid::from_u64_pair(7, id as u64),
            broker_epoch: epoch,
            endpoints: vec![BrokerEndpoint {
                name: "PLAINTEXT".into(),
                host: "127.0.0.1".into(),
                port: 9092,
                security_protocol: 0,
            }],
            rack: Some("r1".into()),
            fenced: true,
        }
    }

    #[test]
    fn broker_lifecycle_records() {
        let mut img = MetadataImage::default();
        img.apply_all(&[register(1, 5)]);
        let b = img.broker(1).unwrap();
        assert!(b.fenced && !b.is_active());
        assert_eq!(b.broker_epoch, 5);
        img.apply_all(&[MetadataRecord::BrokerRegistrationChange {
            broker_id: 1,
            broker_epoch: 5,
            fenced: Some(false),
            in_controlled_shutdown: None,
        }]);
        assert!(img.broker(1).unwrap().is_active());
        // A change for another epoch (an older registration) does not apply.
        img.apply_all(&[MetadataRecord::BrokerRegistrationChange {
            broker_id: 1,
            broker_epoch: 4,
            fenced: Some(true),
            in_controlled_shutdown: None,
        }]);
        assert!(img.broker(1).unwrap().is_active());
        img.apply_all(&[MetadataRecord::BrokerRegistrationChange {
            broker_id: 1,
            broker_epoch: 5,
            fenced: None,
            in_controlled_shutdown: Some(true),
        }]);
        let b = img.broker(1).unwrap();
        assert!(!b.fenced && b.in_controlled_shutdown && !b.is_active());
        // Re-registration replaces the old one and clears controlled shutdown.
        img.apply_all(&[register(1, 9)]);
        let b = img.broker(1).unwrap();
        assert!(b.fenced && !b.in_controlled_shutdown && b.broker_epoch == 9);
        img.apply_all(&[MetadataRecord::UnregisterBroker {
            broker_id: 1,
            broker_epoch: 5,
        }]);
        assert!(img.broker(1).is_some(), "stale epoch does not unregister");
        img.apply_all(&[MetadataRecord::UnregisterBroker {
            broker_id: 1,
            broker_epoch: 9,
        }]);
        assert!(img.broker(1).is_none());
    }

    #[test]
    fn partition_change_is_a_delta_that_bumps_epochs() {
        let id = Uuid::from_u64_pair(1, 2);
        let mut img = MetadataImage::default();
        img.apply_all(&[
            MetadataRecord::Topic {
                name: "t".into(),
                topic_id: id,
            },
            MetadataRecord::Partition {
                topic_id: id,
                partition: 0,
                replicas: vec![1, 2, 3],
                isr: vec![1, 2, 3],
                leader: 1,
                leader_epoch: 0,
                partition_epoch: 0,
            },
        ]);
        // ISR-only change: partition epoch bumps, leader epoch does not.
        img.apply_all(&[MetadataRecord::PartitionChange {
            topic_id: id,
            partition: 0,
            leader: NO_LEADER_CHANGE,
            isr: Some(vec![1, 2]),
            replicas: None,
            adding_replicas: None,
            removing_replicas: None,
        }]);
        let p = img.partition(&id, 0).unwrap();
        assert_eq!((p.leader, p.leader_epoch, p.partition_epoch), (1, 0, 1));
        assert_eq!(p.isr, vec![1, 2]);
        // Leader change with the ISR unchanged.
        img.apply_all(&[MetadataRecord::PartitionChange {
            topic_id: id,
            partition: 0,
            leader: NO_LEADER,
            isr: None,
            replicas: None,
            adding_replicas: None,
            removing_replicas: None,
        }]);
        let p = img.partition(&id, 0).unwrap();
        assert_eq!((p.leader, p.leader_epoch, p.partition_epoch), (-1, 1, 2));
        assert_eq!(p.isr, vec![1, 2]);
        // A change for an unknown partition is skipped, not a crash.
        img.apply_all(&[MetadataRecord::PartitionChange {
            topic_id: id,
            partition: 9,
            leader: 1,
            isr: None,
            replicas: None,
            adding_replicas: None,
            removing_replicas: None,
        }]);
        assert!(img.partition(&id, 9).is_none());
    }

    #[test]
    fn json_encoding_of_existing_records_is_unchanged() {
        // Old metadata logs hold exactly these encodings; they must keep decoding.
        let id = Uuid::from_u64_pair(0, 1);
        let old = r#"[{"type":"Topic","name":"t","topic_id":"00000000-0000-0000-0000-000000000001"},{"type":"Partition","topic_id":"00000000-0000-0000-0000-000000000001","partition":0,"replicas":[0],"isr":[0],"leader":0,"leader_epoch":0,"partition_epoch":0},{"type":"TopicConfig","topic_id":"00000000-0000-0000-0000-000000000001","key":"retention.ms","value":"5"},{"type":"RemoveTopic","topic_id":"00000000-0000-0000-0000-000000000001"}]"#;
        let records: Vec<MetadataRecord> = serde_json::from_str(old).unwrap();
        assert_eq!(
            records.first(),
            Some(&MetadataRecord::Topic {
                name: "t".into(),
                topic_id: id
            })
        );
        assert_eq!(serde_json::to_string(&records).unwrap(), old);
    }

    #[test]
    fn cluster_records_round_trip_json() {
        let records = vec![
            register(3, 11),
            MetadataRecord::BrokerRegistrationChange {
                broker_id: 3,
                broker_epoch: 11,
                fenced: Some(false),
                in_controlled_shutdown: None,
            },
            MetadataRecord::PartitionChange {
                topic_id: Uuid::from_u64_pair(4, 4),
                partition: 2,
                leader: NO_LEADER_CHANGE,
                isr: Some(vec![3]),
                replicas: None,
                adding_replicas: None,
                removing_replicas: None,
            },
            MetadataRecord::UnregisterBroker {
                broker_id: 3,
                broker_epoch: 11,
            },
        ];
        let json = serde_json::to_string(&records).unwrap();
        let back: Vec<MetadataRecord> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, records);
    }
}
