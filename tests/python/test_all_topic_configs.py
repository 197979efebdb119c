"""Every topic config of Kafka 4.x (issue 13 item 5), through confluent-kafka's AdminClient:
accepted with Kafka's type and range checks, described with default, source and synonyms, and `compression.type` other than `producer` recompressing on the broker."""
import os

import pytest
from confluent_kafka import KafkaError, KafkaException, OFFSET_BEGINNING, TopicPartition
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ConfigSource, NewTopic

from support import ck_admin, ck_consume, ck_consumer, ck_create, ck_produce_all, ck_producer, read_batches, segment_files

TOPIC = ConfigResource.Type.TOPIC

# LogConfig's definitions in Kafka 4.x.
KAFKA_TOPIC_CONFIGS = {
    "cleanup.policy", "compression.type", "compression.gzip.level", "compression.lz4.level",
    "compression.zstd.level", "delete.retention.ms", "file.delete.delay.ms", "flush.messages", "flush.ms",
    "follower.replication.throttled.replicas", "index.interval.bytes", "leader.replication.throttled.replicas",
    "local.retention.bytes", "local.retention.ms", "max.compaction.lag.ms", "max.message.bytes",
    "message.timestamp.after.max.ms", "message.timestamp.before.max.ms", "message.timestamp.type",
    "min.cleanable.dirty.ratio", "min.compaction.lag.ms", "min.insync.replicas", "preallocate",
    "remote.log.copy.disable", "remote.log.delete.on.disable", "remote.storage.enable", "retention.bytes",
    "retention.ms", "segment.bytes", "segment.index.bytes", "segment.jitter.ms", "segment.ms",
    "unclean.leader.election.enable",
}
SAME_NAME_AS_BROKER = {"compression.type", "compression.gzip.level", "compression.lz4.level",
                       "compression.zstd.level", "min.insync.replicas", "unclean.leader.election.enable"}
