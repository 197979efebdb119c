"""Garbage on the wire: the broker answers or closes, stays up, and loses nothing."""
import random
import socket
import struct

from confluent_kafka import Consumer, Producer, TopicPartition, OFFSET_BEGINNING

from conftest import wait_until


def exchange(addr, payload, read=True):
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(payload)
        if not read:
            return b""
        chunks = []
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except socket.timeout:
            pass
        return b"".join(chunks)


def test_garbage_then_real_clients_still_work(broker_factory):
    b = broker_factory("socket.request.max.bytes=1048576", "connections.max.idle.ms=5000")
    p = Producer({"bootstrap.servers": b.addr})
    p.produce("survivor", value=b"before")
    p.flush(10)
    rng = random.Random(1234)
    for _ in range(30):
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        exchange(b.addr, struct.pack(">i", len(body)) + body)
        exchange(b.addr, body)
    assert exchange(b.addr, struct.pack(">i", 2**31 - 1)) == b""
    assert exchange(b.addr, struct.pack(">i", 2 * 1024 * 1024) + b"x" * 100) == b""
    exchange(b.addr, struct.pack(">i", 100) + b"\x00\x12\x00\x03", read=False)
    # ApiVersions v99: answered (KIP-511) with UNSUPPORTED_VERSION (35), in v0 format.
    req = struct.pack(">hhih", 18, 99, 42, -1)
    resp = exchange(b.addr, struct.pack(">i", len(req)) + req)
    size, corr, err = struct.unpack(">iih", resp[:10])
    assert (corr, err) == (42, 35) and size == len(resp) - 4
    assert b.alive()
    p.produce("survivor", value=b"after")
    p.flush(10)
    c = Consumer({"bootstrap.servers": b.addr, "group.id": "w", "enable.auto.commit": False})
    c.assign([TopicPartition("survivor", 0, OFFSET_BEGINNING)])
    values = []
    wait_until("both messages", lambda: (values.extend(m.value() for m in c.consume(10, 0.5) if not m.error())
                                         or len(values) >= 2))
    assert values == [b"before", b"after"]
    c.close()


def test_refused_versions_are_logged_by_name_at_warn(broker_factory):
    """A client below the version floor (Burrow 1.2.1 sends ListOffsets v0) sees its
    connection closed, and the operator sees why: the API by name and key, at WARN. A
    client refused in a loop does not flood the log (one WARN per interval)."""
    b = broker_factory()
    # ListOffsets (key 2) v0: replica_id, no topics.
    req = struct.pack(">hhih", 2, 0, 7, -1) + struct.pack(">ii", -1, 0)
    assert exchange(b.addr, struct.pack(">i", len(req)) + req) == b""
    # DescribeAcls (key 29) v1, not implemented: refused too, but within the interval.
    req = struct.pack(">hhih", 29, 1, 8, -1) + b"\x00" * 16
    assert exchange(b.addr, struct.pack(">i", len(req)) + req) == b""
    assert b.alive()
    wait_until("the WARN line", lambda: "ListOffsets (api key 2) v0" in open(b.log_path, errors="replace").read())
    log = open(b.log_path, errors="replace").read()
    line = next(ln for ln in log.splitlines() if "ListOffsets (api key 2) v0" in ln)
    assert "WARN" in line and "KIP-896" in line, line
    assert not any("DescribeAcls" in ln and "WARN" in ln for ln in log.splitlines()), "rate-limited"
