#!/usr/bin/env bash
# Checks deploy/ offline, without Docker: the compose file against the Compose Specification, and
# the compose file, the Dockerfile and the Prometheus config against the native build.
#
#   scripts/check-deploy.sh
#
# What it checks (each line it prints names one check):
#   - deploy/docker-compose.yml validates against the Compose Specification schema
#     (check-jsonschema --builtin-schema vendor.compose-spec) and has no obsolete `version:` key;
#   - the Dockerfile builds exactly the workspace's binaries (MESH_BINS), each a package with a
#     src/main.rs or a [[bin]] target, and every program compose runs (command, healthcheck) is one;
#   - ORT_VERSION in the Dockerfile equals ort_version's default in scripts/bootstrap.sh;
#   - the Rust image is at least the workspace's rust-version, and every stage uses one Debian
#     release (the binaries link against the builder's glibc);
#   - no image is untagged or `latest`;
#   - the wiring: healthchecks probe each service's MESH_LISTEN_ADDR port, every *_URL/*_URLS
#     names a compose service on the port it listens on, Prometheus scrapes each MESH_METRICS_ADDR,
#     and files under /app/models and /app/data that compose names exist in the repository;
#   - only the gateway publishes a port, and every mesh service reads MESH_INTERNAL_TOKEN from an
#     env file (with a committed <file>.example), never from a value in the compose file.
#
# Exits non-zero, naming each mismatch, if any check fails. Needs check-jsonschema (installed by
# scripts/bootstrap.sh into .tools/) or one on PATH; runs promtool too if it is on PATH.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
compose="$root/deploy/docker-compose.yml"
dockerfile="$root/deploy/Dockerfile"
prometheus="$root/deploy/prometheus/prometheus.yml"
bootstrap="$root/scripts/bootstrap.sh"

fail() { printf 'check-deploy: FAIL: %s\n' "$*" >&2; exit 1; }

for f in "$compose" "$dockerfile" "$bootstrap" "$root/Cargo.toml"; do
  [ -f "$f" ] || fail "missing ${f#"$root"/}"
done

if [ -x "$root/.tools/bin/check-jsonschema" ]; then
  cjs="$root/.tools/bin/check-jsonschema"
elif command -v check-jsonschema >/dev/null 2>&1; then
  cjs="$(command -v check-jsonschema)"
else
  fail "check-jsonschema not found in .tools/bin or on PATH; run scripts/bootstrap.sh"
fi

echo "check-deploy: compose schema: $cjs --builtin-schema vendor.compose-spec deploy/docker-compose.yml"
if ! out="$("$cjs" --builtin-schema vendor.compose-spec "$compose" 2>&1)"; then
  printf '%s\n' "$out" >&2
  fail "deploy/docker-compose.yml does not match the Compose Specification"
fi
printf '  %s\n' "$out"

# The rest needs a YAML parser and tomllib: check-jsonschema's own interpreter has both
# (ruamel.yaml is its dependency); otherwise a python3 with PyYAML or ruamel.yaml.
python=""
cjs_python="$(head -n1 "$(readlink -f "$cjs")" | sed -n 's/^#![[:space:]]*//p' | awk '{print $1}')"
for candidate in "$cjs_python" python3; do
  [ -n "$candidate" ] || continue
  if "$candidate" -c 'import tomllib
try:
    import ruamel.yaml
except ImportError:
    import yaml' >/dev/null 2>&1; then
    python="$candidate"
    break
  fi
done
[ -n "$python" ] || fail "no Python 3.11+ with a YAML parser found (tried check-jsonschema's interpreter and python3)"

"$python" -u - "$root" <<'PY'
"""Cross-checks deploy/ against the workspace. Prints each check; exits 1 listing every problem."""

import re
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

root = Path(sys.argv[1])
compose_path = root / "deploy/docker-compose.yml"
dockerfile_path = root / "deploy/Dockerfile"
prometheus_path = root / "deploy/prometheus/prometheus.yml"
bootstrap_path = root / "scripts/bootstrap.sh"
problems = []


def load_yaml(path):
    try:
        from ruamel.yaml import YAML

        return YAML(typ="safe", pure=True).load(path.read_text())
    except ImportError:
        import yaml

        return yaml.safe_load(path.read_text())


def check(label, detail=""):
    print(f"check-deploy: {label}" + (f": {detail}" if detail else ""))


def problem(message):
    problems.append(message)
    print(f"  MISMATCH: {message}")