CODEC = {"uncompressed": 0, "none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}


def describe(a, topic):
    res = a.describe_configs([ConfigResource(TOPIC, topic)], request_timeout=30)
    return list(res.values())[0].result(timeout=30)


def create_error(a, topic, config):
    t = NewTopic(topic, 1, 1, config=config)
    with pytest.raises(KafkaException) as e:
        a.create_topics([t], operation_timeout=30, request_timeout=30)[topic].result(timeout=30)
    return e.value.args[0]


def test_every_kafka_topic_config_is_accepted_validated_and_described(broker):
    a = ck_admin(broker)
    given = {"compression.type": "zstd", "compression.zstd.level": "5", "delete.retention.ms": "1000",
             "min.insync.replicas": "1", "segment.jitter.ms": "10", "preallocate": "true",
             "min.cleanable.dirty.ratio": "0.3", "unclean.leader.election.enable": "false",
             "follower.replication.throttled.replicas": "*", "local.retention.ms": "-2",
             "file.delete.delay.ms": "0", "index.interval.bytes": "1024"}
    ck_create(broker, "all-cfg", config=given)
    entries = describe(a, "all-cfg")
    assert set(entries) == KAFKA_TOPIC_CONFIGS
    for k, v in given.items():
        assert entries[k].value == v, k
        assert entries[k].source == ConfigSource.DYNAMIC_TOPIC_CONFIG.value, k
        # confluent-kafka keys synonyms by name: where the broker config has the topic
        # config's own name (compression.type, min.insync.replicas, ...) the default
        # synonym hides the override's.
        if k not in SAME_NAME_AS_BROKER:
            assert entries[k].synonyms[k].value == v, k
    # Defaults are Kafka's, reported as DEFAULT_CONFIG with the broker config that carries them.
    expect_default = {"cleanup.policy": "delete", "compression.gzip.level": "-1", "compression.lz4.level": "9",
                      "segment.index.bytes": "10485760", "max.compaction.lag.ms": "9223372036854775807",
                      "min.compaction.lag.ms": "0", "remote.storage.enable": "false",
                      "retention.ms": str(7 * 24 * 3600 * 1000)}
    for k, v in expect_default.items():
        assert entries[k].value == v, k
        assert entries[k].source == ConfigSource.DEFAULT_CONFIG.value, k
    assert entries["retention.ms"].synonyms["log.retention.hours"].value == "168"
    assert entries["delete.retention.ms"].synonyms["delete.retention.ms"].source == \
        ConfigSource.DYNAMIC_TOPIC_CONFIG.value
    # (The documentation field is checked on the raw wire in crates/ferrite/tests: librdkafka
    # does not ask for it.)

    # Kafka's type and range checks: INVALID_CONFIG, and no topic.
    for k, v in [("compression.type", "brotli"), ("compression.gzip.level", "0"),
                 ("compression.zstd.level", "23"), ("min.insync.replicas", "0"),
                 ("min.cleanable.dirty.ratio", "1.5"), ("preallocate", "maybe"),
                 ("segment.index.bytes", "3"), ("leader.replication.throttled.replicas", "0-1"),
                 ("delete.retention.ms", "-1"), ("remote.storage.enable", "true"),
                 ("max.message.bytes", "3000000000")]:
        err = create_error(a, "bad-cfg", {k: v})
        assert err.code() == KafkaError.INVALID_CONFIG, (k, v, err)
    assert "bad-cfg" not in a.list_topics(timeout=10).topics

    # IncrementalAlterConfigs SET, APPEND on a list config, DELETE back to the default.
    def incremental(*ops):
        entries = [ConfigEntry(k, v, incremental_operation=op) for k, v, op in ops]
        res = a.incremental_alter_configs([ConfigResource(TOPIC, "all-cfg", incremental_configs=entries)],
                                          request_timeout=30)
        list(res.values())[0].result(timeout=30)

    incremental(("leader.replication.throttled.replicas", "0:0", AlterConfigOpType.APPEND),
                ("min.compaction.lag.ms", "5", AlterConfigOpType.SET),
                ("compression.type", None, AlterConfigOpType.DELETE))
    incremental(("leader.replication.throttled.replicas", "1:0", AlterConfigOpType.APPEND))
    entries = describe(a, "all-cfg")
    assert entries["leader.replication.throttled.replicas"].value == "0:0,1:0"
    assert entries["min.compaction.lag.ms"].value == "5"
    assert entries["compression.type"].value == "producer"
    assert entries["compression.type"].source == ConfigSource.DEFAULT_CONFIG.value


def stored_codecs(broker, topic):
    d = os.path.join(broker.data_dir, f"{topic}-0")
    return [attrs & 7 for f in segment_files(d) for (_, _, attrs, _) in read_batches(f)]


@pytest.mark.parametrize("topic_codec,producer_codec", [("gzip", "none"), ("zstd", "lz4"),
                                                         ("uncompressed", "snappy"), ("lz4", "lz4")])
def test_topic_compression_type_recompresses_on_the_broker(broker, topic_codec, producer_codec):
    topic = f"rc-{topic_codec}-{producer_codec}"
    ck_create(broker, topic, config={"compression.type": topic_codec})
    p = ck_producer(broker, **{"compression.type": producer_codec, "enable.idempotence": True, "acks": "all"})
    values = [f"value-{i:05d}-".encode() * 8 for i in range(500)]
    results = ck_produce_all(p, topic, ({"value": v, "key": b"k%d" % (i % 7)} for i, v in enumerate(values)))
    assert all(err is None for err, *_ in results)
    assert sorted(o for _, _, o, _ in results) == list(range(500)), "offsets are dense"
    codecs = stored_codecs(broker, topic)
    assert codecs and set(codecs) == {CODEC[topic_codec]}, codecs
    c = ck_consumer(broker)
    c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    got = ck_consume(c, 500, timeout_s=60)
    assert [m.value() for m in got] == values
    assert [m.offset() for m in got] == list(range(500))
    assert got[3].key() == b"k3"
    c.close()


def test_producer_compression_type_keeps_the_producers_batches(broker):
    ck_create(broker, "rc-producer")
    p = ck_producer(broker, **{"compression.type": "snappy"})
    ck_produce_all(p, "rc-producer", ({"value": b"x" * 100} for _ in range(100)))
    assert set(stored_codecs(broker, "rc-producer")) == {CODEC["snappy"]}
