//! The simulated world: nodes, the network, the controller host, clients, faults.
//! Everything runs on one thread from one event queue ordered by (virtual time,
//! sequence number), so that a seed replays exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ferrite_check::{Op, OpFunction, OpType, ReadRecord, Report, Value};
use ferrite_controller::{
    AlterPartition, AlterPartitionData, AlterPartitionResult, AlterPartitionTopic, BrokerHeartbeat,
    BrokerHeartbeatReply, BrokerRegistration, BrokerRegistrationReply, Controller,
    ControllerConfig, ControllerError, CreatableTopic, CreateTopics, Event, Reply,
};
use ferrite_metadata::{BrokerEndpoint, MetadataImage, MetadataRecord};
use ferrite_replication::{
    follower_high_watermark, follower_truncation, AlterPartitionProposal, BrokerState,
    EpochEndOffset, FetchOutcome, FollowerFetch, PartitionLeader, PartitionState,
    ProduceCompletion, ReplicationConfig, ReplicationError,
};
use ferrite_storage::batch::{HEADER_BYTES, RECORD_COUNT_AT};
use ferrite_storage::{BatchIter, LogConfig, PartitionLog};
use uuid::Uuid;

use crate::rng::Rng;

const TOPIC: &str = "sim";
const CLUSTER_ID: &str = "ferrite-sim";
/// Node (and broker) ids.
const NODES: [i32; 3] = [1, 2, 3];
const PARTITIONS: i32 = 2;
const REPLICATION_FACTOR: i16 = 3;
const MIN_INSYNC_REPLICAS: usize = 2;

/// Kafka error codes the simulated broker answers clients with.
const OFFSET_OUT_OF_RANGE: i16 = 1;
const NOT_LEADER_OR_FOLLOWER: i16 = 6;
const REQUEST_TIMED_OUT: i16 = 7;
const NOT_ENOUGH_REPLICAS: i16 = 19;
const NOT_ENOUGH_REPLICAS_AFTER_APPEND: i16 = 20;
const KAFKA_STORAGE_ERROR: i16 = 56;

const BROKER_SESSION_TIMEOUT_MS: i64 = 1_500;
const HEARTBEAT_INTERVAL_MS: u64 = 250;
const REGISTER_RETRY_MS: u64 = 300;
/// A heartbeat or registration unanswered this long is given up on and resent.
const CONTROLLER_REQUEST_TIMEOUT_MS: u64 = 1_000;
const REPLICA_LAG_TIME_MAX_MS: u64 = 1_000;
const REPLICA_TICK_MS: u64 = 50;
/// A follower fetch unanswered this long is given up on (the connection is presumed dead).
const REPLICA_FETCH_TIMEOUT_MS: u64 = 1_000;
/// An in-flight AlterPartition is resent after this long without an answer (Kafka's
/// AlterPartitionManager retries until it gets one).
const ALTER_PARTITION_RETRY_MS: u64 = 500;
const PRODUCE_TIMEOUT_MS: u64 = 2_000;
/// The client gives up on a produce after this long (then its outcome is unknown).
const CLIENT_REQUEST_TIMEOUT_MS: u64 = 3_000;
const CONSUMER_FETCH_TIMEOUT_MS: u64 = 1_000;
const CONTROLLER_TICK_MS: u64 = 100;
/// How long the quorum takes to put a new active controller in place.
const CONTROLLER_ELECTION_MS: (u64, u64) = (300, 1_000);
const LEADER_IMBALANCE_CHECK_INTERVAL_MS: i64 = 4_000;
/// Metadata log entries one heartbeat reply carries, at most.
const METADATA_ENTRIES_PER_REPLY_MAX: usize = 64;
/// Bytes one fetch reads from a log, at most.
const FETCH_BYTES_MAX: usize = 16 * 1024;
/// A flush happens this long after the first unflushed append (ms range).
const FLUSH_DELAY_MS: (u64, u64) = (1, 40);
/// One-way message latency (ms range), before any slow-link fault.
const LATENCY_MS: (u64, u64) = (1, 4);
const SLOW_LINK_EXTRA_MS: (u64, u64) = (50, 400);
/// Segments roll at this size, so that truncation and reads cross segments.
const SEGMENT_BYTES: u64 = 2 * 1024;
/// Events one run may process, at most: a run that does not converge stops here.
const EVENTS_MAX: u64 = 5_000_000;

const PRODUCER_PROCESSES: [i64; 3] = [10, 11, 12];
const CONSUMER_PROCESSES: [i64; 2] = [20, 21];
const FINAL_READER_PROCESS: i64 = 99;

/// One run's shape. Times are simulated milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    pub seed: u64,
    /// Faults start here (after the cluster formed and the topic exists).
    pub faults_start_ms: u64,
    /// How long faults are injected; at the end everything heals and producers stop.
    pub faults_ms: u64,
    /// Time from the heal to the final read (the cluster settles).
    pub settle_ms: u64,
    /// The final read must finish within this long, else the cluster did not recover.
    pub final_read_timeout_ms: u64,
    /// Faults active at once, at most.
    pub concurrent_faults_max: usize,
    /// Keep the history in the result (for `--history`).
    pub keep_history: bool,
    /// A bug planted in the simulator's glue, to show that the checks catch it.
    pub planted_bug: Option<PlantedBug>,
}

/// Deliberate mistakes the tests plant to prove the simulation has teeth: each must
/// make some seeds fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// A follower reports its log end to the leader before flushing it, so acks=all
    /// may acknowledge records that only sit in page caches (lost by a power loss).
    FollowerAcksUnflushed,
    /// Consumers read up to the leader's log end instead of the high watermark.
    ReadPastHighWatermark,
    /// Every AlterPartition error clears the in-flight proposal (the glue before the fix
    /// of seed 7405): a refused retry of an applied expansion drops the new member from
    /// the maximal ISR while the controller has it in the ISR.
    ClearInFlightOnAnyError,
}

impl SimConfig {
    pub fn new(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            faults_start_ms: 2_000,
            faults_ms: 20_000,
            settle_ms: 4_000,
            final_read_timeout_ms: 15_000,
            concurrent_faults_max: 2,
            keep_history: false,
            planted_bug: None,
        }
    }
}

/// Counters of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    pub events: u64,
    pub messages_sent: u64,
    pub messages_dropped: u64,
    pub faults: BTreeMap<String, u64>,
    pub truncations: u64,
    pub crash_truncated_records: u64,
    pub leader_elections_seen: u64,
    pub controller_failovers: u64,
    /// Follower fetches the leader refused (fenced/unknown epoch, not leader, out of range).
    pub follower_fetch_errors: u64,
    pub diverging_epochs: u64,
    pub end_ms: u64,
}

#[derive(Debug, Clone)]
pub struct SimResult {
    pub seed: u64,
    /// FNV-1a over every processed event and the history: equal for equal runs.
    pub trace_hash: u64,
    pub report: Report,
    /// Harness-level failures: a storage error, the final read not finishing, a run
    /// that hit [`EVENTS_MAX`].
    pub violations: Vec<String>,
    pub stats: SimStats,
    /// The history as JSON lines (docs/history-format.md), when asked for.
    pub history: Option<String>,
}

impl SimResult {
    pub fn passed(&self) -> bool {
        self.violations.is_empty() && self.report.is_valid()
    }
}

// ---------------------------------------------------------------------------------
// Messages and events

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Addr {
    Node(i32),
    Controller,
    Client(i64),
}

/// One end of a connection: the address, the physical node it runs on (`None` for
/// clients, which are outside the faulty network), and the process generation it was
/// opened with (node incarnation, controller term): a message for an older generation
/// is dropped, as a reset connection would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Endpoint {
    addr: Addr,
    node: Option<i32>,
    gen: u64,
}

#[derive(Debug, Clone)]
enum FetchData {
    Diverging(EpochEndOffset),
    Records { bytes: Vec<u8>, high_watermark: i64 },
}

#[derive(Debug, Clone)]
enum Msg {
    Register(BrokerRegistration),
    RegisterReply(Result<BrokerRegistrationReply, ControllerError>),
    Heartbeat(BrokerHeartbeat),
    HeartbeatReply {
        result: Result<BrokerHeartbeatReply, ControllerError>,
        entries: Vec<(i64, Vec<MetadataRecord>)>,
        /// The offset of the last committed entry (the metadata log's end).
        last_offset: i64,
    },
    AlterPartition {
        partition: i32,
        proposal: AlterPartitionProposal,
        request: AlterPartition,
    },
    AlterPartitionReply {
        partition: i32,
        proposal: AlterPartitionProposal,
        result: Result<Vec<AlterPartitionResult>, ControllerError>,
    },
    Fetch {
        partition: i32,
        id: u64,
        fetch: FollowerFetch,
    },
    FetchReply {
        partition: i32,
        id: u64,
        result: Result<FetchData, ReplicationError>,
    },
    Metadata,
    MetadataReply {
        leaders: BTreeMap<i32, i32>,
    },
    Produce {
        id: u64,
        partition: i32,
        value: i64,
    },
    ProduceReply {
        id: u64,
        partition: i32,
        result: Result<i64, i16>,
    },
    ConsumerFetch {
        id: u64,
        partition: i32,
        offset: i64,
    },
    ConsumerFetchReply {
        id: u64,
        partition: i32,
        result: Result<ConsumerData, i16>,
    },
}

#[derive(Debug, Clone)]
struct ConsumerData {
    records: Vec<(i64, i64)>,
    high_watermark: i64,
    log_end_offset: i64,
}

impl Msg {
    fn tag(&self) -> &'static str {
        match self {
            Msg::Register(_) => "register",
            Msg::RegisterReply(_) => "register-reply",
            Msg::Heartbeat(_) => "heartbeat",
            Msg::HeartbeatReply { .. } => "heartbeat-reply",
            Msg::AlterPartition { .. } => "alter-partition",
            Msg::AlterPartitionReply { .. } => "alter-partition-reply",
            Msg::Fetch { .. } => "fetch",
            Msg::FetchReply { .. } => "fetch-reply",
            Msg::Metadata => "metadata",
            Msg::MetadataReply { .. } => "metadata-reply",
            Msg::Produce { .. } => "produce",
            Msg::ProduceReply { .. } => "produce-reply",
            Msg::ConsumerFetch { .. } => "consumer-fetch",
            Msg::ConsumerFetchReply { .. } => "consumer-fetch-reply",
        }
    }
}

