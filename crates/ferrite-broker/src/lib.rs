//! The broker: the only crate with sockets and a runtime. It wires the protocol codec to
//! the request handlers, the handlers to the replica manager (storage) and the controller
//! (metadata), and runs the background tasks (retention, flushing).

pub mod config;
pub mod controller;
pub mod error;
pub mod group_manager;
pub mod handlers;
pub mod replica_manager;
pub mod server;

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
    _lock: File,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A bound, ready broker: call [`Running::serve`] to accept connections.
pub struct Running {
    pub broker: Arc<Broker>,
    pub listener: tokio::net::TcpListener,
    pub local_addr: SocketAddr,
}

impl Broker {
    /// Opens the data directory, replays metadata, opens every partition log, binds the
    /// listener. Every failure is one clear error, not a panic.
    pub async fn start(config: BrokerConfig) -> Result<Running, StartError> {
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
        let cluster_id = read_or_create_meta(&dir, config.node_id)?;
        let marker = dir.join(CLEAN_SHUTDOWN_FILE);
        let clean = marker.exists() || fresh;
        if marker.exists() {
            std::fs::remove_file(&marker).map_err(dir_err)?;
        } else if !fresh {
            tracing::info!("no clean-shutdown marker: partition logs will be recovered");
        }
        let controller = Controller::open(&dir)?;
        let image = controller.image();
        replica_manager::remove_orphan_dirs(&dir, &image);
        let replicas = ReplicaManager::default();
        replicas.reconcile(&image, &config, clean)?;
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
        let advertised = config.advertised(local_addr);
        let broker = Arc::new(Broker {
            config,
            advertised,
            cluster_id,
            controller,
            replicas,
            groups,
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
        self.replicas.close_all()?;
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
        loop {
            ticker.tick().await;
            let now = now_ms();
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

/// `meta.properties` holds the cluster id and node id, as in Kafka; a data directory
/// written by another node id is refused.
fn read_or_create_meta(dir: &Path, node_id: i32) -> Result<String, StartError> {
    let path = dir.join(META_PROPERTIES_FILE);
    let dir_err = |source| StartError::DataDir {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mut cluster_id = None;
            let mut stored_node = None;
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("cluster.id=") {
                    cluster_id = Some(v.trim().to_string());
                }
                if let Some(v) = line.strip_prefix("node.id=") {
                    stored_node = v.trim().parse::<i32>().ok();
                }
            }
            if let Some(stored) = stored_node {
                if stored != node_id {
                    return Err(StartError::Meta(format!(
                        "{} belongs to node.id {stored}, but this broker is node.id {node_id}",
                        path.display()
                    )));
                }
            }
            cluster_id
                .ok_or_else(|| StartError::Meta(format!("{} has no cluster.id", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4();
            // Kafka's cluster ids are URL-safe base64 of a UUID (22 characters).
            let cluster_id = base64_url(id.as_bytes());
            let body = format!("version=1\ncluster.id={cluster_id}\nnode.id={node_id}\n");
            let tmp = dir.join("meta.properties.tmp");
            std::fs::write(&tmp, body).map_err(dir_err)?;
            std::fs::rename(&tmp, &path).map_err(dir_err)?;
            Ok(cluster_id)
        }
        Err(e) => Err(dir_err(e)),
    }
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
