//! Shadow traffic: a copy of live predictions scored by a shadow version, compared with the
//! primary answer, and never allowed to touch it.
//!
//! After a group of items is answered, the gateway hands their assembled feature vectors and
//! primary scores to [`Shadow::send`], which returns at once: the copies join the shadow's queue
//! (or are shed and counted when it is full) and its worker scores them in batches, each call
//! in a place of the shadow's own bulkhead (`shadow`, `MESH_SHADOW_CONCURRENCY`; none free: the
//! batch is shed) with a budget of its own. The caller's answer is already on its way, so a slow
//! or failing shadow cannot delay, fail or change it. Each comparison goes into a window per
//! (model, shadow version), summarised by the admin API's `ShadowReport`, and into metrics.
//!
//! Each shadow score is logged too, as a record naming the primary prediction it copied
//! (`shadow_of`; the logger keeps it in `shadow_predictions`), through the same durable spool
//! as the primaries, without waiting. The spool is for the predictions callers received first:
//! once half of `MESH_SPOOL_MAX_BYTES` is waiting, shadow records are not logged (counted as
//! `mesh_shadow_predictions_total{outcome="not_logged"}`) so they can never fill it.

mod rows;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_proto::admin::ShadowSummary;
use mesh_proto::logger::PredictionRecord;
use mesh_proto::types::FeatureValue;
use mesh_runtime::registry::ModelManifest;
use mesh_runtime::{Bulkhead, Deadline};
use mesh_tensor::decode_output_f32;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use self::rows::{fits, request};
use crate::client::InferenceDownstream;
use crate::logship::LogShipper;

/// Comparisons kept per shadow.
const WINDOW: usize = 10_000;
/// The budget of one shadow call.
const BUDGET: Duration = Duration::from_secs(1);
/// Rows in one shadow `ModelInfer`.
pub const MAX_BATCH: usize = 64;
/// Scores on the same side of this agree.
pub const THRESHOLD: f64 = 0.5;

/// One comparison: the primary score, the shadow's (or its failure), the shadow's latency.
#[derive(Debug, Clone, Copy)]
struct Comparison {
    primary: f64,
    shadow: Option<f64>,
    latency_ms: f64,
}

/// One primary prediction, as the shadow gets it.
#[derive(Debug, Clone)]
pub struct Copied {
    /// The item's full feature map (what the primary logged).
    pub features: BTreeMap<String, FeatureValue>,
    /// The primary's score.
    pub score: f64,
    /// The primary's prediction id, which the shadow's record names.
    pub prediction_id: String,
    /// The entity scored.
    pub entity_id: String,
    /// The primary's trace id (the shadow's work belongs to the same request).
    pub trace_id: String,
}

/// The copies waiting for one shadow, and whether its worker runs.
struct Queue {
    manifest: ModelManifest,
    copies: VecDeque<Copied>,
    running: bool,
}

/// Marks a shadow's worker stopped if it ends without saying so itself (a panic, or the
/// runtime dropping the task), so the next copy starts a new one.
struct Running<'a> {
    shadow: &'a Shadow,
    key: &'a (String, String),
    done: bool,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut queues = self.shadow.queues.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(queue) = queues.get_mut(self.key) {
                queue.running = false;
            }
        }
    }
}

/// Shadow scoring and what it found.
pub struct Shadow {
    queues: Mutex<HashMap<(String, String), Queue>>,
    inference: InferenceDownstream,
    log: LogShipper,
    bulkhead: Bulkhead,
    windows: Mutex<HashMap<(String, String), VecDeque<Comparison>>>,
    shed: Mutex<HashMap<(String, String), u64>>,
    queue_limit: usize,
    outcomes: IntCounterVec,
    diffs: HistogramVec,
    batch_rows: HistogramVec,
}

impl Shadow {
    /// Shadow calls through `inference` within `bulkhead`, at most `queue_limit` copies waiting
    /// per shadow, records into `log`; registers
    /// `mesh_shadow_predictions_total{model,version,outcome}`,
    /// `mesh_shadow_abs_diff{model,version}` and `mesh_shadow_batch_rows{model,version}` in
    /// `registry`.
    pub fn new(
        inference: InferenceDownstream,
        log: LogShipper,
        bulkhead: Bulkhead,
        queue_limit: usize,
        registry: &Registry,
    ) -> prometheus::Result<Arc<Self>> {
        let outcomes = IntCounterVec::new(
            Opts::new(
                "mesh_shadow_predictions_total",
                "Shadow copies by outcome: scored, error (the shadow failed), shed (its bulkhead \
                 was full), incompatible (the shadow needs a feature the primary did not have), \
                 not_logged (scored, but the spool was too full to log it)",
            ),
            &["model", "version", "outcome"],
        )?;
        let diffs = HistogramVec::new(
            HistogramOpts::new(
                "mesh_shadow_abs_diff",
                "|shadow score - primary score| per shadow prediction",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]),
            &["model", "version"],
        )?;
        let batch_rows = HistogramVec::new(
            HistogramOpts::new(
                "mesh_shadow_batch_rows",
                "Copies scored together in one shadow ModelInfer call",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
            &["model", "version"],
        )?;
        registry.register(Box::new(outcomes.clone()))?;
        registry.register(Box::new(diffs.clone()))?;
        registry.register(Box::new(batch_rows.clone()))?;
        Ok(Arc::new(Self {
            queues: Mutex::default(),
            inference,
            log,
            bulkhead,
            queue_limit,
            windows: Mutex::default(),
            shed: Mutex::default(),
            outcomes,
            diffs,
            batch_rows,
        }))
    }