def version_tuple(text):
    return tuple(int(part) for part in text.split("."))


def port_of(addr):
    """Port of `host:port` (MESH_LISTEN_ADDR style) or None."""
    match = re.fullmatch(r".*:(\d+)", str(addr).strip())
    return int(match.group(1)) if match else None


# --- the workspace's binaries ------------------------------------------------------------------
workspace = tomllib.loads((root / "Cargo.toml").read_text())
rust_version = workspace.get("workspace", {}).get("package", {}).get("rust-version")
packages = {}  # package name -> list of binary names
for member in workspace.get("workspace", {}).get("members", []):
    manifest_path = root / member / "Cargo.toml"
    if not manifest_path.is_file():
        problem(f"workspace member {member} has no Cargo.toml")
        continue
    manifest = tomllib.loads(manifest_path.read_text())
    package = manifest.get("package", {})
    name = package.get("name", member)
    bins = []
    for target in manifest.get("bin", []):
        path = root / member / target.get("path", f"src/bin/{target['name']}.rs")
        if path.is_file() or (root / member / "src/bin" / target["name"] / "main.rs").is_file():
            bins.append(target["name"])
    if package.get("autobins", True):
        if (root / member / "src/main.rs").is_file() and name not in bins:
            bins.append(name)
        bin_dir = root / member / "src/bin"
        if bin_dir.is_dir():
            for entry in sorted(bin_dir.iterdir()):
                stem = entry.stem if entry.suffix == ".rs" else entry.name
                if (entry.suffix == ".rs" or (entry / "main.rs").is_file()) and stem not in bins:
                    bins.append(stem)
    packages[name] = bins
workspace_bins = {b for bins in packages.values() for b in bins}
check("workspace binaries", " ".join(sorted(workspace_bins)) or "(none)")

