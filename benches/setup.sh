# Shared set-up of the end-to-end scripts (sourced, not run): builds the release
# binary, writes certificates and configs into a temporary directory, starts the
# bank simulator, switchyard and (with WITH_HAPROXY=1) HAProxy on 127.0.0.1,
# and stops them all on exit. Knobs: see the variables below.
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNECTIONS=${CONNECTIONS:-8}
WINDOW=${WINDOW:-64}
LINKS=${LINKS:-2}
BANK_PORT=${BANK_PORT:-19101}
SWITCH_PORT=${SWITCH_PORT:-18583}
HAPROXY_PORT=${HAPROXY_PORT:-18584}
# Another build of switchyard to run beside this one, on its own port (e.g. the
# build before a change, for a side-by-side comparison); empty: none.
OTHER_BIN=${OTHER_BIN:-}
OTHER_PORT=${OTHER_PORT:-18585}
OTHER_ADMIN_PORT=${OTHER_ADMIN_PORT:-19465}

WITH_HAPROXY=${WITH_HAPROXY:-}
JOURNAL=${JOURNAL:-} # empty: no journal; "batch" or "off": a journal in the work directory
ROUTES=${ROUTES:-}
DUP_WINDOW_S=${DUP_WINDOW_S:-2} # seconds request keys are remembered (duplicates)

if [ -n "$WITH_HAPROXY" ] && ! command -v haproxy >/dev/null; then
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
# Two institutions share the load generator's connections: 10,000 each at most.
connections_per_institution_max = 10000
# Bounded by memory (the shipped default, 2 GiB): past rate x window keys the
# window shrinks.
[duplicates]
window_s = $DUP_WINDOW_S
memory_max_bytes = ${DUP_MEMORY_MAX_BYTES:-2147483648}
[admin]
listen = "127.0.0.1:${ADMIN_PORT:-19464}"
# Rate limits far above what two cores can do (the default is 20,000/s).
[[institution]]
id = "100001"
rate_per_s = 5000000
rate_burst = 1000000
[[institution]]
id = "100002"
rate_per_s = 5000000
rate_burst = 1000000
[[bank]]
id = "200001"
address = "127.0.0.1:$BANK_PORT"
server_name = "bank-200001"
links = $LINKS
[[route]]
pan_prefix = "4"
bank = "200001"
TOML
if [ -n "$JOURNAL" ]; then
    printf '[journal]\ndir = "journal"\nfsync = "%s"\n' "$JOURNAL" >>"$WORK/switchyard.toml"
fi
if [ -n "$ROUTES" ]; then
    # N extra PAN prefixes of 6 to 11 digits, none starting with 4 (the test cards').
    python3 - "$ROUTES" >>"$WORK/switchyard.toml" <<'PY'
import random, sys
random.seed(7)
seen = set()
while len(seen) < int(sys.argv[1]):
    seen.add(random.choice("56789") + "".join(random.choice("0123456789")
             for _ in range(random.choice([5, 5, 7, 7, 6, 8, 9, 10]))))
for p in seen:
    print(f'[[route]]\npan_prefix = "{p}"\nbank = "200001"')
PY
fi
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
SWITCH_PID=$!
PIDS+=($!)
if [ -n "$OTHER_BIN" ]; then
    sed -e "s/127.0.0.1:$SWITCH_PORT/127.0.0.1:$OTHER_PORT/" \
        -e "s/127.0.0.1:${ADMIN_PORT:-19464}/127.0.0.1:$OTHER_ADMIN_PORT/" \
        -e 's/^dir = "journal"/dir = "journal-other"/' \
        "$WORK/switchyard.toml" >"$WORK/other.toml"
    "$OTHER_BIN" run --config "$WORK/other.toml" 2>"$WORK/other.log" &
    OTHER_PID=$!
    PIDS+=($!)
fi
if [ -n "$WITH_HAPROXY" ]; then
    haproxy -f "$WORK/haproxy.cfg" 2>"$WORK/haproxy.log" &
    HAPROXY_PID=$!
    PIDS+=($!)
fi
for port in "$BANK_PORT" "$SWITCH_PORT" ${WITH_HAPROXY:+"$HAPROXY_PORT"} ${OTHER_BIN:+"$OTHER_PORT"}; do
    up=""
    for _ in $(seq 600); do
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

