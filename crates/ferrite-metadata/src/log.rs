//! The metadata log on one node: `<data-dir>/__cluster_metadata/metadata.log`, a sequence
//! of entries `[length u32 BE][crc32c u32 BE][JSON array of records]`. One entry is one
//! atomic change (CreateTopics writes the topic, its partitions and configs together).
//! Every append is fsynced before the change is applied or acknowledged, and a failed
//! append is cut back. At open after a crash, a torn or corrupt last entry is dropped (it
//! was never acknowledged); after a clean shutdown it is corruption, and corruption
//! followed by valid entries is always reported, since dropping it would lose
//! acknowledged changes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::records::MetadataRecord;

pub const METADATA_DIR: &str = "__cluster_metadata";
const LOG_FILE: &str = "metadata.log";
const ENTRY_HEADER_BYTES: usize = 8;
/// Largest single metadata entry; a CreateTopics of thousands of partitions fits easily.
pub const METADATA_ENTRY_BYTES_MAX: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MetadataLogError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "metadata log {path} is corrupt at byte {position} and valid entries follow: {reason}"
    )]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: String,
    },
    #[error(
        "metadata log {0} ends in a failed write that could not be cut back; restart the broker"
    )]
    Broken(PathBuf),
    #[error("cannot encode metadata records: {0}")]
    Encode(String),
}

pub struct MetadataLog {
    path: PathBuf,
    file: File,
    /// Length of the valid entries on disk; a failed append is cut back to it.
    len: u64,
    /// Set when a failed append could not be cut back: the file may end in a partial
    /// entry, so nothing more is appended until a restart looks at it.
    broken: bool,
}

/// The metadata log as read at start-up, before anything is written: `read` never
/// changes the data directory, so a start that fails later leaves it as it was.
#[derive(Debug)]
pub struct MetadataLogContents {
    pub path: PathBuf,
    /// Every committed change in order, for replay.
    pub entries: Vec<Vec<MetadataRecord>>,
    /// Whether `metadata.log` exists at all.
    pub exists: bool,
    valid_len: usize,
    raw_len: usize,
}

impl MetadataLogContents {
    /// Bytes after the last valid entry: a torn, never acknowledged last write.
    pub fn torn_tail_bytes(&self) -> usize {
        self.raw_len - self.valid_len
    }

    /// Creates the log if needed and cuts a torn tail; returns the log for appends.
    pub fn open(self) -> Result<(MetadataLog, Vec<Vec<MetadataRecord>>), MetadataLogError> {
        let dir = self
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        std::fs::create_dir_all(&dir).map_err(|e| MetadataLogError::Io {
            path: dir.clone(),
            source: e,
        })?;
        let path = self.path;
        let io = |e| MetadataLogError::Io {
            path: path.clone(),
            source: e,
        };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io)?;
        if self.valid_len < self.raw_len {
            tracing::warn!(path = %path.display(), dropped_bytes = self.raw_len - self.valid_len, "dropping the torn tail of the metadata log (a write that was never acknowledged)");
            file.set_len(self.valid_len as u64).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        Ok((
            MetadataLog {
                path,
                file,
                len: self.valid_len as u64,
                broken: false,
            },
            self.entries,
        ))
    }
}

impl MetadataLog {
    /// Opens (creating if needed) the log under `data_dir` and returns every committed
    /// change in order, for replay. A torn last entry is dropped (see [`MetadataLog::read`]
    /// for the start-up path that refuses it after a clean shutdown).
    pub fn open(
        data_dir: &Path,
    ) -> Result<(MetadataLog, Vec<Vec<MetadataRecord>>), MetadataLogError> {
        MetadataLog::read(data_dir, false)?.open()
    }

