#!/usr/bin/env bash
# The journal's cost, in one run on one machine: three switchyard processes
# behind the same bank simulator, the same config but for the journal
# (none, fsync = "off", fsync = "batch"), loaded in turn by the same closed-loop
# load generator; then an open-loop run at half the batch switch's maximum rate.
# Not part of CI.
#
#   bash benches/journal.sh                   # defaults below
#   RUNS=5 DURATION=10 bash benches/journal.sh
#
# Prints throughput and latency (medians over RUNS alternating runs), the cost
# of each journal mode against none, and the open-loop latency at half rate.
# Everything listens on 127.0.0.1 only; journals go to the work directory.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
OUT=${OUT:-bench-out}
# 8 x 256 in flight: with fsync = "batch" a request waits for two syncs, and
# 8 x 64 left the machine 14% idle (latency-bound, not the durable maximum).
WINDOW=${WINDOW:-256}
unset JOURNAL
# shellcheck source=benches/setup.sh
source "$(dirname "$0")/setup.sh"
mkdir -p "$OUT"

# Two more switches: the same config with a journal, on the next ports.
start_switch() { # $1 = name, $2 = fsync mode, $3 = port offset
    local config="$WORK/switchyard-$1.toml"
    sed -e "s/127.0.0.1:$SWITCH_PORT/127.0.0.1:$((SWITCH_PORT + $3))/" \
        -e "s/^listen = \"127.0.0.1:${ADMIN_PORT:-19464}\"/listen = \"127.0.0.1:$((${ADMIN_PORT:-19464} + $3))\"/" \
        "$WORK/switchyard.toml" >"$config"
    printf '[journal]\ndir = "journal-%s"\nfsync = "%s"\n' "$1" "$2" >>"$config"
    "$BIN" run --config "$config" 2>"$WORK/switch-$1.log" &
    PIDS+=($!)
    for _ in $(seq 600); do
        (exec 3<>"/dev/tcp/127.0.0.1/$((SWITCH_PORT + $3))") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "switch $1 did not start" >&2
    tail -n 5 "$WORK/switch-$1.log" >&2
    exit 1
}
start_switch off off 1
start_switch batch batch 2
sleep 1 # bank links

load() { # port, then extra loadgen arguments
    local port=$1
    shift
    "$BIN" loadgen --target "127.0.0.1:$port" --certs-dir "$WORK/certs" \
        --institution 100001,100002 --destination 200001 --duration "$DURATION" \
        --warmup "$WARMUP" --json --no-progress "$@" 2>>"$WORK/loadgen.log"
}

declare -A PORT=([none]=$SWITCH_PORT [off]=$((SWITCH_PORT + 1)) [batch]=$((SWITCH_PORT + 2)))
for mode in none off batch; do : >"$WORK/$mode.runs"; done
for run in $(seq "$RUNS"); do
    for mode in none off batch; do
        sync # dirty journal pages of earlier runs are not written back during this one
        echo "run $run/$RUNS: journal $mode" >&2
        load "${PORT[$mode]}" --connections "$CONNECTIONS" --window "$WINDOW" >>"$WORK/$mode.runs"
    done
done

median() { # $1 = file, $2 = jq expression
    jq -s "[.[] | $2] | sort | .[(length - 1) / 2 | floor]" "$1"
}
none_tps=$(median "$WORK/none.runs" .tps)
row() { # $1 = mode
    local f="$WORK/$1.runs" tps
    tps=$(median "$f" .tps)
    printf '| %-16s | %10.0f | %8s | %8s | %9s | %6s | %5s%% |\n' "$1" "$tps" \
        "$(median "$f" .latency_us.p50)" "$(median "$f" .latency_us.p99)" \
        "$(median "$f" .latency_us.p999)" "$(jq -s 'map(.errors + .timeouts) | add' "$f")" \
        "$(jq -n --argjson a "$tps" --argjson b "$none_tps" '(1 - $a / $b) * 1000 | round / 10')"
}

batch_max=$(median "$WORK/batch.runs" '.tps | floor')
half=$((batch_max / 2))
sync
# A fresh batch switch, so that its stage histograms (since start) hold the
# open-loop run only.
start_switch batch-half batch 3
sleep 1 # bank links
echo "open loop at half of $batch_max = $half/s, journal batch" >&2
load "$((SWITCH_PORT + 3))" --connections "$CONNECTIONS" --window 4096 --rate "$half" \
    --hgrm "$OUT/journal-batch-half.hgrm" --plot "$OUT/journal-batch-half.svg" >"$WORK/half.json"
stages=$(curl -s "http://127.0.0.1:$((${ADMIN_PORT:-19464} + 3))/metrics" |
    sed -n 's/^switchyard_latency_us{connector="[^"]*",stage="\([a-z]*\)",quantile="\(0.5\|0.99\|0.999\)"} \([0-9]*\)$/\1 \2 \3/p')

echo
echo "$CONNECTIONS connections x $WINDOW in flight, ${DURATION}s per run after ${WARMUP}s warm-up," \
    "median of $RUNS alternating runs; $(nproc) cores: $(lscpu | sed -n 's/^Model name: *//p')"
echo
printf '| %-16s | %10s | %8s | %8s | %9s | %6s | %6s |\n' journal "payments/s" "p50 µs" "p99 µs" \
    "p99.9 µs" errors cost
printf '|%s|%s|%s|%s|%s|%s|%s|\n' "------------------" "------------" "----------" "----------" \
    "-----------" "--------" "--------"
row none
row off
row batch
echo
jq -n --argjson a "$(median "$WORK/batch.runs" .tps)" --argjson b "$(median "$WORK/off.runs" .tps)" \
    -r '"fsync = batch against fsync = off: \((1 - $a / $b) * 1000 | round / 10)% less throughput"'
jq -r '"open loop at \(.rate)/s (half of the batch maximum), fsync = batch: achieved \(.tps | floor)/s, p50 \(.latency_us.p50) µs, p99 \(.latency_us.p99) µs, p99.9 \(.latency_us.p999) µs, max \(.latency_us.max) µs, errors \(.errors + .timeouts)"' "$WORK/half.json"
for stage in switch journal bank total; do
    printf '  stage %-7s (µs) p50 / p99 / p99.9: %s\n' "$stage" \
        "$(for q in 0.5 0.99 0.999; do echo "$stages" | awk -v s="$stage" -v q="$q" '$1 == s && $2 == q {print $3}'; done | paste -sd/ | sed 's|/| / |g')"
done
for mode in none off batch; do
    echo "per-run payments/s, $mode: $(jq -c -s 'map(.tps | round)' "$WORK/$mode.runs")"
done
