//! Kafka's transaction coordinator (TransactionCoordinator, TransactionStateManager and
//! TransactionMetadata) as a sans-I/O state machine: requests and clock ticks in, records
//! and effects out. Time (`now_ms`) is an argument and producer ids come from an injected
//! [`ProducerIdAllocator`], so tests replay exactly.
//!
//! State flows one way: an operation validates and returns [`Effect::Persist`] records;
//! the caller appends them to `__transaction_state` and then applies them with
//! [`TransactionCoordinator::replay`], the same code as loading a partition at start-up.
//! Effects after a Persist must not be delivered before that record is written. Between
//! emitting a record and its replay the transactional id has a pending transition and
//! other requests for it get CONCURRENT_TRANSACTIONS, as in Kafka; a failed append is
//! reported with [`TransactionCoordinator::write_failed`].
//!
//! Transaction version 1 semantics (the classic protocol with KIP-360 and KIP-890 part 1
//! verification). Transaction version 2 (KIP-890 part 2: epoch bump per transaction,
//! implicit partition adds) is not implemented.

pub mod records;

use std::collections::{BTreeMap, BTreeSet};

use kafka_protocol::ResponseError;
pub use records::{TxnLogValue, TxnRecord, TxnRecordDecodeError};

pub const TRANSACTION_STATE_TOPIC: &str = "__transaction_state";
pub const CONSUMER_OFFSETS_TOPIC: &str = "__consumer_offsets";
pub const NO_PRODUCER_ID: i64 = -1;
pub const NO_PRODUCER_EPOCH: i16 = -1;

/// Kafka's TransactionState, with its on-log ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TxnState {
    Empty,
    Ongoing,
    PrepareCommit,
    PrepareAbort,
    CompleteCommit,
    CompleteAbort,
    Dead,
    PrepareEpochFence,
}

impl TxnState {
    pub const ALL: [TxnState; 8] = [
        TxnState::Empty,
        TxnState::Ongoing,
        TxnState::PrepareCommit,
        TxnState::PrepareAbort,
        TxnState::CompleteCommit,
        TxnState::CompleteAbort,
        TxnState::Dead,
        TxnState::PrepareEpochFence,
    ];

    pub fn id(self) -> i8 {
        match self {
            TxnState::Empty => 0,
            TxnState::Ongoing => 1,
            TxnState::PrepareCommit => 2,
            TxnState::PrepareAbort => 3,
            TxnState::CompleteCommit => 4,
            TxnState::CompleteAbort => 5,
            TxnState::Dead => 6,
            TxnState::PrepareEpochFence => 7,
        }
    }

    pub fn from_id(id: i8) -> Option<TxnState> {
        TxnState::ALL.into_iter().find(|s| s.id() == id)
    }

    /// The state named `name` as DescribeTransactions/ListTransactions spell it.
    pub fn from_name(name: &str) -> Option<TxnState> {
        TxnState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// The name DescribeTransactions and ListTransactions use.
    pub fn as_str(self) -> &'static str {
        match self {
            TxnState::Empty => "Empty",
            TxnState::Ongoing => "Ongoing",
            TxnState::PrepareCommit => "PrepareCommit",
            TxnState::PrepareAbort => "PrepareAbort",
            TxnState::CompleteCommit => "CompleteCommit",
            TxnState::CompleteAbort => "CompleteAbort",
            TxnState::Dead => "Dead",
            TxnState::PrepareEpochFence => "PrepareEpochFence",
        }
    }

