//! `ferrite transactions list|describe`: ListTransactions and DescribeTransactions
//! (KIP-664), which librdkafka's Rust binding does not offer, over the wire client
//! (`wire::Conn`), as `kafka-transactions.sh list|describe` sends them: list asks every
//! broker in Metadata and merges the answers; describe asks the id's coordinator
//! (FindCoordinator with key type TRANSACTION).

use anyhow::{anyhow, Result};
use clap::{Args, Subcommand};
use ferrite_protocol::kafka_protocol::messages::{
    ApiKey, DescribeTransactionsRequest, DescribeTransactionsResponse, FindCoordinatorRequest,
    FindCoordinatorResponse, ListTransactionsRequest, ListTransactionsResponse, ProducerId,
    TransactionalId,
};
use ferrite_protocol::kafka_protocol::protocol::StrBytes;
use serde_json::{json, Value};

use crate::client::Common;
use crate::wire::{check, Conn};

/// FindCoordinator's key type of transactional ids.
const KEY_TYPE_TRANSACTION: i8 = 1;

#[derive(Args)]
pub struct TransactionsArgs {
    #[command(subcommand)]
    command: TransactionsCommand,
}

impl TransactionsArgs {
    pub fn json(&self) -> bool {
        match &self.command {
            TransactionsCommand::List { common, .. }
            | TransactionsCommand::Describe { common, .. } => common.json,
        }
    }
}

#[derive(Subcommand)]
enum TransactionsCommand {
    /// List transactional ids with their producer id and state, from every broker.
    List {
        /// Only these states, comma separated (Empty, Ongoing, PrepareCommit,
        /// PrepareAbort, CompleteCommit, CompleteAbort, PrepareEpochFence) [default: all].
        #[arg(long, value_delimiter = ',', value_name = "STATE,...")]
        state: Vec<String>,
        /// Only these producer ids, comma separated [default: all].
        #[arg(long, value_delimiter = ',', value_name = "ID,...")]
        producer_id: Vec<i64>,
        /// Only transactions running longer than this many milliseconds (KIP-994)
        /// [default: no filter].
        #[arg(long, value_name = "MS")]
        duration_ms: Option<i64>,
        #[command(flatten)]
        common: Common,
    },
    /// State, producer id and epoch, timeout, start time and partitions of one
    /// transactional id, from its coordinator.
    Describe {
        /// Transactional id.
        transactional_id: String,
        #[command(flatten)]
        common: Common,
    },
}

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

/// Every broker's "host:port" from Metadata.
fn brokers(conn: &mut Conn) -> Result<Vec<(i32, String)>> {
    Ok(conn
        .cluster_metadata()?
        .brokers
        .iter()
        .map(|b| (b.node_id.0, format!("{}:{}", b.host, b.port)))
        .collect())
}

pub async fn transactions(args: TransactionsArgs) -> Result<()> {
    // Blocking wire requests, off the runtime's workers.
    tokio::task::spawn_blocking(move || run(args)).await?
}

