//! A controller voter: [`MetadataQuorum::start`] opens the durable state, starts
//! openraft, serves the quorum RPC on the controller listener, forms the quorum, and
//! watches that a leader still hears from a majority.
//!
//! Forming: the voter set is fixed by configuration. When the node with the lowest id
//! finds no state at all it initializes the cluster with every configured voter; the
//! others wait until its leader contacts them. A one-voter quorum is the same code path
//! with one voter. A node whose stored voter set differs from the configured one
//! refuses to start (membership changes are not supported).
//!
//! Observers: a broker-only node (`process.roles=broker`) is no voter. It follows the
//! log as an openraft learner, KRaft's observer: at start it asks the leader
//! (`AddObserver`, retried across the voters until one leads) to add it, at the address
//! of its own quorum RPC listener, and from then on the leader replicates entries and
//! snapshots to it as to any follower. It never votes and never stands for election;
//! its writes are forwarded to the leader as a follower voter's are. The voter set stays
//! fixed: only learners are added (openraft's membership changes between voters are
//! where its open bugs are).
//!
//! CheckQuorum: openraft has none, so a leader cut off from the majority stays leader
//! and its writes never commit (KAFKA-15489 is Kafka's version of the bug). Here a leader
//! that has had no acknowledgement from a majority within `fetch_timeout` stops being the
//! active controller: it refuses writes with NotController and reports no leader.
//! (openraft 0.9 ignores an election trigger on a leader, so its own state stays Leader
//! until it sees a higher term; the status here is what callers must use.)

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, Config, ServerState, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::frame::StoreError;
use crate::log_store::LogStore;
use crate::network::{
    serve, CallError, NetworkFactory, PeerClient, QuorumRequest, QuorumResponse, WriteRefusal,
    SNAPSHOT_CHUNK_BYTES,
};
use crate::state_machine::{AppliedImage, StateMachineStore};
use crate::voters::{Voter, QUORUM_VOTERS_MAX};
use crate::{MetadataBatch, NodeId, Raft};

/// The quorum's timers. The defaults are KRaft's where KRaft has the setting.
#[derive(Debug, Clone)]
pub struct QuorumTiming {
    /// Leader heartbeat (openraft's `heartbeat_interval`); also each AppendEntries' timeout.
    pub heartbeat_interval: Duration,
    /// A follower that hears no leader for a random time in [this, 2 × this) stands for
    /// election (`controller.quorum.election.timeout.ms`, 1000).
    pub election_timeout: Duration,
    /// A leader without acknowledgements from a majority for this long stops acting as
    /// the active controller (`controller.quorum.fetch.timeout.ms`, 2000).
    pub fetch_timeout: Duration,
    /// Upper bound on any one RPC, InstallSnapshot chunks included
    /// (`controller.quorum.request.timeout.ms`, 2000).
    pub request_timeout: Duration,
    /// Pause before reconnecting to an unreachable voter.
    pub reconnect_backoff: Duration,
    /// A `write` not committed by then fails with `Timeout` (it may still commit).
    pub write_timeout: Duration,
}

impl Default for QuorumTiming {
    fn default() -> Self {
        QuorumTiming {
            heartbeat_interval: Duration::from_millis(500),
            election_timeout: Duration::from_millis(1000),
            fetch_timeout: Duration::from_millis(2000),
            request_timeout: Duration::from_millis(2000),
            reconnect_backoff: Duration::from_millis(500),
            write_timeout: Duration::from_millis(5000),
        }
    }
}

/// What this node is in the quorum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuorumRole {
    /// One of `controller.quorum.voters`.
    Voter,
    /// Not a voter: follows the log as a learner, reached by the leader at `advertised`
    /// (`host:port` of its quorum RPC listener).
    Observer { advertised: String },
}

/// Observers (learners) the leader adds at most: each one is a replication stream.
pub const QUORUM_OBSERVERS_MAX: usize = 256;
/// Longest `host:port` an observer may give.
pub const OBSERVER_ADDRESS_BYTES_MAX: usize = 255;
/// Pause before an observer asks again after a refusal it cannot fix by retrying soon.
const OBSERVER_REFUSED_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct QuorumConfig {
    pub node_id: NodeId,
    pub role: QuorumRole,
    /// The controller listener (and the source address of outgoing connections).
    pub controller_listen: SocketAddr,
    pub voters: Vec<Voter>,
    /// Where the log, vote and snapshot live (e.g. `<data-dir>/__cluster_metadata/quorum`).
    pub dir: PathBuf,
    pub timing: QuorumTiming,
    /// A snapshot is taken once this many entries were committed since the last one.
    pub snapshot_interval_entries: u64,
    /// Entries kept in the log behind a snapshot, so a briefly lagging voter catches up
    /// from the log rather than a whole snapshot.
    pub entries_kept_after_snapshot: u64,
}

