//! Ferrite's storage engine: partition logs made of segment files with sparse offset and
//! time indexes, crash recovery, retention. No network, no protocol: see
//! `docs/storage-format.md` for the on-disk format and the disk assumptions.

pub mod batch;
pub mod error;
pub mod log;
pub mod segment;
pub mod test_support;

pub use batch::{validate_batch, validate_producer_batch, BatchHeader, BatchIter};
pub use error::{BatchError, StorageError};
pub use log::{
    AppendInfo, CompactReport, FileRegion, LogConfig, OpenReport, PartitionLog, ReadPlan,
};
