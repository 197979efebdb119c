//! Broker configuration (Kafka's key names) and topic config validation.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use ferrite_storage::LogConfig;

/// Every bound the broker enforces, named with its unit last.
pub mod limits {
    /// Responses queued for one connection's writer before its reader stops reading.
    pub const CONNECTION_RESPONSES_QUEUED_MAX: usize = 32;
    /// Requests of one connection being handled at once (pipelined reads such as
    /// Fetch overlap; writes wait for everything before them). Further requests stay
    /// unread in the socket: backpressure to the client.
    pub const CONNECTION_REQUESTS_IN_FLIGHT_MAX: usize = 16;
    /// Bytes read from a connection at a time while no frame length is known yet (a
    /// frame's body is then read up to its announced length, no further).
    pub const CONNECTION_READ_BYTES: usize = 64 * 1024;
    /// Record bytes below which a Fetch response is copied even with zero-copy on: for
    /// small responses the spliced frame's extra writes cost more latency than the copy
    /// (measured: end-to-end p90 0.2 ms copied against 2 ms spliced at 1 KiB batches).
    pub const FETCH_ZERO_COPY_BYTES_MIN: usize = 64 * 1024;
    /// Bytes one `sendfile` call may move, so that one large region does not hold the
    /// writer for long.
    pub const SENDFILE_CHUNK_BYTES_MAX: usize = 1024 * 1024;
    /// Open client connections; further connections wait in the accept backlog.
    pub const CONNECTIONS_MAX: usize = 10_000;
    /// Partitions one CreateTopics or CreatePartitions request may create per topic.
    pub const TOPIC_PARTITIONS_CREATED_MAX: i32 = 10_000;
    /// Bytes one Fetch response may carry, whatever the client asks (Kafka's broker
    /// `fetch.max.bytes`); a single batch larger than this is still returned (KIP-74).
    pub const FETCH_RESPONSE_BYTES_MAX: usize = 55 * 1024 * 1024;
    /// Longest long-poll a Fetch may ask for.
    pub const FETCH_WAIT_MS_MAX: i32 = 60_000;
    /// Bytes of request bodies held by all connections at once; must be at least
    /// `socket.request.max.bytes` so that one maximal request always fits.
    pub const REQUEST_BYTES_IN_FLIGHT_MAX: usize = 512 * 1024 * 1024;
    /// Frames up to this size may also use `REQUEST_BYTES_SMALL_RESERVED_MAX`, memory
    /// that larger frames cannot take: ApiVersions, Metadata, Fetch and ordinary Produce
    /// requests keep flowing while large frames wait (or arrive slowly).
    pub const REQUEST_BYTES_SMALL_MAX: usize = 1024 * 1024;
    /// The reserve for small frames, on top of `REQUEST_BYTES_IN_FLIGHT_MAX`.
    pub const REQUEST_BYTES_SMALL_RESERVED_MAX: usize = 32 * 1024 * 1024;
    /// Longest a connection muted for memory sleeps before trying again, in case a
    /// release was missed between its try and its wait.
    pub const REQUEST_MEMORY_RETRY_MS: u64 = 100;
    /// Kafka's limit on topic name length.
    pub const TOPIC_NAME_BYTES_MAX: usize = 249;
    /// Smallest accepted `segment.bytes` (a batch header must fit).
    pub const SEGMENT_BYTES_MIN: i64 = 1024;
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub node_id: i32,
    pub rack: Option<String>,
    pub listen: SocketAddr,
    /// Host and port clients are told to connect to; defaults to the bound address.
    pub advertised_listener: Option<(String, u16)>,
    pub data_dir: PathBuf,
    pub auto_create_topics_enable: bool,
    pub num_partitions: i32,
    pub default_replication_factor: i16,
    pub request_bytes_max: usize,
    pub retention_check_interval_ms: u64,
    pub connections_max_idle_ms: u64,
    /// `request.read.timeout.ms` (Ferrite's own): the longest one request may take to
    /// arrive once it has started and has its memory. The default is the clients'
    /// `request.timeout.ms`, after which a client gives the request up anyway.
    pub request_read_timeout_ms: u64,
    /// Broker-wide defaults for topic configs.
    pub log_defaults: LogConfig,
    /// `log.message.timestamp.type`
    pub message_timestamp_type: TimestampType,
    /// `offsets.topic.num.partitions`
    pub offsets_topic_num_partitions: i32,
    /// `offsets.topic.segment.bytes`: small, so that compaction has closed segments to work on.
    pub offsets_topic_segment_bytes: i64,
    /// `offsets.commit.timeout.ms`: how long a group coordinator's write waits for every
    /// in-sync replica of its `__consumer_offsets` partition (acks=all) before the commit
    /// is answered as failed.
    pub offsets_commit_timeout_ms: i64,
    /// `group.*` and `offsets.retention.minutes` settings of the group coordinator.
    pub group: ferrite_coordinator::GroupConfig,
    /// `transaction.max.timeout.ms` and `transactional.id.expiration.ms` of the
    /// transaction coordinator.
    pub txn: ferrite_coordinator::txn::TxnConfig,
    /// `fetch.zero.copy.enable` (Ferrite's own): Fetch writes records from the segment
    /// files with `sendfile` instead of copying them through memory.
    pub fetch_zero_copy: bool,
    /// Every setting given with `--set`, as given: DescribeConfigs reports them as
    /// STATIC_BROKER_CONFIG sources of the topic configs they are synonyms of.
    pub explicit: BTreeMap<String, String>,
    /// Replication (`replica.*`, `min.insync.replicas`, `num.replica.fetchers`).
    pub replication: ReplicationSettings,
    /// `log.segment.fds.max` (Ferrite's own): segment files kept open at once, the least
    /// recently used closed first. 0 derives it from `RLIMIT_NOFILE` at start: the limit
    /// less the descriptors open then and those kept for connections.
    pub segment_fds_max: usize,
    /// `process.roles`: whether this node runs a broker and/or a controller voter.
    pub process_roles: ProcessRoles,
    /// `cluster.id` (what `kafka-storage format --cluster-id` gives Kafka): the id a new
    /// data directory is written with. `None`: derived from `controller.quorum.voters`
    /// (every voter of one cluster is given the same list, so all derive the same id),
    /// or random for a node that is its own quorum.
    pub cluster_id: Option<String>,
    /// `controller.quorum.voters` (`1@host:port,...`); `None`: this node alone is the
    /// quorum (a one-voter quorum on an ephemeral port of the listen address).
    pub controller_quorum_voters: Option<String>,
    /// The controller listener (`--controller-listen`); `None`: this node's address in
    /// `controller.quorum.voters`, or an ephemeral port without them (a bare server) and on a
    /// broker-only node (where the leader replicates the metadata log to it).
    pub controller_listen: Option<String>,
    /// `broker.heartbeat.interval.ms`
    pub broker_heartbeat_interval_ms: u64,
    /// `broker.session.timeout.ms`
    pub broker_session_timeout_ms: u64,
    /// `offsets.topic.replication.factor`: `__consumer_offsets` gets min(this, brokers).
    pub offsets_topic_replication_factor: i16,
    /// `transaction.state.log.replication.factor`: `__transaction_state` gets
    /// min(this, brokers).
    pub transaction_state_log_replication_factor: i16,
    /// `transaction.state.log.min.isr`: `__transaction_state`'s `min.insync.replicas`
    /// when it is created (at most its replicas).
    pub transaction_state_log_min_isr: i16,
    /// `auto.leader.rebalance.enable`: leadership returns to preferred replicas.
    pub auto_leader_rebalance_enable: bool,
    /// `replica.selector.class`: with Kafka's `RackAwareReplicaSelector`, a leader sends
    /// a consumer that names its rack (`client.rack`, Fetch v11+) to an in-sync follower
    /// in that rack (KIP-392). `false`: Kafka's default, consumers read from the leader.
    pub replica_selector_rack_aware: bool,
    /// `leader.imbalance.check.interval.seconds`
    pub leader_imbalance_check_interval_seconds: i64,
}

