//! Shipping against a fake logger in this process, and the spool's disk failing under it.
//!
//! The logger here is a fake: it refuses calls the real logger no longer refuses (that one
//! stores invalid records in a rejects table and answers OK), and it can be made to fail, so
//! the shipper's side of both can be tested without PostgreSQL.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proto::logger::prediction_log_server::{PredictionLog, PredictionLogServer};
use mesh_proto::logger::{GetPredictionRequest, PredictionRecord, RecordRequest, RecordResponse};
use mesh_runtime::bulkhead::BulkheadMetrics;
use mesh_runtime::Bulkhead;
use prometheus::Registry;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::*;
use crate::spool::disk::FaultyDisk;
use crate::spool::tests::{temp_dir, TempDir};

/// Records whose model is this are refused by the fake logger, with every call carrying one.
const POISON: &str = "poison";

#[derive(Default)]
struct FakeLogger {
    stored: Mutex<Vec<String>>,
    unavailable: AtomicBool,
}

/// The fake as a gRPC service (the test keeps the other handle).
struct FakeServer(Arc<FakeLogger>);

#[tonic::async_trait]
impl PredictionLog for FakeServer {
    async fn record(
        &self,
        request: Request<RecordRequest>,
    ) -> Result<Response<RecordResponse>, Status> {
        if self.0.unavailable.load(Ordering::SeqCst) {
            return Err(Status::unavailable("fake: database down"));
        }
        let records = request.into_inner().records;
        if records.iter().any(|r| r.model == POISON) {
            return Err(Status::invalid_argument("fake: a record is invalid"));
        }
        let mut stored = self
            .0
            .stored
            .lock()
            .map_err(|_| Status::internal("poisoned"))?;
        stored.extend(records.iter().map(|r| r.prediction_id.clone()));
        // `..Default::default()`: the logger's contract is gaining `rejected`; this fake must
        // build before and after.
        #[allow(clippy::needless_update)]
        let response = RecordResponse {
            accepted: records.len() as u32,
            ..Default::default()
        };
        Ok(Response::new(response))
    }

