"""Writes the promtool unit tests of deploy/prometheus/rules/ (alerts_test.yml, the path given).

Run from the repository root:  python3 deploy/prometheus/tests/generate.py deploy/prometheus/tests/alerts_test.yml

Counters are written as piecewise rates (`counter((increment per step, steps), ...)`) so a
scenario reads as "healthy for an hour, then 20 % failing"; the expected annotations are
rendered from alerts.yml with the expected labels, so a template that does not render fails.
scripts/check-alerts.sh checks that the committed file is what this writes.
"""
import json, sys, re, pathlib

def load_yaml(path):
    try:
        import yaml
        return yaml.safe_load(pathlib.Path(path).read_text())
    except ImportError:
        from ruamel.yaml import YAML
        return YAML(typ="safe").load(pathlib.Path(path).read_text())

RULES={r["alert"]: r for g in load_yaml("deploy/prometheus/rules/alerts.yml")["groups"] for r in g["rules"] if "alert" in r}
def render(alert, lbls):
    return {k: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: lbls[m.group(1)], v) for k, v in RULES[alert]["annotations"].items()}

def counter(*segs):
    """segs: (increment per step, number of steps). The first value is 0."""
    out=[]; v=0; first=True
    for inc,n in segs:
        if first:
            out.append(f"0+{inc}x{n}"); v=inc*n; first=False
        else:
            out.append(f"{v+inc}+{inc}x{n-1}"); v=v+inc*n
    return " ".join(out)

def gauge(*segs):
    return " ".join(f"{val}x{n-1}" if n>1 else f"{val}" for val,n in segs)

P='method="/mesh.gateway.v1.Gateway/Predict"'
def q(d): return json.dumps(d)
def labels(d): return "{"+", ".join(f"{k}: {q(v)}" for k,v in d.items())+"}"

tests=[]
def test(name, interval, series, checks):
    tests.append((name, interval, series, checks))

def fire(t, alert, *alerts):
    return (t, alert, list(alerts))
def quiet(t, alert):
    return (t, alert, [])

GW={"job":"mesh-gateway","instance":"gateway:9101"}
def L(**kw): 
    d=dict(GW); d.update(kw); return d
def sev(s, base): d=dict(base); d["severity"]=s; return d

# --- availability
test("gateway down: fires after 1m of failed scrapes, not before", "1m",
  [(f'up{{job="mesh-gateway",instance="gateway:9101"}}', gauge((1,3),(0,10)))],
  [quiet("2m","MeshGatewayDown"), quiet("3m","MeshGatewayDown"), fire("4m","MeshGatewayDown", sev("P0",GW))])
test("gateway up: quiet", "1m",
  [(f'up{{job="mesh-gateway",instance="gateway:9101"}}', gauge((1,20)))],
  [quiet("15m","MeshGatewayDown")])
test("no replica serving: fires after 1m, not while one still serves", "1m",
  [('mesh_replica_serving{job="mesh-gateway",instance="gateway:9101",replica="http://i1:50053"}', gauge((1,3),(0,10))),
   ('mesh_replica_serving{job="mesh-gateway",instance="gateway:9101",replica="http://i2:50053"}', gauge((1,5),(0,8)))],
  [quiet("4m","MeshNoInferenceReplicaServing"), quiet("5m","MeshNoInferenceReplicaServing"),
   fire("6m","MeshNoInferenceReplicaServing", sev("P0",GW))])
test("a features replica down for 2m", "1m",
  [('up{job="mesh-features",instance="features:9102"}', gauge((1,2),(0,10))),
   ('up{job="mesh-logger",instance="logger:9105"}', gauge((1,2),(0,1),(1,10)))],
  [quiet("3m","MeshServiceDown"), fire("5m","MeshServiceDown", {"severity":"P2","job":"mesh-features","instance":"features:9102"})])

