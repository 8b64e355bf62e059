//! Adaptive batching of `Predict`: concurrent calls for the same model (and the same requested
//! version or alias) share one run of the pipeline, so one `GetFeatures`, one `ModelInfer` per
//! version and one spool group serve them all. Batches form from what queued while the previous
//! run was in flight; there is no fixed wait.
//!
//! - While fewer than `MESH_PREDICT_RUNS` runs of its lane are in flight, a call runs the
//!   pipeline itself, on its own task, at once: below that concurrency nothing changes (no wait,
//!   no extra task, its trace as before).
//! - Beyond it, calls queue. When a run ends, a worker task takes up to `MESH_PREDICT_COALESCE`
//!   queued calls into one run (in the place of the run that ended), and again until the queue
//!   is empty; a run whose callers have all gone away stops.
//! - A run in flight longer than `MESH_PREDICT_RUN_STALL_MS` (a slow replica, a retry) no longer
//!   holds its place: when every place is held by such a run, the queue starts a run of its own
//!   (at the next arrival, or when a queued call has waited that long), so one slow downstream
//!   call delays the calls queued behind it by at most that much.
//!   `mesh_predict_stalled_runs_total` counts the runs started so.
//! - Each queued call keeps its own deadline (it stops waiting at it), its own result (an item's
//!   error is its own), its own arrival time (the latency in its record) and its own trace id
//!   (in its answer and record). A run's spans belong to the oldest call's trace and link the
//!   others. The run's budget is the latest of its calls' deadlines, so one short deadline does
//!   not cut the others'.
//! - Cancellation: the lead call hands the lane on in a guard's `Drop`, so a caller that goes
//!   away mid-run never strands the queue. A queued caller that goes away is skipped when the
//!   next batch forms; if it was already being scored its answer is dropped (its record is kept,
//!   as for any call cancelled after scoring).
//! - Lanes exist only while they have work: an idle lane is removed, so names from requests
//!   (a model that does not exist) cannot grow the map.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_proto::gateway::PredictResponse;
use mesh_runtime::Deadline;
use opentelemetry::trace::TraceContextExt as _;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};
use tokio::sync::oneshot;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::error::GatewayError;
use crate::pipeline::{Call, Item};
use crate::prediction_metrics::Step;
use crate::service::GatewayService;

/// A lane: the model and the version or alias the calls named.
pub type LaneKey = (String, String);

type Answer = Result<PredictResponse, GatewayError>;

/// A call joining a lane: its item and its deadline.
pub struct Pending {
    /// Its item (with its arrival time).
    pub item: Item,
    /// Its deadline.
    pub deadline: Deadline,
}

/// A queued call: its span's context (the run's parent or link) and where its answer goes.
struct Waiter {
    pending: Pending,
    context: opentelemetry::Context,
    reply: oneshot::Sender<Answer>,
}

#[derive(Default)]
struct Lane {
    waiting: VecDeque<Waiter>,
    /// Runs in flight (calls running their own item, and workers): each one's id and when it
    /// started its current batch.
    runs: Vec<(u64, Instant)>,
    next_run: u64,
}

impl Lane {
    /// A new run in flight from `now`; its id.
    fn start_run(&mut self, now: Instant) -> u64 {
        let id = self.next_run;
        self.next_run += 1;
        self.runs.push((id, now));
        id
    }

    /// Run `id` starts another batch at `now`.
    fn restart_run(&mut self, id: u64, now: Instant) {
        if let Some(run) = self.runs.iter_mut().find(|(r, _)| *r == id) {
            run.1 = now;
        }
    }

    fn end_run(&mut self, id: u64) {
        self.runs.retain(|(r, _)| *r != id);
    }

    /// Whether a place is free at `now`: fewer than `limit` runs started within `stall`.
    fn has_place(&self, now: Instant, limit: usize, stall: Duration) -> bool {
        self.runs
            .iter()
            .filter(|(_, started)| now.saturating_duration_since(*started) < stall)
            .count()
            < limit
    }
}

/// What a call does: run its own item now (and hand the lane on when done), or wait.
pub enum Joined<'a> {
    /// Run `Pending` now; the guard hands the lane on when dropped.
    Lead(LeadGuard<'a>, Pending),
    /// Wait for the answer a worker sends.
    Wait(oneshot::Receiver<Answer>),
}

/// The lanes with work in flight.
pub struct Coalescer {
    lanes: Mutex<HashMap<LaneKey, Lane>>,
    max: usize,
    runs: usize,
    stall: Duration,
    sizes: Histogram,
    lanes_open: IntGauge,
    stalled: IntCounter,
}

