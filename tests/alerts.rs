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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_tests::{http_get, json_features, repo, scratch_dir, Mesh};

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
