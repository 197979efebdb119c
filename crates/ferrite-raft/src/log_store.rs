//! The durable Raft log and vote (openraft's `RaftLogStorage`), in a directory:
//!
//! - `metadata.log` (the `LOG_FILE`): append-only frames (see [`crate::frame`]) of [`LogFrame`]s: an
//!   optional `Purged` frame first (the last log id dropped by a purge), then entries in
//!   index order without gaps.
//! - `quorum.vote`: the vote, one frame, replaced atomically.
//! - `quorum.committed`: the last committed log id, one frame, replaced atomically.
//!
//! Nothing is reported saved before it is fsynced: `append` calls its callback only after
//! `sync_data`, `save_vote` returns only after the vote file and its directory are
//! fsynced (the known trap: a node that acknowledges a vote or an entry before fsync
//! can vote twice in a term or lose committed entries after a crash). At open, a torn
//! last frame is dropped (it was never reported saved); a bad frame with valid frames
//! after it is corruption and the store refuses to open.
//!
//! Entries are also kept in memory (the log is bounded by snapshots and purges), so
//! readers never touch the file. The file and memory are updated under one lock; all
//! writes are serialized by openraft already.
//!
//! The I/O is synchronous on the calling task: metadata writes are rare and small, and
//! openraft waits for each storage call anyway. A simulation will need it behind a seam.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogReader, StorageIOError,
};
use serde::{Deserialize, Serialize};

use crate::frame::{
    decode_frames, decode_whole, encode_frame, read_optional, tmp_path, write_file_atomically,
    StoreError, LOG_FRAME_BODY_BYTES_MAX,
};
use crate::{Entry, LogId, StorageError, TypeConfig, Vote};

pub const LOG_FILE: &str = "metadata.log";
pub const VOTE_FILE: &str = "quorum.vote";
pub const COMMITTED_FILE: &str = "quorum.committed";

/// One frame of `metadata.log`. Externally tagged (`{"entry":{...}}`): serde's internally
/// tagged enums buffer their content and then cannot read the integer map keys of a
/// membership entry back.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LogFrame {
    /// Every entry up to and including this log id was purged (it is in a snapshot).
    Purged {
        log_id: LogId,
    },
    Entry {
        entry: Entry,
    },
}

struct LogInner {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// Bytes of the file that hold valid frames; appends go here.
    file_len: u64,
    entries: BTreeMap<u64, Entry>,
    /// Byte position of each entry's frame, for truncation.
    positions: BTreeMap<u64, u64>,
    last_purged: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
}

/// The log store. Cloning shares it (openraft's log readers are clones).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<LogInner>>,
}