# --- Dockerfile ----------------------------------------------------------------------------------
dockerfile = dockerfile_path.read_text()
froms = re.findall(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", dockerfile, re.M | re.I)

match = re.search(r'^ARG\s+MESH_BINS="([^"]*)"', dockerfile, re.M)
docker_bins = match.group(1).split() if match else []
check("Dockerfile MESH_BINS", " ".join(docker_bins) or "(not found)")
if not match:
    problem("deploy/Dockerfile has no ARG MESH_BINS=\"...\" listing the binaries it builds")
for b in docker_bins:
    if b not in packages:
        problem(f"Dockerfile builds {b}, which is no package in the workspace (-p {b} would fail)")
    elif b not in packages[b]:
        problem(f"Dockerfile builds {b}, but package {b} has no binary target (no src/main.rs or [[bin]])")
# Tools that only make sense on a development machine (they start Redis, PostgreSQL and the
# services as local processes) are not part of the image.
LOCAL_ONLY = {"mesh-chaos"}
for b in sorted(workspace_bins - set(docker_bins) - LOCAL_ONLY):
    problem(f"workspace binary {b} is not built into the image (add it to MESH_BINS)")
if "--locked" not in dockerfile:
    problem("the Dockerfile's cargo build does not use --locked")

match = re.search(r"^ARG\s+ORT_VERSION=(\S+)", dockerfile, re.M)
docker_ort = match.group(1).strip("\"'") if match else None
match = re.search(r'^ort_version="\$\{MESH_ORT_VERSION:-([^}]+)\}"', bootstrap_path.read_text(), re.M)
bootstrap_ort = match.group(1) if match else None
check("ONNX Runtime version", f"Dockerfile {docker_ort}, scripts/bootstrap.sh {bootstrap_ort}")
if docker_ort is None:
    problem("deploy/Dockerfile has no ARG ORT_VERSION=...")
elif bootstrap_ort is None:
    problem("scripts/bootstrap.sh has no ort_version=\"${MESH_ORT_VERSION:-...}\" default")
elif docker_ort != bootstrap_ort:
    problem(f"onnxruntime {docker_ort} in the Dockerfile but {bootstrap_ort} in scripts/bootstrap.sh")

rust_images = [image for image, _ in froms if image.split(":")[0] in ("rust", "docker.io/library/rust")]
match = re.match(r"[^:]+:(\d+\.\d+(?:\.\d+)?)", rust_images[0]) if rust_images else None
docker_rust = match.group(1) if match else None
check("Rust version", f"Dockerfile {rust_images[0] if rust_images else '(no rust image)'}, workspace rust-version {rust_version}")
if docker_rust is None:
    problem("the Dockerfile's builder is not a rust:<major>.<minor>[-...] image")
elif rust_version is None:
    problem("the workspace Cargo.toml has no [workspace.package] rust-version")
# rust:X.Y tags follow the newest X.Y.Z patch, so major.minor decides.
elif version_tuple(docker_rust)[:2] < version_tuple(rust_version)[:2]:
    problem(f"the Dockerfile builds with Rust {docker_rust}, older than the workspace's rust-version {rust_version}")

releases = {}
for image, _ in froms:
    found = re.search(r"(bookworm|bullseye|trixie|buster)", image)
    releases[image] = found.group(1) if found else None
check("Debian release per stage", ", ".join(f"{i} -> {r}" for i, r in releases.items()))
stage_names = {name for _, name in froms if name}
distinct = {r for i, r in releases.items() if i not in stage_names}
if None in distinct or len(distinct) != 1:
    problem("every stage must name the same Debian release (the runtime needs the builder's glibc)")

# --- compose ---------------------------------------------------------------------------------------
compose_text = compose_path.read_text()
compose = load_yaml(compose_path) or {}
if "version" in compose:
    problem("deploy/docker-compose.yml has a top-level `version:` key, obsolete in the Compose Specification")
services = compose.get("services", {}) or {}

images = [i for i, _ in froms if i not in stage_names]
images += [s.get("image") for s in services.values() if s.get("image")]
for name, svc in services.items():
    if not svc.get("image") and not svc.get("build"):
        problem(f"compose service {name} has neither image nor build")
check("image tags", " ".join(sorted(set(images))))
for image in images:
    tag = image.split("@")[0].rsplit("/", 1)[-1]
    if ":" not in tag or tag.endswith(":latest"):
        problem(f"image {image} is not pinned to a version tag")

mesh_services = {}
for name, svc in services.items():
    build = svc.get("build")
    if build is None:
        continue
    if isinstance(build, str):
        build = {"context": build}
    context = (compose_path.parent / build.get("context", ".")).resolve()
    dockerfile_ref = (context / build.get("dockerfile", "Dockerfile")).resolve()
    if dockerfile_ref != dockerfile_path.resolve():
        problem(f"compose service {name} builds {dockerfile_ref}, not deploy/Dockerfile")
    if context != root.resolve():
        problem(f"compose service {name} builds with context {context}, not the repository root")
    mesh_services[name] = svc
check("services built from deploy/Dockerfile", " ".join(mesh_services) or "(none)")
mesh_images = {svc.get("image") for svc in mesh_services.values()}
if len(mesh_images) != 1:
    problem(f"mesh services should share one image name, found {sorted(map(str, mesh_images))}")


def argv(value):
    if value is None:
        return []
    return value.split() if isinstance(value, str) else [str(v) for v in value]


default_cmd = re.findall(r'^CMD\s+\["([^"]+)"', dockerfile, re.M)
runs = []  # (service, what, program)
for name, svc in mesh_services.items():
    command = argv(svc.get("entrypoint")) or argv(svc.get("command")) or default_cmd[-1:]
    if command:
        runs.append((name, "command", command[0]))
    test = argv((svc.get("healthcheck") or {}).get("test"))
    if test and test[0] == "CMD":
        runs.append((name, "healthcheck", test[1]))
    elif test and test[0] == "CMD-SHELL":
        runs.append((name, "healthcheck", test[1].split()[0]))
check("programs compose runs", ", ".join(f"{s} {w}: {p}" for s, w, p in runs))
for service, what, program in runs:
    # A program the image builds but the workspace lacks is already reported above.
    if program not in docker_bins:
        problem(f"compose service {service} runs {program} ({what}), which the image does not build")

# Ports and URLs: health probes the listen port, URLs name services on the ports they listen on.
listen_ports, metrics_ports = {}, {}
for name, svc in mesh_services.items():
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env if "=" in item)
    if "MESH_LISTEN_ADDR" in env:
        listen_ports[name] = port_of(env["MESH_LISTEN_ADDR"])
    if env.get("MESH_METRICS_ADDR") not in (None, "off"):
        metrics_ports[name] = port_of(env["MESH_METRICS_ADDR"])
    svc["_env"] = env
