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

/// Maps a downstream failure to the gateway's error, naming the downstream.
pub fn from_status(downstream: &str, status: &tonic::Status) -> GatewayError {
    use tonic::Code::*;
    match status.code() {
        DeadlineExceeded | Cancelled => GatewayError::DeadlineExceeded,
        ResourceExhausted => GatewayError::Overloaded(format!("{downstream} is overloaded")),
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
}

impl FeaturesDownstream {
    /// A client over `channel`; `margin` is kept back from each budget for the way back.
    pub fn new(channel: Channel, margin: Duration) -> Self {
        Self {
            client: FeaturesClient::new(channel),
            margin,
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
        let span = client_span(mesh_proto::service_names::FEATURES, "GetFeatures");
        let mut client = self.client.clone();
        let margin = self.margin;
        async move {
            let request = outgoing(GetFeaturesRequest { entity_ids }, deadline, margin)
                .map_err(tonic::Status::from)?;
            let result = client.get_features(request).await;
            record_client_status(&tracing::Span::current(), code_of(&result));
            result.map(tonic::Response::into_inner)
        }
        .instrument(span)
        .await
    }
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
}

impl InferenceDownstream {
    /// Clients for `urls` (from `MESH_INFERENCE_URLS`).
    pub fn new(urls: &[String], margin: Duration) -> Result<Self, GatewayError> {
        if urls.is_empty() {
            return Err(GatewayError::Config(
                "MESH_INFERENCE_URLS lists no replica".into(),
            ));
        }
        let replicas = urls
            .iter()
            .map(|url| {
                Ok(Replica {
                    url: url.clone(),
                    client: GrpcInferenceServiceClient::new(channel(url, "MESH_INFERENCE_URLS")?)
                        .max_decoding_message_size(64 * 1024 * 1024),
                    in_flight: AtomicUsize::new(0),
                })
            })
            .collect::<Result<Vec<_>, GatewayError>>()?;
        Ok(Self {
            replicas: Arc::new(replicas),
            next: Arc::new(AtomicUsize::new(0)),
            margin,
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

    /// `ModelInfer` within `deadline`, in `bulkhead`. A replica that is unreachable is skipped
    /// for the next one while budget remains (inference is idempotent).
    pub async fn infer(
        &self,
        request: ModelInferRequest,
        deadline: Deadline,
        bulkhead: &Bulkhead,
    ) -> Result<ModelInferResponse, tonic::Status> {
        let _permit = bulkhead.try_enter()?;
        let mut last = tonic::Status::unavailable("no inference replica answered");
        for index in self.order() {
            let replica = &self.replicas[index];
            let span = client_span(mesh_proto::service_names::INFERENCE, "ModelInfer");
            span.record("server.address", replica.url.as_str());
            let mut client = replica.client.clone();
            let message = request.clone();
            let margin = self.margin;
            replica.in_flight.fetch_add(1, Ordering::Relaxed);
            let result = async move {
                let outgoing = outgoing(message, deadline, margin).map_err(tonic::Status::from)?;
                let result = client.model_infer(outgoing).await;
                record_client_status(&tracing::Span::current(), code_of(&result));
                result.map(tonic::Response::into_inner)
            }
            .instrument(span)
            .await;
            replica.in_flight.fetch_sub(1, Ordering::Relaxed);
            match result {
                Ok(response) => return Ok(response),
                Err(status) if status.code() == tonic::Code::Unavailable && !deadline.expired() => {
                    tracing::warn!(replica = %replica.url, error = %status.message(), "inference replica unavailable; trying the next");
                    last = status;
                }
                Err(status) => return Err(status),
            }
        }
        Err(last)
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
        async move {
            let outgoing = outgoing(request, Deadline::after(timeout), Duration::ZERO)
                .map_err(tonic::Status::from)?;
            let result = client.record(outgoing).await;
            record_client_status(&tracing::Span::current(), code_of(&result));
            result.map(tonic::Response::into_inner)
        }
        .instrument(span)
        .await
    }
}
