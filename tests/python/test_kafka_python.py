"""kafka-python against a real ferrite server."""
import time

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import CommitFailedError, InvalidReplicationFactorError, TopicAlreadyExistsError

try:  # kafka-python 3 raises this where 2.x raised CommitFailedError
    from kafka.errors import RebalanceInProgressError
except ImportError:  # pragma: no cover
    RebalanceInProgressError = CommitFailedError
COMMIT_RETRIABLE = (CommitFailedError, RebalanceInProgressError)

from conftest import wait_until
from murmur2 import partition_for

# Recent, so that time retention (7 days by default) keeps the records.
BASE_TS = int(time.time() * 1000) - 3_600_000


@pytest.mark.parametrize("codec", [None, "gzip", "snappy", "lz4", "zstd"])
def test_round_trip_every_codec(broker, codec):
    n, partitions, topic = 20_000, 3, f"kp-{codec or 'none'}"
    admin = KafkaAdminClient(bootstrap_servers=broker.addr, request_timeout_ms=30_000)
    admin.create_topics([NewTopic(topic, partitions, 1)])
    producer = KafkaProducer(bootstrap_servers=broker.addr, compression_type=codec, linger_ms=5, acks=1)
    for i in range(n):
        producer.send(topic, key=f"key-{i % 101}".encode(), value=f"value-{i}".encode(),
                      headers=[("seq", str(i).encode())], timestamp_ms=BASE_TS + i)
    producer.flush(60)
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=broker.addr, group_id=None, enable_auto_commit=False,
                             consumer_timeout_ms=10_000)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    next_offset = {p: 0 for p in range(partitions)}
    count = 0
    for m in consumer:
        assert m.offset == next_offset[m.partition]
        next_offset[m.partition] += 1
        seq = int(m.value.decode().split("-")[1])
        assert m.timestamp == BASE_TS + seq
        assert m.headers == [("seq", str(seq).encode())]
        assert m.partition == partition_for(m.key, partitions), "kafka-python's murmur2 placement"
        count += 1
        if count == n:
            break
    assert count == n
    assert consumer.end_offsets(tps) == {tp: next_offset[tp.partition] for tp in tps}
    consumer.close()
    admin.close()


def test_offsets_for_times_and_admin_errors(broker):
    admin = KafkaAdminClient(bootstrap_servers=broker.addr)
    admin.create_topics([NewTopic("kp-times", 1, 1)])
    with pytest.raises(TopicAlreadyExistsError):
        admin.create_topics([NewTopic("kp-times", 1, 1)])
    with pytest.raises(InvalidReplicationFactorError):
        admin.create_topics([NewTopic("kp-rf", 1, 3)])
    producer = KafkaProducer(bootstrap_servers=broker.addr)
    for i in range(50):
        producer.send("kp-times", value=b"x", partition=0, timestamp_ms=BASE_TS + i * 10).get(timeout=10)
    consumer = KafkaConsumer(bootstrap_servers=broker.addr)
    tp = TopicPartition("kp-times", 0)
    found = consumer.offsets_for_times({tp: BASE_TS + 255})
    assert found[tp].offset == 26
    assert consumer.offsets_for_times({tp: BASE_TS + 10_000})[tp] is None
    assert consumer.beginning_offsets([tp]) == {tp: 0}
    assert consumer.end_offsets([tp]) == {tp: 50}
    consumer.close()
    admin.delete_topics(["kp-times"])
    wait_until("topic deletion", lambda: "kp-times" not in admin.list_topics())
    admin.close()


def _try_commit(consumer):
    try:
        consumer.poll(timeout_ms=50)
        consumer.commit()
        return True
    except COMMIT_RETRIABLE:
        return False


