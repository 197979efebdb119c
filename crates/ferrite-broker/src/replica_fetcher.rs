//! Replica fetchers: the follower side of replication (Kafka's ReplicaFetcherThread).
//!
//! [`run`] watches the partitions this broker follows (`ReplicaManager::subscribe_followed`,
//! changed by every applied metadata image) and keeps one fetcher task per source broker
//! and fetcher index (`num.replica.fetchers`; a partition's index is a hash of its name),
//! each batching every partition it follows there into one Fetch.
//!
//! A partition that starts being followed, or whose leader epoch changed, is truncated
//! first (KIP-101, KIP-279): OffsetForLeaderEpoch for the epoch of its last record, then
//! `ferrite_replication::follower_truncation` says where to cut, repeated while the
//! leader's answer names an epoch this replica does not have. Then it is fetched with its
//! leader epoch (`CurrentLeaderEpoch`), its log end offset and `LastFetchedEpoch`; the
//! leader's batches are appended byte for byte (`PartitionLog::append_as_follower`), and a
//! `DivergingEpoch` answer truncates again (KIP-320).
//!
//! The socket to the leader is bound to this broker's own listen address (so that
//! firewall rules on loopback aliases can cut brokers apart), every request has a
//! timeout, and a failed connection is re-made after `replica.fetch.backoff.ms`.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferrite_replication::{follower_truncation, EpochEndOffset};
use ferrite_storage::BatchIter;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic, ReplicaState};
use kafka_protocol::messages::offset_for_leader_epoch_request::{
    OffsetForLeaderPartition, OffsetForLeaderTopic,
};
use kafka_protocol::messages::{
    ApiKey, BrokerId, FetchRequest, FetchResponse, OffsetForLeaderEpochRequest,
    OffsetForLeaderEpochResponse,
};
use kafka_protocol::protocol::{Decodable, Encodable};
use kafka_protocol::ResponseError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::replica_manager::{FollowedPartition, Partition, TopicPartition};
use crate::{now_ms, Broker};

/// Fetch v15: topic ids (KIP-516) and `ReplicaState` with the broker epoch (KIP-903).
const FETCH_VERSION: i16 = 15;
/// OffsetForLeaderEpoch v4 (flexible; CurrentLeaderEpoch since v3, KIP-320).
const OFFSET_FOR_LEADER_EPOCH_VERSION: i16 = 4;
/// Kafka's `replica.socket.timeout.ms` default: the longest a request to the leader may
/// take beyond the fetch's own wait.
pub const REPLICA_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// A response frame larger than this from a leader is refused (the fetch asks for at
/// most `replica.fetch.response.max.bytes`; a first batch may exceed it, KIP-74).
pub const REPLICA_RESPONSE_FRAME_BYTES_MAX: usize = 256 * 1024 * 1024;
/// OffsetForLeaderEpoch rounds for one truncation at most: each round moves to an older
/// epoch of this replica's history (KIP-279), so more is a leader answering nonsense.
pub const TRUNCATION_ROUNDS_MAX: usize = 64;

/// Keeps one fetcher task per (source broker, fetcher index) for the partitions this
/// broker follows. Returns when the replica manager is dropped.
pub async fn run(broker: Arc<Broker>) {
    let mut followed = broker.replicas.subscribe_followed();
    type Group = HashMap<TopicPartition, FollowedPartition>;
    let mut fetchers: HashMap<(i32, usize), watch::Sender<Group>> = HashMap::new();
    loop {
        let current = followed.borrow_and_update().clone();
        let n = broker.config.replication.num_replica_fetchers.max(1);
        let mut groups: HashMap<(i32, usize), Group> = HashMap::new();
        for (tp, f) in current {
            let index = fetcher_index(&tp, n);
            groups.entry((f.leader, index)).or_default().insert(tp, f);
        }
        // A fetcher left with nothing stops when its sender is dropped.
        fetchers.retain(|key, tx| match groups.remove(key) {
            Some(group) => {
                tx.send_if_modified(|g| {
                    let changed = *g != group;
                    *g = group;
                    changed
                });
                true
            }
            None => false,
        });
        for (key, group) in groups {
            tracing::info!(
                leader = key.0,
                fetcher = key.1,
                partitions = group.len(),
                "starting a replica fetcher"
            );
            let (tx, rx) = watch::channel(group);
            tokio::spawn(fetch_from(broker.clone(), key.0, rx));
            fetchers.insert(key, tx);
        }
        if followed.changed().await.is_err() {
            return;
        }
    }
}

