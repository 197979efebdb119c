//! Runtime around the sans-I/O `TransactionCoordinator` (ferrite-coordinator `txn`): one
//! mutex, the `__transaction_state` topic its records go to, the end-transaction
//! markers it writes, and the ticker that aborts timed-out transactions.
//!
//! State flows one way, as for groups: an operation returns records; they are appended
//! to the transactional id's `__transaction_state` partition and only then replayed into
//! the coordinator, the same `replay` as the load at start-up. A transactional id lives
//! in partition `abs(javaHash(id)) % 50` and its coordinator is that partition's leader:
//! [`TxnManager::sync_leadership`] loads the partitions led here and unloads the others,
//! at start-up and on every tick, so the coordinator moves with leadership. Loading a
//! partition resumes its PrepareCommit/PrepareAbort transactions: a coordinator killed
//! mid-commit writes the remaining markers when it comes back.
//!
//! Markers (COMMIT/ABORT control batches, Kafka's format) are written by this broker
//! into every partition of the transaction that it leads, and sent with WriteTxnMarkers
//! to the leaders of the others, before the transaction is completed (the Complete*
//! record).
//!
//! Replication, as Kafka's coordinator: every record and marker must reach the ISR
//! (acks=all). A record is appended and replayed at once (later decisions see it), but
//! nothing that depends on it happens before the high watermark passes it: no answer
//! to a client ([`finish`] waits for the id's latest record), no marker for a Prepare*
//! record (`apply` stops there and [`finish`] resumes it), no Complete* record before
//! its markers are replicated. A failover can then take back only what nobody was told.
//!
//! Lock order: this mutex, then a partition's log, then the group coordinator's mutex.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use ferrite_coordinator::txn::{
    Effect, Outcome, ProducerIdAllocator, TransactionCoordinator, TxnConfig, TxnError, TxnRecord,
    TxnResult, TRANSACTION_STATE_TOPIC,
};
use ferrite_storage::{ControlType, StorageError};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

use kafka_protocol::ResponseError;

use crate::group_manager::OFFSETS_TOPIC;
use crate::replica_manager::{Partition, ProduceError, ProduceWaiter};
use crate::{now_ms, Broker};

/// Longest the ticker sleeps between timeout checks. Kafka checks every
/// `transaction.abort.timed.out.transaction.cleanup.interval.ms` (10 s); a shorter
/// period costs one scan of the loaded transactional ids.
pub const TXN_TICK_INTERVAL_MS: u64 = 1000;
/// Bytes read at a time while loading a `__transaction_state` partition.
const LOAD_READ_BYTES_MAX: usize = 1024 * 1024;
/// Most transactions whose WriteTxnMarkers requests (markers for partitions led by other
/// brokers) are in flight at once; more wait for the ticker's retry (`markers_due`).
pub const TXN_MARKER_REQUESTS_IN_FLIGHT_MAX: usize = 256;
/// Longest an answer or a marker waits for a `__transaction_state` record or a marker to
/// reach the in-sync replicas; past it the client hears COORDINATOR_NOT_AVAILABLE
/// (retriable) and the ticker retries the markers.
pub const TXN_REPLICATION_TIMEOUT_MS: i64 = 5_000;
/// Longest a partition leader waits for another broker's coordinator to answer a
/// transaction verification (KIP-890 part 1); past it the produce gets a retriable
/// error.
pub const TXN_VERIFY_TIMEOUT_MS: u64 = 5_000;
/// Idle connections kept per broker for transaction verifications and markers.
pub const TXN_BROKER_CONNECTIONS_IDLE_MAX: usize = 4;

/// The producer id InitProducerId claimed (asynchronously, through the metadata log)
/// before it takes the coordinator's lock; the coordinator takes it if it needs one.
#[derive(Debug, Default)]
pub struct ClaimedId(pub Option<i64>);

impl ProducerIdAllocator for ClaimedId {
    fn next_producer_id(&mut self) -> Result<i64, TxnError> {
        // Without a claimed id the request is retried (COORDINATOR_NOT_AVAILABLE).
        self.0.take().ok_or(TxnError::ResourceLimit)
    }
}

pub type Coordinator = TransactionCoordinator<ClaimedId>;

pub struct TxnManager {
    state: Mutex<Coordinator>,
    partitions: i32,
    /// Serializes the creation of `__transaction_state` on first use.
    create: tokio::sync::Mutex<()>,
    /// Transactional ids whose WriteTxnMarkers requests are in flight: at most one send
    /// per id, at most [`TXN_MARKER_REQUESTS_IN_FLIGHT_MAX`] ids.
    markers_in_flight: Mutex<HashSet<String>>,
    /// Transactional ids whose latest `__transaction_state` record may not be replicated
    /// yet: its partition and the offset after it. Dropped once the high watermark is
    /// seen past it, and with the partition when it is unloaded.
    unreplicated: Mutex<HashMap<String, (i32, i64)>>,
    /// Idle connections to other brokers for verifications and markers
    /// ([`send_to_broker`]), by broker id, at most [`TXN_BROKER_CONNECTIONS_IDLE_MAX`]
    /// each.
    broker_conns_idle: Mutex<HashMap<i32, Vec<crate::replica_fetcher::Connection>>>,
}

