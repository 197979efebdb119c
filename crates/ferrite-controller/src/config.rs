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
/// Longest topic name (Kafka's 249).
pub const TOPIC_NAME_BYTES_MAX: usize = 249;
/// The topic config that allows electing an out-of-sync replica.
pub const UNCLEAN_LEADER_ELECTION_ENABLE: &str = "unclean.leader.election.enable";
/// Internal topics: their replication factor defaults to
/// `min(offsets.topic.replication.factor, usable brokers)`.
pub const INTERNAL_TOPICS: [&str; 2] = ["__consumer_offsets", "__transaction_state"];

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
        }
    }
}
