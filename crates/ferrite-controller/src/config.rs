//! The controller's settings, with Kafka's names and defaults.

/// Kafka's `broker.session.timeout.ms` default.
pub const BROKER_SESSION_TIMEOUT_MS_DEFAULT: i64 = 9_000;
/// Kafka's `leader.imbalance.check.interval.seconds` default (300 s).
pub const LEADER_IMBALANCE_CHECK_INTERVAL_MS_DEFAULT: i64 = 300_000;
/// At most this many preferred-leader elections per rebalance pass (Kafka's
/// `QuorumController.maxElectionsPerImbalance`, 1000); the rest wait for the next tick.
pub const ELECTIONS_PER_REBALANCE_MAX: usize = 1_000;
/// Most partitions one CreateTopics topic or CreatePartitions topic may add (the
/// broker's `limits::TOPIC_PARTITIONS_CREATED_MAX`).
pub const PARTITIONS_CREATED_MAX: i32 = 10_000;
/// Most partitions one AlterPartitionReassignments request may reassign or cancel;
/// the rest of a larger request is refused with INVALID_REQUEST, partition by partition.
pub const PARTITIONS_REASSIGNED_MAX: usize = 10_000;
/// Longest topic name (Kafka's 249).
pub const TOPIC_NAME_BYTES_MAX: usize = 249;
/// The topic config that allows electing an out-of-sync replica.
pub const UNCLEAN_LEADER_ELECTION_ENABLE: &str = "unclean.leader.election.enable";
/// The topic config acks=all writes need that many in-sync replicas for.
pub const MIN_INSYNC_REPLICAS: &str = "min.insync.replicas";
/// Kafka's `transaction.state.log.min.isr` default.
pub const TRANSACTION_STATE_LOG_MIN_ISR_DEFAULT: i16 = 2;
/// The transaction coordinator's topic; created with `min.insync.replicas` =
/// min(`transaction.state.log.min.isr`, its replicas) unless the request sets it.
pub const TRANSACTION_STATE_TOPIC: &str = "__transaction_state";
/// Internal topics: their replication factor defaults to
/// `min(offsets.topic.replication.factor, usable brokers)` (`__consumer_offsets`) or
/// `min(transaction.state.log.replication.factor, usable brokers)`
/// (`__transaction_state`).
pub const INTERNAL_TOPICS: [&str; 2] = ["__consumer_offsets", TRANSACTION_STATE_TOPIC];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerConfig {
    /// The cluster id brokers must register with (`None`: not checked).
    pub cluster_id: Option<String>,
    /// `broker.session.timeout.ms`: a broker unheard of for longer is fenced.
    pub broker_session_timeout_ms: i64,
    /// `auto.leader.rebalance.enable`: move leadership back to preferred replicas.
    pub auto_leader_rebalance_enable: bool,
    /// `leader.imbalance.check.interval.seconds`, in ms.
    pub leader_imbalance_check_interval_ms: i64,
    /// `unclean.leader.election.enable`, the default for topics that do not set it.
    pub unclean_leader_election_enable: bool,
    /// `num.partitions`: CreateTopics with -1 partitions.
    pub num_partitions: i32,
    /// `default.replication.factor`: CreateTopics with replication factor -1.
    pub default_replication_factor: i16,
    /// `offsets.topic.replication.factor`: the most replicas an internal topic gets by
    /// default (fewer when fewer brokers are usable).
    pub offsets_topic_replication_factor: i16,
    /// `transaction.state.log.replication.factor`: the most replicas
    /// `__transaction_state` gets by default (fewer when fewer brokers are usable).
    pub transaction_state_log_replication_factor: i16,
    /// `transaction.state.log.min.isr`: `__transaction_state`'s `min.insync.replicas`
    /// (at most its replication factor).
    pub transaction_state_log_min_isr: i16,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            cluster_id: None,
            broker_session_timeout_ms: BROKER_SESSION_TIMEOUT_MS_DEFAULT,
            auto_leader_rebalance_enable: true,
            leader_imbalance_check_interval_ms: LEADER_IMBALANCE_CHECK_INTERVAL_MS_DEFAULT,
            unclean_leader_election_enable: false,
            num_partitions: 1,
            default_replication_factor: 1,
            offsets_topic_replication_factor: 3,
            transaction_state_log_replication_factor: 3,
            transaction_state_log_min_isr: TRANSACTION_STATE_LOG_MIN_ISR_DEFAULT,
        }
    }
}
