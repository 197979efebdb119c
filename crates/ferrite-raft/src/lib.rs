//! The metadata quorum: the metadata log (batches of [`MetadataRecord`]) replicated
//! among a fixed set of controller voters with openraft 0.9, folded into a
//! [`ferrite_metadata::MetadataImage`] by the same `apply_all` the single node replays
//! at start-up.
//!
//! - [`voters`]: Kafka's `controller.quorum.voters` (`1@host:port,...`).
//! - [`log_store`]: the durable Raft log and vote (openraft's `RaftLogStorage`).
//! - [`state_machine`]: committed entries applied to the image, snapshots of it.
//! - [`network`]: the private RPC between voters over Ferrite's length-prefixed framing.
//! - [`node`]: [`MetadataQuorum`], what a controller voter (or a broker-only observer)
//!   runs: start, write, status.
//!
//! - [`local`]: the quorum files read without changing them (start-up checks).

use std::io::Cursor;

pub mod frame;
pub mod local;
pub mod log_store;
pub mod network;
pub mod node;
pub mod state_machine;
pub mod voters;

pub use ferrite_metadata::MetadataRecord;
pub use local::{read_local, LocalMetadata};
pub use node::{
    KafkaHandler, MetadataQuorum, QuorumConfig, QuorumDescription, QuorumError, QuorumRole,
    QuorumStatus, QuorumTiming, VoterProgress, QUORUM_OBSERVERS_MAX,
};
pub use state_machine::AppliedImage;
pub use voters::{parse_voters, Voter, VotersError};

/// A voter's node id (Kafka's `node.id`, non-negative and within i32).
pub type NodeId = u64;

/// One metadata change: the records a handler produced together, applied together.
pub type MetadataBatch = Vec<MetadataRecord>;

openraft::declare_raft_types!(
    /// openraft's types for the metadata quorum.
    pub TypeConfig:
        D = MetadataBatch,
        R = (),
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
        Responder = openraft::impls::OneshotResponder<TypeConfig>,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