/// Default snapshot interval: each entry is one admin change, so snapshots are rare.
pub const SNAPSHOT_INTERVAL_ENTRIES_DEFAULT: u64 = 1000;
pub const ENTRIES_KEPT_AFTER_SNAPSHOT_DEFAULT: u64 = 100;

impl QuorumConfig {
    pub fn new(
        node_id: NodeId,
        controller_listen: SocketAddr,
        voters: Vec<Voter>,
        dir: PathBuf,
    ) -> QuorumConfig {
        QuorumConfig {
            node_id,
            role: QuorumRole::Voter,
            controller_listen,
            voters,
            dir,
            timing: QuorumTiming::default(),
            snapshot_interval_entries: SNAPSHOT_INTERVAL_ENTRIES_DEFAULT,
            entries_kept_after_snapshot: ENTRIES_KEPT_AFTER_SNAPSHOT_DEFAULT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QuorumError {
    #[error("quorum configuration: {0}")]
    Config(String),
    #[error("quorum storage: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on controller address {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// This node is not the active controller and could not hand the write to one.
    #[error("not the active controller (leader: {leader:?})")]
    NotController { leader: Option<NodeId> },
    /// The write was not committed in time; it may still commit later.
    #[error("metadata write not committed within {0:?}")]
    Timeout(Duration),
    #[error("metadata change of {bytes} bytes is above METADATA_ENTRY_BYTES_MAX ({max})")]
    TooLarge { bytes: usize, max: usize },
    #[error("the quorum has stopped: {0}")]
    Stopped(String),
}

/// What this node knows of the quorum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumStatus {
    pub node_id: NodeId,
    /// The active controller as far as this node knows: itself only while it is the
    /// leader and has heard from a majority within the fetch timeout.
    pub leader_id: Option<NodeId>,
    /// Whether this node is the active controller (accepts writes).
    pub is_active_controller: bool,
    /// openraft's role; a leader without quorum acknowledgements is still `Leader` here.
    pub server_state: ServerState,
    /// The Raft term (KRaft's leader epoch).
    pub leader_epoch: u64,
    pub last_log_index: Option<u64>,
    /// Index of the last entry applied to the image.
    pub raft_commit_index: Option<u64>,
    /// Last log index covered by the local snapshot.
    pub snapshot_index: Option<u64>,
    /// Last log index purged from the local log (it is in the snapshot).
    pub purged_index: Option<u64>,
    /// On the leader: each voter's and observer's last log index known to match the
    /// leader's.
    pub voter_log_end: BTreeMap<NodeId, Option<u64>>,
}

/// One voter as the active controller sees it (Kafka's DescribeQuorum `ReplicaState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VoterProgress {
    pub node_id: NodeId,
    /// The next offset after the last entry known to match the leader's log (Raft index
    /// + 1, so Kafka's exclusive log end offset); -1 when not known yet.
    pub log_end_offset: i64,
    /// Wall-clock milliseconds when the voter last matched the leader's whole log; -1
    /// when it has not since this node became leader.
    pub last_caught_up_timestamp: i64,
}

/// The quorum as the active controller describes it (Kafka's DescribeQuorum).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumDescription {
    pub leader_id: NodeId,
    /// The Raft term (KRaft's leader epoch).
    pub leader_epoch: u64,
    /// The offset after the last entry applied here (applied implies committed): the
    /// exclusive high watermark of the metadata log in Kafka's terms.
    pub high_watermark: i64,
    /// Every configured voter, this node included.
    pub voters: Vec<VoterProgress>,
    /// The observers (broker-only nodes) the leader replicates to.
    pub observers: Vec<VoterProgress>,
}

/// Progress the watchdog records for [`MetadataQuorum::describe`]: kept out of the
/// status watch because a caught-up timestamp changes on every check, and a watch that
/// changes that often would wake every waiter for nothing.
type VoterProgressMap = Arc<Mutex<BTreeMap<NodeId, VoterProgress>>>;

pub(crate) struct Shared {
    pub(crate) raft: Raft,
    node_id: NodeId,
    timing: QuorumTiming,
    voters: Arc<BTreeMap<NodeId, String>>,
    bind_ip: Option<IpAddr>,
    status: watch::Receiver<QuorumStatus>,
    /// One connection per leader for forwarded writes (serialized per leader).
    forward: tokio::sync::Mutex<HashMap<NodeId, PeerClient>>,
    /// Kafka requests on the controller listener (BrokerRegistration, BrokerHeartbeat,
    /// AlterPartition): every frame whose api key is not the quorum RPC's goes here.
    pub(crate) kafka_handler: std::sync::RwLock<Option<KafkaHandler>>,
    /// The quorum's directory, checked for free space before each write.
    dir: PathBuf,
    /// Written by the watchdog while this node leads; cleared when it stops leading.
    progress: VoterProgressMap,
}

