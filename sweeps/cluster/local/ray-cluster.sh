#!/usr/bin/env bash
# A two-node Ray cluster on this machine: a head and a worker node (`ray start`), each with one CPU,
# token authentication on, every port on 127.0.0.1. Used by `make cluster-up` / `make cluster-down`
# and by the integration tests; each node runs under `ray start --block` in its own process group,
# stopped by that group's id (never `ray stop`, which would stop every Ray on the machine).
#   ray-cluster.sh up | down | down-worker | up-worker | status
# State (pids, token, logs) in $CLUSTER_DIR (default runs/cluster). Clients use:
#   RAY_ADDRESS=http://127.0.0.1:$RAY_DASHBOARD_PORT RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$CLUSTER_DIR/auth_token
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
DIR=${CLUSTER_DIR:-$ROOT/runs/cluster}
BIN=$ROOT/.venv/bin
GCS_PORT=${RAY_GCS_PORT:-6390}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8275}
BASE=${RAY_PORT_BASE:-21000}  # each node takes ports BASE+node*1000 .. +999
# The worker node keeps its own session folder: two nodes sharing one would each garbage-collect
# the other's runtime-environment files (a job's working directory vanishes under its driver).
WORKER_TMP=${RAY_WORKER_TMP:-/tmp/ray-worker-$GCS_PORT}
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$DIR/auth_token PATH=$BIN:$PATH
export RAY_USAGE_STATS_ENABLED=0 TF_CPP_MIN_LOG_LEVEL=2

node_ports() {  # the ports of node $1 (0 = head, 1 = worker)
  local b=$((BASE + $1 * 1000))
  echo --node-manager-port $((b + 1)) --object-manager-port $((b + 2)) \
    --dashboard-agent-listen-port $((b + 3)) --dashboard-agent-grpc-port $((b + 4)) \
    --runtime-env-agent-port $((b + 5)) --metrics-export-port $((b + 6)) \
    --min-worker-port $((b + 100)) --max-worker-port $((b + 999))
}

start_node() {  # name, extra args...
  local name=$1; shift
  setsid "$BIN/ray" start --block --node-ip-address 127.0.0.1 --disable-usage-stats "$@" \
    >"$DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$DIR/$name.pid"
}

alive_nodes() {
  "$BIN/python" - "$GCS_PORT" <<'PY' 2>/dev/null || echo 0
import sys, ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="ERROR", log_to_driver=False)
print(sum(n["Alive"] for n in ray.nodes()))
PY
}

wait_nodes() {  # count, seconds
  for _ in $(seq "$2"); do
    [ "$(alive_nodes | tail -1)" -ge "$1" ] && return 0
    sleep 1
  done
  echo "error: the Ray cluster did not reach $1 nodes; see $DIR/*.log" >&2
  return 1
}

stop_node() {
  local pidfile=$DIR/$1.pid
  [ -f "$pidfile" ] || return 0
  local pid; pid=$(cat "$pidfile")
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 10); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

case ${1:-} in
  up)
    mkdir -p "$DIR"
    if [ ! -s "$DIR/auth_token" ]; then
      (umask 077; "$BIN/python" -c 'import secrets; print(secrets.token_hex(32))' >"$DIR/auth_token")
    fi
    start_node head --head --port "$GCS_PORT" --dashboard-host 127.0.0.1 \
      --dashboard-port "$DASHBOARD_PORT" --ray-client-server-port $((BASE + 7)) --num-cpus 1 \
      $(node_ports 0)
    wait_nodes 1 90
    start_node worker --address "127.0.0.1:$GCS_PORT" --num-cpus 1 --temp-dir "$WORKER_TMP" $(node_ports 1)
    wait_nodes 2 90
    echo "Ray cluster up: 2 nodes; RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT" \
      "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$DIR/auth_token"
    ;;
  down-worker) stop_node worker ;;
  up-worker)
    start_node worker --address "127.0.0.1:$GCS_PORT" --num-cpus 1 --temp-dir "$WORKER_TMP" $(node_ports 1)
    wait_nodes 2 90
    ;;
  down)
    stop_node worker; stop_node head
    # `ray start --head` left its address for ray.init() to find: forget it, it is gone now
    current=/tmp/ray/ray_current_cluster
    if [ -f "$current" ] && grep -q ":$GCS_PORT\$" "$current"; then rm -f "$current"; fi
    echo "Ray cluster down"
    ;;
  status) echo "alive nodes: $(alive_nodes | tail -1)" ;;
  *) echo "usage: $0 up|down|down-worker|up-worker|status" >&2; exit 2 ;;
esac
