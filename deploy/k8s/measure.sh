#!/usr/bin/env bash
# Where the resource requests and limits in deploy/k8s come from: CPU and memory of each process
# of a running `make up` mesh, idle and under the benchmark's load.
#
#   make up                              # terminal 1 (release build)
#   bash deploy/k8s/measure.sh           # terminal 2: about 2 minutes
#
# Phases: 10 s idle; Predict open-loop at MEASURE_RATE (1,500/s, the benchmark's latency-SLO
# scenario) for MEASURE_SECONDS (30); Predict closed-loop with MEASURE_CONCURRENCY (32) workers
# (as fast as the mesh goes) for the same. A phase with errors (printed at the end) measured a
# mesh that was overloaded: lower the rate, or measure on a quieter machine. Every second it reads /proc for each process (CPU time; RSS; PSS for PostgreSQL, whose
# backends share memory) and prints, per process and phase, mean and peak CPU in cores and peak
# memory, plus CPU milliseconds per 1,000 requests (what scales with traffic). Loopback only;
# every run is bounded. Override the run directory with MESH_RUN_DIR, the gateway with
# MESH_GATEWAY_URL. The figures in deploy/k8s came from two runs (README, "Resource requests and
# limits"):
#
#   MEASURE_CONCURRENCY=8 bash deploy/k8s/measure.sh
#   MEASURE_RATE=300 MEASURE_CONCURRENCY=4 MEASURE_ENTITIES=100000 bash deploy/k8s/measure.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
run="${MESH_RUN_DIR:-$root/.run}"
gateway="${MESH_GATEWAY_URL:-http://127.0.0.1:50051}"
seconds="${MEASURE_SECONDS:-30}"
rate="${MEASURE_RATE:-1500}"
concurrency="${MEASURE_CONCURRENCY:-32}"
# Distinct entities the load cycles through (cust-00001 …). Beyond the demo's 1,000 the script
# seeds the rest first (the demo's features, cycled; meshctl seed to MESH_FEATURES_URL), so
# features' memory tier misses and Redis and PostgreSQL see real reads.
entities="${MEASURE_ENTITIES:-1000}"
features="${MESH_FEATURES_URL:-http://127.0.0.1:50052}"
bench="${CARGO_TARGET_DIR:-$root/target}/release/mesh-bench"
[ -x "$bench" ] && [ -x "$(dirname "$bench")/meshctl" ] ||
  cargo build --release --locked -q -p mesh-bench -p meshctl
for name in gateway features inference-1 inference-2 logger postgres redis; do
  [ -r "$run/pids/$name" ] && kill -0 "$(cat "$run/pids/$name")" 2>/dev/null ||
    { echo "no running $name in $run/pids: start the mesh with 'make up' first" >&2; exit 1; }
done
samples="$(mktemp -d)"
trap 'rm -rf "$samples"' EXIT
if [ "$entities" -gt 1000 ]; then
  python3 - "$entities" "$samples/entities.jsonl" <<'PY'
import json, sys
n, out = int(sys.argv[1]), sys.argv[2]
demo = [json.loads(line) for line in open("data/demo_entities.jsonl")]
with open(out, "w") as f:
    for i in range(1, n + 1):
        f.write(json.dumps({**demo[(i - 1) % len(demo)], "entity_id": f"cust-{i:05d}"}) + "\n")
PY
  echo "== seeding $entities entities" >&2
  MESH_INTERNAL_TOKEN="${MESH_INTERNAL_TOKEN:-$(cat "$run/internal-token")}" \
    "$(dirname "$bench")/meshctl" seed --features-url "$features" --file "$samples/entities.jsonl" |
    tail -n1 >&2
fi

# Samples every process once a second into $samples/<phase>.tsv until $samples/stop-<phase> exists.
sample() {
  local phase=$1
  python3 - "$run/pids" "$samples/$phase.tsv" "$samples/stop-$phase" <<'PY'
import os, sys, time
pids_dir, out, stop = sys.argv[1:]
tick = os.sysconf("SC_CLK_TCK")
names = ["gateway", "features", "inference-1", "inference-2", "logger", "postgres", "redis"]
def tree(pid):
    """pid and, for PostgreSQL, its backends and workers."""
    kids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(p))
            except OSError:
                pass
    return [pid] + kids
def cpu_and_mem(pids, pss):
    cpu = mem = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / tick
            key = "Pss:" if pss else "Rss:"
            with open(f"/proc/{p}/smaps_rollup") as f:
                mem += next(int(l.split()[1]) for l in f if l.startswith(key)) * 1024
        except (OSError, StopIteration):
            pass
    return cpu, mem
pids = {n: int(open(f"{pids_dir}/{n}").read()) for n in names}
with open(out, "w") as f:
    while not os.path.exists(stop):
        now = time.monotonic()
        for n, pid in pids.items():
            group = tree(pid) if n == "postgres" else [pid]
            cpu, mem = cpu_and_mem(group, n == "postgres")
            f.write(f"{now}\t{n}\t{cpu}\t{mem}\n")
        f.flush()
        time.sleep(1)
PY
}

phase() { # name, seconds or a mesh-bench command
  local name=$1; shift
  sample "$name" &
  local sampler=$!
  if [ "$1" = idle ]; then sleep 10; else "$bench" "$@" --output "$samples/$name.json" >&2; fi
  touch "$samples/stop-$name"
  wait "$sampler"
}

echo "== idle (10 s)" >&2
phase idle idle
echo "== Predict open-loop ${rate}/s, ${seconds} s" >&2
phase open predict --url "$gateway" --rate "$rate" --entities "$entities" --duration "$seconds" --name "measure-open-$rate"
# Let the records of the first phase reach PostgreSQL before the next.
sleep 10
echo "== Predict closed-loop c=${concurrency}, ${seconds} s" >&2
phase closed predict --url "$gateway" --concurrency "$concurrency" --entities "$entities" --duration "$seconds" --name "measure-closed-c$concurrency"

python3 - "$samples" <<'PY'
import json, sys, collections
d = sys.argv[1]
print(f"{'process':12} {'phase':11} {'req/s':>7} {'cpu mean':>9} {'cpu peak':>9} {'cpu ms/1k req':>14} {'mem peak MiB':>13}")
for phase in ["idle", "open", "closed"]:
    rows = collections.defaultdict(list)
    for line in open(f"{d}/{phase}.tsv"):
        t, name, cpu, mem = line.split("\t")
        rows[name].append((float(t), float(cpu), int(mem)))
    rps = None
    if phase != "idle":
        r = json.load(open(f"{d}/{phase}.json"))
        rps = r["ok_rps"]
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "none"
        print(f"# {r['name']}: {r['mode']}, {r['ok']} OK of {r['requests']}, p99 {r['latency_ms']['p99']:.1f} ms, errors: {errors}")
    for name, s in rows.items():
        span = s[-1][0] - s[0][0]
        used = s[-1][1] - s[0][1]
        mean = used / span if span else 0
        peak = max((b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(s, s[1:]) if b[0] > a[0])
        per_k = f"{1000 * mean / rps * 1000:.1f}" if rps else "-"
        mem = max(x[2] for x in s) / 2**20
        print(f"{name:12} {phase:11} {rps or 0:7.0f} {mean:9.3f} {peak:9.3f} {per_k:>14} {mem:13.1f}")
PY