impl TxnManager {
    pub fn new(config: TxnConfig) -> Self {
        let partitions = config.transaction_state_partitions;
        TxnManager {
            state: Mutex::new(TransactionCoordinator::new(config, ClaimedId(None))),
            partitions,
            create: tokio::sync::Mutex::new(()),
            markers_in_flight: Mutex::new(HashSet::new()),
            unreplicated: Mutex::new(HashMap::new()),
            broker_conns_idle: Mutex::new(HashMap::new()),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Coordinator> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// Creates `__transaction_state` on first use (a transactional FindCoordinator or
    /// InitProducerId), as Kafka does, then loads what this broker leads.
    pub async fn ensure_topic(&self, broker: &Arc<Broker>) -> Result<(), String> {
        if broker
            .controller
            .image()
            .topic(TRANSACTION_STATE_TOPIC)
            .is_none()
        {
            let _creating = self.create.lock().await;
            create_topic(broker).await?;
        }
        self.sync_leadership(broker);
        Ok(())
    }

    /// Loads the `__transaction_state` partitions this broker leads and has not loaded,
    /// and forgets those it no longer leads. A loaded partition's Prepare* transactions
    /// get their markers written now.
    pub fn sync_leadership(&self, broker: &Arc<Broker>) {
        let mut st = self.lock();
        for partition in 0..self.partitions {
            let led = broker
                .replicas
                .get(TRANSACTION_STATE_TOPIC, partition)
                .filter(|p| p.is_leader());
            match (led, st.owns_partition(partition)) {
                (Some(p), false) => {
                    st.begin_load(partition);
                    match load_partition(&mut st, &p) {
                        Ok((records, tail)) => {
                            // Records above the high watermark: a new leader's own,
                            // replicated only once followers fetch them.
                            let mut unreplicated = self.unreplicated_ids();
                            for (id, end) in tail {
                                unreplicated.insert(id, (partition, end));
                            }
                            drop(unreplicated);
                            let effects = st.complete_load(partition);
                            if records > 0 || !effects.is_empty() {
                                tracing::info!(
                                    partition,
                                    records,
                                    resumed = effects.len(),
                                    "{TRANSACTION_STATE_TOPIC} partition loaded"
                                );
                            }
                            let applied = apply(&mut st, broker, effects);
                            spawn_finish(broker, applied);
                        }
                        Err(e) => {
                            tracing::error!(partition, error = %e, "cannot load {TRANSACTION_STATE_TOPIC} partition; it stays unloaded and is retried");
                            st.unload(partition);
                        }
                    }
                }
                (None, true) => {
                    tracing::info!(
                        partition,
                        "{TRANSACTION_STATE_TOPIC} partition no longer led here; unloading"
                    );
                    st.unload(partition);
                    self.unreplicated_ids().retain(|_, (p, _)| *p != partition);
                }
                _ => {}
            }
        }
    }

    /// Timeouts (abort with an epoch bump), id expiration, and markers whose write
    /// failed earlier.
    pub fn tick(&self, broker: &Arc<Broker>, now: i64) {
        self.sync_leadership(broker);
        let mut st = self.lock();
        // Forget the records seen replicated that nobody waited for (the ticker's own
        // aborts and tombstones, answers that timed out), so the map stays bounded by
        // the ids whose latest record is still above the high watermark.
        self.unreplicated_ids().retain(|_, (partition, end)| {
            broker
                .replicas
                .get(TRANSACTION_STATE_TOPIC, *partition)
                .is_some_and(|p| p.is_leader() && p.high_watermark() < *end)
        });
        let mut effects = st.tick(now);
        effects.extend(st.markers_due());
        if !effects.is_empty() {
            let applied = apply(&mut st, broker, effects);
            spawn_finish(broker, applied);
        }
    }

    fn unreplicated_ids(&self) -> MutexGuard<'_, HashMap<String, (i32, i64)>> {
        self.unreplicated.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that `transactional_id`'s latest record ends at `end` in `partition`.
    fn note_written(&self, broker: &Broker, transactional_id: &str, partition: i32, end: i64) {
        let mut unreplicated = self.unreplicated_ids();
        unreplicated.insert(transactional_id.to_string(), (partition, end));
        drop(unreplicated);
        self.is_replicated(broker, transactional_id);
    }

    /// Whether `transactional_id`'s latest record is known to be replicated now (no wait).
    fn is_replicated(&self, broker: &Broker, transactional_id: &str) -> bool {
        let mut unreplicated = self.unreplicated_ids();
        let Some(&(partition, end)) = unreplicated.get(transactional_id) else {
            return true;
        };
        let replicated = broker
            .replicas
            .get(TRANSACTION_STATE_TOPIC, partition)
            .is_some_and(|p| p.is_leader() && p.high_watermark() >= end);
        if replicated {
            unreplicated.remove(transactional_id);
        }
        replicated
    }

    /// Waits until `transactional_id`'s latest record is replicated: NOT_COORDINATOR if
    /// the partition is no longer led here, COORDINATOR_NOT_AVAILABLE past
    /// [`TXN_REPLICATION_TIMEOUT_MS`].
    pub async fn wait_replicated(
        &self,
        broker: &Broker,
        transactional_id: &str,
    ) -> Result<(), TxnError> {
        if self.is_replicated(broker, transactional_id) {
            return Ok(());
        }
        let Some((partition, end)) = self.unreplicated_ids().get(transactional_id).copied() else {
            return Ok(());
        };
        let Some(p) = broker.replicas.get(TRANSACTION_STATE_TOPIC, partition) else {
            return Err(TxnError::NotCoordinator);
        };
        let waiter = p
            .replicated_waiter(end, now_ms(), TXN_REPLICATION_TIMEOUT_MS)
            .map_err(|e| replication_txn_error(&e))?;
        p.wait(waiter).await.map_err(|e| {
            tracing::info!(%transactional_id, partition, error = %e, "{TRANSACTION_STATE_TOPIC} record not replicated");
            replication_txn_error(&e)
        })?;
        let mut unreplicated = self.unreplicated_ids();
        if unreplicated.get(transactional_id) == Some(&(partition, end)) {
            unreplicated.remove(transactional_id);
        }
        Ok(())
    }
}

/// Whether the transactional ids of `__transaction_state-<partition>` are coordinated by
/// another broker: the cluster's metadata has that partition led by a broker other than
/// this one. A transactional batch or TxnOffsetCommit of such an id is verified with
/// that broker ([`verify_elsewhere`]) and appended under the partition's verification
/// guard.
pub fn coordinated_elsewhere(broker: &Broker, partition: i32) -> bool {
    broker
        .controller
        .image()
        .topic(TRANSACTION_STATE_TOPIC)
        .and_then(|t| t.partitions.get(&partition).map(|p| p.leader))
        .is_some_and(|leader| leader >= 0 && leader != broker.config.node_id)
}

/// KIP-890 part 1 for a transaction another broker coordinates: asks the leader of the
/// transactional id's `__transaction_state` partition, with AddPartitionsToTxn v4 and
/// verify_only, whether each of `partitions` is in the producer's ongoing transaction.
/// Returns each partition's code in the order given (0: in it; INVALID_TXN_STATE: not
/// added; PRODUCER_FENCED, INVALID_PRODUCER_ID_MAPPING, ... as the coordinator
/// answers), or one code for all when the coordinator cannot be asked:
/// COORDINATOR_NOT_AVAILABLE (no leader), NOT_COORDINATOR (this broker leads it),
/// NETWORK_EXCEPTION (connection, timeout or a malformed answer).
pub async fn verify_elsewhere(
    broker: &Arc<Broker>,
    transactional_id: &str,
    producer_id: i64,
    producer_epoch: i16,
    partitions: &[(String, i32)],
) -> Result<Vec<i16>, i16> {
    use kafka_protocol::messages::add_partitions_to_txn_request::{
        AddPartitionsToTxnTopic, AddPartitionsToTxnTransaction,
    };
    use kafka_protocol::messages::{
        AddPartitionsToTxnRequest, AddPartitionsToTxnResponse, ApiKey, ProducerId, TopicName,
        TransactionalId,
    };
    use kafka_protocol::protocol::StrBytes;
    let state_partition =
        ferrite_coordinator::txn::partition_for(transactional_id, broker.txns.partitions());
    let leader = broker
        .controller
        .image()
        .topic(TRANSACTION_STATE_TOPIC)
        .and_then(|t| t.partitions.get(&state_partition).map(|p| p.leader))
        .unwrap_or(-1);
    if leader < 0 {
        return Err(ResponseError::CoordinatorNotAvailable.code());
    }
    if leader == broker.config.node_id {
        return Err(ResponseError::NotCoordinator.code());
    }
    let mut topics: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (t, p) in partitions {
        topics.entry(t.as_str()).or_default().push(*p);
    }
    let req = AddPartitionsToTxnRequest::default().with_transactions(vec![
        AddPartitionsToTxnTransaction::default()
            .with_transactional_id(TransactionalId(StrBytes::from_string(
                transactional_id.to_string(),
            )))
            .with_producer_id(ProducerId(producer_id))
            .with_producer_epoch(producer_epoch)
            .with_verify_only(true)
            .with_topics(
                topics
                    .into_iter()
                    .map(|(t, ps)| {
                        AddPartitionsToTxnTopic::default()
                            .with_name(TopicName(StrBytes::from_string(t.to_string())))
                            .with_partitions(ps)
                    })
                    .collect(),
            ),
    ]);
    let timeout = std::time::Duration::from_millis(TXN_VERIFY_TIMEOUT_MS);
    let network = ResponseError::NetworkException.code();
    let resp: AddPartitionsToTxnResponse = send_to_broker(
        broker,
        leader,
        ApiKey::AddPartitionsToTxn,
        4,
        &req,
        timeout,
    )
    .await
    .map_err(|e| {
        tracing::info!(leader, %transactional_id, error = %e, "transaction verification failed");
        network
    })?;
    if resp.error_code != 0 {
        return Err(resp.error_code);
    }
    let Some(result) = resp
        .results_by_transaction
        .iter()
        .find(|r| &*r.transactional_id.0 == transactional_id)
    else {
        return Err(network);
    };
    Ok(partitions
        .iter()
        .map(|(t, p)| {
            result
                .topic_results
                .iter()
                .filter(|r| &*r.name.0 == t.as_str())
                .flat_map(|r| r.results_by_partition.iter())
                .find(|r| r.partition_index == *p)
                .map_or(network, |r| r.partition_error_code)
        })
        .collect())
}

/// One request to broker `node` (transaction verifications, markers) over an idle
/// pooled connection, or a new one from this broker's listen address; the connection
/// goes back to the pool after a complete answer, never after an error (its state is
/// unknown). A pooled connection the peer closed while idle fails at once: one more try
/// on a new connection.
async fn send_to_broker<Req, Resp>(
    broker: &Arc<Broker>,
    node: i32,
    key: kafka_protocol::messages::ApiKey,
    version: i16,
    req: &Req,
    timeout: std::time::Duration,
) -> Result<Resp, String>
where
    Req: kafka_protocol::protocol::Encodable,
    Resp: kafka_protocol::protocol::Decodable,
{
    let idle = || {
        broker
            .txns
            .broker_conns_idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    };
    loop {
        let pooled = idle().get_mut(&node).and_then(Vec::pop);
        let was_pooled = pooled.is_some();
        let mut conn = match pooled {
            Some(c) => c,
            None => crate::replica_fetcher::Connection::open(broker, node)
                .await
                .map_err(|e| e.to_string())?,
        };
        match conn.send::<_, Resp>(key, version, req, timeout).await {
            Ok(r) => {
                let mut idle = idle();
                let conns = idle.entry(node).or_default();
                if conns.len() < TXN_BROKER_CONNECTIONS_IDLE_MAX {
                    conns.push(conn);
                }
                return Ok(r);
            }
            Err(e) if was_pooled => {
                tracing::debug!(node, error = %e, "pooled connection failed; a new one");
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn replication_txn_error(e: &ferrite_replication::ReplicationError) -> TxnError {
    match e {
        ferrite_replication::ReplicationError::NotLeaderOrFollower(_) => TxnError::NotCoordinator,
        _ => TxnError::NotReplicated,
    }
}

/// What [`apply`] did: the first error for the answer, and the effects it left until a
/// record is replicated (carried out by [`finish`]).
#[must_use]
pub struct Applied {
    pub result: Result<(), TxnError>,
    pending: Option<Pending>,
}

/// Effects stopped at a WriteMarkers whose Prepare* record is not replicated yet. The
/// transactional id is in the in-flight set meanwhile (no second writer of its markers).
struct Pending {
    transactional_id: String,
    rest: VecDeque<Effect>,
}

/// Runs one coordinator operation under its lock (off the async workers: appends are
/// file I/O), carries out its effects, and returns once everything the answer depends
/// on is replicated: the handlers' one path.
pub async fn run<T: Send + 'static>(
    broker: &Arc<Broker>,
    transactional_id: String,
    op: impl FnOnce(&mut Coordinator) -> Outcome<T> + Send + 'static,
) -> Result<T, TxnError> {
    let b = broker.clone();
    let (result, applied) = tokio::task::spawn_blocking(move || {
        let mut st = b.txns.lock();
        let out = op(&mut st);
        let applied = apply(&mut st, &b, out.effects);
        (out.result, applied)
    })
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "transaction coordinator task failed");
        TxnError::NotCoordinator
    })?;
    let done = finish(broker, Some(&transactional_id), applied).await;
    result.and_then(|r| done.map(|()| r))
}

/// Carries out what [`apply`] left waiting for replication, then (for an answer) waits
/// until `answer_for`'s latest record is replicated. Returns the first error.
pub async fn finish(
    broker: &Arc<Broker>,
    answer_for: Option<&str>,
    applied: Applied,
) -> Result<(), TxnError> {
    let Applied {
        mut result,
        mut pending,
    } = applied;
    while let Some(Pending {
        transactional_id,
        mut rest,
    }) = pending.take()
    {
        if let Err(e) = broker.txns.wait_replicated(broker, &transactional_id).await {
            // The transaction stays in Prepare*; the ticker writes its markers once the
            // record is replicated.
            rest.retain(|e| !matches!(e, Effect::WriteMarkers { transactional_id: t, .. } if *t == transactional_id));
            if answer_for == Some(transactional_id.as_str()) {
                result = result.and(Err(e));
            }
        }
        let b = broker.clone();
        let next = tokio::task::spawn_blocking(move || {
            let mut st = b.txns.lock();
            b.txns.in_flight().remove(&transactional_id);
            apply(&mut st, &b, rest)
        })
        .await;
        match next {
            Ok(next) => {
                result = result.and(next.result);
                pending = next.pending;
            }
            Err(e) => {
                tracing::error!(error = %e, "transaction coordinator task failed");
                return Err(TxnError::NotCoordinator);
            }
        }
    }
    if let Some(id) = answer_for {
        result = result.and(broker.txns.wait_replicated(broker, id).await);
    }
    result
}

/// [`finish`] in the background, for the ticker and loads (nobody waits for an answer).
fn spawn_finish(broker: &Arc<Broker>, applied: Applied) {
    if applied.pending.is_none() {
        return;
    }
    let b = broker.clone();
    tokio::spawn(async move {
        let _ = finish(&b, None, applied).await;
    });
}

/// Drives [`TxnManager::tick`]; spawned with the broker's background work.
pub async fn run_ticker(broker: Arc<Broker>) {
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(TXN_TICK_INTERVAL_MS)).await;
        if broker
            .controller
            .image()
            .topic(TRANSACTION_STATE_TOPIC)
            .is_none()
        {
            continue;
        }
        let b = broker.clone();
        // Marker and record writes are file I/O: off the async workers.
        let done = tokio::task::spawn_blocking(move || b.txns.tick(&b, now_ms())).await;
        if let Err(e) = done {
            tracing::error!(error = %e, "transaction coordinator tick failed");
        }
    }
}

