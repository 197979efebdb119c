//! `ferrite bench produce|consume|e2e`: load generation and measurement with librdkafka,
//! so the numbers are what users' clients see.
//!
//! Latency with `--rate` is measured from each message's *scheduled* send time, so a
//! stall in the client or broker shows up in the histogram instead of silently delaying
//! the next sends (no coordinated omission).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde_json::json;

/// Longest any bench run may take, whatever its flags say.
const RUN_SECONDS_MAX: u64 = 3600;
/// A consumer that receives nothing for this long stops with what it has.
const CONSUME_IDLE: Duration = Duration::from_secs(10);
/// Bytes at the start of each payload holding its send time (µs since the epoch).
const STAMP_BYTES: usize = 8;
/// Highest latency the histograms track (60 s, in µs).
const LATENCY_US_MAX: u64 = 60_000_000;
/// Longest init_transactions or commit_transaction may take in a transactional run.
const TXN_CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Produce messages and report throughput and delivery latency.
    Produce(ProduceBench),
    /// Consume a topic from the beginning and report throughput.
    Consume(ConsumeBench),
    /// Produce at a fixed rate while consuming; report end-to-end latency.
    E2e(ProduceBench),
}

impl BenchArgs {
    pub fn json(&self) -> bool {
        match &self.command {
            BenchCommand::Produce(b) | BenchCommand::E2e(b) => b.target.json,
            BenchCommand::Consume(b) => b.target.json,
        }
    }
}

/// Options every bench workload takes.
#[derive(Args, Clone)]
struct Target {
    /// Broker(s) to bootstrap from, comma separated.
    #[arg(
        short = 'b',
        long,
        env = "FERRITE_BOOTSTRAP_SERVER",
        default_value = "127.0.0.1:9092",
        value_name = "HOST:PORT"
    )]
    bootstrap_server: String,
    /// Topic to load (created when missing).
    #[arg(long, default_value = "ferrite-bench")]
    topic: String,
    /// Partitions of the topic when it has to be created.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Overall bound in seconds: the run stops (and reports what it did) after this,
    /// whatever --count says.
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    timeout: u64,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Write an SVG of the latency percentiles and throughput over time [default: none].
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<String>,
}

/// `bench produce` and `bench e2e`.
#[derive(Args, Clone)]
struct ProduceBench {
    #[command(flatten)]
    target: Target,
    /// Bytes per message value.
    #[arg(long, default_value_t = 1024, value_name = "BYTES")]
    message_size: usize,
    /// Messages to send [default: 1,000,000; with --duration, as many as fit; e2e:
    /// --rate times --duration (10 s unless given)].
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Seconds to run [default: until --count is sent].
    #[arg(long, value_name = "SECONDS")]
    duration: Option<u64>,
    /// Acknowledgements per request: 0, 1 or all.
    #[arg(long, default_value = "1")]
    acks: String,
    /// Idempotent producers (`enable.idempotence=true`; librdkafka requires `--acks all`).
    #[arg(long)]
    idempotence: bool,
    /// Transactional producers: each commits its transaction every MS milliseconds and
    /// begins the next; commit latency is reported (needs --acks all; implies
    /// idempotence) [default: not transactional].
    #[arg(long, value_name = "MS")]
    transaction_ms: Option<u64>,
    /// Producer linger.ms: how long a batch waits to fill.
    #[arg(long, default_value_t = 5, value_name = "MS")]
    linger_ms: u64,
    /// Producer batch.size in bytes.
    #[arg(long, default_value_t = 1024 * 1024, value_name = "BYTES")]
    batch_size: u64,
    /// Batch compression: none, gzip, snappy, lz4 or zstd.
    #[arg(long, default_value = "none")]
    compression: String,
    /// Message keys: none, random, or fixed:N (N distinct keys).
    #[arg(long, default_value = "none")]
    keys: String,
    /// Producer instances, each on its own thread.
    #[arg(long, default_value_t = 1, value_name = "N")]
    producers: u32,
    /// Target messages per second over all producers (fixed rate; e2e requires it)
    /// [default: as fast as possible].
    #[arg(long, value_name = "N")]
    rate: Option<u64>,
}

