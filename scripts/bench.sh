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
# Two more runs put the open-loop tail in context: the floor's own ModelInfer tail at the same
# half rate (one bare hop, where the mesh's Predict makes four in a row plus a disk flush), and
# Predict at a light load (a twentieth of saturation: the mesh's tail with next to no queueing).
# Each run also reports the CPU time per request of the load generator and, where this machine
# runs them, of the server processes (the floor; the replica listening on the inference URL; the
# processes `make up` started, from .run/pids), so a ratio comes with what each side costs.
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

# Whose CPU time each run reports beside its own (`--cpu-of NAME=PID[,PID...]`), for processes
# on this machine only: the one listening on a URL's port, and the processes of `make up`.
listener_pid() { # URL -> the pid listening on its port here, if any (from /proc: no `ss` needed)
  local port="${1##*:}"; port="${port%%/*}"
  python3 - "$port" <<'PY' 2>/dev/null || true
import os, sys
port = int(sys.argv[1])
inodes = set()
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        lines = open(table).read().splitlines()[1:]
    except OSError:
        continue
    for line in lines:
        f = line.split()
        if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":  # 0A: LISTEN
            inodes.add(f"socket:[{f[9]}]")
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        continue
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                print(pid)
                sys.exit(0)
        except OSError:
            pass
PY
}
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
floor_cpu=(--cpu-of "floor=$floor_pid")
replica_cpu=()
replica_pid="$(listener_pid "$inference")"
alive "$replica_pid" && replica_cpu=(--cpu-of "replica=$replica_pid")
mesh_cpu=()
# Each with its child processes: PostgreSQL's postmaster with its backends (the logger's among them).
for name in gateway features inference-1 inference-2 logger redis postgres; do
  pid="$(cat "$root/.run/pids/$name" 2>/dev/null || true)"
  alive "$pid" && mesh_cpu+=(--cpu-of "$name=$pid")
done

# Floor and mesh alternate, PAIRS times per load, so a burst of noise on this shared machine hits
# one run of a pair rather than every floor figure; each ratio is the median of the pairs'.
# (ModelInfer calls leave no backlog, so these runs need no pause between them.)
for i in $(seq "$pairs"); do
  nopause=1 run "floor-infer-1row-c32-$i" infer --url "$floor" --rows 1 --concurrency 32 --duration "$seconds" "${floor_cpu[@]}"
  nopause=1 run "infer-1row-c32-$i"       infer --url "$inference" --rows 1 --concurrency 32 --duration "$seconds" "${replica_cpu[@]}"
done
for i in $(seq "$pairs"); do
  nopause=1 run "floor-infer-32rows-c16-$i" infer --url "$floor" --rows 32 --concurrency 16 --duration "$seconds" "${floor_cpu[@]}"
  nopause=1 run "infer-32rows-c16-$i"       infer --url "$inference" --rows 32 --concurrency 16 --duration "$seconds" "${replica_cpu[@]}"
done
run predict-closed-c32       predict --url "$gateway" --concurrency 32 --duration "$seconds" "${mesh_cpu[@]}"
# Half of the saturation just measured: the open-loop tail target's load.
half="$(python3 -c 'import json,sys; print(max(1, int(json.load(open(sys.argv[1]))["ok_rps"] / 2)))' "$out/predict-closed-c32.json")"
run predict-open-half        predict --url "$gateway" --rate "$half" --duration "$open_seconds" "${mesh_cpu[@]}"
# The tail in context: one bare hop at the same rate, and the mesh at a twentieth of saturation.
nopause=1 run floor-open-half infer --url "$floor" --rows 1 --rate "$half" --duration "$seconds" "${floor_cpu[@]}"
light="$(( half / 10 > 50 ? half / 10 : 50 ))"
run predict-open-light       predict --url "$gateway" --rate "$light" --duration "$seconds" "${mesh_cpu[@]}"

