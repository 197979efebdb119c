#!/usr/bin/env bash
# Produce and fetch throughput of one release broker with kcat (librdkafka), acks=1, and
# the broker's CPU seconds per GB and peak RSS from /proc. Usage:
#   bash scripts/bench-basic.sh MESSAGE_BYTES COUNT
# Prints one line per phase. The broker is started on an ephemeral port in a temporary
# data directory and stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-100}
count=${2:-1000000}
bin=target/release/ferrite
[ -x "$bin" ] || cargo build --release -p ferrite >/dev/null
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
python3 - "$size" "$count" > "$work/input" <<'PY'
import sys
size, count = int(sys.argv[1]), int(sys.argv[2])
line = ("x" * (size - 8))
for i in range(count):
    sys.stdout.write(f"{i:07d} {line}\n")
PY
"$bin" server --listen 127.0.0.1:0 --data-dir "$work/data" --log-level warn > "$work/out" 2>/dev/null &
pid=$!
for _ in $(seq 1 100); do grep -q "listening on" "$work/out" 2>/dev/null && break; sleep 0.1; done
addr=$(grep -o 'listening on [^ ]*' "$work/out" | awk '{print $3}')
cpu() { awk '{print ($14 + $15) / 100}' "/proc/$pid/stat"; }
hwm() { awk '/VmHWM/ {print $2 / 1024}' "/proc/$pid/status"; }
kcat -b "$addr" -L >/dev/null
"$bin" topic create bench --partitions 6 --bootstrap-server "$addr" >/dev/null
bytes=$((size * count))
c0=$(cpu); t0=$(date +%s.%N)
kcat -b "$addr" -P -t bench -l -X acks=1 -X linger.ms=5 -X batch.size=1048576 \
     -X queue.buffering.max.messages=1000000 -X enable.idempotence=false "$work/input"
t1=$(date +%s.%N); c1=$(cpu)
kcat -b "$addr" -C -t bench -o beginning -e -q -X fetch.max.bytes=52428800 > /dev/null
t2=$(date +%s.%N); c2=$(cpu)
python3 - "$size" "$count" "$bytes" "$t0" "$t1" "$t2" "$c0" "$c1" "$c2" "$(hwm)" <<'PY'
import sys
size, count, b = map(int, sys.argv[1:4])
t0, t1, t2, c0, c1, c2, hwm = map(float, sys.argv[4:11])
gb = b / 1e9
print(f"produce {size}B x {count}: {count/(t1-t0):,.0f} msgs/s {b/1e6/(t1-t0):,.1f} MB/s, broker {(c1-c0)/gb:.2f} CPU-s/GB")
print(f"fetch   {size}B x {count}: {count/(t2-t1):,.0f} msgs/s {b/1e6/(t2-t1):,.1f} MB/s, broker {(c2-c1)/gb:.2f} CPU-s/GB")
print(f"broker peak RSS {hwm:.0f} MiB")
PY
