//! Consumer group APIs over the group coordinator: FindCoordinator, JoinGroup, SyncGroup,
//! Heartbeat, LeaveGroup, OffsetCommit, OffsetFetch, DescribeGroups, ListGroups,
//! DeleteGroups, OffsetDelete.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferrite_coordinator::{ClientInfo, GroupRecord, Reply};
use kafka_protocol::messages::consumer_protocol_subscription::ConsumerProtocolSubscription;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, StrBytes};
use kafka_protocol::ResponseError;
use tokio::sync::oneshot;

use super::str_bytes;
use crate::group_manager::Waiter;
use crate::{now_ms, Broker};

const KEY_TYPE_GROUP: i8 = 0;

pub fn find_coordinator(
    broker: &Arc<Broker>,
    req: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let (host, port) = &broker.advertised;
    let answer = |key: &StrBytes| {
        let mut c = Coordinator::default()
            .with_key(key.clone())
            .with_node_id(BrokerId(-1))
            .with_host(str_bytes(""))
            .with_port(-1);
        if req.key_type != KEY_TYPE_GROUP {
            // Transactional ids go to `txn::find_coordinator`; any other type (share
            // groups, KIP-932, are 2) is refused as Kafka's `CoordinatorType.forId`
            // refuses an unknown one.
            c = c
                .with_error_code(ResponseError::InvalidRequest.code())
                .with_error_message(Some(str_bytes(format!(
                    "coordinator key type {} is not supported",
                    req.key_type
                ))));
        } else if key.is_empty() {
            c = c
                .with_error_code(ResponseError::InvalidRequest.code())
                .with_error_message(Some(str_bytes("empty group id")));
        } else {
            // The coordinator is the leader of the group's `__consumer_offsets`
            // partition (on one node: this broker).
            let image = broker.controller.image();
            let leader = image
                .topic(crate::group_manager::OFFSETS_TOPIC)
                .and_then(|t| {
                    let n = t.partitions.len() as i32;
                    t.partitions
                        .get(&ferrite_coordinator::partition_for_group(key, n))
                })
                .map(|p| p.leader);
            let endpoint = match leader {
                Some(id) if id == broker.config.node_id => Some((id, host.clone(), *port)),
                Some(id) if id >= 0 => image
                    .broker(id)
                    .filter(|b| !b.fenced)
                    .and_then(|b| b.endpoints.first())
                    .map(|e| (id, e.host.clone(), e.port)),
                _ => None,
            };
            match endpoint {
                Some((id, host, port)) => {
                    c = c
                        .with_node_id(BrokerId(id))
                        .with_host(str_bytes(host))
                        .with_port(i32::from(port))
                }
                None => {
                    c = c
                        .with_error_code(ResponseError::CoordinatorNotAvailable.code())
                        .with_error_message(Some(str_bytes(
                            "the group's offsets partition has no leader yet",
                        )))
                }
            }
        }
        c
    };
    // v4+ batches keys (KIP-699); before that one key and top-level fields.
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

/// Upper bound on how long a JoinGroup/SyncGroup long-poll may wait for its rebalance.
fn long_poll_limit(rebalance_timeout_ms: i32) -> Duration {
    Duration::from_millis(
        u64::try_from(rebalance_timeout_ms)
            .unwrap_or(0)
            .saturating_add(5_000)
            .min(30 * 60 * 1000),
    )
}

pub async fn join_group(
    broker: &Arc<Broker>,
    req: JoinGroupRequest,
    version: i16,
    client_id: &str,
    peer: SocketAddr,
) -> JoinGroupResponse {
    let token = broker.groups.next_token();
    let (tx, rx) = oneshot::channel();
    let client = ClientInfo {
        client_id: client_id.to_string(),
        client_host: format!("/{}", peer.ip()),
    };
    let limit = long_poll_limit(req.rebalance_timeout_ms.max(req.session_timeout_ms));
    {
        let mut state = broker.groups.lock();
        if let Err(e) = state.check(broker, req.group_id.0.as_str()) {
            return JoinGroupResponse::default()
                .with_error_code(e.code())
                .with_generation_id(-1)
                .with_member_id(req.member_id.clone());
        }
        state.register(token, Waiter::Join(tx));
        let (reply, effects) = state
            .coordinator
            .join(now_ms(), token, version, &client, &req);
        state.apply(broker, effects);
        if let Reply::Now(resp) = reply {
            state.forget(token);
            return resp;
        }
    }
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(resp)) => resp,
        _ => {
            broker.groups.lock().forget(token);
            JoinGroupResponse::default()
                .with_error_code(ResponseError::RebalanceInProgress.code())
                .with_generation_id(-1)
        }
    }
}