fn fetcher_index(tp: &TopicPartition, n: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    tp.hash(&mut h);
    (h.finish() % n as u64) as usize
}

/// One partition as this fetcher knows it.
struct Fetched {
    partition: Arc<Partition>,
    followed: FollowedPartition,
    /// Truncated for `followed.leader_epoch`: may fetch.
    truncated: bool,
    /// Not fetched before this (an error the leader or the metadata must resolve).
    delayed_until: Option<Instant>,
}

/// The fetcher task for source broker `leader`: runs until `partitions`' sender is
/// dropped.
async fn fetch_from(
    broker: Arc<Broker>,
    leader: i32,
    mut partitions: watch::Receiver<HashMap<TopicPartition, FollowedPartition>>,
) {
    let backoff = Duration::from_millis(broker.config.replication.replica_fetch_backoff_ms);
    let mut conn: Option<Connection> = None;
    let mut state: HashMap<TopicPartition, Fetched> = HashMap::new();
    loop {
        if partitions.has_changed().is_err() {
            return; // The manager dropped this fetcher.
        }
        let wanted = partitions.borrow_and_update().clone();
        // A new leader or epoch starts the partition over (truncation first); the
        // throttle flag alone (a reassignment completing) does not.
        state.retain(|tp, f| match wanted.get(tp) {
            Some(w)
                if (w.leader, w.leader_epoch, w.topic_id)
                    == (
                        f.followed.leader,
                        f.followed.leader_epoch,
                        f.followed.topic_id,
                    ) =>
            {
                f.followed.throttled = w.throttled;
                true
            }
            _ => false,
        });
        for (tp, f) in &wanted {
            if state.contains_key(tp) {
                continue;
            }
            let Some(p) = broker.replicas.get(&tp.0, tp.1) else {
                continue;
            };
            state.insert(
                tp.clone(),
                Fetched {
                    partition: p,
                    followed: *f,
                    truncated: false,
                    delayed_until: None,
                },
            );
        }
        if state.is_empty() {
            if partitions.changed().await.is_err() {
                return;
            }
            continue;
        }
        let mut c = match conn.take() {
            Some(c) => c,
            None => match Connection::open(&broker, leader).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(leader, error = %e, "cannot connect to the leader; retrying after replica.fetch.backoff.ms");
                    pause(&mut partitions, backoff).await;
                    continue;
                }
            },
        };
        let result = async {
            truncate(&broker, &mut c, &mut state).await?;
            fetch_once(&broker, &mut c, &mut state, backoff).await
        }
        .await;
        match result {
            Ok(fetched_any) => {
                conn = Some(c);
                if !fetched_any {
                    // Every partition waits for something (an error to clear): no busy loop.
                    pause(&mut partitions, backoff).await;
                }
            }
            Err(e) => {
                tracing::warn!(leader, error = %e, "replica fetch failed; reconnecting after replica.fetch.backoff.ms");
                pause(&mut partitions, backoff).await;
            }
        }
    }
}

/// Sleeps `backoff` or until the followed partitions change.
async fn pause(
    partitions: &mut watch::Receiver<HashMap<TopicPartition, FollowedPartition>>,
    backoff: Duration,
) {
    let _ = tokio::time::timeout(backoff, partitions.changed()).await;
}