# --- burn rates (availability): 100 Predicts/s = 6000/min
ok = lambda *s: (f'mesh_rpc_requests_total{{{P},code="OK",job="mesh-gateway",instance="gateway:9101"}}', counter(*s))
bad = lambda *s: (f'mesh_rpc_requests_total{{{P},code="UNAVAILABLE",job="mesh-gateway",instance="gateway:9101"}}', counter(*s))
client = lambda *s: (f'mesh_rpc_requests_total{{{P},code="INVALID_ARGUMENT",job="mesh-gateway",instance="gateway:9101"}}', counter(*s))
test("availability fast burn: 20 % failing from 60m pages within ~10m, not in the first 3m", "1m",
  [ok((6000,60),(4800,30)), bad((0,60),(1200,30)), client((600,90))],
  [quiet("59m","MeshSLOFastBurn"), quiet("63m","MeshSLOFastBurn"),
   fire("70m","MeshSLOFastBurn", {"severity":"P1","slo":"availability"})])
test("availability blip: 20 % failing for 3m does not page", "1m",
  [ok((6000,60),(4800,3),(6000,60)), bad((0,60),(1200,3),(0,60))],
  [quiet(f"{m}m","MeshSLOFastBurn") for m in (62,64,66,70,80,100,120)] +
  [quiet(f"{m}m","MeshSLOSlowBurn") for m in (70,100,120)])
test("client mistakes burn nothing: 50 % INVALID_ARGUMENT", "1m",
  [ok((3000,120)), client((3000,120))],
  [quiet("119m","MeshSLOFastBurn"), quiet("119m","MeshSLOSlowBurn")])
test("availability slow burn: 1 % failing after 6 healthy hours pages after ~4h, never fast", "1m",
  [ok((6000,360),(5940,300)), bad((0,360),(60,300))],
  [quiet("540m","MeshSLOSlowBurn"), quiet("600m","MeshSLOFastBurn"),
   fire("620m","MeshSLOSlowBurn", {"severity":"P2","slo":"availability"}), quiet("620m","MeshSLOFastBurn")])
# 5-minute steps for the 3-day window: 30000 Predicts per step.
test("availability budget burn: 0.5 % failing after a healthy day opens a ticket after ~7h", "5m",
  [ok((30000,288),(29850,144)), bad((0,288),(150,144))],
  [quiet("1450m","MeshSLOBudgetBurn"), quiet("1740m","MeshSLOBudgetBurn"),
   fire("1950m","MeshSLOBudgetBurn", {"severity":"P3","slo":"availability"}),
   quiet("1950m","MeshSLOSlowBurn"), quiet("1950m","MeshSLOFastBurn")])

# --- latency: half the Predicts slower than 25 ms
fast = lambda *s: (f'mesh_rpc_duration_seconds_bucket{{{P},le="0.025",job="mesh-gateway",instance="gateway:9101"}}', counter(*s))
count = lambda *s: (f'mesh_rpc_duration_seconds_count{{{P},job="mesh-gateway",instance="gateway:9101"}}', counter(*s))
test("latency fast burn: half the Predicts over 25 ms pages; 0.5 % over does not", "1m",
  [fast((5970,60),(3000,40)), count((6000,100))],
  [quiet("60m","MeshSLOFastBurn"), quiet("70m","MeshSLOFastBurn"),
   fire("90m","MeshSLOFastBurn", {"severity":"P1","slo":"latency"})])

# --- log completeness: 6000 records/min delivered; then 1 % dropped
delivered = lambda *s: ('mesh_spool_delivery_delay_seconds_count{job="mesh-gateway",instance="gateway:9101"}', counter(*s))
ontime = lambda *s: ('mesh_spool_delivery_delay_seconds_bucket{le="300",job="mesh-gateway",instance="gateway:9101"}', counter(*s))
dropped = lambda *s: ('mesh_spool_dropped_total{reason="full",job="mesh-gateway",instance="gateway:9101"}', counter(*s))
test("log completeness fast burn: 1 % of records dropped pages", "1m",
  [delivered((6000,90)), ontime((6000,90)), dropped((0,60),(60,30))],
  [quiet("60m","MeshSLOFastBurn"), fire("75m","MeshSLOFastBurn", {"severity":"P1","slo":"log_completeness"})])