    async fn get_prediction(
        &self,
        _: Request<GetPredictionRequest>,
    ) -> Result<Response<PredictionRecord>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

struct Harness {
    logger: Arc<FakeLogger>,
    shipper: LogShipper,
    metrics: ShipMetrics,
    dir: TempDir,
}

async fn start(name: &str, disk: Arc<dyn Disk>, tune: impl FnOnce(&mut ShipConfig)) -> Harness {
    let logger = Arc::new(FakeLogger::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PredictionLogServer::new(FakeServer(logger.clone())))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("url")
        .connect_lazy();
    let registry = Registry::new();
    let bulkhead = Bulkhead::new(
        "logger",
        4,
        &BulkheadMetrics::register(&registry).expect("metrics"),
    );
    let metrics = ShipMetrics::register(&registry).expect("metrics");
    let dir = temp_dir(name);
    let mut config = ShipConfig {
        dir: dir.to_path_buf(),
        max_bytes: 1 << 20,
        segment_bytes: 1 << 20,
        capacity: 1000,
        batch_size: 500,
        flush_interval: Duration::from_millis(5),
        call_timeout: Duration::from_secs(2),
        degraded_after: Duration::from_secs(30),
    };
    tune(&mut config);
    let (shipper, _task) = spawn_on(
        disk,
        LoggerDownstream::new(mesh_runtime::internal::WithToken::new(channel, None)),
        bulkhead,
        config,
        metrics.clone(),
    )
    .expect("spawn");
    Harness {
        logger,
        shipper,
        metrics,
        dir,
    }
}

fn record(i: usize, model: &str) -> PredictionRecord {
    PredictionRecord {
        prediction_id: format!("p-{i:04}"),
        model: model.into(),
        ..Default::default()
    }
}

impl Harness {
    fn stored(&self) -> Vec<String> {
        self.logger
            .stored
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    async fn wait_delivered(&self, n: usize) {
        let until = Instant::now() + Duration::from_secs(10);
        while self.metrics.pending_records.get() > 0 || self.stored().len() < n {
            assert!(Instant::now() < until, "not delivered: {:?}", self.stored());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn segments(&self) -> usize {
        crate::spool::segments(&self.dir)
            .map(|s| s.len())
            .unwrap_or(0)
    }
}

/// Review item 6: one batch of 40 with two records the (fake) logger refuses; the batch is
/// split until they are alone, the other 38 are delivered in order, the two are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_record_costs_only_itself_not_its_batch() {
    let h = start("refused", Arc::new(RealDisk), |_| {}).await;
    // Held until all 40 are in the spool, so that they travel as one batch.
    h.logger.unavailable.store(true, Ordering::SeqCst);
    for i in 0..40 {
        let model = if i == 7 || i == 30 { POISON } else { "churn" };
        h.shipper
            .record(&record(i, model), Duration::from_secs(5))
            .await
            .expect("kept");
    }
    h.logger.unavailable.store(false, Ordering::SeqCst);
    h.wait_delivered(38).await;
    let expected: Vec<String> = (0..40)
        .filter(|i| *i != 7 && *i != 30)
        .map(|i| format!("p-{i:04}"))
        .collect();
    assert_eq!(h.stored(), expected, "every good record, in order, once");
    assert_eq!(h.metrics.dropped.with_label_values(&["refused"]).get(), 2);
    assert_eq!(
        h.metrics.delivered.get(),
        40,
        "the refused ones leave the spool too"
    );
}

/// Review item 7, the spool's side: delivery failing for longer than the threshold gives a
/// reason to be degraded; a shorter failure does not, nor does delivery once it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_failing_past_the_threshold_gives_a_degraded_reason() {
    let h = start("threshold", Arc::new(RealDisk), |c| {
        c.degraded_after = Duration::from_millis(300)
    })
    .await;
    h.logger.unavailable.store(true, Ordering::SeqCst);
    h.shipper
        .record(&record(1, "churn"), Duration::from_secs(5))
        .await
        .expect("kept");
    let status = h.shipper.status().clone();
    let until = Instant::now() + Duration::from_secs(5);
    while !status.delivery_failing() {
        assert!(Instant::now() < until, "delivery never failed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(status.degraded_reason(), None, "not yet past the threshold");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let reason = status.degraded_reason().expect("past the threshold");
    assert!(
        reason.contains("prediction-log delivery failing"),
        "{reason}"
    );
    h.logger.unavailable.store(false, Ordering::SeqCst);
    h.wait_delivered(1).await;
    assert_eq!(status.degraded_reason(), None);
    assert_eq!(status.delivery_failing_for(), None);
}

/// Review item 3, end to end in the gateway: a fault injection at the spool's write call (this
/// machine cannot safely fill a disk in CI). While the disk is full, new records are refused
/// with the documented note, records already on disk are still delivered and their segments
/// freed (the cursor cannot be written), and once there is space again records are kept and
/// delivered, and the cursor recorded, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_new_records_but_delivery_and_freeing_go_on_and_it_heals() {
    let disk = Arc::new(FaultyDisk::default());
    let h = start("full", disk.clone(), |c| c.segment_bytes = 256).await;
    h.logger.unavailable.store(true, Ordering::SeqCst);
    for i in 0..40 {
        h.shipper
            .record(&record(i, "churn"), Duration::from_secs(5))
            .await
            .expect("kept");
    }
    assert!(h.segments() > 3, "several segments wait: {}", h.segments());
    disk.set_full(true);
    let refused = h
        .shipper
        .record(&record(40, "churn"), Duration::from_secs(5))
        .await
        .expect_err("disk full");
    assert!(
        refused
            .note()
            .starts_with("prediction-log: not recorded (spool write failed: "),
        "{}",
        refused.note()
    );
    h.logger.unavailable.store(false, Ordering::SeqCst);
    h.wait_delivered(40).await;
    assert!(
        h.segments() <= 2,
        "delivered segments freed: {}",
        h.segments()
    );
    assert!(h.metrics.cursor_errors.with_label_values(&["write"]).get() > 0);

    disk.set_full(false);
    h.shipper
        .record(&record(41, "churn"), Duration::from_secs(5))
        .await
        .expect("kept once there is space");
    h.wait_delivered(41).await;
    assert_eq!(h.stored().last().map(String::as_str), Some("p-0041"));
    let until = Instant::now() + Duration::from_secs(5);
    while crate::spool::cursor::read(&h.dir)
        != crate::spool::CursorFound::Valid(h.shipper.status().shared.end.load(Ordering::Acquire))
    {
        assert!(Instant::now() < until, "cursor recorded again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
