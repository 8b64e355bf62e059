//! Scenario 16: inference scaled 2 → 3 → 1 under load through DNS discovery, and back to 2.
//! The gateways resolve [`super::NAME`] in their private hosts file ([`super::DnsHosts`]);
//! the replicas are inference-1 (127.0.0.2), inference-2 (127.0.0.3) and, for this scenario,
//! inference-3 (127.0.0.4), all on one port.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;

use crate::lifecycle::{infer_codes, metric};
use crate::mesh::Mesh;
use crate::procs::Service;
use crate::{say, Check};

/// The scale-up and scale-down, and what the gateway and replicas showed.
pub struct Scaling {
    third: Service,
    third_url: String,
    second_url: String,
    /// From inference-3's start until the gateway's health watch had it SERVING.
    joined_s: Option<f64>,
    /// Calls the gateway judged failed on inference-3 before it was SERVING.
    early_failures: f64,
    /// ModelInfer calls inference-3 answered before the scale-down.
    third_calls: f64,
    /// From the scale-down until no gateway metric names 127.0.0.3 or .4.
    left_s: Option<f64>,
    /// inference-2's ModelInfer count one deadline after it left, and at the end of the fault.
    second_drained: Option<(f64, f64)>,
    /// From the lift until the gateway had inference-2 SERVING again.
    restored_s: Option<f64>,
}

/// ModelInfer calls the replica with metrics on `port` has answered (every code).
async fn infer_total(port: u16) -> Option<f64> {
    infer_codes(port).await.map(|codes| codes.values().sum())
}

