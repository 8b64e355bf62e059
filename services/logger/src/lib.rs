//! The prediction log: `mesh.logger.v1.PredictionLog` takes prediction records and writes them
//! to PostgreSQL in batches (one multi-row `INSERT … SELECT FROM UNNEST`, idempotent on the
//! prediction id). `Record` answers once its records are committed, so a sender (the gateway's
//! spool) may forget exactly what was acknowledged; a record sent twice is stored once.
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
use mesh_runtime::config::{ServerConfig, Setting, Settings};
use mesh_runtime::postgres::Migration;
use mesh_runtime::{serve_grpc, Health, ServiceMetrics};
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
    /// Address, metrics, concurrency limit and shutdown timing (`MESH_LISTEN_ADDR`,
    /// `MESH_METRICS_ADDR`, `MESH_MAX_CONCURRENCY`, `MESH_DRAIN_DELAY_MS`, `MESH_GRACE_MS`).
    pub server: ServerConfig,
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
}

/// Every variable the logger reads, with its default: the one place defaults are written.
pub const SETTINGS: &[Setting] = mesh_runtime::settings_table!(
    "0.0.0.0:50055", "0.0.0.0:9105", "256";
        Setting::value(
            "MESH_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
            "PostgreSQL",
        ),
        Setting::value("MESH_LOG_BATCH_SIZE", "500", "records per `INSERT`"),
        Setting::value(
            "MESH_LOG_FLUSH_MS",
            "100",
            "longest wait before a partial batch is written",
        ),
        Setting::value(
            "MESH_LOG_QUEUE",
            "100000",
            "records held in memory before shedding with `RESOURCE_EXHAUSTED`",
        ),
        Setting::value(
            "MESH_DB_TIMEOUT_MS",
            "2000",
            "one PostgreSQL write or connection attempt",
        ),
);

impl Config {
    /// Reads the process environment; fails naming the variable that does not parse.
    pub fn from_env() -> Result<Self, LoggerError> {
        Self::read(&Settings::from_env(SETTINGS))
    }

    /// Reads the settings from `s`.
    pub fn read(s: &Settings<'_>) -> Result<Self, LoggerError> {
        let cfg = |e: mesh_runtime::config::ConfigError| LoggerError::Config(e.to_string());
        Ok(Self {
            server: ServerConfig::read(s).map_err(cfg)?,
            database_url: s.string("MESH_DATABASE_URL"),
            batch_size: s.positive("MESH_LOG_BATCH_SIZE").map_err(cfg)?,
            flush_interval: s.millis("MESH_LOG_FLUSH_MS").map_err(cfg)?,
            queue_capacity: s.positive("MESH_LOG_QUEUE").map_err(cfg)?,
            db_timeout: s.millis("MESH_DB_TIMEOUT_MS").map_err(cfg)?,
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

    mesh_runtime::postgres::migrate_then_serve(db.clone(), "logger", MIGRATIONS, health.clone());

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
    let options = config.server.serve_options(vec![name]);
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
    match tokio::time::timeout(config.server.grace, writer).await {
        Ok(_) => tracing::info!("prediction log flushed"),
        Err(_) => {
            tracing::error!(grace = ?config.server.grace, "prediction log not flushed within the grace period")
        }
    }
    served.map_err(|e| LoggerError::Config(e.to_string()))
}
