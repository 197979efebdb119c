"""Transactions with a real client (confluent-kafka / librdkafka): commit and abort seen
through read_committed and read_uncommitted consumers, the last stable offset, offsets
committed with send_offsets_to_transaction, fencing by a second producer with the same
transactional.id, the abort of a transaction past its timeout, transaction.max.timeout.ms,
`ferrite transactions list|describe`, and a consume-transform-produce loop that stays
exactly once across kill -9 of the broker."""
import json
import os
import subprocess
import time

import pytest

from support import ck_consume, ck_consumer, ck_create, ck_assert_nothing_more, run_bounded, wait_until

confluent_kafka = pytest.importorskip("confluent_kafka")
from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition  # noqa: E402


def txn_producer(b, tid, **extra):
    conf = {"bootstrap.servers": b.addr, "transactional.id": tid, "linger.ms": 5,
            "transaction.timeout.ms": 30_000, "message.timeout.ms": 30_000, "log_level": 3}
    conf.update(extra)
    p = Producer(conf)
    p.init_transactions(30)
    return p


def produce_values(p, topic, values, partition=None):
    for v in values:
        kw = {"value": v.encode()}
        if partition is not None:
            kw["partition"] = partition
        while True:
            try:
                p.produce(topic, **kw)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    assert p.flush(30) == 0


def consume_all(b, topic, partitions, count, isolation):
    c = ck_consumer(b, **{"isolation.level": isolation})
    c.assign([TopicPartition(topic, i, 0) for i in range(partitions)])
    got = [m.value().decode() for m in ck_consume(c, count, timeout_s=60)]
    ck_assert_nothing_more(c, wait_s=1.5)
    c.close()
    return got


def high_watermark(b, topic, partition, isolation):
    c = ck_consumer(b, **{"isolation.level": isolation})
    try:
        return c.get_watermark_offsets(TopicPartition(topic, partition), timeout=10, cached=False)[1]
    finally:
        c.close()


def test_commit_and_abort_read_committed_sees_only_committed(broker):
    ck_create(broker, "txn-basic", 2)
    p = txn_producer(broker, "basic")
    p.begin_transaction()
    produce_values(p, "txn-basic", [f"c1-{i}" for i in range(100)])
    p.commit_transaction(30)
    p.begin_transaction()
    produce_values(p, "txn-basic", [f"ab-{i}" for i in range(100)])
    p.abort_transaction(30)
    p.begin_transaction()
    produce_values(p, "txn-basic", [f"c2-{i}" for i in range(100)])
    p.commit_transaction(30)

    committed = consume_all(broker, "txn-basic", 2, 200, "read_committed")
    assert sorted(committed) == sorted([f"c1-{i}" for i in range(100)] + [f"c2-{i}" for i in range(100)])
    assert len(set(committed)) == 200, "each committed record exactly once"
    # read_uncommitted sees everything written, aborted data included (as Kafka).
    everything = consume_all(broker, "txn-basic", 2, 300, "read_uncommitted")
    assert sum(v.startswith("ab-") for v in everything) == 100

    # An open transaction holds the last stable offset at its first record: a
    # read_committed consumer sees nothing of it until the commit.
    p.begin_transaction()
    produce_values(p, "txn-basic", [f"open-{i}" for i in range(10)], partition=0)
    hw = high_watermark(broker, "txn-basic", 0, "read_uncommitted")
    lso = high_watermark(broker, "txn-basic", 0, "read_committed")
    assert lso == hw - 10, f"LSO {lso} should be the open transaction's first offset (HW {hw})"
    c = ck_consumer(broker, **{"isolation.level": "read_committed"})
    c.assign([TopicPartition("txn-basic", 0, lso)])
    ck_assert_nothing_more(c, wait_s=1.5)
    p.commit_transaction(30)
    got = [m.value().decode() for m in ck_consume(c, 10, timeout_s=30)]
    assert got == [f"open-{i}" for i in range(10)]
    c.close()
    # After the commit the LSO passes the marker.
    assert high_watermark(broker, "txn-basic", 0, "read_committed") == \
        high_watermark(broker, "txn-basic", 0, "read_uncommitted")


