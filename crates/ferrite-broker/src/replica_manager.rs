//! The partitions this broker hosts: their logs, leader epochs and the watch channels that
//! wake long-polling fetches. On one node every hosted partition is led here, its ISR is
//! this broker alone and the high watermark is the log end offset; the replication work
//! replaces `high_watermark` with the ISR-driven value without changing callers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
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
            let info = log.append(records, epoch, now_ms)?;
            (info, log.log_end_offset())
        };
        self.high_watermark_tx.send_replace(leo);
        Ok(info)
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

    /// Makes the hosted partitions match the image: opens logs for new partitions this
    /// node leads, updates configs and epochs, deletes logs of removed topics.
    pub fn reconcile(
        &self,
        image: &MetadataImage,
        config: &BrokerConfig,
        clean: bool,
    ) -> Result<(), StorageError> {
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
                    let (log, report) = PartitionLog::open(&dir, log_config, clean)?;
                    if report.truncated_bytes > 0 || report.recovered_segments > 0 {
                        recovered.0 += 1;
                        recovered.1 += report.recovered_segments;
                        recovered.2 += report.truncated_bytes;
                    }
                    let (tx, _) = watch::channel(log.log_end_offset());
                    let partition = Partition {
                        topic: key.0.clone(),
                        topic_id,
                        index: key.1,
                        log: Mutex::new(log),
                        leader_epoch: AtomicI32::new(epoch),
                        high_watermark_tx: tx,
                        compacted_closed_bytes: AtomicU64::new(0),
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

    /// Clean shutdown: flush every log and write its indexes.
    pub fn close_all(&self) -> Result<(), StorageError> {
        let mut first_err = None;
        for p in self.all() {
            if let Err(e) = p.log().close() {
                tracing::error!(topic = %p.topic, partition = p.index, error = %e, "close failed");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
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
        Err(e) => tracing::error!(dir = %dir.path.display(), error = %e, "cannot set aside a stray partition directory"),
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
