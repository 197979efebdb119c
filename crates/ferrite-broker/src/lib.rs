//! The broker: the only crate with sockets and a runtime. It wires the protocol codec to
//! the request handlers, the handlers to the replica manager (storage) and the controller
//! (metadata), and runs the background tasks (retention, flushing).

pub mod config;
pub mod controller;
pub mod controller_rpc;
pub mod error;
pub mod group_manager;
pub mod handlers;
pub mod lifecycle;
pub mod producer_ids;
pub mod recompress;
pub mod replica_fetcher;
pub mod replica_manager;
pub mod server;
pub mod txn_manager;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use config::BrokerConfig;
use controller::Controller;
use ferrite_metadata::MetadataRecord;
use replica_manager::ReplicaManager;

/// Marker written after a clean shutdown; its absence at start means logs are recovered.
pub const CLEAN_SHUTDOWN_FILE: &str = ".clean-shutdown";
const LOCK_FILE: &str = ".lock";
const META_PROPERTIES_FILE: &str = "meta.properties";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory {path} is not usable")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {0} is in use by another ferrite process")]
    DataDirLocked(PathBuf),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metadata log")]
    Metadata(#[from] ferrite_metadata::MetadataLogError),
    #[error("metadata log")]
    MetadataStore(#[from] ferrite_raft::frame::StoreError),
    #[error("metadata quorum")]
    Quorum(#[from] ferrite_raft::QuorumError),
    #[error("storage")]
    Storage(#[from] ferrite_storage::StorageError),
    #[error("{0}")]
    Meta(String),
}

/// Shared state of a running broker.
pub struct Broker {
    pub config: BrokerConfig,
    pub advertised: (String, u16),
    pub cluster_id: String,
    pub controller: Controller,
    pub replicas: ReplicaManager,
    pub groups: group_manager::GroupManager,
    pub producer_ids: producer_ids::ProducerIdManager,
    pub txns: txn_manager::TxnManager,
    /// This broker's registration with the active controller (`lifecycle`).
    pub lifecycle: tokio::sync::watch::Receiver<lifecycle::LifecycleState>,
    /// Set by a SIGTERM: heartbeats ask for a controlled shutdown.
    pub shutting_down: std::sync::atomic::AtomicBool,
    /// `follower.replication.throttled.rate`, shared by every replica fetcher.
    pub follower_throttle: std::sync::Mutex<ferrite_replication::ByteRateThrottle>,
    _lock: File,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Allows one log line per `LOG_INTERVAL_MS` and counts the ones it holds back, so that
/// a condition that lasts (a full disk) is logged, not flooded.
#[derive(Default)]
pub struct RateLimitedLog {
    last_ms: Option<i64>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub const LOG_INTERVAL_MS: i64 = 10_000;

    /// `Some(lines held back since the last one)` when a line may be logged now.
    pub fn ready(&mut self, now_ms: i64) -> Option<u64> {
        match self.last_ms {
            Some(last) if now_ms - last < Self::LOG_INTERVAL_MS => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last_ms = Some(now_ms);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// A bound, ready broker: call [`Running::serve`] to accept connections.
pub struct Running {
    pub broker: Arc<Broker>,
    pub listener: tokio::net::TcpListener,
    pub local_addr: SocketAddr,
}

impl Broker {
    /// Binds the listener, checks the data directory, replays metadata, opens every
    /// partition log. Every failure is one clear error, not a panic, and a start that
    /// fails leaves the data directory as it found it: the port is bound and everything
    /// is read and checked before the first write, nothing is ever deleted that the
    /// metadata does not account for, and the clean-shutdown marker goes only once
    /// recovery has succeeded (so a refused start is refused again, the same way).
    pub async fn start(config: BrokerConfig) -> Result<Running, StartError> {
        // The port first: a broker that cannot listen must not have touched the data.
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: config.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
        let quorum = QuorumPlan::bind(&config, local_addr).await?;
        let dir = config.data_dir.clone();
        let dir_err = |source| StartError::DataDir {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(dir_err)?;
        // An empty directory is a first start: nothing to recover, nothing to say about it.
        let fresh = std::fs::read_dir(&dir).map_err(dir_err)?.next().is_none();
        let lock = File::create(dir.join(LOCK_FILE)).map_err(dir_err)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StartError::DataDirLocked(dir.clone()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(dir_err(e)),
        }

        raise_file_descriptor_limit();
        size_segment_file_cache(config.segment_fds_max);

        // Read and check everything; write nothing yet.
        let marker = dir.join(CLEAN_SHUTDOWN_FILE);
        let clean = marker.exists() || fresh;
        let meta = read_meta_properties(&dir.join(META_PROPERTIES_FILE), config.node_id)?;
        let metadata_dir = dir.join(ferrite_metadata::log::METADATA_DIR);
        let metadata_meta_path = metadata_dir.join(META_PROPERTIES_FILE);
        let metadata_meta = read_meta_properties(&metadata_meta_path, config.node_id)?;
        // The quorum's files: `metadata.log` is the Raft log (or, in a directory written
        // by the single-node broker, today's metadata log, imported below).
        let local = ferrite_raft::read_local(&metadata_dir, clean)?;
        let legacy = if local.legacy {
            if !quorum.sole_voter {
                return Err(StartError::Meta(format!(
                    "{} is a single-node metadata log (written before the metadata quorum); it can only be imported by a one-voter quorum: start this node once alone (without --controller-quorum-voters), then join it to a cluster",
                    local.log_path.display()
                )));
            }
            Some(ferrite_metadata::MetadataLog::read(&dir, clean)?)
        } else {
            None
        };
        let image = match &legacy {
            Some(contents) => Controller::replay(&contents.entries),
            None => local.image.clone(),
        };
        let partition_dirs = replica_manager::partition_dirs(&dir).map_err(dir_err)?;
        let populated = local.log_frames > 0 || !partition_dirs.is_empty();
        let cluster_id = match (&meta, populated) {
            (Some(m), _) => {
                if let Some(configured) = config.cluster_id.as_ref().filter(|c| **c != m.cluster_id) {
                    return Err(StartError::Meta(format!(
                        "cluster.id is {configured}, but {} says {}: this data directory belongs to another cluster",
                        dir.join(META_PROPERTIES_FILE).display(),
                        m.cluster_id
                    )));
                }
                Some(m.cluster_id.clone())
            }
            (None, true) => {
                return Err(StartError::Meta(format!(
                    "{} is missing, but {} holds a metadata log or partition directories: refusing to start rather than give this data a new cluster id; restore meta.properties from a backup (or from {} if present)",
                    dir.join(META_PROPERTIES_FILE).display(),
                    dir.display(),
                    metadata_meta_path.display(),
                )))
            }
            (None, false) => None,
        };
        if let (Some(id), Some(m)) = (&cluster_id, &metadata_meta) {
            if *id != m.cluster_id {
                return Err(StartError::Meta(format!(
                    "cluster id mismatch: {} says {id}, but the metadata log's {} says {}; this directory mixes data of two clusters",
                    dir.join(META_PROPERTIES_FILE).display(),
                    metadata_meta_path.display(),
                    m.cluster_id
                )));
            }
        }
        if local.log_frames == 0 && !partition_dirs.is_empty() {
            let examples: Vec<String> = partition_dirs
                .iter()
                .take(3)
                .map(|d| d.path.display().to_string())
                .collect();
            return Err(StartError::Meta(format!(
                "the metadata log {} is {}, but {} partition directories exist (such as {}): without it they belong to no topic, and starting would orphan them; restore the metadata log from a backup, or move the partition directories out of {} to start an empty broker",
                local.log_path.display(),
                if local.log_exists { "empty" } else { "missing" },
                partition_dirs.len(),
                examples.join(", "),
                dir.display(),
            )));
        }
        let strays: Vec<&replica_manager::PartitionDir> = partition_dirs
            .iter()
            .filter(|d| !d.owned_by(&image, config.node_id))
            .collect();
        let present: std::collections::HashSet<(&str, i32)> = partition_dirs
            .iter()
            .map(|d| (d.topic.as_str(), d.partition))
            .collect();
        for t in image.topics() {
            for p in t.partitions.values() {
                if p.replicas.contains(&config.node_id)
                    && !present.contains(&(t.name.as_str(), p.partition))
                {
                    let path = replica_manager::partition_dir(&dir, &t.name, p.partition);
                    tracing::warn!(dir = %path.display(), "the metadata has this partition but its directory is missing: starting it empty; restore the directory from a backup to get its data back");
                }
            }
        }
        if !clean {
            tracing::info!("no clean-shutdown marker: partition logs will be recovered");
        }

        // Recovery: it may cut a torn tail after a crash (logged with the offsets lost),
        // it never deletes a segment.
        let replicas = ReplicaManager::default();
        replicas.reconcile(&image, &config, clean)?;

        // The start is committed from here on.
        let cluster_id = match cluster_id {
            Some(id) => id,
            None => {
                let id = match (&config.cluster_id, quorum.derived_cluster_id()) {
                    (Some(configured), _) => configured.clone(),
                    (None, Some(derived)) => derived,
                    (None, None) => base64_url(uuid::Uuid::new_v4().as_bytes()),
                };
                write_meta_properties(&dir.join(META_PROPERTIES_FILE), &id, config.node_id)?;
                id
            }
        };
        if metadata_meta.is_none() {
            // Older data directories have no copy beside the metadata log yet.
            write_meta_properties(&metadata_meta_path, &cluster_id, config.node_id)?;
        }
        if let Some(contents) = legacy {
            import_legacy_log(&metadata_dir, contents, &quorum).await?;
        }
        for stray in strays {
            replica_manager::set_aside_stray(stray);
        }
        replica_manager::finish_pending_deletes(&dir);
        if marker.exists() {
            std::fs::remove_file(&marker).map_err(dir_err)?;
        }
        let local_last_index = quorum_last_index(&metadata_dir);
        let metadata_quorum = Arc::new(
            ferrite_raft::MetadataQuorum::start_with(
                quorum.config(metadata_dir.clone()),
                Some(quorum.listener),
            )
            .await?,
        );
        wait_for_quorum(&metadata_quorum, local_last_index).await?;
        let controller = Controller::with_config(
            metadata_quorum.clone(),
            controller::controller_config(&config, &cluster_id),
        );
        // The follower starts from here: what this reconcile sees is done.
        let mut applied = metadata_quorum.applied();
        applied.borrow_and_update();
        replicas.reconcile(&controller.image(), &config, true)?;
        let groups = group_manager::GroupManager::new(
            ferrite_coordinator::GroupCoordinator::new(
                config.group.clone(),
                format!("{:08x}", rand::random::<u32>()),
            ),
            config.offsets_topic_num_partitions,
        );
        let advertised = config.advertised(local_addr);
        let (lifecycle_tx, lifecycle_rx) =
            tokio::sync::watch::channel(lifecycle::LifecycleState::default());
        let txns = txn_manager::TxnManager::new(config.txn.clone());
        let follower_throttle = ferrite_replication::ByteRateThrottle::new(
            config.replication.follower_replication_throttled_rate,
        );
        let broker = Arc::new(Broker {
            config,
            advertised,
            cluster_id,
            controller,
            replicas,
            groups,
            producer_ids: producer_ids::ProducerIdManager::default(),
            txns,
            lifecycle: lifecycle_rx,
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            follower_throttle: std::sync::Mutex::new(follower_throttle),
            _lock: lock,
        });
        metadata_quorum.set_kafka_handler(controller_rpc::handler(Arc::downgrade(&broker)));
        tokio::spawn(follow_metadata(
            Arc::downgrade(&broker),
            metadata_quorum.clone(),
            applied,
            local_last_index,
        ));
        tokio::spawn(lifecycle::run(broker.clone(), lifecycle_tx));
        tokio::spawn(lifecycle::send_alter_partitions(
            broker.clone(),
            broker.lifecycle.clone(),
        ));
        tokio::spawn(lifecycle::tick(Arc::downgrade(&broker)));
        wait_until_unfenced(&broker).await?;
        // The coordinators of the `__consumer_offsets` and `__transaction_state`
        // partitions led here, loaded only now: unfenced means caught up with the
        // metadata log, and before that the local image can still name this broker the
        // leader of partitions it lost while down (a restart would load them, resume
        // their transactions and unload them a moment later). Kafka's broker, too,
        // takes no partition role before its initial catch-up. The tickers load those
        // this broker comes to lead later.
        broker.groups.sync_leadership(&broker);
        // After the groups: resumed commits apply their pending offsets.
        broker.txns.sync_leadership(&broker);
        if metadata_quorum.status().is_active_controller && metadata_quorum.voters().len() == 1 {
            // A one-voter cluster has all its brokers now; a larger one creates the
            // topic from the controller's tick once enough brokers registered.
            ensure_offsets_topic(&broker).await?;
        }
        Ok(Running {
            broker,
            listener,
            local_addr,
        })
    }

    /// Clean shutdown: flush and close every log, then write the marker.
    pub fn shutdown(&self) -> Result<(), StartError> {
        self.replicas.close_all(&self.config.data_dir)?;
        let marker = self.config.data_dir.join(CLEAN_SHUTDOWN_FILE);
        let dir_err = |source| StartError::DataDir {
            path: self.config.data_dir.clone(),
            source,
        };
        File::create(&marker)
            .and_then(|f| f.sync_all())
            .map_err(dir_err)?;
        File::open(&self.config.data_dir)
            .and_then(|d| d.sync_all())
            .map_err(dir_err)?;
        Ok(())
    }

    /// Periodic storage work: retention and segment age every
    /// `log.retention.check.interval.ms`, fsync of rolled segments and `flush.ms` every
    /// second. fsyncs run outside the partition locks.
    pub async fn run_background(self: Arc<Self>) {
        let period_ms = self.config.retention_check_interval_ms.min(1000);
        let mut ticker = tokio::time::interval(Duration::from_millis(period_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_retention = now_ms();
        // Replication: the fetchers of partitions followed here (issue 9).
        tokio::spawn(replica_fetcher::run(self.clone()));
        // Transaction timeouts and coordinator leadership (issue 12).
        tokio::spawn(txn_manager::run_ticker(self.clone()));
        loop {
            ticker.tick().await;
            let now = now_ms();
            // ISR shrink of partitions led here (followers that stopped fetching).
            self.replicas.check_isr(now);
            let retention_due =
                now - last_retention >= self.config.retention_check_interval_ms as i64;
            if retention_due {
                last_retention = now;
            }
            let this = self.clone();
            let work = tokio::task::spawn_blocking(move || this.storage_tick(now, retention_due));
            if let Err(e) = work.await {
                tracing::error!(error = %e, "background storage task failed");
            }
        }
    }

    fn storage_tick(&self, now: i64, retention_due: bool) {
        for p in self.replicas.all() {
            let pending = {
                let mut log = p.log();
                if retention_due {
                    match log.tick(now) {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(topic = %p.topic, partition = p.index, segments = n, log_start_offset = log.log_start_offset(), "retention deleted segments")
                        }
                        Err(e) => {
                            tracing::error!(topic = %p.topic, partition = p.index, error = %e, "retention failed")
                        }
                    }
                }
                log.take_pending_syncs()
            };
            let mut synced_to = None;
            for (file, next_offset) in pending {
                match file.sync_data() {
                    Ok(()) => synced_to = Some(next_offset),
                    Err(e) => {
                        tracing::error!(topic = %p.topic, partition = p.index, error = %e, "fsync of rolled segment failed");
                        break;
                    }
                }
            }
            if retention_due
                && (&*p.topic == group_manager::OFFSETS_TOPIC
                    || &*p.topic == ferrite_coordinator::txn::TRANSACTION_STATE_TOPIC)
            {
                group_manager::compact_offsets_partition(&p);
            }
            if let Some(offset) = synced_to {
                if let Err(e) = p.log().mark_synced(offset) {
                    tracing::error!(topic = %p.topic, partition = p.index, error = %e, "checkpoint write failed");
                }
            }
        }
    }
}

/// Sizes the shared cache of open segment files (`ferrite_storage::fd_cache`) to what the
/// descriptor limit leaves after the descriptors open now and those kept for connections
/// (`replica_manager::FILE_DESCRIPTORS_RESERVED`); `configured` (`log.segment.fds.max`)
/// lowers it, and is clamped with a WARN when the limit cannot hold it.
fn size_segment_file_cache(configured: usize) {
    use ferrite_storage::fd_cache::{DescriptorCache, SEGMENT_FDS_MIN};
    let fits = replica_manager::file_descriptors().map(|(open, limit)| {
        let room =
            limit.saturating_sub(open.saturating_add(replica_manager::FILE_DESCRIPTORS_RESERVED));
        usize::try_from(room).unwrap_or(usize::MAX)
    });
    let capacity = match (configured, fits) {
        (0, Some(fits)) => fits,
        (0, None) => ferrite_storage::fd_cache::SEGMENT_FDS_MAX_DEFAULT,
        (c, Some(fits)) if c > fits => {
            tracing::warn!(
                log_segment_fds_max = c,
                capacity = fits,
                "log.segment.fds.max is more than the file descriptor limit leaves (less {} kept for connections); using {fits}",
                replica_manager::FILE_DESCRIPTORS_RESERVED
            );
            fits
        }
        (c, _) => c,
    };
    if capacity < SEGMENT_FDS_MIN {
        tracing::warn!(
            capacity = SEGMENT_FDS_MIN,
            "the file descriptor limit leaves almost none for segment files; raise `ulimit -n`"
        );
    }
    DescriptorCache::shared().set_capacity(capacity);
    tracing::info!(
        capacity = DescriptorCache::shared().capacity(),
        "segment files open at most (log.segment.fds.max; least recently used closed first)"
    );
}

/// The segment file cache and every connection need descriptors, and the default soft
/// limit (often 1024) is small: raise it to the hard limit, as Kafka's packaging does
/// with `ulimit -n`, and log both so the ceiling is known.
fn raise_file_descriptor_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let before = getrlimit(Resource::Nofile);
    let mut raised = before;
    raised.current = before.maximum;
    let result = if raised.current == before.current {
        Ok(())
    } else {
        setrlimit(Resource::Nofile, raised)
    };
    let after = getrlimit(Resource::Nofile);
    let show = |v: Option<u64>| v.map_or("unlimited".to_string(), |v| v.to_string());
    match result {
        Ok(()) => tracing::info!(
            soft_before = %show(before.current),
            soft = %show(after.current),
            hard = %show(after.maximum),
            "file descriptor limit (RLIMIT_NOFILE)"
        ),
        Err(e) => tracing::warn!(
            soft = %show(after.current),
            hard = %show(after.maximum),
            error = %e,
            "cannot raise the file descriptor soft limit to the hard limit"
        ),
    }
}

/// Waits until this broker is registered with the active controller and unfenced
/// (caught up with the metadata log), saying so every few seconds.
async fn wait_until_unfenced(broker: &Arc<Broker>) -> Result<(), StartError> {
    const NOTICE_INTERVAL: Duration = Duration::from_secs(5);
    let mut state = broker.lifecycle.clone();
    loop {
        if state.borrow_and_update().is_ready() {
            // The partitions take the roles of the image that unfenced this broker
            // before it says it is ready (the metadata follower would, a moment later):
            // a produce right after the ready line finds its leaders.
            let _lock = broker.controller.lock().await;
            broker
                .replicas
                .reconcile(&broker.controller.image(), &broker.config, true)?;
            return Ok(());
        }
        match tokio::time::timeout(NOTICE_INTERVAL, state.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                return Err(StartError::Meta(
                    "the broker lifecycle task stopped before registration".into(),
                ))
            }
            Err(_) => tracing::info!(
                state = ?*state.borrow(),
                "waiting to register with the active controller and be unfenced"
            ),
        }
    }
}

/// Creates `__consumer_offsets` (on the active controller) if it does not exist: with
/// `offsets.topic.replication.factor` replicas, or as many as there are usable brokers
/// (Kafka's rule for internal topics). Its records must outlive any time or size
/// retention, so retention is off for it.
pub(crate) async fn ensure_offsets_topic(broker: &Broker) -> Result<(), StartError> {
    let config = &broker.config;
    let mut writer = broker.controller.writer().await;
    let image = writer.image();
    if let Some(t) = image.topic(group_manager::OFFSETS_TOPIC) {
        if t.partitions.len() as i32 != config.offsets_topic_num_partitions {
            tracing::warn!(
                existing = t.partitions.len(),
                configured = config.offsets_topic_num_partitions,
                "offsets.topic.num.partitions differs from the existing topic; keeping the existing count"
            );
        }
        return Ok(());
    }
    let configs = [
        ("retention.ms", "-1".to_string()),
        ("retention.bytes", "-1".to_string()),
        (
            "segment.bytes",
            config.offsets_topic_segment_bytes.to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let event = ferrite_controller::Event::CreateTopics(ferrite_controller::CreateTopics {
        topics: vec![ferrite_controller::CreatableTopic {
            name: group_manager::OFFSETS_TOPIC.to_string(),
            num_partitions: config.offsets_topic_num_partitions,
            replication_factor: -1,
            assignments: None,
            configs,
        }],
        validate_only: false,
    });
    let (reply, image) = writer.handle(event).await?;
    if let ferrite_controller::Reply::CreateTopics(results) = reply {
        for r in results {
            match r.result {
                Ok(t) => tracing::info!(
                    topic = group_manager::OFFSETS_TOPIC,
                    partitions = t.num_partitions,
                    replication_factor = t.replication_factor,
                    "created the offsets topic"
                ),
                Err(e) => {
                    return Err(StartError::Meta(format!(
                        "cannot create {}: {e}",
                        group_manager::OFFSETS_TOPIC
                    )))
                }
            }
        }
    }
    broker.replicas.reconcile(&image, config, true)?;
    Ok(())
}

/// Where this node's controller voter listens and who the voters are, decided (and
/// the controller listener bound) before the data directory is touched.
struct QuorumPlan {
    node_id: ferrite_raft::NodeId,
    voters: Vec<ferrite_raft::Voter>,
    listener: tokio::net::TcpListener,
    listen: SocketAddr,
    /// This node is the only voter (a bare `ferrite server`).
    sole_voter: bool,
    /// A broker-only node (`process.roles=broker`): it follows the quorum as an observer
    /// reached at this `host:port`.
    observer: Option<String>,
    /// `controller.quorum.voters` was given (the cluster id is derived from it).
    voters_given: bool,
}

impl QuorumPlan {
    async fn bind(config: &BrokerConfig, kafka_addr: SocketAddr) -> Result<QuorumPlan, StartError> {
        let bad = |m: String| StartError::Meta(m);
        let roles = config.process_roles;
        if !roles.broker {
            // Not built yet: a controller-only node would serve no clients.
            return Err(bad(
                "process.roles=controller is not supported yet: a node runs a broker (process.roles=broker, or broker,controller)".to_string(),
            ));
        }
        let node_id = u64::try_from(config.node_id)
            .map_err(|_| bad(format!("node.id {} is negative", config.node_id)))?;
        let resolve = |host_port: &str| -> Result<SocketAddr, StartError> {
            std::net::ToSocketAddrs::to_socket_addrs(host_port)
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| bad(format!("cannot resolve the controller address {host_port}")))
        };
        let explicit = config
            .controller_listen
            .as_deref()
            .map(|l| match l.strip_prefix(':') {
                Some(port) => resolve(&format!("0.0.0.0:{port}")),
                None => resolve(l),
            })
            .transpose()?;
        if !roles.controller {
            // A broker-only node: an observer of the voters' quorum.
            let Some(v) = &config.controller_quorum_voters else {
                return Err(bad(
                    "process.roles=broker needs controller.quorum.voters: the quorum this broker joins".to_string(),
                ));
            };
            let voters = ferrite_raft::parse_voters(v).map_err(|e| bad(e.to_string()))?;
            if voters.iter().any(|v| v.id == node_id) {
                return Err(bad(format!(
                    "node.id {node_id} is in controller.quorum.voters {v}, but process.roles=broker: a voter runs the controller role (process.roles=broker,controller)"
                )));
            }
            // Its quorum listener only takes the leader's replication: an ephemeral port
            // of its own address unless given.
            let listen = explicit.unwrap_or(SocketAddr::new(kafka_addr.ip(), 0));
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|source| StartError::Listen {
                    addr: listen,
                    source,
                })?;
            let listen = listener.local_addr().map_err(|source| StartError::Listen {
                addr: listen,
                source,
            })?;
            // Reached by the leader at the advertised host (a listener on 0.0.0.0 is
            // not an address anyone can connect to).
            let host = match &config.advertised_listener {
                Some((host, _)) if listen.ip().is_unspecified() => host.clone(),
                _ => listen.ip().to_string(),
            };
            let advertised = match host.parse::<std::net::IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, listen.port()).to_string(),
                Err(_) => format!("{host}:{}", listen.port()),
            };
            return Ok(QuorumPlan {
                node_id,
                voters,
                listener,
                listen,
                sole_voter: false,
                observer: Some(advertised),
                voters_given: true,
            });
        }
        let (voters, listen, sole_voter) = match &config.controller_quorum_voters {
            Some(v) => {
                let voters = ferrite_raft::parse_voters(v).map_err(|e| bad(e.to_string()))?;
                let me = voters.iter().find(|v| v.id == node_id).ok_or_else(|| {
                    bad(format!(
                        "node.id {node_id} is not in controller.quorum.voters {v}: a node that is not a voter runs with process.roles=broker"
                    ))
                })?;
                let sole = voters.len() == 1;
                // Its address in the voter list, where observers (broker-only nodes)
                // reach it, even when it is the only voter.
                let listen = match explicit {
                    Some(a) => a,
                    None => resolve(&me.address())?,
                };
                (voters, listen, sole)
            }
            None => {
                let listen = explicit.unwrap_or(SocketAddr::new(kafka_addr.ip(), 0));
                let voter = ferrite_raft::Voter {
                    id: node_id,
                    host: listen.ip().to_string(),
                    port: listen.port(),
                };
                (vec![voter], listen, true)
            }
        };
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: listen,
                source,
            })?;
        let listen = listener.local_addr().map_err(|source| StartError::Listen {
            addr: listen,
            source,
        })?;
        Ok(QuorumPlan {
            node_id,
            voters,
            listener,
            listen,
            sole_voter,
            observer: None,
            voters_given: config.controller_quorum_voters.is_some(),
        })
    }

    /// The cluster id every node of this quorum (voters and broker-only observers)
    /// derives alike for a new data directory (there is no `kafka-storage format` step to
    /// hand them one): a name-based UUID (RFC 9562 version 5) of the voter list, sorted by
    /// id. `None` for a node that is its own quorum without `controller.quorum.voters` (a
    /// bare `ferrite server`): its id is random. Two clusters given the same voter list
    /// get the same id; `cluster.id` sets one explicitly.
    fn derived_cluster_id(&self) -> Option<String> {
        if !self.voters_given {
            return None;
        }
        Some(cluster_id_of_voters(&self.voters))
    }

    fn config(&self, dir: PathBuf) -> ferrite_raft::QuorumConfig {
        let mut voters = self.voters.clone();
        if self.sole_voter {
            // Its own address as bound (the configured port may be 0).
            for v in &mut voters {
                v.host = self.listen.ip().to_string();
                v.port = self.listen.port();
            }
        }
        let mut config = ferrite_raft::QuorumConfig::new(self.node_id, self.listen, voters, dir);
        if let Some(advertised) = &self.observer {
            config.role = ferrite_raft::QuorumRole::Observer {
                advertised: advertised.clone(),
            };
        }
        config
    }
}

/// See [`QuorumPlan::derived_cluster_id`].
fn cluster_id_of_voters(voters: &[ferrite_raft::Voter]) -> String {
    /// The namespace of Ferrite's derived cluster ids (a fixed, random UUID).
    const CLUSTER_ID_NAMESPACE: uuid::Uuid = uuid::uuid!("5b0e3c1e-8f3a-4c55-9a63-2f4d8f0c7a11");
    let mut sorted: Vec<String> = voters
        .iter()
        .map(|v| format!("{}@{}:{}", v.id, v.host.to_ascii_lowercase(), v.port))
        .collect();
    sorted.sort_unstable();
    let name = sorted.join(",");
    base64_url(uuid::Uuid::new_v5(&CLUSTER_ID_NAMESPACE, name.as_bytes()).as_bytes())
}

/// Largest index in the local quorum log (`None`: empty), read before the quorum starts:
/// the metadata follower does not reconcile partitions to an applied image older than
/// what this node already had (it would delete the logs of topics it has not re-applied
/// yet).
fn quorum_last_index(metadata_dir: &Path) -> Option<u64> {
    // Checked by `read_local` at the start already (and rewritten by an import since).
    ferrite_raft::read_local(metadata_dir, false)
        .ok()
        .and_then(|l| l.last_index)
}

/// Waits until the quorum can serve this node's metadata: a one-voter quorum elects
/// itself at once; a larger one needs a leader (the other voters may start later), so
/// this waits as long as it takes, saying so every few seconds.
async fn wait_for_quorum(
    quorum: &ferrite_raft::MetadataQuorum,
    local_last_index: Option<u64>,
) -> Result<(), StartError> {
    const NOTICE_INTERVAL: Duration = Duration::from_secs(5);
    /// A node that restarts after it was the leader starts out believing it still is
    /// (its stored vote); the first round with the other voters tells it otherwise.
    const STALE_LEADER_RETRY_MS: u64 = 100;
    let mut status = quorum.status_watch();
    loop {
        let known = status.borrow_and_update().leader_id.is_some();
        if !known {
            match tokio::time::timeout(NOTICE_INTERVAL, status.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(StartError::Quorum(ferrite_raft::QuorumError::Stopped(
                        "status channel closed".into(),
                    )))
                }
                Err(_) => tracing::info!(
                    voters = ?quorum.voters(),
                    "waiting for the metadata quorum to elect a leader"
                ),
            }
            continue;
        }
        if !quorum.status().is_active_controller {
            break;
        }
        match quorum.read_barrier().await {
            Ok(_) => return Ok(()),
            // Restarted as the leader of an old term that the others have left: wait
            // for the current leader instead of failing the start.
            Err(ferrite_raft::QuorumError::NotController { .. }) => {
                tracing::info!("this node led an older term of the metadata quorum; waiting for the current leader");
                tokio::time::sleep(Duration::from_millis(STALE_LEADER_RETRY_MS)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(index) = local_last_index {
        // A follower: at least what it had before (committed entries come with the
        // leader's next heartbeat).
        let _ = quorum.wait_applied(index, quorum.write_timeout()).await;
    }
    Ok(())
}

/// The metadata follower: every change of the applied image is reconciled into the
/// hosted partitions (the one path by which a node learns changes decided elsewhere).
/// It takes the controller's lock, so a handler's own prepare/commit/install of the same
/// change finishes first and this finds nothing left to do.
async fn follow_metadata(
    broker: std::sync::Weak<Broker>,
    quorum: Arc<ferrite_raft::MetadataQuorum>,
    mut applied: tokio::sync::watch::Receiver<ferrite_raft::AppliedImage>,
    local_last_index: Option<u64>,
) {
    loop {
        if applied.changed().await.is_err() {
            return;
        }
        let Some(broker) = broker.upgrade() else {
            return;
        };
        let _lock = broker.controller.lock().await;
        let current = applied.borrow_and_update().clone();
        let behind = match (current.raft_commit_index, local_last_index) {
            (Some(i), Some(floor)) => {
                i < floor && quorum.status().last_log_index.is_some_and(|l| l >= floor)
            }
            (None, Some(_)) => true,
            (_, None) => false,
        };
        if behind {
            continue;
        }
        if let Err(e) = broker
            .replicas
            .reconcile(&current.image, &broker.config, true)
        {
            tracing::error!(error = %e, "cannot follow a metadata change in the partition logs");
        }
    }
}

/// Imports the metadata log of a data directory written by the single-node broker into
/// a one-voter quorum: the quorum is built in `import.tmp` beside it (entries in the old
/// order, packed into Raft entries of at most `IMPORT_ENTRY_BYTES_MAX`), the old file
/// is kept as `metadata.log.pre-quorum`, and the new log replaces it by one rename, so a
/// crash at any point leaves either the old log (imported again at the next start) or
/// the complete new one.
async fn import_legacy_log(
    metadata_dir: &Path,
    contents: ferrite_metadata::log::MetadataLogContents,
    plan: &QuorumPlan,
) -> Result<(), StartError> {
    const IMPORT_ENTRY_BYTES_MAX: usize = 16 * 1024 * 1024;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StartError::DataDir { path, source }
    };
    let tmp = metadata_dir.join("import.tmp");
    if tmp.exists() {
        // An interrupted import: ours, never used.
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    let entries = contents.entries.len();
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(plan.listen.ip(), 0))
        .await
        .map_err(|source| StartError::Listen {
            addr: plan.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: plan.listen,
        source,
    })?;
    let voter = ferrite_raft::Voter {
        id: plan.node_id,
        host: addr.ip().to_string(),
        port: addr.port(),
    };
    let q = ferrite_raft::MetadataQuorum::start_with(
        ferrite_raft::QuorumConfig::new(plan.node_id, addr, vec![voter], tmp.clone()),
        Some(listener),
    )
    .await?;
    let result = async {
        wait_for_quorum(&q, None).await?;
        let mut batch: Vec<MetadataRecord> = Vec::new();
        let mut bytes = 0usize;
        for entry in contents.entries {
            let size = serde_json::to_vec(&entry).map(|v| v.len()).unwrap_or(0);
            if bytes + size > IMPORT_ENTRY_BYTES_MAX && !batch.is_empty() {
                q.write(std::mem::take(&mut batch)).await?;
                bytes = 0;
            }
            bytes += size;
            batch.extend(entry);
        }
        if !batch.is_empty() {
            q.write(batch).await?;
        }
        Ok::<(), StartError>(())
    }
    .await;
    q.shutdown().await;
    result?;
    let log = metadata_dir.join(ferrite_raft::log_store::LOG_FILE);
    let kept = metadata_dir.join("metadata.log.pre-quorum");
    std::fs::copy(&log, &kept)
        .and_then(|_| File::open(&kept)?.sync_all())
        .map_err(io(&kept))?;
    for name in std::fs::read_dir(&tmp).map_err(io(&tmp))? {
        let name = name.map_err(io(&tmp))?.file_name();
        if name != std::ffi::OsStr::new(ferrite_raft::log_store::LOG_FILE) {
            std::fs::rename(tmp.join(&name), metadata_dir.join(&name)).map_err(io(&tmp))?;
        }
    }
    File::open(metadata_dir)
        .and_then(|d| d.sync_all())
        .map_err(io(metadata_dir))?;
    // The switch: one rename.
    std::fs::rename(tmp.join(ferrite_raft::log_store::LOG_FILE), &log).map_err(io(&log))?;
    File::open(metadata_dir)
        .and_then(|d| d.sync_all())
        .map_err(io(metadata_dir))?;
    std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    tracing::info!(
        entries,
        kept = %kept.display(),
        "imported the single-node metadata log into the metadata quorum"
    );
    Ok(())
}

/// What `meta.properties` says (Kafka's KRaft format, version 1).
#[derive(Debug, Clone, PartialEq, Eq)]
struct MetaProperties {
    cluster_id: String,
}

/// Keys of a version 1 `meta.properties`, as Kafka writes them.
const META_PROPERTIES_KEYS: &[&str] = &["version", "cluster.id", "node.id", "directory.id"];

/// Reads and checks `meta.properties`, as Kafka does: version 1 only, no key it does
/// not know, a cluster id, and the node id of this broker. `None` when the file is
/// missing (the caller decides whether that is allowed).
fn read_meta_properties(path: &Path, node_id: i32) -> Result<Option<MetaProperties>, StartError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StartError::DataDir {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    parse_meta_properties(&text, node_id)
        .map(Some)
        .map_err(|reason| StartError::Meta(format!("{}: {reason}", path.display())))
}

fn parse_meta_properties(text: &str, node_id: i32) -> Result<MetaProperties, String> {
    let mut values: BTreeMap<&str, &str> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line `{line}` is not key=value"))?;
        let (key, value) = (key.trim(), value.trim());
        if !META_PROPERTIES_KEYS.contains(&key) {
            return Err(format!(
                "unknown key `{key}` (expected only {})",
                META_PROPERTIES_KEYS.join(", ")
            ));
        }
        if values.insert(key, value).is_some() {
            return Err(format!("key `{key}` appears twice"));
        }
    }
    match values.get("version") {
        Some(&"1") => {}
        Some(v) => {
            return Err(format!(
                "unsupported version {v}: only version 1 (KRaft) is understood"
            ))
        }
        None => return Err("no version".into()),
    }
    let cluster_id = values
        .get("cluster.id")
        .filter(|v| !v.is_empty())
        .ok_or("no cluster.id")?;
    let stored: i32 = values
        .get("node.id")
        .ok_or("no node.id")?
        .parse()
        .map_err(|_| "node.id is not a number".to_string())?;
    if stored != node_id {
        return Err(format!(
            "belongs to node.id {stored}, but this broker is node.id {node_id}"
        ));
    }
    Ok(MetaProperties {
        cluster_id: cluster_id.to_string(),
    })
}

/// First start in an empty directory: a new cluster id (Kafka's form: URL-safe base64 of
/// a UUID, 22 characters).
fn write_meta_properties(path: &Path, cluster_id: &str, node_id: i32) -> Result<(), StartError> {
    let dir_err = |source| StartError::DataDir {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(dir_err)?;
    }
    let body = format!("version=1\ncluster.id={cluster_id}\nnode.id={node_id}\n");
    let tmp = path.with_extension("properties.tmp");
    std::fs::write(&tmp, body)
        .and_then(|()| File::open(&tmp)?.sync_all())
        .map_err(dir_err)?;
    std::fs::rename(&tmp, path).map_err(dir_err)
}

#[allow(clippy::indexing_slicing)] // Indexes are masked to 0..64.
fn base64_url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 6 {
            bits -= 6;
            out.push(char::from(ALPHABET[((acc >> bits) & 63) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((acc << (6 - bits)) & 63) as usize]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn voter(id: u64, host: &str, port: u16) -> ferrite_raft::Voter {
        ferrite_raft::Voter {
            id,
            host: host.to_string(),
            port,
        }
    }

    #[test]
    fn voters_of_one_quorum_derive_one_cluster_id() {
        let a = cluster_id_of_voters(&[voter(1, "10.0.0.1", 9093), voter(2, "10.0.0.2", 9093)]);
        // The same list in another order (as each node may be given it) is the same id.
        let b = cluster_id_of_voters(&[voter(2, "10.0.0.2", 9093), voter(1, "10.0.0.1", 9093)]);
        assert_eq!(a, b);
        assert_eq!(a.len(), 22, "{a}");
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        // Another quorum, another id.
        let c = cluster_id_of_voters(&[voter(1, "10.0.0.1", 9093), voter(2, "10.0.0.3", 9093)]);
        assert_ne!(a, c);
    }
}