/// Truncates every partition not yet truncated for its leader epoch (KIP-101, KIP-279).
async fn truncate(
    broker: &Arc<Broker>,
    c: &mut Connection,
    state: &mut HashMap<TopicPartition, Fetched>,
) -> Result<(), FetchError> {
    for _ in 0..TRUNCATION_ROUNDS_MAX {
        let mut topics: HashMap<Arc<str>, Vec<OffsetForLeaderPartition>> = HashMap::new();
        for (tp, f) in state.iter_mut() {
            if f.truncated || f.delayed_until.is_some_and(|t| t > Instant::now()) {
                continue;
            }
            let (_, leo, last_epoch) = f.partition.follower_position();
            let Some(last_epoch) = last_epoch else {
                // No epoch history: nothing known to keep beyond the high watermark,
                // which is committed and therefore on the leader (Kafka's rule).
                let Some(_follower) = f.partition.follower_of(f.followed.leader_epoch) else {
                    f.delayed_until = Some(
                        Instant::now()
                            + Duration::from_millis(
                                broker.config.replication.replica_fetch_backoff_ms,
                            ),
                    );
                    continue;
                };
                let hw = f.partition.high_watermark().min(leo);
                f.partition.truncate_to(hw)?;
                f.truncated = true;
                continue;
            };
            topics.entry(tp.0.clone()).or_default().push(
                OffsetForLeaderPartition::default()
                    .with_partition(tp.1)
                    .with_current_leader_epoch(f.followed.leader_epoch)
                    .with_leader_epoch(last_epoch),
            );
        }
        if topics.is_empty() {
            return Ok(());
        }
        let req = OffsetForLeaderEpochRequest::default()
            .with_replica_id(BrokerId(broker.config.node_id))
            .with_topics(
                topics
                    .into_iter()
                    .map(|(t, ps)| {
                        OffsetForLeaderTopic::default()
                            .with_topic(crate::handlers::topic_name(&t))
                            .with_partitions(ps)
                    })
                    .collect(),
            );
        let resp: OffsetForLeaderEpochResponse = c
            .send(
                ApiKey::OffsetForLeaderEpoch,
                OFFSET_FOR_LEADER_EPOCH_VERSION,
                &req,
                Duration::from_millis(REPLICA_REQUEST_TIMEOUT_MS),
            )
            .await?;
        for t in resp.topics {
            let name: Arc<str> = Arc::from(t.topic.0.as_str());
            for r in t.partitions {
                let Some(f) = state.get_mut(&(name.clone(), r.partition)) else {
                    continue;
                };
                if r.error_code != 0 {
                    tracing::info!(topic = %name, partition = r.partition, code = r.error_code, "OffsetForLeaderEpoch refused; retrying after replica.fetch.backoff.ms");
                    f.delayed_until = Some(
                        Instant::now()
                            + Duration::from_millis(
                                broker.config.replication.replica_fetch_backoff_ms,
                            ),
                    );
                    continue;
                }
                let leader_answer = EpochEndOffset {
                    leader_epoch: r.leader_epoch,
                    end_offset: r.end_offset,
                };
                let partition = f.partition.clone();
                let Some(_follower) = partition.follower_of(f.followed.leader_epoch) else {
                    f.delayed_until = Some(
                        Instant::now()
                            + Duration::from_millis(
                                broker.config.replication.replica_fetch_backoff_ms,
                            ),
                    );
                    continue;
                };
                apply_truncation(f, leader_answer)?;
            }
        }
    }
    Err(FetchError::Protocol(format!(
        "truncation did not settle in {TRUNCATION_ROUNDS_MAX} rounds"
    )))
}

/// Cuts the log where the leader's answer (OffsetForLeaderEpoch or `DivergingEpoch`)
/// says, and marks the partition ready to fetch if the cut is final.
fn apply_truncation(f: &mut Fetched, leader_answer: EpochEndOffset) -> Result<(), FetchError> {
    let t = {
        let log = f.partition.log();
        let leo = log.log_end_offset();
        let hw = f.partition.high_watermark().min(leo);
        follower_truncation(log.leader_epochs(), leo, hw, leader_answer)
    };
    if f.partition.truncate_to(t.offset)? {
        tracing::info!(topic = %f.partition.topic, partition = f.partition.index, offset = t.offset, leader_epoch = leader_answer.leader_epoch, leader_end_offset = leader_answer.end_offset, "truncated to the leader's log");
    }
    f.truncated = t.complete;
    Ok(())
}

