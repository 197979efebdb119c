//! What a node's quorum files say, read without changing them: the start-up checks of
//! the broker run on this before anything is written (a refused start leaves the data
//! directory as it found it), and the broker's first reconcile uses its image.
//!
//! The image is the snapshot's plus every entry of the local log after it, committed or
//! not yet known to be: on a one-voter quorum every such entry commits when the voter
//! is elected again, and on a larger quorum the applied image replaces this one as soon
//! as the node has caught up (it is only used to decide which partition directories the
//! metadata accounts for, where erring towards "accounted for" loses nothing).

use std::path::{Path, PathBuf};

use ferrite_metadata::MetadataImage;
use openraft::EntryPayload;

use crate::frame::{decode_frames, read_optional, StoreError, LOG_FRAME_BODY_BYTES_MAX};
use crate::log_store::{LogFrame, LOG_FILE, VOTE_FILE};
use crate::state_machine::{read_snapshot, SNAPSHOT_FILE};

/// The local quorum files of one node.
#[derive(Debug)]
pub struct LocalMetadata {
    /// `<dir>/metadata.log`.
    pub log_path: PathBuf,
    pub log_exists: bool,
    /// Valid frames in the log (0: missing or empty).
    pub log_frames: usize,
    /// The log is today's single-node metadata log (frames of JSON arrays of records,
    /// `ferrite_metadata::log`), not a Raft log: it has to be imported.
    pub legacy: bool,
    /// A vote, a snapshot or log entries exist: the node has been part of a quorum.
    pub initialized: bool,
    /// The snapshot's image with the local log's entries after it applied.
    pub image: MetadataImage,
    /// Index of the last entry in the local log (or of the purge marker).
    pub last_index: Option<u64>,
}

/// Reads `dir`'s quorum files. `clean`: the node stopped cleanly, so a bad last frame
/// of the log is corruption rather than a torn, never acknowledged append.
pub fn read_local(dir: &Path, clean: bool) -> Result<LocalMetadata, StoreError> {
    let log_path = dir.join(LOG_FILE);
    let raw = read_optional(&log_path)?;
    let mut out = LocalMetadata {
        log_path: log_path.clone(),
        log_exists: raw.is_some(),
        log_frames: 0,
        legacy: false,
        initialized: dir.join(VOTE_FILE).exists() || dir.join(SNAPSHOT_FILE).exists(),
        image: MetadataImage::default(),
        last_index: None,
    };
    let raw = raw.unwrap_or_default();
    let decoded = decode_frames(&raw, LOG_FRAME_BODY_BYTES_MAX, &log_path)?;
    if let (true, Some(reason)) = (clean, &decoded.torn) {
        return Err(StoreError::Corrupt {
            path: log_path,
            position: decoded.valid_len as u64,
            reason: format!("{reason}, after a clean shutdown (not a torn append)"),
        });
    }
    out.log_frames = decoded.frames.len();
    if decoded
        .frames
        .first()
        .is_some_and(|f| f.body.first() == Some(&b'['))
    {
        out.legacy = true;
        return Ok(out);
    }
    let mut after = None;
    if let Some((meta, image, _)) = read_snapshot(&dir.join(SNAPSHOT_FILE))? {
        after = meta.last_log_id.map(|l| l.index);
        out.image = image;
    }
    for frame in &decoded.frames {
        let parsed: LogFrame =
            serde_json::from_slice(frame.body).map_err(|e| StoreError::Corrupt {
                path: log_path.clone(),
                position: frame.position,
                reason: format!("undecodable frame: {e}"),
            })?;
        out.initialized = true;
        if let LogFrame::Purged { log_id } = &parsed {
            out.last_index = Some(log_id.index);
        }
        if let LogFrame::Entry { entry } = parsed {
            out.last_index = Some(entry.log_id.index);
            if after.is_some_and(|a| entry.log_id.index <= a) {
                continue;
            }
            if let EntryPayload::Normal(records) = &entry.payload {
                out.image.apply_all(records);
            }
        }
    }
    Ok(out)
}
