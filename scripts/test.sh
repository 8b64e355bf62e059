#!/usr/bin/env bash
# `make test` (and CI): installs what is missing, then runs every test against real Redis,
# PostgreSQL and ONNX Runtime (started by the test harness on loopback ports), validates the
# deployment files and the alert rules (scripts/check-alerts.sh), then checks that `make up`
# restarts a crashed service (scripts/check-supervise.sh) and runs the short chaos suite
# (scripts/chaos.sh --short). Debug builds: fast to compile, and the targets here are behaviour.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
started=$(date +%s)
step() { printf '\n\033[1m== %s\033[0m (%ss)\n' "$*" "$(( $(date +%s) - started ))" >&2; }

step "bootstrap"
# --ha: the HA tests (tests/ha.rs) start Patroni, etcd and Redis Sentinel.
bash scripts/bootstrap.sh --ha
# shellcheck source=/dev/null
source .tools/env

step "format"
cargo fmt --all --check

step "lint (clippy, warnings are errors)"
cargo clippy --workspace --all-targets --locked -q -- -D warnings

step "build (debug, all binaries: the whole-mesh tests start them as processes)"
cargo build --workspace --bins --locked

step "tests"
cargo test --workspace --locked -- --test-threads="${MESH_TEST_THREADS:-2}"

step "deployment files"
bash scripts/check-deploy.sh
bash scripts/check-k8s.sh

step "alerts as code (promtool check/test rules, amtool check-config, a runbook per alert)"
bash scripts/check-alerts.sh

step "chaos: make up restarts a kill -9'd replica (about 10 s), then the short chaos suite (the real mesh as processes, faults under load; invariants enforced)"
bash scripts/check-supervise.sh
bash scripts/chaos.sh --short

step "all green"