/// Kafka's `process.roles`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessRoles {
    pub broker: bool,
    pub controller: bool,
}

impl ProcessRoles {
    pub fn parse(v: &str) -> Option<ProcessRoles> {
        let mut roles = ProcessRoles {
            broker: false,
            controller: false,
        };
        for r in v.split(',').map(str::trim) {
            match r {
                "broker" => roles.broker = true,
                "controller" => roles.controller = true,
                _ => return None,
            }
        }
        (roles.broker || roles.controller).then_some(roles)
    }
}

/// Kafka's replication broker configs, with Kafka's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationSettings {
    /// `replica.lag.time.max.ms`: a follower that has not caught up for this long leaves
    /// the ISR.
    pub replica_lag_time_max_ms: u64,
    /// `min.insync.replicas`: the broker default of the topic config.
    pub min_insync_replicas: usize,
    /// `num.replica.fetchers`: fetcher tasks per source broker.
    pub num_replica_fetchers: usize,
    /// `replica.fetch.max.bytes`: per partition in one follower fetch.
    pub replica_fetch_max_bytes: i32,
    /// `replica.fetch.response.max.bytes`: per follower fetch response.
    pub replica_fetch_response_max_bytes: i32,
    /// `replica.fetch.wait.max.ms`: how long a follower fetch waits at the leader.
    pub replica_fetch_wait_max_ms: i32,
    /// `replica.fetch.backoff.ms`: pause after a failed fetch before the next try.
    pub replica_fetch_backoff_ms: u64,
    /// `follower.replication.throttled.rate`: bytes per second this broker fetches, at
    /// most, for the partitions a reassignment is adding it to (Kafka's default,
    /// `Long.MAX_VALUE`, is no throttle). Static: set at start.
    pub follower_replication_throttled_rate: u64,
}

