//! Topic administration: CreateTopics, DeleteTopics, CreatePartitions, DeleteRecords,
//! AlterPartitionReassignments and ListPartitionReassignments.
//! Each validates against the current image, commits records through the controller and
//! lets the replica manager follow the new image.

use std::collections::BTreeMap;
use std::sync::Arc;

use ferrite_metadata::{MetadataImage, MetadataRecord};
use kafka_protocol::messages::alter_partition_reassignments_response::{
    ReassignablePartitionResponse, ReassignableTopicResponse,
};
use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult,
};
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsTopicResult,
};
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::elect_leaders_response::{PartitionResult, ReplicaElectionResult};
use kafka_protocol::messages::list_partition_reassignments_response::{
    OngoingPartitionReassignment, OngoingTopicReassignment,
};
use kafka_protocol::messages::{
    AlterPartitionReassignmentsRequest, AlterPartitionReassignmentsResponse, BrokerId,
    CreatePartitionsRequest, CreatePartitionsResponse, CreateTopicsRequest, CreateTopicsResponse,
    DeleteRecordsRequest, DeleteRecordsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
    ElectLeadersRequest, ElectLeadersResponse, ListPartitionReassignmentsRequest,
    ListPartitionReassignmentsResponse,
};
use kafka_protocol::ResponseError;

use super::{str_bytes, topic_name};
use crate::controller::{validate_topic_configs, AdminError};
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
    install_committed(broker, &image, prepared)?;
    Ok(image)
}

/// Installs a committed image's partitions whose logs `prepared` opened before the
/// commit.
fn install_committed(
    broker: &Broker,
    image: &MetadataImage,
    prepared: crate::replica_manager::Prepared,
) -> Result<(), AdminError> {
    broker
        .replicas
        .install(image, &broker.config, true, prepared)
        .map_err(|e| {
            tracing::error!(error = %e, "cannot open a partition log after a metadata commit");
            AdminError {
                code: storage_error_code(&e),
                message: e.to_string(),
            }
        })
}

/// Decides `event` on the active controller, opens the logs of the partitions it adds
/// here, commits, and installs them: all or nothing (see [`commit`]).
async fn decide_and_commit(
    broker: &Broker,
    writer: &mut crate::controller::MetadataWriter<'_>,
    event: ferrite_controller::Event,
) -> Result<ferrite_controller::Reply, AdminError> {
    let out = writer.decide(event)?;
    if out.records.is_empty() {
        return Ok(out.reply);
    }
    let Some(next) = writer.decided_image().cloned() else {
        writer.abandon();
        return Err(AdminError::new(
            ResponseError::UnknownServerError,
            "the controller state disappeared",
        ));
    };
    let prepared = match broker.replicas.prepare(&next, &broker.config) {
        Ok(p) => p,
        Err(e) => {
            writer.abandon();
            return Err(e);
        }
    };
    let image = match writer.commit_decided(out.records, out.offset).await {
        Ok(image) => image,
        Err(e) => {
            prepared.discard();
            tracing::warn!(error = %e, "metadata commit failed; the change is not made");
            return Err(e.into());
        }
    };
    install_committed(broker, &image, prepared)?;
    Ok(out.reply)
}