wiring = []
for name, svc in mesh_services.items():
    test = argv((svc.get("healthcheck") or {}).get("test"))
    if "--url" in test:
        url = test[test.index("--url") + 1]
        wiring.append(f"{name} health {url}")
        if urlsplit(url).port != listen_ports.get(name):
            problem(f"{name}'s healthcheck probes {url}, but it listens on port {listen_ports.get(name)}")
    for key, value in svc["_env"].items():
        if not (key.endswith("_URL") or key.endswith("_URLS")) or key in ("MESH_REDIS_URL", "MESH_DATABASE_URL"):
            continue
        for url in str(value).split(","):
            parts = urlsplit(url.strip())
            wiring.append(f"{name} {key} {url.strip()}")
            target = services.get(parts.hostname)
            if target is None:
                problem(f"{name}: {key} names {parts.hostname}, which is no compose service")
            elif parts.hostname in listen_ports and parts.port != listen_ports[parts.hostname]:
                problem(f"{name}: {key} uses port {parts.port}, but {parts.hostname} listens on {listen_ports[parts.hostname]}")
    for key in ("MESH_REDIS_URL", "MESH_DATABASE_URL"):
        if key in svc["_env"]:
            host = urlsplit(svc["_env"][key]).hostname
            wiring.append(f"{name} {key} -> {host}")
            if host not in services:
                problem(f"{name}: {key} names {host}, which is no compose service")
    for dep in (svc.get("depends_on") or {}):
        if dep not in services:
            problem(f"{name} depends on {dep}, which is no compose service")
check("wiring", "; ".join(wiring))

# Exposure and the internal credential: only the gateway publishes a port; every mesh service
# gets MESH_INTERNAL_TOKEN from an env file, never from a value written in the compose file.
exposure = []
for name, svc in mesh_services.items():
    if svc.get("ports") and name != "gateway":
        problem(f"{name} publishes {svc['ports']}: only the gateway may be reachable from the host")
    env_files = svc.get("env_file") or []
    env_files = [env_files] if isinstance(env_files, (str, dict)) else env_files
    env_files = [f["path"] if isinstance(f, dict) else f for f in env_files]
    exposure.append(f"{name} ports {svc.get('ports') or '-'} env_file {','.join(env_files) or '-'}")
    if "MESH_INTERNAL_TOKEN" in svc["_env"]:
        problem(f"{name} sets MESH_INTERNAL_TOKEN in the compose file; it belongs in an env file")
    if not env_files:
        problem(f"{name} has no env_file, so it gets no MESH_INTERNAL_TOKEN")
    for f in env_files:
        example = compose_path.parent / (f + ".example")
        if not example.is_file():
            problem(f"{name} reads {f}, but deploy/{f}.example (how to create it) is missing")
check("exposure and credential", "; ".join(exposure))

# Paths inside the image that compose names must exist in the repository.
for ref in sorted(set(re.findall(r"/app/(?:models|data)(?:/[\w.\-]+)*", compose_text))):
    local = root / ref.removeprefix("/app/")
    check("image path", f"{ref} <- {local.relative_to(root)}")
    if not local.exists():
        problem(f"compose refers to {ref}, but {local.relative_to(root)} does not exist in the repository")

# --- Prometheus ----------------------------------------------------------------------------------------
if prometheus_path.is_file():
    prometheus = load_yaml(prometheus_path) or {}
    targets = []
    for job in prometheus.get("scrape_configs", []) or []:
        for static in job.get("static_configs", []) or []:
            targets += static.get("targets", [])
    check("Prometheus targets", " ".join(targets))
    scraped = set()
    for target in targets:
        host, _, port = target.rpartition(":")
        if host in ("localhost", "127.0.0.1"):
            continue
        if host not in services:
            problem(f"Prometheus scrapes {target}, but {host} is no compose service")
        elif host in mesh_services and metrics_ports.get(host) != int(port):
            problem(f"Prometheus scrapes {target}, but {host} serves metrics on {metrics_ports.get(host)}")
        scraped.add(host)
    for name in sorted(set(metrics_ports) - scraped):
        problem(f"{name} serves metrics on {metrics_ports[name]}, but Prometheus does not scrape it")

if problems:
    print(f"check-deploy: FAIL: {len(problems)} mismatch(es)", file=sys.stderr)
    for message in problems:
        print(f"  - {message}", file=sys.stderr)
    sys.exit(1)
PY

if command -v promtool >/dev/null 2>&1 && [ -f "$prometheus" ]; then
  echo "check-deploy: promtool check config deploy/prometheus/prometheus.yml"
  promtool check config "$prometheus" >/dev/null || fail "promtool rejects deploy/prometheus/prometheus.yml"
else
  echo "check-deploy: promtool not on PATH; Prometheus config checked for wiring only"
fi

echo "check-deploy: OK"
