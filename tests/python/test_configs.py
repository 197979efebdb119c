"""Topic admin and configs: CreateTopics with configs, DescribeConfigs, (Incremental)AlterConfigs,
segment rolling and retention on disk, broker config defaults, topic-name rules, and the admin
error codes (INVALID_CONFIG, INVALID_TOPIC_EXCEPTION, TOPIC_ALREADY_EXISTS, INVALID_PARTITIONS,
INVALID_REPLICATION_FACTOR, UNKNOWN_TOPIC_OR_PARTITION)."""
import os
import re
import time

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition, OFFSET_BEGINNING
from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_LOG_APPEND_TIME
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ConfigSource, NewPartitions, NewTopic

from support import (BASE_TS, ck_admin, ck_consume, ck_consumer, ck_create, ck_produce_all, ck_producer,
                     read_batches, segment_files, wait_until, watermarks)

WEEK_MS = 7 * 24 * 3600 * 1000
TOPIC = ConfigResource.Type.TOPIC


def describe(a, topic):
    res = a.describe_configs([ConfigResource(TOPIC, topic)], request_timeout=30)
    return list(res.values())[0].result(timeout=30)


def incremental(a, topic, *ops):
    entries = [ConfigEntry(k, v, incremental_operation=op) for k, v, op in ops]
    res = a.incremental_alter_configs([ConfigResource(TOPIC, topic, incremental_configs=entries)],
                                      request_timeout=30)
    return list(res.values())[0].result(timeout=30)


def admin_error(fn):
    with pytest.raises(KafkaException) as e:
        fn()
    return e.value.args[0].code()


def create_error(a, new_topic, **kw):
    return admin_error(lambda: a.create_topics([new_topic], operation_timeout=30, request_timeout=30, **kw)
                       [new_topic.topic].result(timeout=30))


def topics(a):
    return a.list_topics(timeout=10).topics


def fill(b, topic, n, size, partition=0, **producer_conf):
    """n records of `size` bytes, in small batches (so they fit small segments)."""
    p = ck_producer(b, **{"batch.size": 4096, "linger.ms": 2, **producer_conf})
    results = ck_produce_all(p, topic, ({"value": f"{i:08d}".encode() + b"x" * (size - 8), "partition": partition}
                                        for i in range(n)))
    assert all(err is None for err, *_ in results)
    return results


def test_create_with_configs_describe_and_alter(broker):
    a = ck_admin(broker)
    configs = {"retention.ms": "123456789", "retention.bytes": "1048576", "segment.bytes": "1048576",
               "segment.ms": "3600000", "max.message.bytes": "500000", "cleanup.policy": "delete",
               "message.timestamp.type": "CreateTime"}
    ck_create(broker, "cfg", 2, configs)
    entries = describe(a, "cfg")
    for k, v in configs.items():
        assert entries[k].value == v, k
        assert entries[k].source == ConfigSource.DYNAMIC_TOPIC_CONFIG.value, (k, entries[k].source)
        assert not entries[k].is_default, k

    # Incremental: SET one, DELETE one (back to the default), others untouched.
    incremental(a, "cfg", ("retention.ms", "2000", AlterConfigOpType.SET),
                ("retention.bytes", None, AlterConfigOpType.DELETE))
    entries = describe(a, "cfg")
    assert entries["retention.ms"].value == "2000"
    assert entries["retention.bytes"].value == "-1"
    assert entries["retention.bytes"].source != ConfigSource.DYNAMIC_TOPIC_CONFIG.value
    assert entries["segment.bytes"].value == "1048576"
    assert entries["max.message.bytes"].value == "500000"

    # Bad key, bad values: INVALID_CONFIG, and nothing changes.
    for key, value in [("no.such.config", "1"), ("retention.ms", "soon"), ("segment.bytes", "-5"),
                       ("cleanup.policy", "compact"), ("message.timestamp.type", "WallClock")]:
        code = admin_error(lambda: incremental(a, "cfg", (key, value, AlterConfigOpType.SET)))
        assert code == KafkaError.INVALID_CONFIG, (key, value, code)
    assert describe(a, "cfg")["retention.ms"].value == "2000"

    # A bad key at creation: INVALID_CONFIG, and no topic.
    code = create_error(a, NewTopic("cfg-bad", 1, 1, config={"no.such.config": "1"}))
    assert code == KafkaError.INVALID_CONFIG
    code = create_error(a, NewTopic("cfg-compact", 1, 1, config={"cleanup.policy": "compact"}))
    assert code == KafkaError.INVALID_CONFIG
    assert "cfg-bad" not in topics(a) and "cfg-compact" not in topics(a)

    # Unknown topic.
    code = admin_error(lambda: incremental(a, "nope", ("retention.ms", "1", AlterConfigOpType.SET)))
    assert code == KafkaError.UNKNOWN_TOPIC_OR_PART
    code = admin_error(lambda: describe(a, "nope"))
    assert code == KafkaError.UNKNOWN_TOPIC_OR_PART

    # Configs persist over a restart.
    broker.restart()
    a = ck_admin(broker)
    entries = describe(a, "cfg")
    assert entries["retention.ms"].value == "2000"
    assert entries["segment.bytes"].value == "1048576"
    assert entries["retention.bytes"].value == "-1"


