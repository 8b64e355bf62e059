//! The queue between the RPC handlers and PostgreSQL, and the task that drains it in batches.
//!
//! A `Record` call is acknowledged only once its records are committed: the handler queues the
//! call and waits for the batch that carries it. A batch is written when it holds `batch_size`
//! records or its first call has waited `flush_interval`. A failed write is retried with capped
//! exponential back-off, keeping the batch; while it fails, new calls are refused at once with
//! `UNAVAILABLE` (the sender keeps the records — the gateway's on-disk spool — and retries), so
//! the queue never fills with records nobody can write.
//!
//! Records keep the trace context of the `Record` call that brought them; a batch's INSERT
//! span is parented on its first call's context and linked to the others'.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use mesh_proto::logger::PredictionRecord;
use mesh_proto::types::{feature_value::Kind, FeatureTier};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// One `Record` call's records, its trace context, and who waits for their commit.
struct Queued {
    records: Vec<PredictionRecord>,
    context: opentelemetry::Context,
    committed: oneshot::Sender<()>,
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
}

impl WriterMetrics {
    /// Registers `mesh_log_records_written_total`, `mesh_log_write_errors_total`,
    /// `mesh_log_queue_depth`, `mesh_log_records_shed_total`, `mesh_log_batch_write_seconds`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let written = IntCounter::new(
            "mesh_log_records_written_total",
            "Prediction records inserted into PostgreSQL (duplicates ignored)",
        )?;
        let write_errors = IntCounter::new(
            "mesh_log_write_errors_total",
            "Batch writes that failed and will be retried",
        )?;
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
        Ok(Self {
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
    /// Queues `records` if they all fit and the database is writable, and waits until they are
    /// committed.
    pub async fn commit(&self, records: Vec<PredictionRecord>) -> Result<(), Refused> {
        if self.store_down.load(Ordering::Relaxed) {
            return Err(Refused::StoreDown);
        }
        let count = records.len();
        if count == 0 {
            return Ok(());
        }
        if self.metrics.queued.get() as usize + count > self.capacity {
            self.metrics.shed.inc_by(count as u64);
            return Err(Refused::Full);
        }
        let (committed, done) = oneshot::channel();
        let queued = Queued {
            records,
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
        |q: &Queued| q.records.len(),
    )
    .await
    {
        let count: usize = batch.iter().map(|q| q.records.len()).sum();
        write_until_done(&db, &batch, &metrics, &store_down).await;
        metrics.queued.sub(count as i64);
        for queued in batch {
            // The caller may have given up (deadline); the records are committed all the same.
            let _ = queued.committed.send(());
        }
        if closed {
            return;
        }
    }
}

async fn write_until_done(
    db: &Pool,
    queued: &[Queued],
    metrics: &WriterMetrics,
    store_down: &AtomicBool,
) {
    use opentelemetry::trace::TraceContextExt as _;
    let batch: Vec<PredictionRecord> = queued
        .iter()
        .flat_map(|q| q.records.iter().cloned())
        .collect();
    let span = tracing::info_span!(
        "log.write",
        otel.name = "write prediction batch",
        records = batch.len()
    );
    let mut contexts = queued.iter().map(|q| &q.context);
    if let Some(first) = contexts.next() {
        let _ = span.set_parent(first.clone());
    }
    for cx in contexts {
        span.add_link(cx.span().span_context().clone());
    }
    retry_insert(db, &batch, metrics, store_down)
        .instrument(span)
        .await
}

async fn retry_insert(
    db: &Pool,
    batch: &[PredictionRecord],
    metrics: &WriterMetrics,
    store_down: &AtomicBool,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let timer = metrics.batch_seconds.start_timer();
        match insert(db, batch).await {
            Ok(inserted) => {
                timer.observe_duration();
                metrics.written.inc_by(inserted);
                store_down.store(false, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                timer.stop_and_discard();
                metrics.write_errors.inc();
                store_down.store(true, Ordering::Relaxed);
                tracing::warn!(error = %e, records = batch.len(), retry_in = ?backoff, "prediction log write failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn tier_name(tier: i32) -> &'static str {
    match FeatureTier::try_from(tier).unwrap_or(FeatureTier::Unspecified) {
        FeatureTier::Memory => "memory",
        FeatureTier::Redis => "redis",
        FeatureTier::Database => "database",
        FeatureTier::Request => "request",
        FeatureTier::Unspecified => "unspecified",
    }
}

/// The record's features as a JSON object: numbers as numbers, categories as strings.
pub fn features_json(record: &PredictionRecord) -> String {
    let mut map = serde_json::Map::new();
    for (name, value) in &record.features {
        let json = match &value.kind {
            Some(Kind::Number(n)) => serde_json::Number::from_f64(*n)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Some(Kind::Category(c)) => serde_json::Value::String(c.clone()),
            None => serde_json::Value::Null,
        };
        map.insert(name.clone(), json);
    }
    serde_json::Value::Object(map).to_string()
}

/// Inserts `batch` in one statement; returns how many rows were new.
async fn insert(db: &Pool, batch: &[PredictionRecord]) -> Result<u64, String> {
    let span =
        mesh_telemetry::propagation::store_span("postgresql", "INSERT predictions", batch.len());
    async {
        let client = mesh_runtime::postgres::connection(db)
            .await
            .map_err(|e| e.to_string())?;
        let ids: Vec<&str> = batch.iter().map(|r| r.prediction_id.as_str()).collect();
        let times: Vec<i64> = batch.iter().map(|r| r.time_unix_micros).collect();
        let models: Vec<&str> = batch.iter().map(|r| r.model.as_str()).collect();
        let versions: Vec<&str> = batch.iter().map(|r| r.model_version.as_str()).collect();
        let entities: Vec<&str> = batch.iter().map(|r| r.entity_id.as_str()).collect();
        let features: Vec<String> = batch.iter().map(features_json).collect();
        let scores: Vec<f64> = batch.iter().map(|r| r.score).collect();
        let latencies: Vec<i64> = batch.iter().map(|r| r.latency_micros as i64).collect();
        let tiers: Vec<&str> = batch.iter().map(|r| tier_name(r.feature_tier)).collect();
        let traces: Vec<&str> = batch.iter().map(|r| r.trace_id.as_str()).collect();
        let stmt = client
            .prepare_cached(
                "INSERT INTO predictions (prediction_id, served_at, model, model_version, entity_id,
                                          features, score, latency_us, feature_tier, trace_id)
                 SELECT id, to_timestamp(t::double precision / 1e6), m, v, e, f::jsonb, s, l, tier, tr
                 FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[],
                             $7::float8[], $8::int8[], $9::text[], $10::text[])
                      AS x(id, t, m, v, e, f, s, l, tier, tr)
                 ON CONFLICT (prediction_id) DO NOTHING",
            )
            .await
            .map_err(|e| e.to_string())?;
        client
            .execute(
                &stmt,
                &[&ids, &times, &models, &versions, &entities, &features, &scores, &latencies, &tiers, &traces],
            )
            .await
            .map_err(|e| e.to_string())
    }
    .instrument(span)
    .await
}
