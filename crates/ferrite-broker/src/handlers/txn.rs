//! The transactional producer's APIs: FindCoordinator with key type TRANSACTION,
//! InitProducerId with a transactional id, AddPartitionsToTxn, AddOffsetsToTxn, EndTxn
//! and TxnOffsetCommit; and the admin side, DescribeTransactions and ListTransactions. Each validates through the sans-I/O coordinator and carries out
//! its effects (`txn_manager::apply`) before answering, so a client never sees a state
//! a crash could take back.
//!
//! Transaction version 1 (the classic protocol): AddPartitionsToTxn v0-v3 from clients
//! and v4 (the brokers' batched, verify-only form, KIP-890 part 1) from partition
//! leaders that verify a transactional write with this coordinator, EndTxn v0-v3,
//! TxnOffsetCommit v0-v3, AddOffsetsToTxn v0-v3; the later versions are transaction
//! version 2 (KIP-890 part 2).

use std::sync::Arc;

use ferrite_coordinator::txn::{ProducerIdAndEpoch, TxnError, TxnResult, TRANSACTION_STATE_TOPIC};
use ferrite_coordinator::{validate_txn_offset_commit_state, GroupRecord, OffsetValue};
use kafka_protocol::messages::add_partitions_to_txn_response::{
    AddPartitionsToTxnPartitionResult, AddPartitionsToTxnTopicResult,
};
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::txn_offset_commit_response::{
    TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
};
use kafka_protocol::messages::{
    AddOffsetsToTxnRequest, AddOffsetsToTxnResponse, AddPartitionsToTxnRequest,
    AddPartitionsToTxnResponse, BrokerId, DescribeTransactionsRequest,
    DescribeTransactionsResponse, EndTxnRequest, EndTxnResponse, FindCoordinatorRequest,
    FindCoordinatorResponse, InitProducerIdRequest, InitProducerIdResponse,
    ListTransactionsRequest, ListTransactionsResponse, ProducerId, TransactionalId,
    TxnOffsetCommitRequest, TxnOffsetCommitResponse, WriteTxnMarkersRequest,
    WriteTxnMarkersResponse,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use super::str_bytes;
use crate::group_manager::{partition_for_group, OFFSETS_TOPIC};
use crate::txn_manager;
use crate::{now_ms, Broker};

/// FindCoordinator's key type of transactional ids.
pub const KEY_TYPE_TRANSACTION: i8 = 1;

/// FindCoordinator for transactional ids: the leader of the id's `__transaction_state`
/// partition in the image (any broker answers), created on first use. A partition
/// without a live leader, or led here but not loaded yet, answers
/// COORDINATOR_NOT_AVAILABLE (retriable).
pub async fn find_coordinator(
    broker: &Arc<Broker>,
    req: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let ready = broker.txns.ensure_topic(broker).await;
    let (host, port) = &broker.advertised;
    let answer = |key: &StrBytes| {
        let c = Coordinator::default()
            .with_key(key.clone())
            .with_node_id(BrokerId(-1))
            .with_host(str_bytes(""))
            .with_port(-1);
        let fail = |e: ResponseError, m: String| {
            c.clone()
                .with_error_code(e.code())
                .with_error_message(Some(str_bytes(m)))
        };
        if key.is_empty() {
            return fail(
                ResponseError::InvalidRequest,
                "empty transactional id".into(),
            );
        }
        if let Err(e) = &ready {
            return fail(ResponseError::CoordinatorNotAvailable, e.clone());
        }
        // The coordinator is the leader of the id's partition as the image names it,
        // whichever broker was asked (with several brokers the asked one is usually
        // not it; answering COORDINATOR_NOT_AVAILABLE there made clients retry forever).
        let partition = broker.txns.lock().partition_for(key);
        let image = broker.controller.image();
        let leader = image
            .topic(TRANSACTION_STATE_TOPIC)
            .and_then(|t| t.partitions.get(&partition))
            .map(|p| p.leader);
        let endpoint = match leader {
            Some(id) if id == broker.config.node_id => {
                let loaded = broker
                    .replicas
                    .get(TRANSACTION_STATE_TOPIC, partition)
                    .is_some_and(|p| p.is_leader());
                loaded.then(|| (id, host.clone(), *port))
            }
            Some(id) if id >= 0 => image
                .broker(id)
                .filter(|b| !b.fenced)
                .and_then(|b| b.endpoints.first())
                .map(|e| (id, e.host.clone(), e.port)),
            _ => None,
        };
        match endpoint {
            Some((id, host, port)) => c
                .with_node_id(BrokerId(id))
                .with_host(str_bytes(host))
                .with_port(i32::from(port)),
            None => fail(
                ResponseError::CoordinatorNotAvailable,
                format!("{TRANSACTION_STATE_TOPIC}-{partition} has no leader yet"),
            ),
        }
    };
    if version >= 4 {
        FindCoordinatorResponse::default()
            .with_coordinators(req.coordinator_keys.iter().map(answer).collect())
    } else {
        let c = answer(&req.key);
        FindCoordinatorResponse::default()
            .with_error_code(c.error_code)
            .with_error_message(c.error_message)
            .with_node_id(c.node_id)
            .with_host(c.host)
            .with_port(c.port)
    }
}

/// The coordinator's error as the request version knows it (KIP-588's PRODUCER_FENCED
/// only for versions that have it).
fn code(e: TxnError, knows_producer_fenced: bool) -> i16 {
    e.for_version(knows_producer_fenced).code()
}

/// InitProducerId with a transactional id: the coordinator's producer id and a bumped
/// epoch, fencing the previous producer of that id (an open transaction of it is
/// aborted first; the client retries after CONCURRENT_TRANSACTIONS).
pub async fn init_producer_id(
    broker: &Arc<Broker>,
    req: InitProducerIdRequest,
    version: i16,
) -> InitProducerIdResponse {
    let failed = |code: i16| {
        InitProducerIdResponse::default()
            .with_error_code(code)
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1)
    };
    let tid = req
        .transactional_id
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    if let Err(e) = broker.txns.ensure_topic(broker).await {
        tracing::warn!(error = %e, "transaction coordinator not available");
        return failed(ResponseError::CoordinatorNotAvailable.code());
    }
    // Claimed before the coordinator's lock (a metadata write may be needed); unused
    // when the id exists already, as Kafka's blocks also leave ids unused.
    let claimed = match broker
        .producer_ids
        .generate(&broker.controller, broker.config.node_id)
        .await
    {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(error = %e, "cannot allocate a producer id");
            return failed(ResponseError::CoordinatorNotAvailable.code());
        }
    };
    let expected = (version >= 3 && req.producer_id.0 >= 0).then_some(ProducerIdAndEpoch {
        producer_id: req.producer_id.0,
        producer_epoch: req.producer_epoch,
    });
    let timeout_ms = req.transaction_timeout_ms;
    let result = txn_manager::run(broker, tid.clone(), move |st| {
        st.allocator_mut().0 = Some(claimed);
        let out = st.init_producer_id(&tid, timeout_ms, expected, now_ms());
        st.allocator_mut().0 = None;
        out
    })
    .await;
    match result {
        Ok(pe) => InitProducerIdResponse::default()
            .with_producer_id(ProducerId(pe.producer_id))
            .with_producer_epoch(pe.producer_epoch),
        Err(e) => failed(code(e, version >= 4)),
    }
}

