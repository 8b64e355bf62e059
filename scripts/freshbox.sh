#!/usr/bin/env bash
# The fresh-box proof (not part of CI): builds a clean Debian 12 root with debootstrap
# (--variant=minbase), adds only build-essential and a Rust toolchain (the host's, bind-mounted
# read-only), clones this checkout's HEAD into /root/mesh inside (root's home, mode 700, as a
# new user who cloned as root would have it) and runs, through chroot, `make up` until it has
# served its prediction (then Ctrl-C, as a user would) and `make test`.
#
#   bash scripts/freshbox.sh [--up-only|--test-only] [--keep]   (as root; an hour or more on 2
#                                                                busy cores)
#
# FRESHBOX_DIR (default /var/tmp/mesh-freshbox) is the root, deleted at the end unless --keep.
# FRESHBOX_LOGS (default .run/freshbox) receives debootstrap.log, setup.log, up.log, test.log
# and summary.txt (each phase's duration, exit status and first error line).
#
# What it takes from the host, read at run time (nothing is hard-coded): the Debian mirror apt
# uses (/etc/apt/sources.list and sources.list.d; FRESHBOX_MIRROR overrides), the CA bundle
# /etc/ssl/certs/ca-certificates.crt (some networks re-sign TLS), apt's Acquire settings (proxies),
# pip's and cargo's config files, resolv.conf, and the proxy, CA and PIP_/CARGO_ variables of
# the environment (a variable naming a file the root lacks is left out). Package installs in the
# root start no daemons (a policy-rc.d, as in any chroot). `make up` inside gets its own free
# ports, so a `make up` on the host may keep running.
#
# Everything runs in a private mount namespace (unshare): /proc, /sys, /dev, /dev/pts, a tmpfs
# on /dev/shm and the toolchain binds are never visible to the host, are unmounted on exit
# (error and Ctrl-C included) and vanish with the namespace in any case. The root is deleted
# only once nothing is mounted below it. Processes left in the root are stopped by PID.
set -euo pipefail

if [ -z "${FRESHBOX_IN_NS:-}" ]; then
  [ "$(id -u)" -eq 0 ] || { echo "[freshbox] needs root (debootstrap, chroot, mounts)" >&2; exit 1; }
  exec unshare --mount --propagation private env FRESHBOX_IN_NS=1 bash "$0" "$@"
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${FRESHBOX_DIR:-/var/tmp/mesh-freshbox}"
logs="${FRESHBOX_LOGS:-$root/.run/freshbox}"
up_timeout="${FRESHBOX_UP_TIMEOUT:-5400}"
test_timeout="${FRESHBOX_TEST_TIMEOUT:-7200}"
up_only=0 test_only=0 keep=0
for arg in "$@"; do
  case $arg in
    --up-only) up_only=1 ;;
    --test-only) test_only=1 ;;
    --keep) keep=1 ;;
    *) echo "usage: scripts/freshbox.sh [--up-only|--test-only] [--keep]" >&2; exit 2 ;;
  esac
done
mkdir -p "$logs"
summary="$logs/summary.txt"
: >"$summary"
say() { printf '[freshbox] %s\n' "$*" | tee -a "$logs/setup.log" >&2; }
record() { printf '%s\n' "$*" | tee -a "$summary" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# The first line of a log that looks like the error that stopped it.
first_error() {
  local pattern
  for pattern in 'panicked at|^error(\[E[0-9]+\])?:|FAILED|\bFAIL\b' \
                 'failed|Permission denied|cannot|No such|ERROR'; do
    sed 's/\x1b\[[0-9;]*m//g' "$1" 2>/dev/null | grep -m1 -E "$pattern" | cut -c1-300 && return 0
  done
  return 0
}

# The Debian mirror apt uses for bookworm (one-line and deb822 source formats).
mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
           if ($(i + 1) == "bookworm") { print $i; exit } }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'BEGIN { RS = "" }
         /(^|\n)Suites:[^\n]*[ \t]bookworm([ \t]|\n|$)/ && /(^|\n)Types:[^\n]*deb([ \t]|\n|$)/ {
           if (match($0, /URIs:[ \t]*[^ \t\n]+/)) {
             u = substr($0, RSTART, RLENGTH); sub(/URIs:[ \t]*/, "", u); print u; exit } }' "$f"
  done
}

