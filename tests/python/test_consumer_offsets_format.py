"""`__consumer_offsets` in Kafka's binary format (issue 13 item 3).

Tools such as Burrow read the topic directly with a plain consumer and decode each record
with Kafka's schemas (OffsetCommitKey/Value, GroupMetadataKey/Value). This test does the
same with `struct`, following Burrow's decoder (core/internal/consumer/kafka_client.go):
key version 0/1 is an offset commit, 2 group metadata; an offset value of version 0-3 is
offset, [leader epoch], metadata, commit timestamp.
"""
import struct

from confluent_kafka import Consumer, KafkaError, TopicPartition

from support import ck_create, ck_produce_all, ck_producer, wait_until

GROUP = "burrow-watched"
TOPIC = "lagged"


class Buf:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, fmt):
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self):
        n = self.take(">h")
        if n < 0:
            return None
        s = self.data[self.pos:self.pos + n].decode()
        self.pos += n
        return s

    def bytes_(self):
        n = self.take(">i")
        b = self.data[self.pos:self.pos + max(n, 0)]
        self.pos += max(n, 0)
        return b

    def done(self):
        assert self.pos == len(self.data), f"{len(self.data) - self.pos} trailing bytes"


def decode_key(key):
    b = Buf(key)
    version = b.take(">h")
    if version in (0, 1):
        out = ("offset", b.string(), b.string(), b.take(">i"))
    elif version == 2:
        out = ("group", b.string())
    else:
        raise AssertionError(f"failed to decode: key version {version}")
    b.done()
    return version, out


def decode_offset_value(value):
    b = Buf(value)
    version = b.take(">h")
    assert version in (0, 1, 2, 3), f"offset value version {version}"
    offset = b.take(">q")
    leader_epoch = b.take(">i") if version == 3 else -1
    metadata = b.string()
    commit_ts = b.take(">q")
    if version == 1:
        b.take(">q")  # expire timestamp
    b.done()
    return version, offset, leader_epoch, metadata, commit_ts


def decode_group_value(value):
    b = Buf(value)
    version = b.take(">h")
    assert version in (0, 1, 2, 3), f"group value version {version}"
    protocol_type, generation, protocol, leader = b.string(), b.take(">i"), b.string(), b.string()
    state_ts = b.take(">q") if version >= 2 else -1
    members = []
    for _ in range(b.take(">i")):
        member_id = b.string()
        instance_id = b.string() if version >= 3 else None
        client_id, client_host = b.string(), b.string()
        rebalance_timeout = b.take(">i") if version >= 1 else None
        session_timeout = b.take(">i")
        subscription, assignment = b.bytes_(), b.bytes_()
        members.append(dict(member_id=member_id, instance_id=instance_id, client_id=client_id,
                            client_host=client_host, rebalance_timeout=rebalance_timeout,
                            session_timeout=session_timeout, subscription=subscription,
                            assignment=assignment))
    b.done()
    return dict(version=version, protocol_type=protocol_type, generation=generation, protocol=protocol,
                leader=leader, state_ts=state_ts, members=members)


def java_hash_partition(s, partitions):
    h = 0
    for unit in s.encode("utf-16-be").hex(" ", 2).split():
        h = (31 * h + int(unit, 16)) & 0xFFFFFFFF
    if h >= 2**31:
        h -= 2**32
    return (0 if h == -2**31 else abs(h)) % partitions


def read_all(b, partition):
    """Every (key, value) of one __consumer_offsets partition, read like Burrow: assign, no commits."""
    c = Consumer({"bootstrap.servers": b.addr, "group.id": "burrow-reader", "enable.auto.commit": False,
                  "enable.partition.eof": True, "auto.offset.reset": "earliest"})
    c.assign([TopicPartition("__consumer_offsets", partition, 0)])
    out = []
    try:
        while True:
            m = c.poll(30)
            assert m is not None, "no end of partition within 30 s"
            if m.error() is not None:
                if m.error().code() == KafkaError._PARTITION_EOF:
                    return out
                raise AssertionError(m.error())
            out.append((m.key(), m.value()))
    finally:
        c.close()


def test_a_raw_reader_decodes_offsets_and_groups_with_kafkas_layout(broker):
    ck_create(broker, TOPIC, partitions=2)
    ck_produce_all(ck_producer(broker), TOPIC, [{"value": b"x", "partition": i % 2} for i in range(10)])
    c = Consumer({"bootstrap.servers": broker.addr, "group.id": GROUP, "client.id": "lag-app",
                  "enable.auto.commit": False, "auto.offset.reset": "earliest",
                  "session.timeout.ms": 10_000, "group.instance.id": "static-1"})
    c.subscribe([TOPIC])

    def assigned():
        c.poll(0.2)
        return len(c.assignment()) == 2

    wait_until("assignment", assigned, timeout_s=60)
    c.commit(offsets=[TopicPartition(TOPIC, 0, 3), TopicPartition(TOPIC, 1, 4)], asynchronous=False)
    c.commit(offsets=[TopicPartition(TOPIC, 0, 5, metadata="m5")], asynchronous=False)

    partition = java_hash_partition(GROUP, 50)
    offsets, groups = {}, []
    for key, value in read_all(broker, partition):
        version, k = decode_key(key)
        if k[0] == "offset":
            assert version == 1, "Kafka 3.x/4.x write OffsetCommitKey version 1"
            v = decode_offset_value(value)
            assert v[0] == 3, "and OffsetCommitValue version 3"
            offsets[(k[1], k[2], k[3])] = v
        else:
            groups.append((k[1], decode_group_value(value)))
    c.close()

    assert offsets[(GROUP, TOPIC, 0)][1] == 5
    # confluent-kafka sends the metadata with its C string's terminating NUL; the broker
    # stores what the client sent.
    assert offsets[(GROUP, TOPIC, 0)][3].rstrip("\0") == "m5"
    assert offsets[(GROUP, TOPIC, 1)][1] == 4
    assert offsets[(GROUP, TOPIC, 1)][3] == "", "no metadata is written as Kafka's empty string"
    mine = [g for name, g in groups if name == GROUP]
    assert mine, "a GroupMetadata record for the group"
    g = mine[-1]
    assert g["version"] == 3
    assert (g["protocol_type"], g["generation"]) == ("consumer", 1)
    assert g["protocol"] in ("range", "roundrobin")
    [m] = g["members"]
    assert g["leader"] == m["member_id"]
    assert (m["instance_id"], m["client_id"], m["session_timeout"]) == ("static-1", "lag-app", 10_000)
    # The assignment is the consumer protocol's: version, then the topic with both partitions.
    a = Buf(m["assignment"])
    a.take(">h")
    assert a.take(">i") == 1 and a.string() == TOPIC
    assert sorted(a.take(">i") for _ in range(a.take(">i"))) == [0, 1]
