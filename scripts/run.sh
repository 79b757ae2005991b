#!/usr/bin/env bash
# The run command: sets up what is missing, builds release binaries, and runs
# the whole system on embedded defaults until Ctrl-C:
#   nats-server (JetStream), Postgres (a cluster in $DATA_DIR/pg), the local
#   LLM (SmolLM2 on llama.cpp, 1 thread), gateway, streamer, persister.
# With LLM_BASE_URL (and LLM_API_KEY, LLM_MODEL) set, it uses that provider
# and does not start the local model. Data in $DATA_DIR survives restarts.
#
# With PROMETHEUS=1, also Prometheus (Debian's package) on PROMETHEUS_PORT
# (9091), scraping every service's /metrics with ops/prometheus/rules.yml
# loaded; its data in $DATA_DIR/prometheus.
#
# With --cluster (what scripts/cluster.sh runs), the production topology on
# this one machine: 3 nats-server nodes (nats/cluster.conf, R3 streams), 2
# gateways, 2 streamers and 2 persisters (each its own SQLite file), one
# Postgres.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=setup.sh
SKIP_BROWSER_SETUP=1 SKIP_TEST_TOOLS=1 source scripts/setup.sh

CLUSTER=false
if [ "${1:-}" = --cluster ]; then CLUSTER=true; fi

NATS_PORT="${NATS_PORT:-4222}"
PG_PORT="${PG_PORT:-5433}"
LLM_PORT="${LLM_PORT:-8090}"
PROMETHEUS="${PROMETHEUS:-0}"
PROMETHEUS_PORT="${PROMETHEUS_PORT:-9091}"
export GATEWAY_LISTEN="${GATEWAY_LISTEN:-127.0.0.1:8080}"
export STREAMER_LISTEN="${STREAMER_LISTEN:-127.0.0.1:8081}"
export PERSISTER_LISTEN="${PERSISTER_LISTEN:-127.0.0.1:8082}"
LOGS="$DATA_DIR/logs"
mkdir -p "$LOGS" "$DATA_DIR/nats"
# Each service instance: "name listen-port" (a second instance of a kind
# takes the first's port + 3).
instances=(persister streamer gateway)
nats_ports=("$NATS_PORT")
if $CLUSTER; then
  instances=(persister persister-2 streamer streamer-2 gateway gateway-2)
  nats_ports=("$NATS_PORT" $((NATS_PORT + 1)) $((NATS_PORT + 2)))
  export BUS_REPLICAS=3
fi
listen_of() { # instance -> host:port
  local base="${1%-2}" listen
  case "$base" in
    gateway) listen="$GATEWAY_LISTEN" ;; streamer) listen="$STREAMER_LISTEN" ;; persister) listen="$PERSISTER_LISTEN" ;;
  esac
  if [ "$base" != "$1" ]; then listen="${listen%:*}:$(( ${listen##*:} + 3 ))"; fi
  printf '%s' "$listen"
}
ops_of() { # instance -> where its /readyz answers (GATEWAY_ADMIN_LISTEN moves the gateway's)
  if [ "${1%-2}" != gateway ] || [ -z "${GATEWAY_ADMIN_LISTEN:-}" ]; then listen_of "$1"; return; fi
  local admin="$GATEWAY_ADMIN_LISTEN"
  if [ "$1" = gateway-2 ]; then admin="${admin%:*}:$(( ${admin##*:} + 3 ))"; fi
  printf '%s' "$admin"
}

say() { printf '\033[1m[run]\033[0m %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

ports=("${nats_ports[@]}" "$PG_PORT")
if [ "$PROMETHEUS" = 1 ]; then ports+=("$PROMETHEUS_PORT"); fi
for instance in "${instances[@]}"; do
  listen="$(listen_of "$instance")"; ports+=("${listen##*:}")
  ops="$(ops_of "$instance")"; if [ "$ops" != "$listen" ]; then ports+=("${ops##*:}"); fi
done
for port in "${ports[@]}"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is already in use (another run? set NATS_PORT, PG_PORT, GATEWAY_LISTEN, GATEWAY_ADMIN_LISTEN, STREAMER_LISTEN, PERSISTER_LISTEN or PROMETHEUS_PORT)"
  fi
done

say "building release binaries (first time: several minutes)"
cargo build --release --locked --bins -q
BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"

pids=()
PG_DIR="$DATA_DIR/pg"
as_postgres() { if [ "$(id -u)" = 0 ]; then (cd /tmp && runuser -u postgres -- "$@"); else "$@"; fi; }
cleanup() {
  # Ignored, not reset: a second Ctrl-C (or TERM) during the stop must not
  # cut it short and leave Postgres or a service running.
  trap "" INT TERM
  trap - EXIT
  say "stopping"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ -f "$PG_DIR/postmaster.pid" ]; then as_postgres "$PG_BIN/pg_ctl" -D "$PG_DIR" -m fast -w stop >/dev/null 2>&1 || true; fi
  say "stopped; data kept in $DATA_DIR"
}
trap cleanup INT TERM EXIT