    fn count(&self, manifest: &ModelManifest, outcome: &str, n: u64) {
        self.outcomes
            .with_label_values(&[manifest.name.as_str(), manifest.version.as_str(), outcome])
            .inc_by(n);
    }

    /// Queues `copies` to be scored with the shadow `manifest` in the background, to compare
    /// with the primary scores and log. Returns at once; never waits for a lock held across
    /// anything slower than a queue push.
    ///
    /// Copies of one shadow are scored in batches: one worker per shadow takes everything queued
    /// (up to [`MAX_BATCH`] rows) into one `ModelInfer`, and what arrives while that call is in
    /// flight forms the next batch, so the shadow costs one call per batch rather than one per
    /// prediction, and an idle mesh scores a copy at once. Beyond `MESH_SHADOW_QUEUE` waiting copies
    /// (the shadow cannot keep up: the machine is saturated) new copies are shed and counted.
    pub fn send(self: &Arc<Self>, manifest: ModelManifest, copies: Vec<Copied>) {
        let (fitting, misfits): (Vec<Copied>, Vec<Copied>) =
            copies.into_iter().partition(|c| fits(&manifest, c));
        if !misfits.is_empty() {
            self.count(&manifest, "incompatible", misfits.len() as u64);
        }
        if fitting.is_empty() {
            return;
        }
        let key = (manifest.name.clone(), manifest.version.clone());
        let (start, shed) = {
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            let queue = queues.entry(key.clone()).or_insert_with(|| Queue {
                manifest: manifest.clone(),
                copies: VecDeque::new(),
                running: false,
            });
            let room = self.queue_limit.saturating_sub(queue.copies.len());
            let shed = fitting.len().saturating_sub(room);
            queue.copies.extend(fitting.into_iter().take(room));
            let start = !queue.running && !queue.copies.is_empty();
            queue.running |= start;
            (start, shed)
        };
        if shed > 0 {
            self.shed_copies(&manifest, shed as u64);
        }
        if start {
            tokio::spawn(self.clone().drain(key));
        }
    }

    /// How many of `n` new copies for the shadow `manifest` its queue has room for now; the
    /// rest are shed here and counted, so a saturated shadow costs the primary no copying.
    pub fn admit(&self, manifest: &ModelManifest, n: usize) -> usize {
        let queued = {
            let queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            queues
                .get(&(manifest.name.clone(), manifest.version.clone()))
                .map_or(0, |q| q.copies.len())
        };
        let room = self.queue_limit.saturating_sub(queued).min(n);
        if room < n {
            self.shed_copies(manifest, (n - room) as u64);
        }
        room
    }

    fn shed_copies(&self, manifest: &ModelManifest, n: u64) {
        self.count(manifest, "shed", n);
        let key = (manifest.name.clone(), manifest.version.clone());
        *self
            .shed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default() += n;
    }

    /// The shadow's worker: scores what is queued, a batch at a time, until the queue is empty.
    async fn drain(self: Arc<Self>, key: (String, String)) {
        let mut running = Running {
            shadow: &self,
            key: &key,
            done: false,
        };
        loop {
            let (manifest, batch) = {
                let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
                let Some(queue) = queues.get_mut(&key) else {
                    running.done = true;
                    return;
                };
                if queue.copies.is_empty() {
                    // Decided under the lock `send` takes: a copy queued after this starts a
                    // worker of its own. An idle queue goes, so a stopped shadow leaves none.
                    queues.remove(&key);
                    running.done = true;
                    return;
                }
                let n = queue.copies.len().min(MAX_BATCH);
                let batch: Vec<Copied> = queue.copies.drain(..n).collect();
                (queue.manifest.clone(), batch)
            };
            self.score(manifest, batch).await;
        }
    }

