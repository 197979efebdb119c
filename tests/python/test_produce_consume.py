"""Produce and consume round trips with confluent-kafka (librdkafka) and kafka-python.

For each compression codec (none, gzip, snappy, lz4, zstd) and each client: 100,000 keyed
messages into a 3-partition topic, then everything read back with manual assign():
offsets contiguous from 0 per partition, producer order kept per partition, every message
exactly once, keys/values (including null values) intact, headers intact (repeated keys,
empty and null header values), explicit CreateTime timestamps returned as sent and default
ones within the produce window, keys on the partition the Java client's murmur2 picks, and
the batches on disk carrying the codec the producer chose (topic compression.type is the
default `producer`).

kafka-python has every codec here (python-snappy/cramjam, lz4 and zstandard are installed by
scripts/install-test-deps.sh).
"""
import random
import time

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, TopicPartition, OFFSET_BEGINNING

from support import (BASE_TS, CODEC_IDS, MURMUR2_VECTORS, ck_assert_nothing_more, ck_consume, ck_consumer,
                     ck_create, ck_produce_all, ck_producer, murmur2, partition_for, read_batches, segment_files,
                     watermarks)

CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]
PARTITIONS = 3
N_CONFLUENT = 100_000
N_KAFKA_PYTHON = 100_000
LARGE = ("lorem ipsum dolor sit amet " * 800).encode()  # ~21 KB, compressible


def test_murmur2_matches_the_java_client_vectors():
    """Pure Python: the murmur2 used below agrees with Kafka's published test vectors."""
    for s, expected in MURMUR2_VECTORS.items():
        assert murmur2(s.encode()) == expected, s


def make_plan(n, seed, null_header=True):
    """Deterministic messages: dicts with key, value, headers, timestamp (None = producer's clock)."""
    rng = random.Random(seed)
    plan = []
    for i in range(n):
        key = f"key-{rng.randrange(5000)}".encode()
        value = f"{i}:value-{rng.randrange(10**9)}".encode()
        if i % 1001 == 500:
            key, value = f"tomb-{i}".encode(), None  # null value (a tombstone), identified by its key
        elif i % 4999 == 7:
            value = f"{i}:".encode() + LARGE
        headers = None
        if i % 7 == 0:
            headers = [("seq", str(i).encode()), ("dup", b"a"), ("dup", b"b"), ("empty", b"")]
            if null_header:
                headers.append(("null", None))
        elif i % 7 == 3:
            headers = [("h", rng.randbytes(rng.randrange(1, 40)))]
        timestamp = BASE_TS + i if i % 3 == 0 else None
        plan.append({"key": key, "value": value, "headers": headers, "timestamp": timestamp})
    return plan


def seq_of(key, value):
    if value is None:
        return int(key.split(b"-")[1])
    return int(value.split(b":", 1)[0])


class Checker:
    """Checks consumed records against the plan as they arrive."""

    def __init__(self, plan, t0, t1):
        self.plan, self.t0, self.t1 = plan, t0, t1
        self.seen = bytearray(len(plan))
        self.next_offset = [0] * PARTITIONS
        self.last_seq = [-1] * PARTITIONS
        self.count = 0

    def check(self, partition, offset, key, value, headers, ts_type, ts):
        seq = seq_of(key, value)
        assert 0 <= seq < len(self.plan), seq
        want = self.plan[seq]
        where = f"seq {seq} at {partition}/{offset}"
        assert not self.seen[seq], f"{where}: seen twice"
        self.seen[seq] = 1
        assert offset == self.next_offset[partition], f"{where}: expected offset {self.next_offset[partition]}"
        self.next_offset[partition] += 1
        assert seq > self.last_seq[partition], f"{where}: after seq {self.last_seq[partition]} (order)"
        self.last_seq[partition] = seq
        assert partition == partition_for(want["key"], PARTITIONS), f"{where}: wrong partition for key"
        assert key == want["key"], where
        assert value == want["value"], where
        assert (headers or None) == want["headers"], f"{where}: headers {headers!r}"
        assert ts_type == TIMESTAMP_CREATE_TIME, f"{where}: timestamp type {ts_type}"
        if want["timestamp"] is not None:
            assert ts == want["timestamp"], f"{where}: timestamp {ts}"
        else:
            assert self.t0 - 1000 <= ts <= self.t1 + 1000, f"{where}: timestamp {ts} outside the produce window"
        self.count += 1

    def finish(self):
        missing = [i for i, s in enumerate(self.seen) if not s]
        assert not missing, f"{len(missing)} messages never consumed, first: {missing[:5]}"
        expected_counts = [0] * PARTITIONS
        for m in self.plan:
            expected_counts[partition_for(m["key"], PARTITIONS)] += 1
        assert self.next_offset == expected_counts


