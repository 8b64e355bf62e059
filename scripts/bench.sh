#!/usr/bin/env bash
# `make bench`: the benchmark suite against a running local mesh (`make up` in another
# terminal). Release build of the load generator; loopback targets only; every run is bounded.
#
# First the transport floor: `mesh-bench floor`, a bare tonic KServe server that decodes each
# ModelInfer and answers a fixed tensor (no model, no middleware), started here on a free loopback
# port and stopped on exit. Each ModelInfer load runs against the floor and against the mesh's
# inference replica alternately, BENCH_PAIRS pairs (default 3); Predict runs closed-loop, then
# open-loop at half the closed-loop rate it just measured. Each mesh figure is reported as a share
# of the floor's from the same run, the median over the pairs (this machine is shared and noisy:
# ratios, not absolute rates, are comparable).
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
pairs="${BENCH_PAIRS:-3}"
open_seconds="${BENCH_OPEN_SECONDS:-$seconds}"
run() { # name, then mesh-bench arguments (nopause=1: no pause before it)
  local name=$1; shift
  # Let the previous scenario's backlog (e.g. prediction records being written) settle first.
  [ "${nopause:-0}" = 1 ] || sleep "$pause"
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

# Floor and mesh alternate, PAIRS times per load, so a burst of noise on this shared machine hits
# one run of a pair rather than every floor figure; each ratio is the median of the pairs'.
# (ModelInfer calls leave no backlog, so these runs need no pause between them.)
for i in $(seq "$pairs"); do
  nopause=1 run "floor-infer-1row-c32-$i" infer --url "$floor" --rows 1 --concurrency 32 --duration "$seconds"
  nopause=1 run "infer-1row-c32-$i"       infer --url "$inference" --rows 1 --concurrency 32 --duration "$seconds"
done
for i in $(seq "$pairs"); do
  nopause=1 run "floor-infer-32rows-c16-$i" infer --url "$floor" --rows 32 --concurrency 16 --duration "$seconds"
  nopause=1 run "infer-32rows-c16-$i"       infer --url "$inference" --rows 32 --concurrency 16 --duration "$seconds"
done
run predict-closed-c32       predict --url "$gateway" --concurrency 32 --duration "$seconds"
# Half of the saturation just measured: the open-loop tail target's load.
half="$(python3 -c 'import json,sys; print(max(1, int(json.load(open(sys.argv[1]))["ok_rps"] / 2)))' "$out/predict-closed-c32.json")"
run predict-open-half        predict --url "$gateway" --rate "$half" --duration "$open_seconds"

python3 - "$out" "$pairs" <<'PY'
import json, sys, pathlib, datetime, statistics
out, pairs = pathlib.Path(sys.argv[1]), int(sys.argv[2])
loads = [("floor-infer-1row-c32", "infer-1row-c32"), ("floor-infer-32rows-c16", "infer-32rows-c16")]
names = [f"{n}-{i}" for floor, mesh in loads for i in range(1, pairs + 1) for n in (floor, mesh)]
names += ["predict-closed-c32", "predict-open-half"]
r = {n: json.loads((out / f"{n}.json").read_text()) for n in names}
rows = []
for name in names:
    x = r[name]
    lat = x["latency_ms"]
    errors = ", ".join(f"{k} {v}" for k, v in x["errors"].items()) or "none"
    rows.append(f"| {name} | {x['mode']} | {x['requests']} | {x['ok_rps']:.0f} | {x['rows_per_s']:.0f} | {lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | {lat['p99_9']:.2f} | {errors} |")
def pair_ratios(floor, mesh, key):
    return [r[f"{mesh}-{i}"][key] / r[f"{floor}-{i}"][key] if r[f"{floor}-{i}"][key] else 0.0 for i in range(1, pairs + 1)]
floor_1row = statistics.median(r[f"floor-infer-1row-c32-{i}"]["ok_rps"] for i in range(1, pairs + 1))
one = pair_ratios(*loads[0], "ok_rps")
many = pair_ratios(*loads[1], "rows_per_s")
open_run = r["predict-open-half"]
closed = r["predict-closed-c32"]["ok_rps"]
ratios = [
    ("ModelInfer 1 row, c=32: mesh / floor requests/s", statistics.median(one), one, 0.80),
    ("ModelInfer 32 rows, c=16: mesh / floor rows/s", statistics.median(many), many, 0.60),
    ("Predict closed-loop c=32 / floor 1-row requests/s (median of the floor runs)", closed / floor_1row if floor_1row else 0.0, [], 0.25),
]
def pairs_text(values):
    return f" (pairs: {', '.join(f'{v * 100:.1f}' for v in values)})" if values else ""
ratio_rows = [f"| {what} | {value * 100:.1f} %{pairs_text(each)} | ≥ {target * 100:.0f} % | {'met' if value >= target else 'NOT met'} |" for what, value, each, target in ratios]
tail = open_run["latency_ms"]
open_errors = sum(open_run["errors"].values())
tail_rows = [
    f"| open loop at {open_run['rate']:.0f}/s (half of {closed:.0f}/s) p99 | {tail['p99']:.2f} ms | ≤ 5 ms | {'met' if tail['p99'] <= 5 else 'NOT met'} |",
    f"| open loop p99.9 | {tail['p99_9']:.2f} ms | ≤ 20 ms | {'met' if tail['p99_9'] <= 20 else 'NOT met'} |",
    f"| open loop errors | {open_errors} | 0 | {'met' if open_errors == 0 else 'NOT met'} |",
]
(out / "ratios.json").write_text(json.dumps({
    "ratios": {what: value for what, value, _, _ in ratios},
    "pairs": {what: each for what, _, each, _ in ratios if each},
    "open_loop": {"rate": open_run["rate"], "p99_ms": tail["p99"], "p99_9_ms": tail["p99_9"], "errors": open_errors},
}, indent=2))
text = "\n".join([
    f"Benchmark run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC (floor and mesh alternating, {pairs} pairs per ModelInfer load)",
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
