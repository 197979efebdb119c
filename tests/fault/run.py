#!/usr/bin/env python3
"""The fault harness (issue 10): N `ferrite server` processes in a network namespace of
its own, a confluent-kafka workload beside them, faults drawn from a seed, and the
history checked by `ferrite-check`.

  python3 tests/fault/run.py --short                      # the test command's run
  python3 tests/fault/run.py --faults 100 --seed 7        # a long run

Run as root (ip netns, nft, tc, mount). Everything it creates (the namespace, its rules
and qdiscs, the tmpfs data dirs, the processes) is removed on exit, on an error, on
Ctrl-C and on SIGTERM; processes are stopped by PID. Exit status: 0 the run passed, 1 an
anomaly that fails a run, 3 the cluster did not come back after the faults healed, 2 the
harness itself failed. The report (report.html, summary.json, history.jsonl, node logs)
is left in --out (default: a new directory under /tmp).
"""
import argparse
import heapq
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import nemesis  # noqa: E402
from cluster import BROKER_PORT, CONTROLLER_PORT, Node  # noqa: E402
from netns import Namespace  # noqa: E402
from report import write_report  # noqa: E402

REPO = os.path.dirname(os.path.dirname(HERE))
WORKLOAD_READY_TIMEOUT_S = 180
WORKLOAD_DONE_TIMEOUT_S = 400
# Anomalies that do not fail an acks=1 run: with acks=1 the leader alone acknowledges, so
# a leader change can lose acknowledged writes by design (Kafka's documented trade-off).
ACKS1_TOLERATED = {"lost-write", "unseen"}
# The listeners whose traffic a cut's counters tell apart: the brokers' (clients and
# replica fetchers) and the controllers' (the metadata quorum's RPC, broker heartbeats).
PORTS = {"broker": BROKER_PORT, "controller": CONTROLLER_PORT}


