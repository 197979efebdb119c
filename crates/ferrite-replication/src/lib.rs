//! Replication of one partition as sans-I/O state machines, in Kafka's vocabulary and
//! with Kafka's rules (Partition.scala, LeaderEpochFileCache, AbstractFetcherThread):
//!
//! - [`LeaderEpochCache`]: leader epoch → start offset, the answer to
//!   OffsetForLeaderEpoch, truncation of the history with the log;
//! - [`follower_truncation`]: where a follower cuts its log so that it never diverges
//!   from the leader's (KIP-101, KIP-279), from the leader's answer;
//! - [`PartitionLeader`]: the leader's view of its followers, the high watermark, ISR
//!   shrink and expand proposals (one AlterPartition in flight), follower fetch
//!   validation, the acks=all purgatory and ListOffsets latest (KIP-207);
//! - [`preferred_read_replica`]: the follower a consumer in another rack reads from
//!   (KIP-392);
//! - [`ByteRateThrottle`]: the byte budget of a reassignment's replication throttle.
//!
//! Nothing here reads a clock, a file or a socket: time is an argument (`now_ms`),
//! the log is described by its offsets, and every decision is a returned value that the
//! broker carries out (append, truncate, send AlterPartition, answer a produce). The
//! durable form of the epoch cache is `ferrite_storage::leader_epoch`. The broker's
//! `replica_manager` wires these into its partitions.

pub mod epoch_cache;
pub mod error;
pub mod follower;
pub mod leader;
pub mod read_replica;
pub mod throttle;

pub use epoch_cache::{EpochEndOffset, LeaderEpochCache, UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET};
pub use error::ReplicationError;
pub use follower::{follower_high_watermark, follower_truncation, Truncation};
pub use leader::{
    AlterPartitionProposal, BrokerState, FetchOutcome, FollowerFetch, IsrMember, PartitionLeader,
    PartitionState, ProduceCompletion, ReplicationConfig, PENDING_PRODUCES_MAX,
};
pub use read_replica::{preferred_read_replica, ReadReplica};
pub use throttle::{ByteRateThrottle, UNTHROTTLED_BYTES_PER_SECOND};

/// A broker's id (`node.id`).
pub type BrokerId = i32;
