//! `ferrite group list|describe|delete|reset-offsets`, on librdkafka like the other
//! client subcommands.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use ferrite_protocol::kafka_protocol::messages::ConsumerProtocolAssignment;
use ferrite_protocol::kafka_protocol::protocol::Decodable;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

use crate::client::Common;

const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Args)]
pub struct GroupArgs {
    #[command(subcommand)]
    command: GroupCommand,
}

#[derive(Subcommand)]
enum GroupCommand {
    /// List consumer groups and their states.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Show state, protocol, members and, per partition, committed offset, log end offset and lag.
    Describe {
        group: String,
        #[command(flatten)]
        common: Common,
    },
    /// Delete an empty group and its committed offsets.
    Delete {
        group: String,
        #[command(flatten)]
        common: Common,
    },
    /// Move a group's committed offsets. The group must be empty (no running consumers).
    ResetOffsets {
        group: String,
        /// Topic whose partitions are reset.
        #[arg(long)]
        topic: String,
        #[arg(long, group = "target")]
        to_earliest: bool,
        #[arg(long, group = "target")]
        to_latest: bool,
        #[arg(long, group = "target", value_name = "OFFSET")]
        to_offset: Option<i64>,
        /// Milliseconds since the epoch, or RFC 3339 like 2026-11-22T10:00:00Z.
        #[arg(long, group = "target", value_name = "DATETIME")]
        to_datetime: Option<String>,
        /// Move every committed offset by N (negative goes back).
        #[arg(long, group = "target", value_name = "N", allow_hyphen_values = true)]
        shift_by: Option<i64>,
        /// Print the plan without committing (the default unless --execute).
        #[arg(long)]
        dry_run: bool,
        /// Commit the new offsets.
        #[arg(long, conflicts_with = "dry_run")]
        execute: bool,
        #[command(flatten)]
        common: Common,
    },
}

fn consumer(common: &Common, group: &str) -> Result<BaseConsumer> {
    let mut c = rdkafka::config::ClientConfig::new();
    c.set("bootstrap.servers", &common.bootstrap_server)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("log_level", "3");
    c.create().context("cannot create client")
}

/// Partitions in a consumer-protocol assignment (KIP-429 format, any version).
fn assigned_partitions(raw: &[u8]) -> Vec<(String, i32)> {
    let mut buf = bytes::Bytes::copy_from_slice(raw);
    if buf.len() < 2 {
        return vec![];
    }
    let version = bytes::Buf::get_i16(&mut buf);
    match ConsumerProtocolAssignment::decode(&mut buf, version.clamp(0, 3)) {
        Ok(a) => a
            .assigned_partitions
            .iter()
            .flat_map(|tp| {
                tp.partitions
                    .iter()
                    .map(move |p| (tp.topic.0.to_string(), *p))
            })
            .collect(),
        Err(_) => vec![],
    }
}

/// `(member id, client id, host, assigned partitions)`
type MemberView = (String, String, String, Vec<(String, i32)>);

struct GroupView {
    state: String,
    protocol: String,
    protocol_type: String,
    members: Vec<MemberView>,
}

fn group_view(c: &BaseConsumer, group: &str) -> Result<Option<GroupView>> {
    let list = c.fetch_group_list(Some(group), TIMEOUT)?;
    Ok(list
        .groups()
        .iter()
        .find(|g| g.name() == group)
        .map(|g| GroupView {
            state: g.state().to_string(),
            protocol: g.protocol().to_string(),
            protocol_type: g.protocol_type().to_string(),
            members: g
                .members()
                .iter()
                .map(|m| {
                    (
                        m.id().to_string(),
                        m.client_id().to_string(),
                        m.client_host().to_string(),
                        m.assignment().map(assigned_partitions).unwrap_or_default(),
                    )
                })
                .collect(),
        }))
}

