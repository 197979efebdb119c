"""confluent-kafka (librdkafka) against a real ferrite server."""
import glob
import os
import time

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition, OFFSET_BEGINNING
from confluent_kafka.admin import (AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewPartitions,
                                   NewTopic)

from conftest import wait_until
from murmur2 import murmur2, partition_for

# Recent, so that time retention (7 days by default) keeps the records.
BASE_TS = int(time.time() * 1000) - 3_600_000


def admin(b):
    return AdminClient({"bootstrap.servers": b.addr})


def create(b, name, partitions=1, config=None):
    a = admin(b)  # keep the client alive until the future resolves
    fs = a.create_topics([NewTopic(name, partitions, 1, config=config or {})], operation_timeout=30)
    fs[name].result(timeout=30)


def consumer(b, **extra):
    conf = {"bootstrap.servers": b.addr, "group.id": "py", "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "enable.partition.eof": False}
    conf.update(extra)
    return Consumer(conf)


def test_murmur2_matches_kafka_vectors():
    vectors = {"21": -973932308, "foobar": -790332482, "a-little-bit-long-string": -985981536,
               "a-little-bit-longer-string": -1486304829,
               "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971, "abc": 479470107}
    for s, h in vectors.items():
        assert murmur2(s.encode()) == h, s


@pytest.mark.parametrize("codec", ["none", "gzip", "snappy", "lz4", "zstd"])
def test_hundred_thousand_keyed_messages_round_trip(broker, codec):
    n, partitions, topic = 100_000, 3, f"py-{codec}"
    create(broker, topic, partitions)
    p = Producer({"bootstrap.servers": broker.addr, "compression.type": codec, "partitioner": "murmur2_random",
                  "linger.ms": 5, "queue.buffering.max.messages": 200_000, "enable.idempotence": False})
    errors = []
    for i in range(n):
        headers = [("seq", str(i).encode())] if i % 10 == 0 else None
        while True:
            try:
                p.produce(topic, key=f"key-{i % 1013}".encode(), value=f"value-{i}".encode(),
                          timestamp=BASE_TS + i, headers=headers,
                          on_delivery=lambda err, msg: err and errors.append(err))
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    assert p.flush(60) == 0
    assert not errors, errors[:3]

    c = consumer(broker)
    c.assign([TopicPartition(topic, i, OFFSET_BEGINNING) for i in range(partitions)])
    next_offset = {i: 0 for i in range(partitions)}
    last_seq = {i: -1 for i in range(partitions)}
    seen = 0
    deadline = time.monotonic() + 120
    while seen < n:
        assert time.monotonic() < deadline, f"only {seen} of {n}"
        for m in c.consume(num_messages=10_000, timeout=1.0):
            assert m.error() is None, m.error()
            part = m.partition()
            assert m.offset() == next_offset[part], "offsets must be contiguous"
            next_offset[part] += 1
            seq = int(m.value().decode().split("-")[1])
            assert seq > last_seq[part], "order within a partition"
            last_seq[part] = seq
            assert part == partition_for(m.key(), partitions), "Java-compatible key placement"
            assert m.timestamp()[1] == BASE_TS + seq
            if seq % 10 == 0:
                assert m.headers() == [("seq", str(seq).encode())]
            seen += 1
    assert sum(next_offset.values()) == n
    c.close()


def test_offsets_for_times_watermarks_and_delete_records(broker):
    create(broker, "times")
    p = Producer({"bootstrap.servers": broker.addr, "linger.ms": 0})
    for i in range(100):
        p.produce("times", value=f"v{i}".encode(), partition=0, timestamp=BASE_TS + i * 1000)
        p.flush(10)
    c = consumer(broker)
    got = c.offsets_for_times([TopicPartition("times", 0, BASE_TS + 50_500)], timeout=10)
    assert got[0].offset == 51
    got = c.offsets_for_times([TopicPartition("times", 0, BASE_TS + 10**9)], timeout=10)
    assert got[0].offset == -1  # OFFSET_END: no such record
    assert c.get_watermark_offsets(TopicPartition("times", 0), timeout=10) == (0, 100)
    a = admin(broker)
    res = a.delete_records([TopicPartition("times", 0, 40)], operation_timeout=30)
    list(res.values())[0].result(timeout=30)
    assert c.get_watermark_offsets(TopicPartition("times", 0), timeout=10) == (40, 100)
    c.assign([TopicPartition("times", 0, OFFSET_BEGINNING)])
    m = wait_until("a message after delete_records", lambda: c.poll(0.5))
    assert m.offset() == 40
    c.close()


def test_configs_take_effect_and_bad_ones_are_refused(broker):
    create(broker, "cfg", 1, {"segment.bytes": "4096"})
    a = admin(broker)
    res = a.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, "cfg")])
    entries = list(res.values())[0].result(timeout=30)
    assert entries["segment.bytes"].value == "4096"
    assert entries["retention.ms"].value == str(7 * 24 * 3600 * 1000)

    bad = ConfigResource(ConfigResource.Type.TOPIC, "cfg",
                         incremental_configs=[ConfigEntry("no.such.config", "1", incremental_operation=AlterConfigOpType.SET)])
    with pytest.raises(KafkaException) as e:
        list(a.incremental_alter_configs([bad]).values())[0].result(timeout=30)
    assert e.value.args[0].code() == KafkaError.INVALID_CONFIG

    p = Producer({"bootstrap.servers": broker.addr, "linger.ms": 0})
    now = int(time.time() * 1000)
    for i in range(100):
        p.produce("cfg", value=b"x" * 200, timestamp=now - 60_000 + i)
        p.flush(10)
    logs = glob.glob(os.path.join(broker.data_dir, "cfg-0", "*.log"))
    assert len(logs) > 1, "segment.bytes=4096 rolls segments"

    ok = ConfigResource(ConfigResource.Type.TOPIC, "cfg",
                        incremental_configs=[ConfigEntry("retention.ms", "1000", incremental_operation=AlterConfigOpType.SET)])
    list(a.incremental_alter_configs([ok]).values())[0].result(timeout=30)
    c = consumer(broker)
    wait_until("retention to delete old segments",
               lambda: c.get_watermark_offsets(TopicPartition("cfg", 0), timeout=10)[0] > 0, timeout_s=30)
    c.close()