pub async fn sync_group(broker: &Arc<Broker>, req: SyncGroupRequest) -> SyncGroupResponse {
    let token = broker.groups.next_token();
    let (tx, rx) = oneshot::channel();
    {
        let mut state = broker.groups.lock();
        if let Err(e) = state.check(broker, req.group_id.0.as_str()) {
            return SyncGroupResponse::default().with_error_code(e.code());
        }
        state.register(token, Waiter::Sync(tx));
        let (reply, effects) = state.coordinator.sync(now_ms(), token, &req);
        state.apply(broker, effects);
        if let Reply::Now(resp) = reply {
            state.forget(token);
            return resp;
        }
    }
    match tokio::time::timeout(long_poll_limit(300_000), rx).await {
        Ok(Ok(resp)) => resp,
        _ => {
            broker.groups.lock().forget(token);
            SyncGroupResponse::default().with_error_code(ResponseError::RebalanceInProgress.code())
        }
    }
}

pub fn heartbeat(broker: &Arc<Broker>, req: HeartbeatRequest) -> HeartbeatResponse {
    let now = now_ms();
    let mut state = broker.groups.lock();
    if let Err(e) = state.check(broker, req.group_id.0.as_str()) {
        return HeartbeatResponse::default().with_error_code(e.code());
    }
    // Due timeouts first, so that a member past its session deadline is gone (Kafka's
    // timer would have fired), whenever the ticker last ran.
    state.tick(broker, now);
    let code = state.coordinator.heartbeat(
        now,
        req.group_id.0.as_str(),
        req.member_id.as_str(),
        req.group_instance_id.as_deref(),
        req.generation_id,
    );
    HeartbeatResponse::default().with_error_code(code)
}

pub fn leave_group(
    broker: &Arc<Broker>,
    req: LeaveGroupRequest,
    version: i16,
) -> LeaveGroupResponse {
    // v3+ removes a batch of members (KIP-345); before that the one sender.
    let members: Vec<(String, Option<String>)> = if version >= 3 {
        req.members
            .iter()
            .map(|m| {
                (
                    m.member_id.to_string(),
                    m.group_instance_id.as_ref().map(|i| i.to_string()),
                )
            })
            .collect()
    } else {
        vec![(req.member_id.to_string(), None)]
    };
    let mut state = broker.groups.lock();
    if let Err(e) = state.check(broker, req.group_id.0.as_str()) {
        return LeaveGroupResponse::default().with_error_code(e.code());
    }
    let (result, effects) = state
        .coordinator
        .leave(now_ms(), req.group_id.0.as_str(), &members);
    state.apply(broker, effects);
    match result {
        Err(code) => LeaveGroupResponse::default().with_error_code(code),
        Ok(codes) => {
            if version < 3 {
                return LeaveGroupResponse::default()
                    .with_error_code(codes.first().copied().unwrap_or(0));
            }
            LeaveGroupResponse::default().with_members(
                members
                    .iter()
                    .zip(codes)
                    .map(|((m, i), code)| {
                        MemberResponse::default()
                            .with_member_id(str_bytes(m))
                            .with_group_instance_id(i.as_deref().map(str_bytes))
                            .with_error_code(code)
                    })
                    .collect(),
            )
        }
    }
}

