//! Produce: validate each partition's batches and append them in one write. Records are
//! never decoded here; storage checks the batch headers and CRCs.
//!
//! acks=0 gets no answer, acks=1 is answered after the leader's append, acks=-1 (all)
//! once every ISR member has the batch: the partition's purgatory completes a waiter
//! when the high watermark reaches it (a follower's fetch), refuses it with
//! NOT_ENOUGH_REPLICAS_AFTER_APPEND when the ISR shrinks below `min.insync.replicas`,
//! or REQUEST_TIMED_OUT at the request's `timeout_ms`. With fewer in-sync replicas than
//! `min.insync.replicas` nothing is appended: NOT_ENOUGH_REPLICAS.

use std::collections::HashMap;
use std::sync::Arc;

use kafka_protocol::messages::produce_response::{
    LeaderIdAndEpoch, PartitionProduceResponse, TopicProduceResponse,
};
use kafka_protocol::messages::{BrokerId, ProduceRequest, ProduceResponse};
use kafka_protocol::ResponseError;

use super::str_bytes;
use crate::error::{
    produce_error_code, recompress_error_code, replication_error_code, verification_produce_code,
};
use crate::replica_manager::{Partition, ProduceWaiter, TxnWrite};
use crate::{now_ms, Broker};

/// Returns `None` for acks=0, which gets no response.
pub async fn handle(
    broker: &Arc<Broker>,
    req: ProduceRequest,
    version: i16,
) -> Option<ProduceResponse> {
    let acks = req.acks;
    let acks_valid = matches!(acks, -1..=1);
    let now = now_ms();
    let timeout_ms = i64::from(req.timeout_ms.max(0));
    let mut responses = Vec::with_capacity(req.topic_data.len());
    // acks=all appends, answered once the purgatory completes them: (topic, partition
    // position, partition, waiter).
    let mut waiting: Vec<(usize, usize, Arc<Partition>, ProduceWaiter)> = Vec::new();
    let transactional_id = req.transactional_id.as_ref().map(|t| t.0.to_string());
    let mut verified = match (&transactional_id, acks_valid) {
        (Some(tid), true) => verify_with_coordinator(broker, &req, tid, now).await,
        _ => HashMap::new(),
    };
    for topic in req.topic_data {
        let name = topic.name.0.to_string();
        let mut partition_responses = Vec::with_capacity(topic.partition_data.len());
        for pd in topic.partition_data {
            let mut resp = PartitionProduceResponse::default()
                .with_index(pd.index)
                .with_base_offset(-1)
                .with_log_append_time_ms(-1)
                .with_log_start_offset(-1);
            let result = if !acks_valid {
                Err((
                    ResponseError::InvalidRequiredAcks.code(),
                    format!("acks must be 0, 1 or -1, got {acks}"),
                    None,
                ))
            } else {
                append_partition(
                    broker,
                    &name,
                    pd.index,
                    pd.records.as_deref(),
                    now,
                    acks,
                    timeout_ms,
                    transactional_id.as_deref(),
                    verified.remove(&(name.clone(), pd.index)),
                )
            };
            match result {
                Ok((info, waiter)) => {
                    resp = resp
                        .with_base_offset(info.base_offset)
                        .with_log_append_time_ms(info.log_append_time_ms)
                        .with_log_start_offset(info.log_start_offset);
                    if let Some((p, waiter)) = waiter {
                        waiting.push((responses.len(), partition_responses.len(), p, waiter));
                    }
                }
                Err((code, message, leader)) => {
                    tracing::debug!(topic = %name, partition = pd.index, code, %message, "produce rejected");
                    resp = resp
                        .with_error_code(code)
                        .with_error_message(Some(str_bytes(message)));
                    if let (Some(p), true) = (leader, version >= 10) {
                        resp = resp.with_current_leader(current_leader(&p));
                    }
                }
            }
            partition_responses.push(resp);
        }
        responses.push(
            TopicProduceResponse::default()
                .with_name(topic.name)
                .with_partition_responses(partition_responses),
        );
    }
    // Every waiter runs at once; each ends by its own deadline at the latest.
    let results = futures::future::join_all(
        waiting
            .into_iter()
            .map(|(t, i, p, w)| async move { (t, i, p.wait(w).await, p) }),
    )
    .await;
    for (t, i, result, p) in results {
        let Err(e) = result else { continue };
        let Some(resp) = responses
            .get_mut(t)
            .and_then(|t| t.partition_responses.get_mut(i))
        else {
            continue;
        };
        let code = replication_error_code(&e);
        tracing::debug!(topic = %p.topic, partition = p.index, code, error = %e, "acks=all produce not acknowledged");
        resp.error_code = code;
        resp.error_message = Some(str_bytes(e.to_string()));
        resp.base_offset = -1;
        resp.log_append_time_ms = -1;
        if version >= 10 && code == ResponseError::NotLeaderOrFollower.code() {
            resp.current_leader = current_leader(&p);
        }
    }
    if acks == 0 {
        return None;
    }
    Some(ProduceResponse::default().with_responses(responses))
}

