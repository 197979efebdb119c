"""Unit checks of the fault harness's pieces: the seeded schedule, the nftables rules of
every network fault (created in a real namespace, shown to cut real connections, then
removed), the tc slow link, and the report. The namespace tests need root."""
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nemesis  # noqa: E402
from netns import Namespace  # noqa: E402
from report import timelines, write_report  # noqa: E402

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="ip netns and nft need root")

# A TCP connect through a cut link is dropped (no RST), so it times out: short, bounded.
CONNECT_TIMEOUT_S = 1.0
PROBE = r"""
import socket, sys, json
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv.bind((dst, port)); srv.listen()
c = socket.socket(); c.bind((src, 0)); c.settimeout(%s)
try:
    c.connect((dst, port)); print("connected")
except OSError as e:
    print("cut")
""" % CONNECT_TIMEOUT_S


def connects(ns, src, dst, port=7001):
    out = subprocess.run(ns.exec_prefix() + [sys.executable, "-c", PROBE, src, dst, str(port)],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "connected"


def test_schedule_is_a_function_of_the_seed():
    a = nemesis.schedule(42, 30, 3)
    b = nemesis.schedule(42, 30, 3)
    c = nemesis.schedule(43, 30, 3)
    assert [vars(f) for f in a] == [vars(f) for f in b]
    assert [vars(f) for f in a] != [vars(f) for f in c]
    assert all(2.0 <= f.hold_s <= 6.0 and 2.0 <= f.gap_s <= 5.0 for f in a)


def test_one_node_gets_process_and_disk_faults_only():
    plan = nemesis.schedule(7, 200, 1)
    assert {f.kind for f in plan} == set(nemesis.PROCESS_KINDS)
    assert all(f.targets == [0] for f in plan if f.kind != "rolling-restart")
    with pytest.raises(ValueError):
        nemesis.schedule(7, 1, 1, kinds=["isolate-one"])


def test_three_nodes_draw_every_network_fault_but_the_ring():
    kinds = {f.kind for f in nemesis.schedule(1, 300, 3)}
    assert kinds == set(nemesis.ALL_KINDS) - {"ring"}
    minority = [f for f in nemesis.schedule(1, 300, 5) if f.kind == "minority-majority"]
    assert minority and all(1 <= len(f.targets) <= 2 for f in minority)


def test_ring_leaves_each_node_its_two_neighbours():
    order = [3, 0, 4, 1, 2]
    cut = nemesis.ring_cut_pairs(order)
    for node in range(5):
        reachable = {b for b in range(5) if b != node and sorted([node, b]) not in cut}
        i = order.index(node)
        assert reachable == {order[(i + 1) % 5], order[(i - 1) % 5]}


def test_bridge_cuts_the_two_sides_and_keeps_the_bridge():
    plan = [f for f in nemesis.schedule(5, 300, 3) if f.kind == "bridge"]
    assert plan
    addrs = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
    for f in plan:
        bridge, (a,), (b,) = f.targets[0], *f.params["sides"]
        assert {bridge, a, b} == {0, 1, 2}
        assert nemesis.network_rules(f, addrs) == nemesis.cut_rules([addrs[a]], [addrs[b]])
    five = [f for f in nemesis.schedule(5, 300, 5) if f.kind == "bridge"]
    assert five and all(len(s) == 2 for f in five for s in f.params["sides"])


def test_split_by_port_counts_each_listener_apart():
    ports = {"broker": 9092, "controller": 9093}
    rules = nemesis.split_by_port(["ip saddr 127.0.0.11 ip daddr 127.0.0.12 counter drop"], ports)
    assert rules[-1] == "ip saddr 127.0.0.11 ip daddr 127.0.0.12 counter drop" and len(rules) == 5
    assert "ip saddr 127.0.0.11 ip daddr 127.0.0.12 tcp dport 9093 counter drop" in rules
    listed = ["ip saddr 127.0.0.11 ip daddr 127.0.0.12 tcp dport 9092 counter packets 3 bytes 180 drop",
              "ip saddr 127.0.0.11 ip daddr 127.0.0.12 tcp sport 9093 counter packets 4 bytes 240 drop",
              "ip saddr 127.0.0.11 ip daddr 127.0.0.12 counter packets 1 bytes 60 drop"]
    assert nemesis.dropped_by_port(listed, ports) == {"broker": 3, "controller": 4, "other": 1}


def test_rules_name_the_right_addresses():
    addrs = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
    iso = nemesis.network_rules(nemesis.Fault("isolate-one", [1], 1, 1), addrs)
    assert iso == ["ip saddr { 127.0.0.12 } ip daddr { 127.0.0.11, 127.0.0.13 } counter drop",
                   "ip saddr { 127.0.0.11, 127.0.0.13 } ip daddr { 127.0.0.12 } counter drop"]
    one_way = nemesis.network_rules(nemesis.Fault("one-way", [0], 1, 1, {"to": 2}), addrs)
    assert one_way == ["ip saddr 127.0.0.11 ip daddr 127.0.0.13 counter drop"]
    loss = nemesis.network_rules(nemesis.Fault("loss", [2], 1, 1, {"percent": 30}), addrs)
    assert all("numgen random mod 100 < 30 counter drop" in r for r in loss) and len(loss) == 2


@needs_root
def test_namespace_is_created_and_removed():
    ns = Namespace(3).create()
    try:
        assert ns.name in Namespace.list_names()
        out = subprocess.run(["ip", "-n", ns.name, "addr", "show", "dev", "lo"], capture_output=True, text=True,
                             timeout=10).stdout
        for a in ns.addrs:
            assert f"inet {a}/32" in out
        assert ns.nft_rules() == []
    finally:
        ns.close()
    assert ns.name not in Namespace.list_names()


@needs_root
@pytest.mark.parametrize("kind,params,cut,kept", [
    # (source, destination) pairs by node index that must be cut / still connect.
    ("isolate-one", {}, [(0, 1), (1, 0), (0, 2), (2, 0)], [(1, 2), (2, 1)]),
    ("minority-majority", {}, [(0, 1), (2, 0)], [(1, 2)]),
    ("one-way", {"to": 1}, [(0, 1)], [(1, 2), (0, 2)]),
    ("bridge", {"sides": [[1], [2]]}, [(1, 2), (2, 1)], [(0, 1), (1, 0), (0, 2), (2, 0)]),
])
def test_partition_rules_cut_connections_and_heal(kind, params, cut, kept):
    ns = Namespace(3).create()
    try:
        addrs = ns.addrs
        assert connects(ns, addrs[0], addrs[1])
        fault = nemesis.Fault(kind, [0], 1, 1, params)
        rules = nemesis.split_by_port(nemesis.network_rules(fault, addrs), {"broker": 9092})
        ns.add_rules(rules)
        assert len(ns.nft_rules()) == len(rules)
        for port, (s, d) in enumerate(cut):
            assert not connects(ns, addrs[s], addrs[d], 7100 + port), f"{kind}: {s}->{d} still connects"
        for port, (s, d) in enumerate(kept):
            assert connects(ns, addrs[s], addrs[d], 7200 + port), f"{kind}: {s}->{d} cut"
        assert ns.dropped_packets() >= len(cut)  # each cut connect dropped at least its SYN
        # A client connecting to a node leaves from the node's own address: never cut.
        assert connects(ns, addrs[0], addrs[0], 7300)
        ns.flush_rules()
        assert ns.nft_rules() == []
        for port, (s, d) in enumerate(cut):
            assert connects(ns, addrs[s], addrs[d], 7400 + port)
    finally:
        ns.close()


@needs_root
def test_loss_and_ring_rules_load_and_flush():
    ns = Namespace(5).create()
    try:
        for fault in (nemesis.Fault("loss", [0], 1, 1, {"percent": 50}),
                      nemesis.Fault("ring", [0, 1, 2, 3, 4], 1, 1, {"pairs": nemesis.ring_cut_pairs([0, 1, 2, 3, 4])})):
            rules = nemesis.network_rules(fault, ns.addrs)
            ns.add_rules(rules)
            listed = ns.nft_rules()
            assert len(listed) == len(rules)
            if fault.kind == "ring":
                assert not connects(ns, ns.addrs[0], ns.addrs[2], 7500)
                assert connects(ns, ns.addrs[0], ns.addrs[1], 7501)
            else:
                assert all("numgen random mod 100 < 50" in r for r in listed)
            ns.flush_rules()
            assert ns.nft_rules() == []
    finally:
        ns.close()


HOLD = r"""
import socket, sys, time
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv.bind((dst, port)); srv.listen()
c = socket.socket(); c.bind((src, 0)); c.settimeout(2); c.connect((dst, port)); a, _ = srv.accept()
print("up", flush=True); sys.stdin.readline()
"""


@needs_root
def test_ss_names_each_connection_with_its_source_address_and_process():
    """The harness's source-address check reads `ss`: a connection bound to node 1's address
    shows as leaving from it, with the owning PID; an unbound one leaves from the peer's."""
    ns = Namespace(2).create()
    try:
        for bind_src, expected_src in ((ns.addrs[0], ns.addrs[0]), ("0.0.0.0", ns.addrs[1])):
            p = subprocess.Popen(ns.exec_prefix() + [sys.executable, "-c", HOLD, bind_src, ns.addrs[1], "7700"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                assert p.stdout.readline().strip() == "up"
                conns = ns.tcp_connections()
                out = [c for c in conns if c[1] == (ns.addrs[1], 7700)]
                assert len(out) == 1, conns
                assert out[0][0][0] == expected_src and out[0][2] == p.pid
            finally:
                p.communicate("\n", timeout=10)
    finally:
        ns.close()


@needs_root
def test_slow_link_qdisc_is_added_and_removed():
    ns = Namespace(2).create()
    try:
        ns.shape(ns.addrs[0], ns.addrs)
        q = ns.qdiscs()
        assert "htb 1:" in q and "tbf 20:" in q
        ns.unshape()
        assert "tbf" not in ns.qdiscs()
    finally:
        ns.close()
    assert ns.name not in Namespace.list_names()


def test_report_shades_fault_windows(tmp_path):
    h = tmp_path / "h.jsonl"
    ops = [
        {"type": "invoke", "f": "send", "process": 10, "time_ms": 0, "value": 1, "partition": 0},
        {"type": "ok", "f": "send", "process": 10, "time_ms": 5, "value": 1, "partition": 0, "offset": 0},
        {"type": "info", "f": "fault", "time_ms": 1000, "error": "start kill node 1 (2.0s)"},
        {"type": "invoke", "f": "send", "process": 10, "time_ms": 1500, "value": 2, "partition": 0},
        {"type": "info", "f": "send", "process": 10, "time_ms": 2500, "value": 2, "partition": 0, "error": "timeout"},
        {"type": "info", "f": "fault", "time_ms": 3000, "error": "heal kill node 1 (2.0s)"},
    ]
    h.write_text("".join(json.dumps(o) + "\n" for o in ops))
    buckets, latencies, faults, end_ms = timelines(str(h))
    assert faults == [(1000, 3000, "kill node 1 (2.0s)")]
    assert latencies == [(5, 5)] and buckets[0]["ok"] == 1 and buckets[2]["info"] == 1 and end_ms == 3000
    check = {"counts": {"lost-write": 0}, "sends": {"invoked": 2, "ok": 1, "fail": 0, "info": 1},
             "polls": {"ok": 0}, "fraction_ok": 0.5, "values_acknowledged": 1, "values_read": 1,
             "longest_unavailable": [], "anomalies": []}
    summary = {"seed": 5, "passed": True, "nodes": 1, "mode": "all-idempotent", "faults_injected": 1,
               "command": "run.py --seed 5"}
    out = tmp_path / "r.html"
    write_report(str(out), str(h), check, summary)
    doc = out.read_text()
    assert "<svg" in doc and 'fill="#f4b183"' in doc and "seed <b>5</b>" in doc


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FERRITE_BIN = os.environ.get("FERRITE_BIN", os.path.join(REPO, "target", "debug", "ferrite"))
CHECK_BIN = os.environ.get("FERRITE_CHECK_BIN", os.path.join(REPO, "target", "debug", "ferrite-check"))


@needs_root
@pytest.mark.skipif(not (os.access(FERRITE_BIN, os.X_OK) and os.access(CHECK_BIN, os.X_OK)),
                    reason="needs target/debug/ferrite and ferrite-check")
def test_harness_catches_a_planted_loss(tmp_path):
    """A planted bug (acknowledged records cut off a segment while the node is down) must
    fail the run with lost or unseen writes: the whole pipeline, end to end."""
    p = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py"),
                        "--nodes", "1", "--faults", "1", "--kinds", "lose-tail", "--seed", "3", "--warmup-s", "5",
                        "--out", str(tmp_path), "--python", sys.executable, "--ferrite-bin", FERRITE_BIN,
                        "--check-bin", CHECK_BIN], capture_output=True, text=True, timeout=400)
    assert p.returncode == 1, p.stdout + p.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    lost = summary["counts"]["lost-write"] + summary["counts"]["unseen"] + summary["counts"]["inconsistent-offsets"]
    assert lost > 0, summary
    assert "planted bug" in (tmp_path / "history.jsonl").read_text()


@needs_root
@pytest.mark.skipif(not os.access(FERRITE_BIN, os.X_OK), reason="needs target/debug/ferrite")
def test_harness_catches_aborted_reads(tmp_path):
    """The transactional mode's check, end to end: consumers that read_uncommitted (the
    planted bug) see records of aborted transactions, and the run must fail with
    aborted reads (G1a), while the committed ones are all read."""
    p = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py"),
                        "--nodes", "1", "--faults", "1", "--kinds", "pause", "--seed", "3", "--warmup-s", "5",
                        "--mode", "txn", "--consumer-isolation", "read_uncommitted",
                        "--out", str(tmp_path), "--python", sys.executable, "--ferrite-bin", FERRITE_BIN,
                        "--check-bin", CHECK_BIN], capture_output=True, text=True, timeout=400)
    assert p.returncode == 1, p.stdout + p.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["counts"]["aborted-read"] > 0, summary
    assert summary["transactions"]["fail"] > 0 and summary["transactions"]["ok"] > 0, summary
    other = {k: v for k, v in summary["counts"].items() if k not in ("aborted-read", "duplicate") and v}
    assert not other, summary


