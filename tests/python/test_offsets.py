"""ListOffsets (earliest, latest, by timestamp) and DeleteRecords, through both clients.

Kafka semantics checked: a timestamp lookup answers the earliest offset whose record timestamp
is >= the target (with out-of-order timestamps too), and "no such offset" (-1 / None) past the
largest timestamp; DeleteRecords moves the log start offset (low watermark) to exactly the
requested offset, answers it, keeps it over a restart, and a fetch below it is
OFFSET_OUT_OF_RANGE, which a consumer with auto.offset.reset=error reports and one with
earliest resolves by starting at the new low watermark.
"""
import time

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition, OFFSET_BEGINNING, OFFSET_END
from confluent_kafka.admin import OffsetSpec

from support import BASE_TS, ck_admin, ck_consume, ck_consumer, ck_create, ck_produce_all, ck_producer, watermarks


def produce_batches(b, topic, timestamps, batch=10, partition=0):
    """One record per timestamp, value = its index; flushed every `batch` records so the log
    holds several batches (lookups must search inside and across batches)."""
    p = ck_producer(b, **{"linger.ms": 50, "batch.num.messages": batch})
    for start in range(0, len(timestamps), batch):
        chunk = [{"value": str(i).encode(), "partition": partition, "timestamp": timestamps[i]}
                 for i in range(start, min(start + batch, len(timestamps)))]
        results = ck_produce_all(p, topic, chunk)
        assert all(err is None for err, *_ in results)
    return p


def test_offsets_for_times_confluent(broker):
    ck_create(broker, "times", 2)
    ts = [BASE_TS + i * 1000 for i in range(100)]
    produce_batches(broker, "times", ts)
    c = ck_consumer(broker)

    def lookup(target, partition=0):
        got = c.offsets_for_times([TopicPartition("times", partition, target)], timeout=10)
        assert got[0].error is None, got[0].error
        return got[0].offset

    assert lookup(BASE_TS + 50_000) == 50  # exact match
    assert lookup(BASE_TS + 50_500) == 51  # between two records: the next one
    assert lookup(BASE_TS + 49_001) == 50
    assert lookup(BASE_TS) == 0
    assert lookup(BASE_TS - 10**6) == 0  # before everything: the first record
    assert lookup(BASE_TS + 99_000) == 99  # the last record
    assert lookup(BASE_TS + 99_001) == OFFSET_END  # past the end: -1, no such record
    assert lookup(BASE_TS + 10**9) == OFFSET_END
    assert lookup(BASE_TS, partition=1) == OFFSET_END  # an empty partition has no such record
    # Several partitions in one request.
    got = c.offsets_for_times([TopicPartition("times", 0, BASE_TS + 10_000),
                               TopicPartition("times", 1, BASE_TS + 10_000)], timeout=10)
    assert sorted((tp.partition, tp.offset) for tp in got) == [(0, 10), (1, OFFSET_END)]
    assert watermarks(c, "times", 0) == (0, 100)
    assert watermarks(c, "times", 1) == (0, 0)
    # The offset found is where a consumer then reads the matching record.
    c.assign([TopicPartition("times", 0, lookup(BASE_TS + 73_500))])
    m = ck_consume(c, 1)[0]
    assert (m.offset(), m.value(), m.timestamp()[1]) == (74, b"74", BASE_TS + 74_000)
    c.close()


def test_out_of_order_timestamps_give_the_earliest_matching_offset(broker):
    ck_create(broker, "ooo")
    # offset:    0    1    2    3    4    5    6    7
    stamps = [100, 300, 200, 400, 150, 500, 450, 600]
    produce_batches(broker, "ooo", [BASE_TS + s for s in stamps], batch=3)
    c = ck_consumer(broker)
    for target, want in [(50, 0), (100, 0), (101, 1), (150, 1), (250, 1), (300, 1), (301, 3), (420, 5),
                         (460, 5), (500, 5), (501, 7), (600, 7), (601, OFFSET_END)]:
        got = c.offsets_for_times([TopicPartition("ooo", 0, BASE_TS + target)], timeout=10)[0]
        assert got.offset == want, f"target {target}: got {got.offset}, want {want}"
    c.close()


