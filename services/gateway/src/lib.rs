//! The gateway: the mesh's only public entry (`mesh.gateway.v1.Gateway`). It owns the deadline
//! budget, validates requests against the model's manifest, fetches features, calls inference
//! across replicas, writes each prediction's record to its durable spool and answers; a shipper
//! delivers the spool to the logger.
//!
//! # Layout
//! - [`config`]: settings in sections, every default in one table.
//! - [`auth`]: API keys and per-key rate limits.
//! - [`service`]: the handlers; [`pipeline`]: the one prediction pipeline both RPCs run;
//!   [`prediction_metrics`]: predictions by model version, tier and outcome.
//! - [`validate`]: request features against the manifest; assembling the feature vector.
//! - [`client`]: the outbound stack (deadline share → retry → breaker → balance → traced call)
//!   and one client per downstream.
//! - [`spool`]: the on-disk spool of prediction records; [`logship`]: writing to it and
//!   shipping it to the logger.
//! - [`lifecycle`]: the version for each request (live registry, sticky rollouts, readiness)
//!   and the admin API.
//! - [`health`]: the `/health` report; [`error`]: request errors (one mapping to
//!   `tonic::Status`) and startup errors.

pub mod auth;
pub mod client;
pub mod coalesce;
pub mod config;
pub mod error;
pub mod health;
pub mod lifecycle;
pub mod logship;
pub mod pipeline;
pub mod prediction_metrics;
pub mod service;
pub mod spool;
pub mod validate;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::admin::model_admin_server::ModelAdminServer;
use mesh_proto::gateway::gateway_server::GatewayServer;
use mesh_runtime::internal::{InternalChannel, InternalToken};
use mesh_runtime::registry::ModelRegistry;
use mesh_runtime::resilience::{BreakerMetrics, CircuitBreaker, RetryBudget};
use mesh_runtime::{serve_grpc, Bulkhead, Health, ServiceMetrics};
use tokio::net::TcpListener;

pub use config::{Config, TlsFiles};
pub use error::{GatewayError, StartupError};

/// Longest a `Record` call to the logger may take.
const RECORD_TIMEOUT: Duration = Duration::from_secs(2);

/// One channel (connection) per dependency, shared by its client and the health report; the
/// inference replicas get theirs as discovery finds them, through `connect`.
struct Channels {
    features: InternalChannel,
    logger: InternalChannel,
    connect: client::discovery::Connect,
}

impl Channels {
    fn connect(
        downstreams: &config::Downstreams,
        token: Option<&InternalToken>,
    ) -> Result<Self, StartupError> {
        let token = token.ok_or_else(|| {
            StartupError::Config(
                "MESH_INTERNAL_TOKEN is not set: the gateway presents it to features, inference \
                 and the logger, which answer no one else (`make up` generates one in \
                 .run/internal-token)"
                    .into(),
            )
        })?;
        let channel = |url: &str, variable: &str| {
            client::call::channel(url, token)
                .map_err(|e| StartupError::Config(format!("{variable}={url:?}: {e}")))
        };
        // Static entries are checked here, before anything binds; resolved addresses always
        // make valid URLs.
        for target in client::discovery::parse_targets(&downstreams.inference_urls)
            .map_err(|e| StartupError::Config(format!("MESH_INFERENCE_URLS {e}")))?
        {
            if let client::discovery::Target::Static(url) = target {
                channel(&url, "MESH_INFERENCE_URLS")?;
            }
        }
        let token = token.clone();
        Ok(Self {
            features: channel(&downstreams.features_url, "MESH_FEATURES_URL")?,
            logger: channel(&downstreams.logger_url, "MESH_LOGGER_URL")?,
            connect: Arc::new(move |url: &str| {
                client::call::channel(url, &token).map_err(|e| e.to_string())
            }),
        })
    }

    /// The dependencies the `/health` report checks besides the inference replicas (which
    /// it takes from the replica set at each check).
    fn dependencies(&self, downstreams: &config::Downstreams) -> Vec<health::Dependency> {
        vec![
            health::Dependency {
                name: format!("features {}", downstreams.features_url),
                role: health::Role::Features,
                channel: self.features.clone(),
            },
            health::Dependency {
                name: format!("logger {}", downstreams.logger_url),
                role: health::Role::Logger,
                channel: self.logger.clone(),
            },
        ]
    }
}

/// The inference replicas and their catalog polls, with the replicas found so far, and
/// discovery following the DNS entries for as long as the replica set lives.
async fn discover_replicas(
    config: &Config,
    metrics: &ServiceMetrics,
    channels: &Channels,
) -> Result<
    (
        client::replicas::ReplicaHandle,
        Arc<lifecycle::readiness::ReplicaVersions>,
    ),
    StartupError,