    /// Kafka's `validPreviousStates`. PrepareAbort from Empty/Complete* exists only for
    /// transaction version 2 (an abort when the client is unsure); Ferrite keeps the
    /// table whole so a log written by Kafka replays.
    pub fn valid_previous_states(self) -> &'static [TxnState] {
        use TxnState::*;
        match self {
            Empty => &[Empty, CompleteCommit, CompleteAbort],
            Ongoing => &[Ongoing, Empty, CompleteCommit, CompleteAbort],
            PrepareCommit => &[Ongoing],
            PrepareAbort => &[
                Ongoing,
                PrepareEpochFence,
                Empty,
                CompleteCommit,
                CompleteAbort,
            ],
            CompleteCommit => &[PrepareCommit],
            CompleteAbort => &[PrepareAbort],
            Dead => &[Empty, CompleteAbort, CompleteCommit],
            PrepareEpochFence => &[Ongoing],
        }
    }

    pub fn can_transition_from(self, previous: TxnState) -> bool {
        self.valid_previous_states().contains(&previous)
    }

    /// Whether an idle transactional id in this state may expire.
    pub fn expiration_allowed(self) -> bool {
        matches!(
            self,
            TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnResult {
    Commit,
    Abort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnConfig {
    /// `transaction.max.timeout.ms`
    pub transaction_max_timeout_ms: i32,
    /// `transactional.id.expiration.ms`
    pub transactional_id_expiration_ms: i64,
    /// `transaction.state.log.num.partitions`
    pub transaction_state_partitions: i32,
    /// Ferrite's bound on the partitions of one transaction (Kafka has none).
    pub txn_partitions_max: usize,
    /// Ferrite's bound on the transactional ids one coordinator holds.
    pub transactional_ids_max: usize,
}

impl Default for TxnConfig {
    fn default() -> Self {
        TxnConfig {
            transaction_max_timeout_ms: 900_000,
            transactional_id_expiration_ms: 7 * 24 * 60 * 60 * 1000,
            transaction_state_partitions: 50,
            txn_partitions_max: 100_000,
            transactional_ids_max: 1_000_000,
        }
    }
}

/// Errors of the coordinator, each one Kafka error code ([`TxnError::response_error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxnError {
    #[error("the __transaction_state partition of this id is still loading")]
    CoordinatorLoadInProgress,
    #[error("this broker does not lead the __transaction_state partition of this id")]
    NotCoordinator,
    #[error("the transaction is completing or another request for it is in flight")]
    ConcurrentTransactions,
    #[error("a newer producer with the same transactional id exists")]
    ProducerFenced,
    /// What old request versions get instead of [`TxnError::ProducerFenced`].
    #[error("the producer epoch is not the current one")]
    InvalidProducerEpoch,
    #[error("the producer id is not the one of this transactional id")]
    InvalidProducerIdMapping,
    #[error("the request does not fit the transaction's state")]
    InvalidTxnState,
    #[error("transaction timeout out of range")]
    InvalidTransactionTimeout,
    #[error("invalid request")]
    InvalidRequest,
    #[error("the coordinator holds transactional_ids_max ids")]
    ResourceLimit,
    #[error("a partition of the transaction is not part of it")]
    PartitionNotInTxn,
    #[error("no such transactional id")]
    TransactionalIdNotFound,
    /// A `__transaction_state` record or a marker did not reach the in-sync replicas in
    /// time (Kafka maps NOT_ENOUGH_REPLICAS and REQUEST_TIMED_OUT of its appends so).
    #[error("the coordinator's write did not reach the in-sync replicas in time")]
    NotReplicated,
}

impl TxnError {
    pub fn response_error(self) -> ResponseError {
        match self {
            TxnError::CoordinatorLoadInProgress => ResponseError::CoordinatorLoadInProgress,
            TxnError::NotCoordinator => ResponseError::NotCoordinator,
            TxnError::ConcurrentTransactions => ResponseError::ConcurrentTransactions,
            TxnError::ProducerFenced => ResponseError::ProducerFenced,
            TxnError::InvalidProducerEpoch => ResponseError::InvalidProducerEpoch,
            TxnError::InvalidProducerIdMapping => ResponseError::InvalidProducerIdMapping,
            TxnError::InvalidTxnState => ResponseError::InvalidTxnState,
            TxnError::InvalidTransactionTimeout => ResponseError::InvalidTransactionTimeout,
            TxnError::InvalidRequest => ResponseError::InvalidRequest,
            // Kafka has no limit here; a retriable "not available" lets clients back off.
            TxnError::ResourceLimit => ResponseError::CoordinatorNotAvailable,
            // Verification (KIP-890 part 1) answers INVALID_TXN_STATE for such partitions.
            TxnError::PartitionNotInTxn => ResponseError::InvalidTxnState,
            TxnError::TransactionalIdNotFound => ResponseError::TransactionalIdNotFound,
            TxnError::NotReplicated => ResponseError::CoordinatorNotAvailable,
        }
    }

    pub fn code(self) -> i16 {
        self.response_error().code()
    }

    /// PRODUCER_FENCED (KIP-588) is answered only to request versions that know it:
    /// InitProducerId v4+, AddPartitionsToTxn/AddOffsetsToTxn/EndTxn v2+,
    /// TxnOffsetCommit v3+; older versions get INVALID_PRODUCER_EPOCH.
    pub fn for_version(self, knows_producer_fenced: bool) -> TxnError {
        match self {
            TxnError::ProducerFenced if !knows_producer_fenced => TxnError::InvalidProducerEpoch,
            e => e,
        }
    }
}

/// Hands out new producer ids (from ProducerIdsRecord blocks in the broker).
pub trait ProducerIdAllocator {
    fn next_producer_id(&mut self) -> Result<i64, TxnError>;
}

/// A counter, for tests and single-node use.
#[derive(Debug, Clone)]
pub struct CountingAllocator(pub i64);

impl ProducerIdAllocator for CountingAllocator {
    fn next_producer_id(&mut self) -> Result<i64, TxnError> {
        let id = self.0;
        self.0 += 1;
        Ok(id)
    }
}

/// TransactionMetadata: the state of one transactional id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnMetadata {
    pub transactional_id: String,
    pub producer_id: i64,
    pub previous_producer_id: i64,
    pub next_producer_id: i64,
    pub producer_epoch: i16,
    /// The epoch before the last bump, to answer a retried InitProducerId (KIP-360).
    /// In memory only, as in Kafka.
    pub last_producer_epoch: i16,
    pub txn_timeout_ms: i32,
    pub state: TxnState,
    pub partitions: BTreeSet<(String, i32)>,
    pub txn_start_timestamp_ms: i64,
    pub txn_last_update_timestamp_ms: i64,
    pub client_transaction_version: i16,
}

impl TxnMetadata {
    fn from_record(id: &str, v: &TxnLogValue, last_producer_epoch: i16) -> TxnMetadata {
        TxnMetadata {
            transactional_id: id.to_string(),
            producer_id: v.producer_id,
            previous_producer_id: v.previous_producer_id,
            next_producer_id: v.next_producer_id,
            producer_epoch: v.producer_epoch,
            last_producer_epoch,
            txn_timeout_ms: v.transaction_timeout_ms,
            state: v.transaction_status,
            partitions: v.transaction_partitions.clone(),
            txn_start_timestamp_ms: v.transaction_start_timestamp_ms,
            txn_last_update_timestamp_ms: v.transaction_last_update_timestamp_ms,
            client_transaction_version: v.client_transaction_version,
        }
    }

    fn to_value(&self) -> TxnLogValue {
        TxnLogValue {
            producer_id: self.producer_id,
            previous_producer_id: self.previous_producer_id,
            next_producer_id: self.next_producer_id,
            producer_epoch: self.producer_epoch,
            transaction_timeout_ms: self.txn_timeout_ms,
            transaction_status: self.state,
            transaction_partitions: self.partitions.clone(),
            transaction_last_update_timestamp_ms: self.txn_last_update_timestamp_ms,
            transaction_start_timestamp_ms: self.txn_start_timestamp_ms,
            client_transaction_version: self.client_transaction_version,
        }
    }

    fn record(&self) -> TxnRecord {
        TxnRecord {
            transactional_id: self.transactional_id.clone(),
            value: Some(self.to_value()),
            last_producer_epoch: self.last_producer_epoch,
        }
    }

    /// Kafka keeps the last two epochs for fencing bumps and never hands them out.
    pub fn is_producer_epoch_exhausted(&self) -> bool {
        epoch_exhausted(self.producer_epoch)
    }
}

fn epoch_exhausted(epoch: i16) -> bool {
    epoch >= i16::MAX - 1
}

/// What a caller must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Append to `__transaction_state` (partition of the id), then replay it.
    Persist(TxnRecord),
    /// Write a COMMIT/ABORT control batch with this producer id and epoch to every
    /// partition, then call [`TransactionCoordinator::markers_written`].
    WriteMarkers {
        transactional_id: String,
        producer_id: i64,
        producer_epoch: i16,
        result: TxnResult,
        partitions: BTreeSet<(String, i32)>,
    },
}

