#!/usr/bin/env bash
# `make chaos` / `make chaos-short`: the chaos suite (tools/chaos, binary mesh-chaos).
#
# Starts the real mesh as separate processes on free loopback ports (its own PostgreSQL and
# Redis, features, two inference replicas, logger, two gateways; the live model registry in that
# PostgreSQL, followed by the gateways and the replicas), seeds it, drives open-loop load with
# mesh-bench and injects one fault at a time: kill -9 of an inference replica, Redis stopped,
# PostgreSQL stopped, +500 ms on one replica (an injected fake: a proxy inside mesh-chaos),
# kill -9 of the logger, SIGTERM to the gateway under load, bad input at volume, kill -9 of the
# gateway under load, PostgreSQL hung (SIGSTOP), poison records sent to the logger, and the model
# lifecycle: 50 promotions/rollbacks under load (11), a 10 % canary of a broken version that
# must roll itself back on every gateway (12), and kill -9 of a replica while it loads a newly
# promoted version (13; its golden fixture held in a FIFO by mesh-chaos: the other fake). Every
# scenario checks what the client received: served > 0, served == OK answers, every served id
# in PostgreSQL once, records stamped with their serve time. Writes chaos-results/summary.md,
# chaos-results/chaos.json and chaos-results/logs/<service>.log.
#
# Scenario 0 is the steady baseline (load, no fault). Alerts are proven live: a real Prometheus
# (Debian's, loopback, its own temp data dir) scrapes every service every 500 ms and evaluates the
# shipped rules (deploy/prometheus/rules/*.yml) rendered on a compressed time scale (every for:,
# range window and age threshold / 60, windows >= 2 s, durations <= 60 s; written to
# chaos-results/alerting/); a real Alertmanager with the shipped routing posts to a webhook inside
# mesh-chaos. Each scenario lists the alerts that must and may fire
# (tools/chaos/src/alerts/expect.rs); a missing, unexpected or unresolved alert fails it, in both
# modes. The summary's "alerts fired" / "alerts resolved" columns give the times after the fault
# was injected / lifted.
#
#   bash scripts/chaos.sh            release build, 30 s faults, 300 req/s, all targets enforced
#   bash scripts/chaos.sh --short    debug build, 10 s faults, 100 req/s, invariants enforced (CI)
#   bash scripts/chaos.sh [--short] --ha
#                                    the HA mode (`make chaos-ha`, `make chaos-ha-short`), written
#                                    to chaos-results/ha/: the mesh on a Patroni cluster and Redis
#                                    under Sentinel (scripts/bootstrap.sh --ha installs patroni,
#                                    etcd-server, redis-sentinel), the gateways finding the
#                                    inference replicas through DNS, and scenarios 14-16: kill -9
#                                    of the PostgreSQL primary, kill -9 of the Redis master,
#                                    inference scaled 2 -> 3 -> 1. Not part of `make test`.
#
# Further arguments go to mesh-chaos (e.g. --only 1,4 or --only 11,12,13; see target/<profile>/mesh-chaos --help).
# Everything it starts is stopped on exit, error or Ctrl-C; it does not touch `make up`'s .run/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

short=0
ha=()
out=chaos-results
while [ $# -gt 0 ]; do
  case "$1" in
    --short) short=1 ;;
    --ha) ha=(--ha); out=chaos-results/ha ;;
    *) break ;;
  esac
  shift
done

bash scripts/bootstrap.sh "${ha[@]}"
# shellcheck source=/dev/null
source .tools/env

if [ "$short" = 1 ]; then
  echo "[chaos] building (debug)…" >&2
  cargo build --bins --locked -q
  args=(--profile debug --fault-secs 10 --rate 100 --recover-secs 30 --deliver-secs 60
        --bad-requests 2000 --enforce-invariants)
else
  echo "[chaos] building (release)…" >&2
  cargo build --release --bins --locked -q
  args=(--profile release --fault-secs 30 --rate 300 --recover-secs 30 --deliver-secs 60
        --bad-requests 5000 --enforce)
fi
profile_dir=$([ "$short" = 1 ] && echo debug || echo release)
exec "$root/target/$profile_dir/mesh-chaos" --repo "$root" --out "$out" "${ha[@]}" "${args[@]}" "$@"
