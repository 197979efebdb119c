//! The state machine: committed entries folded into the [`MetadataImage`] with the
//! image's own `apply_all`, the one function the single node replays its log with
//! (one-way flow: log → apply → image). Each applied batch publishes the new image and
//! its log index on a watch channel ([`AppliedImage`]).
//!
//! Snapshots are the image serialized whole, with openraft's meta (last log id, last
//! membership), in `quorum.snapshot`: two frames (meta, image), written to a temporary
//! file, fsynced and renamed, so the log can be purged up to the snapshot and a lagging
//! or new voter installs it. The image is not persisted otherwise: at start it is the
//! snapshot's, and openraft re-applies the committed entries after it from the log.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ferrite_metadata::MetadataImage;
use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotId,
};
use tokio::sync::watch;

use crate::frame::{
    decode_whole, encode_frame, read_optional, tmp_path, write_file_atomically, StoreError,
    LOG_FRAME_BODY_BYTES_MAX, SNAPSHOT_BODY_BYTES_MAX,
};
use crate::log_store::storage_error;
use crate::{Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

pub const SNAPSHOT_FILE: &str = "quorum.snapshot";

/// The image as of a log index: what a caller of the quorum reads.
#[derive(Debug, Clone, Default)]
pub struct AppliedImage {
    /// Raft log index of the last committed entry folded into `image` (`None` before
    /// the first). Every committed entry up to it is in the image, none after.
    pub raft_commit_index: Option<u64>,
    pub image: Arc<MetadataImage>,
}

struct SmInner {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    image: Arc<MetadataImage>,
    snapshot: Option<StoredSnapshot>,
    /// Distinguishes snapshots built at the same log id (openraft wants unique ids).
    snapshot_seq: u64,
}

#[derive(Clone)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    /// The serialized image: what is sent to followers and written to the file.
    data: Vec<u8>,
}

/// The state machine and its snapshot builder (clones share it).
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<Mutex<SmInner>>,
    path: PathBuf,
    applied: Arc<watch::Sender<AppliedImage>>,
}

impl StateMachineStore {
    /// Opens the state machine in `dir` from its snapshot, if any. A snapshot file that
    /// does not decode is refused: it was renamed into place whole and fsynced.
    pub fn open(dir: &Path) -> Result<StateMachineStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(StoreError::io(dir))?;
        let path = dir.join(SNAPSHOT_FILE);
        let tmp = tmp_path(&path);
        if tmp.exists() {
            std::fs::remove_file(&tmp).map_err(StoreError::io(&tmp))?;
        }
        let mut inner = SmInner {
            last_applied: None,
            last_membership: StoredMembership::default(),
            image: Arc::new(MetadataImage::default()),
            snapshot: None,
            snapshot_seq: 0,
        };
        if let Some((meta, image, data)) = read_snapshot(&path)? {
            tracing::info!(snapshot = %meta, topics = image.topics().count(), "metadata snapshot loaded");
            inner.last_applied = meta.last_log_id;
            inner.last_membership = meta.last_membership.clone();
            inner.image = Arc::new(image);
            inner.snapshot = Some(StoredSnapshot { meta, data });
        }
        let (applied, _) = watch::channel(AppliedImage {
            raft_commit_index: inner.last_applied.map(|l| l.index),
            image: inner.image.clone(),
        });
        Ok(StateMachineStore {
            inner: Arc::new(Mutex::new(inner)),
            path,
            applied: Arc::new(applied),
        })
    }

    /// The applied image and its index, updated after every applied batch.
    pub fn subscribe(&self) -> watch::Receiver<AppliedImage> {
        self.applied.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, SmInner> {
        // State is only replaced whole after a successful step; a poisoned lock still
        // guards consistent state.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, inner: &SmInner) {
        self.applied.send_replace(AppliedImage {
            raft_commit_index: inner.last_applied.map(|l| l.index),
            image: inner.image.clone(),
        });
    }

    fn write_snapshot(&self, snapshot: &StoredSnapshot) -> Result<(), StoreError> {
        let meta = serde_json::to_vec(&snapshot.meta).map_err(|e| StoreError::Encode {
            what: "snapshot meta",
            reason: e.to_string(),
        })?;
        if meta.len() > LOG_FRAME_BODY_BYTES_MAX || snapshot.data.len() > SNAPSHOT_BODY_BYTES_MAX {
            return Err(StoreError::Encode {
                what: "snapshot",
                reason: format!(
                    "{} bytes, above SNAPSHOT_BODY_BYTES_MAX",
                    snapshot.data.len()
                ),
            });
        }
        let mut raw = Vec::with_capacity(meta.len() + snapshot.data.len() + 16);
        encode_frame(&meta, &mut raw);
        encode_frame(&snapshot.data, &mut raw);
        write_file_atomically(&self.path, &raw)
    }
}