/// AddPartitionsToTxn v0-v3 (one transaction, from its producer). Unknown partitions
/// fail the whole request (UNKNOWN_TOPIC_OR_PARTITION for them, OPERATION_NOT_ATTEMPTED
/// for the rest), as in Kafka.
pub async fn add_partitions_to_txn(
    broker: &Arc<Broker>,
    req: AddPartitionsToTxnRequest,
    version: i16,
    peer: std::net::SocketAddr,
) -> AddPartitionsToTxnResponse {
    if version >= 4 {
        return add_partitions_to_txn_batched(broker, req, peer).await;
    }
    let tid = req.v3_and_below_transactional_id.0.to_string();
    let producer_id = req.v3_and_below_producer_id.0;
    let producer_epoch = req.v3_and_below_producer_epoch;
    let wanted: Vec<(String, i32)> = req
        .v3_and_below_topics
        .iter()
        .flat_map(|t| t.partitions.iter().map(|p| (t.name.0.to_string(), *p)))
        .collect();
    let codes: Vec<i16> = if let Some(codes) = unaddable(broker, &wanted) {
        codes
    } else {
        let parts = wanted.clone();
        let result = txn_manager::run(broker, tid.clone(), move |st| {
            st.add_partitions(&tid, producer_id, producer_epoch, &parts, now_ms())
        })
        .await;
        let c = result.err().map_or(0, |e| code(e, version >= 2));
        vec![c; wanted.len()]
    };
    AddPartitionsToTxnResponse::default()
        .with_results_by_topic_v3_and_below(topic_results(wanted, codes))
}