fn run(args: TransactionsArgs) -> Result<()> {
    match args.command {
        TransactionsCommand::List {
            state,
            producer_id,
            duration_ms,
            common,
        } => {
            let mut bootstrap = Conn::open(&common.bootstrap_server)?;
            let mut rows: Vec<Value> = Vec::new();
            let mut unknown: Vec<String> = Vec::new();
            for (node, addr) in brokers(&mut bootstrap)? {
                let mut conn = Conn::open(&addr)?;
                // v1 only when a duration is asked: v0 brokers answer the rest.
                let min = if duration_ms.is_some() { 1 } else { 0 };
                let version = conn.version(ApiKey::ListTransactions, min, 1)?;
                let req = ListTransactionsRequest::default()
                    .with_state_filters(state.iter().map(|v| s(v)).collect())
                    .with_producer_id_filters(producer_id.iter().map(|p| ProducerId(*p)).collect())
                    .with_duration_filter(duration_ms.unwrap_or(-1));
                let resp: ListTransactionsResponse =
                    conn.send(ApiKey::ListTransactions, version, &req)?;
                check(
                    || format!("cannot list transactions of broker {node} ({addr})"),
                    resp.error_code,
                    None,
                )?;
                for u in resp.unknown_state_filters {
                    if !unknown.contains(&u.to_string()) {
                        unknown.push(u.to_string());
                    }
                }
                for t in resp.transaction_states {
                    rows.push(json!({
                        "transactional_id": t.transactional_id.0.to_string(),
                        "producer_id": t.producer_id.0,
                        "state": t.transaction_state.to_string(),
                        "coordinator": node,
                    }));
                }
            }
            rows.sort_by(|a, b| {
                a["transactional_id"]
                    .as_str()
                    .cmp(&b["transactional_id"].as_str())
            });
            if !unknown.is_empty() {
                // As kafka-transactions.sh: the answer is still printed.
                eprintln!(
                    "ferrite: unknown transaction states: {}",
                    unknown.join(", ")
                );
            }
            if common.json {
                println!("{}", json!(rows));
            } else {
                println!("TRANSACTIONAL-ID\tPRODUCER-ID\tSTATE\tCOORDINATOR");
                for r in &rows {
                    println!(
                        "{}\t{}\t{}\t{}",
                        r["transactional_id"].as_str().unwrap_or(""),
                        r["producer_id"],
                        r["state"].as_str().unwrap_or(""),
                        r["coordinator"]
                    );
                }
            }
        }
        TransactionsCommand::Describe {
            transactional_id,
            common,
        } => {
            let mut conn = Conn::open(&common.bootstrap_server)?;
            let addr = coordinator(&mut conn, &transactional_id)?;
            let mut conn = Conn::open(&addr)?;
            let version = conn.version(ApiKey::DescribeTransactions, 0, 0)?;
            let req = DescribeTransactionsRequest::default()
                .with_transactional_ids(vec![TransactionalId(s(&transactional_id))]);
            let resp: DescribeTransactionsResponse =
                conn.send(ApiKey::DescribeTransactions, version, &req)?;
            let t = resp
                .transaction_states
                .into_iter()
                .next()
                .ok_or_else(|| anyhow!("the coordinator answered no transaction"))?;
            check(
                || format!("cannot describe transactional id {transactional_id}"),
                t.error_code,
                None,
            )?;
            let partitions: Vec<String> = t
                .topics
                .iter()
                .flat_map(|tp| {
                    tp.partitions
                        .iter()
                        .map(move |p| format!("{}-{p}", tp.topic.0))
                })
                .collect();
            let start = (t.transaction_start_time_ms >= 0).then_some(t.transaction_start_time_ms);
            let v = json!({
                "transactional_id": transactional_id,
                "coordinator": addr,
                "state": t.transaction_state.to_string(),
                "producer_id": t.producer_id.0,
                "producer_epoch": t.producer_epoch,
                "transaction_timeout_ms": t.transaction_timeout_ms,
                "transaction_start_time_ms": start,
                "partitions": partitions,
            });
            if common.json {
                println!("{v}");
            } else {
                println!(
                    "transactional id {transactional_id} state {} coordinator {addr}",
                    t.transaction_state
                );
                println!(
                    "  producer id {} epoch {} timeout {} ms",
                    t.producer_id.0, t.producer_epoch, t.transaction_timeout_ms
                );
                if let Some(start) = start {
                    println!("  started at {start} (ms since the epoch)");
                }
                println!("  partitions {}", partitions.join(","));
            }
        }
    }
    Ok(())
}

/// The "host:port" of the coordinator of `transactional_id`.
fn coordinator(conn: &mut Conn, transactional_id: &str) -> Result<String> {
    let version = conn.version(ApiKey::FindCoordinator, 1, 4)?;
    let mut req = FindCoordinatorRequest::default().with_key_type(KEY_TYPE_TRANSACTION);
    if version >= 4 {
        req = req.with_coordinator_keys(vec![s(transactional_id)]);
    } else {
        req = req.with_key(s(transactional_id));
    }
    let resp: FindCoordinatorResponse = conn.send(ApiKey::FindCoordinator, version, &req)?;
    let context = || format!("cannot find the coordinator of transactional id {transactional_id}");
    if version >= 4 {
        let c = resp
            .coordinators
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("FindCoordinator answered no coordinator"))?;
        check(context, c.error_code, c.error_message.as_ref())?;
        Ok(format!("{}:{}", c.host, c.port))
    } else {
        check(context, resp.error_code, resp.error_message.as_ref())?;
        Ok(format!("{}:{}", resp.host, resp.port))
    }
}
