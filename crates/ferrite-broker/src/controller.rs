//! The broker's side of the metadata quorum: admin changes are validated into records
//! on the active controller, committed through the quorum (`ferrite_raft`), and the
//! image this node serves is always the quorum's committed, applied image. The same
//! `MetadataImage::apply` folds the records here, in every other voter and at start-up.

use std::collections::BTreeMap;
use std::sync::Arc;

use ferrite_controller::{ControllerConfig, Event, Output, Reply};
use ferrite_metadata::{MetadataImage, MetadataRecord};
use ferrite_raft::{MetadataQuorum, QuorumError};
use kafka_protocol::ResponseError;

use crate::config::{apply_topic_config, BrokerConfig};
use crate::error::config_error_code;

pub struct Controller {
    quorum: Arc<MetadataQuorum>,
    config: ControllerConfig,
    /// Serializes decide-and-commit on this node (two concurrent CreateTopics of one
    /// name cannot both pass validation), and the metadata follower's reconcile with a
    /// handler's own install of the partitions it just created. Holds the active
    /// controller's state machine while this node is the active controller.
    lock: tokio::sync::Mutex<Active>,
}

/// The sans-I/O KRaft controller (`ferrite_controller::Controller`) of this node while
/// it is the active controller: built from the committed image when first needed in a
/// leader epoch, dropped when a write of its records fails or something else was
/// appended (its image would no longer be the log's), rebuilt at the next event.
#[derive(Default)]
pub struct Active {
    state: Option<ActiveState>,
}

struct ActiveState {
    /// The Raft term it was built in: a new term (even on this node) rebuilds it.
    leader_epoch: u64,
    controller: ferrite_controller::Controller,
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

impl From<QuorumError> for AdminError {
    fn from(e: QuorumError) -> Self {
        AdminError {
            code: crate::error::quorum_error_code(&e),
            message: e.to_string(),
        }
    }
}

impl From<ferrite_controller::ControllerError> for AdminError {
    fn from(e: ferrite_controller::ControllerError) -> Self {
        AdminError {
            code: crate::error::controller_error_code(&e),
            message: e.to_string(),
        }
    }
}

/// The controller settings of a broker's configuration (Kafka's names). Registrations
/// are checked against `cluster_id`, this node's (INCONSISTENT_CLUSTER_ID otherwise):
/// voters of one quorum derive the same one (see `cluster.id`).
pub fn controller_config(config: &BrokerConfig, cluster_id: &str) -> ControllerConfig {
    ControllerConfig {
        cluster_id: Some(cluster_id.to_string()),
        broker_session_timeout_ms: i64::try_from(config.broker_session_timeout_ms)
            .unwrap_or(i64::MAX),
        auto_leader_rebalance_enable: config.auto_leader_rebalance_enable,
        leader_imbalance_check_interval_ms: config
            .leader_imbalance_check_interval_seconds
            .saturating_mul(1000),
        unclean_leader_election_enable: false,
        num_partitions: config.num_partitions,
        default_replication_factor: config.default_replication_factor,
        offsets_topic_replication_factor: config.offsets_topic_replication_factor,
        transaction_state_log_replication_factor: config.transaction_state_log_replication_factor,
        transaction_state_log_min_isr: config.transaction_state_log_min_isr,
    }
}

impl Controller {
    pub fn new(quorum: Arc<MetadataQuorum>) -> Controller {
        Self::with_config(quorum, ControllerConfig::default())
    }

    pub fn with_config(quorum: Arc<MetadataQuorum>, config: ControllerConfig) -> Controller {
        Controller {
            quorum,
            config,
            lock: tokio::sync::Mutex::new(Active::default()),
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

    /// The offset (in metadata log entries, KRaft's offsets: the image's version counts
    /// them) of the last entry this node applied; -1 before any.
    pub fn applied_offset(&self) -> i64 {
        i64::try_from(self.image().version).unwrap_or(i64::MAX) - 1
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
            guard,
            controller: self,
        }
    }

    /// The lock alone, for the metadata follower (no barrier: it only reads).
    pub(crate) async fn lock(&self) -> tokio::sync::MutexGuard<'_, Active> {
        self.lock.lock().await
    }