/// When some of `wanted` cannot join a transaction, each partition's code: those
/// UNKNOWN_TOPIC_OR_PARTITION, the others OPERATION_NOT_ATTEMPTED (Kafka's answer).
/// A partition can join if it is the cluster's, wherever it is led (not only those
/// hosted here: the coordinator sends markers to other leaders); internal topics never
/// join.
fn unaddable(broker: &Broker, wanted: &[(String, i32)]) -> Option<Vec<i16>> {
    let image = broker.controller.image();
    let addable = |name: &str, p: i32| {
        name != OFFSETS_TOPIC
            && name != TRANSACTION_STATE_TOPIC
            && image
                .topic(name)
                .is_some_and(|t| t.partitions.contains_key(&p))
    };
    if wanted.iter().all(|(t, p)| addable(t, *p)) {
        return None;
    }
    Some(
        wanted
            .iter()
            .map(|(t, p)| {
                if addable(t, *p) {
                    ResponseError::OperationNotAttempted.code()
                } else {
                    ResponseError::UnknownTopicOrPartition.code()
                }
            })
            .collect(),
    )
}

/// Per-partition codes grouped by topic, in request order, as AddPartitionsToTxn
/// answers them.
fn topic_results(
    wanted: Vec<(String, i32)>,
    codes: Vec<i16>,
) -> Vec<AddPartitionsToTxnTopicResult> {
    let mut topics: Vec<AddPartitionsToTxnTopicResult> = Vec::new();
    for ((topic, p), c) in wanted.into_iter().zip(codes) {
        let r = AddPartitionsToTxnPartitionResult::default()
            .with_partition_index(p)
            .with_partition_error_code(c);
        match topics.last_mut() {
            Some(t) if &*t.name.0 == topic.as_str() => t.results_by_partition.push(r),
            _ => topics.push(
                AddPartitionsToTxnTopicResult::default()
                    .with_name(super::topic_name(&topic))
                    .with_results_by_partition(vec![r]),
            ),
        }
    }
    topics
}

