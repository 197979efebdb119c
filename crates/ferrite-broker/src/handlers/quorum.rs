//! DescribeQuorum (API 55, KIP-595/KIP-836): the metadata quorum as its active
//! controller sees it. A client asks any node; a node that is not the active controller
//! forwards the request over the controller listener (`controller_rpc`), as Kafka's
//! brokers forward it, and the active controller answers from its Raft progress.

use std::time::Duration;

use kafka_protocol::messages::describe_quorum_response::{
    Listener, Node, PartitionData, ReplicaState, TopicData,
};
use kafka_protocol::messages::{
    BrokerId, DescribeQuorumRequest, DescribeQuorumResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use crate::controller::Controller;
use crate::controller_rpc::{ControllerChannel, ControllerRequest, ControllerResponse};
use crate::Broker;

/// The metadata log's topic, the only one DescribeQuorum describes.
pub const METADATA_TOPIC: &str = "__cluster_metadata";
/// The listener name DescribeQuorum v2 gives the voters' controller endpoints.
const CONTROLLER_LISTENER_NAME: &str = "CONTROLLER";
/// How long a forwarded DescribeQuorum may take before the client hears an error.
const DESCRIBE_QUORUM_FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers a client's DescribeQuorum: locally on the active controller, otherwise
/// through it. A request for anything but `__cluster_metadata-0` is answered
/// UNKNOWN_TOPIC_OR_PARTITION without asking anyone.
pub async fn handle(broker: &Broker, req: DescribeQuorumRequest) -> DescribeQuorumResponse {
    if !asks_for_metadata_partition(&req) {
        return partition_error(&req, ResponseError::UnknownTopicOrPartition);
    }
    let controller = &broker.controller;
    let mut channel = ControllerChannel::new(
        controller.quorum().local_addr().ip(),
        DESCRIBE_QUORUM_FORWARD_TIMEOUT,
    );
    match channel
        .call(controller, ControllerRequest::DescribeQuorum(req.clone()))
        .await
    {
        Ok(ControllerResponse::DescribeQuorum(resp)) => resp,
        Ok(_) => partition_error(&req, ResponseError::UnknownServerError),
        Err(e) => {
            tracing::debug!(error = %e, "DescribeQuorum could not reach the active controller");
            // Retriable: the client asks again once a controller is elected.
            partition_error(&req, ResponseError::NotLeaderOrFollower)
        }
    }
}

/// The active controller's answer (or NOT_LEADER_OR_FOLLOWER on a voter that is not
/// it, Kafka's KafkaRaftClient answer), at DescribeQuorum's highest version; the
/// encoder drops what an older version lacks.
pub fn describe_local(
    controller: &Controller,
    req: &DescribeQuorumRequest,
) -> DescribeQuorumResponse {
    if !asks_for_metadata_partition(req) {
        return partition_error(req, ResponseError::UnknownTopicOrPartition);
    }
    let quorum = controller.quorum();
    let Some(d) = quorum.describe() else {
        return partition_error(req, ResponseError::NotLeaderOrFollower);
    };
    let now = crate::now_ms();
    let voters = d
        .voters
        .iter()
        .map(|v| {
            let is_leader = v.node_id == d.leader_id;
            ReplicaState::default()
                .with_replica_id(BrokerId(node_id_i32(v.node_id)))
                .with_log_end_offset(v.log_end_offset)
                // openraft reports progress, not fetch times: only the leader's own is
                // known (now, as Kafka reports its own).
                .with_last_fetch_timestamp(if is_leader { now } else { -1 })
                .with_last_caught_up_timestamp(if is_leader {
                    now
                } else {
                    v.last_caught_up_timestamp
                })
        })
        .collect();
    // Broker-only nodes: openraft learners, KRaft's observers.
    let observers = d
        .observers
        .iter()
        .map(|o| {
            ReplicaState::default()
                .with_replica_id(BrokerId(node_id_i32(o.node_id)))
                .with_log_end_offset(o.log_end_offset)
                .with_last_fetch_timestamp(-1)
                .with_last_caught_up_timestamp(o.last_caught_up_timestamp)
        })
        .collect();
    let nodes = quorum
        .voters()
        .iter()
        .filter_map(|(id, addr)| {
            let (host, port) = addr.rsplit_once(':')?;
            let port: u16 = port.parse().ok()?;
            Some(
                Node::default()
                    .with_node_id(BrokerId(node_id_i32(*id)))
                    .with_listeners(vec![Listener::default()
                        .with_name(StrBytes::from_static_str(CONTROLLER_LISTENER_NAME))
                        .with_host(StrBytes::from_string(
                            host.trim_start_matches('[')
                                .trim_end_matches(']')
                                .to_string(),
                        ))
                        .with_port(port)]),
            )
        })
        .collect();
    DescribeQuorumResponse::default()
        .with_topics(vec![TopicData::default()
            .with_topic_name(TopicName(StrBytes::from_static_str(METADATA_TOPIC)))
            .with_partitions(vec![PartitionData::default()
                .with_partition_index(0)
                .with_leader_id(BrokerId(node_id_i32(d.leader_id)))
                .with_leader_epoch(i32::try_from(d.leader_epoch).unwrap_or(i32::MAX))
                .with_high_watermark(d.high_watermark)
                .with_current_voters(voters)
                .with_observers(observers)])])
        .with_nodes(nodes)
}

fn node_id_i32(id: u64) -> i32 {
    i32::try_from(id).unwrap_or(i32::MAX)
}

/// Kafka's `hasValidTopicPartition`: exactly one topic, `__cluster_metadata`, with
/// exactly partition 0.
fn asks_for_metadata_partition(req: &DescribeQuorumRequest) -> bool {
    matches!(req.topics.as_slice(), [t] if &**t.topic_name == METADATA_TOPIC
        && matches!(t.partitions.as_slice(), [p] if p.partition_index == 0))
}

/// Every requested partition answered with `error` (Kafka's
/// `getPartitionLevelErrorResponse`).
fn partition_error(req: &DescribeQuorumRequest, error: ResponseError) -> DescribeQuorumResponse {
    DescribeQuorumResponse::default().with_topics(
        req.topics
            .iter()
            .map(|t| {
                TopicData::default()
                    .with_topic_name(t.topic_name.clone())
                    .with_partitions(
                        t.partitions
                            .iter()
                            .map(|p| {
                                PartitionData::default()
                                    .with_partition_index(p.partition_index)
                                    .with_error_code(error.code())
                                    .with_leader_id(BrokerId(-1))
                                    .with_leader_epoch(-1)
                                    .with_high_watermark(-1)
                            })
                            .collect(),
                    )
            })
            .collect(),
    )
}