def test_send_offsets_to_transaction_commits_offsets_only_on_commit(broker):
    ck_create(broker, "txn-in", 1)
    ck_create(broker, "txn-out", 1)
    plain = Producer({"bootstrap.servers": broker.addr})
    produce_values(plain, "txn-in", [f"in-{i}" for i in range(60)])
    c = ck_consumer(broker, **{"group.id": "txn-group", "isolation.level": "read_committed"})
    c.subscribe(["txn-in"])
    p = txn_producer(broker, "offsets")

    def cycle(count, commit):
        msgs = ck_consume(c, count, timeout_s=60)
        p.begin_transaction()
        produce_values(p, "txn-out", [m.value().decode().replace("in", "out") for m in msgs])
        p.send_offsets_to_transaction(c.position(c.assignment()), c.consumer_group_metadata(), 30)
        if commit:
            p.commit_transaction(30)
        else:
            p.abort_transaction(30)

    def committed():
        return c.committed([TopicPartition("txn-in", 0)], timeout=10)[0].offset

    cycle(50, commit=True)
    assert committed() == 50
    cycle(10, commit=False)
    assert committed() == 50, "an aborted transaction's offsets are not committed"
    c.close()
    # After a restart, the committed offsets are rebuilt from __consumer_offsets.
    broker.restart(graceful=False)
    c = ck_consumer(broker, **{"group.id": "txn-group"})
    assert c.committed([TopicPartition("txn-in", 0)], timeout=10)[0].offset == 50
    c.close()
    out = consume_all(broker, "txn-out", 1, 50, "read_committed")
    assert out == [f"out-{i}" for i in range(50)]


def test_an_open_transactions_offsets_are_unstable_for_read_committed(broker):
    """KIP-447: while a transaction holds an offset for a partition, a read_committed
    consumer's OffsetFetch (require_stable) gets UNSTABLE_OFFSET_COMMIT, which librdkafka
    retries, instead of the offset committed before it; read_uncommitted gets that older
    offset at once; after the commit both get the transaction's offset."""
    ck_create(broker, "unstable-in", 1)
    plain = Producer({"bootstrap.servers": broker.addr})
    produce_values(plain, "unstable-in", [f"in-{i}" for i in range(20)])
    c = ck_consumer(broker, **{"group.id": "unstable-group", "isolation.level": "read_committed"})
    c.subscribe(["unstable-in"])
    ck_consume(c, 20, timeout_s=60)
    p = txn_producer(broker, "unstable")
    p.begin_transaction()
    p.send_offsets_to_transaction(c.position(c.assignment()), c.consumer_group_metadata(), 30)
    tp = [TopicPartition("unstable-in", 0)]
    stable = ck_consumer(broker, **{"group.id": "unstable-group", "isolation.level": "read_committed"})
    uncommitted = ck_consumer(broker, **{"group.id": "unstable-group", "isolation.level": "read_uncommitted"})
    try:
        try:
            got = stable.committed(tp, timeout=3)
            assert got[0].error is not None and got[0].error.code() == KafkaError.UNSTABLE_OFFSET_COMMIT, got
        except KafkaException as e:
            # librdkafka retried UNSTABLE_OFFSET_COMMIT until the call's timeout.
            assert e.args[0].code() in (KafkaError._TIMED_OUT, KafkaError.UNSTABLE_OFFSET_COMMIT), e
        assert uncommitted.committed(tp, timeout=10)[0].offset == confluent_kafka.OFFSET_INVALID
        p.commit_transaction(30)
        assert stable.committed(tp, timeout=10)[0].offset == 20
        assert uncommitted.committed(tp, timeout=10)[0].offset == 20
    finally:
        stable.close()
        uncommitted.close()
        c.close()


