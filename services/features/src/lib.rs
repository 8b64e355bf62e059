//! The features service: the feature store used as a cache with a fallback (memory → Redis →
//! PostgreSQL), behind `mesh.features.v1.Features`.
//!
//! # Layout
//! - [`memory`]: the in-process TTL cache.
//! - [`store`]: the tiers, request coalescing and write-back (the Redis tier in its own module).
//! - [`service`]: the gRPC handlers; [`metrics`]: tier counters; [`error`]: status mapping.
//!
//! Start-up: the schema is migrated (retrying while PostgreSQL is unreachable); health says
//! SERVING once it is.

pub mod error;
pub mod memory;
pub mod metrics;
pub mod service;
pub mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::features::features_server::FeaturesServer;
use mesh_runtime::config::{ServerConfig, Setting, Settings};
use mesh_runtime::postgres::Migration;
use mesh_runtime::{serve_grpc, Health, ServiceMetrics};
use tokio::net::TcpListener;

pub use error::FeaturesError;

/// The schema of the feature store: one row per (entity, feature), number or category.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "feature_values",
    sql: "CREATE TABLE feature_values (
              entity_id  text NOT NULL,
              name       text NOT NULL,
              number     double precision,
              category   text,
              updated_at timestamptz NOT NULL DEFAULT now(),
              PRIMARY KEY (entity_id, name),
              CHECK ((number IS NULL) <> (category IS NULL))
          )",
}];

/// Configuration, from `MESH_*` environment variables (see README).
#[derive(Debug, Clone)]
pub struct Config {
    /// Address, metrics, concurrency limit and shutdown timing (`MESH_LISTEN_ADDR`,
    /// `MESH_METRICS_ADDR`, `MESH_MAX_CONCURRENCY`, `MESH_DRAIN_DELAY_MS`, `MESH_GRACE_MS`).
    pub server: ServerConfig,
    /// `MESH_REDIS_URL`, default `redis://127.0.0.1:6379`; `off` disables the Redis tier.
    pub redis_url: Option<String>,
    /// `MESH_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`.
    pub database_url: String,
    /// `MESH_CACHE_TTL_MS`, default 10000: memory tier TTL.
    pub cache_ttl: Duration,
    /// `MESH_CACHE_CAPACITY`, default 100000 entities.
    pub cache_capacity: usize,
    /// `MESH_REDIS_TIMEOUT_MS`, default 20.
    pub redis_timeout: Duration,
    /// `MESH_REDIS_COOLDOWN_MS`, default 1000: Redis is skipped this long after a failure.
    pub redis_cooldown: Duration,
    /// `MESH_REDIS_TTL_MS`, default 300000.
    pub redis_ttl: Duration,
    /// `MESH_DB_TIMEOUT_MS`, default 1000: one PostgreSQL load or connection attempt.
    pub db_timeout: Duration,
    /// `MESH_DB_POOL_SIZE`, default 16.
    pub db_pool_size: usize,
}

/// Every variable the features service reads, with its default: the one place defaults are
/// written.
pub const SETTINGS: &[Setting] = mesh_runtime::settings_table!(
    "0.0.0.0:50052", "0.0.0.0:9102", "512";
        Setting::value(
            "MESH_REDIS_URL",
            "redis://127.0.0.1:6379",
            "Redis; `off` disables the Redis tier",
        ),
        Setting::value(
            "MESH_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
            "PostgreSQL",
        ),
        Setting::value("MESH_CACHE_TTL_MS", "10000", "memory tier TTL"),
        Setting::value(
            "MESH_CACHE_CAPACITY",
            "100000",
            "entities in the memory tier",
        ),
        Setting::value("MESH_REDIS_TIMEOUT_MS", "20", "per Redis call"),
        Setting::value(
            "MESH_REDIS_COOLDOWN_MS",
            "1000",
            "Redis is skipped this long after a failure",
        ),
        Setting::value(
            "MESH_REDIS_TTL_MS",
            "300000",
            "TTL of entries written back to Redis",
        ),
        Setting::value(
            "MESH_DB_TIMEOUT_MS",
            "1000",
            "one PostgreSQL load or connection attempt",
        ),
        Setting::value("MESH_DB_POOL_SIZE", "16", "PostgreSQL connections"),
);