test("log completeness fast burn: records delivered after 5 minutes page", "1m",
  [delivered((6000,90)), ontime((6000,60),(5000,30))],
  [quiet("60m","MeshSLOFastBurn"), fire("75m","MeshSLOFastBurn", {"severity":"P1","slo":"log_completeness"})])
test("log completeness: no records dropped and none late is quiet (the dropped series may not exist)", "1m",
  [delivered((6000,90)), ontime((6000,90))],
  [quiet("89m","MeshSLOFastBurn")])

# --- resilience
B=dict(GW, downstream="inference")
test("breaker open (or half-open) for 3m; a 2m flap does not fire", "1m",
  [('mesh_breaker_state{job="mesh-gateway",instance="gateway:9101",downstream="inference"}', gauge((0,2),(1,2),(0,3),(1,1),(2,1),(1,10))),
   ('mesh_breaker_state{job="mesh-gateway",instance="gateway:9101",downstream="features"}', gauge((0,20)))],
  [quiet("4m","MeshBreakerOpen"), quiet("9m","MeshBreakerOpen"), fire("11m","MeshBreakerOpen", sev("P2",B) | {})])
R=dict(GW, replica="http://i2:50053")
test("replica ejected for 5m", "1m",
  [('mesh_replica_ejected{job="mesh-gateway",instance="gateway:9101",replica="http://i2:50053"}', gauge((0,2),(1,3),(0,2),(1,10))),
   ('mesh_replica_serving{job="mesh-gateway",instance="gateway:9101",replica="http://i2:50053"}', gauge((1,17)))],
  [quiet("5m","MeshReplicaUnavailable"), quiet("11m","MeshReplicaUnavailable"), fire("12m","MeshReplicaUnavailable", sev("P3",R))])
test("replica not serving for 5m", "1m",
  [('mesh_replica_ejected{job="mesh-gateway",instance="gateway:9101",replica="http://i2:50053"}', gauge((0,12))),
   ('mesh_replica_serving{job="mesh-gateway",instance="gateway:9101",replica="http://i2:50053"}', gauge((1,2),(0,10)))],
  [quiet("6m","MeshReplicaUnavailable"), fire("7m","MeshReplicaUnavailable", sev("P3",R))])
test("bulkhead shedding 5/s for 10m fires; 0.5/s does not", "1m",
  [('mesh_bulkhead_shed_total{job="mesh-gateway",instance="gateway:9101",bulkhead="server"}', counter((0,5),(300,30))),
   ('mesh_bulkhead_shed_total{job="mesh-gateway",instance="gateway:9101",bulkhead="inference"}', counter((30,35)))],
  [quiet("10m","MeshBulkheadShedding"), fire("20m","MeshBulkheadShedding", sev("P3", dict(GW, bulkhead="server")))])
test("connections refused 1/s for 10m fires; a burst does not", "1m",
  [('mesh_connections_refused_total{job="mesh-features",instance="features:9102",reason="per_peer"}', counter((0,5),(60,30))),
   ('mesh_connections_refused_total{job="mesh-features",instance="features:9102",reason="total"}', counter((0,5),(500,1),(0,29)))],
  [quiet("10m","MeshConnectionsRefused"),
   fire("20m","MeshConnectionsRefused", {"severity":"P3","job":"mesh-features","instance":"features:9102","reason":"per_peer"})])

# --- dependencies
LG={"job":"mesh-logger","instance":"logger:9105"}
test("PostgreSQL unreachable: write errors and no writes for 2m; errors while writes succeed do not fire", "1m",
  [('mesh_log_write_errors_total{job="mesh-logger",instance="logger:9105"}', counter((0,5),(5,5),(10,20))),
   ('mesh_log_records_written_total{job="mesh-logger",instance="logger:9105"}', counter((6000,10),(0,20)))],
  [quiet("10m","MeshPostgresUnreachable"), quiet("13m","MeshPostgresUnreachable"),
   fire("16m","MeshPostgresUnreachable", sev("P2",LG))])
