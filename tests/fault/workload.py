"""The fault run's workload, run inside the harness's namespace (`ip netns exec`).

Producers send unique integer values to every partition of one topic and consumers read
them back (one in assign mode, one in subscribe mode), all recording a history in the
format of docs/history-format.md. The harness drives it over stdin/stdout lines:

  workload -> harness   READY                 topic created, one send acknowledged
  harness -> workload   HEALED                every fault healed
  workload -> harness   RECOVERED <ms> | NOT-RECOVERED <ms>
  workload -> harness   DONE <json summary>   final reads written, history closed

After HEALED the workload waits (bounded) until one send to every partition is
acknowledged, stops its clients, then reads every partition from the beginning to its
high watermark (the final reads).

Failed deliveries are recorded as `info` (unknown), never `fail`: librdkafka retries a
message until message.timeout.ms, so an attempt before the one that failed may have been
appended, and a `fail` that did happen would be a false aborted-read.

Mode `txn`: transactional producers (one transactional.id each, kept across a
replacement, so the new instance fences the old). Each transaction sends 1 to
TXN_SENDS_MAX values round the partitions, then commits, or aborts (TXN_ABORT_FRACTION of
them, drawn from the seed); its outcome is a `txn` line (ok committed, fail aborted, info
unknown) and its sends carry its `txn` id. The consumers read_committed: an aborted
value read is an aborted-read (G1a), a committed one never read a lost-write.
"""
import argparse
import itertools
import json
import random
import sys
import threading
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

# Jepsen's settings on Redpanda (design/cluster-facts.md): short request and delivery timeouts,
# so a fault shows as timeouts within seconds.
PRODUCER_BASE = {"request.timeout.ms": 3000, "message.timeout.ms": 10000, "reconnect.backoff.max.ms": 1000,
                 "linger.ms": 5, "socket.connection.setup.timeout.ms": 3000}
MODES = {
    # acks=all with the idempotent producer: duplicates must be zero.
    "all-idempotent": {"acks": "all", "enable.idempotence": True},
    # acks=all, no idempotence: retried sends may be duplicated (reported, not failed).
    "all": {"acks": "all", "enable.idempotence": False, "retries": 2147483647},
    # acks=1: the leader alone acknowledges (lost writes possible on a leader change).
    "one": {"acks": "1", "enable.idempotence": False, "retries": 2147483647},
    # Transactional producers (TxnProducerWorker adds the transactional.id): acks=all,
    # idempotent; no duplicates, no aborted reads.
    "txn": {"acks": "all", "enable.idempotence": True},
}
# The probes (setup and recovery) are not transactional.
PROBE_MODE = {"txn": "all-idempotent"}
TXN_SENDS_MAX = 8
TXN_ABORT_FRACTION = 0.25
# Bound on init_transactions, commit_transaction and abort_transaction; a retriable
# failure is retried this many times before the outcome is recorded as unknown.
TXN_CALL_TIMEOUT_S = 10
TXN_CALL_ATTEMPTS = 3
# transaction.timeout.ms: an open transaction of a producer that died is aborted by the
# coordinator after this, so the last stable offsets move on before the final reads.
TXN_TIMEOUT_MS = 10000
TXN_STRIDE = 1_000_000  # transaction ids are process * stride + counter: unique in the run
# Bounds on every wait of the workload.
SETUP_TIMEOUT_S = 90
RECOVER_TIMEOUT_S = 90
FINAL_READ_TIMEOUT_S = 120
CLIENT_STOP_TIMEOUT_S = 15
IN_FLIGHT_MAX = 200
POLL_BATCH_MAX = 500
VALUE_STRIDE = 1_000_000_000  # values are process * stride + counter: unique in the run
FINAL_READER = 99
PROBE_PROCESS = 98
# One counter for every probe of the run (setup and recovery), so probe values stay unique.
PROBE_COUNTER = itertools.count()


class History:
    """Thread-safe JSON-lines writer; time_ms from the harness's monotonic start."""

    def __init__(self, path, t0):
        self.f = open(path, "w", encoding="utf-8")
        self.lock = threading.Lock()
        self.t0 = t0

    def record(self, **op):
        with self.lock:
            op["time_ms"] = max(0, int((time.monotonic() - self.t0) * 1000))
            self.f.write(json.dumps(op, separators=(",", ":")) + "\n")

    def close(self):
        with self.lock:
            self.f.close()