pub async fn create_topics(
    broker: &Arc<Broker>,
    req: CreateTopicsRequest,
    version: i16,
) -> CreateTopicsResponse {
    let mut writer = broker.controller.writer().await;
    let mut results: Vec<CreatableTopicResult> = Vec::with_capacity(req.topics.len());
    // Topic configs are checked here (the broker knows Kafka's topic configs); the
    // topics that pass go to the controller as one request, which places them over the
    // registered, unfenced brokers.
    let mut to_create: Vec<(usize, ferrite_controller::CreatableTopic)> = Vec::new();
    for (i, t) in req.topics.iter().enumerate() {
        let name = t.name.0.to_string();
        results.push(
            CreatableTopicResult::default()
                .with_name(t.name.clone())
                .with_num_partitions(-1)
                .with_replication_factor(-1),
        );
        let checked = (|| {
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
            Ok(ferrite_controller::CreatableTopic {
                name: name.clone(),
                num_partitions: t.num_partitions,
                replication_factor: t.replication_factor,
                assignments: manual,
                configs,
            })
        })();
        match checked {
            Ok(c) => to_create.push((i, c)),
            Err(e) => fail(&mut results, i, e),
        }
    }
    if !to_create.is_empty() {
        let (indexes, topics): (Vec<usize>, Vec<ferrite_controller::CreatableTopic>) =
            to_create.into_iter().unzip();
        let configs: Vec<BTreeMap<String, String>> =
            topics.iter().map(|t| t.configs.clone()).collect();
        let event = ferrite_controller::Event::CreateTopics(ferrite_controller::CreateTopics {
            topics,
            validate_only: req.validate_only,
        });
        match decide_and_commit(broker, &mut writer, event).await {
            Ok(ferrite_controller::Reply::CreateTopics(created)) => {
                for ((i, r), configs) in indexes.iter().zip(created).zip(configs) {
                    match r.result {
                        Ok(t) => {
                            if let Some(result) = results.get_mut(*i) {
                                *result = created_result(
                                    broker,
                                    std::mem::take(result),
                                    &t,
                                    &configs,
                                    version,
                                );
                            }
                            if !req.validate_only {
                                tracing::info!(topic = %r.name, partitions = t.num_partitions, replication_factor = t.replication_factor, "created topic");
                            }
                        }
                        Err(e) => fail(&mut results, *i, e.into()),
                    }
                }
            }
            Ok(_) => {
                for i in indexes {
                    fail(
                        &mut results,
                        i,
                        AdminError::new(ResponseError::UnknownServerError, "unexpected reply"),
                    );
                }
            }
            Err(e) => {
                for i in indexes {
                    fail(&mut results, i, e.clone());
                }
            }
        }
    }
    CreateTopicsResponse::default().with_topics(results)
}

fn fail(results: &mut [CreatableTopicResult], i: usize, e: AdminError) {
    if let Some(r) = results.get_mut(i) {
        r.error_code = e.code;
        r.error_message = Some(str_bytes(e.message));
    }
}

fn created_result(
    broker: &Broker,
    result: CreatableTopicResult,
    t: &ferrite_controller::CreatedTopic,
    configs: &BTreeMap<String, String>,
    version: i16,
) -> CreatableTopicResult {
    let mut result = result
        .with_topic_id(t.topic_id)
        .with_num_partitions(t.num_partitions)
        .with_replication_factor(t.replication_factor);
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
    result
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
    let names: Vec<_> = req.topics.iter().map(|t| t.name.clone()).collect();
    let event = ferrite_controller::Event::CreatePartitions(ferrite_controller::CreatePartitions {
        topics: req
            .topics
            .iter()
            .map(|t| ferrite_controller::CreatePartitionsTopic {
                name: t.name.0.to_string(),
                count: t.count,
                assignments: t.assignments.as_ref().map(|a| {
                    a.iter()
                        .map(|x| x.broker_ids.iter().map(|b| b.0).collect())
                        .collect()
                }),
            })
            .collect(),
        validate_only: req.validate_only,
    });
    let outcome = decide_and_commit(broker, &mut writer, event).await;
    let results = names
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let result = CreatePartitionsTopicResult::default().with_name(name);
            let error: Option<AdminError> = match &outcome {
                Ok(ferrite_controller::Reply::CreatePartitions(r)) => match r.get(i) {
                    Some(r) => r.result.clone().err().map(AdminError::from),
                    None => Some(AdminError::new(
                        ResponseError::UnknownServerError,
                        "no result",
                    )),
                },
                Ok(_) => Some(AdminError::new(
                    ResponseError::UnknownServerError,
                    "unexpected reply",
                )),
                Err(e) => Some(e.clone()),
            };
            match error {
                None => {
                    if !req.validate_only {
                        tracing::info!(topic = ?result.name.0, "added partitions");
                    }
                    result
                }
                Some(e) => result
                    .with_error_code(e.code)
                    .with_error_message(Some(str_bytes(e.message))),
            }
        })
        .collect();
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