/// AddPartitionsToTxn v4, the brokers' batched form (KIP-890 part 1): from a partition
/// leader that verifies a transactional batch before appending it. With verify_only,
/// each partition's code says whether it is in the producer's ongoing transaction (0),
/// not added (INVALID_TXN_STATE) or why not (fenced, unknown id, not coordinator);
/// nothing is written. Without it, the partitions are added as v3 adds them. Only
/// registered brokers may send it (Kafka requires CLUSTER_ACTION):
/// CLUSTER_AUTHORIZATION_FAILED otherwise.
async fn add_partitions_to_txn_batched(
    broker: &Arc<Broker>,
    req: AddPartitionsToTxnRequest,
    peer: std::net::SocketAddr,
) -> AddPartitionsToTxnResponse {
    use kafka_protocol::messages::add_partitions_to_txn_response::AddPartitionsToTxnResult;
    if !peer_is_broker(broker, peer, "AddPartitionsToTxn v4").await {
        return AddPartitionsToTxnResponse::default()
            .with_error_code(ResponseError::ClusterAuthorizationFailed.code());
    }
    let mut results = Vec::with_capacity(req.transactions.len());
    for t in &req.transactions {
        let tid = t.transactional_id.0.to_string();
        let wanted: Vec<(String, i32)> = t
            .topics
            .iter()
            .flat_map(|topic| {
                let name = topic.name.0.to_string();
                topic.partitions.iter().map(move |p| (name.clone(), *p))
            })
            .collect();
        // Verify-only asks about internal partitions too (TxnOffsetCommit's
        // `__consumer_offsets`); adding takes what v3 takes.
        let codes: Vec<i16> = if t.verify_only {
            let st = broker.txns.lock();
            st.verify_partitions(&tid, t.producer_id.0, t.producer_epoch, &wanted)
                .into_iter()
                .map(|(_, r)| r.err().map_or(0, |e| code(e, true)))
                .collect()
        } else if let Some(codes) = unaddable(broker, &wanted) {
            codes
        } else {
            let parts = wanted.clone();
            let (pid, epoch) = (t.producer_id.0, t.producer_epoch);
            let id = tid.clone();
            let result = txn_manager::run(broker, tid.clone(), move |st| {
                st.add_partitions(&id, pid, epoch, &parts, now_ms())
            })
            .await;
            vec![result.err().map_or(0, |e| code(e, true)); wanted.len()]
        };
        let topics = topic_results(wanted, codes);
        results.push(
            AddPartitionsToTxnResult::default()
                .with_transactional_id(t.transactional_id.clone())
                .with_topic_results(topics),
        );
    }
    AddPartitionsToTxnResponse::default().with_results_by_transaction(results)
}

/// AddOffsetsToTxn: the group's `__consumer_offsets` partition joins the transaction.
pub async fn add_offsets_to_txn(
    broker: &Arc<Broker>,
    req: AddOffsetsToTxnRequest,
    version: i16,
) -> AddOffsetsToTxnResponse {
    let tid = req.transactional_id.0.to_string();
    let group = req.group_id.0.to_string();
    if group.is_empty() {
        return AddOffsetsToTxnResponse::default()
            .with_error_code(ResponseError::InvalidGroupId.code());
    }
    let partition = partition_for_group(&group, broker.groups.partitions());
    let result = txn_manager::run(broker, tid.clone(), move |st| {
        st.add_offsets(
            &tid,
            req.producer_id.0,
            req.producer_epoch,
            partition,
            now_ms(),
        )
    })
    .await;
    AddOffsetsToTxnResponse::default()
        .with_error_code(result.err().map_or(0, |e| code(e, version >= 2)))
}

/// EndTxn: PrepareCommit/PrepareAbort is written and replicated, then the markers, then
/// CompleteCommit/CompleteAbort. The answer waits for the Prepare* record's replication
/// and, when every marker is written here and replicated at once (one node), for the
/// Complete* record too. Markers that take longer, or go to other brokers, finish in the
/// background, and the transaction stays in Prepare* until they do: the producer's next
/// AddPartitionsToTxn gets CONCURRENT_TRANSACTIONS (retriable) meanwhile, as in Kafka. A
/// marker that cannot be written leaves the transaction in Prepare*; the answer is still
/// a success (the decision is durable and the ticker finishes it), as in Kafka.
pub async fn end_txn(broker: &Arc<Broker>, req: EndTxnRequest, version: i16) -> EndTxnResponse {
    let tid = req.transactional_id.0.to_string();
    let result = if req.committed {
        TxnResult::Commit
    } else {
        TxnResult::Abort
    };
    let outcome = txn_manager::run(broker, tid.clone(), move |st| {
        st.end_txn(
            &tid,
            req.producer_id.0,
            req.producer_epoch,
            result,
            now_ms(),
        )
    })
    .await;
    EndTxnResponse::default()
        .with_error_code(outcome.err().map_or(0, |e| code(e, version >= 2)))
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1)
}