/// Carries out effects in order. A record is appended before it is replayed and before
/// anything after it (markers, answers) happens; a failed append leaves the transition
/// undone (`write_failed`), drops the markers that depended on it, and answers
/// NOT_COORDINATOR, which clients retry after finding the coordinator again. Markers
/// wait until their Prepare* record is replicated: `apply` stops there and returns the
/// rest for [`finish`]. Markers that cannot all be written leave the transaction in
/// Prepare*, retried by the ticker.
pub fn apply(
    st: &mut Coordinator,
    broker: &Arc<Broker>,
    effects: impl Into<VecDeque<Effect>>,
) -> Applied {
    let mut queue: VecDeque<Effect> = effects.into();
    let mut result = Ok(());
    while let Some(effect) = queue.pop_front() {
        match effect {
            Effect::Persist(record) => {
                let partition = st.partition_for(&record.transactional_id);
                match append_txn_record(broker, partition, &record) {
                    Ok(end) => {
                        st.replay(&record);
                        broker
                            .txns
                            .note_written(broker, &record.transactional_id, partition, end);
                    }
                    Err(e) => {
                        tracing::warn!(transactional_id = %record.transactional_id, error = %e, "cannot write {TRANSACTION_STATE_TOPIC} record");
                        st.write_failed(&record.transactional_id);
                        let id = record.transactional_id.clone();
                        queue.retain(|e| !matches!(e, Effect::WriteMarkers { transactional_id, .. } if *transactional_id == id));
                        result = Err(TxnError::NotCoordinator);
                    }
                }
            }
            Effect::WriteMarkers {
                transactional_id,
                producer_id,
                producer_epoch,
                result: txn_result,
                partitions,
            } => {
                if broker.txns.in_flight().contains(&transactional_id) {
                    // Its markers are being written (or wait for its record); that
                    // finishes the transaction or leaves it to the ticker.
                    continue;
                }
                if !broker.txns.is_replicated(broker, &transactional_id) {
                    let mut in_flight = broker.txns.in_flight();
                    if in_flight.len() >= TXN_MARKER_REQUESTS_IN_FLIGHT_MAX {
                        tracing::debug!(%transactional_id, "too many transactions waiting for markers; retried by the ticker");
                        continue;
                    }
                    in_flight.insert(transactional_id.clone());
                    drop(in_flight);
                    queue.push_front(Effect::WriteMarkers {
                        transactional_id: transactional_id.clone(),
                        producer_id,
                        producer_epoch,
                        result: txn_result,
                        partitions,
                    });
                    return Applied {
                        result,
                        pending: Some(Pending {
                            transactional_id,
                            rest: queue,
                        }),
                    };
                }
                let coordinator_epoch = broker
                    .replicas
                    .get(TRANSACTION_STATE_TOPIC, st.partition_for(&transactional_id))
                    .map_or(0, |p| p.leader_epoch().max(0));
                // Partitions led by another broker (per the image) get their markers
                // through WriteTxnMarkers; the rest (led here, or gone) are written here.
                let image = broker.controller.image();
                let me = broker.config.node_id;
                let (remote, local): (BTreeSet<_>, BTreeSet<_>) =
                    partitions.iter().cloned().partition(|(t, i)| {
                        image
                            .topic(t)
                            .and_then(|t| t.partitions.get(i))
                            .is_some_and(|p| p.leader != me)
                    });
                let Some(local_waiters) = write_markers(
                    broker,
                    producer_id,
                    producer_epoch,
                    txn_result,
                    coordinator_epoch,
                    &local,
                ) else {
                    continue;
                };
                if !remote.is_empty() || !local_waiters.is_empty() {
                    let mut in_flight = broker.txns.in_flight();
                    if in_flight.len() >= TXN_MARKER_REQUESTS_IN_FLIGHT_MAX {
                        tracing::debug!(%transactional_id, "too many transactions waiting for markers; retried by the ticker");
                        continue;
                    }
                    in_flight.insert(transactional_id.clone());
                    drop(in_flight);
                    tokio::spawn(send_markers(
                        broker.clone(),
                        transactional_id,
                        producer_id,
                        producer_epoch,
                        txn_result,
                        coordinator_epoch,
                        local_waiters,
                        remote,
                    ));
                    continue;
                }
                let out =
                    st.markers_written(&transactional_id, producer_id, producer_epoch, now_ms());
                if let Err(e) = out.result {
                    tracing::debug!(%transactional_id, error = %e, "markers written for a transaction that moved on");
                }
                for e in out.effects.into_iter().rev() {
                    queue.push_front(e);
                }
            }
        }
    }
    Applied {
        result,
        pending: None,
    }
}

