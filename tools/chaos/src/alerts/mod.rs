//! Alerts proven live: a real Prometheus and a real Alertmanager (Debian's `prometheus` and
//! `prometheus-alertmanager`, installed by scripts/bootstrap.sh) watch the chaos mesh, and a
//! webhook receiver inside mesh-chaos records every notification.
//!
//! - Prometheus: a free loopback port, its own temporary data directory, scrapes every service's
//!   metrics port every 500 ms as the shipped jobs (`mesh-gateway`, `mesh-features`,
//!   `mesh-inference`, `mesh-logger`, with `instance` set to the service's name), evaluates every
//!   500 ms the shipped rules rendered on the chaos time scale ([`render`]), and sends alerts to
//!   the Alertmanager below.
//! - Alertmanager: a free loopback port, its own data directory, no cluster gossip
//!   (`--cluster.listen-address=`), the shipped routes and inhibitions with 1 s grouping and
//!   every webhook at [`receiver`]; `send_resolved` as shipped, so resolutions are notified.
//! - Per scenario: every alert notified as firing between the scenario's start and the moment the
//!   stack is quiet again (nothing pending or firing in Prometheus, nothing firing at the
//!   receiver; bounded), with its time after the fault was injected, and its resolution with its
//!   time after the fault was lifted. [`expect::expected_alerts`] says which must fire and which
//!   may; anything else, or anything firing before the fault, fails the scenario.
//!
//! The rendered files are written to `<out>/alerting/` for reading; the processes' output goes
//! to `<out>/logs/{prometheus,alertmanager}.log`. Both processes are stopped by their PIDs when
//! the stack is dropped.

pub mod expect;
pub mod receiver;
pub mod render;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::procs::send_signal;
use crate::say;
use receiver::{Notice, Notices};

/// One service to scrape: its job, its name (the `instance` label) and its metrics port.
pub struct Target {
    /// `mesh-gateway`, `mesh-features`, `mesh-inference` or `mesh-logger`.
    pub job: &'static str,
    /// The service's name in the chaos mesh (`inference-1`, …).
    pub instance: String,
    /// Its metrics port on 127.0.0.1.
    pub port: u16,
}

impl Target {
    /// The target for the chaos mesh's service `name` (its job from the name's first part:
    /// `inference-1` is `mesh-inference`).
    pub fn of(name: &str, port: u16) -> Self {
        let job = match name.split('-').next().unwrap_or(name) {
            "gateway" => "mesh-gateway",
            "features" => "mesh-features",
            "inference" => "mesh-inference",
            _ => "mesh-logger",
        };
        Self {
            job,
            instance: name.to_owned(),
            port,
        }
    }
}

/// Prometheus, Alertmanager and the webhook receiver.
pub struct AlertStack {
    prometheus: Proc,
    alertmanager: Proc,
    prometheus_addr: SocketAddr,
    notices: Notices,
    server: tokio::task::JoinHandle<()>,
    quiet_bound: Duration,
    _data: tempfile::TempDir,
}

/// A child process stopped (SIGTERM, then SIGKILL after 5 s) and reaped when dropped.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            send_signal(self.child.id(), libc::SIGTERM);
            let until = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(self.child.try_wait(), Ok(None)) {
                say!("{} did not stop within 5 s of SIGTERM: SIGKILL", self.name);
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }
}

impl Drop for AlertStack {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A free loopback address.
fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from((
        [127, 0, 0, 1],
        mesh_testkit::free_port()?,
    )))
}

