//! Calls from the gateway to the features, inference and logger services. Every call runs in
//! its bulkhead, carries what remains of the request's budget as `grpc-timeout`, and opens a
//! client span whose context travels in the metadata.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_proto::features::features_client::FeaturesClient;
use mesh_proto::features::{GetFeaturesRequest, GetFeaturesResponse};
use mesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use mesh_proto::inference::{ModelInferRequest, ModelInferResponse};
use mesh_proto::logger::prediction_log_client::PredictionLogClient;
use mesh_proto::logger::{RecordRequest, RecordResponse};
use mesh_runtime::retry::{
    is_failure, is_store_unavailable, retry_pause, CircuitBreaker, RetryBudget,
};
use mesh_runtime::{Bulkhead, Deadline};
use mesh_telemetry::propagation::{client_span, inject_current, record_client_status};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument as _;

use crate::error::GatewayError;

/// A lazily connected channel to `url` (the process starts even if the dependency is down).
pub fn channel(url: &str, variable: &str) -> Result<Channel, GatewayError> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| GatewayError::Config(format!("{variable}={url:?}: {e}")))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}

/// Bulkheads of one traffic class (online or batch) toward each downstream.
#[derive(Clone)]
pub struct Compartments {
    /// Toward the features service.
    pub features: Bulkhead,
    /// Toward inference (all replicas).
    pub inference: Bulkhead,
}

/// What guards calls to one downstream besides its bulkheads: a breaker that fails fast while
/// it is down, and a budget that keeps retries from amplifying an outage.
#[derive(Clone)]
pub struct Guard {
    /// Opens after consecutive failures.
    pub breaker: CircuitBreaker,
    /// Bounds retries to a share of traffic.
    pub budget: RetryBudget,
}

/// How a fail-fast answer of an open breaker ends, so callers can tell it from an outage seen
/// on the wire.
pub const CIRCUIT_OPEN: &str = "circuit open: failing fast";

/// The smallest budget whose expiry counts as the dependency's failure.
pub const FAIR_BUDGET: Duration = Duration::from_millis(20);

/// Back-off of the first retry; it doubles per attempt up to [`RETRY_CAP`] (full jitter).
pub const RETRY_BASE: Duration = Duration::from_millis(5);
/// Longest back-off.
pub const RETRY_CAP: Duration = Duration::from_millis(100);
/// A retry is only started if at least this much of the deadline would remain after its pause.
pub const RETRY_MIN_LEFT: Duration = Duration::from_millis(5);

impl Guard {
    /// Fails fast with `UNAVAILABLE` while the breaker is open.
    fn admit(&self) -> Result<(), tonic::Status> {
        if self.breaker.allow() {
            Ok(())
        } else {
            Err(tonic::Status::unavailable(format!(
                "{} {CIRCUIT_OPEN}",
                self.breaker.name()
            )))
        }
    }

    /// Reports an attempt that had `budget` to the breaker.
    fn record<T>(&self, result: &Result<T, tonic::Status>, budget: Duration) {
        self.breaker.record(!counts_against(result, budget));
    }

    /// The pause before retry number `attempt`, if the budget and the deadline allow one.
    fn retry(&self, attempt: u32, deadline: Deadline) -> Option<Duration> {
        let pause = retry_pause(attempt, deadline, RETRY_BASE, RETRY_CAP, RETRY_MIN_LEFT)?;
        self.budget.try_retry().then_some(pause)
    }
}

/// Whether an attempt that had `budget` counts against the dependency, for its breaker and
/// for outlier detection. A deadline miss only counts if the attempt had a fair budget: a
/// caller sending hopeless deadlines must not open the breaker (or eject a replica) for
/// everyone.
fn counts_against<T>(result: &Result<T, tonic::Status>, budget: Duration) -> bool {
    match result {
        Err(s) if is_timeout(s) => budget >= FAIR_BUDGET,
        // The service answered; the store behind it failed. Opening the breaker would also
        // refuse everything it still serves from its caches.
        Err(s) if is_store_unavailable(s) => false,
        Err(s) => is_failure(s.code()),
        Ok(_) => false,
    }
}

/// The attempt ran out of its time (or was cut off for it).
fn is_timeout(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
    )
}

/// Builds an outgoing request inside the current (client) span: remaining budget minus
/// `margin` as its timeout, trace context in its metadata.
fn outgoing<T>(
    message: T,
    deadline: Deadline,
    margin: Duration,
) -> Result<tonic::Request<T>, GatewayError> {
    let mut request = tonic::Request::new(message);
    deadline
        .propagate(&mut request, margin)
        .map_err(|_| GatewayError::DeadlineExceeded)?;
    inject_current(request.metadata_mut());
    Ok(request)
}

