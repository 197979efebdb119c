//! The partitions this broker hosts: their logs, leader epochs and the watch channels that
//! wake long-polling fetches. On one node every hosted partition is led here, its ISR is
//! this broker alone and the high watermark is the log end offset; the replication work
//! replaces `high_watermark` with the ISR-driven value without changing callers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use ferrite_metadata::MetadataImage;
use ferrite_storage::{AppendInfo, LogConfig, PartitionLog, ReadPlan, StorageError};
use tokio::sync::watch;
use uuid::Uuid;

use crate::config::BrokerConfig;

pub type TopicPartition = (Arc<str>, i32);

pub struct Partition {
    pub topic: Arc<str>,
    pub topic_id: Uuid,
    pub index: i32,
    log: Mutex<PartitionLog>,
    leader_epoch: AtomicI32,
    /// The high watermark, published after every append for long-polling fetches.
    high_watermark_tx: watch::Sender<i64>,
    /// Closed-segment bytes after the last compaction pass; no new pass until they grow.
    pub compacted_closed_bytes: AtomicU64,
    /// Shared by every partition of the log directory: whether it is full.
    log_dir_full: Arc<AtomicBool>,
}

impl Partition {
    /// The log, even if a thread panicked while holding it: the log's own invariants are
    /// checked by assertions, and a poisoned mutex must not take the broker down.
    pub fn log(&self) -> MutexGuard<'_, PartitionLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn leader_epoch(&self) -> i32 {
        self.leader_epoch.load(Ordering::Acquire)
    }

    pub fn append(&self, records: &[u8], now_ms: i64) -> Result<AppendInfo, StorageError> {
        let epoch = self.leader_epoch();
        let (info, leo) = {
            let mut log = self.log();
            let info = log.append(records, epoch, now_ms);
            self.note_disk_space(&log, &info);
            (info?, log.log_end_offset())
        };
        self.high_watermark_tx.send_replace(leo);
        Ok(info)
    }

    /// One WARN when the log directory fills up and one when an append succeeds again,
    /// however many produce requests fail in between.
    fn note_disk_space<T>(&self, log: &PartitionLog, result: &Result<T, StorageError>) {
        match result {
            Err(e) if e.is_disk_full() => {
                if !self.log_dir_full.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        log_dir = %log.dir().parent().unwrap_or(log.dir()).display(),
                        error = %e,
                        "log directory is full: produce answers KAFKA_STORAGE_ERROR and group changes are refused until space is freed; reads go on"
                    );
                }
            }
            Ok(_) => {
                if self.log_dir_full.load(Ordering::Acquire)
                    && self.log_dir_full.swap(false, Ordering::AcqRel)
                {
                    tracing::warn!(
                        log_dir = %log.dir().parent().unwrap_or(log.dir()).display(),
                        "log directory has space again: appends succeed"
                    );
                }
            }
            Err(_) => {}
        }
    }

    pub fn high_watermark(&self) -> i64 {
        *self.high_watermark_tx.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.high_watermark_tx.subscribe()
    }

    /// `(log_start_offset, high_watermark, read plan)` taken under one lock.
    pub fn read_plan(
        &self,
        fetch_offset: i64,
    ) -> (i64, i64, Result<Option<ReadPlan>, StorageError>) {
        let log = self.log();
        let hw = log.log_end_offset();
        (log.log_start_offset(), hw, log.read_plan(fetch_offset))
    }
}

#[derive(Default)]
pub struct ReplicaManager {
    partitions: RwLock<HashMap<TopicPartition, Arc<Partition>>>,
    log_dir_full: Arc<AtomicBool>,
}

/// Logs opened for partitions an admin change is about to add, before the change is
/// committed: if any cannot be opened (a full disk, no descriptors left), none is kept
/// and nothing is committed.
#[derive(Default)]
pub struct Prepared {
    logs: HashMap<TopicPartition, (PartitionLog, bool)>,
}