    /// Reads and checks the log without writing anything. After a clean shutdown
    /// (`clean`) every entry was fsynced and acknowledged, so there is no torn tail: an
    /// invalid last entry is corruption, refused like one in the middle.
    pub fn read(data_dir: &Path, clean: bool) -> Result<MetadataLogContents, MetadataLogError> {
        let path = data_dir.join(METADATA_DIR).join(LOG_FILE);
        let io = |e| MetadataLogError::Io {
            path: path.clone(),
            source: e,
        };
        let raw = match std::fs::read(&path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(MetadataLogContents {
                    path,
                    entries: Vec::new(),
                    exists: false,
                    valid_len: 0,
                    raw_len: 0,
                })
            }
            Err(e) => return Err(io(e)),
        };
        let (entries, valid_len) = decode_entries(&raw, &path)?;
        if clean && valid_len < raw.len() {
            return Err(MetadataLogError::Corrupt {
                path,
                position: valid_len as u64,
                reason: format!(
                    "the last {} bytes are not a valid entry, after a clean shutdown (which leaves no torn write); restore the file from a backup, or delete the .clean-shutdown marker to drop them as a torn write",
                    raw.len() - valid_len
                ),
            });
        }
        Ok(MetadataLogContents {
            path,
            entries,
            exists: true,
            valid_len,
            raw_len: raw.len(),
        })
    }

    /// Appends one change durably.
    pub fn append(&mut self, records: &[MetadataRecord]) -> Result<(), MetadataLogError> {
        let body =
            serde_json::to_vec(records).map_err(|e| MetadataLogError::Encode(e.to_string()))?;
        if body.len() > METADATA_ENTRY_BYTES_MAX {
            return Err(MetadataLogError::Encode(format!(
                "entry of {} bytes is too large",
                body.len()
            )));
        }
        let mut entry = Vec::with_capacity(ENTRY_HEADER_BYTES + body.len());
        entry.extend_from_slice(&(body.len() as u32).to_be_bytes());
        entry.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
        entry.extend_from_slice(&body);
        let io = |e| MetadataLogError::Io {
            path: self.path.clone(),
            source: e,
        };
        if self.broken {
            return Err(MetadataLogError::Broken(self.path.clone()));
        }
        let written = self
            .file
            .write_all(&entry)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // A partial entry left at the end would turn the next append into mid-file
            // corruption: cut back to the last whole entry (the change was not made).
            if let Err(cut) = self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.sync_data())
            {
                tracing::error!(path = %self.path.display(), error = %cut, "cannot cut a failed metadata append back; refusing further metadata changes until restart");
                self.broken = true;
            }
            return Err(io(e));
        }
        self.len += entry.len() as u64;
        Ok(())
    }
}

/// Decodes entries; returns them and the length of the valid prefix.
fn decode_entries(
    raw: &[u8],
    path: &Path,
) -> Result<(Vec<Vec<MetadataRecord>>, usize), MetadataLogError> {
    let mut entries = Vec::new();
    let mut pos = 0usize;
    while pos < raw.len() {
        let bad = |reason: String| (pos, reason);
        let result = (|| {
            let header = raw
                .get(pos..pos + ENTRY_HEADER_BYTES)
                .ok_or_else(|| bad("torn header".into()))?;
            let (len, crc) = header.split_at(4);
            let len =
                u32::from_be_bytes(len.try_into().map_err(|_| bad("header".into()))?) as usize;
            let crc = u32::from_be_bytes(crc.try_into().map_err(|_| bad("header".into()))?);
            if len > METADATA_ENTRY_BYTES_MAX {
                return Err(bad(format!("entry length {len} too large")));
            }
            let body = raw
                .get(pos + ENTRY_HEADER_BYTES..pos + ENTRY_HEADER_BYTES + len)
                .ok_or_else(|| bad("torn body".into()))?;
            if crc32c::crc32c(body) != crc {
                return Err(bad("crc mismatch".into()));
            }
            let records: Vec<MetadataRecord> =
                serde_json::from_slice(body).map_err(|e| bad(format!("undecodable entry: {e}")))?;
            Ok((records, ENTRY_HEADER_BYTES + len))
        })();
        match result {
            Ok((records, used)) => {
                entries.push(records);
                pos += used;
            }
            Err((at, reason)) => {
                // A torn tail is the unacknowledged last write; anything that is followed
                // by a valid entry is real corruption.
                if later_entry_is_valid(raw, at + 1) {
                    return Err(MetadataLogError::Corrupt {
                        path: path.to_path_buf(),
                        position: at as u64,
                        reason,
                    });
                }
                return Ok((entries, at));
            }
        }
    }
    Ok((entries, pos))
}