def test_alter_configs_replaces_the_whole_set_kafka_python(broker):
    from kafka.admin import ConfigResource as KCR, ConfigResourceType, KafkaAdminClient, NewTopic as KNT

    from support import kafka_python_major, kp_describe_configs

    admin = KafkaAdminClient(bootstrap_servers=broker.addr)
    admin.create_topics([KNT("kp-cfg", 1, 1, topic_configs={"retention.bytes": "1048576"})], timeout_ms=30_000)

    def entries():
        return {k: v for k, (v, _) in kp_describe_configs(admin, ConfigResourceType.TOPIC, "kp-cfg").items()}

    assert entries()["retention.bytes"] == "1048576"
    assert entries()["retention.ms"] == str(WEEK_MS)
    if kafka_python_major() >= 3:
        # kafka-python 3 sends AlterConfigs only when told to (incremental=False), and then
        # fills in the other modified keys itself (AlterConfigs resets omitted keys), so the
        # override stays; the replacement itself is asserted with librdkafka below.
        admin.alter_configs([KCR(ConfigResourceType.TOPIC, "kp-cfg", configs={"retention.ms": "5000"})],
                            incremental=False)
        assert (entries()["retention.ms"], entries()["retention.bytes"]) == ("5000", "1048576")
    else:
        admin.alter_configs([KCR(ConfigResourceType.TOPIC, "kp-cfg", configs={"retention.ms": "5000"})])
        e = entries()
        assert e["retention.ms"] == "5000"
        assert e["retention.bytes"] == "-1", "AlterConfigs (not incremental) replaces the whole set"
    cluster = admin.describe_cluster()
    assert len(cluster["brokers"]) == 1
    # kafka-python 2.x names the field node_id; 3.x passes DescribeCluster's broker_id on.
    first = cluster["brokers"][0]
    assert first["port"] == broker.host_port[1]
    assert cluster["controller_id"] == first.get("node_id", first.get("broker_id"))
    assert cluster["cluster_id"]
    admin.close()


def test_alter_configs_replaces_the_whole_set_librdkafka(broker):
    ck_create(broker, "ck-legacy", 1, {"retention.bytes": "1048576"})
    a = ck_admin(broker)
    assert describe(a, "ck-legacy")["retention.bytes"].value == "1048576"
    # The legacy AlterConfigs request: every key not named goes back to its default.
    res = a.alter_configs([ConfigResource(TOPIC, "ck-legacy", set_config={"retention.ms": "5000"})],
                          request_timeout=30)
    list(res.values())[0].result(timeout=30)
    entries = describe(a, "ck-legacy")
    assert entries["retention.ms"].value == "5000"
    assert entries["retention.bytes"].value == "-1"
    assert entries["retention.bytes"].source == ConfigSource.DEFAULT_CONFIG.value