FT={"job":"mesh-features","instance":"features:9102"}
test("Redis unreachable: errors for 3m; one error does not fire", "1m",
  [('mesh_feature_redis_errors_total{job="mesh-features",instance="features:9102"}', counter((0,3),(1,1),(0,6),(50,10)))],
  [quiet("8m","MeshRedisUnreachable"), quiet("12m","MeshRedisUnreachable"),
   fire("15m","MeshRedisUnreachable", sev("P3",FT))])

# --- prediction log
test("delivery lagging: oldest record over 3 minutes for 1m", "1m",
  [('mesh_spool_oldest_record_age_seconds{job="mesh-gateway",instance="gateway:9101"}', "0 0 60 120 170 230 290 350 410")],
  [quiet("5m","MeshLogDeliveryLagging"), fire("6m","MeshLogDeliveryLagging", sev("P2",GW))])
test("spool backlog over 10000 and growing for 15m; a large steady backlog does not fire", "1m",
  [('mesh_spool_pending_records{job="mesh-gateway",instance="gateway:9101"}', "0+1000x40"),
   ('mesh_spool_pending_records{job="mesh-gateway",instance="gateway:9102"}', "20000x40")],
  [quiet("20m","MeshSpoolBacklogGrowing"), fire("30m","MeshSpoolBacklogGrowing", sev("P3",GW))])
test("records dropped fire at once", "1m",
  [('mesh_spool_dropped_total{job="mesh-gateway",instance="gateway:9101",reason="full"}', counter((0,5),(3,1),(0,20)))],
  [quiet("5m","MeshPredictionRecordsDropped"), fire("7m","MeshPredictionRecordsDropped", sev("P2", dict(GW, reason="full"))),
   quiet("20m","MeshPredictionRecordsDropped")])
test("spool disk: free space below what the spool may still grow by, for 5m; a disk with room does not fire", "1m",
  [('mesh_spool_disk_free_bytes{job="mesh-gateway",instance="gateway:9101"}', gauge((2e9,3),(0.5e9,10))),
   ('mesh_spool_max_bytes{job="mesh-gateway",instance="gateway:9101"}', gauge((1073741824,13))),
   ('mesh_spool_pending_bytes{job="mesh-gateway",instance="gateway:9101"}', gauge((1e6,13))),
   ('mesh_spool_disk_free_bytes{job="mesh-gateway",instance="gateway:9102"}', gauge((11e9,13))),
   ('mesh_spool_max_bytes{job="mesh-gateway",instance="gateway:9102"}', gauge((1073741824,13))),
   ('mesh_spool_pending_bytes{job="mesh-gateway",instance="gateway:9102"}', gauge((9e8,13)))],
  [quiet("7m","MeshSpoolDiskFilling"), fire("8m","MeshSpoolDiskFilling", sev("P2",GW))])
test("partition maintenance stale for 3h15m fires; hourly successes do not", "1m",
  [('mesh_log_maintenance_last_success_timestamp_seconds{job="mesh-logger",instance="logger:9105"}', gauge((0,60),(3600,60),(7200,300))),
   ('mesh_log_maintenance_last_success_timestamp_seconds{job="mesh-logger",instance="logger:9106"}', gauge(*[(3600*h,60) for h in range(7)]))],
  [quiet("5h","MeshLogRetentionFailing"), quiet("5h14m","MeshLogRetentionFailing"),
   fire("5h20m","MeshLogRetentionFailing", sev("P3", {"job":"mesh-logger","instance":"logger:9105"}))])
