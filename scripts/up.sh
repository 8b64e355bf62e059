#!/usr/bin/env bash
# `make up`: runs the whole mesh on this machine, in the foreground, until Ctrl-C.
#
# Installs what is missing (scripts/bootstrap.sh), builds the release binaries, starts
# PostgreSQL and Redis with their data under .run/, starts the four services (two inference
# replicas), seeds the feature store with the demo entities, sends one prediction and prints
# grpcurl commands. A second run reuses the data directory, the internal token and the build.
#
# Supervision: once the mesh is up, a process that exits (any service, PostgreSQL or Redis) is
# reported on the terminal (which one, its exit status or signal, its log) and started again
# after a back-off of 1 s, doubling to at most 30 s; the back-off starts again at 1 s for a
# process that had stayed up for 60 s. The rest of the mesh keeps running. Ctrl-C (or SIGTERM)
# drains the services and stops everything this script started, by PID. A service that fails
# during start-up (before every service reported SERVING) stops the script instead: that is a
# configuration problem, not a crash to ride out.
#
# Internal credential: the services require `x-mesh-internal-token` on internal calls; the token
# comes from MESH_INTERNAL_TOKEN or, when that is unset, from .run/internal-token (32 random
# bytes as hex, mode 0600, created on the first run and reused).
#
# Prometheus (Debian's, when installed) runs too, on MESH_PROMETHEUS_PORT (9090), with the rules
# in deploy/prometheus/rules; MESH_PROMETHEUS=off skips it.
# Ports (override by environment): MESH_GATEWAY_PORT 50051, MESH_FEATURES_PORT 50052,
# MESH_INFERENCE1_PORT 50053, MESH_INFERENCE2_PORT 50054, MESH_LOGGER_PORT 50055,
# MESH_PG_PORT 55432, MESH_REDIS_PORT 56379; metrics on MESH_METRICS_BASE_PORT (9101) for the
# gateway and the next four for features, inference-1, inference-2, logger. Everything listens
# on 127.0.0.1 only. MESH_PROFILE=debug runs the debug build; MESH_RUN_DIR (default .run) holds
# data, logs, PID files (pids/<name>) and the token.
#
# `--ha` (`make up-ha`): PostgreSQL as a Patroni cluster (etcd, a primary and a synchronous
# standby) and Redis as a master, a replica and three Sentinels, in place of the single
# PostgreSQL and Redis; data in $MESH_RUN_DIR/ha. scripts/ha.sh has the details and timings.
#
# Run as root, PostgreSQL runs as the `postgres` user, which must be able to enter its cluster:
# when it cannot enter MESH_RUN_DIR (a checkout below a private home such as /root, mode 700),
# the cluster lives in /var/lib/mesh/pg-<hash of the run directory's path> instead, owned by
# postgres; root's home is left as it is. A step that fails prints its own error (the end of its
# log) before "stopping…".
set -euo pipefail
ha=0
case "${1:-}" in
  --ha) ha=1 ;;
  "") ;;
  *) echo "usage: scripts/up.sh [--ha]" >&2; exit 2 ;;
esac

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
run="${MESH_RUN_DIR:-$root/.run}"
logs="$run/logs"
gateway_port="${MESH_GATEWAY_PORT:-50051}"
features_port="${MESH_FEATURES_PORT:-50052}"
inference1_port="${MESH_INFERENCE1_PORT:-50053}"
inference2_port="${MESH_INFERENCE2_PORT:-50054}"
logger_port="${MESH_LOGGER_PORT:-50055}"
pg_port="${MESH_PG_PORT:-55432}"
redis_port="${MESH_REDIS_PORT:-56379}"
metrics_base="${MESH_METRICS_BASE_PORT:-9101}"
profile="${MESH_PROFILE:-release}"
# Restart back-off: first delay, ceiling, and the uptime after which it starts again from 1 s.
backoff_first=1
backoff_max=30
stable_secs=60

