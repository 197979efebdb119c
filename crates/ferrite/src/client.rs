//! Client subcommands, on librdkafka (the `rdkafka` crate): the same client users run,
//! so the CLI exercises the broker the way real applications do.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewPartitions, NewTopic, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

use ferrite::murmur2::partition_for_key;

const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Args)]
pub struct Common {
    /// Broker to bootstrap from.
    #[arg(long, default_value = "127.0.0.1:9092", value_name = "HOST:PORT")]
    pub bootstrap_server: String,
    /// Machine-readable JSON output.
    #[arg(long)]
    pub json: bool,
}

fn client_config(common: &Common) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &common.bootstrap_server)
        .set("log_level", "3");
    c
}

#[derive(Args)]
pub struct TopicArgs {
    #[command(subcommand)]
    command: TopicCommand,
}

#[derive(Subcommand)]
enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        #[arg(long, default_value_t = 1)]
        partitions: i32,
        #[arg(long, default_value_t = 1)]
        replication_factor: i32,
        /// Topic config KEY=VALUE; repeatable.
        #[arg(long = "config", value_name = "KEY=VALUE")]
        configs: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
    /// List topics.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Show partitions, leaders, replicas, offsets and configs.
    Describe {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Change configs (--config KEY=VALUE) or grow the partition count (--partitions N).
    Alter {
        name: String,
        #[arg(long = "config", value_name = "KEY=VALUE")]
        configs: Vec<String>,
        #[arg(long)]
        partitions: Option<usize>,
        #[command(flatten)]
        common: Common,
    },
    /// Delete a topic.
    Delete {
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

fn parse_kv(items: &[String]) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow!("expected KEY=VALUE, got `{kv}`"))
        })
        .collect()
}

fn admin(common: &Common) -> Result<AdminClient<DefaultClientContext>> {
    client_config(common)
        .create()
        .context("cannot create admin client")
}

fn admin_options() -> AdminOptions {
    AdminOptions::new()
        .operation_timeout(Some(TIMEOUT))
        .request_timeout(Some(TIMEOUT))
}