/// Committed offsets of `group` for every partition of `topics`.
fn committed(c: &BaseConsumer, topics: &[String]) -> Result<Vec<(String, i32, Option<i64>)>> {
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        let md = c.fetch_metadata(Some(t), TIMEOUT)?;
        for tm in md.topics() {
            for p in tm.partitions() {
                tpl.add_partition(t, p.id());
            }
        }
    }
    let got = c.committed_offsets(tpl, TIMEOUT)?;
    Ok(got
        .elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            (e.topic().to_string(), e.partition(), offset)
        })
        .collect())
}

pub async fn group(args: GroupArgs) -> Result<()> {
    match args.command {
        GroupCommand::List { common } => {
            let c = consumer(&common, "ferrite-cli")?;
            let list = c.fetch_group_list(None, TIMEOUT)?;
            let groups: Vec<_> = list.groups().iter().map(|g| json!({"group": g.name(), "state": g.state(), "protocol_type": g.protocol_type()})).collect();
            if common.json {
                println!("{}", json!(groups));
            } else {
                for g in list.groups() {
                    println!("{}\t{}", g.name(), g.state());
                }
            }
        }
        GroupCommand::Describe { group, common } => {
            let c = consumer(&common, &group)?;
            let view = group_view(&c, &group)?.ok_or_else(|| anyhow!("group {group} not found"))?;
            // Partitions to report: those assigned now plus those with commits.
            let md = c.fetch_metadata(None, TIMEOUT)?;
            let topics: Vec<String> = md
                .topics()
                .iter()
                .map(|t| t.name().to_string())
                .filter(|t| !t.starts_with("__"))
                .collect();
            let commits = committed(&c, &topics)?;
            let owner: BTreeMap<(String, i32), String> = view
                .members
                .iter()
                .flat_map(|(id, _, _, parts)| parts.iter().map(move |tp| (tp.clone(), id.clone())))
                .collect();
            let mut rows = Vec::new();
            for (topic, partition, offset) in commits {
                let assigned = owner.get(&(topic.clone(), partition)).cloned();
                if offset.is_none() && assigned.is_none() {
                    continue;
                }
                let (_, end) = c.fetch_watermarks(&topic, partition, TIMEOUT)?;
                let lag = offset.map(|o| end - o);
                rows.push(json!({"topic": topic, "partition": partition, "committed_offset": offset, "log_end_offset": end, "lag": lag, "member": assigned}));
            }
            let members: Vec<_> = view
                .members
                .iter()
                .map(|(id, client, host, parts)| {
                    json!({"member_id": id, "client_id": client, "host": host,
                           "partitions": parts.iter().map(|(t, p)| format!("{t}-{p}")).collect::<Vec<_>>()})
                })
                .collect();
            if common.json {
                println!(
                    "{}",
                    json!({"group": group, "state": view.state, "protocol_type": view.protocol_type, "protocol": view.protocol, "members": members, "partitions": rows})
                );
            } else {
                println!(
                    "group {group} state {} protocol {} ({})",
                    view.state, view.protocol, view.protocol_type
                );
                for m in &members {
                    println!(
                        "  member {} client {} host {} partitions {}",
                        m["member_id"], m["client_id"], m["host"], m["partitions"]
                    );
                }
                println!("  TOPIC\tPARTITION\tCOMMITTED\tLOG-END\tLAG");
                for r in &rows {
                    println!(
                        "  {}\t{}\t{}\t{}\t{}",
                        r["topic"].as_str().unwrap_or(""),
                        r["partition"],
                        r["committed_offset"],
                        r["log_end_offset"],
                        r["lag"]
                    );
                }
            }
        }
        GroupCommand::Delete { group, common } => {
            let mut cfg = rdkafka::config::ClientConfig::new();
            cfg.set("bootstrap.servers", &common.bootstrap_server)
                .set("log_level", "3");
            let admin: AdminClient<DefaultClientContext> = cfg.create()?;
            let opts = AdminOptions::new().operation_timeout(Some(TIMEOUT));
            for r in admin.delete_groups(&[&group], &opts).await? {
                r.map_err(|(g, code)| anyhow!("cannot delete group {g}: {code}"))?;
            }
            println!(
                "{}",
                if common.json {
                    json!({"deleted": group}).to_string()
                } else {
                    format!("deleted group {group}")
                }
            );
        }
        GroupCommand::ResetOffsets {
            group,
            topic,
            to_earliest,
            to_latest,
            to_offset,
            to_datetime,
            shift_by,
            dry_run: _,
            execute,
            common,
        } => {
            let c = consumer(&common, &group)?;
            if let Some(view) = group_view(&c, &group)? {
                if !view.members.is_empty() || (view.state != "Empty" && view.state != "Dead") {
                    bail!(
                        "group {group} is {} with {} member(s); stop its consumers first",
                        view.state,
                        view.members.len()
                    );
                }
            }
            let commits = committed(&c, std::slice::from_ref(&topic))?;
            if commits.is_empty() {
                bail!("topic {topic} has no partitions");
            }
            let mut plan = Vec::new();
            for (t, p, current) in &commits {
                let (low, high) = c.fetch_watermarks(t, *p, TIMEOUT)?;
                let target = if to_earliest {
                    low
                } else if to_latest {
                    high
                } else if let Some(o) = to_offset {
                    o
                } else if let Some(dt) = &to_datetime {
                    let ts = parse_datetime(dt)?;
                    let mut q = TopicPartitionList::new();
                    q.add_partition_offset(t, *p, Offset::Offset(ts))?;
                    let r = c.offsets_for_times(q, TIMEOUT)?;
                    match r.find_partition(t, *p).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => o,
                        _ => high,
                    }
                } else if let Some(n) = shift_by {
                    current.unwrap_or(low) + n
                } else {
                    bail!("say where to: --to-earliest, --to-latest, --to-offset, --to-datetime or --shift-by");
                };
                // Like Kafka's tool, clamp into the range that exists.
                plan.push((t.clone(), *p, *current, target.clamp(low, high)));
            }
            if execute {
                let mut tpl = TopicPartitionList::new();
                for (t, p, _, target) in &plan {
                    tpl.add_partition_offset(t, *p, Offset::Offset(*target))?;
                }
                c.commit(&tpl, CommitMode::Sync)?;
            }
            let rows: Vec<_> = plan.iter().map(|(t, p, cur, new)| json!({"topic": t, "partition": p, "current": cur, "new": new})).collect();
            if common.json {
                println!(
                    "{}",
                    json!({"group": group, "executed": execute, "plan": rows})
                );
            } else {
                println!(
                    "{} for group {group}:",
                    if execute {
                        "reset offsets"
                    } else {
                        "plan (dry run; add --execute to apply)"
                    }
                );
                for (t, p, cur, new) in &plan {
                    println!(
                        "  {t}-{p}: {} -> {new}",
                        cur.map_or("none".to_string(), |c| c.to_string())
                    );
                }
            }
        }
    }
    Ok(())
}

