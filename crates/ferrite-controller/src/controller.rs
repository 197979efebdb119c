//! The controller: Kafka's QuorumController logic over the metadata image, with time and
//! randomness as inputs. Every change it decides is a list of records; it applies them
//! to its own image with the same `MetadataImage::apply` that replays the log, so its
//! state is exactly the fold of the records it emitted (plus the brokers' sessions, soft
//! state rebuilt on activation, as Kafka's `BrokerHeartbeatManager`).

use std::collections::{BTreeMap, BTreeSet};

use ferrite_metadata::{
    assign_replicas, BrokerSlot, MetadataImage, MetadataRecord, PartitionImage, PlacementError,
    NO_LEADER,
};
use uuid::Uuid;

use crate::api::*;
use crate::config::{
    ControllerConfig, ELECTIONS_PER_REBALANCE_MAX, INTERNAL_TOPICS, MIN_INSYNC_REPLICAS,
    PARTITIONS_CREATED_MAX, PARTITIONS_REASSIGNED_MAX, TOPIC_NAME_BYTES_MAX,
    TRANSACTION_STATE_TOPIC, UNCLEAN_LEADER_ELECTION_ENABLE,
};
use crate::election::{partition_change, ChangeRequest, Election, ReplicaSet};
use crate::error::ControllerError;

/// What the controller knows of a broker's session beyond the records (soft state).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Session {
    last_contact_ms: i64,
    /// False for a session inherited at activation: this controller has not heard from
    /// the broker yet. Such a session still times out, but does not block a new
    /// incarnation from registering (a restarted node's own broker, after a crash).
    heard_from: bool,
    /// The metadata offset of the broker's last heartbeat (-1: none yet).
    metadata_offset: i64,
    /// The offset of the entry that started its controlled shutdown.
    controlled_shutdown_offset: Option<i64>,
}

/// Kafka's `BrokerControlState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BrokerState {
    Fenced,
    Unfenced,
    ControlledShutdown,
    ShutdownNow,
}

/// The active controller's state machine. Build one when this node becomes the active
/// controller ([`Controller::new`] over the committed image) and drop it when it stops
/// being active or when appending its records fails: it has applied what it emitted, so
/// a lost append means its image is ahead of the log.
#[derive(Debug, Clone)]
pub struct Controller {
    config: ControllerConfig,
    image: MetadataImage,
    /// The offset the next emitted entry will get in the metadata log. Each non-empty
    /// [`Output`] is one entry and takes the next offset: the caller must append every
    /// output, in order, as exactly one log entry each, and nothing else while active.
    next_offset: i64,
    sessions: BTreeMap<i32, Session>,
    next_rebalance_ms: i64,
    /// splitmix64 state: placement start indexes and topic ids.
    rng: u64,
}

impl Controller {
    /// A controller over `image`, the fold of the committed log whose next entry will be
    /// at `next_offset`. Every unfenced broker gets a fresh session starting `now_ms`
    /// (it has had no chance to heartbeat to this controller). `seed` drives topic ids
    /// and placement; in production it must come from OS randomness, so that two
    /// controllers never draw the same topic ids.
    pub fn new(
        config: ControllerConfig,
        image: MetadataImage,
        next_offset: i64,
        now_ms: i64,
        seed: u64,
    ) -> Controller {
        let sessions = image
            .brokers()
            .map(|b| {
                (
                    b.broker_id,
                    Session {
                        last_contact_ms: now_ms,
                        heard_from: false,
                        metadata_offset: -1,
                        // At most the last committed offset: conservative for the
                        // "every active broker has seen it" check.
                        controlled_shutdown_offset: b
                            .in_controlled_shutdown
                            .then_some(next_offset - 1),
                    },
                )
            })
            .collect();
        let next_rebalance_ms = now_ms.saturating_add(config.leader_imbalance_check_interval_ms);
        Controller {
            config,
            image,
            next_offset,
            sessions,
            next_rebalance_ms,
            rng: seed,
        }
    }