def test_group_members_and_committed_offsets(broker):
    admin = KafkaAdminClient(bootstrap_servers=broker.addr)
    admin.create_topics([NewTopic("kp-group", 4, 1)])
    producer = KafkaProducer(bootstrap_servers=broker.addr)
    for i in range(200):
        producer.send("kp-group", key=f"k{i}".encode(), value=f"m{i}".encode())
    producer.flush(30)
    consumers = [KafkaConsumer("kp-group", bootstrap_servers=broker.addr, group_id="kpg",
                               auto_offset_reset="earliest", enable_auto_commit=False,
                               session_timeout_ms=6000, heartbeat_interval_ms=500) for _ in range(2)]
    seen = []

    def step():
        for c in consumers:
            for records in c.poll(timeout_ms=100).values():
                seen.extend(r.value for r in records)
            try:
                c.commit()
            except COMMIT_RETRIABLE:
                pass  # REBALANCE_IN_PROGRESS: the next poll rejoins; applications retry too
        return [c.assignment() for c in consumers]

    wait_until("two members with two partitions each",
               lambda: all(len(a) == 2 for a in step()), timeout_s=60)
    wait_until("all messages", lambda: step() and len(set(seen)) >= 200)
    for c in consumers:
        wait_until("a final commit", lambda: _try_commit(c))
        c.close()
    groups = dict(admin.list_consumer_groups())
    assert "kpg" in groups
    offsets = admin.list_consumer_group_offsets("kpg")
    assert sum(o.offset for o in offsets.values()) == 200
    admin.close()


@pytest.mark.parametrize("assignor", ["range", "roundrobin", "sticky"])
def test_every_client_assignor_balances(broker, assignor):
    from kafka.coordinator.assignors.range import RangePartitionAssignor
    from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
    from kafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
    strategy = {"range": RangePartitionAssignor, "roundrobin": RoundRobinPartitionAssignor,
                "sticky": StickyPartitionAssignor}[assignor]
    admin = KafkaAdminClient(bootstrap_servers=broker.addr)
    admin.create_topics([NewTopic("kp-assign", 4, 1)])
    consumers = [KafkaConsumer("kp-assign", bootstrap_servers=broker.addr, group_id=f"kpa-{assignor}",
                               partition_assignment_strategy=[strategy], session_timeout_ms=6000,
                               heartbeat_interval_ms=500) for _ in range(2)]

    def balanced():
        for c in consumers:
            c.poll(timeout_ms=100)
        sets = [set(tp.partition for tp in c.assignment()) for c in consumers]
        return all(len(s) == 2 for s in sets) and sets[0].isdisjoint(sets[1])

    wait_until(f"{assignor}: 2 + 2 partitions", balanced)
    for c in consumers:
        c.close()
    admin.close()


def test_describe_cluster_and_configs(broker):
    admin = KafkaAdminClient(bootstrap_servers=broker.addr)
    cluster = admin.describe_cluster()
    assert len(cluster["brokers"]) == 1
    # kafka-python 2.x names the field node_id; 3.x passes DescribeCluster's broker_id on.
    first = cluster["brokers"][0]
    assert cluster["controller_id"] == first.get("node_id", first.get("broker_id"))
    assert cluster["cluster_id"]
    from kafka.admin import ConfigResource, ConfigResourceType
    admin.create_topics([NewTopic("kp-cfg", 1, 1, topic_configs={"retention.bytes": "1048576"})])
    res = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, "kp-cfg")])
    entries = {c[0]: c[1] for c in res[0].resources[0][4]}
    assert entries["retention.bytes"] == "1048576"
    admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, "kp-cfg", configs={"retention.ms": "5000"})])
    res = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, "kp-cfg")])
    entries = {c[0]: c[1] for c in res[0].resources[0][4]}
    assert entries["retention.ms"] == "5000"
    # AlterConfigs replaces the whole set: retention.bytes is back to its default.
    assert entries["retention.bytes"] == "-1"
    # Broker configs, read-only, include the fetch path's mode (zero-copy by default).
    res = admin.describe_configs([ConfigResource(ConfigResourceType.BROKER, "0")])
    entries = {c[0]: (c[1], c[2]) for c in res[0].resources[0][4]}
    assert entries["fetch.zero.copy.enable"] == ("true", True)
    admin.close()
