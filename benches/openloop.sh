#!/usr/bin/env bash
# Open-loop runs (latency from each request's intended send time, so queueing in
# the switch cannot hide: coordinated omission corrected). Not part of CI.
#
#   bash benches/openloop.sh
#
# 1. closed loop (8 connections x 64) to find the maximum rate;
# 2. open loop at 50% of that maximum over 8 connections;
# 3. a fixed 100,000 payments/s spread over 10, 1,000 and 10,000 connections.
# Writes HdrHistogram files and SVG plots to bench-out/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benches/setup.sh
source "$(dirname "$0")/setup.sh"
OUT=${OUT:-bench-out}
FIXED_RATE=${FIXED_RATE:-100000}
FIXED_CONNECTIONS=${FIXED_CONNECTIONS:-"10 1000 10000"}
mkdir -p "$OUT"

load() { # name, then extra loadgen arguments
    local name=$1
    shift
    "$BIN" loadgen --target "127.0.0.1:$SWITCH_PORT" --certs-dir "$WORK/certs" \
        --institution 100001,100002 --destination 200001 --duration "$DURATION" \
        --warmup "$WARMUP" --json --no-progress --hgrm "$OUT/$name.hgrm" \
        --plot "$OUT/$name.svg" "$@" 2>>"$WORK/loadgen.log" | tee "$OUT/$name.json"
}

echo "closed loop, $CONNECTIONS x $WINDOW" >&2
max=$(load closed --connections "$CONNECTIONS" --window "$WINDOW" | jq '.tps | floor')
half=$((max / 2))
echo "open loop at 50% of $max = $half/s over $CONNECTIONS connections" >&2
load "open-half" --connections "$CONNECTIONS" --window 4096 --rate "$half" >/dev/null
for n in $FIXED_CONNECTIONS; do
    echo "open loop at $FIXED_RATE/s over $n connections" >&2
    load "open-$FIXED_RATE-$n" --connections "$n" --window 1024 --rate "$FIXED_RATE" >/dev/null
done

echo
echo "$(nproc) cores: $(lscpu | sed -n 's/^Model name: *//p'); ${DURATION}s per run after ${WARMUP}s warm-up"
echo
printf '| %-28s | %10s | %10s | %8s | %8s | %9s | %8s | %6s |\n' run "asked/s" "achieved/s" \
    "p50 µs" "p99 µs" "p99.9 µs" "max µs" errors
printf '|%s|%s|%s|%s|%s|%s|%s|%s|\n' "------------------------------" "------------" \
    "------------" "----------" "----------" "-----------" "----------" "--------"
for f in "$OUT/closed.json" "$OUT/open-half.json" "$OUT"/open-"$FIXED_RATE"-*.json; do
    jq -r --arg name "$(basename "$f" .json)" '"| \($name) (\(.connections) conn) | \(.rate // "closed") | \(.tps | floor) | \(.latency_us.p50) | \(.latency_us.p99) | \(.latency_us.p999) | \(.latency_us.max) | \(.errors + .timeouts) |"' "$f"
done
echo
echo "plots and .hgrm files in $OUT/"