/// Free space a write leaves on the quorum's file system at least: a write that would
/// leave less is refused before it reaches openraft, because a failed log append is fatal
/// to an openraft node (it stops until the process restarts), while a refused write is
/// an error the client sees (KAFKA_STORAGE_ERROR) and retries once space is back.
pub const QUORUM_WRITE_FREE_BYTES_MIN: u64 = 1024 * 1024;

/// Answers a Kafka request frame received on the controller listener (header and body,
/// without the length prefix) with a whole response frame (length prefix included), or
/// `None` to close the connection. Installed by the broker
/// ([`MetadataQuorum::set_kafka_handler`]); until then such frames close the connection.
pub type KafkaHandler = Arc<
    dyn Fn(Vec<u8>) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<Vec<u8>>> + Send>>
        + Send
        + Sync,
>;

/// A running controller voter.
pub struct MetadataQuorum {
    shared: Arc<Shared>,
    applied: watch::Receiver<AppliedImage>,
    local_addr: SocketAddr,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl MetadataQuorum {
    /// Starts voter `node_id` of the quorum `voters`, listening on `controller_listen`,
    /// with its state in `dir`, and default timing.
    pub async fn start(
        node_id: NodeId,
        controller_listen: SocketAddr,
        voters: Vec<Voter>,
        dir: PathBuf,
    ) -> Result<MetadataQuorum, QuorumError> {
        Self::start_with(
            QuorumConfig::new(node_id, controller_listen, voters, dir),
            None,
        )
        .await
    }

    /// Starts with explicit configuration; `listener`, if given, is already bound to
    /// `controller_listen` (tests bind ephemeral ports first to learn the addresses).
    pub async fn start_with(
        config: QuorumConfig,
        listener: Option<TcpListener>,
    ) -> Result<MetadataQuorum, QuorumError> {
        let voters = validate_voters(&config)?;
        let listener = match listener {
            Some(l) => l,
            None => TcpListener::bind(config.controller_listen)
                .await
                .map_err(|source| QuorumError::Bind {
                    addr: config.controller_listen,
                    source,
                })?,
        };
        let local_addr = listener.local_addr().map_err(|source| QuorumError::Bind {
            addr: config.controller_listen,
            source,
        })?;
        let log = LogStore::open(&config.dir)?;
        let sm = StateMachineStore::open(&config.dir)?;
        let applied = sm.subscribe();
        let t = &config.timing;
        let raft_config = Config {
            cluster_name: "ferrite-metadata".into(),
            heartbeat_interval: millis(t.heartbeat_interval),
            election_timeout_min: millis(t.election_timeout),
            election_timeout_max: millis(t.election_timeout) * 2,
            install_snapshot_timeout: millis(t.request_timeout),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_interval_entries),
            max_in_snapshot_log_to_keep: config.entries_kept_after_snapshot,
            snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
            ..Config::default()
        }
        .validate()
        .map_err(|e| QuorumError::Config(e.to_string()))?;
        let bind_ip = Some(local_addr.ip()).filter(|ip| !ip.is_unspecified());
        let network = NetworkFactory {
            self_id: config.node_id,
            voters: voters.clone(),
            bind_ip,
            request_timeout: t.request_timeout,
            reconnect_backoff: t.reconnect_backoff,
        };
        let raft = Raft::new(config.node_id, Arc::new(raft_config), network, log, sm)
            .await
            .map_err(|e| QuorumError::Stopped(e.to_string()))?;

        let stopped = |e: &dyn std::fmt::Display| QuorumError::Stopped(e.to_string());
        let stored_voters: BTreeSet<NodeId> = raft
            .with_raft_state(|st| st.membership_state.effective().voter_ids().collect())
            .await
            .map_err(|e| stopped(&e))?;
        let configured: BTreeSet<NodeId> = voters.keys().copied().collect();
        let restarted = raft.is_initialized().await.map_err(|e| stopped(&e))?;
        let is_voter = config.role == QuorumRole::Voter;
        if restarted {
            if stored_voters != configured {
                let _ = raft.shutdown().await;
                return Err(QuorumError::Config(format!(
                    "the stored voter set {stored_voters:?} differs from controller.quorum.voters {configured:?}; \
                     changing the voters is not supported"
                )));
            }
        } else if is_voter && configured.first() == Some(&config.node_id) {
            // Deterministic formation: only the lowest id initializes a fresh quorum, so
            // exactly one initial membership entry exists; the others learn it from the
            // leader it elects.
            let members: BTreeMap<NodeId, BasicNode> = voters
                .iter()
                .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
                .collect();
            tracing::info!(node_id = config.node_id, voters = ?configured, "initializing the metadata quorum");
            raft.initialize(members)
                .await
                .map_err(|e| QuorumError::Stopped(format!("initialize: {e}")))?;
        } else if is_voter {
            tracing::info!(
                node_id = config.node_id,
                "no quorum state yet; waiting for the lowest-id voter to form the quorum"
            );
        }

        let (status_tx, status_rx) = watch::channel(QuorumStatus {
            node_id: config.node_id,
            leader_id: None,
            is_active_controller: false,
            server_state: ServerState::Learner,
            leader_epoch: 0,
            last_log_index: None,
            raft_commit_index: None,
            snapshot_index: None,
            purged_index: None,
            voter_log_end: BTreeMap::new(),
        });
        let shared = Arc::new(Shared {
            raft: raft.clone(),
            node_id: config.node_id,
            timing: config.timing.clone(),
            voters,
            bind_ip,
            status: status_rx,
            forward: tokio::sync::Mutex::new(HashMap::new()),
            kafka_handler: std::sync::RwLock::new(None),
            dir: config.dir.clone(),
            progress: Arc::new(Mutex::new(BTreeMap::new())),
        });
        if is_voter && configured.len() == 1 && restarted {
            // A one-voter quorum needs no one's vote: stand at once rather than after an
            // election timeout, so a bare server starts in milliseconds. (A fresh one
            // stands by itself on `initialize`; a second election there would only
            // supersede the first.)
            raft.trigger().elect().await.map_err(|e| stopped(&e))?;
        }
        let watchdog = tokio::spawn(check_quorum(
            raft.clone(),
            config.node_id,
            config.timing.fetch_timeout,
            status_tx,
            shared.progress.clone(),
        ));
        let server = tokio::spawn(serve(listener, shared.clone()));
        let mut tasks = vec![watchdog, server];
        match &config.role {
            QuorumRole::Voter => {
                tracing::info!(node_id = config.node_id, %local_addr, "metadata quorum voter started")
            }
            QuorumRole::Observer { advertised } => {
                tracing::info!(node_id = config.node_id, %local_addr, advertised, "metadata quorum observer started");
                tasks.push(tokio::spawn(announce_observer(
                    shared.clone(),
                    advertised.clone(),
                )));
            }
        }
        Ok(MetadataQuorum {
            shared,
            applied,
            local_addr,
            tasks: Mutex::new(tasks),
        })
    }