pub async fn offset_commit(
    broker: &Arc<Broker>,
    req: OffsetCommitRequest,
    version: i16,
) -> OffsetCommitResponse {
    let group = req.group_id.0.to_string();
    let now = now_ms();
    // Unknown topics and partitions fail on their own (the cluster's, not only those
    // hosted here); the rest are committed.
    let mut wanted = Vec::new();
    let mut per_partition: Vec<(String, i32, Option<i16>)> = Vec::new();
    {
        let image = broker.controller.image();
        for t in &req.topics {
            let topic = t.name.0.to_string();
            let known = image.topic(&topic);
            for p in &t.partitions {
                if !known.is_some_and(|t| t.partitions.contains_key(&p.partition_index)) {
                    per_partition.push((
                        topic.clone(),
                        p.partition_index,
                        Some(ResponseError::UnknownTopicOrPartition.code()),
                    ));
                } else {
                    per_partition.push((topic.clone(), p.partition_index, None));
                    wanted.push((
                        topic.clone(),
                        p.partition_index,
                        p.committed_offset,
                        p.committed_leader_epoch,
                        p.committed_metadata.as_ref().map(|m| m.to_string()),
                    ));
                }
            }
        }
    }
    // (records validated, or the whole request's error; the write waiting for its ISR)
    let (result, write) = {
        let mut state = broker.groups.lock();
        match state.check(broker, &group) {
            Err(e) => (Err(e.code()), Ok(None)),
            Ok(()) => {
                state.tick(broker, now);
                let result = state.coordinator.commit_offsets(
                    now,
                    version,
                    &group,
                    req.member_id.as_str(),
                    req.group_instance_id.as_deref(),
                    req.generation_id_or_member_epoch,
                    &wanted,
                );
                let write = match &result {
                    Ok(records) => {
                        let good: Vec<GroupRecord> = records
                            .iter()
                            .filter_map(|r| r.as_ref().ok().cloned())
                            .collect();
                        state.write(broker, &good, now, true)
                    }
                    Err(_) => Ok(None),
                };
                (result, write)
            }
        }
    };
    let written = broker.groups.finish_write(broker, write).await;
    if let Err(e) = &written {
        tracing::warn!(%group, error = %e, "offset commit write failed");
    }
    let write_code = written.as_ref().err().map(|e| e.offset_commit_code());
    let mut codes: Vec<i16> = Vec::with_capacity(per_partition.len());
    match result {
        Err(code) => codes.extend(per_partition.iter().map(|(_, _, c)| c.unwrap_or(code))),
        Ok(records) => {
            let mut results = records.into_iter();
            for (_, _, c) in &per_partition {
                codes.push(match c {
                    Some(c) => *c,
                    None => match results.next() {
                        Some(Ok(_)) => write_code.unwrap_or(0),
                        Some(Err(code)) => code,
                        None => ResponseError::UnknownServerError.code(),
                    },
                });
            }
        }
    }
    let mut topics: Vec<OffsetCommitResponseTopic> = Vec::new();
    for ((topic, partition, _), code) in per_partition.into_iter().zip(codes) {
        let part = OffsetCommitResponsePartition::default()
            .with_partition_index(partition)
            .with_error_code(code);
        match topics.iter_mut().find(|t| t.name.0.as_str() == topic) {
            Some(t) => t.partitions.push(part),
            None => topics.push(
                OffsetCommitResponseTopic::default()
                    .with_name(super::topic_name(&topic))
                    .with_partitions(vec![part]),
            ),
        }
    }
    OffsetCommitResponse::default().with_topics(topics)
}

/// `(partition, offset, leader_epoch, metadata, error_code)`; offset -1 when nothing is
/// committed.
type FetchedOffset = (i32, i64, i32, Option<String>, i16);

/// `(topic, partition, offset, leader_epoch, metadata, error_code)` for the asked
/// partitions, or for every committed partition when `topics` is null. With
/// `require_stable` (OffsetFetch v7+, KIP-447) a partition for which an open transaction
/// holds an offset answers UNSTABLE_OFFSET_COMMIT instead of the offset committed before
/// it: a consumer starting there would re-read what that transaction may already have
/// consumed. librdkafka asks for it with isolation.level=read_committed and retries.
fn fetch_offsets(
    broker: &Arc<Broker>,
    group: &str,
    topics: Option<Vec<(String, Vec<i32>)>>,
    require_stable: bool,
) -> Result<Vec<(String, Vec<FetchedOffset>)>, ResponseError> {
    let mut state = broker.groups.lock();
    state.check(broker, group)?;
    let c = &state.coordinator;
    let unstable = |t: &str, p: i32| require_stable && state.has_pending_txn_offset(group, t, p);
    let unstable_code = kafka_protocol::ResponseError::UnstableOffsetCommit.code();
    Ok(match topics {
        Some(topics) => topics
            .into_iter()
            .map(|(t, parts)| {
                let parts = parts
                    .into_iter()
                    .map(|p| match c.committed(group, &t, p) {
                        _ if unstable(&t, p) => (p, -1, -1, None, unstable_code),
                        Some(o) => (p, o.offset, o.leader_epoch, o.metadata.clone(), 0),
                        None => (p, -1, -1, None, 0),
                    })
                    .collect();
                (t, parts)
            })
            .collect(),
        None => {
            let mut out: Vec<(String, Vec<FetchedOffset>)> = Vec::new();
            for ((t, p), o) in c.all_committed(group) {
                let entry = if unstable(&t, p) {
                    (p, -1, -1, None, unstable_code)
                } else {
                    (p, o.offset, o.leader_epoch, o.metadata.clone(), 0)
                };
                match out.iter_mut().find(|(name, _)| *name == t) {
                    Some((_, v)) => v.push(entry),
                    None => out.push((t, vec![entry])),
                }
            }
            out
        }
    })
}