def test_admin_list_offsets_confluent(broker):
    ck_create(broker, "lo")
    produce_batches(broker, "lo", [BASE_TS + i * 10 for i in range(30)])
    a = ck_admin(broker)
    tp = TopicPartition("lo", 0)

    def ask(spec):
        return a.list_offsets({tp: spec}, request_timeout=30)[tp].result(timeout=30)

    assert ask(OffsetSpec.earliest()).offset == 0
    assert ask(OffsetSpec.latest()).offset == 30
    r = ask(OffsetSpec.for_timestamp(BASE_TS + 125))
    assert (r.offset, r.timestamp) == (13, BASE_TS + 130), "the offset and timestamp of the record found"


def test_offsets_for_times_kafka_python(broker):
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition as KTP
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=broker.addr)
    admin.create_topics([NewTopic("kp-times", 1, 1)], timeout_ms=30_000)
    admin.close()
    producer = KafkaProducer(bootstrap_servers=broker.addr, linger_ms=20)
    futures = [producer.send("kp-times", value=str(i).encode(), partition=0, timestamp_ms=BASE_TS + i * 10)
               for i in range(50)]
    producer.flush(30)
    assert [f.get(timeout=1).offset for f in futures] == list(range(50))
    producer.close(timeout=10)
    consumer = KafkaConsumer(bootstrap_servers=broker.addr, group_id=None)
    tp = KTP("kp-times", 0)
    found = consumer.offsets_for_times({tp: BASE_TS + 255})
    assert (found[tp].offset, found[tp].timestamp) == (26, BASE_TS + 260)
    found = consumer.offsets_for_times({tp: BASE_TS + 250})
    assert (found[tp].offset, found[tp].timestamp) == (25, BASE_TS + 250)
    assert consumer.offsets_for_times({tp: 0})[tp].offset == 0
    assert consumer.offsets_for_times({tp: BASE_TS + 10_000})[tp] is None
    assert consumer.beginning_offsets([tp]) == {tp: 0}
    assert consumer.end_offsets([tp]) == {tp: 50}
    consumer.close()


