#!/usr/bin/env bash
# End-to-end comparison, one run on one machine: the same load generator and the
# same bank simulator behind (a) switchyard and (b) HAProxy in TCP mode
# terminating and re-originating mutual TLS (a relay that does no parsing,
# routing or journaling). Not part of CI.
#
#   bash benches/e2e.sh                       # defaults below
#   RUNS=5 DURATION=10 CONNECTIONS=8 WINDOW=64 bash benches/e2e.sh
#   OTHER_BIN=/path/to/older/switchyard bash benches/e2e.sh   # a second build beside
#
# Prints a table of throughput and latency percentiles (medians over RUNS
# alternating runs) and the ratio switchyard / HAProxy. Everything listens on
# 127.0.0.1 only. Installs haproxy from Debian's packages when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
WITH_HAPROXY=1
# shellcheck source=benches/setup.sh
source "$(dirname "$0")/setup.sh"

# CPU time (user + system) of process $1 so far, in clock ticks.
ticks() {
    awk '{print $14 + $15}' "/proc/$1/stat"
}

load() { # $1 = port, $2 = pid of what serves it: one JSON line, with its CPU µs per payment
    local before after
    before=$(ticks "$2")
    "$BIN" loadgen --target "127.0.0.1:$1" --certs-dir "$WORK/certs" --institution 100001,100002 \
        --destination 200001 --connections "$CONNECTIONS" --window "$WINDOW" --duration "$DURATION" \
        --warmup "$WARMUP" --json --no-progress 2>>"$WORK/loadgen.log" >"$WORK/last.json"
    after=$(ticks "$2")
    # Ticks over the whole run (warm-up included) per payment answered in it.
    jq -c --argjson t "$((after - before))" --argjson hz "$(getconf CLK_TCK)" \
        --argjson secs "$((DURATION + WARMUP))" --argjson d "$DURATION" \
        '. + {cpu_us_per_payment: ($t / $hz * 1e6 / (.tps * $secs))}' "$WORK/last.json"
}

: >"$WORK/switchyard.runs"
: >"$WORK/other.runs"
: >"$WORK/haproxy.runs"
for run in $(seq "$RUNS"); do
    echo "run $run/$RUNS: switchyard" >&2
    load "$SWITCH_PORT" "$SWITCH_PID" >>"$WORK/switchyard.runs"
    if [ -n "$OTHER_BIN" ]; then
        echo "run $run/$RUNS: switchyard ($OTHER_BIN)" >&2
        load "$OTHER_PORT" "$OTHER_PID" >>"$WORK/other.runs"
    fi
    echo "run $run/$RUNS: haproxy" >&2
    load "$HAPROXY_PORT" "$HAPROXY_PID" >>"$WORK/haproxy.runs"
done

median() { # $1 = file, $2 = jq expression
    jq -s "[.[] | $2] | sort | .[(length - 1) / 2 | floor]" "$1"
}
row() { # $1 = name, $2 = file
    printf '| %-22s | %12s | %8s | %8s | %9s | %6s | %9s |\n' "$1" \
        "$(median "$2" .tps | xargs printf '%.0f')" "$(median "$2" .latency_us.p50)" \
        "$(median "$2" .latency_us.p99)" "$(median "$2" .latency_us.p999)" \
        "$(jq -s 'map(.errors + .timeouts) | add' "$2")" \
        "$(median "$2" .cpu_us_per_payment | xargs printf '%.2f')"
}

echo
echo "$CONNECTIONS connections x $WINDOW in flight, ${DURATION}s per run after ${WARMUP}s warm-up," \
    "median of $RUNS alternating runs; $(nproc) cores: $(lscpu | sed -n 's/^Model name: *//p')"
echo
printf '| %-22s | %12s | %8s | %8s | %9s | %6s | %9s |\n' path "payments/s" "p50 µs" "p99 µs" \
    "p99.9 µs" errors "CPU µs/p"
printf '|%s|%s|%s|%s|%s|%s|%s|\n' "------------------------" "--------------" "----------" \
    "----------" "-----------" "--------" "-----------"
row "switchyard" "$WORK/switchyard.runs"
if [ -n "$OTHER_BIN" ]; then row "switchyard (other)" "$WORK/other.runs"; fi
row "HAProxy (TCP, mTLS)" "$WORK/haproxy.runs"
ratio=$(jq -n --argjson a "$(median "$WORK/switchyard.runs" .tps)" \
    --argjson b "$(median "$WORK/haproxy.runs" .tps)" '$a / $b * 100 | round / 100')
echo
echo "throughput ratio switchyard / HAProxy: $ratio"
if [ -n "$OTHER_BIN" ]; then
    other=$(jq -n --argjson a "$(median "$WORK/switchyard.runs" .tps)" \
        --argjson b "$(median "$WORK/other.runs" .tps)" '$a / $b * 100 | round / 100')
    echo "throughput ratio switchyard / other ($OTHER_BIN): $other;" \
        "other per run $(jq -c -s 'map(.tps | round)' "$WORK/other.runs")"
fi
echo "per-run JSON: switchyard $(jq -c -s 'map(.tps | round)' "$WORK/switchyard.runs")," \
    "haproxy $(jq -c -s 'map(.tps | round)' "$WORK/haproxy.runs")"