    pub fn image(&self) -> &MetadataImage {
        &self.image
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// The offset the next non-empty output will be appended at.
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// One event in, one reply and the records to append out.
    pub fn handle(&mut self, event: Event, now_ms: i64) -> Output<Reply> {
        fn map<T>(o: Output<T>, f: impl FnOnce(T) -> Reply) -> Output<Reply> {
            Output {
                reply: f(o.reply),
                records: o.records,
                offset: o.offset,
            }
        }
        match event {
            Event::RegisterBroker(r) => map(self.register_broker(r, now_ms), Reply::RegisterBroker),
            Event::Heartbeat(h) => map(self.heartbeat(h, now_ms), Reply::Heartbeat),
            Event::UnregisterBroker { broker_id } => {
                map(self.unregister_broker(broker_id), Reply::UnregisterBroker)
            }
            Event::AlterPartition(r) => map(self.alter_partition(r), Reply::AlterPartition),
            Event::CreateTopics(r) => map(self.create_topics(r), Reply::CreateTopics),
            Event::CreatePartitions(r) => map(self.create_partitions(r), Reply::CreatePartitions),
            Event::ElectLeaders(r) => map(self.elect_leaders(r), Reply::ElectLeaders),
            Event::AlterPartitionReassignments(r) => map(
                self.alter_partition_reassignments(r),
                Reply::AlterPartitionReassignments,
            ),
            Event::Tick => map(self.tick(now_ms), |()| Reply::Tick),
        }
    }

    // ---- broker lifecycle ----

    /// BrokerRegistration. A new registration starts fenced with the epoch of its own
    /// log entry; it replaces an older one unless that one's session is alive with
    /// another incarnation (DUPLICATE_BROKER_REGISTRATION: two processes with one id,
    /// or a restart before the old session expired).
    pub fn register_broker(
        &mut self,
        req: BrokerRegistration,
        now_ms: i64,
    ) -> Output<Result<BrokerRegistrationReply, ControllerError>> {
        if req.broker_id < 0 {
            return self.refuse(ControllerError::InvalidRequest(format!(
                "broker id {} is negative",
                req.broker_id
            )));
        }
        if let Some(cluster_id) = &self.config.cluster_id {
            if *cluster_id != req.cluster_id {
                return self.refuse(ControllerError::InconsistentClusterId(format!(
                    "cluster id `{}` does not match this cluster's `{cluster_id}`",
                    req.cluster_id
                )));
            }
        }
        if let Some(existing) = self.image.broker(req.broker_id) {
            if existing.incarnation_id != req.incarnation_id
                && self.has_live_session(req.broker_id, now_ms)
            {
                return self.refuse(ControllerError::DuplicateBrokerRegistration(format!(
                    "broker {} is registered with another incarnation whose session has not \
                     expired; retry after broker.session.timeout.ms ({} ms)",
                    req.broker_id, self.config.broker_session_timeout_ms
                )));
            }
        }
        let mut records = Vec::new();
        // The new incarnation starts fenced, so whatever the old one led moves now; it
        // is also out of every ISR until it catches up (the last member excepted).
        self.remove_from_partitions(req.broker_id, &mut records);
        let broker_epoch = self.next_offset;
        self.emit(
            &mut records,
            MetadataRecord::RegisterBroker {
                broker_id: req.broker_id,
                incarnation_id: req.incarnation_id,
                broker_epoch,
                endpoints: req.listeners,
                rack: req.rack,
                fenced: true,
            },
        );
        self.sessions.insert(
            req.broker_id,
            Session {
                last_contact_ms: now_ms,
                heard_from: true,
                metadata_offset: -1,
                controlled_shutdown_offset: None,
            },
        );
        self.finish(Ok(BrokerRegistrationReply { broker_epoch }), records)
    }

    /// BrokerHeartbeat: renews the session and moves the broker through Kafka's states
    /// (fenced → unfenced once caught up; controlled shutdown → shut down once it leads
    /// nothing and every active broker has seen that).
    pub fn heartbeat(
        &mut self,
        hb: BrokerHeartbeat,
        now_ms: i64,
    ) -> Output<Result<BrokerHeartbeatReply, ControllerError>> {
        let reg = match self.image.broker(hb.broker_id) {
            Some(b) if b.broker_epoch == hb.broker_epoch => b.clone(),
            Some(b) => {
                return self.refuse(ControllerError::StaleBrokerEpoch(format!(
                    "broker {} has epoch {}, not {}",
                    hb.broker_id, b.broker_epoch, hb.broker_epoch
                )))
            }
            None => {
                return self.refuse(ControllerError::StaleBrokerEpoch(format!(
                    "broker {} is not registered",
                    hb.broker_id
                )))
            }
        };
        let is_caught_up = hb.current_metadata_offset >= reg.broker_epoch;
        let current = if reg.fenced {
            BrokerState::Fenced
        } else if reg.in_controlled_shutdown {
            BrokerState::ControlledShutdown
        } else {
            BrokerState::Unfenced
        };
        let next = match current {
            BrokerState::Fenced | BrokerState::ShutdownNow => {
                if hb.want_shut_down {
                    BrokerState::ShutdownNow
                } else if !hb.want_fence && is_caught_up {
                    BrokerState::Unfenced
                } else {
                    BrokerState::Fenced
                }
            }
            BrokerState::Unfenced => {
                if hb.want_fence {
                    if hb.want_shut_down {
                        BrokerState::ShutdownNow
                    } else {
                        BrokerState::Fenced
                    }
                } else if hb.want_shut_down {
                    if self.has_leaderships(hb.broker_id) {
                        BrokerState::ControlledShutdown
                    } else {
                        BrokerState::ShutdownNow
                    }
                } else {
                    BrokerState::Unfenced
                }
            }
            BrokerState::ControlledShutdown => {
                let offset = self
                    .sessions
                    .get(&hb.broker_id)
                    .and_then(|s| s.controlled_shutdown_offset)
                    .unwrap_or(self.next_offset - 1);
                if self.has_leaderships(hb.broker_id) || offset > self.lowest_active_offset() {
                    BrokerState::ControlledShutdown
                } else {
                    BrokerState::ShutdownNow
                }
            }
        };
        let mut records = Vec::new();
        let mut controlled_shutdown_offset = None;
        if next != current {
            match next {
                BrokerState::Fenced | BrokerState::ShutdownNow => {
                    self.fence(hb.broker_id, &mut records)
                }
                BrokerState::Unfenced => self.unfence(hb.broker_id, reg.broker_epoch, &mut records),
                BrokerState::ControlledShutdown => {
                    self.emit(
                        &mut records,
                        MetadataRecord::BrokerRegistrationChange {
                            broker_id: hb.broker_id,
                            broker_epoch: reg.broker_epoch,
                            fenced: None,
                            in_controlled_shutdown: Some(true),
                        },
                    );
                    self.remove_from_partitions(hb.broker_id, &mut records);
                    controlled_shutdown_offset = Some(self.next_offset);
                }
            }
        }
        let session = self.sessions.entry(hb.broker_id).or_insert(Session {
            last_contact_ms: now_ms,
            heard_from: true,
            metadata_offset: -1,
            controlled_shutdown_offset: None,
        });
        session.last_contact_ms = now_ms;
        session.heard_from = true;
        session.metadata_offset = hb.current_metadata_offset;
        if controlled_shutdown_offset.is_some() {
            session.controlled_shutdown_offset = controlled_shutdown_offset;
        }
        let reply = BrokerHeartbeatReply {
            is_caught_up,
            is_fenced: matches!(next, BrokerState::Fenced | BrokerState::ShutdownNow),
            in_controlled_shutdown: next == BrokerState::ControlledShutdown,
            should_shut_down: next == BrokerState::ShutdownNow,
        };
        self.finish(Ok(reply), records)
    }

    /// UnregisterBroker: the broker leaves every ISR (the last member excepted) and its
    /// registration goes.
    pub fn unregister_broker(&mut self, broker_id: i32) -> Output<Result<(), ControllerError>> {
        let Some(epoch) = self.image.broker(broker_id).map(|b| b.broker_epoch) else {
            return self.refuse(ControllerError::BrokerIdNotRegistered(format!(
                "broker {broker_id} is not registered"
            )));
        };
        let mut records = Vec::new();
        self.remove_from_partitions(broker_id, &mut records);
        self.emit(
            &mut records,
            MetadataRecord::UnregisterBroker {
                broker_id,
                broker_epoch: epoch,
            },
        );
        self.sessions.remove(&broker_id);
        self.finish(Ok(()), records)
    }

    /// Time passed: fences every broker whose session expired (oldest first, each seeing
    /// the previous one's effect), then runs a preferred-leader pass when one is due.
    pub fn tick(&mut self, now_ms: i64) -> Output<()> {
        let mut records = Vec::new();
        let timeout = self.config.broker_session_timeout_ms;
        let mut stale: Vec<(i64, i32)> = self
            .image
            .brokers()
            .filter(|b| !b.fenced)
            .filter_map(|b| {
                let last = self
                    .sessions
                    .get(&b.broker_id)
                    .map_or(i64::MIN, |s| s.last_contact_ms);
                (now_ms > last.saturating_add(timeout)).then_some((last, b.broker_id))
            })
            .collect();
        stale.sort_unstable();
        for (_, broker_id) in stale {
            self.fence(broker_id, &mut records);
        }
        if self.config.auto_leader_rebalance_enable && now_ms >= self.next_rebalance_ms {
            let elected = self.rebalance_leaders(&mut records);
            self.next_rebalance_ms = if elected >= ELECTIONS_PER_REBALANCE_MAX {
                now_ms
            } else {
                now_ms.saturating_add(self.config.leader_imbalance_check_interval_ms)
            };
        }
        self.finish((), records)
    }

    // ---- partitions ----

    /// AlterPartition from a partition leader (KIP-497, KIP-903 for the ISR members'
    /// broker epochs), validated in Kafka's order.
    pub fn alter_partition(
        &mut self,
        req: AlterPartition,
    ) -> Output<Result<Vec<AlterPartitionResult>, ControllerError>> {
        match self.image.broker(req.broker_id) {
            Some(b) if b.broker_epoch == req.broker_epoch => {}
            _ => {
                return self.refuse(ControllerError::StaleBrokerEpoch(format!(
                    "broker {} with epoch {} is not registered",
                    req.broker_id, req.broker_epoch
                )))
            }
        }
        let mut records = Vec::new();
        let mut results = Vec::new();
        for topic in req.topics {
            for data in topic.partitions {
                let result = self
                    .validate_alter_partition(req.broker_id, topic.topic_id, &data)
                    .map(|p| {
                        let target: Vec<i32> = data.new_isr.iter().map(|m| m.broker_id).collect();
                        let change = ChangeRequest {
                            remove: None,
                            target_isr: Some(target),
                            target_replicas: None,
                            election: Election::Online,
                        };
                        if let Some(r) = partition_change(&self.image, topic.topic_id, &p, &change)
                        {
                            self.emit(&mut records, r);
                        }
                        let p = self
                            .image
                            .partition(&topic.topic_id, data.partition)
                            .unwrap_or(&p);
                        PartitionState {
                            leader: p.leader,
                            leader_epoch: p.leader_epoch,
                            isr: p.isr.clone(),
                            partition_epoch: p.partition_epoch,
                        }
                    });
                results.push(AlterPartitionResult {
                    topic_id: topic.topic_id,
                    partition: data.partition,
                    result,
                });
            }
        }
        self.finish(Ok(results), records)
    }

    fn validate_alter_partition(
        &self,
        broker_id: i32,
        topic_id: Uuid,
        data: &AlterPartitionData,
    ) -> Result<PartitionImage, ControllerError> {
        let topic = self.image.topic_by_id(&topic_id).ok_or_else(|| {
            ControllerError::UnknownTopicId(format!("no topic with id {topic_id}"))
        })?;
        let p = topic.partitions.get(&data.partition).ok_or_else(|| {
            ControllerError::UnknownTopicOrPartition(format!(
                "no partition {}-{}",
                topic.name, data.partition
            ))
        })?;
        let at = || format!("{}-{}", topic.name, data.partition);
        // A sender that knows newer epochs than ours talks to a controller that has
        // been replaced: it should find the new one.
        if data.leader_epoch > p.leader_epoch {
            return Err(ControllerError::NotController(format!(
                "{}: leader epoch {} is newer than this controller's {}",
                at(),
                data.leader_epoch,
                p.leader_epoch
            )));
        }
        if data.partition_epoch > p.partition_epoch {
            return Err(ControllerError::NotController(format!(
                "{}: partition epoch {} is newer than this controller's {}",
                at(),
                data.partition_epoch,
                p.partition_epoch
            )));
        }
        if data.leader_epoch < p.leader_epoch {
            return Err(ControllerError::FencedLeaderEpoch(format!(
                "{}: leader epoch is {}, not {}",
                at(),
                p.leader_epoch,
                data.leader_epoch
            )));
        }
        if broker_id != p.leader {
            return Err(ControllerError::InvalidRequest(format!(
                "{}: broker {broker_id} is not the leader ({})",
                at(),
                p.leader
            )));
        }
        if data.partition_epoch < p.partition_epoch {
            return Err(ControllerError::InvalidUpdateVersion(format!(
                "{}: partition epoch is {}, not {}",
                at(),
                p.partition_epoch,
                data.partition_epoch
            )));
        }
        let mut seen = BTreeSet::new();
        for m in &data.new_isr {
            if !p.replicas.contains(&m.broker_id) || !seen.insert(m.broker_id) {
                return Err(ControllerError::InvalidRequest(format!(
                    "{}: invalid ISR (broker {} is not a replica or appears twice)",
                    at(),
                    m.broker_id
                )));
            }
        }
        if !seen.contains(&p.leader) {
            return Err(ControllerError::InvalidRequest(format!(
                "{}: the new ISR does not include the leader {}",
                at(),
                p.leader
            )));
        }
        for m in &data.new_isr {
            let why = match self.image.broker(m.broker_id) {
                None => Some("not registered".to_string()),
                Some(b) if b.in_controlled_shutdown => Some("shutting down".into()),
                Some(b) if b.fenced => Some("fenced".into()),
                Some(b) if m.broker_epoch != -1 && m.broker_epoch != b.broker_epoch => Some(
                    format!("broker epoch {} is not {}", m.broker_epoch, b.broker_epoch),
                ),
                Some(_) => None,
            };
            if let Some(why) = why {
                return Err(ControllerError::IneligibleReplica(format!(
                    "{}: replica {} is ineligible for the ISR: {why}",
                    at(),
                    m.broker_id
                )));
            }
        }
        Ok(p.clone())
    }

    /// CreateTopics: placement over the usable (unfenced, not shutting down) brokers,
    /// rack-aware; a topic's records are emitted only when all its checks passed.
    pub fn create_topics(&mut self, req: CreateTopics) -> Output<Vec<CreateTopicResult>> {
        let mut seen = BTreeSet::new();
        let duplicates: BTreeSet<String> = req
            .topics
            .iter()
            .filter(|t| !seen.insert(t.name.clone()))
            .map(|t| t.name.clone())
            .collect();
        let mut records = Vec::new();
        let mut results = Vec::with_capacity(req.topics.len());
        for t in req.topics {
            let name = t.name.clone();
            let result = if duplicates.contains(&name) {
                Err(ControllerError::InvalidRequest(format!(
                    "topic `{name}` appears more than once in the request"
                )))
            } else {
                self.create_topic(t, req.validate_only, &mut records)
            };
            results.push(CreateTopicResult { name, result });
        }
        self.finish(results, records)
    }

    fn create_topic(
        &mut self,
        t: CreatableTopic,
        validate_only: bool,
        records: &mut Vec<MetadataRecord>,
    ) -> Result<CreatedTopic, ControllerError> {
        validate_topic_name(&t.name).map_err(ControllerError::InvalidTopic)?;
        if self.image.topic(&t.name).is_some() {
            return Err(ControllerError::TopicAlreadyExists(format!(
                "topic `{}` already exists",
                t.name
            )));
        }
        // As Kafka: '.' and '_' map to the same metric names, so names differing only
        // there collide.
        let metric_name = |n: &str| n.replace('.', "_");
        if let Some(other) = self
            .image
            .topics()
            .find(|o| metric_name(&o.name) == metric_name(&t.name))
        {
            return Err(ControllerError::InvalidTopic(format!(
                "topic `{}` collides with existing topic `{}`",
                t.name, other.name
            )));
        }
        let assignment = match t.assignments.filter(|a| !a.is_empty()) {
            Some(a) => {
                if t.num_partitions != -1 || t.replication_factor != -1 {
                    return Err(ControllerError::InvalidRequest(
                        "both replica assignments and a partition count or replication factor \
                         were given"
                            .into(),
                    ));
                }
                self.validate_manual_assignment(&a, None)?;
                a
            }
            None => {
                let partitions = if t.num_partitions == -1 {
                    self.config.num_partitions
                } else {
                    t.num_partitions
                };
                let usable = self.usable_brokers();
                let rf = if t.replication_factor != -1 {
                    t.replication_factor
                } else if INTERNAL_TOPICS.contains(&t.name.as_str()) {
                    let n = i16::try_from(usable.len()).unwrap_or(i16::MAX);
                    let wanted = if t.name == TRANSACTION_STATE_TOPIC {
                        self.config.transaction_state_log_replication_factor
                    } else {
                        self.config.offsets_topic_replication_factor
                    };
                    wanted.min(n).max(1)
                } else {
                    self.config.default_replication_factor
                };
                if partitions < 1 {
                    return Err(ControllerError::InvalidPartitions(
                        "number of partitions must be at least 1".into(),
                    ));
                }
                if partitions > PARTITIONS_CREATED_MAX {
                    return Err(ControllerError::InvalidPartitions(format!(
                        "at most {PARTITIONS_CREATED_MAX} partitions per topic and request"
                    )));
                }
                self.place(&usable, 0, partitions, i32::from(rf))?
            }
        };
        let isrs = self.initial_isrs(&assignment, 0)?;
        let topic_id = self.new_topic_id();
        let created = CreatedTopic {
            topic_id,
            num_partitions: assignment.len() as i32,
            replication_factor: assignment.first().map_or(0, Vec::len) as i16,
        };
        let mut configs = t.configs;
        if t.name == TRANSACTION_STATE_TOPIC {
            // Kafka's `transaction.state.log.min.isr` (2): the coordinator's acks=all
            // writes need that many in-sync replicas. Clamped to the replicas it got, so
            // that a one-broker cluster can still run transactions (Kafka needs both
            // settings lowered by hand there).
            let min_isr = self
                .config
                .transaction_state_log_min_isr
                .min(created.replication_factor)
                .max(1);
            configs
                .entry(MIN_INSYNC_REPLICAS.to_string())
                .or_insert_with(|| min_isr.to_string());
        }
        if !validate_only {
            self.emit(
                records,
                MetadataRecord::Topic {
                    name: t.name,
                    topic_id,
                },
            );
            self.emit_partitions(records, topic_id, 0, assignment, isrs);
            for (key, value) in configs {
                self.emit(
                    records,
                    MetadataRecord::TopicConfig {
                        topic_id,
                        key,
                        value: Some(value),
                    },
                );
            }
        }
        Ok(created)
    }

    /// CreatePartitions: new partitions get the topic's replication factor.
    pub fn create_partitions(
        &mut self,
        req: CreatePartitions,
    ) -> Output<Vec<CreatePartitionsResult>> {
        let mut records = Vec::new();
        let mut results = Vec::with_capacity(req.topics.len());
        for t in req.topics {
            let name = t.name.clone();
            let result = self.create_partitions_for(t, req.validate_only, &mut records);
            results.push(CreatePartitionsResult { name, result });
        }
        self.finish(results, records)
    }

    fn create_partitions_for(
        &mut self,
        t: CreatePartitionsTopic,
        validate_only: bool,
        records: &mut Vec<MetadataRecord>,
    ) -> Result<(), ControllerError> {
        let topic = self.image.topic(&t.name).ok_or_else(|| {
            ControllerError::UnknownTopicOrPartition(format!("topic `{}` does not exist", t.name))
        })?;
        let topic_id = topic.topic_id;
        let current = topic.partitions.len() as i32;
        let rf = topic
            .partitions
            .values()
            .next()
            .map_or(1, |p| p.replicas.len());
        if t.count == current {
            return Err(ControllerError::InvalidPartitions(format!(
                "topic already has {current} partitions"
            )));
        }
        if t.count < current {
            return Err(ControllerError::InvalidPartitions(format!(
                "topic has {current} partitions; {} would not be an increase",
                t.count
            )));
        }
        let added = t.count - current;
        if added > PARTITIONS_CREATED_MAX {
            return Err(ControllerError::InvalidPartitions(format!(
                "at most {PARTITIONS_CREATED_MAX} partitions per topic and request"
            )));
        }
        let assignment = match t.assignments {
            Some(a) => {
                if a.len() as i32 != added {
                    return Err(ControllerError::InvalidReplicaAssignment(format!(
                        "{added} partitions are added but {} assignments were given",
                        a.len()
                    )));
                }
                self.validate_manual_assignment(&a, Some(rf))?;
                a
            }
            None => {
                let usable = self.usable_brokers();
                self.place(&usable, current, added, rf as i32)?
            }
        };
        let isrs = self.initial_isrs(&assignment, current)?;
        if !validate_only {
            self.emit_partitions(records, topic_id, current, assignment, isrs);
        }
        Ok(())
    }

    /// ElectLeaders: preferred (back to the first replica, if it is in sync and usable)
    /// or unclean (a leaderless partition takes any usable replica) on request.
    pub fn elect_leaders(&mut self, req: ElectLeaders) -> Output<Vec<ElectionResult>> {
        let mut records = Vec::new();
        let mut results = Vec::new();
        let (targets, all) = match req.partitions {
            Some(p) => (p, false),
            None => (
                self.image
                    .topics()
                    .map(|t| (t.name.clone(), t.partitions.keys().copied().collect()))
                    .collect(),
                true,
            ),
        };
        for (topic, partitions) in targets {
            for partition in partitions {
                let result = self.elect_one(&topic, partition, req.election_type, &mut records);
                if all && matches!(result, Err(ControllerError::ElectionNotNeeded(_))) {
                    continue;
                }
                results.push(ElectionResult {
                    topic: topic.clone(),
                    partition,
                    result,
                });
            }
        }
        self.finish(results, records)
    }

    fn elect_one(
        &mut self,
        topic: &str,
        partition: i32,
        election_type: ElectionType,
        records: &mut Vec<MetadataRecord>,
    ) -> Result<(), ControllerError> {
        let t = self.image.topic(topic).ok_or_else(|| {
            ControllerError::UnknownTopicOrPartition(format!("no topic `{topic}`"))
        })?;
        let p = t.partitions.get(&partition).ok_or_else(|| {
            ControllerError::UnknownTopicOrPartition(format!("no partition {topic}-{partition}"))
        })?;
        let (election, not_needed) = match election_type {
            ElectionType::Preferred => (Election::Preferred, p.replicas.first() == Some(&p.leader)),
            ElectionType::Unclean => (Election::Unclean, p.leader != NO_LEADER),
        };
        if not_needed {
            return Err(ControllerError::ElectionNotNeeded(format!(
                "{topic}-{partition} needs no election"
            )));
        }
        let change = ChangeRequest {
            remove: None,
            target_isr: None,
            target_replicas: None,
            election,
        };
        match partition_change(&self.image, t.topic_id, p, &change) {
            Some(r) => {
                self.emit(records, r);
                Ok(())
            }
            None => Err(match election_type {
                ElectionType::Preferred => ControllerError::PreferredLeaderNotAvailable(format!(
                    "the preferred leader of {topic}-{partition} is not in sync or not usable"
                )),
                ElectionType::Unclean => ControllerError::EligibleLeadersNotAvailable(format!(
                    "no replica of {topic}-{partition} is usable"
                )),
            }),
        }
    }

    /// AlterPartitionReassignments (KIP-455, as KRaft's `ReplicationControlManager`):
    /// a target starts moving the partition there: the new replicas are added (they
    /// fetch from the leader, and the leader brings them into the ISR once caught up),
    /// and the change that makes every one of them in sync also drops the replicas not
    /// in the target and moves the leadership into it (`election::partition_change`).
    /// A target that adds nothing (a removal, a new order) completes at once. `None`
    /// cancels: back to the replicas before the reassignment, keeping the ISR members
    /// among them.
    pub fn alter_partition_reassignments(
        &mut self,
        req: AlterPartitionReassignments,
    ) -> Output<Vec<ReassignmentResult>> {
        let mut records = Vec::new();
        let mut results = Vec::with_capacity(req.partitions.len());
        for (i, r) in req.partitions.into_iter().enumerate() {
            let result = if i >= PARTITIONS_REASSIGNED_MAX {
                Err(ControllerError::InvalidRequest(format!(
                    "at most {PARTITIONS_REASSIGNED_MAX} partitions per request"
                )))
            } else {
                self.reassign_one(&r, req.allow_replication_factor_change, &mut records)
            };
            results.push(ReassignmentResult {
                topic: r.topic,
                partition: r.partition,
                result,
            });
        }
        self.finish(results, records)
    }

    fn reassign_one(
        &mut self,
        r: &ReassignablePartition,
        allow_replication_factor_change: bool,
        records: &mut Vec<MetadataRecord>,
    ) -> Result<(), ControllerError> {
        let at = format!("{}-{}", r.topic, r.partition);
        let t = self.image.topic(&r.topic).ok_or_else(|| {
            ControllerError::UnknownTopicOrPartition(format!("no topic `{}`", r.topic))
        })?;
        let topic_id = t.topic_id;
        let p = t.partitions.get(&r.partition).ok_or_else(|| {
            ControllerError::UnknownTopicOrPartition(format!("no partition {at}"))
        })?;
        let change = match &r.replicas {
            None => {
                if !p.is_reassigning() {
                    return Err(ControllerError::NoReassignmentInProgress(format!(
                        "{at} has no reassignment in progress"
                    )));
                }
                let original = p.original_replicas();
                let isr: Vec<i32> = p
                    .isr
                    .iter()
                    .copied()
                    .filter(|b| original.contains(b))
                    .collect();
                if isr.is_empty() {
                    // Kafka's `PartitionReassignmentRevert` would need an unclean
                    // election here: none of the original replicas is in sync.
                    return Err(ControllerError::InvalidReplicaAssignment(format!(
                        "cannot cancel the reassignment of {at}: none of its original replicas {original:?} is in sync (ISR {:?}); reassign it to its in-sync replicas instead",
                        p.isr
                    )));
                }
                ChangeRequest {
                    remove: None,
                    target_isr: Some(isr),
                    target_replicas: Some(ReplicaSet {
                        replicas: original,
                        adding: Vec::new(),
                        removing: Vec::new(),
                    }),
                    election: Election::Online,
                }
            }
            Some(target) => {
                self.validate_manual_assignment(std::slice::from_ref(target), None)?;
                let current_rf = p.original_replicas().len();
                if !allow_replication_factor_change && target.len() != current_rf {
                    return Err(ControllerError::InvalidReplicationFactor(format!(
                        "{at} has {current_rf} replicas; the target has {} and the request does not allow changing the replication factor",
                        target.len()
                    )));
                }
                ChangeRequest {
                    remove: None,
                    target_isr: None,
                    target_replicas: Some(ReplicaSet::reassigning(&ReplicaSet::of(p), target)),
                    election: Election::Online,
                }
            }
        };
        if let Some(record) = partition_change(&self.image, topic_id, p, &change) {
            self.emit(records, record);
        }
        Ok(())
    }

    // ---- helpers ----

    /// Preferred-leader elections for partitions whose first replica is in sync and
    /// usable but does not lead (auto.leader.rebalance.enable). Returns how many.
    fn rebalance_leaders(&mut self, records: &mut Vec<MetadataRecord>) -> usize {
        let candidates: Vec<(Uuid, i32)> = self.partitions_where(|p| {
            p.replicas
                .first()
                .is_some_and(|&b| b != p.leader && p.isr.contains(&b))
        });
        let mut elected = 0;
        for (topic_id, partition) in candidates {
            if elected >= ELECTIONS_PER_REBALANCE_MAX {
                break;
            }
            let Some(p) = self.image.partition(&topic_id, partition) else {
                continue;
            };
            let change = ChangeRequest {
                remove: None,
                target_isr: None,
                target_replicas: None,
                election: Election::Preferred,
            };
            if let Some(r) = partition_change(&self.image, topic_id, p, &change) {
                self.emit(records, r);
                elected += 1;
            }
        }
        elected
    }

    /// Fences a broker: it leaves every ISR and leadership first, then the record.
    fn fence(&mut self, broker_id: i32, records: &mut Vec<MetadataRecord>) {
        self.remove_from_partitions(broker_id, records);
        if let Some(b) = self.image.broker(broker_id).filter(|b| !b.fenced) {
            let broker_epoch = b.broker_epoch;
            self.emit(
                records,
                MetadataRecord::BrokerRegistrationChange {
                    broker_id,
                    broker_epoch,
                    fenced: Some(true),
                    in_controlled_shutdown: None,
                },
            );
        }
    }

    /// Unfences a broker, then elects leaders where there are none and it can lead.
    fn unfence(&mut self, broker_id: i32, broker_epoch: i64, records: &mut Vec<MetadataRecord>) {
        self.emit(
            records,
            MetadataRecord::BrokerRegistrationChange {
                broker_id,
                broker_epoch,
                fenced: Some(false),
                in_controlled_shutdown: None,
            },
        );
        for (topic_id, partition) in self.partitions_where(|p| p.leader == NO_LEADER) {
            self.change_partition(topic_id, partition, None, records);
        }
    }

    /// Takes `broker_id` out of every ISR and leadership (Kafka's
    /// `generateLeaderAndIsrUpdates` with a broker to remove).
    fn remove_from_partitions(&mut self, broker_id: i32, records: &mut Vec<MetadataRecord>) {
        let affected =
            self.partitions_where(|p| p.leader == broker_id || p.isr.contains(&broker_id));
        for (topic_id, partition) in affected {
            self.change_partition(topic_id, partition, Some(broker_id), records);
        }
    }

    /// A clean election (unclean when the topic allows it) after removing `remove`.
    fn change_partition(
        &mut self,
        topic_id: Uuid,
        partition: i32,
        remove: Option<i32>,
        records: &mut Vec<MetadataRecord>,
    ) {
        let Some(topic) = self.image.topic_by_id(&topic_id) else {
            return;
        };
        let Some(p) = topic.partitions.get(&partition) else {
            return;
        };
        let election = if self.unclean_enabled(&topic.configs) {
            Election::Unclean
        } else {
            Election::Online
        };
        let change = ChangeRequest {
            remove,
            target_isr: None,
            target_replicas: None,
            election,
        };
        if let Some(r) = partition_change(&self.image, topic_id, p, &change) {
            self.emit(records, r);
        }
    }

    fn unclean_enabled(&self, configs: &BTreeMap<String, String>) -> bool {
        configs
            .get(UNCLEAN_LEADER_ELECTION_ENABLE)
            .map_or(self.config.unclean_leader_election_enable, |v| {
                v.trim().eq_ignore_ascii_case("true")
            })
    }

    fn partitions_where(&self, f: impl Fn(&PartitionImage) -> bool) -> Vec<(Uuid, i32)> {
        self.image
            .topics()
            .flat_map(|t| {
                t.partitions
                    .values()
                    .filter(|p| f(p))
                    .map(move |p| (t.topic_id, p.partition))
            })
            .collect()
    }

    fn has_leaderships(&self, broker_id: i32) -> bool {
        self.image
            .topics()
            .any(|t| t.partitions.values().any(|p| p.leader == broker_id))
    }

    fn has_live_session(&self, broker_id: i32, now_ms: i64) -> bool {
        let unfenced = self.image.broker(broker_id).is_some_and(|b| !b.fenced);
        unfenced
            && self.sessions.get(&broker_id).is_some_and(|s| {
                s.heard_from
                    && now_ms
                        <= s.last_contact_ms
                            .saturating_add(self.config.broker_session_timeout_ms)
            })
    }

    /// The lowest metadata offset reported by an active broker (Kafka's
    /// `lowestActiveOffset`): a controlled shutdown completes only once every active
    /// broker has seen it start.
    fn lowest_active_offset(&self) -> i64 {
        self.image
            .brokers()
            .filter(|b| b.is_active())
            .map(|b| {
                self.sessions
                    .get(&b.broker_id)
                    .map_or(-1, |s| s.metadata_offset)
            })
            .min()
            .unwrap_or(i64::MAX)
    }

    fn usable_brokers(&self) -> Vec<BrokerSlot> {
        self.image
            .brokers()
            .filter(|b| b.is_active())
            .map(|b| BrokerSlot {
                node_id: b.broker_id,
                rack: b.rack.clone(),
            })
            .collect()
    }

    fn place(
        &mut self,
        usable: &[BrokerSlot],
        first_partition: i32,
        partitions: i32,
        replication_factor: i32,
    ) -> Result<Vec<Vec<i32>>, ControllerError> {
        if replication_factor < 1 {
            return Err(ControllerError::InvalidReplicationFactor(
                "replication factor must be at least 1".into(),
            ));
        }
        if usable.is_empty() {
            return Err(ControllerError::InvalidReplicationFactor(
                "no usable brokers (registered, unfenced, not shutting down)".into(),
            ));
        }
        // Kafka starts the round-robin at a random broker so that the leaders of many
        // topics spread over the brokers.
        let start = (self.next_random() % usable.len() as u64) as usize;
        assign_replicas(
            usable,
            first_partition,
            partitions,
            replication_factor,
            start,
        )
        .map_err(|e| match e {
            PlacementError::NoPartitions(_) => ControllerError::InvalidPartitions(e.to_string()),
            PlacementError::ReplicationFactorTooLarge { .. }
            | PlacementError::ReplicationFactorTooSmall(_) => {
                ControllerError::InvalidReplicationFactor(e.to_string())
            }
        })
    }

    /// Kafka's manual-assignment checks; `rf` is the topic's replication factor when
    /// adding partitions.
    fn validate_manual_assignment(
        &self,
        a: &[Vec<i32>],
        rf: Option<usize>,
    ) -> Result<(), ControllerError> {
        let bad = ControllerError::InvalidReplicaAssignment;
        if a.len() > PARTITIONS_CREATED_MAX as usize {
            return Err(ControllerError::InvalidPartitions(format!(
                "at most {PARTITIONS_CREATED_MAX} partitions per topic and request"
            )));
        }
        let rf = rf.or_else(|| a.first().map(Vec::len)).unwrap_or(0);
        for replicas in a {
            if replicas.is_empty() || replicas.len() != rf {
                return Err(bad(format!(
                    "every partition needs {rf} replicas, one has {}",
                    replicas.len()
                )));
            }
            for (i, b) in replicas.iter().enumerate() {
                if self.image.broker(*b).is_none() {
                    return Err(bad(format!("broker {b} is not registered")));
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

    /// A new partition's ISR is its usable replicas; none usable refuses the request.
    fn initial_isrs(
        &self,
        assignment: &[Vec<i32>],
        first_partition: i32,
    ) -> Result<Vec<Vec<i32>>, ControllerError> {
        assignment
            .iter()
            .enumerate()
            .map(|(i, replicas)| {
                let isr: Vec<i32> = replicas
                    .iter()
                    .copied()
                    .filter(|&b| self.image.broker(b).is_some_and(|r| r.is_active()))
                    .collect();
                if isr.is_empty() {
                    Err(ControllerError::InvalidReplicaAssignment(format!(
                        "every broker assigned to partition {} is fenced or shutting down",
                        first_partition + i as i32
                    )))
                } else {
                    Ok(isr)
                }
            })
            .collect()
    }

    fn emit_partitions(
        &mut self,
        records: &mut Vec<MetadataRecord>,
        topic_id: Uuid,
        first_partition: i32,
        assignment: Vec<Vec<i32>>,
        isrs: Vec<Vec<i32>>,
    ) {
        for (i, (replicas, isr)) in assignment.into_iter().zip(isrs).enumerate() {
            self.emit(
                records,
                MetadataRecord::Partition {
                    topic_id,
                    partition: first_partition + i as i32,
                    leader: isr.first().copied().unwrap_or(NO_LEADER),
                    isr,
                    replicas,
                    leader_epoch: 0,
                    partition_epoch: 0,
                },
            );
        }
    }

    fn new_topic_id(&mut self) -> Uuid {
        loop {
            let id = Uuid::from_u64_pair(self.next_random(), self.next_random());
            if !id.is_nil() && self.image.topic_by_id(&id).is_none() {
                return id;
            }
        }
    }

    /// splitmix64: small, seeded, good enough for start indexes and ids.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Applies one record to the image (the replay code path) and queues it.
    fn emit(&mut self, records: &mut Vec<MetadataRecord>, record: MetadataRecord) {
        self.image.apply(&record);
        records.push(record);
    }

    /// Closes an output: a non-empty batch is one log entry at the next offset, and one
    /// image version, exactly as `MetadataImage::apply_all` counts it on replay.
    fn finish<T>(&mut self, reply: T, records: Vec<MetadataRecord>) -> Output<T> {
        let offset = if records.is_empty() {
            None
        } else {
            self.image.version += 1;
            let offset = self.next_offset;
            self.next_offset += 1;
            Some(offset)
        };
        Output {
            reply,
            records,
            offset,
        }
    }

    fn refuse<T>(&mut self, e: ControllerError) -> Output<Result<T, ControllerError>> {
        self.finish(Err(e), Vec::new())
    }
}

/// Kafka's topic name rules: non-empty, not `.` or `..`, at most 249 bytes of
/// `[a-zA-Z0-9._-]`.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("topic name is empty".into());
    }
    if name == "." || name == ".." {
        return Err(format!("topic name cannot be `{name}`"));
    }
    if name.len() > TOPIC_NAME_BYTES_MAX {
        return Err(format!(
            "topic name is longer than {TOPIC_NAME_BYTES_MAX} characters"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name contains `{c}`; only [a-zA-Z0-9._-] are allowed"
        ));
    }
    Ok(())
}
