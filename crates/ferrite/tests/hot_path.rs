//! The hot path's behaviour (issue 4): zero-copy fetch returns exactly what the copying
//! path returns, pipelined requests are answered in order, and a producer faster than
//! the disk meets backpressure rather than growing the broker's memory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{Server, OP_TIMEOUT};
use ferrite_protocol::kafka_protocol;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, CreateTopicsRequest, FetchRequest, FetchResponse,
    ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, MetadataResponse, ResponseHeader,
    TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use rdkafka::message::ToBytes;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

fn topic_name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(OP_TIMEOUT)).unwrap();
    s
}

/// Splits a response frame into its correlation id and body.
fn header(mut frame: Bytes, key: ApiKey, version: i16) -> (i32, Bytes) {
    let h = ResponseHeader::decode(&mut frame, key.response_header_version(version)).unwrap();
    (h.correlation_id, frame)
}

fn produce_messages(server: &Server, topic: &str, partitions: i32, count: usize) {
    let producer: ThreadedProducer<DefaultProducerContext> = server
        .config()
        .set("linger.ms", "5")
        .set("batch.size", "20000")
        .create()
        .unwrap();
    let deadline = Instant::now() + OP_TIMEOUT;
    for i in 0..count {
        // Sizes vary so that batches and their boundaries vary.
        let value = vec![b'a' + (i % 26) as u8; 1 + (i * 37) % 900];
        let key = format!("k{i}");
        let partition = (i % partitions as usize) as i32;
        let record = BaseRecord::to(topic)
            .key(&key)
            .payload(&value)
            .partition(partition);
        send_until(&producer, record, deadline);
    }
    producer.flush(OP_TIMEOUT).unwrap();
}

