//! Fetch: whole batches straight from the segment files, long-polled until `min_bytes`
//! arrive or `max_wait_ms` passes. Woken by appends (watch channels), not by timers.
//!
//! With `fetch.zero.copy.enable` (the default) the records are not read at all here:
//! each partition's batches are located by their headers and the response carries
//! file regions that the connection writes with `sendfile`. Otherwise they are copied
//! once into memory.
//!
//! A consumer (replica id -1) reads only below the high watermark. It reads from the
//! leader, or, with Fetch v11+ (which carries the client's rack, Kafka's "client
//! metadata"), from a follower too, below the follower's high watermark (KIP-392). With
//! `replica.selector.class` rack-aware, the leader answers a consumer in another rack
//! with no records and the in-sync follower of its rack as `PreferredReadReplica`.
//!
//! A follower (its broker id: `ReplicaId` before v15, `ReplicaState` from v15, KIP-903)
//! reads to the log end; its fetch offset is its log end offset, which the
//! leader records to advance the high watermark (and acknowledge acks=all produces).
//! A follower whose `LastFetchedEpoch` (v12+) diverges from the leader's log gets
//! `DivergingEpoch` and no records (KIP-320), and truncates.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::select_all;
use kafka_protocol::messages::fetch_request::FetchPartition;
use kafka_protocol::messages::fetch_response::{
    AbortedTransaction, EpochEndOffset, FetchableTopicResponse, LeaderIdAndEpoch, PartitionData,
};
use kafka_protocol::messages::{BrokerId, FetchRequest, FetchResponse, ProducerId, TopicName};
use kafka_protocol::ResponseError;
use tokio::sync::watch;

use super::topic_name;
use crate::config::limits;
use crate::error::storage_error_code;
use crate::replica_manager::Partition;
use crate::Broker;
use ferrite_storage::FileRegion;

struct Wanted {
    topic: TopicName,
    topic_id: uuid::Uuid,
    partitions: Vec<(FetchPartition, Option<Arc<Partition>>, i16)>,
}

/// Who fetches.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fetcher {
    Consumer,
    /// A consumer with isolation_level=1 (read_committed): reads below the last stable
    /// offset and gets the aborted transactions in range (clients drop their batches;
    /// the broker never filters records, so zero-copy stays).
    ConsumerCommitted,
    Follower,
}

