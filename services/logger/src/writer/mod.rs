//! The queue between the RPC handlers and PostgreSQL, and the task that drains it in batches.
//!
//! A `Record` call is acknowledged only once its records are committed: the handler queues the
//! call and waits for the batch that carries it. A batch is written when it holds `batch_size`
//! records or its first call has waited `flush_interval`. A record PostgreSQL refuses goes to
//! the rejects table with its reason and the rest of its batch commits (`store`). A write
//! that fails because PostgreSQL is down or hung is retried with capped exponential back-off,
//! keeping the batch; while it fails, new calls are refused at once with `UNAVAILABLE` (the
//! sender keeps the records — the gateway's on-disk spool — and retries), so the queue never
//! fills with records nobody can write.
//!
//! Records keep the trace context of the `Record` call that brought them; a batch's INSERT
//! span is parented on its first call's context and linked to the others'.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod store;

use deadpool_postgres::Pool;
use mesh_proto::logger::PredictionRecord;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

pub use store::{features_json, Reject};

/// One `Record` call's records (and those validation already refused), its trace context, and
/// who waits for their commit.
struct Queued {
    records: Vec<PredictionRecord>,
    rejects: Vec<Reject>,
    context: opentelemetry::Context,
    committed: oneshot::Sender<Committed>,
}

impl Queued {
    fn weight(&self) -> usize {
        self.records.len() + self.rejects.len()
    }
}

/// What became of one call's records once its batch was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Committed {
    /// Committed to `predictions`.
    pub accepted: u32,
    /// Stored in `prediction_rejects` instead.
    pub rejected: u32,
}

/// Why records were not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full.
    Full,
    /// The database is failing; the batch in hand is being retried.
    StoreDown,
    /// The writer has stopped (shutting down).
    Closed,
}

/// Batching settings.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Records per INSERT.
    pub batch_size: usize,
    /// Longest wait for a batch to fill.
    pub flush_interval: Duration,
    /// Records the queue holds.
    pub capacity: usize,
    /// Longest one write (connection and statement) may take before it counts as failed.
    pub write_timeout: Duration,
}

/// Writer metrics.
#[derive(Clone)]
pub struct WriterMetrics {
    written: IntCounter,
    write_errors: IntCounter,
    queued: IntGauge,
    /// Records refused because the queue was full.
    pub shed: IntCounter,
    batch_seconds: Histogram,
    rejected: IntCounterVec,
    unstorable: IntCounter,
}

impl WriterMetrics {
    /// Registers `mesh_log_records_written_total`, `mesh_log_write_errors_total`,
    /// `mesh_log_queue_depth`, `mesh_log_records_shed_total`, `mesh_log_batch_write_seconds`,
    /// `mesh_log_records_rejected_total{reason}` and `mesh_log_rejects_unstorable_total`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let written = IntCounter::new(
            "mesh_log_records_written_total",
            "Prediction records inserted into PostgreSQL (duplicates ignored)",
        )?;
        let write_errors = IntCounter::new(
            "mesh_log_write_errors_total",
            "Writes that failed because PostgreSQL was down or did not answer, and will be retried",
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "mesh_log_records_rejected_total",
                "Records stored in prediction_rejects instead of predictions, by why: \
                 invalid (validation) or refused (PostgreSQL refused the row)",
            ),
            &["reason"],
        )?;
        let unstorable = IntCounter::new(
            "mesh_log_rejects_unstorable_total",
            "Rejected records that prediction_rejects refused too (logged in full)",
        )?;
        for reason in ["invalid", "refused"] {
            rejected.with_label_values(&[reason]);
        }
        let queued = IntGauge::new("mesh_log_queue_depth", "Records waiting to be written")?;
        let shed = IntCounter::new(
            "mesh_log_records_shed_total",
            "Records refused because the queue was full",
        )?;
        let batch_seconds = Histogram::with_opts(
            HistogramOpts::new("mesh_log_batch_write_seconds", "Time to insert one batch")
                .buckets(mesh_telemetry::metrics::LATENCY_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(written.clone()))?;
        registry.register(Box::new(write_errors.clone()))?;
        registry.register(Box::new(queued.clone()))?;
        registry.register(Box::new(shed.clone()))?;
        registry.register(Box::new(batch_seconds.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(unstorable.clone()))?;
        Ok(Self {
            rejected,
            unstorable,
            written,
            write_errors,
            queued,
            shed,
            batch_seconds,
        })
    }
}

/// The sending side of the queue.
#[derive(Clone)]
pub struct LogQueue {
    sender: mpsc::Sender<Queued>,
    metrics: WriterMetrics,
    capacity: usize,
    store_down: Arc<AtomicBool>,
}