mounted=()
mount_in() { # mount args..., the last one the target
  mount "$@"
  mounted+=("${*: -1}")
}
# Processes whose root is the fresh root: only ever ones this script started through chroot.
root_pids() {
  local p
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$dir" ] && echo "${p#/proc/}"
  done
  return 0
}
stop_root_pids() {
  local pids
  pids="$(root_pids)"
  [ -n "$pids" ] || return 0
  say "stopping processes left in the root: $(echo "$pids" | tr '\n' ' ')"
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 20); do [ -n "$(root_pids)" ] || return 0; sleep 0.5; done
  # shellcheck disable=SC2046
  kill -KILL $(root_pids) 2>/dev/null || true
  sleep 1
}
finish() {
  local rc=$?
  trap - EXIT INT TERM
  stop_root_pids
  local i
  for ((i=${#mounted[@]}-1; i>=0; i--)); do
    umount "${mounted[$i]}" 2>/dev/null || umount -l "${mounted[$i]}" 2>/dev/null ||
      say "could not unmount ${mounted[$i]}"
  done
  if [ -d "$dir/root/mesh" ] && ! findmnt -rn -o TARGET | grep -q "^$dir/"; then
    record "disk: the root $(du -sh "$dir" | cut -f1), of which the checkout's target/ $(du -sh "$dir/root/mesh/target" 2>/dev/null | cut -f1)"
  fi
  if findmnt -rn -o TARGET | grep -q "^$dir/"; then
    say "something is still mounted below $dir: not deleting it"
  elif [ "$keep" = 0 ] && [ -d "$dir" ]; then
    say "deleting the root $dir"
    rm -rf --one-file-system "$dir"
  fi
  say "logs in $logs (summary.txt); exit status $rc"
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

# 1. A clean Debian 12 root.
command -v debootstrap >/dev/null 2>&1 || { say "installing debootstrap on the host"; apt-get install -y -qq debootstrap >/dev/null; }
command -v git >/dev/null 2>&1 || { say "git is needed on the host to clone the checkout"; exit 1; }
src="${FRESHBOX_MIRROR:-$(mirror | head -n1)}"
[ -n "$src" ] || { say "no Debian bookworm mirror found in /etc/apt/sources.list*; set FRESHBOX_MIRROR"; exit 1; }
if [ -e "$dir" ]; then
  say "$dir exists (a kept root?): delete it first"
  keep=1
  exit 1
fi
say "debootstrap --variant=minbase bookworm $dir <the configured mirror>"
t0=$SECONDS
if ! debootstrap --variant=minbase bookworm "$dir" "$src" >"$logs/debootstrap.log" 2>&1; then
  record "debootstrap: FAILED after $((SECONDS - t0)) s: $(tail -n 3 "$logs/debootstrap.log" | tr '\n' ' ')"
  exit 1
fi
record "debootstrap (minbase bookworm): $((SECONDS - t0)) s"

# 2. What makes the registries reachable from here, as the host has it.
mkdir -p "$dir/etc/ssl/certs" "$dir/root/.cargo/bin" "$dir/root/.rustup"
cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/ca-certificates.crt"
# Also where update-ca-certificates looks: Debian's ca-certificates package, pulled in later by
# the bootstrap's installs, rebuilds the bundle and would drop a re-signing CA otherwise.
mkdir -p "$dir/usr/local/share/ca-certificates"
cp /etc/ssl/certs/ca-certificates.crt "$dir/usr/local/share/ca-certificates/freshbox-host.crt"
cp -L /etc/resolv.conf "$dir/etc/resolv.conf" 2>/dev/null || true
for f in /etc/apt/apt.conf.d/*; do
  grep -qs 'Acquire::' "$f" && cp "$f" "$dir/etc/apt/apt.conf.d/"
done
for f in /etc/pip.conf /etc/xdg/pip/pip.conf "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf"; do
  [ -f "$f" ] || continue
  target="$dir${f/#$HOME//root}"
  mkdir -p "$(dirname "$target")" && cp "$f" "$target"
done
host_cargo="${CARGO_HOME:-$HOME/.cargo}"
host_rustup="${RUSTUP_HOME:-$HOME/.rustup}"
for f in config.toml config; do
  [ -f "$host_cargo/$f" ] && cp "$host_cargo/$f" "$dir/root/.cargo/$f"
done
[ -f "$host_cargo/env" ] && cp "$host_cargo/env" "$dir/root/.cargo/env"
printf '#!/bin/sh\nexit 101\n' >"$dir/usr/sbin/policy-rc.d"
chmod 755 "$dir/usr/sbin/policy-rc.d"
chmod 700 "$dir/root"

envs=(HOME=/root USER=root LOGNAME=root TERM=dumb LANG=C.UTF-8
      PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
while IFS='=' read -r name value; do
  case $name in
    CARGO_HOME|CARGO_TARGET_DIR|CARGO_BUILD_TARGET_DIR|RUSTUP_HOME|RUSTUP_TOOLCHAIN) continue ;;
    http_proxy|https_proxy|no_proxy|all_proxy|HTTP_PROXY|HTTPS_PROXY|NO_PROXY|ALL_PROXY) ;;
    PIP_*|CARGO_*|RUSTUP_*|SSL_CERT_FILE|SSL_CERT_DIR|REQUESTS_CA_BUNDLE|CURL_CA_BUNDLE) ;;
    *) continue ;;
  esac
  if [[ $value == /* ]] && [ ! -e "$dir$value" ]; then
    say "leaving out $name: it names $value, which the root does not have"
    continue
  fi
  envs+=("$name=$value")
done < <(env)
say "environment passed in: $(printf '%s ' "${envs[@]%%=*}")"

# 3. Mounts (private to this namespace), the toolchain read-only.
mount_in -t proc proc "$dir/proc"
mount_in -t sysfs sysfs "$dir/sys"
mount_in --bind /dev "$dir/dev"
mount_in --bind /dev/pts "$dir/dev/pts"
mount_in -t tmpfs -o mode=1777 shm "$dir/dev/shm"
mount_in --bind "$host_rustup" "$dir/root/.rustup"
mount -o remount,bind,ro "$dir/root/.rustup"
mount_in --bind "$host_cargo/bin" "$dir/root/.cargo/bin"
mount -o remount,bind,ro "$dir/root/.cargo/bin"

in_root() { chroot "$dir" /usr/bin/env -i "${envs[@]}" /bin/bash -c "$1"; }

# 4. Only build-essential, as the issue's new user had.
t0=$SECONDS
if ! in_root 'export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends build-essential' \
    >>"$logs/setup.log" 2>&1 </dev/null; then
  record "apt-get install build-essential: FAILED: $(first_error "$logs/setup.log")"
  exit 1
fi
record "apt-get install build-essential: $((SECONDS - t0)) s"

# 5. The checkout (HEAD, committed state only) in root's home.
head="$(git -C "$root" rev-parse HEAD)"
git clone -q --no-hardlinks "$root" "$dir/root/mesh"
git -C "$dir/root/mesh" checkout -q "$head"
record "checkout: $head in /root/mesh (/root mode $(stat -c %a "$dir/root")); toolchain: $(in_root 'rustc --version')"

# Runs `script` in the root as a job of its own (its own process group, SIGINT not ignored, as
# at a terminal), up to `timeout` s, logging to `log`;
# `until` (a pattern), when given, ends the wait once the log shows it. Sets ran_rc, ran_secs.
run_phase() { # log timeout script [until]
  local log=$1 limit=$2 script=$3 until=${4:-} started=$SECONDS pgid
  : >"$log"
  set -m
  chroot "$dir" /usr/bin/env -i "${envs[@]}" /bin/bash -c "$script" >"$log" 2>&1 </dev/null &
  pgid=$!
  set +m
  ran_rc=""
  while kill -0 "$pgid" 2>/dev/null; do
    if [ -n "$until" ] && grep -q "$until" "$log"; then ran_rc=reached; break; fi
    if [ $((SECONDS - started)) -ge "$limit" ]; then ran_rc=timeout; break; fi
    sleep 2
  done
  ran_secs=$((SECONDS - started))
  if [ -z "$ran_rc" ]; then
    ran_rc=0
    wait "$pgid" || ran_rc=$?
    return 0
  fi
  # Ctrl-C: SIGINT to the job's process group, as a terminal sends it; then wait for everything
  # in the root to finish its own clean-up.
  kill -INT -- "-$pgid" 2>/dev/null || true
  for _ in $(seq 1 90); do [ -n "$(root_pids)" ] || break; sleep 1; done
  local stop_rc=0
  wait "$pgid" || stop_rc=$?
  echo "[freshbox] stopped with Ctrl-C (SIGINT) after ${ran_secs} s; exit status $stop_rc" >>"$log"
  stop_root_pids
}

# 6. make up, until it has served the prediction and printed its help ("The mesh is up.").
up_ok=1
[ "$test_only" = 1 ] || {
# Below the kernel's ephemeral range (a port there can be taken by an outgoing connection).
ephemeral_lo="$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)"
span=$(( ephemeral_lo - 10000 - 13 ))
[ "$span" -gt 100 ] || span=20000
base=""
for _ in $(seq 1 30); do
  candidate=$((10000 + RANDOM % span)) busy=0
  for port in $(seq "$candidate" $((candidate + 12))); do port_open "$port" && { busy=1; break; }; done
  [ "$busy" = 0 ] && { base=$candidate; break; }
done
[ -n "$base" ] || { say "no 13 free consecutive ports"; exit 1; }
ports="MESH_GATEWAY_PORT=$base MESH_FEATURES_PORT=$((base + 1)) MESH_INFERENCE1_PORT=$((base + 2))"
ports+=" MESH_INFERENCE2_PORT=$((base + 3)) MESH_LOGGER_PORT=$((base + 4)) MESH_PG_PORT=$((base + 5))"
ports+=" MESH_REDIS_PORT=$((base + 6)) MESH_METRICS_BASE_PORT=$((base + 7)) MESH_PROMETHEUS_PORT=$((base + 12))"
say "make up (ports $base..$((base + 12))), log $logs/up.log"
run_phase "$logs/up.log" "$up_timeout" "cd /root/mesh && export $ports && exec make up" 'The mesh is up\.'
if [ "$ran_rc" = reached ]; then
  prediction="$(grep -A3 'one prediction:' "$logs/up.log" | sed -n 2,4p | tr '\n' ' ' | cut -c1-200)"
  record "make up: PASS, served a prediction after $ran_secs s (prediction: $prediction)"
  up_ok=1
else
  record "make up: FAIL ($ran_rc) after $ran_secs s; first error: $(first_error "$logs/up.log")"
  record "  last lines: $(tail -n 5 "$logs/up.log" | tr '\n' ' ' | cut -c1-600)"
  up_ok=0
fi
}

# 7. make test.
if [ "$up_only" = 0 ]; then
  say "make test, log $logs/test.log"
  run_phase "$logs/test.log" "$test_timeout" "cd /root/mesh && exec make test"
  if [ "$ran_rc" = 0 ] && grep -q '== all green' "$logs/test.log"; then
    record "make test: PASS after $ran_secs s"
  else
    record "make test: FAIL (exit $ran_rc) after $ran_secs s; first error: $(first_error "$logs/test.log")"
    record "  last step: $(sed 's/\x1b\[[0-9;]*m//g' "$logs/test.log" | grep '^== ' | tail -n1 | cut -c1-200)"
    up_ok=0
  fi
fi
[ "$up_ok" = 1 ]