impl LogStore {
    /// Opens (creating if needed) the log in `dir`, dropping a torn tail and refusing
    /// corruption.
    pub fn open(dir: &Path) -> Result<LogStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(StoreError::io(dir))?;
        let path = dir.join(LOG_FILE);
        for leftover in [LOG_FILE, VOTE_FILE, COMMITTED_FILE] {
            // An interrupted atomic write; the file it would have replaced is intact.
            let tmp = tmp_path(&dir.join(leftover));
            if tmp.exists() {
                std::fs::remove_file(&tmp).map_err(StoreError::io(&tmp))?;
            }
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(StoreError::io(&path))?;
        let mut raw = Vec::new();
        file.read_to_end(&mut raw).map_err(StoreError::io(&path))?;
        let decoded = decode_frames(&raw, LOG_FRAME_BODY_BYTES_MAX, &path)?;
        let corrupt = |position: u64, reason: String| StoreError::Corrupt {
            path: path.clone(),
            position,
            reason,
        };
        let mut entries = BTreeMap::new();
        let mut positions = BTreeMap::new();
        let mut last_purged = None;
        let mut expected_index: Option<u64> = None;
        for (i, frame) in decoded.frames.iter().enumerate() {
            let parsed: LogFrame = serde_json::from_slice(frame.body)
                .map_err(|e| corrupt(frame.position, format!("undecodable frame: {e}")))?;
            match parsed {
                LogFrame::Purged { log_id } if i == 0 => {
                    expected_index = Some(log_id.index + 1);
                    last_purged = Some(log_id);
                }
                LogFrame::Purged { .. } => {
                    return Err(corrupt(frame.position, "purge marker not first".into()))
                }
                LogFrame::Entry { entry } => {
                    let index = entry.log_id.index;
                    if expected_index.is_some_and(|e| e != index) {
                        return Err(corrupt(
                            frame.position,
                            format!("entry {index} where {expected_index:?} was expected"),
                        ));
                    }
                    expected_index = Some(index + 1);
                    positions.insert(index, frame.position);
                    entries.insert(index, entry);
                }
            }
        }
        if let Some(reason) = &decoded.torn {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = raw.len() - decoded.valid_len,
                reason,
                "dropping the torn tail of the quorum log (never reported saved)"
            );
            file.set_len(decoded.valid_len as u64)
                .map_err(StoreError::io(&path))?;
            file.sync_all().map_err(StoreError::io(&path))?;
        }
        let vote = read_single::<Vote>(&dir.join(VOTE_FILE))?;
        let committed = read_single::<LogId>(&dir.join(COMMITTED_FILE))?;
        let last_log = entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(last_purged);
        if committed.is_some_and(|c| Some(c.index) > last_log.map(|l| l.index)) {
            // Committed entries are fsynced before they count as committed; missing ones
            // mean the log lost acknowledged data.
            return Err(corrupt(
                decoded.valid_len as u64,
                format!("committed {committed:?} is beyond the last log entry {last_log:?}"),
            ));
        }
        Ok(LogStore {
            inner: Arc::new(Mutex::new(LogInner {
                dir: dir.to_path_buf(),
                path,
                file,
                file_len: decoded.valid_len as u64,
                entries,
                positions,
                last_purged,
                vote,
                committed,
            })),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LogInner> {
        // A panic while holding the lock is a bug already reported; the state it guards
        // is only changed after the file write succeeded, so it is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn read_single<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, StoreError> {
    let Some(raw) = read_optional(path)? else {
        return Ok(None);
    };
    let bodies = decode_whole(&raw, 1, 4096, path)?;
    let body = bodies.first().ok_or_else(|| StoreError::Corrupt {
        path: path.to_path_buf(),
        position: 0,
        reason: "empty".into(),
    })?;
    serde_json::from_slice(body)
        .map(Some)
        .map_err(|e| StoreError::Corrupt {
            path: path.to_path_buf(),
            position: 0,
            reason: format!("undecodable: {e}"),
        })
}

fn write_single<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let body = serde_json::to_vec(value).map_err(|e| StoreError::Encode {
        what: "quorum state",
        reason: e.to_string(),
    })?;
    let mut raw = Vec::new();
    encode_frame(&body, &mut raw);
    write_file_atomically(path, &raw)
}

fn encode_log_frame(frame: &LogFrame, out: &mut Vec<u8>) -> Result<(), StoreError> {
    let body = serde_json::to_vec(frame).map_err(|e| StoreError::Encode {
        what: "log entry",
        reason: e.to_string(),
    })?;
    if body.len() > LOG_FRAME_BODY_BYTES_MAX {
        return Err(StoreError::Encode {
            what: "log entry",
            reason: format!(
                "{} bytes, above LOG_FRAME_BODY_BYTES_MAX ({LOG_FRAME_BODY_BYTES_MAX})",
                body.len()
            ),
        });
    }
    encode_frame(&body, out);
    Ok(())
}

/// openraft's error for a failed store operation.
pub(crate) fn storage_error(
    subject: ErrorSubject<crate::NodeId>,
    verb: ErrorVerb,
    e: &StoreError,
) -> StorageError {
    StorageError::IO {
        source: StorageIOError::new(subject, verb, AnyError::new(e)),
    }
}

impl LogInner {
    fn last_log_id(&self) -> Option<LogId> {
        self.entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(self.last_purged)
    }

    fn append(&mut self, entries: Vec<Entry>) -> Result<(), StoreError> {
        let mut buf = Vec::new();
        let mut positions = Vec::with_capacity(entries.len());
        for entry in &entries {
            positions.push(self.file_len + buf.len() as u64);
            encode_log_frame(
                &LogFrame::Entry {
                    entry: entry.clone(),
                },
                &mut buf,
            )?;
        }
        let path = self.path.clone();
        let io = StoreError::io(&path);
        // Positional write at the end of the valid prefix, then fsync: only after that
        // is the append reported (by the caller's callback).
        write_at(&self.file, &buf, self.file_len)
            .and_then(|()| self.file.sync_data())
            .map_err(io)?;
        self.file_len += buf.len() as u64;
        for (entry, pos) in entries.into_iter().zip(positions) {
            let index = entry.log_id.index;
            self.positions.insert(index, pos);
            self.entries.insert(index, entry);
        }
        Ok(())
    }

    /// Drops entries from `index` on (a leader overwrote them).
    fn truncate(&mut self, index: u64) -> Result<(), StoreError> {
        let Some(&pos) = self.positions.get(&index) else {
            // Nothing at or after `index` (openraft may truncate past the end).
            if self.entries.range(index..).next().is_none() {
                return Ok(());
            }
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                position: self.file_len,
                reason: format!("entry {index} has no recorded position"),
            });
        };
        let io = StoreError::io(&self.path);
        self.file
            .set_len(pos)
            .and_then(|()| self.file.sync_data())
            .map_err(io)?;
        self.file_len = pos;
        self.entries.split_off(&index);
        self.positions.split_off(&index);
        Ok(())
    }

