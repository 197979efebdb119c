//! The idempotent producer on the wire: InitProducerId, the sequence rules of Produce
//! (duplicates answered with the first offsets, gaps and old epochs refused), unique
//! producer ids across restarts, and DescribeProducers. Raw requests, because real clients
//! never send the faulty batches these tests need.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::{Server, OP_TIMEOUT};
use ferrite_protocol::kafka_protocol::messages::describe_producers_request::TopicRequest;
use ferrite_protocol::kafka_protocol::messages::produce_request::{
    PartitionProduceData, TopicProduceData,
};
use ferrite_protocol::kafka_protocol::messages::{
    ApiKey, DescribeProducersRequest, DescribeProducersResponse, InitProducerIdRequest,
    InitProducerIdResponse, ProduceRequest, ProduceResponse, TopicName, TransactionalId,
};
use ferrite_protocol::kafka_protocol::protocol::StrBytes;
use ferrite_storage::test_support::{make_producer_batch, Producer};
use rdkafka::consumer::{BaseConsumer, Consumer};

const NONE: i16 = 0;
const INVALID_REQUEST: i16 = 42;
const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;
const INVALID_PRODUCER_EPOCH: i16 = 47;
const INVALID_RECORD: i16 = 87;

fn init_producer_id(
    server: &Server,
    version: i16,
    transactional_id: Option<&str>,
) -> (i16, i64, i16) {
    let req = InitProducerIdRequest::default()
        .with_transactional_id(
            transactional_id.map(|t| TransactionalId(StrBytes::from_string(t.to_string()))),
        )
        .with_transaction_timeout_ms(60_000);
    let resp: InitProducerIdResponse =
        common::raw(&server.addr, ApiKey::InitProducerId, version, &req);
    (resp.error_code, resp.producer_id.0, resp.producer_epoch)
}

/// One Produce v9 (acks=-1) of `records` to partition 0; `(error code, base offset)`.
fn produce(server: &Server, topic: &str, records: Vec<u8>) -> (i16, i64) {
    let req = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(5000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(0)
                .with_records(Some(records.into()))])]);
    let resp: ProduceResponse = common::raw(&server.addr, ApiKey::Produce, 9, &req);
    let p = &resp.responses[0].partition_responses[0];
    (p.error_code, p.base_offset)
}

fn batch(producer_id: i64, producer_epoch: i16, base_sequence: i32, records: i32) -> Vec<u8> {
    make_producer_batch(
        records,
        ferrite_now_ms(),
        b"idempotent",
        Producer {
            producer_id,
            producer_epoch,
            base_sequence,
        },
    )
}

fn ferrite_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn watermarks(server: &Server, topic: &str) -> (i64, i64) {
    let c: BaseConsumer = server.config().set("group.id", "w").create().unwrap();
    c.fetch_watermarks(topic, 0, OP_TIMEOUT).unwrap()
}

fn describe_producers(server: &Server, topic: &str) -> Vec<(i64, i32, i32)> {
    let req = DescribeProducersRequest::default().with_topics(vec![TopicRequest::default()
        .with_name(TopicName(StrBytes::from_string(topic.to_string())))
        .with_partition_indexes(vec![0])]);
    let resp: DescribeProducersResponse =
        common::raw(&server.addr, ApiKey::DescribeProducers, 0, &req);
    let p = &resp.topics[0].partitions[0];
    assert_eq!(p.error_code, NONE);
    p.active_producers
        .iter()
        .map(|s| (s.producer_id.0, s.producer_epoch, s.last_sequence))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_ids_are_unique_across_restarts_and_transactional_ids_keep_theirs() {
    let mut server = Server::start(&[]);
    let mut seen = std::collections::BTreeSet::new();
    for version in [0, 1, 2, 3, 4, 5] {
        let (code, id, epoch) = init_producer_id(&server, version, None);
        assert_eq!((code, epoch), (NONE, 0), "v{version}");
        assert!(id >= 0 && seen.insert(id), "v{version}: id {id}");
    }
    server.kill9();
    server.restart();
    let (code, id, _) = init_producer_id(&server, 4, None);
    assert_eq!(code, NONE);
    assert!(
        seen.iter().all(|s| *s < id),
        "after a restart {id} is past {seen:?}"
    );
    server.stop();
    server.restart();
    let (_, next, _) = init_producer_id(&server, 4, None);
    assert!(next > id, "after a clean restart too");
    // A transactional id keeps its producer id and bumps the epoch (fencing the
    // previous producer); an empty one is malformed.
    let (code, txn_id, txn_epoch) = init_producer_id(&server, 4, Some("txn"));
    assert_eq!((code, txn_epoch), (NONE, 0));
    assert!(txn_id > next);
    assert_eq!(init_producer_id(&server, 4, Some("txn")), (NONE, txn_id, 1));
    assert_eq!(init_producer_id(&server, 4, Some("")).0, INVALID_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotent_batch_twice_is_stored_once_with_the_first_offset() {
    let mut server = Server::start(&[]);
    server.create_topic("idem", 1, &[]).await;
    let (code, pid, epoch) = init_producer_id(&server, 4, None);
    assert_eq!(code, NONE);
    assert_eq!(produce(&server, "idem", batch(pid, epoch, 0, 3)), (NONE, 0));
    let b = batch(pid, epoch, 3, 2);
    assert_eq!(produce(&server, "idem", b.clone()), (NONE, 3));
    // The retry (byte for byte the same batch) gets the first offset, and nothing new.
    assert_eq!(produce(&server, "idem", b.clone()), (NONE, 3));
    assert_eq!(watermarks(&server, "idem"), (0, 5));
    // Still a duplicate after kill -9 and recovery.
    server.kill9();
    server.restart();
    assert_eq!(produce(&server, "idem", b), (NONE, 3));
    assert_eq!(watermarks(&server, "idem"), (0, 5));
    assert_eq!(describe_producers(&server, "idem"), vec![(pid, 0, 4)]);

    // A gap: OUT_OF_ORDER_SEQUENCE_NUMBER, nothing written.
    assert_eq!(
        produce(&server, "idem", batch(pid, epoch, 9, 1)).0,
        OUT_OF_ORDER_SEQUENCE_NUMBER
    );
    // A new epoch starts at sequence 0; then the old epoch is fenced.
    assert_eq!(
        produce(&server, "idem", batch(pid, epoch + 1, 5, 1)).0,
        OUT_OF_ORDER_SEQUENCE_NUMBER
    );
    assert_eq!(
        produce(&server, "idem", batch(pid, epoch + 1, 0, 1)),
        (NONE, 5)
    );
    assert_eq!(
        produce(&server, "idem", batch(pid, epoch, 5, 1)).0,
        INVALID_PRODUCER_EPOCH
    );
    // A producer id the partition has no state for may start anywhere (KIP-360): the
    // broker never answers UNKNOWN_PRODUCER_ID, as Kafka since 2.5.
    let (_, other, _) = init_producer_id(&server, 4, None);
    assert_eq!(produce(&server, "idem", batch(other, 0, 42, 1)), (NONE, 6));
    // A producer id with a negative sequence is an invalid record.
    assert_eq!(
        produce(&server, "idem", batch(other, 0, -1, 1)).0,
        INVALID_RECORD
    );
    assert_eq!(watermarks(&server, "idem"), (0, 7));
    let mut described = describe_producers(&server, "idem");
    described.sort();
    assert_eq!(described, vec![(pid, 1, 0), (other, 0, 42)]);
}