pub fn offset_fetch(
    broker: &Arc<Broker>,
    req: OffsetFetchRequest,
    version: i16,
) -> OffsetFetchResponse {
    // v8+ asks for several groups at once (KIP-709).
    if version >= 8 {
        let groups = req
            .groups
            .iter()
            .map(|g| {
                let topics = g.topics.as_ref().map(|ts| {
                    ts.iter()
                        .map(|t| (t.name.0.to_string(), t.partition_indexes.clone()))
                        .collect()
                });
                let (found, code) = match fetch_offsets(
                    broker,
                    g.group_id.0.as_str(),
                    topics,
                    req.require_stable,
                ) {
                    Ok(found) => (found, 0),
                    Err(e) => (Vec::new(), e.code()),
                };
                OffsetFetchResponseGroup::default()
                    .with_group_id(g.group_id.clone())
                    .with_error_code(code)
                    .with_topics(
                        found
                            .into_iter()
                            .map(|(t, parts)| {
                                OffsetFetchResponseTopics::default()
                                    .with_name(super::topic_name(&t))
                                    .with_partitions(
                                        parts
                                            .into_iter()
                                            .map(|(p, o, e, m, code)| {
                                                OffsetFetchResponsePartitions::default()
                                                    .with_partition_index(p)
                                                    .with_error_code(code)
                                                    .with_committed_offset(o)
                                                    .with_committed_leader_epoch(e)
                                                    .with_metadata(m.map(|m| str_bytes(&m)))
                                            })
                                            .collect(),
                                    )
                            })
                            .collect(),
                    )
            })
            .collect();
        return OffsetFetchResponse::default().with_groups(groups);
    }
    let topics = req.topics.as_ref().map(|ts| {
        ts.iter()
            .map(|t| (t.name.0.to_string(), t.partition_indexes.clone()))
            .collect()
    });
    let found = match fetch_offsets(
        broker,
        req.group_id.0.as_str(),
        topics.clone(),
        version >= 7 && req.require_stable,
    ) {
        Ok(found) => found,
        // v2+ has a top-level error; v0-1 only the partitions' (each gets the error).
        Err(e) if version >= 2 => {
            return OffsetFetchResponse::default().with_error_code(e.code());
        }
        Err(e) => topics
            .unwrap_or_default()
            .into_iter()
            .map(|(t, parts)| {
                let parts = parts
                    .into_iter()
                    .map(|p| (p, -1, -1, None, e.code()))
                    .collect();
                (t, parts)
            })
            .collect(),
    };
    OffsetFetchResponse::default().with_topics(
        found
            .into_iter()
            .map(|(t, parts)| {
                OffsetFetchResponseTopic::default()
                    .with_name(super::topic_name(&t))
                    .with_partitions(
                        parts
                            .into_iter()
                            .map(|(p, o, e, m, code)| {
                                OffsetFetchResponsePartition::default()
                                    .with_partition_index(p)
                                    .with_error_code(code)
                                    .with_committed_offset(o)
                                    .with_committed_leader_epoch(e)
                                    .with_metadata(m.map(|m| str_bytes(&m)))
                            })
                            .collect(),
                    )
            })
            .collect(),
    )
}

pub fn describe_groups(broker: &Arc<Broker>, req: DescribeGroupsRequest) -> DescribeGroupsResponse {
    let mut state = broker.groups.lock();
    state.tick(broker, now_ms());
    let operations = if req.include_authorized_operations {
        super::metadata::GROUP_OPERATIONS
    } else {
        super::metadata::AUTHORIZED_OPERATIONS_OMITTED
    };
    DescribeGroupsResponse::default().with_groups(
        req.groups
            .iter()
            .map(|g| match state.check(broker, g.0.as_str()) {
                Ok(()) => state
                    .coordinator
                    .describe(g.0.as_str())
                    .with_authorized_operations(operations),
                Err(e) => {
                    kafka_protocol::messages::describe_groups_response::DescribedGroup::default()
                        .with_group_id(g.clone())
                        .with_error_code(e.code())
                        .with_group_state(str_bytes(""))
                        .with_protocol_type(str_bytes(""))
                        .with_protocol_data(str_bytes(""))
                        .with_authorized_operations(operations)
                }
            })
            .collect(),
    )
}

