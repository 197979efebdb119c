//! Client subcommands, on librdkafka (the `rdkafka` crate): the same client users run,
//! so the CLI exercises the broker the way real applications do.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use ferrite_protocol::kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use ferrite_protocol::kafka_protocol::messages::create_topics_request::{
    CreatableTopic, CreatableTopicConfig,
};
use ferrite_protocol::kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use ferrite_protocol::kafka_protocol::messages::incremental_alter_configs_request::{
    AlterConfigsResource, AlterableConfig,
};
use ferrite_protocol::kafka_protocol::messages::{
    ApiKey, CreatePartitionsRequest, CreatePartitionsResponse, CreateTopicsRequest,
    CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
    IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse, TopicName,
};
use ferrite_protocol::kafka_protocol::protocol::StrBytes;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

use ferrite::murmur2::partition_for_key;

use crate::wire::{check, Conn};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Each partition's leader epoch and offline replicas from one Metadata request (v9+,
/// where both exist), by partition index.
fn leader_epochs(bootstrap: &str, topic: &str) -> Result<BTreeMap<i32, (i32, Vec<i32>)>> {
    use ferrite_protocol::kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    use ferrite_protocol::kafka_protocol::messages::{MetadataRequest, MetadataResponse};
    let mut conn = Conn::open(bootstrap)?;
    let version = conn.version(ApiKey::Metadata, 9, 12)?;
    let md: MetadataResponse = conn.send(
        ApiKey::Metadata,
        version,
        &MetadataRequest::default().with_topics(Some(vec![MetadataRequestTopic::default()
            .with_name(Some(TopicName(StrBytes::from_string(topic.to_string()))))])),
    )?;
    Ok(md
        .topics
        .iter()
        .flat_map(|t| &t.partitions)
        .map(|p| {
            let offline = p.offline_replicas.iter().map(|b| b.0).collect();
            (p.partition_index, (p.leader_epoch, offline))
        })
        .collect())
}
/// The same bound, as admin requests carry it (`timeout_ms`).
const TIMEOUT_MS: i32 = 30_000;
/// DescribeConfigs / AlterConfigs resource type of a topic.
const RESOURCE_TYPE_TOPIC: i8 = 2;

#[derive(Args)]
pub struct Common {
    /// Broker(s) to bootstrap from, comma separated.
    #[arg(
        short = 'b',
        long,
        env = "FERRITE_BOOTSTRAP_SERVER",
        default_value = "127.0.0.1:9092",
        value_name = "HOST:PORT"
    )]
    pub bootstrap_server: String,
    /// Machine-readable output: JSON on stdout, and errors as one JSON object on stderr.
    #[arg(long)]
    pub json: bool,
}

/// librdkafka configuration for `common`, after checking that a bootstrap broker
/// accepts connections: librdkafka itself would retry a refused address until its
/// timeout and then report the failure twice over.
pub fn client_config(common: &Common) -> Result<ClientConfig> {
    drop(crate::wire::connect_any(&common.bootstrap_server)?);
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &common.bootstrap_server)
        .set("log_level", "3");
    Ok(c)
}

#[derive(Args)]
pub struct TopicArgs {
    #[command(subcommand)]
    command: TopicCommand,
}

impl TopicArgs {
    pub fn json(&self) -> bool {
        match &self.command {
            TopicCommand::Create { common, .. }
            | TopicCommand::List { common }
            | TopicCommand::Describe { common, .. }
            | TopicCommand::Alter { common, .. }
            | TopicCommand::Reassign { common, .. }
            | TopicCommand::Delete { common, .. } => common.json,
        }
    }
}

impl ProduceArgs {
    pub fn json(&self) -> bool {
        self.common.json
    }
}

impl ConsumeArgs {
    pub fn json(&self) -> bool {
        self.common.json
    }
}