def test_second_producer_with_the_same_transactional_id_fences_the_first(broker):
    ck_create(broker, "txn-fence", 1)
    p1 = txn_producer(broker, "fence")
    p1.begin_transaction()
    produce_values(p1, "txn-fence", [f"zombie-{i}" for i in range(5)])
    # The second producer's InitProducerId bumps the epoch and aborts p1's transaction.
    p2 = txn_producer(broker, "fence")
    with pytest.raises(KafkaException) as e:
        p1.commit_transaction(30)
    assert e.value.args[0].fatal(), f"the fenced producer fails fatally: {e.value}"
    p2.begin_transaction()
    produce_values(p2, "txn-fence", [f"new-{i}" for i in range(5)])
    p2.commit_transaction(30)
    got = consume_all(broker, "txn-fence", 1, 5, "read_committed")
    assert got == [f"new-{i}" for i in range(5)]


def test_a_transaction_past_its_timeout_is_aborted(broker):
    ck_create(broker, "txn-timeout", 1)
    p = txn_producer(broker, "slow", **{"transaction.timeout.ms": 2000, "message.timeout.ms": 2000})
    p.begin_transaction()
    produce_values(p, "txn-timeout", [f"late-{i}" for i in range(5)])
    # The coordinator aborts it (with an epoch bump) once 2 s have passed: the ABORT
    # marker moves the last stable offset up to the log end.
    wait_until("the timed-out transaction is aborted",
               lambda: high_watermark(broker, "txn-timeout", 0, "read_committed")
               == high_watermark(broker, "txn-timeout", 0, "read_uncommitted"),
               timeout_s=30, interval_s=0.5)
    with pytest.raises(KafkaException):
        p.commit_transaction(30)
    c = ck_consumer(broker, **{"isolation.level": "read_committed"})
    c.assign([TopicPartition("txn-timeout", 0, 0)])
    ck_assert_nothing_more(c, wait_s=1.5)
    c.close()


def test_transaction_timeout_above_the_brokers_maximum_is_refused(broker_factory):
    b = broker_factory("transaction.max.timeout.ms=10000")
    ck_create(b, "txn-max", 1)
    too_long = Producer({"bootstrap.servers": b.addr, "transactional.id": "too-long",
                         "transaction.timeout.ms": 10_001, "message.timeout.ms": 5000, "log_level": 0})
    with pytest.raises(KafkaException) as e:
        too_long.init_transactions(30)
    assert e.value.args[0].code() == KafkaError.INVALID_TRANSACTION_TIMEOUT, e.value
    # At the maximum it is accepted.
    p = txn_producer(b, "at-max", **{"transaction.timeout.ms": 10_000, "message.timeout.ms": 5000})
    p.begin_transaction()
    produce_values(p, "txn-max", ["x"])
    p.commit_transaction(30)