impl TxnManager {
    fn in_flight(&self) -> MutexGuard<'_, HashSet<String>> {
        self.markers_in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// Waits for the markers written here to be replicated and sends the others to the
/// brokers leading those partitions (one WriteTxnMarkers v1 per leader, over a
/// connection from this broker's listen address). Then, if every partition is closed
/// (OK, or nothing left to close: INVALID_PRODUCER_EPOCH, or UNKNOWN_TOPIC_OR_PARTITION
/// for a partition the image no longer has), completes the transaction under the
/// coordinator's lock as the local path does. Otherwise the transaction stays in
/// Prepare* for the ticker.
#[allow(clippy::too_many_arguments)]
async fn send_markers(
    broker: Arc<Broker>,
    transactional_id: String,
    producer_id: i64,
    producer_epoch: i16,
    result: TxnResult,
    coordinator_epoch: i32,
    local: Vec<(Arc<Partition>, ProduceWaiter)>,
    remote: BTreeSet<(String, i32)>,
) {
    let mut all = true;
    for (p, waiter) in local {
        if let Err(e) = p.wait(waiter).await {
            tracing::info!(topic = %p.topic, partition = p.index, producer_id, error = %e, "marker not replicated; retried");
            all = false;
        }
    }
    if all && !remote.is_empty() {
        all = send_markers_to_leaders(
            &broker,
            producer_id,
            producer_epoch,
            result,
            coordinator_epoch,
            &remote,
        )
        .await;
    }
    let b = broker.clone();
    let done = tokio::task::spawn_blocking(move || {
        let mut st = b.txns.lock();
        b.txns.in_flight().remove(&transactional_id);
        if !all {
            return None;
        }
        let out = st.markers_written(&transactional_id, producer_id, producer_epoch, now_ms());
        if let Err(e) = out.result {
            tracing::debug!(%transactional_id, error = %e, "markers written for a transaction that moved on");
        }
        Some(apply(&mut st, &b, out.effects))
    })
    .await;
    match done {
        Ok(Some(applied)) => {
            let _ = finish(&broker, None, applied).await;
        }
        Ok(None) => {}
        Err(e) => {
            tracing::error!(error = %e, "completing a transaction after its markers failed")
        }
    }
}

async fn send_markers_to_leaders(
    broker: &Arc<Broker>,
    producer_id: i64,
    producer_epoch: i16,
    result: TxnResult,
    coordinator_epoch: i32,
    partitions: &BTreeSet<(String, i32)>,
) -> bool {
    use kafka_protocol::messages::write_txn_markers_request::{
        WritableTxnMarker, WritableTxnMarkerTopic,
    };
    use kafka_protocol::messages::{
        ApiKey, TopicName, WriteTxnMarkersRequest, WriteTxnMarkersResponse,
    };
    use kafka_protocol::protocol::StrBytes;
    let image = broker.controller.image();
    let mut by_leader: BTreeMap<i32, BTreeMap<String, Vec<i32>>> = BTreeMap::new();
    for (topic, index) in partitions {
        match image.topic(topic).and_then(|t| t.partitions.get(index)) {
            None => {
                tracing::warn!(%topic, partition = index, producer_id, "partition of a transaction is gone; no marker written");
            }
            Some(p) if p.leader < 0 => {
                tracing::info!(%topic, partition = index, producer_id, "partition of a transaction has no leader; markers retried");
                return false;
            }
            Some(p) => by_leader
                .entry(p.leader)
                .or_default()
                .entry(topic.clone())
                .or_default()
                .push(*index),
        }
    }
    let mut all = true;
    for (leader, topics) in by_leader {
        let marker = WritableTxnMarker::default()
            .with_producer_id(kafka_protocol::messages::ProducerId(producer_id))
            .with_producer_epoch(producer_epoch)
            .with_transaction_result(result == TxnResult::Commit)
            .with_coordinator_epoch(coordinator_epoch)
            .with_topics(
                topics
                    .into_iter()
                    .map(|(t, ps)| {
                        WritableTxnMarkerTopic::default()
                            .with_name(TopicName(StrBytes::from_string(t)))
                            .with_partition_indexes(ps)
                    })
                    .collect(),
            );
        let req = WriteTxnMarkersRequest::default().with_markers(vec![marker]);
        let timeout =
            std::time::Duration::from_millis(crate::replica_fetcher::REPLICA_REQUEST_TIMEOUT_MS);
        let resp: Result<WriteTxnMarkersResponse, String> =
            send_to_broker(broker, leader, ApiKey::WriteTxnMarkers, 1, &req, timeout).await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(leader, producer_id, error = %e, "WriteTxnMarkers failed; retried");
                all = false;
                continue;
            }
        };
        let now_image = broker.controller.image();
        for m in &resp.markers {
            for t in &m.topics {
                for p in &t.partitions {
                    let code = p.error_code;
                    let gone = now_image
                        .topic(&t.name.0)
                        .and_then(|x| x.partitions.get(&p.partition_index))
                        .is_none();
                    let closed = code == 0
                        || code == ResponseError::InvalidProducerEpoch.code()
                        || (code == ResponseError::UnknownTopicOrPartition.code() && gone);
                    if !closed {
                        tracing::info!(leader, topic = %t.name.0.as_str(), partition = p.partition_index, producer_id, code, "marker not written by the leader; retried");
                        all = false;
                    }
                }
            }
        }
    }
    all
}

