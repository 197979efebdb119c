//! librdkafka (the `rdkafka` crate) against a real `ferrite server` process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{wait_for, Server, OP_TIMEOUT};
use ferrite::murmur2::partition_for_key;
use rand::{Rng, SeedableRng};
use rdkafka::admin::{
    AdminOptions, AlterConfig, NewPartitions, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, FutureProducer, FutureRecord, Producer,
    ProducerContext,
};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

/// Counts deliveries and keeps the first error.
#[derive(Default)]
struct Counting {
    delivered: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}
impl ClientContext for Counting {}
impl ProducerContext for Counting {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        match r {
            Ok(_) => self.delivered.fetch_add(1, Ordering::Relaxed),
            Err((e, _)) => {
                self.first_error
                    .lock()
                    .unwrap()
                    .get_or_insert(e.to_string());
                self.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

fn consumer(server: &Server) -> BaseConsumer {
    server
        .config()
        .set("group.id", "tests")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap()
}

fn assign_from(c: &BaseConsumer, topic: &str, partitions: i32, offset: Offset) {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, offset).unwrap();
    }
    c.assign(&tpl).unwrap();
}

const BASE_TS: i64 = 1_700_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_keyed_messages_per_codec_round_trip() {
    let server = Server::start(&[]);
    const N: u64 = 100_000;
    const PARTITIONS: i32 = 3;
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        let topic = format!("codec-{codec}");
        server.create_topic(&topic, PARTITIONS, &[]).await;
        let producer: BaseProducer<Counting> = server
            .config()
            .set("compression.type", codec)
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .set("acks", "1")
            .set("queue.buffering.max.messages", "200000")
            .create_with_context(Counting::default())
            .unwrap();
        for i in 0..N {
            let key = format!("key-{}", i % 997);
            let value = format!("value-{i}");
            let headers = OwnedHeaders::new().insert(Header {
                key: "seq",
                value: Some(&i.to_string()),
            });
            let mut record = BaseRecord::to(&topic)
                .key(&key)
                .payload(&value)
                .headers(headers)
                .timestamp(BASE_TS + i as i64);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        producer.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => panic!("send failed: {e}"),
                }
            }
        }
        producer.flush(Duration::from_secs(60)).unwrap();
        let ctx = producer.context();
        assert_eq!(
            ctx.failed.load(Ordering::Relaxed),
            0,
            "{codec}: {:?}",
            ctx.first_error.lock().unwrap()
        );
        assert_eq!(ctx.delivered.load(Ordering::Relaxed), N);

        let c = consumer(&server);
        assign_from(&c, &topic, PARTITIONS, Offset::Beginning);
        let mut next_offset: HashMap<i32, i64> = HashMap::new();
        let mut last_seq: HashMap<i32, i64> = HashMap::new();
        let mut seen = vec![false; N as usize];
        let mut count = 0u64;
        let deadline = Instant::now() + Duration::from_secs(120);
        while count < N {
            assert!(
                Instant::now() < deadline,
                "{codec}: consumed only {count} of {N}"
            );
            let Some(m) = c.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = m.unwrap();
            let p = m.partition();
            // Offsets are dense from 0 in every partition.
            let expected = next_offset.entry(p).or_insert(0);
            assert_eq!(
                m.offset(),
                *expected,
                "{codec}: partition {p} offsets not contiguous"
            );
            *expected += 1;
            let seq: i64 = std::str::from_utf8(m.headers().unwrap().get(0).value.unwrap())
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(m.payload().unwrap(), format!("value-{seq}").as_bytes());
            assert_eq!(m.timestamp().to_millis(), Some(BASE_TS + seq));
            // Order within a partition is production order.
            let last = last_seq.entry(p).or_insert(-1);
            assert!(seq > *last, "{codec}: partition {p} out of order");
            *last = seq;
            // Keys land where the Java client's murmur2 partitioner says.
            assert_eq!(
                p,
                partition_for_key(m.key().unwrap(), PARTITIONS),
                "{codec}: key on wrong partition"
            );
            assert!(!seen[seq as usize], "{codec}: duplicate {seq}");
            seen[seq as usize] = true;
            count += 1;
        }
        assert!(seen.iter().all(|s| *s));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_offsets_by_timestamp_and_delete_records() {
    let server = Server::start(&[]);
    server.create_topic("ts", 1, &[]).await;
    let producer: FutureProducer = server.config().set("linger.ms", "0").create().unwrap();
    for i in 0..100i64 {
        let v = format!("v{i}");
        producer
            .send(
                FutureRecord::<(), _>::to("ts")
                    .partition(0)
                    .payload(&v)
                    .timestamp(BASE_TS + i * 1000),
                OP_TIMEOUT,
            )
            .await
            .unwrap();
    }
    let c = consumer(&server);
    for (target, expected) in [(BASE_TS, 0), (BASE_TS + 50_500, 51), (BASE_TS + 99_000, 99)] {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("ts", 0, Offset::Offset(target))
            .unwrap();
        let r = c.offsets_for_times(tpl, OP_TIMEOUT).unwrap();
        assert_eq!(
            r.find_partition("ts", 0).unwrap().offset(),
            Offset::Offset(expected),
            "target {target}"
        );
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("ts", 0, Offset::Offset(BASE_TS + 200_000))
        .unwrap();
    let r = c.offsets_for_times(tpl, OP_TIMEOUT).unwrap();
    assert_eq!(r.find_partition("ts", 0).unwrap().offset(), Offset::End);

    let mut del = TopicPartitionList::new();
    del.add_partition_offset("ts", 0, Offset::Offset(30))
        .unwrap();
    let r = server
        .admin()
        .delete_records(
            &del,
            &AdminOptions::new().operation_timeout(Some(OP_TIMEOUT)),
        )
        .await
        .unwrap();
    assert_eq!(
        r.find_partition("ts", 0).unwrap().offset(),
        Offset::Offset(30)
    );
    assert_eq!(c.fetch_watermarks("ts", 0, OP_TIMEOUT).unwrap(), (30, 100));
    // Reading from the new start returns offset 30 first.
    assign_from(&c, "ts", 1, Offset::Beginning);
    let first = wait_for("first message after delete", OP_TIMEOUT, || {
        c.poll(Duration::from_millis(200))
            .map(|m| m.unwrap().offset())
    });
    assert_eq!(first, 30);
    // Beyond the high watermark is OFFSET_OUT_OF_RANGE.
    let mut del = TopicPartitionList::new();
    del.add_partition_offset("ts", 0, Offset::Offset(1000))
        .unwrap();
    let r = server
        .admin()
        .delete_records(
            &del,
            &AdminOptions::new().operation_timeout(Some(OP_TIMEOUT)),
        )
        .await
        .unwrap();
    assert!(matches!(
        r.find_partition("ts", 0).unwrap().error(),
        Err(KafkaError::OffsetFetch(RDKafkaErrorCode::OffsetOutOfRange)) | Err(_)
    ));
}

fn log_files(server: &Server, topic: &str, partition: i32) -> usize {
    std::fs::read_dir(server.data_dir.join(format!("{topic}-{partition}")))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "log")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_configs_take_effect() {
    let server = Server::start(&["log.retention.check.interval.ms=200"]);
    server
        .create_topic("cfg", 1, &[("segment.bytes", "4096")])
        .await;
    let producer: FutureProducer = server
        .config()
        .set("linger.ms", "0")
        .set("batch.num.messages", "1")
        .create()
        .unwrap();
    let now = rdkafka::util::millis_to_epoch(std::time::SystemTime::now());
    for i in 0..100i64 {
        let v = vec![b'x'; 200];
        producer
            .send(
                FutureRecord::<(), _>::to("cfg")
                    .payload(&v)
                    .timestamp(now - 60_000 + i),
                OP_TIMEOUT,
            )
            .await
            .unwrap();
    }
    assert!(
        log_files(&server, "cfg", 0) > 1,
        "segment.bytes=4096 rolls segments"
    );

    let admin = server.admin();
    let opts = AdminOptions::new().operation_timeout(Some(OP_TIMEOUT));
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic("cfg")], &opts)
        .await
        .unwrap();
    let entries = described.into_iter().next().unwrap().unwrap().entries;
    let seg = entries.iter().find(|e| e.name == "segment.bytes").unwrap();
    assert_eq!(seg.value.as_deref(), Some("4096"));
    assert_eq!(seg.source, rdkafka::admin::ConfigSource::DynamicTopic);

    // An unknown key is INVALID_CONFIG and changes nothing. (The rdkafka crate drops
    // AlterConfigs per-resource errors, so the effect is checked instead; the Python
    // suite checks the error code itself.)
    let bad = AlterConfig::new(ResourceSpecifier::Topic("cfg")).set("no.such.config", "1");
    admin.alter_configs([&bad], &opts).await.unwrap();
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic("cfg")], &opts)
        .await
        .unwrap();
    let entries = described.into_iter().next().unwrap().unwrap().entries;
    assert!(entries.iter().all(|e| e.name != "no.such.config"));
    assert_eq!(
        entries
            .iter()
            .find(|e| e.name == "segment.bytes")
            .unwrap()
            .value
            .as_deref(),
        Some("4096")
    );

    // A small retention.ms deletes the old segments (records are a minute old).
    let alter = AlterConfig::new(ResourceSpecifier::Topic("cfg"))
        .set("segment.bytes", "4096")
        .set("retention.ms", "1000");
    for r in admin.alter_configs([&alter], &opts).await.unwrap() {
        r.unwrap();
    }
    let c = consumer(&server);
    let low = wait_for(
        "retention to advance the log start offset",
        Duration::from_secs(20),
        || {
            let (low, high) = c.fetch_watermarks("cfg", 0, OP_TIMEOUT).unwrap();
            assert_eq!(high, 100);
            (low > 0).then_some(low)
        },
    );
    assert!(low <= 100);

    // CreatePartitions grows the topic; shrinking is INVALID_PARTITIONS.
    let r = admin
        .create_partitions([&NewPartitions::new("cfg", 3)], &opts)
        .await
        .unwrap();
    r.into_iter().for_each(|x| {
        x.unwrap();
    });
    let r = admin
        .create_partitions([&NewPartitions::new("cfg", 2)], &opts)
        .await
        .unwrap();
    assert!(
        matches!(&r[0], Err((_, RDKafkaErrorCode::InvalidPartitions))),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_errors_are_kafka_errors() {
    let server = Server::start(&["auto.create.topics.enable=false"]);
    let admin = server.admin();
    let opts = AdminOptions::new().operation_timeout(Some(OP_TIMEOUT));
    let cases = [
        (
            NewTopic::new("bad name!", 1, TopicReplication::Fixed(1)),
            RDKafkaErrorCode::InvalidTopic,
        ),
        (
            NewTopic::new("..", 1, TopicReplication::Fixed(1)),
            RDKafkaErrorCode::InvalidTopic,
        ),
        (
            NewTopic::new("rf3", 1, TopicReplication::Fixed(3)),
            RDKafkaErrorCode::InvalidReplicationFactor,
        ),
        (
            NewTopic::new("zero", 0, TopicReplication::Fixed(1)),
            RDKafkaErrorCode::InvalidPartitions,
        ),
        (
            NewTopic::new("compacted", 1, TopicReplication::Fixed(1))
                .set("cleanup.policy", "compact"),
            RDKafkaErrorCode::InvalidConfig,
        ),
    ];
    for (topic, code) in cases {
        let r = admin.create_topics([&topic], &opts).await.unwrap();
        assert!(
            matches!(&r[0], Err((_, c)) if *c == code),
            "{r:?}, wanted {code:?}"
        );
    }
    let long = "a".repeat(250);
    let r = admin
        .create_topics(
            [&NewTopic::new(&long, 1, TopicReplication::Fixed(1))],
            &opts,
        )
        .await
        .unwrap();
    assert!(
        matches!(&r[0], Err((_, RDKafkaErrorCode::InvalidTopic))),
        "{r:?}"
    );
    server.create_topic("exists", 1, &[]).await;
    let r = admin
        .create_topics(
            [&NewTopic::new("exists", 1, TopicReplication::Fixed(1))],
            &opts,
        )
        .await
        .unwrap();
    assert!(
        matches!(&r[0], Err((_, RDKafkaErrorCode::TopicAlreadyExists))),
        "{r:?}"
    );

    // Produce to an unknown topic with auto-creation off.
    let producer: FutureProducer = server
        .config()
        .set("message.timeout.ms", "10000")
        .set("topic.metadata.propagation.max.ms", "500")
        .create()
        .unwrap();
    let err = producer
        .send(FutureRecord::<(), _>::to("nope").payload("x"), OP_TIMEOUT)
        .await
        .unwrap_err()
        .0;
    assert!(
        matches!(
            err,
            KafkaError::MessageProduction(
                RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic
            )
        ),
        "{err:?}"
    );
    // A batch over max.message.bytes is MESSAGE_TOO_LARGE from the broker.
    server
        .create_topic("small", 1, &[("max.message.bytes", "1000")])
        .await;
    let producer: FutureProducer = server
        .config()
        .set("message.timeout.ms", "5000")
        .create()
        .unwrap();
    let big = vec![b'x'; 5000];
    let err = producer
        .send(FutureRecord::<(), _>::to("small").payload(&big), OP_TIMEOUT)
        .await
        .unwrap_err()
        .0;
    assert!(
        matches!(
            err,
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)
        ),
        "{err:?}"
    );

    // Deleted topics disappear from metadata.
    let r = admin.delete_topics(&["exists"], &opts).await.unwrap();
    r.into_iter().for_each(|x| {
        x.unwrap();
    });
    let c = consumer(&server);
    let md = c.fetch_metadata(None, OP_TIMEOUT).unwrap();
    assert!(md.topics().iter().all(|t| t.name() != "exists"));
    assert!(!server.data_dir.join("exists-0").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_keeps_every_acknowledged_message() {
    let mut server = Server::start(&[]);
    server.create_topic("crash", 2, &[]).await;
    let acked: Arc<Mutex<Vec<(i32, i64, String)>>> = Arc::default();
    let producer: FutureProducer = server
        .config()
        .set("acks", "1")
        .set("linger.ms", "1")
        .set("message.timeout.ms", "5000")
        .set("enable.idempotence", "false")
        .create()
        .unwrap();
    let task = {
        let acked = acked.clone();
        tokio::spawn(async move {
            for i in 0..1_000_000u64 {
                let v = format!("m{i}");
                let k = format!("k{}", i % 10);
                match producer
                    .send(
                        FutureRecord::to("crash").key(&k).payload(&v),
                        Duration::from_secs(5),
                    )
                    .await
                {
                    Ok(d) => acked.lock().unwrap().push((d.partition, d.offset, v)),
                    Err(_) => return,
                }
            }
        })
    };
    wait_for(
        "some acknowledged messages",
        Duration::from_secs(30),
        || (acked.lock().unwrap().len() > 2000).then_some(()),
    );
    server.kill9();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .unwrap()
        .unwrap();
    let acked = acked.lock().unwrap().clone();
    server.restart();

    let c = consumer(&server);
    let ends: Vec<i64> = (0..2)
        .map(|p| c.fetch_watermarks("crash", p, OP_TIMEOUT).unwrap().1)
        .collect();
    assign_from(&c, "crash", 2, Offset::Beginning);
    let mut stored: HashMap<(i32, i64), String> = HashMap::new();
    let total: i64 = ends.iter().sum();
    let deadline = Instant::now() + Duration::from_secs(60);
    while (stored.len() as i64) < total {
        assert!(
            Instant::now() < deadline,
            "read {} of {total}",
            stored.len()
        );
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            stored.insert(
                (m.partition(), m.offset()),
                String::from_utf8(m.payload().unwrap().to_vec()).unwrap(),
            );
        }
    }
    for (p, o, v) in &acked {
        assert_eq!(
            stored.get(&(*p, *o)),
            Some(v),
            "acknowledged {v} at {p}/{o} lost"
        );
    }
    // The log accepts appends right after the recovered tail.
    let producer: FutureProducer = server.config().create().unwrap();
    let d = producer
        .send(
            FutureRecord::<(), _>::to("crash")
                .partition(0)
                .payload("after"),
            OP_TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(d.offset, ends[0]);

    // A graceful restart keeps everything too.
    server.stop();
    server.restart();
    let c = consumer(&server);
    assert_eq!(
        c.fetch_watermarks("crash", 0, OP_TIMEOUT).unwrap().1,
        ends[0] + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_wire_does_not_hurt_the_broker() {
    let server = Server::start(&["socket.request.max.bytes=1048576"]);
    server.create_topic("survivor", 1, &[]).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xfe77);
    let send = |bytes: &[u8]| -> Vec<u8> {
        let mut s = TcpStream::connect(&server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(bytes);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    };
    // Random bytes, framed and unframed.
    for _ in 0..50 {
        let len = rng.gen_range(0..512);
        let body: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let mut framed = (body.len() as i32).to_be_bytes().to_vec();
        framed.extend_from_slice(&body);
        send(&framed);
        send(&body);
    }
    // Oversized and negative length prefixes, a truncated frame, an unknown API key.
    assert!(send(&i32::MAX.to_be_bytes()).is_empty());
    assert!(send(&(2 * 1024 * 1024i32).to_be_bytes()).is_empty());
    assert!(send(&(-5i32).to_be_bytes()).is_empty());
    let mut truncated = 100i32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&[0, 18, 0, 3]);
    {
        let mut s = TcpStream::connect(&server.addr).unwrap();
        s.write_all(&truncated).unwrap();
    }
    let mut unknown = 10i32.to_be_bytes().to_vec();
    unknown.extend_from_slice(&[0x27, 0x0f, 0, 0, 0, 0, 0, 7, 0, 0]);
    assert!(send(&unknown).is_empty());
    // ApiVersions v99: answered (KIP-511) with UNSUPPORTED_VERSION and our versions.
    let mut av = vec![0, 18, 0, 99, 0, 0, 0, 42, 0, 0, 0];
    let mut framed = (av.len() as i32).to_be_bytes().to_vec();
    framed.append(&mut av);
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&framed).unwrap();
    let mut head = [0u8; 10];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head[4..8], &42i32.to_be_bytes());
    assert_eq!(&head[8..10], &35i16.to_be_bytes());
    // A client that connects and says nothing does not block others.
    let _silent = TcpStream::connect(&server.addr).unwrap();

    let producer: FutureProducer = server.config().create().unwrap();
    let d = producer
        .send(
            FutureRecord::<(), _>::to("survivor").payload("alive"),
            OP_TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(d.offset, 0);
    let c = consumer(&server);
    assign_from(&c, "survivor", 1, Offset::Beginning);
    let m = wait_for("message after garbage", OP_TIMEOUT, || {
        c.poll(Duration::from_millis(200))
            .map(|m| m.unwrap().payload().unwrap().to_vec())
    });
    assert_eq!(m, b"alive");
}

#[test]
fn start_up_failures_are_one_clear_line() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrite"))
            .arg("server")
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!stderr.contains("panicked"), "{stderr}");
        stderr.lines().last().unwrap_or_default().to_string()
    };
    let server = Server::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("other");
    let line = run(&[
        "--listen",
        &server.addr,
        "--data-dir",
        other.to_str().unwrap(),
    ]);
    assert!(
        line.starts_with("ferrite: cannot listen on") && line.contains("in use"),
        "{line}"
    );
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let line = run(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        file.to_str().unwrap(),
    ]);
    assert!(
        line.starts_with("ferrite: data directory") && line.contains("not usable"),
        "{line}"
    );
    let line = run(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        server.data_dir.to_str().unwrap(),
    ]);
    assert!(line.contains("in use by another ferrite process"), "{line}");
    let line = run(&["--set", "no.such.key=1"]);
    assert!(
        line.contains("unknown or unsupported config `no.such.key`"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_batches_are_corrupt_message_and_append_nothing() {
    let server = Server::start(&[]);
    server.create_topic("corrupt", 1, &[]).await;
    let produce = |records: Vec<u8>| raw_produce(&server, "corrupt", records);
    let corrupt = ferrite_protocol::kafka_protocol::ResponseError::CorruptMessage.code();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for len in [0usize, 1, 12, 60, 61, 200, 5000] {
        let junk: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        assert_eq!(produce(junk), corrupt, "{len} random bytes");
    }
    // A valid-looking header with a wrong CRC.
    let mut bad = vec![0u8; 70];
    bad[8..12].copy_from_slice(&58i32.to_be_bytes());
    bad[16] = 2;
    assert_eq!(produce(bad), corrupt);
    let c = consumer(&server);
    assert_eq!(
        c.fetch_watermarks("corrupt", 0, OP_TIMEOUT).unwrap(),
        (0, 0),
        "nothing appended"
    );
}

/// Produces `records` (bytes a real client would refuse to send) to partition 0 of
/// `topic` with a raw Produce v9, acks=1; returns the partition's error code.
fn raw_produce(server: &Server, topic: &str, records: Vec<u8>) -> i16 {
    use ferrite_protocol::kafka_protocol::messages::produce_request::{
        PartitionProduceData, TopicProduceData,
    };
    use ferrite_protocol::kafka_protocol::messages::{
        ApiKey, ProduceRequest, ProduceResponse, TopicName,
    };
    use ferrite_protocol::kafka_protocol::protocol::StrBytes;
    let req = ProduceRequest::default()
        .with_acks(1)
        .with_timeout_ms(5000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(0)
                .with_records(Some(records.into()))])]);
    let resp: ProduceResponse = common::raw(&server.addr, ApiKey::Produce, 9, &req);
    resp.responses[0].partition_responses[0].error_code
}

