//! Ferrite's storage engine: partition logs made of segment files with sparse offset and
//! time indexes, crash recovery, retention. No network, no protocol: see
//! `docs/storage-format.md` for the on-disk format and the disk assumptions.

pub mod batch;
pub mod error;
pub mod fd_cache;
pub mod leader_epoch;
pub mod log;
pub mod producer_state;
pub mod segment;
pub mod test_support;

pub use batch::ControlType;
pub use batch::{validate_batch, validate_producer_batch, BatchHeader, BatchIter};
pub use error::{BatchError, StorageError};
pub use fd_cache::{CacheStats, DescriptorCache, SegmentFile};
pub use leader_epoch::{
    read_leader_epoch_checkpoint, write_leader_epoch_checkpoint, EpochEntry,
    LEADER_EPOCH_CHECKPOINT_FILE,
};
pub use log::{
    AppendInfo, CompactReport, FileRegion, LogConfig, OpenReport, PartitionLog, ReadPlan,
};
pub use producer_state::{
    AbortedTxn, ProducerStateEntry, ProducerStateError, ProducerStateManager,
};
