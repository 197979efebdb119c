//! DescribeLogDirs: the data directory, the size of each hosted partition's log and its
//! offset lag (log end offset minus high watermark), and the volume's total and usable
//! bytes (v4). kafka-log-dirs.sh, Cruise Control and web consoles read partition sizes
//! from here.

use std::collections::BTreeMap;
use std::sync::Arc;

use kafka_protocol::messages::describe_log_dirs_response::{
    DescribeLogDirsPartition, DescribeLogDirsResult, DescribeLogDirsTopic,
};
use kafka_protocol::messages::{DescribeLogDirsRequest, DescribeLogDirsResponse};
use kafka_protocol::ResponseError;

use super::{str_bytes, topic_name};
use crate::Broker;

pub fn handle(broker: &Arc<Broker>, req: DescribeLogDirsRequest) -> DescribeLogDirsResponse {
    // Null topics: every partition (Kafka's "describe all").
    let wanted: Option<BTreeMap<String, Vec<i32>>> = req.topics.map(|topics| {
        topics
            .into_iter()
            .map(|t| (t.topic.0.to_string(), t.partitions))
            .collect()
    });
    let mut topics: BTreeMap<String, Vec<DescribeLogDirsPartition>> = BTreeMap::new();
    for p in broker.replicas.all() {
        let included = wanted.as_ref().is_none_or(|w| {
            w.get(p.topic.as_ref())
                .is_some_and(|parts| parts.contains(&p.index))
        });
        if !included {
            continue;
        }
        let (size, log_end_offset) = {
            let log = p.log();
            (log.size_bytes(), log.log_end_offset())
        };
        topics.entry(p.topic.to_string()).or_default().push(
            DescribeLogDirsPartition::default()
                .with_partition_index(p.index)
                .with_partition_size(i64::try_from(size).unwrap_or(i64::MAX))
                .with_offset_lag((log_end_offset - p.high_watermark()).max(0))
                .with_is_future_key(false),
        );
    }
    let topics = topics
        .into_iter()
        .map(|(name, mut partitions)| {
            partitions.sort_by_key(|p| p.partition_index);
            DescribeLogDirsTopic::default()
                .with_name(topic_name(&name))
                .with_partitions(partitions)
        })
        .collect();
    let dir = &broker.config.data_dir;
    let absolute = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
    let (total_bytes, usable_bytes, error) = match rustix::fs::statvfs(&absolute) {
        Ok(v) => (
            i64::try_from(v.f_blocks.saturating_mul(v.f_frsize)).unwrap_or(i64::MAX),
            i64::try_from(v.f_bavail.saturating_mul(v.f_frsize)).unwrap_or(i64::MAX),
            0,
        ),
        Err(e) => {
            tracing::warn!(dir = %absolute.display(), error = %e, "statvfs of the log dir failed");
            (-1, -1, ResponseError::KafkaStorageError.code())
        }
    };
    DescribeLogDirsResponse::default().with_results(vec![DescribeLogDirsResult::default()
        .with_error_code(error)
        .with_log_dir(str_bytes(absolute.display().to_string()))
        .with_topics(topics)
        .with_total_bytes(total_bytes)
        .with_usable_bytes(usable_bytes)])
}
