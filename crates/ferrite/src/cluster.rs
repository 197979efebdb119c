//! `ferrite cluster describe`: the cluster's id, its brokers and active controller
//! (DescribeCluster), and the metadata quorum's leader, epoch, high watermark and each
//! voter's progress (DescribeQuorum, KIP-595), as `kafka-cluster.sh` and
//! `kafka-metadata-quorum.sh describe --status --replication` show them. Over the wire
//! client (`wire::Conn`): librdkafka's binding offers neither API.

use anyhow::{anyhow, Result};
use clap::{Args, Subcommand};
use ferrite_protocol::kafka_protocol::messages::describe_quorum_request::{
    PartitionData, TopicData,
};
use ferrite_protocol::kafka_protocol::messages::describe_quorum_response::ReplicaState;
use ferrite_protocol::kafka_protocol::messages::{
    ApiKey, DescribeClusterRequest, DescribeClusterResponse, DescribeQuorumRequest,
    DescribeQuorumResponse, TopicName,
};
use ferrite_protocol::kafka_protocol::protocol::StrBytes;
use serde_json::{json, Value};

use crate::client::Common;
use crate::wire::{check, Conn};

const METADATA_TOPIC: &str = "__cluster_metadata";

#[derive(Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    command: ClusterCommand,
}

impl ClusterArgs {
    pub fn json(&self) -> bool {
        match &self.command {
            ClusterCommand::Describe { common } => common.json,
        }
    }
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Cluster id, brokers, active controller, and the metadata quorum: its leader,
    /// leader epoch, high watermark, and each voter's log end offset and lag.
    Describe {
        #[command(flatten)]
        common: Common,
    },
}

pub async fn cluster(args: ClusterArgs) -> Result<()> {
    // Blocking wire requests, off the runtime's workers.
    tokio::task::spawn_blocking(move || run(args)).await?
}

fn run(args: ClusterArgs) -> Result<()> {
    let ClusterCommand::Describe { common } = args.command;
    let mut conn = Conn::open(&common.bootstrap_server)?;
    let version = conn.version(ApiKey::DescribeCluster, 0, 1)?;
    let cluster: DescribeClusterResponse = conn.send(
        ApiKey::DescribeCluster,
        version,
        &DescribeClusterRequest::default(),
    )?;
    check(
        || "cannot describe the cluster".to_string(),
        cluster.error_code,
        cluster.error_message.as_ref(),
    )?;
    let version = conn.version(ApiKey::DescribeQuorum, 0, 2)?;
    let req = DescribeQuorumRequest::default().with_topics(vec![TopicData::default()
        .with_topic_name(TopicName(StrBytes::from_static_str(METADATA_TOPIC)))
        .with_partitions(vec![PartitionData::default().with_partition_index(0)])]);
    let quorum: DescribeQuorumResponse = conn.send(ApiKey::DescribeQuorum, version, &req)?;
    check(
        || "cannot describe the metadata quorum".to_string(),
        quorum.error_code,
        quorum.error_message.as_ref(),
    )?;
    let p = quorum
        .topics
        .first()
        .and_then(|t| t.partitions.first())
        .ok_or_else(|| anyhow!("the broker described no metadata partition"))?;
    check(
        || "cannot describe the metadata quorum".to_string(),
        p.error_code,
        p.error_message.as_ref(),
    )?;
    let mut brokers: Vec<Value> = cluster
        .brokers
        .iter()
        .map(|b| {
            json!({
                "id": b.broker_id.0,
                "host": b.host.to_string(),
                "port": b.port,
                "rack": b.rack.as_ref().map(|r| r.to_string()),
            })
        })
        .collect();
    brokers.sort_by_key(|b| b["id"].as_i64());
    let replica = |v: &ReplicaState| {
        let lag = (v.log_end_offset >= 0).then(|| (p.high_watermark - v.log_end_offset).max(0));
        json!({
            "id": v.replica_id.0,
            "log_end_offset": v.log_end_offset,
            "lag": lag,
            "last_caught_up_timestamp": (v.last_caught_up_timestamp >= 0)
                .then_some(v.last_caught_up_timestamp),
        })
    };
    let voters: Vec<Value> = p.current_voters.iter().map(replica).collect();
    // Broker-only nodes following the metadata log (KRaft's observers).
    let observers: Vec<Value> = p.observers.iter().map(replica).collect();
    let v = json!({
        "cluster_id": cluster.cluster_id.to_string(),
        "controller_id": cluster.controller_id.0,
        "brokers": brokers,
        "quorum": {
            "leader_id": p.leader_id.0,
            "leader_epoch": p.leader_epoch,
            "high_watermark": p.high_watermark,
            "voters": voters,
            "observers": observers,
        },
    });
    if common.json {
        println!("{v}");
        return Ok(());
    }
    println!("cluster id:     {}", cluster.cluster_id);
    println!("controller:     {}", cluster.controller_id.0);
    println!("BROKER\tHOST:PORT\tRACK");
    for b in &brokers {
        println!(
            "{}\t{}:{}\t{}",
            b["id"],
            b["host"].as_str().unwrap_or(""),
            b["port"],
            b["rack"].as_str().unwrap_or("-")
        );
    }
    println!(
        "metadata quorum: leader {}, leader epoch {}, high watermark {}",
        p.leader_id.0, p.leader_epoch, p.high_watermark
    );
    println!("REPLICA\tROLE\tLOG-END-OFFSET\tLAG\tLAST-CAUGHT-UP-MS-AGO");
    let now = ferrite_now_ms();
    let or_dash = |v: &Value| {
        if v.is_null() {
            "-".to_string()
        } else {
            v.to_string()
        }
    };
    let roles = voters
        .iter()
        .map(|v| (v, "voter"))
        .chain(observers.iter().map(|o| (o, "observer")));
    for (v, role) in roles {
        let ago = v["last_caught_up_timestamp"]
            .as_i64()
            .map_or("-".to_string(), |t| (now - t).max(0).to_string());
        let end = v["log_end_offset"].as_i64().filter(|e| *e >= 0);
        println!(
            "{}\t{role}\t{}\t{}\t{ago}",
            v["id"],
            end.map_or("-".to_string(), |e| e.to_string()),
            or_dash(&v["lag"])
        );
    }
    Ok(())
}

fn ferrite_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
