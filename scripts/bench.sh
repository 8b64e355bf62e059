#!/usr/bin/env bash
# `make bench`: the benchmark suite against a running local mesh (`make up` in another
# terminal). Release build of the load generator; loopback targets only; every run is bounded.
#
# First the transport floor: `mesh-bench floor`, a bare tonic KServe server that decodes each
# ModelInfer and answers a fixed tensor (no model, no middleware), started here on a free loopback
# port and stopped on exit. Each ModelInfer load runs against the floor and then against the
# mesh's inference replica, back to back; Predict runs closed-loop, then open-loop at half the
# closed-loop rate it just measured. Each mesh figure is reported as a share of the floor's from
# the same run (this machine is shared and noisy: ratios, not absolute rates, are comparable).
#
# Writes bench-results/<scenario>.json, bench-results/ratios.json and bench-results/summary.md,
# and prints the summary. Override durations with BENCH_SECONDS (default 20; BENCH_OPEN_SECONDS
# for the open-loop run, default the same), the pause between scenarios with BENCH_PAUSE
# (default 10 s), and targets with MESH_GATEWAY_URL / MESH_INFERENCE_URL.
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
open_seconds="${BENCH_OPEN_SECONDS:-$seconds}"
first=1
run() { # name, then mesh-bench arguments
  local name=$1; shift
  # Let the previous scenario's backlog (e.g. prediction records being written) settle first.
  [ "$first" = 1 ] || sleep "$pause"
  first=0
  echo "== $name" >&2
  "$bench" "$@" --name "$name" --output "$out/$name.json"
}

floor_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$bench" floor --listen "127.0.0.1:$floor_port" >"$out/floor.log" 2>&1 &
floor_pid=$!
trap 'kill "$floor_pid" 2>/dev/null || true; wait "$floor_pid" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  grep -q "ModelInfer on" "$out/floor.log" 2>/dev/null && break
  sleep 0.1
done
grep -q "ModelInfer on" "$out/floor.log" || { cat "$out/floor.log" >&2; echo "the floor server did not start" >&2; exit 1; }
floor="http://127.0.0.1:$floor_port"

run floor-infer-1row-c32     infer --url "$floor" --rows 1 --concurrency 32 --duration "$seconds"
run infer-1row-c32           infer --url "$inference" --rows 1 --concurrency 32 --duration "$seconds"
run floor-infer-32rows-c16   infer --url "$floor" --rows 32 --concurrency 16 --duration "$seconds"
run infer-32rows-c16         infer --url "$inference" --rows 32 --concurrency 16 --duration "$seconds"
run predict-closed-c32       predict --url "$gateway" --concurrency 32 --duration "$seconds"
# Half of the saturation just measured: the open-loop tail target's load.
half="$(python3 -c 'import json,sys; print(max(1, int(json.load(open(sys.argv[1]))["ok_rps"] / 2)))' "$out/predict-closed-c32.json")"
run predict-open-half        predict --url "$gateway" --rate "$half" --duration "$open_seconds"

python3 - "$out" <<'PY'
import json, sys, pathlib, datetime
out = pathlib.Path(sys.argv[1])
names = ["floor-infer-1row-c32", "infer-1row-c32", "floor-infer-32rows-c16", "infer-32rows-c16",
         "predict-closed-c32", "predict-open-half"]
r = {n: json.loads((out / f"{n}.json").read_text()) for n in names}
rows = []
for name in names:
    x = r[name]
    lat = x["latency_ms"]
    errors = ", ".join(f"{k} {v}" for k, v in x["errors"].items()) or "none"
    rows.append(f"| {name} | {x['mode']} | {x['requests']} | {x['ok_rps']:.0f} | {x['rows_per_s']:.0f} | {lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | {lat['p99_9']:.2f} | {errors} |")
def share(a, b, key):
    return r[a][key] / r[b][key] if r[b][key] else 0.0
open_run = r["predict-open-half"]
ratios = [
    ("ModelInfer 1 row, c=32: mesh / floor requests/s", share("infer-1row-c32", "floor-infer-1row-c32", "ok_rps"), 0.80),
    ("ModelInfer 32 rows, c=16: mesh / floor rows/s", share("infer-32rows-c16", "floor-infer-32rows-c16", "rows_per_s"), 0.60),
    ("Predict closed-loop c=32 / floor 1-row requests/s", share("predict-closed-c32", "floor-infer-1row-c32", "ok_rps"), 0.25),
]
ratio_rows = [f"| {what} | {value * 100:.1f} % | ≥ {target * 100:.0f} % | {'met' if value >= target else 'NOT met'} |" for what, value, target in ratios]
tail = open_run["latency_ms"]
open_errors = sum(open_run["errors"].values())
tail_rows = [
    f"| open loop at {open_run['rate']:.0f}/s (half of {r['predict-closed-c32']['ok_rps']:.0f}/s) p99 | {tail['p99']:.2f} ms | ≤ 5 ms | {'met' if tail['p99'] <= 5 else 'NOT met'} |",
    f"| open loop p99.9 | {tail['p99_9']:.2f} ms | ≤ 20 ms | {'met' if tail['p99_9'] <= 20 else 'NOT met'} |",
    f"| open loop errors | {open_errors} | 0 | {'met' if open_errors == 0 else 'NOT met'} |",
]
(out / "ratios.json").write_text(json.dumps({
    "ratios": {what: value for what, value, _ in ratios},
    "open_loop": {"rate": open_run["rate"], "p99_ms": tail["p99"], "p99_9_ms": tail["p99_9"], "errors": open_errors},
}, indent=2))
text = "\n".join([
    f"Benchmark run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC (floor and mesh back to back)",
    "",
    "| scenario | load | requests | ok/s | rows/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors |",
    "|---|---|---|---|---|---|---|---|---|---|",
    *rows,
    "",
    "| against the floor (same run) | measured | target | |",
    "|---|---|---|---|",
    *ratio_rows, *tail_rows, ""])
(out / "summary.md").write_text(text)
print(text)
PY
