//! Prediction records from the handlers to the logger, through the durable [`spool`].
//!
//! `Predict` hands its record to a writer thread and waits (briefly, see [`LogShipper::record`])
//! until the record is on disk: a prediction that was answered is in the spool. The writer
//! appends every record that arrived while the previous `fdatasync` ran and syncs once (group
//! commit). A shipping task reads the spool in order and sends batches to the logger, whose
//! `Record` answers only once they are committed to PostgreSQL; then the cursor advances. While
//! the logger or PostgreSQL is down the batch is retried with capped back-off and the spool
//! grows; nothing is dropped.
//!
//! At the bound (`MESH_SPOOL_MAX_BYTES` of undelivered records) new records are refused: the
//! prediction is still answered, its response says `prediction-log: not recorded (spool full)`,
//! and `mesh_spool_dropped_total{reason="full"}` counts it. Predictions keep flowing; what cannot
//! be kept is said, not hidden.
//!
//! Each record travels with the trace context of the prediction that made it (while the process
//! lives); a batch's `Record` call is parented on its first record's context and linked to the
//! others', so the logger's work appears in the prediction's trace.
//!
//! A batch the logger refuses as a whole (`INVALID_ARGUMENT` or `OUT_OF_RANGE`: something in
//! the call it will never take, however often it is sent) is split in halves and each half
//! sent again, down to single records, so the good records of a batch are delivered; only a
//! record refused on its own is dropped, logged with its prediction id and counted in
//! `mesh_spool_dropped_total{reason="refused"}`.
//!
//! A full disk refuses new records (each answer says so) but does not stop delivery: delivered
//! segments are freed even when the cursor cannot be recorded, and appends resume by themselves
//! once there is space.
//!
//! The writer thread is in `write`, the shipping task in `ship`.
//!
//! [`spool`]: crate::spool

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proto::logger::PredictionRecord;
use mesh_runtime::Bulkhead;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::client::LoggerDownstream;
use crate::spool::{CursorFound, Disk, Reader, RealDisk, Recovered, Spool, SEGMENT_HEADER_LEN};

mod age;
mod disk_space;
mod ship;
#[cfg(test)]
mod tests;
mod write;

/// Shipping settings.
#[derive(Debug, Clone)]
pub struct ShipConfig {
    /// `MESH_SPOOL_DIR`: where the spool lives.
    pub dir: PathBuf,
    /// `MESH_SPOOL_MAX_BYTES`: undelivered bytes kept before new records are refused.
    pub max_bytes: u64,
    /// `MESH_SPOOL_SEGMENT_BYTES`: size at which a new segment file is started.
    pub segment_bytes: u64,
    /// Records waiting for the writer thread before new ones are refused.
    pub capacity: usize,
    /// Records per `Record` call.
    pub batch_size: usize,
    /// Longest wait for a partial batch to fill.
    pub flush_interval: Duration,
    /// Budget of one `Record` call.
    pub call_timeout: Duration,
    /// `MESH_LOG_DELIVERY_DEGRADED_MS`: delivery failing this long makes `/health` degraded.
    pub degraded_after: Duration,
}

/// Buckets of `mesh_spool_delivery_delay_seconds`: 300 s is the log-completeness objective.
const DELIVERY_DELAY_BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

/// Counters of the spool and its delivery.
#[derive(Clone)]
pub struct ShipMetrics {
    appended: IntCounter,
    delivered: IntCounter,
    dropped: IntCounterVec,
    cursor_errors: IntCounterVec,
    pending_records: IntGauge,
    pending_bytes: IntGauge,
    sync_seconds: Histogram,
    oldest: age::OldestRecord,
    delivery_delay: Histogram,
    disk: disk_space::SpoolDisk,
}

