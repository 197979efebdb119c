#!/usr/bin/env bash
# Issue 4's workloads W1-W6 with `ferrite bench` against one release broker. Each
# workload starts a fresh broker in a temporary directory (stopped by PID) and prints
# the bench JSON plus the broker's CPU seconds and peak RSS from /proc.
#   bash scripts/bench-workloads.sh [W1 W2 W3 W4 W6]
# Extra broker settings: BENCH_SERVER_SET="fetch.zero.copy.enable=false" (space-separated).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$PWD/target/release/ferrite
# The broker binary may differ from the client one, to compare brokers under one client.
server_bin=${BENCH_SERVER_BIN:-$bin}
[ -x "$bin" ] || cargo build --release -p ferrite >/dev/null
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT

start() {
  rm -rf "$work/data" "$work/out"
  local t0; t0=$(date +%s%N)
  local set=(); for kv in ${BENCH_SERVER_SET:-}; do set+=(--set "$kv"); done
  "$server_bin" server --listen 127.0.0.1:0 --data-dir "$work/data" --log-level warn "${set[@]}" "$@" > "$work/out" 2>/dev/null &
  pid=$!
  for _ in $(seq 1 600); do grep -q "listening on" "$work/out" 2>/dev/null && break; sleep 0.005; done
  ready_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  addr=$(grep -o 'listening on [^ ]*' "$work/out" | awk '{print $3}')
}
restart() {
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local t0; t0=$(date +%s%N)
  "$server_bin" server --listen "$addr" --data-dir "$work/data" --log-level warn > "$work/out" 2>/dev/null &
  pid=$!
  for _ in $(seq 1 6000); do grep -q "listening on" "$work/out" 2>/dev/null && break; sleep 0.005; done
  ready_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=; }
cpu() { awk '{print ($14 + $15) / 100}' "/proc/$pid/stat"; }
rss() { awk -v k="$1" '$1 == k":" {print $2 / 1024}' "/proc/$pid/status"; }
utime() { awk '{print $14 / 100}' "/proc/$pid/stat"; }
bench() { local c0 u0; c0=$(cpu); u0=$(utime); local out; out=$("$bin" bench "$@" --bootstrap-server "$addr" --json); echo "$out"; echo "broker_cpu_s=$(echo "$(cpu) - $c0" | bc) of_which_user_s=$(echo "$(utime) - $u0" | bc) peak_rss_mib=$(rss VmHWM)"; }

common=(--partitions 6 --acks 1 --linger-ms 5 --batch-size 1048576 --compression none)
for w in "${@:-W1 W2 W3 W4 W6}"; do
  case $w in
    W1) start; echo "W1 $(bench produce --topic w1 --message-size 1024 --count 2000000 "${common[@]}")"; stop ;;
    W2) start; echo "W2 $(bench produce --topic w2 --message-size 100 --count 10000000 "${common[@]}" --producers 2)"; stop ;;
    W3) start; bench produce --topic w3 --message-size 1024 --count 2000000 "${common[@]}" >/dev/null
        echo "W3 $(bench consume --topic w3)"; stop ;;
    W4) start; echo "W4-produce $(bench produce --topic w4 --message-size 1024 --rate 10000 --duration 20 --count 200000 --acks 1 --linger-ms 0 --partitions 6)"
        echo "W4-e2e $(bench e2e --topic w4e --message-size 1024 --rate 10000 --count 200000 --acks 1 --linger-ms 0 --partitions 6)"; stop ;;
    W6) start; echo "W6-empty ready_ms=$ready_ms idle_rss_mib=$(sleep 1; rss VmRSS)"
        for t in $(seq 0 9); do "$bin" topic create "w6-$t" --partitions 1000 --bootstrap-server "$addr" >/dev/null; done
        "$bin" bench produce --topic w6-0 --count 100000 --message-size 100 --bootstrap-server "$addr" --json >/dev/null
        for t in $(seq 1 9); do "$bin" bench produce --topic "w6-$t" --count 20000 --message-size 100 --keys random --bootstrap-server "$addr" --json >/dev/null; done
        restart; echo "W6-10k-partitions ready_ms=$ready_ms idle_rss_mib=$(sleep 2; rss VmRSS)"; stop ;;
  esac
done
