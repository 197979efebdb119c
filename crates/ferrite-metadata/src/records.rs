//! The metadata records. Each is a fact about the cluster; the image is their fold.
//!
//! The JSON encoding (serde, internally tagged by `type`) is the metadata log's format:
//! variants and fields are only ever added, never renamed, so old logs still replay.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `PartitionChange::leader` value meaning "the leader did not change" (KRaft's
/// `PartitionChangeRecord.Leader = -2`).
pub const NO_LEADER_CHANGE: i32 = -2;
/// A partition without a leader (offline), in `Partition::leader` and
/// `PartitionChange::leader`.
pub const NO_LEADER: i32 = -1;

/// One listener a broker serves on (KRaft's `RegisterBrokerRecord.EndPoints`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerEndpoint {
    /// The listener name, e.g. `PLAINTEXT`.
    pub name: String,
    pub host: String,
    pub port: u16,
    /// Kafka's security protocol id (0 = PLAINTEXT).
    pub security_protocol: i16,
}

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
    /// A broker registered (KRaft's RegisterBrokerRecord). It replaces any earlier
    /// registration of the same id. `broker_epoch` is the offset of the metadata log
    /// entry holding this record; a broker starts fenced (`fenced: true`) and is
    /// unfenced once it has caught up with the log.
    RegisterBroker {
        broker_id: i32,
        incarnation_id: Uuid,
        broker_epoch: i64,
        endpoints: Vec<BrokerEndpoint>,
        rack: Option<String>,
        fenced: bool,
    },
    /// A change of a registered broker's state (KRaft's BrokerRegistrationChangeRecord).
    /// `None` leaves a field unchanged (Kafka's 0); `fenced: Some(true)` fences (1),
    /// `Some(false)` unfences (-1); `in_controlled_shutdown: Some(true)` marks the start
    /// of a controlled shutdown. Applies only to the registration with this epoch.
    BrokerRegistrationChange {
        broker_id: i32,
        broker_epoch: i64,
        fenced: Option<bool>,
        in_controlled_shutdown: Option<bool>,
    },
    /// The broker's registration is gone (KRaft's UnregisterBrokerRecord).
    UnregisterBroker { broker_id: i32, broker_epoch: i64 },
    /// A change of a partition's leadership or ISR (KRaft's PartitionChangeRecord): a
    /// delta. `leader` is [`NO_LEADER_CHANGE`] (-2) when unchanged, [`NO_LEADER`] (-1)
    /// for none, else the new leader; `isr: None` leaves the ISR unchanged. Applying it
    /// bumps the partition epoch, and the leader epoch when `leader` is not -2 (as
    /// Kafka's `PartitionRegistration.merge`): the epochs are not carried, so a replay
    /// derives exactly the epochs the controller derived.
    ///
    /// A reassignment (KIP-455) changes `replicas`, `adding_replicas` and
    /// `removing_replicas` (`None`: unchanged, as the ISR). While one is in progress the
    /// replicas are the target followed by the replicas being removed; it completes with
    /// a change that sets the replicas to the target and empties both lists.
    PartitionChange {
        topic_id: Uuid,
        partition: i32,
        leader: i32,
        isr: Option<Vec<i32>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replicas: Option<Vec<i32>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        adding_replicas: Option<Vec<i32>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        removing_replicas: Option<Vec<i32>>,
    },
    /// A block of producer ids was handed to a broker (KRaft's ProducerIdsRecord): every
    /// id below `next_producer_id` is taken, so ids stay unique across restarts.
    ProducerIds {
        broker_id: i32,
        broker_epoch: i64,
        next_producer_id: i64,
    },
}
