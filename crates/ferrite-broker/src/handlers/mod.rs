//! One module per Kafka API. Each handler takes the decoded request and its version and
//! returns the response body; the version table in `ferrite_protocol::SUPPORTED_APIS`
//! guarantees only supported versions arrive here.

pub mod admin;
pub mod configs;
pub mod fetch;
pub mod groups;
pub mod list_offsets;
pub mod log_dirs;
pub mod metadata;
pub mod offset_for_leader_epoch;
pub mod produce;
pub mod producers;
pub mod quorum;
pub mod txn;

use std::net::SocketAddr;
use std::sync::Arc;

use ferrite_protocol::Request;
use ferrite_storage::FileRegion;
use kafka_protocol::messages::{RequestKind, ResponseKind, TopicName};
use kafka_protocol::protocol::StrBytes;

use crate::Broker;

/// What a handler answers.
pub enum Reply {
    Body(ResponseKind),
    /// A Fetch response whose records are still in segment files: the `i`-th region is
    /// what `ferrite_protocol::records_placeholder(i)` stands for in the body. The
    /// connection writes it with `sendfile` (zero-copy fetch).
    SplicedFetch(ResponseKind, Vec<FileRegion>),
}

/// Handles one request. `None` means no response is sent (Produce with acks=0).
pub async fn handle(broker: &Arc<Broker>, request: Request, peer: SocketAddr) -> Option<Reply> {
    let client_id = request
        .header
        .client_id
        .as_ref()
        .map(|c| c.to_string())
        .unwrap_or_default();
    let version = request.version();
    Some(Reply::Body(match request.body {
        RequestKind::ApiVersions(_) => {
            ResponseKind::ApiVersions(ferrite_protocol::api_versions_body(0))
        }
        RequestKind::Metadata(r) => {
            ResponseKind::Metadata(metadata::handle(broker, r, version).await)
        }
        RequestKind::DescribeCluster(r) => {
            ResponseKind::DescribeCluster(metadata::describe_cluster(broker, r))
        }
        RequestKind::DescribeQuorum(r) => {
            ResponseKind::DescribeQuorum(quorum::handle(broker, r).await)
        }
        RequestKind::Produce(r) => {
            return produce::handle(broker, r, version)
                .await
                .map(|r| Reply::Body(ResponseKind::Produce(r)))
        }
        RequestKind::Fetch(r) => {
            let (body, regions) = fetch::handle(broker, r, version).await;
            let body = ResponseKind::Fetch(body);
            return Some(if regions.is_empty() {
                Reply::Body(body)
            } else {
                Reply::SplicedFetch(body, regions)
            });
        }
        RequestKind::OffsetForLeaderEpoch(r) => {
            ResponseKind::OffsetForLeaderEpoch(offset_for_leader_epoch::handle(broker, r))
        }
        RequestKind::ListOffsets(r) => {
            ResponseKind::ListOffsets(list_offsets::handle(broker, r, version))
        }
        RequestKind::CreateTopics(r) => {
            ResponseKind::CreateTopics(admin::create_topics(broker, r, version).await)
        }
        RequestKind::DeleteTopics(r) => {
            ResponseKind::DeleteTopics(admin::delete_topics(broker, r, version).await)
        }
        RequestKind::CreatePartitions(r) => {
            ResponseKind::CreatePartitions(admin::create_partitions(broker, r).await)
        }
        RequestKind::AlterPartitionReassignments(r) => ResponseKind::AlterPartitionReassignments(
            admin::alter_partition_reassignments(broker, r, version).await,
        ),
        RequestKind::ListPartitionReassignments(r) => {
            ResponseKind::ListPartitionReassignments(admin::list_partition_reassignments(broker, r))
        }
        RequestKind::ElectLeaders(r) => {
            ResponseKind::ElectLeaders(admin::elect_leaders(broker, r, version).await)
        }
        RequestKind::DeleteRecords(r) => {
            ResponseKind::DeleteRecords(admin::delete_records(broker, r))
        }
        RequestKind::DescribeConfigs(r) => {
            ResponseKind::DescribeConfigs(configs::describe(broker, r, version))
        }
        RequestKind::AlterConfigs(r) => ResponseKind::AlterConfigs(configs::alter(broker, r).await),
        RequestKind::IncrementalAlterConfigs(r) => {
            ResponseKind::IncrementalAlterConfigs(configs::incremental_alter(broker, r).await)
        }
        RequestKind::FindCoordinator(r) if r.key_type == txn::KEY_TYPE_TRANSACTION => {
            ResponseKind::FindCoordinator(txn::find_coordinator(broker, r, version).await)
        }
        RequestKind::FindCoordinator(r) => {
            ResponseKind::FindCoordinator(groups::find_coordinator(broker, r, version))
        }
        RequestKind::JoinGroup(r) => {
            ResponseKind::JoinGroup(groups::join_group(broker, r, version, &client_id, peer).await)
        }
        RequestKind::SyncGroup(r) => ResponseKind::SyncGroup(groups::sync_group(broker, r).await),
        RequestKind::Heartbeat(r) => ResponseKind::Heartbeat(groups::heartbeat(broker, r)),
        RequestKind::LeaveGroup(r) => {
            ResponseKind::LeaveGroup(groups::leave_group(broker, r, version))
        }
        RequestKind::OffsetCommit(r) => {
            ResponseKind::OffsetCommit(groups::offset_commit(broker, r, version).await)
        }
        RequestKind::OffsetFetch(r) => {
            ResponseKind::OffsetFetch(groups::offset_fetch(broker, r, version))
        }
        RequestKind::DescribeGroups(r) => {
            ResponseKind::DescribeGroups(groups::describe_groups(broker, r))
        }
        RequestKind::ListGroups(r) => ResponseKind::ListGroups(groups::list_groups(broker, r)),
        RequestKind::DeleteGroups(r) => {
            ResponseKind::DeleteGroups(groups::delete_groups(broker, r).await)
        }
        RequestKind::DescribeLogDirs(r) => {
            ResponseKind::DescribeLogDirs(log_dirs::handle(broker, r))
        }
        RequestKind::OffsetDelete(r) => {
            ResponseKind::OffsetDelete(groups::offset_delete(broker, r).await)
        }
        RequestKind::InitProducerId(r)
            if r.transactional_id.as_ref().is_some_and(|t| !t.0.is_empty()) =>
        {
            ResponseKind::InitProducerId(txn::init_producer_id(broker, r, version).await)
        }
        RequestKind::AddPartitionsToTxn(r) => ResponseKind::AddPartitionsToTxn(
            txn::add_partitions_to_txn(broker, r, version, peer).await,
        ),
        RequestKind::AddOffsetsToTxn(r) => {
            ResponseKind::AddOffsetsToTxn(txn::add_offsets_to_txn(broker, r, version).await)
        }
        RequestKind::EndTxn(r) => ResponseKind::EndTxn(txn::end_txn(broker, r, version).await),
        RequestKind::WriteTxnMarkers(r) => {
            ResponseKind::WriteTxnMarkers(txn::write_txn_markers(broker, r, peer).await)
        }
        RequestKind::TxnOffsetCommit(r) => {
            ResponseKind::TxnOffsetCommit(txn::txn_offset_commit(broker, r, version).await)
        }
        RequestKind::InitProducerId(r) => {
            ResponseKind::InitProducerId(producers::init_producer_id(broker, r).await)
        }
        RequestKind::DescribeProducers(r) => {
            ResponseKind::DescribeProducers(producers::describe_producers(broker, r))
        }
        RequestKind::DescribeTransactions(r) => {
            ResponseKind::DescribeTransactions(txn::describe_transactions(broker, r).await)
        }
        RequestKind::ListTransactions(r) => {
            ResponseKind::ListTransactions(txn::list_transactions(broker, r).await)
        }
        other => {
            // decode_request only lets SUPPORTED_APIS through, so this is a programming
            // error in the version table; answer nothing and let the client time out
            // rather than crash the broker.
            tracing::error!(request = ?std::mem::discriminant(&other), "no handler for a supported API");
            return None;
        }
    }))
}

pub(crate) fn topic_name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

pub(crate) fn str_bytes(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}