#[derive(Debug, Clone)]
struct Envelope {
    from: Endpoint,
    to: Endpoint,
    msg: Msg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeTimer {
    Register,
    Heartbeat,
    ReplicaTick,
    Flush,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Crash(i32),
    /// Every node at once (a power loss): only fsynced data survives anywhere.
    CrashAll,
    Pause(i32),
    Isolate(i32),
    OneWay(i32, i32),
    /// Both directions between two nodes, each still reaching the third (a partial
    /// partition: the controller may see both sides).
    Cut(i32, i32),
    Slow(i32, i32),
}

impl Fault {
    fn kind(&self) -> &'static str {
        match self {
            Fault::Crash(_) => "crash",
            Fault::CrashAll => "crash-all",
            Fault::Pause(_) => "pause",
            Fault::Isolate(_) => "isolate",
            Fault::OneWay(..) => "one-way",
            Fault::Cut(..) => "cut-link",
            Fault::Slow(..) => "slow-link",
        }
    }
    fn describe(&self) -> String {
        match self {
            Fault::Crash(n) => format!("crash node {n} (unflushed data dropped)"),
            Fault::CrashAll => "crash every node (unflushed data dropped)".to_string(),
            Fault::Pause(n) => format!("pause node {n}"),
            Fault::Isolate(n) => format!("isolate node {n}"),
            Fault::OneWay(a, b) => format!("drop messages {a} -> {b}"),
            Fault::Cut(a, b) => format!("cut link {a} <-> {b}"),
            Fault::Slow(a, b) => format!("slow link {a} <-> {b}"),
        }
    }
}

#[derive(Debug, Clone)]
enum EventKind {
    Deliver(Box<Envelope>),
    Node {
        node: i32,
        gen: u64,
        timer: NodeTimer,
    },
    ControllerTick,
    ControllerElect {
        term: u64,
    },
    CreateTopic,
    ClientTick(i64),
    ClientTimeout {
        process: i64,
        id: u64,
    },
    FaultStart,
    FaultEnd(Fault),
    HealAll,
    FinalRead,
    FinalReadDeadline,
}

// ---------------------------------------------------------------------------------
// Nodes

/// What survives a crash: the directory and, per partition, the offset the log was
/// last fsynced to.
#[derive(Debug)]
struct Disk {
    dir: PathBuf,
    synced: BTreeMap<i32, i64>,
}

#[derive(Debug)]
enum FetchState {
    Idle,
    InFlight {
        id: u64,
        sent_ms: u64,
    },
    /// Appended; the next fetch waits for the flush.
    WaitFlush,
}

enum Role {
    None,
    Leader(Box<PartitionLeader>),
    Follower { leader: i32, leader_epoch: i32 },
}

struct PendingProduce {
    client: Endpoint,
    id: u64,
    base_offset: i64,
    required_offset: i64,
}

struct Replica {
    log: PartitionLog,
    high_watermark: i64,
    role: Role,
    /// Appended as leader, waiting for the flush before the purgatory sees them.
    unflushed: Vec<u64>,
    produces: BTreeMap<u64, PendingProduce>,
    fetch: FetchState,
    alter_partition_sent_ms: Option<u64>,
}

struct Broker {
    incarnation_id: Uuid,
    broker_epoch: Option<i64>,
    register_sent_ms: Option<u64>,
    heartbeat_sent_ms: Option<u64>,
    image: MetadataImage,
    metadata_offset: i64,
    /// The image has reached the metadata log's end once since this process started.
    /// Until then the broker takes no partition role: a partial replay shows old
    /// leaderships (Kafka's broker also waits for its initial metadata catch-up).
    caught_up: bool,
    replicas: BTreeMap<i32, Replica>,
    flush_scheduled: bool,
    next_token: u64,
}

struct Node {
    gen: u64,
    paused_until: u64,
    disk: Disk,
    broker: Option<Broker>,
}

struct ControllerHost {
    node: i32,
    term: u64,
    controller: Option<Controller>,
    /// The committed metadata log: `(offset, records)` entries.
    log: Vec<(i64, Vec<MetadataRecord>)>,
}

// ---------------------------------------------------------------------------------
// Clients

struct Producer {
    process: i64,
    leaders: BTreeMap<i32, i32>,
    in_flight: Option<(u64, i64, i32)>,
}

struct Consumer {
    process: i64,
    leaders: BTreeMap<i32, i32>,
    position: BTreeMap<i32, i64>,
    in_flight: BTreeMap<i32, u64>,
    /// For the final reader: partitions read to the end.
    done: BTreeSet<i32>,
}

// ---------------------------------------------------------------------------------

struct World {
    cfg: SimConfig,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), EventKind>,
    rng: Rng,
    trace: u64,
    nodes: BTreeMap<i32, Node>,
    ctl: ControllerHost,
    blocked: BTreeMap<(i32, i32), u32>,
    slow: BTreeMap<(i32, i32), u32>,
    active_faults: Vec<Fault>,
    producers: Vec<Producer>,
    consumers: Vec<Consumer>,
    final_reader: Option<Consumer>,
    producing: bool,
    next_value: i64,
    next_request: u64,
    history: Vec<Op>,
    violations: Vec<String>,
    stats: SimStats,
    finished: bool,
    _root: tempfile::TempDir,
}

fn temp_root() -> std::io::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("ferrite-sim-")
            .tempdir_in(shm)
        {
            return Ok(d);
        }
    }
    tempfile::Builder::new().prefix("ferrite-sim-").tempdir()
}

/// Runs one seed to the end and checks its history.
pub fn run(cfg: SimConfig) -> SimResult {
    let root = match temp_root() {
        Ok(r) => r,
        Err(e) => {
            return SimResult {
                seed: cfg.seed,
                trace_hash: 0,
                report: ferrite_check::check(&[]),
                violations: vec![format!("no temp dir: {e}")],
                stats: SimStats::default(),
                history: None,
            }
        }
    };
    let mut nodes = BTreeMap::new();
    for id in NODES {
        nodes.insert(
            id,
            Node {
                gen: 0,
                paused_until: 0,
                disk: Disk {
                    dir: root.path().join(format!("node-{id}")),
                    synced: BTreeMap::new(),
                },
                broker: None,
            },
        );
    }
    let mut w = World {
        rng: Rng::new(cfg.seed),
        cfg,
        now: 0,
        seq: 0,
        queue: BTreeMap::new(),
        trace: 0xcbf2_9ce4_8422_2325,
        nodes,
        ctl: ControllerHost {
            node: 1,
            term: 0,
            controller: None,
            log: Vec::new(),
        },
        blocked: BTreeMap::new(),
        slow: BTreeMap::new(),
        active_faults: Vec::new(),
        producers: PRODUCER_PROCESSES
            .iter()
            .map(|&process| Producer {
                process,
                leaders: BTreeMap::new(),
                in_flight: None,
            })
            .collect(),
        consumers: CONSUMER_PROCESSES
            .iter()
            .map(|&process| Consumer::new(process))
            .collect(),
        final_reader: None,
        producing: true,
        next_value: 0,
        next_request: 0,
        history: Vec::new(),
        violations: Vec::new(),
        stats: SimStats::default(),
        finished: false,
        _root: root,
    };
    w.start();
    w.run_loop();
    w.finish()
}

impl Consumer {
    fn new(process: i64) -> Consumer {
        Consumer {
            process,
            leaders: BTreeMap::new(),
            position: (0..PARTITIONS).map(|p| (p, 0)).collect(),
            in_flight: BTreeMap::new(),
            done: BTreeSet::new(),
        }
    }
}

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn log_config() -> LogConfig {
    LogConfig {
        segment_bytes: SEGMENT_BYTES,
        index_interval_bytes: 256,
        retention_ms: -1,
        ..LogConfig::default()
    }
}

