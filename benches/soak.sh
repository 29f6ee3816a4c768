#!/usr/bin/env bash
# Soak: `switchyard run` with the shipped durability (journal fsync = "batch",
# duplicates window 300 s, memory_max_bytes 2 GiB) at the durable maximum (a
# closed loop of CONNECTIONS x WINDOW requests in flight) for DURATION seconds
# (default 60; at least 60). Not part of CI.
#
#   bash benches/soak.sh                 # 60 s
#   DURATION=600 bash benches/soak.sh    # the README's 10-minute run
#   DUP_MEMORY_MAX_BYTES=67108864 bash benches/soak.sh   # a small table: early eviction
#
# Every 10 s it prints, from the switch's /metrics and /proc: answers per second
# over the interval, 91s in the interval (and why, from
# switchyard_connector_unavailable_total and the duplicates table's `full`),
# the duplicates table's keys, its effective window, its bytes per key and early
# evictions, and the switch's resident and peak memory. Then the load
# generator's summary. Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-60}
if [ "$DURATION" -lt 60 ]; then
    echo "DURATION must be at least 60 s" >&2
    exit 2
fi
INTERVAL_S=10
WARMUP=0
JOURNAL=${JOURNAL-batch}
DUP_WINDOW_S=${DUP_WINDOW_S:-300}
ADMIN_PORT=${ADMIN_PORT:-19464}
# shellcheck source=benches/setup.sh
source "$(dirname "$0")/setup.sh"

scrape() {
    curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics"
}
# Sum of the samples of metric $1 (any labels) whose label set matches $2.
total() { # $1 = metric, $2 = regex over the whole line; reads stdin
    awk -v m="$1" -v re="$2" '$1 ~ "^"m"({|$)" && $0 ~ re { s += $NF } END { printf "%.0f", s }'
}
kib() { # $1 = field of /proc/PID/status
    awk -v f="$1:" '$1 == f { print $2 }' "/proc/$SWITCH_PID/status"
}

"$BIN" loadgen --target "127.0.0.1:$SWITCH_PORT" --certs-dir "$WORK/certs" \
    --institution 100001,100002 --destination 200001 --connections "$CONNECTIONS" \
    --window "$WINDOW" --duration "$DURATION" --json --no-progress \
    2>"$WORK/loadgen.log" >"$WORK/loadgen.json" &
LOAD_PID=$!
PIDS+=($LOAD_PID)

echo "soak: journal fsync=$JOURNAL, window ${DUP_WINDOW_S}s," \
    "duplicates.memory_max_bytes=${DUP_MEMORY_MAX_BYTES:-2147483648}," \
    "$CONNECTIONS connections x $WINDOW in flight, ${DURATION}s;" \
    "$(nproc) cores: $(lscpu | sed -n 's/^Model name: *//p')"
printf '| %5s | %10s | %7s | %10s | %7s | %8s | %8s | %9s | %9s |\n' t_s answers/s 91s \
    keys window_s B/key evicted "RSS MiB" "peak MiB"
printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' -------  ------------ --------- ------------ \
    --------- ---------- ---------- ----------- -----------
before_answers=0
before_91=0
started=$(date +%s)
while kill -0 "$LOAD_PID" 2>/dev/null; do
    sleep "$INTERVAL_S"
    m=$(scrape) || continue
    answers=$(total switchyard_responses_total '' <<<"$m")
    n91=$(total switchyard_responses_total 'code="91"' <<<"$m")
    keys=$(total switchyard_duplicates_entries '' <<<"$m")
    bytes=$(total switchyard_duplicates_bytes '' <<<"$m")
    window=$(total switchyard_duplicates_window_seconds '' <<<"$m")
    evicted=$(total switchyard_duplicates_evicted_early_total '' <<<"$m")
    per_key=$([ "$keys" -gt 0 ] && echo $((bytes / keys)) || echo -)
    printf '| %5d | %10d | %7d | %10d | %7d | %8s | %8d | %9d | %9d |\n' \
        $(($(date +%s) - started)) $(((answers - before_answers) / INTERVAL_S)) \
        $((n91 - before_91)) "$keys" "$window" "$per_key" "$evicted" \
        $(($(kib VmRSS) / 1024)) $(($(kib VmHWM) / 1024))
    before_answers=$answers
    before_91=$n91
done
wait "$LOAD_PID" || true

m=$(scrape)
echo
echo "91s by reason: $(grep -E '^switchyard_connector_unavailable_total' <<<"$m" | tr '\n' ' ')" \
    "duplicates full: $(total switchyard_duplicates_total 'result="full"' <<<"$m")"
echo "switch peak RSS: $(($(kib VmHWM) / 1024)) MiB"
echo "loadgen: $(jq -c '{tps: (.tps | round), sent, errors, timeouts, codes, latency_us}' \
    "$WORK/loadgen.json")"