/// The response, and the file regions its placeholders stand for (empty when copying).
pub async fn handle(
    broker: &Arc<Broker>,
    req: FetchRequest,
    version: i16,
) -> (FetchResponse, Vec<FileRegion>) {
    let zero_copy = broker.config.fetch_zero_copy;
    let image = broker.controller.image();
    let (replica_id, replica_epoch) = if version >= 15 {
        (
            req.replica_state.replica_id.0,
            req.replica_state.replica_epoch,
        )
    } else {
        (req.replica_id.0, -1)
    };
    // Negative ids are consumers (-1) and tools reading like one.
    let fetcher = if replica_id >= 0 {
        Fetcher::Follower
    } else if req.isolation_level == 1 {
        Fetcher::ConsumerCommitted
    } else {
        Fetcher::Consumer
    };
    // KIP-392: Fetch v11+ says the consumer's rack (`client.rack`; empty if not set).
    let client_rack = if version >= 11 {
        req.rack_id.to_string()
    } else {
        String::new()
    };
    // (topic position, partition position) -> the follower a consumer should read from.
    let mut redirected: Vec<(usize, usize, i32)> = Vec::new();
    // (topic position, partition position) -> the leader's DivergingEpoch answer.
    let mut diverging: Vec<(usize, usize, ferrite_replication::EpochEndOffset)> = Vec::new();
    // Resolve every requested partition once; v13+ names topics by id (KIP-516).
    let mut wanted = Vec::with_capacity(req.topics.len());
    for t in req.topics {
        let (name, id, unknown_code) = if version >= 13 {
            match image.topic_by_id(&t.topic_id) {
                Some(ti) => (ti.name.clone(), t.topic_id, 0),
                None => (
                    String::new(),
                    t.topic_id,
                    ResponseError::UnknownTopicId.code(),
                ),
            }
        } else {
            let name = t.topic.0.to_string();
            let id = image.topic(&name).map(|ti| ti.topic_id).unwrap_or_default();
            (name, id, 0)
        };
        let partitions = t
            .partitions
            .into_iter()
            .map(|fp| {
                let p = if unknown_code == 0 {
                    broker.replicas.get(&name, fp.partition)
                } else {
                    None
                };
                let code = if unknown_code != 0 {
                    unknown_code
                } else if p.is_none() {
                    ResponseError::UnknownTopicOrPartition.code()
                } else {
                    0
                };
                (fp, p, code)
            })
            .collect();
        let mut partitions: Vec<(FetchPartition, Option<Arc<Partition>>, i16)> = partitions;
        let now = crate::now_ms();
        for (i, (fp, p, code)) in partitions.iter_mut().enumerate() {
            let Some(part) = p.as_ref().filter(|_| *code == 0) else {
                continue;
            };
            match fetcher {
                Fetcher::Consumer | Fetcher::ConsumerCommitted => {
                    if part.is_leader() {
                        if broker.config.replica_selector_rack_aware && !client_rack.is_empty() {
                            let rack_of = |id: i32| image.broker(id).and_then(|b| b.rack.clone());
                            if let Some(r) = part.preferred_read_replica(
                                broker.config.node_id,
                                &client_rack,
                                fp.fetch_offset,
                                rack_of,
                            ) {
                                redirected.push((wanted.len(), i, r));
                            }
                        }
                    } else if version < 11 {
                        // Before client metadata (v11) a consumer reads from the leader
                        // only, as Kafka's `FetchParams.fetchOnlyLeader`.
                        *code = ResponseError::NotLeaderOrFollower.code();
                    }
                }
                Fetcher::Follower => {
                    let fetch = ferrite_replication::FollowerFetch {
                        replica_id,
                        replica_epoch,
                        current_leader_epoch: fp.current_leader_epoch,
                        fetch_offset: fp.fetch_offset,
                        last_fetched_epoch: (version >= 12 && fp.last_fetched_epoch >= 0)
                            .then_some(fp.last_fetched_epoch),
                    };
                    match part.on_follower_fetch(fetch, now, |id| broker.replicas.broker_state(id))
                    {
                        Ok((outcome, proposal)) => {
                            if let Some(proposal) = proposal {
                                broker.replicas.send_alter_partition(part, proposal);
                            }
                            if let ferrite_replication::FetchOutcome::Diverging(eo) = outcome {
                                diverging.push((wanted.len(), i, eo));
                            }
                        }
                        Err(e) => *code = crate::error::replication_error_code(&e),
                    }
                }
            }
        }
        wanted.push(Wanted {
            topic: if version >= 13 {
                t.topic
            } else {
                topic_name(&name)
            },
            topic_id: id,
            partitions,
        });
    }

    let max_wait =
        Duration::from_millis(req.max_wait_ms.clamp(0, limits::FETCH_WAIT_MS_MAX) as u64);
    let deadline = tokio::time::Instant::now() + max_wait;
    let min_bytes = usize::try_from(req.min_bytes.max(0)).unwrap_or(0);
    let max_bytes = usize::try_from(req.max_bytes)
        .ok()
        .filter(|b| *b > 0)
        .unwrap_or(usize::MAX)
        .min(limits::FETCH_RESPONSE_BYTES_MAX);
    loop {
        // Subscribe before reading so that an append between the read and the wait wakes us.
        let mut watchers: Vec<watch::Receiver<i64>> = wanted
            .iter()
            .flat_map(|w| {
                w.partitions
                    .iter()
                    .filter_map(|(_, p, _)| p.as_ref().map(|p| p.subscribe()))
            })
            .collect();
        for w in &mut watchers {
            w.borrow_and_update();
        }
        let read = read_all(
            &wanted,
            &diverging,
            &redirected,
            fetcher,
            max_bytes,
            version,
            zero_copy,
        );
        let now = tokio::time::Instant::now();
        // A redirection is answered at once, as Kafka answers a preferred read replica.
        if read.bytes >= min_bytes
            || read.errors
            || now >= deadline
            || watchers.is_empty()
            || !redirected.is_empty()
        {
            return read.into_response();
        }
        let changed = select_all(watchers.iter_mut().map(|w| Box::pin(w.changed())));
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            return read_all(
                &wanted,
                &diverging,
                &redirected,
                fetcher,
                max_bytes,
                version,
                zero_copy,
            )
            .into_response();
        }
    }
}

