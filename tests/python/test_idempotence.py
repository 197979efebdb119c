"""The idempotent producer with real clients: kafka-python 3's default producer, and
librdkafka (confluent-kafka) with enable.idempotence=true while the broker is killed with
kill -9 and restarted under load; then what each client does when the broker's producer
state is gone (DeleteRecords, retention, producer.id.expiration.ms) or no longer matches
its sequence numbers (OUT_OF_ORDER_SEQUENCE_NUMBER)."""
import threading
import time

import pytest

from support import ck_admin, ck_consume, ck_consumer, ck_create, describe_producers, raw_produce, wait_until

OUT_OF_ORDER_SEQUENCE_NUMBER = 45


def test_kafka_python_default_producer_is_idempotent_and_works(broker):
    kafka = pytest.importorskip("kafka")
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic

    major = int(kafka.__version__.split(".")[0])
    if major < 3:
        pytest.skip(f"kafka-python {kafka.__version__}: the default producer is idempotent from 3.0")
    admin = KafkaAdminClient(bootstrap_servers=broker.addr)
    admin.create_topics([NewTopic("kp-idem", 2, 1)])
    admin.close()
    # The default configuration, as a new user would write it (idempotent in 3.x).
    producer = KafkaProducer(bootstrap_servers=broker.addr)
    assert producer.config["enable_idempotence"], "kafka-python 3 enables idempotence by default"
    futures = [producer.send("kp-idem", value=f"v{i}".encode(), partition=i % 2) for i in range(400)]
    offsets = {0: [], 1: []}
    for f in futures:
        md = f.get(timeout=60)
        offsets[md.partition].append(md.offset)
    producer.close(timeout=30)
    assert offsets == {0: list(range(200)), 1: list(range(200))}

    consumer = KafkaConsumer(bootstrap_servers=broker.addr, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=10_000)
    consumer.assign([TopicPartition("kp-idem", 0), TopicPartition("kp-idem", 1)])
    got = {0: [], 1: []}
    deadline = time.monotonic() + 60
    while sum(map(len, got.values())) < 400:
        assert time.monotonic() < deadline, f"consumed {sum(map(len, got.values()))} of 400"
        for tp, msgs in consumer.poll(timeout_ms=500).items():
            got[tp.partition].extend(m.value.decode() for m in msgs)
    consumer.close()
    assert got[0] == [f"v{i}" for i in range(0, 400, 2)]
    assert got[1] == [f"v{i}" for i in range(1, 400, 2)]


def test_confluent_idempotent_producer_exactly_once_across_kill_9(broker):
    """Every acknowledged message exactly once, in order, without gaps, while the broker
    is killed with SIGKILL and restarted three times mid-stream."""
    from confluent_kafka import Producer

    partitions, per_partition, kills = 3, 7000, 3
    ck_create(broker, "idem-crash", partitions)
    p = Producer({"bootstrap.servers": broker.addr, "enable.idempotence": True, "acks": "all",
                  "linger.ms": 2, "batch.num.messages": 200, "message.timeout.ms": 180_000,
                  "retry.backoff.ms": 100, "reconnect.backoff.max.ms": 500, "log_level": 3})
    acked = {i: [] for i in range(partitions)}
    errors = []
    lock = threading.Lock()

    def on_delivery(err, msg):
        with lock:
            if err is not None:
                errors.append(str(err))
            else:
                acked[msg.partition()].append((msg.offset(), msg.value().decode()))

    done = threading.Event()

    def produce():
        for i in range(per_partition):
            for part in range(partitions):
                while True:
                    try:
                        p.produce("idem-crash", value=f"{part}-{i}".encode(), partition=part,
                                  on_delivery=on_delivery)
                        break
                    except BufferError:
                        p.poll(0.05)
                p.poll(0)
            if i % 50 == 0:
                time.sleep(0.01)  # spread the load over the kills
        done.set()

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    total = partitions * per_partition
    for k in range(kills):
        # Kill while messages are in flight: wait until some more were acknowledged.
        target = (k + 1) * total // (kills + 2)
        wait_until(f"{target} acknowledged before kill {k + 1}",
                   lambda: sum(map(len, acked.values())) >= target or done.is_set(), timeout_s=180)
        broker.restart(graceful=False)
    t.join(timeout=300)
    assert not t.is_alive(), "producer thread did not finish"
    left = p.flush(240)
    assert left == 0, f"{left} messages undelivered"
    assert errors == [], errors[:5]

    c = ck_consumer(broker)
    from confluent_kafka import TopicPartition
    c.assign([TopicPartition("idem-crash", part, 0) for part in range(partitions)])
    msgs = ck_consume(c, total, timeout_s=180)
    c.close()
    by_partition = {i: [] for i in range(partitions)}
    for m in msgs:
        by_partition[m.partition()].append((m.offset(), m.value().decode()))
    for part in range(partitions):
        expected = [f"{part}-{i}" for i in range(per_partition)]
        log = by_partition[part]
        # Exactly once, in order, no gap: the log is the produced sequence itself...
        assert [v for _, v in log] == expected, f"partition {part}"
        assert [o for o, _ in log] == list(range(per_partition)), f"partition {part} offsets"
        # ...and every acknowledgement names the offset where its message is.
        assert sorted(acked[part]) == log, f"partition {part} acknowledgements"