python3 - "$out" "$pairs" <<'PY'
import json, sys, pathlib, datetime, statistics
out, pairs = pathlib.Path(sys.argv[1]), int(sys.argv[2])
loads = [("floor-infer-1row-c32", "infer-1row-c32"), ("floor-infer-32rows-c16", "infer-32rows-c16")]
names = [f"{n}-{i}" for floor, mesh in loads for i in range(1, pairs + 1) for n in (floor, mesh)]
names += ["predict-closed-c32", "predict-open-half", "floor-open-half", "predict-open-light"]
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
floor_open, light_run = r["floor-open-half"], r["predict-open-light"]
context_rows = [
    f"| floor, one bare ModelInfer hop, open loop at {floor_open['rate']:.0f}/s | {floor_open['latency_ms']['p50']:.2f} | {floor_open['latency_ms']['p99']:.2f} | {floor_open['latency_ms']['p99_9']:.2f} |",
    f"| mesh Predict, open loop at {light_run['rate']:.0f}/s (a twentieth of saturation) | {light_run['latency_ms']['p50']:.2f} | {light_run['latency_ms']['p99']:.2f} | {light_run['latency_ms']['p99_9']:.2f} |",
    f"| mesh Predict, open loop at {open_run['rate']:.0f}/s (half of saturation) | {tail['p50']:.2f} | {tail['p99']:.2f} | {tail['p99_9']:.2f} |",
]
# CPU per request: the median over the pairs for the ModelInfer loads, each process's own.
def cpu_of(name):
    return r[name].get("cpu_us_per_request", {})
def median_cpu(prefix):
    runs = [cpu_of(f"{prefix}-{i}") for i in range(1, pairs + 1)]
    keys = sorted(set().union(*runs)) if runs else []
    return {k: statistics.median(x[k] for x in runs if k in x) for k in keys}
cpu = {
    "ModelInfer 1 row, floor": median_cpu("floor-infer-1row-c32"),
    "ModelInfer 1 row, mesh": median_cpu("infer-1row-c32"),
    "ModelInfer 32 rows, floor": median_cpu("floor-infer-32rows-c16"),
    "ModelInfer 32 rows, mesh": median_cpu("infer-32rows-c16"),
    f"Predict closed loop c=32": cpu_of("predict-closed-c32"),
    f"Predict open loop at {open_run['rate']:.0f}/s": cpu_of("predict-open-half"),
    f"Predict open loop at {light_run['rate']:.0f}/s": cpu_of("predict-open-light"),
}
def order(k):
    return (k == "total", k == "client", k)
cpu_rows = [f"| {what} | " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(each.items(), key=lambda kv: order(kv[0]))) + " |" for what, each in cpu.items() if each]
(out / "ratios.json").write_text(json.dumps({
    "ratios": {what: value for what, value, _, _ in ratios},
    "pairs": {what: each for what, _, each, _ in ratios if each},
    "open_loop": {"rate": open_run["rate"], "p99_ms": tail["p99"], "p99_9_ms": tail["p99_9"], "errors": open_errors},
    "tail_context": {
        "floor_open_half": {"rate": floor_open["rate"], **{k: floor_open["latency_ms"][k] for k in ("p50", "p99", "p99_9")}},
        "predict_open_light": {"rate": light_run["rate"], **{k: light_run["latency_ms"][k] for k in ("p50", "p99", "p99_9")}},
    },
    "cpu_us_per_request": cpu,
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
    *ratio_rows, *tail_rows,
    "",
    "The open-loop tail in context (same run): one bare hop of the floor at the same rate, and the mesh with next to no queueing.",
    "",
    "| open loop | p50 ms | p99 ms | p99.9 ms |",
    "|---|---|---|---|",
    *context_rows,
    *([
        "",
        "CPU time per request, in microseconds, of each process this machine ran for it (from schedstat, over the measured run; `client` is the load generator, beside the servers on the same cores).",
        "",
        "| load | CPU us per request |",
        "|---|---|",
        *cpu_rows,
    ] if cpu_rows else []),
    ""])
(out / "summary.md").write_text(text)
print(text)
PY