wait_http() { # url name seconds
  for _ in $(seq 1 $(( $3 * 5 ))); do
    if curl -sf -o /dev/null "$1"; then return 0; fi
    sleep 0.2
  done
  die "$2 did not become ready at $1 (see $LOGS)"
}

# shellcheck source=nats-users.sh
source scripts/nats-users.sh
if $CLUSTER; then
  say "starting a 3-node nats-server cluster on 127.0.0.1:${nats_ports[*]} (users and passwords in $nats_users_file)"
  NATS_URL=""
  for i in 1 2 3; do
    mkdir -p "$DATA_DIR/nats-cluster/n$i"
    NODE_NAME="n$i" CLIENT_PORT="${nats_ports[$((i - 1))]}" CLUSTER_PORT=$((6221 + i)) MONITOR_PORT=$((8221 + i)) \
      STORE_DIR="$DATA_DIR/nats-cluster/n$i" ROUTE_1=nats-route://127.0.0.1:6222 ROUTE_2=nats-route://127.0.0.1:6223 \
      ROUTE_3=nats-route://127.0.0.1:6224 "$NATS_SERVER_BIN" -c nats/cluster.conf >"$LOGS/nats-n$i.log" 2>&1 &
    pids+=($!)
    NATS_URL="${NATS_URL:+$NATS_URL,}nats://127.0.0.1:${nats_ports[$((i - 1))]}"
  done
  export NATS_URL
  for i in 1 2 3; do wait_http "http://127.0.0.1:$((8221 + i))/healthz" "nats-server node n$i" 60; done
else
  say "starting nats-server on 127.0.0.1:$NATS_PORT (users and passwords in $nats_users_file)"
  "$NATS_SERVER_BIN" -c nats/nats-server.conf -a 127.0.0.1 -p "$NATS_PORT" -sd "$DATA_DIR/nats" >"$LOGS/nats.log" 2>&1 &
  pids+=($!)
  export NATS_URL="nats://127.0.0.1:$NATS_PORT"
fi

say "starting Postgres on 127.0.0.1:$PG_PORT (cluster in $PG_DIR)"
if [ ! -f "$PG_DIR/PG_VERSION" ]; then
  mkdir -p "$PG_DIR"
  if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$PG_DIR"; fi
  chmod 700 "$PG_DIR"
  as_postgres "$PG_BIN/initdb" -D "$PG_DIR" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >"$LOGS/initdb.log" 2>&1 \
    || die "initdb failed (see $LOGS/initdb.log)"
fi
as_postgres "$PG_BIN/pg_ctl" -D "$PG_DIR" -l "$PG_DIR/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR" start >/dev/null \
  || die "Postgres did not start (see $PG_DIR/server.log)"
if ! as_postgres "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -Atc "select 1 from pg_database where datname='gateway'" postgres | grep -q 1; then
  as_postgres "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres gateway
fi
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:$PG_PORT/gateway}"

if [ -n "${LLM_BASE_URL:-}" ]; then
  say "using the LLM provider at $LLM_BASE_URL (model ${LLM_MODEL:-default}); the local model is not started"
else
  say "starting the local LLM (SmolLM2-135M, llama.cpp, 1 thread) on 127.0.0.1:$LLM_PORT"
  (cd /tmp && exec "$VENV/bin/python" "$ROOT/scripts/llm_server.py" --port "$LLM_PORT" --threads 1) >"$LOGS/llm.log" 2>&1 &
  pids+=($!)
  export LLM_BASE_URL="http://127.0.0.1:$LLM_PORT/v1"
  wait_http "http://127.0.0.1:$LLM_PORT/health" "the local LLM" 120
fi

if [ -z "${AUTH_JWT_SECRET:-}" ] && [ -z "${AUTH_JWT_PUBLIC_KEY:-}" ]; then
  if [ ! -s "$DATA_DIR/jwt-secret" ]; then
    (umask 077; head -c 48 /dev/urandom | base64 | tr -d '\n/+=' >"$DATA_DIR/jwt-secret")
  fi
  AUTH_JWT_SECRET="$(cat "$DATA_DIR/jwt-secret")"
  export AUTH_JWT_SECRET
  export GATEWAY_DEV_LOGIN="${GATEWAY_DEV_LOGIN:-true}"
