//! Calls from the gateway to the features, inference and logger services. Every call runs in
//! its bulkhead, carries what remains of the request's budget as `grpc-timeout`, and opens a
//! client span whose context travels in the metadata.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::features::features_client::FeaturesClient;
use mesh_proto::features::{GetFeaturesRequest, GetFeaturesResponse};
use mesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use mesh_proto::inference::{ModelInferRequest, ModelInferResponse};
use mesh_proto::logger::prediction_log_client::PredictionLogClient;
use mesh_proto::logger::{RecordRequest, RecordResponse};
use mesh_runtime::retry::{is_failure, retry_pause, CircuitBreaker, RetryBudget};
use mesh_runtime::{Bulkhead, Deadline};
use mesh_telemetry::propagation::{client_span, inject_current, record_client_status};
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

    /// Reports an attempt that had `budget` to the breaker. A deadline miss only counts
    /// against the dependency if the attempt had a fair budget: a caller sending hopeless
    /// deadlines must not open the breaker for everyone.
    fn record<T>(&self, result: &Result<T, tonic::Status>, budget: Duration) {
        let failed = match result {
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                ) =>
            {
                budget >= FAIR_BUDGET
            }
            Err(s) => is_failure(s.code()),
            Ok(_) => false,
        };
        self.breaker.record(!failed);
    }

    /// The pause before retry number `attempt`, if the budget and the deadline allow one.
    fn retry(&self, attempt: u32, deadline: Deadline) -> Option<Duration> {
        let pause = retry_pause(attempt, deadline, RETRY_BASE, RETRY_CAP, RETRY_MIN_LEFT)?;
        self.budget.try_retry().then_some(pause)
    }
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
    )
}

fn code_of<T>(result: &Result<T, tonic::Status>) -> tonic::Code {
    match result {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

/// One inference replica and the calls it has in flight.
struct Replica {
    url: String,
    client: GrpcInferenceServiceClient<Channel>,
    in_flight: AtomicUsize,
}

/// The inference replicas, chosen per call by power of two choices on in-flight calls.
#[derive(Clone)]
pub struct InferenceDownstream {
    replicas: Arc<Vec<Replica>>,
    next: Arc<AtomicUsize>,
    margin: Duration,
    guard: Guard,
}

impl InferenceDownstream {
    /// Clients for the replicas (`MESH_INFERENCE_URLS`), each over its channel.
    pub fn new(
        replicas: &[(String, Channel)],
        margin: Duration,
        guard: Guard,
    ) -> Result<Self, GatewayError> {
        if replicas.is_empty() {
            return Err(GatewayError::Config(
                "MESH_INFERENCE_URLS lists no replica".into(),
            ));
        }
        let replicas = replicas
            .iter()
            .map(|(url, channel)| Replica {
                url: url.clone(),
                client: GrpcInferenceServiceClient::new(channel.clone())
                    .max_decoding_message_size(64 * 1024 * 1024),
                in_flight: AtomicUsize::new(0),
            })
            .collect();
        Ok(Self {
            replicas: Arc::new(replicas),
            next: Arc::new(AtomicUsize::new(0)),
            margin,
            guard,
        })
    }

    /// Two candidates in rotation, the less busy one first.
    fn order(&self) -> Vec<usize> {
        let n = self.replicas.len();
        let a = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let b = (a + 1) % n;
        let load = |i: usize| self.replicas[i].in_flight.load(Ordering::Relaxed);
        let first = if load(b) < load(a) { b } else { a };
        let mut order = vec![first];
        order.extend((0..n).map(|k| (first + k) % n).filter(|i| *i != first));
        order
    }

    /// `ModelInfer` within `deadline`, in `bulkhead`. Inference is idempotent: a replica that is
    /// unreachable, or pushes back with `RESOURCE_EXHAUSTED`, is followed by the next replica
    /// after a jittered pause, while the retry budget and the deadline allow.
    pub async fn infer(
        &self,
        request: ModelInferRequest,
        deadline: Deadline,
        bulkhead: &Bulkhead,
    ) -> Result<ModelInferResponse, tonic::Status> {
        let _permit = bulkhead.try_enter()?;
        self.guard.budget.record_request();
        let order = self.order();
        let mut attempt = 0u32;
        loop {
            self.guard.admit()?;
            let replica = &self.replicas[order[attempt as usize % order.len()]];
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
            self.guard.record(&result, per_try_budget);
            let try_timed_out = matches!(&result, Err(s) if matches!(s.code(), tonic::Code::Cancelled | tonic::Code::DeadlineExceeded))
                && order.len() > 1
                && !deadline.expired();
            let retryable = try_timed_out
                || matches!(&result, Err(s) if is_unreachable(s)
                    || (s.code() == tonic::Code::ResourceExhausted && order.len() > 1));
            if !retryable {
                return result;
            }
            let Some(pause) = self.guard.retry(attempt, deadline) else {
                return result;
            };
            if let Err(status) = &result {
                tracing::warn!(replica = %replica.url, code = ?status.code(), error = %status.message(), "inference replica failed; retrying on the next");
            }
            attempt += 1;
            tokio::time::sleep(pause).await;
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
