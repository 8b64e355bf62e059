//! Telemetry shared by every mesh service: structured logs that carry the trace id,
//! OpenTelemetry spans exported over OTLP/gRPC (Jaeger ingests OTLP natively), W3C trace
//! context in gRPC metadata, and Prometheus metrics over HTTP.
//!
//! # Layout
//! - [`init`]: installs the global `tracing` subscriber and the OpenTelemetry tracer provider.
//! - [`logs`]: the log layer: one line per event, trace id first, no per-span formatting.
//! - [`propagation`]: W3C `traceparent` into and out of gRPC metadata; server and client spans.
//! - [`metrics`]: per-service Prometheus registry, RPC metrics, and the `/metrics` HTTP endpoint.
//! - [`process`]: the process collector (CPU, memory, fds, threads) and the build-info gauge.

pub mod logs;
pub mod metrics;
pub mod process;
pub mod propagation;

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;

/// How a service reports what it does.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `service.name` of exported spans.
    pub service_name: String,
    /// OTLP/gRPC collector endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`), e.g. `http://jaeger:4317`.
    /// `None` keeps spans in-process: trace ids still exist and are logged, nothing is exported.
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces sampled (`OTEL_TRACES_SAMPLER_ARG`); a sampled parent is always
    /// followed, so one trace is whole across services.
    pub sample_ratio: f64,
    /// `json` (default, for log shippers) or `text` (for people).
    pub log_format: LogFormat,
    /// Log filter when `RUST_LOG` is unset, e.g. `info`.
    pub default_log_filter: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line, with the current span's fields (trace id included).
    Json,
    /// Human-readable lines.
    Text,
}

impl TelemetryConfig {
    /// Reads the standard OpenTelemetry variables plus `MESH_LOG_FORMAT`.
    pub fn from_env(default_service_name: &str) -> Result<Self, TelemetryError> {
        let service_name = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| default_service_name.to_owned());
        let otlp_endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
            .ok()
            .filter(|s| !s.trim().is_empty());
        let sample_ratio = match std::env::var("OTEL_TRACES_SAMPLER_ARG") {
            Ok(raw) if !raw.trim().is_empty() => match raw.trim().parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => r,
                _ => {
                    return Err(TelemetryError::Config(format!(
                        "OTEL_TRACES_SAMPLER_ARG must be a number between 0 and 1, got {raw:?}"
                    )))
                }
            },
            _ => DEFAULT_SAMPLE_RATIO,
        };
        let log_format = match std::env::var("MESH_LOG_FORMAT").as_deref() {
            Ok("text") => LogFormat::Text,
            Ok("json") | Err(_) => LogFormat::Json,
            Ok(other) => {
                return Err(TelemetryError::Config(format!(
                    "MESH_LOG_FORMAT must be json or text, got {other:?}"
                )))
            }
        };
        Ok(Self {
            service_name,
            otlp_endpoint,
            sample_ratio,
            log_format,
            default_log_filter: "info".to_owned(),
        })
    }
}

/// Share of new traces sampled when `OTEL_TRACES_SAMPLER_ARG` is unset: enough to find a slow
/// request in Jaeger, cheap enough to leave on under load.
pub const DEFAULT_SAMPLE_RATIO: f64 = 0.05;

/// What can go wrong setting telemetry up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A setting has a value that cannot be used.
    #[error("telemetry configuration: {0}")]
    Config(String),
    /// The OTLP exporter could not be built.
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    /// Binding the metrics endpoint failed.
    #[error("metrics endpoint: {0}")]
    Metrics(#[from] std::io::Error),
}

/// Flushes and shuts the tracer provider down when dropped, so the last spans reach the collector.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown_with_timeout(Duration::from_secs(3));
        }
    }
}

static INSTALLED: OnceLock<()> = OnceLock::new();

/// Installs logging and tracing for this process. Call once, early in `main`, inside the tokio
/// runtime (the batch exporter runs on it). Later calls (tests running several services in one
/// process) return a guard that does nothing.
pub fn init(config: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    if INSTALLED.get().is_some() {
        return Ok(TelemetryGuard { provider: None });
    }
    let provider = tracer_provider(config)?;
    let tracer = provider.tracer("mesh");
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    opentelemetry::global::set_tracer_provider(provider.clone());

    // RUST_LOG filters log lines only; spans are always recorded at info so that a quiet log
    // level never breaks tracing (or the trace ids in responses and the prediction log).
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(&config.default_log_filter));
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Per span, the layer's defaults add source location, thread and target attributes,
        // read the clock on every enter and exit (busy/idle time) and push an OpenTelemetry
        // context per enter: allocations and work on every request, sampled or not, for
        // attributes nobody queries (the trace tree and timings stay). Nothing here reads
        // `opentelemetry::Context::current()`; trace context comes from the tracing span.
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let installed = tracing_subscriber::registry()
        .with(otel)
        .with(logs::layer(config.log_format, filter, std::io::stdout))
        .try_init();
    if installed.is_err() {
        // Someone else owns the global subscriber (a test harness): keep theirs.
        return Ok(TelemetryGuard { provider: None });
    }
    let _ = INSTALLED.set(());
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}

fn tracer_provider(config: &TelemetryConfig) -> Result<SdkTracerProvider, TelemetryError> {
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio)));
    let mut builder = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(sampler);
    if let Some(endpoint) = &config.otlp_endpoint {
        use opentelemetry_otlp::WithExportConfig as _;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}
