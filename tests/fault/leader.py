"""Prints the broker id leading one partition (run inside the harness's namespace):
`leader.py BOOTSTRAP TOPIC PARTITION`. Prints nothing when no leader is known."""
import sys

from confluent_kafka.admin import AdminClient


def main():
    bootstrap, topic, partition = sys.argv[1], sys.argv[2], int(sys.argv[3])
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.connection.setup.timeout.ms": 3000})
    md = admin.list_topics(topic=topic, timeout=10)
    t = md.topics.get(topic)
    if t is None or t.error is not None or partition not in t.partitions:
        return 1
    leader = t.partitions[partition].leader
    if leader < 0:
        return 1
    print(leader)
    return 0


if __name__ == "__main__":
    sys.exit(main())
