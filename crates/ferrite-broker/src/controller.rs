//! The broker's side of the metadata quorum: admin changes are validated into records
//! on the active controller, committed through the quorum (`ferrite_raft`), and the
//! image this node serves is always the quorum's committed, applied image. The same
//! `MetadataImage::apply` folds the records here, in every other voter and at start-up.

use std::collections::BTreeMap;
use std::sync::Arc;

use ferrite_metadata::{assign_replicas, BrokerSlot, MetadataImage, MetadataRecord};
use ferrite_raft::{MetadataQuorum, QuorumError};
use kafka_protocol::ResponseError;
use uuid::Uuid;

use crate::config::{apply_topic_config, limits, validate_topic_name, BrokerConfig};
use crate::error::{config_error_code, placement_error_code};

pub struct Controller {
    quorum: Arc<MetadataQuorum>,
    /// Serializes decide-and-commit on this node (two concurrent CreateTopics of one
    /// name cannot both pass validation), and the metadata follower's reconcile with a
    /// handler's own install of the partitions it just created.
    lock: tokio::sync::Mutex<()>,
}

/// An admin request's failure: Kafka error code and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminError {
    pub code: i16,
    pub message: String,
}

impl AdminError {
    pub fn new(e: ResponseError, message: impl Into<String>) -> Self {
        AdminError {
            code: e.code(),
            message: message.into(),
        }
    }
}

impl Controller {
    pub fn new(quorum: Arc<MetadataQuorum>) -> Controller {
        Controller {
            quorum,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The image that replaying `entries` gives, the same fold as at commit.
    pub fn replay(entries: &[Vec<MetadataRecord>]) -> MetadataImage {
        let mut image = MetadataImage::default();
        for entry in entries {
            image.apply_all(entry);
        }
        image
    }

    pub fn quorum(&self) -> &Arc<MetadataQuorum> {
        &self.quorum
    }

    /// The committed image as applied on this node.
    pub fn image(&self) -> Arc<MetadataImage> {
        self.quorum.applied().borrow().image.clone()
    }

    /// The active controller's node id, as far as this node knows.
    pub fn active_controller_id(&self) -> Option<i32> {
        self.quorum
            .status()
            .leader_id
            .and_then(|id| i32::try_from(id).ok())
    }

    /// Takes the single-writer lock. On the active controller it first waits until its
    /// image holds every committed change (a new leader may lag the log it inherited),
    /// so that validation sees what the quorum has. On another node the image is this
    /// node's applied one and a commit is refused with NOT_CONTROLLER.
    pub async fn writer(&self) -> MetadataWriter<'_> {
        let guard = self.lock.lock().await;
        if self.quorum.status().is_active_controller {
            if let Err(e) = self.quorum.read_barrier().await {
                tracing::debug!(error = %e, "metadata read barrier failed; the commit will be refused");
            }
        }
        MetadataWriter {
            _guard: guard,
            controller: self,
        }
    }

    /// The lock alone, for the metadata follower (no barrier: it only reads).
    pub(crate) async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lock.lock().await
    }
}

pub struct MetadataWriter<'a> {
    _guard: tokio::sync::MutexGuard<'a, ()>,
    controller: &'a Controller,
}

impl MetadataWriter<'_> {
    pub fn image(&self) -> Arc<MetadataImage> {
        self.controller.image()
    }

    /// The image `records` would give, without committing them.
    pub fn preview(&self, records: &[MetadataRecord]) -> MetadataImage {
        let mut next = (*self.image()).clone();
        next.apply_all(records);
        next
    }

    /// Commits one change through the quorum (acknowledged by a majority of voters) and
    /// returns the applied image that includes it. Only the active controller decides:
    /// elsewhere this is `NotController` (the client retries at the controller Metadata
    /// names). `Timeout` means the outcome is unknown.
    pub async fn commit(
        &mut self,
        records: Vec<MetadataRecord>,
    ) -> Result<Arc<MetadataImage>, QuorumError> {
        let quorum = &self.controller.quorum;
        let status = quorum.status();
        if !status.is_active_controller {
            return Err(QuorumError::NotController {
                leader: status.leader_id,
            });
        }
        let index = quorum.write(records).await?;
        let applied = quorum.wait_applied(index, quorum.write_timeout()).await?;
        Ok(applied.image)
    }
}

/// Validates topic configs; returns them normalised (trimmed, nulls dropped).
pub fn validate_topic_configs(
    config: &BrokerConfig,
    configs: impl IntoIterator<Item = (String, Option<String>)>,
) -> Result<BTreeMap<String, String>, AdminError> {
    let mut probe = config.log_defaults.clone();
    let mut out = BTreeMap::new();
    for (key, value) in configs {
        let Some(value) = value else {
            return Err(AdminError::new(
                ResponseError::InvalidConfig,
                format!("null value for config `{key}`"),
            ));
        };
        apply_topic_config(&mut probe, &key, &value).map_err(|e| AdminError {
            code: config_error_code(&e),
            message: e.to_string(),
        })?;
        out.insert(key, value.trim().to_string());
    }
    Ok(out)
}

