//! One segment: a `.log` file of whole record batches plus its sparse offset and time
//! indexes. Indexes live in memory while the segment is active and are written to their
//! files when the segment rolls or the log closes cleanly (docs/storage-format.md).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::batch::{max_timestamp_plausible, validate_batch, BatchHeader, HEADER_BYTES};
use crate::error::{Result, StorageError};
use crate::fd_cache::{DescriptorCache, SegmentFile};

pub const LOG_SUFFIX: &str = "log";
pub const INDEX_SUFFIX: &str = "index";
pub const TIME_INDEX_SUFFIX: &str = "timeindex";
/// Bytes of one offset index entry: relative offset u32, position u32.
pub const INDEX_ENTRY_BYTES: usize = 8;
/// Bytes of one time index entry: timestamp i64, relative offset u32.
pub const TIME_INDEX_ENTRY_BYTES: usize = 12;
/// How much of a segment recovery reads at once.
const RECOVERY_READ_BYTES_MAX: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub relative_offset: u32,
    pub position: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeIndexEntry {
    pub timestamp: i64,
    pub relative_offset: u32,
}

pub fn segment_file_name(base_offset: i64, suffix: &str) -> String {
    format!("{base_offset:020}.{suffix}")
}

pub fn parse_segment_file_name(path: &Path) -> Option<i64> {
    let stem = path.file_stem()?.to_str()?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

#[derive(Debug)]
pub(crate) struct Segment {
    pub base_offset: i64,
    pub log_path: PathBuf,
    /// Opened on demand through the log's [`DescriptorCache`]: take `file.get()` for as
    /// long as a read or write needs the descriptor.
    pub file: SegmentFile,
    /// Bytes of whole batches in the file.
    pub size: u64,
    /// One past the last offset stored here; `base_offset` when empty.
    pub next_offset: i64,
    pub max_timestamp: i64,
    pub index: Vec<IndexEntry>,
    pub time_index: Vec<TimeIndexEntry>,
    bytes_since_index: u64,
    /// Wall-clock time of the first append, for `segment.ms`.
    pub first_append_ms: Option<i64>,
    /// Some batch here has no usable max timestamp (none at all, or a header maximum
    /// below its base timestamp as written before the broker repaired them): retention
    /// then also waits for the file's last modification, as Kafka's
    /// `LogSegment.largestTimestamp` does for segments without timestamps.
    unknown_timestamps: bool,
    /// Every batch header of the segment has been seen by this process, so
    /// `unknown_timestamps` is final (segments opened from their index files are walked
    /// once, when retention first considers them).
    timestamps_checked: bool,
    /// `.index` and `.timeindex` on disk say exactly what `index` and `time_index` hold
    /// (read at open and unchanged since, or written since the last change), so a clean
    /// shutdown need not write them again: an idle partition writes nothing.
    index_files_current: bool,
}

impl Segment {
    pub fn create(dir: &Path, base_offset: i64, files: &Arc<DescriptorCache>) -> Result<Segment> {
        let log_path = dir.join(segment_file_name(base_offset, LOG_SUFFIX));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&log_path)
            .map_err(|e| StorageError::io(&log_path, e))?;
        Ok(Segment {
            base_offset,
            file: files.adopt(log_path.clone(), file),
            log_path,
            size: 0,
            next_offset: base_offset,
            max_timestamp: -1,
            index: Vec::new(),
            time_index: Vec::new(),
            bytes_since_index: 0,
            first_append_ms: None,
            unknown_timestamps: false,
            timestamps_checked: true,
            index_files_current: false,
        })
    }

    /// Opens an existing segment. With `recover`, every batch is read and checked, and a
    /// torn or corrupt tail is cut off; otherwise the index files are trusted when sane and
    /// only the part after the last index entry is read.
    pub fn open(
        log_path: PathBuf,
        base_offset: i64,
        recover: bool,
        index_interval_bytes: u64,
        dense: bool,
        files: &Arc<DescriptorCache>,
    ) -> Result<(Segment, RecoveryOutcome)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&log_path)
            .map_err(|e| StorageError::io(&log_path, e))?;
        let file_len = file
            .metadata()
            .map_err(|e| StorageError::io(&log_path, e))?
            .len();
        let mut seg = Segment {
            base_offset,
            file: files.adopt(log_path.clone(), file),
            log_path,
            size: file_len,
            next_offset: base_offset,
            max_timestamp: -1,
            index: Vec::new(),
            time_index: Vec::new(),
            bytes_since_index: 0,
            first_append_ms: None,
            unknown_timestamps: false,
            timestamps_checked: false,
            index_files_current: false,
        };
        let mut loaded = None;
        if !recover {
            if let Some((index, time_index)) = seg.load_index_files() {
                loaded = Some((index.len(), time_index.len()));
                seg.index = index;
                seg.time_index = time_index;
            }
        }
        let outcome = seg.scan_tail(recover, index_interval_bytes, dense)?;
        // The files still match if the scan of the tail added no entry and the last time
        // entry already covers the max timestamp (as the one written at close does).
        seg.index_files_current = outcome.truncated_bytes == 0
            && loaded == Some((seg.index.len(), seg.time_index.len()))
            && seg
                .time_index
                .last()
                .map_or(seg.max_timestamp < 0, |e| e.timestamp >= seg.max_timestamp);
        Ok((seg, outcome))
    }

    fn index_path(&self, suffix: &str) -> PathBuf {
        self.log_path.with_extension(suffix)
    }

    /// Reads `.index` and `.timeindex`; `None` when either is missing or not sane, in
    /// which case the caller rebuilds them from the log.
    fn load_index_files(&self) -> Option<(Vec<IndexEntry>, Vec<TimeIndexEntry>)> {
        let mut raw = Vec::new();
        File::open(self.index_path(INDEX_SUFFIX))
            .ok()?
            .read_to_end(&mut raw)
            .ok()?;
        if raw.len() % INDEX_ENTRY_BYTES != 0 {
            return None;
        }
        let mut index = Vec::with_capacity(raw.len() / INDEX_ENTRY_BYTES);
        for chunk in raw.chunks_exact(INDEX_ENTRY_BYTES) {
            let (rel, pos) = chunk.split_at(4);
            let entry = IndexEntry {
                relative_offset: u32::from_be_bytes(rel.try_into().ok()?),
                position: u32::from_be_bytes(pos.try_into().ok()?),
            };
            if let Some(prev) = index.last() {
                let prev: &IndexEntry = prev;
                if entry.relative_offset <= prev.relative_offset || entry.position <= prev.position
                {
                    return None;
                }
            }
            if u64::from(entry.position) >= self.size {
                return None;
            }
            index.push(entry);
        }
        raw.clear();
        File::open(self.index_path(TIME_INDEX_SUFFIX))
            .ok()?
            .read_to_end(&mut raw)
            .ok()?;
        if raw.len() % TIME_INDEX_ENTRY_BYTES != 0 {
            return None;
        }
        let mut time_index = Vec::with_capacity(raw.len() / TIME_INDEX_ENTRY_BYTES);
        for chunk in raw.chunks_exact(TIME_INDEX_ENTRY_BYTES) {
            let (ts, rel) = chunk.split_at(8);
            let entry = TimeIndexEntry {
                timestamp: i64::from_be_bytes(ts.try_into().ok()?),
                relative_offset: u32::from_be_bytes(rel.try_into().ok()?),
            };
            if let Some(prev) = time_index.last() {
                let prev: &TimeIndexEntry = prev;
                if entry.timestamp < prev.timestamp {
                    return None;
                }
            }
            time_index.push(entry);
        }
        Some((index, time_index))
    }

    /// Walks the batches after the last index entry (all of them when recovering),
    /// rebuilding the in-memory state. Returns how much was cut off.
    /// `dense`: offsets must follow each other exactly (every log but a compacted one), so
    /// that a damaged `baseOffset`, which the CRC does not cover, is caught.
    fn scan_tail(
        &mut self,
        recover: bool,
        index_interval_bytes: u64,
        dense: bool,
    ) -> Result<RecoveryOutcome> {
        let (mut pos, start_offset) = match (recover, self.index.last()) {
            (false, Some(e)) => (
                u64::from(e.position),
                self.base_offset + i64::from(e.relative_offset),
            ),
            _ => {
                self.index.clear();
                self.time_index.clear();
                self.timestamps_checked = true;
                (0, self.base_offset)
            }
        };
        if let Some(last) = self.time_index.last() {
            self.max_timestamp = last.timestamp;
        }
        self.next_offset = start_offset;
        let file_len = self.size;
        let mut buf: Vec<u8> = Vec::new();
        let mut buf_start = pos;
        let mut first = true;
        while pos < file_len {
            // Make sure `buf` holds the batch at `pos`, reading more when it does not.
            let rel = usize::try_from(pos - buf_start).unwrap_or(usize::MAX);
            let have = buf.len().saturating_sub(rel);
            let need = match buf.get(rel..).map(BatchHeader::parse) {
                Some(Ok(h)) => h.total_bytes().unwrap_or(HEADER_BYTES),
                _ => HEADER_BYTES,
            };
            if have < need {
                let want = need.max(RECOVERY_READ_BYTES_MAX) as u64;
                let len = want.min(file_len - pos) as usize;
                buf.resize(len, 0);
                self.file
                    .get()?
                    .read_exact_at(&mut buf, pos)
                    .map_err(|e| StorageError::io(&self.log_path, e))?;
                buf_start = pos;
                if len < need {
                    return self.cut_at(pos, recover, format!("torn batch: {len} of {need} bytes"));
                }
                continue;
            }
            let Some(bytes) = buf.get(rel..rel + need) else {
                return self.cut_at(pos, recover, "unreadable batch".to_string());
            };
            let header = match validate_batch(bytes) {
                Ok(h) => h,
                Err(e) => return self.cut_at(pos, recover, e.to_string()),
            };
            if (recover || !first) && header.base_offset < self.next_offset {
                return self.cut_at(pos, recover, "offsets go backwards".to_string());
            }
            if (recover || !first) && dense && header.base_offset != self.next_offset {
                return self.cut_at(
                    pos,
                    recover,
                    format!(
                        "offset gap: expected {}, found {}",
                        self.next_offset, header.base_offset
                    ),
                );
            }
            first = false;
            self.note_batch(pos, &header, index_interval_bytes);
            pos += need as u64;
        }
        Ok(RecoveryOutcome {
            truncated_bytes: 0,
            reason: None,
            claimed_end_offset: None,
        })
    }

    /// Handles a bad batch found at `pos`: recovery truncates there, a trusted segment
    /// reports corruption.
    fn cut_at(&mut self, pos: u64, recover: bool, reason: String) -> Result<RecoveryOutcome> {
        if !recover {
            return Err(StorageError::Corruption {
                path: self.log_path.clone(),
                position: pos,
                reason,
            });
        }
        let truncated_bytes = self.size - pos;
        let file = self.file.get()?;
        let claimed_end_offset = claimed_end_offset(&file, pos, self.size);
        file.set_len(pos)
            .map_err(|e| StorageError::io(&self.log_path, e))?;
        self.size = pos;
        Ok(RecoveryOutcome {
            truncated_bytes,
            reason: Some(reason),
            claimed_end_offset,
        })
    }

    /// Updates offsets, timestamps and the sparse indexes for a batch now at `position`.
    pub fn note_batch(&mut self, position: u64, header: &BatchHeader, index_interval_bytes: u64) {
        assert!(header.base_offset >= self.base_offset);
        self.index_files_current = false;
        let batch_bytes = header.total_bytes().unwrap_or(HEADER_BYTES) as u64;
        if self.index.is_empty() || self.bytes_since_index >= index_interval_bytes {
            let relative_offset =
                u32::try_from(header.base_offset - self.base_offset).unwrap_or(u32::MAX);
            let position = u32::try_from(position).unwrap_or(u32::MAX);
            let monotonic = self
                .index
                .last()
                .is_none_or(|e| e.relative_offset < relative_offset && e.position < position);
            if monotonic {
                self.index.push(IndexEntry {
                    relative_offset,
                    position,
                });
                self.bytes_since_index = 0;
                let running_max = self.max_timestamp.max(batch_max_timestamp(header));
                if self
                    .time_index
                    .last()
                    .is_none_or(|e| e.timestamp < running_max)
                {
                    self.time_index.push(TimeIndexEntry {
                        timestamp: running_max,
                        relative_offset,
                    });
                }
            }
        }
        self.bytes_since_index += batch_bytes;
        self.max_timestamp = self.max_timestamp.max(batch_max_timestamp(header));
        if !max_timestamp_known(header) {
            self.unknown_timestamps = true;
        }
        self.next_offset = header.last_offset() + 1;
        self.size = self.size.max(position + batch_bytes);
    }

    /// The time retention measures this segment's age from: its largest timestamp, or, if
    /// some batch's timestamp is unknown, no earlier than the file's last modification
    /// (the last append), so that a batch without a trustworthy timestamp is kept for
    /// `retention.ms` after it was written rather than deleted at once.
    pub fn retention_timestamp(&mut self) -> Result<i64> {
        if !self.timestamps_checked {
            self.check_timestamps_on_disk()?;
        }
        if self.unknown_timestamps || self.max_timestamp < 0 {
            // By path: asking needs no descriptor.
            let modified = std::fs::metadata(&self.log_path)
                .and_then(|m| m.modified())
                .map_err(|e| StorageError::io(&self.log_path, e))?;
            let modified_ms = modified
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                .unwrap_or(0);
            return Ok(self.max_timestamp.max(modified_ms));
        }
        Ok(self.max_timestamp)
    }

    /// Walks the batch headers of a segment opened from its index files (written perhaps
    /// by a broker that stored producers' max timestamps unchecked) to learn whether any
    /// timestamp is unknown. Headers only; an unreadable header counts as unknown.
    fn check_timestamps_on_disk(&mut self) -> Result<()> {
        let mut header = [0u8; HEADER_BYTES];
        let mut pos = 0u64;
        let file = self.file.get()?;
        while pos + HEADER_BYTES as u64 <= self.size {
            file.read_exact_at(&mut header, pos)
                .map_err(|e| StorageError::io(&self.log_path, e))?;
            let total = BatchHeader::parse(&header).and_then(|h| {
                let total = h.total_bytes()?;
                Ok((h, total))
            });
            match total {
                Ok((h, total)) if max_timestamp_known(&h) => pos += total as u64,
                _ => {
                    self.unknown_timestamps = true;
                    break;
                }
            }
        }
        self.timestamps_checked = true;
        Ok(())
    }

    /// Largest index entry at or below `offset`: where a scan for `offset` starts.
    pub fn lookup(&self, offset: i64) -> u64 {
        let rel = offset - self.base_offset;
        let i = self
            .index
            .partition_point(|e| i64::from(e.relative_offset) <= rel);
        match i.checked_sub(1).and_then(|i| self.index.get(i)) {
            Some(e) => u64::from(e.position),
            None => 0,
        }
    }

    /// Where a scan for the first batch with timestamp >= `timestamp` starts.
    pub fn lookup_time(&self, timestamp: i64) -> u64 {
        let i = self.time_index.partition_point(|e| e.timestamp < timestamp);
        match i.checked_sub(1).and_then(|i| self.time_index.get(i)) {
            Some(e) => self.lookup(self.base_offset + i64::from(e.relative_offset)),
            None => 0,
        }
    }

    /// Writes both index files from memory. The final time index entry records the
    /// segment's max timestamp so that retention by time survives a restart.
    pub fn write_index_files(&mut self) -> Result<()> {
        self.write_index_files_synced(true)
    }

    /// Writes both index files, fsyncing each when `sync` (a clean shutdown syncs the
    /// whole filesystem once instead).
    pub fn write_index_files_synced(&mut self, sync: bool) -> Result<()> {
        if self.index_files_current {
            return Ok(());
        }
        if self.index.len() <= 1 {
            // An index of at most the first batch's entry (position 0) says nothing a
            // scan from the start would not: a missing index is rebuilt from the log at
            // open, which reads at most `index.interval.bytes` of headers plus one batch
            // here. No files, so the shutdown of a partition with little data creates
            // none (file creation is what 19,000 partitions' shutdown waited on).
            for suffix in [INDEX_SUFFIX, TIME_INDEX_SUFFIX] {
                let path = self.index_path(suffix);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(StorageError::io(path, e)),
                }
            }
            self.index_files_current = true;
            return Ok(());
        }
        if self.max_timestamp >= 0
            && self
                .time_index
                .last()
                .is_none_or(|e| e.timestamp < self.max_timestamp)
        {
            let relative_offset =
                u32::try_from((self.next_offset - 1 - self.base_offset).max(0)).unwrap_or(u32::MAX);
            self.time_index.push(TimeIndexEntry {
                timestamp: self.max_timestamp,
                relative_offset,
            });
        }
        let mut raw = Vec::with_capacity(self.index.len() * INDEX_ENTRY_BYTES);
        for e in &self.index {
            raw.extend_from_slice(&e.relative_offset.to_be_bytes());
            raw.extend_from_slice(&e.position.to_be_bytes());
        }
        write_file(&self.index_path(INDEX_SUFFIX), &raw, sync)?;
        raw.clear();
        for e in &self.time_index {
            raw.extend_from_slice(&e.timestamp.to_be_bytes());
            raw.extend_from_slice(&e.relative_offset.to_be_bytes());
        }
        write_file(&self.index_path(TIME_INDEX_SUFFIX), &raw, sync)?;
        self.index_files_current = true;
        Ok(())
    }

    pub fn delete_files(&self) -> Result<()> {
        for path in [
            self.log_path.clone(),
            self.index_path(INDEX_SUFFIX),
            self.index_path(TIME_INDEX_SUFFIX),
        ] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io(path, e)),
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }
}

