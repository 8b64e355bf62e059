//! Prometheus metrics: one registry per service (several services can share a test process),
//! RPC metrics recorded by a tower layer, and a minimal HTTP endpoint serving `/metrics`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus::{Encoder as _, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tokio::net::TcpListener;

/// Latency buckets in seconds, dense below 25 ms where the mesh's budgets live.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5,
];

/// The `method` label of calls to a path the server does not serve. Label values never come
/// from request data: each distinct label value is a series held in memory for the process's
/// life, so invented paths would grow the metrics without bound.
pub const UNKNOWN_METHOD: &str = "unknown";

/// The full paths (`/pkg.Service/Method`) a server serves: the only `method` label values.
#[derive(Clone, Debug, Default)]
pub struct KnownMethods(Arc<std::collections::HashSet<String>>);

impl KnownMethods {
    /// The given paths.
    pub fn new(paths: impl IntoIterator<Item = String>) -> Self {
        Self(Arc::new(paths.into_iter().collect()))
    }

    /// The label for a call to `path`: the path if it is served, else [`UNKNOWN_METHOD`].
    pub fn label<'a>(&'a self, path: &str) -> &'a str {
        self.0
            .get(path)
            .map(String::as_str)
            .unwrap_or(UNKNOWN_METHOD)
    }
}

/// Requests, errors and latency per RPC method, as seen by a server.
#[derive(Clone)]
pub struct RpcMetrics {
    requests: IntCounterVec,
    latency: HistogramVec,
}

impl RpcMetrics {
    /// Registers `mesh_rpc_requests_total{method,code}` and
    /// `mesh_rpc_duration_seconds{method}` in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "mesh_rpc_requests_total",
                "RPCs handled, by method and gRPC status code (code != OK counts as an error)",
            ),
            &["method", "code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("mesh_rpc_duration_seconds", "RPC handling time, by method")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["method"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        Ok(Self { requests, latency })
    }

    fn observe(&self, method: &str, code: &str, started: Instant) {
        self.requests.with_label_values(&[method, code]).inc();
        self.latency
            .with_label_values(&[method])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Records [`RpcMetrics`] for every RPC passing through, labelled by method when the method
/// is one of `known` and as [`UNKNOWN_METHOD`] otherwise.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    metrics: RpcMetrics,
    known: KnownMethods,
}

impl RpcMetricsLayer {
    /// A layer recording into `metrics`.
    pub fn new(metrics: RpcMetrics, known: KnownMethods) -> Self {
        Self { metrics, known }
    }
}

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
            known: self.known.clone(),
        }
    }
}

/// The service made by [`RpcMetricsLayer`].
#[derive(Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: RpcMetrics,
    known: KnownMethods,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for RpcMetricsService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = self.known.label(req.uri().path()).to_owned();
        let metrics = self.metrics.clone();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let started = Instant::now();
        Box::pin(async move {
            let result = inner.call(req).await;
            let code = match &result {
                Ok(resp) => crate::propagation::response_code(resp),
                Err(_) => tonic::Code::Internal,
            };
            metrics.observe(&method, code_label(code), started);
            result
        })
    }
}

/// The canonical upper-case name of a gRPC code, as Prometheus labels use it.
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A detailed health report: HTTP status and a JSON body.
pub type HealthProbe =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = (u16, String)> + Send>> + Send + Sync>;

/// Serves on `listener` until `shutdown` resolves:
/// - `GET /metrics`: Prometheus text format from `registry`;
/// - `GET /health/live`: 200 while the process answers at all (liveness);
/// - `GET /health`: the service's detailed report from `probe`, if it has one.
///
/// Any other path gets 404.
pub async fn serve_metrics(
    listener: TcpListener,
    registry: Arc<Registry>,
    probe: Option<HealthProbe>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        // Either a new scrape connection or the end of the service, whichever comes first.
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    continue;
                }
            },
        };
        let registry = registry.clone();
        let probe = probe.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                let probe = probe.clone();
                async move {
                    let response = match (req.uri().path(), probe) {
                        ("/health/live", _) => text_response(200, "live\n".into(), "text/plain"),
                        ("/health", Some(probe)) => {
                            let (status, body) = probe().await;
                            text_response(status, body, "application/json")
                        }
                        _ => metrics_response(&req, &registry),
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

fn text_response(
    status: u16,
    body: String,
    content_type: &'static str,
) -> http::Response<Full<Bytes>> {
    let mut resp = http::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

fn metrics_response<B>(req: &http::Request<B>, registry: &Registry) -> http::Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        let mut resp =
            http::Response::new(Full::new(Bytes::from_static(b"not found; try /metrics\n")));
        *resp.status_mut() = http::StatusCode::NOT_FOUND;
        return resp;
    }
    let mut buf = Vec::with_capacity(16 * 1024);
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&registry.gather(), &mut buf) {
        tracing::error!(error = %e, "metrics encoding failed");
    }
    let mut resp = http::Response::new(Full::new(Bytes::from(buf)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

/// Binds the metrics endpoint; a separate step so `main` can fail before serving anything.
pub async fn bind_metrics(addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr).await
}