/// AlterPartitionReassignments (KIP-455): each partition's target replicas, or `null` to
/// cancel, decided by the controller as one metadata entry. The new replicas then fetch
/// from the leader like any follower; the reassignment completes (old replicas dropped,
/// their logs deleted, leadership moved into the target) with the ISR change that makes
/// the last of them in sync. ListPartitionReassignments shows the progress.
pub async fn alter_partition_reassignments(
    broker: &Arc<Broker>,
    req: AlterPartitionReassignmentsRequest,
    version: i16,
) -> AlterPartitionReassignmentsResponse {
    let mut partitions = Vec::new();
    for t in &req.topics {
        for p in &t.partitions {
            partitions.push(ferrite_controller::ReassignablePartition {
                topic: t.name.0.to_string(),
                partition: p.partition_index,
                replicas: p.replicas.as_ref().map(|r| r.iter().map(|b| b.0).collect()),
            });
        }
    }
    // v0 has no such field and always allows it (KIP-860 added the choice in v1).
    let allow_replication_factor_change = version < 1 || req.allow_replication_factor_change;
    let event = ferrite_controller::Event::AlterPartitionReassignments(
        ferrite_controller::AlterPartitionReassignments {
            partitions,
            allow_replication_factor_change,
        },
    );
    let mut writer = broker.controller.writer().await;
    let outcome = decide_and_commit(broker, &mut writer, event).await;
    drop(writer);
    let response = AlterPartitionReassignmentsResponse::default()
        .with_allow_replication_factor_change(allow_replication_factor_change);
    let results = match outcome {
        Ok(ferrite_controller::Reply::AlterPartitionReassignments(r)) => r,
        Ok(_) => {
            return response
                .with_error_code(ResponseError::UnknownServerError.code())
                .with_error_message(Some(str_bytes("unexpected controller reply")))
        }
        // The whole request failed (not the controller, the quorum unavailable): one
        // top-level error, as Kafka answers.
        Err(e) => {
            return response
                .with_error_code(e.code)
                .with_error_message(Some(str_bytes(e.message)))
        }
    };
    let mut results = results.into_iter();
    let responses = req
        .topics
        .iter()
        .map(|t| {
            let partitions = t
                .partitions
                .iter()
                .map(|p| {
                    let r = ReassignablePartitionResponse::default()
                        .with_partition_index(p.partition_index);
                    match results.next().map(|r| r.result) {
                        Some(Ok(())) => {
                            tracing::info!(topic = %t.name.0, partition = p.partition_index, replicas = ?p.replicas, "partition reassignment accepted");
                            r
                        }
                        Some(Err(e)) => r
                            .with_error_code(e.code())
                            .with_error_message(Some(str_bytes(e.message()))),
                        None => r.with_error_code(ResponseError::UnknownServerError.code()),
                    }
                })
                .collect();
            ReassignableTopicResponse::default()
                .with_name(t.name.clone())
                .with_partitions(partitions)
        })
        .collect();
    response.with_responses(responses)
}

/// ListPartitionReassignments: the partitions with a reassignment in progress (all of
/// them for `topics: null`), from the committed metadata. Unknown topics and partitions
/// are left out, as Kafka's controller does.
pub fn list_partition_reassignments(
    broker: &Arc<Broker>,
    req: ListPartitionReassignmentsRequest,
) -> ListPartitionReassignmentsResponse {
    let image = broker.controller.image();
    let ongoing = |p: &ferrite_metadata::PartitionImage| {
        let ids = |v: &[i32]| v.iter().map(|&b| BrokerId(b)).collect::<Vec<_>>();
        OngoingPartitionReassignment::default()
            .with_partition_index(p.partition)
            .with_replicas(ids(&p.replicas))
            .with_adding_replicas(ids(&p.adding_replicas))
            .with_removing_replicas(ids(&p.removing_replicas))
    };
    let topics: Vec<OngoingTopicReassignment> = match &req.topics {
        None => image
            .topics()
            .map(|t| {
                let partitions: Vec<_> = t
                    .partitions
                    .values()
                    .filter(|p| p.is_reassigning())
                    .map(ongoing)
                    .collect();
                (t.name.as_str(), partitions)
            })
            .filter(|(_, p)| !p.is_empty())
            .map(|(name, partitions)| {
                OngoingTopicReassignment::default()
                    .with_name(topic_name(name))
                    .with_partitions(partitions)
            })
            .collect(),
        Some(wanted) => wanted
            .iter()
            .filter_map(|w| {
                let t = image.topic(&w.name.0)?;
                let partitions: Vec<_> = w
                    .partition_indexes
                    .iter()
                    .filter_map(|i| t.partitions.get(i))
                    .filter(|p| p.is_reassigning())
                    .map(ongoing)
                    .collect();
                (!partitions.is_empty()).then(|| {
                    OngoingTopicReassignment::default()
                        .with_name(w.name.clone())
                        .with_partitions(partitions)
                })
            })
            .collect(),
    };
    ListPartitionReassignmentsResponse::default().with_topics(topics)
}