/// A batch's max timestamp is usable for retention and time lookups: present, and not
/// below the batch's first timestamp (LogAppendTime batches carry the broker's clock).
fn max_timestamp_known(header: &BatchHeader) -> bool {
    header.max_timestamp >= 0
        && (header.attributes & crate::batch::ATTR_TIMESTAMP_TYPE_LOG_APPEND != 0
            || max_timestamp_plausible(header))
}

/// What a batch contributes to its segment's max timestamp. A header maximum below the
/// base timestamp is not a maximum; the base timestamp (the first record's) is a lower
/// bound of the true one.
fn batch_max_timestamp(header: &BatchHeader) -> i64 {
    if header.attributes & crate::batch::ATTR_TIMESTAMP_TYPE_LOG_APPEND != 0 {
        header.max_timestamp
    } else {
        header.max_timestamp.max(header.base_timestamp)
    }
}

fn write_file(path: &Path, data: &[u8], sync: bool) -> Result<()> {
    let mut f = File::create(path).map_err(|e| StorageError::io(path, e))?;
    f.write_all(data).map_err(|e| StorageError::io(path, e))?;
    if sync {
        f.sync_data().map_err(|e| StorageError::io(path, e))?;
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryOutcome {
    pub truncated_bytes: u64,
    pub reason: Option<String>,
    /// The offset after the last batch the cut bytes' headers claim, read without
    /// trusting them: how far the lost offsets reached, for the operator's report.
    pub claimed_end_offset: Option<i64>,
}

/// Walks batch headers from `pos` to `len` without checking CRCs, and returns the
/// offset after the last header that parses: what a damaged or dropped stretch of a
/// segment claimed to hold. Stops at the first header that does not parse.
pub fn claimed_end_offset(file: &File, mut pos: u64, len: u64) -> Option<i64> {
    let mut end = None;
    let mut header = [0u8; HEADER_BYTES];
    while pos + HEADER_BYTES as u64 <= len {
        if file.read_exact_at(&mut header, pos).is_err() {
            break;
        }
        let Ok(h) = BatchHeader::parse(&header) else {
            break;
        };
        let Ok(total) = h.total_bytes() else { break };
        let next = h
            .base_offset
            .saturating_add(i64::from(h.last_offset_delta))
            .saturating_add(1);
        // Offsets only grow in a log; a header going backwards is garbage, not data.
        if next <= h.base_offset || end.is_some_and(|e| h.base_offset < e) {
            break;
        }
        end = Some(next);
        pos += total as u64;
    }
    end
}