#[derive(Subcommand)]
enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name.
        name: String,
        /// Partition count [default: the broker's num.partitions].
        #[arg(long, value_name = "N")]
        partitions: Option<i32>,
        /// Replicas per partition [default: the broker's default.replication.factor].
        #[arg(long, value_name = "N")]
        replication_factor: Option<i16>,
        /// Topic config KEY=VALUE; repeatable [default: the broker's defaults].
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
    /// Show partitions, leaders, leader epochs, replicas, ISR, offline replicas, offsets and configs.
    Describe {
        /// Topic name.
        name: String,
        /// Also list each partition's idempotent producers (DescribeProducers).
        #[arg(long)]
        producers: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Change configs (--config KEY=VALUE, --delete-config KEY) or grow the partition
    /// count (--partitions N); at least one of them.
    Alter {
        /// Topic name.
        name: String,
        /// Set this topic config; repeatable. Other overrides are kept.
        #[arg(long = "config", value_name = "KEY=VALUE")]
        configs: Vec<String>,
        /// Remove this topic config override (back to the broker default); repeatable.
        #[arg(long = "delete-config", value_name = "KEY")]
        delete_configs: Vec<String>,
        /// New total partition count (partitions can only be added).
        #[arg(long, value_name = "N")]
        partitions: Option<i32>,
        #[command(flatten)]
        common: Common,
    },
    /// Move partitions to other brokers (AlterPartitionReassignments, as
    /// kafka-reassign-partitions.sh): the new replicas copy the log from the leader, then
    /// the old ones are dropped. With --cancel, stop a move in progress; with neither
    /// --replicas nor --cancel, list the moves in progress.
    Reassign {
        /// Topic name.
        name: String,
        /// The partitions to move (comma separated) [default: every partition].
        #[arg(long = "partition", value_name = "N,...", value_delimiter = ',')]
        partitions: Vec<i32>,
        /// The target replicas, preferred leader first (broker ids, comma separated).
        #[arg(
            long,
            value_name = "ID,...",
            value_delimiter = ',',
            conflicts_with = "cancel"
        )]
        replicas: Vec<i32>,
        /// Cancel the reassignment in progress: back to the replicas before it.
        #[arg(long)]
        cancel: bool,
        /// Wait up to this many seconds for the moves to complete.
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
        #[command(flatten)]
        common: Common,
    },
    /// Delete a topic.
    Delete {
        /// Topic name.
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
    client_config(common)?
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
            let mut conn = Conn::controller(&common.bootstrap_server)?;
            // v4 lets the broker choose: -1 means num.partitions / default.replication.factor
            // (KIP-464).
            let version = conn.version(ApiKey::CreateTopics, 4, 7)?;
            let topic = CreatableTopic::default()
                .with_name(TopicName(StrBytes::from_string(name.clone())))
                .with_num_partitions(partitions.unwrap_or(-1))
                .with_replication_factor(replication_factor.unwrap_or(-1))
                .with_configs(
                    configs
                        .iter()
                        .map(|(k, v)| {
                            CreatableTopicConfig::default()
                                .with_name(StrBytes::from_string(k.clone()))
                                .with_value(Some(StrBytes::from_string(v.clone())))
                        })
                        .collect(),
                );
            let r: CreateTopicsResponse = conn.send(
                ApiKey::CreateTopics,
                version,
                &CreateTopicsRequest::default()
                    .with_topics(vec![topic])
                    .with_timeout_ms(TIMEOUT_MS),
            )?;
            let t = r
                .topics
                .first()
                .ok_or_else(|| anyhow!("cannot create topic {name}: empty response"))?;
            check(
                || format!("cannot create topic {name}"),
                t.error_code,
                t.error_message.as_ref(),
            )?;
            // v5+ answers with what the broker chose; before that we know only what we sent.
            let partitions = Some(t.num_partitions).filter(|p| *p > 0).or(partitions);
            let rf = Some(t.replication_factor)
                .filter(|r| *r > 0)
                .or(replication_factor);
            if common.json {
                println!(
                    "{}",
                    json!({"created": name, "partitions": partitions, "replication_factor": rf})
                );
            } else {
                println!(
                    "created topic {name} with {} partition(s), replication factor {}",
                    partitions.map_or("the broker's default".to_string(), |p| p.to_string()),
                    rf.map_or("the broker's default".to_string(), |r| r.to_string())
                );
            }
        }
        TopicCommand::List { common } => {
            let consumer: BaseConsumer = client_config(&common)?.create()?;
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
        TopicCommand::Describe {
            name,
            producers,
            common,
        } => {
            let consumer: BaseConsumer = client_config(&common)?.create()?;
            let md = consumer.fetch_metadata(Some(&name), TIMEOUT)?;
            let t = md
                .topics()
                .first()
                .ok_or_else(|| anyhow!("no metadata for {name}"))?;
            if let Some(e) = t.error() {
                return Err(crate::wire::rdkafka_error(
                    format!("topic {name}"),
                    RDKafkaErrorCode::from(e),
                )
                .into());
            }
            // librdkafka's metadata has no leader epoch nor offline replicas: one
            // Metadata of our own (v9+ carries both) fills them in.
            let epochs = leader_epochs(&common.bootstrap_server, &name)?;
            let mut partitions = Vec::new();
            for p in t.partitions() {
                let (low, high) = consumer.fetch_watermarks(&name, p.id(), TIMEOUT)?;
                let (leader_epoch, offline) =
                    epochs.get(&p.id()).cloned().unwrap_or((-1, Vec::new()));
                partitions.push(json!({
                    "partition": p.id(), "leader": p.leader(), "leader_epoch": leader_epoch,
                    "replicas": p.replicas(), "isr": p.isr(), "offline_replicas": offline,
                    "log_start_offset": low, "log_end_offset": high,
                }));
            }
            let mut producer_states = Vec::new();
            if producers {
                // Each partition's state lives on its leader.
                let mut by_leader: std::collections::BTreeMap<i32, Vec<i32>> = Default::default();
                for p in t.partitions() {
                    by_leader.entry(p.leader()).or_default().push(p.id());
                }
                for (leader, ids) in by_leader {
                    let b = md
                        .brokers()
                        .iter()
                        .find(|b| b.id() == leader)
                        .ok_or_else(|| {
                            anyhow!("leader {leader} of {name} is not in the metadata")
                        })?;
                    let addr = format!("{}:{}", b.host(), b.port());
                    producer_states.extend(crate::producers::describe(&addr, &name, ids)?);
                }
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
                    json!({"topic": name, "partitions": partitions, "configs": config_map,
                           "producers": producer_states})
                );
            } else {
                println!("topic {name}");
                for p in &partitions {
                    println!(
                        "  partition {} leader {} leader_epoch {} replicas {} isr {} offline_replicas {} log_start_offset {} log_end_offset {}",
                        p["partition"], p["leader"], p["leader_epoch"], p["replicas"], p["isr"], p["offline_replicas"], p["log_start_offset"], p["log_end_offset"]
                    );
                }
                for (k, v) in &config_map {
                    println!("  {k}={}", v.as_str().unwrap_or("null"));
                }
                for p in &producer_states {
                    for s in p["producers"].as_array().into_iter().flatten() {
                        println!(
                            "  partition {} producer_id {} producer_epoch {} last_sequence {} last_timestamp {}",
                            p["partition"], s["producer_id"], s["producer_epoch"], s["last_sequence"], s["last_timestamp"]
                        );
                    }
                    if p["error_code"] != 0 {
                        println!(
                            "  partition {} producers: error {} {}",
                            p["partition"], p["error_code"], p["error_message"]
                        );
                    }
                }
            }
        }
        TopicCommand::Alter {
            name,
            configs,
            delete_configs,
            partitions,
            common,
        } => {
            let configs = parse_kv(&configs)?;
            if configs.is_empty() && delete_configs.is_empty() && partitions.is_none() {
                bail!("nothing to alter: give --config KEY=VALUE, --delete-config KEY or --partitions N");
            }
            let mut conn = Conn::controller(&common.bootstrap_server)?;
            if let Some(n) = partitions {
                let version = conn.version(ApiKey::CreatePartitions, 0, 3)?;
                let r: CreatePartitionsResponse = conn.send(
                    ApiKey::CreatePartitions,
                    version,
                    &CreatePartitionsRequest::default()
                        .with_topics(vec![CreatePartitionsTopic::default()
                            .with_name(TopicName(StrBytes::from_string(name.clone())))
                            .with_count(n)
                            .with_assignments(None)])
                        .with_timeout_ms(TIMEOUT_MS),
                )?;
                for t in &r.results {
                    check(
                        || format!("cannot grow {name} to {n} partitions"),
                        t.error_code,
                        t.error_message.as_ref(),
                    )?;
                }
            }
            if !configs.is_empty() || !delete_configs.is_empty() {
                // IncrementalAlterConfigs changes only the keys named (KIP-339), so other
                // overrides stay, and its per-resource errors carry the broker's message.
                let version = conn.version(ApiKey::IncrementalAlterConfigs, 0, 1)?;
                let set = configs
                    .iter()
                    .map(|(k, v)| (k.clone(), Some(v.clone()), 0i8));
                let delete = delete_configs.iter().map(|k| (k.clone(), None, 1i8));
                let resource = AlterConfigsResource::default()
                    .with_resource_type(RESOURCE_TYPE_TOPIC)
                    .with_resource_name(StrBytes::from_string(name.clone()))
                    .with_configs(
                        set.chain(delete)
                            .map(|(k, v, op)| {
                                AlterableConfig::default()
                                    .with_name(StrBytes::from_string(k))
                                    .with_config_operation(op)
                                    .with_value(v.map(StrBytes::from_string))
                            })
                            .collect(),
                    );
                let r: IncrementalAlterConfigsResponse = conn.send(
                    ApiKey::IncrementalAlterConfigs,
                    version,
                    &IncrementalAlterConfigsRequest::default().with_resources(vec![resource]),
                )?;
                for res in &r.responses {
                    check(
                        || format!("cannot alter {name}"),
                        res.error_code,
                        res.error_message.as_ref(),
                    )?;
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
        TopicCommand::Reassign {
            name,
            partitions,
            replicas,
            cancel,
            wait,
            common,
        } => reassign(&name, partitions, replicas, cancel, wait, &common)?,
        TopicCommand::Delete { name, common } => {
            let mut conn = Conn::controller(&common.bootstrap_server)?;
            let version = conn.version(ApiKey::DeleteTopics, 1, 6)?;
            let topic_name = TopicName(StrBytes::from_string(name.clone()));
            // v6 names topics in `topics` (by name or id, KIP-516); before, in `topic_names`.
            let request = if version >= 6 {
                DeleteTopicsRequest::default()
                    .with_topics(vec![DeleteTopicState::default().with_name(Some(topic_name))])
            } else {
                DeleteTopicsRequest::default().with_topic_names(vec![topic_name])
            };
            let r: DeleteTopicsResponse = conn.send(
                ApiKey::DeleteTopics,
                version,
                &request.with_timeout_ms(TIMEOUT_MS),
            )?;
            for t in &r.responses {
                check(
                    || format!("cannot delete topic {name}"),
                    t.error_code,
                    t.error_message.as_ref(),
                )?;
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
    /// Topic to produce to (created on first use when the broker auto-creates topics).
    topic: String,
    /// Split each input line into key and value at the first occurrence of this string;
    /// a line without it has a null key. Without this option every key is null.
    #[arg(long, value_name = "SEP")]
    key_separator: Option<String>,
    /// Send every message to this partition [default: murmur2 of the key, as the Java
    /// client partitions; keyless messages are spread by librdkafka].
    #[arg(long, value_name = "N")]
    partition: Option<i32>,
    /// Header added to every message; repeatable (`--header a=1 --header b=2`).
    #[arg(long = "header", value_name = "KEY=VALUE")]
    headers: Vec<String>,
    /// The byte that ends each message in the input: one character, or an escape
    /// (`\n`, `\0`, `\t`, `\xNN`). Everything between delimiters is sent byte for byte.
    #[arg(long, default_value = "\\n", value_name = "BYTE")]
    delimiter: String,
    /// Acknowledgements to wait for: 0, 1 or all.
    #[arg(long, default_value = "1")]
    acks: String,
    /// Batch compression: none, gzip, snappy, lz4 or zstd.
    #[arg(long, default_value = "none")]
    compression: String,
    #[command(flatten)]
    common: Common,
}

/// Pause between Metadata requests while an auto-created topic's leaders are not known.
const LEADER_RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// Messages handed to librdkafka whose delivery report has not been awaited yet: enough
/// to keep many batches in flight, few enough that memory stays bounded on any input.
const DELIVERIES_OUTSTANDING_MAX: usize = 10_000;

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

/// One byte from `\n`, `\0`, `\t`, `\r`, `\\`, `\xNN` or a single ASCII character.
fn parse_delimiter(s: &str) -> Result<u8> {
    let byte = match s {
        "\\n" => Some(b'\n'),
        "\\0" => Some(0),
        "\\t" => Some(b'\t'),
        "\\r" => Some(b'\r'),
        "\\\\" => Some(b'\\'),
        _ => match s.strip_prefix("\\x") {
            Some(hex) if hex.len() == 2 => u8::from_str_radix(hex, 16).ok(),
            _ if s.len() == 1 => s.bytes().next(),
            _ => None,
        },
    };
    byte.ok_or_else(|| {
        anyhow!("--delimiter expects one byte (`,`, `\\n`, `\\0`, `\\xNN`), got `{s}`")
    })
}

/// Splits `line` at the first occurrence of `sep`: `(key, value)`.
fn split_key<'a>(line: &'a [u8], sep: &[u8]) -> (Option<&'a [u8]>, &'a [u8]) {
    if !sep.is_empty() {
        if let Some(at) = line.windows(sep.len()).position(|w| w == sep) {
            return (
                line.get(..at),
                line.get(at + sep.len()..).unwrap_or_default(),
            );
        }
    }
    (None, line)
}

/// A sent message whose delivery report is still to come, with its input line number.
type Outstanding = (u64, rdkafka::producer::DeliveryFuture);

async fn await_delivery((line, future): Outstanding) -> Result<()> {
    match future.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(anyhow!("line {line}: not delivered: {e}")),
        Err(_) => Err(anyhow!("line {line}: the producer stopped before delivery")),
    }
}

pub async fn produce(args: ProduceArgs) -> Result<()> {
    let delimiter = parse_delimiter(&args.delimiter)?;
    let headers = parse_kv(&args.headers)?;
    // Without idempotence a retried request could overtake the next one; one request in
    // flight per connection keeps input order, and batching still carries thousands of
    // lines per request.
    let producer: FutureProducer = client_config(&args.common)?
        .set("acks", &args.acks)
        .set("compression.type", &args.compression)
        .set("enable.idempotence", "false")
        .set("max.in.flight.requests.per.connection", "1")
        .set("linger.ms", "5")
        .create()?;
    let partitions = producer_partitions(&producer, &args.topic).await?;
    if partitions == 0 {
        bail!("topic {} has no partitions (does it exist?)", args.topic);
    }
    if let Some(p) = args.partition {
        if !(0..partitions).contains(&p) {
            bail!(
                "topic {} has partitions 0..{}; there is no partition {p}",
                args.topic,
                partitions - 1
            );
        }
    }
    let header_set = (!headers.is_empty()).then(|| {
        headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            })
        })
    });
    let separator = args.key_separator.as_deref().map(str::as_bytes);
    let mut input = std::io::BufReader::new(std::io::stdin().lock());
    let mut outstanding: VecDeque<Outstanding> = VecDeque::new();
    let mut buf = Vec::new();
    let mut count = 0u64;
    loop {
        buf.clear();
        if input.read_until(delimiter, &mut buf)? == 0 {
            break;
        }
        count += 1;
        if buf.last() == Some(&delimiter) {
            buf.pop();
        }
        let (key, value) = match separator {
            Some(sep) => split_key(&buf, sep),
            None => (None, buf.as_slice()),
        };
        let mut record = FutureRecord::<[u8], [u8]>::to(&args.topic).payload(value);
        if let Some(k) = key {
            record = record.key(k);
        }
        // Keys go where the Java client would put them (murmur2); null keys are
        // spread by librdkafka.
        record.partition = match (args.partition, key) {
            (Some(p), _) => Some(p),
            (None, Some(k)) => Some(partition_for_key(k, partitions)),
            (None, None) => None,
        };
        if let Some(h) = &header_set {
            record = record.headers(h.clone());
        }
        if outstanding.len() >= DELIVERIES_OUTSTANDING_MAX {
            if let Some(oldest) = outstanding.pop_front() {
                await_delivery(oldest).await?;
            }
        }
        // Sends are issued in input order; librdkafka keeps that order per partition.
        loop {
            match producer.send_result(record) {
                Ok(future) => {
                    outstanding.push_back((count, future));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    match outstanding.pop_front() {
                        Some(oldest) => await_delivery(oldest).await?,
                        None => tokio::time::sleep(LEADER_RETRY_BACKOFF).await,
                    }
                }
                Err((e, _)) => bail!("line {count}: cannot send: {e}"),
            }
        }
    }
    for o in outstanding {
        await_delivery(o).await?;
    }
    if args.common.json {
        println!("{}", json!({"produced": count, "topic": args.topic}));
    } else {
        eprintln!("produced {count} message(s) to {}", args.topic);
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// The value's bytes as they are, then a newline.
    Value,
    /// The value with escapes (`\n`, `\t`, `\\`, `\xNN` for bytes that are not UTF-8),
    /// so a binary value stays on one line.
    Escaped,
    /// The value in base64 (RFC 4648, standard alphabet, padded).
    Base64,
    /// partition, offset, timestamp, key and value, tab separated; key and value escaped
    /// as for `escaped`, a null key or value printed as `\N`.
    Full,
}