def test_delete_records_confluent(broker):
    ck_create(broker, "dr", 2)
    produce_batches(broker, "dr", [BASE_TS + i for i in range(100)])
    produce_batches(broker, "dr", [BASE_TS + i for i in range(10)], partition=1)
    a = ck_admin(broker)
    c = ck_consumer(broker)
    assert watermarks(c, "dr", 0) == (0, 100)

    res = a.delete_records([TopicPartition("dr", 0, 40)], operation_timeout=30, request_timeout=30)
    deleted = list(res.values())[0].result(timeout=30)
    assert deleted.low_watermark == 40
    assert watermarks(c, "dr", 0) == (40, 100)
    assert watermarks(c, "dr", 1) == (0, 10), "other partitions untouched"
    # A timestamp lookup never answers below the log start offset.
    assert c.offsets_for_times([TopicPartition("dr", 0, BASE_TS)], timeout=10)[0].offset == 40
    assert c.offsets_for_times([TopicPartition("dr", 0, BASE_TS + 60)], timeout=10)[0].offset == 60

    # Deleting below the current low watermark is a no-op that answers the current one.
    res = a.delete_records([TopicPartition("dr", 0, 10)], operation_timeout=30, request_timeout=30)
    assert list(res.values())[0].result(timeout=30).low_watermark == 40
    # Beyond the high watermark: OFFSET_OUT_OF_RANGE.
    res = a.delete_records([TopicPartition("dr", 0, 101)], operation_timeout=30, request_timeout=30)
    with pytest.raises(KafkaException) as e:
        list(res.values())[0].result(timeout=30)
    assert e.value.args[0].code() == KafkaError.OFFSET_OUT_OF_RANGE, e.value

    # auto.offset.reset=error: a fetch below the low watermark is reported as an error.
    strict = ck_consumer(broker, **{"auto.offset.reset": "error"})
    strict.assign([TopicPartition("dr", 0, 10)])
    err = None
    deadline = time.monotonic() + 30
    while err is None and time.monotonic() < deadline:
        m = strict.poll(0.5)
        if m is not None:
            assert m.error() is not None, f"got a record at offset {m.offset()} below the low watermark"
            err = m.error()
    assert err is not None, "no error for a fetch below the low watermark"
    assert err.code() in (KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE), err
    assert "out of range" in err.str().lower(), err
    strict.close()

    # auto.offset.reset=earliest: the consumer restarts at the new low watermark.
    c.assign([TopicPartition("dr", 0, 10)])
    msgs = ck_consume(c, 60)
    assert [m.offset() for m in msgs] == list(range(40, 100))
    assert [m.value() for m in msgs] == [str(i).encode() for i in range(40, 100)]
    c.unassign()
    c.assign([TopicPartition("dr", 0, OFFSET_BEGINNING)])
    assert ck_consume(c, 1)[0].offset() == 40
    c.close()

    # -1 means "up to the high watermark": everything goes.
    res = a.delete_records([TopicPartition("dr", 1, OFFSET_END)], operation_timeout=30, request_timeout=30)
    assert list(res.values())[0].result(timeout=30).low_watermark == 10

    # The log start offsets survive a restart, and appends continue at the high watermark.
    broker.restart(graceful=True)
    c = ck_consumer(broker)
    assert watermarks(c, "dr", 0) == (40, 100)
    assert watermarks(c, "dr", 1) == (10, 10)
    p = ck_producer(broker)
    r = ck_produce_all(p, "dr", [{"value": b"next", "partition": 1}])
    assert r[0][0] is None and r[0][2] == 10
    c.assign([TopicPartition("dr", 1, OFFSET_BEGINNING)])
    m = ck_consume(c, 1)[0]
    assert (m.offset(), m.value()) == (10, b"next")
    c.close()


def test_delete_records_kafka_python(broker):
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition as KTP
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import OffsetOutOfRangeError

    admin = KafkaAdminClient(bootstrap_servers=broker.addr)
    admin.create_topics([NewTopic("kp-dr", 1, 1)], timeout_ms=30_000)
    producer = KafkaProducer(bootstrap_servers=broker.addr, linger_ms=5)
    for i in range(30):
        producer.send("kp-dr", value=str(i).encode(), partition=0)
    producer.flush(30)
    producer.close(timeout=10)
    tp = KTP("kp-dr", 0)
    result = admin.delete_records({tp: 12}, timeout_ms=30_000)
    assert result[tp]["low_watermark"] == 12
    admin.close()

    # No reset policy: kafka-python raises OffsetOutOfRangeError for a position below it.
    strict = KafkaConsumer(bootstrap_servers=broker.addr, group_id=None, auto_offset_reset="none")
    strict.assign([tp])
    strict.seek(tp, 3)
    deadline = time.monotonic() + 30
    with pytest.raises(OffsetOutOfRangeError):
        while time.monotonic() < deadline:
            assert not strict.poll(timeout_ms=200), "records below the low watermark"
    strict.close()

    c = KafkaConsumer(bootstrap_servers=broker.addr, group_id=None, auto_offset_reset="earliest")
    c.assign([tp])
    assert c.beginning_offsets([tp]) == {tp: 12}
    assert c.end_offsets([tp]) == {tp: 30}
    c.seek(tp, 3)
    got = []
    deadline = time.monotonic() + 30
    while len(got) < 18:
        assert time.monotonic() < deadline, got
        for records in c.poll(timeout_ms=200).values():
            got += [(r.offset, r.value) for r in records]
    assert got == [(i, str(i).encode()) for i in range(12, 30)]
    c.close()