impl Default for ReplicationSettings {
    fn default() -> Self {
        Self {
            replica_lag_time_max_ms: 30_000,
            min_insync_replicas: 1,
            num_replica_fetchers: 1,
            replica_fetch_max_bytes: 1024 * 1024,
            replica_fetch_response_max_bytes: 10 * 1024 * 1024,
            replica_fetch_wait_max_ms: 500,
            replica_fetch_backoff_ms: 1000,
            follower_replication_throttled_rate: ferrite_replication::UNTHROTTLED_BYTES_PER_SECOND,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampType {
    CreateTime,
    LogAppendTime,
}

impl TimestampType {
    fn parse(v: &str) -> Option<Self> {
        match v {
            "CreateTime" => Some(TimestampType::CreateTime),
            "LogAppendTime" => Some(TimestampType::LogAppendTime),
            _ => None,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            TimestampType::CreateTime => "CreateTime",
            TimestampType::LogAppendTime => "LogAppendTime",
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            node_id: 0,
            rack: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 9092)),
            advertised_listener: None,
            data_dir: PathBuf::from("./ferrite-data"),
            auto_create_topics_enable: true,
            num_partitions: 1,
            default_replication_factor: 1,
            request_bytes_max: ferrite_protocol::REQUEST_BYTES_MAX_DEFAULT,
            retention_check_interval_ms: 300_000,
            connections_max_idle_ms: 600_000,
            request_read_timeout_ms: 30_000,
            log_defaults: LogConfig::default(),
            message_timestamp_type: TimestampType::CreateTime,
            offsets_topic_num_partitions: 50,
            offsets_topic_segment_bytes: 100 * 1024 * 1024,
            offsets_commit_timeout_ms: 5000,
            group: ferrite_coordinator::GroupConfig::default(),
            txn: ferrite_coordinator::txn::TxnConfig::default(),
            fetch_zero_copy: true,
            explicit: BTreeMap::new(),
            replication: ReplicationSettings::default(),
            segment_fds_max: 0,
            process_roles: ProcessRoles {
                broker: true,
                controller: true,
            },
            cluster_id: None,
            controller_quorum_voters: None,
            controller_listen: None,
            broker_heartbeat_interval_ms: 2000,
            broker_session_timeout_ms: 9000,
            offsets_topic_replication_factor: 3,
            transaction_state_log_replication_factor: 3,
            transaction_state_log_min_isr:
                ferrite_controller::config::TRANSACTION_STATE_LOG_MIN_ISR_DEFAULT,
            auto_leader_rebalance_enable: true,
            replica_selector_rack_aware: false,
            leader_imbalance_check_interval_seconds: 300,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("unknown or unsupported config `{0}`")]
    UnknownKey(String),
    #[error("invalid value `{value}` for `{key}`: {reason}")]
    InvalidValue {
        key: String,
        value: String,
        reason: String,
    },
}

fn invalid(key: &str, value: &str, reason: &str) -> ConfigError {
    ConfigError::InvalidValue {
        key: key.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

fn parse_num<T>(key: &str, value: &str, min: T) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let v: T = value
        .trim()
        .parse()
        .map_err(|_| invalid(key, value, "not a number"))?;
    if v < min {
        return Err(invalid(key, value, &format!("must be at least {min}")));
    }
    Ok(v)
}

/// Kafka's replica selectors (`replica.selector.class`), the two it ships.
pub const RACK_AWARE_REPLICA_SELECTOR: &str =
    "org.apache.kafka.common.replica.RackAwareReplicaSelector";
pub const LEADER_REPLICA_SELECTOR: &str = "org.apache.kafka.common.replica.LeaderSelector";

fn parse_bool(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(invalid(key, value, "expected true or false")),
    }
}

impl BrokerConfig {
    /// Applies one `key=value` setting with Kafka's broker config names.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        self.set_one(key, value)?;
        self.explicit
            .insert(key.to_string(), value.trim().to_string());
        Ok(())
    }

    fn set_one(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let d = &mut self.log_defaults;
        match key {
            "node.id" => self.node_id = parse_num(key, value, 0)?,
            "replica.lag.time.max.ms" => {
                self.replication.replica_lag_time_max_ms = parse_num(key, value, 1)?
            }
            "min.insync.replicas" => {
                self.replication.min_insync_replicas = parse_num(key, value, 1)?
            }
            "num.replica.fetchers" => {
                self.replication.num_replica_fetchers = parse_num(key, value, 1)?
            }
            "replica.fetch.max.bytes" => {
                self.replication.replica_fetch_max_bytes = parse_num(key, value, 1)?
            }
            "replica.fetch.response.max.bytes" => {
                self.replication.replica_fetch_response_max_bytes = parse_num(key, value, 1)?
            }
            "replica.fetch.wait.max.ms" => {
                self.replication.replica_fetch_wait_max_ms = parse_num(key, value, 0)?
            }
            "follower.replication.throttled.rate" => {
                self.replication.follower_replication_throttled_rate = parse_num(key, value, 1)?
            }
            "replica.fetch.backoff.ms" => {
                self.replication.replica_fetch_backoff_ms = parse_num(key, value, 0)?
            }
            "broker.rack" => self.rack = Some(value.to_string()).filter(|r| !r.is_empty()),
            "process.roles" => {
                self.process_roles = ProcessRoles::parse(value)
                    .ok_or_else(|| invalid(key, value, "expected broker, controller or both"))?
            }
            "cluster.id" => {
                // Kafka's: a UUID in URL-safe base64 without padding (22 characters).
                let valid = value.len() == 22
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if !valid {
                    return Err(invalid(
                        key,
                        value,
                        "expected a UUID in URL-safe base64 (22 characters, as `kafka-storage random-uuid` prints)",
                    ));
                }
                self.cluster_id = Some(value.to_string());
            }
            "controller.quorum.voters" => {
                ferrite_raft::parse_voters(value)
                    .map_err(|e| invalid(key, value, &e.to_string()))?;
                self.controller_quorum_voters = Some(value.to_string());
            }
            "controller.listen" => {
                parse_listen(value).ok_or_else(|| invalid(key, value, "expected HOST:PORT"))?;
                self.controller_listen = Some(value.to_string());
            }
            "broker.heartbeat.interval.ms" => {
                self.broker_heartbeat_interval_ms = parse_num(key, value, 1)?
            }
            "broker.session.timeout.ms" => {
                self.broker_session_timeout_ms = parse_num(key, value, 1)?
            }
            "offsets.topic.replication.factor" => {
                self.offsets_topic_replication_factor = parse_num(key, value, 1)?
            }
            "transaction.state.log.replication.factor" => {
                self.transaction_state_log_replication_factor = parse_num(key, value, 1)?
            }
            "transaction.state.log.min.isr" => {
                self.transaction_state_log_min_isr = parse_num(key, value, 1)?
            }
            "auto.leader.rebalance.enable" => {
                self.auto_leader_rebalance_enable = parse_bool(key, value)?
            }
            "replica.selector.class" => {
                self.replica_selector_rack_aware = match value.trim() {
                    RACK_AWARE_REPLICA_SELECTOR => true,
                    "" | LEADER_REPLICA_SELECTOR => false,
                    _ => {
                        return Err(invalid(
                            key,
                            value,
                            &format!(
                            "supported: {RACK_AWARE_REPLICA_SELECTOR} or {LEADER_REPLICA_SELECTOR}"
                        ),
                        ))
                    }
                }
            }
            "leader.imbalance.check.interval.seconds" => {
                self.leader_imbalance_check_interval_seconds = parse_num(key, value, 1)?
            }
            "listeners" => {
                let addr = client_listener(value);
                let (host, port) =
                    parse_listen(addr).ok_or_else(|| invalid(key, value, "expected HOST:PORT"))?;
                self.listen = match host.parse::<std::net::IpAddr>() {
                    Ok(ip) => SocketAddr::new(ip, port),
                    Err(_) => {
                        // A host name (localhost): bind what it resolves to, IPv4 first,
                        // and advertise the name itself, as Kafka does.
                        let mut addrs: Vec<SocketAddr> =
                            std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
                                .map_err(|e| invalid(key, value, &format!("cannot resolve: {e}")))?
                                .collect();
                        addrs.sort_by_key(|a| !a.is_ipv4());
                        let first = addrs
                            .first()
                            .copied()
                            .ok_or_else(|| invalid(key, value, "resolves to no address"))?;
                        if self.advertised_listener.is_none() && port != 0 {
                            self.advertised_listener = Some((host, port));
                        }
                        first
                    }
                };
            }
            "advertised.listeners" => {
                let addr = client_listener(value);
                self.advertised_listener = Some(
                    parse_host_port(addr)
                        .ok_or_else(|| invalid(key, value, "expected HOST:PORT"))?,
                );
            }
            "log.dirs" | "log.dir" => self.data_dir = PathBuf::from(value),
            "compression.type" => {
                if let Some(def) = topic_config_def(key) {
                    validate_topic_value(def, value)?;
                }
                d.recompress_codec = compression_codec(value);
            }
            "fetch.zero.copy.enable" => self.fetch_zero_copy = parse_bool(key, value)?,
            "log.segment.fds.max" => self.segment_fds_max = parse_num(key, value, 0)?,
            "auto.create.topics.enable" => self.auto_create_topics_enable = parse_bool(key, value)?,
            "num.partitions" => self.num_partitions = parse_num(key, value, 1)?,
            "default.replication.factor" => {
                self.default_replication_factor = parse_num(key, value, 1)?
            }
            "socket.request.max.bytes" => {
                let v: usize = parse_num(key, value, 64)?;
                if v > limits::REQUEST_BYTES_IN_FLIGHT_MAX {
                    return Err(invalid(
                        key,
                        value,
                        "larger than the broker's request memory budget (512 MiB)",
                    ));
                }
                self.request_bytes_max = v;
            }
            "log.retention.check.interval.ms" => {
                self.retention_check_interval_ms = parse_num(key, value, 1)?
            }
            "connections.max.idle.ms" => self.connections_max_idle_ms = parse_num(key, value, 1)?,
            "request.read.timeout.ms" => self.request_read_timeout_ms = parse_num(key, value, 1)?,
            "log.segment.bytes" => {
                d.segment_bytes = parse_num::<i64>(key, value, limits::SEGMENT_BYTES_MIN)? as u64
            }
            "log.roll.ms" => d.segment_ms = parse_num(key, value, 1)?,
            "log.roll.hours" => {
                d.segment_ms = parse_num::<i64>(key, value, 1)?.saturating_mul(3_600_000)
            }
            "log.retention.ms" => d.retention_ms = parse_num(key, value, -1)?,
            "log.retention.minutes" => {
                d.retention_ms = parse_num::<i64>(key, value, -1)?.saturating_mul(60_000)
            }
            "log.retention.hours" => {
                d.retention_ms = parse_num::<i64>(key, value, -1)?.saturating_mul(3_600_000)
            }
            "log.retention.bytes" => d.retention_bytes = parse_num(key, value, -1)?,
            "message.max.bytes" => d.max_message_bytes = parse_num(key, value, 0)?,
            "log.flush.interval.messages" => d.flush_messages = parse_num(key, value, 1)?,
            "log.flush.interval.ms" => d.flush_ms = parse_num(key, value, 0)?,
            "log.index.interval.bytes" => d.index_interval_bytes = parse_num(key, value, 0)?,
            "producer.id.expiration.ms" => d.producer_id_expiration_ms = parse_num(key, value, 1)?,
            "log.message.timestamp.type" => {
                self.message_timestamp_type = TimestampType::parse(value)
                    .ok_or_else(|| invalid(key, value, "expected CreateTime or LogAppendTime"))?;
                d.log_append_time = self.message_timestamp_type == TimestampType::LogAppendTime;
            }
            "log.message.timestamp.before.max.ms" => {
                d.message_timestamp_before_max_ms = parse_num(key, value, 0)?
            }
            "log.message.timestamp.after.max.ms" => {
                d.message_timestamp_after_max_ms = parse_num(key, value, 0)?
            }
            "offsets.topic.num.partitions" => {
                self.offsets_topic_num_partitions = parse_num(key, value, 1)?
            }
            "offsets.topic.segment.bytes" => {
                self.offsets_topic_segment_bytes = parse_num(key, value, limits::SEGMENT_BYTES_MIN)?
            }
            "offsets.commit.timeout.ms" => {
                self.offsets_commit_timeout_ms = parse_num(key, value, 1)?
            }
            "group.initial.rebalance.delay.ms" => {
                self.group.initial_rebalance_delay_ms = parse_num(key, value, 0)?
            }
            "group.min.session.timeout.ms" => {
                self.group.min_session_timeout_ms = parse_num(key, value, 1)?
            }
            "group.max.session.timeout.ms" => {
                self.group.max_session_timeout_ms = parse_num(key, value, 1)?
            }
            "group.max.size" => self.group.group_members_max = parse_num(key, value, 1)?,
            "offsets.retention.minutes" => {
                self.group.offsets_retention_ms =
                    parse_num::<i64>(key, value, 1)?.saturating_mul(60_000)
            }
            // InitProducerId with a larger transaction_timeout_ms is
            // INVALID_TRANSACTION_TIMEOUT, as in Kafka.
            "transaction.max.timeout.ms" => {
                self.txn.transaction_max_timeout_ms = parse_num(key, value, 1)?
            }
            "transactional.id.expiration.ms" => {
                self.txn.transactional_id_expiration_ms = parse_num(key, value, 1)?
            }
            "offset.metadata.max.bytes" => {
                self.group.offset_metadata_bytes_max = parse_num(key, value, 0)?
            }
            _ => return Err(ConfigError::UnknownKey(key.to_string())),
        }
        Ok(())
    }

    /// The host and port put in Metadata responses.
    pub fn advertised(&self, bound: SocketAddr) -> (String, u16) {
        self.advertised_listener
            .clone()
            .unwrap_or_else(|| (bound.ip().to_string(), bound.port()))
    }

    /// The log settings of a topic: its overrides over the broker defaults. The overrides
    /// were validated when they were written, so a bad one here (an older log) is ignored.
    pub fn log_config(&self, overrides: &BTreeMap<String, String>) -> LogConfig {
        let mut c = self.log_defaults.clone();
        for (k, v) in overrides {
            if let Err(e) = apply_topic_config(&mut c, k, v) {
                tracing::warn!(error = %e, "ignoring stored topic config");
            }
        }
        c
    }

    /// Topic config values as Kafka reports them: the default for every supported key.
    pub fn topic_config_default(&self, key: &str) -> Option<String> {
        let d = &self.log_defaults;
        Some(match key {
            "retention.ms" => d.retention_ms.to_string(),
            "retention.bytes" => d.retention_bytes.to_string(),
            "segment.bytes" => d.segment_bytes.to_string(),
            "segment.ms" => d.segment_ms.to_string(),
            "max.message.bytes" => d.max_message_bytes.to_string(),
            "cleanup.policy" => "delete".to_string(),
            "message.timestamp.type" => self.message_timestamp_type.as_str().to_string(),
            "message.timestamp.before.max.ms" => d.message_timestamp_before_max_ms.to_string(),
            "message.timestamp.after.max.ms" => d.message_timestamp_after_max_ms.to_string(),
            "flush.messages" => {
                if d.flush_messages == u64::MAX {
                    i64::MAX.to_string()
                } else {
                    d.flush_messages.to_string()
                }
            }
            "flush.ms" => {
                if d.flush_ms < 0 {
                    i64::MAX.to_string()
                } else {
                    d.flush_ms.to_string()
                }
            }
            "index.interval.bytes" => d.index_interval_bytes.to_string(),
            "compression.type" => match d.recompress_codec {
                None => "producer",
                Some(0) => "uncompressed",
                Some(1) => "gzip",
                Some(2) => "snappy",
                Some(3) => "lz4",
                Some(_) => "zstd",
            }
            .to_string(),
            _ => topic_config_def(key)?.default?.to_string(),
        })
    }
}

/// The address of the client listener in a Kafka `listeners` value: the first entry that
/// is not the KRaft controller's (`PLAINTEXT://:9092,CONTROLLER://:9093` gives `:9092`).
fn client_listener(value: &str) -> &str {
    let entries = || value.split(',').map(str::trim).filter(|e| !e.is_empty());
    let entry = entries()
        .find(|e| !e.to_ascii_uppercase().starts_with("CONTROLLER://"))
        .or_else(|| entries().next())
        .unwrap_or(value);
    entry.rsplit("://").next().unwrap_or(entry)
}

/// `HOST:PORT` to bind; an empty host (`:9092`, Kafka's "every interface") is 0.0.0.0.
fn parse_listen(s: &str) -> Option<(String, u16)> {
    match s.strip_prefix(':') {
        Some(port) => Some(("0.0.0.0".to_string(), port.parse().ok()?)),
        None => parse_host_port(s),
    }
}

pub fn parse_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

/// Kafka's ConfigType as DescribeConfigs v3+ reports it (KIP-569).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigType {
    Boolean = 1,
    String = 2,
    Int = 3,
    Long = 5,
    Double = 6,
    List = 7,
}