def err_text(err):
    return f"{err.name()}: {err.str()}"


class ProducerWorker(threading.Thread):
    def __init__(self, process, args, history, stop):
        super().__init__(daemon=True, name=f"producer-{process}")
        self.process, self.args, self.h, self.stop = process, args, history, stop
        self.counter = 0
        self.acked = 0
        self.fatal = threading.Event()
        self.recreated = 0
        # value -> partition of every send invoked and not yet answered by a callback.
        self.outstanding = {}

    def conf(self):
        c = {"bootstrap.servers": self.args.bootstrap, **PRODUCER_BASE, **MODES[self.args.mode],
             "error_cb": self.on_error}
        return c

    def on_error(self, err):
        if err.fatal():
            self.fatal.set()

    def on_delivery(self, err, msg, value, txn):
        self.outstanding.pop(value, None)
        extra = {} if txn is None else {"txn": txn}
        if err is None:
            self.acked += 1
            self.h.record(type="ok", f="send", process=self.process, topic=self.args.topic, value=value,
                          partition=msg.partition(), offset=msg.offset(), **extra)
        else:
            self.h.record(type="info", f="send", process=self.process, topic=self.args.topic, value=value,
                          partition=msg.partition(), error=err_text(err), **extra)

    def send(self, p, partition, txn=None):
        value = self.process * VALUE_STRIDE + self.counter
        self.counter += 1
        extra = {} if txn is None else {"txn": txn}
        self.h.record(type="invoke", f="send", process=self.process, topic=self.args.topic, value=value,
                      partition=partition, **extra)
        self.outstanding[value] = partition
        try:
            p.produce(self.args.topic, value=str(value).encode(), partition=partition,
                      on_delivery=lambda err, msg, v=value: self.on_delivery(err, msg, v, txn))
        except Exception as e:  # noqa: BLE001 - BufferError, KafkaException: never queued
            self.outstanding.pop(value, None)
            self.h.record(type="fail", f="send", process=self.process, topic=self.args.topic, value=value,
                          partition=partition, error=f"produce() raised {e!r}", **extra)

    def drain(self, p, timeout_s, why):
        """Purges what is queued (callbacks record it as info), then records as info every
        send that still has no outcome: a producer that failed fatally may never call back."""
        for step in (lambda: p.flush(timeout_s), p.purge, lambda: p.flush(1)):
            try:
                step()
            except Exception:  # noqa: BLE001 - a fatal producer raises from every call
                pass
        for value, partition in list(self.outstanding.items()):
            self.h.record(type="info", f="send", process=self.process, topic=self.args.topic, value=value,
                          partition=partition, error=why)
        self.outstanding.clear()

    def run(self):
        p = Producer(self.conf())
        interval = 1.0 / self.args.rate
        next_t = time.monotonic()
        i = self.process
        while not self.stop.is_set():
            if self.fatal.is_set():
                # A fatal idempotence error makes the producer unusable: its queued
                # messages are purged (recorded as info) and a new producer (a new
                # producer id) takes over.
                self.drain(p, 1, "producer failed fatally; outcome unknown")
                p = Producer(self.conf())
                self.fatal.clear()
                self.recreated += 1
            if len(p) < IN_FLIGHT_MAX:
                self.send(p, i % self.args.partitions)
                i += 1
            next_t += interval
            try:
                p.poll(max(0.0, next_t - time.monotonic()))
            except Exception as e:  # noqa: BLE001 - librdkafka raises a fatal error from poll()
                print(f"producer {self.process}: {e}", file=sys.stderr, flush=True)
                self.fatal.set()
            if time.monotonic() - next_t > 1.0:
                next_t = time.monotonic()  # do not burst to catch up after a stall
        self.drain(p, CLIENT_STOP_TIMEOUT_S, "producer stopped before an answer; outcome unknown")


