//! The metadata image: what the records say the cluster looks like now.

use std::collections::{BTreeMap, HashMap};

use uuid::Uuid;

use crate::records::MetadataRecord;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionImage {
    pub partition: i32,
    pub replicas: Vec<i32>,
    pub isr: Vec<i32>,
    pub leader: i32,
    pub leader_epoch: i32,
    pub partition_epoch: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicImage {
    pub name: String,
    pub topic_id: Uuid,
    pub partitions: BTreeMap<i32, PartitionImage>,
    /// Topic-level overrides only; defaults come from the broker config.
    pub configs: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataImage {
    topics: BTreeMap<String, TopicImage>,
    names_by_id: HashMap<Uuid, String>,
    /// Number of record batches applied; bumps on every change.
    pub version: u64,
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
}
