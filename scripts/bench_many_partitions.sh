#!/bin/bash
# Many partitions on one broker (issue 14 item 3): creates a topic of N partitions, writes
# one small message to every partition, then reports the descriptors open, the clean
# shutdown time (SIGTERM to exit) and the start-up time on that directory (exec to the
# ready line). A benchmark, not a test: run it by hand and put the figures in BENCHMARKS.md.
# usage: scripts/bench_many_partitions.sh BIN PARTITIONS [--set key=value ...]
# Needs python3 with confluent-kafka (scripts/install-test-deps.sh).
set -u
BIN=$(realpath "$1"); N=$2; shift 2
EXTRA=("$@")
D=$(mktemp -d "${BENCH_DIR:-/var/tmp}/manyparts.XXXX")
trap 'kill -9 $PID 2>/dev/null; cp "$D/err" "${BENCH_LOG:-/dev/null}"; rm -rf "$D"' EXIT
echo "RLIMIT_NOFILE soft $(ulimit -Sn) hard $(ulimit -Hn); partitions $N; extra: ${EXTRA[*]:-none}"

start() { # $1: label
  : > "$D/out"
  local s; s=$(date +%s.%N)
  "$BIN" server --listen 127.0.0.1:0 --data-dir "$D/data" --set offsets.topic.num.partitions=1 \
    "${EXTRA[@]}" > "$D/out" 2>>"$D/err" &
  PID=$!
  for _ in $(seq 6000); do grep -q "ready" "$D/out" && break; sleep 0.05; done
  local e; e=$(date +%s.%N)
  ADDR=$(grep -o "listening on [0-9.:]*" "$D/out" | awk '{print $3}')
  echo "$1: ready in $(echo "$e - $s" | bc) s; descriptors open $(ls /proc/$PID/fd | wc -l)"
}
stop() { # $1: label
  sync; sleep 1
  local s; s=$(date +%s.%N); kill -TERM $PID; wait $PID; local rc=$?; local e; e=$(date +%s.%N)
  echo "$1: clean shutdown $(echo "$e - $s" | bc) s (exit $rc)"
}

start "first start"
# One CreateTopics takes at most 10,000 partitions: topics of at most 5,000 each.
s=$(date +%s.%N)
left=$N; t=0
while [ "$left" -gt 0 ]; do
  n=$(( left > 5000 ? 5000 : left ))
  timeout 1200 "$BIN" topic create "bench$t" --partitions "$n" --bootstrap-server "$ADDR" >/dev/null 2>>"$D/err" \
    || echo "topic create failed: $(tail -3 "$D/err")"
  left=$(( left - n )); t=$(( t + 1 ))
done
e=$(date +%s.%N)
echo "created $(ls "$D/data" | grep -c '^bench[0-9]*-') partition directories in $(echo "$e - $s" | bc) s; descriptors open $(ls /proc/$PID/fd | wc -l)"
s=$(date +%s.%N)
python3 - "$ADDR" "$N" <<'EOF'
import sys
from confluent_kafka import Producer
addr, n = sys.argv[1], int(sys.argv[2])
p = Producer({"bootstrap.servers": addr, "linger.ms": 50, "acks": 1})
errors = []
for i in range(n):
    while True:
        try:
            p.produce(f"bench{i // 5000}", value=b"x" * 100, partition=i % 5000,
                      on_delivery=lambda err, m: err and errors.append(err))
            break
        except BufferError:
            p.poll(0.1)
left = p.flush(600)
print(f"wrote one 100-byte message to each of {n} partitions: {left} undelivered, {len(errors)} errors")
EOF
e=$(date +%s.%N)
echo "write took $(echo "$e - $s" | bc) s; descriptors open $(ls /proc/$PID/fd | wc -l)"
grep -c " ERROR \| WARN " "$D/err" | sed 's/^/WARN+ERROR log lines: /'
stop "written partitions"
start "clean restart"
stop "idle restart"
du -sh "$D/data" | sed 's/^/data directory: /'
