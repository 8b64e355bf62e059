//! What a model's owner watches: predictions by model, version, feature tier and outcome, and
//! per version the latency of the calls and the distribution of the scores.
//!
//! - `mesh_predictions_total{model,version,tier,outcome}`: one per item. `outcome` is the
//!   item's gRPC code (`OK`, `NOT_FOUND`, `UNAVAILABLE`, …), or `CANCELLED` for items whose call
//!   was dropped before it answered (deadline or caller gone); `tier` is where its features came
//!   from (`memory`, `redis`, `database`, `request`), `none` for an item that failed.
//! - `mesh_prediction_duration_seconds{model,version}`: one per pipeline run and version (a
//!   `PredictBatch`, a lone `Predict`, or a coalesced run of queued `Predict`s; a batch the
//!   router splits across versions counts once per version), from the earliest arrival to the
//!   answer.
//! - `mesh_prediction_score{model,version}`: each score served.
//! - `mesh_predict_step_seconds{step}`: where a run's time goes, one sample per step of a
//!   pipeline run and version: `fetch` (the `GetFeatures` call, retries included), `score` (the
//!   `ModelInfer` call, failover included), `record` (writing the records to the spool and
//!   waiting for the disk); and `queue`, one sample per coalesced `Predict`, from its arrival
//!   to the start of the run that serves it. A step cut short (the call went away) is not
//!   timed. Its label is one of those four names, never anything from a request.
//!
//! Labels are only ever the name and version of a manifest the router resolved (a version the
//! registry knows and a replica has ready), never what the request said: a call naming an
//! unknown model or version fails in step 1 of the pipeline, before anything is recorded here
//! (it is counted in `mesh_rpc_requests_total`).
//!
//! Recording is a guard ([`Observation`]) taken once a group of items has its version: a call
//! dropped before it answers (the deadline layer drops handlers, callers cancel) is still
//! counted.

use std::time::Instant;

use mesh_proto::gateway::PredictResponse;
use mesh_proto::types::FeatureTier;
use mesh_runtime::registry::ModelManifest;
use mesh_telemetry::metrics::{code_label, LATENCY_BUCKETS};
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use crate::error::GatewayError;

/// Score buckets: the models serve probabilities, so tenths of [0, 1].
const SCORE_BUCKETS: &[f64] = &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// A step of a pipeline run, timed in `mesh_predict_step_seconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A coalesced call waiting for the run that serves it.
    Queue,
    /// The `GetFeatures` call.
    Fetch,
    /// The `ModelInfer` call.
    Score,
    /// Writing the records to the spool and waiting for the disk.
    Record,
}

impl Step {
    const ALL: [Step; 4] = [Step::Queue, Step::Fetch, Step::Score, Step::Record];

    /// Its `step` label.
    pub fn label(self) -> &'static str {
        match self {
            Step::Queue => "queue",
            Step::Fetch => "fetch",
            Step::Score => "score",
            Step::Record => "record",
        }
    }
}

/// The per-model prediction metrics.
#[derive(Clone)]
pub struct PredictionMetrics {
    predictions: IntCounterVec,
    duration: HistogramVec,
    score: HistogramVec,
    /// `mesh_predict_step_seconds`, one child per [`Step`] (in [`Step::ALL`]'s order), looked
    /// up once.
    steps: [Histogram; 4],
}

