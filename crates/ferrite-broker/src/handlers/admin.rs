//! Topic administration: CreateTopics, DeleteTopics, CreatePartitions, DeleteRecords.
//! Each validates against the current image, commits records through the controller and
//! lets the replica manager follow the new image.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use ferrite_metadata::{BrokerSlot, MetadataImage, MetadataRecord};
use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult,
};
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsTopicResult,
};
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::{
    CreatePartitionsRequest, CreatePartitionsResponse, CreateTopicsRequest, CreateTopicsResponse,
    DeleteRecordsRequest, DeleteRecordsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
};
use kafka_protocol::ResponseError;

use super::{str_bytes, topic_name};
use crate::config::limits;
use crate::controller::{
    create_topic_records, partition_records, validate_manual_assignment, validate_topic_configs,
    AdminError,
};
use crate::error::storage_error_code;
use crate::Broker;

/// Commits records and brings the hosted partitions in line, all or nothing: the logs
/// of new partitions are created first (checked against the descriptors left), and if
/// any cannot be, or the metadata append fails (a full disk), nothing is committed and
/// the directories just created are removed again.
async fn commit(
    broker: &Broker,
    writer: &mut crate::controller::MetadataWriter<'_>,
    records: Vec<MetadataRecord>,
) -> Result<Arc<MetadataImage>, AdminError> {
    let next = writer.preview(&records);
    let prepared = broker.replicas.prepare(&next, &broker.config)?;
    let image = match writer.commit(records).await {
        Ok(image) => image,
        Err(e) => {
            prepared.discard();
            tracing::warn!(error = %e, "metadata commit failed; the change is not made");
            return Err(AdminError {
                code: crate::error::quorum_error_code(&e),
                message: e.to_string(),
            });
        }
    };
    broker
        .replicas
        .install(&image, &broker.config, true, prepared)
        .map_err(|e| {
            tracing::error!(error = %e, "cannot open a partition log after a metadata commit");
            AdminError {
                code: storage_error_code(&e),
                message: e.to_string(),
            }
        })?;
    Ok(image)
}

pub async fn create_topics(
    broker: &Arc<Broker>,
    req: CreateTopicsRequest,
    version: i16,
) -> CreateTopicsResponse {
    let mut writer = broker.controller.writer().await;
    let mut seen = HashSet::new();
    let duplicates: HashSet<String> = req
        .topics
        .iter()
        .map(|t| t.name.0.to_string())
        .filter(|n| !seen.insert(n.clone()))
        .collect();
    let mut results = Vec::with_capacity(req.topics.len());
    for t in req.topics {
        let name = t.name.0.to_string();
        let mut result = CreatableTopicResult::default()
            .with_name(t.name.clone())
            .with_num_partitions(-1)
            .with_replication_factor(-1);
        let outcome = async {
            if duplicates.contains(&name) {
                return Err(AdminError::new(
                    ResponseError::InvalidRequest,
                    format!("topic `{name}` appears more than once in the request"),
                ));
            }
            let configs = validate_topic_configs(
                &broker.config,
                t.configs
                    .iter()
                    .map(|c| (c.name.to_string(), c.value.as_ref().map(|v| v.to_string()))),
            )?;
            let manual = if t.assignments.is_empty() {
                None
            } else {
                let mut by_index: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
                for a in &t.assignments {
                    by_index.insert(
                        a.partition_index,
                        a.broker_ids.iter().map(|b| b.0).collect(),
                    );
                }
                if by_index.keys().copied().ne(0..by_index.len() as i32) {
                    return Err(AdminError::new(
                        ResponseError::InvalidReplicaAssignment,
                        "partition indexes must be 0..n",
                    ));
                }
                Some(by_index.into_values().collect())
            };
            let image = writer.image();
            let (topic_id, records, partitions, rf) = create_topic_records(
                &broker.config,
                &image,
                &name,
                t.num_partitions,
                t.replication_factor,
                manual,
                configs.clone(),
            )?;
            if !req.validate_only {
                commit(broker, &mut writer, records).await?;
            }
            Ok((topic_id, partitions, rf, configs))
        }
        .await;
        match outcome {
            Ok((topic_id, partitions, rf, configs)) => {
                result = result
                    .with_topic_id(topic_id)
                    .with_num_partitions(partitions)
                    .with_replication_factor(rf);
                // v5+ returns the topic's configs (KIP-525).
                if version >= 5 {
                    result = result.with_configs(Some(
                        crate::config::TOPIC_CONFIG_KEYS
                            .iter()
                            .map(|k| {
                                let (value, source) = match configs.get(*k) {
                                    Some(v) => (Some(v.clone()), super::configs::SOURCE_TOPIC),
                                    None => (
                                        broker.config.topic_config_default(k),
                                        super::configs::SOURCE_DEFAULT,
                                    ),
                                };
                                CreatableTopicConfigs::default()
                                    .with_name(str_bytes(*k))
                                    .with_value(value.map(str_bytes))
                                    .with_config_source(source)
                            })
                            .collect(),
                    ));
                }
                if !req.validate_only {
                    tracing::info!(topic = %name, partitions, replication_factor = rf, "created topic");
                }
            }
            Err(e) => {
                result = result
                    .with_error_code(e.code)
                    .with_error_message(Some(str_bytes(e.message)));
            }
        }
        results.push(result);
    }
    CreateTopicsResponse::default().with_topics(results)
}