/// A zstd batch of a few KiB holding one record whose value is 1 GiB of zeros (a
/// "compression bomb"): the broker stores it (it never decompresses on produce), and a
/// ListOffsets by timestamp, the one path that decodes a batch, stays within a bounded
/// amount of memory and still answers (with the batch's base offset, as Kafka's index).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_bomb_does_not_blow_up_list_offsets() {
    use ferrite_protocol::kafka_protocol::messages::list_offsets_request::{
        ListOffsetsPartition, ListOffsetsTopic,
    };
    use ferrite_protocol::kafka_protocol::messages::{
        ApiKey, BrokerId, ListOffsetsRequest, ListOffsetsResponse, TopicName,
    };
    use ferrite_protocol::kafka_protocol::protocol::StrBytes;
    use ferrite_storage::test_support::{batch_around, push_varint};
    use std::io::Write as _;

    let value_bytes: i64 = 1 << 30;
    let timestamp = 1_700_000_000_000i64;
    // The record: attributes, timestamp delta, offset delta, null key, value, no headers.
    let mut head = vec![0u8];
    push_varint(&mut head, 0);
    push_varint(&mut head, 0);
    push_varint(&mut head, -1);
    push_varint(&mut head, value_bytes);
    let mut record_len = Vec::new();
    push_varint(&mut record_len, head.len() as i64 + value_bytes + 1);
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    enc.write_all(&record_len).unwrap();
    enc.write_all(&head).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(value_bytes >> 20) {
        enc.write_all(&zeros).unwrap();
    }
    enc.write_all(&[0]).unwrap(); // header count 0
    let compressed = enc.finish().unwrap();
    assert!(compressed.len() < 1 << 20, "{} bytes", compressed.len());

    // The v2 batch header around it; attributes 4: zstd.
    let batch = batch_around(4, 1, timestamp, timestamp, &compressed);

    let server = Server::start(&[]);
    server.create_topic("bomb", 1, &[]).await;
    assert_eq!(raw_produce(&server, "bomb", batch), 0);

    let list = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(vec![ListOffsetsTopic::default()
            .with_name(TopicName(StrBytes::from_static_str("bomb")))
            .with_partitions(vec![ListOffsetsPartition::default()
                .with_partition_index(0)
                .with_timestamp(timestamp)])]);
    let resp: ListOffsetsResponse = common::raw(&server.addr, ApiKey::ListOffsets, 7, &list);
    let p = &resp.topics[0].partitions[0];
    assert_eq!((p.error_code, p.offset), (0, 0));

    let peak_kib = common::proc_status_bytes(server.pid(), "VmHWM") >> 10;
    println!("broker peak RSS {} MiB", peak_kib >> 10);
    assert!(
        peak_kib < 256 * 1024,
        "broker peak RSS {} MiB decoding a 1 GiB bomb",
        peak_kib >> 10
    );
}

