"""The harness's own network namespace: loopback addresses, nftables rules, tc shaping.

Everything here acts only inside the namespace this module created (`ip netns add` with a
name unique to the run); nothing touches the host's interfaces, addresses or rules.
Deleting the namespace drops its nftables tables and qdiscs with it, but `close()` also
removes them explicitly first so a leak shows up as an error, not as silence.
"""
import os
import re
import secrets
import subprocess

# nftables table that carries every fault rule; one table, so `heal` is one delete.
NFT_TABLE = "ferrite_fault"
# Every ip/nft/tc command is bounded: a hung command must not hang the run.
COMMAND_TIMEOUT_S = 10
# Node addresses: 127.0.0.11, .12, ... (the topology). 240 nodes is far beyond use.
NODE_ADDR_BASE = 11
NODES_MAX = 200


class CommandError(RuntimeError):
    pass


def run(cmd, input_text=None, check=True):
    """Runs one command (a list), bounded; returns its stdout."""
    p = subprocess.run(cmd, input=input_text, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if check and p.returncode != 0:
        raise CommandError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def node_addr(index):
    """The loopback address of node `index` (0-based): 127.0.0.11 for node 0."""
    assert 0 <= index < NODES_MAX
    return f"127.0.0.{NODE_ADDR_BASE + index}"


class Namespace:
    """One network namespace with `lo` up and one /32 loopback address per node.

    With the /32 addresses, the kernel picks a connection's source address from the route
    to its destination (`local 127.0.0.12 ... src 127.0.0.12`), so a client connecting to
    node 2 leaves from 127.0.0.12 and no node-to-node rule (source one node, destination
    another) ever matches client traffic. A broker's own outgoing connections match the
    rules only if it binds them to its listen address (issue 10).
    """

    def __init__(self, nodes, name=None):
        assert 1 <= nodes <= NODES_MAX
        self.name = name or f"ferrite-fault-{os.getpid()}-{secrets.token_hex(3)}"
        self.addrs = [node_addr(i) for i in range(nodes)]
        self.created = False
        self.shaped = False

    # -- lifecycle --------------------------------------------------------------------
    def create(self):
        if self.name in self.list_names():
            raise CommandError(f"network namespace {self.name} already exists")
        run(["ip", "netns", "add", self.name])
        self.created = True
        run(["ip", "-n", self.name, "link", "set", "lo", "up"])
        for a in self.addrs:
            run(["ip", "-n", self.name, "addr", "add", f"{a}/32", "dev", "lo"])
        self.nft(f"add table ip {NFT_TABLE}\n"
                 f"add chain ip {NFT_TABLE} output {{ type filter hook output priority 0; policy accept; }}\n")
        return self

    def close(self):
        """Removes rules, qdiscs and the namespace. Safe to call twice; never raises."""
        if not self.created:
            return
        errors = []
        for cmd in (["nft", "delete", "table", "ip", NFT_TABLE],):
            try:
                run(self.exec_prefix() + cmd, check=False)
            except Exception as e:  # noqa: BLE001 - cleanup goes on
                errors.append(str(e))
        if self.shaped:
            try:
                self.unshape()
            except Exception as e:  # noqa: BLE001
                errors.append(str(e))
        try:
            run(["ip", "netns", "delete", self.name])
        except Exception as e:  # noqa: BLE001
            errors.append(str(e))
        self.created = False
        return errors

    @staticmethod
    def list_names():
        out = run(["ip", "netns", "list"], check=False)
        return {line.split()[0] for line in out.splitlines() if line.strip()}

    def exec_prefix(self):
        """The prefix that runs a command inside the namespace (`ip netns exec` execs it:
        the child's PID is the command's own, so signals by PID reach it)."""
        return ["ip", "netns", "exec", self.name]

    # -- nftables ------------------------------------------------------------------------
    def nft(self, script):
        return run(self.exec_prefix() + ["nft", "-f", "-"], input_text=script)

    def nft_rules(self):
        """The current rules of the fault chain, one string each (handles stripped)."""
        out = run(self.exec_prefix() + ["nft", "list", "chain", "ip", NFT_TABLE, "output"])
        rules = []
        for line in out.splitlines():
            line = line.strip()
            if not line or line.startswith(("table", "chain", "type", "}")):
                continue
            rules.append(line)
        return rules

    def add_rules(self, rules):
        """Adds rules (nft rule bodies) to the fault chain atomically."""
        if rules:
            self.nft("".join(f"add rule ip {NFT_TABLE} output {r}\n" for r in rules))

    def dropped_packets(self):
        """Packets dropped so far by the fault chain's rules (their counters)."""
        return sum(int(m) for m in re.findall(r"counter packets (\d+)", "\n".join(self.nft_rules())))

    def tcp_connections(self):
        """Established TCP connections in the namespace: (local, peer, pid) with local and
        peer as (address, port); pid None when `ss` names no process."""
        out = run(self.exec_prefix() + ["ss", "-Htnp", "state", "established"])
        conns = []
        for line in out.splitlines():
            fields = line.split()
            # Recv-Q Send-Q Local:Port Peer:Port [users:(("ferrite",pid=N,fd=M))]
            if len(fields) < 4:
                continue
            local, peer = fields[2].rsplit(":", 1), fields[3].rsplit(":", 1)
            m = re.search(r"pid=(\d+)", line)
            conns.append(((local[0], int(local[1])), (peer[0], int(peer[1])), int(m.group(1)) if m else None))
        return conns

    def flush_rules(self):
        self.nft(f"flush chain ip {NFT_TABLE} output\n")

    # -- tc: a slow link (tbf behind an htb class, selected by a u32 filter) ---------------
    def shape(self, src, dsts, rate="1mbit", burst="256kb", latency="500ms"):
        """Slows every packet from `src` to any of `dsts` to `rate` with a token bucket.

        This kernel has no netem; tbf works, and htb + u32 select the traffic (prio does
        not exist here). lo's segments reach 64 KiB, so the bucket must hold more than one.
        """
        x = self.exec_prefix()
        run(x + ["tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "10", "r2q", "100000"])
        self.shaped = True
        run(x + ["tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb", "rate", "100gbit"])
        run(x + ["tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:20", "htb", "rate", "100gbit"])
        run(x + ["tc", "qdisc", "add", "dev", "lo", "parent", "1:20", "handle", "20:", "tbf", "rate", rate,
                 "burst", burst, "latency", latency])
        for d in dsts:
            run(x + ["tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                     "match", "ip", "src", f"{src}/32", "match", "ip", "dst", f"{d}/32", "flowid", "1:20"])

    def unshape(self):
        run(self.exec_prefix() + ["tc", "qdisc", "del", "dev", "lo", "root"], check=False)
        self.shaped = False

    def qdiscs(self):
        return run(self.exec_prefix() + ["tc", "qdisc", "show", "dev", "lo"])
