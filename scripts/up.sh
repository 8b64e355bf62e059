#!/usr/bin/env bash
# `make up`: runs the whole mesh on this machine, in the foreground, until Ctrl-C.
#
# Installs what is missing (scripts/bootstrap.sh), builds the release binaries, starts
# PostgreSQL and Redis with their data under .run/, starts the four services (two inference
# replicas), seeds the feature store with the demo entities, sends one prediction and prints
# grpcurl commands. Ctrl-C (or SIGTERM) drains the services and stops everything it started.
# A second run reuses the data directory and the build.
#
# Ports (override by environment): MESH_GATEWAY_PORT 50051, features 50052, inference 50053 and
# 50054, logger 50055, MESH_PG_PORT 55432, MESH_REDIS_PORT 56379 (MESH_FEATURES_PORT,
# MESH_INFERENCE1_PORT, MESH_INFERENCE2_PORT, MESH_LOGGER_PORT). Metrics are fixed at 9101..9105.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
run="$root/.run"
logs="$run/logs"
gateway_port="${MESH_GATEWAY_PORT:-50051}"
features_port="${MESH_FEATURES_PORT:-50052}"
inference1_port="${MESH_INFERENCE1_PORT:-50053}"
inference2_port="${MESH_INFERENCE2_PORT:-50054}"
logger_port="${MESH_LOGGER_PORT:-50055}"
pg_port="${MESH_PG_PORT:-55432}"
redis_port="${MESH_REDIS_PORT:-56379}"
profile="${MESH_PROFILE:-release}"

