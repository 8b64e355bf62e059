#!/usr/bin/env bash
# A/B of Predict coalescing (issue 12's adaptive batching at the gateway) against a running
# `make up` mesh: starts a second gateway beside make up's (same features, inference replicas
# and logger; its own free loopback ports and spool directory) with B_ENV (default
# MESH_PREDICT_COALESCE=1: coalescing off; e.g. B_ENV="MESH_PREDICT_RUNS=4" to compare a setting),
# or another gateway binary with B_BIN (default this checkout's release build; e.g. one built from
# an earlier commit, to measure a change of code), then alternates closed-loop Predict runs
# (c=CONCURRENCY, default 32; or open-loop ones at RATE requests/s) between make up's gateway
# (A: its settings, by default coalescing on) and the second one (B), A, B, A, B …,
# so drift of this shared machine hits both alike. Prints each pair's throughput ratio A/B and
# p99s, and their median; writes bench-results/ab-coalesce.json. Bounded: PAIRS pairs (default
# 3) of SECONDS_PER_RUN (default 15). Stops only the gateway it started (its spool is delivered
# on the way out, like any gateway's).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
pairs="${PAIRS:-3}"
seconds="${SECONDS_PER_RUN:-15}"
concurrency="${CONCURRENCY:-32}"
# RATE (requests/s): open-loop runs at that rate instead of closed-loop ones; compare the p50s,
# p99s and p99.9s.
if [ -n "${RATE:-}" ]; then load=(--rate "$RATE"); else load=(--concurrency "$concurrency"); fi
read -r -a b_env <<<"${B_ENV-MESH_PREDICT_COALESCE=1}"
b_bin="${B_BIN:-$root/target/release/mesh-gateway}"
run="$root/.run"
[ -r "$run/pids/gateway" ] && kill -0 "$(cat "$run/pids/gateway")" 2>/dev/null ||
  { echo "[ab-coalesce] no make up gateway running: start the mesh with 'make up' first" >&2; exit 1; }
# shellcheck source=/dev/null
source .tools/env
cargo build --release --locked -q -p mesh-gateway -p mesh-bench
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
metrics=$(free_port)
spool="$(mktemp -d)"
log="$(mktemp)"
pid=
cleanup() {
  if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$spool"
}
trap cleanup EXIT
# The second gateway gets make up's gateway environment (downstreams, token, registry), with
# its own ports and spool, and B_ENV.
env_of_gateway="$(tr '\0' '\n' <"/proc/$(cat "$run/pids/gateway")/environ" | grep -E '^(MESH_|OTEL_)' |
  grep -vE '^MESH_(LISTEN_ADDR|METRICS_ADDR|SPOOL_DIR)=')"
mapfile -t gateway_env <<<"$env_of_gateway"
env -i PATH="$PATH" "${gateway_env[@]}" MESH_LISTEN_ADDR="127.0.0.1:$port" \
  MESH_METRICS_ADDR="127.0.0.1:$metrics" MESH_SPOOL_DIR="$spool" "${b_env[@]}" \
  OTEL_SERVICE_NAME=gateway-ab "$b_bin" >"$log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  "$root/target/release/meshctl" health --url "http://127.0.0.1:$port" >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { echo "[ab-coalesce] the second gateway exited:" >&2; tail -5 "$log" >&2; exit 1; }
  sleep 0.2
done
a="http://127.0.0.1:${MESH_GATEWAY_PORT:-50051}"
b="http://127.0.0.1:$port"
once() { # url → JSON line
  "$root/target/release/mesh-bench" predict --url "$1" "${load[@]}" \
    --duration "$seconds" --format json 2>/dev/null | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)))'
}
results=()
for i in $(seq 1 "$pairs"); do
  results+=("$(once "$a")" "$(once "$b")")
  echo "[ab-coalesce] pair $i of $pairs done" >&2
done
mkdir -p bench-results
printf '%s\n' "${results[@]}" | python3 -c '
import json, sys
runs = [json.loads(l) for l in sys.stdin]
pairs = []
for on, off in zip(runs[0::2], runs[1::2]):
    err_on, err_off = sum(on["errors"].values()), sum(off["errors"].values())
    ratio = on["ok_rps"] / off["ok_rps"]
    pairs.append({"on_rps": on["ok_rps"], "off_rps": off["ok_rps"], "ratio": ratio,
                  "on_p50_ms": on["latency_ms"]["p50"], "off_p50_ms": off["latency_ms"]["p50"],
                  "on_p99_ms": on["latency_ms"]["p99"], "off_p99_ms": off["latency_ms"]["p99"],
                  "on_p999_ms": on["latency_ms"]["p99_9"], "off_p999_ms": off["latency_ms"]["p99_9"],
                  "on_errors": err_on, "off_errors": err_off})
    print("A {:.0f}/s (p50 {:.2f}, p99 {:.1f}, p99.9 {:.1f} ms, {} errors) vs B {:.0f}/s (p50 {:.2f}, p99 {:.1f}, p99.9 {:.1f} ms, {} errors): {:.2f}x".format(
        on["ok_rps"], on["latency_ms"]["p50"], on["latency_ms"]["p99"], on["latency_ms"]["p99_9"], err_on,
        off["ok_rps"], off["latency_ms"]["p50"], off["latency_ms"]["p99"], off["latency_ms"]["p99_9"], err_off, ratio))
ratios = sorted(p["ratio"] for p in pairs)
median = ratios[len(ratios) // 2] if len(ratios) % 2 else (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2
print("B: {} {}; median A/B: {:.2f}x".format(sys.argv[3], sys.argv[2], median))
json.dump({"b_env": sys.argv[2], "b_bin": sys.argv[3], "pairs": pairs, "median_ratio": median}, open(sys.argv[1], "w"), indent=2)' bench-results/ab-coalesce.json "${b_env[*]}" "$b_bin"
