//! The metadata records. Each is a fact about the cluster; the image is their fold.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum MetadataRecord {
    /// A topic exists with this name and id (KRaft's TopicRecord).
    Topic { name: String, topic_id: Uuid },
    /// A partition's assignment and leadership (KRaft's PartitionRecord). A later record
    /// for the same partition replaces the earlier one.
    Partition {
        topic_id: Uuid,
        partition: i32,
        replicas: Vec<i32>,
        isr: Vec<i32>,
        leader: i32,
        leader_epoch: i32,
        partition_epoch: i32,
    },
    /// A topic config set (`value: Some`) or removed back to the default (`None`).
    TopicConfig {
        topic_id: Uuid,
        key: String,
        value: Option<String>,
    },
    /// The topic and all its partitions are gone.
    RemoveTopic { topic_id: Uuid },
}