/// `bench consume`.
#[derive(Args, Clone)]
struct ConsumeBench {
    #[command(flatten)]
    target: Target,
    /// Messages to read [default: everything in the topic when the run starts].
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Seconds to run [default: until --count is read].
    #[arg(long, value_name = "SECONDS")]
    duration: Option<u64>,
    /// Consume as this consumer group (subscribe) instead of assigning partitions
    /// [default: assign, no group].
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
}

/// What a workload runs with: its subcommand's options, the rest at their defaults.
#[derive(Clone)]
struct Load {
    bootstrap_server: String,
    topic: String,
    partitions: i32,
    message_size: usize,
    count: Option<u64>,
    duration: Option<u64>,
    timeout: u64,
    acks: String,
    idempotence: bool,
    transaction_ms: Option<u64>,
    linger_ms: u64,
    batch_size: u64,
    compression: String,
    keys: String,
    producers: u32,
    rate: Option<u64>,
    group: Option<String>,
    json: bool,
    plot: Option<String>,
}

impl Load {
    fn produce(b: &ProduceBench) -> Load {
        let t = b.target.clone();
        Load {
            bootstrap_server: t.bootstrap_server,
            topic: t.topic,
            partitions: t.partitions,
            message_size: b.message_size,
            count: b.count,
            duration: b.duration,
            timeout: t.timeout,
            acks: b.acks.clone(),
            idempotence: b.idempotence,
            transaction_ms: b.transaction_ms,
            linger_ms: b.linger_ms,
            batch_size: b.batch_size,
            compression: b.compression.clone(),
            keys: b.keys.clone(),
            producers: b.producers,
            rate: b.rate,
            group: None,
            json: t.json,
            plot: t.plot,
        }
    }

    fn consume(b: &ConsumeBench) -> Load {
        let t = b.target.clone();
        Load {
            bootstrap_server: t.bootstrap_server,
            topic: t.topic,
            partitions: t.partitions,
            // Reported from what was read; the producer options are unused.
            message_size: 0,
            count: b.count,
            duration: b.duration,
            timeout: t.timeout,
            acks: String::new(),
            idempotence: false,
            transaction_ms: None,
            linger_ms: 0,
            batch_size: 0,
            compression: String::new(),
            keys: String::new(),
            producers: 0,
            rate: None,
            group: b.group.clone(),
            json: t.json,
            plot: t.plot,
        }
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).map_err(|e| anyhow!("histogram: {e}"))
}