    /// Scores one batch in a place of the shadow bulkhead (shed if there is none), compares and
    /// logs.
    async fn score(&self, manifest: ModelManifest, copies: Vec<Copied>) {
        let Ok(permit) = self.bulkhead.try_enter() else {
            self.shed_copies(&manifest, copies.len() as u64);
            return;
        };
        let Some(request) = request(&manifest, &copies) else {
            self.count(&manifest, "incompatible", copies.len() as u64);
            return;
        };
        self.batch_rows
            .with_label_values(&[manifest.name.as_str(), manifest.version.as_str()])
            .observe(copies.len() as f64);
        // The place in the shadow bulkhead is held until the batch is scored or fails.
        let started = Instant::now();
        let result = self
            .inference
            .infer_admitted(request, Deadline::after(BUDGET), permit)
            .await;
        let latency = started.elapsed();
        let scores = result.ok().and_then(|(response, _)| {
            let (values, width) = decode_output_f32(&response, &manifest.output.name).ok()?;
            (values.len() == copies.len() * width).then(|| {
                (0..copies.len())
                    .map(|r| f64::from(values[r * width + manifest.output.index]))
                    .collect::<Vec<f64>>()
            })
        });
        let primary: Vec<f64> = copies.iter().map(|c| c.score).collect();
        self.record(
            &manifest,
            &primary,
            scores.as_deref(),
            latency.as_secs_f64() * 1e3,
        );
        if let Some(scores) = scores {
            self.log_scores(&manifest, &copies, &scores, latency).await;
        }
    }

    /// Logs each finite shadow score with its primary's id, unless the spool is filling up.
    async fn log_scores(
        &self,
        manifest: &ModelManifest,
        copies: &[Copied],
        scores: &[f64],
        latency: Duration,
    ) {
        if !self.log.status().room_for_optional() {
            self.count(manifest, "not_logged", copies.len() as u64);
            return;
        }
        let time = mesh_runtime::clock::unix_micros();
        for (copy, score) in copies.iter().zip(scores).filter(|(_, s)| s.is_finite()) {
            let record = PredictionRecord {
                prediction_id: uuid::Uuid::now_v7().to_string(),
                time_unix_micros: time,
                model: manifest.name.clone(),
                model_version: manifest.version.clone(),
                entity_id: copy.entity_id.clone(),
                score: *score,
                latency_micros: latency.as_micros() as u64,
                trace_id: copy.trace_id.clone(),
                shadow_of: copy.prediction_id.clone(),
                ..Default::default()
            };
            // Not waited for: whether it is durable yet changes nothing for anyone.
            if self
                .log
                .record(&record, Duration::ZERO)
                .await
                .is_err_and(|e| !matches!(e, crate::logship::NotKept::Pending))
            {
                self.count(manifest, "not_logged", 1);
            }
        }
    }

    fn record(
        &self,
        manifest: &ModelManifest,
        primary: &[f64],
        shadow: Option<&[f64]>,
        latency_ms: f64,
    ) {
        let n = primary.len() as u64;
        match shadow {
            Some(_) => self.count(manifest, "scored", n),
            None => self.count(manifest, "error", n),
        }
        let key = (manifest.name.clone(), manifest.version.clone());
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let window = windows.entry(key).or_default();
        for (i, p) in primary.iter().enumerate() {
            let s = shadow.map(|s| s[i]);
            if let Some(s) = s {
                self.diffs
                    .with_label_values(&[manifest.name.as_str(), manifest.version.as_str()])
                    .observe((s - p).abs());
            }
            if window.len() == WINDOW {
                window.pop_front();
            }
            window.push_back(Comparison {
                primary: *p,
                shadow: s,
                latency_ms,
            });
        }
    }

    /// The window's summary for every shadow (of `model`, if given).
    pub fn report(&self, model: Option<&str>) -> Vec<ShadowSummary> {
        let windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let shed = self.shed.lock().unwrap_or_else(|e| e.into_inner());
        let mut keys: Vec<&(String, String)> = windows.keys().chain(shed.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter(|(m, _)| model.is_none_or(|want| want == m))
            .map(|key| {
                let empty = VecDeque::new();
                let mut summary = summarise(windows.get(key).unwrap_or(&empty));
                summary.model = key.0.clone();
                summary.shadow_version = key.1.clone();
                summary.shed = shed.get(key).copied().unwrap_or(0);
                summary
            })
            .collect()
    }
}

fn summarise(window: &VecDeque<Comparison>) -> ShadowSummary {
    let mut diffs: Vec<f64> = Vec::new();
    let mut latencies: Vec<f64> = Vec::new();
    let mut agree = 0u64;
    for c in window {
        latencies.push(c.latency_ms);
        if let Some(s) = c.shadow {
            diffs.push((s - c.primary).abs());
            agree += u64::from((s >= THRESHOLD) == (c.primary >= THRESHOLD));
        }
    }
    let p99 = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(((v.len() as f64) * 0.99).ceil() as usize)
            .or(v.last())
            .copied()
            .unwrap_or(0.0)
    };
    let scored = diffs.len();
    ShadowSummary {
        count: window.len() as u64,
        errors: (window.len() - scored) as u64,
        mean_abs_diff: if scored == 0 {
            0.0
        } else {
            diffs.iter().sum::<f64>() / scored as f64
        },
        p99_abs_diff: p99(&mut diffs),
        agreement: if scored == 0 {
            0.0
        } else {
            agree as f64 / scored as f64
        },
        threshold: THRESHOLD,
        shadow_p99_latency_ms: p99(&mut latencies),
        ..Default::default()
    }
}
