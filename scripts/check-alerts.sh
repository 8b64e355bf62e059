#!/usr/bin/env bash
# Checks the alerting as code (run by `make test` through scripts/test.sh, and alone):
#
#   1. `promtool check rules` on deploy/prometheus/rules/*.yml;
#   2. the promtool unit tests are what deploy/prometheus/tests/generate.py writes (no hand edits
#      drifting from the generator), then `promtool test rules` runs them;
#   3. `amtool check-config` on deploy/prometheus/alertmanager.yml;
#   4. consistency: every alert has a severity P0–P4, a runbook_url equal to
#      docs/runbooks/<alert>.md, that file, and a unit test in which it fires; every runbook
#      in docs/runbooks/ belongs to an alert.
#
# Offline, a few seconds. promtool and amtool come from Debian's prometheus and
# prometheus-alertmanager packages (scripts/bootstrap.sh installs them).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
fail() { echo "check-alerts: FAIL: $*" >&2; exit 1; }

command -v promtool >/dev/null 2>&1 || fail "promtool not found (run scripts/bootstrap.sh)"
command -v amtool >/dev/null 2>&1 || fail "amtool not found (run scripts/bootstrap.sh)"

# A Python with a YAML parser: check-jsonschema's (ruamel.yaml) or a python3 with PyYAML.
python=""
for candidate in .tools/venv/bin/python python3; do
  if command -v "$candidate" >/dev/null 2>&1 \
    && "$candidate" -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("yaml") or u.find_spec("ruamel") else 1)' 2>/dev/null; then
    python="$candidate"
    break
  fi
done
[ -n "$python" ] || fail "no python3 with PyYAML or ruamel.yaml (run scripts/bootstrap.sh)"

echo "check-alerts: promtool check rules"
promtool check rules deploy/prometheus/rules/*.yml >/dev/null || {
  promtool check rules deploy/prometheus/rules/*.yml
  fail "promtool rejects the rules"
}

echo "check-alerts: unit tests up to date with deploy/prometheus/tests/generate.py"
generated="$(mktemp)"
trap 'rm -f "$generated"' EXIT
"$python" deploy/prometheus/tests/generate.py "$generated"
diff -u deploy/prometheus/tests/alerts_test.yml "$generated" >&2 \
  || fail "deploy/prometheus/tests/alerts_test.yml is stale: run $python deploy/prometheus/tests/generate.py deploy/prometheus/tests/alerts_test.yml"

echo "check-alerts: promtool test rules"
promtool test rules deploy/prometheus/tests/*.yml >/dev/null || {
  promtool test rules deploy/prometheus/tests/*.yml
  fail "an alert unit test failed"
}

echo "check-alerts: amtool check-config"
amtool check-config deploy/prometheus/alertmanager.yml >/dev/null \
  || fail "amtool rejects deploy/prometheus/alertmanager.yml"

echo "check-alerts: every alert has a severity, a runbook and a test that fires it"
"$python" - <<'PY'
import pathlib, sys

def load_yaml(path):
    try:
        import yaml
        return yaml.safe_load(path.read_text())
    except ImportError:
        from ruamel.yaml import YAML
        return YAML(typ="safe").load(path.read_text())

problems = []
alerts = {}
for path in sorted(pathlib.Path("deploy/prometheus/rules").glob("*.yml")):
    for group in load_yaml(path)["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                alerts[rule["alert"]] = rule

fired = set()
for path in sorted(pathlib.Path("deploy/prometheus/tests").glob("*.yml")):
    for test in load_yaml(path).get("tests", []):
        for check in test.get("alert_rule_test", []) or []:
            if check.get("exp_alerts"):
                fired.add(check["alertname"])

runbooks = {p.stem for p in pathlib.Path("docs/runbooks").glob("*.md")} - {"README"}
for name, rule in sorted(alerts.items()):
    severity = rule.get("labels", {}).get("severity")
    if severity not in {"P0", "P1", "P2", "P3", "P4"}:
        problems.append(f"{name}: severity {severity!r} is not one of P0–P4")
    url = rule.get("annotations", {}).get("runbook_url")
    if url != f"docs/runbooks/{name}.md":
        problems.append(f"{name}: runbook_url {url!r} is not docs/runbooks/{name}.md")
    if name not in runbooks:
        problems.append(f"{name}: docs/runbooks/{name}.md does not exist")
    if name not in fired:
        problems.append(f"{name}: no unit test in deploy/prometheus/tests/ expects it to fire")
for name in sorted(runbooks - set(alerts)):
    problems.append(f"docs/runbooks/{name}.md: no alert is called {name}")

if problems:
    print(f"check-alerts: FAIL: {len(problems)} problem(s)", file=sys.stderr)
    for p in problems:
        print(f"  - {p}", file=sys.stderr)
    sys.exit(1)
print(f"check-alerts: {len(alerts)} alerts, each with a severity, a runbook and a firing test")
PY
echo "check-alerts: OK"