@needs_root
@pytest.mark.skipif(not os.access(FERRITE_BIN, os.X_OK), reason="needs target/debug/ferrite")
def test_three_nodes_talk_from_their_own_addresses_and_a_cut_drops_quorum_traffic(tmp_path):
    """Three real combined nodes in the namespace: every connection a node opens to another
    node leaves from its own address (so the address rules apply), and isolating a node
    drops the controllers' quorum traffic between it and the others."""
    import time

    from cluster import CONTROLLER_PORT, Node

    ns = Namespace(3).create()
    nodes = [Node(i, ns, str(tmp_path), FERRITE_BIN, 64) for i in range(3)]
    try:
        for n in nodes:
            n.mount_tmpfs()
        for n in nodes:
            n.start(wait=False)
        for n in nodes:
            n.wait_ready()
        by_pid = {n.proc.pid: n for n in nodes}
        outgoing = []
        deadline = time.monotonic() + 30
        # The quorum's leader connects to both followers; wait until it has.
        while len(outgoing) < 2 and time.monotonic() < deadline:
            outgoing = [(by_pid[pid], local, peer) for local, peer, pid in ns.tcp_connections()
                        if pid in by_pid and peer[1] == CONTROLLER_PORT and local[1] != CONTROLLER_PORT
                        and peer[0] != by_pid[pid].addr]
            time.sleep(0.2)
        assert len(outgoing) >= 2, ns.tcp_connections()
        for node, local, peer in outgoing:
            assert local[0] == node.addr, f"node {node.node_id} connects to {peer} from {local}"
        ports = {"controller": CONTROLLER_PORT}
        ns.add_rules(nemesis.split_by_port(nemesis.network_rules(nemesis.Fault("isolate-one", [2], 1, 1),
                                                                 ns.addrs), ports))
        time.sleep(2)  # Raft heartbeats every few hundred ms: some must hit the cut
        dropped = nemesis.dropped_by_port(ns.nft_rules(), ports)
        assert dropped["controller"] > 0, dropped
        ns.flush_rules()
    finally:
        for n in nodes:
            n.stop()
        ns.close()
        for n in nodes:
            n.unmount()