/// Kafka's validators of topic configs (`ConfigDef.Range`, `ValidString`, `ValidList`,
/// the codec level validators, `ThrottledReplicaListValidator`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValidRange {
    Any,
    AtLeast(i64),
    Between(i64, i64),
    BetweenF64(f64, f64),
    OneOf(&'static [&'static str]),
    ListOf(&'static [&'static str]),
    /// `-1` (the codec's default) or 1..=9 (`CompressionType.GZIP.levelValidator`).
    GzipLevel,
    /// `""`, `*`, or `partition:broker` pairs.
    ThrottledReplicas,
}

/// One topic config of Kafka 4.x (`LogConfig`'s definitions over `TopicConfig`).
#[derive(Debug)]
pub struct TopicConfigDef {
    pub name: &'static str,
    pub config_type: ConfigType,
    pub valid: ValidRange,
    /// Kafka's default; `None` when Ferrite's default comes from a broker setting
    /// (`BrokerConfig::topic_config_default`).
    pub default: Option<&'static str>,
    /// The broker configs that set the default, highest precedence first
    /// (Kafka's `ServerTopicConfigSynonyms`).
    pub broker_synonyms: &'static [&'static str],
    pub doc: &'static str,
    /// `None`: Ferrite honours the config. `Some(why)`: accepted, validated and described
    /// but without effect yet; DescribeConfigs' documentation says so.
    pub no_effect: Option<&'static str>,
}

