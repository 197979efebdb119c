#!/bin/bash
# Times a clean shutdown (SIGTERM to exit) of a broker hosting N fresh partitions.
# usage: scripts/bench_shutdown.sh BIN PARTITIONS
BIN=$1; N=$2
D=$(mktemp -d /var/tmp/sdbench.XXXX)
$BIN server --listen 127.0.0.1:0 --data-dir $D/data --set offsets.topic.num.partitions=1 > $D/out 2>$D/err &
PID=$!
for i in $(seq 100); do grep -q "ready" $D/out && break; sleep 0.2; done
ADDR=$(grep -o "listening on [0-9.:]*" $D/out | awk '{print $3}')
timeout 600 $BIN topic create bench --partitions $N --bootstrap-server $ADDR >/dev/null 2>&1
ls $D/data | grep -c bench- 
sync; sleep 1
S=$(date +%s.%N); kill -TERM $PID; wait $PID; E=$(date +%s.%N)
echo "shutdown_seconds $(echo "$E - $S" | bc)"
rm -rf $D
