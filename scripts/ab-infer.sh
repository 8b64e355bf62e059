#!/usr/bin/env bash
# A/B of two inference binaries (e.g. a build of an earlier commit against this checkout's) on
# the same models, to measure a change of code on the ModelInfer path. Needs a running `make up`
# mesh: both replicas get its inference-1 environment (models, registry, token, telemetry and
# log settings, so telemetry costs what it costs under `make up`), each on its own free loopback
# ports. Alternates `mesh-bench infer` runs A, B, A, B … (1 row c=32, then 32 rows c=16) so drift
# of this shared machine hits both alike; prints each pair's throughput ratio A/B, p99s and the
# median ratio per load; writes bench-results/ab-infer.json.
#
#   B_BIN=/path/to/old/mesh-inference bash scripts/ab-infer.sh
#
# A_BIN defaults to this checkout's release build (built first). Bounded: PAIRS pairs (default 3)
# of SECONDS_PER_RUN (default 10) per load. Stops only the two replicas it started.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
pairs="${PAIRS:-3}"
seconds="${SECONDS_PER_RUN:-10}"
[ -n "${B_BIN:-}" ] || { echo "[ab-infer] set B_BIN to the inference binary to compare against" >&2; exit 2; }
[ -x "$B_BIN" ] || { echo "[ab-infer] B_BIN=$B_BIN is not an executable" >&2; exit 2; }
a_bin="${A_BIN:-$root/target/release/mesh-inference}"
run="$root/.run"
[ -r "$run/pids/inference-1" ] && kill -0 "$(cat "$run/pids/inference-1")" 2>/dev/null ||
  { echo "[ab-infer] no make up inference replica running: start the mesh with 'make up' first" >&2; exit 1; }
# shellcheck source=/dev/null
source .tools/env
cargo build --release --locked -q -p mesh-inference -p mesh-bench
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
mapfile -t replica_env < <(tr '\0' '\n' <"/proc/$(cat "$run/pids/inference-1")/environ" |
  grep -E '^(MESH_|OTEL_|RUST_LOG=|ORT_)' | grep -vE '^MESH_(LISTEN_ADDR|METRICS_ADDR|REPLICA_ID)=')
token="$(tr '\0' '\n' <"/proc/$(cat "$run/pids/inference-1")/environ" | sed -n 's/^MESH_INTERNAL_TOKEN=//p')"
logs="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$logs"
}
trap cleanup EXIT
start() { # name binary → port (the replica's pid goes to pids)
  local name=$1 bin=$2 port metrics
  port=$(free_port); metrics=$(free_port)
  env -i PATH="$PATH" "${replica_env[@]}" MESH_LISTEN_ADDR="127.0.0.1:$port" \
    MESH_METRICS_ADDR="127.0.0.1:$metrics" MESH_REPLICA_ID="ab-$name" OTEL_SERVICE_NAME="inference-ab-$name" \
    "$bin" >"$logs/$name.log" 2>&1 &
  pids+=($!)
  echo "$port" >"$logs/$name.port"
}
start a "$a_bin"
start b "$B_BIN"
port_a=$(cat "$logs/a.port")
port_b=$(cat "$logs/b.port")
export MESH_INTERNAL_TOKEN="$token"
bench="$root/target/release/mesh-bench"
for port in "$port_a" "$port_b"; do
  ok=0
  for _ in $(seq 120); do
    ok=$("$bench" infer --url "http://127.0.0.1:$port" --requests 1 --warmup 0 --format json 2>/dev/null |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["ok"])' 2>/dev/null || echo 0)
    [ "$ok" = 1 ] && break
    sleep 0.5
  done
  [ "$ok" = 1 ] || { tail -5 "$logs"/*.log >&2; echo "[ab-infer] replica on $port never answered" >&2; exit 1; }
done
results=()
for load in "1 32" "32 16"; do
  read -r rows conc <<<"$load"
  for i in $(seq "$pairs"); do
    for port in "$port_a" "$port_b"; do
      results+=("$("$bench" infer --url "http://127.0.0.1:$port" --rows "$rows" --concurrency "$conc" \
        --duration "$seconds" --warmup 2 --format json | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))')")
    done
    echo "[ab-infer] $rows row(s): pair $i of $pairs done" >&2
  done
done
mkdir -p bench-results
printf '%s\n' "${results[@]}" | python3 -c '
import json, sys
runs = [json.loads(l) for l in sys.stdin]
out = {"a_bin": sys.argv[2], "b_bin": sys.argv[3], "loads": []}
per_load = {}
for a, b in zip(runs[0::2], runs[1::2]):
    rows = a["rows_per_s"] / max(a["ok_rps"], 1e-9)
    pair = {"rows": round(rows), "a_rows_per_s": a["rows_per_s"], "b_rows_per_s": b["rows_per_s"],
            "ratio": a["rows_per_s"] / b["rows_per_s"], "a_p99_ms": a["latency_ms"]["p99"],
            "b_p99_ms": b["latency_ms"]["p99"],
            "errors": sum(a["errors"].values()) + sum(b["errors"].values())}
    per_load.setdefault(pair["rows"], []).append(pair)
    print("{} row(s): A {:.0f} rows/s (p99 {:.2f} ms) vs B {:.0f} rows/s (p99 {:.2f} ms): {:.3f}x, {} errors".format(
        pair["rows"], pair["a_rows_per_s"], pair["a_p99_ms"], pair["b_rows_per_s"], pair["b_p99_ms"], pair["ratio"], pair["errors"]))
for rows, pairs in sorted(per_load.items()):
    ratios = sorted(p["ratio"] for p in pairs)
    n = len(ratios)
    median = ratios[n // 2] if n % 2 else (ratios[n // 2 - 1] + ratios[n // 2]) / 2
    out["loads"].append({"rows": rows, "pairs": pairs, "median_ratio": median})
    print("{} row(s): median A/B {:.3f}x".format(rows, median))
json.dump(out, open(sys.argv[1], "w"), indent=2)' bench-results/ab-infer.json "$a_bin" "$B_BIN"
