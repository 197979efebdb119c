//! ListOffsets: earliest (-2), latest (-1), max timestamp (-3, KIP-734) and by timestamp
//! through the time index. Only the one batch that holds the answer is decoded.

use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::{ListOffsetsRequest, ListOffsetsResponse};
use kafka_protocol::records::{RecordBatchDecoder, TimestampType};
use kafka_protocol::ResponseError;

use super::fetch::epoch_error;
use crate::error::storage_error_code;
use crate::replica_manager::Partition;
use crate::Broker;

const LATEST: i64 = -1;
const EARLIEST: i64 = -2;
const MAX_TIMESTAMP: i64 = -3;

pub fn handle(broker: &Arc<Broker>, req: ListOffsetsRequest, version: i16) -> ListOffsetsResponse {
    // A client (negative replica id) asks the leader; a broker may ask any replica.
    let from_client = req.replica_id.0 < 0;
    // read_committed (isolation level 1) asks for the last stable offset as latest.
    let read_committed = req.isolation_level == 1;
    let topics = req
        .topics
        .into_iter()
        .map(|t| {
            let name = t.name.0.to_string();
            let partitions = t
                .partitions
                .into_iter()
                .map(|lp| {
                    let resp = ListOffsetsPartitionResponse::default()
                        .with_partition_index(lp.partition_index)
                        .with_timestamp(-1)
                        .with_offset(-1)
                        .with_leader_epoch(-1);
                    let Some(p) = broker.replicas.get(&name, lp.partition_index) else {
                        return resp.with_error_code(ResponseError::UnknownTopicOrPartition.code());
                    };
                    if from_client && !p.is_leader() {
                        return resp.with_error_code(ResponseError::NotLeaderOrFollower.code());
                    }
                    if let Some(code) = epoch_error(lp.current_leader_epoch, p.leader_epoch()) {
                        return resp.with_error_code(code);
                    }
                    match lookup(&p, lp.timestamp, read_committed) {
                        Ok(Some((offset, timestamp, epoch))) => resp
                            .with_offset(offset)
                            .with_timestamp(timestamp)
                            // The leader epoch is only in v4+ (KIP-320).
                            .with_leader_epoch(if version >= 4 { epoch } else { -1 }),
                        Ok(None) => resp,
                        Err(code) => resp.with_error_code(code),
                    }
                })
                .collect();
            ListOffsetsTopicResponse::default()
                .with_name(t.name)
                .with_partitions(partitions)
        })
        .collect();
    ListOffsetsResponse::default().with_topics(topics)
}

/// `(offset, timestamp, leader_epoch)`, or `None` when no record qualifies.
fn lookup(
    p: &Partition,
    timestamp: i64,
    read_committed: bool,
) -> Result<Option<(i64, i64, i32)>, i16> {
    let epoch = p.leader_epoch();
    let (plan, target) = {
        let log = p.log();
        match timestamp {
            EARLIEST => return Ok(Some((log.log_start_offset(), -1, epoch))),
            // The high watermark, not the log end: what a consumer can read (KIP-207:
            // OFFSET_NOT_AVAILABLE while a new leader's has not caught up).
            LATEST => {
                drop(log);
                return p
                    .list_offsets_latest()
                    .map(|hw| {
                        let offset = if read_committed {
                            p.last_stable_offset().min(hw)
                        } else {
                            hw
                        };
                        Some((offset, -1, epoch))
                    })
                    .map_err(|e| crate::error::replication_error_code(&e));
            }
            MAX_TIMESTAMP => {
                let max = log.max_timestamp();
                if max < 0 {
                    return Ok(None);
                }
                (log.time_plan(max), max)
            }
            t if t < 0 => return Err(ResponseError::InvalidRequest.code()),
            t => (log.time_plan(t), t),
        }
    };
    let Some(plan) = plan.map_err(|e| storage_error_code(&e))? else {
        return Ok(None);
    };
    let batch = plan
        .read_first_batch_at_time(target)
        .map_err(|e| storage_error_code(&e))?;
    let Some(batch) = batch else { return Ok(None) };
    Ok(first_record_at_or_after(
        batch,
        target,
        timestamp == MAX_TIMESTAMP,
    ))
}

/// Decodes one batch to find the first record with timestamp >= `target` (or, for
/// MAX_TIMESTAMP, the record holding the maximum).
fn first_record_at_or_after(
    mut batch: Bytes,
    target: i64,
    want_max: bool,
) -> Option<(i64, i64, i32)> {
    let header = ferrite_storage::BatchHeader::parse(&batch).ok()?;
    let set = match RecordBatchDecoder::decode(&mut batch) {
        Ok(s) => s,
        Err(e) => {
            // A batch that passed CRC checks but does not decode: answer with the batch
            // itself, which is what Kafka's index alone would give.
            tracing::warn!(error = %e, "cannot decode batch for timestamp lookup");
            return Some((
                header.base_offset,
                header.max_timestamp,
                header.partition_leader_epoch,
            ));
        }
    };
    for r in set.records {
        let ts = if r.timestamp_type == TimestampType::LogAppend {
            header.max_timestamp
        } else {
            r.timestamp
        };
        let hit = if want_max { ts == target } else { ts >= target };
        if hit {
            return Some((r.offset, ts, header.partition_leader_epoch));
        }
    }
    None
}
