"""Faults ("nemeses", as Jepsen calls them): a schedule drawn from a seed, and the rules.

A schedule is a list of `Fault(kind, targets, hold_s, gap_s)` drawn from
`random.Random(seed)` alone, so the same seed and the same options give the same faults
in the same order with the same holds (the cluster's reaction is not deterministic: real
processes, real time). Network faults are nftables rules in the harness's namespace;
`partition_rules` and friends are pure functions so they can be unit-checked.
"""
import dataclasses
import random
import re

# Process faults work with one node; network faults need peers to cut apart.
PROCESS_KINDS = ("kill", "pause", "disk-full", "rolling-restart", "slow-node")
NETWORK_KINDS = ("isolate-one", "isolate-leader", "minority-majority", "bridge", "ring", "one-way", "loss")
ALL_KINDS = PROCESS_KINDS + NETWORK_KINDS
# Not a fault but a planted bug, only when asked for by name: kill -9, then cut 4 KiB off
# the tail of partition 0's newest segment before the restart, losing acknowledged
# records. It proves the harness and checker catch a loss (test_nemesis.py).
PLANTED_KINDS = ("lose-tail",)
# Loss percentages drawn for the `loss` fault (nft numgen random).
LOSS_PERCENT_CHOICES = (10, 30, 50)


@dataclasses.dataclass
class Fault:
    kind: str
    # Node indexes the fault acts on (for partitions: the first component's members).
    targets: list
    hold_s: float
    gap_s: float
    # Extra parameters (loss percent, the ring's pairs...), JSON-serializable.
    params: dict = dataclasses.field(default_factory=dict)

    def describe(self, addrs):
        names = ",".join(str(t + 1) for t in self.targets)
        extra = "".join(f" {k}={v}" for k, v in sorted(self.params.items()) if k not in ("pairs", "role", "to", "sides"))
        if "sides" in self.params:
            extra += " cut " + " | ".join(",".join(str(t + 1) for t in side) for side in self.params["sides"])
        if "to" in self.params:
            extra += f" -> node {self.params['to'] + 1}"
        role = self.params.get("role", "any")
        who = "node" if role == "any" else f"{role} node"
        return f"{self.kind} {who} {names}{extra} ({self.hold_s:.1f}s)"


def applicable_kinds(nodes):
    """The fault kinds that mean something for `nodes` nodes."""
    kinds = list(PROCESS_KINDS)
    if nodes >= 2:
        kinds += ["isolate-one", "isolate-leader", "one-way", "loss"]
    if nodes >= 3:
        # The bridge is the ring's form for 3 or 4 nodes: two majorities that overlap in
        # one node (Jepsen's `bridge`), each side still reaching the bridge node.
        kinds += ["minority-majority", "bridge"]
    if nodes >= 5:
        # With 3 or 4 nodes a ring of overlapping majorities is no partition at all (3) or
        # just two cuts (4); it needs 5.
        kinds += ["ring"]
    return kinds


