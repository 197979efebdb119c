"""N `ferrite server` processes inside the harness's namespace, each on its own address.

Each node's data directory is its own small tmpfs (so the disk-full fault can fill it
without touching the host's disk); its log goes to a file beside it. Processes are
started with `ip netns exec` (which execs the server: the PID we hold is the server's) and
stopped by that PID only.
"""
import os
import queue
import re
import signal
import subprocess
import threading
import time

from netns import run

READY_TIMEOUT_S = 60
STOP_TIMEOUT_S = 15
BROKER_PORT = 9092
CONTROLLER_PORT = 9093
# The disk-full fault's filler is written in chunks of this size until ENOSPC.
FILL_CHUNK_BYTES = 1 << 20
# Broker settings for a fault run: small segments (the data dir is a small tmpfs) and a
# quick retention check; min.insync.replicas is set per topic by the workload.
DEFAULT_SETTINGS = ("log.segment.bytes=8388608", "log.retention.check.interval.ms=1000",
                    "group.initial.rebalance.delay.ms=200")
# With more than one node: a short broker session (heartbeat 500 ms, session 3 s), so a
# killed or cut leader is fenced and replaced within a fault's 2-6 s hold and a run
# exercises failover rather than waiting out Kafka's 9 s default. Not issue 8's 1.5 s W8
# setting: a debug build on two loaded cores misses 1.5 s sessions without any fault.
CLUSTER_SETTINGS = ("broker.heartbeat.interval.ms=500", "broker.session.timeout.ms=3000")


def voters_string(addrs):
    """controller.quorum.voters for the nodes: 1@127.0.0.11:9093,2@127.0.0.12:9093,..."""
    return ",".join(f"{i + 1}@{a}:{CONTROLLER_PORT}" for i, a in enumerate(addrs))


class Node:
    def __init__(self, index, ns, workdir, ferrite_bin, tmpfs_mb, settings=DEFAULT_SETTINGS):
        self.index = index
        self.node_id = index + 1
        self.ns = ns
        self.addr = ns.addrs[index]
        self.ferrite_bin = ferrite_bin
        self.mount = os.path.join(workdir, f"node{self.node_id}")
        self.data_dir = os.path.join(self.mount, "data")
        self.filler = os.path.join(self.mount, "filler")
        self.log_path = os.path.join(workdir, f"node{self.node_id}.log")
        self.tmpfs_mb = tmpfs_mb
        self.settings = list(settings)
        self.proc = None
        self.paused = False
        self.mounted = False
        self.starts = 0

    @property
    def bootstrap(self):
        return f"{self.addr}:{BROKER_PORT}"

    def mount_tmpfs(self):
        os.makedirs(self.mount, exist_ok=True)
        run(["mount", "-t", "tmpfs", "-o", f"size={self.tmpfs_mb}m,mode=0755", "tmpfs", self.mount])
        self.mounted = True
        os.makedirs(self.data_dir, exist_ok=True)

    def unmount(self):
        if self.mounted:
            run(["umount", self.mount], check=False)
            self.mounted = False

    def command(self):
        cmd = [self.ferrite_bin, "server", "--listen", self.bootstrap, "--data-dir", self.data_dir]
        if len(self.ns.addrs) > 1:
            # Issue 8's cluster flags: every node a combined broker+controller voter.
            cmd += ["--node-id", str(self.node_id), "--process-roles", "broker,controller",
                    "--controller-listen", f"{self.addr}:{CONTROLLER_PORT}",
                    "--controller-quorum-voters", voters_string(self.ns.addrs)]
            cmd += [x for s in CLUSTER_SETTINGS for x in ("--set", s)]
        for s in self.settings:
            cmd += ["--set", s]
        return cmd

    # -- lifecycle ------------------------------------------------------------------------
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait=True, timeout_s=READY_TIMEOUT_S):
        assert not self.alive(), f"node {self.node_id} already running"
        cmd = self.ns.exec_prefix() + self.command()
        env = dict(os.environ)
        env.setdefault("RUST_LOG", os.environ.get("FERRITE_FAULT_LOG", "info"))
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts} at {time.time():.3f}: {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                         env=env, text=True, start_new_session=True)
        self.paused = False
        # Each start has its own queue: the previous process's reader may still be
        # draining its pipe and must not tell this start that "the process exited".
        lines = self._lines = queue.Queue()
        proc = self.proc

        def pump():
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        if wait:
            self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s=READY_TIMEOUT_S):
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"node {self.node_id} not ready after {timeout_s}s\n{self.log_tail()}")
            try:
                line = self._lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                try:
                    code = self.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    code = "unknown (stdout closed, process still running)"
                raise RuntimeError(f"node {self.node_id} exited with {code} before it was ready\n{self.log_tail()}")
            if re.search(r"listening on (\S+)", line):
                return

    def signal(self, sig):
        if self.alive():
            os.kill(self.proc.pid, sig)

    def kill(self):
        """kill -9 by PID (a paused process dies too)."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT_S)
        self.paused = False

    def pause(self):
        self.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self):
        if self.paused:
            self.signal(signal.SIGCONT)
            self.paused = False

    def stop(self, timeout_s=STOP_TIMEOUT_S):
        """SIGTERM (after SIGCONT if paused); SIGKILL after timeout_s. Returns (exit code, graceful)."""
        if not self.alive():
            return (None if self.proc is None else self.proc.returncode), True
        self.resume()
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s), True
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode, False

    def restart_when_port_free(self, timeout_s=READY_TIMEOUT_S):
        """Starts again on the same data dir and address, retrying while the port is released."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.start(timeout_s=max(1.0, deadline - time.monotonic()))
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    # -- disk -----------------------------------------------------------------------------
    def fill_disk(self):
        """Writes a filler file until the tmpfs is full (ENOSPC). Returns bytes written."""
        written = 0
        chunk = b"\0" * FILL_CHUNK_BYTES
        try:
            with open(self.filler, "ab") as f:
                while True:
                    f.write(chunk)
                    f.flush()
                    written += len(chunk)
        except OSError:
            pass
        # The last partial chunk: fill the remaining bytes so the broker has none.
        try:
            with open(self.filler, "ab") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
                    written += 4096
        except OSError:
            pass
        return written

    def free_disk(self):
        try:
            os.unlink(self.filler)
        except FileNotFoundError:
            pass

    def cut_segment_tail(self, topic, partition, bytes_cut=4096):
        """The planted bug: cuts the tail off the partition's newest segment (node stopped)."""
        assert not self.alive()
        d = os.path.join(self.data_dir, f"{topic}-{partition}")
        logs = sorted(f for f in os.listdir(d) if f.endswith(".log"))
        if not logs:
            return f"no segment in {d}"
        path = os.path.join(d, logs[-1])
        size = os.path.getsize(path)
        new_size = max(0, size - bytes_cut) if size > 2 * bytes_cut else size // 2
        os.truncate(path, new_size)
        return f"{path} cut from {size} to {new_size} bytes"

    def log_tail(self, lines=30):
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""
