"""Kafka's group coordinator rules, seen through real clients (issue 13):

- a commit made in the revocation callback, while the group is PreparingRebalance, is
  accepted (Kafka refuses only in CompletingRebalance), so nothing is consumed twice;
- a static member replaced by a second process with the same group.instance.id is fenced
  (FENCED_INSTANCE_ID, fatal) instead of rejoining and flipping the identity back;
- DescribeLogDirs reports real partition sizes (kafka-python's describe_log_dirs).
"""
import threading

from confluent_kafka import Consumer, KafkaError, Producer
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError as KafkaPythonError

from conftest import wait_until
from support import kafka_python_major

PARTITIONS = 4


class _Tracker(ConsumerRebalanceListener):
    """Commits synchronously in on_partitions_revoked, as applications do (and as the
    eager protocol requires), and records what happened."""

    def __init__(self):
        self.consumer = None
        self.lock = threading.Lock()
        self.revoke_commits = 0
        self.commit_errors = []
        self.assignments = []

    def on_partitions_revoked(self, revoked):
        if not revoked:
            return
        try:
            self.consumer.commit()
            with self.lock:
                self.revoke_commits += 1
        except KafkaPythonError as e:  # CommitFailedError on REBALANCE_IN_PROGRESS
            with self.lock:
                self.commit_errors.append(repr(e))

    def on_partitions_assigned(self, assigned):
        with self.lock:
            self.assignments.append({tp.partition for tp in assigned})


try:  # kafka-python 3
    from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
except ImportError:  # kafka-python 2.x
    AsyncConsumerRebalanceListener = None

if AsyncConsumerRebalanceListener is not None:
    class _AsyncTracker(_Tracker, AsyncConsumerRebalanceListener):
        """kafka-python 3 runs rebalance listeners on its network loop and refuses a blocking
        commit() there ("Cannot block on net.run() from the IO thread"); its answer is an
        async listener that awaits the commit. KafkaConsumer has no public async commit, so
        this awaits what commit() runs (coordinator._commit_offsets_sync_async with the
        consumed offsets)."""

        async def on_partitions_revoked(self, revoked):
            if not revoked:
                return
            c = self.consumer
            try:
                await c._coordinator._commit_offsets_sync_async(c._subscription.all_consumed_offsets())
                with self.lock:
                    self.revoke_commits += 1
            except KafkaPythonError as e:
                with self.lock:
                    self.commit_errors.append(repr(e))

        async def on_partitions_assigned(self, assigned):
            _Tracker.on_partitions_assigned(self, assigned)


def _tracker():
    return _AsyncTracker() if AsyncConsumerRebalanceListener is not None else _Tracker()


def _kp_consumer(broker, topic, tracker):
    c = KafkaConsumer(bootstrap_servers=broker.addr, group_id="g-revoke", enable_auto_commit=False,
                      auto_offset_reset="earliest", session_timeout_ms=10_000, heartbeat_interval_ms=300,
                      max_poll_records=50)
    tracker.consumer = c
    c.subscribe([topic], listener=tracker)
    return c


