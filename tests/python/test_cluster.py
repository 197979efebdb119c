"""Python clients against a cluster of three real `ferrite server` processes (combined
broker+controller nodes on loopback, fixed ports below the ephemeral range):

- kafka-python 3 with its defaults (idempotent, acks=all) keeps every acknowledged write,
  in order and without duplicates, while partition leaders are killed with SIGKILL one
  after another and a node is stopped with SIGTERM (controlled shutdown); so does
  confluent-kafka with its defaults (acks=all, not idempotent: duplicates are counted);
- kafka-python 3's admin moves partitions to other brokers (AlterPartitionReassignments,
  ListPartitionReassignments) and confluent-kafka's elect_leaders moves a leadership to
  the preferred replica while kafka-python's default producer keeps writing: nothing
  acknowledged is lost or duplicated;
- confluent-kafka's consume-transform-produce loop stays exactly once while the
  transaction coordinator, then the group coordinator, then an output partition's leader
  are killed with SIGKILL mid-transaction and restarted.
"""
import os
import struct
import threading
import time

import pytest

from conftest import CLUSTER_READY_TIMEOUT_S
from support import Hung, ck_admin, ck_consume, ck_consumer, ck_create, raw_request, run_bounded, wait_until

confluent_kafka = pytest.importorskip("confluent_kafka")
from confluent_kafka import KafkaException, Producer, TopicPartition  # noqa: E402

OP_TIMEOUT_S = 60
# FERRITE_RDKAFKA_DEBUG=eos,cgrp,...: librdkafka's debug contexts for the clients below.
RDKAFKA_DEBUG = {"debug": os.environ["FERRITE_RDKAFKA_DEBUG"]} if os.environ.get("FERRITE_RDKAFKA_DEBUG") else {}


def admin(cluster):
    """One admin client per cluster (a new client per look would reconnect each time)."""
    if getattr(cluster, "ck_admin", None) is None:
        cluster.ck_admin = ck_admin(cluster)
    return cluster.ck_admin


def partition_state(cluster, topic):
    """{partition: (leader, replicas, isrs)} from one live node's metadata."""
    md = admin(cluster).list_topics(topic, timeout=10)
    t = md.topics[topic]
    if t.error is not None:
        return {}
    return {p.id: (p.leader, list(p.replicas), list(p.isrs)) for p in t.partitions.values()}


def wait_full_isr(cluster, topic, partitions, replicas=3):
    def ready():
        try:
            s = partition_state(cluster, topic)
        except KafkaException:
            return None
        return len(s) == partitions and all(l >= 0 and len(isr) == replicas for l, _, isr in s.values())
    wait_until(f"{topic}: a leader and {replicas} in-sync replicas everywhere", ready, timeout_s=OP_TIMEOUT_S)


def wait_leader_not(cluster, topic, partition, node_id):
    def moved():
        try:
            leader = partition_state(cluster, topic).get(partition, (-1,))[0]
        except KafkaException:
            return None
        return leader if leader >= 0 and leader != node_id else None
    return wait_until(f"{topic}-{partition} led by a node other than {node_id}", moved, timeout_s=OP_TIMEOUT_S)


def find_coordinator(cluster, key, key_type):
    """FindCoordinator v1 (key_type 0: group, 1: transaction) asked of the live nodes in
    turn; the coordinator's node id once one answers without error."""
    body = struct.pack(">h", len(key)) + key.encode() + struct.pack(">b", key_type)
    for n in cluster.nodes:
        if not n.alive():
            continue
        try:
            r = raw_request(n.addr, 10, 1, body)
        except OSError:
            continue
        pos = 4  # throttle_time_ms
        (error_code,) = struct.unpack_from(">h", r, pos)
        pos += 2
        (msg_len,) = struct.unpack_from(">h", r, pos)
        pos += 2 + max(msg_len, 0)
        (node_id,) = struct.unpack_from(">i", r, pos)
        if error_code == 0 and node_id >= 0:
            return node_id
    return None