def ferrite_cli(b, *args):
    from conftest import FERRITE_BIN
    out = subprocess.run([FERRITE_BIN, *args, "-b", b.addr, "--json"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_list_and_describe_transactions(broker):
    """ListTransactions and DescribeTransactions (KIP-664) through `ferrite transactions`."""
    ck_create(broker, "txn-admin", 2)
    open_p = txn_producer(broker, "admin-open", **{"transaction.timeout.ms": 60_000})
    open_p.begin_transaction()
    produce_values(open_p, "txn-admin", ["a", "b"], partition=1)
    done = txn_producer(broker, "admin-done")
    done.begin_transaction()
    produce_values(done, "txn-admin", ["c"], partition=0)
    done.commit_transaction(30)

    listed = {t["transactional_id"]: t for t in ferrite_cli(broker, "transactions", "list")}
    assert listed["admin-open"]["state"] == "Ongoing"
    assert listed["admin-done"]["state"] == "CompleteCommit"
    ongoing = ferrite_cli(broker, "transactions", "list", "--state", "Ongoing")
    assert [t["transactional_id"] for t in ongoing] == ["admin-open"]
    by_pid = ferrite_cli(broker, "transactions", "list", "--producer-id",
                         str(listed["admin-done"]["producer_id"]))
    assert [t["transactional_id"] for t in by_pid] == ["admin-done"]
    # Running longer than an hour: none (KIP-994's duration filter, ListTransactions v1).
    assert ferrite_cli(broker, "transactions", "list", "--duration-ms", "3600000") == []

    d = ferrite_cli(broker, "transactions", "describe", "admin-open")
    assert d["state"] == "Ongoing"
    assert d["partitions"] == ["txn-admin-1"]
    assert d["producer_id"] == listed["admin-open"]["producer_id"]
    assert d["transaction_timeout_ms"] == 60_000
    assert d["transaction_start_time_ms"] is not None and d["transaction_start_time_ms"] > 0
    open_p.commit_transaction(30)
    d = ferrite_cli(broker, "transactions", "describe", "admin-open")
    assert (d["state"], d["partitions"]) == ("CompleteCommit", [])

    from conftest import FERRITE_BIN
    missing = subprocess.run([FERRITE_BIN, "transactions", "describe", "no-such-id", "-b", broker.addr,
                              "--json"], capture_output=True, text=True, timeout=30)
    assert missing.returncode != 0
    assert json.loads(missing.stderr)["error"]["code"] == "TRANSACTIONAL_ID_NOT_FOUND"


# (cycle, where): kill -9 of the broker while records are in flight, after send_offsets,
# after commit, and after send_offsets with the application crashing too ("app-crash": the
# transaction is never ended; the restarted application's InitProducerId fences and aborts
# it, and its consumer resumes from the committed offsets, so the inputs are processed again).
KILLS_MID_TRANSACTION = {3: "produced", 6: "offsets", 9: "committed", 12: "app-crash"}
# FERRITE_LONG=1: the long run, 100,000 inputs and eight kills (README, long runs).
LONG = os.environ.get("FERRITE_LONG") == "1"
KILLS_LONG = {3: "produced", 9: "offsets", 17: "committed", 23: "app-crash", 31: "produced",
              41: "offsets", 53: "committed", 67: "app-crash"}


class AppCrash(Exception):
    """The application dies mid-transaction (raised by the test itself)."""
# Every librdkafka call below takes a timeout, but send_offsets_to_transaction's is not
# enforced (librdkafka #5456): a hang must still end the test, so each cycle runs on a
# worker thread joined with this bound.
CYCLE_TIMEOUT_S = 60

# librdkafka >= 2.10 re-bootstraps when every known broker is down (one broker killed is
# all of them here) and decommissions the broker handles. A decommissioned broker stays
# cached as the group coordinator, and send_offsets_to_transaction then waits for that
# dead handle to come up, forever (librdkafka #5511, fix proposed in #5512; Kafka would
# hang the same way). Without re-bootstrap the handle reconnects to the restarted broker.
NO_REBOOTSTRAP = {"metadata.recovery.strategy": "none"}


@pytest.mark.parametrize("kills", [
    pytest.param({}, id="no-kill"),
    pytest.param(KILLS_LONG if LONG else KILLS_MID_TRANSACTION, id="kill-9"),
])
def test_consume_transform_produce_is_exactly_once(broker, kills):
    """Input records (10,000; 100,000 with FERRITE_LONG=1) through a transactional loop
    (consume, transform, produce, send_offsets_to_transaction, commit), optionally while
    the broker is killed with SIGKILL at different points of a transaction and restarted;
    the output holds each input exactly once and the committed input offsets are the
    input's end."""
    kills = dict(kills)
    planned_restarts = len(kills)
    partitions = 3
    total, per_txn = (100_000, 1000) if LONG else (10_000, 500)
    ck_create(broker, "eos-in", partitions)
    ck_create(broker, "eos-out", partitions)
    plain = Producer({"bootstrap.servers": broker.addr, "linger.ms": 20, "enable.idempotence": True})
    for i in range(total):
        while True:
            try:
                plain.produce("eos-in", value=f"{i}".encode(), partition=i % partitions)
                break
            except BufferError:
                plain.poll(0.05)
    assert plain.flush(60) == 0

    ends = [total // partitions + (1 if i < total % partitions else 0) for i in range(partitions)]

    def make():
        c = ck_consumer(broker, **{"group.id": "eos", "isolation.level": "read_committed",
                                   "session.timeout.ms": 6000, **NO_REBOOTSTRAP})
        c.subscribe(["eos-in"])
        p = txn_producer(broker, "eos-loop", **{"transaction.timeout.ms": 20_000,
                                                "message.timeout.ms": 20_000, "linger.ms": 10,
                                                **NO_REBOOTSTRAP})
        return c, p

    c, p = run_bounded("init_transactions", make, CYCLE_TIMEOUT_S)
    cycle = 0
    restarts = 0
    deadline = time.monotonic() + (900 if LONG else 150)

    def one_cycle(where):
        nonlocal restarts
        msgs = [m for m in c.consume(num_messages=per_txn, timeout=2) if m.error() is None]
        if not msgs:
            return
        p.begin_transaction()
        for m in msgs:
            while True:
                try:
                    p.produce("eos-out", value=b"out-" + m.value(), partition=m.partition())
                    break
                except BufferError:
                    p.poll(0.05)
        if where == "produced":
            p.flush(10)
            broker.restart(graceful=False)
            restarts += 1
        sent = c.position(c.assignment())
        p.send_offsets_to_transaction(sent, c.consumer_group_metadata(), 30)
        if where in ("offsets", "app-crash"):
            broker.restart(graceful=False)
            restarts += 1
        if where == "app-crash":
            raise AppCrash()
        p.commit_transaction(30)
        if where == "committed":
            broker.restart(graceful=False)
            restarts += 1
        if where:
            # The offsets sent in this transaction are the group's committed offsets now,
            # whether the broker died before or after the commit.
            got = c.committed([TopicPartition(tp.topic, tp.partition) for tp in sent], timeout=10)
            # (Partitions not consumed since the assignment have no position to send.)
            assert [(tp.partition, tp.offset) for tp in got if tp.offset >= 0] == \
                [(tp.partition, tp.offset) for tp in sent if tp.offset >= 0], f"after a kill at {where}"

    while True:
        assert time.monotonic() < deadline, "the loop did not finish"
        positions = c.position([TopicPartition("eos-in", i) for i in range(partitions)])
        if any(tp.offset < 0 for tp in positions):
            # A partition not consumed since the (re)start has no position yet: it is
            # done if its committed offset is its end.
            committed = c.committed([TopicPartition("eos-in", i) for i in range(partitions)], timeout=10)
            positions = [p if p.offset >= 0 else k for p, k in zip(positions, committed)]
        if all(tp.offset == end for tp, end in zip(positions, ends)):
            break
        cycle += 1
        where = kills.pop(cycle, None)
        try:
            run_bounded(f"cycle {cycle} ({where or 'no kill'})", lambda: one_cycle(where), CYCLE_TIMEOUT_S)
        except (KafkaException, AppCrash) as e:
            # Whatever failed, start over as a restarted application would: a new
            # producer with the same transactional.id (fencing and aborting the old
            # one's open transaction) and a consumer from the committed offsets.
            crashed = isinstance(e, AppCrash)

            def again():
                if not crashed:
                    try:
                        p.abort_transaction(10)
                    except KafkaException:
                        pass
                c.close()
                return make()
            c, p = run_bounded("restarting the application", again, CYCLE_TIMEOUT_S)
    c.close()
    assert restarts == planned_restarts
    got = consume_all(broker, "eos-out", partitions, total, "read_committed")
    values = [int(v[len("out-"):]) for v in got]
    assert len(values) == len(set(values)), f"{len(values) - len(set(values))} duplicates"
    assert sorted(values) == list(range(total))
    check = ck_consumer(broker, **{"group.id": "eos"})
    offsets = check.committed([TopicPartition("eos-in", i) for i in range(partitions)], timeout=10)
    check.close()
    assert [tp.offset for tp in offsets] == ends