/// Whether any offset at or after `from` starts a valid entry (a cheap resync check).
#[allow(clippy::indexing_slicing)] // `h` is exactly ENTRY_HEADER_BYTES long.
fn later_entry_is_valid(raw: &[u8], from: usize) -> bool {
    (from..raw.len().saturating_sub(ENTRY_HEADER_BYTES)).any(|p| {
        let Some(h) = raw.get(p..p + ENTRY_HEADER_BYTES) else {
            return false;
        };
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let crc = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        len > 0
            && len <= METADATA_ENTRY_BYTES_MAX
            && raw
                .get(p + ENTRY_HEADER_BYTES..p + ENTRY_HEADER_BYTES + len)
                .is_some_and(|b| crc32c::crc32c(b) == crc && b.first() == Some(&b'['))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn topic(n: &str) -> Vec<MetadataRecord> {
        vec![MetadataRecord::Topic {
            name: n.into(),
            topic_id: Uuid::new_v4(),
        }]
    }

    #[test]
    fn replays_in_order_and_drops_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, entries) = MetadataLog::open(dir.path()).unwrap();
            assert!(entries.is_empty());
            log.append(&topic("a")).unwrap();
            log.append(&topic("b")).unwrap();
        }
        let path = dir.path().join(METADATA_DIR).join(LOG_FILE);
        let full = std::fs::read(&path).unwrap();
        for cut in 1..20 {
            std::fs::write(&path, &full[..full.len() - cut]).unwrap();
            let (_, entries) = MetadataLog::open(dir.path()).unwrap();
            assert_eq!(entries.len(), 1, "cut {cut}");
        }
        std::fs::write(&path, &full).unwrap();
        let (mut log, entries) = MetadataLog::open(dir.path()).unwrap();
        assert_eq!(entries.len(), 2);
        log.append(&topic("c")).unwrap();
        drop(log);
        // A flipped byte in the first entry, with valid entries after it, is corruption.
        let mut bad = std::fs::read(&path).unwrap();
        bad[10] ^= 0xff;
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            MetadataLog::open(dir.path()),
            Err(MetadataLogError::Corrupt { .. })
        ));
    }

    #[test]
    fn reading_writes_nothing_and_a_clean_shutdown_has_no_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        // Nothing there: reading creates nothing.
        let contents = MetadataLog::read(dir.path(), false).unwrap();
        assert!(!contents.exists && contents.entries.is_empty());
        assert!(!dir.path().join(METADATA_DIR).exists());
        {
            let (mut log, _) = MetadataLog::open(dir.path()).unwrap();
            log.append(&topic("a")).unwrap();
            log.append(&topic("b")).unwrap();
        }
        let path = dir.path().join(METADATA_DIR).join(LOG_FILE);
        let mut bad = std::fs::read(&path).unwrap();
        let last = bad.len() - 3;
        bad[last] ^= 0xff;
        std::fs::write(&path, &bad).unwrap();
        for _ in 0..2 {
            assert!(matches!(
                MetadataLog::read(dir.path(), true),
                Err(MetadataLogError::Corrupt { .. })
            ));
            let contents = MetadataLog::read(dir.path(), false).unwrap();
            assert_eq!(contents.entries.len(), 1);
            assert!(contents.torn_tail_bytes() > 0);
            assert_eq!(std::fs::read(&path).unwrap(), bad, "read changed the file");
        }
    }
}
