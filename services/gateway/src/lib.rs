//! The gateway: the mesh's only public entry (`mesh.gateway.v1.Gateway`). It owns the deadline
//! budget, validates requests against the model's manifest, fetches features, calls inference
//! across replicas, answers, and hands the record to the logger without waiting.
//!
//! # Layout
//! - [`validate`]: request features against the manifest; assembling the feature vector.
//! - [`downstream`]: clients of features, inference (replica choice) and logger.
//! - [`logship`]: the non-blocking hand-over of prediction records.
//! - [`service`]: the handlers; [`error`]: the one mapping to `tonic::Status`.

pub mod auth;
pub mod client;
pub mod error;
pub mod health;
pub mod logship;
pub mod pipeline;
pub mod service;
pub mod spool;
pub mod validate;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::gateway::gateway_server::GatewayServer;
use mesh_runtime::config::{env_list, env_millis, env_parse, env_positive, env_str, ServerConfig};
use mesh_runtime::registry::ModelRegistry;
use mesh_runtime::resilience::{BreakerConfig, BreakerMetrics, CircuitBreaker, RetryBudget};
use mesh_runtime::{serve_grpc, Bulkhead, Health, ServiceMetrics};
use tokio::net::TcpListener;

pub use error::GatewayError;

/// Configuration, from `MESH_*` environment variables (see README).
#[derive(Debug, Clone)]
pub struct Config {
    /// Address, metrics, concurrency limit and shutdown timing (`MESH_LISTEN_ADDR`,
    /// `MESH_METRICS_ADDR`, `MESH_MAX_CONCURRENCY`, `MESH_DRAIN_DELAY_MS`, `MESH_GRACE_MS`).
    pub server: ServerConfig,
    /// `MESH_FEATURES_URL`, default `http://127.0.0.1:50052`.
    pub features_url: String,
    /// `MESH_INFERENCE_URLS`, comma-separated, default `http://127.0.0.1:50053,http://127.0.0.1:50054`.
    pub inference_urls: Vec<String>,
    /// `MESH_LOGGER_URL`, default `http://127.0.0.1:50055`.
    pub logger_url: String,
    /// `MESH_MODELS_DIR`, default `models`: manifests for validation.
    pub models_dir: PathBuf,
    /// `MESH_DEFAULT_BUDGET_MS`, default 250: deadline when the caller sends no grpc-timeout.
    pub default_budget: Duration,
    /// `MESH_MAX_BUDGET_MS`, default 30000: no call runs longer, whatever the caller asks.
    pub max_budget: Duration,
    /// `MESH_DOWNSTREAM_MARGIN_MS`, default 2: kept back from each downstream budget.
    pub downstream_margin: Duration,
    /// `MESH_FEATURES_CONCURRENCY`, default 256: online calls to features in flight.
    pub features_concurrency: usize,
    /// `MESH_INFERENCE_CONCURRENCY`, default 256: online calls to inference in flight.
    pub inference_concurrency: usize,
    /// `MESH_BATCH_CONCURRENCY`, default 8: PredictBatch calls in flight (and their
    /// downstream calls, in compartments of their own).
    pub batch_concurrency: usize,
    /// `MESH_LOGGER_CONCURRENCY`, default 4: Record calls in flight.
    pub logger_concurrency: usize,
    /// `MESH_MAX_BATCH_ITEMS`, default 1000.
    pub max_batch_items: usize,
    /// `MESH_LOG_QUEUE`, default 50000 records waiting for the spool's writer thread.
    pub log_queue: usize,
    /// `MESH_SPOOL_DIR`, default `spool`: the durable spool of prediction records (one
    /// directory per gateway process; it is locked while in use).
    pub spool_dir: PathBuf,
    /// `MESH_SPOOL_MAX_BYTES`, default 1073741824 (1 GiB) of undelivered records; beyond it new
    /// records are not kept (counted, and said in the response).
    pub spool_max_bytes: u64,
    /// `MESH_SPOOL_SEGMENT_BYTES`, default 16777216: size of one spool file.
    pub spool_segment_bytes: u64,
    /// `MESH_TLS_CERT` and `MESH_TLS_KEY`: PEM files of the certificate (chain) and private key
    /// for TLS on the public gRPC port; both or neither (plaintext, for local use or behind a
    /// TLS-terminating proxy).
    pub tls: Option<TlsFiles>,
    /// Outlier detection of inference replicas (`MESH_OUTLIER_*`).
    pub outlier: client::replicas::OutlierConfig,
    /// `MESH_LOG_BATCH_SIZE`, default 500 records per Record call.
    pub log_batch_size: usize,
    /// `MESH_LOG_FLUSH_MS`, default 50.
    pub log_flush: Duration,
    /// `MESH_API_KEYS`: comma-separated `id:secret` pairs; unset or empty turns access
    /// control off (local development only).
    pub api_keys: Vec<auth::ApiKey>,
    /// `MESH_RATE_LIMIT_RPS` (default 1000) and `MESH_RATE_LIMIT_BURST` (default 2 × the
    /// rate) per API key; `MESH_RATE_LIMIT_RPS=off` disables the limit.
    pub rate_limit: Option<auth::RateLimit>,
    /// `MESH_BREAKER_FAILURES` (default 5) consecutive failures open a downstream's breaker
    /// for `MESH_BREAKER_OPEN_MS` (default 1000, doubling per failed probe up to 30 s).
    pub breaker: BreakerConfig,
    /// `MESH_RETRY_BUDGET_RATIO` (default 0.2): retries may add this share of requests…
    pub retry_ratio: f64,
    /// …plus `MESH_RETRY_BUDGET_FLOOR` (default 10) per second.
    pub retry_floor: f64,
}

