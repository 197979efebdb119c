//! A bounded, least-recently-used cache of open segment files.
//!
//! A broker with 20,000 partitions cannot keep one descriptor per segment open (the
//! default soft `RLIMIT_NOFILE` is 1024, and every connection needs one too), so a
//! segment names its file by path and opens it on demand through this cache: at most
//! `capacity` files stay open, the least recently used is closed first, and a closed one
//! is opened again by path the next time it is read or written.
//!
//! Zero copy stays safe: [`SegmentFile::get`] hands out an `Arc<File>`, and a read plan,
//! a `FileRegion` in flight to `sendfile(2)` or an fsync holds its own `Arc`. Eviction
//! drops only the cache's reference, so a file is closed when its last user is done,
//! never under a running read. Descriptors in use can therefore exceed `capacity` by the
//! reads in flight, which the broker's reserve of descriptors covers.
//!
//! Reopening by path is correct because a segment's path names the same file for as
//! long as the segment is in its log: the log deletes or replaces (compaction's rename)
//! a segment file only under its own `&mut`, and drops the segment, and so its
//! [`SegmentFile`], at the same time. Written bytes stay in the page cache when a
//! descriptor closes, and `fsync` acts on the file, not the descriptor, so an evicted
//! active segment loses neither data nor durability.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::error::{Result, StorageError};

/// Open segment files kept by default (until the broker sets the capacity it derives
/// from `RLIMIT_NOFILE` and `log.segment.fds.max`). Below the common soft limit of 1024.
pub const SEGMENT_FDS_MAX_DEFAULT: usize = 512;
/// The cache never shrinks below this many files: a log being recovered, compacted and
/// read at once touches a few segments, and a cache of one would thrash.
pub const SEGMENT_FDS_MIN: usize = 8;

/// Counters, for logs, metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Files the cache holds open now.
    pub open: usize,
    pub capacity: usize,
    /// Opens of a segment file that was closed by eviction (the cost of the bound).
    pub reopened: u64,
    pub evicted: u64,
}

#[derive(Debug)]
pub struct DescriptorCache {
    capacity: AtomicUsize,
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    reopened: AtomicU64,
    evicted: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    /// Logical clock: bumped at every use.
    tick: u64,
    /// Open files by segment file id: `(file, tick of last use)`.
    open: HashMap<u64, (Arc<File>, u64)>,
    /// `tick of last use -> id`: the first entry is the least recently used.
    lru: BTreeMap<u64, u64>,
}

impl Inner {
    fn touch(&mut self, id: u64) -> Option<Arc<File>> {
        self.tick += 1;
        let tick = self.tick;
        let (file, last) = self.open.get_mut(&id)?;
        self.lru.remove(last);
        *last = tick;
        self.lru.insert(tick, id);
        Some(file.clone())
    }

    /// Inserts `file` for `id` (or returns the one another thread opened meanwhile) and
    /// evicts down to `capacity`. Evicted files are returned so that they are closed after
    /// the lock is released.
    fn insert(
        &mut self,
        id: u64,
        file: Arc<File>,
        capacity: usize,
        evicted: &mut Vec<Arc<File>>,
    ) -> Arc<File> {
        if let Some(existing) = self.touch(id) {
            evicted.push(file);
            return existing;
        }
        self.tick += 1;
        self.open.insert(id, (file.clone(), self.tick));
        self.lru.insert(self.tick, id);
        self.shrink_to(capacity, evicted);
        file
    }

    fn shrink_to(&mut self, capacity: usize, evicted: &mut Vec<Arc<File>>) {
        while self.open.len() > capacity {
            let Some((_, id)) = self.lru.pop_first() else {
                break;
            };
            if let Some((file, _)) = self.open.remove(&id) {
                evicted.push(file);
            }
        }
    }

    fn remove(&mut self, id: u64) -> Option<Arc<File>> {
        let (file, last) = self.open.remove(&id)?;
        self.lru.remove(&last);
        Some(file)
    }
}

impl DescriptorCache {
    pub fn new(capacity: usize) -> Arc<DescriptorCache> {
        Arc::new(DescriptorCache {
            capacity: AtomicUsize::new(capacity.max(SEGMENT_FDS_MIN)),
            inner: Mutex::new(Inner::default()),
            next_id: AtomicU64::new(0),
            reopened: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        })
    }

    /// The cache every [`crate::PartitionLog`] of this process shares unless opened with
    /// its own (`PartitionLog::open_with_cache`).
    pub fn shared() -> &'static Arc<DescriptorCache> {
        static SHARED: OnceLock<Arc<DescriptorCache>> = OnceLock::new();
        SHARED.get_or_init(|| DescriptorCache::new(SEGMENT_FDS_MAX_DEFAULT))
    }

    /// Sets the bound (at least [`SEGMENT_FDS_MIN`]) and closes files above it.
    pub fn set_capacity(&self, capacity: usize) {
        let capacity = capacity.max(SEGMENT_FDS_MIN);
        self.capacity.store(capacity, Ordering::Release);
        let mut evicted = Vec::new();
        self.lock().shrink_to(capacity, &mut evicted);
        self.count_evicted(evicted);
    }

    pub fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            open: self.lock().open.len(),
            capacity: self.capacity(),
            reopened: self.reopened.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The critical sections only move map entries; a panic in one leaves them
        // consistent enough to keep using.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count_evicted(&self, evicted: Vec<Arc<File>>) {
        // Dropped here, outside the lock: close(2) may take a while on some filesystems.
        self.evicted
            .fetch_add(evicted.len() as u64, Ordering::Relaxed);
        drop(evicted);
    }

    /// Registers `file`, just opened or created at `path`, as a segment file.
    pub fn adopt(self: &Arc<Self>, path: PathBuf, file: File) -> SegmentFile {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut evicted = Vec::new();
        self.lock()
            .insert(id, Arc::new(file), self.capacity(), &mut evicted);
        self.count_evicted(evicted);
        SegmentFile(Arc::new(Handle {
            id,
            path,
            cache: self.clone(),
        }))
    }
}

