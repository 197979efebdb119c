//! The one place where operating errors of the layers below become Kafka error codes.

use ferrite_metadata::PlacementError;
use ferrite_storage::{BatchError, ProducerStateError, StorageError};
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
        StorageError::Producer(e) => return producer_state_error_code(e),
        // The disk is full or failing: Kafka answers KAFKA_STORAGE_ERROR so the client
        // retries (elsewhere, once replication exists) instead of treating it as fatal.
        StorageError::Io { .. }
        | StorageError::Corruption { .. }
        | StorageError::LogOffline(_)
        | StorageError::InvalidFileName(_)
        | StorageError::LeaderEpoch { .. } => ResponseError::KafkaStorageError,
        // Only a replica fetcher appends as a follower; a leader's batches that do not
        // continue the log are answered like a bad batch.
        StorageError::NonContiguousFollowerAppend { .. } => ResponseError::CorruptMessage,
    };
    code.code()
}

/// Kafka error code for a batch that breaks the idempotent producer's rules.
pub fn producer_state_error_code(e: &ProducerStateError) -> i16 {
    let code = match e {
        ProducerStateError::OutOfOrderSequence { .. } => ResponseError::OutOfOrderSequenceNumber,
        ProducerStateError::InvalidProducerEpoch { .. } => ResponseError::InvalidProducerEpoch,
        // Kafka's LogValidator: a producer id with a negative sequence, or more than one
        // batch in a v2 request, is an InvalidRecordException.
        ProducerStateError::InvalidSequence { .. } | ProducerStateError::MultipleBatches(_) => {
            ResponseError::InvalidRecord
        }
        // Transactions are not built: a transactional batch cannot be accepted honestly.
        ProducerStateError::NonTransactionalInTxn(_) => ResponseError::InvalidTxnState,
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

pub fn recompress_error_code(e: &crate::recompress::RecompressError) -> i16 {
    match e {
        crate::recompress::RecompressError::Decode(_) => ResponseError::CorruptMessage.code(),
        crate::recompress::RecompressError::Encode(_) => ResponseError::UnknownServerError.code(),
    }
}

/// Kafka error code for a replication refusal (produce, fetch, ListOffsets).
pub fn replication_error_code(e: &ferrite_replication::ReplicationError) -> i16 {
    replication_response_error(e).code()
}

/// Kafka error for a replication refusal.
pub fn replication_response_error(e: &ferrite_replication::ReplicationError) -> ResponseError {
    use ferrite_replication::ReplicationError as R;
    match e {
        R::NotEnoughReplicas { .. } => ResponseError::NotEnoughReplicas,
        R::NotEnoughReplicasAfterAppend { .. } => ResponseError::NotEnoughReplicasAfterAppend,
        R::RequestTimedOut { .. } | R::TooManyPendingProduces(_) => ResponseError::RequestTimedOut,
        R::FencedLeaderEpoch { .. } => ResponseError::FencedLeaderEpoch,
        R::UnknownLeaderEpoch { .. } => ResponseError::UnknownLeaderEpoch,
        R::NotLeaderOrFollower(_) => ResponseError::NotLeaderOrFollower,
        R::OffsetOutOfRange { .. } => ResponseError::OffsetOutOfRange,
        R::OffsetNotAvailable { .. } => ResponseError::OffsetNotAvailable,
        R::EpochRegression { .. } | R::InvalidEpochHistory { .. } => {
            ResponseError::KafkaStorageError
        }
    }
}

/// Kafka error code for a failed metadata commit through the quorum.
pub fn quorum_error_code(e: &ferrite_raft::QuorumError) -> i16 {
    use ferrite_raft::QuorumError;
    let code = match e {
        // Clients refresh metadata and retry at the controller it names.
        QuorumError::NotController { .. } => ResponseError::NotController,
        // Outcome unknown: the change may still commit (Kafka answers REQUEST_TIMED_OUT).
        QuorumError::Timeout(_) => ResponseError::RequestTimedOut,
        QuorumError::TooLarge { .. } => ResponseError::PolicyViolation,
        QuorumError::Store(_) => ResponseError::KafkaStorageError,
        QuorumError::Config(_) | QuorumError::Bind { .. } | QuorumError::Stopped(_) => {
            ResponseError::UnknownServerError
        }
    };
    code.code()
}

/// The code a produce gets when its transaction could not be verified with the
/// coordinator (KIP-890 part 1), from the coordinator's code: the retriable ones become
/// NOT_ENOUGH_REPLICAS, which older clients retry without a metadata refresh, as Kafka
/// maps them (`ReplicaManager.handleProduceAppend`); PRODUCER_FENCED becomes
/// INVALID_PRODUCER_EPOCH, as the local check answers; INVALID_TXN_STATE (not added)
/// and the others stay.
pub fn verification_produce_code(code: i16) -> i16 {
    let retriable = [
        ResponseError::ConcurrentTransactions,
        ResponseError::NetworkException,
        ResponseError::CoordinatorLoadInProgress,
        ResponseError::CoordinatorNotAvailable,
        ResponseError::NotCoordinator,
    ];
    if retriable.iter().any(|e| e.code() == code) {
        ResponseError::NotEnoughReplicas.code()
    } else if code == ResponseError::ProducerFenced.code() {
        // What the local check answers a produce too (`TxnError::for_version`).
        ResponseError::InvalidProducerEpoch.code()
    } else {
        code
    }
}

/// Kafka error code for a refused produce.
pub fn produce_error_code(e: &crate::replica_manager::ProduceError) -> i16 {
    match e {
        crate::replica_manager::ProduceError::Storage(e) => storage_error_code(e),
        crate::replica_manager::ProduceError::Replication(e) => replication_error_code(e),
        crate::replica_manager::ProduceError::NotInTransaction { .. } => {
            ResponseError::InvalidTxnState.code()
        }
        // Retriable, and one that older clients retry without a metadata refresh: what
        // Kafka answers for a verification that could not be made.
        crate::replica_manager::ProduceError::VerificationsFull(_) => {
            ResponseError::NotEnoughReplicas.code()
        }
    }
}

/// Kafka error code of a `ferrite_controller` decision (its codes are Kafka's, checked
/// against kafka-protocol in that crate's tests).
pub fn controller_error_code(e: &ferrite_controller::ControllerError) -> i16 {
    e.code()
}
