//! The alert rules against a real Prometheus: Debian's `prometheus` (installed by
//! scripts/bootstrap.sh) runs on a loopback port with a temporary directory, scrapes the
//! whole-mesh harness's gateway every second, and evaluates the shipped rules
//! (`deploy/prometheus/rules/*.yml`) rendered with every `for:` shortened to 2 s, from the same
//! files (not a hand-kept copy). With the mesh serving, nothing fires; with every inference
//! replica stopped, the P0 alert `MeshNoInferenceReplicaServing` fires, read back from
//! Prometheus's HTTP API (`/api/v1/alerts`).
//!
//! Bounded in time (about 20 s); the Prometheus process is stopped by its PID from a drop
//! guard, so a failing test does not leave it running.
//!
//! The Grafana dashboard (`deploy/grafana/dashboards/mesh.json`) is checked here too: every
//! panel's query parses as PromQL (`promtool check rules` on a rules file holding each query as
//! a recording rule) and names only metrics a running mesh exports (scraped from each service)
//! or that the SLO rules record.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_tests::{
    features_config, http_get, inference_config, json_features, logger_config, repo, scratch_dir,
    spawn_service, start_features_with_metrics, Mesh,
};
use tokio::net::TcpListener;

/// Every `for:` of the rules is rendered as this, so a test waits seconds, not minutes.
const SHORT_FOR: &str = "2s";