/// TxnOffsetCommit: the offsets are written to the group's `__consumer_offsets`
/// partition as transactional records of the producer and become the group's committed
/// offsets only when the COMMIT marker is written (dropped on ABORT). The transaction
/// must hold that partition (AddOffsetsToTxn first).
pub async fn txn_offset_commit(
    broker: &Arc<Broker>,
    req: TxnOffsetCommitRequest,
    version: i16,
) -> TxnOffsetCommitResponse {
    let tid = req.transactional_id.0.to_string();
    let group = req.group_id.0.to_string();
    let producer_id = req.producer_id.0;
    let producer_epoch = req.producer_epoch;
    let offsets_partition = partition_for_group(&group, broker.groups.partitions());
    let member_id = req.member_id.to_string();
    let instance_id = req.group_instance_id.as_ref().map(|s| s.to_string());
    let generation_id = req.generation_id;
    // KIP-890 part 1 with another broker's transaction coordinator: verified there
    // first, then written under the offsets partition's verification guard.
    let state_partition = ferrite_coordinator::txn::partition_for(&tid, broker.txns.partitions());
    let mut verified: Option<crate::replica_manager::TxnWrite> = None;
    if crate::txn_manager::coordinated_elsewhere(broker, state_partition) {
        match verify_offsets_elsewhere(broker, &tid, producer_id, producer_epoch, offsets_partition)
            .await
        {
            Ok(v) => verified = Some(v),
            Err(c) if c == ResponseError::ProducerFenced.code() && version < 3 => {
                return txn_offset_commit_failed(&req, ResponseError::InvalidProducerEpoch.code())
            }
            Err(c) => return txn_offset_commit_failed(&req, c),
        }
    }
    let b = broker.clone();
    let topics = req.topics.clone();
    type Written = (Vec<Vec<i16>>, Option<crate::group_manager::GroupWrite>);
    let result: Result<Written, i16> = tokio::task::spawn_blocking(move || {
        let st = b.txns.lock();
        let txn_write = match verified {
            Some(v) => v,
            None => {
                let check = st
                    .verify_partitions(
                        &tid,
                        producer_id,
                        producer_epoch,
                        &[(OFFSETS_TOPIC.to_string(), offsets_partition)],
                    )
                    .into_iter()
                    .next()
                    .map_or(Err(TxnError::InvalidRequest), |(_, r)| r);
                match check {
                    Ok(()) => crate::replica_manager::TxnWrite::Producer(producer_id),
                    // The transaction's coordinator moved to another broker since the
                    // check above: retried, then verified there.
                    Err(TxnError::NotCoordinator)
                        if crate::txn_manager::coordinated_elsewhere(
                            &b,
                            st.partition_for(&tid),
                        ) =>
                    {
                        return Err(ResponseError::CoordinatorNotAvailable.code())
                    }
                    // Not added: Kafka's coordinator answers INVALID_TXN_STATE too.
                    Err(e) => return Err(code(e, version >= 3)),
                }
            }
        };
        let now = now_ms();
        let mut groups = b.groups.lock();
        groups.check(&b, &group).map_err(|e| e.code())?;
        validate_txn_offset_commit_state(
            &groups.coordinator,
            &group,
            &member_id,
            instance_id.as_deref(),
            generation_id,
        )?;
        let mut codes = Vec::new();
        let mut records = Vec::new();
        let image = b.controller.image();
        for t in &topics {
            let name = t.name.0.to_string();
            let known = image.topic(&name);
            let mut pcodes = Vec::new();
            for p in &t.partitions {
                if !known.is_some_and(|t| t.partitions.contains_key(&p.partition_index)) {
                    pcodes.push(ResponseError::UnknownTopicOrPartition.code());
                    continue;
                }
                let metadata = p.committed_metadata.as_ref().map(|m| m.to_string());
                if metadata
                    .as_ref()
                    .is_some_and(|m| m.len() > b.config.group.offset_metadata_bytes_max)
                {
                    pcodes.push(ResponseError::OffsetMetadataTooLarge.code());
                    continue;
                }
                records.push(GroupRecord::Offset {
                    group: group.clone(),
                    topic: name.clone(),
                    partition: p.partition_index,
                    value: Some(OffsetValue {
                        offset: p.committed_offset,
                        leader_epoch: p.committed_leader_epoch,
                        metadata: Some(metadata.unwrap_or_default()),
                        commit_timestamp_ms: now,
                    }),
                });
                pcodes.push(0);
            }
            codes.push(pcodes);
        }
        let write = groups
            .write_txn_offsets(&b, records, producer_id, producer_epoch, now, txn_write)
            .map_err(|e| {
                tracing::warn!(%group, error = %e, "cannot write transactional offsets");
                e.offset_commit_code()
            })?;
        drop(st);
        Ok((codes, write))
    })
    .await
    .unwrap_or(Err(ResponseError::NotCoordinator.code()));
    // acks=all, as an OffsetCommit: answered once every in-sync replica has the offsets.
    let result = match result {
        Ok((codes, Some(w))) => match w.wait().await {
            Ok(()) => Ok(codes),
            Err(e) => {
                tracing::warn!(group = %req.group_id.0.as_str(), error = %e, "transactional offsets not replicated");
                Err(e.offset_commit_code())
            }
        },
        Ok((codes, None)) => Ok(codes),
        Err(c) => Err(c),
    };
    let topics = req
        .topics
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let partitions = t
                .partitions
                .iter()
                .enumerate()
                .map(|(j, p)| {
                    let c = match &result {
                        Err(c) => *c,
                        Ok(codes) => codes.get(i).and_then(|c| c.get(j)).copied().unwrap_or(0),
                    };
                    TxnOffsetCommitResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(c)
                })
                .collect();
            TxnOffsetCommitResponseTopic::default()
                .with_name(t.name.clone())
                .with_partitions(partitions)
        })
        .collect();
    TxnOffsetCommitResponse::default().with_topics(topics)
}