> {
    let downstreams = &config.downstreams;
    let versions = lifecycle::readiness::ReplicaVersions::start(&metrics.registry)?;
    let replicas = client::replicas::ReplicaSet::start(
        config.resilience.outlier,
        client::replicas::ReplicaMetrics::register(&metrics.registry)?,
    );
    let targets = client::discovery::parse_targets(&downstreams.inference_urls)
        .map_err(|e| StartupError::Config(format!("MESH_INFERENCE_URLS {e}")))?;
    let mut discovery = client::discovery::Discovery::new(
        targets,
        downstreams.resolver.clone(),
        client::discovery::DiscoveryMetrics::register(&metrics.registry)?,
    );
    let membership = client::discovery::Membership {
        replicas: replicas.set().clone(),
        versions: versions.clone(),
        connect: channels.connect.clone(),
    };
    // The first answer before serving, so the first requests have replicas; a name that does
    // not resolve yet (its pods still starting) is retried every interval.
    membership.apply(&discovery.endpoints().await);
    if discovery.has_names() {
        replicas.hold(tokio::spawn(client::discovery::follow(
            discovery,
            membership,
            downstreams.discovery_interval,
        )));
    }
    Ok((replicas, versions))
}

/// What [`wire`] builds.
struct Wired {
    service: Arc<service::GatewayService>,
    shipping: tokio::task::JoinHandle<()>,
    admin: lifecycle::admin::AdminService,
}

/// The live registry, if configured: its store (for the admin API) and a follower of its state.
fn follow_registry(
    config: &Config,
    disk: &ModelRegistry,
) -> Result<Option<(mesh_registry::RegistryStore, mesh_registry::Following)>, StartupError> {
    let settings = &config.lifecycle.registry;
    let Some(url) = settings.url.clone() else {
        return Ok(None);
    };
    let pool = mesh_runtime::postgres::pool(&url, 2, Duration::from_secs(2))?;
    let store = mesh_registry::RegistryStore::new(pool, Duration::from_secs(2));
    let seeds: Vec<(String, String)> = disk
        .models
        .values()
        .map(|m| (m.name.clone(), m.production.clone()))
        .collect();
    let preparing = store.clone();
    tokio::spawn(async move { mesh_registry::store::prepare(&preparing, &seeds).await });
    let following = mesh_registry::follow(store.clone(), url, settings.interval);
    Ok(Some((store, following)))
}

/// The spool and the task shipping it to the logger.
fn spawn_shipping(
    config: &Config,
    metrics: &ServiceMetrics,
    channels: &Channels,
) -> Result<(logship::LogShipper, tokio::task::JoinHandle<()>), StartupError> {
    let spool = &config.spool;
    logship::spawn(
        client::LoggerDownstream::new(channels.logger.clone()),
        Bulkhead::new("logger", config.bulkheads.logger, &metrics.bulkheads),
        logship::ShipConfig {
            dir: spool.dir.clone(),
            max_bytes: spool.max_bytes,
            segment_bytes: spool.segment_bytes,
            capacity: spool.queue,
            batch_size: spool.batch_size,
            flush_interval: spool.flush,
            call_timeout: RECORD_TIMEOUT,
            degraded_after: spool.delivery_degraded_after,
        },
        logship::ShipMetrics::register(&metrics.registry)?,
    )
    .map_err(|error| StartupError::Io {
        what: format!("spool {} (MESH_SPOOL_DIR)", spool.dir.display()),
        error,
    })
}

/// The handlers wired to their downstreams: the gateway's dependency graph, in one place.
async fn wire(
    config: &Config,
    metrics: &ServiceMetrics,
    channels: &Channels,
) -> Result<Wired, StartupError> {
    let disk = Arc::new(ModelRegistry::load(&config.models_dir)?);
    let (store, following) = follow_registry(config, &disk)?.unzip();
    let (replicas, versions) = discover_replicas(config, metrics, channels).await?;
    let router = Arc::new(lifecycle::routing::Router::new(
        config.models_dir.clone(),
        disk,
        following,
        versions.clone(),
        &metrics.registry,
    )?);
    let bulkheads = &metrics.bulkheads;
    let compartments = |prefix: &str, features: usize, inference: usize| client::Compartments {
        features: Bulkhead::new(&format!("{prefix}features"), features, bulkheads),
        inference: Bulkhead::new(&format!("{prefix}inference"), inference, bulkheads),
    };
    let breakers = BreakerMetrics::register(&metrics.registry)?;
    let resilience = &config.resilience;
    let downstream = |name: &str| {
        client::Downstream::new(
            CircuitBreaker::new(name, resilience.breaker, &breakers),
            RetryBudget::new(resilience.retry_ratio, resilience.retry_floor),
        )
    };
    let margin = config.budgets.downstream_margin;
    let (log, shipping) = spawn_shipping(config, metrics, channels)?;
    let limits = &config.bulkheads;
    let inference =
        client::InferenceDownstream::new(replicas, versions, margin, downstream("inference"));
    let parts = lifecycle_parts(config, metrics, store, &router, &inference, &log)?;
    let coalescer = coalesce::Coalescer::new(
        limits.coalesce,
        limits.coalesce_runs,
        limits.coalesce_stall,
        &metrics.registry,
    )?;
    let predictions = prediction_metrics::PredictionMetrics::register(&metrics.registry)?;
    let service = Arc::new_cyclic(|me| service::GatewayService {
        router,
        features: client::FeaturesDownstream::new(
            channels.features.clone(),
            margin,
            downstream("features"),
        ),
        inference,
        shadow: parts.shadow,
        canary: parts.canary,
        _judging: parts.judging,
        _trimming: parts.trimming,
        drift: parts.drift,
        _exporting: parts.exporting,
        log,
        predictions,
        online: compartments("", limits.features, limits.inference),
        batch: compartments("batch-", limits.batch, limits.batch),
        batch_calls: Bulkhead::new("batch-calls", limits.batch, bulkheads),
        max_batch_items: limits.max_batch_items,
        default_budget: config.budgets.default,
        coalescer,
        me: me.clone(),
    });
    Ok(Wired {
        service,
        shipping,
        admin: parts.admin,
    })
}