pub async fn topic(args: TopicArgs) -> Result<()> {
    match args.command {
        TopicCommand::Create {
            name,
            partitions,
            replication_factor,
            configs,
            common,
        } => {
            let configs = parse_kv(&configs)?;
            let mut t = NewTopic::new(
                &name,
                partitions,
                TopicReplication::Fixed(replication_factor),
            );
            for (k, v) in &configs {
                t = t.set(k, v);
            }
            let results = admin(&common)?
                .create_topics([&t], &admin_options())
                .await?;
            for r in results {
                r.map_err(|(topic, code)| anyhow!("cannot create {topic}: {code}"))?;
            }
            if common.json {
                println!("{}", json!({"created": name, "partitions": partitions}));
            } else {
                println!("created topic {name} with {partitions} partition(s)");
            }
        }
        TopicCommand::List { common } => {
            let consumer: BaseConsumer = client_config(&common).create()?;
            let md = consumer.fetch_metadata(None, TIMEOUT)?;
            let names: BTreeSet<String> =
                md.topics().iter().map(|t| t.name().to_string()).collect();
            if common.json {
                println!("{}", json!(names));
            } else {
                for n in names {
                    println!("{n}");
                }
            }
        }
        TopicCommand::Describe { name, common } => {
            let consumer: BaseConsumer = client_config(&common).create()?;
            let md = consumer.fetch_metadata(Some(&name), TIMEOUT)?;
            let t = md
                .topics()
                .first()
                .ok_or_else(|| anyhow!("no metadata for {name}"))?;
            if let Some(e) = t.error() {
                bail!("topic {name}: {:?}", RDKafkaErrorCode::from(e));
            }
            let mut partitions = Vec::new();
            for p in t.partitions() {
                let (low, high) = consumer.fetch_watermarks(&name, p.id(), TIMEOUT)?;
                partitions.push(json!({
                    "partition": p.id(), "leader": p.leader(), "replicas": p.replicas(), "isr": p.isr(),
                    "log_start_offset": low, "log_end_offset": high,
                }));
            }
            let configs = admin(&common)?
                .describe_configs([&ResourceSpecifier::Topic(&name)], &admin_options())
                .await?;
            let mut config_map = serde_json::Map::new();
            for r in configs {
                let r = r.map_err(|e| anyhow!("describe configs: {e}"))?;
                for e in r.entries {
                    config_map.insert(e.name.clone(), json!(e.value));
                }
            }
            if common.json {
                println!(
                    "{}",
                    json!({"topic": name, "partitions": partitions, "configs": config_map})
                );
            } else {
                println!("topic {name}");
                for p in &partitions {
                    println!(
                        "  partition {} leader {} replicas {} isr {} log_start_offset {} log_end_offset {}",
                        p["partition"], p["leader"], p["replicas"], p["isr"], p["log_start_offset"], p["log_end_offset"]
                    );
                }
                for (k, v) in &config_map {
                    println!("  {k}={}", v.as_str().unwrap_or("null"));
                }
            }
        }
        TopicCommand::Alter {
            name,
            configs,
            partitions,
            common,
        } => {
            let client = admin(&common)?;
            if let Some(n) = partitions {
                for r in client
                    .create_partitions([&NewPartitions::new(&name, n)], &admin_options())
                    .await?
                {
                    r.map_err(|(t, code)| anyhow!("cannot add partitions to {t}: {code}"))?;
                }
            }
            let configs = parse_kv(&configs)?;
            if !configs.is_empty() {
                // AlterConfigs replaces the whole set: start from the current overrides.
                let current = client
                    .describe_configs([&ResourceSpecifier::Topic(&name)], &admin_options())
                    .await?;
                let mut alter = AlterConfig::new(ResourceSpecifier::Topic(&name));
                let mut merged = std::collections::BTreeMap::new();
                for r in current {
                    let r = r.map_err(|e| anyhow!("describe configs: {e}"))?;
                    for e in r.entries {
                        if e.source == rdkafka::admin::ConfigSource::DynamicTopic {
                            if let Some(v) = e.value {
                                merged.insert(e.name, v);
                            }
                        }
                    }
                }
                for (k, v) in configs {
                    merged.insert(k, v);
                }
                for (k, v) in &merged {
                    alter = alter.set(k, v);
                }
                for r in client.alter_configs([&alter], &admin_options()).await? {
                    r.map_err(|(_, code)| anyhow!("cannot alter {name}: {code}"))?;
                }
                // The rdkafka crate drops per-resource AlterConfigs errors: read back.
                let after = client
                    .describe_configs([&ResourceSpecifier::Topic(&name)], &admin_options())
                    .await?;
                for r in after {
                    let entries = r.map_err(|e| anyhow!("describe configs: {e}"))?.entries;
                    for (k, v) in &merged {
                        if !entries
                            .iter()
                            .any(|e| &e.name == k && e.value.as_deref() == Some(v.as_str()))
                        {
                            bail!("the broker rejected {k}={v} for {name} (see its log; unknown keys and invalid values are INVALID_CONFIG)");
                        }
                    }
                }
            }
            println!(
                "{}",
                if common.json {
                    json!({"altered": name}).to_string()
                } else {
                    format!("altered topic {name}")
                }
            );
        }
        TopicCommand::Delete { name, common } => {
            for r in admin(&common)?
                .delete_topics(&[&name], &admin_options())
                .await?
            {
                r.map_err(|(t, code)| anyhow!("cannot delete {t}: {code}"))?;
            }
            println!(
                "{}",
                if common.json {
                    json!({"deleted": name}).to_string()
                } else {
                    format!("deleted topic {name}")
                }
            );
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct ProduceArgs {
    topic: String,
    /// Split each line into key and value at the first occurrence of this string.
    #[arg(long, value_name = "SEP")]
    key_separator: Option<String>,
    /// acks: 0, 1 or all.
    #[arg(long, default_value = "1")]
    acks: String,
    /// none, gzip, snappy, lz4 or zstd.
    #[arg(long, default_value = "none")]
    compression: String,
    #[command(flatten)]
    common: Common,
}

/// Pause between Metadata requests while an auto-created topic's leaders are not known.
const LEADER_RETRY_BACKOFF: Duration = Duration::from_millis(100);

/// The partition count of `topic` as a producer sees it. A producer's Metadata request
/// may auto-create the topic, and the request that creates it hears LEADER_NOT_AVAILABLE
/// (as from Kafka): librdkafka's own topic query and ours race to be that request, so
/// ask again until the leaders are known or `TIMEOUT` passes.
async fn producer_partitions(producer: &FutureProducer, topic: &str) -> Result<i32> {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let md = producer.client().fetch_metadata(Some(topic), TIMEOUT)?;
        let t = md.topics().first();
        let error = t.and_then(|t| t.error()).map(RDKafkaErrorCode::from);
        if error != Some(RDKafkaErrorCode::LeaderNotAvailable) {
            return Ok(t.map_or(0, |t| t.partitions().len()) as i32);
        }
        if std::time::Instant::now() >= deadline {
            bail!("topic {topic}: leaders not available after {TIMEOUT:?}");
        }
        tokio::time::sleep(LEADER_RETRY_BACKOFF).await;
    }
}

pub async fn produce(args: ProduceArgs) -> Result<()> {
    let producer: FutureProducer = client_config(&args.common)
        .set("acks", &args.acks)
        .set("compression.type", &args.compression)
        .set("enable.idempotence", "false")
        .set("linger.ms", "5")
        .create()?;
    let partitions = producer_partitions(&producer, &args.topic).await?;
    if partitions == 0 {
        bail!("topic {} has no partitions (does it exist?)", args.topic);
    }
    let stdin = std::io::stdin();
    let mut pending = Vec::new();
    let mut count = 0u64;
    for line in stdin.lock().lines() {
        let line = line?;
        let (key, value) = match &args.key_separator {
            Some(sep) => match line.split_once(sep.as_str()) {
                Some((k, v)) => (Some(k.to_string()), v.to_string()),
                None => (None, line),
            },
            None => (None, line),
        };
        let producer = producer.clone();
        let topic = args.topic.clone();
        pending.push(tokio::spawn(async move {
            let mut record = FutureRecord::<String, String>::to(&topic).payload(&value);
            // Keys go where the Java client would put them (murmur2); null keys are
            // spread by librdkafka.
            if let Some(k) = &key {
                record = record
                    .key(k)
                    .partition(partition_for_key(k.as_bytes(), partitions));
            }
            producer.send(record, TIMEOUT).await.map_err(|(e, _)| e)
        }));
        count += 1;
        if pending.len() >= 10_000 {
            for p in pending.drain(..) {
                p.await??;
            }
        }
    }
    for p in pending {
        p.await??;
    }
    if args.common.json {
        println!("{}", json!({"produced": count, "topic": args.topic}));
    } else {
        eprintln!("produced {count} message(s) to {}", args.topic);
    }
    Ok(())
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// Values only.
    Value,
    /// partition, offset, timestamp, key and value, tab separated.
    Full,
}

#[derive(Args)]
pub struct ConsumeArgs {
    topic: String,
    /// Start at the earliest offset.
    #[arg(long, conflicts_with_all = ["offset", "timestamp"])]
    from_beginning: bool,
    /// Start at this offset in every partition.
    #[arg(long)]
    offset: Option<i64>,
    /// Start at the first message with a timestamp at or after this (ms since epoch).
    #[arg(long)]
    timestamp: Option<i64>,
    /// Only this partition.
    #[arg(long)]
    partition: Option<i32>,
    /// Stop when every partition is read to its end.
    #[arg(long)]
    exit_at_end: bool,
    /// Stop after this many messages.
    #[arg(long)]
    max_messages: Option<u64>,
    #[arg(long, value_enum, default_value = "value")]
    format: Format,
    /// Consume as a member of this consumer group (subscribe, commit after each message)
    /// instead of reading the partitions directly.
    #[arg(long)]
    group: Option<String>,
    /// Extra librdkafka consumer property; repeatable (e.g. session.timeout.ms=6000).
    #[arg(long = "property", value_name = "KEY=VALUE")]
    properties: Vec<String>,
    #[command(flatten)]
    common: Common,
}

pub async fn consume(args: ConsumeArgs) -> Result<()> {
    let mut config = client_config(&args.common);
    config
        .set("group.id", args.group.as_deref().unwrap_or("ferrite-cli"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set(
            "auto.offset.reset",
            if args.from_beginning {
                "earliest"
            } else {
                "latest"
            },
        );
    for (k, v) in parse_kv(&args.properties)? {
        config.set(k, v);
    }
    let consumer: BaseConsumer = config.create()?;
    if args.group.is_some() {
        return consume_in_group(consumer, &args);
    }
    let md = consumer.fetch_metadata(Some(&args.topic), TIMEOUT)?;
    let t = md
        .topics()
        .first()
        .ok_or_else(|| anyhow!("no metadata for {}", args.topic))?;
    let ids: Vec<i32> = t
        .partitions()
        .iter()
        .map(|p| p.id())
        .filter(|id| args.partition.is_none_or(|p| p == *id))
        .collect();
    if ids.is_empty() {
        bail!("topic {} has no such partitions", args.topic);
    }
    let mut tpl = TopicPartitionList::new();
    for id in &ids {
        let start = match (args.from_beginning, args.offset, args.timestamp) {
            (true, _, _) => Offset::Beginning,
            (_, Some(o), _) => Offset::Offset(o),
            (_, _, Some(ts)) => Offset::Offset(ts),
            _ => Offset::End,
        };
        tpl.add_partition_offset(&args.topic, *id, start)?;
    }
    if args.timestamp.is_some() {
        tpl = consumer.offsets_for_times(tpl, TIMEOUT)?;
    }
    consumer.assign(&tpl)?;
    let mut at_end: BTreeSet<i32> = BTreeSet::new();
    let mut seen = 0u64;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    loop {
        if args.max_messages.is_some_and(|m| seen >= m)
            || (args.exit_at_end && at_end.len() == ids.len())
        {
            break;
        }
        let Some(msg) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        match msg {
            Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                at_end.insert(p);
            }
            Err(e) => bail!("consume failed: {e}"),
            Ok(m) => {
                at_end.remove(&m.partition());
                seen += 1;
                let value = m.payload().map(|v| String::from_utf8_lossy(v).into_owned());
                let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
                let ts = m.timestamp().to_millis();
                if args.common.json {
                    let headers: Vec<_> = m
                        .headers()
                        .map(|h| h.iter().map(|h| json!({"key": h.key, "value": h.value.map(|v| String::from_utf8_lossy(v).into_owned())})).collect())
                        .unwrap_or_default();
                    writeln!(
                        out,
                        "{}",
                        json!({"partition": m.partition(), "offset": m.offset(), "timestamp": ts, "key": key, "value": value, "headers": headers})
                    )?;
                } else {
                    match args.format {
                        Format::Value => writeln!(out, "{}", value.unwrap_or_default())?,
                        Format::Full => writeln!(
                            out,
                            "{}\t{}\t{}\t{}\t{}",
                            m.partition(),
                            m.offset(),
                            ts.unwrap_or(-1),
                            key.unwrap_or_default(),
                            value.unwrap_or_default()
                        )?,
                    }
                }
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// Group mode: the group decides the partitions; each message is committed (synchronously)
/// after it is written out, so a killed process re-delivers at most the one in hand.
fn consume_in_group(consumer: BaseConsumer, args: &ConsumeArgs) -> Result<()> {
    use rdkafka::consumer::CommitMode;
    consumer.subscribe(&[&args.topic])?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut seen = 0u64;
    loop {
        if args.max_messages.is_some_and(|m| seen >= m) {
            break;
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = match msg {
            Err(rdkafka::error::KafkaError::PartitionEOF(_)) => continue,
            Err(e) => bail!("consume failed: {e}"),
            Ok(m) => m,
        };
        let value = m
            .payload()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        if args.common.json {
            writeln!(
                out,
                "{}",
                json!({"partition": m.partition(), "offset": m.offset(), "value": value})
            )?;
        } else {
            writeln!(out, "{}\t{}\t{}", m.partition(), m.offset(), value)?;
        }
        out.flush()?;
        consumer.commit_message(&m, CommitMode::Sync)?;
        seen += 1;
    }
    Ok(())
}
