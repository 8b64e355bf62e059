#!/usr/bin/env bash
# `make bench`: the benchmark suite against a running local mesh (`make up` in another
# terminal). Release build of the load generator; loopback targets only; every run is bounded.
#
# Writes bench-results/<scenario>.json and bench-results/summary.md, and prints the summary.
# Override durations with BENCH_SECONDS (default 20), the pause between scenarios with
# BENCH_PAUSE (default 10 s), and targets with MESH_GATEWAY_URL /
# MESH_INFERENCE_URL.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
seconds="${BENCH_SECONDS:-20}"
gateway="${MESH_GATEWAY_URL:-http://127.0.0.1:50051}"
inference="${MESH_INFERENCE_URL:-http://127.0.0.1:50053}"
# The inference runs call a replica directly, which answers only with the mesh's internal
# token: the one `make up` generated, unless MESH_INTERNAL_TOKEN is set.
if [ -z "${MESH_INTERNAL_TOKEN:-}" ] && [ -r "$root/.run/internal-token" ]; then
  MESH_INTERNAL_TOKEN="$(cat "$root/.run/internal-token")"
fi
if [ -z "${MESH_INTERNAL_TOKEN:-}" ]; then
  echo "MESH_INTERNAL_TOKEN is not set and .run/internal-token does not exist: start the mesh with 'make up' first" >&2
  exit 1
fi
export MESH_INTERNAL_TOKEN
out="$root/bench-results"
mkdir -p "$out"

cargo build --release --locked -q -p mesh-bench
bench="$root/target/release/mesh-bench"
if ! "$root/target/release/meshctl" health --url "$gateway" >/dev/null 2>&1; then
  echo "no SERVING gateway at $gateway: start the mesh with 'make up' first" >&2
  exit 1
fi

pause="${BENCH_PAUSE:-10}"
first=1
run() { # name, then mesh-bench arguments
  local name=$1; shift
  # Let the previous scenario's backlog (e.g. prediction records being written) settle first.
  [ "$first" = 1 ] || sleep "$pause"
  first=0
  echo "== $name" >&2
  "$bench" "$@" --duration "$seconds" --name "$name" --output "$out/$name.json"
}
run predict-closed-c32   predict --url "$gateway" --concurrency 32
run predict-open-1500    predict --url "$gateway" --rate 1500
run infer-1row-c32       infer --url "$inference" --rows 1 --concurrency 32
run infer-32rows-c16     infer --url "$inference" --rows 32 --concurrency 16

python3 - "$out" <<'PY'
import json, sys, pathlib, datetime
out = pathlib.Path(sys.argv[1])
rows = []
for name in ["predict-closed-c32", "predict-open-1500", "infer-1row-c32", "infer-32rows-c16"]:
    r = json.loads((out / f"{name}.json").read_text())
    lat = r["latency_ms"]
    errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "none"
    rows.append(f"| {name} | {r['requests']} | {r['ok_rps']:.0f} | {r['rows_per_s']:.0f} | {lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | {lat['p99_9']:.2f} | {errors} |")
text = "\n".join([
    f"Benchmark run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
    "",
    "| scenario | requests | ok/s | rows/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors |",
    "|---|---|---|---|---|---|---|---|---|",
    *rows, ""])
(out / "summary.md").write_text(text)
print(text)
PY