# --- the broker's producer state removed, or out of step with the client ---------------------
#
# What Kafka does, and so Ferrite: since KIP-360 (Kafka 2.4/2.5, apache/kafka#7388) a
# producer's state stays when DeleteRecords or retention removes its batches from the log,
# and goes only when it expires (producer.id.expiration.ms); a producer id the partition has
# no state for may then continue at any sequence (ProducerAppendInfo.checkSequence). So a
# Produce is never answered UNKNOWN_PRODUCER_ID: the clients' handling of that error
# (librdkafka: bump the epoch if nothing is in flight, else fatal; kafka-python 3: reset the
# sequence when log_start_offset > its last acknowledged offset) is for pre-2.5 brokers and
# is not reached. The tests assert that each client simply carries on, nothing lost or doubled.
#
# OUT_OF_ORDER_SEQUENCE_NUMBER does reach clients, when the broker's state is ahead of the
# client's: here a raw-wire "zombie" appends under the producer's own id and epoch with the
# next sequence. librdkafka treats it on the head-of-line batch as a desynchronisation it
# cannot reason about and raises a fatal error (rd_kafka_handle_idempotent_Produce_error);
# kafka-python 3 fails that batch and bumps its epoch (KIP-360), and InitProducerId without a
# transactional id always hands out a new producer id (as Kafka's TransactionCoordinator).

EXPIRY_SETTINGS = ("log.retention.check.interval.ms=200", "group.initial.rebalance.delay.ms=200",
                   "producer.id.expiration.ms=3000")


def _log_values(b, topic, start, count):
    """Values at offsets start.. (exactly count of them, then nothing more)."""
    from confluent_kafka import TopicPartition

    from support import ck_assert_nothing_more
    c = ck_consumer(b)
    c.assign([TopicPartition(topic, 0, start)])
    msgs = ck_consume(c, count, timeout_s=60)
    ck_assert_nothing_more(c)
    c.close()
    return [(m.offset(), m.value().decode()) for m in msgs]


def _ck_send(p, topic, values):
    """Produces values to partition 0 and flushes: [(error, offset, value)] in delivery order."""
    out = []
    for v in values:
        p.produce(topic, value=v.encode(), partition=0,
                  on_delivery=lambda err, msg: out.append((err, msg.offset(), msg.value().decode())))
    assert p.flush(60) == 0
    return out


def _delete_records(b, topic, before):
    from confluent_kafka import TopicPartition
    a = ck_admin(b)
    res = a.delete_records([TopicPartition(topic, 0, before)], operation_timeout=30, request_timeout=30)
    for f in res.values():
        assert f.result(timeout=30).low_watermark == before