/// TxnOffsetCommit's verification with another broker's transaction coordinator: the
/// offsets partition's verification guard, then AddPartitionsToTxn verify-only there.
/// The write to pass on, or the code to answer: INVALID_TXN_STATE (AddOffsetsToTxn not
/// done), the fencing codes, NOT_COORDINATOR (the offsets partition is not led here),
/// or COORDINATOR_NOT_AVAILABLE for a verification that could not be made (retried).
async fn verify_offsets_elsewhere(
    broker: &Arc<Broker>,
    tid: &str,
    producer_id: i64,
    producer_epoch: i16,
    offsets_partition: i32,
) -> Result<crate::replica_manager::TxnWrite, i16> {
    use crate::replica_manager::TxnWrite;
    let Some(p) = broker.replicas.get(OFFSETS_TOPIC, offsets_partition) else {
        return Err(ResponseError::NotCoordinator.code());
    };
    let guard = match p.begin_txn_verification(producer_id, now_ms()) {
        Ok(g) => g,
        Err(e) => {
            let c = crate::error::produce_error_code(&e);
            return Err(if c == ResponseError::NotLeaderOrFollower.code() {
                ResponseError::NotCoordinator.code()
            } else {
                ResponseError::CoordinatorNotAvailable.code()
            });
        }
    };
    if guard.is_none() {
        // Ongoing in the offsets partition already; the write checks it still is.
        return Ok(TxnWrite::Verified {
            producer_id,
            guard: None,
        });
    }
    let partition = [(OFFSETS_TOPIC.to_string(), offsets_partition)];
    let c =
        match txn_manager::verify_elsewhere(broker, tid, producer_id, producer_epoch, &partition)
            .await
        {
            Ok(codes) => codes
                .first()
                .copied()
                .unwrap_or(ResponseError::NetworkException.code()),
            Err(c) => c,
        };
    if c == 0 {
        return Ok(TxnWrite::Verified { producer_id, guard });
    }
    tracing::debug!(transactional_id = %tid, producer_id, code = c, "transactional offsets not verified");
    if crate::error::verification_produce_code(c) == ResponseError::NotEnoughReplicas.code() {
        Err(ResponseError::CoordinatorNotAvailable.code())
    } else {
        Err(c)
    }
}

/// A TxnOffsetCommit answer with `code` for every partition.
fn txn_offset_commit_failed(req: &TxnOffsetCommitRequest, code: i16) -> TxnOffsetCommitResponse {
    let topics = req
        .topics
        .iter()
        .map(|t| {
            TxnOffsetCommitResponseTopic::default()
                .with_name(t.name.clone())
                .with_partitions(
                    t.partitions
                        .iter()
                        .map(|p| {
                            TxnOffsetCommitResponsePartition::default()
                                .with_partition_index(p.partition_index)
                                .with_error_code(code)
                        })
                        .collect(),
                )
        })
        .collect();
    TxnOffsetCommitResponse::default().with_topics(topics)
}

