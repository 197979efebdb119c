//! The `leader-epoch-checkpoint` file of a partition: which leader epoch started at which
//! offset, in Kafka's own text format (`LeaderEpochCheckpointFile`), so that a follower
//! can find where its log diverges from a new leader's (KIP-101, KIP-279) after a
//! restart.
//!
//! ```text
//! 0                   version
//! 2                   number of entries
//! 0 0                 "epoch startOffset", epochs and start offsets strictly increasing
//! 3 1200
//! ```
//!
//! The file is only ever replaced whole: written to `leader-epoch-checkpoint.tmp`,
//! fsynced, renamed over the old one, directory fsynced. A crash leaves the old file or
//! the new one; a leftover `.tmp` is deleted by `PartitionLog::open` like every `*.tmp`.
//! This module is the format only; the in-memory cache and its rules (assign, truncate,
//! end offset of an epoch) are `ferrite_replication::LeaderEpochCache`.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Result, StorageError};

/// The file's name inside the partition directory (Kafka's name).
pub const LEADER_EPOCH_CHECKPOINT_FILE: &str = "leader-epoch-checkpoint";
/// The only version of the format (Kafka writes "0" too).
const VERSION: &str = "0";
/// More entries than this in one file is corruption, not a real history: every entry is
/// one leader change, and the cache keeps only epochs that still have records.
pub const LEADER_EPOCH_ENTRIES_MAX: usize = 1 << 20;
/// "epoch startOffset\n" is at most 11 + 1 + 20 + 1 bytes; the file is read whole only
/// below this size.
const CHECKPOINT_BYTES_MAX: u64 = 64 + (LEADER_EPOCH_ENTRIES_MAX as u64) * 40;

/// One line of the file: leader `epoch` wrote its first record at `start_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct EpochEntry {
    pub epoch: i32,
    pub start_offset: i64,
}

/// Reads the checkpoint of the partition in `dir`. A missing file is an empty history
/// (a partition created before this file existed, or never led); anything malformed is
/// `StorageError::Corruption`, since guessing epochs could let a follower diverge.
pub fn read_leader_epoch_checkpoint(dir: &Path) -> Result<Vec<EpochEntry>> {
    let path = dir.join(LEADER_EPOCH_CHECKPOINT_FILE);
    let len = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StorageError::io(path, e)),
    };
    if len > CHECKPOINT_BYTES_MAX {
        return Err(corrupt(
            path,
            format!("{len} bytes is more than any valid file"),
        ));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| StorageError::io(&path, e))?;
    parse(&text).map_err(|reason| corrupt(path, reason))
}

/// Replaces the checkpoint of the partition in `dir` with `entries` durably (temporary
/// file, fsync, rename, directory fsync). Entries must be strictly increasing in both
/// fields: the cache guarantees it, so a violation is a programmer error.
pub fn write_leader_epoch_checkpoint(dir: &Path, entries: &[EpochEntry]) -> Result<()> {
    assert!(
        entries.windows(2).all(|w| match w {
            [a, b] => a.epoch < b.epoch && a.start_offset < b.start_offset,
            _ => true,
        }),
        "leader epoch entries must be strictly increasing: {entries:?}"
    );
    assert!(entries.iter().all(|e| e.epoch >= 0 && e.start_offset >= 0));
    assert!(entries.len() <= LEADER_EPOCH_ENTRIES_MAX);
    let path = dir.join(LEADER_EPOCH_CHECKPOINT_FILE);
    let tmp = dir.join(format!("{LEADER_EPOCH_CHECKPOINT_FILE}.tmp"));
    let body = render(entries);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(body.as_bytes())?;
        f.sync_all()
    };
    write().map_err(|e| StorageError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| StorageError::io(&path, e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io(dir, e))
}

fn render(entries: &[EpochEntry]) -> String {
    let mut body = format!("{VERSION}\n{}\n", entries.len());
    for e in entries {
        body.push_str(&format!("{} {}\n", e.epoch, e.start_offset));
    }
    body
}

fn parse(text: &str) -> std::result::Result<Vec<EpochEntry>, String> {
    let mut lines = text.lines();
    match lines.next() {
        Some(VERSION) => {}
        other => return Err(format!("unsupported version line {other:?}")),
    }
    let count: usize = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .ok_or("missing or bad entry count")?;
    if count > LEADER_EPOCH_ENTRIES_MAX {
        return Err(format!(
            "entry count {count} exceeds {LEADER_EPOCH_ENTRIES_MAX}"
        ));
    }
    let mut entries: Vec<EpochEntry> = Vec::with_capacity(count);
    for i in 0..count {
        let line = lines
            .next()
            .ok_or(format!("entry {i} of {count} missing"))?;
        let mut fields = line.split_whitespace();
        let entry = match (fields.next(), fields.next(), fields.next()) {
            (Some(epoch), Some(start), None) => {
                epoch
                    .parse()
                    .ok()
                    .zip(start.parse().ok())
                    .map(|(epoch, start_offset)| EpochEntry {
                        epoch,
                        start_offset,
                    })
            }
            _ => None,
        }
        .ok_or(format!("bad entry line {line:?}"))?;
        if entry.epoch < 0 || entry.start_offset < 0 {
            return Err(format!("negative epoch or offset in {line:?}"));
        }
        if let Some(prev) = entries.last() {
            if entry.epoch <= prev.epoch || entry.start_offset <= prev.start_offset {
                return Err(format!("entry {line:?} does not follow {prev:?}"));
            }
        }
        entries.push(entry);
    }
    if lines.any(|l| !l.trim().is_empty()) {
        return Err(format!("more lines than the {count} entries announced"));
    }
    Ok(entries)
}

