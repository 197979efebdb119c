//! The one place where operating errors of the layers below become Kafka error codes.

use ferrite_metadata::PlacementError;
use ferrite_storage::{BatchError, StorageError};
use kafka_protocol::ResponseError;

use crate::config::ConfigError;

/// Kafka error code for a storage error, as clients expect it.
pub fn storage_error_code(e: &StorageError) -> i16 {
    let code = match e {
        // KIP-937 bounds and producer-set LogAppendTime, as Kafka's LogValidator answers.
        StorageError::CorruptBatch(
            BatchError::TimestampOutOfRange { .. } | BatchError::LogAppendTimeFromProducer,
        ) => ResponseError::InvalidTimestamp,
        StorageError::CorruptBatch(_) => ResponseError::CorruptMessage,
        StorageError::MessageTooLarge { .. } => ResponseError::MessageTooLarge,
        StorageError::OffsetOutOfRange { .. } => ResponseError::OffsetOutOfRange,
        StorageError::ProducerStateUnsupported(_) => ResponseError::InvalidRecord,
        // The disk is full or failing: Kafka answers KAFKA_STORAGE_ERROR so the client
        // retries (elsewhere, once replication exists) instead of treating it as fatal.
        StorageError::Io { .. }
        | StorageError::Corruption { .. }
        | StorageError::LogOffline(_)
        | StorageError::InvalidFileName(_) => ResponseError::KafkaStorageError,
    };
    code.code()
}

pub fn placement_error_code(e: &PlacementError) -> i16 {
    match e {
        PlacementError::ReplicationFactorTooLarge { .. }
        | PlacementError::ReplicationFactorTooSmall(_) => {
            ResponseError::InvalidReplicationFactor.code()
        }
        PlacementError::NoPartitions(_) => ResponseError::InvalidPartitions.code(),
    }
}

pub fn config_error_code(_: &ConfigError) -> i16 {
    ResponseError::InvalidConfig.code()
}

pub const NONE: i16 = 0;

/// Shorthand for handlers.
pub fn code(e: ResponseError) -> i16 {
    e.code()
}