/// One pass over the requested partitions.
struct Read {
    responses: Vec<FetchableTopicResponse>,
    /// File regions the responses' placeholders stand for (zero-copy only), with the
    /// topic and partition positions they belong to.
    regions: Vec<(FileRegion, usize, usize)>,
    /// Bytes of records in the responses.
    bytes: usize,
    /// Whether any partition had an error (which ends the long poll, as in Kafka).
    errors: bool,
}

impl Read {
    fn into_response(mut self) -> (FetchResponse, Vec<FileRegion>) {
        let regions = if self.bytes < limits::FETCH_ZERO_COPY_BYTES_MIN {
            // Small: copy. A spliced frame costs extra writes, which for a few KiB cost
            // more latency than the copy saves. A region that fit in `locate`'s window is
            // not read again (`FileRegion::prefetched`).
            for (region, t, p) in std::mem::take(&mut self.regions) {
                let Some(pd) = self
                    .responses
                    .get_mut(t)
                    .and_then(|t| t.partitions.get_mut(p))
                else {
                    continue;
                };
                match region.read() {
                    Ok(bytes) => pd.records = Some(bytes),
                    Err(e) => {
                        tracing::error!(path = %region.path.display(), error = %e, "fetch read failed");
                        pd.records = Some(Bytes::new());
                        pd.error_code = storage_error_code(&e);
                    }
                }
            }
            Vec::new()
        } else {
            self.regions.into_iter().map(|(r, _, _)| r).collect()
        };
        (
            FetchResponse::default()
                .with_session_id(0)
                .with_responses(self.responses),
            regions,
        )
    }
}