impl ShipMetrics {
    /// Registers the `mesh_spool_*` metrics.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let appended = IntCounter::new(
            "mesh_spool_appended_total",
            "Prediction records written to the on-disk spool",
        )?;
        let delivered = IntCounter::new(
            "mesh_spool_delivered_total",
            "Prediction records committed by the logger and released from the spool",
        )?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "mesh_spool_dropped_total",
                "Prediction records not kept, by reason: full (MESH_SPOOL_MAX_BYTES reached), \
                 queue_full (writer behind), io_error (disk write failed), corrupt (unreadable \
                 on disk), refused (the logger refused the record on its own)",
            ),
            &["reason"],
        )?;
        let cursor_errors = IntCounterVec::new(
            Opts::new(
                "mesh_spool_cursor_errors_total",
                "Spool cursor problems, by kind: garbled or missing (found at start; delivery \
                 restarts at the first segment, the logger stores each record once), write \
                 (recording the cursor failed, e.g. a full disk)",
            ),
            &["kind"],
        )?;
        let pending_records = IntGauge::new(
            "mesh_spool_pending_records",
            "Records in the spool not yet committed by the logger",
        )?;
        let pending_bytes = IntGauge::new(
            "mesh_spool_pending_bytes",
            "Bytes in the spool not yet committed by the logger",
        )?;
        let sync_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "mesh_spool_sync_seconds",
                "Time to write and fdatasync one group of records",
            )
            .buckets(mesh_telemetry::metrics::LATENCY_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(appended.clone()))?;
        registry.register(Box::new(delivered.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        registry.register(Box::new(cursor_errors.clone()))?;
        registry.register(Box::new(pending_records.clone()))?;
        registry.register(Box::new(pending_bytes.clone()))?;
        registry.register(Box::new(sync_seconds.clone()))?;
        let oldest = age::OldestRecord::new()?;
        registry.register(Box::new(oldest.clone()))?;
        let delivery_delay = Histogram::with_opts(
            HistogramOpts::new(
                "mesh_spool_delivery_delay_seconds",
                "From serving a prediction to the logger committing its record (the \
                 log-completeness SLI counts those over 300 s)",
            )
            .buckets(DELIVERY_DELAY_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(delivery_delay.clone()))?;
        let disk = disk_space::SpoolDisk::new()?;
        registry.register(Box::new(disk.clone()))?;
        Ok(Self {
            appended,
            delivered,
            dropped,
            cursor_errors,
            pending_records,
            pending_bytes,
            sync_seconds,
            oldest,
            delivery_delay,
            disk,
        })
    }
}

/// Why a record is not in the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotKept {
    /// `MESH_SPOOL_MAX_BYTES` of undelivered records are already held.
    Full,
    /// The writer thread is behind by `capacity` records.
    QueueFull,
    /// The disk write failed.
    Io(String),
    /// The write did not finish within the wait the prediction could afford (it may yet).
    Pending,
}

impl NotKept {
    /// The note for the response's `degraded` list.
    pub fn note(&self) -> String {
        match self {
            NotKept::Full => "prediction-log: not recorded (spool full)".into(),
            NotKept::QueueFull => "prediction-log: not recorded (spool writer behind)".into(),
            NotKept::Io(e) => format!("prediction-log: not recorded (spool write failed: {e})"),
            NotKept::Pending => "prediction-log: not yet durable when answered".into(),
        }
    }
}

/// A record on its way to the writer thread.
struct Entry {
    payload: Vec<u8>,
    context: opentelemetry::Context,
    done: oneshot::Sender<Result<(), NotKept>>,
}

/// What the writer, the shipper and the handlers share.
struct Shared {
    dir: PathBuf,
    /// The spool's file-system calls (a fault-injecting one in tests).
    disk: Arc<dyn Disk>,
    /// Offset past the last durable record.
    end: AtomicU64,
    /// Offset of the first record not yet committed by the logger.
    cursor: AtomicU64,
    /// The writer has stopped (no more records will come).
    closed: AtomicBool,
    /// The last delivery attempt failed (read on every prediction, so an atomic).
    logger_failing: AtomicBool,
    /// Since when delivery has been failing, for the health report.
    failing_since: Mutex<Option<Instant>>,
    /// New durable records, or the writer stopped.
    wake: Notify,
    /// Trace contexts of records written by this process, by offset.
    contexts: Mutex<VecDeque<(u64, opentelemetry::Context)>>,
}

