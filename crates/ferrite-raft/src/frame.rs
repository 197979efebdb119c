//! The quorum's file framing: every record in every file is
//! `[length u32 BE][crc32c u32 BE][body]`, the body a JSON value. The same framing as
//! the single-node metadata log (`ferrite_metadata::log`), so one reading rule covers
//! both: a bad last frame is a torn tail, a bad frame followed by a valid one is
//! corruption.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FRAME_HEADER_BYTES: usize = 8;

/// Largest frame body in the quorum's files. A log entry holds one metadata change,
/// itself bounded by `METADATA_ENTRY_BYTES_MAX`; the envelope (log id, JSON tags) is
/// small. A snapshot body is the whole image, so it gets its own, larger bound.
pub const LOG_FRAME_BODY_BYTES_MAX: usize =
    ferrite_metadata::log::METADATA_ENTRY_BYTES_MAX + 64 * 1024;
/// Largest snapshot (the serialized image). 10,000 partitions take about 3 MiB.
pub const SNAPSHOT_BODY_BYTES_MAX: usize = 1024 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt at byte {position}: {reason}")]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: String,
    },
    #[error("cannot encode {what}: {reason}")]
    Encode { what: &'static str, reason: String },
}

impl StoreError {
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Appends one frame around `body` to `out`.
pub fn encode_frame(body: &[u8], out: &mut Vec<u8>) {
    // Bodies are bounded by the callers (LOG_FRAME_BODY_BYTES_MAX, SNAPSHOT_BODY_BYTES_MAX),
    // both far below u32::MAX.
    assert!(
        body.len() <= SNAPSHOT_BODY_BYTES_MAX,
        "frame body too large"
    );
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(body).to_be_bytes());
    out.extend_from_slice(body);
}

/// One frame found in a file: its byte position and body.
pub struct Frame<'a> {
    pub position: u64,
    pub body: &'a [u8],
}

/// The frames of a file and how it ends.
pub struct Decoded<'a> {
    pub frames: Vec<Frame<'a>>,
    /// Length of the valid prefix; shorter than the input when the tail is torn.
    pub valid_len: usize,
    /// Why the tail was dropped, if it was.
    pub torn: Option<String>,
}

/// Decodes frames from `raw`. A frame that fails (short, too long, bad CRC) is a torn
/// tail when no valid frame starts after it, since appends only ever go to the end and
/// the last one may have been cut by a crash before it was fsynced (so never reported
/// saved). If a valid frame follows, bytes that were once fsynced have changed: that is
/// corruption, and dropping it would silently lose acknowledged state.
pub fn decode_frames<'a>(
    raw: &'a [u8],
    body_max: usize,
    path: &Path,
) -> Result<Decoded<'a>, StoreError> {
    let mut frames = Vec::new();
    let mut pos = 0usize;
    while pos < raw.len() {
        match frame_at(raw, pos, body_max) {
            Ok(body) => {
                frames.push(Frame {
                    position: pos as u64,
                    body,
                });
                pos += FRAME_HEADER_BYTES + body.len();
            }
            Err(reason) => {
                if later_frame_is_valid(raw, pos + 1, body_max) {
                    return Err(StoreError::Corrupt {
                        path: path.to_path_buf(),
                        position: pos as u64,
                        reason,
                    });
                }
                return Ok(Decoded {
                    frames,
                    valid_len: pos,
                    torn: Some(reason),
                });
            }
        }
    }
    Ok(Decoded {
        frames,
        valid_len: pos,
        torn: None,
    })
}

fn frame_at(raw: &[u8], pos: usize, body_max: usize) -> Result<&[u8], String> {
    let header = raw
        .get(pos..pos + FRAME_HEADER_BYTES)
        .ok_or_else(|| "torn header".to_string())?;
    let (len, crc) = header.split_at(4);
    let len = u32::from_be_bytes(len.try_into().map_err(|_| "header".to_string())?) as usize;
    let crc = u32::from_be_bytes(crc.try_into().map_err(|_| "header".to_string())?);
    if len > body_max {
        return Err(format!("frame length {len} above {body_max}"));
    }
    let body = raw
        .get(pos + FRAME_HEADER_BYTES..pos + FRAME_HEADER_BYTES + len)
        .ok_or_else(|| "torn body".to_string())?;
    if crc32c::crc32c(body) != crc {
        return Err("crc mismatch".to_string());
    }
    Ok(body)
}

