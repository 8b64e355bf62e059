//! The prediction log: `mesh.logger.v1.PredictionLog` takes prediction records and writes them
//! to PostgreSQL in batches (one multi-row `INSERT … SELECT FROM UNNEST`, idempotent on the
//! prediction id), so the gateway never waits for the database.
//!
//! # Layout
//! - [`writer`]: the queue and the batching writer task.
//! - [`service`]: the gRPC handlers; [`error`]: status mapping.
//!
//! Start-up: the schema is migrated (retrying while PostgreSQL is unreachable); health says
//! SERVING once it is. Shutdown: after the server drained, the writer flushes what is queued
//! (bounded by the grace period).

pub mod error;
pub mod service;
pub mod writer;

use std::future::Future;
use std::time::Duration;

use mesh_proto::logger::prediction_log_server::PredictionLogServer;
use mesh_runtime::config::{env_millis, env_positive, env_str, metrics_addr};
use mesh_runtime::postgres::Migration;
use mesh_runtime::{serve_grpc, Health, ServeOptions, ServiceMetrics};
use tokio::net::TcpListener;

pub use error::LoggerError;

/// The prediction log's schema.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "predictions",
    sql: "CREATE TABLE predictions (
              prediction_id  text PRIMARY KEY,
              served_at      timestamptz NOT NULL,
              model          text NOT NULL,
              model_version  text NOT NULL,
              entity_id      text NOT NULL,
              features       jsonb NOT NULL,
              score          double precision NOT NULL,
              latency_us     bigint NOT NULL,
              feature_tier   text NOT NULL,
              trace_id       text NOT NULL,
              logged_at      timestamptz NOT NULL DEFAULT now()
          );
          CREATE INDEX predictions_model_time ON predictions (model, model_version, served_at);",
}];

/// Configuration, from `MESH_*` environment variables (see README).
#[derive(Debug, Clone)]
pub struct Config {
    /// `MESH_LISTEN_ADDR`, default `0.0.0.0:50055`.
    pub listen_addr: String,
    /// `MESH_METRICS_ADDR`, default `0.0.0.0:9105`; `off` disables.
    pub metrics_addr: Option<String>,
    /// `MESH_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`.
    pub database_url: String,
    /// `MESH_LOG_BATCH_SIZE`, default 500 records per INSERT.
    pub batch_size: usize,
    /// `MESH_LOG_FLUSH_MS`, default 100: longest a record waits for its batch.
    pub flush_interval: Duration,
    /// `MESH_LOG_QUEUE`, default 100000 records held in memory before Record sheds.
    pub queue_capacity: usize,
    /// `MESH_DB_TIMEOUT_MS`, default 2000.
    pub db_timeout: Duration,
    /// `MESH_MAX_CONCURRENCY`, default 256.
    pub max_concurrency: usize,
    /// `MESH_DRAIN_DELAY_MS`, default 1000.
    pub drain_delay: Duration,
    /// `MESH_GRACE_MS`, default 10000.
    pub grace: Duration,
}

impl Config {
    /// Reads the environment; fails naming the variable that does not parse.
    pub fn from_env() -> Result<Self, LoggerError> {
        let cfg = |e: mesh_runtime::config::ConfigError| LoggerError::Config(e.to_string());
        Ok(Self {
            listen_addr: env_str("MESH_LISTEN_ADDR").unwrap_or_else(|| "0.0.0.0:50055".into()),
            metrics_addr: metrics_addr("0.0.0.0:9105"),
            database_url: env_str("MESH_DATABASE_URL")
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into()),
            batch_size: env_positive("MESH_LOG_BATCH_SIZE", 500).map_err(cfg)?,
            flush_interval: env_millis("MESH_LOG_FLUSH_MS", Duration::from_millis(100))
                .map_err(cfg)?,
            queue_capacity: env_positive("MESH_LOG_QUEUE", 100_000).map_err(cfg)?,
            db_timeout: env_millis("MESH_DB_TIMEOUT_MS", Duration::from_secs(2)).map_err(cfg)?,
            max_concurrency: env_positive("MESH_MAX_CONCURRENCY", 256).map_err(cfg)?,
            drain_delay: env_millis("MESH_DRAIN_DELAY_MS", Duration::from_secs(1)).map_err(cfg)?,
            grace: env_millis("MESH_GRACE_MS", Duration::from_secs(10)).map_err(cfg)?,
        })
    }
}

/// Serves the prediction log on `listener` until `shutdown` resolves, then flushes.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), LoggerError> {
    let name = mesh_proto::service_names::LOGGER;
    let health = Health::new(&[name]).await;
    let metrics = ServiceMetrics::new().map_err(|e| LoggerError::Config(e.to_string()))?;
    let writer_metrics = writer::WriterMetrics::register(&metrics.registry)
        .map_err(|e| LoggerError::Config(e.to_string()))?;
    let db = mesh_runtime::postgres::pool(&config.database_url, 4, config.db_timeout)
        .map_err(|e| LoggerError::Config(e.to_string()))?;

    let migrating = health.clone();
    let migrate_db = db.clone();
    tokio::spawn(async move {
        let mut attempt = 0u32;
        loop {
            match mesh_runtime::postgres::migrate(&migrate_db, "logger", MIGRATIONS).await {
                Ok(_) => {
                    migrating.set_serving().await;
                    return;
                }
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "schema migration failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });

    let (queue, writer) = writer::spawn(
        db.clone(),
        writer::WriterConfig {
            batch_size: config.batch_size,
            flush_interval: config.flush_interval,
            capacity: config.queue_capacity,
        },
        writer_metrics,
    );
    let routes = tonic::service::Routes::new(PredictionLogServer::new(
        service::PredictionLogService::new(queue, db),
    ));
    let mut options = ServeOptions::new(vec![name]);
    options.max_concurrency = config.max_concurrency;
    options.drain_delay = config.drain_delay;
    options.grace = config.grace;
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
    // The routes (and with them the queue's sender) are gone: the writer flushes and ends.
    match tokio::time::timeout(config.grace, writer).await {
        Ok(_) => tracing::info!("prediction log flushed"),
        Err(_) => {
            tracing::error!(grace = ?config.grace, "prediction log not flushed within the grace period")
        }
    }
    served.map_err(|e| LoggerError::Config(e.to_string()))
}
