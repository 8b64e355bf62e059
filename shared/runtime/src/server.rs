//! The serving scaffold every mesh service uses: one place that assembles the tower stack,
//! health, reflection and the metrics endpoint, and shuts down in a bounded, orderly way.
//!
//! Shutdown: health turns NOT_SERVING at once (load balancers and probes stop sending), the
//! server keeps answering for `drain_delay`, then stops accepting and waits for in-flight calls
//! for at most `grace`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use mesh_telemetry::metrics::{KnownMethods, RpcMetrics, RpcMetricsLayer};
use mesh_telemetry::propagation::ServerTraceLayer;
use prometheus::Registry;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

use crate::bulkhead::{Bulkhead, BulkheadLayer, BulkheadMetrics};
use crate::connections::{ActivityLayer, ConnectionLimits, ConnectionMetrics};
use crate::deadline::DeadlineLayer;
use crate::internal::{InternalAuthLayer, InternalToken};

/// Most bytes of metadata (headers) one call may carry.
pub const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// How a service is served.
#[derive(Clone)]
pub struct ServeOptions {
    /// The services this process exposes (reflection lists them, health reports them).
    pub services: Vec<&'static str>,
    /// Concurrent RPCs admitted by the server's bulkhead; more are shed.
    pub max_concurrency: usize,
    /// Budget for calls that arrive without `grpc-timeout`.
    pub default_budget: Option<Duration>,
    /// No call runs longer than this, whatever the caller asked.
    pub max_budget: Duration,
    /// How long to keep answering after health turned NOT_SERVING.
    pub drain_delay: Duration,
    /// How long to wait for in-flight calls once accepting stopped.
    pub grace: Duration,
    /// The detailed `/health` report on the metrics port, for services that have one.
    pub health_probe: Option<mesh_telemetry::metrics::HealthProbe>,
    /// TLS (rustls) on the gRPC port; plaintext when `None`.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// What connections the server keeps (see [`crate::connections`]).
    pub connections: ConnectionLimits,
    /// The token every call but health's must present; `None` for a public port.
    pub internal_token: Option<InternalToken>,
}

impl ServeOptions {
    /// Options for `services` with the mesh's defaults: 256 concurrent calls, no default budget,
    /// 30 s maximum, 1 s drain delay, 10 s grace, the default connection limits, no token.
    pub fn new(services: Vec<&'static str>) -> Self {
        Self {
            services,
            max_concurrency: 256,
            default_budget: None,
            max_budget: Duration::from_secs(30),
            drain_delay: Duration::from_secs(1),
            grace: Duration::from_secs(10),
            health_probe: None,
            tls: None,
            connections: ConnectionLimits {
                max_total: 4096,
                max_per_peer: 512,
                first_request_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(300),
                keepalive: Duration::from_secs(20),
                max_streams: 256,
            },
            internal_token: None,
        }
    }
}

/// A service's Prometheus registry with the metrics every service has.
#[derive(Clone)]
pub struct ServiceMetrics {
    /// The registry `/metrics` serves; services register their own metrics in it too.
    pub registry: Arc<Registry>,
    /// Per-RPC requests, errors, latency.
    pub rpc: RpcMetrics,
    /// In-flight and shed per bulkhead.
    pub bulkheads: BulkheadMetrics,
    /// Open, refused and closed connections.
    pub connections: ConnectionMetrics,
}

impl ServiceMetrics {
    /// A fresh registry for `service` (e.g. `gateway`) with the process, build-info, RPC,
    /// bulkhead and connection metrics registered.
    pub fn new(service: &str) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        mesh_telemetry::process::register(&registry, service)?;
        let rpc = RpcMetrics::register(&registry)?;
        let bulkheads = BulkheadMetrics::register(&registry)?;
        let connections = ConnectionMetrics::register(&registry)?;
        Ok(Self {
            registry: Arc::new(registry),
            rpc,
            bulkheads,
            connections,
        })
    }
}

/// The `grpc.health.v1` status of a service, shared between the server and whatever decides
/// readiness (warm-up, migrations, drain).
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    services: Vec<&'static str>,
}