/// DescribeTransactions (what `kafka-transactions.sh describe` sends to the id's
/// coordinator): each id's state, timeout, start time, producer id and epoch and the
/// partitions of its current transaction, from the coordinator's memory.
pub async fn describe_transactions(
    broker: &Arc<Broker>,
    req: DescribeTransactionsRequest,
) -> DescribeTransactionsResponse {
    use kafka_protocol::messages::describe_transactions_response::{TopicData, TransactionState};
    let b = broker.clone();
    let states = tokio::task::spawn_blocking(move || {
        let st = b.txns.lock();
        req.transactional_ids
            .into_iter()
            .map(|id| {
                let state = TransactionState::default()
                    .with_transactional_id(id.clone())
                    .with_transaction_state(str_bytes(""))
                    .with_transaction_start_time_ms(-1)
                    .with_producer_id(ProducerId(-1))
                    .with_producer_epoch(-1);
                match st.describe(&id.0) {
                    Err(e) => state.with_error_code(e.code()),
                    Ok(m) => {
                        let mut topics: Vec<TopicData> = Vec::new();
                        for (topic, p) in &m.partitions {
                            match topics.last_mut() {
                                Some(t) if &*t.topic.0 == topic.as_str() => t.partitions.push(*p),
                                _ => topics.push(
                                    TopicData::default()
                                        .with_topic(super::topic_name(topic))
                                        .with_partitions(vec![*p]),
                                ),
                            }
                        }
                        state
                            .with_transaction_state(str_bytes(m.state.as_str()))
                            .with_transaction_timeout_ms(m.txn_timeout_ms)
                            .with_transaction_start_time_ms(m.txn_start_timestamp_ms)
                            .with_producer_id(ProducerId(m.producer_id))
                            .with_producer_epoch(m.producer_epoch)
                            .with_topics(topics)
                    }
                }
            })
            .collect::<Vec<_>>()
    })
    .await;
    match states {
        Ok(states) => DescribeTransactionsResponse::default().with_transaction_states(states),
        Err(e) => {
            tracing::error!(error = %e, "DescribeTransactions task failed");
            DescribeTransactionsResponse::default()
        }
    }
}

/// ListTransactions: the transactional ids this broker coordinates, filtered by state,
/// producer id and (v1, KIP-994) how long the transaction has run. Admin clients ask
/// every broker and merge the answers.
pub async fn list_transactions(
    broker: &Arc<Broker>,
    req: ListTransactionsRequest,
) -> ListTransactionsResponse {
    use kafka_protocol::messages::list_transactions_response::TransactionState;
    let b = broker.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let st = b.txns.lock();
        let states: Vec<String> = req.state_filters.iter().map(|s| s.to_string()).collect();
        let producer_ids: Vec<i64> = req.producer_id_filters.iter().map(|p| p.0).collect();
        match st.list_transactions(&states, &producer_ids, req.duration_filter, now_ms()) {
            Err(e) => ListTransactionsResponse::default().with_error_code(e.code()),
            Ok((listed, unknown)) => ListTransactionsResponse::default()
                .with_unknown_state_filters(unknown.into_iter().map(str_bytes).collect())
                .with_transaction_states(
                    listed
                        .into_iter()
                        .map(|m| {
                            TransactionState::default()
                                .with_transactional_id(TransactionalId(str_bytes(
                                    m.transactional_id.as_str(),
                                )))
                                .with_producer_id(ProducerId(m.producer_id))
                                .with_transaction_state(str_bytes(m.state.as_str()))
                        })
                        .collect(),
                ),
        }
    })
    .await;
    answer.unwrap_or_else(|e| {
        tracing::error!(error = %e, "ListTransactions task failed");
        ListTransactionsResponse::default()
            .with_error_code(ResponseError::UnknownServerError.code())
    })
}