/// KIP-951: where the client should send next, as this broker's metadata knows it.
fn current_leader(p: &Partition) -> LeaderIdAndEpoch {
    LeaderIdAndEpoch::default()
        .with_leader_id(BrokerId(p.leader_id()))
        .with_leader_epoch(p.leader_epoch())
}

type Appended = (
    ferrite_storage::AppendInfo,
    Option<(Arc<Partition>, ProduceWaiter)>,
);

#[allow(clippy::too_many_arguments)]
fn append_partition(
    broker: &Arc<Broker>,
    topic: &str,
    partition: i32,
    records: Option<&[u8]>,
    now: i64,
    acks: i16,
    timeout_ms: i64,
    transactional_id: Option<&str>,
    verified: Option<Result<TxnWrite, i16>>,
) -> Result<Appended, (i16, String, Option<Arc<Partition>>)> {
    if topic == crate::group_manager::OFFSETS_TOPIC
        || topic == ferrite_coordinator::txn::TRANSACTION_STATE_TOPIC
    {
        // Only the group coordinator writes its internal topic.
        return Err((
            ResponseError::InvalidTopicException.code(),
            format!("cannot produce to internal topic {topic}"),
            None,
        ));
    }
    let Some(p) = broker.replicas.get(topic, partition) else {
        return Err((
            ResponseError::UnknownTopicOrPartition.code(),
            format!("{topic}-{partition} is not hosted here"),
            None,
        ));
    };
    let records = records.unwrap_or_default();
    // Topic compression.type other than `producer` (recompress.rs); the default keeps the
    // producer's bytes and never decodes them.
    let codec = p.log().config().recompress_codec;
    let recompressed = match codec {
        Some(codec) => crate::recompress::recompress(records, codec)
            .map_err(|e| (recompress_error_code(&e), e.to_string(), None))?,
        None => None,
    };
    let records = recompressed.as_deref().unwrap_or(records);
    // A transactional batch is accepted only for a partition the coordinator has in
    // the producer's ongoing transaction (KIP-890 part 1). With the coordinator here it
    // is checked and appended under the coordinator's lock, so that no EndTxn can
    // complete the transaction in between: a late batch can never open a transaction
    // that no marker will close (KAFKA-17754). With the coordinator on another broker
    // it was verified there (`verify_with_coordinator`) and is appended under this
    // partition's verification guard, which a marker voids.
    // Only well-formed batches get here: malformed bytes with the transactional bit set
    // are CORRUPT_MESSAGE from the append below, as any other malformed batch.
    let header = ferrite_storage::BatchHeader::parse(records).ok();
    let transactional = header
        .is_some_and(|h| h.attributes & ferrite_storage::batch::ATTR_TRANSACTIONAL != 0)
        && producer_batches_valid(records);
    let mut txn = header.map_or(TxnWrite::None, |h| TxnWrite::of_header(&h));
    let _coordinator = if let (true, Some(h)) = (transactional, header) {
        let Some(tid) = transactional_id else {
            return Err((
                ResponseError::TransactionalIdNotFound.code(),
                "a transactional batch needs the request's transactional id".to_string(),
                None,
            ));
        };
        match verified {
            Some(Ok(v)) => {
                txn = v;
                None
            }
            Some(Err(code)) => {
                // KIP-951: a leader change seen while verifying still says where to go.
                let leader = (code == ResponseError::NotLeaderOrFollower.code()).then_some(p);
                return Err((
                    code,
                    format!(
                        "transactional batch refused for {topic}-{partition}: its coordinator \
                         did not verify it (error {code})"
                    ),
                    leader,
                ));
            }
            None => {
                let st = broker.txns.lock();
                let check = st
                    .verify_partitions(
                        tid,
                        h.producer_id,
                        h.producer_epoch,
                        &[(topic.to_string(), partition)],
                    )
                    .into_iter()
                    .next()
                    .map_or(
                        Err(ferrite_coordinator::txn::TxnError::InvalidRequest),
                        |(_, r)| r,
                    );
                if let Err(e) = check {
                    let e = e.for_version(false);
                    let code = match e {
                        // The coordinator moved to another broker since this request
                        // was verified: retried, then verified there.
                        ferrite_coordinator::txn::TxnError::NotCoordinator => {
                            verification_produce_code(e.code())
                        }
                        _ => e.code(),
                    };
                    return Err((
                        code,
                        format!("transactional batch refused for {topic}-{partition}: {e}"),
                        None,
                    ));
                }
                Some(st)
            }
        }
    } else {
        None
    };
    match p.append_as_leader_txn(records, now, acks, timeout_ms, txn) {
        Ok((info, waiter)) => Ok((info, waiter.map(|w| (p, w)))),
        Err(e) => {
            let code = produce_error_code(&e);
            let leader = (code == ResponseError::NotLeaderOrFollower.code()).then_some(p);
            Err((code, e.to_string(), leader))
        }
    }
}