/// sarama before IBM/sarama#3108 sent batches whose maxTimestamp is -1 (others send 0 or
/// a value below baseTimestamp). Produced raw, uncompressed and zstd: the broker stores
/// the records' maximum, so time retention (1 hour here, checked every 100 ms) keeps them
/// and offsetsForTimes finds them; librdkafka then reads every record with its timestamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sarama_style_max_timestamps_neither_lose_data_nor_hide_it() {
    use ferrite_storage::test_support::{batch_around, record_at};
    let server = Server::start(&["log.retention.check.interval.ms=100"]);
    server
        .create_topic("sarama", 1, &[("retention.ms", "3600000")])
        .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut bases = Vec::new();
    let mut i = 0i64;
    for zstd_records in [false, true] {
        for claimed in [-1i64, 0, -2] {
            let base = now - 60_000 + i * 1000;
            i += 1;
            let claimed = if claimed == -2 { base - 5000 } else { claimed };
            let records: Vec<u8> = (0..3)
                .flat_map(|d| record_at(d, d * 10, format!("v{base}-{d}").as_bytes()))
                .collect();
            let batch = if zstd_records {
                batch_around(
                    4,
                    3,
                    base,
                    claimed,
                    &zstd::encode_all(&records[..], 3).unwrap(),
                )
            } else {
                batch_around(0, 3, base, claimed, &records)
            };
            assert_eq!(
                raw_produce(&server, "sarama", batch),
                0,
                "claimed {claimed}"
            );
            bases.push(base);
        }
    }
    // Many retention checks later, nothing is gone.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let c = consumer(&server);
    assert_eq!(
        c.fetch_watermarks("sarama", 0, OP_TIMEOUT).unwrap(),
        (0, 18),
        "time retention deleted records whose producer sent a bad maxTimestamp"
    );
    for (n, base) in bases.iter().enumerate() {
        for (target, expected) in [(*base, n * 3), (*base + 15, n * 3 + 2)] {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset("sarama", 0, Offset::Offset(target))
                .unwrap();
            let r = c.offsets_for_times(tpl, OP_TIMEOUT).unwrap();
            assert_eq!(
                r.find_partition("sarama", 0).unwrap().offset(),
                Offset::Offset(expected as i64),
                "target {target}"
            );
        }
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("sarama", 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut seen = Vec::new();
    wait_for("all 18 records", OP_TIMEOUT, || {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            seen.push((m.offset(), m.timestamp().to_millis().unwrap()));
        }
        (seen.len() == 18).then_some(())
    });
    for (offset, ts) in seen {
        let batch = offset as usize / 3;
        assert_eq!(ts, bases[batch] + (offset % 3) * 10);
    }
}