/// A segment's file, opened through its [`DescriptorCache`]. Cloning shares it; the
/// cache forgets the file when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct SegmentFile(Arc<Handle>);

#[derive(Debug)]
struct Handle {
    id: u64,
    path: PathBuf,
    cache: Arc<DescriptorCache>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let file = self.cache.lock().remove(self.id);
        drop(file);
    }
}

impl SegmentFile {
    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// The open file, opened again (read and write, never created) if the cache closed
    /// it. The `Arc` keeps it open for as long as the caller holds it.
    pub fn get(&self) -> Result<Arc<File>> {
        let h = &*self.0;
        if let Some(file) = h.cache.lock().touch(h.id) {
            return Ok(file);
        }
        // Opened outside the lock so that one slow open does not stall every other
        // read; two threads racing here keep the first file inserted.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&h.path)
            .map_err(|e| StorageError::io(&h.path, e))?;
        h.cache.reopened.fetch_add(1, Ordering::Relaxed);
        let mut evicted = Vec::new();
        let file = h
            .cache
            .lock()
            .insert(h.id, Arc::new(file), h.cache.capacity(), &mut evicted);
        h.cache.count_evicted(evicted);
        Ok(file)
    }

    /// fsyncs the file's data, reopening it if it was evicted (`fsync` acts on the file:
    /// pages written through a closed descriptor are flushed too). A segment file that
    /// retention deleted meanwhile needs no sync.
    pub fn sync_data(&self) -> Result<()> {
        let file = match self.get() {
            Ok(f) => f,
            Err(StorageError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        file.sync_data()
            .map_err(|e| StorageError::io(self.path(), e))
    }

    /// Whether the cache holds this file open now (tests).
    pub fn is_open(&self) -> bool {
        self.0.cache.lock().open.contains_key(&self.0.id)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    fn file_with(dir: &Path, name: &str, bytes: &[u8]) -> (PathBuf, File) {
        let path = dir.join(name);
        let mut f = File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        (
            path.clone(),
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap(),
        )
    }

    #[test]
    fn least_recently_used_is_closed_first_and_reopens_with_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DescriptorCache::new(SEGMENT_FDS_MIN);
        let files: Vec<SegmentFile> = (0..SEGMENT_FDS_MIN + 4)
            .map(|i| {
                let (p, f) =
                    file_with(dir.path(), &format!("{i}"), format!("bytes {i}").as_bytes());
                cache.adopt(p, f)
            })
            .collect();
        assert_eq!(cache.stats().open, SEGMENT_FDS_MIN);
        // The four oldest went.
        assert!(files[..4].iter().all(|f| !f.is_open()));
        assert!(files[4..].iter().all(|f| f.is_open()));
        // Using file 4 makes file 5 the least recent: reopening 0 evicts 5, not 4.
        files[4].get().unwrap();
        let f0 = files[0].get().unwrap();
        let mut buf = vec![0u8; 7];
        f0.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"bytes 0");
        assert!(files[4].is_open());
        assert!(!files[5].is_open());
        assert_eq!(cache.stats().reopened, 1);
        assert_eq!(cache.stats().open, SEGMENT_FDS_MIN);
        // Dropping a handle frees its slot.
        drop(files);
        assert_eq!(cache.stats().open, 0);
    }

    #[test]
    fn an_evicted_file_stays_readable_for_whoever_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DescriptorCache::new(SEGMENT_FDS_MIN);
        let (p, f) = file_with(dir.path(), "held", b"still here");
        let held = cache.adopt(p, f);
        let in_flight = held.get().unwrap();
        let others: Vec<SegmentFile> = (0..SEGMENT_FDS_MIN * 2)
            .map(|i| {
                let (p, f) = file_with(dir.path(), &format!("o{i}"), b"x");
                cache.adopt(p, f)
            })
            .collect();
        assert!(!held.is_open());
        // Unlinked too, as retention does: the held descriptor still reads it.
        std::fs::remove_file(held.path()).unwrap();
        let mut buf = vec![0u8; 10];
        in_flight.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"still here");
        assert!(held.get().is_err(), "a deleted segment cannot be reopened");
        drop(others);
    }

    #[test]
    fn set_capacity_closes_down_to_the_new_bound() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DescriptorCache::new(64);
        let files: Vec<SegmentFile> = (0..40)
            .map(|i| {
                let (p, f) = file_with(dir.path(), &format!("{i}"), b"x");
                cache.adopt(p, f)
            })
            .collect();
        assert_eq!(cache.stats().open, 40);
        cache.set_capacity(10);
        assert_eq!(cache.stats().open, 10);
        assert_eq!(cache.stats().evicted, 30);
        assert!(files[30..].iter().all(|f| f.is_open()));
        cache.set_capacity(1);
        assert_eq!(cache.capacity(), SEGMENT_FDS_MIN);
    }
}
