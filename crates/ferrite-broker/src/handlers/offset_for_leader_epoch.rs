//! OffsetForLeaderEpoch (KIP-101, KIP-279, KIP-320): for each partition, the largest
//! leader epoch at most the one asked and the offset where it ended in this replica's
//! log. Followers ask it before fetching from a new leader (truncation); consumers ask
//! it after a leader change to check their position (librdkafka does, KIP-320).
//!
//! A client (replica id -1) is answered only by the leader; a broker (its id) and the
//! debugging id -2 by any replica, as in Kafka.

use std::sync::Arc;

use kafka_protocol::messages::offset_for_leader_epoch_response::{
    EpochEndOffset, OffsetForLeaderTopicResult,
};
use kafka_protocol::messages::{OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse};
use kafka_protocol::ResponseError;

use super::fetch::epoch_error;
use crate::Broker;

/// Kafka's `CONSUMER_REPLICA_ID`.
const CONSUMER_REPLICA_ID: i32 = -1;

pub fn handle(
    broker: &Arc<Broker>,
    req: OffsetForLeaderEpochRequest,
) -> OffsetForLeaderEpochResponse {
    let from_client = req.replica_id.0 == CONSUMER_REPLICA_ID;
    let topics = req
        .topics
        .into_iter()
        .map(|t| {
            let name = t.topic.0.to_string();
            let partitions = t
                .partitions
                .into_iter()
                .map(|op| {
                    let resp = EpochEndOffset::default()
                        .with_partition(op.partition)
                        .with_leader_epoch(-1)
                        .with_end_offset(-1);
                    let Some(p) = broker.replicas.get(&name, op.partition) else {
                        return resp.with_error_code(ResponseError::UnknownTopicOrPartition.code());
                    };
                    if from_client && !p.is_leader() {
                        return resp.with_error_code(ResponseError::NotLeaderOrFollower.code());
                    }
                    if let Some(code) = epoch_error(op.current_leader_epoch, p.leader_epoch()) {
                        return resp.with_error_code(code);
                    }
                    let answer = p.end_offset_for_epoch(op.leader_epoch);
                    resp.with_leader_epoch(answer.leader_epoch)
                        .with_end_offset(answer.end_offset)
                })
                .collect();
            OffsetForLeaderTopicResult::default()
                .with_topic(t.topic)
                .with_partitions(partitions)
        })
        .collect();
    OffsetForLeaderEpochResponse::default().with_topics(topics)
}