say() { printf '\033[1m[mesh]\033[0m %s\n' "$*" >&2; }
shout() { printf '\033[1;31m[mesh] %s\033[0m\n' "$*" >&2; }
# A failed step: say which, show the end of its log (the reason), and stop.
fail_with_log() { # message log
  shout "$1"
  if [ -s "$2" ]; then
    say "the end of $(show "$2") (backtrace frames left out):"
    grep -vE '^ +([0-9]+: |at )' "$2" | tail -n 20 | cut -c1-300 | sed 's/^/    /' >&2 || true
  fi
  exit 1
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# A path as the user would type it from the repository root.
show() { case $1 in "$root"/*) echo "${1#"$root"/}" ;; *) echo "$1" ;; esac; }

if [ "$ha" = 1 ]; then bash scripts/bootstrap.sh --ha; else bash scripts/bootstrap.sh; fi
# shellcheck source=/dev/null
source .tools/env
if [ "$ha" = 1 ]; then
  # shellcheck source=scripts/ha.sh
  source scripts/ha.sh
  store_ports=$(ha_ports)
else
  store_ports="$pg_port $redis_port"
fi

# Prometheus with the shipped rules, scraping this mesh (MESH_PROMETHEUS=off skips it).
prometheus_port="${MESH_PROMETHEUS_PORT:-9090}"
prometheus_on=0
if [ "${MESH_PROMETHEUS:-on}" != off ] && command -v prometheus >/dev/null 2>&1; then
  prometheus_on=1
fi
for port in "$gateway_port" "$features_port" "$inference1_port" "$inference2_port" "$logger_port" \
            $store_ports $(seq "$metrics_base" $((metrics_base + 4))) \
            $([ "$prometheus_on" = 1 ] && echo "$prometheus_port"); do
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
bin="${CARGO_TARGET_DIR:-$root/target}/$profile"

mkdir -p "$logs" "$run/pids"

# The internal token: from the environment, else the one kept in $run (created once).
if [ -n "${MESH_INTERNAL_TOKEN:-}" ]; then
  token_hint='$MESH_INTERNAL_TOKEN'
  token_where="MESH_INTERNAL_TOKEN (from your environment)"
else
  token_file="$run/internal-token"
  if [ ! -s "$token_file" ]; then
    (umask 077 && od -An -vtx1 -N32 /dev/urandom | tr -d ' \n' >"$token_file")
  fi
  chmod 600 "$token_file"
  MESH_INTERNAL_TOKEN="$(cat "$token_file")"
  token_hint="\$(cat $(show "$token_file"))"
  token_where="$(show "$token_file") (mode 0600, reused on the next run)"
fi
if [ "${#MESH_INTERNAL_TOKEN}" -lt 16 ]; then
  say "MESH_INTERNAL_TOKEN must be at least 16 characters; unset it to use a generated one."
  exit 1
fi
export MESH_INTERNAL_TOKEN

export MESH_DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
# The live model registry (aliases, rollouts, shadows) lives in the same PostgreSQL; the gateway
# and the inference replicas follow it, and the admin key below may change it.
export MESH_REGISTRY_DATABASE_URL="$MESH_DATABASE_URL"
admin_file="$run/admin-key"
if [ -z "${MESH_ADMIN_KEYS:-}" ]; then
  if [ ! -s "$admin_file" ]; then
    (umask 077 && od -An -vtx1 -N24 /dev/urandom | tr -d ' \n' >"$admin_file")
  fi
  chmod 600 "$admin_file"
  export MESH_ADMIN_KEYS="ops:$(cat "$admin_file")"
  admin_hint="MESH_ADMIN_KEY=\$(cat $(show "$admin_file"))"
else
  admin_hint="MESH_ADMIN_KEY=<a secret from MESH_ADMIN_KEYS>"
fi
export MESH_REDIS_URL="redis://127.0.0.1:$redis_port"
# HA: every PostgreSQL member in one URL (writes go to the primary), Redis through Sentinel.
[ "$ha" = 1 ] && ha_export_urls
export MESH_MODELS_DIR="$root/models"
export MESH_LOG_FORMAT="${MESH_LOG_FORMAT:-json}"
# With MESH_API_KEYS set, the demo prediction below uses the first key's secret.
if [ -n "${MESH_API_KEYS:-}" ] && [ -z "${MESH_API_KEY:-}" ]; then
  first="${MESH_API_KEYS%%,*}"
  export MESH_API_KEY="${first#*:}"
fi

# PostgreSQL refuses to run as root: run it as the unprivileged postgres user.
pg_run=()
if [ "$(id -u)" -eq 0 ]; then
  pg_run=(setpriv --reuid=postgres --regid=postgres --init-groups)
fi
pg_home="$run/pg"
if [ "$(id -u)" -eq 0 ] && ! "${pg_run[@]}" test -x "$run"; then
  pg_home="/var/lib/mesh/pg-$(printf '%s' "$run" | sha256sum | cut -c1-16)"
fi
pgdata="$pg_home/data"

# What this script supervises, in start order: the stores, then the rest (see cleanup for the
# stop order).
stores=(postgres redis)
[ "$ha" = 1 ] && stores=("${ha_names[@]}")
names=("${stores[@]}" features inference-1 inference-2 logger gateway)
[ "$prometheus_on" = 1 ] && names+=(prometheus)
declare -A pid=() starts=() started_at=() backoff=() due=()
stopping=0

# Replaces the (background) subshell with the process, so $! is the process's own PID.
service() { # name port metrics_port binary [VAR=value...]
  local name=$1 port=$2 metrics=$3 binary=$4
  shift 4
  exec env MESH_LISTEN_ADDR="127.0.0.1:$port" MESH_METRICS_ADDR="127.0.0.1:$metrics" \
    OTEL_SERVICE_NAME="$name" "$@" "$bin/$binary"
}

# Starts `name` (again) in the background, appending to its log; records its PID.
launch() {
  local name=$1 log="$logs/$1.log"
  if [ "${starts[$name]:-0}" -eq 0 ]; then
    : >"$log"
  else
    printf '==== up.sh: restart #%s of %s at %s ====\n' "${starts[$name]}" "$name" "$(date -Is)" >>"$log"
  fi
  # PostgreSQL and Redis run in their own session: Ctrl-C in the terminal reaches the services
  # (they drain) but not the stores, which cleanup stops once the services have flushed.
  case $name in
    postgres)
      [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$pg_home"
      setsid "${pg_run[@]}" "$MESH_PG_BIN/postgres" -D "$pgdata" -p "$pg_port" -h 127.0.0.1 \
        -k "$pg_home" >>"$log" 2>&1 &
      ;;
    redis)
      setsid redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
        >>"$log" 2>&1 &
      ;;
    features) service features "$features_port" $((metrics_base + 1)) mesh-features >>"$log" 2>&1 & ;;
    inference-1)
      service inference-1 "$inference1_port" $((metrics_base + 2)) mesh-inference \
        MESH_REPLICA_ID=inference-1 >>"$log" 2>&1 &
      ;;
    inference-2)
      service inference-2 "$inference2_port" $((metrics_base + 3)) mesh-inference \
        MESH_REPLICA_ID=inference-2 >>"$log" 2>&1 &
      ;;
    logger) service logger "$logger_port" $((metrics_base + 4)) mesh-logger >>"$log" 2>&1 & ;;
    prometheus)
      prometheus --config.file="$run/prometheus/prometheus.yml" \
        --storage.tsdb.path="$run/prometheus/data" --storage.tsdb.retention.time=1d \
        --web.listen-address="127.0.0.1:$prometheus_port" >>"$log" 2>&1 &
      ;;
    gateway)
      service gateway "$gateway_port" "$metrics_base" mesh-gateway \
        MESH_FEATURES_URL="http://127.0.0.1:$features_port" \
        MESH_INFERENCE_URLS="http://127.0.0.1:$inference1_port,http://127.0.0.1:$inference2_port" \
        MESH_LOGGER_URL="http://127.0.0.1:$logger_port" \
        MESH_SPOOL_DIR="$run/spool" >>"$log" 2>&1 &
      ;;
    *) ha_launch "$name" "$log" ;;
  esac
  pid[$name]=$!
  started_at[$name]=$SECONDS
  starts[$name]=$(( ${starts[$name]:-0} + 1 ))
  echo "${pid[$name]}" >"$run/pids/$name"
}

# Waits until the child `pid` has exited, even when a signal interrupts `wait`.
wait_gone() {
  local s
  while kill -0 "$1" 2>/dev/null; do
    s=0
    wait "$1" 2>/dev/null || s=$?
    [ "$s" -eq 127 ] && return 0  # not (or no longer) our child
  done
  return 0
}

cleanup() {
  local rc=$?
  # A second Ctrl-C or SIGTERM (make forwards SIGTERM to up.sh, which also gets the group's)
  # must not cut the clean-up short: PostgreSQL and Redis run in their own sessions and would
  # be left running.
  trap - EXIT
  trap 'say "already stopping…"' INT TERM
  if [ "$rc" -ne 0 ] && [ "$stopping" = 0 ] && [ -n "${failed_cmd:-}" ]; then
    shout "failed (exit status $rc) at scripts/up.sh line $failed_line: $failed_cmd"
  fi
  stopping=1
  say "stopping…"
  # Services first (they drain), then the stores once the services have exited; only PIDs this
  # script started.
  local i name
  for ((i=${#names[@]}-1; i>=${#stores[@]}; i--)); do
    name=${names[$i]}
    [ -n "${pid[$name]:-}" ] && kill -TERM "${pid[$name]}" 2>/dev/null || true
  done
  for name in "${names[@]:${#stores[@]}}"; do
    [ -n "${pid[$name]:-}" ] && wait_gone "${pid[$name]}"
  done
  # The stores together (both Patroni members at once, so neither promotes itself when the
  # other stops), etcd last: Patroni needs it to shut down. SIGINT is PostgreSQL's fast shutdown.
  for name in "${stores[@]}"; do
    [ -n "${pid[$name]:-}" ] && [ "$name" != etcd ] || continue
    if [ "$name" = postgres ]; then kill -INT "${pid[$name]}" 2>/dev/null || true
    else kill -TERM "${pid[$name]}" 2>/dev/null || true; fi
  done
  for name in "${stores[@]}"; do
    [ "$name" != etcd ] && [ -n "${pid[$name]:-}" ] && wait_gone "${pid[$name]}"
  done
  if [ -n "${pid[etcd]:-}" ]; then
    kill -TERM "${pid[etcd]}" 2>/dev/null || true
    wait_gone "${pid[etcd]}"
  fi
  for name in "${names[@]}"; do rm -f "$run/pids/$name"; done
  if [ "$pg_home" = "$run/pg" ] || [ "$ha" = 1 ]; then
    say "stopped. Data kept in $(show "$run")/ (delete it to start afresh)."
  else
    say "stopped. Data kept in $(show "$run")/ and, for PostgreSQL, $pg_home (delete both to start afresh)."
  fi
}
trap cleanup EXIT
# Any other failing command: remember which, so cleanup can name it.
trap 'failed_cmd=$BASH_COMMAND failed_line=$LINENO' ERR
# Ctrl-C or SIGTERM: a requested stop, not a failure.
trap 'stopping=1; exit 0' INT TERM

if [ "$ha" = 1 ]; then
  say "starting etcd, Patroni (PostgreSQL primary + standby), Redis master + replica, Sentinels in $(show "$ha_dir")"
  ha_prepare
  for name in "${stores[@]}"; do launch "$name"; done
  ha_wait_ready || exit 1
  ha_describe
else
  if [ ! -f "$pgdata/PG_VERSION" ]; then
    say "creating the PostgreSQL cluster in $(show "$pg_home")"
    [ "$pg_home" = "$run/pg" ] || say "(the postgres user cannot enter $(show "$run"), so the cluster lives outside it)"
    mkdir -p "$pg_home"
    [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$pg_home" && chmod 700 "$pg_home"
    "${pg_run[@]}" "$MESH_PG_BIN/initdb" -D "$pgdata" -U postgres --auth=trust -E UTF8 \
      >"$logs/initdb.log" 2>&1 || fail_with_log "initdb failed (creating the cluster in $pgdata)" "$logs/initdb.log"
  fi
  launch postgres
  launch redis
  for _ in $(seq 1 100); do
    "$MESH_PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$pg_port" && break
    sleep 0.1
  done
  "$MESH_PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$pg_port" ||
    fail_with_log "PostgreSQL did not start on 127.0.0.1:$pg_port" "$logs/postgres.log"
  say "PostgreSQL on 127.0.0.1:$pg_port, Redis on 127.0.0.1:$redis_port"
fi
for name in features inference-1 inference-2 logger gateway; do launch "$name"; done
if [ "$prometheus_on" = 1 ]; then
  mkdir -p "$run/prometheus"
  cat >"$run/prometheus/prometheus.yml" <<YML
# Written by scripts/up.sh: this mesh's metrics ports, the rules shipped in deploy/prometheus/rules.
global:
  scrape_interval: 5s
  evaluation_interval: 5s
rule_files:
  - $root/deploy/prometheus/rules/*.yml
scrape_configs:
  - job_name: mesh-gateway
    static_configs: [{targets: ["127.0.0.1:$metrics_base"]}]
  - job_name: mesh-features
    static_configs: [{targets: ["127.0.0.1:$((metrics_base + 1))"]}]
  - job_name: mesh-inference
    static_configs: [{targets: ["127.0.0.1:$((metrics_base + 2))", "127.0.0.1:$((metrics_base + 3))"]}]
  - job_name: mesh-logger
    static_configs: [{targets: ["127.0.0.1:$((metrics_base + 4))"]}]
YML
  launch prometheus
fi

for entry in "features:$features_port" "inference-1:$inference1_port" \
             "inference-2:$inference2_port" "logger:$logger_port" "gateway:$gateway_port"; do
  name=${entry%%:*} port=${entry#*:}
  if ! "$bin/meshctl" health --url "http://127.0.0.1:$port" --wait-secs 60 >/dev/null; then
    fail_with_log "$name (port $port) did not become SERVING" "$logs/$name.log"
  fi
done
say "all services SERVING"

"$bin/meshctl" seed --features-url "http://127.0.0.1:$features_port" --file data/demo_entities.jsonl \
  2>"$logs/seed.log" || fail_with_log "seeding the demo entities failed" "$logs/seed.log"
say "one prediction:"
"$bin/meshctl" predict --gateway-url "http://127.0.0.1:$gateway_port" --entity cust-00001 \
  --feature support_calls_30d=2 --feature channel=web

if [ "$prometheus_on" = 1 ]; then
  prometheus_hint="Prometheus: http://127.0.0.1:$prometheus_port (rules from deploy/prometheus/rules: Status > Rules, Alerts). To see the P0 alert fire in about two minutes: kill -STOP \$(cat $(show "$run")/pids/inference-1) \$(cat $(show "$run")/pids/inference-2); kill -CONT them to recover."
else
  prometheus_hint="Prometheus: not started (MESH_PROMETHEUS=off, or no prometheus binary)."
fi
say "internal token: $token_where. Calls straight to features, inference or logger need it: grpcurl -H \"x-mesh-internal-token: $token_hint\" …"
cat <<TXT

The mesh is up. Gateway: 127.0.0.1:$gateway_port. Logs: $(show "$logs")/. Metrics: http://127.0.0.1:$metrics_base/metrics (gateway) … $((metrics_base + 4)).
Try (grpcurl is in .tools/bin after bootstrap):

  grpcurl -plaintext 127.0.0.1:$gateway_port list
  grpcurl -plaintext -d '{"model":"churn","entity_id":"cust-00042","features":{"support_calls_30d":{"number":4},"channel":{"category":"mobile"}}}' 127.0.0.1:$gateway_port mesh.gateway.v1.Gateway/Predict
  grpcurl -plaintext -d '{"model":"churn","items":[{"entity_id":"cust-00001","features":{"support_calls_30d":{"number":1},"channel":{"category":"web"}}},{"entity_id":"nobody","features":{"support_calls_30d":{"number":1},"channel":{"category":"web"}}}]}' 127.0.0.1:$gateway_port mesh.gateway.v1.Gateway/PredictBatch
  grpcurl -plaintext -d '{"service":"mesh.gateway.v1.Gateway"}' 127.0.0.1:$gateway_port grpc.health.v1.Health/Check
  grpcurl -plaintext -H "x-mesh-internal-token: $token_hint" -d '{"name":"churn"}' 127.0.0.1:$inference1_port inference.GRPCInferenceService/ModelMetadata
  psql "$MESH_DATABASE_URL" -c 'SELECT prediction_id, entity_id, score, feature_tier, trace_id FROM predictions ORDER BY served_at DESC LIMIT 5'

$prometheus_hint
Model lifecycle (admin key: $(show "$admin_file"), id "ops"):

  $admin_hint $(show "$bin")/meshctl models status churn
  $admin_hint $(show "$bin")/meshctl models promote churn 2 --reason "v2 passed evaluation"
  $admin_hint $(show "$bin")/meshctl models rollback churn --reason "back to v1"
  $admin_hint $(show "$bin")/meshctl models rollout churn 2 --percent 10 --reason canary
  $admin_hint $(show "$bin")/meshctl models history churn
  MESH_DATABASE_URL=$MESH_DATABASE_URL $(show "$bin")/meshctl models drift churn

A process that exits is restarted (back-off 1 s doubling to ${backoff_max} s). Press Ctrl-C to stop everything.
TXT

# Supervise: restart what exits, with back-off, and say so loudly.
describe_exit() {
  local status=$1
  if [ "$status" -gt 128 ]; then
    echo "killed by signal $((status - 128)) (SIG$(kill -l $((status - 128)) 2>/dev/null || echo '?'))"
  else
    echo "exited with status $status"
  fi
}
while true; do
  for name in "${names[@]}"; do
    [ "$stopping" = 1 ] && break
    if [ -n "${due[$name]:-}" ]; then
      if [ "$SECONDS" -ge "${due[$name]}" ]; then
        unset "due[$name]"
        launch "$name"
        shout "restarted $name: pid ${pid[$name]} (restart #$(( ${starts[$name]} - 1 ))); log $(show "$logs/$name.log")"
      fi
      continue
    fi
    kill -0 "${pid[$name]}" 2>/dev/null && continue
    # A Ctrl-C reaches the children too: give the INT trap the chance to run first.
    sleep 0.3 &
    wait $! || true
    [ "$stopping" = 1 ] && break
    status=0
    wait "${pid[$name]}" 2>/dev/null || status=$?
    up=$((SECONDS - ${started_at[$name]}))
    [ "$up" -ge "$stable_secs" ] && backoff[$name]=$backoff_first
    delay=${backoff[$name]:-$backoff_first}
    due[$name]=$((SECONDS + delay))
    backoff[$name]=$(( delay * 2 > backoff_max ? backoff_max : delay * 2 ))
    shout "$name (pid ${pid[$name]}) $(describe_exit "$status") after ${up} s up; restart #${starts[$name]} in ${delay} s. The rest of the mesh keeps running. Log: $(show "$logs/$name.log"), last lines:"
    tail -n 3 "$logs/$name.log" 2>/dev/null | cut -c1-300 | sed 's/^/    /' >&2 || true
  done
  # Sleeping in the background lets the INT/TERM trap run at once.
  sleep 1 &
  wait $! || true
done