impl Config {
    /// Reads the environment; fails naming the variable that does not parse.
    pub fn from_env() -> Result<Self, GatewayError> {
        let cfg = |e: mesh_runtime::config::ConfigError| GatewayError::Config(e.to_string());
        Ok(Self {
            server: ServerConfig::from_env("0.0.0.0:50051", "0.0.0.0:9101", 1024).map_err(cfg)?,
            features_url: env_str("MESH_FEATURES_URL")
                .unwrap_or_else(|| "http://127.0.0.1:50052".into()),
            inference_urls: env_list(
                "MESH_INFERENCE_URLS",
                &["http://127.0.0.1:50053", "http://127.0.0.1:50054"],
            ),
            logger_url: env_str("MESH_LOGGER_URL")
                .unwrap_or_else(|| "http://127.0.0.1:50055".into()),
            models_dir: env_str("MESH_MODELS_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("models")),
            default_budget: env_millis("MESH_DEFAULT_BUDGET_MS", Duration::from_millis(250))
                .map_err(cfg)?,
            max_budget: env_millis("MESH_MAX_BUDGET_MS", Duration::from_secs(30)).map_err(cfg)?,
            downstream_margin: env_millis("MESH_DOWNSTREAM_MARGIN_MS", Duration::from_millis(2))
                .map_err(cfg)?,
            features_concurrency: env_positive("MESH_FEATURES_CONCURRENCY", 256).map_err(cfg)?,
            inference_concurrency: env_positive("MESH_INFERENCE_CONCURRENCY", 256).map_err(cfg)?,
            batch_concurrency: env_positive("MESH_BATCH_CONCURRENCY", 8).map_err(cfg)?,
            logger_concurrency: env_positive("MESH_LOGGER_CONCURRENCY", 4).map_err(cfg)?,
            max_batch_items: env_positive("MESH_MAX_BATCH_ITEMS", 1000).map_err(cfg)?,
            log_queue: env_positive("MESH_LOG_QUEUE", 50_000).map_err(cfg)?,
            spool_dir: env_str("MESH_SPOOL_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("spool")),
            spool_max_bytes: env_positive("MESH_SPOOL_MAX_BYTES", 1 << 30).map_err(cfg)? as u64,
            spool_segment_bytes: env_positive("MESH_SPOOL_SEGMENT_BYTES", 16 << 20).map_err(cfg)?
                as u64,
            tls: match (env_str("MESH_TLS_CERT"), env_str("MESH_TLS_KEY")) {
                (None, None) => None,
                (Some(cert), Some(key)) => Some(TlsFiles {
                    cert: PathBuf::from(cert),
                    key: PathBuf::from(key),
                }),
                _ => return Err(GatewayError::Config(
                    "MESH_TLS_CERT and MESH_TLS_KEY go together: set both (PEM files) or neither"
                        .into(),
                )),
            },
            outlier: {
                let defaults = client::replicas::OutlierConfig::default();
                let percent = env_positive(
                    "MESH_OUTLIER_MAX_EJECTED_PERCENT",
                    defaults.max_ejected_percent as usize,
                )
                .map_err(cfg)?;
                if percent > 100 {
                    return Err(GatewayError::Config(format!(
                        "MESH_OUTLIER_MAX_EJECTED_PERCENT={percent}: must be at most 100"
                    )));
                }
                client::replicas::OutlierConfig {
                    consecutive_failures: env_positive(
                        "MESH_OUTLIER_CONSECUTIVE_FAILURES",
                        defaults.consecutive_failures as usize,
                    )
                    .map_err(cfg)? as u32,
                    base_ejection: env_millis(
                        "MESH_OUTLIER_BASE_EJECTION_MS",
                        defaults.base_ejection,
                    )
                    .map_err(cfg)?,
                    max_ejection: env_millis("MESH_OUTLIER_MAX_EJECTION_MS", defaults.max_ejection)
                        .map_err(cfg)?,
                    max_ejected_percent: percent as u32,
                }
            },
            log_batch_size: env_positive("MESH_LOG_BATCH_SIZE", 500).map_err(cfg)?,
            log_flush: env_millis("MESH_LOG_FLUSH_MS", Duration::from_millis(50)).map_err(cfg)?,
            breaker: BreakerConfig {
                failure_threshold: env_positive("MESH_BREAKER_FAILURES", 5).map_err(cfg)? as u32,
                open_for: env_millis("MESH_BREAKER_OPEN_MS", Duration::from_secs(1))
                    .map_err(cfg)?,
                max_open_for: Duration::from_secs(30),
            },
            retry_ratio: env_parse("MESH_RETRY_BUDGET_RATIO", 0.2).map_err(cfg)?,
            retry_floor: env_parse("MESH_RETRY_BUDGET_FLOOR", 10.0).map_err(cfg)?,
            api_keys: auth::parse_keys(&env_str("MESH_API_KEYS").unwrap_or_default())
                .map_err(GatewayError::Config)?,
            rate_limit: match env_str("MESH_RATE_LIMIT_RPS").as_deref() {
                Some("off") => None,
                _ => {
                    let per_second: f64 = env_parse("MESH_RATE_LIMIT_RPS", 1000.0).map_err(cfg)?;
                    let burst: f64 =
                        env_parse("MESH_RATE_LIMIT_BURST", per_second * 2.0).map_err(cfg)?;
                    if !(per_second > 0.0 && burst >= 1.0) {
                        return Err(GatewayError::Config(
                            "MESH_RATE_LIMIT_RPS must be > 0 and MESH_RATE_LIMIT_BURST >= 1".into(),
                        ));
                    }
                    Some(auth::RateLimit { per_second, burst })
                }
            },
        })
    }
}

/// Where the public port's TLS identity is.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// Reads both files; fails naming the one that cannot be read.
    pub fn load(&self) -> Result<tonic::transport::ServerTlsConfig, GatewayError> {
        let read = |path: &PathBuf, variable: &str| {
            std::fs::read(path)
                .map_err(|e| GatewayError::Config(format!("{variable}={}: {e}", path.display())))
        };
        let cert = read(&self.cert, "MESH_TLS_CERT")?;
        let key = read(&self.key, "MESH_TLS_KEY")?;
        for (bytes, variable, what) in [
            (&cert, "MESH_TLS_CERT", "CERTIFICATE"),
            (&key, "MESH_TLS_KEY", "PRIVATE KEY"),
        ] {
            if !String::from_utf8_lossy(bytes).contains(&format!("{what}-----")) {
                return Err(GatewayError::Config(format!(
                    "{variable}: no PEM {what} block in the file"
                )));
            }
        }
        Ok(tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key)))
    }
}