/// The gateway's `name` series whose labels contain `label`: their sum (`None`: none, or
/// /metrics unreadable).
async fn gateway_series(mesh: &Mesh, name: &str, label: &str) -> Option<f64> {
    let lines = metric(mesh.gateway.metrics_port, name).await?;
    let matching: Vec<f64> = lines
        .iter()
        .filter(|(labels, _)| labels.contains(label))
        .map(|(_, v)| *v)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

/// Polls until `done` or `bound`; how long it took.
async fn until<F, Fut>(bound: Duration, mut done: F) -> Option<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < bound {
        if done().await {
            return Some((started.elapsed().as_secs_f64() * 100.0).round() / 100.0);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

impl Scaling {
    /// 2 → 3: 127.0.0.4 goes into DNS, then (after two re-resolutions) inference-3 starts
    /// there; waits (at most 60 s) until the gateway has it SERVING.
    pub async fn scale_up(mesh: &Mesh, metrics_port: u16) -> anyhow::Result<Self> {
        let dns = mesh.dns.as_ref().context("scenario 16 needs --ha")?;
        dns.set(&[1, 2, 3])?;
        say!(
            "fault injected: scale 2 -> 3: {} (127.0.0.4 not listening yet)",
            dns.describe()
        );
        tokio::time::sleep(Duration::from_millis(2 * super::DISCOVERY_INTERVAL_MS)).await;
        let mut third = mesh.inference1.like(
            "inference-3",
            dns.port,
            metrics_port,
            &[("MESH_REPLICA_ID", "inference-3".to_owned())],
            &mesh.paths.logs,
        );
        third = third.on(super::replica_ip(3));
        third.start()?;
        let third_url = dns.replica_url(3);
        let serving = format!("replica=\"{third_url}\"");
        let joined_s = until(Duration::from_secs(60), || async {
            gateway_series(mesh, "mesh_replica_serving", &serving).await == Some(1.0)
        })
        .await;
        let early_failures = gateway_series(
            mesh,
            "mesh_replica_calls_total",
            &format!("replica=\"{third_url}\",verdict=\"failure\""),
        )
        .await
        .unwrap_or(0.0);
        say!(
            "inference-3 SERVING at the gateway {} after it was started ({early_failures} calls to it judged failed before that)",
            joined_s.map_or("— (not within 60 s)".to_owned(), |s| format!("{s:.2} s"))
        );
        Ok(Self {
            third,
            third_url,
            second_url: dns.replica_url(2),
            joined_s,
            early_failures,
            third_calls: 0.0,
            left_s: None,
            second_drained: None,
            restored_s: None,
        })
    }

    /// Three replicas until `mid`; then 3 → 1: 127.0.0.3 and .4 leave DNS, inference-3 gets
    /// SIGTERM, inference-2 keeps running; one replica until `end` (at least 3 s more).
    pub async fn scale_down(
        &mut self,
        mesh: &mut Mesh,
        mid: tokio::time::Instant,
        end: tokio::time::Instant,
        deadline: Duration,
    ) -> anyhow::Result<()> {
        tokio::time::sleep_until(mid).await;
        self.third_calls = infer_total(self.third.metrics_port).await.unwrap_or(0.0);
        let dns = mesh.dns.as_ref().context("scenario 16 needs --ha")?;
        dns.set(&[1])?;
        self.third.signal(libc::SIGTERM);
        say!(
            "scale 3 -> 1: {}; SIGTERM to inference-3 (it had answered {} ModelInfer calls); inference-2 keeps running",
            dns.describe(),
            self.third_calls
        );
        let (second, third) = (self.second_url.clone(), self.third_url.clone());
        self.left_s = until(Duration::from_secs(10), || async {
            match crate::probe::http_get(mesh.gateway.metrics_port, "/metrics").await {
                Ok((200, body)) => !body.contains(&second) && !body.contains(&third),
                _ => false,
            }
        })
        .await;
        if !self.third.wait_exit(Duration::from_secs(30)).await {
            self.third.kill9();
        }
        tokio::time::sleep(deadline).await;
        let after_left = infer_total(mesh.inference2.metrics_port).await;
        tokio::time::sleep_until(end.max(tokio::time::Instant::now() + Duration::from_secs(3)))
            .await;
        let at_end = infer_total(mesh.inference2.metrics_port).await;
        self.second_drained = after_left.zip(at_end);
        say!(
            "127.0.0.3 and .4 gone from the gateway's metrics {} after leaving DNS; inference-2's ModelInfer count from one deadline later to the end: {:?}",
            self.left_s.map_or("— (not within 10 s)".to_owned(), |s| format!("{s:.2} s")),
            self.second_drained
        );
        Ok(())
    }

    /// Back to 2: 127.0.0.3 into DNS again; waits (at most 30 s) until the gateway has
    /// inference-2 SERVING.
    pub async fn restore(&mut self, mesh: &Mesh) -> anyhow::Result<()> {
        let dns = mesh.dns.as_ref().context("scenario 16 needs --ha")?;
        dns.set(&[1, 2])?;
        let serving = format!("replica=\"{}\"", self.second_url);
        self.restored_s = until(Duration::from_secs(30), || async {
            gateway_series(mesh, "mesh_replica_serving", &serving).await == Some(1.0)
        })
        .await;
        Ok(())
    }

    /// Scenario 16's own checks and figures.
    pub fn checks(&self, checks: &mut Vec<Check>, details: &mut serde_json::Value) {
        let secs = |s: Option<f64>| s.map_or("—".to_owned(), |s| format!("{s:.2} s"));
        checks.push(Check {
            what: format!(
                "2 -> 3: the third replica joined (SERVING at the gateway {} after its start), took no call before it was SERVING ({} judged failed) and then took calls ({})",
                secs(self.joined_s),
                self.early_failures,
                self.third_calls
            ),
            pass: self.joined_s.is_some() && self.early_failures == 0.0 && self.third_calls > 0.0,
            invariant: true,
        });
        let drained = self.second_drained.is_some_and(|(a, b)| a == b);
        checks.push(Check {
            what: format!(
                "3 -> 1: the replicas that left DNS were gone from the gateway within 10 s ({}), and inference-2, still running, took no call from one deadline after that ({:?})",
                secs(self.left_s),
                self.second_drained
            ),
            pass: self.left_s.is_some() && drained,
            invariant: true,
        });
        checks.push(Check {
            what: format!(
                "back to 2: inference-2 SERVING at the gateway again within 30 s of returning to DNS ({})",
                secs(self.restored_s)
            ),
            pass: self.restored_s.is_some(),
            invariant: false,
        });
        details["scaling"] = json!({
            "third_joined_after_s": self.joined_s,
            "third_failed_calls_before_serving": self.early_failures,
            "third_modelinfer_calls": self.third_calls,
            "left_gateway_after_s": self.left_s,
            "second_modelinfer_after_leaving_and_at_end": self.second_drained,
            "second_serving_again_after_s": self.restored_s,
            "discovery_interval_ms": super::DISCOVERY_INTERVAL_MS,
        });
    }
}