def test_kafka_python_commit_in_revocation_callback_survives(broker):
    topic, n = "kp-revoke", 400
    admin = KafkaAdminClient(bootstrap_servers=broker.addr)
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    producer = KafkaProducer(bootstrap_servers=broker.addr)
    for i in range(n):
        producer.send(topic, value=str(i).encode(), partition=i % PARTITIONS)
    producer.flush(30)

    # A alone consumes everything but commits nothing yet.
    ta = _tracker()
    a = _kp_consumer(broker, topic, ta)
    before = []

    def consume_a():
        for records in a.poll(timeout_ms=100).values():
            before.extend(int(r.value) for r in records)
        return len(before) >= n

    wait_until("A consumed the first batch", consume_a)
    assert sorted(before) == list(range(n))

    # B joins: A's heartbeat learns of the rebalance, A's revocation callback commits while
    # the group is PreparingRebalance (B has joined, A has not rejoined yet).
    after = {"a": [], "b": []}
    stop = threading.Event()

    def run(name, c):
        while not stop.is_set():
            for records in c.poll(timeout_ms=100).values():
                after[name].extend(int(r.value) for r in records)

    ta_thread = threading.Thread(target=run, args=("a", a), daemon=True)
    ta_thread.start()
    tb = _tracker()
    b = _kp_consumer(broker, topic, tb)
    tb_thread = threading.Thread(target=run, args=("b", b), daemon=True)
    tb_thread.start()
    try:
        def rebalanced():
            with ta.lock, tb.lock:
                return (len(ta.assignments) >= 2 and tb.assignments and ta.assignments[-1]
                        and tb.assignments[-1] and ta.assignments[-1] | tb.assignments[-1] == set(range(PARTITIONS)))
        wait_until("A and B share the partitions", rebalanced, timeout_s=60)
        assert ta.commit_errors == [], f"the commit in the revocation callback failed: {ta.commit_errors}"
        assert ta.revoke_commits >= 1
        # New records on every partition: once each is seen, anything redelivered from the
        # first batch (which precedes it in its partition) would have been seen too.
        for i in range(n, n + 40):
            producer.send(topic, value=str(i).encode(), partition=i % PARTITIONS)
        producer.flush(30)
        wait_until("the new records", lambda: len({v for v in after["a"] + after["b"] if v >= n}) >= 40)
    finally:
        stop.set()
        ta_thread.join(10)
        tb_thread.join(10)
    redelivered = sorted(v for v in after["a"] + after["b"] if v < n)
    assert redelivered == [], f"{len(redelivered)} records consumed twice"
    assert sorted(after["a"] + after["b"]) == list(range(n, n + 40))
    a.close()
    b.close()
    producer.close()
    admin.close()


def _rd_consumer(broker, group, **extra):
    conf = {"bootstrap.servers": broker.addr, "group.id": group, "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "session.timeout.ms": 10_000, "heartbeat.interval.ms": 300,
            "partition.assignment.strategy": "range"}
    conf.update(extra)
    return Consumer(conf)


def _produce(broker, topic, values):
    p = Producer({"bootstrap.servers": broker.addr})
    for i in values:
        p.produce(topic, value=str(i).encode(), partition=i % PARTITIONS)
    p.flush(30)


def test_librdkafka_commit_in_revocation_callback_survives(broker):
    topic, n = "rd-revoke", 400
    admin = KafkaAdminClient(bootstrap_servers=broker.addr)
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    _produce(broker, topic, range(n))
    failures, revoke_commits = [], []

    def on_revoke(c, partitions):
        if partitions:
            try:
                c.commit(asynchronous=False)
                revoke_commits.append(len(partitions))
            except Exception as e:  # KafkaException(REBALANCE_IN_PROGRESS) before the fix
                failures.append(repr(e))

    a = _rd_consumer(broker, "g-rd-revoke")
    a.subscribe([topic], on_revoke=on_revoke)
    before, after = [], []

    def poll(c, out):
        m = c.poll(0.05)
        if m is not None and m.error() is None:
            out.append(int(m.value()))

    wait_until("A consumed the first batch", lambda: poll(a, before) or len(before) >= n)
    b = _rd_consumer(broker, "g-rd-revoke")
    b.subscribe([topic], on_revoke=on_revoke)

    def shared():
        poll(a, after)
        poll(b, after)
        sa = {tp.partition for tp in a.assignment()}
        sb = {tp.partition for tp in b.assignment()}
        return sa and sb and sa | sb == set(range(PARTITIONS)) and not sa & sb

    wait_until("A and B share the partitions", shared, timeout_s=60)
    assert failures == [], f"commit in the revocation callback failed: {failures}"
    assert revoke_commits, "the revocation callback committed"
    _produce(broker, topic, range(n, n + 40))
    wait_until("the new records", lambda: (poll(a, after), poll(b, after)) and
               len({v for v in after if v >= n}) >= 40)
    assert sorted(v for v in after if v < n) == [], "records consumed twice"
    a.close()
    b.close()
    admin.close()