pub fn list_groups(broker: &Arc<Broker>, req: ListGroupsRequest) -> ListGroupsResponse {
    // The groups of every partition led here, loaded first if leadership just came.
    broker.groups.sync_leadership(broker);
    let mut state = broker.groups.lock();
    state.tick(broker, now_ms());
    let groups = state
        .coordinator
        .list()
        .into_iter()
        // v4+ filters by state (KIP-518), case-insensitively as Kafka does.
        .filter(|(_, _, st)| {
            req.states_filter.is_empty()
                || req
                    .states_filter
                    .iter()
                    .any(|f| f.eq_ignore_ascii_case(st.as_str()))
        })
        .filter(|_| {
            req.types_filter.is_empty()
                || req
                    .types_filter
                    .iter()
                    .any(|f| f.eq_ignore_ascii_case("classic"))
        })
        .map(|(id, protocol_type, st)| {
            ListedGroup::default()
                .with_group_id(GroupId(str_bytes(&id)))
                .with_protocol_type(str_bytes(&protocol_type))
                .with_group_state(str_bytes(st.as_str()))
                .with_group_type(str_bytes("classic"))
        })
        .collect();
    ListGroupsResponse::default().with_groups(groups)
}

pub async fn delete_groups(broker: &Arc<Broker>, req: DeleteGroupsRequest) -> DeleteGroupsResponse {
    let now = now_ms();
    let mut results = Vec::with_capacity(req.groups_names.len());
    for g in &req.groups_names {
        let write = {
            let mut state = broker.groups.lock();
            state.tick(broker, now);
            match state.check(broker, g.0.as_str()) {
                Err(e) => Err(e.code()),
                Ok(()) => match state.coordinator.delete_group(g.0.as_str()) {
                    Err(code) => Err(code),
                    Ok(records) => state
                        .write(broker, &records, now, true)
                        .map_err(|e| e.offset_commit_code()),
                },
            }
        };
        let code = match write {
            Err(code) => code,
            Ok(write) => match broker.groups.finish_write(broker, Ok(write)).await {
                Ok(()) => 0,
                Err(e) => {
                    tracing::warn!(group = %g.0.as_str(), error = %e, "delete group write failed");
                    e.offset_commit_code()
                }
            },
        };
        results.push(
            DeletableGroupResult::default()
                .with_group_id(g.clone())
                .with_error_code(code),
        );
    }
    DeleteGroupsResponse::default().with_results(results)
}

/// Whether any member's consumer subscription names `topic`.
fn subscribed(subscriptions: &[Bytes], topic: &str) -> bool {
    subscriptions.iter().any(|raw| {
        let mut buf = raw.clone();
        if buf.len() < 2 {
            return false;
        }
        let version = bytes::Buf::get_i16(&mut buf);
        ConsumerProtocolSubscription::decode(&mut buf, version.clamp(0, 3))
            .is_ok_and(|s| s.topics.iter().any(|t| t.as_str() == topic))
    })
}

pub async fn offset_delete(broker: &Arc<Broker>, req: OffsetDeleteRequest) -> OffsetDeleteResponse {
    let now = now_ms();
    let partitions: Vec<(String, i32)> = req
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(move |p| (t.name.0.to_string(), p.partition_index))
        })
        .collect();
    let (records, write) = {
        let mut state = broker.groups.lock();
        if let Err(e) = state.check(broker, req.group_id.0.as_str()) {
            return OffsetDeleteResponse::default().with_error_code(e.code());
        }
        let records =
            match state
                .coordinator
                .delete_offsets(req.group_id.0.as_str(), &partitions, subscribed)
            {
                Err(code) => return OffsetDeleteResponse::default().with_error_code(code),
                Ok(r) => r,
            };
        let good: Vec<GroupRecord> = records
            .iter()
            .filter_map(|r| r.as_ref().ok().cloned())
            .collect();
        let write = state.write(broker, &good, now, true);
        (records, write)
    };
    let written = broker.groups.finish_write(broker, write).await;
    let write_code = written.as_ref().err().map(|e| e.offset_commit_code());
    let mut topics: Vec<OffsetDeleteResponseTopic> = Vec::new();
    for ((topic, partition), r) in partitions.into_iter().zip(records) {
        let code = match r {
            Ok(_) => write_code.unwrap_or(0),
            Err(c) => c,
        };
        let part = OffsetDeleteResponsePartition::default()
            .with_partition_index(partition)
            .with_error_code(code);
        match topics.iter_mut().find(|t| t.name.0.as_str() == topic) {
            Some(t) => t.partitions.push(part),
            None => topics.push(
                OffsetDeleteResponseTopic::default()
                    .with_name(super::topic_name(&topic))
                    .with_partitions(vec![part]),
            ),
        }
    }
    OffsetDeleteResponse::default().with_topics(topics)
}
