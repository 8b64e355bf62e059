#!/usr/bin/env python3
"""What deploy/k8s promises, checked on the rendered manifests of one overlay.

    python3 deploy/k8s/invariants.py --overlay dev|prod --readme README.md RENDERED.yaml
    python3 deploy/k8s/invariants.py --self-test --overlay dev --readme README.md RENDERED.yaml

kubernetes-validate checks that every object is well-formed; this checks what users rely on and
a schema cannot say: each mesh workload has probes of the right kind on the right ports, measured
resources, a restricted security context, a PodDisruptionBudget, an HPA and a spread across nodes;
only the gateway is reachable from outside; credentials come from Secrets; every variable set is
one the services read (the README's configuration table). scripts/check-k8s.sh runs it on both
overlays, then runs it again with --self-test: each of a list of mutations (a probe removed, one
replica, a writable root filesystem, …) applied to a copy must make the check fail.

Needs PyYAML (kubernetes-validate depends on it, so the .tools venv has it).
"""
import argparse
import copy
import re
import sys

import yaml

# The mesh's workloads: kind, gRPC port, metrics port, and whether a startupProbe is required.
WORKLOADS = {
    "mesh-gateway": ("StatefulSet", 50051, 9101),
    "mesh-features": ("Deployment", 50052, 9102),
    "mesh-inference": ("Deployment", 50053, 9103),
    "mesh-logger": ("Deployment", 50055, 9105),
}
INTERNAL = ["mesh-features", "mesh-inference", "mesh-logger"]
# Variables whose value is a credential: never a literal in a manifest.
SECRET_VARS = {"MESH_INTERNAL_TOKEN", "MESH_API_KEYS", "MESH_ADMIN_KEYS", "MESH_DATABASE_URL",
               "MESH_REGISTRY_DATABASE_URL"}
# Shortest startupProbe window for inference warm-up, in seconds.
MIN_STARTUP_WINDOW_S = 60


def quantity(text, cpu):
    """A Kubernetes quantity as a float (cores for CPU, bytes for memory)."""
    text = str(text)
    units = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(m|k|M|G|Ki|Mi|Gi|Ti)?", text)
    unit = match.group(2) if match else None
    if not match or (cpu and unit not in (None, "m")) or (not cpu and unit == "m"):
        raise ValueError(f"{text!r} is not a {'CPU' if cpu else 'memory'} quantity")
    return float(match.group(1)) * units[match.group(2) or ""]


def selects(selector, labels):
    """Whether a matchLabels selector picks a pod with `labels`."""
    wanted = (selector or {}).get("matchLabels") or {}
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def readme_variables(path):
    """Every variable in the README's configuration table: the first cell of each table row in
    the "## Configuration" section."""
    names = set()
    section = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("## "):
                section = line.strip()
            elif section == "## Configuration" and line.startswith("| `"):
                names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1]))
    if not names:
        raise SystemExit(f"{path}: no configuration table found under '## Configuration'")
    return names