def test_small_segments_roll_and_stay_contiguous(broker):
    ck_create(broker, "seg", 1, {"segment.bytes": "16384"})
    fill(broker, "seg", 1000, 1000)  # ~1 MB
    d = broker.partition_dir("seg")
    logs = segment_files(d)
    assert len(logs) > 1, "segment.bytes=16384 and 1 MB produced must roll segments"
    expected_next = 0
    for path in logs:
        name = os.path.basename(path)
        assert re.fullmatch(r"\d{20}\.log", name), name
        base = int(name[:20])
        if path != logs[-1]:  # ferrite keeps the active segment's indexes in memory until it rolls
            assert os.path.exists(path[:-4] + ".index"), f"{name} has no .index"
            assert os.path.exists(path[:-4] + ".timeindex"), f"{name} has no .timeindex"
        assert os.path.getsize(path) <= 16384, f"{name} is {os.path.getsize(path)} bytes > segment.bytes"
        batches = read_batches(path)
        assert batches, f"{name} is empty"
        assert base == expected_next == batches[0][0], f"{name}: segment base / first batch / previous end"
        for (b0, last, _, count), nxt in zip(batches, batches[1:] + [None]):
            assert last - b0 + 1 == count
            if nxt:
                assert nxt[0] == last + 1, f"{name}: gap after offset {last}"
        expected_next = batches[-1][1] + 1
    assert expected_next == 1000
    c = ck_consumer(broker)
    c.assign([TopicPartition("seg", 0, OFFSET_BEGINNING)])
    msgs = ck_consume(c, 1000)
    assert [m.offset() for m in msgs] == list(range(1000))
    assert [int(m.value()[:8]) for m in msgs] == list(range(1000))
    c.close()


def test_segment_ms_rolls_by_time(broker):
    ck_create(broker, "segms", 1, {"segment.ms": "300"})
    p = ck_producer(broker)
    ck_produce_all(p, "segms", [{"value": b"first"}])
    time.sleep(1.0)
    ck_produce_all(p, "segms", [{"value": b"second"}])
    logs = segment_files(broker.partition_dir("segms"))
    assert [os.path.basename(x) for x in logs] == ["00000000000000000000.log", "00000000000000000001.log"]


def test_retention_ms_deletes_old_segments(broker):
    """log.retention.check.interval.ms=200 (conftest); segments of 16 KiB; retention.ms=1000."""
    ck_create(broker, "ret", 1, {"segment.bytes": "16384"})
    fill(broker, "ret", 300, 1000)
    d = broker.partition_dir("ret")
    assert len(segment_files(d)) > 3
    a = ck_admin(broker)
    c = ck_consumer(broker)
    assert watermarks(c, "ret") == (0, 300)
    time.sleep(1.0)  # nothing goes with the default (7 days) retention
    assert watermarks(c, "ret") == (0, 300)
    incremental(a, "ret", ("retention.ms", "1000", AlterConfigOpType.SET))
    wait_until("retention to advance the low watermark", lambda: watermarks(c, "ret")[0] > 0, timeout_s=30)
    wait_until("the first segment file to be deleted",
               lambda: not os.path.exists(os.path.join(d, "00000000000000000000.log")), timeout_s=30)
    low, high = watermarks(c, "ret")
    assert high == 300
    remaining = segment_files(d)
    if remaining:
        assert low <= int(os.path.basename(remaining[0])[:20]) or low == high, (low, remaining)
    # Consuming from the beginning starts at the low watermark; appends continue at 300.
    p = ck_producer(broker)
    r = ck_produce_all(p, "ret", [{"value": b"after retention", "partition": 0}])
    assert r[0][2] == 300
    low, high = watermarks(c, "ret")
    c.assign([TopicPartition("ret", 0, OFFSET_BEGINNING)])
    msgs = ck_consume(c, high - low)
    assert msgs[0].offset() == low and msgs[-1].value() == b"after retention"
    c.close()


def test_retention_bytes_bounds_the_partition_size(broker):
    ck_create(broker, "retb", 1, {"segment.bytes": "16384", "retention.bytes": "40000"})
    fill(broker, "retb", 300, 1000)
    d = broker.partition_dir("retb")

    def total():
        return sum(os.path.getsize(x) for x in segment_files(d))

    c = ck_consumer(broker)
    wait_until("retention.bytes to delete old segments", lambda: watermarks(c, "retb")[0] > 0, timeout_s=30)
    wait_until("the partition to shrink under retention.bytes + one segment",
               lambda: total() <= 40000 + 16384, timeout_s=30)
    assert total() >= 40000 - 16384, "retention.bytes keeps roughly that much"
    assert watermarks(c, "retb")[1] == 300
    c.close()