impl Config {
    /// Reads the process environment; fails naming the variable that does not parse.
    pub fn from_env() -> Result<Self, FeaturesError> {
        Self::read(&Settings::from_env(SETTINGS))
    }

    /// Reads the settings from `s`.
    pub fn read(s: &Settings<'_>) -> Result<Self, FeaturesError> {
        let cfg = |e: mesh_runtime::config::ConfigError| FeaturesError::Config(e.to_string());
        Ok(Self {
            server: ServerConfig::read(s).map_err(cfg)?,
            redis_url: s.optional("MESH_REDIS_URL"),
            database_url: s.string("MESH_DATABASE_URL"),
            cache_ttl: s.millis("MESH_CACHE_TTL_MS").map_err(cfg)?,
            cache_capacity: s.positive("MESH_CACHE_CAPACITY").map_err(cfg)?,
            redis_timeout: s.millis("MESH_REDIS_TIMEOUT_MS").map_err(cfg)?,
            redis_cooldown: s.millis("MESH_REDIS_COOLDOWN_MS").map_err(cfg)?,
            redis_ttl: s.millis("MESH_REDIS_TTL_MS").map_err(cfg)?,
            db_timeout: s.millis("MESH_DB_TIMEOUT_MS").map_err(cfg)?,
            db_pool_size: s.positive("MESH_DB_POOL_SIZE").map_err(cfg)?,
        })
    }
}

/// Serves the feature store on `listener` until `shutdown` resolves.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), FeaturesError> {
    let name = mesh_proto::service_names::FEATURES;
    let health = Health::new(&[name]).await;
    let metrics = ServiceMetrics::new().map_err(|e| FeaturesError::Config(e.to_string()))?;
    let feature_metrics = metrics::FeatureMetrics::register(&metrics.registry)
        .map_err(|e| FeaturesError::Config(e.to_string()))?;

    let db =
        mesh_runtime::postgres::pool(&config.database_url, config.db_pool_size, config.db_timeout)
            .map_err(|e| FeaturesError::Config(e.to_string()))?;
    let redis = match &config.redis_url {
        Some(url) => {
            let client = redis::Client::open(url.as_str())
                .map_err(|e| FeaturesError::Config(format!("MESH_REDIS_URL: {e}")))?;
            let manager_config = redis::aio::ConnectionManagerConfig::new()
                .set_response_timeout(Some(config.redis_timeout))
                .set_connection_timeout(Some(config.redis_timeout.max(Duration::from_millis(100))))
                .set_number_of_retries(1);
            Some(
                redis::aio::ConnectionManager::new_lazy_with_config(client, manager_config)
                    .map_err(|e| FeaturesError::Config(format!("MESH_REDIS_URL: {e}")))?,
            )
        }
        None => None,
    };
    let store = Arc::new(store::FeatureStore::new(
        store::StoreConfig {
            redis_timeout: config.redis_timeout,
            redis_cooldown: config.redis_cooldown,
            redis_ttl: config.redis_ttl,
            db_timeout: config.db_timeout,
        },
        memory::FeatureCache::new(config.cache_ttl, config.cache_capacity),
        redis,
        db.clone(),
        feature_metrics,
    ));

    mesh_runtime::postgres::migrate_then_serve(db.clone(), "features", MIGRATIONS, health.clone());

    let routes =
        tonic::service::Routes::new(FeaturesServer::new(service::FeaturesService::new(store)));
    let options = config.server.serve_options(vec![name]);
    serve_grpc(
        routes,
        options,
        health,
        metrics,
        listener,
        metrics_listener,
        shutdown,
    )
    .await
    .map_err(|e| FeaturesError::Config(e.to_string()))
}