impl AlertStack {
    /// Renders the configuration into `<out>/alerting/`, starts the receiver, Alertmanager and
    /// Prometheus, and waits until every target is scraped and Prometheus sees Alertmanager.
    pub async fn start(
        repo: &Path,
        out: &Path,
        targets: &[Target],
        quiet_bound: Duration,
    ) -> anyhow::Result<Self> {
        let conf = out.join("alerting");
        let _ = std::fs::remove_dir_all(&conf);
        std::fs::create_dir_all(&conf)?;
        let data = tempfile::Builder::new()
            .prefix("mesh-chaos-alerting-")
            .tempdir()?;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let receiver_addr = listener.local_addr()?;
        let notices = Notices::default();
        let server = tokio::spawn(receiver::serve(listener, notices.clone()));

        let rules = render::rules(&repo.join("deploy/prometheus/rules"), &conf.join("rules"))?;
        let check = Command::new("promtool")
            .arg("check")
            .arg("rules")
            .args(rules.iter().map(|r| conf.join("rules").join(r)))
            .output()
            .context("promtool (Debian package `prometheus`; scripts/bootstrap.sh installs it)")?;
        if !check.status.success() {
            bail!(
                "promtool rejects the rendered rules in {}: {}",
                conf.join("rules").display(),
                String::from_utf8_lossy(&check.stdout) + String::from_utf8_lossy(&check.stderr)
            );
        }
        let shipped = std::fs::read_to_string(repo.join("deploy/prometheus/alertmanager.yml"))?;
        let am_config = render::alertmanager_text(&shipped, &format!("http://{receiver_addr}"))?;
        std::fs::write(conf.join("alertmanager.yml"), am_config)?;

        let am_addr = free_addr()?;
        let logs = out.join("logs");
        let alertmanager = spawn(
            "alertmanager",
            Command::new("prometheus-alertmanager")
                .arg(format!(
                    "--config.file={}",
                    conf.join("alertmanager.yml").display()
                ))
                .arg(format!(
                    "--storage.path={}",
                    data.path().join("alertmanager").display()
                ))
                .arg(format!("--web.listen-address={am_addr}"))
                .arg("--cluster.listen-address="),
            &logs,
        )?;

        std::fs::write(
            conf.join("prometheus.yml"),
            prometheus_config(targets, am_addr),
        )?;
        let prometheus_addr = free_addr()?;
        let prometheus = spawn(
            "prometheus",
            Command::new("prometheus")
                .arg(format!(
                    "--config.file={}",
                    conf.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    data.path().join("prometheus").display()
                ))
                .arg(format!("--web.listen-address={prometheus_addr}")),
            &logs,
        )?;
        let mut stack = Self {
            prometheus,
            alertmanager,
            prometheus_addr,
            notices,
            server,
            quiet_bound,
            _data: data,
        };
        stack.wait_ready(targets.len(), am_addr).await?;
        say!(
            "alerting: Prometheus http://{prometheus_addr} ({} rule files at the chaos time scale, in {}), Alertmanager http://{am_addr}, webhook receiver http://{receiver_addr}",
            rules.len(),
            conf.display()
        );
        Ok(stack)
    }