/// Sends `record`, waiting while librdkafka's queue is full, but not past `deadline`.
fn send_until<K: ToBytes + ?Sized, P: ToBytes + ?Sized>(
    producer: &ThreadedProducer<DefaultProducerContext>,
    mut record: BaseRecord<'_, K, P>,
    deadline: Instant,
) {
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((e, r)) => {
                assert!(Instant::now() < deadline, "producer stuck: {e}");
                record = r;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

fn fetch_request(
    topic: &str,
    topic_id: uuid::Uuid,
    partitions: i32,
    offset: i64,
    max: i32,
) -> FetchRequest {
    FetchRequest::default()
        .with_replica_id(kafka_protocol::messages::BrokerId(-1))
        .with_max_wait_ms(0)
        .with_min_bytes(1)
        .with_max_bytes(max)
        .with_topics(vec![FetchTopic::default()
            .with_topic(topic_name(topic))
            .with_topic_id(topic_id)
            .with_partitions(
                (0..partitions)
                    .map(|p| {
                        FetchPartition::default()
                            .with_partition(p)
                            .with_fetch_offset(offset)
                            .with_log_start_offset(-1)
                            .with_partition_max_bytes(max / 2)
                    })
                    .collect(),
            )])
}

/// Every Fetch version, at several offsets and limits, answered byte for byte the same
/// with `sendfile` as with the copy through memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_copy_fetch_returns_the_bytes_the_copying_path_returns() {
    let mut server = Server::start(&[]);
    let topic = "zero-copy";
    server
        .create_topic(topic, 3, &[("segment.bytes", "1048576")])
        .await;
    produce_messages(&server, topic, 3, 3000);
    let md: MetadataResponse = common::raw(
        &server.addr,
        ApiKey::Metadata,
        12,
        &MetadataRequest::default().with_topics(Some(vec![
            MetadataRequestTopic::default().with_name(Some(topic_name(topic)))
        ])),
    );
    let topic_id = md.topics[0].topic_id;

    let cases: Vec<(i16, i64, i32)> = [4i16, 11, 12, 13, 16]
        .into_iter()
        .flat_map(|v| {
            [
                (0i64, 1i32),
                (0, 4096),
                (17, 100_000),
                (500, 10_000_000),
                (999, 1 << 20),
            ]
            .into_iter()
            .map(move |(o, m)| (v, o, m))
        })
        .collect();
    let fetch_all = |addr: &str| -> Vec<Bytes> {
        let mut s = connect(addr);
        cases
            .iter()
            .enumerate()
            .map(|(i, (version, offset, max))| {
                let req = fetch_request(topic, topic_id, 3, *offset, *max);
                s.write_all(&common::encode_request(
                    ApiKey::Fetch,
                    *version,
                    i as i32,
                    &req,
                ))
                .unwrap();
                common::read_frame(&mut s)
            })
            .collect()
    };
    let zero_copy = fetch_all(&server.addr);
    server.stop();
    let copying = Server::start_in(
        &server.data_dir,
        "127.0.0.1:0",
        &["fetch.zero.copy.enable=false"],
    );
    let copied = fetch_all(&copying.addr);

    // Responses with fewer record bytes than this are copied even with zero-copy on
    // (`limits::FETCH_ZERO_COPY_BYTES_MIN`); the larger ones went through sendfile.
    let spliced_bytes_min = 64 * 1024;
    let mut spliced = 0;
    for (((version, offset, max), z), c) in cases.iter().zip(&zero_copy).zip(&copied) {
        assert_eq!(z, c, "fetch v{version} offset {offset} max_bytes {max}");
        let (_, mut body) = header(z.clone(), ApiKey::Fetch, *version);
        let resp = FetchResponse::decode(&mut body, *version).unwrap();
        let mut record_bytes = 0;
        for p in &resp.responses[0].partitions {
            assert_eq!(p.error_code, 0, "fetch v{version} offset {offset}");
            record_bytes += p.records.as_ref().map_or(0, |r| r.len());
        }
        println!("v{version} offset {offset} max {max}: {record_bytes} record bytes");
        spliced += usize::from(record_bytes >= spliced_bytes_min);
    }
    assert!(
        spliced >= 10,
        "{spliced} responses large enough to be spliced"
    );
}

/// Many requests written at once on one connection: every answer comes back, in order;
/// a request that changes state (CreateTopics) is seen by the reads after it, and a
/// long-polling Fetch does not reorder the answers behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let server = Server::start(&[]);
    let topic = "pipelined";
    server.create_topic(topic, 2, &[]).await;
    produce_messages(&server, topic, 2, 200);

    let mut pipeline = Pipeline::default();
    // A long poll at the log end: nothing arrives, so it waits its 300 ms.
    let mut long_poll = fetch_request(topic, uuid::Uuid::nil(), 2, 100, 1 << 20);
    long_poll.max_wait_ms = 300;
    pipeline.push(ApiKey::Fetch, 12, &long_poll);
    for round in 0..10 {
        pipeline.push(
            ApiKey::ApiVersions,
            3,
            &ApiVersionsRequest::default()
                .with_client_software_name(StrBytes::from_static_str("t"))
                .with_client_software_version(StrBytes::from_static_str("1")),
        );
        pipeline.push(
            ApiKey::Fetch,
            12,
            &fetch_request(topic, uuid::Uuid::nil(), 2, 0, 1 << 20),
        );
        let created = format!("created-{round}");
        pipeline.push(
            ApiKey::CreateTopics,
            7,
            &CreateTopicsRequest::default()
                .with_timeout_ms(30_000)
                .with_topics(vec![CreatableTopic::default()
                    .with_name(topic_name(&created))
                    .with_num_partitions(1)
                    .with_replication_factor(1)]),
        );
        pipeline.push(
            ApiKey::ListOffsets,
            7,
            &ListOffsetsRequest::default()
                .with_replica_id(kafka_protocol::messages::BrokerId(-1))
                .with_topics(vec![ListOffsetsTopic::default()
                    .with_name(topic_name(&created))
                    .with_partitions(vec![ListOffsetsPartition::default()
                        .with_partition_index(0)
                        .with_timestamp(-1)])]),
        );
    }
    let Pipeline { expected, out } = pipeline;
    let mut s = connect(&server.addr);
    s.write_all(&out).unwrap();

    for (i, (key, version)) in expected.iter().enumerate() {
        let (correlation_id, mut body) = header(common::read_frame(&mut s), *key, *version);
        assert_eq!(
            correlation_id, i as i32,
            "answers come back in request order"
        );
        match key {
            ApiKey::Fetch => {
                let r = FetchResponse::decode(&mut body, *version).unwrap();
                let bytes: usize = r.responses[0]
                    .partitions
                    .iter()
                    .map(|p| {
                        assert_eq!(p.error_code, 0);
                        p.records.as_ref().map_or(0, |r| r.len())
                    })
                    .sum();
                assert_eq!(bytes > 0, i > 0, "request {i}: only the long poll is empty");
            }
            ApiKey::ListOffsets => {
                let r = ListOffsetsResponse::decode(&mut body, *version).unwrap();
                let p = &r.topics[0].partitions[0];
                assert_eq!(
                    p.error_code, 0,
                    "request {i}: the topic created before it exists"
                );
                assert_eq!(p.offset, 0);
            }
            _ => {}
        }
    }
}

