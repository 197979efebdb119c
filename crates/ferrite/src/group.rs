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

impl GroupArgs {
    pub fn json(&self) -> bool {
        match &self.command {
            GroupCommand::List { common }
            | GroupCommand::Describe { common, .. }
            | GroupCommand::Delete { common, .. }
            | GroupCommand::ResetOffsets { common, .. } => common.json,
        }
    }
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
        /// Consumer group.
        group: String,
        #[command(flatten)]
        common: Common,
    },
    /// Delete an empty group and its committed offsets.
    Delete {
        /// Consumer group.
        group: String,
        #[command(flatten)]
        common: Common,
    },
    /// Move a group's committed offsets. The group must be empty (no running consumers).
    /// Prints the plan; commits it only with --execute.
    ResetOffsets {
        /// Consumer group.
        group: String,
        /// Topic whose partitions are reset.
        #[arg(
            long,
            required_unless_present = "all_topics",
            conflicts_with = "all_topics"
        )]
        topic: Option<String>,
        /// Every topic the group has committed offsets for.
        #[arg(long)]
        all_topics: bool,
        /// Only these partitions, comma separated (e.g. `0,2`) [default: all].
        #[arg(long, value_delimiter = ',', value_name = "N,...")]
        partitions: Vec<i32>,
        /// To the log start offset.
        #[arg(long, group = "target")]
        to_earliest: bool,
        /// To the log end offset.
        #[arg(long, group = "target")]
        to_latest: bool,
        /// To the offsets committed now (clamped into the log; partitions without a
        /// commit are left out).
        #[arg(long, group = "target")]
        to_current: bool,
        /// To this offset in every partition (clamped into the log).
        #[arg(long, group = "target", value_name = "OFFSET")]
        to_offset: Option<i64>,
        /// To the first message at or after this time: milliseconds since the epoch, or
        /// RFC 3339 like 2026-11-22T10:00:00Z.
        #[arg(long, group = "target", value_name = "DATETIME")]
        to_datetime: Option<String>,
        /// To the first message at or after this long ago: ISO 8601 (PT1H, P1DT12H) or
        /// a number with ms, s, m, h or d (90m).
        #[arg(long, group = "target", value_name = "DURATION")]
        by_duration: Option<String>,
        /// Move every committed offset by N (negative goes back).
        #[arg(long, group = "target", value_name = "N", allow_hyphen_values = true)]
        shift_by: Option<i64>,
        /// Print the plan without committing (what happens without --execute too).
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
    let mut c = crate::client::client_config(common)?;
    c.set("group.id", group).set("enable.auto.commit", "false");
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
            let admin: AdminClient<DefaultClientContext> =
                crate::client::client_config(&common)?.create()?;
            let opts = AdminOptions::new().operation_timeout(Some(TIMEOUT));
            for r in admin.delete_groups(&[&group], &opts).await? {
                // DeleteGroups results carry no message: the code and librdkafka's text.
                r.map_err(|(g, code)| {
                    crate::wire::rdkafka_error(format!("cannot delete group {g}"), code)
                })?;
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
            all_topics,
            partitions,
            to_earliest,
            to_latest,
            to_current,
            to_offset,
            to_datetime,
            by_duration,
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
            let topics: Vec<String> = match &topic {
                Some(t) => vec![t.clone()],
                None => {
                    let md = c.fetch_metadata(None, TIMEOUT)?;
                    md.topics()
                        .iter()
                        .map(|t| t.name().to_string())
                        .filter(|t| !t.starts_with("__"))
                        .collect()
                }
            };
            let mut commits = committed(&c, &topics)?;
            if all_topics {
                // The group's topics are those it has committed offsets for.
                let with_commits: std::collections::BTreeSet<String> = commits
                    .iter()
                    .filter(|(_, _, o)| o.is_some())
                    .map(|(t, _, _)| t.clone())
                    .collect();
                commits.retain(|(t, _, _)| with_commits.contains(t));
            }
            if !partitions.is_empty() {
                for p in &partitions {
                    if !commits.iter().any(|(_, q, _)| q == p) {
                        bail!("no partition {p} in {}", topics.join(", "));
                    }
                }
                commits.retain(|(_, p, _)| partitions.contains(p));
            }
            if to_current {
                commits.retain(|(_, _, o)| o.is_some());
            }
            if commits.is_empty() {
                match &topic {
                    Some(t) => bail!("topic {t} has no partitions to reset"),
                    None => bail!("group {group} has no committed offsets to reset"),
                }
            }
            // A time to seek to: --to-datetime, or --by-duration back from now.
            let seek_ms = match (&to_datetime, &by_duration) {
                (Some(dt), _) => Some(parse_datetime(dt)?),
                (None, Some(d)) => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64);
                    Some(now - parse_duration_ms(d)?)
                }
                (None, None) => None,
            };
            let mut plan = Vec::new();
            for (t, p, current) in &commits {
                let (low, high) = c.fetch_watermarks(t, *p, TIMEOUT)?;
                let target = if to_earliest {
                    low
                } else if to_latest {
                    high
                } else if to_current {
                    current.unwrap_or(high)
                } else if let Some(o) = to_offset {
                    o
                } else if let Some(ts) = seek_ms {
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
                    bail!("say where to: --to-earliest, --to-latest, --to-current, --to-offset, --to-datetime, --by-duration or --shift-by");
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

/// Milliseconds in an ISO 8601 duration (`PT1H30M`, `P1DT2H`, `PT0.5S`; days are 24 h,
/// as Kafka's tool takes them) or a number with a unit: `500ms`, `30s`, `90m`, `2h`, `1d`.
fn parse_duration_ms(s: &str) -> Result<i64> {
    let bad =
        || anyhow!("cannot parse duration `{s}`: use ISO 8601 (PT1H, P1DT12H) or 30s, 90m, 2h, 1d");
    let upper = s.trim().to_ascii_uppercase();
    let ms = if let Some(iso) = upper.strip_prefix('P') {
        let (days, time) = match iso.split_once('T') {
            Some((d, t)) => (d, t),
            None => (iso, ""),
        };
        let mut total = 0f64;
        let mut number = String::new();
        for (part, units) in [
            (days, &[('W', 7.0 * 86_400_000.0), ('D', 86_400_000.0)][..]),
            (
                time,
                &[('H', 3_600_000.0), ('M', 60_000.0), ('S', 1000.0)][..],
            ),
        ] {
            for c in part.chars() {
                if c.is_ascii_digit() || c == '.' {
                    number.push(c);
                    continue;
                }
                let unit = units
                    .iter()
                    .find(|(u, _)| *u == c)
                    .map(|(_, m)| *m)
                    .ok_or_else(bad)?;
                total += number.parse::<f64>().map_err(|_| bad())? * unit;
                number.clear();
            }
            if !number.is_empty() {
                return Err(bad());
            }
        }
        if iso.is_empty() || iso == "T" {
            return Err(bad());
        }
        total
    } else {
        let lower = s.trim().to_ascii_lowercase();
        let split = lower
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(bad)?;
        let (n, unit) = lower.split_at(split);
        let n: f64 = n.parse().map_err(|_| bad())?;
        let unit_ms = match unit {
            "ms" => 1.0,
            "s" => 1000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            "d" => 86_400_000.0,
            _ => return Err(bad()),
        };
        n * unit_ms
    };
    if !ms.is_finite() || ms < 0.0 {
        return Err(bad());
    }
    Ok(ms as i64)
}

#[cfg(test)]
mod tests {
    use super::{parse_datetime, parse_duration_ms};

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("PT1H").ok(), Some(3_600_000));
        assert_eq!(parse_duration_ms("P1DT2H30M").ok(), Some(95_400_000));
        assert_eq!(parse_duration_ms("PT0.5S").ok(), Some(500));
        assert_eq!(parse_duration_ms("90m").ok(), Some(5_400_000));
        assert_eq!(parse_duration_ms("1d").ok(), Some(86_400_000));
        assert!(parse_duration_ms("P").is_err());
        assert!(parse_duration_ms("PT5X").is_err());
        assert!(parse_duration_ms("soon").is_err());
    }

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