/// Delivery reports: latency from the time each message was due to its acknowledgement.
struct Delivery {
    histogram: Mutex<Histogram<u64>>,
    delivered: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// Messages that share one clock reading in throughput runs (the clock is a measurable
/// part of the client's cost on a VM).
const CLOCK_REUSE: u32 = 32;

impl Delivery {
    fn new() -> Result<Delivery> {
        Ok(Delivery {
            histogram: Mutex::new(histogram()?),
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            first_error: Mutex::new(None),
        })
    }
}

impl ClientContext for Delivery {}
impl ProducerContext for Delivery {
    /// The scheduled send time, µs since the epoch (no allocation per message).
    type DeliveryOpaque = usize;
    fn delivery(&self, result: &DeliveryResult<'_>, due_us: usize) {
        match result {
            Ok(_) => {
                let latency = now_us()
                    .saturating_sub(due_us as u64)
                    .clamp(1, LATENCY_US_MAX);
                if let Ok(mut h) = self.histogram.lock() {
                    let _ = h.record(latency);
                }
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                if let Ok(mut f) = self.first_error.lock() {
                    f.get_or_insert_with(|| e.to_string());
                }
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

struct Progress {
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<u64>>>,
}

impl Progress {
    /// Reports the rate once a second and keeps the per-second counts for the plot: a
    /// live bar (drawn on stderr) when stdout is a terminal, plain lines on stderr
    /// otherwise.
    fn start(label: &'static str, total: Option<u64>) -> Progress {
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (done.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let bar = std::io::stdout().is_terminal().then(|| {
                let b = match total {
                    Some(t) => indicatif::ProgressBar::new(t),
                    None => indicatif::ProgressBar::new_spinner(),
                };
                b.set_style(
                    indicatif::ProgressStyle::with_template("{prefix} {bar:40} {pos}/{len} {msg}")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                b.set_prefix(label);
                b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                b
            });
            let mut per_second = Vec::new();
            let mut last = 0;
            let mut tick = Instant::now();
            while !s.load(Ordering::Relaxed) && per_second.len() < RUN_SECONDS_MAX as usize {
                std::thread::sleep(Duration::from_millis(50));
                if tick.elapsed() < Duration::from_secs(1) {
                    continue;
                }
                tick = Instant::now();
                let now = d.load(Ordering::Relaxed);
                per_second.push(now - last);
                match &bar {
                    Some(b) => {
                        b.set_position(now);
                        b.set_message(format!("{} msgs/s", now - last));
                    }
                    None => eprintln!("{label}: {now} messages, {} msgs/s", now - last),
                }
                last = now;
            }
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            per_second
        });
        Progress {
            done,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

fn client(load: &Load) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &load.bootstrap_server)
        .set("log_level", "3");
    c
}

/// Creates the topic unless it exists.
async fn ensure_topic(load: &Load) -> Result<i32> {
    let consumer: BaseConsumer = client(load).create()?;
    let md = consumer.fetch_metadata(Some(&load.topic), Duration::from_secs(10))?;
    if let Some(t) = md
        .topics()
        .first()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
    {
        return Ok(t.partitions().len() as i32);
    }
    let admin: AdminClient<DefaultClientContext> = client(load).create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin
        .create_topics(
            [&NewTopic::new(
                &load.topic,
                load.partitions,
                TopicReplication::Fixed(1),
            )],
            &opts,
        )
        .await?
    {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => bail!("cannot create {t}: {code}"),
        }
    }
    Ok(load.partitions)
}

/// How message keys are chosen (`--keys`).
#[derive(Clone)]
enum Keys {
    None,
    /// A fresh random 16-hex-digit key per message.
    Random,
    /// `key-0` .. `key-{N-1}` in turn.
    Fixed(Arc<Vec<String>>),
}

impl Keys {
    fn parse(s: &str) -> Result<Keys> {
        Ok(match s {
            "none" => Keys::None,
            "random" => Keys::Random,
            fixed => {
                let n: usize = fixed
                    .strip_prefix("fixed:")
                    .and_then(|n| n.parse().ok())
                    .filter(|n| (1..=10_000_000).contains(n))
                    .ok_or_else(|| {
                        anyhow!("--keys must be none, random or fixed:N (1 <= N <= 10000000)")
                    })?;
                Keys::Fixed(Arc::new((0..n).map(|i| format!("key-{i}")).collect()))
            }
        })
    }
}

/// Cheap keys: xorshift for random ones (they only need to spread over partitions).
struct KeyGen {
    keys: Keys,
    rng: u64,
    buf: String,
}

impl KeyGen {
    fn next(&mut self, i: u64) -> Option<&[u8]> {
        match &self.keys {
            Keys::None => None,
            Keys::Random => {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                self.buf.clear();
                use std::fmt::Write;
                let _ = write!(self.buf, "{:016x}", self.rng);
                Some(self.buf.as_bytes())
            }
            Keys::Fixed(keys) => keys
                .get((i % keys.len().max(1) as u64) as usize)
                .map(|k| k.as_bytes()),
        }
    }
}

struct Outcome {
    messages: u64,
    bytes: u64,
    seconds: f64,
    latency: Option<Histogram<u64>>,
    per_second: Vec<u64>,
    /// Transactional runs: the commit_transaction calls' latency (µs), one per
    /// transaction.
    commits: Option<Histogram<u64>>,
}

/// A producer's result: messages acknowledged, their delivery latency, and (when
/// transactional) its commits' latency.
type Produced = (u64, Histogram<u64>, Option<Histogram<u64>>);

/// Runs the producers; returns when all have sent their share and it is acknowledged.
fn produce(load: &Load, stop_at: Instant) -> Result<Outcome> {
    let total = load.count.unwrap_or(if load.duration.is_some() {
        u64::MAX
    } else {
        1_000_000
    });
    if load.message_size < STAMP_BYTES {
        bail!("--message-size must be at least {STAMP_BYTES} bytes");
    }
    let keys = Keys::parse(&load.keys)?;
    if load.idempotence && !matches!(load.acks.as_str(), "all" | "-1") {
        bail!("--idempotence needs --acks all (librdkafka refuses idempotence with other acks)");
    }
    if load.transaction_ms.is_some() && !matches!(load.acks.as_str(), "all" | "-1") {
        bail!("--transaction-ms needs --acks all (librdkafka's transactions require it)");
    }
    let txn_period = load
        .transaction_ms
        .map(|ms| Duration::from_millis(ms.max(1)));
    let progress = Progress::start("produce", (total != u64::MAX).then_some(total));
    let producers = u64::from(load.producers.max(1));
    let started = Instant::now();
    let mut threads = Vec::new();
    for id in 0..producers {
        let mut cfg = client(load);
        cfg.set("acks", &load.acks)
            .set("linger.ms", load.linger_ms.to_string())
            .set("batch.size", load.batch_size.to_string())
            .set("compression.type", &load.compression)
            .set("enable.idempotence", load.idempotence.to_string())
            .set("partitioner", "murmur2_random")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576");
        if txn_period.is_some() {
            cfg.set(
                "transactional.id",
                format!("ferrite-bench-{}-{}-{id}", load.topic, std::process::id()),
            );
        }
        let producer: BaseProducer<Delivery> = cfg.create_with_context(Delivery::new()?)?;
        let share = total / producers + u64::from(id < total % producers);
        let rate = load.rate.map(|r| (r as f64 / producers as f64).max(1e-3));
        let mut keys = KeyGen {
            keys: keys.clone(),
            rng: 0x9e37_79b9_7f4a_7c15u64 ^ (id + 1),
            buf: String::with_capacity(16),
        };
        let (topic, size, done) = (load.topic.clone(), load.message_size, progress.done.clone());
        threads.push(std::thread::spawn(move || -> Result<Produced> {
            let mut payload = vec![b'x'; size];
            // Transactional: the current transaction's start, and the commits.
            let mut txn = match txn_period {
                Some(period) => {
                    producer.init_transactions(TXN_CALL_TIMEOUT)?;
                    producer.begin_transaction()?;
                    Some((Instant::now(), period, histogram()?))
                }
                None => None,
            };
            let commit = |producer: &BaseProducer<Delivery>,
                          h: &mut Histogram<u64>,
                          again: bool|
             -> Result<()> {
                let t = Instant::now();
                // The transaction's messages are drained in 1 ms polls first:
                // commit_transaction's own flush (rust-rdkafka's BaseProducer) polls in
                // 100 ms steps and each poll waits out its whole timeout, which would add
                // 100 ms to every commit.
                while producer.in_flight_count() > 0 {
                    if t.elapsed() >= TXN_CALL_TIMEOUT {
                        bail!("a transaction's messages not delivered in {TXN_CALL_TIMEOUT:?}");
                    }
                    producer.poll(Duration::from_millis(1));
                }
                producer.commit_transaction(TXN_CALL_TIMEOUT)?;
                let _ = h.record((t.elapsed().as_micros() as u64).clamp(1, LATENCY_US_MAX));
                if again {
                    producer.begin_transaction()?;
                }
                Ok(())
            };
            let t0 = Instant::now();
            let t0_us = now_us();
            let mut sent = 0u64;
            // Throughput runs read the clock once per CLOCK_REUSE messages (and
            // after any wait): the enqueue time is then late by at most the time to
            // enqueue that many messages, microseconds.
            let mut clock_us = t0_us;
            let mut clock_uses = u32::MAX;
            while sent < share {
                let due_us = match rate {
                    Some(r) => {
                        let due = Duration::from_secs_f64(sent as f64 / r);
                        let elapsed = t0.elapsed();
                        if t0 + elapsed >= stop_at {
                            break;
                        }
                        if let Some(wait) = due.checked_sub(elapsed) {
                            // Wait by polling, so that delivery reports are taken
                            // (and timed) as they arrive.
                            producer.poll(wait.min(Duration::from_millis(100)));
                            if due > t0.elapsed() {
                                continue;
                            }
                        }
                        t0_us + due.as_micros() as u64
                    }
                    None => {
                        if clock_uses >= CLOCK_REUSE {
                            if Instant::now() >= stop_at {
                                break;
                            }
                            clock_us = now_us();
                            clock_uses = 0;
                        }
                        clock_uses += 1;
                        clock_us
                    }
                };
                if let Some(stamp) = payload.get_mut(..STAMP_BYTES) {
                    stamp.copy_from_slice(&due_us.to_be_bytes());
                }
                let mut record =
                    BaseRecord::with_opaque_to(&topic, due_us as usize).payload(&payload[..]);
                if let Some(k) = keys.next(sent) {
                    record = record.key(k);
                }
                loop {
                    match producer.send(record) {
                        Ok(()) => break,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                            if Instant::now() >= stop_at {
                                bail!("producer queue still full at the time limit");
                            }
                            record = r;
                            producer.poll(Duration::from_millis(1));
                            clock_uses = u32::MAX;
                        }
                        Err((e, _)) => return Err(e.into()),
                    }
                }
                sent += 1;
                if let Some((began, period, h)) = txn.as_mut() {
                    if (rate.is_some() || sent.is_multiple_of(u64::from(CLOCK_REUSE)))
                        && began.elapsed() >= *period
                    {
                        commit(&producer, h, true)?;
                        *began = Instant::now();
                        clock_uses = u32::MAX;
                    }
                }
                if rate.is_some() || sent.is_multiple_of(u64::from(CLOCK_REUSE)) {
                    done.fetch_add(
                        if rate.is_some() {
                            1
                        } else {
                            u64::from(CLOCK_REUSE)
                        },
                        Ordering::Relaxed,
                    );
                    producer.poll(Duration::ZERO);
                }
            }
            if rate.is_none() {
                done.fetch_add(sent % u64::from(CLOCK_REUSE), Ordering::Relaxed);
            }
            let commits = match txn {
                Some((_, _, mut h)) => {
                    commit(&producer, &mut h, false)?;
                    Some(h)
                }
                None => None,
            };
            let left = stop_at.saturating_duration_since(Instant::now());
            producer.flush(left.max(Duration::from_secs(30)))?;
            let ctx = producer.context();
            if ctx.failed.load(Ordering::Relaxed) > 0 {
                let first = ctx
                    .first_error
                    .lock()
                    .ok()
                    .and_then(|f| f.clone())
                    .unwrap_or_default();
                bail!(
                    "{} deliveries failed; first: {first}",
                    ctx.failed.load(Ordering::Relaxed)
                );
            }
            let h = ctx
                .histogram
                .lock()
                .map(|h| h.clone())
                .map_err(|_| anyhow!("histogram lock"))?;
            Ok((ctx.delivered.load(Ordering::Relaxed), h, commits))
        }));
    }
    let mut latency = histogram()?;
    let mut commits: Option<Histogram<u64>> = None;
    let mut messages = 0;
    for t in threads {
        let (n, h, c) = t
            .join()
            .map_err(|_| anyhow!("producer thread panicked"))??;
        messages += n;
        latency.add(&h).map_err(|e| anyhow!("histogram: {e}"))?;
        if let Some(c) = c {
            match commits.as_mut() {
                Some(all) => all.add(&c).map_err(|e| anyhow!("histogram: {e}"))?,
                None => commits = Some(c),
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let per_second = progress.finish();
    Ok(Outcome {
        messages,
        bytes: messages * load.message_size as u64,
        seconds,
        latency: Some(latency),
        per_second,
        commits,
    })
}

/// Where a bench consumer starts.
enum Start {
    /// Every partition from its first offset (`bench consume`).
    Beginning,
    /// These offsets, one per partition: the log ends taken before an e2e run starts
    /// producing, so that no message of the run can be missed.
    At(Vec<i64>),
}

fn consumer(load: &Load) -> Result<BaseConsumer> {
    let mut cfg = client(load);
    cfg.set("group.id", load.group.as_deref().unwrap_or("ferrite-bench"))
        .set(
            "enable.auto.commit",
            if load.group.is_some() {
                "true"
            } else {
                "false"
            },
        )
        .set("auto.offset.reset", "earliest")
        .set("fetch.max.bytes", "52428800")
        .set("max.partition.fetch.bytes", "10485760");
    Ok(cfg.create()?)
}

/// The high watermark of every partition.
fn log_ends(load: &Load, partitions: i32) -> Result<Vec<i64>> {
    let c = consumer(load)?;
    (0..partitions)
        .map(|p| {
            let (_, high) = c.fetch_watermarks(&load.topic, p, Duration::from_secs(10))?;
            Ok(high)
        })
        .collect()
}

/// Reads until `target` (else `--count`, else everything present at the start)
/// messages (`target` may be lowered while running: e2e sets it to what was produced), the deadline, or `CONSUME_IDLE` without a message. With `Start::At` (e2e),
/// records the latency from each message's embedded (scheduled) send time. Sends on
/// `ready` once the partitions are assigned.
fn consume(
    load: &Load,
    partitions: i32,
    stop_at: Instant,
    start: Start,
    target: Option<Arc<AtomicU64>>,
    ready: Option<std::sync::mpsc::Sender<()>>,
) -> Result<Outcome> {
    let consumer = consumer(load)?;
    let e2e = matches!(start, Start::At(_));
    let mut available = 0u64;
    if target.is_none() && load.count.is_none() {
        for p in 0..partitions {
            let (low, high) = consumer.fetch_watermarks(&load.topic, p, Duration::from_secs(10))?;
            available += (high - low).max(0) as u64;
        }
    }
    let goal = target.unwrap_or_else(|| Arc::new(AtomicU64::new(load.count.unwrap_or(available))));
    match (&load.group, &start) {
        // A group member starts from the group's committed offsets (or the beginning).
        (Some(_), Start::Beginning) => consumer.subscribe(&[&load.topic])?,
        _ => {
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                let offset = match &start {
                    Start::Beginning => Offset::Beginning,
                    Start::At(ends) => Offset::Offset(
                        ends.get(p as usize)
                            .copied()
                            .ok_or_else(|| anyhow!("no log end for partition {p}"))?,
                    ),
                };
                tpl.add_partition_offset(&load.topic, p, offset)?;
            }
            consumer.assign(&tpl)?;
        }
    }
    let progress = Progress::start(
        if e2e { "e2e" } else { "consume" },
        Some(goal.load(Ordering::Relaxed)),
    );
    let mut latency = if e2e { Some(histogram()?) } else { None };
    let (mut messages, mut bytes) = (0u64, 0u64);
    let mut started: Option<Instant> = None;
    let mut idle_since: Option<Instant> = None;
    let mut ready = ready;
    // The clock is read only when a poll comes back empty, every 1024 messages, and
    // (e2e) per message for its latency.
    while messages < goal.load(Ordering::Relaxed) {
        if messages.is_multiple_of(1024) && Instant::now() >= stop_at {
            break;
        }
        let polled = consumer.poll(Duration::from_millis(100));
        if let Some(tx) = ready.take() {
            let _ = tx.send(());
        }
        let Some(m) = polled else {
            let now = Instant::now();
            if now >= stop_at {
                break;
            }
            if now.duration_since(*idle_since.get_or_insert(now)) > CONSUME_IDLE {
                eprintln!(
                    "consume: nothing for {} s; stopping at {messages} of {} messages",
                    CONSUME_IDLE.as_secs(),
                    goal.load(Ordering::Relaxed)
                );
                break;
            }
            continue;
        };
        let m = m.context("consume")?;
        idle_since = None;
        let payload = m.payload().unwrap_or_default();
        started.get_or_insert_with(Instant::now);
        if let (Some(h), Some(stamp)) = (latency.as_mut(), payload.get(..STAMP_BYTES)) {
            let received_us = now_us();
            let mut b = [0u8; STAMP_BYTES];
            b.copy_from_slice(stamp);
            let _ = h.record(
                received_us
                    .saturating_sub(u64::from_be_bytes(b))
                    .clamp(1, LATENCY_US_MAX),
            );
        }
        messages += 1;
        bytes += payload.len() as u64;
        if messages.is_multiple_of(64) {
            progress.done.fetch_add(64, Ordering::Relaxed);
        }
    }
    progress.done.fetch_add(messages % 64, Ordering::Relaxed);
    let seconds = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    Ok(Outcome {
        messages,
        bytes,
        seconds,
        latency,
        per_second: progress.finish(),
        commits: None,
    })
}

pub async fn bench(args: BenchArgs) -> Result<()> {
    let (kind, load) = match &args.command {
        BenchCommand::Produce(b) => ("produce", Load::produce(b)),
        BenchCommand::Consume(b) => ("consume", Load::consume(b)),
        BenchCommand::E2e(b) => ("e2e", Load::produce(b)),
    };
    let run_seconds = load
        .duration
        .unwrap_or(RUN_SECONDS_MAX)
        .min(load.timeout)
        .min(RUN_SECONDS_MAX);
    let deadline = Instant::now() + Duration::from_secs(load.timeout.min(RUN_SECONDS_MAX));
    let stop_at = Instant::now() + Duration::from_secs(run_seconds);
    let partitions = ensure_topic(&load).await?;
    let outcome = match kind {
        "produce" => produce(&load, stop_at)?,
        "consume" => consume(&load, partitions, stop_at, Start::Beginning, None, None)?,
        _ => {
            let Some(rate) = load.rate else {
                bail!("bench e2e needs --rate (messages per second)");
            };
            let count = load
                .count
                .unwrap_or_else(|| rate.saturating_mul(load.duration.unwrap_or(10)));
            // Start offsets are taken before anything is produced, and the producer
            // starts only once the consumer has its assignment.
            let ends = log_ends(&load, partitions)?;
            let (tx, rx) = std::sync::mpsc::channel();
            let goal = Arc::new(AtomicU64::new(count));
            let consumer_goal = goal.clone();
            let consumer_load = load.clone();
            let consumer = std::thread::spawn(move || {
                consume(
                    &consumer_load,
                    partitions,
                    deadline,
                    Start::At(ends),
                    Some(consumer_goal),
                    Some(tx),
                )
            });
            rx.recv_timeout(Duration::from_secs(30))
                .map_err(|_| anyhow!("e2e: the consumer did not start"))?;
            // Let it connect and issue its first fetches.
            std::thread::sleep(Duration::from_millis(500));
            let producer_load = Load {
                count: Some(count),
                ..load.clone()
            };
            let produced = produce(&producer_load, stop_at)?;
            // A --duration run may have produced less than planned.
            goal.store(produced.messages, Ordering::Relaxed);
            let consumed = consumer
                .join()
                .map_err(|_| anyhow!("consumer thread panicked"))??;
            if consumed.messages < produced.messages {
                bail!(
                    "e2e: produced {} but consumed {}",
                    produced.messages,
                    consumed.messages
                );
            }
            Outcome {
                seconds: produced.seconds,
                ..consumed
            }
        }
    };
    report(kind, &load, &outcome)
}

fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    let ms = |us: u64| us as f64 / 1000.0;
    json!({
        "p50": ms(h.value_at_quantile(0.50)), "p90": ms(h.value_at_quantile(0.90)),
        "p99": ms(h.value_at_quantile(0.99)), "p999": ms(h.value_at_quantile(0.999)),
        "p9999": ms(h.value_at_quantile(0.9999)), "max": ms(h.max()),
    })
}

fn report(kind: &str, load: &Load, o: &Outcome) -> Result<()> {
    let secs = o.seconds.max(1e-9);
    let latency = o.latency.as_ref().filter(|h| !h.is_empty());
    let summary = json!({
        "workload": kind, "topic": load.topic, "messages": o.messages, "bytes": o.bytes,
        "seconds": o.seconds, "msgs_per_sec": o.messages as f64 / secs, "mb_per_sec": o.bytes as f64 / 1e6 / secs,
        "latency_ms": latency.map(percentiles), "latency_samples": latency.map_or(0, |h| h.len()),
        "message_size": if kind == "consume" { o.bytes.checked_div(o.messages) } else { Some(load.message_size as u64) },
        "acks": load.acks, "idempotence": load.idempotence, "rate": load.rate, "producers": load.producers,
        "transaction_ms": load.transaction_ms, "transactions": o.commits.as_ref().map_or(0, |h| h.len()),
        "commit_latency_ms": o.commits.as_ref().filter(|h| !h.is_empty()).map(percentiles),
    });
    if let Some(path) = &load.plot {
        std::fs::write(path, svg(kind, latency, &o.per_second))
            .with_context(|| format!("cannot write {path}"))?;
    }
    if load.json {
        println!("{summary}");
    } else {
        println!(
            "{kind}: {} messages, {} bytes in {:.2} s: {:.0} msgs/s, {:.1} MB/s",
            o.messages,
            o.bytes,
            o.seconds,
            o.messages as f64 / secs,
            o.bytes as f64 / 1e6 / secs
        );
        if let Some(l) = summary.get("latency_ms").filter(|l| !l.is_null()) {
            println!(
                "latency ms: p50 {} p90 {} p99 {} p99.9 {} p99.99 {} max {}",
                l["p50"], l["p90"], l["p99"], l["p999"], l["p9999"], l["max"]
            );
        }
        if let Some(l) = summary.get("commit_latency_ms").filter(|l| !l.is_null()) {
            println!(
                "{} transactions; commit latency ms: p50 {} p90 {} p99 {} max {}",
                o.commits.as_ref().map_or(0, |h| h.len()),
                l["p50"],
                l["p90"],
                l["p99"],
                l["max"]
            );
        }
    }
    Ok(())
}

/// A small hand-written SVG: latency by percentile (log scale of 1/(1-q)) on the left,
/// messages per second over time on the right.
fn svg(kind: &str, latency: Option<&Histogram<u64>>, per_second: &[u64]) -> String {
    let (w, h, pad) = (480.0, 300.0, 40.0);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n",
        2.0 * w,
        h
    );
    out.push_str(&format!(
        "<text x=\"10\" y=\"15\">ferrite bench {kind}</text>\n"
    ));
    let polyline = |points: &[(f64, f64)], x0: f64| -> String {
        let (max_x, max_y) = points
            .iter()
            .fold((1e-9f64, 1e-9f64), |(a, b), (x, y)| (a.max(*x), b.max(*y)));
        let pts: Vec<String> = points
            .iter()
            .map(|(x, y)| {
                format!(
                    "{:.1},{:.1}",
                    x0 + pad + x / max_x * (w - 2.0 * pad),
                    h - pad - y / max_y * (h - 2.0 * pad)
                )
            })
            .collect();
        format!(
            "<rect x=\"{}\" y=\"{pad}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#999\"/>\n<polyline fill=\"none\" stroke=\"#c33\" stroke-width=\"1.5\" points=\"{}\"/>\n<text x=\"{}\" y=\"{}\">max {:.3}</text>\n",
            x0 + pad,
            w - 2.0 * pad,
            h - 2.0 * pad,
            pts.join(" "),
            x0 + pad + 4.0,
            pad + 12.0,
            max_y
        )
    };
    if let Some(hist) = latency {
        let points: Vec<(f64, f64)> = (0..=50)
            .map(|i| {
                let q = 1.0 - 10f64.powf(-(i as f64) / 10.0);
                (
                    (1.0 / (1.0 - q).max(1e-5)).log10(),
                    hist.value_at_quantile(q.min(0.99999)) as f64 / 1000.0,
                )
            })
            .collect();
        out.push_str(&polyline(&points, 0.0));
        out.push_str(&format!(
            "<text x=\"{pad}\" y=\"{}\">latency ms by percentile (x: 0, 90, 99, 99.9, 99.99 ...)</text>\n",
            h - 10.0
        ));
    }
    let rate: Vec<(f64, f64)> = per_second
        .iter()
        .enumerate()
        .map(|(i, n)| (i as f64, *n as f64))
        .collect();
    if !rate.is_empty() {
        out.push_str(&polyline(&rate, w));
        out.push_str(&format!(
            "<text x=\"{}\" y=\"{}\">messages per second over time (s)</text>\n",
            w + pad,
            h - 10.0
        ));
    }
    out.push_str("</svg>\n");
    out
}