class TxnProducerWorker(ProducerWorker):
    """Mode txn: one transaction after another (see the module's doc)."""

    def conf(self):
        return {**super().conf(), "transactional.id": f"fault-txn-{self.args.seed}-{self.process}",
                "transaction.timeout.ms": TXN_TIMEOUT_MS}

    def txn_call(self, call):
        """Runs commit/abort, retrying a retriable failure. Returns None on success, else
        (the KafkaError, whether the transaction must be aborted)."""
        for attempt in range(TXN_CALL_ATTEMPTS):
            try:
                call(TXN_CALL_TIMEOUT_S)
                return None
            except KafkaException as e:
                err = e.args[0]
                if err.txn_requires_abort():
                    return err, True
                if not err.retriable() or attempt + 1 == TXN_CALL_ATTEMPTS:
                    return err, False

    def end(self, p, txn, abort):
        """Commits or aborts `txn` and records its outcome; True if the producer must be
        replaced (a fatal error, or an outcome left unknown)."""
        why = "abort chosen"
        if not abort:
            failed = self.txn_call(p.commit_transaction)
            if failed is None:
                self.h.record(type="ok", f="txn", process=self.process, txn=txn)
                return False
            err, requires_abort = failed
            if not requires_abort:
                self.h.record(type="info", f="txn", process=self.process, txn=txn,
                              error=f"commit failed: {err_text(err)}")
                return True
            why = f"commit failed, aborted: {err_text(err)}"
        failed = self.txn_call(p.abort_transaction)
        if failed is None:
            self.h.record(type="fail", f="txn", process=self.process, txn=txn, error=why)
            return False
        self.h.record(type="info", f="txn", process=self.process, txn=txn,
                      error=f"abort failed: {err_text(failed[0])}")
        return True

    def run(self):
        rng = random.Random(self.args.seed * 1000 + self.process)
        interval = 1.0 / self.args.rate
        txns = itertools.count()
        i = self.process
        p = None
        while not self.stop.is_set():
            if p is None:
                p = Producer(self.conf())
                try:
                    p.init_transactions(TXN_CALL_TIMEOUT_S)
                except KafkaException as e:
                    print(f"producer {self.process}: init_transactions: {e}", file=sys.stderr, flush=True)
                    p = None
                    time.sleep(1)
                    continue
            txn = self.process * TXN_STRIDE + next(txns)
            self.h.record(type="invoke", f="txn", process=self.process, txn=txn)
            replace = False
            try:
                p.begin_transaction()
                for _ in range(rng.randint(1, TXN_SENDS_MAX)):
                    self.send(p, i % self.args.partitions, txn)
                    i += 1
                    p.poll(interval)
                replace = self.end(p, txn, rng.random() < TXN_ABORT_FRACTION)
            except KafkaException as e:  # fatal: from begin_transaction, produce or poll
                self.h.record(type="info", f="txn", process=self.process, txn=txn, error=f"producer failed: {e}")
                replace = True
            if replace:
                # A new instance with the same transactional.id fences this one and aborts
                # its open transaction (unless its commit got through).
                self.drain(p, 1, "transactional producer replaced; outcome unknown")
                p = None
                self.recreated += 1
        if p is not None:
            self.drain(p, CLIENT_STOP_TIMEOUT_S, "producer stopped before an answer; outcome unknown")


def record_poll(h, process, msgs, f="poll"):
    records = []
    for m in msgs:
        err = m.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                h.record(type="info", f=f, process=process, error=err_text(err))
            continue
        records.append({"topic": m.topic(), "partition": m.partition(), "offset": m.offset(),
                        "value": int(m.value())})
    if records:
        h.record(type="ok", f=f, process=process, records=records)
    return records


