#!/usr/bin/env bash
# A/B of the global allocator on an inference replica: mimalloc (the default build) against the
# system allocator (`--no-default-features`), both release builds of the same commit, serving the
# same models side by side on free loopback ports. Alternates A, B, A, B … `mesh-bench infer`
# runs (1 row c=32, then 32 rows c=16) and prints each pair's ratio, so drift of this shared
# machine hits both sides alike. Bounded: PAIRS pairs (default 3) of SECONDS (default 10) each.
# Writes bench-results/ab-alloc.json. Stops only the two replicas it started.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
pairs="${PAIRS:-3}"
seconds="${SECONDS_PER_RUN:-10}"
# shellcheck source=/dev/null
source .tools/env
echo "[ab-alloc] building release twice (mimalloc, system)…" >&2
cargo build --release --locked -q -p mesh-inference -p mesh-bench
cargo build --release --locked -q -p mesh-inference --no-default-features --target-dir target/ab-system
token="$(head -c 24 /dev/urandom | base64)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
logs="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
start() { # name binary → port
  local name=$1 bin=$2 port metrics
  port=$(free_port); metrics=$(free_port)
  MESH_LISTEN_ADDR="127.0.0.1:$port" MESH_METRICS_ADDR="127.0.0.1:$metrics" MESH_MODELS_DIR="$root/models" \
    MESH_INTERNAL_TOKEN="$token" RUST_LOG=warn "$bin" >"$logs/$name.log" 2>&1 &
  pids+=($!)
  echo "$port"
}
port_a=$(start mimalloc target/release/mesh-inference)
port_b=$(start system target/ab-system/release/mesh-inference)
export MESH_INTERNAL_TOKEN="$token"
for port in "$port_a" "$port_b"; do
  for _ in $(seq 120); do
    ok=$(target/release/mesh-bench infer --url "http://127.0.0.1:$port" --requests 1 --warmup 0 --format json 2>/dev/null \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["ok"])' 2>/dev/null || echo 0)
    [ "$ok" = 1 ] && break
    sleep 0.5
  done
  [ "$ok" = 1 ] || { cat "$logs"/*.log >&2; echo "[ab-alloc] replica on $port never answered" >&2; exit 1; }
done
bench=target/release/mesh-bench
results="["
for load in "1 32" "32 16"; do
  set -- $load
  rows=$1 conc=$2
  for i in $(seq "$pairs"); do
    a=$("$bench" infer --url "http://127.0.0.1:$port_a" --rows "$rows" --concurrency "$conc" --duration "$seconds" --warmup 2 --format json)
    b=$("$bench" infer --url "http://127.0.0.1:$port_b" --rows "$rows" --concurrency "$conc" --duration "$seconds" --warmup 2 --format json)
    line=$(python3 -c 'import json,sys; a=json.loads(sys.argv[1]); b=json.loads(sys.argv[2]); print(json.dumps({"rows": int(sys.argv[3]), "concurrency": int(sys.argv[4]), "pair": int(sys.argv[5]), "mimalloc_rows_per_s": a["rows_per_s"], "system_rows_per_s": b["rows_per_s"], "ratio": a["rows_per_s"] / b["rows_per_s"], "mimalloc_p99_ms": a["latency_ms"]["p99"], "system_p99_ms": b["latency_ms"]["p99"], "errors": sum(a["errors"].values()) + sum(b["errors"].values())}))' "$a" "$b" "$rows" "$conc" "$i")
    echo "$line"
    results="$results$line,"
  done
done
mkdir -p bench-results
echo "${results%,}]" | python3 -m json.tool >bench-results/ab-alloc.json
python3 - <<'PY'
import json
runs = json.load(open("bench-results/ab-alloc.json"))
for rows in sorted({r["rows"] for r in runs}):
    ratios = [r["ratio"] for r in runs if r["rows"] == rows]
    print(f"ModelInfer {rows} row(s): mimalloc / system rows/s per pair: " + ", ".join(f"{x:.3f}" for x in ratios))
PY
