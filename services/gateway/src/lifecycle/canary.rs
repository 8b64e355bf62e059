//! Canaries that roll themselves back.
//!
//! While a rollout is below 100 %, every gateway compares the candidate with production over the
//! last [`WINDOW`]: the share of failed calls (a non-finite score counts as a failure) and the p99
//! latency. Once both have [`MIN_SAMPLE`] calls, a candidate whose error rate exceeds
//! production's by [`MAX_ERROR_EXCESS`], or whose p99 exceeds twice production's plus
//! [`LATENCY_SLACK`], is rolled back: the gateway stops the rollout in the live registry as actor
//! `mesh`, with the figures in the audit record, and every gateway follows within a notification.
//! Callers do not see the candidate's failures meanwhile: the pipeline retries a failed candidate
//! group on production within the same deadline.
//!
//! A rollout may also promote itself: one started with a bake (`promote_after_secs`) whose
//! candidate has been out that long, and is judged healthy now (both sides have the minimum
//! sample, no breach), is made production by the gateway as actor `mesh`
//! (`promote_candidate`, the figures in the audit record). The registry refuses the change
//! unless that candidate is still the rollout's, so of several gateways one promotes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_registry::{Change, RegistryStore, StoreError};
use prometheus::{IntCounterVec, Opts, Registry};

use super::routing::Router;

/// How far back the comparison looks.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Calls each side needs in the window before the candidate is judged.
pub const MIN_SAMPLE: usize = 50;
/// Largest tolerated excess of the candidate's error rate over production's.
pub const MAX_ERROR_EXCESS: f64 = 0.05;
/// Added to twice production's p99 before the candidate's p99 is a breach, unless
/// `MESH_CANARY_LATENCY_SLACK_MS` says otherwise.
pub const LATENCY_SLACK: Duration = Duration::from_millis(20);

#[derive(Clone, Copy)]
struct Call {
    at: Instant,
    failed: bool,
    latency_ms: f64,
}

/// What one side of the comparison did in the window.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Figures {
    calls: usize,
    error_rate: f64,
    p99_ms: f64,
}

/// The windows and the judge.
pub struct Canary {
    calls: Mutex<HashMap<(String, String), VecDeque<Call>>>,
    latency_slack: Duration,
    rollbacks: IntCounterVec,
    promotions: IntCounterVec,
}

impl Canary {
    /// A canary judge; registers `mesh_canary_rollbacks_total{model}` and
    /// `mesh_canary_promotions_total{model}` in `registry`.
    pub fn new(registry: &Registry, latency_slack: Duration) -> prometheus::Result<Arc<Self>> {
        let rollbacks = IntCounterVec::new(
            Opts::new(
                "mesh_canary_rollbacks_total",
                "Rollouts this gateway stopped because the candidate breached its error rate or \
                 latency against production",
            ),
            &["model"],
        )?;
        let promotions = IntCounterVec::new(
            Opts::new(
                "mesh_canary_promotions_total",
                "Rollouts this gateway promoted to production after a healthy bake",
            ),
            &["model"],
        )?;
        registry.register(Box::new(rollbacks.clone()))?;
        registry.register(Box::new(promotions.clone()))?;
        Ok(Arc::new(Self {
            calls: Mutex::default(),
            latency_slack,
            rollbacks,
            promotions,
        }))
    }

    /// Records one scoring call of `model` `version` (labels from the registry only).
    pub fn observe(&self, model: &str, version: &str, failed: bool, latency: Duration) {
        let now = Instant::now();
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let window = calls
            .entry((model.to_owned(), version.to_owned()))
            .or_default();
        while window.front().is_some_and(|c| now - c.at > WINDOW) {
            window.pop_front();
        }
        window.push_back(Call {
            at: now,
            failed,
            latency_ms: latency.as_secs_f64() * 1e3,
        });
    }

