# Shared by benches/cluster.sh and scripts/cluster-demo.sh (sourced after
# benches/setup.sh, not run): three nats-server nodes on loopback (the pinned
# binary of .ci/oracle-venv, JetStream with sync_interval: always, stores in the
# work directory), and start_switch, which runs one more switchyard process from
# the setup's config with a journal and extra settings (e.g. a [cluster]).
#
# Knobs (unset by default): CLUSTER_COMPRESSION=none|lz4 (the switch nodes'
# cluster.compression); NATS_GOMAXPROCS=N (each server's Go scheduler threads;
# 1 suits three servers sharing two cores); NATS_ROUTE_COMPRESSION=off (route
# compression between the servers, pointless on loopback).
NATS_PORT=${NATS_PORT:-14222}
bash .ci/oracle-venv
NATS=$PWD/.venv-oracle/bin/nats-server

# --- three NATS servers --------------------------------------------------------
ROUTES=""
NATS_PIDS=()
declare -A SWITCH_PID
for i in 0 1 2; do
    ROUTES="$ROUTES\"nats-route://127.0.0.1:$((NATS_PORT + 100 + i))\", "
done
URLS=""
for i in 0 1 2; do
    cat >"$WORK/nats-$i.conf" <<CONF
server_name: "n$i"
listen: "127.0.0.1:$((NATS_PORT + i))"
max_payload: 8MB
jetstream {
  store_dir: "$WORK/nats-$i"
  sync_interval: always
}
cluster {
  ${NATS_ROUTE_COMPRESSION:+compression: $NATS_ROUTE_COMPRESSION}
  name: "switchyard-bench"
  listen: "127.0.0.1:$((NATS_PORT + 100 + i))"
  routes: [${ROUTES%, }]
}
CONF
    ${NATS_GOMAXPROCS:+env GOMAXPROCS=$NATS_GOMAXPROCS} "$NATS" -c "$WORK/nats-$i.conf" 2>"$WORK/nats-$i.log" &
    PIDS+=($!)
    NATS_PIDS+=($!)
    URLS="$URLS\"nats://127.0.0.1:$((NATS_PORT + i))\", "
done

start_switch() { # $1 = name, $2 = port offset, $3 = extra config; $4 = "wait" or not
    local config="$WORK/switchyard-$1.toml"
    sed -e "s/127.0.0.1:$SWITCH_PORT/127.0.0.1:$((SWITCH_PORT + $2))/" \
        -e "s/^listen = \"127.0.0.1:${ADMIN_PORT:-19464}\"/listen = \"127.0.0.1:$((${ADMIN_PORT:-19464} + $2))\"/" \
        "$WORK/switchyard.toml" >"$config"
    printf '[journal]\ndir = "journal-%s"\nfsync = "batch"\n%b' "$1" "$3" >>"$config"
    "$BIN" run --config "$config" 2>"$WORK/switch-$1.log" &
    PIDS+=($!)
    SWITCH_PID[$1]=$!
    [ "${4:-wait}" = wait ] || return 0
    for _ in $(seq 600); do
        (exec 3<>"/dev/tcp/127.0.0.1/$((SWITCH_PORT + $2))") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "switch $1 did not start" >&2
    tail -n 5 "$WORK/switch-$1.log" >&2
    exit 1
}
cluster_section() { # $1 = node id
    printf '[cluster]\nnats = [%s]\nnode_id = "%s"\nconnect_timeout_ms = 30000\n' "${URLS%, }" "$1"
    [ -z "${CLUSTER_COMPRESSION:-}" ] || printf 'compression = "%s"\n' "$CLUSTER_COMPRESSION"
}