impl Coalescer {
    /// Up to `runs` runs of one lane in flight before calls queue (a run in flight longer than
    /// `stall` does not count); at most `max` queued calls per run (1: every call runs alone);
    /// registers `mesh_predict_coalesced_items`, `mesh_predict_lanes` and
    /// `mesh_predict_stalled_runs_total` in `registry`.
    pub fn new(
        max: usize,
        runs: usize,
        stall: Duration,
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        let sizes = Histogram::with_opts(
            HistogramOpts::new(
                "mesh_predict_coalesced_items",
                "Predict calls served by one coalesced pipeline run (runs of queued calls only)",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
        )?;
        registry.register(Box::new(sizes.clone()))?;
        let lanes_open = IntGauge::new(
            "mesh_predict_lanes",
            "Models (with the version or alias named) that have Predict runs in flight",
        )?;
        registry.register(Box::new(lanes_open.clone()))?;
        let stalled = IntCounter::new(
            "mesh_predict_stalled_runs_total",
            "Predict runs started for queued calls because every run of their model in flight \
             had taken longer than MESH_PREDICT_RUN_STALL_MS",
        )?;
        registry.register(Box::new(stalled.clone()))?;
        Ok(Self {
            lanes: Mutex::default(),
            max: max.max(1),
            runs: runs.max(1),
            stall,
            sizes,
            lanes_open,
            stalled,
        })
    }

    fn lanes(&self) -> Lanes<'_> {
        Lanes {
            map: self.lanes.lock().unwrap_or_else(|e| e.into_inner()),
            gauge: &self.lanes_open,
        }
    }
}

/// The lanes, locked; the gauge follows their count when the lock is released.
struct Lanes<'a> {
    map: std::sync::MutexGuard<'a, HashMap<LaneKey, Lane>>,
    gauge: &'a IntGauge,
}

impl std::ops::Deref for Lanes<'_> {
    type Target = HashMap<LaneKey, Lane>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl std::ops::DerefMut for Lanes<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.map
    }
}

impl Drop for Lanes<'_> {
    fn drop(&mut self) {
        self.gauge.set(self.map.len() as i64);
    }
}

/// Held by a call running its own item: when dropped (answered or cancelled), the lane goes to
/// a worker if calls queued meanwhile, else it is removed.
pub struct LeadGuard<'a> {
    service: &'a GatewayService,
    run: Option<(LaneKey, u64)>,
}

impl Drop for LeadGuard<'_> {
    fn drop(&mut self) {
        if let Some((key, run)) = self.run.take() {
            self.service.hand_on(key, run);
        }
    }
}

/// Held by a worker: if it ends without emptying its lane (a panic, the runtime stopping), its
/// place is freed; with no run left the lane is removed and its queued calls are answered
/// `UNAVAILABLE` (their senders drop).
struct WorkerGuard<'a> {
    coalescer: &'a Coalescer,
    key: &'a LaneKey,
    run: u64,
    done: bool,
}

impl Drop for WorkerGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut lanes = self.coalescer.lanes();
            if let Some(lane) = lanes.get_mut(self.key) {
                lane.end_run(self.run);
                // No run left to hand the queue on: its calls are answered UNAVAILABLE.
                if lane.runs.is_empty() {
                    lanes.remove(self.key);
                }
            }
        }
    }
}

/// Run `run` of lane `key` ended with nothing queued: its place is freed, and the lane goes
/// with its last run.
fn finish_run(lanes: &mut Lanes<'_>, key: &LaneKey, run: u64) {
    if let Some(lane) = lanes.get_mut(key) {
        lane.end_run(run);
        if lane.runs.is_empty() && lane.waiting.is_empty() {
            lanes.remove(key);
        }
    }
}

