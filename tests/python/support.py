"""Shared helpers: bounded waits, Kafka's murmur2, client factories, and an on-disk batch reader."""
import glob
import os
import struct
import time

# Recent enough that default time retention (7 days) keeps records stamped with it, and
# far enough in the past to be distinguishable from "now".
BASE_TS = (int(time.time() * 1000) - 3_600_000) // 1000 * 1000

CODEC_IDS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}


def wait_until(what, predicate, timeout_s=60, interval_s=0.1):
    """Polls predicate() until it returns something truthy (and returns that), at most timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


class Hung(AssertionError):
    """A bounded call did not return in time."""


def run_bounded(what, fn, timeout_s):
    """fn() on a daemon thread, joined with timeout_s: its result, its exception, or Hung.
    For client calls whose own timeout may not hold (librdkafka's
    send_offsets_to_transaction does not enforce its timeout, librdkafka #5456)."""
    import threading
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise Hung(f"{what} did not return within {timeout_s}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# Kafka's murmur2 (the Java client's Utils.murmur2) lives in murmur2.py; re-exported here.
from murmur2 import murmur2, partition_for  # noqa: E402,F401


MURMUR2_VECTORS = {
    "21": -973932308,
    "foobar": -790332482,
    "a-little-bit-long-string": -985981536,
    "a-little-bit-longer-string": -1486304829,
    "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    "abc": 479470107,
}


# --- confluent-kafka ------------------------------------------------------------------------
def ck_admin(b, **conf):
    from confluent_kafka.admin import AdminClient
    return AdminClient({"bootstrap.servers": b.addr, **conf})


def ck_create(b, name, partitions=1, config=None, rf=1):
    from confluent_kafka.admin import NewTopic
    a = ck_admin(b)  # the client must outlive the future
    fs = a.create_topics([NewTopic(name, partitions, rf, config=config or {})], operation_timeout=30,
                         request_timeout=30)
    fs[name].result(timeout=30)


def ck_producer(b, **extra):
    from confluent_kafka import Producer
    conf = {"bootstrap.servers": b.addr, "enable.idempotence": False, "linger.ms": 5,
            "message.timeout.ms": 30_000}
    conf.update(extra)
    return Producer(conf)


def ck_consumer(b, **extra):
    """A consumer for manual assign(): no commits, no group needed."""
    from confluent_kafka import Consumer
    conf = {"bootstrap.servers": b.addr, "group.id": "ferrite-tests", "enable.auto.commit": False,
            "enable.auto.offset.store": False, "auto.offset.reset": "earliest", "enable.partition.eof": False}
    conf.update(extra)
    return Consumer(conf)


def ck_produce_all(p, topic, messages, timeout_s=120):
    """messages: iterable of produce() kwargs. Returns [(err, partition, offset, kwargs)] in delivery order."""
    results = []

    def on_delivery(err, msg, kw):
        results.append((err, msg.partition(), msg.offset(), kw))

    deadline = time.monotonic() + timeout_s
    for kw in messages:
        # produce() takes no None timestamp/headers/partition: leave them out for the defaults.
        kw = {k: v for k, v in kw.items() if v is not None or k in ("key", "value")}
        while True:
            try:
                p.produce(topic, on_delivery=lambda err, msg, kw=kw: on_delivery(err, msg, kw), **kw)
                break
            except BufferError:
                assert time.monotonic() < deadline, "producer queue stayed full"
                p.poll(0.05)
        p.poll(0)
    left = p.flush(max(1.0, deadline - time.monotonic()))
    assert left == 0, f"{left} messages still undelivered after {timeout_s}s"
    return results


def ck_consume(c, count, timeout_s=120, allow_errors=False):
    """Consumes exactly `count` messages (fails on timeout or on a consumer error)."""
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count:
        assert time.monotonic() < deadline, f"consumed only {len(out)} of {count} within {timeout_s}s"
        for m in c.consume(num_messages=min(10_000, count - len(out)), timeout=0.5):
            if m.error() is not None:
                if allow_errors:
                    continue
                raise AssertionError(f"consumer error: {m.error()}")
            out.append(m)
    return out


def ck_assert_nothing_more(c, wait_s=1.0):
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        for m in c.consume(num_messages=100, timeout=0.2):
            assert m.error() is not None, f"unexpected extra message at {m.partition()}/{m.offset()}"


def watermarks(c, topic, partition=0):
    from confluent_kafka import TopicPartition
    return c.get_watermark_offsets(TopicPartition(topic, partition), timeout=10, cached=False)


# --- files on disk ---------------------------------------------------------------------------
def segment_files(partition_dir, ext="log"):
    return sorted(glob.glob(os.path.join(partition_dir, f"*.{ext}")))


def read_batches(path):
    """Record batch v2 headers in a .log file: [(base_offset, last_offset, attributes, record_count)].

    Stops at the first incomplete batch (a torn tail)."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + 61 <= len(data):
        base_offset, batch_len = struct.unpack_from(">qi", data, pos)
        if batch_len < 49 or pos + 12 + batch_len > len(data):
            break
        magic = data[pos + 16]
        assert magic == 2, f"{path}@{pos}: magic {magic}"
        attributes, last_delta = struct.unpack_from(">hi", data, pos + 21)
        (count,) = struct.unpack_from(">i", data, pos + 57)
        out.append((base_offset, base_offset + last_delta, attributes, count))
        pos += 12 + batch_len
    return out


# --- raw wire --------------------------------------------------------------------------------
def raw_produce(addr, topic, partition, values, producer_id=-1, producer_epoch=-1, base_sequence=-1,
                timeout_s=10):
    """Sends one record batch (magic 2, uncompressed) in a Produce v3 request with acks=-1 on
    its own connection, as a client with any producer id, epoch and sequence would (how the
    tests desynchronise a real producer). Returns (error_code, base_offset)."""
    import socket

    from kafka.record.default_records import DefaultRecordBatchBuilder

    b = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False,
                                  producer_id=producer_id, producer_epoch=producer_epoch,
                                  base_sequence=base_sequence, batch_size=1 << 20)
    for i, v in enumerate(values):
        b.append(i, timestamp=None, key=None, value=v, headers=[])
    records = bytes(b.build())

    def string(s):
        raw = s.encode()
        return struct.pack(">h", len(raw)) + raw

    # Produce v3: transactional_id (null), acks, timeout_ms, [topic [partition, records]].
    body = (struct.pack(">h", -1) + struct.pack(">hi", -1, int(timeout_s * 1000))
            + struct.pack(">i", 1) + string(topic) + struct.pack(">i", 1)
            + struct.pack(">ii", partition, len(records)) + records)
    correlation_id = 7
    header = struct.pack(">hhi", 0, 3, correlation_id) + string("raw-wire")
    request = header + body
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout_s) as s:
        s.sendall(struct.pack(">i", len(request)) + request)

        def read_exact(n):
            buf = b""
            while len(buf) < n:
                chunk = s.recv(n - len(buf))
                assert chunk, "connection closed before the Produce response"
                buf += chunk
            return buf

        (size,) = struct.unpack(">i", read_exact(4))
        resp = read_exact(size)
    # correlation_id, [topic name, [partition, error_code, base_offset, log_append_time]], throttle.
    (got_correlation,) = struct.unpack_from(">i", resp, 0)
    assert got_correlation == correlation_id
    pos = 4 + 4  # topic count
    (name_len,) = struct.unpack_from(">h", resp, pos)
    pos += 2 + name_len + 4  # partition count
    _index, error_code, base_offset = struct.unpack_from(">ihq", resp, pos)
    return error_code, base_offset


def describe_producers(b, topic, partition=0):
    """The partition's active producers from `ferrite topic describe --producers --json`
    (DescribeProducers): {producer_id: (producer_epoch, last_sequence)}."""
    import json
    import subprocess

    from conftest import FERRITE_BIN

    out = subprocess.run([FERRITE_BIN, "topic", "describe", "-b", b.addr, topic, "--producers", "--json"],
                         capture_output=True, text=True, timeout=30, check=True)
    described = json.loads(out.stdout)
    for p in described["producers"]:
        if p["partition"] == partition:
            assert p["error_code"] == 0, p
            return {e["producer_id"]: (e["producer_epoch"], e["last_sequence"]) for e in p["producers"]}
    raise AssertionError(f"no partition {partition} in {described['producers']}")


# --- kafka-python 2.x and 3.x ----------------------------------------------------------------
def kafka_python_major():
    import kafka
    return int(kafka.__version__.split(".")[0])


def kp_describe_configs(admin, resource_type, name):
    """{key: (value, read_only)} of one resource through kafka-python's describe_configs.

    2.x returns the DescribeConfigs response objects; 3.x a dict
    {resource type: {name: {key: {...}}}} holding by default only the modified keys
    (config_filter='modified', as `kafka-configs.sh --describe`), so all are asked for."""
    from kafka.admin import ConfigResource
    if kafka_python_major() >= 3:
        res = admin.describe_configs([ConfigResource(resource_type, name)], config_filter="all")
        [by_name] = res.values()
        return {k: (v["value"], v["read_only"]) for k, v in by_name[str(name)].items()}
    res = admin.describe_configs([ConfigResource(resource_type, name)])
    return {c[0]: (c[1], c[2]) for c in res[0].resources[0][4]}


def raw_request(addr, api_key, api_version, body, timeout_s=10):
    """One request (header v1: non-flexible versions only) on its own connection; returns the
    response body after the correlation id."""
    import socket

    correlation_id = 11
    client_id = b"raw-wire"
    request = struct.pack(">hhih", api_key, api_version, correlation_id, len(client_id)) + client_id + body
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout_s) as s:
        s.sendall(struct.pack(">i", len(request)) + request)
        buf = b""
        while len(buf) < 4 or len(buf) < 4 + struct.unpack_from(">i", buf)[0]:
            chunk = s.recv(65536)
            assert chunk, "connection closed before the response"
            buf += chunk
    (got,) = struct.unpack_from(">i", buf, 4)
    assert got == correlation_id
    return buf[8:]


def raw_metadata_v4(addr, topic, allow_auto_topic_creation):
    """Metadata v4 for one topic: (error_code, partition count) of that topic."""
    name = topic.encode()
    body = struct.pack(">ih", 1, len(name)) + name + struct.pack(">?", allow_auto_topic_creation)
    r = raw_request(addr, 3, 4, body)
    pos = 4  # throttle_time_ms
    (brokers,) = struct.unpack_from(">i", r, pos)
    pos += 4

    def skip_string(pos, nullable=False):
        (n,) = struct.unpack_from(">h", r, pos)
        return pos + 2 + max(n, 0)

    for _ in range(brokers):
        pos = skip_string(pos + 4) + 4  # node_id, host, port
        pos = skip_string(pos)  # rack
    pos = skip_string(pos) + 4  # cluster_id, controller_id
    (topics,) = struct.unpack_from(">i", r, pos)
    pos += 4
    found = None
    for _ in range(topics):
        (error_code, n) = struct.unpack_from(">hh", r, pos)
        got_name = r[pos + 4:pos + 4 + n].decode()
        pos += 4 + n + 1  # name, is_internal
        (partitions,) = struct.unpack_from(">i", r, pos)
        pos += 4
        for _ in range(partitions):
            pos += 2 + 4 + 4  # error_code, partition_index, leader_id
            for _ in range(2):  # replica_nodes, isr_nodes
                (k,) = struct.unpack_from(">i", r, pos)
                pos += 4 + 4 * max(k, 0)
        if got_name == topic:
            found = (error_code, partitions)
    assert found is not None, f"{topic} not in the response"
    return found
