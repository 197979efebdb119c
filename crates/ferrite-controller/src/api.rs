//! The controller's inputs and outputs: Kafka's controller APIs as plain data
//! (BrokerRegistration, BrokerHeartbeat, UnregisterBroker, AlterPartition, CreateTopics,
//! CreatePartitions, ElectLeaders), decoded and encoded by the broker.

use std::collections::BTreeMap;

use ferrite_metadata::{BrokerEndpoint, MetadataRecord};
use uuid::Uuid;

use crate::error::ControllerError;

/// What one call produced: the reply for the sender, and the records to append to the
/// metadata log as one entry, at offset `offset`, before the reply may be sent. The
/// controller has already applied them to its own image; `records` empty means nothing
/// to append (and `offset` is `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output<T> {
    pub reply: T,
    pub records: Vec<MetadataRecord>,
    pub offset: Option<i64>,
}

/// BrokerRegistrationRequest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerRegistration {
    pub broker_id: i32,
    pub cluster_id: String,
    /// A new random id on every start of the broker process.
    pub incarnation_id: Uuid,
    pub listeners: Vec<BrokerEndpoint>,
    pub rack: Option<String>,
}

/// BrokerRegistrationResponse: the broker's epoch, to send with every heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerRegistrationReply {
    pub broker_epoch: i64,
}

/// BrokerHeartbeatRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerHeartbeat {
    pub broker_id: i32,
    pub broker_epoch: i64,
    /// The offset of the last metadata log entry the broker has applied.
    pub current_metadata_offset: i64,
    pub want_fence: bool,
    pub want_shut_down: bool,
}

/// BrokerHeartbeatResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerHeartbeatReply {
    /// The broker has applied the log up to its own registration.
    pub is_caught_up: bool,
    pub is_fenced: bool,
    /// Not a response field in Kafka's schema; for the broker's logs and tests.
    pub in_controlled_shutdown: bool,
    /// Controlled shutdown is complete: the broker may exit.
    pub should_shut_down: bool,
}

/// One ISR member of an AlterPartition request (v3+ `NewIsrWithEpochs`); a
/// `broker_epoch` of -1 skips the epoch check (older versions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IsrMember {
    pub broker_id: i32,
    pub broker_epoch: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlterPartitionData {
    pub partition: i32,
    pub leader_epoch: i32,
    pub new_isr: Vec<IsrMember>,
    pub partition_epoch: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlterPartitionTopic {
    pub topic_id: Uuid,
    pub partitions: Vec<AlterPartitionData>,
}

/// AlterPartitionRequest, sent by a partition leader to change its ISR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlterPartition {
    pub broker_id: i32,
    pub broker_epoch: i64,
    pub topics: Vec<AlterPartitionTopic>,
}

/// A partition's state after a successful AlterPartition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionState {
    pub leader: i32,
    pub leader_epoch: i32,
    pub isr: Vec<i32>,
    pub partition_epoch: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlterPartitionResult {
    pub topic_id: Uuid,
    pub partition: i32,
    pub result: Result<PartitionState, ControllerError>,
}

/// One topic of a CreateTopics request. `num_partitions` and `replication_factor` are
/// -1 for the defaults; `assignments` (partition `i` gets `assignments[i]`; `None` or
/// empty when not given, as the protocol's empty array) excludes both. `configs` are already validated by the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatableTopic {
    pub name: String,
    pub num_partitions: i32,
    pub replication_factor: i16,
    pub assignments: Option<Vec<Vec<i32>>>,
    pub configs: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateTopics {
    pub topics: Vec<CreatableTopic>,
    pub validate_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedTopic {
    pub topic_id: Uuid,
    pub num_partitions: i32,
    pub replication_factor: i16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateTopicResult {
    pub name: String,
    pub result: Result<CreatedTopic, ControllerError>,
}

/// One topic of a CreatePartitions request: the new total `count`, and optionally the
/// replicas of each added partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatePartitionsTopic {
    pub name: String,
    pub count: i32,
    pub assignments: Option<Vec<Vec<i32>>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatePartitions {
    pub topics: Vec<CreatePartitionsTopic>,
    pub validate_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatePartitionsResult {
    pub name: String,
    pub result: Result<(), ControllerError>,
}

/// ElectLeaders' election type (0 preferred, 1 unclean).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElectionType {
    Preferred,
    Unclean,
}

/// ElectLeadersRequest; `partitions: None` means every partition (and then partitions
/// that need no election are left out of the reply, as Kafka does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElectLeaders {
    pub election_type: ElectionType,
    pub partitions: Option<Vec<(String, Vec<i32>)>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElectionResult {
    pub topic: String,
    pub partition: i32,
    pub result: Result<(), ControllerError>,
}

/// One partition of AlterPartitionReassignments (KIP-455): `replicas: Some` starts (or
/// replaces) a reassignment to those replicas, `None` cancels the one in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReassignablePartition {
    pub topic: String,
    pub partition: i32,
    pub replicas: Option<Vec<i32>>,
}

/// AlterPartitionReassignmentsRequest. `allow_replication_factor_change: false` (v1,
/// KIP-860) refuses a target with another replica count than the partition has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlterPartitionReassignments {
    pub partitions: Vec<ReassignablePartition>,
    pub allow_replication_factor_change: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReassignmentResult {
    pub topic: String,
    pub partition: i32,
    pub result: Result<(), ControllerError>,
}

/// Everything the controller reacts to; [`crate::Controller::handle`] takes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    RegisterBroker(BrokerRegistration),
    Heartbeat(BrokerHeartbeat),
    UnregisterBroker {
        broker_id: i32,
    },
    AlterPartition(AlterPartition),
    CreateTopics(CreateTopics),
    CreatePartitions(CreatePartitions),
    ElectLeaders(ElectLeaders),
    AlterPartitionReassignments(AlterPartitionReassignments),
    /// Time passed: fence brokers whose session expired, rebalance leaders when due.
    Tick,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    RegisterBroker(Result<BrokerRegistrationReply, ControllerError>),
    Heartbeat(Result<BrokerHeartbeatReply, ControllerError>),
    UnregisterBroker(Result<(), ControllerError>),
    AlterPartition(Result<Vec<AlterPartitionResult>, ControllerError>),
    CreateTopics(Vec<CreateTopicResult>),
    CreatePartitions(Vec<CreatePartitionsResult>),
    ElectLeaders(Vec<ElectionResult>),
    AlterPartitionReassignments(Vec<ReassignmentResult>),
    Tick,
}