/// WriteTxnMarkers v1, from another broker's transaction coordinator: each marker into
/// each of its partitions led here (`txn_manager::write_marker_here`), answered once
/// the ISR has it (acks=all, as Kafka; NOT_ENOUGH_REPLICAS_AFTER_APPEND or
/// REQUEST_TIMED_OUT otherwise, which the coordinator retries). Only a registered
/// broker's address may send it (the peer's IP against the image's broker endpoints'
/// hosts); anyone else gets CLUSTER_AUTHORIZATION_FAILED for every partition.
pub async fn write_txn_markers(
    broker: &Arc<Broker>,
    req: WriteTxnMarkersRequest,
    peer: std::net::SocketAddr,
) -> WriteTxnMarkersResponse {
    use kafka_protocol::messages::write_txn_markers_response::{
        WritableTxnMarkerPartitionResult, WritableTxnMarkerResult, WritableTxnMarkerTopicResult,
    };
    type Waiting = Vec<(
        (usize, usize, usize),
        Arc<crate::replica_manager::Partition>,
        crate::replica_manager::ProduceWaiter,
    )>;
    let authorized = peer_is_broker(broker, peer, "WriteTxnMarkers").await;
    let b = broker.clone();
    let written = tokio::task::spawn_blocking(move || {
        let now = now_ms();
        let mut waiting: Waiting = Vec::new();
        let markers = req
            .markers
            .iter()
            .enumerate()
            .map(|(mi, m)| {
                let result = if m.transaction_result {
                    TxnResult::Commit
                } else {
                    TxnResult::Abort
                };
                let topics = m
                    .topics
                    .iter()
                    .enumerate()
                    .map(|(ti, t)| {
                        let partitions = t
                            .partition_indexes
                            .iter()
                            .enumerate()
                            .map(|(pi, p)| {
                                let code = if !authorized {
                                    ResponseError::ClusterAuthorizationFailed.code()
                                } else {
                                    match crate::txn_manager::write_marker_here(
                                        &b,
                                        &t.name.0,
                                        *p,
                                        m.producer_id.0,
                                        m.producer_epoch,
                                        result,
                                        m.coordinator_epoch,
                                        now,
                                    ) {
                                        Ok((partition, waiter)) => {
                                            waiting.push(((mi, ti, pi), partition, waiter));
                                            0
                                        }
                                        Err(e) => e.code(),
                                    }
                                };
                                WritableTxnMarkerPartitionResult::default()
                                    .with_partition_index(*p)
                                    .with_error_code(code)
                            })
                            .collect();
                        WritableTxnMarkerTopicResult::default()
                            .with_name(t.name.clone())
                            .with_partitions(partitions)
                    })
                    .collect();
                WritableTxnMarkerResult::default()
                    .with_producer_id(m.producer_id)
                    .with_topics(topics)
            })
            .collect::<Vec<_>>();
        (markers, waiting)
    })
    .await;
    let (mut markers, waiting) = match written {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "WriteTxnMarkers task failed");
            return WriteTxnMarkersResponse::default();
        }
    };
    for ((mi, ti, pi), partition, waiter) in waiting {
        if let Err(e) = partition.wait(waiter).await {
            let slot = markers
                .get_mut(mi)
                .and_then(|m| m.topics.get_mut(ti))
                .and_then(|t| t.partitions.get_mut(pi));
            if let Some(slot) = slot {
                slot.error_code = crate::error::replication_error_code(&e);
            }
        }
    }
    WriteTxnMarkersResponse::default().with_markers(markers)
}

/// Whether `peer` is the address of a registered broker (an endpoint's host, resolved).
async fn peer_is_broker(broker: &Broker, peer: std::net::SocketAddr, what: &str) -> bool {
    let hosts: Vec<(String, u16)> = broker
        .controller
        .image()
        .brokers()
        .flat_map(|b| b.endpoints.iter().map(|e| (e.host.clone(), e.port)))
        .collect();
    for (host, port) in hosts {
        if let Ok(mut addrs) = tokio::net::lookup_host((host.as_str(), port)).await {
            if addrs.any(|a| a.ip() == peer.ip()) {
                return true;
            }
        }
    }
    tracing::warn!(%peer, "{what} from an address that is no registered broker's");
    false
}