/// ElectLeaders (KIP-183 preferred, KIP-460 unclean; kafka-leader-election.sh): the
/// controller's `elect_leaders`, committed as one metadata entry. `topic_partitions:
/// null` means every partition, and then those needing no election are left out.
pub async fn elect_leaders(
    broker: &Arc<Broker>,
    req: ElectLeadersRequest,
    version: i16,
) -> ElectLeadersResponse {
    let response = ElectLeadersResponse::default();
    // v0 has no election type: preferred.
    let election_type = match (version, req.election_type) {
        (0, _) | (_, 0) => ferrite_controller::ElectionType::Preferred,
        (_, 1) => ferrite_controller::ElectionType::Unclean,
        (_, other) => {
            tracing::debug!(
                election_type = other,
                "ElectLeaders with an unknown election type"
            );
            return response.with_error_code(ResponseError::InvalidRequest.code());
        }
    };
    let partitions = req.topic_partitions.as_ref().map(|ts| {
        ts.iter()
            .map(|t| (t.topic.0.to_string(), t.partitions.clone()))
            .collect()
    });
    let event = ferrite_controller::Event::ElectLeaders(ferrite_controller::ElectLeaders {
        election_type,
        partitions,
    });
    let mut writer = broker.controller.writer().await;
    let outcome = decide_and_commit(broker, &mut writer, event).await;
    drop(writer);
    let results = match outcome {
        Ok(ferrite_controller::Reply::ElectLeaders(r)) => r,
        Ok(_) => {
            return response.with_error_code(ResponseError::UnknownServerError.code());
        }
        Err(e) if version >= 1 => return response.with_error_code(e.code),
        Err(e) => {
            // v0 has no top-level error: every partition asked gets it.
            let results = req
                .topic_partitions
                .unwrap_or_default()
                .into_iter()
                .map(|t| {
                    let partition_result = t
                        .partitions
                        .iter()
                        .map(|&p| {
                            PartitionResult::default()
                                .with_partition_id(p)
                                .with_error_code(e.code)
                                .with_error_message(Some(str_bytes(e.message.clone())))
                        })
                        .collect();
                    ReplicaElectionResult::default()
                        .with_topic(t.topic)
                        .with_partition_result(partition_result)
                })
                .collect();
            return response.with_replica_election_results(results);
        }
    };
    let mut by_topic: BTreeMap<String, Vec<PartitionResult>> = BTreeMap::new();
    for r in results {
        let result = PartitionResult::default().with_partition_id(r.partition);
        let result = match r.result {
            Ok(()) => {
                tracing::info!(topic = %r.topic, partition = r.partition, ?election_type, "leader elected on request");
                result
            }
            Err(e) => result
                .with_error_code(e.code())
                .with_error_message(Some(str_bytes(e.message()))),
        };
        by_topic.entry(r.topic).or_default().push(result);
    }
    response.with_replica_election_results(
        by_topic
            .into_iter()
            .map(|(topic, partition_result)| {
                ReplicaElectionResult::default()
                    .with_topic(topic_name(&topic))
                    .with_partition_result(partition_result)
            })
            .collect(),
    )
}