def schedule(seed, faults, nodes, kinds=None, hold_s=(2.0, 6.0), gap_s=(2.0, 5.0)):
    """`faults` faults for a cluster of `nodes`, drawn from `seed` only."""
    rng = random.Random(seed)
    allowed = [k for k in applicable_kinds(nodes) if kinds is None or k in kinds]
    allowed += [k for k in PLANTED_KINDS if kinds is not None and k in kinds]
    if not allowed:
        raise ValueError(f"no fault kind among {kinds} applies to {nodes} node(s)")
    out = []
    for _ in range(faults):
        kind = rng.choice(allowed)
        hold = round(rng.uniform(*hold_s), 2)
        gap = round(rng.uniform(*gap_s), 2)
        params = {}
        everyone = list(range(nodes))
        if kind in ("kill", "pause", "disk-full", "slow-node", "isolate-one", "isolate-leader", "loss", "lose-tail"):
            targets = [rng.choice(everyone)]
            if kind == "loss":
                params["percent"] = rng.choice(LOSS_PERCENT_CHOICES)
            if kind in ("kill", "pause"):
                # Whom kill -9 and SIGSTOP aim at, when the harness can find it (else the
                # drawn node): the active controller, a partition's leader, one of its
                # followers, anyone.
                r = rng.random()
                params["role"] = "controller" if r < 0.25 else "leader" if r < 0.5 else "follower" if r < 0.75 \
                    else "any"
        elif kind == "rolling-restart":
            targets = everyone[:]
            rng.shuffle(targets)
        elif kind == "minority-majority":
            size = rng.randint(1, (nodes - 1) // 2)
            targets = sorted(rng.sample(everyone, size))
        elif kind == "bridge":
            # targets: the bridge node first, then the two sides it joins (its majorities
            # are {bridge} + each side); the sides are cut from each other.
            order = everyone[:]
            rng.shuffle(order)
            bridge, rest = order[0], order[1:]
            half = len(rest) // 2
            targets = [bridge] + rest
            params["sides"] = [sorted(rest[:half]), sorted(rest[half:])]
        elif kind == "one-way":
            a, b = rng.sample(everyone, 2)
            targets = [a]
            params["to"] = b
        elif kind == "ring":
            order = everyone[:]
            rng.shuffle(order)
            targets = order
            params["pairs"] = ring_cut_pairs(order)
        else:
            raise AssertionError(kind)
        out.append(Fault(kind, targets, hold, gap, params))
    return out


def ring_cut_pairs(order):
    """Node pairs to cut so each node reaches only its two ring neighbours: every node sees a
    majority of 3 out of 5 (itself and two neighbours), and no two majorities are the same."""
    n = len(order)
    keep = set()
    for i, a in enumerate(order):
        for b in (order[(i + 1) % n], order[(i - 1) % n]):
            keep.add(frozenset((a, b)))
    return sorted([a, b] for a in range(n) for b in range(a + 1, n) if frozenset((a, b)) not in keep)


# -- nftables rule bodies (added to the harness's output chain) ----------------------------
# Every drop rule counts what it drops: a partition that dropped nothing between brokers
# means their connections did not leave from their own addresses, and the run says so.
def _set(addrs):
    return "{ " + ", ".join(addrs) + " }"


def cut_rules(side_a, side_b):
    """Drops every packet between the two address groups, both directions."""
    return [f"ip saddr {_set(side_a)} ip daddr {_set(side_b)} counter drop",
            f"ip saddr {_set(side_b)} ip daddr {_set(side_a)} counter drop"]


def partition_rules(components):
    """Rules that cut each component (a list of addresses) from every other."""
    rules = []
    for i, a in enumerate(components):
        for b in components[i + 1:]:
            rules += cut_rules(a, b)
    return rules


def one_way_rules(src, dst):
    """Drops packets from src to dst only: dst still reaches src, but hears no answer on the
    connections it opens, and src's own connections to dst carry nothing."""
    return [f"ip saddr {src} ip daddr {dst} counter drop"]


def loss_rules(node, others, percent):
    """Drops `percent`% of packets between `node` and the others, chosen by numgen random."""
    assert 0 < percent < 100
    return [f"ip saddr {node} ip daddr {_set(others)} numgen random mod 100 < {percent} counter drop",
            f"ip saddr {_set(others)} ip daddr {node} numgen random mod 100 < {percent} counter drop"]


def network_rules(fault, addrs):
    """The nftables rules of a network fault (for isolate-leader, `fault.targets` must
    already hold the leader)."""
    everyone = list(range(len(addrs)))
    a = [addrs[t] for t in fault.targets]
    rest = [addrs[i] for i in everyone if i not in fault.targets]
    if fault.kind in ("isolate-one", "isolate-leader", "minority-majority"):
        return partition_rules([a, rest])
    if fault.kind == "one-way":
        return one_way_rules(a[0], addrs[fault.params["to"]])
    if fault.kind == "loss":
        return loss_rules(a[0], rest, fault.params["percent"])
    if fault.kind == "bridge":
        side_a, side_b = ([addrs[t] for t in side] for side in fault.params["sides"])
        return cut_rules(side_a, side_b)
    if fault.kind == "ring":
        rules = []
        for x, y in fault.params["pairs"]:
            rules += cut_rules([addrs[x]], [addrs[y]])
        return rules
    raise ValueError(f"{fault.kind} is not a network fault")


# -- which traffic a cut dropped ------------------------------------------------------------
def split_by_port(rules, ports):
    """Each drop rule becomes one rule per (direction, port) in `ports` (a dict name -> port)
    plus the rule itself as the catch-all, so the counters tell how many packets of the
    brokers' replication (port 9092) and of the controllers' quorum RPC (port 9093) a cut
    dropped: a cut that dropped none of the controllers' packets did not cut the quorum."""
    out = []
    for r in rules:
        assert r.endswith(" counter drop"), r
        match = r[:-len(" counter drop")]
        for port in ports.values():
            out += [f"{match} tcp dport {port} counter drop", f"{match} tcp sport {port} counter drop"]
        out.append(r)
    return out


def dropped_by_port(listed_rules, ports):
    """Packets dropped per port name (and "other"), from the listed rules' counters."""
    out = {name: 0 for name in ports}
    out["other"] = 0
    for line in listed_rules:
        m = re.search(r"counter packets (\d+)", line)
        if not m:
            continue
        name = next((n for n, p in ports.items() if re.search(rf"tcp [sd]port {p}\b", line)), "other")
        out[name] += int(m.group(1))
    return out