    async fn wait_ready(&mut self, targets: usize, am_addr: SocketAddr) -> anyhow::Result<()> {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let up = self
                .query_number("sum(up)")
                .await
                .ok()
                .flatten()
                .unwrap_or(0.0);
            let am_known = get(self.prometheus_addr, "/api/v1/alertmanagers")
                .await
                .map(|b| b.contains(&am_addr.to_string()))
                .unwrap_or(false);
            if up as usize == targets && am_known {
                return Ok(());
            }
            for p in [&mut self.prometheus, &mut self.alertmanager] {
                if let Ok(Some(status)) = p.child.try_wait() {
                    bail!("{} exited ({status}); see logs/{}.log", p.name, p.name);
                }
            }
            if Instant::now() >= until {
                bail!(
                    "Prometheus did not scrape all {targets} targets (up: {up}) and see Alertmanager ({am_known}) within 60 s; see logs/prometheus.log and logs/alertmanager.log"
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The value of an instant query returning one sample, `None` if it returned none.
    async fn query_number(&self, query: &str) -> anyhow::Result<Option<f64>> {
        let body = get(
            self.prometheus_addr,
            &format!("/api/v1/query?query={query}"),
        )
        .await?;
        let json: serde_json::Value = serde_json::from_str(&body)?;
        Ok(json["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok()))
    }

    /// Alerts Prometheus holds as pending or firing, but the tolerated ones.
    async fn active(&self) -> anyhow::Result<Vec<String>> {
        let body = get(self.prometheus_addr, "/api/v1/alerts").await?;
        let json: serde_json::Value = serde_json::from_str(&body)?;
        Ok(json["data"]["alerts"]
            .as_array()
            .map(|alerts| {
                alerts
                    .iter()
                    .map(|a| (receiver::key_of(&a["labels"]), a["state"].as_str()))
                    .filter(|(key, _)| expect::tolerated(key).is_none())
                    .map(|(key, state)| format!("{key} ({})", state.unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Where the next scenario's notifications start.
    pub fn mark(&self) -> usize {
        self.notices.len()
    }

    /// Waits (bounded) until nothing is pending or firing, then reports the notifications since
    /// `mark` against scenario `n`'s expectations. Meanwhile a trickle of Predicts goes to the
    /// gateway at `gateway_url`: a mesh at rest still has some traffic, and without any a breaker
    /// opened during the fault is never probed and would stay open (and its alert firing).
    pub async fn settle(
        &self,
        n: u8,
        mark: usize,
        (inject_unix, lift_unix): (u64, u64),
        gateway_url: &str,
    ) -> Report {
        let _trickle = Trickle::start(gateway_url);
        let started = Instant::now();
        let mut still = Vec::new();
        while started.elapsed() < self.quiet_bound {
            still = self
                .active()
                .await
                .unwrap_or_else(|e| vec![format!("unreadable: {e}")]);
            let firing = firing_at(&self.notices.since(0));
            still.extend(
                firing
                    .values()
                    .filter(|k| expect::tolerated(k).is_none())
                    .map(|k| format!("{k} (notified firing)")),
            );
            still.sort();
            still.dedup();
            if still.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let waited_s = started.elapsed().as_secs_f64();
        if still.is_empty() {
            say!("alerts quiet ({waited_s:.1} s after the scenario's load and delivery)");
        } else {
            say!(
                "alerts NOT quiet within {} s: {}",
                self.quiet_bound.as_secs(),
                still.join(", ")
            );
        }
        let all = self.notices.since(0);
        let before = firing_at(&all[..mark.min(all.len())]);
        Report::new(
            n,
            &all[mark.min(all.len())..],
            &before,
            inject_unix,
            lift_unix,
            still,
            waited_s,
        )
    }
}

/// Five Predicts a second to the gateway until dropped (their answers do not matter).
struct Trickle(tokio::task::JoinHandle<()>);

impl Trickle {
    fn start(gateway_url: &str) -> Self {
        use mesh_proto::types::feature_value::Kind;
        let url = gateway_url.to_owned();
        Self(tokio::spawn(async move {
            let Ok(endpoint) = tonic::transport::Endpoint::from_shared(url) else {
                return;
            };
            let mut client =
                mesh_proto::gateway::gateway_client::GatewayClient::new(endpoint.connect_lazy());
            for i in 0u64.. {
                let features = [
                    ("support_calls_30d", Kind::Number((i % 11) as f64)),
                    ("channel", Kind::Category("web".into())),
                ]
                .into_iter()
                .map(|(k, v)| {
                    (
                        k.to_owned(),
                        mesh_proto::types::FeatureValue { kind: Some(v) },
                    )
                })
                .collect();
                let mut request = tonic::Request::new(mesh_proto::gateway::PredictRequest {
                    model: "churn".into(),
                    entity_id: format!("cust-{:05}", i % 1000 + 1),
                    features,
                    model_version: String::new(),
                });
                request.set_timeout(Duration::from_millis(250));
                let _ = client.predict(request).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }))
    }
}

impl Drop for Trickle {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Fingerprints whose last notice says firing, with their keys.
fn firing_at(notices: &[Notice]) -> BTreeMap<String, String> {
    let mut state = BTreeMap::new();
    for n in notices {
        if n.status == "firing" {
            state.insert(n.fingerprint.clone(), n.key.clone());
        } else {
            state.remove(&n.fingerprint);
        }
    }
    state
}

fn spawn(name: &'static str, cmd: &mut Command, logs: &Path) -> anyhow::Result<Proc> {
    let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| {
            format!("cannot start {name} (Debian packages prometheus, prometheus-alertmanager; scripts/bootstrap.sh installs them)")
        })?;
    Ok(Proc { name, child })
}

fn prometheus_config(targets: &[Target], am: SocketAddr) -> String {
    let mut jobs: BTreeMap<&str, Vec<&Target>> = BTreeMap::new();
    for t in targets {
        jobs.entry(t.job).or_default().push(t);
    }
    let mut s = format!(
        "# Written by mesh-chaos for one run: the shipped jobs on the chaos mesh's ports.\nglobal:\n  scrape_interval: 500ms\n  scrape_timeout: 500ms\n  evaluation_interval: 500ms\nrule_files:\n  - rules/*.yml\nalerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [\"{am}\"]\nscrape_configs:\n"
    );
    for (job, ts) in jobs {
        s.push_str(&format!("  - job_name: {job}\n    static_configs:\n"));
        for t in ts {
            s.push_str(&format!(
                "      - targets: [\"127.0.0.1:{}\"]\n        labels: {{instance: \"{}\"}}\n",
                t.port, t.instance
            ));
        }
    }
    s
}

/// `GET path` over HTTP/1.0 (so the answer is not chunked); the body of a 200.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        anyhow::Ok(String::from_utf8_lossy(&raw).into_owned())
    };
    let raw = tokio::time::timeout(Duration::from_secs(3), fetch)
        .await
        .with_context(|| format!("GET {path} on {addr}: no answer within 3 s"))??;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {path}: no HTTP answer"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

/// One fired alert.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Fired {
    /// The alert and its distinguishing labels.
    pub key: String,
    /// Its `alertname`.
    pub alertname: String,
    /// Alertmanager's receiver (`page` or `ticket`).
    pub receiver: String,
    /// The `severity` label.
    pub severity: String,
    /// Seconds from the fault's injection to the firing notification (negative: before it).
    pub after_inject_s: f64,
    /// Seconds from the fault's lifting to the resolved notification, if it came.
    pub resolved_after_lift_s: Option<f64>,
    /// Why it is right to fire on the chaos run itself, if it is (not judged).
    pub tolerated: Option<&'static str>,
}

/// What the alerting saw during one scenario, against its expectations.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Alerts that must fire.
    pub must: Vec<String>,
    /// Alerts that may fire.
    pub may: Vec<String>,
    /// Every alert notified firing, first time, in order.
    pub fired: Vec<Fired>,
    /// Must-fire alerts that did not.
    pub missing: Vec<String>,
    /// Fired alerts not allowed, or fired before the fault.
    pub unexpected: Vec<String>,
    /// Still pending or firing when the wait for quiet ended (empty: quiet).
    pub not_quiet: Vec<String>,
    /// How long the wait for quiet took, s.
    pub quiet_wait_s: f64,
}

impl Report {
    fn new(
        n: u8,
        window: &[Notice],
        carried: &BTreeMap<String, String>,
        inject_unix: u64,
        lift_unix: u64,
        not_quiet: Vec<String>,
        quiet_wait_s: f64,
    ) -> Self {
        let e = expect::expected_alerts(n);
        let secs = |a: u64, b: u64| (a as f64 - b as f64) / 1000.0;
        let mut fired: Vec<Fired> = Vec::new();
        for notice in window {
            if carried.contains_key(&notice.fingerprint) {
                continue;
            }
            let known = fired.iter().position(|f| f.key == notice.key);
            match (notice.status.as_str(), known) {
                ("firing", None) => fired.push(Fired {
                    key: notice.key.clone(),
                    alertname: notice.alertname.clone(),
                    receiver: notice.receiver.clone(),
                    severity: notice.severity.clone(),
                    after_inject_s: secs(notice.at_unix_ms, inject_unix),
                    resolved_after_lift_s: None,
                    tolerated: expect::tolerated(&notice.key),
                }),
                ("resolved", Some(i)) => {
                    fired[i].resolved_after_lift_s = Some(secs(notice.at_unix_ms, lift_unix));
                }
                ("firing", Some(i)) => fired[i].resolved_after_lift_s = None,
                _ => {}
            }
        }
        let names: BTreeSet<&str> = fired
            .iter()
            .filter(|f| f.tolerated.is_none())
            .map(|f| f.alertname.as_str())
            .collect();
        let missing = e
            .must
            .iter()
            .filter(|m| !names.contains(**m))
            .map(|m| (*m).to_owned())
            .collect();
        let unexpected = fired
            .iter()
            .filter(|f| f.tolerated.is_none())
            .filter_map(|f| {
                let allowed =
                    e.must.contains(&f.alertname.as_str()) || e.may.contains(&f.alertname.as_str());
                if !allowed {
                    Some(format!("{} ({:+.1} s)", f.key, f.after_inject_s))
                } else if f.after_inject_s < 0.0 {
                    Some(format!(
                        "{} ({:+.1} s: before the fault)",
                        f.key, f.after_inject_s
                    ))
                } else {
                    None
                }
            })
            .collect();
        Self {
            must: e.must.iter().map(|s| (*s).to_owned()).collect(),
            may: e.may.iter().map(|s| (*s).to_owned()).collect(),
            fired,
            missing,
            unexpected,
            not_quiet,
            quiet_wait_s,
        }
    }

    /// "MeshServiceDown instance=inference-1 +3.1 s, …" or "none".
    pub fn fired_text(&self) -> String {
        join_or_none(
            self.fired
                .iter()
                .map(|f| format!("{} {:+.1} s{}", f.key, f.after_inject_s, mark(f))),
        )
    }

    /// "MeshServiceDown instance=inference-1 +2.0 s, …" (after the fault was lifted), or "none".
    pub fn resolved_text(&self) -> String {
        join_or_none(self.fired.iter().map(|f| match f.resolved_after_lift_s {
            Some(s) => format!("{} {s:+.1} s{}", f.key, mark(f)),
            None if f.tolerated.is_some() => format!("{} not resolved{}", f.key, mark(f)),
            None => format!("{} NOT resolved", f.key),
        }))
    }

    /// The checks this report makes: (what, pass).
    pub fn checks(&self) -> Vec<(String, bool)> {
        let unresolved: Vec<&str> = self
            .fired
            .iter()
            .filter(|f| f.resolved_after_lift_s.is_none() && f.tolerated.is_none())
            .map(|f| f.key.as_str())
            .collect();
        vec![
            (
                format!(
                    "expected alerts fired (must: {}; missing: {})",
                    join_or_none(self.must.iter().cloned()),
                    join_or_none(self.missing.iter().cloned())
                ),
                self.missing.is_empty(),
            ),
            (
                format!(
                    "no unexpected alert fired (unexpected: {})",
                    join_or_none(self.unexpected.iter().cloned())
                ),
                self.unexpected.is_empty(),
            ),
            (
                format!(
                    "every alert that fired resolved, and the stack was quiet after {:.0} s (unresolved: {}; still active: {})",
                    self.quiet_wait_s,
                    join_or_none(unresolved.iter().map(|s| (*s).to_owned())),
                    join_or_none(self.not_quiet.iter().cloned())
                ),
                unresolved.is_empty() && self.not_quiet.is_empty(),
            ),
        ]
    }
}

/// Marks a tolerated alert in the columns.
fn mark(f: &Fired) -> &'static str {
    if f.tolerated.is_some() {
        " (tolerated)"
    } else {
        ""
    }
}

fn join_or_none(items: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = items.collect();
    if v.is_empty() {
        "none".to_owned()
    } else {
        v.join(", ")
    }
}
