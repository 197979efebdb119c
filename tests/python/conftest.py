"""Runs a real `ferrite server` per test: ephemeral port, temporary data dir, stopped by PID.

The binary comes from $FERRITE_BIN (default: <repo>/target/debug/ferrite). The server prints
one `ferrite ready: listening on HOST:PORT node_id=N` line on stdout when it serves; its
stderr (logs) goes to a file next to the data dir and its tail is printed when a test fails.
"""
import os
import queue
import re
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

    def __init__(self, data_dir, settings, log_path):
        self.data_dir = data_dir
        self.settings = list(settings)
        self.log_path = log_path
        self.proc = None
        self.addr = None
        self.starts = 0
        os.makedirs(data_dir, exist_ok=True)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, listen="127.0.0.1:0", timeout_s=READY_TIMEOUT_S):
        assert not self.alive(), "already running"
        cmd = [FERRITE_BIN, "server", "--listen", listen, "--data-dir", self.data_dir]
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

        def pump(stream):
            for line in stream:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, args=(self.proc.stdout,), daemon=True).start()
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