/// One Fetch of every ready partition. Returns whether any partition was fetched.
async fn fetch_once(
    broker: &Arc<Broker>,
    c: &mut Connection,
    state: &mut HashMap<TopicPartition, Fetched>,
    backoff: Duration,
) -> Result<bool, FetchError> {
    let settings = &broker.config.replication;
    let now = Instant::now();
    let mut topics: HashMap<uuid::Uuid, Vec<FetchPartition>> = HashMap::new();
    let mut by_id: HashMap<(uuid::Uuid, i32), TopicPartition> = HashMap::new();
    // Partitions a reassignment adds here share `follower.replication.throttled.rate`:
    // each asks for at most what is left of the budget, and none once it is spent.
    let (mut throttle_budget, throttle_wait_ms) = {
        let mut t = broker
            .follower_throttle
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now_ms = now_ms();
        (t.available(now_ms), t.wait_ms(now_ms))
    };
    for (tp, f) in state.iter_mut() {
        if !f.truncated || f.delayed_until.is_some_and(|t| t > now) {
            continue;
        }
        let mut max_bytes = settings.replica_fetch_max_bytes;
        if f.followed.throttled {
            if throttle_budget == 0 {
                f.delayed_until = Some(now + Duration::from_millis(throttle_wait_ms.max(1)));
                continue;
            }
            max_bytes = i32::try_from(throttle_budget)
                .unwrap_or(i32::MAX)
                .min(max_bytes);
            throttle_budget = throttle_budget.saturating_sub(u64::try_from(max_bytes).unwrap_or(0));
        }
        f.delayed_until = None;
        let (log_start, leo, last_epoch) = f.partition.follower_position();
        topics.entry(f.followed.topic_id).or_default().push(
            FetchPartition::default()
                .with_partition(tp.1)
                .with_current_leader_epoch(f.followed.leader_epoch)
                .with_fetch_offset(leo)
                .with_last_fetched_epoch(last_epoch.unwrap_or(-1))
                .with_log_start_offset(log_start)
                .with_partition_max_bytes(max_bytes),
        );
        by_id.insert((f.followed.topic_id, tp.1), tp.clone());
    }
    if topics.is_empty() {
        return Ok(false);
    }
    let broker_epoch = broker
        .controller
        .image()
        .broker(broker.config.node_id)
        .map_or(-1, |b| b.broker_epoch);
    let req = FetchRequest::default()
        .with_replica_state(
            ReplicaState::default()
                .with_replica_id(BrokerId(broker.config.node_id))
                .with_replica_epoch(broker_epoch),
        )
        .with_max_wait_ms(settings.replica_fetch_wait_max_ms)
        .with_min_bytes(1)
        .with_max_bytes(settings.replica_fetch_response_max_bytes)
        .with_session_id(0)
        .with_session_epoch(-1)
        .with_topics(
            topics
                .into_iter()
                .map(|(id, ps)| FetchTopic::default().with_topic_id(id).with_partitions(ps))
                .collect(),
        );
    let wait = Duration::from_millis(
        u64::try_from(settings.replica_fetch_wait_max_ms).unwrap_or(0) + REPLICA_REQUEST_TIMEOUT_MS,
    );
    let resp: FetchResponse = c.send(ApiKey::Fetch, FETCH_VERSION, &req, wait).await?;
    if resp.error_code != 0 {
        return Err(FetchError::Protocol(format!(
            "fetch refused with error code {}",
            resp.error_code
        )));
    }
    let now_wall = now_ms();
    for t in resp.responses {
        for pd in t.partitions {
            let Some(tp) = by_id.get(&(t.topic_id, pd.partition_index)) else {
                continue;
            };
            let Some(f) = state.get_mut(tp) else { continue };
            if f.followed.throttled {
                let bytes = pd.records.as_ref().map_or(0, |r| r.len());
                broker
                    .follower_throttle
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .spend(u64::try_from(bytes).unwrap_or(u64::MAX));
            }
            handle_partition(f, pd, now_wall, backoff)?;
        }
    }
    Ok(true)
}

fn handle_partition(
    f: &mut Fetched,
    pd: kafka_protocol::messages::fetch_response::PartitionData,
    now_ms: i64,
    backoff: Duration,
) -> Result<(), FetchError> {
    let p = f.partition.clone();
    let Some(_follower) = p.follower_of(f.followed.leader_epoch) else {
        // Asked under an epoch the image has left: the fetcher's state follows the new
        // image before the next fetch.
        tracing::debug!(topic = %p.topic, partition = p.index, leader_epoch = f.followed.leader_epoch, "fetch response for a leader epoch this broker no longer follows: dropped");
        return Ok(());
    };
    match pd.error_code {
        0 => {
            if pd.diverging_epoch.epoch >= 0 && pd.diverging_epoch.end_offset >= 0 {
                return apply_truncation(
                    f,
                    EpochEndOffset {
                        leader_epoch: pd.diverging_epoch.epoch,
                        end_offset: pd.diverging_epoch.end_offset,
                    },
                );
            }
            let records = pd.records.unwrap_or_default();
            let whole = whole_batches(&records);
            match p.append_as_follower(whole, pd.high_watermark, now_ms) {
                Ok(_) => Ok(()),
                Err(e) => {
                    tracing::error!(topic = %p.topic, partition = p.index, error = %e, "cannot append the leader's batches; retrying after replica.fetch.backoff.ms");
                    f.delayed_until = Some(Instant::now() + backoff);
                    // A divergence we did not detect: truncate again by epochs.
                    f.truncated = false;
                    Ok(())
                }
            }
        }
        code if code == ResponseError::OffsetOutOfRange.code() => {
            let (_, leo, _) = p.follower_position();
            if leo < pd.log_start_offset {
                // Everything we have is below the leader's log start: start there.
                p.truncate_fully_and_start_at(pd.log_start_offset)?;
            } else {
                f.truncated = false;
            }
            Ok(())
        }
        code => {
            // NOT_LEADER_OR_FOLLOWER, FENCED/UNKNOWN_LEADER_EPOCH, UNKNOWN_TOPIC...: the
            // metadata will move the partition; until then, ask again after a pause.
            tracing::debug!(topic = %p.topic, partition = p.index, code, "the leader refused a fetch");
            f.delayed_until = Some(Instant::now() + backoff);
            if code == ResponseError::FencedLeaderEpoch.code() {
                f.truncated = false;
            }
            Ok(())
        }
    }
}