fn corrupt(path: PathBuf, reason: String) -> StorageError {
    StorageError::Corruption {
        path,
        position: 0,
        reason: format!("leader-epoch-checkpoint: {reason}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn e(epoch: i32, start_offset: i64) -> EpochEntry {
        EpochEntry {
            epoch,
            start_offset,
        }
    }

    #[test]
    fn round_trips_in_kafkas_format() {
        let dir = tempfile::tempdir().unwrap();
        let entries = vec![e(0, 0), e(3, 1200), e(4, 1500)];
        write_leader_epoch_checkpoint(dir.path(), &entries).unwrap();
        let text = std::fs::read_to_string(dir.path().join(LEADER_EPOCH_CHECKPOINT_FILE)).unwrap();
        assert_eq!(text, "0\n3\n0 0\n3 1200\n4 1500\n");
        assert_eq!(read_leader_epoch_checkpoint(dir.path()).unwrap(), entries);
        assert!(!dir.path().join("leader-epoch-checkpoint.tmp").exists());
    }

    #[test]
    fn missing_file_is_empty_and_empty_list_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_leader_epoch_checkpoint(dir.path()).unwrap().is_empty());
        write_leader_epoch_checkpoint(dir.path(), &[]).unwrap();
        assert!(read_leader_epoch_checkpoint(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn a_rewrite_replaces_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        write_leader_epoch_checkpoint(dir.path(), &[e(0, 0), e(1, 10), e(2, 20)]).unwrap();
        write_leader_epoch_checkpoint(dir.path(), &[e(0, 0)]).unwrap();
        assert_eq!(
            read_leader_epoch_checkpoint(dir.path()).unwrap(),
            vec![e(0, 0)]
        );
    }

    #[test]
    fn malformed_files_are_corruption() {
        let cases = [
            "1\n0\n",                // unknown version
            "0\n",                   // no count
            "0\n2\n0 0\n",           // fewer entries than announced
            "0\n1\n0 0\n1 5\n",      // more lines than announced
            "0\n1\n0\n",             // missing start offset
            "0\n1\nx 0\n",           // not a number
            "0\n2\n1 0\n1 5\n",      // epoch not increasing
            "0\n2\n0 5\n1 5\n",      // start offset not increasing
            "0\n1\n-1 0\n",          // negative epoch
            "0\n1\n0 0 7\n",         // extra field
            "0\n99999999999\n0 0\n", // absurd count
        ];
        for text in cases {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(LEADER_EPOCH_CHECKPOINT_FILE), text).unwrap();
            match read_leader_epoch_checkpoint(dir.path()) {
                Err(StorageError::Corruption { reason, .. }) => {
                    assert!(reason.starts_with("leader-epoch-checkpoint"), "{reason}")
                }
                other => panic!("{text:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn opening_the_partition_log_deletes_a_leftover_temporary_file_and_keeps_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        write_leader_epoch_checkpoint(dir.path(), &[e(0, 0), e(2, 7)]).unwrap();
        let tmp = dir.path().join("leader-epoch-checkpoint.tmp");
        std::fs::write(&tmp, "0\n1\n9 9\n").unwrap();
        let (_log, _report) =
            crate::PartitionLog::open(dir.path(), crate::LogConfig::default(), false).unwrap();
        assert!(!tmp.exists());
        assert_eq!(
            read_leader_epoch_checkpoint(dir.path()).unwrap(),
            vec![e(0, 0), e(2, 7)]
        );
    }

    #[test]
    fn a_leftover_temporary_file_does_not_matter() {
        let dir = tempfile::tempdir().unwrap();
        write_leader_epoch_checkpoint(dir.path(), &[e(0, 0)]).unwrap();
        std::fs::write(dir.path().join("leader-epoch-checkpoint.tmp"), "garbage").unwrap();
        assert_eq!(
            read_leader_epoch_checkpoint(dir.path()).unwrap(),
            vec![e(0, 0)]
        );
        write_leader_epoch_checkpoint(dir.path(), &[e(0, 0), e(1, 3)]).unwrap();
        assert_eq!(read_leader_epoch_checkpoint(dir.path()).unwrap().len(), 2);
    }
}