def test_confluent_idempotent_producer_carries_on_after_delete_records_and_expiry(broker_factory):
    from confluent_kafka import Producer

    b = broker_factory(*EXPIRY_SETTINGS)
    # Small segments, so that DeleteRecords removes whole segment files with the batches.
    ck_create(b, "ck-gone", 1, config={"segment.bytes": "2048"})
    p = Producer({"bootstrap.servers": b.addr, "enable.idempotence": True, "linger.ms": 0,
                  "message.timeout.ms": 30_000})
    first = _ck_send(p, "ck-gone", [f"a{i:03}" for i in range(100)])
    assert [(e, o) for e, o, _ in first] == [(None, i) for i in range(100)]
    [(pid, (epoch, last_seq))] = describe_producers(b, "ck-gone").items()
    assert (epoch, last_seq) == (0, 99)

    # DeleteRecords past every batch of the producer: its state stays (KIP-360), on
    # restart too (from the snapshot), and it continues in sequence.
    _delete_records(b, "ck-gone", 100)
    assert describe_producers(b, "ck-gone") == {pid: (0, 99)}
    b.restart()
    assert describe_producers(b, "ck-gone") == {pid: (0, 99)}
    second = _ck_send(p, "ck-gone", [f"b{i:03}" for i in range(50)])
    assert [(e, o) for e, o, _ in second] == [(None, 100 + i) for i in range(50)]
    assert describe_producers(b, "ck-gone") == {pid: (0, 149)}

    # Idle past producer.id.expiration.ms: the state goes; the producer's next sequence
    # (150) is accepted as the start of a producer the partition does not know.
    wait_until("the producer's state to expire", lambda: describe_producers(b, "ck-gone") == {},
               timeout_s=30)
    third = _ck_send(p, "ck-gone", [f"c{i:03}" for i in range(50)])
    assert [(e, o) for e, o, _ in third] == [(None, 150 + i) for i in range(50)]
    assert describe_producers(b, "ck-gone") == {pid: (0, 199)}
    p.flush(10)
    expected = [(100 + i, f"b{i:03}") for i in range(50)] + [(150 + i, f"c{i:03}") for i in range(50)]
    assert _log_values(b, "ck-gone", 100, 100) == expected


def test_confluent_idempotent_producer_out_of_order_is_fatal(broker):
    from confluent_kafka import KafkaError, KafkaException, Producer

    ck_create(broker, "ck-ooo", 1)
    p = Producer({"bootstrap.servers": broker.addr, "enable.idempotence": True, "linger.ms": 0,
                  "message.timeout.ms": 30_000})
    assert [(e, o) for e, o, _ in _ck_send(p, "ck-ooo", [f"a{i}" for i in range(10)])] == \
        [(None, i) for i in range(10)]
    [(pid, (epoch, last_seq))] = describe_producers(broker, "ck-ooo").items()
    assert last_seq == 9
    # A zombie with the same id and epoch appends sequences 10..11 first.
    assert raw_produce(broker.addr, "ck-ooo", 0, [b"zombie0", b"zombie1"], pid, epoch, 10) == (0, 10)

    # The producer's next batch (sequence 10) is now out of order: refused, not written, and
    # librdkafka raises a fatal error rather than guess.
    reports, raised = [], []
    p.produce("ck-ooo", value=b"late", partition=0, on_delivery=lambda err, msg: reports.append(err))
    deadline = time.monotonic() + 30
    while not reports:
        assert time.monotonic() < deadline, "no delivery report"
        try:
            p.poll(0.2)
        except KafkaException as e:  # the fatal error, raised from poll()
            raised.append(e.args[0])
    assert [e.code() for e in reports] == [KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER]
    # The fatal error itself comes out of poll() (confluent-kafka raises it), with the cause.
    while not raised:
        assert time.monotonic() < deadline, "no fatal error raised"
        try:
            p.poll(0.2)
        except KafkaException as e:
            raised.append(e.args[0])
    assert raised[0].fatal() and raised[0].code() == KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, raised
    assert "sequence desynchronization" in raised[0].str()
    # From now on the producer refuses everything: the application must create a new one.
    with pytest.raises(KafkaException) as refused:
        p.produce("ck-ooo", value=b"more", partition=0)
    assert refused.value.args[0].code() == KafkaError._FATAL
    assert _log_values(broker, "ck-ooo", 0, 12) == \
        [(i, f"a{i}") for i in range(10)] + [(10, "zombie0"), (11, "zombie1")]
    assert describe_producers(broker, "ck-ooo") == {pid: (epoch, 11)}