/// The leading whole batches of `records` (a leader may cut the last one short).
fn whole_batches(records: &Bytes) -> &[u8] {
    let mut end = 0;
    for item in BatchIter::new(records) {
        match item {
            Ok((at, _, batch)) => end = at + batch.len(),
            Err(_) => break,
        }
    }
    records.get(..end).unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("I/O with the leader: {0}")]
    Io(#[from] std::io::Error),
    #[error("the leader's request timed out")]
    Timeout,
    #[error("{0}")]
    Protocol(String),
    #[error(transparent)]
    Storage(#[from] ferrite_storage::StorageError),
}

/// One connection to a leader, requests one at a time.
pub(crate) struct Connection {
    stream: TcpStream,
    correlation_id: i32,
}

impl Connection {
    pub(crate) async fn open(broker: &Arc<Broker>, leader: i32) -> Result<Connection, FetchError> {
        let image = broker.controller.image();
        let Some(reg) = image.broker(leader) else {
            return Err(FetchError::Protocol(format!(
                "broker {leader} is not registered"
            )));
        };
        let Some(endpoint) = reg.endpoints.first() else {
            return Err(FetchError::Protocol(format!(
                "broker {leader} has no endpoint"
            )));
        };
        let target = tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
            .await?
            .next()
            .ok_or_else(|| FetchError::Protocol(format!("cannot resolve {}", endpoint.host)))?;
        let local = broker.config.listen.ip();
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // The broker's own address, so that rules on its source address apply to it.
        if local.is_ipv4() == target.is_ipv4() {
            socket.bind(SocketAddr::new(local, 0))?;
        }
        let stream = tokio::time::timeout(
            Duration::from_millis(REPLICA_REQUEST_TIMEOUT_MS),
            socket.connect(target),
        )
        .await
        .map_err(|_| FetchError::Timeout)??;
        stream.set_nodelay(true)?;
        tracing::info!(leader, addr = %target, "connected to the leader for replication");
        Ok(Connection {
            stream,
            correlation_id: 0,
        })
    }

    pub(crate) async fn send<Req: Encodable, Resp: Decodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, FetchError> {
        tokio::time::timeout(timeout, self.send_inner(key, version, body))
            .await
            .map_err(|_| FetchError::Timeout)?
    }

    async fn send_inner<Req: Encodable, Resp: Decodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        body: &Req,
    ) -> Result<Resp, FetchError> {
        self.correlation_id = self.correlation_id.wrapping_add(1);
        let protocol = |e: ferrite_protocol::ClientFrameError| FetchError::Protocol(e.to_string());
        let buf = ferrite_protocol::encode_request(
            key,
            version,
            self.correlation_id,
            "ferrite-replica-fetcher",
            body,
        )
        .map_err(protocol)?;
        self.stream.write_all(&buf).await?;
        let mut prefix = [0u8; ferrite_protocol::FRAME_PREFIX_BYTES];
        self.stream.read_exact(&mut prefix).await?;
        let len = ferrite_protocol::response_length(prefix, REPLICA_RESPONSE_FRAME_BYTES_MAX)
            .map_err(protocol)?;
        let mut frame = vec![0u8; len];
        self.stream.read_exact(&mut frame).await?;
        let (resp, trailing) = ferrite_protocol::decode_response(
            Bytes::from(frame),
            key,
            version,
            self.correlation_id,
        )
        .map_err(protocol)?;
        if trailing > 0 {
            tracing::debug!(bytes = trailing, "trailing bytes after a response");
        }
        Ok(resp)
    }
}