impl Prepared {
    /// Closes the logs and removes the directories this preparation created (they are
    /// new and empty: no data of anyone's is lost).
    pub fn discard(self) {
        for (_, (log, created)) in self.logs {
            let dir = log.dir().to_path_buf();
            drop(log);
            if created {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::error!(dir = %dir.display(), error = %e, "cannot remove a partition directory of a failed admin change");
                }
            }
        }
    }
}

/// File descriptors kept free beyond one per partition log: connections, segment rolls,
/// index and checkpoint writes, the metadata log.
pub const FILE_DESCRIPTORS_RESERVED: u64 = 1024;

/// `(open descriptors, soft RLIMIT_NOFILE)` of this process, when they can be read.
pub fn file_descriptors() -> Option<(u64, u64)> {
    let open = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current?;
    Some((open, limit))
}

impl ReplicaManager {
    pub fn get(&self, topic: &str, partition: i32) -> Option<Arc<Partition>> {
        let map = self.partitions.read().unwrap_or_else(|p| p.into_inner());
        map.get(&(Arc::from(topic), partition)).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Partition>> {
        let map = self.partitions.read().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    fn wanted(
        image: &MetadataImage,
        config: &BrokerConfig,
    ) -> HashMap<TopicPartition, (Uuid, i32, LogConfig)> {
        let mut wanted: HashMap<TopicPartition, (Uuid, i32, LogConfig)> = HashMap::new();
        for topic in image.topics() {
            let mut log_config = config.log_config(&topic.configs);
            // The offsets topic is the one compacted log (see group_manager).
            log_config.compacted = topic.name == crate::group_manager::OFFSETS_TOPIC;
            let name: Arc<str> = Arc::from(topic.name.as_str());
            for p in topic.partitions.values() {
                if p.replicas.contains(&config.node_id) {
                    wanted.insert(
                        (name.clone(), p.partition),
                        (topic.topic_id, p.leader_epoch, log_config.clone()),
                    );
                }
            }
        }
        wanted
    }

    /// Opens the logs of partitions that `next` adds and this broker does not host yet,
    /// before `next` is committed. Refuses, before opening anything, a change that
    /// would need more file descriptors than the process may open. All or nothing.
    pub fn prepare(
        &self,
        next: &MetadataImage,
        config: &BrokerConfig,
    ) -> Result<Prepared, crate::controller::AdminError> {
        let new: Vec<(TopicPartition, LogConfig)> = {
            let map = self.partitions.read().unwrap_or_else(|p| p.into_inner());
            Self::wanted(next, config)
                .into_iter()
                .filter(|(k, _)| !map.contains_key(k))
                .map(|(k, (_, _, c))| (k, c))
                .collect()
        };
        if new.is_empty() {
            return Ok(Prepared::default());
        }
        if let Some((open, limit)) = file_descriptors() {
            let needed = open
                .saturating_add(new.len() as u64)
                .saturating_add(FILE_DESCRIPTORS_RESERVED);
            if needed > limit {
                let can_add = limit.saturating_sub(open.saturating_add(FILE_DESCRIPTORS_RESERVED));
                let message = format!(
                    "this broker cannot hold {} more partitions: each needs an open file, {open} of the process's {limit} file descriptors (RLIMIT_NOFILE) are in use and {FILE_DESCRIPTORS_RESERVED} are kept for connections; at most {can_add} more fit. Raise `ulimit -n` (the hard limit) and restart, or create fewer partitions",
                    new.len()
                );
                tracing::warn!("{message}");
                return Err(crate::controller::AdminError::new(
                    kafka_protocol::ResponseError::InvalidPartitions,
                    message,
                ));
            }
        }
        let mut prepared = Prepared::default();
        for (key, log_config) in new {
            let dir = partition_dir(&config.data_dir, &key.0, key.1);
            let created = !dir.exists();
            match PartitionLog::open(&dir, log_config, true) {
                Ok((log, _)) => {
                    prepared.logs.insert(key, (log, created));
                }
                Err(e) => {
                    if created {
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                    prepared.discard();
                    tracing::error!(topic = %key.0, partition = key.1, error = %e, "cannot create a partition log; the admin change is not made");
                    return Err(crate::controller::AdminError {
                        code: crate::error::storage_error_code(&e),
                        message: format!("cannot create partition {}-{}: {e}", key.0, key.1),
                    });
                }
            }
        }
        Ok(prepared)
    }

    /// Makes the hosted partitions match the image: opens logs for new partitions this
    /// node leads, updates configs and epochs, deletes logs of removed topics.
    pub fn reconcile(
        &self,
        image: &MetadataImage,
        config: &BrokerConfig,
        clean: bool,
    ) -> Result<(), StorageError> {
        self.install(image, config, clean, Prepared::default())
    }

    /// [`ReplicaManager::reconcile`] that takes new partitions' logs from `prepared`.
    pub fn install(
        &self,
        image: &MetadataImage,
        config: &BrokerConfig,
        clean: bool,
        mut prepared: Prepared,
    ) -> Result<(), StorageError> {
        let wanted = Self::wanted(image, config);
        let mut map = self.partitions.write().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<TopicPartition> = map
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(p) = map.remove(&key) {
                let dir = p.log().dir().to_path_buf();
                tracing::info!(topic = %key.0, partition = key.1, "deleting partition log");
                delete_partition_dir(&dir);
            }
        }
        // (partitions, segments checked, bytes truncated): one summary line, not one per
        // partition.
        let mut recovered = (0usize, 0usize, 0u64);
        for (key, (topic_id, epoch, log_config)) in wanted {
            match map.get(&key) {
                Some(p) if p.topic_id == topic_id => {
                    p.leader_epoch.store(epoch, Ordering::Release);
                    let mut log = p.log();
                    if *log.config() != log_config {
                        log.set_config(log_config);
                    }
                }
                existing => {
                    let dir = partition_dir(&config.data_dir, &key.0, key.1);
                    if existing.is_some() {
                        // The topic was deleted and created again under the same name.
                        delete_partition_dir(&dir);
                    }
                    let log = match prepared.logs.remove(&key) {
                        Some((log, _)) if existing.is_none() => log,
                        _ => {
                            let (log, report) = PartitionLog::open(&dir, log_config, clean)?;
                            if report.truncated_bytes > 0 || report.recovered_segments > 0 {
                                recovered.0 += 1;
                                recovered.1 += report.recovered_segments;
                                recovered.2 += report.truncated_bytes;
                            }
                            log
                        }
                    };
                    let (tx, _) = watch::channel(log.log_end_offset());
                    let partition = Partition {
                        topic: key.0.clone(),
                        topic_id,
                        index: key.1,
                        log: Mutex::new(log),
                        leader_epoch: AtomicI32::new(epoch),
                        high_watermark_tx: tx,
                        compacted_closed_bytes: AtomicU64::new(0),
                        log_dir_full: self.log_dir_full.clone(),
                    };
                    map.insert(key, Arc::new(partition));
                }
            }
        }
        if recovered.0 > 0 {
            tracing::info!(
                partitions = recovered.0,
                segments = recovered.1,
                truncated_bytes = recovered.2,
                "recovered partition logs"
            );
        }
        Ok(())
    }

    /// Whether the log directory was full at the last append.
    pub fn log_dir_full(&self) -> bool {
        self.log_dir_full.load(Ordering::Acquire)
    }

    /// Clean shutdown: write every log's indexes, make everything durable with one
    /// `syncfs(2)` of the data directory's filesystem (one fsync per file took 1.3 ms
    /// per partition, 25 s at 19,000 partitions), then record each log's recovery point
    /// and sync again. The caller writes the clean-shutdown marker only after this.
    pub fn close_all(&self, data_dir: &Path) -> Result<(), StorageError> {
        let all = self.all();
        let mut first_err = None;
        for p in &all {
            if let Err(e) = p.log().close_unsynced() {
                tracing::error!(topic = %p.topic, partition = p.index, error = %e, "close failed");
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let sync = || -> Result<(), StorageError> {
            let dir = std::fs::File::open(data_dir).map_err(|e| StorageError::Io {
                path: data_dir.to_path_buf(),
                source: e,
            })?;
            rustix::fs::syncfs(&dir).map_err(|e| StorageError::Io {
                path: data_dir.to_path_buf(),
                source: e.into(),
            })
        };
        sync()?;
        for p in &all {
            if let Err(e) = p.log().mark_closed() {
                tracing::error!(topic = %p.topic, partition = p.index, error = %e, "checkpoint at close failed");
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        sync()
    }
}

/// A directory of the data directory named like a partition log (`<topic>-<n>`).
#[derive(Debug, Clone)]
pub struct PartitionDir {
    pub path: PathBuf,
    pub topic: String,
    pub partition: i32,
}

impl PartitionDir {
    pub fn owned_by(&self, image: &MetadataImage) -> bool {
        image
            .topic(&self.topic)
            .is_some_and(|t| t.partitions.contains_key(&self.partition))
    }
}

/// Suffix of a partition directory whose topic was deleted (renamed at DeleteTopics,
/// then removed; a crash in between leaves it for the next start to remove).
const DELETE_SUFFIX: &str = "-delete";
/// Suffix of a partition directory no topic owns, set aside at start (Kafka 3.7+'s name).
const STRAY_SUFFIX: &str = "-stray";

/// The partition-like directories of `data_dir`. Set-aside (`-stray`) and deleted
/// (`-delete`) ones do not parse as partitions, so they are not listed.
pub fn partition_dirs(data_dir: &Path) -> std::io::Result<Vec<PartitionDir>> {
    let entries = match std::fs::read_dir(data_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if !path.is_dir() {
            continue;
        }
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some((topic, partition)) = name.rsplit_once('-') else {
            continue;
        };
        let Ok(partition) = partition.parse::<i32>() else {
            continue;
        };
        if partition < 0 || crate::config::validate_topic_name(topic).is_err() {
            continue;
        }
        out.push(PartitionDir {
            topic: topic.to_string(),
            partition,
            path,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Sets aside a partition directory that no topic owns, as Kafka 3.7+ does with stray
/// logs: renamed to `<topic>-<n>.<uuid>-stray`, kept, and reported. Ferrite cannot tell a
/// deleted topic's leftovers from data whose metadata was lost, so it keeps both.
pub fn set_aside_stray(dir: &PartitionDir) {
    let Some(name) = dir.path.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let to = dir
        .path
        .with_file_name(format!("{name}.{}{STRAY_SUFFIX}", Uuid::new_v4().simple()));
    match std::fs::rename(&dir.path, &to) {
        Ok(()) => tracing::warn!(
            dir = %dir.path.display(), kept_as = %to.display(),
            "partition directory of a topic the metadata does not know: set aside, not deleted; delete it if the topic was deleted on purpose, or restore the metadata log"
        ),
        Err(e) => {
            tracing::error!(dir = %dir.path.display(), error = %e, "cannot set aside a stray partition directory")
        }
    }
}

/// Removes directories renamed at DeleteTopics whose removal a crash interrupted: the
/// metadata log says these topics are gone, so their data is accounted for.
pub fn finish_pending_deletes(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for path in entries.flatten().map(|e| e.path()) {
        let deleted = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(DELETE_SUFFIX));
        if deleted && path.is_dir() {
            tracing::info!(dir = %path.display(), "removing the directory of a deleted topic");
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::error!(dir = %path.display(), error = %e, "cannot remove the directory of a deleted topic");
            }
        }
    }
}

/// Deletes a partition directory of a deleted topic: renamed first (one atomic step that
/// takes it out of the log set), then removed.
fn delete_partition_dir(dir: &Path) {
    let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let to = dir.with_file_name(format!("{name}.{}{DELETE_SUFFIX}", Uuid::new_v4().simple()));
    let target = match std::fs::rename(dir, &to) {
        Ok(()) => to,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot rename partition directory for deletion");
            dir.to_path_buf()
        }
    };
    if let Err(e) = std::fs::remove_dir_all(&target) {
        tracing::error!(dir = %target.display(), error = %e, "cannot delete partition directory");
    }
}

pub fn partition_dir(data_dir: &Path, topic: &str, partition: i32) -> PathBuf {
    data_dir.join(format!("{topic}-{partition}"))
}
