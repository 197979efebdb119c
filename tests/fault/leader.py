"""Prints, as JSON, who holds a role in the cluster (run inside the harness's namespace):
`leader.py BOOTSTRAP TOPIC PARTITION` -> {"leader": id, "replicas": [ids], "controller": id}.
An unknown role is null."""
import json
import sys

from confluent_kafka.admin import AdminClient


def main():
    bootstrap, topic, partition = sys.argv[1], sys.argv[2], int(sys.argv[3])
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.connection.setup.timeout.ms": 3000})
    out = {"leader": None, "replicas": [], "controller": None}
    md = admin.list_topics(topic=topic, timeout=10)
    t = md.topics.get(topic)
    if t is not None and t.error is None and partition in t.partitions:
        p = t.partitions[partition]
        out["leader"] = p.leader if p.leader >= 0 else None
        out["replicas"] = list(p.replicas)
    try:
        out["controller"] = admin.describe_cluster(request_timeout=10).result(timeout=15).controller.id
    except Exception:  # noqa: BLE001 - no controller known (or DescribeCluster refused)
        pass
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