/// Sends `message` through `call` inside `span` (a client span): what remains of `deadline`
/// minus `margin` as its grpc-timeout, trace context in its metadata, the outcome on the span.
async fn traced_call<T, R, F, Fut>(
    span: tracing::Span,
    message: T,
    deadline: Deadline,
    margin: Duration,
    call: F,
) -> Result<R, tonic::Status>
where
    F: FnOnce(tonic::Request<T>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
{
    async move {
        let request = outgoing(message, deadline, margin).map_err(tonic::Status::from)?;
        let result = call(request).await;
        record_client_status(&tracing::Span::current(), code_of(&result));
        result.map(tonic::Response::into_inner)
    }
    .instrument(span)
    .await
}

/// Maps a downstream failure to the gateway's error, naming the downstream.
pub fn from_status(downstream: &str, status: &tonic::Status) -> GatewayError {
    use tonic::Code::*;
    match status.code() {
        DeadlineExceeded | Cancelled => GatewayError::DeadlineExceeded,
        ResourceExhausted => GatewayError::Overloaded(format!("{downstream} is overloaded")),
        Unavailable if is_store_unavailable(status) => GatewayError::Unavailable(format!(
            "{downstream} cannot reach its database and has no cached features for the entity"
        )),
        Unavailable if status.message().ends_with(CIRCUIT_OPEN) => {
            GatewayError::Unavailable(format!("{downstream} is unavailable ({CIRCUIT_OPEN})"))
        }
        Unavailable | Unknown => GatewayError::Unavailable(format!("{downstream} is unavailable")),
        InvalidArgument => GatewayError::InvalidArgument(status.message().to_owned()),
        NotFound => GatewayError::NotFound(status.message().to_owned()),
        _ => GatewayError::Internal(format!(
            "{downstream} answered {:?}: {}",
            status.code(),
            status.message()
        )),
    }
}

/// The features service.
#[derive(Clone)]
pub struct FeaturesDownstream {
    client: FeaturesClient<Channel>,
    margin: Duration,
    guard: Guard,
}

impl FeaturesDownstream {
    /// A client over `channel`; `margin` is kept back from each budget for the way back.
    pub fn new(channel: Channel, margin: Duration, guard: Guard) -> Self {
        Self {
            client: FeaturesClient::new(channel),
            margin,
            guard,
        }
    }

    /// `GetFeatures` for `entity_ids` within `deadline`, in `bulkhead`.
    pub async fn get(
        &self,
        entity_ids: Vec<String>,
        deadline: Deadline,
        bulkhead: &Bulkhead,
    ) -> Result<GetFeaturesResponse, tonic::Status> {
        let _permit = bulkhead.try_enter()?;
        self.guard.budget.record_request();
        let mut attempt = 0;
        loop {
            self.guard.admit()?;
            let budget = deadline.remaining();
            let span = client_span(mesh_proto::service_names::FEATURES, "GetFeatures");
            let mut client = self.client.clone();
            let message = GetFeaturesRequest {
                entity_ids: entity_ids.clone(),
            };
            let margin = self.margin;
            let result = traced_call(span, message, deadline, margin, move |r| async move {
                client.get_features(r).await
            })
            .await;
            self.guard.record(&result, budget);
            match result {
                // Reads are idempotent: an unreachable service is retried, within budget.
                Err(status) if is_unreachable(&status) => {
                    let Some(pause) = self.guard.retry(attempt, deadline) else {
                        return Err(status);
                    };
                    attempt += 1;
                    tokio::time::sleep(pause).await;
                }
                other => return other,
            }
        }
    }
}

/// The downstream could not be reached or the connection broke (tonic reports a reset
/// connection as UNKNOWN): safe to retry for idempotent calls.
fn is_unreachable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown
    ) && !is_store_unavailable(status)
}