impl Health {
    /// Health for `services`, NOT_SERVING until [`Health::set_serving`].
    pub async fn new(services: &[&'static str]) -> Self {
        let reporter = HealthReporter::new();
        let health = Self {
            reporter,
            services: services.to_vec(),
        };
        health.set_all(ServingStatus::NotServing).await;
        health
    }

    /// Reports SERVING for the server as a whole (`""`) and for each service.
    pub async fn set_serving(&self) {
        self.set_all(ServingStatus::Serving).await;
    }

    /// Reports NOT_SERVING for the server as a whole and for each service.
    pub async fn set_not_serving(&self) {
        self.set_all(ServingStatus::NotServing).await;
    }

    async fn set_all(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        for service in &self.services {
            self.reporter.set_service_status(*service, status).await;
        }
    }
}

/// Failure to serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Reflection could not be built from the descriptor set.
    #[error("reflection: {0}")]
    Reflection(String),
    /// The TLS certificate or key cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `routes` on `listener` (and `/metrics` on `metrics_listener`) until `shutdown`
/// resolves, then drains as the module docs describe.
pub async fn serve_grpc(
    routes: Routes,
    options: ServeOptions,
    health: Health,
    metrics: ServiceMetrics,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let routes = with_health_and_reflection(routes, &options.services, &health)?;

    let bulkhead = Bulkhead::new("server", options.max_concurrency, &metrics.bulkheads);
    let stack = tower::ServiceBuilder::new()
        // Outermost: a call is in flight on its connection until its response body ends, so a
        // busy connection is never closed as idle.
        .layer(ActivityLayer)
        // One span per RPC, parented on the caller's trace, so all below is inside it.
        .layer(ServerTraceLayer)
        // Count every RPC, including those refused, shed or timed out below.
        .layer(RpcMetricsLayer::new(
            metrics.rpc.clone(),
            known_methods(&options.services),
        ))
        // Internal services: only callers with the mesh's token get further.
        .option_layer(options.internal_token.clone().map(InternalAuthLayer::new))
        // Refuse expired work before it takes a bulkhead place; bound the rest by its deadline.
        .layer(DeadlineLayer::new(
            options.default_budget,
            options.max_budget,
        ))
        // Shed beyond the concurrency limit instead of queueing without bound.
        .layer(BulkheadLayer::new(bulkhead))
        .into_inner();

    let local = listener.local_addr().ok();
    let limits = options.connections;
    let incoming = crate::connections::accept(listener, limits, metrics.connections.clone());
    let (stop_accepting, stop_signal) = tokio::sync::oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_streams)
        // Dead peers are found by pings, not by a write that never completes.
        .http2_keepalive_interval(Some(limits.keepalive))
        .http2_keepalive_timeout(Some(limits.keepalive))
        // gRPC metadata is small; hyper's default allows megabytes per call.
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES);
    if let Some(tls) = options.tls.clone() {
        builder = builder
            .tls_config(tls)
            .map_err(|e| ServeError::Tls(e.to_string()))?;
    }
    let server = builder
        .layer(stack)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop_signal.await;
        });

    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(metrics_listener) = metrics_listener {
        tokio::spawn(mesh_telemetry::metrics::serve_metrics(
            metrics_listener,
            metrics.registry.clone(),
            options.health_probe.clone(),
            async {
                let _ = metrics_stopped.await;
            },
        ));
    }
    tracing::info!(addr = ?local, services = ?options.services, "serving");

    let result = drain(server, shutdown, &health, &options, stop_accepting).await;
    let _ = metrics_stop.send(());
    tracing::info!("stopped");
    result.map_err(ServeError::from)
}