    fn figures(&self, model: &str, version: &str) -> Figures {
        let now = Instant::now();
        let calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let recent: Vec<Call> = calls
            .get(&(model.to_owned(), version.to_owned()))
            .map(|w| w.iter().filter(|c| now - c.at <= WINDOW).copied().collect())
            .unwrap_or_default();
        let mut latencies: Vec<f64> = recent.iter().map(|c| c.latency_ms).collect();
        latencies.sort_by(f64::total_cmp);
        let p99 = latencies
            .get((latencies.len() as f64 * 0.99) as usize)
            .or(latencies.last())
            .copied()
            .unwrap_or(0.0);
        let failed = recent.iter().filter(|c| c.failed).count();
        Figures {
            calls: recent.len(),
            error_rate: if recent.is_empty() {
                0.0
            } else {
                failed as f64 / recent.len() as f64
            },
            p99_ms: p99,
        }
    }

    /// Judges every running rollout once: stops those whose candidate breached, promotes
    /// those whose healthy bake is over. Returns the models rolled back.
    pub async fn judge(&self, router: &Router, store: &RegistryStore) -> Vec<String> {
        let Some(state) = router.state() else {
            return Vec::new();
        };
        let mut rolled_back = Vec::new();
        for policy in state.policies.values() {
            let (Some(rollout), Some(production)) = (&policy.rollout, policy.production()) else {
                continue;
            };
            if rollout.percent >= 100.0 {
                continue;
            }
            let candidate = self.figures(&policy.model, &rollout.candidate);
            let baseline = self.figures(&policy.model, production);
            let details = serde_json::json!({
                "candidate": {"version": rollout.candidate, "calls": candidate.calls,
                              "error_rate": candidate.error_rate, "p99_ms": candidate.p99_ms},
                "production": {"version": production, "calls": baseline.calls,
                               "error_rate": baseline.error_rate, "p99_ms": baseline.p99_ms},
            });
            let (change, reason) = match breach(&candidate, &baseline, self.latency_slack) {
                Some(why) => (Change::StopRollout, format!("canary breach: {why}")),
                None => match baked(
                    rollout,
                    &candidate,
                    &baseline,
                    mesh_runtime::clock::unix_micros(),
                ) {
                    Some(why) => (
                        Change::PromoteCandidate {
                            candidate: rollout.candidate.clone(),
                        },
                        why,
                    ),
                    None => continue,
                },
            };
            let promoting = matches!(change, Change::PromoteCandidate { .. });
            match store
                .apply(&policy.model, change, "mesh", &reason, details)
                .await
            {
                Ok(_) if promoting => {
                    self.promotions
                        .with_label_values(&[policy.model.as_str()])
                        .inc();
                    tracing::info!(model = %policy.model, candidate = %rollout.candidate, %reason, "canary promoted");
                }
                Ok(_) => {
                    self.rollbacks
                        .with_label_values(&[policy.model.as_str()])
                        .inc();
                    tracing::error!(model = %policy.model, candidate = %rollout.candidate, %reason, "canary rolled back");
                    rolled_back.push(policy.model.clone());
                }
                // Another gateway acted first.
                Err(StoreError::Refused(_)) => {}
                Err(error) => {
                    tracing::warn!(%error, model = %policy.model, "canary decision not recorded; will retry")
                }
            }
        }
        rolled_back
    }
}

/// Why the rollout's candidate may be promoted now: its bake is over and it is judged on enough
/// calls on both sides (and, by the caller, found no breach).
fn baked(
    rollout: &mesh_registry::Rollout,
    candidate: &Figures,
    baseline: &Figures,
    now_micros: i64,
) -> Option<String> {
    let bake = rollout.promote_after_secs?;
    let out_for = (now_micros - rollout.since_unix_micros) as f64 / 1e6;
    if rollout.since_unix_micros <= 0 || out_for < bake {
        return None;
    }
    if candidate.calls < MIN_SAMPLE || baseline.calls < MIN_SAMPLE {
        return None;
    }
    Some(format!(
        "healthy bake: {out_for:.0} s out (bake {bake} s); error rate {:.1} % against \
         production's {:.1} %, p99 {:.1} ms against {:.1} ms over the last {} calls",
        candidate.error_rate * 100.0,
        baseline.error_rate * 100.0,
        candidate.p99_ms,
        baseline.p99_ms,
        candidate.calls
    ))
}