def leader_faults(cluster, topic, partitions, acked_count):
    """The leader of partition 0 killed (SIGKILL) and restarted, twice (each time the
    current leader), then a node stopped with SIGTERM and restarted; between the steps,
    200 more acknowledgements (writes flow again) and a full ISR."""
    def progress(what, more=200):
        start = acked_count()
        wait_until(f"{more} more acknowledgements {what}", lambda: acked_count() >= start + more,
                   timeout_s=OP_TIMEOUT_S)

    progress("before any fault")
    for round_ in range(2):
        victim = partition_state(cluster, topic)[0][0]
        cluster.node(victim).kill()
        wait_leader_not(cluster, topic, 0, victim)
        progress(f"after kill -9 of node {victim} (round {round_ + 1})")
        cluster.restart(victim)
        wait_full_isr(cluster, topic, partitions)
        progress(f"after node {victim} rejoined")
    victim = partition_state(cluster, topic)[0][0]
    code = cluster.node(victim).stop()
    assert code == 0, f"node {victim} exited with {code} on SIGTERM"
    progress(f"after SIGTERM of node {victim}")
    cluster.restart(victim)
    wait_full_isr(cluster, topic, partitions)
    progress(f"after node {victim} rejoined")


def check_acknowledged(acked, read, exactly_once):
    """acked: {value: (partition, offset)}; read: {partition: [(offset, value)]}. Every
    acknowledged value is read back at its acknowledged place; with exactly_once no value
    appears twice and each partition keeps send order."""
    at = {}
    for p, recs in read.items():
        for o, v in recs:
            at.setdefault(v, set()).add((p, o))
    lost = [v for v in acked if v not in at]
    assert not lost, f"{len(lost)} acknowledged records lost, e.g. {lost[:5]}"
    moved = [(v, acked[v], sorted(at[v])) for v in acked if acked[v] not in at[v]]
    assert not moved, f"records not at their acknowledged offsets: {moved[:5]}"
    duplicates = sum(len(places) - 1 for places in at.values())
    if exactly_once:
        assert duplicates == 0, f"{duplicates} duplicated records"
        for p, recs in read.items():
            values = [v for _, v in recs]
            assert values == sorted(values), f"partition {p} out of send order"
    assert len(acked) > 1000
    return duplicates


def write_through_leader_faults(cluster, topic, partitions, send, flush, during=None):
    """Sends the values 0, 1, 2, ... (value i to partition i % partitions) from a thread
    without pause while leader_faults() runs, then stops and flush()es. send(i, ok, err)
    makes one send whose answer calls ok(partition, offset) or err(reason). Fails if a
    send failed or was never answered; returns {value: (partition, offset)}."""
    acked, failed = {}, []
    lock = threading.Lock()
    stop = threading.Event()
    sent = [0]

    def write():
        i = 0
        while not stop.is_set():
            def ok(partition, offset, i=i):
                with lock:
                    acked[i] = (partition, offset)

            def err(reason, i=i):
                with lock:
                    failed.append((i, reason))
            send(i, ok, err)
            i += 1
            sent[0] = i
            time.sleep(0.002)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()

    def acked_count():
        with lock:
            return len(acked)

    try:
        (during or leader_faults)(cluster, topic, partitions, acked_count)
    finally:
        stop.set()
        writer.join(10)
    flush()
    with lock:
        assert not failed, f"{len(failed)} sends failed, first: {failed[:3]}"
        assert len(acked) == sent[0], f"{sent[0] - len(acked)} sends never answered"
        return dict(acked)


