# The two commands a newcomer needs, and a few more. See README.md.
.PHONY: up up-ha test bootstrap build bench soak check-deploy fmt lint

## Install what is missing, build, run the whole mesh locally until Ctrl-C.
up:
	bash scripts/up.sh

## Like `make up`, with PostgreSQL as a Patroni cluster (primary + standby) and Redis under Sentinel.
up-ha:
	bash scripts/up.sh --ha

## Install what is missing and run the whole test suite (what CI runs).
test:
	bash scripts/test.sh

## Only install the prerequisites (Redis, PostgreSQL, ONNX Runtime, grpcurl, check-jsonschema, kubectl, kubernetes-validate, promtool, amtool).
bootstrap:
	bash scripts/bootstrap.sh

## Run the benchmark against a running `make up` mesh (release build).
bench:
	bash scripts/bench.sh

## Open-loop Predict load for 10 minutes against `make up`: latency tail, every record logged,
## RSS of each service (after `make bench`, or with RATE=<per second>).
soak:
	bash scripts/soak.sh

## Validate deploy/ (compose schema, Dockerfile consistency).
check-deploy:
	bash scripts/check-deploy.sh

fmt:
	cargo fmt --all

lint:
	cargo clippy --workspace --all-targets -- -D warnings

.PHONY: chaos chaos-short chaos-ha chaos-ha-short check-supervise check-alerts check-k8s
## Render deploy/k8s (dev and prod) with kustomize, validate strictly for Kubernetes 1.30, check its invariants.
check-k8s:
	bash scripts/check-k8s.sh

## Check and unit-test the alert rules, the Alertmanager config and the runbooks (offline, seconds).
check-alerts:
	bash scripts/check-alerts.sh

## The chaos suite: the real mesh as processes, faults injected under load (release, 30 s faults).
chaos:
	bash scripts/chaos.sh

## The short chaos suite CI can run: debug build, 10 s faults, invariants enforced.
chaos-short:
	bash scripts/chaos.sh --short

## The HA chaos scenarios (14-16): Patroni and Sentinel failovers, inference scaled through DNS (release).
chaos-ha:
	bash scripts/chaos.sh --ha

## The HA chaos scenarios, short: debug build, 10 s faults, invariants enforced (not run by `make test`).
chaos-ha-short:
	bash scripts/chaos.sh --short --ha

## Check that `make up` restarts a crashed service (debug build, its own ports and run directory).
check-supervise:
	bash scripts/check-supervise.sh