    pub fn node_id(&self) -> NodeId {
        self.shared.node_id
    }

    /// The controller listener's bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The current status (cheap: a watch channel's value).
    pub fn status(&self) -> QuorumStatus {
        self.shared.status.borrow().clone()
    }

    /// Status changes, for callers that wait on leadership.
    pub fn status_watch(&self) -> watch::Receiver<QuorumStatus> {
        self.shared.status.clone()
    }

    /// The quorum as described by the active controller, or `None` on a node that is
    /// not the active controller (the caller forwards, or answers
    /// NOT_LEADER_OR_FOLLOWER as Kafka's voters do).
    pub fn describe(&self) -> Option<QuorumDescription> {
        let status = self.status();
        if !status.is_active_controller {
            return None;
        }
        let progress = self
            .shared
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let voters = self
            .shared
            .voters
            .keys()
            .map(|id| {
                progress.get(id).copied().unwrap_or(VoterProgress {
                    node_id: *id,
                    log_end_offset: -1,
                    last_caught_up_timestamp: -1,
                })
            })
            .collect();
        let observers = progress
            .values()
            .filter(|p| !self.shared.voters.contains_key(&p.node_id))
            .copied()
            .collect();
        Some(QuorumDescription {
            leader_id: status.node_id,
            leader_epoch: status.leader_epoch,
            high_watermark: exclusive_end(status.raft_commit_index),
            voters,
            observers,
        })
    }

    /// The applied image and its index; changes after every applied batch.
    pub fn applied(&self) -> watch::Receiver<AppliedImage> {
        self.applied.clone()
    }

    /// Commits one metadata change and returns its Raft log index, once a majority of
    /// voters has it durably (and the leader applied it). On a voter that is not the
    /// leader the change is forwarded to the leader. Bounded by the write timeout:
    /// `Timeout` means unknown outcome (the change may still commit), `NotController`
    /// means it was not accepted.
    pub async fn write(&self, records: MetadataBatch) -> Result<u64, QuorumError> {
        let timeout = self.shared.timing.write_timeout;
        check_size(&records)?;
        tokio::time::timeout(timeout, self.shared.write(records))
            .await
            .unwrap_or(Err(QuorumError::Timeout(timeout)))
    }

    /// Serves Kafka's controller APIs on the controller listener with `handler`.
    pub fn set_kafka_handler(&self, handler: KafkaHandler) {
        *self
            .shared
            .kafka_handler
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(handler);
    }

    /// The configured voters: node id and `host:port`.
    pub fn voters(&self) -> Arc<BTreeMap<NodeId, String>> {
        self.shared.voters.clone()
    }

    /// The write timeout (`QuorumTiming::write_timeout`).
    pub fn write_timeout(&self) -> Duration {
        self.shared.timing.write_timeout
    }