/// Where a consumer starts in each partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    Earliest,
    Latest,
    At(i64),
    /// N messages before the end.
    FromEnd(i64),
}

fn parse_start(s: &str) -> std::result::Result<Start, String> {
    match s {
        "earliest" | "beginning" => Ok(Start::Earliest),
        "latest" | "end" => Ok(Start::Latest),
        _ => match s.parse::<i64>() {
            Ok(n) if n < 0 => Ok(Start::FromEnd(-n)),
            Ok(n) => Ok(Start::At(n)),
            Err(_) => Err(format!(
                "expected earliest, latest, an offset or -N (N before the end), got `{s}`"
            )),
        },
    }
}

#[derive(Args)]
pub struct ConsumeArgs {
    /// Topic to consume.
    topic: String,
    /// Start at the earliest offset (same as `--offset earliest`).
    #[arg(long, conflicts_with_all = ["offset", "timestamp"])]
    from_beginning: bool,
    /// Where to start in every partition: `earliest`, `latest`, an offset, or `-N` for the
    /// last N messages. With --group it applies only where the group has no committed
    /// offset, and only `earliest`/`latest` [default: latest].
    #[arg(long, value_parser = parse_start, allow_hyphen_values = true, value_name = "OFFSET")]
    offset: Option<Start>,
    /// Start at the first message with a timestamp at or after this (ms since the epoch)
    /// [default: none, see --offset].
    #[arg(long, value_name = "MS", conflicts_with = "group")]
    timestamp: Option<i64>,
    /// Only this partition [default: all partitions]. Not with --group (the group assigns).
    #[arg(long, value_name = "N", conflicts_with = "group")]
    partition: Option<i32>,
    /// Stop when every partition read (with --group: every assigned one) is at its end.
    #[arg(long)]
    exit_at_end: bool,
    /// Stop after this many messages [default: no limit].
    #[arg(long, value_name = "N")]
    max_messages: Option<u64>,
    /// Output format (without --json).
    #[arg(long, value_enum, default_value = "value")]
    format: Format,
    /// Consume as a member of this consumer group: the group assigns partitions and the
    /// consumer commits what it has printed every 5 s, on rebalance and on exit (also on
    /// Ctrl-C or SIGTERM, after which it leaves the group at once) [default: read the
    /// partitions directly, without committing].
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// Extra librdkafka consumer property; repeatable (e.g. session.timeout.ms=6000).
    #[arg(long = "property", value_name = "KEY=VALUE")]
    properties: Vec<String>,
    #[command(flatten)]
    common: Common,
}