impl PredictionMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let predictions = IntCounterVec::new(
            Opts::new(
                "mesh_predictions_total",
                "Prediction items, by model, version, feature tier and outcome (gRPC code)",
            ),
            &["model", "version", "tier", "outcome"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "mesh_prediction_duration_seconds",
                "Prediction calls from arrival to answer, by model and version",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["model", "version"],
        )?;
        let score = HistogramVec::new(
            HistogramOpts::new(
                "mesh_prediction_score",
                "Scores served, by model and version",
            )
            .buckets(SCORE_BUCKETS.to_vec()),
            &["model", "version"],
        )?;
        let step = HistogramVec::new(
            HistogramOpts::new(
                "mesh_predict_step_seconds",
                "Time of each step of a prediction run (fetch, score, record) and of a coalesced \
                 call's wait for its run (queue)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["step"],
        )?;
        registry.register(Box::new(predictions.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(score.clone()))?;
        registry.register(Box::new(step.clone()))?;
        let steps = Step::ALL.map(|s| step.with_label_values(&[s.label()]));
        Ok(Self {
            predictions,
            duration,
            score,
            steps,
        })
    }

    /// Records that `step` took `elapsed`.
    pub fn step(&self, step: Step, elapsed: std::time::Duration) {
        self.steps[step as usize].observe(elapsed.as_secs_f64());
    }

    /// Awaits `work` and records its time as `step`, whatever its result; dropped before it
    /// finishes (the call went away), nothing is recorded.
    pub async fn timed<T>(&self, step: Step, work: impl std::future::Future<Output = T>) -> T {
        let started = Instant::now();
        let output = work.await;
        self.step(step, started.elapsed());
        output
    }

    /// Starts observing `items` items of a call, scored by `manifest`'s version.
    pub fn observe(&self, manifest: &ModelManifest, items: usize, started: Instant) -> Observation {
        Observation {
            metrics: self.clone(),
            model: manifest.name.clone(),
            version: manifest.version.clone(),
            items,
            started,
            finished: false,
        }
    }

    fn count(&self, model: &str, version: &str, tier: &str, outcome: &str, n: u64) {
        self.predictions
            .with_label_values(&[model, version, tier, outcome])
            .inc_by(n);
    }
}

/// Each item's result, or the error that failed them all.
pub type Results = Result<Vec<Result<PredictResponse, GatewayError>>, GatewayError>;

/// One call being observed: [`Observation::finish`] records its outcome; dropped unfinished,
/// it records its items as `CANCELLED`.
pub struct Observation {
    metrics: PredictionMetrics,
    model: String,
    version: String,
    items: usize,
    started: Instant,
    finished: bool,
}

impl Observation {
    /// Records `outcome` (each item's result, or the error that failed them all) and hands it
    /// back.
    pub fn finish(mut self, outcome: Results) -> Results {
        self.finished = true;
        let (model, version) = (self.model.as_str(), self.version.as_str());
        match &outcome {
            Ok(results) => {
                for result in results {
                    match result {
                        Ok(answer) => self.record_answer(answer),
                        Err(error) => {
                            self.metrics
                                .count(model, version, "none", code_label(error.code()), 1)
                        }
                    }
                }
            }
            Err(error) => self.metrics.count(
                model,
                version,
                "none",
                code_label(error.code()),
                self.items as u64,
            ),
        }
        self.observe_duration();
        outcome
    }

    fn record_answer(&self, answer: &PredictResponse) {
        let tier = FeatureTier::try_from(answer.feature_tier).unwrap_or(FeatureTier::Unspecified);
        self.metrics
            .count(&self.model, &self.version, tier_label(tier), "OK", 1);
        self.metrics
            .score
            .with_label_values(&[&self.model, &self.version])
            .observe(answer.score);
    }

    fn observe_duration(&self) {
        self.metrics
            .duration
            .with_label_values(&[&self.model, &self.version])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Observation {
    fn drop(&mut self) {
        if !self.finished {
            self.metrics.count(
                &self.model,
                &self.version,
                "none",
                code_label(tonic::Code::Cancelled),
                self.items as u64,
            );
            self.observe_duration();
        }
    }
}

/// The `tier` label of an answer.
fn tier_label(tier: FeatureTier) -> &'static str {
    match tier {
        FeatureTier::Memory => "memory",
        FeatureTier::Redis => "redis",
        FeatureTier::Database => "database",
        FeatureTier::Request => "request",
        FeatureTier::Unspecified => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> ModelManifest {
        serde_json::from_value(serde_json::json!({
            "name": "churn",
            "version": "v2",
            "features": [],
            "output": {"name": "probabilities", "index": 1}
        }))
        .expect("manifest")
    }

    fn answer(tier: FeatureTier, score: f64) -> PredictResponse {
        PredictResponse {
            score,
            feature_tier: tier as i32,
            ..Default::default()
        }
    }

    fn count(metrics: &PredictionMetrics, tier: &str, outcome: &str) -> u64 {
        metrics
            .predictions
            .with_label_values(&["churn", "v2", tier, outcome])
            .get()
    }

    #[test]
    fn items_are_counted_by_tier_and_outcome() {
        let metrics = PredictionMetrics::register(&Registry::new()).expect("register");
        let outcome = vec![
            Ok(answer(FeatureTier::Redis, 0.7)),
            Ok(answer(FeatureTier::Request, 0.2)),
            Err(GatewayError::NotFound("entity".into())),
        ];
        let _ = metrics
            .observe(&manifest(), 3, Instant::now())
            .finish(Ok(outcome));
        assert_eq!(count(&metrics, "redis", "OK"), 1);
        assert_eq!(count(&metrics, "request", "OK"), 1);
        assert_eq!(count(&metrics, "none", "NOT_FOUND"), 1);
        let scores = metrics.score.with_label_values(&["churn", "v2"]);
        assert_eq!(scores.get_sample_count(), 2);
        let calls = metrics.duration.with_label_values(&["churn", "v2"]);
        assert_eq!(calls.get_sample_count(), 1);
    }

    #[test]
    fn a_failed_call_counts_every_item_and_a_dropped_one_counts_as_cancelled() {
        let metrics = PredictionMetrics::register(&Registry::new()).expect("register");
        let _ = metrics
            .observe(&manifest(), 4, Instant::now())
            .finish(Err(GatewayError::Unavailable("inference".into())));
        assert_eq!(count(&metrics, "none", "UNAVAILABLE"), 4);
        drop(metrics.observe(&manifest(), 2, Instant::now()));
        assert_eq!(count(&metrics, "none", "CANCELLED"), 2);
    }
}
