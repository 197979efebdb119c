//! Operating errors of the storage layer. The broker maps them to Kafka error codes in one
//! place (`ferrite_broker::error`).

use std::path::PathBuf;

/// Why a record batch is not acceptable. Produce answers these with CORRUPT_MESSAGE;
/// recovery treats them as the end of the valid log.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("batch truncated: have {have} bytes, need {need}")]
    Truncated { have: usize, need: usize },
    #[error("invalid batch length {0}")]
    BadLength(i32),
    #[error("unsupported record batch magic {0} (only v2 is accepted)")]
    UnsupportedMagic(i8),
    #[error("CRC mismatch: header says {expected:#010x}, computed {actual:#010x}")]
    CrcMismatch { expected: u32, actual: u32 },
    #[error("record count {record_count} does not match last offset delta {last_offset_delta}")]
    BadRecordCount {
        record_count: i32,
        last_offset_delta: i32,
    },
    #[error("control batches may not be produced by clients")]
    ControlFromProducer,
    /// KIP-937: answered INVALID_TIMESTAMP.
    #[error("timestamp {timestamp} of record {index} is out of range: it should be within [{earliest}, {latest}] (message.timestamp.before.max.ms / after.max.ms)")]
    TimestampOutOfRange {
        index: usize,
        timestamp: i64,
        earliest: i64,
        latest: i64,
    },
    /// Answered INVALID_TIMESTAMP, as Kafka does.
    #[error("producers must not set the LogAppendTime timestamp type; the broker sets it")]
    LogAppendTimeFromProducer,
    #[error("batch maxTimestamp {max_timestamp} (baseTimestamp {base_timestamp}) must be recomputed from the records, which cannot be decoded: {reason}")]
    Undecodable {
        max_timestamp: i64,
        base_timestamp: i64,
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt batch: {0}")]
    CorruptBatch(#[from] BatchError),
    #[error("batch of {size} bytes exceeds max.message.bytes {max}")]
    MessageTooLarge { size: usize, max: usize },
    #[error("offset {offset} is out of range [{log_start_offset}, {log_end_offset}]")]
    OffsetOutOfRange {
        offset: i64,
        log_start_offset: i64,
        log_end_offset: i64,
    },
    #[error("corruption in {path} at byte {position}: {reason}")]
    Corruption {
        path: PathBuf,
        position: u64,
        reason: String,
    },
    #[error("log {0} is offline after an unrecoverable write failure")]
    LogOffline(PathBuf),
    /// A producer's batch breaks the idempotence rules (sequence, epoch).
    #[error("{0}")]
    Producer(#[from] crate::producer_state::ProducerStateError),
    #[error("invalid segment file name {0}")]
    InvalidFileName(PathBuf),
    /// A batch's leader epoch goes back in the epoch history, or the
    /// `leader-epoch-checkpoint` is not a valid history.
    #[error("leader epoch history of {path}: {source}")]
    LeaderEpoch {
        path: PathBuf,
        source: ferrite_replication::ReplicationError,
    },
    /// A follower was given batches that do not continue its log (offsets not at its
    /// log end, or going backwards).
    #[error("follower append at log end offset {log_end_offset}: {reason}")]
    NonContiguousFollowerAppend { log_end_offset: i64, reason: String },
}

impl StorageError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StorageError::Io {
            path: path.into(),
            source,
        }
    }

    /// True when the error is the disk being full, which the broker reports as
    /// KAFKA_STORAGE_ERROR without taking the log offline.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StorageError::Io { source, .. } if source.raw_os_error() == Some(28))
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;