/// DescribeConfigs v4 with synonyms and documentation (KIP-569), on the raw wire since
/// librdkafka does not ask for the documentation: every Kafka topic config is listed with
/// its type, the keys Ferrite gives no effect yet say so, and a broker setting given at
/// start-up is the STATIC_BROKER_CONFIG source of its topic config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_configs_documents_every_topic_config() {
    use ferrite_protocol::kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
    use ferrite_protocol::kafka_protocol::messages::{
        ApiKey, DescribeConfigsRequest, DescribeConfigsResponse,
    };
    use ferrite_protocol::kafka_protocol::protocol::StrBytes;
    let server = Server::start(&["log.retention.hours=2"]);
    server
        .create_topic("doc", 1, &[("segment.jitter.ms", "5")])
        .await;
    let req = DescribeConfigsRequest::default()
        .with_resources(vec![DescribeConfigsResource::default()
            .with_resource_type(2)
            .with_resource_name(StrBytes::from_static_str("doc"))
            .with_configuration_keys(None)])
        .with_include_synonyms(true)
        .with_include_documentation(true);
    let resp: DescribeConfigsResponse = common::raw(&server.addr, ApiKey::DescribeConfigs, 4, &req);
    let result = &resp.results[0];
    assert_eq!(result.error_code, 0);
    let by_name: HashMap<&str, _> = result
        .configs
        .iter()
        .map(|c| (c.name.as_str(), c))
        .collect();
    assert_eq!(by_name.len(), 33, "Kafka 4.x's topic configs");
    for c in &result.configs {
        let doc = c.documentation.as_deref().unwrap_or_default();
        assert!(!doc.is_empty(), "{} has documentation", c.name.as_str());
        assert_ne!(c.config_type, 0, "{} has a type", c.name.as_str());
    }
    let doc = |k: &str| by_name[k].documentation.as_deref().unwrap().to_string();
    assert!(doc("segment.jitter.ms").contains("no effect in Ferrite yet"));
    assert!(doc("delete.retention.ms").contains("no effect in Ferrite yet"));
    assert!(!doc("compression.type").contains("no effect"));
    assert!(!doc("retention.ms").contains("no effect"));
    // Replication enforces them (acks=all, the controller's elections).
    assert!(!doc("min.insync.replicas").contains("no effect"));
    assert!(!doc("unclean.leader.election.enable").contains("no effect"));
    // Types: LONG 5, INT 3, BOOLEAN 1, DOUBLE 6, LIST 7, STRING 2.
    assert_eq!(by_name["retention.ms"].config_type, 5);
    assert_eq!(by_name["min.insync.replicas"].config_type, 3);
    assert_eq!(by_name["preallocate"].config_type, 1);
    assert_eq!(by_name["min.cleanable.dirty.ratio"].config_type, 6);
    assert_eq!(by_name["cleanup.policy"].config_type, 7);
    assert_eq!(by_name["compression.type"].config_type, 2);
    // Sources: the topic override (1), the broker's --set (4) and the default (5).
    let jitter = by_name["segment.jitter.ms"];
    assert_eq!(
        (jitter.value.as_deref(), jitter.config_source),
        (Some("5"), 1)
    );
    let retention = by_name["retention.ms"];
    assert_eq!(
        (retention.value.as_deref(), retention.config_source),
        (Some("7200000"), 4)
    );
    let syn: Vec<(&str, Option<&str>, i8)> = retention
        .synonyms
        .iter()
        .map(|s| (s.name.as_str(), s.value.as_deref(), s.source))
        .collect();
    assert_eq!(
        syn,
        vec![
            ("log.retention.hours", Some("2"), 4),
            ("log.retention.hours", Some("168"), 5)
        ]
    );
    assert_eq!(by_name["min.insync.replicas"].config_source, 5);
}