/// Writes the COMMIT/ABORT marker to every partition of the transaction led here; for
/// the `__consumer_offsets` partition the group coordinator then applies (commit) or
/// drops (abort) the producer's pending transactional offsets. Returns the waiters of
/// the markers not yet replicated, or None if a marker could not be written. A
/// partition that no longer exists is skipped (Kafka does the same); one refusing the
/// marker's epoch already has a newer producer epoch's marker, so there is nothing left
/// to close. A partition hosted here as a follower is not written (that would fork its
/// log from the leader's): it counts as not written, retried.
fn write_markers(
    broker: &Broker,
    producer_id: i64,
    producer_epoch: i16,
    result: TxnResult,
    coordinator_epoch: i32,
    partitions: &BTreeSet<(String, i32)>,
) -> Option<Vec<(Arc<Partition>, ProduceWaiter)>> {
    let now = now_ms();
    let mut all = true;
    let mut waiting = Vec::new();
    for (topic, index) in partitions {
        match write_marker_here(
            broker,
            topic,
            *index,
            producer_id,
            producer_epoch,
            result,
            coordinator_epoch,
            now,
        ) {
            Ok((p, mut waiter)) => match waiter.try_result() {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    tracing::info!(%topic, partition = index, producer_id, error = %e, "marker not replicated; retried");
                    all = false;
                }
                None => waiting.push((p, waiter)),
            },
            Err(ResponseError::UnknownTopicOrPartition) => {}
            Err(ResponseError::InvalidProducerEpoch) => {}
            Err(_) => all = false,
        }
    }
    all.then_some(waiting)
}

