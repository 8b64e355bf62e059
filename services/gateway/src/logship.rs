//! Hands prediction records to the logger without making any prediction wait: `Predict` puts
//! the record on a bounded in-process queue (never blocking) and a background task ships
//! batches to the logger. If the queue is full or the logger keeps failing, records are
//! dropped and counted in `mesh_gateway_log_records_dropped_total`.
//!
//! Each record travels with the trace context of the prediction that made it; a batch's
//! `Record` call is parented on its first record's context and linked to the others', so the
//! logger's work appears in the prediction's trace.

use std::time::Duration;

use mesh_proto::logger::{PredictionRecord, RecordRequest};
use mesh_runtime::Bulkhead;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::downstream::LoggerDownstream;

/// Shipping settings.
#[derive(Debug, Clone)]
pub struct ShipConfig {
    /// Records held before new ones are dropped.
    pub capacity: usize,
    /// Records per `Record` call.
    pub batch_size: usize,
    /// Longest wait before a partial batch is sent.
    pub flush_interval: Duration,
    /// Budget of one `Record` call.
    pub call_timeout: Duration,
    /// Attempts per batch before it is dropped.
    pub attempts: u32,
}

/// Counters of log shipping.
#[derive(Clone)]
pub struct ShipMetrics {
    shipped: IntCounter,
    dropped: IntCounterVec,
}

impl ShipMetrics {
    /// Registers `mesh_gateway_log_records_shipped_total` and
    /// `mesh_gateway_log_records_dropped_total{reason}`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let shipped = IntCounter::new(
            "mesh_gateway_log_records_shipped_total",
            "Prediction records accepted by the logger",
        )?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "mesh_gateway_log_records_dropped_total",
                "Prediction records given up on, by reason (queue_full, logger_failed)",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(shipped.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        Ok(Self { shipped, dropped })
    }
}

/// The producing side, used by the handlers.
#[derive(Clone)]
pub struct LogShipper {
    sender: mpsc::Sender<Queued>,
    metrics: ShipMetrics,
}

/// A record and the trace context of the prediction that made it.
type Queued = (PredictionRecord, opentelemetry::Context);

impl LogShipper {
    /// Queues `record`; never waits.
    pub fn submit(&self, record: PredictionRecord) {
        let context = tracing::Span::current().context();
        if self.sender.try_send((record, context)).is_err() {
            self.metrics
                .dropped
                .with_label_values(&["queue_full"])
                .inc();
        }
    }
}

/// Starts the shipping task; it flushes and ends once every [`LogShipper`] is dropped.
pub fn spawn(
    logger: LoggerDownstream,
    bulkhead: Bulkhead,
    config: ShipConfig,
    metrics: ShipMetrics,
) -> (LogShipper, JoinHandle<()>) {
    let (sender, receiver) = mpsc::channel(config.capacity);
    let shipper = LogShipper {
        sender,
        metrics: metrics.clone(),
    };
    let task = tokio::spawn(run(logger, bulkhead, config, metrics, receiver));
    (shipper, task)
}

async fn run(
    logger: LoggerDownstream,
    bulkhead: Bulkhead,
    config: ShipConfig,
    metrics: ShipMetrics,
    mut receiver: mpsc::Receiver<Queued>,
) {
    while let Some((batch, closed)) =
        mesh_runtime::batch::next_batch(&mut receiver, config.batch_size, config.flush_interval)
            .await
    {
        ship(&logger, &bulkhead, &config, &metrics, batch).await;
        if closed {
            return;
        }
    }
}

async fn ship(
    logger: &LoggerDownstream,
    bulkhead: &Bulkhead,
    config: &ShipConfig,
    metrics: &ShipMetrics,
    queued: Vec<Queued>,
) {
    use opentelemetry::trace::TraceContextExt as _;
    let count = queued.len() as u64;
    let span = tracing::info_span!(
        "log.ship",
        otel.name = "ship prediction records",
        records = count
    );
    let mut contexts = queued.iter().map(|(_, cx)| cx);
    if let Some(first) = contexts.next() {
        let _ = span.set_parent(first.clone());
    }
    for cx in contexts {
        span.add_link(cx.span().span_context().clone());
    }
    let records: Vec<PredictionRecord> = queued.into_iter().map(|(r, _)| r).collect();
    ship_records(logger, bulkhead, config, metrics, records, count)
        .instrument(span)
        .await
}

async fn ship_records(
    logger: &LoggerDownstream,
    bulkhead: &Bulkhead,
    config: &ShipConfig,
    metrics: &ShipMetrics,
    records: Vec<PredictionRecord>,
    count: u64,
) {
    let request = RecordRequest { records };
    let mut backoff = Duration::from_millis(50);
    for attempt in 1..=config.attempts {
        match logger
            .record(request.clone(), config.call_timeout, bulkhead)
            .await
        {
            Ok(_) => {
                metrics.shipped.inc_by(count);
                return;
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), error = %status.message(), attempt, records = count, "shipping prediction records failed");
                if attempt < config.attempts {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
    metrics
        .dropped
        .with_label_values(&["logger_failed"])
        .inc_by(count);
}