    /// On the active controller: confirms with a majority that it still leads and waits
    /// until its image holds every committed entry (openraft's `ensure_linearizable`),
    /// so that a change decided on the returned image sees every change committed
    /// before. A new leader's image may lag the log it inherited until then.
    pub async fn read_barrier(&self) -> Result<AppliedImage, QuorumError> {
        let timeout = self.shared.timing.write_timeout;
        let status = self.status();
        if !status.is_active_controller {
            return Err(QuorumError::NotController {
                leader: status.leader_id,
            });
        }
        let barrier = async {
            match self.shared.raft.ensure_linearizable().await {
                Ok(Some(log_id)) => self.wait_applied(log_id.index, timeout).await,
                Ok(None) => Ok(self.applied.borrow().clone()),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    Err(QuorumError::NotController {
                        leader: f.leader_id.filter(|l| *l != self.shared.node_id),
                    })
                }
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => {
                    Err(QuorumError::NotController { leader: None })
                }
                Err(RaftError::Fatal(e)) => Err(QuorumError::Stopped(e.to_string())),
            }
        };
        tokio::time::timeout(timeout, barrier)
            .await
            .unwrap_or(Err(QuorumError::Timeout(timeout)))
    }

    /// Waits until the local image includes log index `index`.
    pub async fn wait_applied(
        &self,
        index: u64,
        timeout: Duration,
    ) -> Result<AppliedImage, QuorumError> {
        let mut rx = self.applied.clone();
        let wait = async {
            rx.wait_for(|a| a.raft_commit_index.is_some_and(|i| i >= index))
                .await
                .map(|a| a.clone())
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(_)) => Err(QuorumError::Stopped("state machine closed".into())),
            Err(_) => Err(QuorumError::Timeout(timeout)),
        }
    }

    /// Stops serving and stops openraft. The durable state stays for a restart.
    pub async fn shutdown(&self) {
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            // Aborted tasks end with a cancellation error; the wait makes sure the
            // listener and every connection are closed before a restart rebinds.
            let _ = t.await;
        }
        self.shared.forward.lock().await.clear();
        if let Err(e) = self.shared.raft.shutdown().await {
            tracing::warn!(error = %e, "openraft did not stop cleanly");
        }
    }
}

