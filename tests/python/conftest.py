"""Runs a real `ferrite server` per test: ephemeral port, temporary data dir, stopped by PID.

The binary comes from $FERRITE_BIN (default: <repo>/target/debug/ferrite). The server prints
one `ferrite ready: listening on HOST:PORT node_id=N` line on stdout when it serves; its
stderr (logs) goes to a file next to the data dir and its tail is printed when a test fails.
"""
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import pytest

from support import wait_until  # noqa: F401  (re-exported for tests that import it from here)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FERRITE_BIN = os.environ.get("FERRITE_BIN", os.path.join(REPO, "target", "debug", "ferrite"))
READY_TIMEOUT_S = 20
STOP_TIMEOUT_S = 10
# Broker settings every test gets unless it asks otherwise: fast retention checks, and
# no initial rebalance delay worth waiting for in group tests.
DEFAULT_SETTINGS = ("log.retention.check.interval.ms=200", "group.initial.rebalance.delay.ms=200")


class Broker:
    """One `ferrite server` process over one data dir; restartable on the same dir."""

    def __init__(self, data_dir, settings, log_path, args=()):
        self.data_dir = data_dir
        self.settings = list(settings)
        self.log_path = log_path
        # More `ferrite server` flags (a cluster node's --node-id, voters, ...).
        self.args = list(args)
        self.proc = None
        self.addr = None
        self.starts = 0
        self._lines = None
        os.makedirs(data_dir, exist_ok=True)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, listen="127.0.0.1:0", timeout_s=READY_TIMEOUT_S):
        self.spawn(listen)
        return self.wait_ready(timeout_s)

    def spawn(self, listen="127.0.0.1:0"):
        """Starts the process without waiting for its ready line (a cluster node is ready
        only once a majority of voters runs, so all are spawned before any is waited for)."""
        assert not self.alive(), "already running"
        cmd = [FERRITE_BIN, "server", "--listen", listen, "--data-dir", self.data_dir, *self.args]
        for s in self.settings:
            cmd += ["--set", s]
        env = dict(os.environ)
        env.setdefault("RUST_LOG", os.environ.get("FERRITE_TEST_LOG", "info"))
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"\n===== start #{self.starts}: {' '.join(cmd)}\n".encode())
        log.flush()
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                         env=env, text=True)
        finally:
            log.close()
        lines = queue.Queue()
        self._lines = lines

        def pump(stream):
            for line in stream:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, args=(self.proc.stdout,), daemon=True).start()
        return self

    def wait_ready(self, timeout_s=READY_TIMEOUT_S):
        """Waits for the ready line of the process spawn() started; returns self."""
        lines = self._lines
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise RuntimeError(f"ferrite server not ready after {timeout_s}s\n{self.log_tail()}")
            try:
                line = lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:  # stdout closed: the process exited
                self.proc.wait(STOP_TIMEOUT_S)
                raise RuntimeError(f"ferrite server exited with {self.proc.returncode} before it was ready\n"
                                   f"{self.log_tail()}")
            m = re.search(r"listening on (\S+)", line)
            if m:
                self.addr = m.group(1)
                return self

    def stop(self, timeout_s=STOP_TIMEOUT_S):
        """SIGTERM, then SIGKILL after timeout_s. Returns the exit code (None if not running)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)
            raise AssertionError(f"ferrite server (pid {self.proc.pid}) ignored SIGTERM for {timeout_s}s")

    def kill(self):
        """SIGKILL (kill -9) by PID, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)

    def restart(self, graceful=True, same_port=True):
        """Stops (SIGTERM, or SIGKILL if not graceful) and starts again on the same data dir,
        on the same port (retried for a few seconds while the port is released) or a new one."""
        if graceful:
            code = self.stop()
            assert code in (0, None), f"graceful stop exited with {code}\n{self.log_tail()}"
        else:
            self.kill()
        if not same_port:
            return self.start()
        deadline = time.monotonic() + 15
        while True:
            try:
                return self.start(self.addr)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    # -- state -------------------------------------------------------------------------
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self):
        return self.proc.pid

    @property
    def host_port(self):
        host, port = self.addr.rsplit(":", 1)
        return host, int(port)

    def partition_dir(self, topic, partition=0):
        return os.path.join(self.data_dir, f"{topic}-{partition}")

    def log_tail(self, n=60):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return "----- ferrite stderr (tail) -----\n" + "\n".join(lines[-n:])


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _teardown(brokers, request):
    failed = any(getattr(getattr(request.node, f"rep_{w}", None), "failed", False) for w in ("setup", "call"))
    problems = []
    for b in brokers:
        if failed:
            print(b.log_tail())
        if b.proc is None:
            continue
        try:
            code = b.stop()  # the exit code it already had if it was no longer running
        except AssertionError as e:
            problems.append(str(e))
            continue
        finally:
            b.kill()
        # 0: clean exit on SIGTERM; -9: the test killed it on purpose.
        if code not in (0, -signal.SIGKILL, None):
            problems.append(f"ferrite server pid {b.pid} exited with {code}\n{b.log_tail()}")
    if problems:
        raise AssertionError("\n".join(problems))


