//! Cluster metadata as a log of records (the KRaft model): a handler validates a change
//! and produces [`MetadataRecord`]s, they are appended to the [`MetadataLog`], and
//! [`MetadataImage::apply`] folds them into the in-memory image. Start-up replays the log
//! through the same `apply`, so there is one code path for "change" and "recover".
//!
//! On one node the log is a local file; the multi-broker work replaces its transport
//! with a Raft quorum without changing the records or the image.

pub mod image;
pub mod log;
pub mod placement;
pub mod records;

pub use image::{BrokerRegistration, MetadataImage, PartitionImage, TopicImage};
pub use log::{MetadataLog, MetadataLogContents, MetadataLogError};
pub use placement::{assign_replicas, BrokerSlot, PlacementError};
pub use records::{BrokerEndpoint, MetadataRecord, NO_LEADER, NO_LEADER_CHANGE};