const LONG_MAX: &str = "9223372036854775807";
const NO_COMPACTION: &str =
    "Ferrite does not compact user topics yet (cleanup.policy=compact is refused)";
const NO_TIERED: &str = "Ferrite has no tiered storage";
const NO_THROTTLE: &str = "Ferrite has no replication quotas yet";

pub const TOPIC_CONFIGS: &[TopicConfigDef] = &[
    TopicConfigDef {
        name: "cleanup.policy",
        config_type: ConfigType::List,
        valid: ValidRange::ListOf(&["compact", "delete"]),
        default: Some("delete"),
        broker_synonyms: &["log.cleanup.policy"],
        doc: "This config designates the retention policy to use on log segments. The \"delete\" policy (which is the default) will discard old segments when their retention time or size limit has been reached. The \"compact\" policy will enable log compaction, which retains the latest value for each key. It is also possible to specify both policies in a comma-separated list (e.g. \"delete,compact\"). In this case, old segments will be discarded per the retention time and size configuration, while retained segments will be compacted.",
        no_effect: None,
    },
    TopicConfigDef {
        name: "compression.type",
        config_type: ConfigType::String,
        valid: ValidRange::OneOf(&["uncompressed", "zstd", "lz4", "snappy", "gzip", "producer"]),
        default: None,
        broker_synonyms: &["compression.type"],
        doc: "Specify the final compression type for a given topic. This configuration accepts the standard compression codecs ('gzip', 'snappy', 'lz4', 'zstd'). It additionally accepts 'uncompressed' which is equivalent to no compression; and 'producer' which means retain the original compression codec set by the producer.",
        no_effect: None,
    },
    TopicConfigDef {
        name: "compression.gzip.level",
        config_type: ConfigType::Int,
        valid: ValidRange::GzipLevel,
        default: Some("-1"),
        broker_synonyms: &["compression.gzip.level"],
        doc: "The compression level to use if compression.type is set to gzip.",
        no_effect: Some("Ferrite recompresses with the codec's default level"),
    },
    TopicConfigDef {
        name: "compression.lz4.level",
        config_type: ConfigType::Int,
        valid: ValidRange::Between(1, 17),
        default: Some("9"),
        broker_synonyms: &["compression.lz4.level"],
        doc: "The compression level to use if compression.type is set to lz4.",
        no_effect: Some("Ferrite recompresses with the codec's default level"),
    },
    TopicConfigDef {
        name: "compression.zstd.level",
        config_type: ConfigType::Int,
        valid: ValidRange::Between(-131_072, 22),
        default: Some("3"),
        broker_synonyms: &["compression.zstd.level"],
        doc: "The compression level to use if compression.type is set to zstd.",
        no_effect: Some("Ferrite recompresses with the codec's default level"),
    },
    TopicConfigDef {
        name: "delete.retention.ms",
        config_type: ConfigType::Long,
        valid: ValidRange::AtLeast(0),
        default: Some("86400000"),
        broker_synonyms: &["log.cleaner.delete.retention.ms"],
        doc: "The amount of time to retain delete tombstone markers for log compacted topics. This setting also gives a bound on the time in which a consumer must complete a read if they begin from offset 0 to ensure that they get a valid snapshot of the final stage (otherwise delete tombstones may be collected before they complete their scan).",
        no_effect: Some(NO_COMPACTION),
    },
    TopicConfigDef {
        name: "file.delete.delay.ms",
        config_type: ConfigType::Long,
        valid: ValidRange::AtLeast(0),
        default: Some("60000"),
        broker_synonyms: &["log.segment.delete.delay.ms"],
        doc: "The time to wait before deleting a file from the filesystem",
        no_effect: Some("Ferrite unlinks deleted segments at once; open readers keep their file"),
    },
    TopicConfigDef {
        name: "flush.messages",
        config_type: ConfigType::Long,
        valid: ValidRange::AtLeast(1),
        default: None,
        broker_synonyms: &["log.flush.interval.messages"],
        doc: "This setting allows specifying an interval at which we will force an fsync of data written to the log. For example if this was set to 1 we would fsync after every message; if it were 5 we would fsync after every five messages. In general we recommend you not set this and use replication for durability and allow the operating system's background flush capabilities as it is more efficient.",
        no_effect: None,
    },
    TopicConfigDef {
        name: "flush.ms",
        config_type: ConfigType::Long,
        valid: ValidRange::AtLeast(0),
        default: None,
        broker_synonyms: &["log.flush.interval.ms", "log.flush.scheduler.interval.ms"],
        doc: "This setting allows specifying a time interval at which we will force an fsync of data written to the log. For example if this was set to 1000 we would fsync after 1000 ms had passed. In general we recommend you not set this and use replication for durability and allow the operating system's background flush capabilities as it is more efficient.",
        no_effect: None,
    },
    TopicConfigDef {
        name: "follower.replication.throttled.replicas",
        config_type: ConfigType::List,
        valid: ValidRange::ThrottledReplicas,
        default: Some(""),
        broker_synonyms: &[],
        doc: "A list of replicas for which log replication should be throttled on the follower side. The list should describe a set of replicas in the form [PartitionId]:[BrokerId],[PartitionId]:[BrokerId]:... or alternatively the wildcard '*' can be used to throttle all replicas for this topic.",
        no_effect: Some(NO_THROTTLE),
    },
    TopicConfigDef {
        name: "index.interval.bytes",
        config_type: ConfigType::Int,
        valid: ValidRange::AtLeast(0),
        default: None,
        broker_synonyms: &["log.index.interval.bytes"],
        doc: "This setting controls how frequently Kafka adds an index entry to its offset index. The default setting ensures that we index a message roughly every 4096 bytes. More indexing allows reads to jump closer to the exact position in the log but makes the index larger. You probably don't need to change this.",
        no_effect: None,
    },
    TopicConfigDef {
        name: "leader.replication.throttled.replicas",
        config_type: ConfigType::List,
        valid: ValidRange::ThrottledReplicas,
        default: Some(""),
        broker_synonyms: &[],
        doc: "A list of replicas for which log replication should be throttled on the leader side. The list should describe a set of replicas in the form [PartitionId]:[BrokerId],[PartitionId]:[BrokerId]:... or alternatively the wildcard '*' can be used to throttle all replicas for this topic.",
        no_effect: Some(NO_THROTTLE),
    },
    TopicConfigDef {
        name: "local.retention.bytes",
        config_type: ConfigType::Long,
        valid: ValidRange::AtLeast(-2),
        default: Some("-2"),
        broker_synonyms: &["log.local.retention.bytes"],
        doc: "The maximum size of local log segments that can grow for a partition before it deletes the old segments. Default value is -2, it represents `retention.bytes` value to be used. The effective value should always be less than or equal to `retention.bytes` value.",
        no_effect: Some(NO_TIERED),
    },
    TopicConfigDef {
        name: "local.retention.ms",
        config_type: ConfigType::Long,
        valid: ValidRange::AtLeast(-2),
        default: Some("-2"),
        broker_synonyms: &["log.local.retention.ms"],
        doc: "The number of milliseconds to keep the local log segment before it gets deleted. Default value is -2, it represents `retention.ms` value is to be used. The effective value should always be less than or equal to `retention.ms` value.",
        no_effect: Some(NO_TIERED),
    },
    TopicConfigDef {
        name: "max.compaction.lag.ms",
        config_type: ConfigType::Long,
        valid: ValidRange::AtLeast(1),
        default: Some(LONG_MAX),
        broker_synonyms: &["log.cleaner.max.compaction.lag.ms"],
        doc: "The maximum time a message will remain ineligible for compaction in the log. Only applicable for logs that are being compacted.",
        no_effect: Some(NO_COMPACTION),
    },
    TopicConfigDef {
        name: "max.message.bytes",
        config_type: ConfigType::Int,
        valid: ValidRange::AtLeast(0),
        default: None,
        broker_synonyms: &["message.max.bytes"],
        doc: "The largest record batch size allowed by Kafka (after compression if compression is enabled). If this is increased and there are consumers older than 0.10.2, the consumers' fetch size must also be increased so that they can fetch record batches this large.",
        no_effect: None,
    },
    TopicConfigDef {
        name: "message.timestamp.after.max.ms",
        config_type: ConfigType::Long,
        valid: ValidRange::AtLeast(0),
        default: None,
        broker_synonyms: &["log.message.timestamp.after.max.ms"],
        doc: "This configuration sets the allowable timestamp difference between the message timestamp and the broker's timestamp. The message timestamp can be later than or equal to the broker's timestamp, with the maximum allowable difference determined by the value set in this configuration. If message.timestamp.type=CreateTime, the message will be rejected if the difference in timestamps exceeds this specified threshold. This configuration is ignored if message.timestamp.type=LogAppendTime.",
        no_effect: None,
    },
    TopicConfigDef {
        name: "message.timestamp.before.max.ms",
        config_type: ConfigType::Long,
        valid: ValidRange::AtLeast(0),
        default: None,
        broker_synonyms: &["log.message.timestamp.before.max.ms"],
        doc: "This configuration sets the allowable timestamp difference between the broker's timestamp and the message timestamp. The message timestamp can be earlier than or equal to the broker's timestamp, with the maximum allowable difference determined by the value set in this configuration. If message.timestamp.type=CreateTime, the message will be rejected if the difference in timestamps exceeds this specified threshold. This configuration is ignored if message.timestamp.type=LogAppendTime.",
        no_effect: None,
    },
    TopicConfigDef {
        name: "message.timestamp.type",
        config_type: ConfigType::String,
        valid: ValidRange::OneOf(&["CreateTime", "LogAppendTime"]),
        default: None,
        broker_synonyms: &["log.message.timestamp.type"],
        doc: "Define whether the timestamp in the message is message create time or log append time. The value should be either `CreateTime` or `LogAppendTime`",
        no_effect: None,
    },
    TopicConfigDef {
        name: "min.cleanable.dirty.ratio",
        config_type: ConfigType::Double,
        valid: ValidRange::BetweenF64(0.0, 1.0),
        default: Some("0.5"),
        broker_synonyms: &["log.cleaner.min.cleanable.ratio"],
        doc: "This configuration controls how frequently the log compactor will attempt to clean the log (assuming log compaction is enabled). By default we will avoid cleaning a log where more than 50% of the log has been compacted.",
        no_effect: Some(NO_COMPACTION),
    },
    TopicConfigDef {
        name: "min.compaction.lag.ms",
        config_type: ConfigType::Long,
        valid: ValidRange::AtLeast(0),
        default: Some("0"),
        broker_synonyms: &["log.cleaner.min.compaction.lag.ms"],
        doc: "The minimum time a message will remain uncompacted in the log. Only applicable for logs that are being compacted.",
        no_effect: Some(NO_COMPACTION),
    },
    TopicConfigDef {
        name: "min.insync.replicas",
        config_type: ConfigType::Int,
        valid: ValidRange::AtLeast(1),
        default: Some("1"),
        broker_synonyms: &["min.insync.replicas"],
        doc: "When a producer sets acks to \"all\" (or \"-1\"), this configuration specifies the minimum number of replicas that must acknowledge a write for the write to be considered successful. If this minimum cannot be met, then the producer will raise an exception (either NotEnoughReplicas or NotEnoughReplicasAfterAppend).",
        no_effect: None,
    },
    TopicConfigDef {
        name: "preallocate",
        config_type: ConfigType::Boolean,
        valid: ValidRange::Any,
        default: Some("false"),
        broker_synonyms: &["log.preallocate"],
        doc: "True if we should preallocate the file on disk when creating a new log segment.",
        no_effect: Some("Ferrite never preallocates segment files"),
    },
    TopicConfigDef {
        name: "remote.log.copy.disable",
        config_type: ConfigType::Boolean,
        valid: ValidRange::Any,
        default: Some("false"),
        broker_synonyms: &[],
        doc: "Determines whether tiered data for a topic should become read only, and no more data uploading on a topic.",
        no_effect: Some(NO_TIERED),
    },
    TopicConfigDef {
        name: "remote.log.delete.on.disable",
        config_type: ConfigType::Boolean,
        valid: ValidRange::Any,
        default: Some("false"),
        broker_synonyms: &[],
        doc: "Determines whether tiered data for a topic should be deleted after tiered storage is disabled on a topic.",
        no_effect: Some(NO_TIERED),
    },
    TopicConfigDef {
        name: "remote.storage.enable",
        config_type: ConfigType::Boolean,
        valid: ValidRange::Any,
        default: Some("false"),
        broker_synonyms: &[],
        doc: "To enable tiered storage for a topic, set this configuration as true. You can not disable this config once it is enabled.",
        no_effect: Some("Ferrite has no tiered storage: true is refused, as Kafka refuses it with remote.log.storage.system.enable=false"),
    },
    TopicConfigDef {
        name: "retention.bytes",
        config_type: ConfigType::Long,
        valid: ValidRange::Any,
        default: None,
        broker_synonyms: &["log.retention.bytes"],
        doc: "This configuration controls the maximum size a partition (which consists of log segments) can grow to before we will discard old log segments to free up space if we are using the \"delete\" retention policy. By default there is no size limit only a time limit.",
        no_effect: None,
    },
    TopicConfigDef {
        name: "retention.ms",
        config_type: ConfigType::Long,
        valid: ValidRange::AtLeast(-1),
        default: None,
        broker_synonyms: &["log.retention.ms", "log.retention.minutes", "log.retention.hours"],
        doc: "This configuration controls the maximum time we will retain a log before we will discard old log segments to free up space if we are using the \"delete\" retention policy. This represents an SLA on how soon consumers must read their data. If set to -1, no time limit is applied.",
        no_effect: None,
    },
    TopicConfigDef {
        name: "segment.bytes",
        config_type: ConfigType::Int,
        // Kafka 4.x requires at least 1 MiB (KIP-1030); Ferrite keeps 1 KiB so that tests
        // and small deployments can roll segments quickly.
        valid: ValidRange::AtLeast(limits::SEGMENT_BYTES_MIN),
        default: None,
        broker_synonyms: &["log.segment.bytes"],
        doc: "This configuration controls the segment file size for the log. Retention and cleaning is always done a file at a time so a larger segment size means fewer files but less granular control over retention.",
        no_effect: None,
    },
    TopicConfigDef {
        name: "segment.index.bytes",
        config_type: ConfigType::Int,
        valid: ValidRange::AtLeast(4),
        default: Some("10485760"),
        broker_synonyms: &["log.index.size.max.bytes"],
        doc: "This configuration controls the size of the index that maps offsets to file positions. We preallocate this index file and shrink it only after log rolls. You generally should not need to change this setting.",
        no_effect: Some("Ferrite's sparse indexes grow with the segment and are not preallocated"),
    },
    TopicConfigDef {
        name: "segment.jitter.ms",
        config_type: ConfigType::Long,
        valid: ValidRange::AtLeast(0),
        default: Some("0"),
        broker_synonyms: &["log.roll.jitter.ms", "log.roll.jitter.hours"],
        doc: "The maximum random jitter subtracted from the scheduled segment roll time to avoid thundering herds of segment rolling",
        no_effect: Some("Ferrite rolls at segment.ms without jitter"),
    },
    TopicConfigDef {
        name: "segment.ms",
        config_type: ConfigType::Long,
        valid: ValidRange::AtLeast(1),
        default: None,
        broker_synonyms: &["log.roll.ms", "log.roll.hours"],
        doc: "This configuration controls the period of time after which Kafka will force the log to roll even if the segment file isn't full to ensure that retention can delete or compact old data.",
        no_effect: None,
    },
    TopicConfigDef {
        name: "unclean.leader.election.enable",
        config_type: ConfigType::Boolean,
        valid: ValidRange::Any,
        default: Some("false"),
        broker_synonyms: &["unclean.leader.election.enable"],
        doc: "Indicates whether to enable replicas not in the ISR set to be elected as leader as a last resort, even though doing so may result in data loss.",
        no_effect: None,
    },
];