    /// One event through the active controller, committed before the reply is returned.
    pub async fn handle(&self, event: Event) -> Result<Reply, QuorumError> {
        let mut writer = self.writer().await;
        let (reply, _) = writer.handle(event).await?;
        Ok(reply)
    }
}

pub struct MetadataWriter<'a> {
    guard: tokio::sync::MutexGuard<'a, Active>,
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
        // The state machine's image no longer matches the log after this: rebuilt at
        // the next decision (`decide` sees the version moved).
        let index = quorum.write(records).await?;
        let applied = quorum.wait_applied(index, quorum.write_timeout()).await?;
        Ok(applied.image)
    }

    /// Decides `event` on the active controller's state machine, built from the
    /// committed image when there is none for this leader epoch or its image is not the
    /// applied one. The records are applied to its image but not committed: call
    /// [`MetadataWriter::commit_decided`] with them, or [`MetadataWriter::abandon`].
    pub fn decide(&mut self, event: Event) -> Result<Output<Reply>, QuorumError> {
        let status = self.controller.quorum.status();
        if !status.is_active_controller {
            return Err(QuorumError::NotController {
                leader: status.leader_id,
            });
        }
        let image = self.image();
        let next_offset = i64::try_from(image.version).unwrap_or(i64::MAX);
        let now = crate::now_ms();
        let stale = self.guard.state.as_ref().is_none_or(|a| {
            a.leader_epoch != status.leader_epoch || a.controller.next_offset() != next_offset
        });
        if stale {
            tracing::info!(
                leader_epoch = status.leader_epoch,
                next_offset,
                "active controller: building the controller state from the committed image"
            );
            self.guard.state = Some(ActiveState {
                leader_epoch: status.leader_epoch,
                controller: ferrite_controller::Controller::new(
                    self.controller.config.clone(),
                    (*image).clone(),
                    next_offset,
                    now,
                    rand::random::<u64>(),
                ),
            });
        }
        let Some(active) = self.guard.state.as_mut() else {
            return Err(QuorumError::Stopped("no controller state".into()));
        };
        Ok(active.controller.handle(event, now))
    }

    /// The image after the last decision (the records not yet committed).
    pub fn decided_image(&self) -> Option<&MetadataImage> {
        self.guard.state.as_ref().map(|a| a.controller.image())
    }

    /// Drops the state machine: its last decision will not be committed.
    pub fn abandon(&mut self) {
        self.guard.state = None;
    }

    /// Commits the records of the last decision as one entry at `offset`. On any
    /// failure the state machine is dropped (its image is ahead of the log).
    pub async fn commit_decided(
        &mut self,
        records: Vec<MetadataRecord>,
        offset: Option<i64>,
    ) -> Result<Arc<MetadataImage>, QuorumError> {
        if records.is_empty() {
            return Ok(self.image());
        }
        match self.commit(records).await {
            Ok(image) => {
                let at = i64::try_from(image.version).unwrap_or(i64::MAX) - 1;
                if offset.is_some_and(|o| o != at) && image.version > 0 {
                    // Something else was appended in between (cannot happen while this
                    // node holds the lock as the only writer; rebuilt to be safe).
                    tracing::warn!(
                        expected = ?offset,
                        applied = at,
                        "metadata entry landed at another offset than the controller predicted"
                    );
                    self.guard.state = None;
                }
                Ok(image)
            }
            Err(e) => {
                self.guard.state = None;
                Err(e)
            }
        }
    }

    /// Decides and commits one event; the reply and the image that includes it.
    pub async fn handle(
        &mut self,
        event: Event,
    ) -> Result<(Reply, Arc<MetadataImage>), QuorumError> {
        let out = self.decide(event)?;
        let image = self.commit_decided(out.records, out.offset).await?;
        Ok((out.reply, image))
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