fi
export PERSISTER_SQLITE_PATH="${PERSISTER_SQLITE_PATH:-$DATA_DIR/persister.db}"
export GATEWAY_WEB_DIR="${GATEWAY_WEB_DIR:-$ROOT/web}"
# One inference thread per scan: on a small machine candle's default
# threading makes the classification tail much longer (docs/vision.md).
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-1}"

for instance in "${instances[@]}"; do
  service="${instance%-2}"
  listen="$(listen_of "$instance")"
  sqlite="$PERSISTER_SQLITE_PATH"
  if [ "$instance" = persister-2 ]; then sqlite="${PERSISTER_SQLITE_PATH%.db}-2.db"; fi
  admin=(); if [ "$service" = gateway ] && [ -n "${GATEWAY_ADMIN_LISTEN:-}" ]; then admin=(GATEWAY_ADMIN_LISTEN="$(ops_of "$instance")"); fi
  GATEWAY_LISTEN="$listen" STREAMER_LISTEN="$listen" PERSISTER_LISTEN="$listen" PERSISTER_SQLITE_PATH="$sqlite" \
    start_as "$service" env "${admin[@]}" "$BIN_DIR/$service" >"$LOGS/$instance.log" 2>&1 &
  pids+=($!)
done
for instance in "${instances[@]}"; do
  wait_http "http://$(ops_of "$instance")/readyz" "$instance" 60
done

if [ "$PROMETHEUS" = 1 ]; then
  # Each service's /metrics, one job per kind (job = gateway, streamer,
  # persister: the names the rules use). nats-server is not a target: its
  # monitoring port serves JSON, not Prometheus text; the rules watch the bus
  # through the services' readiness and consumer gauges (ops/prometheus/rules.yml).
  PROM_DIR="$DATA_DIR/prometheus"
  mkdir -p "$PROM_DIR/data"
  {
    printf 'global:\n  scrape_interval: 5s\n  evaluation_interval: 5s\n'
    printf 'rule_files:\n  - %s\n' "$ROOT/ops/prometheus/rules.yml"
    printf 'scrape_configs:\n'
    for service in gateway streamer persister; do
      printf '  - job_name: %s\n    static_configs:\n      - targets:\n' "$service"
      for instance in "${instances[@]}"; do
        if [ "${instance%-2}" = "$service" ]; then printf "          - '%s'\n" "$(ops_of "$instance")"; fi
      done
    done
  } >"$PROM_DIR/prometheus.yml"
  promtool check config "$PROM_DIR/prometheus.yml" >"$LOGS/prometheus-check.log" 2>&1 \
    || die "the generated Prometheus config is invalid (see $LOGS/prometheus-check.log)"
  say "starting Prometheus on 127.0.0.1:$PROMETHEUS_PORT (config $PROM_DIR/prometheus.yml)"
  prometheus --config.file="$PROM_DIR/prometheus.yml" --storage.tsdb.path="$PROM_DIR/data" \
    --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" >"$LOGS/prometheus.log" 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$PROMETHEUS_PORT/-/ready" "Prometheus" 60
fi

cat >&2 <<MSG

  Gateway:    http://$GATEWAY_LISTEN   (web UI, API, WebSocket /v1/chat/ws)$($CLUSTER && printf '\n  Gateway 2:  http://%s   (any client may resume on either gateway)' "$(listen_of gateway-2)")
  Readiness:  $(for i in "${instances[@]}"; do printf 'http://%s/readyz  ' "$(ops_of "$i")"; done)
  NATS:       $NATS_URL      Postgres: $DATABASE_URL
  NATS users: $nats_users_file (one per service; inspect as user admin)
  Logs:       $LOGS/ (one file per process)
MSG
if [ "$PROMETHEUS" = 1 ]; then
  cat >&2 <<MSG
  Prometheus: http://127.0.0.1:$PROMETHEUS_PORT   (alerts: /alerts; rules: ops/prometheus/rules.yml; dashboard to import into Grafana: ops/grafana/gateway.json)
MSG
fi
if [ "${GATEWAY_DEV_LOGIN:-}" = true ]; then
  cat >&2 <<MSG
  Dev login is ENABLED (local run only). Get a token:
    curl -s -X POST http://$GATEWAY_LISTEN/v1/dev/token -H 'content-type: application/json' -d '{"user_id":"me"}'
MSG
fi
say "all services ready; Ctrl-C stops everything"

# Stop everything when any process exits on its own.
set +e
wait -n "${pids[@]}"
say "a process exited; see $LOGS"