    /// Drops entries up to and including `log_id` (they are in a snapshot) by rewriting
    /// the file as a purge marker plus the entries that stay, atomically.
    fn purge(&mut self, log_id: LogId) -> Result<(), StoreError> {
        let keep: BTreeMap<u64, Entry> = self
            .entries
            .range(log_id.index + 1..)
            .map(|(i, e)| (*i, e.clone()))
            .collect();
        let mut buf = Vec::new();
        encode_log_frame(&LogFrame::Purged { log_id }, &mut buf)?;
        let mut positions = BTreeMap::new();
        for (index, entry) in &keep {
            positions.insert(*index, buf.len() as u64);
            encode_log_frame(
                &LogFrame::Entry {
                    entry: entry.clone(),
                },
                &mut buf,
            )?;
        }
        write_file_atomically(&self.path, &buf)?;
        self.file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(StoreError::io(&self.path))?;
        self.file_len = buf.len() as u64;
        self.entries = keep;
        self.positions = positions;
        self.last_purged = Some(log_id);
        Ok(())
    }
}

fn write_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(buf, offset)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let inner = self.lock();
        Ok(inner.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let inner = self.lock();
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: inner.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let mut inner = self.lock();
        let path = inner.dir.join(VOTE_FILE);
        write_single(&path, vote)
            .map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Write, &e))?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.lock().vote)
    }

    /// Saved so that a restarted node re-applies its committed entries at once and has
    /// its image before it hears from a leader. Not fsynced: losing it only delays that.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let mut inner = self.lock();
        if inner.committed == committed {
            return Ok(());
        }
        let path = inner.dir.join(COMMITTED_FILE);
        let body = serde_json::to_vec(&committed).map_err(|e| {
            let e = StoreError::Encode {
                what: "committed log id",
                reason: e.to_string(),
            };
            storage_error(ErrorSubject::Store, ErrorVerb::Write, &e)
        })?;
        let mut raw = Vec::new();
        encode_frame(&body, &mut raw);
        let tmp = tmp_path(&path);
        std::fs::write(&tmp, &raw)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| {
                storage_error(
                    ErrorSubject::Store,
                    ErrorVerb::Write,
                    &StoreError::io(&path)(e),
                )
            })?;
        inner.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let result = self.lock().append(entries);
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(storage_error(ErrorSubject::Logs, ErrorVerb::Write, &e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.lock()
            .truncate(log_id.index)
            .map_err(|e| storage_error(ErrorSubject::Log(log_id), ErrorVerb::Delete, &e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.lock()
            .purge(log_id)
            .map_err(|e| storage_error(ErrorSubject::Log(log_id), ErrorVerb::Delete, &e))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use openraft::storage::RaftLogStorageExt;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(vec![ferrite_metadata::MetadataRecord::RemoveTopic {
                topic_id: uuid::Uuid::nil(),
            }]),
        }
    }

    fn indexes(store: &LogStore) -> Vec<u64> {
        store.lock().entries.keys().copied().collect()
    }

    #[tokio::test]
    async fn entries_vote_and_purge_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = LogStore::open(dir.path()).unwrap();
            s.blocking_append((1..=5).map(|i| entry(1, i)))
                .await
                .unwrap();
            s.save_vote(&Vote::new(3, 2)).await.unwrap();
            s.truncate(LogId::new(CommittedLeaderId::new(1, 1), 4))
                .await
                .unwrap();
            s.blocking_append([entry(2, 4)]).await.unwrap();
            s.purge(LogId::new(CommittedLeaderId::new(1, 1), 2))
                .await
                .unwrap();
            s.blocking_append([entry(2, 5)]).await.unwrap();
            // A membership entry (integer map keys) must read back too.
            let members: std::collections::BTreeMap<u64, openraft::BasicNode> = [(
                1,
                openraft::BasicNode {
                    addr: "127.0.0.1:1".into(),
                },
            )]
            .into();
            s.blocking_append([Entry {
                log_id: LogId::new(CommittedLeaderId::new(2, 1), 6),
                payload: EntryPayload::Membership(openraft::Membership::from(members)),
            }])
            .await
            .unwrap();
        }
        let mut s = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&s), vec![3, 4, 5, 6]);
        assert_eq!(s.read_vote().await.unwrap(), Some(Vote::new(3, 2)));
        let state = s.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.unwrap().index, 2);
        assert_eq!(state.last_log_id.unwrap().index, 6);
        let got = s.try_get_log_entries(4..6).await.unwrap();
        assert_eq!(
            got.iter().map(|e| e.log_id).collect::<Vec<_>>(),
            vec![entry(2, 4).log_id, entry(2, 5).log_id]
        );
        // A purge past the end leaves an empty log that still knows where it stands.
        s.purge(LogId::new(CommittedLeaderId::new(2, 1), 9))
            .await
            .unwrap();
        drop(s);
        let mut s = LogStore::open(dir.path()).unwrap();
        assert!(indexes(&s).is_empty());
        assert_eq!(
            s.get_log_state().await.unwrap().last_log_id.unwrap().index,
            9
        );
        s.blocking_append([entry(3, 10)]).await.unwrap();
    }

    #[tokio::test]
    async fn torn_tail_dropped_and_mid_file_corruption_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = LogStore::open(dir.path()).unwrap();
            s.blocking_append((1..=3).map(|i| entry(1, i)))
                .await
                .unwrap();
        }
        let path = dir.path().join(LOG_FILE);
        let full = std::fs::read(&path).unwrap();
        // A crash in the middle of appending entry 4: any prefix of its frame.
        let mut torn_frame = Vec::new();
        encode_log_frame(&LogFrame::Entry { entry: entry(1, 4) }, &mut torn_frame).unwrap();
        for cut in [1, 7, 8, 20, torn_frame.len() - 1] {
            let mut raw = full.clone();
            raw.extend_from_slice(&torn_frame[..cut]);
            std::fs::write(&path, &raw).unwrap();
            let mut s = LogStore::open(dir.path()).unwrap();
            assert_eq!(indexes(&s), vec![1, 2, 3], "cut {cut}");
            assert_eq!(std::fs::metadata(&path).unwrap().len(), full.len() as u64);
            // Appends continue where the valid prefix ends.
            s.blocking_append([entry(1, 4)]).await.unwrap();
            drop(s);
            assert_eq!(
                indexes(&LogStore::open(dir.path()).unwrap()),
                vec![1, 2, 3, 4]
            );
            std::fs::write(&path, &full).unwrap();
        }
        // A flipped byte inside entry 1, with entries 2 and 3 intact after it.
        let mut bad = full.clone();
        bad[20] ^= 0x01;
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            LogStore::open(dir.path()),
            Err(StoreError::Corrupt { position: 0, .. })
        ));
        // A damaged vote file is refused too: it was renamed into place whole.
        std::fs::write(&path, &full).unwrap();
        std::fs::write(dir.path().join(VOTE_FILE), b"\0\0\0\x05garbage").unwrap();
        assert!(LogStore::open(dir.path()).is_err());
    }
}