/// Each partition's verification result: the [`TxnWrite`] its append passes, or the
/// code it is answered with.
type Verified = HashMap<(String, i32), Result<TxnWrite, i16>>;

/// KIP-890 part 1 for a transaction another broker coordinates: for each partition
/// with a transactional batch, led here, whose producer has no transaction ongoing
/// here, starts the partition's verification (its guard) and asks the coordinator, one
/// AddPartitionsToTxn verify-only for all of them. Empty when the coordinator is this
/// broker (checked under its lock at the append) or has no leader (refused there).
async fn verify_with_coordinator(
    broker: &Arc<Broker>,
    req: &ProduceRequest,
    transactional_id: &str,
    now: i64,
) -> Verified {
    let state_partition =
        ferrite_coordinator::txn::partition_for(transactional_id, broker.txns.partitions());
    let mut out = Verified::new();
    if !crate::txn_manager::coordinated_elsewhere(broker, state_partition) {
        return out;
    }
    // By producer id and epoch (one, from a well-behaved client): the partitions to ask
    // about and their guards.
    type Guarded = Vec<((String, i32), u64)>;
    let mut ask: HashMap<(i64, i16), Guarded> = HashMap::new();
    for topic in &req.topic_data {
        for pd in &topic.partition_data {
            let key = (topic.name.0.to_string(), pd.index);
            let Some(records) = pd.records.as_deref() else {
                continue;
            };
            // The header only: the append validates the batches (a malformed one is
            // CORRUPT_MESSAGE there), and a guard costs nothing until it is used.
            let Ok(h) = ferrite_storage::BatchHeader::parse(records) else {
                continue;
            };
            if h.attributes & ferrite_storage::batch::ATTR_TRANSACTIONAL == 0 {
                continue;
            }
            // Not hosted here: the append answers it.
            let Some(p) = broker.replicas.get(&key.0, key.1) else {
                continue;
            };
            match p.begin_txn_verification(h.producer_id, now) {
                // Ongoing here: the append checks that it still is.
                Ok(None) => {
                    out.insert(
                        key,
                        Ok(TxnWrite::Verified {
                            producer_id: h.producer_id,
                            guard: None,
                        }),
                    );
                }
                Ok(Some(guard)) => ask
                    .entry((h.producer_id, h.producer_epoch))
                    .or_default()
                    .push((key, guard)),
                Err(e) => {
                    out.insert(key, Err(produce_error_code(&e)));
                }
            }
        }
    }
    for ((producer_id, producer_epoch), partitions) in ask {
        let keys: Vec<(String, i32)> = partitions.iter().map(|(k, _)| k.clone()).collect();
        let codes = crate::txn_manager::verify_elsewhere(
            broker,
            transactional_id,
            producer_id,
            producer_epoch,
            &keys,
        )
        .await;
        for (i, (key, guard)) in partitions.into_iter().enumerate() {
            let code = match &codes {
                Ok(c) => c
                    .get(i)
                    .copied()
                    .unwrap_or(ResponseError::NetworkException.code()),
                Err(c) => *c,
            };
            let result = if code == 0 {
                Ok(TxnWrite::Verified {
                    producer_id,
                    guard: Some(guard),
                })
            } else {
                tracing::debug!(topic = %key.0, partition = key.1, producer_id, code, "transaction verification refused");
                Err(verification_produce_code(code))
            };
            out.insert(key, result);
        }
    }
    out
}

/// `records` is one or more complete, valid producer batches (length, CRC, dense
/// offsets), the check the log's append makes.
fn producer_batches_valid(mut records: &[u8]) -> bool {
    if records.is_empty() {
        return false;
    }
    while !records.is_empty() {
        let Some(len) = ferrite_storage::BatchHeader::parse(records)
            .ok()
            .and_then(|h| h.total_bytes().ok())
        else {
            return false;
        };
        let (Some(batch), Some(rest)) = (records.get(..len), records.get(len..)) else {
            return false;
        };
        if ferrite_storage::batch::validate_producer_batch(batch).is_err() {
            return false;
        }
        records = rest;
    }
    true
}