/// Why `candidate` breached against `baseline`, if it did and both have enough calls.
fn breach(candidate: &Figures, baseline: &Figures, slack: Duration) -> Option<String> {
    if candidate.calls < MIN_SAMPLE || baseline.calls < MIN_SAMPLE {
        return None;
    }
    if candidate.error_rate > baseline.error_rate + MAX_ERROR_EXCESS {
        return Some(format!(
            "error rate {:.1} % against production's {:.1} % over {} calls",
            candidate.error_rate * 100.0,
            baseline.error_rate * 100.0,
            candidate.calls
        ));
    }
    let limit = 2.0 * baseline.p99_ms + slack.as_secs_f64() * 1e3;
    if candidate.p99_ms > limit {
        return Some(format!(
            "p99 latency {:.1} ms against production's {:.1} ms (limit {limit:.1} ms)",
            candidate.p99_ms, baseline.p99_ms
        ));
    }
    None
}

/// The judging task; dropping it stops the task.
pub struct Judging(tokio::task::JoinHandle<()>);

impl Drop for Judging {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Judges every second until the returned guard drops.
pub fn spawn(canary: Arc<Canary>, router: Arc<Router>, store: RegistryStore) -> Judging {
    Judging(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            canary.judge(&router, &store).await;
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(calls: usize, error_rate: f64, p99_ms: f64) -> Figures {
        Figures {
            calls,
            error_rate,
            p99_ms,
        }
    }

    #[test]
    fn a_candidate_is_judged_only_on_enough_calls_and_by_both_measures() {
        let healthy = figures(200, 0.01, 4.0);
        assert_eq!(
            breach(&figures(49, 1.0, 900.0), &healthy, LATENCY_SLACK),
            None,
            "too few calls"
        );
        assert_eq!(
            breach(&figures(200, 0.05, 9.0), &healthy, LATENCY_SLACK),
            None,
            "within both limits"
        );
        let errors =
            breach(&figures(200, 0.2, 4.0), &healthy, LATENCY_SLACK).expect("error breach");
        assert!(errors.contains("error rate 20.0 %"), "{errors}");
        let slow =
            breach(&figures(200, 0.0, 90.0), &healthy, LATENCY_SLACK).expect("latency breach");
        assert!(slow.contains("p99 latency 90.0 ms"), "{slow}");
        assert_eq!(
            breach(
                &figures(200, 0.0, 90.0),
                &healthy,
                Duration::from_millis(100)
            ),
            None,
            "a larger slack tolerates a slower candidate"
        );
    }

    #[test]
    fn a_rollout_is_promoted_only_after_its_bake_and_on_enough_calls() {
        let rollout = |bake: Option<f64>| mesh_registry::Rollout {
            candidate: "2".into(),
            percent: 10.0,
            promote_after_secs: bake,
            since_unix_micros: 1_000_000_000,
        };
        let healthy = figures(200, 0.01, 4.0);
        let after = |secs: i64| 1_000_000_000 + secs * 1_000_000;
        assert_eq!(
            baked(&rollout(None), &healthy, &healthy, after(9999)),
            None,
            "no bake: a person promotes"
        );
        assert_eq!(
            baked(&rollout(Some(30.0)), &healthy, &healthy, after(29)),
            None,
            "bake not over"
        );
        assert_eq!(
            baked(
                &rollout(Some(30.0)),
                &figures(49, 0.0, 4.0),
                &healthy,
                after(31)
            ),
            None,
            "too few candidate calls"
        );
        let why = baked(&rollout(Some(30.0)), &healthy, &healthy, after(31)).expect("promote");
        assert!(why.starts_with("healthy bake: 31 s out"), "{why}");
    }
}