/// Reads (or, zero-copy, locates) every partition's batches once.
fn read_all(
    wanted: &[Wanted],
    diverging: &[(usize, usize, ferrite_replication::EpochEndOffset)],
    redirected: &[(usize, usize, i32)],
    fetcher: Fetcher,
    max_bytes: usize,
    version: i16,
    zero_copy: bool,
) -> Read {
    let mut remaining = max_bytes;
    let mut total = 0usize;
    let mut errors = false;
    let mut regions = Vec::new();
    let mut out = Vec::with_capacity(wanted.len());
    for (ti, w) in wanted.iter().enumerate() {
        let mut partitions = Vec::with_capacity(w.partitions.len());
        for (pi, (fp, p, code)) in w.partitions.iter().enumerate() {
            let mut pd = PartitionData::default()
                .with_partition_index(fp.partition)
                .with_high_watermark(-1)
                .with_last_stable_offset(-1)
                .with_log_start_offset(-1)
                .with_preferred_read_replica(BrokerId(-1))
                .with_aborted_transactions(if version >= 4 { Some(Vec::new()) } else { None });
            let Some(p) = p.as_ref().filter(|_| *code == 0) else {
                errors = true;
                if let Some(p) = p.as_ref().filter(|_| version >= 12 && leader_hint(*code)) {
                    pd = pd.with_current_leader(current_leader(p));
                }
                partitions.push(pd.with_error_code(*code));
                continue;
            };
            if let Some(code) = epoch_error(fp.current_leader_epoch, p.leader_epoch()) {
                errors = true;
                if version >= 12 {
                    pd = pd.with_current_leader(current_leader(p));
                }
                partitions.push(pd.with_error_code(code));
                continue;
            }
            if let Some((_, _, eo)) = diverging.iter().find(|(t, i, _)| *t == ti && *i == pi) {
                // KIP-320: no records; the follower truncates to where the epochs agree.
                errors = true;
                let hw = p.high_watermark();
                partitions.push(
                    pd.with_high_watermark(hw)
                        .with_last_stable_offset(hw)
                        .with_log_start_offset(p.log().log_start_offset())
                        .with_diverging_epoch(
                            EpochEndOffset::default()
                                .with_epoch(eo.leader_epoch)
                                .with_end_offset(eo.end_offset),
                        )
                        .with_records(Some(Bytes::new())),
                );
                continue;
            }
            if let Some((_, _, replica)) = redirected.iter().find(|(t, i, _)| *t == ti && *i == pi)
            {
                // KIP-392: no records; the consumer fetches from `replica` from now on.
                let hw = p.high_watermark();
                partitions.push(
                    pd.with_high_watermark(hw)
                        .with_last_stable_offset(p.last_stable_offset())
                        .with_log_start_offset(p.log().log_start_offset())
                        .with_preferred_read_replica(BrokerId(*replica))
                        .with_records(Some(Bytes::new())),
                );
                continue;
            }
            let (log_start, hw, lso, plan) = match fetcher {
                Fetcher::Follower => {
                    let (s, hw, plan) = p.read_plan(fp.fetch_offset);
                    (s, hw, p.last_stable_offset(), plan)
                }
                Fetcher::Consumer => {
                    let (s, hw, plan) = p.consumer_read_plan(fp.fetch_offset);
                    (s, hw, p.last_stable_offset(), plan)
                }
                Fetcher::ConsumerCommitted => {
                    let (s, hw, lso, plan, aborted) = p.committed_read_plan(fp.fetch_offset);
                    pd = pd.with_aborted_transactions(Some(
                        aborted
                            .into_iter()
                            .map(|a| {
                                AbortedTransaction::default()
                                    .with_producer_id(ProducerId(a.producer_id))
                                    .with_first_offset(a.first_offset)
                            })
                            .collect(),
                    ));
                    (s, hw, lso, plan)
                }
            };
            pd = pd
                .with_high_watermark(hw)
                .with_last_stable_offset(lso)
                .with_log_start_offset(log_start);
            let partition_max = usize::try_from(fp.partition_max_bytes).unwrap_or(0);
            let limit = partition_max.min(remaining);
            // KIP-74: the first batch of the response is returned even when larger than
            // the limits, so that a consumer can always make progress.
            let min_one = total == 0;
            let read = plan.and_then(|plan| match plan {
                Some(plan) if limit > 0 || min_one => {
                    if zero_copy {
                        plan.locate(limit, min_one).map(Records::Region)
                    } else {
                        plan.read(limit, min_one).map(Records::Copied)
                    }
                }
                _ => Ok(Records::Copied(Bytes::new())),
            });
            match read {
                Ok(records) => {
                    let (len, records) = match records {
                        Records::Copied(bytes) => (bytes.len(), bytes),
                        Records::Region(None) => (0, Bytes::new()),
                        Records::Region(Some(region)) => {
                            let placeholder = u32::try_from(regions.len())
                                .map(ferrite_protocol::records_placeholder)
                                .unwrap_or_default();
                            let len = usize::try_from(region.len).unwrap_or(usize::MAX);
                            regions.push((region, out.len(), partitions.len()));
                            (len, placeholder)
                        }
                    };
                    total = total.saturating_add(len);
                    remaining = remaining.saturating_sub(len);
                    pd = pd.with_records(Some(records));
                }
                Err(e) => {
                    errors = true;
                    if !matches!(e, ferrite_storage::StorageError::OffsetOutOfRange { .. }) {
                        tracing::error!(topic = %p.topic, partition = p.index, error = %e, "fetch read failed");
                    }
                    pd = pd.with_error_code(storage_error_code(&e));
                }
            }
            partitions.push(pd);
        }
        out.push(
            FetchableTopicResponse::default()
                .with_topic(w.topic.clone())
                .with_topic_id(w.topic_id)
                .with_partitions(partitions),
        );
    }
    Read {
        responses: out,
        regions,
        bytes: total,
        errors,
    }
}

enum Records {
    Copied(Bytes),
    Region(Option<FileRegion>),
}

/// Errors after which the client should look for the leader (KIP-951 hint).
fn leader_hint(code: i16) -> bool {
    code == ResponseError::NotLeaderOrFollower.code()
        || code == ResponseError::FencedLeaderEpoch.code()
}

/// KIP-951: the leader and epoch this broker's metadata knows.
fn current_leader(p: &Partition) -> LeaderIdAndEpoch {
    LeaderIdAndEpoch::default()
        .with_leader_id(BrokerId(p.leader_id()))
        .with_leader_epoch(p.leader_epoch())
}

/// KIP-320 leader epoch fencing: -1 means the client did not say.
pub fn epoch_error(requested: i32, current: i32) -> Option<i16> {
    if requested < 0 || requested == current {
        None
    } else if requested < current {
        Some(ResponseError::FencedLeaderEpoch.code())
    } else {
        Some(ResponseError::UnknownLeaderEpoch.code())
    }
}
