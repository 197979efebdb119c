"""kafka-python against a real ferrite server."""
import threading
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
from support import kafka_python_major, kp_describe_configs

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


class _PollLoop:
    """A consumer polled continuously by its own thread, as applications run kafka-python.

    Polling two consumers in turn from one thread never settles under kafka-python 3.0.12:
    its JoinGroup/SyncGroup round runs on a background network loop, and a round that
    completes while the application is outside poll() is dropped (`join_group_async`
    starts a new attempt when the pending task `is_done`), so the next poll sends a new
    JoinGroup; from the leader of a Stable group that starts a rebalance, as in Kafka.
    The other consumer's turn is such a window every time (140 generations in 37 s)."""

    def __init__(self, consumer, commit=False):
        self.consumer, self.commit = consumer, commit
        self.values, self.assigned = [], set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        c = self.consumer
        while not self.stop.is_set():
            for records in c.poll(timeout_ms=100).values():
                self.values.extend(r.value for r in records)
            if self.commit:
                try:
                    c.commit()
                except COMMIT_RETRIABLE:
                    pass  # REBALANCE_IN_PROGRESS: the next poll rejoins; applications retry too
            self.assigned = {tp.partition for tp in c.assignment()}

    def join(self):
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "poll loop did not stop"


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
    loops = [_PollLoop(c, commit=True) for c in consumers]
    try:
        wait_until("two members with two partitions each",
                   lambda: all(len(loop.assigned) == 2 for loop in loops), timeout_s=60)
        wait_until("all messages", lambda: len({v for loop in loops for v in loop.values}) >= 200)
    finally:
        for loop in loops:
            loop.join()
    for c in consumers:
        wait_until("a final commit", lambda: _try_commit(c))
        c.close()
    if kafka_python_major() >= 3:  # 3.x renamed these and returns dicts
        assert "kpg" in {g["group_id"] for g in admin.list_groups()}
        offsets = admin.list_group_offsets("kpg")["kpg"]
    else:
        assert "kpg" in dict(admin.list_consumer_groups())
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
    loops = [_PollLoop(c) for c in consumers]

    def balanced():
        sets = [loop.assigned for loop in loops]
        return all(len(s) == 2 for s in sets) and sets[0].isdisjoint(sets[1])

    try:
        wait_until(f"{assignor}: 2 + 2 partitions", balanced)
    finally:
        for loop in loops:
            loop.join()
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
    entries = kp_describe_configs(admin, ConfigResourceType.TOPIC, "kp-cfg")
    assert entries["retention.bytes"] == ("1048576", False)
    assert entries["retention.ms"] == ("604800000", False)
    admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, "kp-cfg", configs={"retention.ms": "5000"})])
    entries = kp_describe_configs(admin, ConfigResourceType.TOPIC, "kp-cfg")
    assert entries["retention.ms"][0] == "5000"
    if kafka_python_major() >= 3:
        # kafka-python 3 alters incrementally (IncrementalAlterConfigs, advertised by the
        # broker): the other override stays.
        assert entries["retention.bytes"][0] == "1048576"
    else:
        # AlterConfigs replaces the whole set: retention.bytes is back to its default.
        assert entries["retention.bytes"][0] == "-1"
    # Broker configs, read-only, include the fetch path's mode (zero-copy by default).
    entries = kp_describe_configs(admin, ConfigResourceType.BROKER, "0")
    assert entries["fetch.zero.copy.enable"] == ("true", True)
    admin.close()
