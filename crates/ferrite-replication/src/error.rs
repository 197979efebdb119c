//! Why replication refuses something. Each variant names the Kafka error code the broker
//! answers with; the mapping itself lives in one place, `ferrite_broker::error`.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicationError {
    /// NOT_ENOUGH_REPLICAS (19): acks=all refused before the append because the ISR is
    /// smaller than `min.insync.replicas`.
    #[error("ISR has {isr} members, fewer than min.insync.replicas {min_insync_replicas}")]
    NotEnoughReplicas {
        isr: usize,
        min_insync_replicas: usize,
    },
    /// NOT_ENOUGH_REPLICAS_AFTER_APPEND (20): appended, but the ISR shrank below
    /// `min.insync.replicas` before the high watermark reached the batch.
    #[error("ISR shrank to {isr} members, below min.insync.replicas {min_insync_replicas}, after the append")]
    NotEnoughReplicasAfterAppend {
        isr: usize,
        min_insync_replicas: usize,
    },
    /// REQUEST_TIMED_OUT (7): the high watermark did not reach the batch in time.
    #[error("high watermark did not reach offset {required_offset} before the request's timeout")]
    RequestTimedOut { required_offset: i64 },
    /// FENCED_LEADER_EPOCH (74): the request carries an older leader epoch than ours.
    #[error("leader epoch {request} is older than the current {current}")]
    FencedLeaderEpoch { request: i32, current: i32 },
    /// UNKNOWN_LEADER_EPOCH (76): the request carries a newer leader epoch than ours
    /// (our metadata lags).
    #[error("leader epoch {request} is newer than the current {current}")]
    UnknownLeaderEpoch { request: i32, current: i32 },
    /// NOT_LEADER_OR_FOLLOWER (6): the fetching broker is not a replica, or leadership
    /// moved while a produce waited.
    #[error(
        "broker {0} is not a replica of this partition, or this broker is no longer its leader"
    )]
    NotLeaderOrFollower(i32),
    /// OFFSET_OUT_OF_RANGE (1): a follower fetched beyond the leader's log end.
    #[error("fetch offset {fetch_offset} is beyond the log end offset {log_end_offset}")]
    OffsetOutOfRange {
        fetch_offset: i64,
        log_end_offset: i64,
    },
    /// OFFSET_NOT_AVAILABLE (78): a new leader's high watermark has not yet reached the
    /// start of its epoch, so "latest" is not known (KIP-207).
    #[error("high watermark {high_watermark} has not reached the leader epoch start offset {leader_epoch_start_offset}")]
    OffsetNotAvailable {
        high_watermark: i64,
        leader_epoch_start_offset: i64,
    },
    /// A record batch from the leader carries an epoch older than the follower's latest:
    /// the leader's log is not monotonic. The follower stops fetching that partition
    /// (KAFKA_STORAGE_ERROR-like; never a panic, since a peer sent it).
    #[error("leader epoch {epoch} at offset {start_offset} is older than the latest known epoch {latest}")]
    EpochRegression {
        epoch: i32,
        start_offset: i64,
        latest: i32,
    },
    /// REQUEST_TIMED_OUT as well: more produces wait on this partition than
    /// [`crate::PENDING_PRODUCES_MAX`].
    #[error("{0} produces already wait for the high watermark of this partition")]
    TooManyPendingProduces(usize),
    /// A leader-epoch checkpoint whose entries are not strictly increasing.
    #[error(
        "leader epoch history is not strictly increasing at epoch {epoch} offset {start_offset}"
    )]
    InvalidEpochHistory { epoch: i32, start_offset: i64 },
}