def assert_codec_on_disk(broker, topic, codec):
    want = CODEC_IDS[codec]
    batches = []
    for p in range(PARTITIONS):
        for path in segment_files(broker.partition_dir(topic, p)):
            batches += read_batches(path)
    assert batches, "no batches on disk"
    codecs = [attrs & 7 for _, _, attrs, _ in batches]
    assert set(codecs) <= {0, want}, f"unexpected codecs on disk: {sorted(set(codecs))}"
    # A producer may send a tiny batch uncompressed when compression would not shrink it.
    assert codecs.count(want) >= 0.9 * len(codecs), f"only {codecs.count(want)} of {len(codecs)} batches use {codec}"


@pytest.mark.parametrize("codec", CODECS)
def test_confluent_kafka_round_trip(broker, codec):
    topic = f"ck-{codec}"
    ck_create(broker, topic, PARTITIONS)
    plan = make_plan(N_CONFLUENT, seed=1000 + CODECS.index(codec))
    p = ck_producer(broker, **{"compression.type": codec, "partitioner": "murmur2_random", "acks": "all",
                               "queue.buffering.max.messages": 200_000, "message.max.bytes": 2_000_000})
    t0 = int(time.time() * 1000)
    results = ck_produce_all(p, topic, plan, timeout_s=180)
    t1 = int(time.time() * 1000)
    errors = [r for r in results if r[0] is not None]
    assert not errors, errors[:3]
    # The broker's acknowledged offsets are the ones a consumer will see.
    acked = {(part, off) for _, part, off, _ in results}
    assert len(acked) == N_CONFLUENT

    c = ck_consumer(broker, **{"fetch.max.bytes": 4 * 1024 * 1024})
    c.assign([TopicPartition(topic, i, OFFSET_BEGINNING) for i in range(PARTITIONS)])
    checker = Checker(plan, t0, t1)
    for m in ck_consume(c, N_CONFLUENT, timeout_s=180):
        ts_type, ts = m.timestamp()
        checker.check(m.partition(), m.offset(), m.key(), m.value(), m.headers(), ts_type, ts)
        assert (m.partition(), m.offset()) in acked
    checker.finish()
    ck_assert_nothing_more(c, 1.0)
    for part in range(PARTITIONS):
        assert watermarks(c, topic, part) == (0, checker.next_offset[part])
    c.close()
    assert_codec_on_disk(broker, topic, codec)