def test_admin_errors(broker):
    a = admin(broker)
    cases = [(NewTopic("bad name!", 1, 1), KafkaError.TOPIC_EXCEPTION),
             (NewTopic("a" * 250, 1, 1), KafkaError.TOPIC_EXCEPTION),
             (NewTopic("..", 1, 1), KafkaError.TOPIC_EXCEPTION),
             (NewTopic("rf3", 1, 3), KafkaError.INVALID_REPLICATION_FACTOR),
             (NewTopic("compacted", 1, 1, config={"cleanup.policy": "compact"}), KafkaError.INVALID_CONFIG)]
    for topic, code in cases:
        with pytest.raises(KafkaException) as e:
            a.create_topics([topic], operation_timeout=30)[topic.topic].result(timeout=30)
        assert e.value.args[0].code() == code, (topic.topic, e.value)
    create(broker, "twice", 2)
    with pytest.raises(KafkaException) as e:
        a.create_topics([NewTopic("twice", 1, 1)])["twice"].result(timeout=30)
    assert e.value.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS
    with pytest.raises(KafkaException) as e:
        a.create_partitions([NewPartitions("twice", 1)])["twice"].result(timeout=30)
    assert e.value.args[0].code() == KafkaError.INVALID_PARTITIONS
    a.create_partitions([NewPartitions("twice", 4)])["twice"].result(timeout=30)
    assert len(a.list_topics(timeout=10).topics["twice"].partitions) == 4
    a.delete_topics(["twice"], operation_timeout=30)["twice"].result(timeout=30)
    assert "twice" not in a.list_topics(timeout=10).topics


def test_unknown_topic_and_too_large_messages(broker_factory):
    b = broker_factory("auto.create.topics.enable=false")
    errors = []
    p = Producer({"bootstrap.servers": b.addr, "message.timeout.ms": 10_000, "topic.metadata.propagation.max.ms": 500})
    p.produce("missing", value=b"x", on_delivery=lambda err, msg: errors.append(err))
    p.flush(20)
    assert errors and errors[0].code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC), errors
    create(b, "small", 1, {"max.message.bytes": "1000"})
    errors.clear()
    p.produce("small", value=b"x" * 5000, on_delivery=lambda err, msg: errors.append(err))
    p.flush(20)
    assert errors and errors[0].code() == KafkaError.MSG_SIZE_TOO_LARGE, errors


