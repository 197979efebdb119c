#!/usr/bin/env bash
# Two producer modes against each other, W1 and W2 shapes (BENCHMARKS.md), in the same
# run: the modes alternate (A, B, A, B, ...), each run on a fresh release broker in a
# temporary directory (stopped by PID), so that drift in the machine's speed hits both
# sides alike. Every mode uses acks=all, which librdkafka's idempotence and transactions
# require (one broker: acks=all waits for no follower). Prints each run's `ferrite bench`
# JSON and broker CPU, then per workload the medians, the median of the per-pair ratios
# B/A and, for transactional runs, the commit latency, with the load average before and
# after.
#   MODES="plain idempotent" bash scripts/bench-producer-modes.sh [RUNS] [W1 W2]
# Modes: plain, idempotent (issue 11), transactional (issue 12: idempotent with a commit
# every TXN_MS milliseconds, default 100).
# Env: MODES (default "plain idempotent"), TXN_MS, W1_COUNT (default 1000000 messages of
# 1 KiB), W2_COUNT (default 5000000 of 100 B), BENCH_BIN (default target/release/ferrite).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
modes=${MODES:-plain idempotent}
[ "$(echo "$modes" | wc -w)" = 2 ] || { echo "MODES names two modes" >&2; exit 2; }
shift || true
bin=${BENCH_BIN:-$PWD/target/release/ferrite}
[ -x "$bin" ] || cargo build --release -p ferrite --bin ferrite >/dev/null
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT

start() {
  rm -rf "$work/data" "$work/out"
  "$bin" server --listen 127.0.0.1:0 --data-dir "$work/data" --log-level warn > "$work/out" 2>/dev/null &
  pid=$!
  for _ in $(seq 1 2000); do grep -q "listening on" "$work/out" 2>/dev/null && break; sleep 0.01; done
  addr=$(grep -o 'listening on [^ ]*' "$work/out" | awk '{print $3}')
  [ -n "$addr" ] || { echo "broker did not start" >&2; exit 1; }
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=; }
cpu() { awk '{print ($14 + $15) / 100}' "/proc/$pid/stat"; }

results=$work/results
: > "$results"
common=(--partitions 6 --acks all --linger-ms 5 --batch-size 1048576 --compression none)
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for w in "${@:-W1 W2}"; do
  case $w in
    W1) shape=(--message-size 1024 --count "${W1_COUNT:-1000000}") ;;
    W2) shape=(--message-size 100 --count "${W2_COUNT:-5000000}" --producers 2) ;;
    *) echo "unknown workload $w" >&2; exit 2 ;;
  esac
  for run in $(seq 1 "$runs"); do
    for mode in $modes; do
      case $mode in
        plain) extra=() ;;
        idempotent) extra=(--idempotence) ;;
        transactional) extra=(--idempotence --transaction-ms "${TXN_MS:-100}") ;;
        *) echo "unknown mode $mode" >&2; exit 2 ;;
      esac
      start
      c0=$(cpu)
      out=$("$bin" bench produce --topic "$(echo "$w" | tr 'W' 'w')" "${shape[@]}" "${common[@]}" "${extra[@]}" \
        --bootstrap-server "$addr" --json)
      c1=$(cpu)
      stop
      line="$w $mode $run $out broker_cpu_s=$(echo "$c1 - $c0" | bc) load=$(cut -d' ' -f1 /proc/loadavg)"
      echo "$line"
      echo "$line" >> "$results"
    done
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$results" $modes <<'EOF'
import json, statistics, sys
a, b = sys.argv[2], sys.argv[3]
rows = {}
for line in open(sys.argv[1]):
    w, mode, run, rest = line.split(" ", 3)
    doc, tail = rest.rsplit("}", 1)
    d = json.loads(doc + "}")
    cpu = float(tail.split("broker_cpu_s=")[1].split()[0])
    rows.setdefault(w, {}).setdefault(int(run), {})[mode] = (d["msgs_per_sec"], d["mb_per_sec"], cpu / max(d["bytes"] / 1e9, 1e-9), d.get("commit_latency_ms"), d.get("transactions", 0))
for w, by_run in rows.items():
    pairs = [r for r in by_run.values() if a in r and b in r]
    med = lambda xs: statistics.median(xs)
    for mode in (a, b):
        msgs = [r[mode][0] for r in pairs]
        print(f"{w} {mode}: median {med(msgs):,.0f} msgs/s, {med([r[mode][1] for r in pairs]):,.1f} MB/s, "
              f"broker CPU {med([r[mode][2] for r in pairs]):.2f} s/GB; runs "
              + " / ".join(f"{m:,.0f}" for m in msgs))
        commits = [r[mode][3] for r in pairs if r[mode][3]]
        if commits:
            print(f"{w} {mode} commit latency ms (median over runs): p50 {med([c['p50'] for c in commits]):.1f}, "
                  f"p99 {med([c['p99'] for c in commits]):.1f}, max {max(c['max'] for c in commits):.1f}; "
                  f"transactions per run " + " / ".join(str(r[mode][4]) for r in pairs))
    ratios = [r[b][0] / r[a][0] for r in pairs]
    print(f"{w} {b}/{a}: median ratio {med(ratios):.3f}; pairs " + " / ".join(f"{x:.3f}" for x in ratios))
EOF