/// Serves the gateway on `listener` until `shutdown` resolves, then flushes queued records.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GatewayError> {
    let name = mesh_proto::service_names::GATEWAY;
    let tls = config.tls.as_ref().map(TlsFiles::load).transpose()?;
    let registry = Arc::new(ModelRegistry::load(&config.models_dir)?);
    let health = Health::new(&[name]).await;
    let metrics = ServiceMetrics::new().map_err(|e| GatewayError::Config(e.to_string()))?;
    let ship_metrics = logship::ShipMetrics::register(&metrics.registry)
        .map_err(|e| GatewayError::Config(e.to_string()))?;
    let bulkheads = &metrics.bulkheads;
    let compartments = |prefix: &str, features: usize, inference: usize| client::Compartments {
        features: Bulkhead::new(&format!("{prefix}features"), features, bulkheads),
        inference: Bulkhead::new(&format!("{prefix}inference"), inference, bulkheads),
    };
    let margin = config.downstream_margin;
    let breakers = BreakerMetrics::register(&metrics.registry)
        .map_err(|e| GatewayError::Config(e.to_string()))?;
    let guard = |name: &str| {
        client::Downstream::new(
            CircuitBreaker::new(name, config.breaker, &breakers),
            RetryBudget::new(config.retry_ratio as f32, config.retry_floor as u32),
        )
    };
    let channel = |url: &str, variable: &str| {
        client::call::channel(url)
            .map_err(|e| GatewayError::Config(format!("{variable}={url:?}: {e}")))
    };
    // One channel (connection) per dependency, shared by its client and the health report.
    let features_channel = channel(&config.features_url, "MESH_FEATURES_URL")?;
    let logger_channel = channel(&config.logger_url, "MESH_LOGGER_URL")?;
    let inference_channels = config
        .inference_urls
        .iter()
        .map(|url| Ok((url.clone(), channel(url, "MESH_INFERENCE_URLS")?)))
        .collect::<Result<Vec<_>, GatewayError>>()?;
    let logger = client::LoggerDownstream::new(logger_channel.clone());
    let (log, shipping) = logship::spawn(
        logger,
        Bulkhead::new("logger", config.logger_concurrency, bulkheads),
        logship::ShipConfig {
            dir: config.spool_dir.clone(),
            max_bytes: config.spool_max_bytes,
            segment_bytes: config.spool_segment_bytes,
            capacity: config.log_queue,
            batch_size: config.log_batch_size,
            flush_interval: config.log_flush,
            call_timeout: Duration::from_secs(2),
        },
        ship_metrics,
    )
    .map_err(|e| GatewayError::Config(e.to_string()))?;
    let replica_metrics = client::replicas::ReplicaMetrics::register(&metrics.registry)
        .map_err(|e| GatewayError::Config(e.to_string()))?;
    if inference_channels.is_empty() {
        return Err(GatewayError::Config(
            "MESH_INFERENCE_URLS lists no replica".into(),
        ));
    }
    let replicas =
        client::replicas::ReplicaSet::start(&inference_channels, config.outlier, replica_metrics);
    let inference = client::InferenceDownstream::new(replicas, margin, guard("inference"));
    let spool_status = log.status().clone();
    let service = service::GatewayService {
        registry,
        features: client::FeaturesDownstream::new(
            features_channel.clone(),
            margin,
            guard("features"),
        ),
        inference: inference.clone(),
        log,
        online: compartments(
            "",
            config.features_concurrency,
            config.inference_concurrency,
        ),
        batch: compartments("batch-", config.batch_concurrency, config.batch_concurrency),
        batch_calls: Bulkhead::new("batch-calls", config.batch_concurrency, bulkheads),
        max_batch_items: config.max_batch_items,
        default_budget: config.default_budget,
    };
    // The gateway's own readiness: its configuration loaded. Dependencies are judged per call.
    health.set_serving().await;
    let access = auth::AccessControl::new(
        config.api_keys.clone(),
        config.rate_limit,
        &metrics.registry,
    )
    .map_err(|e| GatewayError::Config(e.to_string()))?;
    if !access.enabled() {
        tracing::warn!("MESH_API_KEYS is not set: the gateway accepts requests without an API key");
    }
    // Health and reflection stay open (probes carry no key); only the Gateway API is guarded.
    let routes = tonic::service::Routes::new(tonic::service::interceptor::InterceptedService::new(
        GatewayServer::new(service).max_decoding_message_size(4 * 1024 * 1024),
        move |request| access.check(request),
    ));
    let mut dependencies = vec![
        health::Dependency {
            name: format!("features {}", config.features_url),
            role: health::Role::Features,
            channel: features_channel,
        },
        health::Dependency {
            name: format!("logger {}", config.logger_url),
            role: health::Role::Logger,
            channel: logger_channel,
        },
    ];
    for (url, channel) in inference_channels {
        dependencies.push(health::Dependency {
            name: format!("inference {url}"),
            role: health::Role::Inference,
            channel,
        });
    }
    let mut options = config.server.serve_options(vec![name]);
    options.health_probe = Some(health::probe(dependencies, inference, spool_status));
    options.default_budget = Some(config.default_budget);
    options.max_budget = config.max_budget;
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
            dir = %config.spool_dir.display(),
            "prediction records not all delivered within the grace period; they stay in the spool for the next start"
        );
    }
    served.map_err(|e| GatewayError::Config(e.to_string()))
}
