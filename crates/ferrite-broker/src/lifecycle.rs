//! The broker's lifecycle in the cluster, as KRaft's `BrokerLifecycleManager`: register
//! with the active controller (node id, rack, listener, a new incarnation id per start),
//! then heartbeat every `broker.heartbeat.interval.ms` with the metadata offset applied
//! here; the controller unfences the broker once that offset reaches its registration,
//! and fences it when heartbeats stop for `broker.session.timeout.ms`. Also here: the
//! sender of this broker's AlterPartition requests (ISR changes proposed by the leaders
//! it hosts) and the active controller's clock (`Tick`).

use std::sync::Arc;
use std::time::Duration;

use ferrite_replication::PartitionState;
use kafka_protocol::messages::alter_partition_request::{
    BrokerState as IsrBrokerState, PartitionData, TopicData,
};
use kafka_protocol::messages::broker_registration_request::Listener;
use kafka_protocol::messages::{
    AlterPartitionRequest, BrokerHeartbeatRequest, BrokerId, BrokerRegistrationRequest,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
use tokio::sync::watch;

use crate::controller_rpc::{ControllerChannel, ControllerRequest, ControllerResponse};
use crate::Broker;

/// How often the active controller's clock ticks (fencing of expired sessions, the
/// preferred-leader pass): a fraction of the shortest useful session.
pub const CONTROLLER_TICK_INTERVAL_MS: u64 = 250;
/// Pause before retrying a registration or a call that got no answer.
pub const CONTROLLER_RETRY_BACKOFF_MS: u64 = 100;

/// Pause before an AlterPartition is sent again after no answer or NOT_CONTROLLER.
pub const ALTER_PARTITION_RETRY_BACKOFF_MS: u64 = 500;

/// What this broker knows of its own registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LifecycleState {
    /// The epoch of the current registration (`None`: not registered yet).
    pub broker_epoch: Option<i64>,
    /// As the last heartbeat answer said; a new registration starts fenced.
    pub fenced: bool,
    /// The controller finished this broker's controlled shutdown: it leads nothing and
    /// every active broker has seen that, so it may exit.
    pub should_shut_down: bool,
}

impl LifecycleState {
    pub fn is_ready(&self) -> bool {
        self.broker_epoch.is_some() && !self.fenced
    }
}

fn request_timeout(broker: &Broker) -> Duration {
    // An answer later than half a session is useless: the next heartbeat is due.
    Duration::from_millis((broker.config.broker_session_timeout_ms / 2).max(500))
}

