#!/usr/bin/env bash
# Checks that `make up` supervises: starts scripts/up.sh (debug build, free ports, its own run
# directory under /tmp), kill -9's inference-1 by its PID, and asserts that up.sh reports it,
# starts it again (a new PID, SERVING, answering a direct call made with the internal token from
# the run directory's internal-token file and refusing one without it),
# that the other processes kept their PIDs, and that a Predict through the gateway succeeds.
# Then stops up.sh with SIGTERM and checks that every process it started is gone.
#
#   bash scripts/check-supervise.sh        (about 30 s once the debug binaries are built)
#
# Only processes this script or its up.sh started are signalled, by PID.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

say() { printf '[check-supervise] %s\n' "$*" >&2; }
fail() { say "FAIL: $*"; say "up.sh output (last 40 lines):"; tail -n 40 "$out" >&2 || true; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

bash scripts/bootstrap.sh
# shellcheck source=/dev/null
source .tools/env
bin="${CARGO_TARGET_DIR:-$root/target}/debug"

# Twelve consecutive free ports: 5 gRPC, PostgreSQL, Redis, 5 metrics. Below the kernel's
# ephemeral range: a port there can be taken at any moment as the local end of an outgoing
# connection (seen: the features service's port, between this check and its bind).
ephemeral_lo="$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)"
span=$(( ephemeral_lo - 10000 - 12 ))
[ "$span" -gt 100 ] || span=20000
base=""
for _ in $(seq 1 20); do
  candidate=$(( 10000 + RANDOM % span ))
  busy=0
  for port in $(seq "$candidate" $((candidate + 11))); do
    if port_open "$port"; then busy=1; break; fi
  done
  if [ "$busy" = 0 ]; then base=$candidate; break; fi
done
[ -n "$base" ] || { say "no 12 free consecutive ports found"; exit 1; }

tmp="$(mktemp -d /tmp/mesh-check-supervise.XXXXXX)"
chmod 755 "$tmp"  # PostgreSQL runs as its own user when this runs as root.
out="$tmp/up.out"
up_pid=""
finish() {
  if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null; then
    kill -TERM "$up_pid" 2>/dev/null || true
    wait "$up_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap finish EXIT

inf1=$((base + 2))
gateway=$base
say "starting make up (debug) on ports $base..$((base + 11)), run directory $tmp"
env -u MESH_INTERNAL_TOKEN MESH_PROFILE=debug MESH_PROMETHEUS=off MESH_RUN_DIR="$tmp/run" \
  MESH_GATEWAY_PORT=$base MESH_FEATURES_PORT=$((base + 1)) MESH_INFERENCE1_PORT=$inf1 \
  MESH_INFERENCE2_PORT=$((base + 3)) MESH_LOGGER_PORT=$((base + 4)) MESH_PG_PORT=$((base + 5)) \
  MESH_REDIS_PORT=$((base + 6)) MESH_METRICS_BASE_PORT=$((base + 7)) \
  bash scripts/up.sh >"$out" 2>&1 &
up_pid=$!

started=$SECONDS
until grep -q "The mesh is up" "$out"; do
  kill -0 "$up_pid" 2>/dev/null || fail "up.sh exited before the mesh was up"
  [ $((SECONDS - started)) -lt 300 ] || fail "the mesh was not up within 300 s"
  sleep 0.5
done
say "mesh up after $((SECONDS - started)) s"

token_file="$tmp/run/internal-token"
[ -s "$token_file" ] || fail "no $token_file"
[ "$(stat -c %a "$token_file")" = 600 ] || fail "$token_file has mode $(stat -c %a "$token_file"), not 600"
token="$(cat "$token_file")"
[ "${#token}" -ge 16 ] || fail "the generated token is shorter than 16 characters"

declare -A before=()
for name in postgres redis features inference-1 inference-2 logger gateway; do
  before[$name]=$(cat "$tmp/run/pids/$name")
done
victim=${before[inference-1]}
say "kill -9 inference-1 (pid $victim)"
kill -KILL "$victim"

started=$SECONDS
until grep -q "restarted inference-1" "$out"; do
  [ $((SECONDS - started)) -lt 30 ] || fail "inference-1 was not restarted within 30 s"
  sleep 0.5
done
grep -q "inference-1 (pid $victim) killed by signal 9 (SIGKILL)" "$out" \
  || fail "up.sh did not report the SIGKILL of inference-1"
after=$(cat "$tmp/run/pids/inference-1")
[ "$after" != "$victim" ] || fail "inference-1's PID did not change"
kill -0 "$after" 2>/dev/null || fail "the restarted inference-1 (pid $after) is not running"
"$bin/meshctl" health --url "http://127.0.0.1:$inf1" --wait-secs 60 >/dev/null \
  || fail "the restarted inference-1 did not become SERVING within 60 s"
say "inference-1 back as pid $after after $((SECONDS - started)) s, SERVING; up.sh said:"
grep -A3 -E "inference-1 \(pid $victim\)|restarted inference-1" "$out" | sed 's/\x1b\[[0-9;]*m//g' >&2

grpcurl -plaintext -max-time 5 -H "x-mesh-internal-token: $token" -d '{"name":"churn"}' \
  "127.0.0.1:$inf1" inference.GRPCInferenceService/ModelMetadata >/dev/null \
  || fail "ModelMetadata on the restarted inference-1 (with the internal token) failed"
if grpcurl -plaintext -max-time 5 -d '{"name":"churn"}' "127.0.0.1:$inf1" \
    inference.GRPCInferenceService/ModelMetadata >/dev/null 2>&1; then
  fail "inference-1 answered ModelMetadata without the internal token"
fi
say "inference-1 answers with the token from $(basename "$token_file") and refuses without it"

for name in postgres redis features inference-2 logger gateway; do
  [ "$(cat "$tmp/run/pids/$name")" = "${before[$name]}" ] || fail "$name was restarted too"
  kill -0 "${before[$name]}" 2>/dev/null || fail "$name (pid ${before[$name]}) is gone"
done

ok=0
for _ in $(seq 1 20); do
  if "$bin/meshctl" predict --gateway-url "http://127.0.0.1:$gateway" --entity cust-00007 \
      --feature support_calls_30d=1 --feature channel=web >/dev/null 2>&1; then
    ok=1
    break
  fi
  sleep 0.5
done
[ "$ok" = 1 ] || fail "Predict through the gateway failed after the restart"
say "Predict through the gateway OK"

all_pids=("${before[@]}" "$after")
say "stopping up.sh (SIGTERM to pid $up_pid)"
kill -TERM "$up_pid"
started=$SECONDS
while kill -0 "$up_pid" 2>/dev/null; do
  [ $((SECONDS - started)) -lt 60 ] || fail "up.sh did not stop within 60 s of SIGTERM"
  sleep 0.2
done
wait "$up_pid" 2>/dev/null || true
up_pid=""
for p in "${all_pids[@]}"; do
  if kill -0 "$p" 2>/dev/null && [ "$p" != "$victim" ]; then
    fail "pid $p is still running after up.sh stopped"
  fi
done
say "PASS: inference-1 restarted after kill -9, the rest untouched, Predict OK, everything stopped"
