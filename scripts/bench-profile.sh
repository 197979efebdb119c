#!/usr/bin/env bash
# Where broker CPU goes: `perf record` on a release broker during W1 (produce 1 KiB)
# and W3 (consume it back), then the top symbols by self time, kernel included.
#   bash scripts/bench-profile.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$PWD/target/release/ferrite
[ -x "$bin" ] || cargo build --release -p ferrite >/dev/null
out=${1:-$(mktemp -d)}
mkdir -p "$out"
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT
"$bin" server --listen 127.0.0.1:0 --data-dir "$work/data" --log-level warn > "$work/out" 2>/dev/null &
pid=$!
for _ in $(seq 1 600); do grep -q "listening on" "$work/out" 2>/dev/null && break; sleep 0.005; done
addr=$(grep -o 'listening on [^ ]*' "$work/out" | awk '{print $3}')
common=(--partitions 6 --acks 1 --linger-ms 5 --batch-size 1048576 --compression none)
profile() {
  local name=$1; shift
  perf record -q -g -F 999 -p "$pid" -o "$out/$name.perf.data" 2>/dev/null &
  local perf=$!
  sleep 0.3
  "$bin" bench "$@" --json > "$out/$name.json"
  kill -INT "$perf"; wait "$perf" 2>/dev/null || true
  echo "== $name: top symbols by self time (broker process)"
  perf report -i "$out/$name.perf.data" --no-children --sort dso,symbol --stdio -g none 2>/dev/null \
    | grep -E "^ +[0-9]" | head -20 || true
}
profile produce-w1 produce --topic w1 --message-size 1024 --count 2000000 "${common[@]}" --bootstrap-server "$addr"
profile consume-w3 consume --topic w1 --bootstrap-server "$addr"
echo "perf data in $out"