impl GatewayService {
    /// Joins the lane `key` with `pending`: lead it if a place is free, else queue. Called in
    /// the call's own span (a queued call's trace id and context are taken from it).
    pub fn join(&self, key: LaneKey, mut pending: Pending) -> Joined<'_> {
        let coalescer = &self.coalescer;
        if coalescer.max == 1 {
            return Joined::Lead(
                LeadGuard {
                    service: self,
                    run: None,
                },
                pending,
            );
        }
        let now = Instant::now();
        let mut lanes = coalescer.lanes();
        let lane = lanes.entry(key.clone()).or_default();
        let free = lane.has_place(now, coalescer.runs, coalescer.stall);
        if free && lane.waiting.is_empty() {
            let run = lane.start_run(now);
            return Joined::Lead(
                LeadGuard {
                    service: self,
                    run: Some((key, run)),
                },
                pending,
            );
        }
        let (reply, answer) = oneshot::channel();
        pending.item.trace_id = mesh_telemetry::propagation::current_trace_id();
        lane.waiting.push_back(Waiter {
            pending,
            context: tracing::Span::current().context(),
            reply,
        });
        drop(lanes);
        // A place is free although calls queue: the runs that held it have stalled.
        if free {
            self.unstall(&key);
        }
        Joined::Wait(answer)
    }

    /// A queued call of lane `key` waits for its answer until `deadline`. Each time it has
    /// waited `MESH_PREDICT_RUN_STALL_MS`, it starts a run for the queue if every run in
    /// flight has stalled meanwhile.
    pub async fn wait(
        &self,
        key: &LaneKey,
        mut answer: oneshot::Receiver<Answer>,
        deadline: Deadline,
    ) -> Answer {
        loop {
            let wake = deadline
                .instant()
                .min(tokio::time::Instant::now() + self.coalescer.stall);
            match tokio::time::timeout_at(wake, &mut answer).await {
                Ok(Ok(result)) => return result,
                Ok(Err(_)) => {
                    return Err(GatewayError::Unavailable(
                        "the gateway stopped the run this call was queued for".into(),
                    ))
                }
                Err(_) if deadline.expired() => return Err(GatewayError::DeadlineExceeded),
                Err(_) => self.unstall(key),
            }
        }
    }

    /// Starts a run for lane `key`'s queue if one is waiting and a place is free (the runs
    /// that held the places have stalled).
    fn unstall(&self, key: &LaneKey) {
        let coalescer = &self.coalescer;
        let run = {
            let mut lanes = coalescer.lanes();
            let Some(lane) = lanes.get_mut(key) else {
                return;
            };
            let now = Instant::now();
            if lane.waiting.is_empty() || !lane.has_place(now, coalescer.runs, coalescer.stall) {
                return;
            }
            lane.start_run(now)
        };
        coalescer.stalled.inc();
        self.spawn_worker(key.clone(), run);
    }

    /// Run `run` of lane `key` ended: a worker takes what queued (keeping the run's place), or
    /// the place is freed and the lane goes once no run is left.
    fn hand_on(&self, key: LaneKey, run: u64) {
        {
            let mut lanes = self.coalescer.lanes();
            let Some(lane) = lanes.get_mut(&key) else {
                return;
            };
            if lane.waiting.is_empty() {
                finish_run(&mut lanes, &key, run);
                return;
            }
        }
        self.spawn_worker(key, run);
    }

    /// Hands lane `key`'s queue to a worker task holding the place of run `run`.
    fn spawn_worker(&self, key: LaneKey, run: u64) {
        let worker = self
            .me
            .upgrade()
            .zip(tokio::runtime::Handle::try_current().ok());
        match worker {
            Some((service, runtime)) => {
                runtime.spawn(service.drain(key, run));
            }
            // Shutting down: the queued calls are answered UNAVAILABLE as their senders drop.
            None => {
                self.coalescer.lanes().remove(&key);
            }
        }
    }

    /// The worker of lane `key` in the place of run `run`: runs what is queued, a batch at a
    /// time, until it is empty.
    async fn drain(self: Arc<Self>, key: LaneKey, run: u64) {
        let mut guard = WorkerGuard {
            coalescer: &self.coalescer,
            key: &key,
            run,
            done: false,
        };
        loop {
            let batch: Vec<Waiter> = {
                let mut lanes = self.coalescer.lanes();
                let Some(lane) = lanes.get_mut(&key) else {
                    guard.done = true;
                    return;
                };
                // Callers that went away are not scored.
                lane.waiting.retain(|w| !w.reply.is_closed());
                if lane.waiting.is_empty() {
                    // Decided under the lock `join` takes: a call arriving after this leads.
                    finish_run(&mut lanes, &key, run);
                    guard.done = true;
                    return;
                }
                lane.restart_run(run, Instant::now());
                let n = lane.waiting.len().min(self.coalescer.max);
                lane.waiting.drain(..n).collect()
            };
            self.run_coalesced(&key, batch).await;
        }
    }

    /// One pipeline run for the queued calls of `batch`; each gets its own result.
    async fn run_coalesced(&self, (model, version): &LaneKey, batch: Vec<Waiter>) {
        self.coalescer.sizes.observe(batch.len() as f64);
        for waiter in &batch {
            self.predictions
                .step(Step::Queue, waiter.pending.item.arrived.elapsed());
        }
        let span = tracing::info_span!(
            "predict.coalesced",
            otel.name = "coalesced predict",
            calls = batch.len()
        );
        let mut contexts = batch.iter().map(|w| &w.context);
        if let Some(first) = contexts.next() {
            let _ = span.set_parent(first.clone());
        }
        for cx in contexts {
            span.add_link(cx.span().span_context().clone());
        }
        let deadline = batch
            .iter()
            .map(|w| w.pending.deadline)
            .max_by_key(|d| d.instant())
            .unwrap_or_else(|| Deadline::after(self.default_budget));
        let started = batch
            .iter()
            .map(|w| w.pending.item.arrived)
            .min()
            .unwrap_or_else(std::time::Instant::now);
        let (items, replies): (Vec<Item>, Vec<_>) =
            batch.into_iter().map(|w| (w.pending.item, w.reply)).unzip();
        let call = Call {
            started,
            deadline,
            compartments: &self.online,
        };
        let mut replies = replies;
        let gone = futures::future::join_all(replies.iter_mut().map(|r| r.closed()));
        let outcome = tokio::select! {
            outcome = self.run(model, version, items, call).instrument(span) => outcome,
            // Every caller went away: the run stops (its downstream calls are cancelled).
            _ = gone => return,
        };
        match outcome {
            Ok(outcome) => {
                for (reply, result) in replies.into_iter().zip(outcome.results) {
                    let _ = reply.send(result);
                }
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}