/// The paths this server serves: every method of `services` (from the descriptor sets), of
/// health, and of reflection. The RPC metrics label only these; any other path is `unknown`.
pub fn known_methods(services: &[&'static str]) -> KnownMethods {
    use prost::Message as _;
    let mut paths = vec![
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".to_owned(),
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo".to_owned(),
    ];
    for set in [
        mesh_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in &set.file {
            for service in &file.service {
                let full = format!("{}.{}", file.package(), service.name());
                if full != "grpc.health.v1.Health" && !services.contains(&full.as_str()) {
                    continue;
                }
                for method in &service.method {
                    paths.push(format!("/{full}/{}", method.name()));
                }
            }
        }
    }
    KnownMethods::new(paths)
}

/// `routes` with `grpc.health.v1.Health` and server reflection (v1 and v1alpha) added.
fn with_health_and_reflection(
    routes: Routes,
    services: &[&'static str],
    health: &Health,
) -> Result<Routes, ServeError> {
    let reflection = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(mesh_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        for service in services {
            builder = builder.with_service_name(*service);
        }
        builder
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    // grpcurl 1.8 and Python's grpcio-reflection only speak v1alpha.
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let health_service = tonic_health::pb::health_server::HealthServer::new(
        HealthService::from_health_reporter(health.reporter.clone()),
    );
    Ok(routes
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha))
}

/// Runs `server` until `shutdown` resolves (or the transport fails by itself), then drains:
/// NOT_SERVING, answering on for the drain delay, no new connections, in-flight calls given
/// the grace period.
async fn drain(
    server: impl Future<Output = Result<(), tonic::transport::Error>>,
    shutdown: impl Future<Output = ()>,
    health: &Health,
    options: &ServeOptions,
    stop_accepting: tokio::sync::oneshot::Sender<()>,
) -> Result<(), tonic::transport::Error> {
    tokio::pin!(server);
    tokio::pin!(shutdown);
    // Serve until told to stop (or the transport fails by itself).
    tokio::select! {
        result = &mut server => return result,
        _ = &mut shutdown => {}
    }
    tracing::info!(drain_delay = ?options.drain_delay, "shutdown requested: NOT_SERVING, draining");
    health.set_not_serving().await;
    // Keep answering while probes and balancers notice NOT_SERVING.
    tokio::select! {
        result = &mut server => return result,
        _ = tokio::time::sleep(options.drain_delay) => {}
    }
    let _ = stop_accepting.send(());
    match tokio::time::timeout(options.grace, &mut server).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(grace = ?options.grace, "grace period over; abandoning in-flight calls");
            Ok(())
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (Kubernetes, docker stop): the start of a drain.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    // Whichever signal comes first starts the drain.
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

/// An address that could not be bound, named by the variable that configured it.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind {variable}={addr}: {source}")]
pub struct BindError {
    /// The configuring variable.
    pub variable: &'static str,
    /// The address.
    pub addr: String,
    /// Why.
    pub source: std::io::Error,
}

/// Binds the gRPC listener (`MESH_LISTEN_ADDR`) and, if configured, the metrics listener
/// (`MESH_METRICS_ADDR`), before anything is served, so a taken port fails start-up clearly.
pub async fn bind(
    listen_addr: &str,
    metrics_addr: Option<&str>,
) -> Result<(TcpListener, Option<TcpListener>), BindError> {
    let listener = TcpListener::bind(listen_addr)
        .await
        .map_err(|source| BindError {
            variable: "MESH_LISTEN_ADDR",
            addr: listen_addr.to_owned(),
            source,
        })?;
    let metrics = match metrics_addr {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| BindError {
            variable: "MESH_METRICS_ADDR",
            addr: addr.to_owned(),
            source,
        })?),
        None => None,
    };
    Ok((listener, metrics))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_are_metric_labels() {
        let known = known_methods(&[mesh_proto::service_names::FEATURES]);
        for served in [
            "/mesh.features.v1.Features/GetFeatures",
            "/mesh.features.v1.Features/PutFeatures",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(known.label(served), served);
        }
        for invented in [
            "/mesh.features.v1.Features/Invented",
            "/mesh.gateway.v1.Gateway/Predict",
            "/x/y",
            "",
            "/mesh.features.v1.Features/GetFeatures/",
        ] {
            assert_eq!(known.label(invented), "unknown", "{invented:?}");
        }
    }
}
