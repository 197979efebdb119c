#!/usr/bin/env python3
"""W8 (issue 8): failover time under load, measured with a real client.

Three `ferrite server` processes (combined broker + controller) on 127.0.0.1, ephemeral
ports, a temporary data directory, broker.session.timeout.ms and
broker.heartbeat.interval.ms as given. A confluent-kafka producer (librdkafka, acks=all,
its defaults otherwise) sends to partition 0 of an RF 3 topic at a fixed rate. Each
round kills the partition's leader (kill -9 by PID, or SIGTERM with --sigterm), records
the time from the signal to the first acknowledged produce after it (kill -9) or the
longest time without an acknowledged produce in the 10 s after it (SIGTERM), restarts
the node and waits for a full ISR. Prints every round and the median and maximum as
JSON. Every wait is bounded; every process is stopped by PID.

    .venv/bin/python scripts/bench_failover.py [--rounds 10] [--session-ms 1500]
        [--heartbeat-ms 500] [--rate 1000] [--sigterm] [--bin target/debug/ferrite]
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

TOPIC = "w8-failover"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, node_id, args, data_dir):
        self.id = node_id
        self.args = args
        self.data_dir = data_dir
        self.proc = None
        self.addr = args[args.index("--listen") + 1]

    def start(self, binary, timeout_s=60):
        self.log = os.path.join(os.path.dirname(self.data_dir), f"node-{self.id}.log")
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [binary] + self.args,
                stdout=subprocess.PIPE,
                stderr=log,
                env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info")},
                text=True,
            )
        deadline = time.monotonic() + timeout_s
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                if line.startswith("ferrite ready"):
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(max(0.0, deadline - time.monotonic())):
            self.stop(signal.SIGKILL)
            kept = f"/tmp/ferrite-w8-node-{self.id}.log"
            subprocess.run(["cp", self.log, kept], check=False)
            raise RuntimeError(f"node {self.id} not ready within {timeout_s} s (its log: {kept})")

    def stop(self, sig):
        if self.proc is None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


def leader_and_isr(bootstrap):
    """(leader, isr) of partition 0 as the cluster answers, or None."""
    a = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        md = a.list_topics(TOPIC, timeout=5)
    except Exception:
        return None
    t = md.topics.get(TOPIC)
    if t is None or t.error is not None or 0 not in t.partitions:
        return None
    p = t.partitions[0]
    return p.leader, sorted(p.isrs)


def wait_for(what, timeout_s, f):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = f()
        if v is not None:
            return v
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout_s} s waiting for {what}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--session-ms", type=int, default=1500)
    ap.add_argument("--heartbeat-ms", type=int, default=500)
    ap.add_argument("--rate", type=int, default=1000, help="messages per second")
    ap.add_argument("--sigterm", action="store_true", help="controlled shutdown instead of kill -9")
    ap.add_argument("--bin", default="target/debug/ferrite")
    a = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="ferrite-w8-")
    ids = [1, 2, 3]
    ports = {i: (free_port(), free_port()) for i in ids}
    voters = ",".join(f"{i}@127.0.0.1:{ports[i][1]}" for i in ids)
    nodes = {}
    for i in ids:
        data_dir = os.path.join(tmp.name, f"node-{i}")
        args = [
            "server", "--node-id", str(i),
            "--listen", f"127.0.0.1:{ports[i][0]}",
            "--controller-listen", f"127.0.0.1:{ports[i][1]}",
            "--controller-quorum-voters", voters,
            "--data-dir", data_dir,
            "--set", f"broker.session.timeout.ms={a.session_ms}",
            "--set", f"broker.heartbeat.interval.ms={a.heartbeat_ms}",
        ]
        nodes[i] = Node(i, args, data_dir)
    threads = [threading.Thread(target=n.start, args=(a.bin,)) for n in nodes.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop = threading.Event()
    try:
        bootstrap = ",".join(n.addr for n in nodes.values())
        admin = AdminClient({"bootstrap.servers": bootstrap})
        fut = admin.create_topics([NewTopic(TOPIC, 1, 3, config={"min.insync.replicas": "2"})])
        fut[TOPIC].result(timeout=30)
        wait_for("a full ISR", 30, lambda: (lambda s: s if s and s[1] == ids else None)(leader_and_isr(bootstrap)))

        # (sent, acknowledged) monotonic times of acknowledged produces, appended by the
        # delivery callback; `sent` by message index (the key).
        acks = []
        sent = {}
        lock = threading.Lock()

        def delivered(err, msg):
            if err is None:
                now = time.monotonic()
                with lock:
                    acks.append((sent.pop(int(msg.key()), now), now))
            else:
                with lock:
                    sent.pop(int(msg.key()), None)

        producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 0,
                             "topic.metadata.refresh.interval.ms": 1000, "log_level": 0})

        def load():
            period = 1.0 / a.rate
            nxt = time.monotonic()
            i = 0
            while not stop.is_set():
                with lock:
                    sent[i] = time.monotonic()
                try:
                    producer.produce(TOPIC, value=b"x" * 1024, key=str(i).encode(), partition=0,
                                     on_delivery=delivered)
                except BufferError:
                    pass
                producer.poll(0)
                i += 1
                nxt += period
                time.sleep(max(0.0, nxt - time.monotonic()))
            producer.flush(30)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        time.sleep(3)
        rounds = []
        for r in range(a.rounds):
            leader, _ = wait_for("a leader", 30, lambda: leader_and_isr(bootstrap))
            victim = nodes[leader]
            sig = signal.SIGTERM if a.sigterm else signal.SIGKILL
            t0 = time.monotonic()
            victim.proc.send_signal(sig)
            time.sleep(10 if a.sigterm else 0)
            if a.sigterm:
                with lock:
                    window = [t0] + [t for _, t in acks if t0 <= t <= t0 + 10] + [t0 + 10]
                value = max(b - x for x, b in zip(window, window[1:]))
            else:
                # The first acknowledged produce sent after the kill: an answer the
                # old leader sent before dying does not count.
                def first_ack():
                    with lock:
                        after = [t for s, t in acks if s > t0]
                    return after[0] if after else None
                value = wait_for("an acknowledged produce after the kill", 60, first_ack) - t0
            victim.stop(signal.SIGKILL)
            rounds.append(round(value * 1000, 1))
            print(f"round {r + 1}: leader {leader} {'SIGTERM' if a.sigterm else 'kill -9'}: "
                  f"{rounds[-1]} ms", file=sys.stderr, flush=True)
            victim.start(a.bin)
            wait_for("a full ISR again", 60,
                     lambda: (lambda s: s if s and s[1] == ids else None)(leader_and_isr(bootstrap)))
            time.sleep(2)
        stop.set()
        loader.join(timeout=40)
        print(json.dumps({
            "signal": "SIGTERM" if a.sigterm else "SIGKILL",
            "metric_ms": "longest without an ack in 10 s" if a.sigterm else "kill to first ack",
            "session_ms": a.session_ms, "heartbeat_ms": a.heartbeat_ms, "rate": a.rate,
            "rounds_ms": rounds, "median_ms": statistics.median(rounds), "max_ms": max(rounds),
        }))
    finally:
        stop.set()
        for n in nodes.values():
            n.stop(signal.SIGKILL)
        tmp.cleanup()


if __name__ == "__main__":
    main()