class Checker:
    """Collects problems for one overlay's rendered objects."""

    def __init__(self, docs, overlay, known_vars):
        self.docs = [d for d in docs if d]
        self.overlay = overlay
        self.known_vars = known_vars
        self.problems = []

    def fail(self, what):
        self.problems.append(what)

    def objects(self, kind):
        return [d for d in self.docs if d.get("kind") == kind]

    def get(self, kind, name):
        for d in self.objects(kind):
            if d["metadata"]["name"] == name:
                return d
        return None

    def common_env(self):
        """The mesh-common ConfigMap's data (envFrom of every mesh container)."""
        cm = self.get("ConfigMap", "mesh-common")
        return (cm or {}).get("data") or {}

    def run(self):
        for name, (kind, grpc, metrics) in WORKLOADS.items():
            workload = self.get(kind, name)
            if workload is None:
                self.fail(f"{name}: no {kind} rendered")
                continue
            self.workload(name, workload, grpc, metrics)
        self.gateway_specifics()
        self.network_policies()
        self.images()
        self.secrets()
        self.datastores()
        return self.problems

    def workload(self, name, w, grpc, metrics):
        spec = w["spec"]
        if (spec.get("replicas") or 1) < 2:
            self.fail(f"{name}: replicas {spec.get('replicas')} < 2")
        pod = spec["template"]["spec"]
        labels = spec["template"]["metadata"].get("labels") or {}
        if labels.get("app.kubernetes.io/part-of") != "mesh":
            self.fail(f"{name}: pods lack app.kubernetes.io/part-of=mesh (the default-deny policy selects on it)")
        containers = pod.get("containers") or []
        if len(containers) != 1:
            self.fail(f"{name}: expected one container, found {len(containers)}")
            return
        c = containers[0]
        self.probes(name, c, grpc, metrics)
        self.resources(name, c)
        self.security(name, pod, c)
        env = self.env(name, c)
        self.grace(name, pod, env)
        self.spread(name, pod, labels)
        self.disruption_budget(name, labels)
        self.autoscaler(name, w)
        ann = spec["template"]["metadata"].get("annotations") or {}
        if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != str(metrics):
            self.fail(f"{name}: pods lack prometheus.io/scrape=true and prometheus.io/port={metrics}")

    def probes(self, name, c, grpc, metrics):
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
        if ports.get("grpc") != grpc or ports.get("metrics") != metrics:
            self.fail(f"{name}: container ports must be grpc={grpc}, metrics={metrics}, got {ports}")
        ready = (c.get("readinessProbe") or {}).get("grpc") or {}
        if ready.get("port") != grpc or ready.get("service", "") != "":
            self.fail(f"{name}: readinessProbe must be gRPC health on port {grpc} (overall service)")
        live = (c.get("livenessProbe") or {}).get("httpGet") or {}
        live_port = ports.get(live.get("port"), live.get("port"))
        if live.get("path") != "/health/live" or live_port != metrics:
            self.fail(f"{name}: livenessProbe must be GET /health/live on the metrics port {metrics}")
        if name == "mesh-inference":
            start = c.get("startupProbe") or {}
            window = start.get("periodSeconds", 10) * start.get("failureThreshold", 3)
            if (start.get("grpc") or {}).get("port") != grpc or window < MIN_STARTUP_WINDOW_S:
                self.fail(f"{name}: startupProbe must be gRPC health on {grpc} covering "
                          f"≥ {MIN_STARTUP_WINDOW_S} s of warm-up (got {window} s)")

    def resources(self, name, c):
        res = c.get("resources") or {}
        for key in ("cpu", "memory"):
            try:
                req = quantity((res.get("requests") or {})[key], key == "cpu")
                lim = quantity((res.get("limits") or {})[key], key == "cpu")
            except (KeyError, ValueError) as e:
                self.fail(f"{name}: {key} request and limit required ({e})")
                continue
            if lim < req:
                self.fail(f"{name}: {key} limit below its request")

    def security(self, name, pod, c):
        psc = pod.get("securityContext") or {}
        csc = c.get("securityContext") or {}
        user = csc.get("runAsUser", psc.get("runAsUser"))
        if not psc.get("runAsNonRoot") or not user:
            self.fail(f"{name}: must run as non-root (runAsNonRoot and a non-zero runAsUser)")
        seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp != "RuntimeDefault":
            self.fail(f"{name}: seccompProfile must be RuntimeDefault")
        if csc.get("readOnlyRootFilesystem") is not True:
            self.fail(f"{name}: readOnlyRootFilesystem must be true")
        if csc.get("allowPrivilegeEscalation") is not False or csc.get("privileged"):
            self.fail(f"{name}: allowPrivilegeEscalation must be false, never privileged")
        if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
            self.fail(f"{name}: capabilities must drop ALL")
        if pod.get("automountServiceAccountToken") is not False:
            self.fail(f"{name}: automountServiceAccountToken must be false")

    def env(self, name, c):
        """The container's effective literal environment; checks names and credentials."""
        env = dict(self.common_env())
        for e in c.get("env") or []:
            var = e["name"]
            if var not in self.known_vars:
                self.fail(f"{name}: sets {var}, which no service reads (not in the README's "
                          "configuration table)")
            if var in SECRET_VARS and "secretKeyRef" not in (e.get("valueFrom") or {}):
                self.fail(f"{name}: {var} must come from a Secret (secretKeyRef), not a literal")
            if "value" in e:
                env[var] = e["value"]
        for var in self.common_env():
            if var not in self.known_vars:
                self.fail(f"mesh-common: sets {var}, which no service reads")
        if "MESH_INTERNAL_TOKEN" not in {e["name"] for e in c.get("env") or []}:
            self.fail(f"{name}: MESH_INTERNAL_TOKEN not set")
        return env

    def grace(self, name, pod, env):
        drain = int(env.get("MESH_DRAIN_DELAY_MS", 1000))
        grace = int(env.get("MESH_GRACE_MS", 10000))
        # The gateway spends a second grace period delivering its spool after the server drained.
        needed = (drain + grace * (2 if name == "mesh-gateway" else 1)) / 1000
        have = pod.get("terminationGracePeriodSeconds", 30)
        if have < needed:
            self.fail(f"{name}: terminationGracePeriodSeconds {have} < drain + grace = {needed:g} s")

    def spread(self, name, pod, labels):
        by_node = [t for t in pod.get("topologySpreadConstraints") or []
                   if t.get("topologyKey") == "kubernetes.io/hostname"
                   and selects(t.get("labelSelector"), labels)]
        anti = (((pod.get("affinity") or {}).get("podAntiAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or [])
        anti = [a for a in anti if a.get("topologyKey") == "kubernetes.io/hostname"]
        if not by_node and not anti:
            self.fail(f"{name}: no topology spread (or anti-affinity) across nodes selecting its pods")

    def disruption_budget(self, name, labels):
        pdbs = [p for p in self.objects("PodDisruptionBudget")
                if selects(p["spec"].get("selector"), labels)]
        if len(pdbs) != 1:
            self.fail(f"{name}: expected one PodDisruptionBudget selecting its pods, found {len(pdbs)}")
            return
        # It must both keep a pod up and let a drain proceed: with the minimum of 2 replicas,
        # 1 ≤ maxUnavailable < 2, or 1 ≤ minAvailable < 2 (or a percentage strictly between).
        spec = pdbs[0]["spec"]
        value = spec.get("maxUnavailable", spec.get("minAvailable"))
        if isinstance(value, str) and value.endswith("%"):
            ok = 0 < float(value[:-1]) < 100
        else:
            ok = isinstance(value, int) and 1 <= value < 2
        if not ok:
            self.fail(f"{name}: its PodDisruptionBudget must allow one disruption and keep a pod "
                      f"(got {value!r})")

    def autoscaler(self, name, w):
        hpas = [h for h in self.objects("HorizontalPodAutoscaler")
                if h["spec"]["scaleTargetRef"].get("name") == name
                and h["spec"]["scaleTargetRef"].get("kind") == w["kind"]]
        if len(hpas) != 1 or not hpas[0]["apiVersion"].startswith("autoscaling/v2"):
            self.fail(f"{name}: expected one autoscaling/v2 HPA targeting it, found {len(hpas)}")
            return
        spec = hpas[0]["spec"]
        cpu = [m for m in spec.get("metrics") or []
               if m.get("type") == "Resource" and m["resource"]["name"] == "cpu"]
        if spec.get("minReplicas", 1) < 2 or not cpu:
            self.fail(f"{name}: its HPA needs minReplicas ≥ 2 and a CPU metric")

    def gateway_specifics(self):
        gw = self.get("StatefulSet", "mesh-gateway")
        if gw is None:
            return
        c = gw["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c.get("env") or []}
        spool = env.get("MESH_SPOOL_DIR")
        claims = {t["metadata"]["name"] for t in gw["spec"].get("volumeClaimTemplates") or []}
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
        if not spool or mounts.get(spool) not in claims:
            self.fail("mesh-gateway: MESH_SPOOL_DIR must be a volume from volumeClaimTemplates (one per pod)")
        inference = self.get("Service", "mesh-inference")
        if inference is None or inference["spec"].get("clusterIP") != "None":
            self.fail("mesh-inference: its Service must be headless (clusterIP: None)")
        # Every downstream URL names a rendered Service and one of its ports.
        for var in ("MESH_FEATURES_URL", "MESH_INFERENCE_URLS", "MESH_LOGGER_URL"):
            for url in (env.get(var) or "").split(","):
                match = re.fullmatch(r"(?:http://|dns:///)([a-z0-9-]+):([0-9]+)", url.strip())
                svc = match and self.get("Service", match.group(1))
                if not svc or int(match.group(2)) not in [p["port"] for p in svc["spec"]["ports"]]:
                    self.fail(f"mesh-gateway: {var}={url!r} names no rendered Service and port")

    def network_policies(self):
        policies = self.objects("NetworkPolicy")
        mesh_pods = {"app.kubernetes.io/part-of": "mesh"}
        deny = [p for p in policies
                if p["spec"].get("podSelector", {}).get("matchLabels") == mesh_pods
                and "Ingress" in p["spec"].get("policyTypes", []) and not p["spec"].get("ingress")]
        if not deny:
            self.fail("NetworkPolicy: no default-deny ingress policy for the mesh's pods")
        for p in policies:
            target = (p["spec"].get("podSelector") or {}).get("matchLabels") or {}
            for rule in p["spec"].get("ingress") or []:
                ports = {x.get("port") for x in rule.get("ports") or []}
                sources = rule.get("from") or []
                if not sources or any("ipBlock" in s for s in sources):
                    # Open to any source: only the gateway's gRPC port.
                    if target.get("app.kubernetes.io/name") != "mesh-gateway" or ports != {50051}:
                        self.fail(f"NetworkPolicy {p['metadata']['name']}: admits any source "
                                  f"to {target} ports {ports}")
                    continue
                for s in sources:
                    who = (s.get("podSelector") or {}).get("matchLabels") or {}
                    if who.get("app.kubernetes.io/name") == "prometheus":
                        name = target.get("app.kubernetes.io/name")
                        if name in WORKLOADS and ports != {WORKLOADS[name][2]}:
                            self.fail(f"NetworkPolicy {p['metadata']['name']}: Prometheus "
                                      "admitted beyond the metrics port")
                    elif "namespaceSelector" in s:
                        self.fail(f"NetworkPolicy {p['metadata']['name']}: admits other namespaces")
        for name in INTERNAL:
            grpc = WORKLOADS[name][1]
            its_pods = {"app.kubernetes.io/name": name}
            rules = [r for p in policies
                     if (p["spec"].get("podSelector") or {}).get("matchLabels") == its_pods
                     for r in p["spec"].get("ingress") or []]
            for r in rules:
                ports = {x.get("port") for x in r.get("ports") or []}
                callers = [(s.get("podSelector") or {}).get("matchLabels") for s in r.get("from") or []]
                if grpc in ports and callers != [{"app.kubernetes.io/name": "mesh-gateway"}]:
                    self.fail(f"{name}: gRPC admitted from {callers}, not only the gateway")
            if not any(WORKLOADS[name][1] in {x.get("port") for x in r.get("ports") or []} for r in rules):
                self.fail(f"{name}: no policy admits the gateway to its gRPC port")

    def images(self):
        for d in self.docs:
            pod = (((d.get("spec") or {}).get("template") or {}).get("spec")) or {}
            for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
                self.pinned(f"{d['kind']}/{d['metadata']['name']}", c.get("image", ""))
            for part in ("redis", "sentinel"):
                if d.get("kind") == "RedisFailover":
                    self.pinned(f"RedisFailover/{part}", (d["spec"].get(part) or {}).get("image", ""))
            if d.get("kind") == "Cluster":
                self.pinned("Cluster", d["spec"].get("imageName", ""))

    def pinned(self, where, image):
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if not tag or tag == "latest":
            self.fail(f"{where}: image {image!r} has no pinned tag")

    def secrets(self):
        rendered = {s["metadata"]["name"] for s in self.objects("Secret")}
        if self.overlay == "prod" and rendered:
            self.fail(f"prod: renders Secrets {sorted(rendered)}; they must be created by the "
                      "user, not committed")
        if self.overlay == "dev":
            for d in self.docs:
                pod = ((d.get("spec") or {}).get("template") or {}).get("spec") or {}
                for c in pod.get("containers") or []:
                    for e in c.get("env") or []:
                        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                        if ref and ref["name"] not in rendered:
                            self.fail(f"dev: {d['metadata']['name']} references Secret {ref['name']}, not rendered")

    def datastores(self):
        if self.overlay == "dev":
            for name in ("mesh-postgres", "mesh-redis"):
                s = self.get("StatefulSet", name)
                if s is None:
                    self.fail(f"dev: no StatefulSet {name}")
                    continue
                pod = s["spec"]["template"]["spec"]
                c = pod["containers"][0]
                if not c.get("readinessProbe") or not c.get("livenessProbe"):
                    self.fail(f"{name}: readiness and liveness probes required")
                self.resources(name, c)
                self.security(name, pod, c)
                if not self.get("Service", name):
                    self.fail(f"dev: no Service {name}")
        else:
            clusters = self.objects("Cluster")
            if len(clusters) != 1 or clusters[0]["spec"].get("instances", 1) < 2:
                self.fail("prod: one CloudNativePG Cluster with instances ≥ 2 required")
            else:
                # The URI features and the logger read is the operator's <cluster>-app Secret.
                wanted = clusters[0]["metadata"]["name"] + "-app"
                for name in ("mesh-features", "mesh-logger"):
                    d = self.get("Deployment", name)
                    refs = [(e.get("valueFrom") or {}).get("secretKeyRef") or {}
                            for e in d["spec"]["template"]["spec"]["containers"][0].get("env") or []
                            if e["name"] == "MESH_DATABASE_URL"] if d else []
                    if refs != [{"name": wanted, "key": "uri"}]:
                        self.fail(f"{name}: MESH_DATABASE_URL must come from Secret {wanted}, key uri")
            failovers = self.objects("RedisFailover")
            if (len(failovers) != 1 or failovers[0]["spec"]["redis"].get("replicas", 0) < 2
                    or failovers[0]["spec"]["sentinel"].get("replicas", 0) < 3):
                self.fail("prod: one RedisFailover with ≥ 2 Redis and ≥ 3 Sentinels required")
            master = self.get("Service", "mesh-redis")
            if not master or master["spec"]["selector"].get("redisfailovers-role") != "master":
                self.fail("prod: Service mesh-redis must select the RedisFailover's current master")


# Each mutation breaks one promise; the self-test requires the check to notice every one.
def _doc(docs, kind, name):
    return next(d for d in docs if d and d["kind"] == kind and d["metadata"]["name"] == name)


def _workload(docs, name):
    kind = WORKLOADS[name][0]
    return _doc(docs, kind, name)


def _pod(docs, name):
    return _workload(docs, name)["spec"]["template"]["spec"]


def _container(docs, name):
    return _pod(docs, name)["containers"][0]


def _literal_token(docs, name):
    entry = next(e for e in _container(docs, name)["env"] if e["name"] == "MESH_INTERNAL_TOKEN")
    entry.pop("valueFrom")
    entry["value"] = "0123456789abcdef0123"


def _open_to_all(docs, policy):
    _doc(docs, "NetworkPolicy", policy)["spec"]["ingress"][0].pop("from")


MUTATIONS = {
    "gateway readinessProbe removed":
        lambda d: _container(d, "mesh-gateway").pop("readinessProbe"),
    "inference startupProbe removed":
        lambda d: _container(d, "mesh-inference").pop("startupProbe"),
    "logger liveness on the gRPC port":
        lambda d: _container(d, "mesh-logger")["livenessProbe"]["httpGet"].update(port=50055),
    "features memory limit removed":
        lambda d: _container(d, "mesh-features")["resources"]["limits"].pop("memory"),
    "gateway scaled to one replica":
        lambda d: _workload(d, "mesh-gateway")["spec"].update(replicas=1),
    "inference root filesystem writable":
        lambda d: _container(d, "mesh-inference")["securityContext"].update(
            readOnlyRootFilesystem=False),
    "features running as root":
        lambda d: _pod(d, "mesh-features")["securityContext"].pop("runAsNonRoot"),
    "gateway PodDisruptionBudget that protects nothing":
        lambda d: _doc(d, "PodDisruptionBudget", "mesh-gateway")["spec"].update(maxUnavailable=2),
    "logger PodDisruptionBudget removed":
        lambda d: d.remove(_doc(d, "PodDisruptionBudget", "mesh-logger")),
    "inference spread removed":
        lambda d: _pod(d, "mesh-inference").pop("topologySpreadConstraints"),
    "gateway HPA removed":
        lambda d: d.remove(_doc(d, "HorizontalPodAutoscaler", "mesh-gateway")),
    "gateway grace shorter than drain + grace":
        lambda d: _pod(d, "mesh-gateway").update(terminationGracePeriodSeconds=12),
    "gateway spool on an emptyDir":
        lambda d: _workload(d, "mesh-gateway")["spec"].pop("volumeClaimTemplates"),
    "features open to any source":
        lambda d: _open_to_all(d, "mesh-features-ingress"),
    "internal token as a literal":
        lambda d: _literal_token(d, "mesh-logger"),
    "an invented variable":
        lambda d: _container(d, "mesh-gateway")["env"].append(
            {"name": "MESH_INFERENCE_DISCOVERY", "value": "dns"}),
    "an image on :latest":
        lambda d: _container(d, "mesh-logger").update(image="mesh:latest"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overlay", choices=["dev", "prod"], required=True)
    parser.add_argument("--readme", required=True, help="README.md holding the configuration table")
    parser.add_argument("--self-test", action="store_true", help="require every mutation to be caught")
    parser.add_argument("rendered")
    args = parser.parse_args()
    with open(args.rendered, encoding="utf-8") as f:
        docs = list(yaml.safe_load_all(f))
    known = readme_variables(args.readme)
    problems = Checker(docs, args.overlay, known).run()
    if not args.self_test:
        for p in problems:
            print(f"FAIL {args.overlay}: {p}")
        print(f"{args.overlay}: {len(problems)} invariant(s) broken" if problems else
              f"{args.overlay}: all invariants hold ({len(WORKLOADS)} workloads)")
        return 1 if problems else 0
    if problems:
        print(f"self-test needs a clean render; {args.overlay} has {len(problems)} problem(s)")
        return 1
    missed = 0
    for what, mutate in MUTATIONS.items():
        broken = copy.deepcopy(docs)
        mutate(broken)
        found = Checker(broken, args.overlay, known).run()
        print(f"{'caught' if found else 'MISSED'}: {what}" + (f" ({found[0]})" if found else ""))
        missed += not found
    print(f"{args.overlay} self-test: {len(MUTATIONS) - missed}/{len(MUTATIONS)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