pub async fn delete_topics(
    broker: &Arc<Broker>,
    req: DeleteTopicsRequest,
    version: i16,
) -> DeleteTopicsResponse {
    let mut writer = broker.controller.writer().await;
    // v6 names topics by name or id; before that by name only.
    let wanted: Vec<(Option<String>, uuid::Uuid)> = if version >= 6 {
        req.topics
            .iter()
            .map(|t| (t.name.as_ref().map(|n| n.0.to_string()), t.topic_id))
            .collect()
    } else {
        req.topic_names
            .iter()
            .map(|n| (Some(n.0.to_string()), uuid::Uuid::nil()))
            .collect()
    };
    let mut responses = Vec::with_capacity(wanted.len());
    for (name, id) in wanted {
        let image = writer.image();
        let topic = match &name {
            Some(n) => image.topic(n),
            None => image.topic_by_id(&id),
        };
        let mut result = DeletableTopicResult::default()
            .with_name(name.as_deref().map(topic_name))
            .with_topic_id(id);
        match topic {
            None => {
                let code = if name.is_some() {
                    ResponseError::UnknownTopicOrPartition
                } else {
                    ResponseError::UnknownTopicId
                };
                result = result.with_error_code(code.code());
            }
            Some(t) if t.name == crate::group_manager::OFFSETS_TOPIC => {
                result = result
                    .with_error_code(ResponseError::InvalidTopicException.code())
                    .with_error_message(Some(str_bytes(
                        "the internal offsets topic cannot be deleted",
                    )));
            }
            Some(t) => {
                let topic_id = t.topic_id;
                let topic = t.name.clone();
                result = result
                    .with_name(Some(topic_name(&topic)))
                    .with_topic_id(topic_id);
                match commit(
                    broker,
                    &mut writer,
                    vec![MetadataRecord::RemoveTopic { topic_id }],
                )
                .await
                {
                    Ok(_) => tracing::info!(%topic, "deleted topic"),
                    Err(e) => {
                        result = result
                            .with_error_code(e.code)
                            .with_error_message(Some(str_bytes(e.message)))
                    }
                }
            }
        }
        responses.push(result);
    }
    DeleteTopicsResponse::default().with_responses(responses)
}