class ConsumerWorker(threading.Thread):
    def __init__(self, process, args, history, stop, subscribe):
        super().__init__(daemon=True, name=f"consumer-{process}")
        self.process, self.args, self.h, self.stop, self.subscribe = process, args, history, stop, subscribe
        self.seen = 0

    def on_assign(self, consumer, parts):
        self.h.record(type="ok", f="rebalance", process=self.process, partitions=sorted(p.partition for p in parts))

    def on_revoke(self, consumer, parts):
        self.h.record(type="ok", f="rebalance", process=self.process, partitions=[])

    def run(self):
        group = f"fault-{'subscribe' if self.subscribe else 'assign'}-{self.args.seed}"
        c = Consumer({"bootstrap.servers": self.args.bootstrap, "group.id": group,
                      "auto.offset.reset": "earliest", "enable.auto.commit": self.subscribe,
                      "session.timeout.ms": 10000, "heartbeat.interval.ms": 1000,
                      "enable.partition.eof": False, "socket.connection.setup.timeout.ms": 3000,
                      "isolation.level": self.args.isolation})
        if self.subscribe:
            c.subscribe([self.args.topic], on_assign=self.on_assign, on_revoke=self.on_revoke,
                        on_lost=self.on_revoke)
        else:
            parts = list(range(self.args.partitions))
            c.assign([TopicPartition(self.args.topic, p, OFFSET_BEGINNING) for p in parts])
            self.h.record(type="ok", f="assign", process=self.process, partitions=parts)
        while not self.stop.is_set():
            msgs = c.consume(num_messages=POLL_BATCH_MAX, timeout=0.5)
            self.seen += len(record_poll(self.h, self.process, msgs))
        try:
            c.close()
        except Exception:  # noqa: BLE001 - a close during a fault may fail; the history is complete
            pass


def create_topic(args):
    admin = AdminClient({"bootstrap.servers": args.bootstrap, "socket.connection.setup.timeout.ms": 3000})
    # Only a replicated topic carries min.insync.replicas (1 is the default anyway).
    config = {"min.insync.replicas": str(args.min_insync)} if args.min_insync > 1 else {}
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    while True:
        fs = admin.create_topics([NewTopic(args.topic, args.partitions, args.replication_factor, config=config)],
                                 operation_timeout=20, request_timeout=20)
        try:
            fs[args.topic].result(timeout=30)
            break
        except Exception as e:  # noqa: BLE001 - the cluster may still be electing
            if "TOPIC_ALREADY_EXISTS" in str(e):
                break
            if "INVALID_CONFIG" in str(e) or "INVALID_REPLICATION_FACTOR" in str(e):
                raise
            if time.monotonic() > deadline:
                raise RuntimeError(f"create_topics failed for {SETUP_TIMEOUT_S}s: {e}")
            time.sleep(1)


def probe_all_partitions(args, h, timeout_s):
    """Sends one value to every partition until each is acknowledged; returns True if all
    were within timeout_s. The probes are sends like any other in the history."""
    p = Producer({"bootstrap.servers": args.bootstrap, **PRODUCER_BASE,
                  **MODES[PROBE_MODE.get(args.mode, args.mode)]})
    pending = set(range(args.partitions))
    deadline = time.monotonic() + timeout_s

    def cb(err, msg, value, part):
        if err is None:
            pending.discard(part)
            h.record(type="ok", f="send", process=PROBE_PROCESS, topic=args.topic, value=value,
                     partition=msg.partition(), offset=msg.offset())
        else:
            h.record(type="info", f="send", process=PROBE_PROCESS, topic=args.topic, value=value,
                     partition=part, error=err_text(err))

    while pending and time.monotonic() < deadline:
        for part in sorted(pending):
            value = PROBE_PROCESS * VALUE_STRIDE + next(PROBE_COUNTER)
            h.record(type="invoke", f="send", process=PROBE_PROCESS, topic=args.topic, value=value, partition=part)
            p.produce(args.topic, value=str(value).encode(), partition=part,
                      on_delivery=lambda err, msg, v=value, q=part: cb(err, msg, v, q))
        p.flush(min(11.0, max(0.5, deadline - time.monotonic())))
    p.purge()
    p.flush(1)
    return not pending


