"""The idempotent producer with real clients: kafka-python 3's default producer, and
librdkafka (confluent-kafka) with enable.idempotence=true while the broker is killed with
kill -9 and restarted under load."""
import threading
import time

import pytest

from support import ck_consume, ck_consumer, ck_create, wait_until


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