/// A Prometheus process, killed (by its PID) and reaped when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus scraping the gateway's metrics at `gateway` as job `mesh-gateway`,
    /// with the shipped rules rendered with short `for:` durations.
    fn start(gateway: SocketAddr) -> Self {
        let dir = scratch_dir("prometheus");
        render_rules(&repo().join("deploy/prometheus/rules"), &dir.join("rules"));
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - rules/*.yml\n\
             scrape_configs:\n  - job_name: mesh-gateway\n    static_configs:\n      - targets: [\"{gateway}\"]\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("write prometheus.yml");
        let addr = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus (Debian package `prometheus`; run scripts/bootstrap.sh)");
        Self { child, addr, dir }
    }

    /// The active alerts (pending and firing) as `(alertname, state, severity)`.
    async fn alerts(&self) -> Vec<(String, String, String)> {
        let (status, body) = http_get(self.addr, "/api/v1/alerts").await;
        assert_eq!(status, 200, "GET /api/v1/alerts: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("alerts JSON");
        json["data"]["alerts"]
            .as_array()
            .expect("data.alerts")
            .iter()
            .map(|a| {
                let label = |k: &str| a["labels"][k].as_str().unwrap_or_default().to_owned();
                (
                    label("alertname"),
                    a["state"].as_str().unwrap_or_default().to_owned(),
                    label("severity"),
                )
            })
            .collect()
    }

    /// Waits until Prometheus has scraped the gateway (its `up` is 1).
    async fn wait_scraping(&self, timeout: Duration) {
        let started = Instant::now();
        loop {
            if let Ok((200, body)) =
                mesh_testkit::http_get(self.addr, "/api/v1/query?query=up", Duration::from_secs(2))
                    .await
            {
                if body.contains(r#""job":"mesh-gateway""#) && body.contains(r#","1"]"#) {
                    return;
                }
            }
            assert!(
                started.elapsed() < timeout,
                "Prometheus did not scrape the gateway within {timeout:?}; its log: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Copies each rules file from `from` to `to` with every `for:` set to [`SHORT_FOR`].
fn render_rules(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("rules dir");
    for entry in std::fs::read_dir(from).expect("deploy/prometheus/rules") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "yml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read rules");
        let rendered: String = text
            .lines()
            .map(|line| {
                let indent = line.len() - line.trim_start().len();
                if line.trim_start().starts_with("for: ") {
                    format!("{}for: {SHORT_FOR}\n", &line[..indent])
                } else {
                    format!("{line}\n")
                }
            })
            .collect();
        std::fs::write(to.join(path.file_name().expect("name")), rendered).expect("write rules");
    }
}

/// A loopback address with a port free a moment ago.
fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_fires_the_p0_alert_when_every_replica_stops_and_nothing_before() {
    let mut mesh = Mesh::start(|_| {}).await;
    let prometheus = Prometheus::start(mesh.gateway_http);
    prometheus.wait_scraping(Duration::from_secs(20)).await;

    // Baseline: a serving mesh with some traffic; after several evaluations nothing is active.
    mesh.seed(20).await;
    let mut client = mesh.gateway_client();
    for i in 1..=20 {
        let features =
            json_features(&serde_json::json!({"support_calls_30d": 1, "channel": "web"}));
        let request = mesh_proto::gateway::PredictRequest {
            model: "churn".into(),
            entity_id: format!("cust-{i:05}"),
            features,
            model_version: String::new(),
        };
        client.predict(request).await.expect("predict");
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let baseline = prometheus.alerts().await;
    assert!(
        baseline.is_empty(),
        "a healthy mesh made alerts active: {baseline:?}"
    );

    // The fault: every inference replica stops.
    let injected = Instant::now();
    for replica in &mut mesh.inference {
        replica.stop().await;
    }
    let fired = loop {
        let alerts = prometheus.alerts().await;
        if let Some(alert) = alerts
            .iter()
            .find(|(name, state, _)| name == "MeshNoInferenceReplicaServing" && state == "firing")
        {
            break alert.clone();
        }
        assert!(
            injected.elapsed() < Duration::from_secs(30),
            "MeshNoInferenceReplicaServing did not fire within 30 s; active: {alerts:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(fired.2, "P0");
    eprintln!(
        "MeshNoInferenceReplicaServing firing {:.1} s after the replicas stopped (for: {SHORT_FOR}, scrape and evaluation every 1 s)",
        injected.elapsed().as_secs_f64()
    );
}

/// Metrics the dashboard shows that a service registers but exports only once the event has
/// happened (a counter vector has no series before its first label values): a serving mesh
/// has none of them, so the scrape cannot show them. Each is in the README's metrics table.
const EXPORTED_ONCE_IT_HAPPENS: &[&str] = &[
    // Set per replica at its first ejection.
    "mesh_replica_ejected",
];

/// Every `expr` of every panel of the dashboard.
fn dashboard_queries() -> Vec<String> {
    let path = repo().join("deploy/grafana/dashboards/mesh.json");
    let text = std::fs::read_to_string(&path).expect("read the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    fn walk(panels: &serde_json::Value, out: &mut Vec<String>) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(expr.to_owned());
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut queries = Vec::new();
    walk(&dashboard["panels"], &mut queries);
    queries
}

/// The metric names in a PromQL expression: words starting `mesh_`, `mesh:` or `process_`
/// (label names and values inside quotes never start so).
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("mesh_") || w.starts_with("mesh:") || w.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

/// The sample names in a Prometheus text exposition.
fn sample_names(exposition: &str) -> std::collections::BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Starts `serve` with a `/metrics` listener of its own; returns the listener's address and
/// the running service.
async fn with_metrics<F, Fut, E>(serve: F) -> (mesh_tests::Running, SocketAddr)
where
    F: FnOnce(TcpListener, Option<TcpListener>) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    let metrics = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind metrics");
    let addr = metrics.local_addr().expect("addr");
    let running = spawn_service(move |listener, stopped| {
        let served = serve(listener, Some(metrics));
        async move {
            tokio::select! {
                result = served => result,
                _ = stopped => Ok(()),
            }
        }
    })
    .await;
    (running, addr)
}

#[test]
fn every_dashboard_query_parses_as_promql() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "only {} queries", queries.len());
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in queries.iter().enumerate() {
        let quoted = serde_json::to_string(expr).expect("quote");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {quoted}\n"
        ));
    }
    let dir = scratch_dir("dashboard-promql");
    let file = dir.join("dashboard_rules.yml");
    std::fs::write(&file, rules).expect("write rules");
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&file)
        .output()
        .expect("promtool (Debian package `prometheus`; run scripts/bootstrap.sh)");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "a dashboard query is not valid PromQL:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_metric_is_exported_by_a_running_mesh() {
    let mesh = Mesh::start(|_| {}).await;
    mesh.seed(5).await;
    let mut client = mesh.gateway_client();
    for i in 1..=5 {
        let request = mesh_proto::gateway::PredictRequest {
            model: "churn".into(),
            entity_id: format!("cust-{i:05}"),
            features: json_features(&serde_json::json!({"support_calls_30d": 1, "channel": "web"})),
            model_version: String::new(),
        };
        client.predict(request).await.expect("predict");
    }
    let (_features, features_http) =
        start_features_with_metrics(features_config(Some(&mesh.redis), &mesh.pg)).await;
    let logger_cfg = logger_config(&mesh.pg);
    let (_logger, logger_http) =
        with_metrics(move |l, m| mesh_logger::serve(logger_cfg, l, m, std::future::pending()))
            .await;
    let (_inference, inference_http) = with_metrics(|l, m| {
        mesh_inference::serve(inference_config(), l, m, std::future::pending())
    })
    .await;
    // The spool delivers within its flush interval; give the shipper a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut exported = std::collections::BTreeSet::new();
    for addr in [
        mesh.gateway_http,
        features_http,
        logger_http,
        inference_http,
    ] {
        let (status, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200);
        exported.extend(sample_names(&body));
    }
    let recorded =
        std::fs::read_to_string(repo().join("deploy/prometheus/rules/slo.yml")).expect("slo.yml");
    let mut unknown = std::collections::BTreeSet::new();
    for expr in dashboard_queries() {
        for name in metric_names(&expr) {
            let known = if name.starts_with("mesh:") {
                recorded.contains(&format!("record: {name}"))
            } else {
                exported.contains(&name) || EXPORTED_ONCE_IT_HAPPENS.contains(&name.as_str())
            };
            if !known {
                unknown.insert(name);
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "the dashboard names metrics no service exports: {unknown:?}"
    );
}