/// One marker into one partition led here (WriteTxnMarkers' per-partition work and the
/// local path's), acks=all as Kafka writes markers: the waiter completes when the ISR
/// has it. UNKNOWN_TOPIC_OR_PARTITION when not hosted, NOT_LEADER_OR_FOLLOWER when not
/// led, NOT_ENOUGH_REPLICAS below min.insync.replicas, INVALID_PRODUCER_EPOCH when the
/// partition has a newer epoch of the producer (nothing left to close).
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_marker_here(
    broker: &Broker,
    topic: &str,
    index: i32,
    producer_id: i64,
    producer_epoch: i16,
    result: TxnResult,
    coordinator_epoch: i32,
    now: i64,
) -> Result<(Arc<Partition>, ProduceWaiter), ResponseError> {
    let control = match result {
        TxnResult::Commit => ControlType::Commit,
        TxnResult::Abort => ControlType::Abort,
    };
    let Some(p) = broker.replicas.get(topic, index) else {
        tracing::warn!(%topic, partition = index, producer_id, "partition of a transaction is not hosted here; no marker written");
        return Err(ResponseError::UnknownTopicOrPartition);
    };
    if !p.is_leader() {
        tracing::debug!(%topic, partition = index, producer_id, "partition of a transaction not led here; no marker written");
        return Err(ResponseError::NotLeaderOrFollower);
    }
    // A `__consumer_offsets` marker is appended under the group coordinator's lock, as
    // its other writes, so that its replicated-writes queue stays in log order.
    let mut groups = (topic == OFFSETS_TOPIC).then(|| broker.groups.lock());
    let waiter = match p.append_marker(
        producer_id,
        producer_epoch,
        control,
        coordinator_epoch,
        now,
        TXN_REPLICATION_TIMEOUT_MS,
    ) {
        Ok((info, waiter)) => {
            if let Some(groups) = groups.as_mut() {
                groups.txn_marker_appended(
                    broker,
                    index,
                    info.last_offset + 1,
                    producer_id,
                    result == TxnResult::Commit,
                    now,
                );
            }
            waiter
        }
        Err(ProduceError::Storage(StorageError::Producer(
            ferrite_storage::ProducerStateError::InvalidProducerEpoch { .. },
        ))) => {
            tracing::warn!(%topic, partition = index, producer_id, producer_epoch, "marker refused: the partition has a newer epoch of this producer");
            return Err(ResponseError::InvalidProducerEpoch);
        }
        Err(e) => {
            tracing::warn!(%topic, partition = index, producer_id, error = %e, "cannot write transaction marker; retried");
            return Err(match e {
                ProduceError::Replication(e) => crate::error::replication_response_error(&e),
                ProduceError::Storage(_) => ResponseError::KafkaStorageError,
                // A marker is never a verified write and never verifies.
                ProduceError::NotInTransaction { .. } | ProduceError::VerificationsFull(_) => {
                    ResponseError::UnknownServerError
                }
            });
        }
    };
    Ok((p, waiter))
}