say() { printf '\033[1m[mesh]\033[0m %s\n' "$*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

bash scripts/bootstrap.sh
# shellcheck source=/dev/null
source .tools/env

for port in "$gateway_port" "$features_port" "$inference1_port" "$inference2_port" "$logger_port" "$pg_port" "$redis_port"; do
  if port_open "$port"; then
    say "port $port is already in use (is the mesh already running?). Stop that process or pick other ports (see scripts/up.sh)."
    exit 1
  fi
done

say "building ($profile)…"
if [ "$profile" = release ]; then
  cargo build --release --bins --locked -q
else
  cargo build --bins --locked -q
fi
bin="$root/target/$profile"

mkdir -p "$logs"
pids=()
cleanup() {
  trap - INT TERM EXIT
  say "stopping…"
  # Services first (they drain), then the stores they use; only PIDs this script started.
  for ((i=${#pids[@]}-1; i>=0; i--)); do
    if [ "${pids[$i]}" = "${pg_pid:-}" ]; then
      # Services have drained by now; SIGINT is PostgreSQL's fast shutdown.
      for pid in "${pids[@]:$((i+1))}"; do wait "$pid" 2>/dev/null || true; done
      kill -INT "${pids[$i]}" 2>/dev/null || true
    else
      kill -TERM "${pids[$i]}" 2>/dev/null || true
    fi
  done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  say "stopped. Data kept in .run/ (delete it to start afresh)."
}
trap cleanup EXIT
# Ctrl-C or SIGTERM: a requested stop, not a failure.
trap 'exit 0' INT TERM

# PostgreSQL refuses to run as root: run it as the unprivileged postgres user.
pg_run=()
if [ "$(id -u)" -eq 0 ]; then
  pg_run=(setpriv --reuid=postgres --regid=postgres --init-groups)
fi
pgdata="$run/pg/data"
if [ ! -f "$pgdata/PG_VERSION" ]; then
  say "creating the PostgreSQL cluster in .run/pg"
  mkdir -p "$run/pg"
  [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$run/pg"
  "${pg_run[@]}" "$MESH_PG_BIN/initdb" -D "$pgdata" -U postgres --auth=trust -E UTF8 >"$logs/initdb.log" 2>&1
fi
[ "$(id -u)" -eq 0 ] && chown postgres:postgres "$run/pg"
"${pg_run[@]}" "$MESH_PG_BIN/postgres" -D "$pgdata" -p "$pg_port" -h 127.0.0.1 -k "$run/pg" \
  >"$logs/postgres.log" 2>&1 &
pg_pid=$!
pids+=($pg_pid)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
  >"$logs/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  "$MESH_PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$pg_port" && break
  sleep 0.1
done
"$MESH_PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$pg_port" || { say "PostgreSQL did not start; see .run/logs/postgres.log"; exit 1; }
say "PostgreSQL on 127.0.0.1:$pg_port, Redis on 127.0.0.1:$redis_port"

export MESH_DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
export MESH_REDIS_URL="redis://127.0.0.1:$redis_port"
export MESH_MODELS_DIR="$root/models"
export MESH_LOG_FORMAT="${MESH_LOG_FORMAT:-json}"
# With MESH_API_KEYS set, the demo prediction below uses the first key's secret.
if [ -n "${MESH_API_KEYS:-}" ] && [ -z "${MESH_API_KEY:-}" ]; then
  first="${MESH_API_KEYS%%,*}"
  export MESH_API_KEY="${first#*:}"
fi

start() { # name port metrics_port binary [VAR=value...]
  local name=$1 port=$2 metrics=$3 binary=$4
  shift 4
  env MESH_LISTEN_ADDR="127.0.0.1:$port" MESH_METRICS_ADDR="127.0.0.1:$metrics" \
      OTEL_SERVICE_NAME="$name" "$@" "$bin/$binary" >"$logs/$name.log" 2>&1 &
  pids+=($!)
}
start features "$features_port" 9102 mesh-features
start inference-1 "$inference1_port" 9103 mesh-inference MESH_REPLICA_ID=inference-1
start inference-2 "$inference2_port" 9104 mesh-inference MESH_REPLICA_ID=inference-2
start logger "$logger_port" 9105 mesh-logger
start gateway "$gateway_port" 9101 mesh-gateway \
  MESH_FEATURES_URL="http://127.0.0.1:$features_port" \
  MESH_INFERENCE_URLS="http://127.0.0.1:$inference1_port,http://127.0.0.1:$inference2_port" \
  MESH_LOGGER_URL="http://127.0.0.1:$logger_port" \
  MESH_SPOOL_DIR="$run/spool"

for port in "$features_port" "$inference1_port" "$inference2_port" "$logger_port" "$gateway_port"; do
  if ! "$bin/meshctl" health --url "http://127.0.0.1:$port" --wait-secs 60 >/dev/null; then
    say "the service on port $port did not become SERVING; logs are in .run/logs/"
    exit 1
  fi
done
say "all services SERVING"

"$bin/meshctl" seed --features-url "http://127.0.0.1:$features_port" --file data/demo_entities.jsonl 2>/dev/null
say "one prediction:"
"$bin/meshctl" predict --gateway-url "http://127.0.0.1:$gateway_port" --entity cust-00001 \
  --feature support_calls_30d=2 --feature channel=web

cat <<TXT

The mesh is up. Gateway: 127.0.0.1:$gateway_port. Logs: .run/logs/. Metrics: http://127.0.0.1:9101/metrics (gateway) … 9105.
Try (grpcurl is in .tools/bin after bootstrap):

  grpcurl -plaintext 127.0.0.1:$gateway_port list
  grpcurl -plaintext -d '{"model":"churn","entity_id":"cust-00042","features":{"support_calls_30d":{"number":4},"channel":{"category":"mobile"}}}' 127.0.0.1:$gateway_port mesh.gateway.v1.Gateway/Predict
  grpcurl -plaintext -d '{"model":"churn","items":[{"entity_id":"cust-00001","features":{"support_calls_30d":{"number":1},"channel":{"category":"web"}}},{"entity_id":"nobody","features":{"support_calls_30d":{"number":1},"channel":{"category":"web"}}}]}' 127.0.0.1:$gateway_port mesh.gateway.v1.Gateway/PredictBatch
  grpcurl -plaintext -d '{"service":"mesh.gateway.v1.Gateway"}' 127.0.0.1:$gateway_port grpc.health.v1.Health/Check
  grpcurl -plaintext -d '{"name":"churn"}' 127.0.0.1:$inference1_port inference.GRPCInferenceService/ModelMetadata
  psql -h 127.0.0.1 -p $pg_port -U postgres -c 'SELECT prediction_id, entity_id, score, feature_tier, trace_id FROM predictions ORDER BY served_at DESC LIMIT 5'

Press Ctrl-C to stop everything.
TXT

# Stay in the foreground; if any process dies, say which and stop the rest.
while true; do
  for pid in "${pids[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      # Ctrl-C reaches the children too; if that is why, the INT trap runs during this wait.
      sleep 1 &
      wait $! || true
      say "process $pid exited unexpectedly; see .run/logs/. Stopping the rest."
      exit 1
    fi
  done
  # Sleeping in the background lets the INT/TERM trap run at once.
  sleep 1 &
  wait $! || true
done
