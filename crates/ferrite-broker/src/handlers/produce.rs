//! Produce: validate each partition's batches and append them in one write. Records are
//! never decoded here; storage checks the batch headers and CRCs.

use std::sync::Arc;

use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse};
use kafka_protocol::ResponseError;

use super::str_bytes;
use crate::error::{recompress_error_code, storage_error_code};
use crate::{now_ms, Broker};

/// Returns `None` for acks=0, which gets no response.
pub fn handle(broker: &Arc<Broker>, req: ProduceRequest, _version: i16) -> Option<ProduceResponse> {
    let acks = req.acks;
    let acks_valid = matches!(acks, -1..=1);
    let now = now_ms();
    let mut responses = Vec::with_capacity(req.topic_data.len());
    for topic in req.topic_data {
        let name = topic.name.0.to_string();
        let mut partition_responses = Vec::with_capacity(topic.partition_data.len());
        for pd in topic.partition_data {
            let mut resp = PartitionProduceResponse::default()
                .with_index(pd.index)
                .with_base_offset(-1)
                .with_log_append_time_ms(-1)
                .with_log_start_offset(-1);
            let result = if !acks_valid {
                Err((
                    ResponseError::InvalidRequiredAcks.code(),
                    format!("acks must be 0, 1 or -1, got {acks}"),
                ))
            } else if req.transactional_id.is_some() {
                Err((
                    ResponseError::TransactionalIdAuthorizationFailed.code(),
                    "transactions are not supported yet".to_string(),
                ))
            } else {
                append_partition(broker, &name, pd.index, pd.records.as_deref(), now)
            };
            match result {
                Ok(info) => {
                    resp = resp
                        .with_base_offset(info.base_offset)
                        .with_log_append_time_ms(info.log_append_time_ms)
                        .with_log_start_offset(info.log_start_offset);
                }
                Err((code, message)) => {
                    tracing::debug!(topic = %name, partition = pd.index, code, %message, "produce rejected");
                    resp = resp
                        .with_error_code(code)
                        .with_error_message(Some(str_bytes(message)));
                }
            }
            partition_responses.push(resp);
        }
        responses.push(
            TopicProduceResponse::default()
                .with_name(topic.name)
                .with_partition_responses(partition_responses),
        );
    }
    if acks == 0 {
        return None;
    }
    Some(ProduceResponse::default().with_responses(responses))
}

fn append_partition(
    broker: &Arc<Broker>,
    topic: &str,
    partition: i32,
    records: Option<&[u8]>,
    now: i64,
) -> Result<ferrite_storage::AppendInfo, (i16, String)> {
    if topic == crate::group_manager::OFFSETS_TOPIC {
        // Only the group coordinator writes its internal topic.
        return Err((
            ResponseError::InvalidTopicException.code(),
            format!("cannot produce to internal topic {topic}"),
        ));
    }
    let Some(p) = broker.replicas.get(topic, partition) else {
        return Err((
            ResponseError::UnknownTopicOrPartition.code(),
            format!("{topic}-{partition} is not hosted here"),
        ));
    };
    let records = records.unwrap_or_default();
    // Topic compression.type other than `producer` (recompress.rs); the default keeps the
    // producer's bytes and never decodes them.
    let codec = p.log().config().recompress_codec;
    let recompressed = match codec {
        Some(codec) => crate::recompress::recompress(records, codec)
            .map_err(|e| (recompress_error_code(&e), e.to_string()))?,
        None => None,
    };
    p.append(recompressed.as_deref().unwrap_or(records), now)
        .map_err(|e| (storage_error_code(&e), e.to_string()))
}