/// Whether a valid frame holding a JSON object starts at any offset from `from` on (a
/// resync check, run only once a bad frame was met).
fn later_frame_is_valid(raw: &[u8], from: usize, body_max: usize) -> bool {
    (from..raw.len().saturating_sub(FRAME_HEADER_BYTES)).any(|p| {
        frame_at(raw, p, body_max)
            .is_ok_and(|b| !b.is_empty() && matches!(b.first(), Some(b'{') | Some(b'[')))
    })
}

/// Writes `bytes` to `path` atomically and durably: a temporary file, fsync, rename over
/// the old one, fsync of the directory. A crash leaves either the old or the new file.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = tmp_path(path);
    {
        let mut f = File::create(&tmp).map_err(StoreError::io(&tmp))?;
        f.write_all(bytes).map_err(StoreError::io(&tmp))?;
        f.sync_all().map_err(StoreError::io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(StoreError::io(path))?;
    sync_parent(path)
}

/// The temporary name `write_file_atomically` uses for `path`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Fsyncs the directory holding `path`, making a rename or a new file in it durable.
pub fn sync_parent(path: &Path) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io(dir))
}

/// Reads a whole file, `None` if it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io(path)(e)),
    }
}

/// Decodes a file written by `write_file_atomically` that holds exactly `count` frames.
/// Such a file was renamed into place whole, so any defect, even at the tail, is
/// corruption.
pub fn decode_whole<'a>(
    raw: &'a [u8],
    count: usize,
    body_max: usize,
    path: &Path,
) -> Result<Vec<&'a [u8]>, StoreError> {
    let decoded = decode_frames(raw, body_max, path)?;
    let corrupt = |reason: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        position: decoded.valid_len as u64,
        reason,
    };
    if let Some(reason) = decoded.torn {
        return Err(corrupt(reason));
    }
    if decoded.frames.len() != count {
        return Err(corrupt(format!(
            "{} frames where {count} were written",
            decoded.frames.len()
        )));
    }
    Ok(decoded.frames.into_iter().map(|f| f.body).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn file_of(bodies: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in bodies {
            encode_frame(b.as_bytes(), &mut out);
        }
        out
    }

    #[test]
    fn every_cut_of_the_last_frame_is_a_torn_tail() {
        let raw = file_of(&[r#"{"a":1}"#, r#"{"b":2}"#]);
        let first_len = FRAME_HEADER_BYTES + 7;
        for cut in first_len..raw.len() {
            let d = decode_frames(&raw[..cut], 1024, Path::new("f")).unwrap();
            assert_eq!(d.frames.len(), 1, "cut at {cut}");
            assert_eq!(d.valid_len, first_len);
            assert_eq!(d.torn.is_some(), cut > first_len);
        }
        let d = decode_frames(&raw, 1024, Path::new("f")).unwrap();
        assert_eq!(d.frames.len(), 2);
        assert_eq!(d.frames[1].body, br#"{"b":2}"#);
        assert!(d.torn.is_none());
    }

    #[test]
    fn garbage_after_the_last_frame_is_a_torn_tail() {
        let mut raw = file_of(&[r#"{"a":1}"#]);
        raw.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 1, 2, 3]);
        let d = decode_frames(&raw, 1024, Path::new("f")).unwrap();
        assert_eq!(d.frames.len(), 1);
        assert!(d.torn.is_some());
    }

    #[test]
    fn a_bad_frame_followed_by_a_valid_one_is_corruption() {
        let mut raw = file_of(&[r#"{"a":1}"#, r#"{"b":2}"#, r#"{"c":3}"#]);
        raw[FRAME_HEADER_BYTES + 2] ^= 0x40; // inside the first body
        assert!(matches!(
            decode_frames(&raw, 1024, Path::new("f")),
            Err(StoreError::Corrupt { position: 0, .. })
        ));
        let mut raw = file_of(&[r#"{"a":1}"#, r#"{"b":2}"#]);
        raw[1] = 0xff; // the first length
        assert!(matches!(
            decode_frames(&raw, 1024, Path::new("f")),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn atomic_files_round_trip_and_refuse_any_defect() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vote");
        assert!(read_optional(&path).unwrap().is_none());
        let raw = file_of(&[r#"{"v":1}"#]);
        write_file_atomically(&path, &raw).unwrap();
        assert!(!tmp_path(&path).exists());
        let back = read_optional(&path).unwrap().unwrap();
        assert_eq!(
            decode_whole(&back, 1, 1024, &path).unwrap(),
            vec![br#"{"v":1}"#.as_slice()]
        );
        assert!(decode_whole(&back[..back.len() - 1], 1, 1024, &path).is_err());
        assert!(decode_whole(&back, 2, 1024, &path).is_err());
    }
}