def final_read(args, h):
    """Reads every partition from the beginning to its high watermark, read_committed (the
    consumers' isolation). Returns (records, complete, high watermarks). The reader's
    position, not only the records it returned, says how far it got: aborted
    transactions and markers at the end of a partition are passed over, never returned."""
    common = {"bootstrap.servers": args.bootstrap, "group.id": f"fault-final-{args.seed}",
              "enable.auto.commit": False, "auto.offset.reset": "earliest", "enable.partition.eof": False}
    # The high watermark, not the last stable offset (what a read_committed client's
    # ListOffsets answers): an open transaction must end before the reads are complete.
    watermarks = Consumer({**common, "isolation.level": "read_uncommitted"})
    deadline = time.monotonic() + FINAL_READ_TIMEOUT_S
    highs = {}
    for part in range(args.partitions):
        while True:
            try:
                _, high = watermarks.get_watermark_offsets(TopicPartition(args.topic, part), timeout=5)
                highs[part] = high
                break
            except Exception:  # noqa: BLE001 - leader may still be moving
                if time.monotonic() > deadline:
                    watermarks.close()
                    return 0, False, highs
                time.sleep(0.5)
    watermarks.close()
    c = Consumer({**common, "isolation.level": "read_committed"})
    c.assign([TopicPartition(args.topic, p, OFFSET_BEGINNING) for p in range(args.partitions)])
    next_offset = {p: 0 for p in highs}
    total = 0
    while any(next_offset[p] < highs[p] for p in highs) and time.monotonic() < deadline:
        msgs = c.consume(num_messages=POLL_BATCH_MAX, timeout=0.5)
        for r in record_poll(h, FINAL_READER, msgs, f="final_read"):
            next_offset[r["partition"]] = max(next_offset[r["partition"]], r["offset"] + 1)
            total += 1
        for tp in c.position([TopicPartition(args.topic, p) for p in highs]):
            if tp.error is None and tp.offset >= 0:
                next_offset[tp.partition] = max(next_offset[tp.partition], tp.offset)
    complete = all(next_offset[p] >= highs[p] for p in highs)
    c.close()
    return total, complete, highs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--history", required=True)
    ap.add_argument("--t0", type=float, required=True, help="the harness's time.monotonic() at its start")
    ap.add_argument("--topic", default="fault")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--replication-factor", type=int, default=1)
    ap.add_argument("--min-insync", type=int, default=1)
    ap.add_argument("--producers", type=int, default=2)
    ap.add_argument("--rate", type=float, default=50.0, help="sends per second per producer")
    ap.add_argument("--mode", choices=sorted(MODES), default="all-idempotent")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--isolation", choices=("read_committed", "read_uncommitted"), default="read_committed",
                    help="the polling consumers' isolation.level (read_uncommitted in mode txn: aborted reads "
                         "the checker must report); the final reads are read_committed")
    args = ap.parse_args()

    h = History(args.history, args.t0)
    create_topic(args)
    if not probe_all_partitions(args, h, SETUP_TIMEOUT_S):
        print("NOT-READY", flush=True)
        h.close()
        return 3
    stop_producers, stop_consumers = threading.Event(), threading.Event()
    worker = TxnProducerWorker if args.mode == "txn" else ProducerWorker
    producers = [worker(10 + i, args, h, stop_producers) for i in range(args.producers)]
    consumers = [ConsumerWorker(1, args, h, stop_consumers, subscribe=False),
                 ConsumerWorker(2, args, h, stop_consumers, subscribe=True)]
    for w in producers + consumers:
        w.start()
    print("READY", flush=True)

    for line in sys.stdin:
        if line.strip() == "HEALED":
            break
    t = time.monotonic()
    recovered = probe_all_partitions(args, h, RECOVER_TIMEOUT_S)
    recover_ms = int((time.monotonic() - t) * 1000)
    print(f"{'RECOVERED' if recovered else 'NOT-RECOVERED'} {recover_ms}", flush=True)
    stop_producers.set()
    for w in producers:
        w.join(CLIENT_STOP_TIMEOUT_S + 5)
    # Consumers keep polling a moment so they see the last acknowledged sends.
    time.sleep(2)
    stop_consumers.set()
    for w in consumers:
        w.join(CLIENT_STOP_TIMEOUT_S)
    total, complete, highs = final_read(args, h) if recovered else (0, False, {})
    h.close()
    summary = {"recovered": recovered, "recover_ms": recover_ms, "final_read_records": total,
               "final_read_complete": complete, "high_watermarks": highs,
               "producer_recreated": sum(w.recreated for w in producers),
               "consumer_records": {w.process: w.seen for w in consumers}}
    print("DONE " + json.dumps(summary), flush=True)
    return 0 if recovered and complete else 4


if __name__ == "__main__":
    sys.exit(main())