fn parse_datetime(s: &str) -> Result<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    // RFC 3339 / ISO 8601 in UTC: YYYY-MM-DDTHH:MM:SS[.mmm]Z
    let bad = || anyhow!("cannot parse `{s}`: use milliseconds or YYYY-MM-DDTHH:MM:SS[.mmm]Z");
    let s2 = s.strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = s2.split_once('T').ok_or_else(bad)?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_>>()?;
    let (hms, millis) = match time.split_once('.') {
        Some((a, b)) => {
            let digits: String = b.chars().chain(std::iter::repeat('0')).take(3).collect();
            (a, digits.parse::<i64>().map_err(|_| bad())?)
        }
        None => (time, 0),
    };
    let t: Vec<i64> = hms
        .split(':')
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_>>()?;
    let (&[y, m, day], &[hh, mm, ss]) = (d.as_slice(), t.as_slice()) else {
        return Err(bad());
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + millis)
}

#[cfg(test)]
mod tests {
    use super::parse_datetime;

    #[test]
    fn datetimes() {
        assert_eq!(parse_datetime("0").ok(), Some(0));
        assert_eq!(parse_datetime("1970-01-01T00:00:00Z").ok(), Some(0));
        assert_eq!(
            parse_datetime("2026-11-22T10:00:00.5Z").ok(),
            Some(1795341600500)
        );
        assert!(parse_datetime("yesterday").is_err());
    }
}