/// Appends one record to `__transaction_state-<partition>` as one batch, refused below
/// min.insync.replicas; returns the offset after it (what its replication waits for).
fn append_txn_record(broker: &Broker, partition: i32, record: &TxnRecord) -> Result<i64, String> {
    let p = broker
        .replicas
        .get(TRANSACTION_STATE_TOPIC, partition)
        .ok_or_else(|| format!("{TRANSACTION_STATE_TOPIC}-{partition} is not hosted here"))?;
    let (key, value) = record.encode();
    let now = now_ms();
    let r = Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset: 0,
        sequence: -1,
        timestamp: now,
        key: Some(Bytes::from(key)),
        value: value.map(Bytes::from),
        headers: Default::default(),
    };
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        std::iter::once(&r),
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .map_err(|e| e.to_string())?;
    p.append_coordinator_unwaited(&buf, now)
        .map(|info| info.last_offset + 1)
        .map_err(|e| e.to_string())
}

/// Replays one `__transaction_state` partition from its log start. Returns the number
/// of records applied, and for each transactional id with a record at or above the
/// high watermark the offset after its last one; undecodable records are skipped with a
/// warning.
#[allow(clippy::type_complexity)]
fn load_partition(
    st: &mut Coordinator,
    p: &Partition,
) -> Result<(usize, HashMap<String, i64>), String> {
    let (start, end) = {
        let log = p.log();
        (log.log_start_offset(), log.log_end_offset())
    };
    let high_watermark = p.high_watermark();
    let mut tail = HashMap::new();
    let mut offset = start;
    let mut count = 0;
    while offset < end {
        let (_, _, plan) = p.read_plan(offset);
        let Some(plan) = plan.map_err(|e| e.to_string())? else {
            break;
        };
        let mut bytes = plan
            .read(LOAD_READ_BYTES_MAX, true)
            .map_err(|e| e.to_string())?;
        if bytes.is_empty() {
            break;
        }
        let sets = RecordBatchDecoder::decode_all(&mut bytes).map_err(|e| e.to_string())?;
        let mut last = offset;
        for set in sets {
            for r in set.records {
                last = last.max(r.offset);
                if r.control {
                    continue;
                }
                let Some(key) = r.key else { continue };
                match TxnRecord::decode(&key, r.value.as_deref()) {
                    Ok(rec) => {
                        if r.offset >= high_watermark {
                            tail.insert(rec.transactional_id.clone(), r.offset + 1);
                        }
                        st.replay(&rec);
                        count += 1;
                    }
                    Err(e) => {
                        tracing::warn!(partition = p.index, offset = r.offset, error = %e, "skipping {TRANSACTION_STATE_TOPIC} record")
                    }
                }
            }
        }
        offset = last + 1;
    }
    Ok((count, tail))
}