/// The records that create a topic, after every check Kafka makes.
pub fn create_topic_records(
    config: &BrokerConfig,
    image: &MetadataImage,
    name: &str,
    num_partitions: i32,
    replication_factor: i16,
    manual_assignment: Option<Vec<Vec<i32>>>,
    configs: BTreeMap<String, String>,
) -> Result<(Uuid, Vec<MetadataRecord>, i32, i16), AdminError> {
    validate_topic_name(name)
        .map_err(|m| AdminError::new(ResponseError::InvalidTopicException, m))?;
    if image.topic(name).is_some() {
        return Err(AdminError::new(
            ResponseError::TopicAlreadyExists,
            format!("topic `{name}` already exists"),
        ));
    }
    // As Kafka: '.' and '_' map to the same metric names, so names differing only there
    // collide.
    let metric_name = |n: &str| n.replace('.', "_");
    if let Some(other) = image
        .topics()
        .find(|t| metric_name(&t.name) == metric_name(name))
    {
        return Err(AdminError::new(
            ResponseError::InvalidTopicException,
            format!(
                "topic `{name}` collides with existing topic `{}`",
                other.name
            ),
        ));
    }
    let brokers = [BrokerSlot {
        node_id: config.node_id,
        rack: config.rack.clone(),
    }];
    let assignment = match manual_assignment {
        Some(a) => {
            if num_partitions != -1 || replication_factor != -1 {
                return Err(AdminError::new(
                    ResponseError::InvalidRequest,
                    "both replica assignments and partition count or replication factor were given",
                ));
            }
            validate_manual_assignment(&a, &brokers, 0)?;
            a
        }
        None => {
            let partitions = if num_partitions == -1 {
                config.num_partitions
            } else {
                num_partitions
            };
            let rf = if replication_factor == -1 {
                config.default_replication_factor
            } else {
                replication_factor
            };
            if partitions < 1 {
                return Err(AdminError::new(
                    ResponseError::InvalidPartitions,
                    "number of partitions must be at least 1",
                ));
            }
            if partitions > limits::TOPIC_PARTITIONS_CREATED_MAX {
                return Err(AdminError::new(
                    ResponseError::InvalidPartitions,
                    format!(
                        "at most {} partitions per request",
                        limits::TOPIC_PARTITIONS_CREATED_MAX
                    ),
                ));
            }
            if rf < 1 {
                return Err(AdminError::new(
                    ResponseError::InvalidReplicationFactor,
                    "replication factor must be at least 1",
                ));
            }
            // Kafka picks the start of the round-robin at random so that leaders of many
            // topics spread over the brokers.
            let start_index = rand::random::<u32>() as usize % brokers.len();
            assign_replicas(&brokers, 0, partitions, i32::from(rf), start_index).map_err(|e| {
                AdminError {
                    code: placement_error_code(&e),
                    message: e.to_string(),
                }
            })?
        }
    };
    let topic_id = Uuid::new_v4();
    let mut records = vec![MetadataRecord::Topic {
        name: name.to_string(),
        topic_id,
    }];
    let partitions = assignment.len() as i32;
    let rf = assignment.first().map_or(0, Vec::len) as i16;
    records.extend(partition_records(topic_id, 0, assignment));
    records.extend(
        configs
            .into_iter()
            .map(|(key, value)| MetadataRecord::TopicConfig {
                topic_id,
                key,
                value: Some(value),
            }),
    );
    Ok((topic_id, records, partitions, rf))
}

pub fn partition_records(
    topic_id: Uuid,
    first: i32,
    assignment: Vec<Vec<i32>>,
) -> Vec<MetadataRecord> {
    assignment
        .into_iter()
        .enumerate()
        .map(|(i, replicas)| MetadataRecord::Partition {
            topic_id,
            partition: first + i as i32,
            leader: replicas.first().copied().unwrap_or(-1),
            isr: replicas.clone(),
            replicas,
            leader_epoch: 0,
            partition_epoch: 0,
        })
        .collect()
}

pub fn validate_manual_assignment(
    a: &[Vec<i32>],
    brokers: &[BrokerSlot],
    _first: i32,
) -> Result<(), AdminError> {
    let bad = |m: String| AdminError::new(ResponseError::InvalidReplicaAssignment, m);
    if a.is_empty() {
        return Err(bad("empty replica assignment".into()));
    }
    if a.len() > limits::TOPIC_PARTITIONS_CREATED_MAX as usize {
        return Err(AdminError::new(
            ResponseError::InvalidPartitions,
            "too many partitions in one request",
        ));
    }
    let rf = a.first().map_or(0, Vec::len);
    for replicas in a {
        if replicas.is_empty() || replicas.len() != rf {
            return Err(bad(
                "every partition needs the same, non-zero number of replicas".into(),
            ));
        }
        for (i, b) in replicas.iter().enumerate() {
            if !brokers.iter().any(|s| s.node_id == *b) {
                return Err(bad(format!("broker {b} does not exist")));
            }
            if replicas.iter().skip(i + 1).any(|o| o == b) {
                return Err(bad(format!(
                    "broker {b} appears twice in one partition's replicas"
                )));
            }
        }
    }
    Ok(())
}