/// A result plus the effects that must happen before it is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome<T> {
    pub result: Result<T, TxnError>,
    pub effects: Vec<Effect>,
}

impl<T> Outcome<T> {
    fn err(e: TxnError) -> Self {
        Outcome {
            result: Err(e),
            effects: vec![],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerIdAndEpoch {
    pub producer_id: i64,
    pub producer_epoch: i16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartitionLoad {
    Loading,
    Loaded,
}

/// The transaction coordinator for the `__transaction_state` partitions this broker leads.
pub struct TransactionCoordinator<A: ProducerIdAllocator> {
    config: TxnConfig,
    allocator: A,
    partitions: BTreeMap<i32, PartitionLoad>,
    txns: BTreeMap<String, TxnMetadata>,
    /// Ids with a record emitted but not yet replayed (Kafka's pendingState).
    pending: BTreeSet<String>,
}

/// Kafka's `Utils.abs(transactionalId.hashCode()) % partitions`, Java's UTF-16 hash.
pub fn partition_for(transactional_id: &str, partitions: i32) -> i32 {
    crate::java_hash_partition(transactional_id, partitions)
}

impl<A: ProducerIdAllocator> TransactionCoordinator<A> {
    pub fn new(config: TxnConfig, allocator: A) -> Self {
        TransactionCoordinator {
            config,
            allocator,
            partitions: BTreeMap::new(),
            txns: BTreeMap::new(),
            pending: BTreeSet::new(),
        }
    }

    pub fn config(&self) -> &TxnConfig {
        &self.config
    }

    pub fn allocator(&self) -> &A {
        &self.allocator
    }

    /// The broker hands the allocator an id claimed asynchronously before a call.
    pub fn allocator_mut(&mut self) -> &mut A {
        &mut self.allocator
    }

    /// Whether `partition` of `__transaction_state` is loaded or loading here.
    pub fn owns_partition(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }

    /// Transactions in PrepareCommit/PrepareAbort with no record in flight: their
    /// markers are still to be written (a failed marker write is retried from here).
    pub fn markers_due(&self) -> Vec<Effect> {
        self.txns
            .values()
            .filter(|m| !self.pending.contains(&m.transactional_id))
            .filter(|m| {
                matches!(
                    self.partitions
                        .get(&self.partition_for(&m.transactional_id)),
                    Some(PartitionLoad::Loaded)
                )
            })
            .filter_map(markers_for)
            .collect()
    }

    pub fn partition_for(&self, transactional_id: &str) -> i32 {
        partition_for(transactional_id, self.config.transaction_state_partitions)
    }

    /// This broker became leader of `partition`: its records are about to be replayed.
    pub fn begin_load(&mut self, partition: i32) {
        self.partitions.insert(partition, PartitionLoad::Loading);
    }

    /// All records of `partition` are replayed. Transactions found in Prepare* resume:
    /// their markers are written again (a restart mid-commit finishes the commit).
    pub fn complete_load(&mut self, partition: i32) -> Vec<Effect> {
        self.partitions.insert(partition, PartitionLoad::Loaded);
        let ids: Vec<String> = self
            .txns
            .keys()
            .filter(|id| self.partition_for(id) == partition)
            .cloned()
            .collect();
        ids.iter()
            .filter_map(|id| self.txns.get(id))
            .filter_map(markers_for)
            .collect()
    }

    /// Leadership of `partition` moved away: forget its transactional ids.
    pub fn unload(&mut self, partition: i32) {
        self.partitions.remove(&partition);
        let parts = self.config.transaction_state_partitions;
        self.txns
            .retain(|id, _| partition_for(id, parts) != partition);
        self.pending
            .retain(|id| partition_for(id, parts) != partition);
    }

    pub fn get(&self, transactional_id: &str) -> Option<&TxnMetadata> {
        self.txns.get(transactional_id)
    }

    /// DescribeTransactions of one id (Kafka's `handleDescribeTransactions`): its
    /// metadata, TRANSACTIONAL_ID_NOT_FOUND for an unknown or Dead id. A record in flight
    /// does not hide the id: the answer is the last state written.
    pub fn describe(&self, transactional_id: &str) -> Result<&TxnMetadata, TxnError> {
        if transactional_id.is_empty() {
            return Err(TxnError::InvalidRequest);
        }
        match self.partitions.get(&self.partition_for(transactional_id)) {
            None => return Err(TxnError::NotCoordinator),
            Some(PartitionLoad::Loading) => return Err(TxnError::CoordinatorLoadInProgress),
            Some(PartitionLoad::Loaded) => {}
        }
        self.txns
            .get(transactional_id)
            .filter(|m| m.state != TxnState::Dead)
            .ok_or(TxnError::TransactionalIdNotFound)
    }

    /// ListTransactions (KIP-664; `duration_filter_ms`, KIP-994, is ListTransactions v1):
    /// the ids of the loaded partitions whose state is in `states` (every state when
    /// empty), whose producer id is in `producer_ids` (any when empty) and, when
    /// `duration_filter_ms >= 0`, whose transaction has run longer than that. Returns
    /// them in id order with the state names that are no state; COORDINATOR_LOAD_IN_PROGRESS
    /// while a partition loads, as Kafka.
    pub fn list_transactions(
        &self,
        states: &[String],
        producer_ids: &[i64],
        duration_filter_ms: i64,
        now_ms: i64,
    ) -> Result<(Vec<&TxnMetadata>, Vec<String>), TxnError> {
        if self
            .partitions
            .values()
            .any(|l| *l == PartitionLoad::Loading)
        {
            return Err(TxnError::CoordinatorLoadInProgress);
        }
        let mut wanted = BTreeSet::new();
        let mut unknown = Vec::new();
        for name in states {
            match TxnState::from_name(name) {
                Some(s) => {
                    wanted.insert(s);
                }
                None => unknown.push(name.clone()),
            }
        }
        if !states.is_empty() && wanted.is_empty() {
            // Only unknown states asked for: nothing matches.
            return Ok((Vec::new(), unknown));
        }
        let listed = self
            .txns
            .values()
            .filter(|m| m.state != TxnState::Dead)
            .filter(|m| producer_ids.is_empty() || producer_ids.contains(&m.producer_id))
            .filter(|m| wanted.is_empty() || wanted.contains(&m.state))
            .filter(|m| {
                duration_filter_ms < 0
                    || now_ms.saturating_sub(m.txn_start_timestamp_ms) > duration_filter_ms
            })
            .collect();
        Ok((listed, unknown))
    }

    pub fn transactions(&self) -> impl Iterator<Item = &TxnMetadata> {
        self.txns.values()
    }

    /// Apply one record of `__transaction_state`: after an append, and at load.
    pub fn replay(&mut self, record: &TxnRecord) {
        let id = &record.transactional_id;
        self.pending.remove(id);
        match &record.value {
            None => {
                self.txns.remove(id);
            }
            Some(v) => {
                let m = TxnMetadata::from_record(id, v, record.last_producer_epoch);
                self.txns.insert(id.clone(), m);
            }
        }
    }

    /// The append of the record last emitted for `transactional_id` failed: the
    /// transition did not happen and the id accepts requests again.
    pub fn write_failed(&mut self, transactional_id: &str) {
        self.pending.remove(transactional_id);
    }

    fn check_coordinator(&self, transactional_id: &str) -> Result<(), TxnError> {
        if transactional_id.is_empty()
            || transactional_id.len() > records::TRANSACTIONAL_ID_BYTES_MAX
        {
            return Err(TxnError::InvalidRequest);
        }
        match self.partitions.get(&self.partition_for(transactional_id)) {
            None => Err(TxnError::NotCoordinator),
            Some(PartitionLoad::Loading) => Err(TxnError::CoordinatorLoadInProgress),
            Some(PartitionLoad::Loaded) => {
                if self.pending.contains(transactional_id) {
                    Err(TxnError::ConcurrentTransactions)
                } else {
                    Ok(())
                }
            }
        }
    }

    fn emit(&mut self, next: &TxnMetadata) -> Effect {
        if let Some(cur) = self.txns.get(&next.transactional_id) {
            assert!(
                next.state.can_transition_from(cur.state)
                    || (next.state == TxnState::PrepareAbort
                        && TxnState::PrepareEpochFence.can_transition_from(cur.state)),
                "transaction coordinator bug: {:?} -> {:?}",
                cur.state,
                next.state
            );
        }
        self.pending.insert(next.transactional_id.clone());
        Effect::Persist(next.record())
    }

    /// InitProducerId with a transactional id. `expected` is the producer id and epoch
    /// the client already has (KIP-360, InitProducerId v3+), if any.
    pub fn init_producer_id(
        &mut self,
        transactional_id: &str,
        transaction_timeout_ms: i32,
        expected: Option<ProducerIdAndEpoch>,
        now_ms: i64,
    ) -> Outcome<ProducerIdAndEpoch> {
        if let Err(e) = self.check_coordinator(transactional_id) {
            return Outcome::err(e);
        }
        if transaction_timeout_ms <= 0
            || transaction_timeout_ms > self.config.transaction_max_timeout_ms
        {
            return Outcome::err(TxnError::InvalidTransactionTimeout);
        }
        let cur = match self.txns.get(transactional_id) {
            Some(m) => m.clone(),
            None => {
                if self.txns.len() >= self.config.transactional_ids_max {
                    return Outcome::err(TxnError::ResourceLimit);
                }
                let producer_id = match self.allocator.next_producer_id() {
                    Ok(id) => id,
                    Err(e) => return Outcome::err(e),
                };
                // Kafka creates the metadata with epoch -1 and bumps it to 0 below; here
                // it exists only once the record is written.
                TxnMetadata {
                    transactional_id: transactional_id.to_string(),
                    producer_id,
                    previous_producer_id: NO_PRODUCER_ID,
                    next_producer_id: NO_PRODUCER_ID,
                    producer_epoch: NO_PRODUCER_EPOCH,
                    last_producer_epoch: NO_PRODUCER_EPOCH,
                    txn_timeout_ms: transaction_timeout_ms,
                    state: TxnState::Empty,
                    partitions: BTreeSet::new(),
                    txn_start_timestamp_ms: -1,
                    txn_last_update_timestamp_ms: now_ms,
                    client_transaction_version: 0,
                }
            }
        };
        if let Some(exp) = expected {
            // Fence unless the metadata is new, the id matches, or the id is the
            // previous one and its epoch exhausted (a retry after a rotation).
            let valid = cur.producer_epoch == NO_PRODUCER_EPOCH
                || exp.producer_id == cur.producer_id
                || (exp.producer_id == cur.previous_producer_id
                    && epoch_exhausted(exp.producer_epoch));
            if !valid {
                return Outcome::err(TxnError::ProducerFenced);
            }
        }
        match cur.state {
            TxnState::PrepareCommit | TxnState::PrepareAbort => {
                Outcome::err(TxnError::ConcurrentTransactions)
            }
            TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort => {
                let mut next = cur.clone();
                next.txn_timeout_ms = transaction_timeout_ms;
                next.state = TxnState::Empty;
                next.partitions.clear();
                next.txn_start_timestamp_ms = -1;
                next.txn_last_update_timestamp_ms = now_ms;
                if cur.is_producer_epoch_exhausted()
                    && expected.is_none_or(|e| e.producer_epoch == cur.producer_epoch)
                {
                    // Epoch exhaustion: a new producer id with epoch 0.
                    let producer_id = match self.allocator.next_producer_id() {
                        Ok(id) => id,
                        Err(e) => return Outcome::err(e),
                    };
                    next.previous_producer_id = cur.producer_id;
                    next.producer_id = producer_id;
                    next.producer_epoch = 0;
                    next.last_producer_epoch = if expected.is_some() {
                        cur.producer_epoch
                    } else {
                        NO_PRODUCER_EPOCH
                    };
                } else {
                    let bumped = cur.producer_epoch.saturating_add(1);
                    let (epoch, last) = match expected {
                        None => (bumped, NO_PRODUCER_EPOCH),
                        Some(e)
                            if cur.producer_epoch == NO_PRODUCER_EPOCH
                                || e.producer_epoch == cur.producer_epoch =>
                        {
                            (bumped, cur.producer_epoch)
                        }
                        // A retry whose answer was lost: the same, current epoch again.
                        Some(e) if e.producer_epoch == cur.last_producer_epoch => {
                            (cur.producer_epoch, cur.last_producer_epoch)
                        }
                        Some(_) => return Outcome::err(TxnError::ProducerFenced),
                    };
                    next.producer_epoch = epoch;
                    next.last_producer_epoch = last;
                }
                let answer = ProducerIdAndEpoch {
                    producer_id: next.producer_id,
                    producer_epoch: next.producer_epoch,
                };
                Outcome {
                    result: Ok(answer),
                    effects: vec![self.emit(&next)],
                }
            }
            TxnState::Ongoing => {
                // PrepareEpochFence: bump the epoch (fencing the current producer) and
                // abort with it; the client retries after CONCURRENT_TRANSACTIONS and then
                // gets a further bump (or a new id if this one exhausted the epochs).
                let mut fenced = cur.clone();
                fenced.producer_epoch = cur.producer_epoch.saturating_add(1);
                fenced.last_producer_epoch = NO_PRODUCER_EPOCH;
                fenced.state = TxnState::PrepareEpochFence;
                let effects = self.prepare_abort_or_commit(fenced, TxnResult::Abort, now_ms);
                Outcome {
                    result: Err(TxnError::ConcurrentTransactions),
                    effects,
                }
            }
            TxnState::Dead | TxnState::PrepareEpochFence => {
                // Dead ids are removed with their tombstone and PrepareEpochFence is never
                // a resting state here; a request racing them retries.
                Outcome::err(TxnError::ConcurrentTransactions)
            }
        }
    }

    fn prepare_abort_or_commit(
        &mut self,
        mut next: TxnMetadata,
        result: TxnResult,
        now_ms: i64,
    ) -> Vec<Effect> {
        next.state = match result {
            TxnResult::Commit => TxnState::PrepareCommit,
            TxnResult::Abort => TxnState::PrepareAbort,
        };
        next.txn_last_update_timestamp_ms = now_ms;
        let persist = self.emit(&next);
        let mut effects = vec![persist];
        effects.extend(markers_for(&next));
        effects
    }

    /// The checks AddPartitionsToTxn, AddOffsetsToTxn and verification share.
    fn check_producer(
        &self,
        transactional_id: &str,
        producer_id: i64,
        producer_epoch: i16,
    ) -> Result<&TxnMetadata, TxnError> {
        self.check_coordinator(transactional_id)?;
        let m = self
            .txns
            .get(transactional_id)
            .ok_or(TxnError::InvalidProducerIdMapping)?;
        if m.producer_id != producer_id {
            return Err(TxnError::InvalidProducerIdMapping);
        }
        if m.producer_epoch != producer_epoch {
            return Err(TxnError::ProducerFenced);
        }
        if matches!(m.state, TxnState::PrepareCommit | TxnState::PrepareAbort) {
            return Err(TxnError::ConcurrentTransactions);
        }
        Ok(m)
    }

    /// AddPartitionsToTxn (client flavour, v0-v3 and v4+ without verify_only).
    pub fn add_partitions(
        &mut self,
        transactional_id: &str,
        producer_id: i64,
        producer_epoch: i16,
        partitions: &[(String, i32)],
        now_ms: i64,
    ) -> Outcome<()> {
        let m = match self.check_producer(transactional_id, producer_id, producer_epoch) {
            Ok(m) => m,
            Err(e) => return Outcome::err(e),
        };
        if matches!(m.state, TxnState::Dead | TxnState::PrepareEpochFence) {
            return Outcome::err(TxnError::ConcurrentTransactions);
        }
        if m.state == TxnState::Ongoing && partitions.iter().all(|p| m.partitions.contains(p)) {
            return Outcome {
                result: Ok(()),
                effects: vec![],
            };
        }
        let mut next = m.clone();
        next.partitions.extend(partitions.iter().cloned());
        if next.partitions.len() > self.config.txn_partitions_max {
            return Outcome::err(TxnError::InvalidRequest);
        }
        if m.state != TxnState::Ongoing {
            next.txn_start_timestamp_ms = now_ms;
        }
        next.state = TxnState::Ongoing;
        next.txn_last_update_timestamp_ms = now_ms;
        Outcome {
            result: Ok(()),
            effects: vec![self.emit(&next)],
        }
    }

    /// AddPartitionsToTxn v4+ with verify_only (KIP-890 part 1): for each partition,
    /// whether it is in the ongoing transaction of this producer. Writes nothing.
    pub fn verify_partitions(
        &self,
        transactional_id: &str,
        producer_id: i64,
        producer_epoch: i16,
        partitions: &[(String, i32)],
    ) -> Vec<((String, i32), Result<(), TxnError>)> {
        let check = self.check_producer(transactional_id, producer_id, producer_epoch);
        partitions
            .iter()
            .map(|p| {
                let r = match &check {
                    Err(e) => Err(*e),
                    Ok(m) if m.state == TxnState::Ongoing && m.partitions.contains(p) => Ok(()),
                    Ok(_) => Err(TxnError::PartitionNotInTxn),
                };
                (p.clone(), r)
            })
            .collect()
    }

    /// AddOffsetsToTxn: adds the `__consumer_offsets` partition of the group
    /// (`offsets_partition`, from the group coordinator's partitioning).
    pub fn add_offsets(
        &mut self,
        transactional_id: &str,
        producer_id: i64,
        producer_epoch: i16,
        offsets_partition: i32,
        now_ms: i64,
    ) -> Outcome<()> {
        self.add_partitions(
            transactional_id,
            producer_id,
            producer_epoch,
            &[(CONSUMER_OFFSETS_TOPIC.to_string(), offsets_partition)],
            now_ms,
        )
    }

    /// EndTxn from a client.
    pub fn end_txn(
        &mut self,
        transactional_id: &str,
        producer_id: i64,
        producer_epoch: i16,
        result: TxnResult,
        now_ms: i64,
    ) -> Outcome<()> {
        if let Err(e) = self.check_coordinator(transactional_id) {
            return Outcome::err(e);
        }
        let Some(m) = self.txns.get(transactional_id).cloned() else {
            return Outcome::err(TxnError::InvalidProducerIdMapping);
        };
        if m.producer_id != producer_id {
            return Outcome::err(TxnError::InvalidProducerIdMapping);
        }
        if m.producer_epoch != producer_epoch {
            return Outcome::err(TxnError::ProducerFenced);
        }
        let ok = Outcome {
            result: Ok(()),
            effects: vec![],
        };
        match (m.state, result) {
            (TxnState::Ongoing, _) => {
                let effects = self.prepare_abort_or_commit(m, result, now_ms);
                Outcome {
                    result: Ok(()),
                    effects,
                }
            }
            // Retries of a completed EndTxn succeed; of one completing, retry later.
            (TxnState::CompleteCommit, TxnResult::Commit)
            | (TxnState::CompleteAbort, TxnResult::Abort) => ok,
            (TxnState::PrepareCommit, TxnResult::Commit)
            | (TxnState::PrepareAbort, TxnResult::Abort) => {
                Outcome::err(TxnError::ConcurrentTransactions)
            }
            (TxnState::Dead | TxnState::PrepareEpochFence, _) => {
                Outcome::err(TxnError::ConcurrentTransactions)
            }
            _ => Outcome::err(TxnError::InvalidTxnState),
        }
    }

    /// All markers of the Prepare* transaction of this producer are written: complete it.
    /// A stale confirmation (the transaction moved on) changes nothing.
    pub fn markers_written(
        &mut self,
        transactional_id: &str,
        producer_id: i64,
        producer_epoch: i16,
        now_ms: i64,
    ) -> Outcome<()> {
        if let Err(e) = self.check_coordinator(transactional_id) {
            return Outcome::err(e);
        }
        let Some(m) = self.txns.get(transactional_id) else {
            return Outcome::err(TxnError::InvalidProducerIdMapping);
        };
        if m.producer_id != producer_id || m.producer_epoch != producer_epoch {
            return Outcome::err(TxnError::InvalidProducerIdMapping);
        }
        let state = match m.state {
            TxnState::PrepareCommit => TxnState::CompleteCommit,
            TxnState::PrepareAbort => TxnState::CompleteAbort,
            _ => return Outcome::err(TxnError::InvalidTxnState),
        };
        let mut next = m.clone();
        next.state = state;
        next.partitions.clear();
        next.txn_last_update_timestamp_ms = now_ms;
        Outcome {
            result: Ok(()),
            effects: vec![self.emit(&next)],
        }
    }

    /// Clock tick: abort Ongoing transactions older than their timeout (fencing the
    /// producer with an epoch bump, as Kafka does) and expire idle transactional ids
    /// with a tombstone.
    pub fn tick(&mut self, now_ms: i64) -> Vec<Effect> {
        let mut effects = Vec::new();
        let expiration = self.config.transactional_id_expiration_ms;
        let candidates: Vec<TxnMetadata> = self
            .txns
            .values()
            .filter(|m| !self.pending.contains(&m.transactional_id))
            .filter(|m| {
                matches!(
                    self.partitions
                        .get(&self.partition_for(&m.transactional_id)),
                    Some(PartitionLoad::Loaded)
                )
            })
            .cloned()
            .collect();
        for m in candidates {
            if m.state == TxnState::Ongoing
                && m.txn_start_timestamp_ms
                    .saturating_add(i64::from(m.txn_timeout_ms))
                    < now_ms
            {
                let mut fenced = m.clone();
                // At i16::MAX the epoch cannot move; the abort still happens with it.
                fenced.producer_epoch = m.producer_epoch.saturating_add(1);
                fenced.last_producer_epoch = NO_PRODUCER_EPOCH;
                fenced.state = TxnState::PrepareEpochFence;
                effects.extend(self.prepare_abort_or_commit(fenced, TxnResult::Abort, now_ms));
            } else if m.state.expiration_allowed()
                && m.txn_last_update_timestamp_ms.saturating_add(expiration) <= now_ms
            {
                assert!(TxnState::Dead.can_transition_from(m.state));
                self.pending.insert(m.transactional_id.clone());
                effects.push(Effect::Persist(TxnRecord {
                    transactional_id: m.transactional_id.clone(),
                    value: None,
                    last_producer_epoch: NO_PRODUCER_EPOCH,
                }));
            }
        }
        effects
    }
}

fn markers_for(m: &TxnMetadata) -> Option<Effect> {
    let result = match m.state {
        TxnState::PrepareCommit => TxnResult::Commit,
        TxnState::PrepareAbort => TxnResult::Abort,
        _ => return None,
    };
    Some(Effect::WriteMarkers {
        transactional_id: m.transactional_id.clone(),
        producer_id: m.producer_id,
        producer_epoch: m.producer_epoch,
        result,
        partitions: m.partitions.clone(),
    })
}

#[cfg(test)]
mod tests;