test("rejects table growing: over 10 in 15m; a few do not fire", "1m",
  [('mesh_log_records_rejected_total{job="mesh-logger",instance="logger:9105",reason="invalid"}', counter((0,5),(2,20))),
   ('mesh_log_records_rejected_total{job="mesh-logger",instance="logger:9105",reason="refused"}', counter((0,5),(5,1),(0,19)))],
  [quiet("6m","MeshLogRejectsGrowing"), fire("15m","MeshLogRejectsGrowing", sev("P3", dict(LG, reason="invalid")))])
test("rejects unstorable fire at once", "1m",
  [('mesh_log_rejects_unstorable_total{job="mesh-logger",instance="logger:9105"}', counter((0,5),(1,1),(0,5)))],
  [quiet("5m","MeshLogRejectsUnstorable"), fire("7m","MeshLogRejectsUnstorable", sev("P2",LG))])

# --- process
test("one restart is P4, three in 15m are a crash loop (P2)", "1m",
  [('process_start_time_seconds{job="mesh-inference",instance="inference-1:9103"}', "1000x5 1400x3 1700x3 1900x20"),
   ('process_start_time_seconds{job="mesh-logger",instance="logger:9105"}', "1000x30")],
  [quiet("4m","MeshProcessRestarted"), fire("6m","MeshProcessRestarted", {"severity":"P4","job":"mesh-inference","instance":"inference-1:9103"}),
   quiet("6m","MeshProcessCrashLooping"),
   quiet("13m","MeshProcessCrashLooping"), fire("15m","MeshProcessCrashLooping", {"severity":"P2","job":"mesh-inference","instance":"inference-1:9103"}),
   quiet("30m","MeshProcessRestarted")])

# --- waiting for metrics
test("TLS certificate expiring in 10 days fires after 10m; 30 days does not", "1m",
  [('mesh_tls_certificate_expiry_timestamp_seconds{job="mesh-gateway",instance="gateway:9101",path="/etc/mesh/tls.crt"}', "864000x20"),
   ('mesh_tls_certificate_expiry_timestamp_seconds{job="mesh-features",instance="features:9102",path="/etc/mesh/tls.crt"}', "2592000x20")],
  [quiet("9m","MeshTLSCertificateExpiring"),
   fire("11m","MeshTLSCertificateExpiring", sev("P3", dict(GW, path="/etc/mesh/tls.crt")))])
test("drift: PSI over 0.2 for 30m fires; 0.15 does not", "1m",
  [('mesh_model_drift_psi{job="mesh-gateway",instance="gateway:9101",model="churn",version="v2",feature="tenure_months"}', "0.1x5 0.3x40"),
   ('mesh_model_drift_psi{job="mesh-gateway",instance="gateway:9101",model="churn",version="v2",feature="channel"}', "0.15x45")],
  [quiet("30m","MeshModelDriftHigh"),
   fire("40m","MeshModelDriftHigh", sev("P3", dict(GW, model="churn", version="v2", feature="tenure_months")))])

out=["# promtool unit tests for deploy/prometheus/rules/*.yml: every alert fires on the series that",
     "# should fire it, at the right time, and stays quiet on the near-misses beside them.",
     "# Run: promtool test rules deploy/prometheus/tests/alerts_test.yml (scripts/check-alerts.sh).",
     "rule_files:", "  - ../rules/slo.yml", "  - ../rules/alerts.yml", "evaluation_interval: 1m", "tests:"]
for name, interval, series, checks in tests:
    out.append(f"  # {name}")
    out.append(f"  - interval: {interval}")
    out.append("    input_series:")
    for s,v in series:
        out.append(f"      - series: {q(s)}")
        out.append(f"        values: {q(v)}")
    out.append("    alert_rule_test:")
    for t, alert, alerts in checks:
        out.append(f"      - eval_time: {t}")
        out.append(f"        alertname: {alert}")
        if not alerts:
            out.append("        exp_alerts: []")
        else:
            out.append("        exp_alerts:")
            for a in alerts:
                out.append(f"          - exp_labels: {labels(a)}")
                out.append(f"            exp_annotations: {labels(render(alert, a))}")
open(sys.argv[1],"w").write("\n".join(out)+"\n")
