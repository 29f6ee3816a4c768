#!/usr/bin/env bash
# End-to-end comparison, one run on one machine: the same load generator and the
# same bank simulator behind (a) switchyard and (b) HAProxy in TCP mode
# terminating and re-originating mutual TLS (a relay that does no parsing,
# routing or journaling). Not part of CI.
#
#   bash benches/e2e.sh                       # defaults below
#   RUNS=5 DURATION=10 CONNECTIONS=8 WINDOW=64 bash benches/e2e.sh
#
# Prints a table of throughput and latency percentiles (medians over RUNS
# alternating runs) and the ratio switchyard / HAProxy. Everything listens on
# 127.0.0.1 only. Installs haproxy from Debian's packages when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNECTIONS=${CONNECTIONS:-8}
WINDOW=${WINDOW:-64}
LINKS=${LINKS:-2}
BANK_PORT=${BANK_PORT:-19101}
SWITCH_PORT=${SWITCH_PORT:-18583}
HAPROXY_PORT=${HAPROXY_PORT:-18584}

if ! command -v haproxy >/dev/null; then
    echo "installing haproxy (Debian package)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy) >&2
fi
if ! command -v jq >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq) >&2
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FD_LIMIT=$(ulimit -n)

cargo build --release --quiet
BIN=$PWD/target/release/switchyard
WORK=$(mktemp -d /tmp/switchyard-e2e.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT

# --- certificates and configs ------------------------------------------------
cat >"$WORK/switchyard.toml" <<TOML
[switch]
listen = "127.0.0.1:$SWITCH_PORT"
worker_threads = 2
[tls]
ca_file = "certs/ca.pem"
cert_file = "certs/switch.pem"
key_file = "certs/switch.key"
client_cert_file = "certs/switch-client.pem"
client_key_file = "certs/switch-client.key"
[limits]
connections_max = 20000
[[institution]]
id = "100001"
[[institution]]
id = "100002"
[[bank]]
id = "200001"
address = "127.0.0.1:$BANK_PORT"
server_name = "bank-200001"
links = $LINKS
[[route]]
pan_prefix = "4"
bank = "200001"
TOML
"$BIN" gen-certs --config "$WORK/switchyard.toml" --out "$WORK/certs" >&2
cat "$WORK/certs/switch.pem" "$WORK/certs/switch.key" >"$WORK/haproxy-front.pem"
cat "$WORK/certs/switch-client.pem" "$WORK/certs/switch-client.key" >"$WORK/haproxy-back.pem"
cat >"$WORK/haproxy.cfg" <<CFG
global
    maxconn $(( (FD_LIMIT - 100) / 2 ))
    nbthread 2
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend acquirers
    bind 127.0.0.1:$HAPROXY_PORT ssl crt $WORK/haproxy-front.pem ca-file $WORK/certs/ca.pem verify required
    default_backend bank
backend bank
    server bank1 127.0.0.1:$BANK_PORT ssl crt $WORK/haproxy-back.pem ca-file $WORK/certs/ca.pem verify required sni str(bank-200001) verifyhost bank-200001
CFG

# --- the bank, the switch, the relay ------------------------------------------
"$BIN" bank-sim --listen "127.0.0.1:$BANK_PORT" --certs-dir "$WORK/certs" --name bank-200001 \
    2>"$WORK/bank.log" &
PIDS+=($!)
"$BIN" run --config "$WORK/switchyard.toml" 2>"$WORK/switch.log" &
PIDS+=($!)
haproxy -f "$WORK/haproxy.cfg" 2>"$WORK/haproxy.log" &
PIDS+=($!)
for port in "$BANK_PORT" "$SWITCH_PORT" "$HAPROXY_PORT"; do
    up=""
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && up=1 && break
        sleep 0.1
    done
    if [ -z "$up" ]; then
        echo "nothing listens on 127.0.0.1:$port; logs:" >&2
        tail -n 5 "$WORK"/*.log >&2
        exit 1
    fi
done
sleep 1 # the switch's bank links connect after its listener opens

load() { # $1 = port
    "$BIN" loadgen --target "127.0.0.1:$1" --certs-dir "$WORK/certs" --institution 100001,100002 \
        --destination 200001 --connections "$CONNECTIONS" --window "$WINDOW" --duration "$DURATION" \
        --warmup "$WARMUP" --json --no-progress 2>>"$WORK/loadgen.log"
}

: >"$WORK/switchyard.runs"
: >"$WORK/haproxy.runs"
for run in $(seq "$RUNS"); do
    echo "run $run/$RUNS: switchyard" >&2
    load "$SWITCH_PORT" >>"$WORK/switchyard.runs"
    echo "run $run/$RUNS: haproxy" >&2
    load "$HAPROXY_PORT" >>"$WORK/haproxy.runs"
done

median() { # $1 = file, $2 = jq expression
    jq -s "[.[] | $2] | sort | .[(length - 1) / 2 | floor]" "$1"
}
row() { # $1 = name, $2 = file
    printf '| %-22s | %12s | %8s | %8s | %9s | %6s |\n' "$1" \
        "$(median "$2" .tps | xargs printf '%.0f')" "$(median "$2" .latency_us.p50)" \
        "$(median "$2" .latency_us.p99)" "$(median "$2" .latency_us.p999)" \
        "$(jq -s 'map(.errors + .timeouts) | add' "$2")"
}

echo
echo "$CONNECTIONS connections x $WINDOW in flight, ${DURATION}s per run after ${WARMUP}s warm-up," \
    "median of $RUNS alternating runs; $(nproc) cores: $(lscpu | sed -n 's/^Model name: *//p')"
echo
printf '| %-22s | %12s | %8s | %8s | %9s | %6s |\n' path "payments/s" "p50 µs" "p99 µs" "p99.9 µs" errors
printf '|%s|%s|%s|%s|%s|%s|\n' "------------------------" "--------------" "----------" \
    "----------" "-----------" "--------"
row "switchyard" "$WORK/switchyard.runs"
row "HAProxy (TCP, mTLS)" "$WORK/haproxy.runs"
ratio=$(jq -n --argjson a "$(median "$WORK/switchyard.runs" .tps)" \
    --argjson b "$(median "$WORK/haproxy.runs" .tps)" '$a / $b * 100 | round / 100')
echo
echo "throughput ratio switchyard / HAProxy: $ratio"
echo "per-run JSON: switchyard $(jq -c -s 'map(.tps | round)' "$WORK/switchyard.runs")," \
    "haproxy $(jq -c -s 'map(.tps | round)' "$WORK/haproxy.runs")"
