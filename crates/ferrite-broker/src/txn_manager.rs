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
//! into every partition of the transaction that it hosts as leader, before the
//! transaction is completed (the Complete* record). Markers for partitions led by
//! another broker (Kafka's WriteTxnMarkers RPC) are not built: one node, or a
//! transaction whose partitions are all led by the coordinator's broker.
//!
//! Lock order: this mutex, then a partition's log, then the group coordinator's mutex.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use ferrite_coordinator::txn::{
    Effect, ProducerIdAllocator, TransactionCoordinator, TxnConfig, TxnError, TxnRecord, TxnResult,
    TRANSACTION_STATE_TOPIC,
};
use ferrite_storage::{ControlType, StorageError};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

use kafka_protocol::ResponseError;

use crate::group_manager::OFFSETS_TOPIC;
use crate::replica_manager::{Partition, ProduceError};
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
}

impl TxnManager {
    pub fn new(config: TxnConfig) -> Self {
        let partitions = config.transaction_state_partitions;
        TxnManager {
            state: Mutex::new(TransactionCoordinator::new(config, ClaimedId(None))),
            partitions,
            create: tokio::sync::Mutex::new(()),
            markers_in_flight: Mutex::new(HashSet::new()),
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
                        Ok(records) => {
                            let effects = st.complete_load(partition);
                            if records > 0 || !effects.is_empty() {
                                tracing::info!(
                                    partition,
                                    records,
                                    resumed = effects.len(),
                                    "{TRANSACTION_STATE_TOPIC} partition loaded"
                                );
                            }
                            let _ = apply(&mut st, broker, effects);
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
        let mut effects = st.tick(now);
        effects.extend(st.markers_due());
        if !effects.is_empty() {
            let _ = apply(&mut st, broker, effects);
        }
    }
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
/// that cannot all be written leave the transaction in Prepare*, retried by the ticker.
pub fn apply(
    st: &mut Coordinator,
    broker: &Arc<Broker>,
    effects: Vec<Effect>,
) -> Result<(), TxnError> {
    let mut queue: VecDeque<Effect> = effects.into();
    let mut result = Ok(());
    while let Some(effect) = queue.pop_front() {
        match effect {
            Effect::Persist(record) => {
                let partition = st.partition_for(&record.transactional_id);
                match append_txn_record(broker, partition, &record) {
                    Ok(()) => st.replay(&record),
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
                    // A WriteTxnMarkers send of this id is out; it finishes the
                    // transaction or leaves it to the ticker.
                    continue;
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
                let local_ok = write_markers(
                    broker,
                    producer_id,
                    producer_epoch,
                    txn_result,
                    coordinator_epoch,
                    &local,
                );
                if !local_ok {
                    continue;
                }
                if !remote.is_empty() {
                    let mut in_flight = broker.txns.in_flight();
                    if in_flight.len() >= TXN_MARKER_REQUESTS_IN_FLIGHT_MAX {
                        tracing::debug!(%transactional_id, "too many WriteTxnMarkers sends in flight; retried by the ticker");
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
    result
}

impl TxnManager {
    fn in_flight(&self) -> MutexGuard<'_, HashSet<String>> {
        self.markers_in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// Sends the markers of one transaction to the brokers leading its other partitions
/// (one WriteTxnMarkers v1 per leader, over a connection from this broker's listen
/// address), then, if every partition answered OK or has nothing left to close
/// (INVALID_PRODUCER_EPOCH, or UNKNOWN_TOPIC_OR_PARTITION for a partition the image no
/// longer has), completes the transaction under the coordinator's lock as the local
/// path does. Otherwise the transaction stays in Prepare* for the ticker.
async fn send_markers(
    broker: Arc<Broker>,
    transactional_id: String,
    producer_id: i64,
    producer_epoch: i16,
    result: TxnResult,
    coordinator_epoch: i32,
    partitions: BTreeSet<(String, i32)>,
) {
    let all = send_markers_to_leaders(
        &broker,
        producer_id,
        producer_epoch,
        result,
        coordinator_epoch,
        &partitions,
    )
    .await;
    let b = broker.clone();
    let done = tokio::task::spawn_blocking(move || {
        let mut st = b.txns.lock();
        b.txns.in_flight().remove(&transactional_id);
        if !all {
            return;
        }
        let out = st.markers_written(&transactional_id, producer_id, producer_epoch, now_ms());
        if let Err(e) = out.result {
            tracing::debug!(%transactional_id, error = %e, "markers written for a transaction that moved on");
        }
        let _ = apply(&mut st, &b, out.effects);
    })
    .await;
    if let Err(e) = done {
        tracing::error!(error = %e, "completing a transaction after WriteTxnMarkers failed");
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
        let resp: Result<WriteTxnMarkersResponse, String> = async {
            let mut conn = crate::replica_fetcher::Connection::open(broker, leader)
                .await
                .map_err(|e| e.to_string())?;
            conn.send(ApiKey::WriteTxnMarkers, 1, &req, timeout)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
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

/// Writes the COMMIT/ABORT marker to every partition of the transaction; for the
/// `__consumer_offsets` partition the group coordinator then applies (commit) or drops
/// (abort) the producer's pending transactional offsets. Returns whether all were
/// written. A partition that no longer exists is skipped (Kafka does the same); one
/// refusing the marker's epoch already has a newer producer epoch's marker, so there is
/// nothing left to close. A partition hosted here as a follower is not written (that
/// would fork its log from the leader's): it counts as not written, retried.
fn write_markers(
    broker: &Broker,
    producer_id: i64,
    producer_epoch: i16,
    result: TxnResult,
    coordinator_epoch: i32,
    partitions: &BTreeSet<(String, i32)>,
) -> bool {
    let now = now_ms();
    let mut all = true;
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
            Ok(()) | Err(ResponseError::UnknownTopicOrPartition) => {}
            Err(ResponseError::InvalidProducerEpoch) => {}
            Err(_) => all = false,
        }
    }
    all
}

/// One marker into one partition led here (WriteTxnMarkers' per-partition work and the
/// local path's): UNKNOWN_TOPIC_OR_PARTITION when not hosted, NOT_LEADER_OR_FOLLOWER
/// when not led, INVALID_PRODUCER_EPOCH when the partition has a newer epoch of the
/// producer (nothing left to close). acks=1: the marker is in the leader's log when
/// this returns; Kafka waits for acks=all.
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
) -> Result<(), ResponseError> {
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
    match p.append_marker(producer_id, producer_epoch, control, coordinator_epoch, now) {
        Ok(_) => {}
        Err(ProduceError::Storage(StorageError::Producer(
            ferrite_storage::ProducerStateError::InvalidProducerEpoch { .. },
        ))) => {
            tracing::warn!(%topic, partition = index, producer_id, producer_epoch, "marker refused: the partition has a newer epoch of this producer");
            return Err(ResponseError::InvalidProducerEpoch);
        }
        Err(e) => {
            tracing::warn!(%topic, partition = index, producer_id, error = %e, "cannot write transaction marker; retried");
            return Err(match e {
                ProduceError::Replication(_) => ResponseError::NotLeaderOrFollower,
                ProduceError::Storage(_) => ResponseError::KafkaStorageError,
            });
        }
    }
    if topic == OFFSETS_TOPIC {
        broker
            .groups
            .lock()
            .complete_txn_offsets(producer_id, result == TxnResult::Commit, now);
    }
    Ok(())
}

/// Appends one record to `__transaction_state-<partition>` as one batch.
fn append_txn_record(broker: &Broker, partition: i32, record: &TxnRecord) -> Result<(), String> {
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
    p.append(&buf, now).map(|_| ()).map_err(|e| e.to_string())
}

/// Replays one `__transaction_state` partition from its log start. Returns the number
/// of records applied; undecodable records are skipped with a warning.
fn load_partition(st: &mut Coordinator, p: &Partition) -> Result<usize, String> {
    let (start, end) = {
        let log = p.log();
        (log.log_start_offset(), log.log_end_offset())
    };
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
    Ok(count)
}

/// Creates `__transaction_state` (Kafka's `transaction.state.log.num.partitions`, 50 by
/// default; compacted by key like `__consumer_offsets`; no time or size retention)
/// through the active controller, from whichever broker is asked first (Kafka's
/// `AutoTopicCreationManager`): placement over the registered brokers,
/// min(offsets.topic.replication.factor, brokers) replicas (an internal topic). Already
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