pub async fn create_partitions(
    broker: &Arc<Broker>,
    req: CreatePartitionsRequest,
) -> CreatePartitionsResponse {
    let mut writer = broker.controller.writer().await;
    let mut results = Vec::with_capacity(req.topics.len());
    for t in req.topics {
        let name = t.name.0.to_string();
        let outcome = async {
            let image = writer.image();
            let topic = image.topic(&name).ok_or_else(|| {
                AdminError::new(
                    ResponseError::UnknownTopicOrPartition,
                    format!("topic `{name}` does not exist"),
                )
            })?;
            let current = topic.partitions.len() as i32;
            if t.count <= current {
                return Err(AdminError::new(
                    ResponseError::InvalidPartitions,
                    format!(
                        "topic has {current} partitions; the new count {} must be larger",
                        t.count
                    ),
                ));
            }
            let added = t.count - current;
            if added > limits::TOPIC_PARTITIONS_CREATED_MAX {
                return Err(AdminError::new(
                    ResponseError::InvalidPartitions,
                    format!(
                        "at most {} partitions per request",
                        limits::TOPIC_PARTITIONS_CREATED_MAX
                    ),
                ));
            }
            let brokers = [BrokerSlot {
                node_id: broker.config.node_id,
                rack: broker.config.rack.clone(),
            }];
            let rf = topic
                .partitions
                .values()
                .next()
                .map_or(1, |p| p.replicas.len()) as i32;
            let assignment = match &t.assignments {
                Some(a) => {
                    let a: Vec<Vec<i32>> = a
                        .iter()
                        .map(|x| x.broker_ids.iter().map(|b| b.0).collect())
                        .collect();
                    if a.len() as i32 != added {
                        return Err(AdminError::new(
                            ResponseError::InvalidReplicaAssignment,
                            "one assignment per new partition is required",
                        ));
                    }
                    validate_manual_assignment(&a, &brokers, current)?;
                    a
                }
                None => {
                    let start = rand::random::<u32>() as usize % brokers.len();
                    ferrite_metadata::assign_replicas(&brokers, current, added, rf, start).map_err(
                        |e| AdminError {
                            code: crate::error::placement_error_code(&e),
                            message: e.to_string(),
                        },
                    )?
                }
            };
            if !req.validate_only {
                commit(
                    broker,
                    &mut writer,
                    partition_records(topic.topic_id, current, assignment),
                )
                .await?;
                tracing::info!(topic = %name, count = t.count, "added partitions");
            }
            Ok(())
        }
        .await;
        let mut result = CreatePartitionsTopicResult::default().with_name(t.name);
        if let Err(e) = outcome {
            result = result
                .with_error_code(e.code)
                .with_error_message(Some(str_bytes(e.message)));
        }
        results.push(result);
    }
    CreatePartitionsResponse::default().with_results(results)
}

pub fn delete_records(broker: &Arc<Broker>, req: DeleteRecordsRequest) -> DeleteRecordsResponse {
    let topics = req
        .topics
        .into_iter()
        .map(|t| {
            let name = t.name.0.to_string();
            let partitions = t
                .partitions
                .into_iter()
                .map(|dp| {
                    let result = DeleteRecordsPartitionResult::default().with_partition_index(dp.partition_index).with_low_watermark(-1);
                    let Some(p) = broker.replicas.get(&name, dp.partition_index) else {
                        return result.with_error_code(ResponseError::UnknownTopicOrPartition.code());
                    };
                    let mut log = p.log();
                    // -1 means "up to the high watermark".
                    let offset = if dp.offset == -1 { log.log_end_offset() } else { dp.offset };
                    match log.advance_log_start_offset(offset) {
                        Ok(low) => {
                            tracing::info!(topic = %name, partition = dp.partition_index, log_start_offset = low, "deleted records");
                            result.with_low_watermark(low)
                        }
                        Err(e) => result.with_error_code(storage_error_code(&e)),
                    }
                })
                .collect();
            DeleteRecordsTopicResult::default().with_name(t.name).with_partitions(partitions)
        })
        .collect();
    DeleteRecordsResponse::default().with_topics(topics)
}