impl Drop for MetadataQuorum {
    fn drop(&mut self) {
        for t in self
            .tasks
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

/// Updates the voters' progress from one fresh metrics reading of the leader: each
/// voter's matched log end, and the time it was last seen matching the leader's whole
/// log. openraft reports progress, not fetches, so on an idle log that time is the last
/// write's: it never claims a voter is alive that has stopped answering.
fn record_progress(
    progress: &VoterProgressMap,
    fresh_leader_reading: bool,
    node_id: NodeId,
    m: &openraft::RaftMetrics<NodeId, BasicNode>,
    voter_log_end: &BTreeMap<NodeId, Option<u64>>,
) {
    if !fresh_leader_reading {
        return;
    }
    let mut progress = progress.lock().unwrap_or_else(|p| p.into_inner());
    let now = wall_clock_ms();
    let leader_end = exclusive_end(m.last_log_index);
    let mut ends: BTreeMap<NodeId, i64> = voter_log_end
        .iter()
        .map(|(id, index)| (*id, index.map_or(-1, |i| exclusive_end(Some(i)))))
        .collect();
    ends.insert(node_id, leader_end);
    for (id, end) in ends {
        let entry = progress.entry(id).or_insert(VoterProgress {
            node_id: id,
            log_end_offset: -1,
            last_caught_up_timestamp: -1,
        });
        entry.log_end_offset = end;
        if end >= leader_end {
            entry.last_caught_up_timestamp = now;
        }
    }
}

fn clear_progress(progress: &VoterProgressMap) {
    progress.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

/// Kafka's exclusive end offset after Raft index `index` (0 for an empty log).
fn exclusive_end(index: Option<u64>) -> i64 {
    index.map_or(0, |i| {
        i64::try_from(i).unwrap_or(i64::MAX).saturating_add(1)
    })
}

/// Wall-clock milliseconds since the epoch (for Kafka's timestamps; never negative).
fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn validate_voters(config: &QuorumConfig) -> Result<Arc<BTreeMap<NodeId, String>>, QuorumError> {
    if config.voters.is_empty() {
        return Err(QuorumError::Config("no voters configured".into()));
    }
    if config.voters.len() > QUORUM_VOTERS_MAX {
        return Err(QuorumError::Config(format!(
            "{} voters, at most {QUORUM_VOTERS_MAX}",
            config.voters.len()
        )));
    }
    let mut map = BTreeMap::new();
    for v in &config.voters {
        if v.id > i32::MAX as NodeId {
            return Err(QuorumError::Config(format!(
                "voter id {} is above i32::MAX",
                v.id
            )));
        }
        if map.insert(v.id, v.address()).is_some() {
            return Err(QuorumError::Config(format!("voter {} listed twice", v.id)));
        }
    }
    match &config.role {
        QuorumRole::Voter if !map.contains_key(&config.node_id) => {
            return Err(QuorumError::Config(format!(
                "node {} is not one of the voters {:?}",
                config.node_id,
                map.keys().collect::<Vec<_>>()
            )));
        }
        QuorumRole::Observer { .. } if map.contains_key(&config.node_id) => {
            return Err(QuorumError::Config(format!(
                "node {} is a voter; an observer's id must not be one of the voters {:?}",
                config.node_id,
                map.keys().collect::<Vec<_>>()
            )));
        }
        QuorumRole::Observer { advertised } if advertised.len() > OBSERVER_ADDRESS_BYTES_MAX => {
            return Err(QuorumError::Config(format!(
                "observer address `{advertised}` is longer than {OBSERVER_ADDRESS_BYTES_MAX} bytes"
            )));
        }
        _ => {}
    }
    if config.node_id > i32::MAX as NodeId {
        return Err(QuorumError::Config(format!(
            "node id {} is above i32::MAX",
            config.node_id
        )));
    }
    Ok(Arc::new(map))
}

fn check_size(records: &MetadataBatch) -> Result<(), QuorumError> {
    let max = ferrite_metadata::log::METADATA_ENTRY_BYTES_MAX;
    let bytes = serde_json::to_vec(records)
        .map_err(|e| QuorumError::Config(format!("cannot encode records: {e}")))?
        .len();
    if bytes > max {
        return Err(QuorumError::TooLarge { bytes, max });
    }
    Ok(())
}

impl Shared {
    async fn write(&self, records: MetadataBatch) -> Result<u64, QuorumError> {
        let mut status_rx = self.status.clone();
        loop {
            let status = status_rx.borrow_and_update().clone();
            if status.is_active_controller {
                return self.write_local(records).await;
            }
            if status.server_state == ServerState::Leader {
                // Leader without a majority (CheckQuorum): refuse, like a resigned KRaft
                // controller, rather than wait for a commit that cannot come.
                return Err(QuorumError::NotController { leader: None });
            }
            match status.leader_id {
                Some(leader) if leader != self.node_id => {
                    match self.forward(leader, &records).await {
                        Err(QuorumError::NotController { .. }) | Err(QuorumError::Stopped(_)) => {
                            // The leader moved or is unreachable: wait for news, then retry
                            // (the caller's timeout bounds the loop).
                            let _ = tokio::time::timeout(
                                self.timing.reconnect_backoff,
                                status_rx.changed(),
                            )
                            .await;
                        }
                        other => return other,
                    }
                }
                // No leader known (an election is running): wait for one.
                _ => {
                    if status_rx.changed().await.is_err() {
                        return Err(QuorumError::Stopped("status channel closed".into()));
                    }
                }
            }
        }
    }

    /// Proposes on this node, which believes it is the active controller.
    async fn write_local(&self, records: MetadataBatch) -> Result<u64, QuorumError> {
        self.check_free_space(&records)?;
        match self.raft.client_write(records).await {
            Ok(resp) => Ok(resp.log_id.index),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(QuorumError::NotController {
                    leader: f.leader_id.filter(|l| *l != self.node_id),
                })
            }
            Err(RaftError::APIError(e)) => Err(QuorumError::Stopped(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(QuorumError::Stopped(e.to_string())),
        }
    }

    /// Refuses a write that would leave less than `QUORUM_WRITE_FREE_BYTES_MIN` free (a
    /// full disk). Followers' disks are not checked: a follower whose append fails stops
    /// voting, and the quorum carries on while a majority has space.
    fn check_free_space(&self, records: &MetadataBatch) -> Result<(), QuorumError> {
        let Ok(st) = rustix::fs::statvfs(&self.dir) else {
            return Ok(());
        };
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        let bytes = serde_json::to_vec(records).map_or(0, |v| v.len() as u64);
        if free < bytes.saturating_add(QUORUM_WRITE_FREE_BYTES_MIN) {
            return Err(QuorumError::Store(StoreError::Io {
                path: self.dir.clone(),
                source: std::io::Error::from_raw_os_error(28),
            }));
        }
        Ok(())
    }

    async fn forward(&self, leader: NodeId, records: &MetadataBatch) -> Result<u64, QuorumError> {
        let addr = self
            .voters
            .get(&leader)
            .cloned()
            .ok_or(QuorumError::NotController { leader: None })?;
        let mut clients = self.forward.lock().await;
        let client = clients.entry(leader).or_insert_with(|| {
            PeerClient::new(
                self.node_id,
                leader,
                addr,
                self.bind_ip,
                self.timing.request_timeout,
                self.timing.reconnect_backoff,
            )
        });
        // The leader bounds its own commit wait by its write timeout; the caller's
        // timeout bounds this one.
        let request = QuorumRequest::Write(records.clone());
        match client.call(&request, self.timing.write_timeout).await {
            Ok(QuorumResponse::Write(Ok(index))) => Ok(index),
            Ok(QuorumResponse::Write(Err(WriteRefusal::NotController { leader }))) => {
                Err(QuorumError::NotController { leader })
            }
            Ok(QuorumResponse::Write(Err(WriteRefusal::Timeout))) => {
                Err(QuorumError::Timeout(self.timing.write_timeout))
            }
            Ok(QuorumResponse::Write(Err(WriteRefusal::Stopped))) => {
                Err(QuorumError::Stopped(format!("leader {leader} stopped")))
            }
            Ok(QuorumResponse::Write(Err(WriteRefusal::Refused { why }))) => Err(
                QuorumError::Stopped(format!("leader {leader} refused: {why}")),
            ),
            Ok(_) => Err(QuorumError::Stopped(format!(
                "leader {leader} answered another RPC"
            ))),
            Err(CallError::Timeout(t)) => Err(QuorumError::Timeout(t)),
            Err(e) => {
                tracing::debug!(leader, error = %e, "forwarding a metadata write failed");
                Err(QuorumError::Stopped(format!(
                    "leader {leader} unreachable: {e}"
                )))
            }
        }
    }

    /// A write forwarded by another voter: commit it here if this node is the active
    /// controller, never forward again (no loops).
    pub(crate) async fn write_forwarded(
        &self,
        records: MetadataBatch,
    ) -> Result<u64, WriteRefusal> {
        let status = self.status.borrow().clone();
        if !status.is_active_controller {
            return Err(WriteRefusal::NotController {
                leader: status.leader_id,
            });
        }
        if check_size(&records).is_err() {
            // The forwarding voter checked already; a peer sending more is refused.
            return Err(WriteRefusal::Stopped);
        }
        let timeout = self.timing.write_timeout;
        match tokio::time::timeout(timeout, self.write_local(records)).await {
            Ok(Ok(index)) => Ok(index),
            Ok(Err(QuorumError::NotController { leader })) => {
                Err(WriteRefusal::NotController { leader })
            }
            Ok(Err(_)) => Err(WriteRefusal::Stopped),
            Err(_) => Err(WriteRefusal::Timeout),
        }
    }

    /// An observer asks to follow the log: on the active controller, make it a learner
    /// at `addr` (or move it there), committed before the answer, so every later leader
    /// knows it. Nothing is written when the committed membership has it at `addr`
    /// already (a restart with the same address).
    pub(crate) async fn add_observer(
        &self,
        node_id: NodeId,
        addr: String,
    ) -> Result<(), WriteRefusal> {
        let refused = |why: String| Err(WriteRefusal::Refused { why });
        let status = self.status.borrow().clone();
        if !status.is_active_controller {
            return Err(WriteRefusal::NotController {
                leader: status.leader_id,
            });
        }
        if self.voters.contains_key(&node_id) {
            return refused(format!("node {node_id} is a voter"));
        }
        if node_id > i32::MAX as NodeId {
            return refused(format!("node id {node_id} is above i32::MAX"));
        }
        if addr.len() > OBSERVER_ADDRESS_BYTES_MAX || addr.is_empty() {
            return refused(format!(
                "observer address of {} bytes (1 to {OBSERVER_ADDRESS_BYTES_MAX})",
                addr.len()
            ));
        }
        let voters = self.voters.clone();
        let (known, observers) = self
            .raft
            .with_raft_state(move |st| {
                let m = st.membership_state.committed();
                let known = m.get_node(&node_id).map(|n| n.addr.clone());
                let observers = m.nodes().filter(|(id, _)| !voters.contains_key(id)).count();
                (known, observers)
            })
            .await
            .map_err(|_| WriteRefusal::Stopped)?;
        if known.as_deref() == Some(addr.as_str()) {
            return Ok(());
        }
        if known.is_none() && observers >= QUORUM_OBSERVERS_MAX {
            return refused(format!(
                "the quorum has {observers} observers already (QUORUM_OBSERVERS_MAX)"
            ));
        }
        tracing::info!(node_id, addr, previous = ?known, "adding an observer to the metadata quorum");
        let change =
            openraft::ChangeMembers::SetNodes(BTreeMap::from([(node_id, BasicNode { addr })]));
        let timeout = self.timing.write_timeout;
        match tokio::time::timeout(timeout, self.raft.change_membership(change, true)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(WriteRefusal::NotController {
                    leader: f.leader_id.filter(|l| *l != self.node_id),
                })
            }
            // Another membership change is still committing: the observer asks again.
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                tracing::debug!(node_id, error = %e, "observer not added yet");
                Err(WriteRefusal::Timeout)
            }
            Ok(Err(RaftError::Fatal(_))) => Err(WriteRefusal::Stopped),
            Err(_) => Err(WriteRefusal::Timeout),
        }
    }
}

/// An observer's start: asks the leader to add it, trying each voter in turn until one
/// leads (a fresh observer knows no leader: none replicates to it yet), for as long as
/// it takes. Done once per start: the membership is in the log, so later leaders know it.
async fn announce_observer(shared: Arc<Shared>, advertised: String) {
    let mut clients: HashMap<NodeId, PeerClient> = HashMap::new();
    let voters: Vec<NodeId> = shared.voters.keys().copied().collect();
    let mut next = 0usize;
    let mut hint: Option<NodeId> = None;
    loop {
        let target = match hint.take().or(shared.status.borrow().leader_id) {
            Some(t) => t,
            None => {
                let t = voters.get(next % voters.len().max(1)).copied();
                next = next.wrapping_add(1);
                match t {
                    Some(t) => t,
                    None => return,
                }
            }
        };
        let Some(addr) = shared.voters.get(&target).cloned() else {
            continue;
        };
        let client = clients.entry(target).or_insert_with(|| {
            PeerClient::new(
                shared.node_id,
                target,
                addr,
                shared.bind_ip,
                shared.timing.request_timeout,
                shared.timing.reconnect_backoff,
            )
        });
        let request = QuorumRequest::AddObserver {
            node_id: shared.node_id,
            addr: advertised.clone(),
        };
        match client.call(&request, shared.timing.write_timeout).await {
            Ok(QuorumResponse::AddObserver(Ok(()))) => {
                tracing::info!(
                    node_id = shared.node_id,
                    leader = target,
                    "following the metadata quorum as an observer"
                );
                return;
            }
            Ok(QuorumResponse::AddObserver(Err(WriteRefusal::NotController {
                leader: Some(l),
            }))) if l != target => {
                hint = Some(l);
                continue;
            }
            Ok(QuorumResponse::AddObserver(Err(WriteRefusal::Refused { why }))) => {
                tracing::error!(
                    node_id = shared.node_id,
                    leader = target,
                    reason = why,
                    "the metadata quorum refuses this observer"
                );
                tokio::time::sleep(OBSERVER_REFUSED_BACKOFF).await;
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(target, error = %e, "cannot reach a voter to join as an observer")
            }
        }
        tokio::time::sleep(shared.timing.reconnect_backoff).await;
    }
}

/// The CheckQuorum substitute and status publisher. openraft reports, in its metrics,
/// how long ago a majority last acknowledged the leader (`millis_since_quorum_ack`,
/// refreshed at least every tick); a leader whose last majority acknowledgement is older
/// than `fetch_timeout` is not the active controller.
async fn check_quorum(
    raft: Raft,
    node_id: NodeId,
    fetch_timeout: Duration,
    status_tx: watch::Sender<QuorumStatus>,
    progress: VoterProgressMap,
) {
    let mut metrics = raft.metrics();
    let check_every = (fetch_timeout / 10).max(Duration::from_millis(10));
    let mut leader_epoch: Option<u64> = None;
    let mut acked_at: Option<Instant> = None;
    loop {
        let fresh = tokio::select! {
            changed = metrics.changed() => {
                if changed.is_err() {
                    break;
                }
                true
            }
            _ = tokio::time::sleep(check_every) => false,
        };
        let m = metrics.borrow_and_update().clone();
        let now = Instant::now();
        let is_leader = m.state == ServerState::Leader;
        if is_leader {
            if leader_epoch != Some(m.current_term) {
                // Just elected, by a majority: that counts as hearing from it.
                leader_epoch = Some(m.current_term);
                acked_at = Some(now);
            }
            if let (true, Some(ms)) = (fresh, m.millis_since_quorum_ack) {
                let at = now.checked_sub(Duration::from_millis(ms)).unwrap_or(now);
                acked_at = acked_at.max(Some(at));
            }
        } else {
            leader_epoch = None;
            acked_at = None;
        }
        let active = is_leader && acked_at.is_some_and(|t| now.duration_since(t) <= fetch_timeout);
        let leader_id = if is_leader {
            active.then_some(node_id)
        } else {
            m.current_leader.filter(|l| *l != node_id)
        };
        let voter_log_end = m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .map(|(id, log)| (*id, log.map(|l| l.index)))
                    .collect()
            })
            .unwrap_or_default();
        record_progress(&progress, is_leader && fresh, node_id, &m, &voter_log_end);
        if !is_leader {
            clear_progress(&progress);
        }
        let status = QuorumStatus {
            node_id,
            leader_id,
            is_active_controller: active,
            server_state: m.state,
            leader_epoch: m.current_term,
            last_log_index: m.last_log_index,
            raft_commit_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            voter_log_end,
        };
        status_tx.send_if_modified(|old| {
            if *old == status {
                return false;
            }
            if old.is_active_controller && !status.is_active_controller && is_leader {
                tracing::warn!(
                    node_id,
                    fetch_timeout_ms = millis(fetch_timeout),
                    "no acknowledgement from a majority of voters within the fetch timeout: \
                     no longer the active controller"
                );
            } else if !old.is_active_controller && status.is_active_controller {
                tracing::info!(
                    node_id,
                    leader_epoch = status.leader_epoch,
                    "now the active controller"
                );
            }
            *old = status;
            true
        });
    }
}