/// A one-record batch holding `value` (8 bytes, big-endian).
fn value_batch(value: i64, now_ms: u64) -> Vec<u8> {
    ferrite_storage::test_support::make_batch(1, now_ms as i64, &value.to_be_bytes())
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Option<i64> {
    let mut z: u64 = 0;
    let mut shift = 0;
    loop {
        let b = *buf.get(*pos)?;
        *pos += 1;
        z |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
    Some(((z >> 1) as i64) ^ -((z & 1) as i64))
}

/// `(offset, value)` of every record of the (uncompressed) batches in `bytes` at or
/// after `from` and below `below`.
fn decode_values(bytes: &[u8], from: i64, below: i64) -> Result<Vec<(i64, i64)>, String> {
    let mut out = Vec::new();
    for item in BatchIter::new(bytes) {
        let (_, header, batch) = item.map_err(|e| e.to_string())?;
        let count = batch
            .get(RECORD_COUNT_AT..RECORD_COUNT_AT + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(i32::from_be_bytes)
            .ok_or("short batch")?;
        let mut pos = HEADER_BYTES;
        for _ in 0..count {
            let len = read_varint(batch, &mut pos).ok_or("record length")?;
            let end = pos + usize::try_from(len).map_err(|_| "negative record length")?;
            pos += 1; // attributes
            read_varint(batch, &mut pos).ok_or("timestamp delta")?;
            let delta = read_varint(batch, &mut pos).ok_or("offset delta")?;
            let key_len = read_varint(batch, &mut pos).ok_or("key length")?;
            if key_len > 0 {
                pos += key_len as usize;
            }
            let value_len = read_varint(batch, &mut pos).ok_or("value length")?;
            let value = batch
                .get(pos..pos + 8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(i64::from_be_bytes)
                .ok_or("value")?;
            if value_len != 8 {
                return Err(format!("value of {value_len} bytes"));
            }
            pos = end;
            let offset = header.base_offset + delta;
            if offset >= from && offset < below {
                out.push((offset, value));
            }
        }
    }
    Ok(out)
}

/// Whole batches of `log` from `from` up to (not including) batches starting at
/// `below`, at most about [`FETCH_BYTES_MAX`], starting exactly at `from`.
fn read_batches(log: &PartitionLog, from: i64, below: i64) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut next = from;
    while next < below && out.len() < FETCH_BYTES_MAX {
        let Some(plan) = log.read_plan(next).map_err(|e| e.to_string())? else {
            break;
        };
        let bytes = plan
            .up_to(below)
            .read(FETCH_BYTES_MAX, true)
            .map_err(|e| e.to_string())?;
        let before = next;
        for item in BatchIter::new(&bytes) {
            let (_, header, batch) = item.map_err(|e| e.to_string())?;
            let last = header.last_offset();
            if last < next {
                continue; // the index pointed before the offset asked for
            }
            if header.base_offset != next || header.base_offset >= below {
                break;
            }
            out.extend_from_slice(batch);
            next = last + 1;
        }
        if next == before {
            break;
        }
    }
    Ok(out)
}

impl World {
    // ---- plumbing ----

    fn trace(&mut self, parts: &[&str]) {
        let mut h = fnv(self.trace, &self.now.to_le_bytes());
        for p in parts {
            h = fnv(h, p.as_bytes());
            h = fnv(h, b"|");
        }
        self.trace = h;
    }

    fn schedule(&mut self, at: u64, kind: EventKind) {
        self.seq += 1;
        self.queue.insert((at, self.seq), kind);
    }

    fn schedule_node(&mut self, node: i32, delay_ms: u64, timer: NodeTimer) {
        let gen = self.nodes.get(&node).map_or(0, |n| n.gen);
        self.schedule(self.now + delay_ms, EventKind::Node { node, gen, timer });
    }

    fn record(&mut self, op: Op) {
        self.history.push(op);
    }

    fn op(&self, op_type: OpType, f: OpFunction, process: i64) -> Op {
        Op {
            op_type,
            f,
            process,
            time_ms: self.now,
            topic: TOPIC.to_string(),
            value: None,
            partition: None,
            offset: None,
            records: Vec::new(),
            partitions: Vec::new(),
            error: None,
            txn: None,
        }
    }

    fn node_endpoint(&self, id: i32) -> Endpoint {
        Endpoint {
            addr: Addr::Node(id),
            node: Some(id),
            gen: self.nodes.get(&id).map_or(0, |n| n.gen),
        }
    }

    fn controller_endpoint(&self) -> Option<Endpoint> {
        self.ctl.controller.as_ref().map(|_| Endpoint {
            addr: Addr::Controller,
            node: Some(self.ctl.node),
            gen: self.ctl.term,
        })
    }

    fn client_endpoint(process: i64) -> Endpoint {
        Endpoint {
            addr: Addr::Client(process),
            node: None,
            gen: 0,
        }
    }

    fn send(&mut self, from: Endpoint, to: Endpoint, msg: Msg) {
        self.stats.messages_sent += 1;
        let mut delay = self.rng.range(LATENCY_MS.0, LATENCY_MS.1);
        if let (Some(a), Some(b)) = (from.node, to.node) {
            if self.slow.contains_key(&(a.min(b), a.max(b))) {
                delay += self.rng.range(SLOW_LINK_EXTRA_MS.0, SLOW_LINK_EXTRA_MS.1);
            }
        }
        self.schedule(
            self.now + delay,
            EventKind::Deliver(Box::new(Envelope { from, to, msg })),
        );
    }

    fn reachable(&self, a: i32, b: i32) -> bool {
        a == b || !self.blocked.contains_key(&(a, b))
    }

    fn is_up(&self, id: i32) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.broker.is_some())
    }

    fn is_paused(&self, id: i32) -> bool {
        self.nodes
            .get(&id)
            .is_some_and(|n| n.paused_until > self.now)
    }

    fn next_request_id(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    // ---- the run ----

    fn start(&mut self) {
        for id in NODES {
            self.start_node(id);
        }
        self.elect_controller_now();
        self.schedule(CONTROLLER_TICK_MS, EventKind::ControllerTick);
        self.schedule(200, EventKind::CreateTopic);
        let first = self.cfg.faults_start_ms;
        for p in PRODUCER_PROCESSES.iter().chain(CONSUMER_PROCESSES.iter()) {
            let at = first.saturating_sub(1_000) + self.rng.range(0, 50);
            self.schedule(at, EventKind::ClientTick(*p));
        }
        for c in CONSUMER_PROCESSES {
            let mut op = self.op(OpType::Ok, OpFunction::Assign, c);
            op.partitions = (0..PARTITIONS).collect();
            self.record(op);
        }
        self.schedule(first, EventKind::FaultStart);
        let heal = first + self.cfg.faults_ms;
        self.schedule(heal, EventKind::HealAll);
        self.schedule(heal + self.cfg.settle_ms, EventKind::FinalRead);
        self.schedule(
            heal + self.cfg.settle_ms + self.cfg.final_read_timeout_ms,
            EventKind::FinalReadDeadline,
        );
    }

    fn run_loop(&mut self) {
        while !self.finished {
            let Some(((at, seq), kind)) = self.queue.pop_first() else {
                self.violations
                    .push("event queue ran dry before the final read finished".into());
                break;
            };
            self.now = at;
            self.stats.events += 1;
            if self.stats.events > EVENTS_MAX {
                self.violations.push(format!(
                    "more than {EVENTS_MAX} events: the run did not end"
                ));
                break;
            }
            let _ = seq;
            self.handle(kind);
        }
        self.stats.end_ms = self.now;
    }

    fn handle(&mut self, kind: EventKind) {
        match kind {
            EventKind::Deliver(env) => self.deliver(*env),
            EventKind::Node { node, gen, timer } => {
                let Some(n) = self.nodes.get(&node) else {
                    return;
                };
                if n.gen != gen || n.broker.is_none() {
                    return;
                }
                if n.paused_until > self.now {
                    let at = n.paused_until;
                    self.schedule(at, EventKind::Node { node, gen, timer });
                    return;
                }
                self.trace(&["timer", &node.to_string(), &format!("{timer:?}")]);
                self.node_timer(node, timer);
            }
            EventKind::ControllerTick => {
                self.controller_tick();
                self.schedule(self.now + CONTROLLER_TICK_MS, EventKind::ControllerTick);
            }
            EventKind::ControllerElect { term } => {
                if term == self.ctl.term && self.ctl.controller.is_none() {
                    self.elect_controller_now();
                }
            }
            EventKind::CreateTopic => self.create_topic(),
            EventKind::ClientTick(p) => self.client_tick(p),
            EventKind::ClientTimeout { process, id } => self.client_timeout(process, id),
            EventKind::FaultStart => self.fault_start(),
            EventKind::FaultEnd(f) => self.fault_end(f),
            EventKind::HealAll => self.heal_all(),
            EventKind::FinalRead => self.final_read_start(),
            EventKind::FinalReadDeadline => {
                if !self.finished {
                    let missing: Vec<i32> = self.final_reader.as_ref().map_or(Vec::new(), |r| {
                        (0..PARTITIONS).filter(|p| !r.done.contains(p)).collect()
                    });
                    self.violations.push(format!(
                        "the cluster did not recover: final read of partitions {missing:?} \
                         unfinished {} ms after the settle",
                        self.cfg.final_read_timeout_ms
                    ));
                    self.finished = true;
                }
            }
        }
    }

    fn deliver(&mut self, env: Envelope) {
        if let (Some(a), Some(b)) = (env.from.node, env.to.node) {
            if !self.reachable(a, b) {
                self.stats.messages_dropped += 1;
                return;
            }
        }
        match env.to.addr {
            Addr::Client(p) => {
                self.trace(&["deliver", &format!("{:?}", env.from.addr), env.msg.tag()]);
                self.client_message(p, env.from, env.msg)
            }
            Addr::Node(id) => {
                let Some(n) = self.nodes.get(&id) else { return };
                if n.gen != env.to.gen || n.broker.is_none() {
                    self.stats.messages_dropped += 1;
                    return;
                }
                if n.paused_until > self.now {
                    let at = n.paused_until;
                    self.schedule(at, EventKind::Deliver(Box::new(env)));
                    return;
                }
                self.trace(&[
                    "deliver",
                    &format!("{:?}", env.from.addr),
                    &id.to_string(),
                    env.msg.tag(),
                ]);
                self.node_message(id, env.from, env.msg);
            }
            Addr::Controller => {
                if env.to.gen != self.ctl.term || self.ctl.controller.is_none() {
                    self.stats.messages_dropped += 1;
                    return;
                }
                if self.is_paused(self.ctl.node) {
                    let at = self
                        .nodes
                        .get(&self.ctl.node)
                        .map_or(self.now, |n| n.paused_until);
                    self.schedule(at, EventKind::Deliver(Box::new(env)));
                    return;
                }
                self.trace(&[
                    "deliver",
                    &format!("{:?}", env.from.addr),
                    "controller",
                    env.msg.tag(),
                ]);
                self.controller_message(env.from, env.msg);
            }
        }
    }

    // ---- the controller host ----

    fn controller_config() -> ControllerConfig {
        ControllerConfig {
            cluster_id: Some(CLUSTER_ID.to_string()),
            broker_session_timeout_ms: BROKER_SESSION_TIMEOUT_MS,
            auto_leader_rebalance_enable: true,
            leader_imbalance_check_interval_ms: LEADER_IMBALANCE_CHECK_INTERVAL_MS,
            unclean_leader_election_enable: false,
            num_partitions: PARTITIONS,
            default_replication_factor: REPLICATION_FACTOR,
            offsets_topic_replication_factor: REPLICATION_FACTOR,
            transaction_state_log_replication_factor: REPLICATION_FACTOR,
            transaction_state_log_min_isr:
                ferrite_controller::config::TRANSACTION_STATE_LOG_MIN_ISR_DEFAULT,
        }
    }

    /// Can `id` host the controller: up, not paused, and reaching a majority (itself
    /// plus one more node, both ways).
    fn has_quorum(&self, id: i32) -> bool {
        if !self.is_up(id) || self.is_paused(id) {
            return false;
        }
        let peers = NODES
            .iter()
            .filter(|&&o| {
                o != id
                    && self.is_up(o)
                    && !self.is_paused(o)
                    && self.reachable(id, o)
                    && self.reachable(o, id)
            })
            .count();
        peers + 1 > NODES.len() / 2
    }

    fn elect_controller_now(&mut self) {
        let candidates: Vec<i32> = NODES
            .iter()
            .copied()
            .filter(|&n| self.has_quorum(n))
            .collect();
        if candidates.is_empty() {
            let term = self.ctl.term;
            let at = self.now + CONTROLLER_ELECTION_MS.0;
            self.schedule(at, EventKind::ControllerElect { term });
            return;
        }
        let node = candidates
            .get(self.rng.index(candidates.len()))
            .copied()
            .unwrap_or(1);
        let mut image = MetadataImage::default();
        for (_, records) in &self.ctl.log {
            image.apply_all(records);
        }
        let next_offset = self.ctl.log.last().map_or(0, |(o, _)| o + 1);
        let seed = self.rng.next_u64();
        self.ctl.term += 1;
        self.ctl.node = node;
        self.ctl.controller = Some(Controller::new(
            Self::controller_config(),
            image,
            next_offset,
            self.now as i64,
            seed,
        ));
        self.stats.controller_failovers += 1;
        self.trace(&["controller", &node.to_string()]);
    }

    fn controller_resign(&mut self) {
        if self.ctl.controller.take().is_some() {
            self.ctl.term += 1;
            let term = self.ctl.term;
            let at = self.now
                + self
                    .rng
                    .range(CONTROLLER_ELECTION_MS.0, CONTROLLER_ELECTION_MS.1);
            self.schedule(at, EventKind::ControllerElect { term });
        }
    }

    fn controller_tick(&mut self) {
        if self.ctl.controller.is_some() && !self.has_quorum(self.ctl.node) {
            self.controller_resign();
            return;
        }
        let now = self.now as i64;
        if let Some(c) = self.ctl.controller.as_mut() {
            let out = c.handle(Event::Tick, now);
            if !out.records.is_empty() {
                self.commit(out.offset, out.records);
            }
        }
    }

    fn commit(&mut self, offset: Option<i64>, records: Vec<MetadataRecord>) {
        let offset = offset.unwrap_or_else(|| self.ctl.log.last().map_or(0, |(o, _)| o + 1));
        for r in &records {
            if let MetadataRecord::PartitionChange { leader, .. } = r {
                if *leader >= -1 {
                    self.stats.leader_elections_seen += 1;
                }
            }
        }
        self.trace(&["commit", &offset.to_string(), &records.len().to_string()]);
        if std::env::var_os("SIM_DEBUG_COMMIT").is_some() {
            eprintln!(
                "t={} commit {offset} on node {}: {records:?}",
                self.now, self.ctl.node
            );
        }
        self.ctl.log.push((offset, records));
    }

    fn controller_message(&mut self, from: Endpoint, msg: Msg) {
        let now = self.now as i64;
        let Some(c) = self.ctl.controller.as_mut() else {
            return;
        };
        #[allow(clippy::type_complexity)]
        let (event, reply_with): (
            Event,
            fn(Reply, Vec<(i64, Vec<MetadataRecord>)>, i64, Msg) -> Option<Msg>,
        ) = match msg.clone() {
            Msg::Register(r) => (Event::RegisterBroker(r), |reply, _, _, _| match reply {
                Reply::RegisterBroker(r) => Some(Msg::RegisterReply(r)),
                _ => None,
            }),
            Msg::Heartbeat(h) => (
                Event::Heartbeat(h),
                |reply, entries, last_offset, _| match reply {
                    Reply::Heartbeat(result) => Some(Msg::HeartbeatReply {
                        result,
                        entries,
                        last_offset,
                    }),
                    _ => None,
                },
            ),
            Msg::AlterPartition { request, .. } => {
                (Event::AlterPartition(request), |reply, _, _, msg| {
                    match (reply, msg) {
                        (
                            Reply::AlterPartition(result),
                            Msg::AlterPartition {
                                partition,
                                proposal,
                                ..
                            },
                        ) => Some(Msg::AlterPartitionReply {
                            partition,
                            proposal,
                            result,
                        }),
                        _ => None,
                    }
                })
            }
            _ => return,
        };
        let metadata_offset = match &event {
            Event::Heartbeat(h) => Some(h.current_metadata_offset),
            _ => None,
        };
        let out = c.handle(event, now);
        if !out.records.is_empty() {
            self.commit(out.offset, out.records);
        }
        let entries: Vec<(i64, Vec<MetadataRecord>)> = match metadata_offset {
            Some(o) => self
                .ctl
                .log
                .iter()
                .filter(|(off, _)| *off > o)
                .take(METADATA_ENTRIES_PER_REPLY_MAX)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        let last_offset = self.ctl.log.last().map_or(-1, |(o, _)| *o);
        if let (Some(reply), Some(me)) = (
            reply_with(out.reply, entries, last_offset, msg),
            self.controller_endpoint(),
        ) {
            self.send(me, from, reply);
        }
    }

    fn create_topic(&mut self) {
        let now = self.now as i64;
        let ready = self.ctl.controller.as_ref().is_some_and(|c| {
            c.image().topic(TOPIC).is_none()
                && c.image().brokers().filter(|b| b.is_active()).count() == NODES.len()
        });
        let exists = self
            .ctl
            .controller
            .as_ref()
            .is_some_and(|c| c.image().topic(TOPIC).is_some());
        if exists {
            return;
        }
        if ready {
            if let Some(c) = self.ctl.controller.as_mut() {
                let mut configs = BTreeMap::new();
                configs.insert(
                    "min.insync.replicas".to_string(),
                    MIN_INSYNC_REPLICAS.to_string(),
                );
                let out = c.handle(
                    Event::CreateTopics(CreateTopics {
                        topics: vec![CreatableTopic {
                            name: TOPIC.to_string(),
                            num_partitions: PARTITIONS,
                            replication_factor: REPLICATION_FACTOR,
                            assignments: None,
                            configs,
                        }],
                        validate_only: false,
                    }),
                    now,
                );
                if let Reply::CreateTopics(results) = &out.reply {
                    for r in results {
                        if let Err(e) = &r.result {
                            self.violations.push(format!("CreateTopics failed: {e}"));
                        }
                    }
                }
                if !out.records.is_empty() {
                    self.commit(out.offset, out.records);
                }
                return;
            }
        }
        self.schedule(self.now + 100, EventKind::CreateTopic);
    }

    // ---- nodes ----

    fn start_node(&mut self, id: i32) {
        let incarnation_id = Uuid::from_u64_pair(self.rng.next_u64(), self.rng.next_u64());
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        n.gen += 1;
        n.paused_until = 0;
        n.broker = Some(Broker {
            incarnation_id,
            broker_epoch: None,
            register_sent_ms: None,
            heartbeat_sent_ms: None,
            image: MetadataImage::default(),
            metadata_offset: -1,
            caught_up: false,
            replicas: BTreeMap::new(),
            flush_scheduled: false,
            next_token: 0,
        });
        self.trace(&["start", &id.to_string()]);
        self.schedule_node(id, 0, NodeTimer::Register);
        self.schedule_node(id, HEARTBEAT_INTERVAL_MS, NodeTimer::Heartbeat);
        self.schedule_node(id, REPLICA_TICK_MS, NodeTimer::ReplicaTick);
    }

    /// kill -9: the process state goes; the disk keeps what was fsynced.
    fn crash_node(&mut self, id: i32) {
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        n.broker = None; // PartitionLogs dropped without a flush or close
        n.gen += 1;
        n.paused_until = 0;
        if self.ctl.node == id {
            self.controller_resign();
        }
        self.trace(&["crash", &id.to_string()]);
    }

    fn node_timer(&mut self, id: i32, timer: NodeTimer) {
        match timer {
            NodeTimer::Register => {
                let (send, epoch_known) = match self.broker(id) {
                    Some(b) => (
                        b.broker_epoch.is_none()
                            && b.register_sent_ms
                                .is_none_or(|t| self.now >= t + CONTROLLER_REQUEST_TIMEOUT_MS),
                        b.broker_epoch.is_some(),
                    ),
                    None => return,
                };
                if epoch_known {
                    return;
                }
                if send {
                    self.send_register(id);
                }
                self.schedule_node(id, REGISTER_RETRY_MS, NodeTimer::Register);
            }
            NodeTimer::Heartbeat => {
                let due = self.broker(id).is_some_and(|b| {
                    b.broker_epoch.is_some()
                        && b.heartbeat_sent_ms
                            .is_none_or(|t| self.now >= t + CONTROLLER_REQUEST_TIMEOUT_MS)
                });
                if due {
                    self.send_heartbeat(id);
                }
                self.schedule_node(id, HEARTBEAT_INTERVAL_MS, NodeTimer::Heartbeat);
            }
            NodeTimer::ReplicaTick => {
                self.replica_tick(id);
                self.schedule_node(id, REPLICA_TICK_MS, NodeTimer::ReplicaTick);
            }
            NodeTimer::Flush => self.flush_node(id),
        }
    }

    fn broker(&self, id: i32) -> Option<&Broker> {
        self.nodes.get(&id).and_then(|n| n.broker.as_ref())
    }

    fn broker_mut(&mut self, id: i32) -> Option<&mut Broker> {
        self.nodes.get_mut(&id).and_then(|n| n.broker.as_mut())
    }

    fn send_register(&mut self, id: i32) {
        let now = self.now;
        let Some(b) = self.broker_mut(id) else { return };
        b.register_sent_ms = Some(now);
        let req = BrokerRegistration {
            broker_id: id,
            cluster_id: CLUSTER_ID.to_string(),
            incarnation_id: b.incarnation_id,
            listeners: vec![BrokerEndpoint {
                name: "PLAINTEXT".into(),
                host: format!("node-{id}"),
                port: 9092,
                security_protocol: 0,
            }],
            rack: None,
        };
        if let Some(to) = self.controller_endpoint() {
            let from = self.node_endpoint(id);
            self.send(from, to, Msg::Register(req));
        }
    }

    fn send_heartbeat(&mut self, id: i32) {
        let now = self.now;
        let Some(b) = self.broker_mut(id) else { return };
        let Some(broker_epoch) = b.broker_epoch else {
            return;
        };
        b.heartbeat_sent_ms = Some(now);
        let hb = BrokerHeartbeat {
            broker_id: id,
            broker_epoch,
            current_metadata_offset: b.metadata_offset,
            want_fence: false,
            want_shut_down: false,
        };
        if let Some(to) = self.controller_endpoint() {
            let from = self.node_endpoint(id);
            self.send(from, to, Msg::Heartbeat(hb));
        }
    }

    fn node_message(&mut self, id: i32, from: Endpoint, msg: Msg) {
        match msg {
            Msg::RegisterReply(result) => {
                let Some(b) = self.broker_mut(id) else { return };
                b.register_sent_ms = None;
                // A refusal (e.g. DUPLICATE_BROKER_REGISTRATION) is retried by the timer.
                if let Ok(r) = result {
                    if b.broker_epoch.is_none() {
                        b.broker_epoch = Some(r.broker_epoch);
                        self.send_heartbeat(id);
                    }
                }
            }
            Msg::HeartbeatReply {
                result,
                entries,
                last_offset,
            } => {
                let Some(b) = self.broker_mut(id) else { return };
                b.heartbeat_sent_ms = None;
                match result {
                    Ok(_) => self.apply_metadata(id, entries, last_offset),
                    Err(ControllerError::StaleBrokerEpoch(_)) => {
                        // Registered again from scratch (the controller lost us).
                        b.broker_epoch = None;
                        self.schedule_node(id, 0, NodeTimer::Register);
                    }
                    Err(_) => {}
                }
            }
            Msg::AlterPartitionReply {
                partition,
                proposal,
                result,
            } => self.alter_partition_reply(id, partition, proposal, result),
            Msg::Fetch {
                partition,
                id: fetch_id,
                fetch,
            } => {
                let result = self.leader_fetch(id, partition, fetch);
                let me = self.node_endpoint(id);
                self.send(
                    me,
                    from,
                    Msg::FetchReply {
                        partition,
                        id: fetch_id,
                        result,
                    },
                );
                self.complete_produces(id, partition);
            }
            Msg::FetchReply {
                partition,
                id: fetch_id,
                result,
            } => self.follower_fetch_reply(id, partition, fetch_id, result),
            Msg::Metadata => {
                let leaders = self
                    .broker(id)
                    .and_then(|b| b.image.topic(TOPIC))
                    .map(|t| t.partitions.iter().map(|(p, pi)| (*p, pi.leader)).collect())
                    .unwrap_or_default();
                let me = self.node_endpoint(id);
                self.send(me, from, Msg::MetadataReply { leaders });
            }
            Msg::Produce {
                id: req,
                partition,
                value,
            } => self.produce(id, from, req, partition, value),
            Msg::ConsumerFetch {
                id: req,
                partition,
                offset,
            } => {
                let result = self.consumer_fetch(id, partition, offset);
                let me = self.node_endpoint(id);
                self.send(
                    me,
                    from,
                    Msg::ConsumerFetchReply {
                        id: req,
                        partition,
                        result,
                    },
                );
            }
            _ => {}
        }
    }

    fn apply_metadata(
        &mut self,
        id: i32,
        entries: Vec<(i64, Vec<MetadataRecord>)>,
        last_offset: i64,
    ) {
        let Some(b) = self.broker_mut(id) else { return };
        let mut changed = false;
        for (offset, records) in entries {
            if offset != b.metadata_offset + 1 {
                continue; // not the next entry (a reordered reply): fetched again
            }
            b.image.apply_all(&records);
            b.metadata_offset = offset;
            changed = true;
        }
        if !b.caught_up && b.metadata_offset >= last_offset {
            b.caught_up = true;
            changed = true;
        }
        if changed && b.caught_up {
            self.reconcile(id);
        }
    }

    fn violation(&mut self, what: String) {
        let text = format!("t={} ms: {what}", self.now);
        self.violations.push(text);
    }

    fn open_replica(&mut self, id: i32, partition: i32) -> Result<(), String> {
        let Some(n) = self.nodes.get_mut(&id) else {
            return Err("no node".into());
        };
        let dir = n.disk.dir.join(format!("{TOPIC}-{partition}"));
        let synced = n.disk.synced.get(&partition).copied().unwrap_or(0);
        let (mut log, _) =
            PartitionLog::open(&dir, log_config(), false).map_err(|e| format!("open: {e}"))?;
        // The crash model: whatever was written after the last fsync is gone.
        let leo = log.log_end_offset();
        if leo > synced {
            log.truncate_to(synced)
                .map_err(|e| format!("crash truncate: {e}"))?;
            self.stats.crash_truncated_records += (leo - synced) as u64;
        }
        let synced_now = log.log_end_offset();
        n.disk.synced.insert(partition, synced_now);
        if let Some(b) = n.broker.as_mut() {
            b.replicas.insert(
                partition,
                Replica {
                    log,
                    high_watermark: 0,
                    role: Role::None,
                    unflushed: Vec::new(),
                    produces: BTreeMap::new(),
                    fetch: FetchState::Idle,
                    alter_partition_sent_ms: None,
                },
            );
        }
        Ok(())
    }

    /// Derives every local partition's role from the metadata image (the one-way flow:
    /// records → image → roles), as the broker's metadata listener does.
    fn reconcile(&mut self, id: i32) {
        let parts: Vec<(i32, ferrite_metadata::PartitionImage)> = match self.broker(id) {
            Some(b) => b
                .image
                .topic(TOPIC)
                .map(|t| {
                    t.partitions
                        .iter()
                        .map(|(p, pi)| (*p, pi.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            None => return,
        };
        for (partition, p) in parts {
            if !p.replicas.contains(&id) {
                continue;
            }
            if self
                .broker(id)
                .is_some_and(|b| !b.replicas.contains_key(&partition))
            {
                if let Err(e) = self.open_replica(id, partition) {
                    self.violation(format!("node {id} partition {partition}: {e}"));
                    continue;
                }
            }
            match self.reconcile_partition(id, partition, &p) {
                Ok(answers) => {
                    let me = self.node_endpoint(id);
                    for (client, req, result) in answers {
                        self.send(
                            me,
                            client,
                            Msg::ProduceReply {
                                id: req,
                                partition,
                                result,
                            },
                        );
                    }
                }
                Err(e) => self.violation(format!("node {id} partition {partition}: {e}")),
            }
            self.complete_produces(id, partition);
        }
    }

    /// One partition's role change; returns the produce answers it causes.
    #[allow(clippy::type_complexity)]
    fn reconcile_partition(
        &mut self,
        id: i32,
        partition: i32,
        p: &ferrite_metadata::PartitionImage,
    ) -> Result<Vec<(Endpoint, u64, Result<i64, i16>)>, String> {
        let now = self.now;
        let mut became_leader = None;
        let mut answers = Vec::new();
        {
            let Some(b) = self.broker_mut(id) else {
                return Ok(answers);
            };
            let broker_epoch = b.broker_epoch.unwrap_or(-1);
            let Some(rep) = b.replicas.get_mut(&partition) else {
                return Ok(answers);
            };
            let state = PartitionState {
                leader_epoch: p.leader_epoch,
                partition_epoch: p.partition_epoch,
                replicas: p.replicas.clone(),
                isr: p.isr.clone(),
            };
            let mut resigned = Vec::new();
            if p.leader == id {
                let same_epoch =
                    matches!(&rep.role, Role::Leader(l) if l.leader_epoch() == p.leader_epoch);
                if same_epoch {
                    if let Role::Leader(l) = &mut rep.role {
                        if p.partition_epoch > l.partition_state().partition_epoch
                            && p.isr.contains(&id)
                        {
                            l.update_partition_state(state);
                        }
                    }
                } else {
                    if let Role::Leader(l) = std::mem::replace(&mut rep.role, Role::None) {
                        resigned = l.resign();
                    }
                    // Everything a leader serves is flushed: flush before leading.
                    rep.log.flush().map_err(|e| format!("flush: {e}"))?;
                    let leo = rep.log.log_end_offset();
                    rep.log
                        .begin_leader_epoch(p.leader_epoch)
                        .map_err(|e| format!("begin_leader_epoch {}: {e}", p.leader_epoch))?;
                    let hw = rep.high_watermark.min(leo);
                    rep.role = Role::Leader(Box::new(PartitionLeader::become_leader(
                        id,
                        broker_epoch,
                        ReplicationConfig {
                            replica_lag_time_max_ms: REPLICA_LAG_TIME_MAX_MS,
                            min_insync_replicas: MIN_INSYNC_REPLICAS,
                        },
                        state,
                        leo,
                        hw,
                        now,
                    )));
                    rep.alter_partition_sent_ms = None;
                    became_leader = Some(leo);
                }
            } else {
                if let Role::Leader(l) = std::mem::replace(&mut rep.role, Role::None) {
                    resigned = l.resign();
                }
                let same = matches!(rep.role, Role::Follower { leader, leader_epoch }
                    if leader == p.leader && leader_epoch == p.leader_epoch);
                if !same {
                    rep.role = Role::Follower {
                        leader: p.leader,
                        leader_epoch: p.leader_epoch,
                    };
                    rep.fetch = FetchState::Idle;
                }
            }
            for c in resigned {
                if let Some(pp) = rep.produces.remove(&c.token) {
                    answers.push((pp.client, pp.id, Err(NOT_LEADER_OR_FOLLOWER)));
                }
            }
            if !matches!(rep.role, Role::Leader(_)) {
                // Appended but not yet flushed when leadership moved: unknown outcome.
                for (_, pp) in std::mem::take(&mut rep.produces) {
                    answers.push((pp.client, pp.id, Err(NOT_LEADER_OR_FOLLOWER)));
                }
                rep.unflushed.clear();
            }
        }
        if let Some(leo) = became_leader {
            if let Some(n) = self.nodes.get_mut(&id) {
                n.disk.synced.insert(partition, leo);
            }
            self.trace(&[
                "lead",
                &id.to_string(),
                &partition.to_string(),
                &p.leader_epoch.to_string(),
            ]);
        }
        Ok(answers)
    }

    fn schedule_flush(&mut self, id: i32) {
        let scheduled = match self.broker_mut(id) {
            Some(b) => std::mem::replace(&mut b.flush_scheduled, true),
            None => return,
        };
        if !scheduled {
            let d = self.rng.range(FLUSH_DELAY_MS.0, FLUSH_DELAY_MS.1);
            self.schedule_node(id, d, NodeTimer::Flush);
        }
    }

    fn flush_node(&mut self, id: i32) {
        let now = self.now;
        let mut errors = Vec::new();
        let mut synced_updates = Vec::new();
        let mut fetch_now = Vec::new();
        let mut touched = Vec::new();
        {
            let Some(b) = self.broker_mut(id) else { return };
            b.flush_scheduled = false;
            for (&partition, rep) in b.replicas.iter_mut() {
                if let Err(e) = rep.log.flush() {
                    errors.push(format!("node {id} partition {partition}: flush: {e}"));
                    continue;
                }
                let leo = rep.log.log_end_offset();
                synced_updates.push((partition, leo));
                match &mut rep.role {
                    Role::Leader(l) => {
                        if leo > l.log_end_offset() {
                            l.on_append(leo);
                        }
                        for token in std::mem::take(&mut rep.unflushed) {
                            if let Some(pp) = rep.produces.get(&token) {
                                let deadline = now + PRODUCE_TIMEOUT_MS;
                                if let Err(e) =
                                    l.add_pending_produce(token, pp.required_offset, deadline)
                                {
                                    errors.push(format!("add_pending_produce: {e}"));
                                }
                            }
                        }
                        touched.push(partition);
                    }
                    Role::Follower { .. } => {
                        if matches!(rep.fetch, FetchState::WaitFlush) {
                            rep.fetch = FetchState::Idle;
                            fetch_now.push(partition);
                        }
                    }
                    Role::None => {}
                }
            }
        }
        for e in errors {
            self.violation(e);
        }
        if let Some(n) = self.nodes.get_mut(&id) {
            for (p, o) in synced_updates {
                n.disk.synced.insert(p, o);
            }
        }
        for p in touched {
            self.complete_produces(id, p);
        }
        for p in fetch_now {
            self.send_fetch(id, p);
        }
    }

    fn replica_tick(&mut self, id: i32) {
        let now = self.now;
        let mut alters = Vec::new();
        let mut fetches = Vec::new();
        let mut touched = Vec::new();
        {
            let Some(b) = self.broker_mut(id) else { return };
            let Some(broker_epoch) = b.broker_epoch else {
                return;
            };
            let topic_id = b.image.topic(TOPIC).map(|t| t.topic_id);
            let image = &b.image;
            for (&partition, rep) in b.replicas.iter_mut() {
                match &mut rep.role {
                    Role::Leader(l) => {
                        touched.push(partition);
                        let resend = l.alter_partition_in_flight().cloned().filter(|_| {
                            rep.alter_partition_sent_ms
                                .is_none_or(|t| now >= t + ALTER_PARTITION_RETRY_MS)
                        });
                        let proposal = match resend {
                            Some(p) => Some(p),
                            None => l.isr_proposal(now, |bid| {
                                image.broker(bid).map(|r| BrokerState {
                                    broker_epoch: r.broker_epoch,
                                    fenced: r.fenced,
                                    in_controlled_shutdown: r.in_controlled_shutdown,
                                })
                            }),
                        };
                        if let (Some(proposal), Some(topic_id)) = (proposal, topic_id) {
                            rep.alter_partition_sent_ms = Some(now);
                            alters.push((partition, topic_id, proposal));
                        }
                    }
                    Role::Follower { leader, .. } => {
                        let leader = *leader;
                        let stale = match rep.fetch {
                            FetchState::Idle => true,
                            FetchState::InFlight { sent_ms, .. } => {
                                now >= sent_ms + REPLICA_FETCH_TIMEOUT_MS
                            }
                            FetchState::WaitFlush => false,
                        };
                        if stale && leader >= 0 {
                            rep.fetch = FetchState::Idle;
                            fetches.push(partition);
                        }
                    }
                    Role::None => {}
                }
            }
            let _ = broker_epoch;
        }
        for (partition, topic_id, proposal) in alters {
            let Some(broker_epoch) = self.broker(id).and_then(|b| b.broker_epoch) else {
                continue;
            };
            let request = AlterPartition {
                broker_id: id,
                broker_epoch,
                topics: vec![AlterPartitionTopic {
                    topic_id,
                    partitions: vec![AlterPartitionData {
                        partition,
                        leader_epoch: proposal.leader_epoch,
                        new_isr: proposal
                            .new_isr
                            .iter()
                            .map(|m| ferrite_controller::IsrMember {
                                broker_id: m.broker_id,
                                broker_epoch: m.broker_epoch,
                            })
                            .collect(),
                        partition_epoch: proposal.partition_epoch,
                    }],
                }],
            };
            if let Some(to) = self.controller_endpoint() {
                let from = self.node_endpoint(id);
                self.send(
                    from,
                    to,
                    Msg::AlterPartition {
                        partition,
                        proposal,
                        request,
                    },
                );
            }
        }
        for p in touched {
            self.complete_produces(id, p);
        }
        for p in fetches {
            self.send_fetch(id, p);
        }
    }

    fn alter_partition_reply(
        &mut self,
        id: i32,
        partition: i32,
        proposal: AlterPartitionProposal,
        result: Result<Vec<AlterPartitionResult>, ControllerError>,
    ) {
        let clear_on_any_error = self.cfg.planted_bug == Some(PlantedBug::ClearInFlightOnAnyError);
        {
            let Some(b) = self.broker_mut(id) else { return };
            let replicas = b
                .image
                .topic(TOPIC)
                .and_then(|t| t.partitions.get(&partition))
                .map(|p| p.replicas.clone())
                .unwrap_or_default();
            let Some(rep) = b.replicas.get_mut(&partition) else {
                return;
            };
            let Role::Leader(l) = &mut rep.role else {
                return;
            };
            let epoch = l.leader_epoch();
            // Only an answer that says the change was certainly not applied clears the
            // in-flight proposal (Kafka's Partition.handleAlterPartitionError resets only
            // on INELIGIBLE_REPLICA / OPERATION_NOT_ATTEMPTED). Any other error may answer
            // a retry of a request that was applied: the proposal stays in flight (its
            // members keep holding the high watermark) until the metadata log settles it.
            // Clearing it on every error lost an acknowledged write (seed 7405).
            let state: Option<Result<PartitionState, ()>> = match result {
                Ok(results) => match results.into_iter().find(|r| r.partition == partition) {
                    Some(r) => match r.result {
                        Ok(s)
                            if s.leader == id && s.leader_epoch == epoch && s.isr.contains(&id) =>
                        {
                            Some(Ok(PartitionState {
                                leader_epoch: s.leader_epoch,
                                partition_epoch: s.partition_epoch,
                                replicas,
                                isr: s.isr,
                            }))
                        }
                        Err(ControllerError::IneligibleReplica(_)) => Some(Err(())),
                        _ if clear_on_any_error => Some(Err(())),
                        _ => None,
                    },
                    None => None,
                },
                Err(_) if clear_on_any_error => Some(Err(())),
                Err(_) => None,
            };
            if let Some(state) = state {
                if l.alter_partition_in_flight() == Some(&proposal) {
                    rep.alter_partition_sent_ms = None;
                }
                l.on_alter_partition_response(&proposal, state);
            }
        }
        self.complete_produces(id, partition);
    }

    fn send_fetch(&mut self, id: i32, partition: i32) {
        let now = self.now;
        let fetch_id = self.next_request_id();
        let Some(b) = self.broker_mut(id) else { return };
        let replica_epoch = b.broker_epoch.unwrap_or(-1);
        let Some(rep) = b.replicas.get_mut(&partition) else {
            return;
        };
        let Role::Follower {
            leader,
            leader_epoch,
        } = rep.role
        else {
            return;
        };
        if leader < 0 || !matches!(rep.fetch, FetchState::Idle) {
            return;
        }
        rep.fetch = FetchState::InFlight {
            id: fetch_id,
            sent_ms: now,
        };
        let fetch = FollowerFetch {
            replica_id: id,
            replica_epoch,
            current_leader_epoch: leader_epoch,
            fetch_offset: rep.log.log_end_offset(),
            last_fetched_epoch: rep.log.last_leader_epoch(),
        };
        let from = self.node_endpoint(id);
        let to = self.node_endpoint(leader);
        self.send(
            from,
            to,
            Msg::Fetch {
                partition,
                id: fetch_id,
                fetch,
            },
        );
    }

    /// The leader's side of a follower fetch: `PartitionLeader::on_follower_fetch`, then
    /// flushed records from the follower's offset.
    fn leader_fetch(
        &mut self,
        id: i32,
        partition: i32,
        fetch: FollowerFetch,
    ) -> Result<FetchData, ReplicationError> {
        let now = self.now;
        let Some(rep) = self
            .broker_mut(id)
            .and_then(|b| b.replicas.get_mut(&partition))
        else {
            return Err(ReplicationError::NotLeaderOrFollower(id));
        };
        let Role::Leader(l) = &mut rep.role else {
            return Err(ReplicationError::NotLeaderOrFollower(id));
        };
        match l.on_follower_fetch(fetch, rep.log.leader_epochs(), now)? {
            FetchOutcome::Diverging(eo) => Ok(FetchData::Diverging(eo)),
            FetchOutcome::Read { high_watermark } => {
                let below = l.log_end_offset();
                match read_batches(&rep.log, fetch.fetch_offset, below) {
                    Ok(bytes) => Ok(FetchData::Records {
                        bytes,
                        high_watermark,
                    }),
                    Err(e) => {
                        self.violation(format!(
                            "node {id} partition {partition}: leader read: {e}"
                        ));
                        Err(ReplicationError::NotLeaderOrFollower(id))
                    }
                }
            }
        }
    }

    fn follower_fetch_reply(
        &mut self,
        id: i32,
        partition: i32,
        fetch_id: u64,
        result: Result<FetchData, ReplicationError>,
    ) {
        let now = self.now;
        let bug = self.cfg.planted_bug;
        let mut errors = Vec::new();
        let mut refetch = false;
        let mut flush = false;
        let mut truncated = false;
        let mut fetch_error = false;
        let mut diverging = false;
        {
            let Some(rep) = self
                .broker_mut(id)
                .and_then(|b| b.replicas.get_mut(&partition))
            else {
                return;
            };
            if !matches!(rep.fetch, FetchState::InFlight { id: f, .. } if f == fetch_id)
                || !matches!(rep.role, Role::Follower { .. })
            {
                return;
            }
            rep.fetch = FetchState::Idle;
            match result {
                Ok(FetchData::Diverging(eo)) => {
                    diverging = true;
                    let leo = rep.log.log_end_offset();
                    let hw = rep.high_watermark.min(leo);
                    let t = follower_truncation(rep.log.leader_epochs(), leo, hw, eo);
                    if std::env::var_os("SIM_DEBUG_DIVERGE").is_some() {
                        eprintln!(
                            "t={now} node {id} p{partition}: diverging {eo:?}, leo {leo}, hw {hw}, \
                             epochs {:?} -> {t:?}",
                            rep.log.leader_epochs().entries()
                        );
                    }
                    match rep.log.truncate_to(t.offset) {
                        Ok(removed) => {
                            truncated = removed;
                            rep.high_watermark = rep.high_watermark.min(rep.log.log_end_offset());
                            refetch = true;
                        }
                        Err(e) => errors.push(format!("truncate_to {}: {e}", t.offset)),
                    }
                }
                Ok(FetchData::Records {
                    bytes,
                    high_watermark,
                }) => {
                    if bytes.is_empty() {
                        let leo = rep.log.log_end_offset();
                        rep.high_watermark = follower_high_watermark(high_watermark, leo)
                            .max(rep.high_watermark.min(leo));
                    } else {
                        match rep.log.append_as_follower(&bytes, now as i64) {
                            Ok(_) => {
                                let leo = rep.log.log_end_offset();
                                rep.high_watermark = follower_high_watermark(high_watermark, leo);
                                flush = true;
                                if bug == Some(PlantedBug::FollowerAcksUnflushed) {
                                    refetch = true;
                                } else {
                                    rep.fetch = FetchState::WaitFlush;
                                }
                            }
                            Err(e) => errors.push(format!("append_as_follower: {e}")),
                        }
                    }
                }
                // Fenced / unknown epoch / not leader: the next tick retries.
                Err(_) => fetch_error = true,
            }
        }
        self.stats.follower_fetch_errors += u64::from(fetch_error);
        self.stats.diverging_epochs += u64::from(diverging);
        if truncated {
            self.stats.truncations += 1;
            let leo = self
                .broker(id)
                .and_then(|b| b.replicas.get(&partition))
                .map(|r| r.log.log_end_offset());
            if let (Some(leo), Some(n)) = (leo, self.nodes.get_mut(&id)) {
                // truncate_to is durable (fsynced); the synced offset follows it down.
                let s = n.disk.synced.entry(partition).or_insert(0);
                *s = (*s).min(leo);
            }
        }
        for e in errors {
            self.violation(format!("node {id} partition {partition}: {e}"));
        }
        if flush {
            self.schedule_flush(id);
        }
        if refetch {
            self.send_fetch(id, partition);
        }
    }

    fn complete_produces(&mut self, id: i32, partition: i32) {
        let now = self.now;
        let mut answers = Vec::new();
        {
            let Some(rep) = self
                .broker_mut(id)
                .and_then(|b| b.replicas.get_mut(&partition))
            else {
                return;
            };
            let Role::Leader(l) = &mut rep.role else {
                return;
            };
            let done: Vec<ProduceCompletion> = l.poll_produces(now);
            for c in done {
                let Some(pp) = rep.produces.remove(&c.token) else {
                    continue;
                };
                let result = match c.result {
                    Ok(()) => Ok(pp.base_offset),
                    Err(ReplicationError::NotEnoughReplicasAfterAppend { .. }) => {
                        Err(NOT_ENOUGH_REPLICAS_AFTER_APPEND)
                    }
                    Err(ReplicationError::NotLeaderOrFollower(_)) => Err(NOT_LEADER_OR_FOLLOWER),
                    Err(_) => Err(REQUEST_TIMED_OUT),
                };
                answers.push((pp.client, pp.id, result));
            }
        }
        let me = self.node_endpoint(id);
        for (client, req, result) in answers {
            self.send(
                me,
                client,
                Msg::ProduceReply {
                    id: req,
                    partition,
                    result,
                },
            );
        }
    }

    fn produce(&mut self, id: i32, client: Endpoint, req: u64, partition: i32, value: i64) {
        let now = self.now;
        let result: Result<(), i16> = (|| {
            let b = self.broker_mut(id).ok_or(NOT_LEADER_OR_FOLLOWER)?;
            b.next_token += 1;
            let token = b.next_token;
            let rep = b
                .replicas
                .get_mut(&partition)
                .ok_or(NOT_LEADER_OR_FOLLOWER)?;
            let Role::Leader(l) = &rep.role else {
                return Err(NOT_LEADER_OR_FOLLOWER);
            };
            l.check_acks_all().map_err(|_| NOT_ENOUGH_REPLICAS)?;
            let epoch = l.leader_epoch();
            let info = rep
                .log
                .append(&value_batch(value, now), epoch, now as i64)
                .map_err(|_| KAFKA_STORAGE_ERROR)?;
            rep.produces.insert(
                token,
                PendingProduce {
                    client,
                    id: req,
                    base_offset: info.base_offset,
                    required_offset: info.last_offset + 1,
                },
            );
            rep.unflushed.push(token);
            Ok(())
        })();
        match result {
            Ok(()) => self.schedule_flush(id),
            Err(code) => {
                let me = self.node_endpoint(id);
                self.send(
                    me,
                    client,
                    Msg::ProduceReply {
                        id: req,
                        partition,
                        result: Err(code),
                    },
                );
            }
        }
    }

    fn consumer_fetch(
        &mut self,
        id: i32,
        partition: i32,
        offset: i64,
    ) -> Result<ConsumerData, i16> {
        let rep = self
            .broker(id)
            .and_then(|b| b.replicas.get(&partition))
            .ok_or(NOT_LEADER_OR_FOLLOWER)?;
        let Role::Leader(l) = &rep.role else {
            return Err(NOT_LEADER_OR_FOLLOWER);
        };
        let high_watermark = l.high_watermark();
        let log_end_offset = l.log_end_offset();
        if offset > log_end_offset || offset < rep.log.log_start_offset() {
            return Err(OFFSET_OUT_OF_RANGE);
        }
        let visible = if self.cfg.planted_bug == Some(PlantedBug::ReadPastHighWatermark) {
            rep.log.log_end_offset()
        } else {
            high_watermark
        };
        let bytes = match read_batches(&rep.log, offset, visible) {
            Ok(b) => b,
            Err(e) => {
                self.violation(format!(
                    "node {id} partition {partition}: consumer read: {e}"
                ));
                return Err(KAFKA_STORAGE_ERROR);
            }
        };
        match decode_values(&bytes, offset, visible) {
            Ok(records) => Ok(ConsumerData {
                records,
                high_watermark,
                log_end_offset,
            }),
            Err(e) => {
                self.violation(format!("node {id} partition {partition}: decode: {e}"));
                Err(KAFKA_STORAGE_ERROR)
            }
        }
    }

    // ---- clients ----

    fn random_node(&mut self) -> i32 {
        NODES.get(self.rng.index(NODES.len())).copied().unwrap_or(1)
    }

    fn client_tick(&mut self, process: i64) {
        if let Some(i) = self.producers.iter().position(|p| p.process == process) {
            self.producer_tick(i);
        } else if let Some(i) = self.consumers.iter().position(|c| c.process == process) {
            self.consumer_tick(i, false);
        } else if process == FINAL_READER_PROCESS {
            self.consumer_tick(usize::MAX, true);
        }
    }

    fn producer_tick(&mut self, i: usize) {
        if !self.producing {
            return;
        }
        let Some(p) = self.producers.get(i) else {
            return;
        };
        if p.in_flight.is_some() {
            return;
        }
        let process = p.process;
        let partition = self.rng.index(PARTITIONS as usize) as i32;
        let leader = self
            .producers
            .get(i)
            .and_then(|p| p.leaders.get(&partition).copied())
            .filter(|&l| l >= 0);
        let target = match leader {
            Some(l) => l,
            None => {
                self.client_metadata(process);
                let at = self.now + self.rng.range(20, 60);
                self.schedule(at, EventKind::ClientTick(process));
                return;
            }
        };
        self.next_value += 1;
        let value = self.next_value;
        let req = self.next_request_id();
        if let Some(p) = self.producers.get_mut(i) {
            p.in_flight = Some((req, value, partition));
        }
        let mut op = self.op(OpType::Invoke, OpFunction::Send, process);
        op.value = Some(Value::Int(value));
        op.partition = Some(partition);
        self.record(op);
        let to = self.node_endpoint(target);
        self.send(
            Self::client_endpoint(process),
            to,
            Msg::Produce {
                id: req,
                partition,
                value,
            },
        );
        self.schedule(
            self.now + CLIENT_REQUEST_TIMEOUT_MS,
            EventKind::ClientTimeout { process, id: req },
        );
    }

    fn client_metadata(&mut self, process: i64) {
        let node = self.random_node();
        let to = self.node_endpoint(node);
        self.send(Self::client_endpoint(process), to, Msg::Metadata);
    }

    fn consumer_mut(&mut self, i: usize, final_reader: bool) -> Option<&mut Consumer> {
        if final_reader {
            self.final_reader.as_mut()
        } else {
            self.consumers.get_mut(i)
        }
    }

    fn consumer_tick(&mut self, i: usize, final_reader: bool) {
        if self.finished {
            return;
        }
        let Some(c) = self.consumer_mut(i, final_reader) else {
            return;
        };
        let process = c.process;
        let mut sends = Vec::new();
        let mut need_metadata = false;
        for partition in 0..PARTITIONS {
            if c.in_flight.contains_key(&partition) || c.done.contains(&partition) {
                continue;
            }
            match c.leaders.get(&partition).copied().filter(|&l| l >= 0) {
                Some(l) => sends.push((
                    partition,
                    l,
                    c.position.get(&partition).copied().unwrap_or(0),
                )),
                None => need_metadata = true,
            }
        }
        for (partition, leader, offset) in sends {
            let req = self.next_request_id();
            if let Some(c) = self.consumer_mut(i, final_reader) {
                c.in_flight.insert(partition, req);
            }
            let to = self.node_endpoint(leader);
            self.send(
                Self::client_endpoint(process),
                to,
                Msg::ConsumerFetch {
                    id: req,
                    partition,
                    offset,
                },
            );
            self.schedule(
                self.now + CONSUMER_FETCH_TIMEOUT_MS,
                EventKind::ClientTimeout { process, id: req },
            );
        }
        if need_metadata {
            self.client_metadata(process);
        }
        let at = self.now + self.rng.range(20, 60);
        self.schedule(at, EventKind::ClientTick(process));
    }

    fn client_timeout(&mut self, process: i64, id: u64) {
        if let Some(p) = self.producers.iter_mut().find(|p| p.process == process) {
            if let Some((req, value, partition)) = p.in_flight {
                if req == id {
                    p.in_flight = None;
                    p.leaders.clear();
                    let mut op = self.op(OpType::Info, OpFunction::Send, process);
                    op.value = Some(Value::Int(value));
                    op.partition = Some(partition);
                    op.error = Some("client timeout".into());
                    self.record(op);
                    self.client_metadata(process);
                    let at = self.now + self.rng.range(5, 30);
                    self.schedule(at, EventKind::ClientTick(process));
                }
            }
            return;
        }
        let final_reader = process == FINAL_READER_PROCESS;
        let i = self
            .consumers
            .iter()
            .position(|c| c.process == process)
            .unwrap_or(usize::MAX);
        if let Some(c) = self.consumer_mut(i, final_reader) {
            let stale: Vec<i32> = c
                .in_flight
                .iter()
                .filter(|(_, r)| **r == id)
                .map(|(p, _)| *p)
                .collect();
            for p in stale {
                c.in_flight.remove(&p);
                c.leaders.remove(&p);
            }
        }
    }

    fn client_message(&mut self, process: i64, _from: Endpoint, msg: Msg) {
        match msg {
            Msg::MetadataReply { leaders } => {
                if let Some(p) = self.producers.iter_mut().find(|p| p.process == process) {
                    p.leaders = leaders;
                } else if let Some(c) = self.consumers.iter_mut().find(|c| c.process == process) {
                    c.leaders = leaders;
                } else if let Some(c) = self.final_reader.as_mut().filter(|c| c.process == process)
                {
                    c.leaders = leaders;
                }
            }
            Msg::ProduceReply {
                id,
                partition,
                result,
            } => {
                let Some(p) = self.producers.iter_mut().find(|p| p.process == process) else {
                    return;
                };
                let Some((req, value, aimed)) = p.in_flight else {
                    return;
                };
                if req != id {
                    return;
                }
                p.in_flight = None;
                if result.is_err() {
                    p.leaders.clear();
                }
                let (op_type, offset, error) = match result {
                    Ok(offset) => (OpType::Ok, Some(offset), None),
                    // Refused before the append: the write certainly did not happen.
                    Err(NOT_ENOUGH_REPLICAS) => {
                        (OpType::Fail, None, Some("NOT_ENOUGH_REPLICAS".to_string()))
                    }
                    // Anything else may have been appended (and may yet be committed).
                    Err(code) => (OpType::Info, None, Some(format!("error code {code}"))),
                };
                let mut op = self.op(op_type, OpFunction::Send, process);
                op.value = Some(Value::Int(value));
                op.partition = Some(if op_type == OpType::Ok {
                    partition
                } else {
                    aimed
                });
                op.offset = offset;
                op.error = error;
                self.record(op);
                self.trace(&["send", &value.to_string(), &format!("{result:?}")]);
                if result.is_err() {
                    self.client_metadata(process);
                }
                let at = self.now + self.rng.range(2, 25);
                self.schedule(at, EventKind::ClientTick(process));
            }
            Msg::ConsumerFetchReply {
                id,
                partition,
                result,
            } => {
                let final_reader = process == FINAL_READER_PROCESS;
                let i = self
                    .consumers
                    .iter()
                    .position(|c| c.process == process)
                    .unwrap_or(usize::MAX);
                let Some(c) = self.consumer_mut(i, final_reader) else {
                    return;
                };
                if c.in_flight.get(&partition) != Some(&id) {
                    return;
                }
                c.in_flight.remove(&partition);
                match result {
                    Ok(data) => {
                        if let Some((last, _)) = data.records.last() {
                            c.position.insert(partition, last + 1);
                        }
                        let position = c.position.get(&partition).copied().unwrap_or(0);
                        if final_reader
                            && position >= data.high_watermark
                            && data.high_watermark == data.log_end_offset
                        {
                            c.done.insert(partition);
                        }
                        let done = final_reader && c.done.len() == PARTITIONS as usize;
                        if !data.records.is_empty() {
                            let f = if final_reader {
                                OpFunction::FinalRead
                            } else {
                                OpFunction::Poll
                            };
                            let mut op = self.op(OpType::Ok, f, process);
                            op.records = data
                                .records
                                .iter()
                                .map(|&(offset, value)| ReadRecord {
                                    topic: TOPIC.to_string(),
                                    partition,
                                    offset,
                                    value: Value::Int(value),
                                })
                                .collect();
                            self.record(op);
                        }
                        if done {
                            self.finished = true;
                            self.check_replicas_agree();
                        }
                    }
                    Err(_) => {
                        c.leaders.remove(&partition);
                    }
                }
            }
            _ => {}
        }
    }

    fn final_read_start(&mut self) {
        self.final_reader = Some(Consumer::new(FINAL_READER_PROCESS));
        self.schedule(self.now, EventKind::ClientTick(FINAL_READER_PROCESS));
    }

    // ---- faults ----

    fn fault_start(&mut self) {
        let heal_at = self.cfg.faults_start_ms + self.cfg.faults_ms;
        if self.now >= heal_at {
            return;
        }
        if self.active_faults.len() < self.cfg.concurrent_faults_max {
            if let Some(f) = self.pick_fault() {
                self.inject(f);
                let hold = match f {
                    Fault::Pause(_) => self.rng.range(200, 2_500),
                    Fault::Crash(_) | Fault::CrashAll => self.rng.range(100, 3_000),
                    _ => self.rng.range(300, 4_000),
                };
                let end = (self.now + hold).min(heal_at);
                self.schedule(end, EventKind::FaultEnd(f));
            }
        }
        let next = self.now + self.rng.range(300, 2_000);
        self.schedule(next, EventKind::FaultStart);
    }

    fn pick_fault(&mut self) -> Option<Fault> {
        for _ in 0..8 {
            let a = self.random_node();
            let mut b = self.random_node();
            if b == a {
                b = NODES.iter().copied().find(|&n| n != a).unwrap_or(a);
            }
            // The leader of a partition or the controller host, half the time.
            let target = match self.rng.index(3) {
                0 => self.ctl.node,
                1 => {
                    let p = self.rng.index(PARTITIONS as usize) as i32;
                    self.broker(a)
                        .and_then(|br| br.image.topic(TOPIC))
                        .and_then(|t| t.partitions.get(&p))
                        .map_or(a, |pi| if pi.leader > 0 { pi.leader } else { a })
                }
                _ => a,
            };
            let f = match self.rng.index(12) {
                11 => Fault::Cut(target, if target == b { a } else { b }),
                0 | 5 => Fault::Crash(target),
                6 if self.active_faults.is_empty() => Fault::CrashAll,
                6 | 7 => Fault::Isolate(target),
                8 => Fault::Pause(target),
                9 => Fault::OneWay(target, if target == b { a } else { b }),
                1 => Fault::Pause(target),
                2 => Fault::Isolate(target),
                3 => Fault::OneWay(target, if target == b { a } else { b }),
                _ => Fault::Slow(a, b),
            };
            let busy = |n: i32| {
                self.active_faults.iter().any(|g| match g {
                    Fault::Crash(x) | Fault::Pause(x) | Fault::Isolate(x) => *x == n,
                    Fault::CrashAll => true,
                    Fault::OneWay(x, y) | Fault::Cut(x, y) | Fault::Slow(x, y) => {
                        *x == n || *y == n
                    }
                })
            };
            let ok = match f {
                Fault::Crash(n) | Fault::Pause(n) | Fault::Isolate(n) => !busy(n) && self.is_up(n),
                Fault::CrashAll => self.active_faults.is_empty(),
                Fault::OneWay(x, y) | Fault::Cut(x, y) | Fault::Slow(x, y) => {
                    x != y && !busy(x) && !busy(y)
                }
            };
            if ok {
                return Some(f);
            }
        }
        None
    }

    fn block(&mut self, a: i32, b: i32) {
        *self.blocked.entry((a, b)).or_insert(0) += 1;
    }

    fn unblock(&mut self, a: i32, b: i32) {
        if let Some(c) = self.blocked.get_mut(&(a, b)) {
            *c -= 1;
            if *c == 0 {
                self.blocked.remove(&(a, b));
            }
        }
    }

    fn inject(&mut self, f: Fault) {
        *self.stats.faults.entry(f.kind().to_string()).or_insert(0) += 1;
        let mut op = self.op(OpType::Info, OpFunction::Fault, -1);
        op.error = Some(f.describe());
        self.record(op);
        self.trace(&["fault", &f.describe()]);
        self.active_faults.push(f);
        match f {
            Fault::Crash(n) => self.crash_node(n),
            Fault::CrashAll => {
                for n in NODES {
                    self.crash_node(n);
                }
            }
            Fault::Pause(n) => {
                if let Some(node) = self.nodes.get_mut(&n) {
                    node.paused_until = u64::MAX;
                }
            }
            Fault::Isolate(n) => {
                for o in NODES {
                    if o != n {
                        self.block(n, o);
                        self.block(o, n);
                    }
                }
            }
            Fault::OneWay(a, b) => self.block(a, b),
            Fault::Cut(a, b) => {
                self.block(a, b);
                self.block(b, a);
            }
            Fault::Slow(a, b) => {
                *self.slow.entry((a.min(b), a.max(b))).or_insert(0) += 1;
            }
        }
    }

    fn fault_end(&mut self, f: Fault) {
        let Some(i) = self.active_faults.iter().position(|g| *g == f) else {
            return;
        };
        self.active_faults.remove(i);
        let mut op = self.op(OpType::Info, OpFunction::Fault, -1);
        op.error = Some(format!("heal: {}", f.describe()));
        self.record(op);
        self.trace(&["heal", &f.describe()]);
        match f {
            Fault::Crash(n) => self.start_node(n),
            Fault::CrashAll => {
                for n in NODES {
                    self.start_node(n);
                }
            }
            Fault::Pause(n) => {
                if let Some(node) = self.nodes.get_mut(&n) {
                    if node.paused_until == u64::MAX {
                        node.paused_until = self.now;
                    }
                }
                // Deferred events were scheduled at u64::MAX; move them to now.
                let deferred: Vec<(u64, u64)> =
                    self.queue.range((u64::MAX, 0)..).map(|(k, _)| *k).collect();
                for k in deferred {
                    if let Some(ev) = self.queue.remove(&k) {
                        self.schedule(self.now, ev);
                    }
                }
            }
            Fault::Isolate(n) => {
                for o in NODES {
                    if o != n {
                        self.unblock(n, o);
                        self.unblock(o, n);
                    }
                }
            }
            Fault::OneWay(a, b) => self.unblock(a, b),
            Fault::Cut(a, b) => {
                self.unblock(a, b);
                self.unblock(b, a);
            }
            Fault::Slow(a, b) => {
                let k = (a.min(b), a.max(b));
                if let Some(c) = self.slow.get_mut(&k) {
                    *c -= 1;
                    if *c == 0 {
                        self.slow.remove(&k);
                    }
                }
            }
        }
    }

    fn heal_all(&mut self) {
        self.producing = false;
        for f in self.active_faults.clone() {
            self.fault_end(f);
        }
        let mut op = self.op(OpType::Info, OpFunction::Fault, -1);
        op.error = Some("heal all".into());
        self.record(op);
    }

    /// After the final read: every ISR member holds exactly the leader's records below
    /// the high watermark (a check on the logs themselves, beyond what clients saw).
    fn check_replicas_agree(&mut self) {
        let mut problems = Vec::new();
        for partition in 0..PARTITIONS {
            let Some((leader, isr, hw)) = NODES.iter().find_map(|&n| {
                let rep = self.broker(n)?.replicas.get(&partition)?;
                match &rep.role {
                    Role::Leader(l) => Some((n, l.isr().to_vec(), l.high_watermark())),
                    _ => None,
                }
            }) else {
                continue; // leadership in transit at this instant: nothing to compare with
            };
            let read = |n: i32| -> Result<Vec<(i64, i64)>, String> {
                let rep = self
                    .broker(n)
                    .and_then(|b| b.replicas.get(&partition))
                    .ok_or_else(|| format!("node {n} hosts no replica"))?;
                let mut out = Vec::new();
                let mut next = 0;
                while next < hw {
                    let bytes = read_batches(&rep.log, next, hw)?;
                    let values = decode_values(&bytes, next, hw)?;
                    let Some(&(last, _)) = values.last() else {
                        return Err(format!("node {n}: nothing readable at offset {next}"));
                    };
                    next = last + 1;
                    out.extend(values);
                }
                Ok(out)
            };
            if isr.len() < NODES.len() && std::env::var_os("SIM_DEBUG_ISR").is_some() {
                eprintln!(
                    "seed {} partition {partition}: ISR {isr:?} at the end",
                    self.cfg.seed
                );
            }
            let theirs = match read(leader) {
                Ok(v) => v,
                Err(e) => {
                    problems.push(format!("partition {partition} leader {leader}: {e}"));
                    continue;
                }
            };
            for n in isr.iter().copied().filter(|&n| n != leader) {
                match read(n) {
                    Ok(v) if v == theirs => {}
                    Ok(v) => problems.push(format!(
                        "partition {partition}: ISR member {n} differs from leader {leader} below \
                         the high watermark {hw} ({} vs {} records)",
                        v.len(),
                        theirs.len()
                    )),
                    Err(e) => problems.push(format!("partition {partition} replica {n}: {e}")),
                }
            }
        }
        for p in problems {
            self.violation(p);
        }
    }

    fn finish(mut self) -> SimResult {
        let report = ferrite_check::check(&self.history);
        let mut lines = String::new();
        for op in &self.history {
            if let Ok(s) = serde_json::to_string(op) {
                lines.push_str(&s);
                lines.push('\n');
            }
        }
        self.trace = fnv(self.trace, lines.as_bytes());
        SimResult {
            seed: self.cfg.seed,
            trace_hash: self.trace,
            report,
            violations: std::mem::take(&mut self.violations),
            stats: std::mem::take(&mut self.stats),
            history: self.cfg.keep_history.then_some(lines),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_a_batch() {
        let b = value_batch(-42, 7);
        assert_eq!(decode_values(&b, 0, i64::MAX), Ok(vec![(0, -42)]));
        assert_eq!(decode_values(&b, 1, i64::MAX), Ok(vec![]));
    }
}