/// Registers, then heartbeats, for as long as the broker lives; re-registers when the
/// controller no longer knows this registration (STALE_BROKER_EPOCH).
pub async fn run(broker: Arc<Broker>, state: watch::Sender<LifecycleState>) {
    let incarnation_id = uuid::Uuid::new_v4();
    let mut channel = ControllerChannel::new(broker.config.listen.ip(), request_timeout(&broker));
    let interval = Duration::from_millis(broker.config.broker_heartbeat_interval_ms);
    let backoff = Duration::from_millis(CONTROLLER_RETRY_BACKOFF_MS);
    let mut applied = broker.controller.quorum().applied();
    loop {
        let broker_epoch = register(&broker, &mut channel, incarnation_id).await;
        state.send_replace(LifecycleState {
            broker_epoch: Some(broker_epoch),
            fenced: true,
            should_shut_down: false,
        });
        let mut last_logged: Option<(bool, i16)> = None;
        loop {
            let current_metadata_offset = broker.controller.applied_offset();
            let want_shut_down = broker
                .shutting_down
                .load(std::sync::atomic::Ordering::Acquire);
            let req = ControllerRequest::Heartbeat(
                BrokerHeartbeatRequest::default()
                    .with_broker_id(BrokerId(broker.config.node_id))
                    .with_broker_epoch(broker_epoch)
                    .with_current_metadata_offset(current_metadata_offset)
                    .with_want_fence(false)
                    .with_want_shut_down(want_shut_down),
            );
            let mut fenced = state.borrow().fenced;
            let mut should_shut_down = false;
            match channel.call(&broker.controller, req).await {
                Ok(ControllerResponse::Heartbeat(r)) => {
                    if r.error_code == ResponseError::StaleBrokerEpoch.code() {
                        tracing::warn!(
                            broker_epoch,
                            "the controller no longer knows this registration; registering again"
                        );
                        break;
                    }
                    if r.error_code == 0 {
                        fenced = r.is_fenced;
                        should_shut_down = r.should_shut_down;
                    }
                    let now = (r.is_fenced, r.error_code);
                    if last_logged != Some(now) {
                        last_logged = Some(now);
                        if r.error_code != 0 {
                            tracing::info!(
                                error_code = r.error_code,
                                "heartbeat refused by the controller"
                            );
                        } else if r.is_fenced {
                            tracing::info!(
                                broker_epoch,
                                current_metadata_offset,
                                caught_up = r.is_caught_up,
                                "broker fenced (waiting to catch up with the metadata log)"
                            );
                        } else {
                            tracing::info!(broker_epoch, "broker unfenced");
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "heartbeat got no answer"),
            }
            state.send_if_modified(|s| {
                let changed = s.fenced != fenced || s.should_shut_down != should_shut_down;
                s.fenced = fenced;
                s.should_shut_down = should_shut_down;
                changed
            });
            if want_shut_down {
                // Shutting down: the controller moves leaderships away; ask often.
                tokio::time::sleep(backoff).await;
            } else if fenced {
                // Unfencing waits for this broker to apply its own registration: ask
                // again as soon as the metadata moves, without waiting a whole interval.
                let _ = tokio::time::timeout(interval.min(backoff * 5), applied.changed()).await;
            } else {
                tokio::time::sleep(interval).await;
            }
        }
    }
}

async fn register(
    broker: &Arc<Broker>,
    channel: &mut ControllerChannel,
    incarnation_id: uuid::Uuid,
) -> i64 {
    let (host, port) = broker.advertised.clone();
    let mut last_error: Option<String> = None;
    loop {
        let req = ControllerRequest::Register(
            BrokerRegistrationRequest::default()
                .with_broker_id(BrokerId(broker.config.node_id))
                .with_cluster_id(StrBytes::from_string(broker.cluster_id.clone()))
                .with_incarnation_id(incarnation_id)
                .with_listeners(vec![Listener::default()
                    .with_name(StrBytes::from_static_str("PLAINTEXT"))
                    .with_host(StrBytes::from_string(host.clone()))
                    .with_port(port)
                    .with_security_protocol(0)])
                .with_rack(broker.config.rack.clone().map(StrBytes::from_string)),
        );
        let error = match channel.call(&broker.controller, req).await {
            Ok(ControllerResponse::Register(r)) if r.error_code == 0 => {
                tracing::info!(broker_epoch = r.broker_epoch, %incarnation_id, "registered with the active controller");
                return r.broker_epoch;
            }
            Ok(ControllerResponse::Register(r))
                if r.error_code == kafka_protocol::ResponseError::InconsistentClusterId.code() =>
            {
                format!(
                    "INCONSISTENT_CLUSTER_ID: the active controller's cluster id is not this data directory's {} (meta.properties): this node's data belongs to another cluster; give it an empty --data-dir, or start every voter with the same cluster.id",
                    broker.cluster_id
                )
            }
            Ok(ControllerResponse::Register(r)) => format!("error code {}", r.error_code),
            Ok(_) => "unexpected answer".to_string(),
            Err(e) => e,
        };
        if last_error.as_ref() != Some(&error) {
            tracing::warn!(error = %error, "broker registration did not succeed yet; retrying");
            last_error = Some(error);
        }
        tokio::time::sleep(Duration::from_millis(CONTROLLER_RETRY_BACKOFF_MS)).await;
    }
}

/// Sends the ISR changes the leaders hosted here propose (AlterPartition, one partition
/// per request, in order) and reports each answer back to the partition.
pub async fn send_alter_partitions(broker: Arc<Broker>, state: watch::Receiver<LifecycleState>) {
    let Some(mut rx) = broker.replicas.take_alter_partition_receiver() else {
        return;
    };
    let mut channel = ControllerChannel::new(broker.config.listen.ip(), request_timeout(&broker));
    while let Some(item) = rx.recv().await {
        // The same request again after a transient error, for as long as the
        // proposal is in flight: it may have been applied, so the partition keeps it
        // (see `alter_partition_refusal_is_definitive`) and only an answer or the
        // metadata log ends it.
        let result = loop {
            let broker_epoch = state.borrow().broker_epoch.unwrap_or(-1);
            let req = ControllerRequest::AlterPartition(
                AlterPartitionRequest::default()
                    .with_broker_id(BrokerId(broker.config.node_id))
                    .with_broker_epoch(broker_epoch)
                    .with_topics(vec![TopicData::default()
                        .with_topic_id(item.topic_id)
                        .with_partitions(vec![PartitionData::default()
                            .with_partition_index(item.partition)
                            .with_leader_epoch(item.proposal.leader_epoch)
                            .with_partition_epoch(item.proposal.partition_epoch)
                            .with_new_isr_with_epochs(
                                item.proposal
                                    .new_isr
                                    .iter()
                                    .map(|m| {
                                        IsrBrokerState::default()
                                            .with_broker_id(BrokerId(m.broker_id))
                                            .with_broker_epoch(m.broker_epoch)
                                    })
                                    .collect(),
                            )])]),
            );
            let result = match channel.call(&broker.controller, req).await {
                Ok(ControllerResponse::AlterPartition(r)) if r.error_code != 0 => Err(r.error_code),
                Ok(ControllerResponse::AlterPartition(r)) => {
                    let p = r
                        .topics
                        .iter()
                        .filter(|t| t.topic_id == item.topic_id)
                        .flat_map(|t| t.partitions.iter())
                        .find(|p| p.partition_index == item.partition);
                    match p {
                        Some(p) if p.error_code != 0 => Err(p.error_code),
                        Some(p) => {
                            let replicas = broker
                                .controller
                                .image()
                                .partition(&item.topic_id, item.partition)
                                .map(|pi| pi.replicas.clone())
                                .unwrap_or_default();
                            Ok(PartitionState {
                                leader_epoch: p.leader_epoch,
                                partition_epoch: p.partition_epoch,
                                replicas,
                                isr: p.isr.iter().map(|b| b.0).collect(),
                            })
                        }
                        None => Err(ResponseError::UnknownServerError.code()),
                    }
                }
                Ok(_) => Err(ResponseError::UnknownServerError.code()),
                Err(e) => {
                    tracing::debug!(error = %e, "AlterPartition got no answer");
                    Err(ResponseError::RequestTimedOut.code())
                }
            };
            match result {
                Err(code)
                    if crate::replica_manager::alter_partition_error_is_transient(code)
                        && broker.replicas.alter_partition_in_flight(&item) =>
                {
                    tracing::debug!(topic = %item.topic, partition = item.partition, error_code = code, "AlterPartition retried");
                    tokio::time::sleep(Duration::from_millis(ALTER_PARTITION_RETRY_BACKOFF_MS))
                        .await;
                }
                result => break result,
            }
        };
        match &result {
            Ok(s) => {
                tracing::info!(topic = %item.topic, partition = item.partition, isr = ?s.isr, partition_epoch = s.partition_epoch, "ISR change committed")
            }
            Err(code) => {
                tracing::info!(topic = %item.topic, partition = item.partition, error_code = code, "ISR change refused")
            }
        }
        broker.replicas.alter_partition_done(&item, result);
    }
}

/// Controlled shutdown (SIGTERM), as Kafka's: heartbeats ask to shut down, the
/// controller moves every leadership this broker holds to another in-sync replica, and
/// answers `ShouldShutDown` once every active broker has seen that; then the broker may
/// stop. Bounded by `broker.session.timeout.ms` (after that the broker stops anyway and
/// the controller fences it when its session expires). Nothing to move when no other
/// broker is unfenced (one node): it returns at once.
pub async fn controlled_shutdown(broker: &Broker) {
    let image = broker.controller.image();
    let others = image
        .brokers()
        .any(|b| b.broker_id != broker.config.node_id && b.is_active());
    if !others || broker.lifecycle.borrow().broker_epoch.is_none() {
        return;
    }
    broker
        .shutting_down
        .store(true, std::sync::atomic::Ordering::Release);
    let mut state = broker.lifecycle.clone();
    let limit = Duration::from_millis(broker.config.broker_session_timeout_ms);
    let started = std::time::Instant::now();
    let done = tokio::time::timeout(limit, state.wait_for(|s| s.should_shut_down))
        .await
        .is_ok_and(|r| r.is_ok());
    match done {
        true => tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "controlled shutdown complete: leaderships moved"
        ),
        false => tracing::warn!(
            timeout_ms = broker.config.broker_session_timeout_ms,
            "controlled shutdown did not complete in time; stopping anyway"
        ),
    }
}

/// The active controller's clock: every `CONTROLLER_TICK_INTERVAL_MS` a `Tick` (fences
/// brokers whose session expired, moves leadership back to preferred replicas).
pub async fn tick(broker: std::sync::Weak<Broker>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(CONTROLLER_TICK_INTERVAL_MS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut active_since: Option<i64> = None;
    let mut last_tick_ms: Option<i64> = None;
    loop {
        ticker.tick().await;
        let Some(broker) = broker.upgrade() else {
            return;
        };
        if !broker.controller.quorum().status().is_active_controller {
            active_since = None;
            last_tick_ms = None;
            continue;
        }
        let since = *active_since.get_or_insert_with(crate::now_ms);
        if broker
            .controller
            .image()
            .topic(crate::group_manager::OFFSETS_TOPIC)
            .is_none()
        {
            // Kafka creates it on the first FindCoordinator; here once as many brokers
            // as it wants replicas (at most one per voter) registered, or a session
            // after this controller became active, whichever is first.
            let image = broker.controller.image();
            let usable = image.brokers().filter(|b| b.is_active()).count();
            let wanted = usize::try_from(broker.config.offsets_topic_replication_factor)
                .unwrap_or(1)
                .min(broker.controller.quorum().voters().len());
            let waited = crate::now_ms() - since
                > i64::try_from(broker.config.broker_session_timeout_ms).unwrap_or(i64::MAX);
            if usable > 0 && (usable >= wanted || waited) {
                if let Err(e) = crate::ensure_offsets_topic(&broker).await {
                    tracing::warn!(error = %e, "cannot create the offsets topic yet");
                }
            }
        }
        let mut writer = broker.controller.writer().await;
        let now = crate::now_ms();
        let session = i64::try_from(broker.config.broker_session_timeout_ms).unwrap_or(i64::MAX);
        if last_tick_ms.is_some_and(|t| now - t > session / 2) {
            // The controller itself stalled (a long admin change held its lock):
            // heartbeats waited behind it, so sessions start again rather than expire.
            tracing::info!(
                stalled_ms = now - last_tick_ms.unwrap_or(now),
                "controller tick delayed; broker sessions restart"
            );
            writer.abandon();
        }
        last_tick_ms = Some(now);
        if let Err(e) = writer.handle(ferrite_controller::Event::Tick).await {
            tracing::debug!(error = %e, "controller tick not committed");
        }
    }
}