class Harness:
    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.events = []  # fault lines of the history
        self.ns = None
        self.nodes = []
        self.workload = None
        self.workload_lines = []
        self.unexpected_exits = []
        self.fault_counts = Counter()
        self.network_drops = []  # packets each network fault dropped (nft counters)
        # Node-to-node connections seen with `ss` and whether each left from its node's own
        # address (without that, the nftables cuts between node addresses cut nothing).
        self.sources = {"checks": 0, "outgoing": 0, "from_own_address": 0, "violations": []}

    # -- history of the harness ("fault" lines) --------------------------------------------
    def event(self, text):
        t = int((time.monotonic() - self.t0) * 1000)
        self.events.append({"type": "info", "f": "fault", "process": -1, "time_ms": t, "error": text})
        print(f"[{t / 1000:7.1f}s] {text}", flush=True)

    # -- setup and teardown -------------------------------------------------------------------
    def setup(self):
        a = self.args
        self.ns = Namespace(a.nodes).create()
        print(f"namespace {self.ns.name}, nodes {', '.join(self.ns.addrs)}, workdir {a.out}", flush=True)
        for i in range(a.nodes):
            node = Node(i, self.ns, a.out, a.ferrite_bin, a.tmpfs_mb)
            self.nodes.append(node)
            node.mount_tmpfs()
        # Start every node before waiting for any: a quorum needs a majority up to elect.
        for node in self.nodes:
            node.start(wait=False)
        for node in self.nodes:
            node.wait_ready()
        self.event(f"cluster up: {a.nodes} node(s)")

    def cleanup(self):
        if self.workload is not None and self.workload.poll() is None:
            self.workload.kill()
            self.workload.wait(10)
        for node in self.nodes:
            try:
                node.stop()
            except Exception as e:  # noqa: BLE001 - cleanup goes on
                print(f"cleanup: node {node.node_id}: {e}", file=sys.stderr)
        if self.ns is not None:
            for err in self.ns.close() or []:
                print(f"cleanup: {err}", file=sys.stderr)
        for node in self.nodes:
            node.unmount()

    # -- the workload ---------------------------------------------------------------------------
    def start_workload(self):
        a = self.args
        rf = min(3, a.nodes)
        min_isr = 2 if rf >= 3 else 1
        self.bootstrap = ",".join(n.bootstrap for n in self.nodes)
        cmd = self.ns.exec_prefix() + [a.python, os.path.join(HERE, "workload.py"), "--bootstrap", self.bootstrap,
                                       "--history", os.path.join(a.out, "workload.jsonl"), "--t0", repr(self.t0),
                                       "--partitions", str(a.partitions), "--replication-factor", str(rf),
                                       "--min-insync", str(min_isr), "--producers", str(a.producers),
                                       "--rate", str(a.rate), "--mode", a.mode, "--seed", str(a.seed),
                                       "--isolation", a.consumer_isolation]
        self.workload_err = open(os.path.join(a.out, "workload.log"), "wb")
        self.workload = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.workload_err,
                                         text=True, start_new_session=True)
        self.lines = []
        self.line_cv = threading.Condition()

        def pump():
            for line in self.workload.stdout:
                with self.line_cv:
                    self.lines.append(line.strip())
                    self.line_cv.notify_all()
            with self.line_cv:
                self.lines.append(None)
                self.line_cv.notify_all()

        threading.Thread(target=pump, daemon=True).start()
        self.rf, self.min_isr = rf, min_isr

    def workload_log_tail(self, lines=5):
        try:
            with open(os.path.join(self.args.out, "workload.log"), "rb") as f:
                return b"".join(f.readlines()[-lines:]).decode(errors="replace").strip()
        except OSError:
            return ""

    def wait_line(self, prefixes, timeout_s):
        deadline = time.monotonic() + timeout_s
        with self.line_cv:
            while True:
                for line in self.lines:
                    if line is None:
                        raise RuntimeError(f"workload exited ({self.workload.wait(5)}) waiting for {prefixes}: "
                                           f"{self.workload_log_tail()}")
                    if line.startswith(prefixes):
                        self.lines.remove(line)
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"no {prefixes} from the workload after {timeout_s}s")
                self.line_cv.wait(left)

    def node_in_role(self, role, rng):
        """The index of a node holding `role` ("leader" or "follower" of a random partition,
        or the active "controller"), asked inside the namespace; None when unknown."""
        part = rng.randrange(self.args.partitions)
        cmd = self.ns.exec_prefix() + [self.args.python, os.path.join(HERE, "leader.py"), self.bootstrap, "fault",
                                       str(part)]
        try:
            roles = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout)
        except (subprocess.TimeoutExpired, ValueError):
            return None
        if role == "follower":
            followers = [r for r in roles["replicas"] if r != roles["leader"]]
            node_id = rng.choice(followers) if followers else None
        else:
            node_id = roles.get(role)
        if node_id is None:
            return None
        # One node runs with the default node id 0; a cluster's nodes are 1..N.
        index = node_id - 1 if self.args.nodes > 1 else 0
        return index if 0 <= index < len(self.nodes) else None

    def check_sources(self, when):
        """Every established connection a node opened to another node's broker or controller
        port must leave from the node's own address; records what `ss` shows."""
        if len(self.nodes) < 2:
            return
        by_pid = {n.proc.pid: n for n in self.nodes if n.alive()}
        listeners = set(PORTS.values())
        try:
            conns = self.ns.tcp_connections()
        except Exception as e:  # noqa: BLE001 - a failed look is recorded, not fatal
            self.event(f"ss failed ({when}): {e}")
            return
        self.sources["checks"] += 1
        for (laddr, lport), (paddr, pport), pid in conns:
            node = by_pid.get(pid)
            if node is None or pport not in listeners or lport in listeners:
                continue  # not a node's own outgoing connection
            if paddr not in self.ns.addrs or paddr == node.addr:
                continue  # to itself: no cut applies
            self.sources["outgoing"] += 1
            if laddr == node.addr:
                self.sources["from_own_address"] += 1
            elif len(self.sources["violations"]) < 20:
                self.sources["violations"].append(f"{when}: node {node.node_id} {laddr}:{lport} -> {paddr}:{pport}")
                self.event(f"node {node.node_id}'s connection to {paddr}:{pport} leaves from {laddr}, not "
                           f"{node.addr}: cuts between node addresses miss it")

    # -- faults ----------------------------------------------------------------------------------
    def check_nodes(self, expected_down=()):
        """Restarts any node that exited when no fault stopped it, and records it."""
        for node in self.nodes:
            if node.index in expected_down or node.alive():
                continue
            code = node.proc.returncode if node.proc else None
            self.unexpected_exits.append({"node": node.node_id, "code": code,
                                          "time_ms": int((time.monotonic() - self.t0) * 1000)})
            self.event(f"node {node.node_id} exited unexpectedly with code {code}; restarting it")
            node.restart_when_port_free()

    def apply(self, fault, rng):
        """Injects the fault, holds it, heals it."""
        kind = fault.kind
        role = "leader" if kind == "isolate-leader" else fault.params.get("role", "any")
        if role != "any":
            found = self.node_in_role(role, rng)
            if found is not None:
                fault.targets = [found]
            else:
                self.event(f"no {role} found for {kind}: the drawn node instead")
        desc = fault.describe(self.ns.addrs)
        node = self.nodes[fault.targets[0]]
        self.fault_counts[kind] += 1
        if kind == "rolling-restart":
            self.event(f"start {desc}")
            for i in fault.targets:
                n = self.nodes[i]
                code, graceful = n.stop()
                self.event(f"node {n.node_id} stopped by SIGTERM: exit {code}"
                           + ("" if graceful else " (ignored SIGTERM: killed)"))
                n.restart_when_port_free()
                self.event(f"node {n.node_id} restarted")
                time.sleep(fault.hold_s / len(fault.targets))
            self.event(f"heal {desc}")
            return
        self.event(f"start {desc}")
        expected_down = ()
        if kind == "kill":
            node.kill()
            expected_down = (node.index,)
        elif kind == "lose-tail":
            node.kill()
            expected_down = (node.index,)
            self.event(f"planted bug: {node.cut_segment_tail('fault', 0)}")
        elif kind == "pause":
            node.pause()
        elif kind == "disk-full":
            written = node.fill_disk()
            self.event(f"node {node.node_id} data dir filled ({written} bytes of filler)")
            expected_down = (node.index,)  # a broker may stop on a full disk, as Kafka's does
        elif kind == "slow-node":
            self.ns.shape(node.addr, self.ns.addrs)
        else:
            self.ns.add_rules(nemesis.split_by_port(nemesis.network_rules(fault, self.ns.addrs), PORTS))
        self.sleep_watching(fault.hold_s, expected_down)
        if kind in ("kill", "lose-tail"):
            node.restart_when_port_free()
        elif kind == "pause":
            node.resume()
        elif kind == "disk-full":
            node.free_disk()
            if not node.alive():
                self.event(f"node {node.node_id} exited on the full disk with code {node.proc.returncode}; restarting")
                node.restart_when_port_free()
        elif kind == "slow-node":
            self.ns.unshape()
        else:
            self.check_sources(desc)
            by_port = nemesis.dropped_by_port(self.ns.nft_rules(), PORTS)
            dropped = sum(by_port.values())
            self.ns.flush_rules()
            self.network_drops.append({"fault": desc, "dropped_packets": dropped, "by_port": by_port})
            self.event(f"{kind} dropped {by_port['controller']} controller, {by_port['broker']} broker, "
                       f"{by_port['other']} other packets")
            if dropped == 0:
                self.event(f"{kind} dropped no packet: do the brokers bind their outgoing connections "
                           "to their own addresses?")
        self.event(f"heal {desc}")

    def sleep_watching(self, seconds, expected_down=()):
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.5, left))
            if self.workload.poll() is not None:
                raise RuntimeError(f"workload exited with {self.workload.returncode} during the faults")
            self.check_nodes(expected_down)

    def heal_all(self):
        self.ns.flush_rules()
        self.ns.unshape()
        for node in self.nodes:
            node.free_disk()
            node.resume()
        self.check_nodes()

    # -- the run ------------------------------------------------------------------------------
    def run(self):
        a = self.args
        plan = nemesis.schedule(a.seed, a.faults, a.nodes, kinds=a.kinds, hold_s=(a.hold_min, a.hold_max),
                                gap_s=(a.gap_min, a.gap_max))
        rng = random.Random(a.seed ^ 0x5EED)  # leader choices; the plan's own rng stays untouched
        self.setup()
        self.start_workload()
        self.wait_line(("READY", "NOT-READY"), WORKLOAD_READY_TIMEOUT_S)
        self.event("workload running")
        self.check_sources("workload running")
        self.sleep_watching(a.warmup_s)
        for fault in plan:
            self.apply(fault, rng)
            self.sleep_watching(fault.gap_s)
        self.heal_all()
        self.event("all faults healed")
        self.workload.stdin.write("HEALED\n")
        self.workload.stdin.flush()
        recovered_line = self.wait_line(("RECOVERED", "NOT-RECOVERED"), WORKLOAD_DONE_TIMEOUT_S)
        self.event(recovered_line.lower())
        done = self.wait_line(("DONE",), WORKLOAD_DONE_TIMEOUT_S)
        self.workload.wait(30)
        workload_summary = json.loads(done[len("DONE "):])
        return plan, workload_summary

    def finish(self, plan, workload_summary):
        a = self.args
        history = os.path.join(a.out, "history.jsonl")
        with open(os.path.join(a.out, "workload.jsonl"), encoding="utf-8") as w, open(history, "w") as out:
            lines = (json.loads(line) for line in w if line.strip())
            # Both streams are in time order; the merge keeps each stream's own order.
            for op in heapq.merge(lines, iter(self.events), key=lambda op: op["time_ms"]):
                out.write(json.dumps(op, separators=(",", ":")) + "\n")
        p = subprocess.run([a.check_bin, "--json", history], capture_output=True, text=True, timeout=300)
        if p.returncode not in (0, 1):
            raise RuntimeError(f"ferrite-check exited {p.returncode}: {p.stderr}")
        check = json.loads(p.stdout)
        text = subprocess.run([a.check_bin, history], capture_output=True, text=True, timeout=300).stdout
        with open(os.path.join(a.out, "check.json"), "w") as f:
            f.write(p.stdout)
        failures = []
        for kind, count in sorted(check["counts"].items()):
            if count == 0 or kind == "duplicate":
                continue
            if a.mode == "one" and kind in ACKS1_TOLERATED:
                continue
            failures.append(f"{count} {kind}")
        if a.mode in ("all-idempotent", "txn") and check["counts"].get("duplicate", 0):
            failures.append(f"{check['counts']['duplicate']} duplicate with the idempotent producer")
        if self.sources["violations"]:
            failures.append(f"{len(self.sources['violations'])} node-to-node connections not from the node's own "
                            "address: the network faults did not cut what they claim")
        recovered = workload_summary["recovered"] and workload_summary["final_read_complete"]
        if not workload_summary["recovered"]:
            failures.append("cluster did not come back: no send acknowledged on every partition within the bound")
        elif not workload_summary["final_read_complete"]:
            failures.append("final read did not reach every partition's high watermark within the bound")
        longest = max(check["longest_unavailable"], key=lambda w: w["duration_ms"], default=None)
        summary = {
            "passed": not failures, "failures": failures, "seed": a.seed, "nodes": a.nodes, "mode": a.mode,
            "replication_factor": self.rf, "min_insync_replicas": self.min_isr, "partitions": a.partitions,
            "command": " ".join(shlex.quote(x) for x in a.argv), "faults_injected": sum(self.fault_counts.values()),
            "faults_by_kind": dict(sorted(self.fault_counts.items())), "plan": [f.describe(self.ns.addrs) for f in plan],
            "counts": check["counts"], "sends": check["sends"], "polls": check["polls"],
            "transactions": check.get("transactions"),
            "fraction_ok": check["fraction_ok"], "values_acknowledged": check["values_acknowledged"],
            "values_read": check["values_read"],
            "longest_unavailable_ms": longest["duration_ms"] if longest else None,
            "longest_unavailable_partition": longest["partition"] if longest else None,
            "duration_s": round(time.monotonic() - self.t0, 1),
            "sends_ok_per_s": round(check["sends"]["ok"] / max(1.0, time.monotonic() - self.t0), 1),
            "unexpected_exits": self.unexpected_exits, "network_drops": self.network_drops,
            "source_addresses": self.sources,
            "workload": workload_summary,
        }
        with open(os.path.join(a.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        write_report(os.path.join(a.out, "report.html"), history, check, summary)
        print(text, end="")
        print(json.dumps({k: summary[k] for k in ("passed", "failures", "seed", "faults_by_kind", "sends",
                                                  "transactions", "longest_unavailable_ms", "duration_s")}))
        print(f"report: {os.path.join(a.out, 'report.html')}")
        if not recovered:
            return 3
        return 0 if not failures else 1


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--faults", type=int, default=10)
    ap.add_argument("--seed", type=int, default=None, help="default: drawn and printed")
    ap.add_argument("--kinds", default=None, help=f"comma-separated subset of {','.join(nemesis.ALL_KINDS)} "
                                                  f"(or the planted bug {','.join(nemesis.PLANTED_KINDS)})")
    ap.add_argument("--hold-min", type=float, default=2.0)
    ap.add_argument("--hold-max", type=float, default=6.0)
    ap.add_argument("--gap-min", type=float, default=2.0)
    ap.add_argument("--gap-max", type=float, default=5.0)
    ap.add_argument("--warmup-s", type=float, default=3.0)
    ap.add_argument("--mode", choices=("all-idempotent", "all", "one", "txn"), default="all-idempotent")
    ap.add_argument("--consumer-isolation", choices=("read_committed", "read_uncommitted"),
                    default="read_committed",
                    help="the polling consumers' isolation.level; read_uncommitted with --mode txn is a planted "
                         "bug: its reads of aborted transactions must fail the run")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--producers", type=int, default=2)
    ap.add_argument("--rate", type=float, default=50.0, help="sends per second per producer")
    ap.add_argument("--tmpfs-mb", type=int, default=256, help="size of each node's data dir (a tmpfs)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--ferrite-bin", default=os.environ.get("FERRITE_BIN", os.path.join(REPO, "target/debug/ferrite")))
    ap.add_argument("--check-bin", default=os.environ.get("FERRITE_CHECK_BIN",
                                                          os.path.join(REPO, "target/debug/ferrite-check")))
    ap.add_argument("--python", default=os.environ.get("FAULT_PYTHON", os.path.join(REPO, ".venv/bin/python")))
    ap.add_argument("--short", action="store_true",
                    help="the test command's bounded run: 12 faults held 2-4 s (about 2 minutes)")
    a = ap.parse_args(argv)
    a.argv = ["tests/fault/run.py"] + list(argv)
    if a.short:
        a.faults, a.hold_min, a.hold_max, a.gap_min, a.gap_max = 12, 2.0, 4.0, 2.0, 4.0
        if a.seed is None:
            a.seed = 20261201
    if a.seed is None:
        a.seed = random.SystemRandom().randrange(1 << 31)
        a.argv += ["--seed", str(a.seed)]
    a.kinds = None if a.kinds is None else [k.strip() for k in a.kinds.split(",") if k.strip()]
    a.out = a.out or tempfile.mkdtemp(prefix=f"ferrite-fault-{a.seed}-")
    os.makedirs(a.out, exist_ok=True)
    return a


def main(argv):
    a = parse_args(argv)
    if os.geteuid() != 0:
        print("the fault harness needs root (ip netns, nft, tc, mount)", file=sys.stderr)
        return 2
    for path in (a.ferrite_bin, a.check_bin, a.python):
        if not os.access(path, os.X_OK):
            print(f"not found or not executable: {path}", file=sys.stderr)
            return 2
    print(f"fault run: seed {a.seed}, {a.nodes} node(s), {a.faults} faults, mode {a.mode}", flush=True)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    h = Harness(a)
    try:
        plan, workload_summary = h.run()
    except (Exception, KeyboardInterrupt, SystemExit) as e:
        h.cleanup()
        traceback.print_exc()
        print(f"fault run (seed {a.seed}) failed: {e!r}; logs in {a.out}", file=sys.stderr)
        for node in h.nodes:
            print(f"--- node {node.node_id} log tail\n{node.log_tail()}", file=sys.stderr)
        return e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 2
    try:
        h.cleanup()
        return h.finish(plan, workload_summary)
    finally:
        h.cleanup()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