/// Reads and decodes `quorum.snapshot` without changing anything: its meta, image and
/// the serialized image. A file that does not decode is corruption (it was renamed into
/// place whole and fsynced).
pub(crate) fn read_snapshot(
    path: &Path,
) -> Result<Option<(SnapshotMeta, MetadataImage, Vec<u8>)>, StoreError> {
    let Some(raw) = read_optional(path)? else {
        return Ok(None);
    };
    let corrupt = |reason: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        position: 0,
        reason,
    };
    let frames = decode_whole(&raw, 2, SNAPSHOT_BODY_BYTES_MAX, path)?;
    let (meta, data) = match frames.as_slice() {
        [meta, data] => (*meta, *data),
        _ => return Err(corrupt("not two frames".into())),
    };
    let meta: SnapshotMeta = serde_json::from_slice(meta)
        .map_err(|e| corrupt(format!("undecodable snapshot meta: {e}")))?;
    let image: MetadataImage = serde_json::from_slice(data)
        .map_err(|e| corrupt(format!("undecodable snapshot image: {e}")))?;
    Ok(Some((meta, image, data.to_vec())))
}

fn encode_image(image: &MetadataImage) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(image).map_err(|e| StoreError::Encode {
        what: "metadata image",
        reason: e.to_string(),
    })
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Copy what the snapshot needs under the lock (an Arc clone), encode outside it.
        let (last_applied, last_membership, image, seq) = {
            let mut inner = self.lock();
            inner.snapshot_seq += 1;
            (
                inner.last_applied,
                inner.last_membership.clone(),
                inner.image.clone(),
                inner.snapshot_seq,
            )
        };
        let err = |e: &StoreError| storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, e);
        let data = encode_image(&image).map_err(|e| err(&e))?;
        let snapshot_id: SnapshotId = match last_applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
            None => format!("none-{seq}"),
        };
        let stored = StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: last_applied,
                last_membership,
                snapshot_id,
            },
            data,
        };
        self.write_snapshot(&stored).map_err(|e| err(&e))?;
        tracing::info!(snapshot = %stored.meta, bytes = stored.data.len(), "metadata snapshot written");
        self.lock().snapshot = Some(stored.clone());
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let inner = self.lock();
        Ok((inner.last_applied, inner.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.lock();
        let mut responses = Vec::new();
        for entry in entries {
            match entry.payload {
                EntryPayload::Blank => {}
                // The same fold the single node's start-up replay runs.
                EntryPayload::Normal(records) => {
                    Arc::make_mut(&mut inner.image).apply_all(&records)
                }
                EntryPayload::Membership(m) => {
                    inner.last_membership = StoredMembership::new(Some(entry.log_id), m)
                }
            }
            inner.last_applied = Some(entry.log_id);
            responses.push(());
        }
        self.publish(&inner);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let err = |e: &StoreError| {
            storage_error(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                e,
            )
        };
        let image: MetadataImage = serde_json::from_slice(&data).map_err(|e| {
            err(&StoreError::Encode {
                what: "received snapshot image",
                reason: e.to_string(),
            })
        })?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        // Durable before the state machine moves: openraft purges the log up to it next.
        self.write_snapshot(&stored).map_err(|e| err(&e))?;
        tracing::info!(snapshot = %meta, topics = image.topics().count(), "metadata snapshot installed");
        let mut inner = self.lock();
        inner.last_applied = meta.last_log_id;
        inner.last_membership = meta.last_membership.clone();
        inner.image = Arc::new(image);
        inner.snapshot = Some(stored);
        self.publish(&inner);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.lock().snapshot.clone().map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::log_store::LogStore;

    struct Builder;

    impl openraft::testing::StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir>
        for Builder
    {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
            let dir = tempfile::tempdir().unwrap();
            let log = LogStore::open(dir.path()).unwrap();
            let sm = StateMachineStore::open(dir.path()).unwrap();
            Ok((dir, log, sm))
        }
    }

    /// openraft's own conformance suite for log and state-machine storage (membership
    /// recovery, purge and truncate edge cases, snapshot transfer).
    #[test]
    fn openraft_storage_suite() {
        openraft::testing::Suite::test_all(Builder).unwrap();
    }

    #[tokio::test]
    async fn snapshot_survives_reopen_and_installs_elsewhere() {
        use openraft::{CommittedLeaderId, RaftSnapshotBuilder};
        let dir = tempfile::tempdir().unwrap();
        let id = uuid::Uuid::new_v4();
        let mut sm = StateMachineStore::open(dir.path()).unwrap();
        let mut applied = sm.subscribe();
        sm.apply([Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 7),
            payload: EntryPayload::Normal(vec![
                ferrite_metadata::MetadataRecord::Topic {
                    name: "t".into(),
                    topic_id: id,
                },
                // Integer and uuid map keys must survive the JSON round trip.
                ferrite_metadata::MetadataRecord::Partition {
                    topic_id: id,
                    partition: 3,
                    replicas: vec![1, 2],
                    isr: vec![1],
                    leader: 1,
                    leader_epoch: 4,
                    partition_epoch: 5,
                },
                ferrite_metadata::MetadataRecord::TopicConfig {
                    topic_id: id,
                    key: "retention.ms".into(),
                    value: Some("9".into()),
                },
            ]),
        }])
        .await
        .unwrap();
        assert!(applied.has_changed().unwrap());
        let seen = applied.borrow_and_update().clone();
        assert_eq!(seen.raft_commit_index, Some(7));
        assert!(seen.image.topic("t").is_some());
        let snap = sm.build_snapshot().await.unwrap();
        drop(sm);

        let reopened = StateMachineStore::open(dir.path()).unwrap();
        let back = reopened.subscribe().borrow().clone();
        assert_eq!(back.raft_commit_index, Some(7));
        assert_eq!(*back.image, *seen.image);
        assert_eq!(back.image.topic_by_id(&id).unwrap().partitions.len(), 1);

        let other = tempfile::tempdir().unwrap();
        let mut follower = StateMachineStore::open(other.path()).unwrap();
        follower
            .install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        let installed = follower.subscribe().borrow().clone();
        assert_eq!(*installed.image, *seen.image);
        let (last, _) = follower.applied_state().await.unwrap();
        assert_eq!(last.map(|l| l.index), Some(7));
        // A damaged snapshot file is refused, not silently replaced by an empty image.
        let path = other.path().join(SNAPSHOT_FILE);
        let mut raw = std::fs::read(&path).unwrap();
        let last_byte = raw.len() - 2;
        if let Some(b) = raw.get_mut(last_byte) {
            *b ^= 0x01;
        }
        std::fs::write(&path, &raw).unwrap();
        assert!(StateMachineStore::open(other.path()).is_err());
    }
}