def test_librdkafka_static_member_replaced_is_fenced(broker):
    topic = "static-fence"
    admin = KafkaAdminClient(bootstrap_servers=broker.addr)
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    _produce(broker, topic, range(40))
    first = _rd_consumer(broker, "g-static", **{"group.instance.id": "instance-1"})
    first.subscribe([topic])
    wait_until("the first process owns every partition",
               lambda: first.poll(0.05) is not None or len(first.assignment()) == PARTITIONS)
    second = _rd_consumer(broker, "g-static", **{"group.instance.id": "instance-1"})
    second.subscribe([topic])
    fatal = []

    def first_fenced():
        m = first.poll(0.05)
        if m is not None and m.error() is not None:
            err = m.error()
            # librdkafka raises FENCED_INSTANCE_ID as a fatal error (_FATAL event).
            if err.code() in (KafkaError.FENCED_INSTANCE_ID, KafkaError._FATAL):
                fatal.append(err)
        second.poll(0.05)
        return fatal and len(second.assignment()) == PARTITIONS

    wait_until("the first process is fenced and the second owns every partition", first_fenced, timeout_s=60)
    assert "fenced" in fatal[0].str().lower(), fatal[0]
    # The identity stays with the second process: no flip-flop.
    for _ in range(40):
        second.poll(0.05)
    assert len(second.assignment()) == PARTITIONS
    # The one member left is the second process (kafka-python 2.3's MemberInformation
    # carries no instance id, so the member id tells them apart).
    if kafka_python_major() >= 3:  # 3.x: describe_groups, a dict of dicts
        members = admin.describe_groups(["g-static"])["g-static"]["members"]
        assert [m["member_id"] for m in members] == [second.memberid()], members
    else:
        described = admin.describe_consumer_groups(["g-static"])[0]
        assert [m.member_id for m in described.members] == [second.memberid()]
    second.close()
    try:
        first.close()
    except Exception:
        pass  # closing a fatally failed consumer may report the fatal error again
    admin.close()


def test_kafka_python_describe_log_dirs(broker):
    admin = KafkaAdminClient(bootstrap_servers=broker.addr)
    admin.create_topics([NewTopic("logdirs", 2, 1)])
    producer = KafkaProducer(bootstrap_servers=broker.addr)
    for i in range(100):
        producer.send("logdirs", value=b"v" * 100, partition=0)
    producer.flush(30)
    resp = admin.describe_log_dirs()
    if kafka_python_major() >= 3:  # 3.x: [{broker, log_dirs: [{error_code, log_dir, topics}]}]
        [per_broker] = resp
        [entry] = per_broker["log_dirs"]
        error_code, log_dir = entry["error_code"], entry["log_dir"]
        sizes = {(t["name"], p["partition_index"]): (p["partition_size"], p["offset_lag"])
                 for t in entry["topics"] for p in t["partitions"]}
    else:  # 2.x: the v0 response, (error_code, log_dir, topics) tuples
        results = resp.log_dirs if hasattr(resp, "log_dirs") else resp.to_object()["log_dirs"]
        assert len(results) == 1
        entry = results[0]
        error_code, log_dir, topics = entry[0], entry[1], entry[2]
        sizes = {(t[0], p[0]): (p[1], p[2]) for t in topics for p in t[1]}
    assert error_code == 0
    assert log_dir.startswith("/")
    size0, lag0 = sizes[("logdirs", 0)]
    size1, lag1 = sizes[("logdirs", 1)]
    assert size0 > 100 * 100, "partition 0 holds the 100 records"
    assert size1 == 0 and lag0 == 0 and lag1 == 0
    consumer = KafkaConsumer(bootstrap_servers=broker.addr)
    assert consumer.end_offsets([TopicPartition("logdirs", 0)])[TopicPartition("logdirs", 0)] == 100
    consumer.close()
    producer.close()
    admin.close()
