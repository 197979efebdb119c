//! Request decode micro-benchmarks: a Produce request carrying 1 MiB of records and a
//! Metadata request, each decoded from a complete frame (length prefix removed) by
//! `ferrite_protocol::decode_request`, as the broker's connection loop does.
//!
//! Run: `cargo bench -p ferrite-storage -p ferrite-protocol`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrite_protocol::decode_request;
use ferrite_protocol::kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use ferrite_protocol::kafka_protocol::messages::produce_request::{
    PartitionProduceData, TopicProduceData,
};
use ferrite_protocol::kafka_protocol::messages::{
    ApiKey, MetadataRequest, ProduceRequest, RequestHeader, RequestKind, TopicName,
};
use ferrite_protocol::kafka_protocol::protocol::{Encodable, StrBytes};

fn frame<T: Encodable>(key: ApiKey, version: i16, body: &T) -> Bytes {
    let mut buf = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(42)
        .with_client_id(Some(StrBytes::from_static_str("bench")))
        .encode(&mut buf, key.request_header_version(version))
        .unwrap();
    body.encode(&mut buf, version).unwrap();
    buf.freeze()
}

fn topic(name: &str) -> TopicName {
    TopicName(StrBytes::from_string(name.to_string()))
}

/// Produce v9 (what librdkafka 2.x sends): one topic, one partition, 1 MiB of records.
/// The records field is opaque to the decoder, so its content does not matter here.
fn produce_frame() -> Bytes {
    let records = Bytes::from(vec![0x5au8; 1024 * 1024]);
    let body = ProduceRequest::default()
        .with_acks(1)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(topic("bench"))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(0)
                .with_records(Some(records))])]);
    frame(ApiKey::Produce, 9, &body)
}

/// Metadata v12 asking for 10 named topics.
fn metadata_frame() -> Bytes {
    let topics = (0..10)
        .map(|i| MetadataRequestTopic::default().with_name(Some(topic(&format!("topic-{i}")))))
        .collect();
    let body = MetadataRequest::default()
        .with_topics(Some(topics))
        .with_allow_auto_topic_creation(false);
    frame(ApiKey::Metadata, 12, &body)
}

fn decode(c: &mut Criterion) {
    let produce = produce_frame();
    assert!(matches!(
        decode_request(produce.clone()).unwrap().body,
        RequestKind::Produce(_)
    ));
    let mut g = c.benchmark_group("decode_request");
    g.throughput(Throughput::Bytes(produce.len() as u64));
    g.bench_function("produce_v9_1MiB_records", |b| {
        b.iter(|| decode_request(black_box(produce.clone())).unwrap())
    });
    let metadata = metadata_frame();
    assert!(matches!(
        decode_request(metadata.clone()).unwrap().body,
        RequestKind::Metadata(_)
    ));
    g.throughput(Throughput::Elements(1));
    g.bench_function("metadata_v12_10_topics", |b| {
        b.iter(|| decode_request(black_box(metadata.clone())).unwrap())
    });
    g.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