def test_kafka_python_defaults_keep_every_acknowledged_write_across_leader_kills(cluster):
    """kafka-python 3's default producer (enable_idempotence, acks=-1, unbounded retries
    within delivery_timeout_ms) writes without pause through leader_faults(). Every
    acknowledged record is read back at its acknowledged offset; each value appears
    once; within a partition values keep their send order."""
    kafka = pytest.importorskip("kafka")
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition as KpTopicPartition
    topic, partitions = "kp-durable", 3
    ck_create(cluster, topic, partitions, {"min.insync.replicas": "2"}, rf=3)
    wait_full_isr(cluster, topic, partitions)

    producer = KafkaProducer(bootstrap_servers=cluster.bootstrap.split(","), linger_ms=5)
    assert producer.config["enable_idempotence"] is True and producer.config["acks"] == -1, \
        "the test is about kafka-python's defaults"

    def send(i, ok, err):
        producer.send(topic, value=str(i).encode(), partition=i % partitions) \
            .add_callback(lambda md: ok(md.partition, md.offset)).add_errback(lambda e: err(repr(e)))

    def flush():
        producer.flush(timeout=120)
        producer.close(timeout=10)

    acked = write_through_leader_faults(cluster, topic, partitions, send, flush)

    consumer = KafkaConsumer(bootstrap_servers=cluster.bootstrap.split(","), enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000)
    tps = [KpTopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning()
    ends = consumer.end_offsets(tps)
    read = {}
    deadline = time.monotonic() + OP_TIMEOUT_S
    while any(consumer.position(tp) < ends[tp] for tp in tps):
        assert time.monotonic() < deadline, "could not read the partitions to their ends"
        for recs in consumer.poll(timeout_ms=500).values():
            for r in recs:
                read.setdefault(r.partition, []).append((r.offset, int(r.value)))
    consumer.close()
    check_acknowledged(acked, read, exactly_once=True)
    print(f"kafka-python: {len(acked)} acknowledged, all read back in place, once")


def test_partitions_move_under_kafka_pythons_default_producer(cluster_factory):
    """Issue 9 item 6 with third-party admin clients: kafka-python moves partition 0 from
    node 1 to [2, 3] and partition 1 from node 2 to [3, 1] while its default idempotent
    producer writes to both; the moves complete (ListPartitionReassignments empties), the
    old replicas' directories go, a cancel with nothing in progress is
    NO_REASSIGNMENT_IN_PROGRESS; then a new order and confluent-kafka's elect_leaders
    (preferred) move partition 0's leadership. Every acknowledged record is read once,
    in place and in order."""
    pytest.importorskip("kafka")
    from confluent_kafka import ElectionType
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition as KTP
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import NoReassignmentInProgressError
    from conftest import CLUSTER_SETTINGS
    # No automatic preferred-leader pass: elect_leaders must be what moves the leader.
    cluster = cluster_factory(*CLUSTER_SETTINGS, "auto.leader.rebalance.enable=false")
    topic, partitions = "kp-moving", 2
    kadmin = KafkaAdminClient(bootstrap_servers=cluster.bootstrap.split(","))
    kadmin.create_topics([NewTopic(topic, replica_assignments={0: [1], 1: [2]})])
    wait_full_isr(cluster, topic, partitions, replicas=1)
    old_dirs = [cluster.node(1).partition_dir(topic, 0), cluster.node(2).partition_dir(topic, 1)]
    assert all(os.path.isdir(d) for d in old_dirs)

    def moves(cluster, topic, partitions, acked_count):
        def progress(what, more=300):
            start = acked_count()
            wait_until(f"{more} more acknowledgements {what}", lambda: acked_count() >= start + more,
                       timeout_s=OP_TIMEOUT_S)
        progress("before the moves")
        r = kadmin.alter_partition_reassignments({KTP(topic, 0): [2, 3], KTP(topic, 1): [3, 1]})
        assert r == {KTP(topic, 0): None, KTP(topic, 1): None}, r
        wait_until("the moves complete", lambda: kadmin.list_partition_reassignments({topic: [0, 1]}) == {},
                   timeout_s=OP_TIMEOUT_S)

        def placed():
            s = partition_state(cluster, topic)
            return all(len(s.get(p, (-1, [], []))[2]) == 2 for p in (0, 1)) and s
        s = wait_until("both partitions on their new replicas, in sync", placed, timeout_s=OP_TIMEOUT_S)
        assert (s[0][1], s[1][1]) == ([2, 3], [3, 1]), s
        assert s[0][0] == 2 and s[1][0] == 3, f"the target's first replica leads: {s}"
        wait_until("the old replicas' directories deleted",
                   lambda: not any(os.path.exists(d) for d in old_dirs), timeout_s=OP_TIMEOUT_S)
        progress("after the moves")
        r = kadmin.alter_partition_reassignments({KTP(topic, 0): None})
        assert r == {KTP(topic, 0): NoReassignmentInProgressError}, r
        # A new order only: done at once, the leader stays (2), the preferred is now 3.
        assert kadmin.alter_partition_reassignments({KTP(topic, 0): [3, 2]}) == {KTP(topic, 0): None}
        wait_until("the new order", lambda: partition_state(cluster, topic)[0][1] == [3, 2],
                   timeout_s=OP_TIMEOUT_S)
        assert partition_state(cluster, topic)[0][0] == 2
        done = admin(cluster).elect_leaders(ElectionType.PREFERRED, [TopicPartition(topic, 0)]).result()
        assert list(done.values()) == [None], done
        wait_until("the preferred replica leads", lambda: partition_state(cluster, topic)[0][0] == 3,
                   timeout_s=OP_TIMEOUT_S)
        progress("after the election", more=600)

    producer = KafkaProducer(bootstrap_servers=cluster.bootstrap.split(","), linger_ms=5)

    def send(i, ok, err):
        producer.send(topic, value=str(i).encode(), partition=i % partitions) \
            .add_callback(lambda md: ok(md.partition, md.offset)).add_errback(lambda e: err(repr(e)))

    def flush():
        producer.flush(timeout=120)
        producer.close(timeout=10)

    acked = write_through_leader_faults(cluster, topic, partitions, send, flush, during=moves)
    kadmin.close()
    consumer = KafkaConsumer(bootstrap_servers=cluster.bootstrap.split(","), enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000)
    tps = [KTP(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning()
    ends = consumer.end_offsets(tps)
    read = {}
    deadline = time.monotonic() + OP_TIMEOUT_S
    while any(consumer.position(tp) < ends[tp] for tp in tps):
        assert time.monotonic() < deadline, "could not read the partitions to their ends"
        for recs in consumer.poll(timeout_ms=500).values():
            for r in recs:
                read.setdefault(r.partition, []).append((r.offset, int(r.value)))
    consumer.close()
    check_acknowledged(acked, read, exactly_once=True)
    print(f"moved under kafka-python: {len(acked)} acknowledged, all read back in place, once")


def test_confluent_kafka_defaults_keep_every_acknowledged_write_across_leader_kills(cluster):
    """The same faults under confluent-kafka's default producer: acks=all (librdkafka's
    default), idempotence off (its default), so a retry after a lost answer may write a
    record twice, as with Kafka. Every acknowledged record is read back at its
    acknowledged offset; duplicates are counted, not refused."""
    topic, partitions = "ck-durable", 3
    ck_create(cluster, topic, partitions, {"min.insync.replicas": "2"}, rf=3)
    wait_full_isr(cluster, topic, partitions)
    producer = Producer({"bootstrap.servers": cluster.bootstrap, "linger.ms": 5})

    def send(i, ok, err):
        def on_delivery(e, msg):
            if e is not None:
                err(str(e))
            else:
                ok(msg.partition(), msg.offset())
        while True:
            try:
                producer.produce(topic, value=str(i).encode(), partition=i % partitions,
                                 on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)

    def flush():
        assert producer.flush(120) == 0, "sends never answered"

    acked = write_through_leader_faults(cluster, topic, partitions, send, flush)

    consumer = ck_consumer(cluster)
    ends = []
    for p in range(partitions):
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
        ends.append(high)
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    read = {}
    for m in ck_consume(consumer, sum(ends), timeout_s=OP_TIMEOUT_S):
        read.setdefault(m.partition(), []).append((m.offset(), int(m.value())))
    consumer.close()
    duplicates = check_acknowledged(acked, read, exactly_once=False)
    print(f"confluent-kafka: {len(acked)} acknowledged, all read back in place; {duplicates} duplicates")


# Kills in the transactional loop: (cycle, where, whom). "produced": after the cycle's
# records are flushed, before send_offsets_to_transaction; "offsets": after it, before
# the commit; "committed": after the commit.
EOS_KILLS = {3: ("produced", "txn-coordinator"), 6: ("offsets", "group-coordinator"),
             9: ("committed", "output-leader")}
# The victim is restarted this long after its kill, from a timer: past the broker
# session (4 s), so that it is fenced and its leaderships and coordinators move first.
# From a timer, not the loop, so that a cycle hung in the client (librdkafka #5511,
# below) does not also keep the node down.
EOS_RESTART_AFTER_S = 8
# A cycle that takes longer is taken for hung (a healthy one after a kill takes a broker
# session, a controller election and a coordinator load: under 15 s here).
EOS_CYCLE_TIMEOUT_S = 30


def test_consume_transform_produce_stays_exactly_once_across_coordinator_kills(cluster):
    """A confluent-kafka consume-transform-produce loop (3,000 inputs, RF 3,
    min.insync.replicas 2) while the transaction coordinator, the group coordinator and
    an output leader are each killed with SIGKILL at a different point of a transaction
    and restarted 8 s later. The clients find the new coordinators themselves; an
    abortable error aborts and resumes from the committed offsets; a cycle hung in the
    client (librdkafka #5511) restarts the application, whose new producer fences the
    old one. The output holds each input exactly once and the committed offsets are the
    input's end."""
    src, dst, partitions = "eos-c-in", "eos-c-out", 3
    total, per_txn = 3000, 250
    tid, group = "eos-cluster", "eos-cluster-group"
    for t in (src, dst):
        ck_create(cluster, t, partitions, {"min.insync.replicas": "2"}, rf=3)
    for t in (src, dst):
        wait_full_isr(cluster, t, partitions)
    plain = Producer({"bootstrap.servers": cluster.bootstrap, "enable.idempotence": True, "linger.ms": 20})
    for i in range(total):
        while True:
            try:
                plain.produce(src, value=f"{i}".encode(), partition=i % partitions)
                break
            except BufferError:
                plain.poll(0.05)
    assert plain.flush(60) == 0
    ends = [total // partitions + (1 if i < total % partitions else 0) for i in range(partitions)]

    def make():
        c = ck_consumer(cluster, **{"group.id": group, "isolation.level": "read_committed",
                                    "session.timeout.ms": 10_000, **RDKAFKA_DEBUG})
        c.subscribe([src])
        p = Producer({"bootstrap.servers": cluster.bootstrap, "transactional.id": tid, "linger.ms": 10,
                      "transaction.timeout.ms": 30_000, "message.timeout.ms": 30_000, **RDKAFKA_DEBUG})
        p.init_transactions(OP_TIMEOUT_S)
        return c, p

    c, p = run_bounded("init_transactions", make, EOS_CYCLE_TIMEOUT_S)
    restarts = []  # threads restarting a victim, and their errors
    restart_errors = []
    kills_done = []
    plan = sorted(EOS_KILLS.items())  # done in order, each at the first cycle with input

    def restart_later(victim):
        time.sleep(EOS_RESTART_AFTER_S)
        try:
            cluster.restart(victim)
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            restart_errors.append((victim, repr(e)))

    generation = [0]  # bumped when a hung application is replaced

    def kill(whom, cycle, gen):
        if gen != generation[0]:
            return  # an abandoned cycle that came unstuck: it no longer acts
        plan.pop(0)
        if whom == "txn-coordinator":
            victim = find_coordinator(cluster, tid, 1)
        elif whom == "group-coordinator":
            victim = find_coordinator(cluster, group, 0)
        else:
            victim = partition_state(cluster, dst)[0][0]
        assert victim is not None and victim >= 1, f"no {whom} found"
        cluster.node(victim).kill()
        t = threading.Thread(target=restart_later, args=(victim,), daemon=True)
        t.start()
        restarts.append(t)
        kills_done.append((cycle, whom, victim))

    def one_cycle(cycle, c, p, gen):
        msgs = [m for m in c.consume(num_messages=per_txn, timeout=2) if m.error() is None]
        if not msgs:
            return
        where, whom = plan[0][1] if plan and cycle >= plan[0][0] else (None, None)
        p.begin_transaction()
        for m in msgs:
            while True:
                try:
                    p.produce(dst, value=b"out-" + m.value(), partition=m.partition())
                    break
                except BufferError:
                    p.poll(0.05)
        if where == "produced":
            p.flush(30)
            kill(whom, cycle, gen)
        p.send_offsets_to_transaction(c.position(c.assignment()), c.consumer_group_metadata(), OP_TIMEOUT_S)
        if where == "offsets":
            kill(whom, cycle, gen)
        p.commit_transaction(OP_TIMEOUT_S)
        if where == "committed":
            kill(whom, cycle, gen)

    cycle = 0
    aborted = 0
    hung = 0
    deadline = time.monotonic() + 240
    while True:
        assert time.monotonic() < deadline, f"the loop did not finish (kills {kills_done})"
        if plan and cycle + 1 >= plan[0][0]:
            # One node down at a time: the next kill waits for the last victim's return.
            for t in restarts:
                t.join(EOS_RESTART_AFTER_S + CLUSTER_READY_TIMEOUT_S)
            assert not restart_errors, restart_errors
            for t in (src, dst):
                wait_full_isr(cluster, t, partitions)
        positions = c.position([TopicPartition(src, i) for i in range(partitions)])
        if any(tp.offset < 0 for tp in positions):
            committed = c.committed([TopicPartition(src, i) for i in range(partitions)], timeout=10)
            positions = [q if q.offset >= 0 else k for q, k in zip(positions, committed)]
        if all(tp.offset == end for tp, end in zip(positions, ends)):
            assert not plan, f"the input ran out before the kills {plan}"
            break
        cycle += 1
        try:
            run_bounded(f"cycle {cycle}", lambda: one_cycle(cycle, c, p, generation[0]), EOS_CYCLE_TIMEOUT_S)
        except Hung:
            # librdkafka #5511 (open): once the cached group coordinator is missing from
            # Metadata (fenced; Kafka omits fenced brokers too), its handle is
            # decommissioned and send_offsets_to_transaction can wait for it forever.
            # The application restarts, as a watchdog would: its consumer leaves the
            # group, and a new producer with the same transactional.id fences the hung
            # one and aborts its transaction.
            hung += 1
            assert hung <= len(EOS_KILLS), f"{hung} hung cycles for {len(EOS_KILLS)} kills"
            generation[0] += 1
            run_bounded("closing the hung application's consumer", c.close, EOS_CYCLE_TIMEOUT_S)
            c, p = run_bounded("restarting the application", make, EOS_CYCLE_TIMEOUT_S)
        except KafkaException as e:
            err = e.args[0]
            assert not err.fatal(), f"fatal error in cycle {cycle}: {err}"
            aborted += 1

            def again():
                if err.txn_requires_abort():
                    p.abort_transaction(OP_TIMEOUT_S)
                c.close()
                return make()
            # As the application would: abort, then resume from the committed offsets.
            c, p = run_bounded("resuming after an abortable error", again, EOS_CYCLE_TIMEOUT_S)
    for t in restarts:
        t.join(EOS_RESTART_AFTER_S + CLUSTER_READY_TIMEOUT_S)
    assert not restart_errors, restart_errors
    c.close()
    assert [w for _, w, _ in kills_done] == [w for _, w in EOS_KILLS.values()], kills_done

    out = ck_consumer(cluster, **{"isolation.level": "read_committed"})
    out.assign([TopicPartition(dst, i, 0) for i in range(partitions)])
    got = [m.value().decode() for m in ck_consume(out, total, timeout_s=OP_TIMEOUT_S)]
    more = [m for m in out.consume(num_messages=100, timeout=2) if m.error() is None]
    out.close()
    values = [int(v[len("out-"):]) for v in got]
    assert not more, f"{len(more)} records beyond the {total} expected (duplicates)"
    assert len(values) == len(set(values)), f"{len(values) - len(set(values))} duplicates"
    assert sorted(values) == list(range(total))
    check = ck_consumer(cluster, **{"group.id": group})
    offsets = check.committed([TopicPartition(src, i) for i in range(partitions)], timeout=10)
    check.close()
    assert [tp.offset for tp in offsets] == ends
    print(f"kills {kills_done}, {cycle} cycles, {aborted} aborted and resumed, {hung} hung and restarted")