/// The model lifecycle's parts of the gateway: shadow scoring, drift, the canary judge, the
/// audit log's retention and the admin API.
struct LifecycleParts {
    shadow: Arc<lifecycle::shadow::Shadow>,
    drift: Arc<lifecycle::drift::Drift>,
    exporting: lifecycle::drift::Exporting,
    canary: Arc<lifecycle::canary::Canary>,
    judging: Option<lifecycle::canary::Judging>,
    trimming: Option<mesh_registry::retention::AuditRetention>,
    admin: lifecycle::admin::AdminService,
}

fn lifecycle_parts(
    config: &Config,
    metrics: &ServiceMetrics,
    store: Option<mesh_registry::RegistryStore>,
    router: &Arc<lifecycle::routing::Router>,
    inference: &client::InferenceDownstream,
    log: &logship::LogShipper,
) -> Result<LifecycleParts, StartupError> {
    let limits = &config.bulkheads;
    let shadow = lifecycle::shadow::Shadow::new(
        inference.clone(),
        log.clone(),
        Bulkhead::new("shadow", limits.shadow, &metrics.bulkheads),
        limits.shadow_queue,
        &metrics.registry,
    )?;
    let drift = lifecycle::drift::Drift::new(&config.models_dir, &metrics.registry)?;
    let exporting = lifecycle::drift::spawn(drift.clone());
    let canary =
        lifecycle::canary::Canary::new(&metrics.registry, config.lifecycle.canary_latency_slack)?;
    let judging = store
        .clone()
        .map(|store| lifecycle::canary::spawn(canary.clone(), router.clone(), store));
    let trimming = store
        .clone()
        .map(|store| mesh_registry::retention::spawn(store, config.lifecycle.audit_retention_days));
    let admin = lifecycle::admin::AdminService::new(
        config.lifecycle.admin_keys.clone(),
        store,
        router.clone(),
        shadow.clone(),
    );
    Ok(LifecycleParts {
        shadow,
        drift,
        exporting,
        canary,
        judging,
        trimming,
        admin,
    })
}

/// Serves the gateway on `listener` until `shutdown` resolves, then delivers what the spool
/// holds within the grace period.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartupError> {
    let name = mesh_proto::service_names::GATEWAY;
    let tls = config.access.tls.as_ref().map(TlsFiles::load).transpose()?;
    let health = Health::new(&[name]).await;
    let metrics = ServiceMetrics::new("gateway")?;
    let channels = Channels::connect(&config.downstreams, config.server.internal_token.as_ref())?;
    let Wired {
        service,
        shipping,
        admin,
    } = wire(&config, &metrics, &channels).await?;
    let probe = health::probe(
        channels.dependencies(&config.downstreams),
        service.inference.clone(),
        service.log.status().clone(),
    );
    let access = auth::AccessControl::new(
        config.access.api_keys.clone(),
        config.access.rate_limit,
        &metrics.registry,
    )?;
    if !access.enabled() {
        tracing::warn!("MESH_API_KEYS is not set: the gateway accepts requests without an API key");
    }
    // Health and reflection stay open (probes carry no key); only the Gateway API is guarded.
    let routes = tonic::service::Routes::new(tonic::service::interceptor::InterceptedService::new(
        GatewayServer::from_arc(service).max_decoding_message_size(4 * 1024 * 1024),
        move |request| access.check(request),
    ))
    // The admin API checks its own keys (MESH_ADMIN_KEYS), never the API keys.
    .add_service(ModelAdminServer::new(admin));
    // The gateway's own readiness: its configuration loaded. Dependencies are judged per call.
    health.set_serving().await;
    let mut options = config
        .server
        .serve_options(vec![name, mesh_proto::service_names::ADMIN]);
    options.health_probe = Some(probe);
    options.default_budget = Some(config.budgets.default);
    options.max_budget = config.budgets.max;
    options.tls = tls;
    let served = serve_grpc(
        routes,
        options,
        health,
        metrics,
        listener,
        metrics_listener,
        shutdown,
    )
    .await;
    // Handlers are gone, and with them the spool's writers: deliver what the spool holds,
    // within the grace period. What is left stays on disk for the next start.
    let abort = shipping.abort_handle();
    if tokio::time::timeout(config.server.grace, shipping)
        .await
        .is_err()
    {
        abort.abort();
        tracing::warn!(
            dir = %config.spool.dir.display(),
            "prediction records not all delivered within the grace period; they stay in the spool for the next start"
        );
    }
    Ok(served?)
}
