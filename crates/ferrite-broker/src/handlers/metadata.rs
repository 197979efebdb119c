//! Metadata and DescribeCluster: what the image says, plus topic auto-creation.

use std::collections::BTreeMap;
use std::sync::Arc;

use ferrite_metadata::{MetadataImage, TopicImage};
use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{
    BrokerId, DescribeClusterRequest, DescribeClusterResponse, MetadataRequest, MetadataResponse,
};
use kafka_protocol::ResponseError;

use super::{str_bytes, topic_name};
use crate::config::validate_topic_name;
use crate::Broker;

/// Kafka's "authorized operations not requested" sentinel.
pub const AUTHORIZED_OPERATIONS_OMITTED: i32 = i32::MIN;

/// Bit fields of AclOperation codes (KIP-430). There is no authorizer, so, as in Kafka
/// without one, every operation a resource type supports is allowed.
#[allow(clippy::indexing_slicing)] // Const evaluation: `i < codes.len()` bounds it.
const fn ops(codes: &[u32]) -> i32 {
    let mut bits = 0u32;
    let mut i = 0;
    while i < codes.len() {
        bits |= 1 << codes[i];
        i += 1;
    }
    bits as i32
}
// READ 3, WRITE 4, CREATE 5, DELETE 6, ALTER 7, DESCRIBE 8, CLUSTER_ACTION 9,
// DESCRIBE_CONFIGS 10, ALTER_CONFIGS 11, IDEMPOTENT_WRITE 12.
pub const TOPIC_OPERATIONS: i32 = ops(&[3, 4, 5, 6, 7, 8, 10, 11]);
pub const CLUSTER_OPERATIONS: i32 = ops(&[5, 7, 8, 9, 10, 11, 12]);
pub const GROUP_OPERATIONS: i32 = ops(&[3, 6, 8]);

pub async fn handle(broker: &Arc<Broker>, req: MetadataRequest, version: i16) -> MetadataResponse {
    let mut image = broker.controller.image();
    // Before v4 there is no flag and auto-creation is always allowed (broker config permitting).
    let allow_auto_create = version < 4 || req.allow_auto_topic_creation;
    let mut topics = Vec::new();
    match req.topics {
        // v1+: null asks for every topic (v0 uses an empty list for that).
        None => topics.extend(image.topics().map(|t| topic_response(&image, t))),
        Some(list) if list.is_empty() && version == 0 => {
            topics.extend(image.topics().map(|t| topic_response(&image, t)))
        }
        Some(list) => {
            for requested in list {
                let by_name = requested.name.as_ref().map(|n| n.0.to_string());
                let found = match &by_name {
                    Some(name) => image.topic(name).cloned(),
                    // v10+: topics may be asked for by id (KIP-516).
                    None => image.topic_by_id(&requested.topic_id).cloned(),
                };
                if let Some(t) = found {
                    topics.push(topic_response(&image, &t));
                    continue;
                }
                let Some(name) = by_name else {
                    topics.push(error_topic(
                        None,
                        requested.topic_id,
                        ResponseError::UnknownTopicId.code(),
                    ));
                    continue;
                };
                if validate_topic_name(&name).is_err() {
                    topics.push(error_topic(
                        Some(&name),
                        requested.topic_id,
                        ResponseError::InvalidTopicException.code(),
                    ));
                    continue;
                }
                if allow_auto_create && broker.config.auto_create_topics_enable {
                    match auto_create(broker, &name).await {
                        Ok(next) => {
                            image = next;
                            if let Some(t) = image.topic(&name) {
                                // As Kafka: the request that triggers the creation hears
                                // LEADER_NOT_AVAILABLE and the client asks again.
                                topics.push(error_topic(
                                    Some(&name),
                                    t.topic_id,
                                    ResponseError::LeaderNotAvailable.code(),
                                ));
                                continue;
                            }
                        }
                        Err(code) => {
                            topics.push(error_topic(Some(&name), requested.topic_id, code));
                            continue;
                        }
                    }
                }
                topics.push(error_topic(
                    Some(&name),
                    requested.topic_id,
                    ResponseError::UnknownTopicOrPartition.code(),
                ));
            }
        }
    }
    if req.include_topic_authorized_operations {
        for t in topics.iter_mut().filter(|t| t.error_code == 0) {
            t.topic_authorized_operations = TOPIC_OPERATIONS;
        }
    }
    // v8-10 carry cluster operations here; v11+ moved them to DescribeCluster (KIP-700).
    let cluster_operations =
        if req.include_cluster_authorized_operations && (8..=10).contains(&version) {
            CLUSTER_OPERATIONS
        } else {
            AUTHORIZED_OPERATIONS_OMITTED
        };
    MetadataResponse::default()
        .with_brokers(
            live_brokers(broker, &image)
                .into_iter()
                .map(|b| {
                    MetadataResponseBroker::default()
                        .with_node_id(BrokerId(b.id))
                        .with_host(str_bytes(b.host))
                        .with_port(i32::from(b.port))
                        .with_rack(b.rack.map(str_bytes))
                })
                .collect(),
        )
        .with_cluster_id(Some(str_bytes(broker.cluster_id.clone())))
        .with_controller_id(BrokerId(
            broker.controller.active_controller_id().unwrap_or(-1),
        ))
        .with_cluster_authorized_operations(cluster_operations)
        .with_topics(topics)
}

