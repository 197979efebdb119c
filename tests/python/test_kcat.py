"""kcat against a real ferrite server."""
import shutil
import subprocess

import pytest

KCAT = shutil.which("kcat") or shutil.which("kafkacat")
pytestmark = pytest.mark.skipif(KCAT is None, reason="kcat is installed by scripts/install-test-deps.sh")


def kcat(*args, stdin=None, timeout=60):
    r = subprocess.run([KCAT, *args], input=stdin, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_produce_list_consume_and_group(broker):
    lines = "".join(f"k{i}:v{i}\n" for i in range(500))
    kcat("-b", broker.addr, "-P", "-t", "kc", "-K:", stdin=lines)
    listing = kcat("-b", broker.addr, "-L")
    assert 'topic "kc"' in listing
    out = kcat("-b", broker.addr, "-C", "-t", "kc", "-o", "beginning", "-e", "-q", "-f", "%k:%s\n")
    assert out == lines
    # As a group member: reads everything, then resumes from its commits.
    first = kcat("-b", broker.addr, "-G", "kcg", "kc", "-o", "beginning", "-e", "-q",
                 "-X", "enable.auto.commit=true", "-X", "auto.commit.interval.ms=100", "-f", "%s\n")
    assert len(first.splitlines()) == 500
    kcat("-b", broker.addr, "-P", "-t", "kc", "-K:", stdin="late:one\n")
    second = kcat("-b", broker.addr, "-G", "kcg", "kc", "-e", "-q", "-f", "%s\n")
    assert second.splitlines() == ["one"]
