//! The idempotent producer's APIs: InitProducerId hands out producer ids, and
//! DescribeProducers lists each partition's producer state. The sequence checks
//! themselves run in storage (`ferrite_storage::producer_state`) on every append.

use std::sync::Arc;

use kafka_protocol::messages::describe_producers_response::{
    PartitionResponse, ProducerState, TopicResponse,
};
use kafka_protocol::messages::{
    DescribeProducersRequest, DescribeProducersResponse, InitProducerIdRequest,
    InitProducerIdResponse, ProducerId,
};
use kafka_protocol::ResponseError;

use super::str_bytes;
use crate::Broker;

/// InitProducerId without a transactional id: a new producer id at epoch 0. Kafka's
/// coordinator does exactly this for idempotent producers, and ignores the KIP-360
/// ProducerId/ProducerEpoch fields (v3+) of such a request: a producer that bumps its
/// epoch after an error gets a fresh id, which starts its sequences at 0.
pub async fn init_producer_id(
    broker: &Arc<Broker>,
    req: InitProducerIdRequest,
) -> InitProducerIdResponse {
    let failed = |e: ResponseError| {
        InitProducerIdResponse::default()
            .with_error_code(e.code())
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1)
    };
    match req.transactional_id.as_ref().map(|t| t.0.as_str()) {
        None => {}
        // As Kafka: an empty transactional id is a malformed request.
        Some("") => return failed(ResponseError::InvalidRequest),
        // A transactional id is dispatched to `handlers::txn::init_producer_id`.
        Some(_) => return failed(ResponseError::InvalidRequest),
    }
    match broker
        .producer_ids
        .generate(&broker.controller, broker.config.node_id)
        .await
    {
        Ok(id) => InitProducerIdResponse::default()
            .with_producer_id(ProducerId(id))
            .with_producer_epoch(0),
        Err(e) => {
            tracing::error!(error = %e, "cannot allocate a producer id");
            // Retriable: the metadata log may recover (a full disk freed).
            failed(ResponseError::CoordinatorNotAvailable)
        }
    }
}

/// DescribeProducers (what `kafka-transactions.sh describe-producers` calls): the
/// producers each partition keeps state for.
pub fn describe_producers(
    broker: &Arc<Broker>,
    req: DescribeProducersRequest,
) -> DescribeProducersResponse {
    let topics = req
        .topics
        .into_iter()
        .map(|t| {
            let name = t.name.0.to_string();
            let partitions = t
                .partition_indexes
                .into_iter()
                .map(|index| {
                    let resp = PartitionResponse::default().with_partition_index(index);
                    let Some(p) = broker.replicas.get(&name, index) else {
                        return resp
                            .with_error_code(ResponseError::UnknownTopicOrPartition.code())
                            .with_error_message(Some(str_bytes(format!(
                                "{name}-{index} is not hosted here"
                            ))));
                    };
                    let log = p.log();
                    let active = log
                        .producers()
                        .producers()
                        .map(|e| {
                            ProducerState::default()
                                .with_producer_id(ProducerId(e.producer_id))
                                .with_producer_epoch(i32::from(e.producer_epoch))
                                .with_last_sequence(e.last_seq())
                                .with_last_timestamp(e.last_timestamp)
                                .with_coordinator_epoch(-1)
                                .with_current_txn_start_offset(
                                    log.producers()
                                        .ongoing_txn_first_offset(e.producer_id)
                                        .unwrap_or(-1),
                                )
                        })
                        .collect();
                    resp.with_active_producers(active)
                })
                .collect();
            TopicResponse::default()
                .with_name(t.name)
                .with_partitions(partitions)
        })
        .collect();
    DescribeProducersResponse::default().with_topics(topics)
}