/// Creates a topic with the broker defaults, as Kafka does for a Metadata request of an
/// unknown topic. A concurrent creation of the same topic is not an error.
async fn auto_create(broker: &Arc<Broker>, name: &str) -> Result<Arc<MetadataImage>, i16> {
    let mut writer = broker.controller.writer().await;
    let image = writer.image();
    if image.topic(name).is_some() {
        return Ok(image);
    }
    let event = ferrite_controller::Event::CreateTopics(ferrite_controller::CreateTopics {
        topics: vec![ferrite_controller::CreatableTopic {
            name: name.to_string(),
            num_partitions: -1,
            replication_factor: -1,
            assignments: None,
            configs: BTreeMap::new(),
        }],
        validate_only: false,
    });
    let (reply, next) = writer.handle(event).await.map_err(|e| {
        tracing::warn!(error = %e, "metadata commit failed");
        crate::error::quorum_error_code(&e)
    })?;
    if let ferrite_controller::Reply::CreateTopics(results) = reply {
        if let Some(Err(e)) = results.into_iter().next().map(|r| r.result) {
            return Err(e.code());
        }
    }
    broker
        .replicas
        .reconcile(&next, &broker.config, true)
        .map_err(|e| crate::error::storage_error_code(&e))?;
    tracing::info!(topic = name, "auto-created topic");
    Ok(next)
}

/// A broker as Metadata and DescribeCluster list it.
pub struct LiveBroker {
    pub id: i32,
    pub host: String,
    pub port: u16,
    pub rack: Option<String>,
}

/// The brokers clients may use: registered and unfenced, as Kafka's Metadata lists them
/// (this broker alone before its registration is in the image).
pub fn live_brokers(broker: &Broker, image: &MetadataImage) -> Vec<LiveBroker> {
    let mut live: Vec<LiveBroker> = image
        .brokers()
        .filter(|b| !b.fenced)
        .filter_map(|b| {
            let e = b.endpoints.first()?;
            Some(LiveBroker {
                id: b.broker_id,
                host: e.host.clone(),
                port: e.port,
                rack: b.rack.clone(),
            })
        })
        .collect();
    if image.broker(broker.config.node_id).is_none() {
        let (host, port) = &broker.advertised;
        live.push(LiveBroker {
            id: broker.config.node_id,
            host: host.clone(),
            port: *port,
            rack: broker.config.rack.clone(),
        });
    }
    live
}

fn error_topic(name: Option<&str>, topic_id: uuid::Uuid, code: i16) -> MetadataResponseTopic {
    MetadataResponseTopic::default()
        .with_error_code(code)
        .with_name(name.map(topic_name))
        .with_topic_id(topic_id)
        .with_topic_authorized_operations(AUTHORIZED_OPERATIONS_OMITTED)
}

fn topic_response(image: &MetadataImage, t: &TopicImage) -> MetadataResponseTopic {
    // A replica whose broker is fenced or not registered is offline (v5+ field).
    let offline = |b: &i32| image.broker(*b).is_none_or(|r| r.fenced);
    MetadataResponseTopic::default()
        .with_name(Some(topic_name(&t.name)))
        .with_topic_id(t.topic_id)
        .with_is_internal(
            t.name == crate::group_manager::OFFSETS_TOPIC
                || t.name == ferrite_coordinator::txn::TRANSACTION_STATE_TOPIC,
        )
        .with_topic_authorized_operations(AUTHORIZED_OPERATIONS_OMITTED)
        .with_partitions(
            t.partitions
                .values()
                .map(|p| {
                    MetadataResponsePartition::default()
                        .with_partition_index(p.partition)
                        .with_leader_id(BrokerId(p.leader))
                        .with_leader_epoch(p.leader_epoch)
                        .with_replica_nodes(p.replicas.iter().copied().map(BrokerId).collect())
                        .with_isr_nodes(p.isr.iter().copied().map(BrokerId).collect())
                        .with_offline_replicas(
                            p.replicas
                                .iter()
                                .filter(|b| offline(b))
                                .copied()
                                .map(BrokerId)
                                .collect(),
                        )
                        .with_error_code(if p.leader < 0 {
                            ResponseError::LeaderNotAvailable.code()
                        } else {
                            0
                        })
                })
                .collect(),
        )
}

pub fn describe_cluster(
    broker: &Arc<Broker>,
    req: DescribeClusterRequest,
) -> DescribeClusterResponse {
    let operations = if req.include_cluster_authorized_operations {
        CLUSTER_OPERATIONS
    } else {
        AUTHORIZED_OPERATIONS_OMITTED
    };
    let image = broker.controller.image();
    DescribeClusterResponse::default()
        .with_cluster_id(str_bytes(broker.cluster_id.clone()))
        .with_controller_id(BrokerId(
            broker.controller.active_controller_id().unwrap_or(-1),
        ))
        .with_endpoint_type(1) // Brokers; also the v0 default, so every version encodes.
        .with_cluster_authorized_operations(operations)
        .with_brokers(
            live_brokers(broker, &image)
                .into_iter()
                .map(|b| {
                    DescribeClusterBroker::default()
                        .with_broker_id(BrokerId(b.id))
                        .with_host(str_bytes(b.host))
                        .with_port(i32::from(b.port))
                        .with_rack(b.rack.map(str_bytes))
                })
                .collect(),
        )
}