fn code_of<T>(result: &Result<T, tonic::Status>) -> tonic::Code {
    match result {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

/// Outlier detection of inference replicas, after Envoy's: a replica failing
/// `consecutive_failures` calls in a row is ejected (taken out of the choice) for
/// `base_ejection` × the number of times it has been ejected, at most `max_ejection` (the count
/// falls by one for every 5 × `base_ejection` it then stays in); never more than
/// `max_ejected_percent` of the replicas at once (and never the last one).
#[derive(Debug, Clone, Copy)]
pub struct OutlierConfig {
    /// `MESH_OUTLIER_CONSECUTIVE_FAILURES`, default 5.
    pub consecutive_failures: u32,
    /// `MESH_OUTLIER_BASE_EJECTION_MS`, default 30000.
    pub base_ejection: Duration,
    /// `MESH_OUTLIER_MAX_EJECTION_MS`, default 300000.
    pub max_ejection: Duration,
    /// `MESH_OUTLIER_MAX_EJECTED_PERCENT`, default 50.
    pub max_ejected_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

/// Per-replica gauges and counters.
#[derive(Clone)]
pub struct ReplicaMetrics {
    ejected: IntGaugeVec,
    ejections: IntCounterVec,
    serving: IntGaugeVec,
}

impl ReplicaMetrics {
    /// Registers `mesh_replica_ejected{replica}`, `mesh_replica_ejections_total{replica}` and
    /// `mesh_replica_serving{replica}`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let ejected = IntGaugeVec::new(
            Opts::new(
                "mesh_replica_ejected",
                "1 while the inference replica is ejected by outlier detection",
            ),
            &["replica"],
        )?;
        let ejections = IntCounterVec::new(
            Opts::new(
                "mesh_replica_ejections_total",
                "Times the inference replica was ejected after consecutive failures",
            ),
            &["replica"],
        )?;
        let serving = IntGaugeVec::new(
            Opts::new(
                "mesh_replica_serving",
                "1 while the replica's grpc.health.v1 Watch says SERVING",
            ),
            &["replica"],
        )?;
        registry.register(Box::new(ejected.clone()))?;
        registry.register(Box::new(ejections.clone()))?;
        registry.register(Box::new(serving.clone()))?;
        Ok(Self {
            ejected,
            ejections,
            serving,
        })
    }
}

/// One inference replica, the calls it has in flight, and what outlier detection and health
/// watching know of it.
struct Replica {
    url: String,
    client: GrpcInferenceServiceClient<Channel>,
    in_flight: AtomicUsize,
    consecutive_failures: AtomicU32,
    /// Times ejected, decaying while it behaves; sets the next ejection's length.
    ejections: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
    /// Its `grpc.health.v1` status (optimistic until the first answer).
    serving: AtomicBool,
}

impl Replica {
    fn ejected(&self, now: Instant) -> bool {
        matches!(self.ejected_until.lock().ok().and_then(|g| *g), Some(until) if now < until)
    }

    fn available(&self, now: Instant) -> bool {
        self.serving.load(Ordering::Relaxed) && !self.ejected(now)
    }
}

/// Aborts the background tasks (health watches) when the last clone is dropped.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// The inference replicas, chosen per call by power of two choices on in-flight calls among
/// those that are SERVING and not ejected.
#[derive(Clone)]
pub struct InferenceDownstream {
    replicas: Arc<Vec<Replica>>,
    next: Arc<AtomicUsize>,
    margin: Duration,
    guard: Guard,
    outlier: OutlierConfig,
    metrics: ReplicaMetrics,
    _tasks: Arc<Tasks>,
}

impl InferenceDownstream {
    /// Clients for the replicas (`MESH_INFERENCE_URLS`), each over its channel, and a task per
    /// replica watching its `grpc.health.v1` status.
    pub fn new(
        replicas: &[(String, Channel)],
        margin: Duration,
        guard: Guard,
        outlier: OutlierConfig,
        metrics: ReplicaMetrics,
    ) -> Result<Self, GatewayError> {
        if replicas.is_empty() {
            return Err(GatewayError::Config(
                "MESH_INFERENCE_URLS lists no replica".into(),
            ));
        }
        let list: Arc<Vec<Replica>> = Arc::new(
            replicas
                .iter()
                .map(|(url, channel)| Replica {
                    url: url.clone(),
                    client: GrpcInferenceServiceClient::new(channel.clone())
                        .max_decoding_message_size(64 * 1024 * 1024),
                    in_flight: AtomicUsize::new(0),
                    consecutive_failures: AtomicU32::new(0),
                    ejections: AtomicU32::new(0),
                    ejected_until: Mutex::new(None),
                    serving: AtomicBool::new(true),
                })
                .collect(),
        );
        let mut tasks: Vec<_> = replicas
            .iter()
            .enumerate()
            .map(|(i, (_, channel))| {
                tokio::spawn(watch_health(
                    list.clone(),
                    i,
                    channel.clone(),
                    metrics.clone(),
                ))
            })
            .collect();
        tasks.push(tokio::spawn(decay_ejections(
            list.clone(),
            outlier,
            metrics.clone(),
        )));
        Ok(Self {
            replicas: list,
            next: Arc::new(AtomicUsize::new(0)),
            margin,
            guard,
            outlier,
            metrics,
            _tasks: Arc::new(Tasks(tasks)),
        })
    }

    /// The replicas to try, in order: two candidates in rotation among the available ones, the
    /// less busy first, then the other available ones. If none is available (all ejected or
    /// not serving), all of them: trying is better than refusing (Envoy's panic mode).
    fn order(&self) -> Vec<usize> {
        let now = Instant::now();
        let available: Vec<usize> = (0..self.replicas.len())
            .filter(|i| self.replicas[*i].available(now))
            .collect();
        let pool = if available.is_empty() {
            (0..self.replicas.len()).collect()
        } else {
            available
        };
        let n = pool.len();
        let a = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let b = (a + 1) % n;
        let load = |k: usize| self.replicas[pool[k]].in_flight.load(Ordering::Relaxed);
        let first = if load(b) < load(a) { b } else { a };
        (0..n).map(|k| pool[(first + k) % n]).collect()
    }

    /// Each replica's URL, whether its health watch says SERVING, and whether it is ejected.
    pub fn states(&self) -> Vec<(String, bool, bool)> {
        let now = Instant::now();
        self.replicas
            .iter()
            .map(|r| {
                (
                    r.url.clone(),
                    r.serving.load(Ordering::Relaxed),
                    r.ejected(now),
                )
            })
            .collect()
    }

    /// Outlier detection: counts a replica's consecutive failures and ejects it at the
    /// threshold, within the cap on the share ejected.
    fn observe(&self, index: usize, failed: bool) {
        let replica = &self.replicas[index];
        if !failed {
            replica.consecutive_failures.store(0, Ordering::Relaxed);
            return;
        }
        let failures = replica.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.outlier.consecutive_failures {
            return;
        }
        let now = Instant::now();
        if replica.ejected(now) {
            return;
        }
        let total = self.replicas.len();
        let allowed = (total * self.outlier.max_ejected_percent as usize / 100)
            .max(1)
            .min(total - 1);
        let ejected_now = self.replicas.iter().filter(|r| r.ejected(now)).count();
        if ejected_now >= allowed {
            tracing::warn!(replica = %replica.url, failures, ejected_now, "replica failing but the ejection cap is reached; keeping it");
            return;
        }
        let times = replica.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let length = self
            .outlier
            .base_ejection
            .saturating_mul(times)
            .min(self.outlier.max_ejection);
        if let Ok(mut until) = replica.ejected_until.lock() {
            *until = Some(now + length);
        }
        replica.consecutive_failures.store(0, Ordering::Relaxed);
        self.metrics
            .ejected
            .with_label_values(&[replica.url.as_str()])
            .set(1);
        self.metrics
            .ejections
            .with_label_values(&[replica.url.as_str()])
            .inc();
        tracing::warn!(replica = %replica.url, failures, ejection = times, length = ?length, "inference replica ejected");
    }

    /// `ModelInfer` within `deadline`, in `bulkhead`, and notes of what degraded (a replica
    /// that failed before another answered). Inference is idempotent: a replica that is
    /// unreachable, times out its share of the budget, or pushes back with
    /// `RESOURCE_EXHAUSTED`, is followed by the next replica after a jittered pause, while the
    /// retry budget and the deadline allow.
    pub async fn infer(
        &self,
        request: ModelInferRequest,
        deadline: Deadline,
        bulkhead: &Bulkhead,
    ) -> Result<(ModelInferResponse, Vec<String>), tonic::Status> {
        let _permit = bulkhead.try_enter()?;
        self.guard.budget.record_request();
        let order = self.order();
        let mut attempt = 0u32;
        let mut notes = Vec::new();
        loop {
            self.guard.admit()?;
            let index = order[attempt as usize % order.len()];
            let replica = &self.replicas[index];
            let span = client_span(mesh_proto::service_names::INFERENCE, "ModelInfer");
            span.record("server.address", replica.url.as_str());
            let mut client = replica.client.clone();
            let message = request.clone();
            let margin = self.margin;
            // With another replica to turn to, one attempt may use half of what remains, so a
            // replica that hangs (e.g. its connection is being re-established) cannot take all.
            let per_try = if order.len() > 1 {
                Deadline::after(deadline.remaining() / 2)
            } else {
                deadline
            };
            let per_try_budget = per_try.remaining();
            replica.in_flight.fetch_add(1, Ordering::Relaxed);
            let result = traced_call(span, message, per_try, margin, move |r| async move {
                client.model_infer(r).await
            })
            .await;
            replica.in_flight.fetch_sub(1, Ordering::Relaxed);
            let failed = counts_against(&result, per_try_budget);
            self.guard.breaker.record(!failed);
            self.observe(index, failed);
            let try_timed_out = matches!(&result, Err(s) if is_timeout(s))
                && order.len() > 1
                && !deadline.expired();
            let retryable = try_timed_out
                || matches!(&result, Err(s) if is_unreachable(s)
                    || (s.code() == tonic::Code::ResourceExhausted && order.len() > 1));
            let status = match result {
                Ok(response) => return Ok((response, notes)),
                Err(status) if retryable => status,
                Err(status) => return Err(status),
            };
            let Some(pause) = self.guard.retry(attempt, deadline) else {
                return Err(status);
            };
            tracing::warn!(replica = %replica.url, code = ?status.code(), error = %status.message(), "inference replica failed; retrying on the next");
            notes.push(format!(
                "inference: replica {} failed ({:?}); retried on another",
                replica.url,
                status.code()
            ));
            attempt += 1;
            tokio::time::sleep(pause).await;
        }
    }
}

/// Follows replica `index`'s `grpc.health.v1` status with `Watch`; while the stream cannot be
/// opened or breaks, the replica counts as not serving (re-tried every second).
async fn watch_health(
    replicas: Arc<Vec<Replica>>,
    index: usize,
    channel: Channel,
    metrics: ReplicaMetrics,
) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let replica = &replicas[index];
    let gauge = metrics.serving.with_label_values(&[replica.url.as_str()]);
    let set = |serving: bool| {
        if replica.serving.swap(serving, Ordering::Relaxed) != serving {
            tracing::info!(replica = %replica.url, serving, "inference replica health changed");
        }
        gauge.set(serving as i64);
    };
    gauge.set(1);
    let mut client = HealthClient::new(channel);
    loop {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        match client.watch(request).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                while let Ok(Some(update)) = stream.message().await {
                    set(update.status() == ServingStatus::Serving);
                }
                set(false);
            }
            Err(_) => set(false),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A replica's ejection count falls by one for every this many base ejection times it stays in.
const EJECTION_DECAY_FACTOR: u32 = 5;

/// Every second: clears the ejected gauge of replicas whose ejection ended, and lowers the
/// ejection count of replicas that stayed in for [`EJECTION_DECAY_FACTOR`] base ejection times.
async fn decay_ejections(
    replicas: Arc<Vec<Replica>>,
    outlier: OutlierConfig,
    metrics: ReplicaMetrics,
) {
    let mut since_ejection: Vec<Duration> = vec![Duration::ZERO; replicas.len()];
    let tick = Duration::from_secs(1);
    loop {
        tokio::time::sleep(tick).await;
        let now = Instant::now();
        for (i, replica) in replicas.iter().enumerate() {
            if replica.ejected(now) {
                since_ejection[i] = Duration::ZERO;
                continue;
            }
            metrics
                .ejected
                .with_label_values(&[replica.url.as_str()])
                .set(0);
            since_ejection[i] += tick;
            if since_ejection[i] >= outlier.base_ejection.saturating_mul(EJECTION_DECAY_FACTOR) {
                since_ejection[i] = Duration::ZERO;
                let _ = replica
                    .ejections
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            }
        }
    }
}

/// The prediction log.
#[derive(Clone)]
pub struct LoggerDownstream {
    client: PredictionLogClient<Channel>,
}

impl LoggerDownstream {
    /// A client over `channel`.
    pub fn new(channel: Channel) -> Self {
        Self {
            client: PredictionLogClient::new(channel),
        }
    }

    /// `Record` with its own budget (log shipping is not tied to any prediction's deadline).
    pub async fn record(
        &self,
        request: RecordRequest,
        timeout: Duration,
        bulkhead: &Bulkhead,
    ) -> Result<RecordResponse, tonic::Status> {
        let _permit = bulkhead.try_enter()?;
        let span = client_span(mesh_proto::service_names::LOGGER, "Record");
        let mut client = self.client.clone();
        let deadline = Deadline::after(timeout);
        traced_call(
            span,
            request,
            deadline,
            Duration::ZERO,
            move |r| async move { client.record(r).await },
        )
        .await
    }
}