def test_log_append_time_topic(broker):
    ck_create(broker, "lat", 1, {"message.timestamp.type": "LogAppendTime"})
    ck_create(broker, "ct", 1, {"message.timestamp.type": "CreateTime"})
    p = ck_producer(broker)
    t0 = int(time.time() * 1000)
    ck_produce_all(p, "lat", [{"value": b"x", "timestamp": BASE_TS}])
    ck_produce_all(p, "ct", [{"value": b"x", "timestamp": BASE_TS}])
    t1 = int(time.time() * 1000)
    c = ck_consumer(broker)
    c.assign([TopicPartition("lat", 0, OFFSET_BEGINNING), TopicPartition("ct", 0, OFFSET_BEGINNING)])
    got = {m.topic(): m.timestamp() for m in ck_consume(c, 2)}
    assert got["ct"] == (TIMESTAMP_CREATE_TIME, BASE_TS)
    kind, ts = got["lat"]
    assert kind == TIMESTAMP_LOG_APPEND_TIME
    assert t0 - 1000 <= ts <= t1 + 1000, "the broker's clock, not the producer's"
    c.close()


def test_broker_defaults_apply_to_new_topics(broker_factory):
    b = broker_factory("num.partitions=4", "log.segment.bytes=16384", "log.retention.check.interval.ms=200")
    a = ck_admin(b)
    # Auto-created on first use (auto.create.topics.enable defaults to true).
    p = ck_producer(b)
    ck_produce_all(p, "auto", [{"value": b"hi"}])
    assert len(topics(a)["auto"].partitions) == 4
    # -1 partitions / replication factor: the broker's defaults (KIP-464).
    a.create_topics([NewTopic("dflt", -1, -1)], operation_timeout=30)["dflt"].result(timeout=30)
    assert len(topics(a)["dflt"].partitions) == 4
    entries = describe(a, "dflt")
    assert entries["segment.bytes"].value == "16384"
    assert entries["segment.bytes"].source != ConfigSource.DYNAMIC_TOPIC_CONFIG.value
    fill(b, "dflt", 100, 1000)
    assert len(segment_files(b.partition_dir("dflt", 0))) > 1, "log.segment.bytes applies"
    res = a.describe_configs([ConfigResource(ConfigResource.Type.BROKER, "0")], request_timeout=30)
    broker_cfg = list(res.values())[0].result(timeout=30)
    assert broker_cfg["num.partitions"].value == "4"
    assert broker_cfg["log.segment.bytes"].value == "16384"


def test_topic_names(broker):
    a = ck_admin(broker)
    for name in ["bad name!", "a" * 250, ".", "..", "tab\there", "slash/x", "ü"]:
        code = create_error(a, NewTopic(name, 1, 1))
        assert code == KafkaError.TOPIC_EXCEPTION, (name, code)
    assert not any(n in topics(a) for n in ["bad name!", ".", ".."])
    for name in ["a" * 249, "with.dots_and-dashes", "UPPER.lower-123"]:
        ck_create(broker, name, 1)
        assert name in topics(a)


def test_topic_names_that_collide_on_dot_and_underscore(broker):
    """Kafka refuses a topic whose name differs from an existing one only by '.' vs '_'
    (they map to the same metric names): INVALID_TOPIC_EXCEPTION, "collides with existing topic"."""
    a = ck_admin(broker)
    ck_create(broker, "with.dots_and-dashes", 1)
    code = create_error(a, NewTopic("with_dots.and-dashes", 1, 1))
    assert code == KafkaError.TOPIC_EXCEPTION, code
    assert "with_dots.and-dashes" not in topics(a)


