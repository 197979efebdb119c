//! Kafka's KRaft controller logic (QuorumController, ReplicationControlManager,
//! ClusterControlManager, BrokerHeartbeatManager, PartitionChangeBuilder) as a sans-I/O
//! state machine: events and the current time in, a reply and metadata records out.
//!
//! The flow is one-way: [`Controller::handle`] decides a change as records and applies
//! them to its own [`ferrite_metadata::MetadataImage`] through the same
//! `MetadataImage::apply` that replays the log; the caller appends the records as one
//! metadata log entry (committed by the quorum) and only then sends the reply; brokers
//! and follower controllers replay the entry through `apply` as well. Start-up replays
//! the same records, so there is one code path for "decide" and "recover".
//!
//! No I/O, no clock, no OS randomness: time is `now_ms`, randomness is the seed given to
//! [`Controller::new`].

pub mod api;
pub mod config;
mod controller;
pub mod election;
pub mod error;

pub use api::*;
pub use config::ControllerConfig;
pub use controller::{validate_topic_name, Controller};
pub use error::ControllerError;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