/// Creates `__transaction_state` (Kafka's `transaction.state.log.num.partitions`, 50 by
/// default; compacted by key like `__consumer_offsets`; no time or size retention)
/// through the active controller, from whichever broker is asked first (Kafka's
/// `AutoTopicCreationManager`): placement over the registered brokers,
/// min(transaction.state.log.replication.factor, brokers) replicas, and the
/// controller sets its min.insync.replicas to min(transaction.state.log.min.isr, those
/// replicas). Already
/// existing counts as created (another broker won the race).
async fn create_topic(broker: &Arc<Broker>) -> Result<(), String> {
    use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
    use kafka_protocol::messages::{CreateTopicsRequest, TopicName};
    use kafka_protocol::protocol::StrBytes;
    let configs = [
        ("retention.ms", "-1".to_string()),
        ("retention.bytes", "-1".to_string()),
        (
            "segment.bytes",
            broker.config.offsets_topic_segment_bytes.to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| {
        CreatableTopicConfig::default()
            .with_name(StrBytes::from_static_str(k))
            .with_value(Some(StrBytes::from_string(v)))
    })
    .collect();
    let partitions = broker.txns.partitions();
    let req = CreateTopicsRequest::default()
        .with_topics(vec![CreatableTopic::default()
            .with_name(TopicName(StrBytes::from_static_str(
                TRANSACTION_STATE_TOPIC,
            )))
            .with_num_partitions(partitions)
            .with_replication_factor(-1)
            .with_configs(configs)])
        .with_timeout_ms(
            i32::try_from(broker.controller.quorum().write_timeout().as_millis())
                .unwrap_or(i32::MAX),
        );
    let mut channel = crate::controller_rpc::ControllerChannel::new(
        broker.controller.quorum().local_addr().ip(),
        broker.controller.quorum().write_timeout(),
    );
    let resp = channel.create_topics(broker, req).await?;
    for t in resp.topics {
        if t.error_code == kafka_protocol::ResponseError::TopicAlreadyExists.code() {
            continue;
        }
        if t.error_code != 0 {
            return Err(format!(
                "cannot create {TRANSACTION_STATE_TOPIC}: error {} {}",
                t.error_code,
                t.error_message.as_deref().unwrap_or("")
            ));
        }
        tracing::info!(partitions, "created {TRANSACTION_STATE_TOPIC}");
    }
    Ok(())
}