def test_create_partitions_replication_and_delete(broker):
    a = ck_admin(broker)
    ck_create(broker, "life", 2)
    assert create_error(a, NewTopic("life", 2, 1)) == KafkaError.TOPIC_ALREADY_EXISTS
    assert create_error(a, NewTopic("life", 5, 1)) == KafkaError.TOPIC_ALREADY_EXISTS
    assert create_error(a, NewTopic("rf3", 1, 3)) == KafkaError.INVALID_REPLICATION_FACTOR
    assert create_error(a, NewTopic("rf0", 1, 0)) == KafkaError.INVALID_REPLICATION_FACTOR
    assert "rf3" not in topics(a)
    # validate_only creates nothing.
    a.create_topics([NewTopic("dry", 1, 1)], validate_only=True, operation_timeout=30)["dry"].result(timeout=30)
    assert "dry" not in topics(a)

    def grow(n, **kw):
        return a.create_partitions([NewPartitions("life", n)], operation_timeout=30, request_timeout=30, **kw)["life"]

    assert admin_error(lambda: grow(1).result(timeout=30)) == KafkaError.INVALID_PARTITIONS
    assert admin_error(lambda: grow(2).result(timeout=30)) == KafkaError.INVALID_PARTITIONS
    grow(6, validate_only=True).result(timeout=30)
    assert len(topics(a)["life"].partitions) == 2
    grow(5).result(timeout=30)
    assert sorted(topics(a)["life"].partitions) == [0, 1, 2, 3, 4]
    assert admin_error(lambda: a.create_partitions([NewPartitions("ghost", 3)], operation_timeout=30)["ghost"]
                       .result(timeout=30)) == KafkaError.UNKNOWN_TOPIC_OR_PART
    # The new partitions take writes and reads.
    p = ck_producer(broker)
    results = ck_produce_all(p, "life", [{"value": f"p{i}".encode(), "partition": i} for i in range(5)])
    assert sorted((r[1], r[2]) for r in results) == [(i, 0) for i in range(5)]
    c = ck_consumer(broker)
    c.assign([TopicPartition("life", i, OFFSET_BEGINNING) for i in range(5)])
    assert sorted(m.value() for m in ck_consume(c, 5)) == [f"p{i}".encode() for i in range(5)]
    c.close()

    # Delete: gone from metadata, its directories go, unknown afterwards, re-creatable from 0.
    a.delete_topics(["life"], operation_timeout=30)["life"].result(timeout=30)
    assert "life" not in topics(a)
    # librdkafka's admin handle asks for auto-creation by default, which would re-create
    # the topic (answering LEADER_NOT_AVAILABLE, as Kafka does); this one does not.
    md = ck_admin(broker, **{"allow.auto.create.topics": "false"}).list_topics(topic="life", timeout=10)
    assert md.topics["life"].error is not None
    assert md.topics["life"].error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
    wait_until("the partition directories to go",
               lambda: not any(os.path.exists(broker.partition_dir("life", i)) for i in range(5)), timeout_s=30)
    assert admin_error(lambda: a.delete_topics(["life"], operation_timeout=30)["life"].result(timeout=30)) \
        == KafkaError.UNKNOWN_TOPIC_OR_PART
    ck_create(broker, "life", 1)
    results = ck_produce_all(ck_producer(broker), "life", [{"value": b"reborn", "partition": 0}])
    assert results[0][2] == 0, "a re-created topic starts at offset 0"
    # A deleted topic stays deleted after a restart.
    a.delete_topics(["life"], operation_timeout=30)["life"].result(timeout=30)
    broker.restart()
    assert "life" not in topics(ck_admin(broker))


def test_metadata_auto_creation_answers_leader_not_available_first(broker):
    """As Kafka: the Metadata request that creates a topic hears LEADER_NOT_AVAILABLE (5),
    the next one sees the topic (num.partitions=1); without allow_auto_topic_creation the
    answer is UNKNOWN_TOPIC_OR_PARTITION (3) and nothing is created. Sent with
    raw wire (librdkafka retries the first answer away)."""
    from support import raw_metadata_v4

    assert raw_metadata_v4(broker.addr, "not-asked", False) == (3, 0)
    assert raw_metadata_v4(broker.addr, "fresh", True) == (5, 0)
    assert raw_metadata_v4(broker.addr, "fresh", True) == (0, 1)
    assert raw_metadata_v4(broker.addr, "not-asked", False) == (3, 0)