impl Shared {
    /// Notes a failed delivery; true if delivery was working until now.
    fn delivery_failed(&self) -> bool {
        let first = !self.logger_failing.swap(true, Ordering::Relaxed);
        if first {
            if let Ok(mut since) = self.failing_since.lock() {
                *since = Some(Instant::now());
            }
        }
        first
    }

    /// Notes a delivery; true if delivery was failing until now.
    fn delivery_succeeded(&self) -> bool {
        let was_failing = self.logger_failing.swap(false, Ordering::Relaxed);
        if was_failing {
            if let Ok(mut since) = self.failing_since.lock() {
                *since = None;
            }
        }
        was_failing
    }
}

/// Contexts kept for linking; beyond this the oldest links are forgotten (records are not).
const MAX_CONTEXTS: usize = 100_000;

/// The producing side, used by the handlers.
#[derive(Clone)]
pub struct LogShipper {
    sender: mpsc::Sender<Entry>,
    status: SpoolStatus,
}

impl LogShipper {
    /// Writes `record` to the spool and waits at most `wait` for it to be durable.
    pub async fn record(&self, record: &PredictionRecord, wait: Duration) -> Result<(), NotKept> {
        let (done, durable) = oneshot::channel();
        let entry = Entry {
            payload: record.encode_to_vec(),
            context: tracing::Span::current().context(),
            done,
        };
        if self.sender.try_send(entry).is_err() {
            self.status
                .metrics
                .dropped
                .with_label_values(&["queue_full"])
                .inc();
            return Err(NotKept::QueueFull);
        }
        match tokio::time::timeout(wait, durable).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(NotKept::Io("spool writer stopped".into())),
            Err(_) => Err(NotKept::Pending),
        }
    }

    /// The spool's state. A clone of it does not keep the spool open (for the health report).
    pub fn status(&self) -> &SpoolStatus {
        &self.status
    }
}

/// The spool's state, for reports.
#[derive(Clone)]
pub struct SpoolStatus {
    shared: Arc<Shared>,
    metrics: ShipMetrics,
    degraded_after: Duration,
    max_bytes: u64,
}

impl SpoolStatus {
    /// Whether records nobody waits for (shadow predictions) may still be spooled: less than
    /// half of `MESH_SPOOL_MAX_BYTES` is waiting, so they can never crowd out a primary's.
    pub fn room_for_optional(&self) -> bool {
        u64::try_from(self.metrics.pending_bytes.get()).unwrap_or(0) < self.max_bytes / 2
    }

    /// Whether delivery to the logger is failing now (records wait in the spool).
    pub fn delivery_failing(&self) -> bool {
        self.shared.logger_failing.load(Ordering::Relaxed)
    }

    /// How long delivery has been failing, if it is.
    pub fn delivery_failing_for(&self) -> Option<Duration> {
        let since = *self.shared.failing_since.lock().ok()?;
        since.map(|since| since.elapsed())
    }

    /// Why the spool makes the gateway degraded: delivery failing for longer than
    /// `MESH_LOG_DELIVERY_DEGRADED_MS`. A shorter failure is a blip the spool absorbs.
    pub fn degraded_reason(&self) -> Option<String> {
        let failing_for = self.delivery_failing_for()?;
        (failing_for >= self.degraded_after).then(|| {
            format!(
                "prediction-log delivery failing for {} s (over {} s); {} records wait in the spool",
                failing_for.as_secs(),
                self.degraded_after.as_secs_f64(),
                self.metrics.pending_records.get()
            )
        })
    }