/// Requests encoded back to back, correlation ids counting from 0.
#[derive(Default)]
struct Pipeline {
    expected: Vec<(ApiKey, i16)>,
    out: BytesMut,
}

impl Pipeline {
    fn push<Req: Encodable>(&mut self, key: ApiKey, version: i16, body: &Req) {
        let correlation_id = self.expected.len() as i32;
        self.out
            .extend_from_slice(&common::encode_request(key, version, correlation_id, body));
        self.expected.push((key, version));
    }
}

/// Broker memory a fast producer may cause, well under what it sends. librdkafka keeps
/// up to 1,000,000 requests in flight per connection by default, so only the broker's
/// own bounds (one frame read ahead, in-flight limit, request memory budget) hold this.
const PRODUCE_RSS_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Producers that outrun the disk (every append fsynced) see their requests wait in the
/// socket; the broker's RSS stays bounded while several times that bound goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_producers_meet_backpressure_not_broker_memory_growth() {
    let server = Server::start(&["log.flush.interval.messages=1"]);
    let topic = "backpressure";
    server.create_topic(topic, 4, &[]).await;
    let pid = server.pid();
    let message_bytes = 1024usize;
    let per_producer = 100_000usize;
    let producers = 4;
    let deadline = Instant::now() + Duration::from_secs(120);

    let sent = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..producers)
            .map(|id| {
                let cfg = {
                    let mut c = server.config();
                    c.set("linger.ms", "20")
                        .set("batch.size", "1000000")
                        .set("queue.buffering.max.kbytes", "2097151")
                        .set("queue.buffering.max.messages", "1000000")
                        .set("message.timeout.ms", "120000");
                    c
                };
                scope.spawn(move || {
                    let producer: ThreadedProducer<DefaultProducerContext> = cfg.create().unwrap();
                    let payload = vec![b'x'; message_bytes];
                    for _ in 0..per_producer {
                        let record = BaseRecord::<(), _>::to(topic)
                            .payload(&payload)
                            .partition(id);
                        send_until(&producer, record, deadline);
                    }
                    producer.flush(Duration::from_secs(120)).unwrap();
                })
            })
            .collect();
        let mut peak = 0u64;
        while handles.iter().any(|h| !h.is_finished()) {
            assert!(Instant::now() < deadline, "produce did not finish in time");
            peak = peak.max(common::proc_status_bytes(pid, "VmRSS"));
            std::thread::sleep(Duration::from_millis(50));
        }
        for h in handles {
            h.join().unwrap();
        }
        peak
    });
    let total = (producers as usize * per_producer * message_bytes) as u64;
    println!(
        "peak broker RSS {} MiB while {} MiB were produced",
        sent >> 20,
        total >> 20
    );
    assert!(
        total > 2 * PRODUCE_RSS_BYTES_MAX,
        "the test sends more than the bound"
    );
    assert!(
        sent < PRODUCE_RSS_BYTES_MAX,
        "broker RSS peaked at {} MiB (bound {} MiB)",
        sent >> 20,
        PRODUCE_RSS_BYTES_MAX >> 20
    );
    // Everything was stored.
    let md: ListOffsetsResponse = common::raw(
        &server.addr,
        ApiKey::ListOffsets,
        7,
        &ListOffsetsRequest::default()
            .with_replica_id(kafka_protocol::messages::BrokerId(-1))
            .with_topics(vec![ListOffsetsTopic::default()
                .with_name(topic_name(topic))
                .with_partitions(
                    (0..producers)
                        .map(|p| {
                            ListOffsetsPartition::default()
                                .with_partition_index(p)
                                .with_timestamp(-1)
                        })
                        .collect(),
                )]),
    );
    for p in &md.topics[0].partitions {
        assert_eq!(
            p.offset, per_producer as i64,
            "partition {}",
            p.partition_index
        );
    }
}
