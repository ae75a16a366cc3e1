#!/usr/bin/env bash
# The load runs behind the figures in the issues' notes, in one command:
# fan-out over WebSocket, SSE and long-poll against one server; the same
# fan-out over one node without Redis, one node with Redis and two nodes
# sharing that Redis, with the ratio of their CPU per delivery; and idle
# connections with the server's memory per connection.
#
#   benches/load.sh [fanout] [cluster] [idle]     (default: all three)
#
# Knobs (environment): SUBSCRIBERS (1000), MESSAGES (2000), BYTES (100),
# WINDOW (50), IDLE (19000 connections). Every server is started here on a
# port the OS picked for it and stopped on exit by its own pid.
set -euo pipefail
cd "$(dirname "$0")/.."

SUBSCRIBERS=${SUBSCRIBERS:-1000}
MESSAGES=${MESSAGES:-2000}
BYTES=${BYTES:-100}
WINDOW=${WINDOW:-50}
IDLE=${IDLE:-19000}
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(fanout cluster idle)

# NO_BUILD=1 runs the binaries already in target/release.
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet -p switchboard-server -p switchboard-benches
# SERVER=path runs another server binary (an older build, to compare).
server=${SERVER:-target/release/switchboard}
loadgen=target/release/loadgen
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}

# start_server PORT [flags...]: a server that lets the publisher send as fast
# as the window allows; its pid lands in $last_pid.
start_server() {
  local port=$1
  shift
  "$server" --listen "127.0.0.1:$port" --auth trust \
    --rate-per-sec 1000000 --rate-burst 1000000 --max-sessions 100000 "$@" \
    >/dev/null 2>&1 &
  last_pid=$!
  pids+=("$last_pid")
  wait_port "$port"
}

fanout() { "$loadgen" fanout --subscribers "$SUBSCRIBERS" --messages "$MESSAGES" \
  --bytes "$BYTES" --window "$WINDOW" "$@"; }

for scenario in "${scenarios[@]}"; do
  case "$scenario" in
  fanout)
    port=$(free_port)
    start_server "$port"
    for transport in ws sse longpoll; do
      echo "== fan-out over $transport, one node"
      fanout --url "ws://127.0.0.1:$port/ws" --transport "$transport" --room "bench_$transport" \
        --server-pid "$last_pid"
    done
    ;;
  cluster)
    # The same fan-out, in one run: one node without Redis, one node with
    # Redis, two nodes sharing that Redis; then the broker path's cost as a
    # ratio of CPU per delivery (with Redis / without). Every node gets the
    # same loadgen parameters; Redis's own CPU is reported per publish.
    command -v redis-server >/dev/null || { echo "cluster: redis-server is not installed" >&2; exit 1; }
    redis_port=$(free_port)
    redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
    redis_pid=$!
    pids+=("$redis_pid")
    wait_port "$redis_port"
    redis="redis://127.0.0.1:$redis_port"
    local_port=$(free_port)
    start_server "$local_port"
    local_pid=$last_pid
    one=$(free_port)
    start_server "$one" --redis "$redis"
    one_pid=$last_pid
    two=$(free_port)
    start_server "$two" --redis "$redis"
    two_pid=$last_pid
    out=$(mktemp)
    echo "== fan-out over ws, one node without Redis"
    fanout --url "ws://127.0.0.1:$local_port/ws" --room bench_local --server-pid "$local_pid" | tee "$out.local"
    echo "== fan-out over ws, one node with Redis"
    fanout --url "ws://127.0.0.1:$one/ws" --room bench_single --server-pid "$one_pid" \
      --redis-pid "$redis_pid" | tee "$out.single"
    echo "== fan-out over ws, two nodes with one Redis (subscribers split; CPU is both nodes' sum)"
    fanout --url "ws://127.0.0.1:$one/ws" --url "ws://127.0.0.1:$two/ws" --room bench_pair \
      --server-pid "$one_pid" --server-pid "$two_pid" --redis-pid "$redis_pid" | tee "$out.pair"
    figure() { awk -v key="$2" '$0 ~ "^"key {print $NF == "us" ? $(NF-1) : $NF}' "$out.$1"; }
    echo "== summary (server CPU per delivery, deliveries/s)"
    for run in local single pair; do
      printf '%-7s %8s us %10s/s\n' "$run" "$(figure "$run" "server cpu/delivery")" \
        "$(figure "$run" "deliveries/s")"
    done
    awk -v a="$(figure single "server cpu/delivery")" -v b="$(figure local "server cpu/delivery")" \
      'BEGIN { if (b > 0) printf "ratio   %.2fx CPU per delivery, one node with Redis / without\n", a / b }'
    rm -f "$out" "$out.local" "$out.single" "$out.pair"
    ;;
  idle)
    port=$(free_port)
    start_server "$port"
    echo "== $IDLE idle connections"
    "$loadgen" idle --url "ws://127.0.0.1:$port/ws" --connections "$IDLE" --server-pid "$last_pid"
    ;;
  *)
    echo "unknown scenario $scenario (fanout, cluster, idle)" >&2
    exit 2
    ;;
  esac
  cleanup
  pids=()
done
