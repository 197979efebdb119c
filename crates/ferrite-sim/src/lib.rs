//! Deterministic simulation of a three-node Ferrite cluster: one seed, one run.
//!
//! The simulator owns time (a virtual clock in ms), randomness (one seeded
//! splitmix64 stream) and the network (an event queue of message deliveries and
//! timers). Inside it, each node runs the real sans-I/O cores:
//!
//! - the active controller is a real [`ferrite_controller::Controller`] (registration,
//!   heartbeats, fencing on a missed session, clean election from the ISR with a leader
//!   epoch bump, AlterPartition, preferred-leader rebalance), over a metadata log the
//!   simulator keeps as the committed quorum log;
//! - every broker replays that log into a real [`ferrite_metadata::MetadataImage`] and
//!   derives its partition roles from it;
//! - partition leaders run [`ferrite_replication::PartitionLeader`] (high watermark,
//!   ISR shrink/expand through AlterPartition, acks=all purgatory); followers fetch
//!   with `LastFetchedEpoch` and cut their logs with
//!   [`ferrite_replication::follower_truncation`] on a `DivergingEpoch` (KIP-320);
//! - every replica's data is a real [`ferrite_storage::PartitionLog`] in its own
//!   directory (under `/dev/shm` when it exists, so that fsync costs nothing).
//!
//! What the simulator replaces: sockets and the tokio broker (messages are plain
//! values in the event queue; the glue between the cores here is the simulator's own,
//! written to follow the broker's rules, not the broker's code), and the openraft
//! quorum (the controller's log is committed as soon as the active controller appends
//! to it; a controller "failover" builds a new `Controller` over the committed log on
//! another node when the host crashes, pauses or loses its majority).
//!
//! Crashes drop what was not flushed, honestly: each node's "disk" remembers the
//! offset each log was last fsynced to ([`PartitionLog::flush`]); a crash drops the
//! in-memory state, and the restart reopens the log and truncates it to that offset.
//! To keep acks=all safe under such crashes the replicas acknowledge only flushed data:
//! a leader tells its `PartitionLeader` of an append only after the flush, and serves
//! followers only flushed records; a follower fetches again (reporting its new log end)
//! only after flushing what it appended. A crash between an append and its flush loses
//! that append, which was never acknowledged.
//!
//! [`PartitionLog::flush`]: ferrite_storage::PartitionLog::flush

mod rng;
mod world;

use std::fmt::Write as _;

pub use rng::Rng;
pub use world::{run, PlantedBug, SimConfig, SimResult, SimStats};

/// The command that replays `seed` (printed with every failure).
pub fn replay_command(seed: u64) -> String {
    format!("cargo run -p ferrite-sim -- --seed {seed}")
}

/// A failed run's summary: seed, replay command, what went wrong.
pub fn failure_text(result: &SimResult) -> String {
    let mut s = format!(
        "seed {} FAILED (replay: {})\n",
        result.seed,
        replay_command(result.seed)
    );
    for v in &result.violations {
        let _ = writeln!(s, "  violation: {v}");
    }
    if !result.report.is_valid() {
        s.push_str(&result.report.to_text());
    }
    s
}
