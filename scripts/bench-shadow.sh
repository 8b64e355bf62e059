#!/usr/bin/env bash
# What a shadow at 100 % of traffic costs the primary path, against a running `make up` mesh
# (release build; loopback only; bounded). Closed-loop Predict (c=32) runs off, then BENCH_PAIRS
# (default 3) times on, off, each BENCH_SECONDS (default 20): "on" is `meshctl models shadow churn
# 2` (every answered prediction is copied to version 2 and scored in the background, in batches,
# in its own bulkhead), "off" is `--stop`. Prints each "on" run's throughput as a share of the
# mean of the "off" runs around it, their median (the figure judged: one noisy neighbour on a
# shared machine moves a single share by ±10 %), and how many copies were scored, shed (the
# shadow's queue full: the primary is not slowed, the copy is dropped and counted) and not logged.
# Writes bench-results/shadow.json. The target (issue 9): a shadow costs the primary at most 10 %
# of its throughput, and under saturation it is shed rather than slowing the primary.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
seconds="${BENCH_SECONDS:-20}"
pairs="${BENCH_PAIRS:-3}"
gateway="${MESH_GATEWAY_URL:-http://127.0.0.1:50051}"
metrics="${MESH_GATEWAY_METRICS_URL:-http://127.0.0.1:9101/metrics}"
if [ -z "${MESH_ADMIN_KEY:-}" ] && [ -r .run/admin-key ]; then
  MESH_ADMIN_KEY="$(cat .run/admin-key)"
fi
[ -n "${MESH_ADMIN_KEY:-}" ] || { echo "no admin key: start the mesh with 'make up' (it writes .run/admin-key) or set MESH_ADMIN_KEY" >&2; exit 1; }
export MESH_ADMIN_KEY MESH_GATEWAY_URL="$gateway"
# shellcheck source=/dev/null
source .tools/env
cargo build --release --locked -q -p mesh-bench -p meshctl
bin="$root/target/release"
"$bin/meshctl" health --url "$gateway" >/dev/null 2>&1 || { echo "no SERVING gateway at $gateway: start the mesh with 'make up' first" >&2; exit 1; }
out="$root/bench-results"
mkdir -p "$out"
shadow_counts() { # scored shed not_logged, summed over versions
  curl -fsS "$metrics" | python3 -c '
import sys, re
c = {"scored": 0.0, "shed": 0.0, "not_logged": 0.0}
for line in sys.stdin:
    m = re.match(r"mesh_shadow_predictions_total\{([^}]*)\} (\S+)", line)
    if m:
        o = re.search(r"outcome=\"(\w+)\"", m.group(1)).group(1)
        if o in c: c[o] += float(m.group(2))
print(int(c["scored"]), int(c["shed"]), int(c["not_logged"]))'
}
"$bin/meshctl" models shadow churn --stop --reason "bench-shadow: start clean" >/dev/null 2>&1 || true
runs=()
phases=(off)
for _ in $(seq 1 "$pairs"); do phases+=(on off); done
for phase in "${phases[@]}"; do
  if [ "$phase" = on ]; then
    "$bin/meshctl" models shadow churn 2 --reason "bench-shadow: 100 % shadow" >/dev/null
    sleep 2 # the replicas load version 2 and the gateways see it ready
  else
    "$bin/meshctl" models shadow churn --stop --reason "bench-shadow: off" >/dev/null 2>&1 || true
    sleep 1
  fi
  before="$(shadow_counts)"
  result="$("$bin/mesh-bench" predict --url "$gateway" --concurrency 32 --duration "$seconds" --format json 2>/dev/null)"
  after="$(shadow_counts)"
  runs+=("$(python3 -c '
import json, sys
r = json.loads(sys.argv[1]); b = list(map(int, sys.argv[3].split())); a = list(map(int, sys.argv[4].split()))
print(json.dumps({"phase": sys.argv[2], "ok_rps": r["ok_rps"], "errors": sum(r["errors"].values()), "p99_ms": r["latency_ms"]["p99"],
                  "shadow_scored": a[0] - b[0], "shadow_shed": a[1] - b[1], "shadow_not_logged": a[2] - b[2]}))' "$result" "$phase" "$before" "$after")")
  echo "${runs[-1]}"
done
"$bin/meshctl" models shadow churn --stop --reason "bench-shadow: done" >/dev/null 2>&1 || true
printf '%s\n' "${runs[@]}" | python3 -c '
import json, sys
runs = [json.loads(l) for l in sys.stdin]
shares = []
for i, r in enumerate(runs):
    if r["phase"] == "on":
        base = (runs[i - 1]["ok_rps"] + runs[i + 1]["ok_rps"]) / 2
        shares.append(r["ok_rps"] / base)
        print("shadow on: {:.0f}/s = {:.1f} % of the runs around it ({:.0f}/s); copies scored {}, shed {}, not logged {}; errors {}".format(
            r["ok_rps"], 100 * r["ok_rps"] / base, base, r["shadow_scored"], r["shadow_shed"], r["shadow_not_logged"], r["errors"]))
median = sorted(shares)[len(shares) // 2] if len(shares) % 2 else sum(sorted(shares)[len(shares) // 2 - 1:len(shares) // 2 + 1]) / 2
scored = sum(r["shadow_scored"] for r in runs); shed = sum(r["shadow_shed"] for r in runs)
print("median share {:.1f} %; copies scored {} ({:.0f} % of all), shed {}".format(100 * median, scored, 100 * scored / max(1, scored + shed), shed))
json.dump({"runs": runs, "on_over_off": shares, "median": median}, open(sys.argv[1], "w"), indent=2)
print("target: median share >= 90 %:", "met" if median >= 0.9 else "NOT met")' "$out/shadow.json"