def test_consumer_group_splits_partitions_and_commits_survive_restart(broker):
    create(broker, "grp", 6)
    p = Producer({"bootstrap.servers": broker.addr, "linger.ms": 2})
    for i in range(600):
        p.produce("grp", key=f"k{i}".encode(), value=f"m{i}".encode())
    p.flush(30)
    members = [consumer(broker, **{"group.id": "pyg", "session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
               for _ in range(3)]
    for m in members:
        m.subscribe(["grp"])
    seen = []

    def poll_all():
        for m in members:
            msg = m.poll(0.05)
            if msg is not None and msg.error() is None:
                seen.append(msg.value())
                m.commit(message=msg, asynchronous=False)
        sets = [set(tp.partition for tp in m.assignment()) for m in members]
        return sets

    def balanced():
        sets = poll_all()
        return all(len(s) == 2 for s in sets) and set().union(*sets) == set(range(6))

    wait_until("3 members with 2 partitions each", balanced)
    wait_until("all 600 messages", lambda: poll_all() is not None and len(set(seen)) >= 600)
    assert len(seen) == len(set(seen)), "exactly once without crashes"
    for m in members:
        m.close()
    broker.restart(graceful=False)
    c = consumer(broker, **{"group.id": "pyg"})
    committed = c.committed([TopicPartition("grp", i) for i in range(6)], timeout=30)
    assert sum(tp.offset for tp in committed) == 600
    c.close()


def test_kill_9_keeps_acknowledged_messages(broker):
    create(broker, "crash", 2)
    acked = []
    p = Producer({"bootstrap.servers": broker.addr, "acks": 1, "linger.ms": 1, "message.timeout.ms": 5000})

    def on_delivery(err, msg):
        if err is None:
            acked.append((msg.partition(), msg.offset(), msg.value()))

    i = 0
    deadline = time.monotonic() + 60
    while len(acked) < 5000 and time.monotonic() < deadline:
        try:
            p.produce("crash", key=f"k{i}".encode(), value=f"v{i}".encode(), on_delivery=on_delivery)
            i += 1
        except BufferError:
            pass
        p.poll(0)
    broker.kill()
    p.flush(10)
    snapshot = list(acked)
    broker.restart(graceful=False)
    c = consumer(broker)
    ends = [c.get_watermark_offsets(TopicPartition("crash", part), timeout=10)[1] for part in range(2)]
    c.assign([TopicPartition("crash", part, OFFSET_BEGINNING) for part in range(2)])
    stored = {}
    deadline = time.monotonic() + 60
    while len(stored) < sum(ends):
        assert time.monotonic() < deadline
        for m in c.consume(num_messages=10_000, timeout=1.0):
            stored[(m.partition(), m.offset())] = m.value()
    for part, off, value in snapshot:
        assert stored.get((part, off)) == value, f"acknowledged message at {part}/{off} lost"
    c.close()
    p2 = Producer({"bootstrap.servers": broker.addr})
    offsets = []
    p2.produce("crash", value=b"after", partition=0, on_delivery=lambda err, msg: offsets.append(msg.offset()))
    p2.flush(10)
    assert offsets == [ends[0]], "appends continue right after the recovered tail"


@pytest.mark.parametrize("assignor", ["range", "roundrobin", "cooperative-sticky"])
def test_librdkafka_assignors_balance(broker, assignor):
    create(broker, "assign", 4)
    members = [consumer(broker, **{"group.id": f"a-{assignor}", "partition.assignment.strategy": assignor,
                                   "session.timeout.ms": 6000, "heartbeat.interval.ms": 500}) for _ in range(2)]
    for m in members:
        m.subscribe(["assign"])

    def balanced():
        for m in members:
            m.poll(0.05)
        sets = [set(tp.partition for tp in m.assignment()) for m in members]
        return all(len(s) == 2 for s in sets) and sets[0].isdisjoint(sets[1])

    wait_until(f"{assignor}: 2 + 2 partitions", balanced)
    for m in members:
        m.close()