/// How often a group consumer commits what it has printed (Kafka's auto.commit.interval.ms).
const COMMIT_INTERVAL_MS: &str = "5000";
/// Printed messages whose offsets wait for the next output flush before they are stored.
const UNFLUSHED_MESSAGES_MAX: usize = 1_000;
/// Longest a printed message waits for the output flush that lets its offset be committed.
const UNFLUSHED_AGE_MAX: Duration = Duration::from_millis(100);
/// Longest one poll blocks, so that signals and --exit-at-end are noticed promptly.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Set by SIGINT or SIGTERM: the consume loop stops, commits and leaves its group.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn watch_signals() {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::spawn(async {
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        STOP.store(true, std::sync::atomic::Ordering::SeqCst);
    });
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                let sextet = ((n >> (18 - 6 * i)) & 63) as usize;
                out.push(char::from(BASE64.get(sextet).copied().unwrap_or(b'=')));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `bytes` on one line: UTF-8 text as it is except `\`, tab, newline, carriage return and
/// other control characters, which are escaped, and bytes that are not UTF-8 as `\xNN`.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        out.push_str(&format!("\\x{b:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// A key, value or header value in JSON: a string when it is UTF-8, else base64 with
/// `<name>_encoding: "base64"` beside it; null stays null.
fn json_bytes(obj: &mut serde_json::Map<String, serde_json::Value>, name: &str, v: Option<&[u8]>) {
    let value = match v.map(std::str::from_utf8) {
        None => serde_json::Value::Null,
        Some(Ok(s)) => json!(s),
        Some(Err(_)) => {
            obj.insert(format!("{name}_encoding"), json!("base64"));
            json!(base64(v.unwrap_or_default()))
        }
    };
    obj.insert(name.to_string(), value);
}

fn write_message(out: &mut impl Write, m: &impl Message, args: &ConsumeArgs) -> Result<()> {
    if args.common.json {
        let mut obj = serde_json::Map::new();
        obj.insert("partition".into(), json!(m.partition()));
        obj.insert("offset".into(), json!(m.offset()));
        obj.insert("timestamp".into(), json!(m.timestamp().to_millis()));
        json_bytes(&mut obj, "key", m.key());
        json_bytes(&mut obj, "value", m.payload());
        let headers: Vec<serde_json::Value> = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        let mut o = serde_json::Map::new();
                        o.insert("key".into(), json!(h.key));
                        json_bytes(&mut o, "value", h.value);
                        serde_json::Value::Object(o)
                    })
                    .collect()
            })
            .unwrap_or_default();
        obj.insert("headers".into(), json!(headers));
        serde_json::to_writer(&mut *out, &obj)?;
        out.write_all(b"\n")?;
        return Ok(());
    }
    let value = m.payload();
    match args.format {
        Format::Value => out.write_all(value.unwrap_or_default())?,
        Format::Escaped => out.write_all(escape(value.unwrap_or_default()).as_bytes())?,
        Format::Base64 => out.write_all(base64(value.unwrap_or_default()).as_bytes())?,
        Format::Full => {
            let field = |b: Option<&[u8]>| b.map_or_else(|| "\\N".to_string(), escape);
            write!(
                out,
                "{}\t{}\t{}\t{}\t{}",
                m.partition(),
                m.offset(),
                m.timestamp().to_millis().unwrap_or(-1),
                field(m.key()),
                field(value)
            )?;
        }
    }
    out.write_all(b"\n")?;
    Ok(())
}

pub async fn consume(args: ConsumeArgs) -> Result<()> {
    let start = match (args.from_beginning, args.offset) {
        (true, _) => Start::Earliest,
        (false, Some(s)) => s,
        (false, None) => Start::Latest,
    };
    if args.group.is_some() && !matches!(start, Start::Earliest | Start::Latest) {
        bail!(
            "with --group the group's committed offsets say where to start; --offset takes \
             only earliest or latest there (for partitions without a commit). To move the \
             group, use `ferrite group reset-offsets`"
        );
    }
    let mut config = client_config(&args.common)?;
    config
        .set("group.id", args.group.as_deref().unwrap_or("ferrite-cli"))
        .set("enable.partition.eof", "true")
        .set("check.crcs", "true")
        .set(
            "auto.offset.reset",
            if start == Start::Earliest {
                "earliest"
            } else {
                "latest"
            },
        );
    if args.group.is_some() {
        // librdkafka commits the stored offsets every interval, when partitions are revoked
        // and on close; an offset is stored only once its message is written out.
        config
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", COMMIT_INTERVAL_MS)
            .set("enable.auto.offset.store", "false");
    } else {
        config.set("enable.auto.commit", "false");
    }
    for (k, v) in parse_kv(&args.properties)? {
        config.set(k, v);
    }
    let consumer: BaseConsumer = config.create()?;
    watch_signals();
    let ids: Option<Vec<i32>> = match &args.group {
        Some(_) => {
            consumer.subscribe(&[&args.topic])?;
            None
        }
        None => Some(assign_partitions(&consumer, &args, start)?),
    };
    let mut at_end: BTreeSet<i32> = BTreeSet::new();
    let mut seen = 0u64;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    // Group mode: the last printed offset per partition, stored once the output is flushed.
    let mut unflushed: BTreeMap<i32, i64> = BTreeMap::new();
    let mut unflushed_count = 0usize;
    let mut last_flush = std::time::Instant::now();
    let result = (|| -> Result<()> {
        loop {
            let stop_now = STOP.load(std::sync::atomic::Ordering::SeqCst);
            let done = args.max_messages.is_some_and(|m| seen >= m)
                || (args.exit_at_end && all_at_end(&consumer, ids.as_deref(), &at_end));
            let idle_flush = !unflushed.is_empty()
                && (unflushed_count >= UNFLUSHED_MESSAGES_MAX
                    || last_flush.elapsed() >= UNFLUSHED_AGE_MAX);
            if stop_now || done || idle_flush {
                out.flush()?;
                for (p, o) in std::mem::take(&mut unflushed) {
                    // A partition revoked meanwhile refuses the store; its new owner
                    // re-reads from the last commit (at-least-once).
                    let _ = consumer.store_offset(&args.topic, p, o);
                }
                unflushed_count = 0;
                last_flush = std::time::Instant::now();
            }
            if stop_now || done {
                return Ok(());
            }
            let Some(msg) = consumer.poll(POLL_INTERVAL) else {
                continue;
            };
            match msg {
                Err(KafkaError::PartitionEOF(p)) => {
                    at_end.insert(p);
                }
                Err(e) => bail!("consume failed: {e}"),
                Ok(m) => {
                    at_end.remove(&m.partition());
                    seen += 1;
                    write_message(&mut out, &m, &args)?;
                    if args.group.is_some() {
                        unflushed.insert(m.partition(), m.offset());
                        unflushed_count += 1;
                    }
                }
            }
        }
    })();
    out.flush()?;
    if args.group.is_some() {
        // Commit what was printed now rather than at the next interval; dropping the
        // consumer then closes it, which sends LeaveGroup so the partitions move at once.
        match consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) if result.is_ok() => return Err(anyhow!("cannot commit offsets: {e}")),
            Err(_) => {}
        }
    }
    drop(consumer);
    result
}

/// Whether every partition read is at its end: the assigned ones (`ids`), or in group
/// mode the group's current assignment (none assigned yet is not the end).
fn all_at_end(consumer: &BaseConsumer, ids: Option<&[i32]>, at_end: &BTreeSet<i32>) -> bool {
    match ids {
        Some(ids) => ids.iter().all(|p| at_end.contains(p)),
        None => match consumer.assignment() {
            Ok(tpl) => {
                let assigned = tpl.elements();
                !assigned.is_empty() && assigned.iter().all(|e| at_end.contains(&e.partition()))
            }
            Err(_) => false,
        },
    }
}

/// Without a group: assign the partitions directly at the start position; their ids.
fn assign_partitions(
    consumer: &BaseConsumer,
    args: &ConsumeArgs,
    start: Start,
) -> Result<Vec<i32>> {
    let md = consumer.fetch_metadata(Some(&args.topic), TIMEOUT)?;
    let t = md
        .topics()
        .first()
        .ok_or_else(|| anyhow!("no metadata for {}", args.topic))?;
    if let Some(e) = t.error() {
        return Err(crate::wire::rdkafka_error(
            format!("topic {}", args.topic),
            RDKafkaErrorCode::from(e),
        )
        .into());
    }
    let ids: Vec<i32> = t
        .partitions()
        .iter()
        .map(|p| p.id())
        .filter(|id| args.partition.is_none_or(|p| p == *id))
        .collect();
    if ids.is_empty() {
        match args.partition {
            Some(p) => bail!("topic {} has no partition {p}", args.topic),
            None => bail!("topic {} has no partitions", args.topic),
        }
    }
    let mut tpl = TopicPartitionList::new();
    for id in &ids {
        let offset = match (args.timestamp, start) {
            (Some(ts), _) => Offset::Offset(ts),
            (None, Start::Earliest) => Offset::Beginning,
            (None, Start::Latest) => Offset::End,
            (None, Start::At(o)) => Offset::Offset(o),
            (None, Start::FromEnd(n)) => Offset::OffsetTail(n),
        };
        tpl.add_partition_offset(&args.topic, *id, offset)?;
    }
    if args.timestamp.is_some() {
        tpl = consumer.offsets_for_times(tpl, TIMEOUT)?;
    }
    consumer.assign(&tpl)?;
    Ok(ids)
}

/// A reassignment in progress: partition, replicas, adding, removing.
type OngoingMove = (i32, Vec<i32>, Vec<i32>, Vec<i32>);

/// `ferrite topic reassign`: starts or cancels the moves, then lists what is still in
/// progress (waiting for it to finish with `--wait`).
fn reassign(
    name: &str,
    mut partitions: Vec<i32>,
    replicas: Vec<i32>,
    cancel: bool,
    wait: Option<u64>,
    common: &Common,
) -> Result<()> {
    use ferrite_protocol::kafka_protocol::messages::alter_partition_reassignments_request::{
        ReassignablePartition, ReassignableTopic,
    };
    use ferrite_protocol::kafka_protocol::messages::list_partition_reassignments_request::ListPartitionReassignmentsTopics;
    use ferrite_protocol::kafka_protocol::messages::{
        AlterPartitionReassignmentsRequest, AlterPartitionReassignmentsResponse, BrokerId,
        ListPartitionReassignmentsRequest, ListPartitionReassignmentsResponse,
    };
    let mut conn = Conn::controller(&common.bootstrap_server)?;
    let topic = TopicName(StrBytes::from_string(name.to_string()));
    if partitions.is_empty() {
        let count = conn.partition_count(name)?;
        partitions = (0..count).collect();
    }
    let changing = cancel || !replicas.is_empty();
    if changing {
        let target = (!cancel).then(|| replicas.iter().map(|&b| BrokerId(b)).collect::<Vec<_>>());
        let version = conn.version(ApiKey::AlterPartitionReassignments, 0, 1)?;
        let r: AlterPartitionReassignmentsResponse = conn.send(
            ApiKey::AlterPartitionReassignments,
            version,
            &AlterPartitionReassignmentsRequest::default()
                .with_timeout_ms(TIMEOUT_MS)
                .with_allow_replication_factor_change(true)
                .with_topics(vec![ReassignableTopic::default()
                    .with_name(topic.clone())
                    .with_partitions(
                        partitions
                            .iter()
                            .map(|&p| {
                                ReassignablePartition::default()
                                    .with_partition_index(p)
                                    .with_replicas(target.clone())
                            })
                            .collect(),
                    )]),
        )?;
        check(
            || format!("cannot reassign {name}"),
            r.error_code,
            r.error_message.as_ref(),
        )?;
        for t in &r.responses {
            for p in &t.partitions {
                check(
                    || format!("cannot reassign {name}-{}", p.partition_index),
                    p.error_code,
                    p.error_message.as_ref(),
                )?;
            }
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(wait.unwrap_or(0));
    let ongoing = loop {
        let r: ListPartitionReassignmentsResponse = conn.send(
            ApiKey::ListPartitionReassignments,
            0,
            &ListPartitionReassignmentsRequest::default()
                .with_timeout_ms(TIMEOUT_MS)
                .with_topics(Some(vec![ListPartitionReassignmentsTopics::default()
                    .with_name(topic.clone())
                    .with_partition_indexes(partitions.clone())])),
        )?;
        check(
            || format!("cannot list the reassignments of {name}"),
            r.error_code,
            r.error_message.as_ref(),
        )?;
        let ongoing: Vec<OngoingMove> = r
            .topics
            .iter()
            .flat_map(|t| &t.partitions)
            .map(|p| {
                let ids = |v: &[BrokerId]| v.iter().map(|b| b.0).collect::<Vec<_>>();
                (
                    p.partition_index,
                    ids(&p.replicas),
                    ids(&p.adding_replicas),
                    ids(&p.removing_replicas),
                )
            })
            .collect();
        if ongoing.is_empty() || wait.is_none() || std::time::Instant::now() >= deadline {
            break ongoing;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if common.json {
        let rows: Vec<_> = ongoing
            .iter()
            .map(|(p, r, a, d)| json!({"partition": p, "replicas": r, "adding": a, "removing": d}))
            .collect();
        let action = if cancel {
            json!("cancel")
        } else if changing {
            json!({"replicas": replicas})
        } else {
            json!(null)
        };
        println!(
            "{}",
            json!({"topic": name, "partitions": partitions, "requested": action, "in_progress": rows})
        );
    } else {
        if cancel {
            println!("cancelled the reassignment of {name} partitions {partitions:?}");
        } else if changing {
            println!("reassigning {name} partitions {partitions:?} to replicas {replicas:?}");
        }
        if ongoing.is_empty() {
            println!("no reassignment in progress for {name} partitions {partitions:?}");
        } else {
            println!(
                "{:<10} {:<16} {:<12} REMOVING",
                "PARTITION", "REPLICAS", "ADDING"
            );
            for (p, r, a, d) in &ongoing {
                let (r, a) = (format!("{r:?}"), format!("{a:?}"));
                println!("{p:<10} {r:<16} {a:<12} {d:?}");
            }
        }
    }
    if wait.is_some() && !ongoing.is_empty() {
        bail!(
            "{} partitions of {name} are still being reassigned after {} s",
            ongoing.len(),
            wait.unwrap_or(0)
        );
    }
    Ok(())
}
