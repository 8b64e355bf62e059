//! The features service: the feature store used as a cache with a fallback (memory → Redis →
//! PostgreSQL), behind `mesh.features.v1.Features`.
//!
//! # Layout
//! - [`config`]: settings in sections, every default in one table.
//! - [`memory`]: the in-process TTL cache (known entities and known-absent ids, bounded apart).
//! - [`store`]: the tiers, request coalescing, write-back, and how a load racing a write is kept
//!   from filling a cache with old values (the Redis and PostgreSQL tiers in their own modules).
//! - [`validate`]: limits on what a caller declares, and the float32 range of numbers.
//! - [`service`]: the gRPC handlers; [`metrics`]: tier counters; [`error`]: status mapping.
//!
//! Start-up: the schema is migrated (retrying while PostgreSQL is unreachable); health says
//! SERVING once it is. The materializer (see `store`) copies PostgreSQL's entities into Redis in
//! the background meanwhile and keeps them there.

pub mod config;
pub mod error;
pub mod memory;
pub mod metrics;
pub mod service;
pub mod store;
pub mod validate;

use std::future::Future;
use std::sync::Arc;

use mesh_proto::features::features_server::FeaturesServer;
use mesh_runtime::postgres::Migration;
use mesh_runtime::{serve_grpc, Health, ServiceMetrics, StartupError};
use tokio::net::TcpListener;

pub use config::{Config, SETTINGS};
pub use error::FeaturesError;

/// The schema of the feature store: one row per (entity, feature), number or category; one
/// version per entity, bumped by every write (Redis keeps only newer versions, see [`store`]).
pub const MIGRATIONS: &[Migration] = &[
    Migration {
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
    },
    Migration {
        version: 2,
        name: "feature_entity_versions",
        sql: "CREATE TABLE feature_entity_versions (
              entity_id text PRIMARY KEY,
              version   bigint NOT NULL
          );
          INSERT INTO feature_entity_versions (entity_id, version)
              SELECT DISTINCT entity_id, 1 FROM feature_values",
    },
];

/// Serves the feature store on `listener` until `shutdown` resolves.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartupError> {
    let name = mesh_proto::service_names::FEATURES;
    let health = Health::new(&[name]).await;
    let metrics = ServiceMetrics::new("features")?;
    let feature_metrics = metrics::FeatureMetrics::register(&metrics.registry)?;

    let database = &config.database;
    let db = mesh_runtime::postgres::pool(&database.url, database.pool_size, database.timeout)?;
    let redis = store::RedisLink::from_settings(&config.redis).map_err(StartupError::Config)?;
    let store = Arc::new(store::FeatureStore::new(
        config.redis.clone(),
        database.timeout,
        memory::FeatureCache::new(
            config.cache.ttl,
            config.cache.capacity,
            config.cache.negative_capacity,
        ),
        redis,
        db.clone(),
        feature_metrics,
    ));

    mesh_runtime::postgres::migrate_then_serve(db.clone(), "features", MIGRATIONS, health.clone());
    // Stops the materializer when `serve` returns.
    let _materializer = store.spawn_materializer();

    let routes =
        tonic::service::Routes::new(FeaturesServer::new(service::FeaturesService::new(store)));
    let options = config.server.internal_serve_options(vec![name])?;
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
    .map_err(StartupError::from)
}