impl LogQueue {
    /// Queues `records` (and `rejects`, refused by validation) if they all fit and the
    /// database is writable, and waits until every one is committed to `predictions` or, if
    /// PostgreSQL refuses it, to `prediction_rejects`.
    pub async fn commit(
        &self,
        records: Vec<PredictionRecord>,
        rejects: Vec<Reject>,
    ) -> Result<Committed, Refused> {
        if self.store_down.load(Ordering::Relaxed) {
            return Err(Refused::StoreDown);
        }
        let count = records.len() + rejects.len();
        if count == 0 {
            return Ok(Committed::default());
        }
        if self.metrics.queued.get() as usize + count > self.capacity {
            self.metrics.shed.inc_by(count as u64);
            return Err(Refused::Full);
        }
        let (committed, done) = oneshot::channel();
        let queued = Queued {
            records,
            rejects,
            context: tracing::Span::current().context(),
            committed,
        };
        self.metrics.queued.add(count as i64);
        if self.sender.try_send(queued).is_err() {
            self.metrics.queued.sub(count as i64);
            self.metrics.shed.inc_by(count as u64);
            return Err(Refused::Full);
        }
        done.await.map_err(|_| Refused::Closed)
    }
}

/// Starts the writer; it ends once every [`LogQueue`] is dropped and the queue is flushed.
pub fn spawn(db: Pool, config: WriterConfig, metrics: WriterMetrics) -> (LogQueue, JoinHandle<()>) {
    // Each call carries at least one record, so this many calls can never exceed the capacity.
    let (sender, receiver) = mpsc::channel(config.capacity.max(1));
    let store_down = Arc::new(AtomicBool::new(false));
    let queue = LogQueue {
        sender,
        metrics: metrics.clone(),
        capacity: config.capacity,
        store_down: store_down.clone(),
    };
    let handle = tokio::spawn(run(db, config, metrics, receiver, store_down));
    (queue, handle)
}

async fn run(
    db: Pool,
    config: WriterConfig,
    metrics: WriterMetrics,
    mut receiver: mpsc::Receiver<Queued>,
    store_down: Arc<AtomicBool>,
) {
    while let Some((batch, closed)) = mesh_runtime::batch::next_batch_weighted(
        &mut receiver,
        config.batch_size,
        config.flush_interval,
        Queued::weight,
    )
    .await
    {
        let count: usize = batch.iter().map(Queued::weight).sum();
        let outcomes = write_batch(&db, &batch, &config, &metrics, &store_down).await;
        metrics.queued.sub(count as i64);
        for (queued, outcome) in batch.into_iter().zip(outcomes) {
            // The caller may have given up (deadline); the records are committed all the same.
            let _ = queued.committed.send(outcome);
        }
        if closed {
            return;
        }
    }
}

/// Writes one batch of calls: their records to `predictions` (those PostgreSQL refuses, and
/// those validation refused, to `prediction_rejects`). Returns each call's outcome.
async fn write_batch(
    db: &Pool,
    queued: &[Queued],
    config: &WriterConfig,
    metrics: &WriterMetrics,
    store_down: &AtomicBool,
) -> Vec<Committed> {
    use opentelemetry::trace::TraceContextExt as _;
    let mut records = Vec::new();
    let mut owners = Vec::new();
    let mut rejects = Vec::new();
    let mut outcomes = vec![Committed::default(); queued.len()];
    for (i, q) in queued.iter().enumerate() {
        records.extend(q.records.iter().cloned());
        owners.extend(std::iter::repeat_n(i, q.records.len()));
        rejects.extend(q.rejects.iter().cloned());
        outcomes[i].accepted = q.records.len() as u32;
        outcomes[i].rejected = q.rejects.len() as u32;
    }
    let span = tracing::info_span!(
        "log.write",
        otel.name = "write prediction batch",
        records = records.len(),
        rejects = rejects.len()
    );
    let mut contexts = queued.iter().map(|q| &q.context);
    if let Some(first) = contexts.next() {
        let _ = span.set_parent(first.clone());
    }
    for cx in contexts {
        span.add_link(cx.span().span_context().clone());
    }
    async {
        metrics.rejected.with_label_values(&["invalid"]).inc_by(rejects.len() as u64);
        let refused =
            store::write_predictions(db, &records, config.write_timeout, metrics, store_down)
                .await;
        metrics.rejected.with_label_values(&["refused"]).inc_by(refused.len() as u64);
        for (position, reason) in refused {
            let owner = owners[position];
            outcomes[owner].accepted -= 1;
            outcomes[owner].rejected += 1;
            tracing::warn!(prediction_id = %records[position].prediction_id, %reason, "PostgreSQL refused a prediction record; stored in prediction_rejects");
            rejects.push(Reject {
                record: records[position].clone(),
                reason: format!("PostgreSQL refused the record: {reason}"),
            });
        }
        store::write_rejects(db, &rejects, config.write_timeout, metrics, store_down).await;
    }
    .instrument(span)
    .await;
    outcomes
}