/// Every topic config key, in [`TOPIC_CONFIGS`] order (DescribeConfigs lists them so).
pub const TOPIC_CONFIG_KEYS: &[&str] = &[
    "cleanup.policy",
    "compression.type",
    "compression.gzip.level",
    "compression.lz4.level",
    "compression.zstd.level",
    "delete.retention.ms",
    "file.delete.delay.ms",
    "flush.messages",
    "flush.ms",
    "follower.replication.throttled.replicas",
    "index.interval.bytes",
    "leader.replication.throttled.replicas",
    "local.retention.bytes",
    "local.retention.ms",
    "max.compaction.lag.ms",
    "max.message.bytes",
    "message.timestamp.after.max.ms",
    "message.timestamp.before.max.ms",
    "message.timestamp.type",
    "min.cleanable.dirty.ratio",
    "min.compaction.lag.ms",
    "min.insync.replicas",
    "preallocate",
    "remote.log.copy.disable",
    "remote.log.delete.on.disable",
    "remote.storage.enable",
    "retention.bytes",
    "retention.ms",
    "segment.bytes",
    "segment.index.bytes",
    "segment.jitter.ms",
    "segment.ms",
    "unclean.leader.election.enable",
];

pub fn topic_config_def(name: &str) -> Option<&'static TopicConfigDef> {
    TOPIC_CONFIGS.iter().find(|d| d.name == name)
}

