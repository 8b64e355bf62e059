//! W3C trace context (`traceparent`, `tracestate`) carried in gRPC metadata, and the spans
//! that make every RPC visible on both sides.
//!
//! Server side: [`ServerTraceLayer`] opens one span per incoming RPC, parented on the caller's
//! context. Client side: [`client_span`] opens a span for an outgoing call and
//! [`inject_current`] writes its context into the request's metadata.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt as _;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// The caller's trace context from request headers (empty context if there is none).
pub fn extract(headers: &http::HeaderMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

/// Writes the current span's context into outgoing metadata as `traceparent`/`tracestate`.
pub fn inject_current(metadata: &mut tonic::metadata::MetadataMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(metadata))
    });
}

/// Trace id of the current span as 32 hex digits, or `None` outside any traced span.
pub fn current_trace_id() -> Option<String> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Whether the current span is in a trace that was decided not to be sampled (most requests:
/// the default samples 5 %). Spans opened there would never be exported, so the helpers below
/// open none ([`tracing::Span::none`]): the trace id, its propagation (from the enclosing server
/// span) and log lines are unchanged, and the request does not pay for spans nobody sees. Work
/// outside any request (no valid current context) still opens its spans, which sample as roots.
pub fn in_unsampled_trace() -> bool {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid() && !sc.is_sampled()
}

/// A client span for an outgoing call to `service`/`method` (e.g. `mesh.features.v1.Features`,
/// `GetFeatures`). Enter it (or `instrument` the call with it) and call [`inject_current`]
/// inside it, so the callee's server span becomes its child. None in an unsampled trace
/// ([`in_unsampled_trace`]): the callee's span is then the current span's child.
pub fn client_span(service: &str, method: &str) -> tracing::Span {
    if in_unsampled_trace() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "grpc.client",
        otel.name = format!("{service}/{method}"),
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        server.address = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        rpc.grpc.status_code = tracing::field::Empty,
    )
}

/// Records the outcome of a call on a client span.
pub fn record_client_status(span: &tracing::Span, code: tonic::Code) {
    span.record("rpc.grpc.status_code", code as i32);
    if code != tonic::Code::Ok {
        span.record("otel.status_code", "ERROR");
    }
}

/// Opens a server span per RPC, parented on the W3C context the caller sent, and records the
/// trace id as a span field so every log line inside the RPC carries it.
#[derive(Debug, Clone, Default)]
pub struct ServerTraceLayer;

impl<S> tower_layer::Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ServerTrace { inner }
    }
}

/// The service made by [`ServerTraceLayer`].
#[derive(Debug, Clone)]
pub struct ServerTrace<S> {
    inner: S,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for ServerTrace<S>
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
        let path = req.uri().path();
        let (service, method) = split_path(path);
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        let parent = extract(req.headers());
        let _ = span.set_parent(parent);
        let sc = span.context().span().span_context().clone();
        if sc.is_valid() {
            span.record("trace_id", sc.trace_id().to_string());
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let fut_span = span.clone();
        Box::pin(
            async move {
                let response = inner.call(req).await?;
                let code = response_code(&response) as i32;
                fut_span.record("rpc.grpc.status_code", code);
                if is_server_error(code) {
                    fut_span.record("otel.status_code", "ERROR");
                }
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// The gRPC status of a response as servers send it: `grpc-status` in the headers for
/// errors (trailers-only responses), absent (OK so far) otherwise.
pub fn response_code<B>(response: &http::Response<B>) -> tonic::Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
        .unwrap_or(tonic::Code::Ok)
}

/// A client span for a call to a store (Redis, PostgreSQL): `statement` is its name in traces,
/// e.g. `SELECT feature_values`; `items` the keys or rows involved. None in an unsampled trace
/// ([`in_unsampled_trace`]).
pub fn store_span(system: &'static str, statement: &'static str, items: usize) -> tracing::Span {
    if in_unsampled_trace() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "store",
        otel.name = statement,
        otel.kind = "client",
        db.system = system,
        items
    )
}

/// Splits `/pkg.Service/Method` into (`pkg.Service`, `Method`).
pub fn split_path(path: &str) -> (&str, &str) {
    let trimmed = path.trim_start_matches('/');
    trimmed.split_once('/').unwrap_or((trimmed, ""))
}

/// Codes that mean the server failed (as opposed to the caller's mistake), per the OpenTelemetry
/// gRPC conventions for server spans.
fn is_server_error(code: i32) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// Under a tracer sampling with `sampler`: whether a client span and a store span opened
    /// inside a request's span are real spans, the request's trace id, and the trace id the
    /// client span's callee would receive.
    fn inside_request(sampler: Sampler) -> (bool, bool, Option<String>, Option<String>) {
        // As `init` does.
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let provider = SdkTracerProvider::builder().with_sampler(sampler).build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let server = tracing::info_span!("grpc.server");
            let _entered = server.enter();
            let trace_id = current_trace_id();
            let client = client_span("mesh.features.v1.Features", "GetFeatures");
            let store = store_span("redis", "redis MGET", 1);
            let _in_client = client.enter();
            let mut metadata = tonic::metadata::MetadataMap::new();
            inject_current(&mut metadata);
            let sent = metadata
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split('-').nth(1).map(str::to_owned));
            (!client.is_none(), !store.is_none(), trace_id, sent)
        })
    }

    #[test]
    fn an_unsampled_request_opens_no_client_or_store_spans_and_keeps_its_trace_id() {
        let (client, store, trace_id, sent) = inside_request(Sampler::AlwaysOff);
        assert!(!client && !store, "no spans in an unsampled trace");
        let trace_id = trace_id.expect("an unsampled request still has a trace id");
        assert_eq!(
            sent.as_deref(),
            Some(trace_id.as_str()),
            "the callee gets the request's trace id"
        );
    }

    #[test]
    fn a_sampled_request_opens_its_client_and_store_spans() {
        let (client, store, trace_id, sent) = inside_request(Sampler::AlwaysOn);
        assert!(client && store, "a sampled trace keeps every span");
        assert_eq!(sent, trace_id);
    }

    #[test]
    fn work_outside_a_request_opens_its_spans() {
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::AlwaysOff)
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            assert!(!in_unsampled_trace());
            assert!(!store_span("postgres", "SELECT feature_values", 3).is_none());
        });
    }
}
