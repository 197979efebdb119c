"""Starts a real `ferrite server` per test on an ephemeral port, stopped by PID."""
import os
import queue
import re
import signal
import subprocess
import tempfile
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FERRITE_BIN = os.environ.get("FERRITE_BIN", os.path.join(REPO, "target", "debug", "ferrite"))
READY_TIMEOUT_S = 30
STOP_TIMEOUT_S = 20


class Broker:
    def __init__(self, data_dir, settings):
        self.data_dir = data_dir
        self.settings = list(settings)
        self.proc = None
        self.addr = None

    def start(self, listen="127.0.0.1:0"):
        cmd = [FERRITE_BIN, "server", "--listen", listen, "--data-dir", self.data_dir]
        for s in self.settings:
            cmd += ["--set", s]
        env = dict(os.environ, RUST_LOG="warn")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        lines = queue.Queue()

        def pump(stream):
            for line in stream:
                lines.put(line)

        threading.Thread(target=pump, args=(self.proc.stdout,), daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise RuntimeError("ferrite server did not become ready")
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                continue
            m = re.search(r"listening on (\S+)", line)
            if m:
                self.addr = m.group(1)
                return self

    def restart(self, graceful=True):
        self.stop() if graceful else self.kill()
        deadline = time.monotonic() + 10
        while True:
            try:
                return self.start(self.addr)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
                raise AssertionError("server did not stop on SIGTERM")
            assert self.proc.returncode == 0, f"server exited with {self.proc.returncode}"

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def broker_factory():
    brokers = []
    tmp = tempfile.TemporaryDirectory()

    def make(*settings):
        b = Broker(os.path.join(tmp.name, f"data{len(brokers)}"), settings).start()
        brokers.append(b)
        return b

    yield make
    for b in brokers:
        b.kill()
    tmp.cleanup()


@pytest.fixture
def broker(broker_factory):
    return broker_factory("group.initial.rebalance.delay.ms=200", "log.retention.check.interval.ms=200")


def wait_until(what, predicate, timeout_s=60, interval_s=0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