@pytest.mark.parametrize("codec", CODECS)
def test_kafka_python_round_trip(broker, codec):
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition as KTP
    from kafka.admin import KafkaAdminClient, NewTopic

    topic = f"kp-{codec}"
    admin = KafkaAdminClient(bootstrap_servers=broker.addr, request_timeout_ms=30_000)
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)], timeout_ms=30_000)
    admin.close()
    # kafka-python's producer only takes bytes header values (no null header value).
    plan = make_plan(N_KAFKA_PYTHON, seed=2000 + CODECS.index(codec), null_header=False)
    # kafka-python's default partitioner is the Java client's murmur2.
    producer = KafkaProducer(bootstrap_servers=broker.addr, compression_type=None if codec == "none" else codec,
                             linger_ms=5, acks=1, batch_size=64 * 1024, max_request_size=2_000_000,
                             request_timeout_ms=30_000)
    t0 = int(time.time() * 1000)
    futures = [producer.send(topic, key=m["key"], value=m["value"], headers=m["headers"] or [],
                             timestamp_ms=m["timestamp"]) for m in plan]
    producer.flush(timeout=180)
    t1 = int(time.time() * 1000)
    acked = set()
    for f in futures:
        md = f.get(timeout=1)
        acked.add((md.partition, md.offset))
    assert len(acked) == N_KAFKA_PYTHON
    producer.close(timeout=10)

    consumer = KafkaConsumer(bootstrap_servers=broker.addr, group_id=None, enable_auto_commit=False,
                             consumer_timeout_ms=15_000, max_partition_fetch_bytes=4 * 1024 * 1024)
    tps = [KTP(topic, p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    checker = Checker(plan, t0, t1)
    deadline = time.monotonic() + 180
    while checker.count < N_KAFKA_PYTHON:
        assert time.monotonic() < deadline, f"consumed only {checker.count}"
        for records in consumer.poll(timeout_ms=500, max_records=10_000).values():
            for r in records:
                checker.check(r.partition, r.offset, r.key, r.value, r.headers, r.timestamp_type + 1, r.timestamp)
                assert (r.partition, r.offset) in acked
    checker.finish()
    assert not consumer.poll(timeout_ms=1000), "no more records"
    assert consumer.end_offsets(tps) == {tp: checker.next_offset[tp.partition] for tp in tps}
    assert consumer.beginning_offsets(tps) == {tp: 0 for tp in tps}
    consumer.close()
    assert_codec_on_disk(broker, topic, codec)


def test_key_placement_matches_murmur2(broker):
    """Both clients put a key on (murmur2(key) & 0x7fffffff) % n, and the broker keeps it there."""
    from kafka import KafkaProducer

    for s, expected in MURMUR2_VECTORS.items():
        assert murmur2(s.encode()) == expected, s
    n = 7
    ck_create(broker, "placement", n)
    rng = random.Random(42)
    keys = sorted({f"k{rng.randrange(10**12)}-{'x' * rng.randrange(0, 9)}".encode() for _ in range(3000)})
    p = ck_producer(broker, partitioner="murmur2_random")
    results = ck_produce_all(p, "placement", ({"key": k, "value": b"ck"} for k in keys))
    for err, part, _, kw in results:
        assert err is None
        assert part == partition_for(kw["key"], n), kw["key"]
    kp = KafkaProducer(bootstrap_servers=broker.addr, linger_ms=5)
    futures = [(k, kp.send("placement", key=k, value=b"kp")) for k in keys]
    kp.flush(timeout=60)
    for k, f in futures:
        assert f.get(timeout=1).partition == partition_for(k, n), k
    kp.close(timeout=10)
    # And reading each partition back gives only keys that belong there.
    c = ck_consumer(broker)
    c.assign([TopicPartition("placement", i, OFFSET_BEGINNING) for i in range(n)])
    msgs = ck_consume(c, 2 * len(keys))
    for m in msgs:
        assert m.partition() == partition_for(m.key(), n)
    assert sorted((m.key(), m.value()) for m in msgs) == sorted([(k, b"ck") for k in keys] + [(k, b"kp") for k in keys])
    c.close()


@pytest.mark.parametrize("acks", [0, 1, -1])
def test_every_acks_mode_delivers(broker, acks):
    topic = {0: "acks0", 1: "acks1", -1: "acksall"}[acks]
    ck_create(broker, topic, 2)
    p = ck_producer(broker, acks=acks, partitioner="murmur2_random")
    results = ck_produce_all(p, topic, ({"key": f"k{i}".encode(), "value": f"{i}".encode()} for i in range(5000)))
    assert all(err is None for err, _, _, _ in results)
    if acks != 0:  # with acks=0 the client never learns offsets
        assert sorted((part, off) for _, part, off, _ in results) == \
            sorted((part, off) for part in range(2) for off in range(sum(1 for r in results if r[1] == part)))
    c = ck_consumer(broker)
    c.assign([TopicPartition(topic, i, OFFSET_BEGINNING) for i in range(2)])
    values = sorted(int(m.value()) for m in ck_consume(c, 5000, timeout_s=60))
    assert values == list(range(5000))
    ck_assert_nothing_more(c, 0.5)
    c.close()


def test_long_poll_fetch_returns_when_data_arrives(broker):
    """A consumer blocked in Fetch (fetch.wait.max.ms long) gets a new message promptly."""
    ck_create(broker, "longpoll")
    c = ck_consumer(broker, **{"fetch.wait.max.ms": 5000})
    c.assign([TopicPartition("longpoll", 0, OFFSET_BEGINNING)])
    assert c.poll(1.0) is None
    p = ck_producer(broker, **{"linger.ms": 0})
    start = time.monotonic()
    ck_produce_all(p, "longpoll", [{"value": b"wake up"}])
    m = c.poll(10)
    assert m is not None and m.error() is None and m.value() == b"wake up"
    assert time.monotonic() - start < 4.0, "the long poll should be answered as soon as data arrives"
    c.close()