    /// Records and bytes waiting in the spool.
    pub fn pending(&self) -> (i64, i64) {
        (
            self.metrics.pending_records.get(),
            self.metrics.pending_bytes.get(),
        )
    }
}

/// Opens the spool in `config.dir` (recovering what a previous run left), starts the writer
/// thread and the shipping task. The task ends once every [`LogShipper`] is dropped and the
/// spool is delivered; it may be aborted earlier (what is undelivered stays on disk).
pub fn spawn(
    logger: LoggerDownstream,
    bulkhead: Bulkhead,
    config: ShipConfig,
    metrics: ShipMetrics,
) -> std::io::Result<(LogShipper, JoinHandle<()>)> {
    spawn_on(Arc::new(RealDisk), logger, bulkhead, config, metrics)
}

/// [`spawn`] on the given disk (tests inject faults through it).
fn spawn_on(
    disk: Arc<dyn Disk>,
    logger: LoggerDownstream,
    bulkhead: Bulkhead,
    config: ShipConfig,
    metrics: ShipMetrics,
) -> std::io::Result<(LogShipper, JoinHandle<()>)> {
    let recovered = Spool::open(&config.dir, config.segment_bytes, disk.clone())?;
    metrics.disk.watch(&config.dir, config.max_bytes);
    report_recovery(&recovered, &config, &metrics);
    let reader = Reader::new(&config.dir, recovered.cursor)?;
    let shared = Arc::new(Shared {
        dir: config.dir.clone(),
        disk,
        end: AtomicU64::new(recovered.spool.end()),
        cursor: AtomicU64::new(recovered.cursor),
        closed: AtomicBool::new(false),
        logger_failing: AtomicBool::new(false),
        failing_since: Mutex::new(None),
        wake: Notify::new(),
        contexts: Mutex::new(VecDeque::new()),
    });
    metrics
        .pending_records
        .set(recovered.pending_records as i64);
    metrics
        .pending_bytes
        .set((recovered.spool.end() - recovered.cursor) as i64);
    let (sender, receiver) = mpsc::channel(config.capacity);
    {
        let shared = shared.clone();
        let metrics = metrics.clone();
        let max_bytes = config.max_bytes;
        let spool = recovered.spool;
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || write::write_loop(spool, receiver, &shared, &metrics, max_bytes))?;
    }
    let shipper = LogShipper {
        sender,
        status: SpoolStatus {
            shared: shared.clone(),
            metrics: metrics.clone(),
            degraded_after: config.degraded_after,
            max_bytes: config.max_bytes,
        },
    };
    let task = tokio::spawn(ship::ship_loop(
        reader, logger, bulkhead, config, metrics, shared,
    ));
    Ok((shipper, task))
}

/// Logs what recovery found; a cursor that could not be trusted is loud and counted.
fn report_recovery(recovered: &Recovered, config: &ShipConfig, metrics: &ShipMetrics) {
    let dir = config.dir.display();
    match &recovered.cursor_found {
        CursorFound::Valid(_) | CursorFound::Legacy(_) => {}
        CursorFound::Missing if recovered.cursor <= SEGMENT_HEADER_LEN => {
            // A spool that never recorded a cursor: nothing was freed, nothing is lost.
        }
        CursorFound::Missing => {
            metrics.cursor_errors.with_label_values(&["missing"]).inc();
            tracing::warn!(%dir, "spool cursor missing; delivering again from the first segment (the logger stores each record once)");
        }
        CursorFound::Garbled(what) => {
            metrics.cursor_errors.with_label_values(&["garbled"]).inc();
            tracing::error!(%dir, cursor = %what, "spool cursor garbled; delivering again from the first segment (the logger stores each record once)");
        }
    }
    if recovered.pending_records > 0 || recovered.dropped_bytes > 0 {
        tracing::info!(
            pending = recovered.pending_records,
            torn_bytes_dropped = recovered.dropped_bytes,
            %dir,
            "spool recovered; delivering what a previous run left"
        );
    }
}
