//! The broker: the only crate with sockets and a runtime. It wires the protocol codec to
//! the request handlers, the handlers to the replica manager (storage) and the controller
//! (metadata), and runs the background tasks (retention, flushing).

pub mod config;
pub mod controller;
pub mod error;
pub mod group_manager;
pub mod handlers;
pub mod producer_ids;
pub mod recompress;
pub mod replica_fetcher;
pub mod replica_manager;
pub mod server;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use config::BrokerConfig;
use controller::Controller;
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
        let metadata_meta_path = dir
            .join(ferrite_metadata::log::METADATA_DIR)
            .join(META_PROPERTIES_FILE);
        let metadata_meta = read_meta_properties(&metadata_meta_path, config.node_id)?;
        let contents = ferrite_metadata::MetadataLog::read(&dir, clean)?;
        let image = Controller::replay(&contents.entries);
        let partition_dirs = replica_manager::partition_dirs(&dir).map_err(dir_err)?;
        let populated = !contents.entries.is_empty() || !partition_dirs.is_empty();
        let cluster_id = match (&meta, populated) {
            (Some(m), _) => Some(m.cluster_id.clone()),
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
        if contents.entries.is_empty() && !partition_dirs.is_empty() {
            let examples: Vec<String> = partition_dirs
                .iter()
                .take(3)
                .map(|d| d.path.display().to_string())
                .collect();
            return Err(StartError::Meta(format!(
                "the metadata log {} is {}, but {} partition directories exist (such as {}): without it they belong to no topic, and starting would orphan them; restore the metadata log from a backup, or move the partition directories out of {} to start an empty broker",
                contents.path.display(),
                if contents.exists { "empty" } else { "missing" },
                partition_dirs.len(),
                examples.join(", "),
                dir.display(),
            )));
        }
        let strays: Vec<&replica_manager::PartitionDir> = partition_dirs
            .iter()
            .filter(|d| !d.owned_by(&image))
            .collect();
        for t in image.topics() {
            for p in t.partitions.values() {
                let path = replica_manager::partition_dir(&dir, &t.name, p.partition);
                if p.replicas.contains(&config.node_id) && !path.exists() {
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
            None => write_new_meta_properties(&dir, config.node_id)?,
        };
        if metadata_meta.is_none() {
            // Older data directories have no copy beside the metadata log yet.
            write_meta_properties(&metadata_meta_path, &cluster_id, config.node_id)?;
        }
        let (log, entries) = contents.open()?;
        let controller = Controller::from_log(log, &entries);
        for stray in strays {
            replica_manager::set_aside_stray(stray);
        }
        replica_manager::finish_pending_deletes(&dir);
        if marker.exists() {
            std::fs::remove_file(&marker).map_err(dir_err)?;
        }
        ensure_offsets_topic(&controller, &replicas, &config).await?;
        let groups = group_manager::GroupManager::new(
            ferrite_coordinator::GroupCoordinator::new(
                config.group.clone(),
                format!("{:08x}", rand::random::<u32>()),
            ),
            config.offsets_topic_num_partitions,
        );
        let loaded = groups
            .load(&replicas)
            .map_err(|e| StartError::Meta(e.to_string()))?;
        tracing::info!(
            records = loaded,
            "group metadata and committed offsets loaded"
        );
        let advertised = config.advertised(local_addr);
        let broker = Arc::new(Broker {
            config,
            advertised,
            cluster_id,
            controller,
            replicas,
            groups,
            producer_ids: producer_ids::ProducerIdManager::default(),
            _lock: lock,
        });
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
            if retention_due && &*p.topic == group_manager::OFFSETS_TOPIC {
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

/// Creates `__consumer_offsets` on first start. Its records must outlive any time or size
/// retention, so retention is off for it.
async fn ensure_offsets_topic(
    controller: &Controller,
    replicas: &ReplicaManager,
    config: &BrokerConfig,
) -> Result<(), StartError> {
    let mut writer = controller.writer().await;
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
    let (_, records, _, _) = controller::create_topic_records(
        config,
        &image,
        group_manager::OFFSETS_TOPIC,
        config.offsets_topic_num_partitions,
        1,
        None,
        configs,
    )
    .map_err(|e| {
        StartError::Meta(format!(
            "cannot create {}: {}",
            group_manager::OFFSETS_TOPIC,
            e.message
        ))
    })?;
    let image = writer.commit(records)?;
    replicas.reconcile(&image, config, true)?;
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
fn write_new_meta_properties(dir: &Path, node_id: i32) -> Result<String, StartError> {
    let cluster_id = base64_url(uuid::Uuid::new_v4().as_bytes());
    write_meta_properties(&dir.join(META_PROPERTIES_FILE), &cluster_id, node_id)?;
    Ok(cluster_id)
}

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