/// The codec of a `compression.type` other than `producer`, as the batch attribute bits
/// (0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd).
pub fn compression_codec(value: &str) -> Option<u8> {
    match value.trim() {
        "uncompressed" => Some(0),
        "gzip" => Some(1),
        "snappy" => Some(2),
        "lz4" => Some(3),
        "zstd" => Some(4),
        _ => None,
    }
}

/// Kafka's type and range check of one topic config value.
fn validate_topic_value(def: &TopicConfigDef, value: &str) -> Result<(), ConfigError> {
    let key = def.name;
    let v = value.trim();
    let int = |v: &str| -> Result<i64, ConfigError> {
        match def.config_type {
            ConfigType::Int => v
                .parse::<i32>()
                .map(i64::from)
                .map_err(|_| invalid(key, value, "not a 32-bit integer")),
            _ => v
                .parse::<i64>()
                .map_err(|_| invalid(key, value, "not a 64-bit integer")),
        }
    };
    match def.config_type {
        ConfigType::Boolean => {
            if !v.eq_ignore_ascii_case("true") && !v.eq_ignore_ascii_case("false") {
                return Err(invalid(key, value, "expected true or false"));
            }
        }
        ConfigType::Int | ConfigType::Long => {
            let n = int(v)?;
            match def.valid {
                ValidRange::AtLeast(min) if n < min => {
                    return Err(invalid(key, value, &format!("must be at least {min}")))
                }
                ValidRange::Between(min, max) if n < min || n > max => {
                    return Err(invalid(
                        key,
                        value,
                        &format!("must be between {min} and {max}"),
                    ))
                }
                ValidRange::GzipLevel if n != -1 && !(1..=9).contains(&n) => {
                    return Err(invalid(key, value, "must be -1 or between 1 and 9"))
                }
                _ => {}
            }
        }
        ConfigType::Double => {
            let n: f64 = v
                .parse()
                .ok()
                .filter(|n: &f64| n.is_finite())
                .ok_or_else(|| invalid(key, value, "not a number"))?;
            if let ValidRange::BetweenF64(min, max) = def.valid {
                if n < min || n > max {
                    return Err(invalid(
                        key,
                        value,
                        &format!("must be between {min} and {max}"),
                    ));
                }
            }
        }
        ConfigType::String => {
            if let ValidRange::OneOf(allowed) = def.valid {
                if !allowed.contains(&v) {
                    return Err(invalid(
                        key,
                        value,
                        &format!("must be one of {}", allowed.join(", ")),
                    ));
                }
            }
        }
        ConfigType::List => {
            let items: Vec<&str> = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            match def.valid {
                ValidRange::ListOf(allowed) => {
                    if items.is_empty() {
                        return Err(invalid(key, value, "must not be empty"));
                    }
                    if let Some(bad) = items.iter().find(|i| !allowed.contains(i)) {
                        return Err(invalid(
                            key,
                            value,
                            &format!("`{bad}` is not one of {}", allowed.join(", ")),
                        ));
                    }
                }
                ValidRange::ThrottledReplicas => {
                    let pair = |i: &str| {
                        i.split_once(':').is_some_and(|(p, b)| {
                            p.trim().parse::<i32>().is_ok() && b.trim().parse::<i32>().is_ok()
                        })
                    };
                    let ok = items == ["*"] || items.iter().all(|i| pair(i));
                    if !ok {
                        return Err(invalid(
                            key,
                            value,
                            "must be `*` or a list of [PartitionId]:[BrokerId]",
                        ));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Validates one topic config and applies it to `c`.
/// Every key of Kafka's topic configs is accepted once its value passes Kafka's type and
/// range check; the ones Ferrite gives no effect yet are marked in [`TOPIC_CONFIGS`].
pub fn apply_topic_config(c: &mut LogConfig, key: &str, value: &str) -> Result<(), ConfigError> {
    let def = topic_config_def(key).ok_or_else(|| ConfigError::UnknownKey(key.to_string()))?;
    validate_topic_value(def, value)?;
    match key {
        "retention.ms" => c.retention_ms = parse_num(key, value, -1)?,
        // Kafka puts no bound on it; any negative value means no size limit.
        "retention.bytes" => c.retention_bytes = parse_num(key, value, i64::MIN)?,
        "segment.bytes" => {
            c.segment_bytes = parse_num::<i32>(key, value, limits::SEGMENT_BYTES_MIN as i32)? as u64
        }
        "segment.ms" => c.segment_ms = parse_num(key, value, 1)?,
        "max.message.bytes" => c.max_message_bytes = parse_num::<i32>(key, value, 0)? as usize,
        "cleanup.policy" if value.split(',').any(|p| p.trim() == "compact") => {
            return Err(invalid(
                key,
                value,
                "only cleanup.policy=delete is supported; compaction is not implemented yet",
            ));
        }
        "message.timestamp.type" => {
            c.log_append_time = TimestampType::parse(value.trim())
                .ok_or_else(|| invalid(key, value, "expected CreateTime or LogAppendTime"))?
                == TimestampType::LogAppendTime;
        }
        "message.timestamp.before.max.ms" => {
            c.message_timestamp_before_max_ms = parse_num(key, value, 0)?
        }
        "message.timestamp.after.max.ms" => {
            c.message_timestamp_after_max_ms = parse_num(key, value, 0)?
        }
        "flush.messages" => c.flush_messages = parse_num::<i64>(key, value, 1)? as u64,
        "index.interval.bytes" => c.index_interval_bytes = parse_num::<i32>(key, value, 0)? as u64,
        "compression.type" => c.recompress_codec = compression_codec(value),
        // Kafka's answer when remote.log.storage.system.enable is false.
        "remote.storage.enable" if value.trim().eq_ignore_ascii_case("true") => {
            return Err(invalid(
                key,
                value,
                "Tiered Storage functionality is disabled in the broker. Topic cannot be configured with remote log storage.",
            ));
        }
        "flush.ms" => {
            let v: i64 = parse_num(key, value, 0)?;
            c.flush_ms = if v == i64::MAX { -1 } else { v };
        }
        // Accepted without effect (TopicConfigDef::no_effect says why).
        _ => {}
    }
    Ok(())
}

/// Kafka's topic name rules: 1..=249 bytes of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("topic name is empty".into());
    }
    if name == "." || name == ".." {
        return Err(format!("topic name cannot be `{name}`"));
    }
    if name.len() > limits::TOPIC_NAME_BYTES_MAX {
        return Err(format!(
            "topic name is longer than {} characters",
            limits::TOPIC_NAME_BYTES_MAX
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert!(validate_topic_name("orders.v1_x-2").is_ok());
        for bad in ["", ".", "..", "bad name", "a/b", &"a".repeat(250)] {
            assert!(validate_topic_name(bad).is_err(), "{bad}");
        }
        assert!(validate_topic_name(&"a".repeat(249)).is_ok());
    }

    #[test]
    fn broker_keys_and_topic_overrides() {
        let mut c = BrokerConfig::default();
        c.set("num.partitions", "3").unwrap();
        c.set("log.retention.hours", "1").unwrap();
        assert_eq!(c.num_partitions, 3);
        assert_eq!(c.log_defaults.retention_ms, 3_600_000);
        assert!(matches!(
            c.set("nope", "1"),
            Err(ConfigError::UnknownKey(_))
        ));
        assert!(c.set("num.partitions", "zero").is_err());
        let mut o = BTreeMap::new();
        o.insert("segment.bytes".to_string(), "4096".to_string());
        assert_eq!(c.log_config(&o).segment_bytes, 4096);
        let mut lc = LogConfig::default();
        assert!(apply_topic_config(&mut lc, "cleanup.policy", "compact").is_err());
        assert!(apply_topic_config(&mut lc, "unknown.key", "1").is_err());
        assert!(apply_topic_config(&mut lc, "cleanup.policy", "delete,compact").is_err());
        assert!(apply_topic_config(&mut lc, "message.timestamp.type", "LogAppendTime").is_ok());
        assert!(lc.log_append_time);
    }

    #[test]
    fn every_kafka_topic_config_is_defined_once_with_a_valid_default() {
        let names: Vec<&str> = TOPIC_CONFIGS.iter().map(|d| d.name).collect();
        assert_eq!(names, TOPIC_CONFIG_KEYS);
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        let c = BrokerConfig::default();
        for def in TOPIC_CONFIGS {
            let d = c.topic_config_default(def.name).unwrap();
            let mut lc = LogConfig::default();
            apply_topic_config(&mut lc, def.name, &d)
                .unwrap_or_else(|e| panic!("default of {}: {e}", def.name));
            assert!(!def.doc.is_empty());
        }
    }

    #[test]
    fn kafkas_types_and_ranges() {
        let ok = |k: &str, v: &str| apply_topic_config(&mut LogConfig::default(), k, v).is_ok();
        for (k, v) in [
            ("compression.type", "zstd"),
            ("compression.gzip.level", "-1"),
            ("compression.gzip.level", "9"),
            ("compression.zstd.level", "-131072"),
            ("min.cleanable.dirty.ratio", "0.25"),
            ("preallocate", "TRUE"),
            ("min.insync.replicas", "2"),
            ("follower.replication.throttled.replicas", "*"),
            ("leader.replication.throttled.replicas", "0:1, 1:2"),
            ("leader.replication.throttled.replicas", ""),
            ("local.retention.ms", "-2"),
            ("retention.bytes", "-5"),
            ("remote.storage.enable", "false"),
        ] {
            assert!(ok(k, v), "{k}={v}");
        }
        for (k, v) in [
            ("compression.type", "brotli"),
            ("compression.gzip.level", "0"),
            ("compression.lz4.level", "18"),
            ("compression.zstd.level", "23"),
            ("min.cleanable.dirty.ratio", "1.5"),
            ("min.cleanable.dirty.ratio", "NaN"),
            ("preallocate", "yes"),
            ("min.insync.replicas", "0"),
            ("segment.index.bytes", "3"),
            ("max.message.bytes", "3000000000"),
            ("follower.replication.throttled.replicas", "0-1"),
            ("local.retention.ms", "-3"),
            ("remote.storage.enable", "true"),
            ("message.timestamp.type", "Now"),
            ("cleanup.policy", "shred"),
        ] {
            assert!(!ok(k, v), "{k}={v}");
        }
        let mut lc = LogConfig::default();
        apply_topic_config(&mut lc, "compression.type", "lz4").unwrap();
        assert_eq!(lc.recompress_codec, Some(3));
        apply_topic_config(&mut lc, "compression.type", "producer").unwrap();
        assert_eq!(lc.recompress_codec, None);
        apply_topic_config(&mut lc, "index.interval.bytes", "100").unwrap();
        assert_eq!(lc.index_interval_bytes, 100);
    }
}