@pytest.fixture
def broker_factory(request):
    """make(*settings) starts a broker with exactly these --set settings (plus nothing else)."""
    brokers = []
    tmp = tempfile.TemporaryDirectory(prefix="ferrite-test-")

    def make(*settings):
        i = len(brokers)
        b = Broker(os.path.join(tmp.name, f"data{i}"), settings, os.path.join(tmp.name, f"server{i}.log"))
        brokers.append(b)
        return b.start()

    yield make
    try:
        _teardown(brokers, request)
    finally:
        tmp.cleanup()


@pytest.fixture
def broker(broker_factory):
    return broker_factory(*DEFAULT_SETTINGS)


# -- a cluster of real processes ----------------------------------------------------------
# A cluster node is killed and restarted on the ports its voters list names. Those ports are
# taken below the kernel's ephemeral range (ip_local_port_range): one from that range,
# free while its node is down, could be taken by any outgoing connection meanwhile.
_FIXED_PORT_LOWEST = 10_000
_fixed_port_next = [None]


def fixed_port():
    """A free loopback port below the ephemeral range, distinct within this test process."""
    import socket
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32_768
    span = ephemeral_low - _FIXED_PORT_LOWEST
    assert span > 2_000, f"ip_local_port_range starts at {ephemeral_low}: no room for fixed test ports"
    if _fixed_port_next[0] is None:
        _fixed_port_next[0] = (time.time_ns() ^ os.getpid()) % span
    for _ in range(span):
        port = _FIXED_PORT_LOWEST + _fixed_port_next[0] % span
        _fixed_port_next[0] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {_FIXED_PORT_LOWEST}..{ephemeral_low}")


# A cluster node's settings: Kafka's heartbeat and session shortened so that a killed
# node is fenced within seconds (a debug build on two busy cores needs more than W8's
# 1.5 s), and few offsets partitions so that groups load quickly.
CLUSTER_SETTINGS = DEFAULT_SETTINGS + ("broker.heartbeat.interval.ms=500", "broker.session.timeout.ms=4000",
                                       "offsets.topic.num.partitions=3")
CLUSTER_READY_TIMEOUT_S = 60


class Cluster:
    """Combined broker+controller nodes on 127.0.0.1, node ids 1..n, fixed ports."""

    def __init__(self, nodes):
        self.nodes = nodes

    @property
    def bootstrap(self):
        return ",".join(n.addr for n in self.nodes)

    @property
    def addr(self):
        """bootstrap.servers, so that support's client helpers take a cluster too."""
        return self.bootstrap

    def node(self, node_id):
        return self.nodes[node_id - 1]

    def restart(self, node_id):
        """Starts a stopped or killed node again on its ports and data dir."""
        n = self.node(node_id)
        assert not n.alive()
        return n.start(n.addr, timeout_s=CLUSTER_READY_TIMEOUT_S)


@pytest.fixture
def cluster_factory(request):
    """make(*settings, nodes=3) starts a cluster whose nodes all get these --set settings."""
    brokers = []
    tmp = tempfile.mkdtemp(prefix="ferrite-cluster-")

    def make(*settings, nodes=3):
        ports = [(fixed_port(), fixed_port()) for _ in range(nodes)]
        voters = ",".join(f"{i + 1}@127.0.0.1:{c}" for i, (_, c) in enumerate(ports))
        made = []
        for i, (kafka, controller) in enumerate(ports):
            args = ["--node-id", str(i + 1), "--process-roles", "broker,controller",
                    "--controller-listen", f"127.0.0.1:{controller}", "--controller-quorum-voters", voters]
            b = Broker(os.path.join(tmp, f"node{i + 1}"), settings,
                       os.path.join(tmp, f"node{i + 1}.log"), args=args)
            brokers.append(b)
            made.append(b)
            b.spawn(f"127.0.0.1:{kafka}")
        for b in made:
            b.wait_ready(CLUSTER_READY_TIMEOUT_S)
        return Cluster(made)

    yield make
    try:
        _teardown(brokers, request)
    finally:
        if os.environ.get("FERRITE_KEEP_TEST_DIRS") == "1":
            print(f"kept the cluster's data dirs and logs in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def cluster(cluster_factory):
    return cluster_factory(*CLUSTER_SETTINGS)