def _kafka_python3():
    kafka = pytest.importorskip("kafka")
    if int(kafka.__version__.split(".")[0]) < 3:
        pytest.skip(f"kafka-python {kafka.__version__}: KIP-360 recovery is in 3.x")
    return kafka


def test_kafka_python_producer_carries_on_after_delete_records_and_expiry(broker_factory):
    _kafka_python3()
    from kafka import KafkaProducer

    b = broker_factory(*EXPIRY_SETTINGS)
    ck_create(b, "kp-gone", 1, config={"segment.bytes": "2048"})
    p = KafkaProducer(bootstrap_servers=b.addr, linger_ms=0)

    def send(values):
        return [p.send("kp-gone", value=v.encode(), partition=0).get(timeout=30).offset for v in values]

    assert send([f"a{i:03}" for i in range(100)]) == list(range(100))
    pid = p._transaction_manager.producer_id_and_epoch.producer_id
    assert describe_producers(b, "kp-gone") == {pid: (0, 99)}
    _delete_records(b, "kp-gone", 100)
    b.restart()
    assert describe_producers(b, "kp-gone") == {pid: (0, 99)}
    assert send([f"b{i:03}" for i in range(50)]) == list(range(100, 150))
    wait_until("the producer's state to expire", lambda: describe_producers(b, "kp-gone") == {},
               timeout_s=30)
    assert send([f"c{i:03}" for i in range(50)]) == list(range(150, 200))
    # Same producer id and epoch: no reset or bump was needed.
    assert describe_producers(b, "kp-gone") == {pid: (0, 199)}
    p.close(timeout=30)
    expected = [(100 + i, f"b{i:03}") for i in range(50)] + [(150 + i, f"c{i:03}") for i in range(50)]
    assert _log_values(b, "kp-gone", 100, 100) == expected


def test_kafka_python_producer_bumps_epoch_after_out_of_order_and_carries_on(broker):
    _kafka_python3()
    from kafka import KafkaProducer
    from kafka.errors import OutOfOrderSequenceNumberError

    ck_create(broker, "kp-ooo", 1)
    p = KafkaProducer(bootstrap_servers=broker.addr, linger_ms=0)

    def send(values):
        return [p.send("kp-ooo", value=v.encode(), partition=0).get(timeout=30).offset for v in values]

    assert send([f"a{i}" for i in range(10)]) == list(range(10))
    old = p._transaction_manager.producer_id_and_epoch
    assert describe_producers(broker, "kp-ooo") == {old.producer_id: (old.epoch, 9)}
    assert raw_produce(broker.addr, "kp-ooo", 0, [b"zombie0", b"zombie1"], old.producer_id, old.epoch,
                       10) == (0, 10)
    # The refused batch fails with the broker's error...
    with pytest.raises(OutOfOrderSequenceNumberError):
        p.send("kp-ooo", value=b"late", partition=0).get(timeout=30)
    # ...then the producer recovers on its own (KIP-360) and the next sends succeed.
    assert send([f"b{i}" for i in range(5)]) == list(range(12, 17))
    new = p._transaction_manager.producer_id_and_epoch
    assert new.producer_id != old.producer_id, "InitProducerId without a transactional id: a new id"
    assert describe_producers(broker, "kp-ooo") == {old.producer_id: (old.epoch, 11),
                                                     new.producer_id: (new.epoch, 4)}
    p.close(timeout=30)
    assert _log_values(broker, "kp-ooo", 0, 17) == \
        [(i, f"a{i}") for i in range(10)] + [(10, "zombie0"), (11, "zombie1")] + \
        [(12 + i, f"b{i}") for i in range(5)]
