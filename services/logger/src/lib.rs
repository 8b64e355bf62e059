//! The prediction log: `mesh.logger.v1.PredictionLog` takes prediction records and writes them
//! to PostgreSQL in batches (one multi-row `INSERT … SELECT FROM UNNEST`, idempotent on the
//! prediction id and its serve time). `Record` answers once its records are committed, so a
//! sender (the gateway's spool) may forget exactly what was acknowledged; a record sent twice is
//! stored once. A record that is invalid or that PostgreSQL refuses is committed to
//! `prediction_rejects` with its reason instead, so no record can stop the others.
//!
//! # Layout
//! - [`config`]: settings in sections, every default in one table.
//! - [`writer`]: the queue and the batching writer task.
//! - [`retention`]: daily partitions created ahead and dropped past `MESH_LOG_RETENTION_DAYS`.
//! - [`service`]: the gRPC handlers; [`error`]: status mapping.
//!
//! Start-up: the schema is migrated (retrying while PostgreSQL is unreachable); health says
//! SERVING once it is. Shutdown: after the server drained, the writer flushes what is queued
//! (bounded by the grace period).

pub mod config;
pub mod error;
pub mod retention;
pub mod service;
pub mod writer;

use std::future::Future;

use mesh_proto::logger::prediction_log_server::PredictionLogServer;
use mesh_runtime::postgres::Migration;
use mesh_runtime::{serve_grpc, Health, ServiceMetrics, StartupError};
use tokio::net::TcpListener;

pub use config::{Config, SETTINGS};
pub use error::LoggerError;

/// The prediction log's schema.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
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
    },
    Migration {
        version: 2,
        name: "prediction_rejects",
        // Records that failed validation or that PostgreSQL refused, kept whole (the encoded
        // PredictionRecord) with the reason, so nothing accepted is lost and none blocks the rest.
        sql: "CREATE TABLE prediction_rejects (
                  id             bigserial PRIMARY KEY,
                  prediction_id  text NOT NULL,
                  reason         text NOT NULL,
                  record         bytea NOT NULL,
                  rejected_at    timestamptz NOT NULL DEFAULT now()
              );
              CREATE INDEX prediction_rejects_time ON prediction_rejects (rejected_at);",
    },
    Migration {
        version: 3,
        name: "partition by day",
        // Both tables become range-partitioned by day so that retention drops whole partitions
        // ([`retention`]). A partitioned table's primary key must include the partition key:
        // `predictions` is unique on (prediction_id, served_at), which keeps the writer's
        // `ON CONFLICT` idempotent because a record's served_at is stamped once by the gateway
        // and travels with it. The existing tables are kept, whole, as each one's first
        // partition (`*_legacy`, from the beginning of time to the end of today, or of the
        // latest day they hold), and are dropped like any other partition once all of it is
        // older than the retention window. Attaching builds the new key's index on them (their
        // old key is dropped first: a partition takes its parent's).
        sql: "ALTER TABLE predictions RENAME TO predictions_legacy;
              -- Attaching gives it the parent's key, (prediction_id, served_at), in place of this one.
              ALTER TABLE predictions_legacy DROP CONSTRAINT predictions_pkey;
              ALTER INDEX predictions_model_time RENAME TO predictions_legacy_model_time;
              CREATE TABLE predictions (LIKE predictions_legacy INCLUDING DEFAULTS)
                  PARTITION BY RANGE (served_at);
              ALTER TABLE predictions ADD PRIMARY KEY (prediction_id, served_at);
              CREATE INDEX predictions_model_time ON predictions (model, model_version, served_at);

              ALTER TABLE prediction_rejects RENAME TO prediction_rejects_legacy;
              ALTER TABLE prediction_rejects_legacy DROP CONSTRAINT prediction_rejects_pkey;
              ALTER INDEX prediction_rejects_time RENAME TO prediction_rejects_legacy_time;
              CREATE TABLE prediction_rejects (LIKE prediction_rejects_legacy INCLUDING DEFAULTS)
                  PARTITION BY RANGE (rejected_at);
              ALTER TABLE prediction_rejects ADD PRIMARY KEY (id, rejected_at);
              CREATE INDEX prediction_rejects_time ON prediction_rejects (rejected_at);
              -- The id sequence must outlive the legacy partition, which owned it.
              ALTER SEQUENCE prediction_rejects_id_seq OWNED BY prediction_rejects.id;

              DO $$
              DECLARE
                  tomorrow timestamptz := date_trunc('day', now(), 'UTC') + interval '1 day';
                  upper timestamptz;
              BEGIN
                  SELECT greatest(tomorrow, date_trunc('day', max(served_at), 'UTC') + interval '1 day')
                      INTO upper FROM predictions_legacy;
                  EXECUTE format('ALTER TABLE predictions ATTACH PARTITION predictions_legacy
                                  FOR VALUES FROM (MINVALUE) TO (%L)', upper);
                  SELECT greatest(tomorrow, date_trunc('day', max(rejected_at), 'UTC') + interval '1 day')
                      INTO upper FROM prediction_rejects_legacy;
                  EXECUTE format('ALTER TABLE prediction_rejects ATTACH PARTITION prediction_rejects_legacy
                                  FOR VALUES FROM (MINVALUE) TO (%L)', upper);
              END $$;",
    },
    Migration {
        version: 4,
        name: "shadow_predictions",
        // Shadow predictions (a copy of a live request scored by the shadow version, answered to
        // no one) beside the predictions, not among them: counts, drift and completeness of what
        // callers received stay exact. Partitioned by day like `predictions` and bounded by the
        // same retention; the first partition covers everything up to the end of today, later
        // ones are made ahead by maintenance. Features are the primary's (join on primary_id).
        sql: "CREATE TABLE shadow_predictions (
                  prediction_id  text NOT NULL,
                  primary_id     text NOT NULL,
                  served_at      timestamptz NOT NULL,
                  model          text NOT NULL,
                  model_version  text NOT NULL,
                  entity_id      text NOT NULL,
                  score          double precision NOT NULL,
                  latency_us     bigint NOT NULL,
                  trace_id       text NOT NULL,
                  logged_at      timestamptz NOT NULL DEFAULT now(),
                  PRIMARY KEY (prediction_id, served_at)
              ) PARTITION BY RANGE (served_at);
              CREATE INDEX shadow_predictions_primary ON shadow_predictions (primary_id);
              CREATE INDEX shadow_predictions_model_time
                  ON shadow_predictions (model, model_version, served_at);
              DO $$
              BEGIN
                  EXECUTE format('CREATE TABLE shadow_predictions_legacy PARTITION OF shadow_predictions
                                  FOR VALUES FROM (MINVALUE) TO (%L)',
                                 date_trunc('day', now(), 'UTC') + interval '1 day');
              END $$;",
    },
    Migration {
        version: 5,
        name: "gentle vacuum of the log",
        // Every partition there is gets autovacuum's cost delay that maintenance gives the
        // ones it makes (see `retention::VACUUM_COST_DELAY_MS`, which must match the 20 here):
        // the insert-only log is vacuumed and analyzed in the background at a fifth of
        // autovacuum's default I/O rate, so that it does not take the disk and CPU the request
        // path needs. A partitioned parent holds no rows and takes no storage parameters.
        sql: "DO $$
              DECLARE
                  part regclass;
              BEGIN
                  FOR part IN
                      SELECT i.inhrelid::regclass FROM pg_inherits i
                      JOIN pg_class c ON c.oid = i.inhrelid
                      WHERE i.inhparent IN ('predictions'::regclass,
                                            'prediction_rejects'::regclass,
                                            'shadow_predictions'::regclass)
                        AND c.relkind = 'r'
                  LOOP
                      EXECUTE format('ALTER TABLE %s SET (autovacuum_vacuum_cost_delay = 20)', part);
                  END LOOP;
              END $$;",
    },
];

/// Serves the prediction log on `listener` until `shutdown` resolves, then flushes.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartupError> {
    let name = mesh_proto::service_names::LOGGER;
    let health = Health::new(&[name]).await;
    let metrics = ServiceMetrics::new("logger")?;
    let writer_metrics = writer::WriterMetrics::register(&metrics.registry)?;
    let db = mesh_runtime::postgres::pool(
        &config.database.url,
        config::DB_POOL_SIZE,
        config.database.timeout,
    )?;

    mesh_runtime::postgres::migrate_then_serve(db.clone(), "logger", MIGRATIONS, health.clone());

    let (queue, writer) = writer::spawn(
        db.clone(),
        writer::WriterConfig {
            batch_size: config.batching.batch_size,
            flush_interval: config.batching.flush_interval,
            capacity: config.batching.queue_capacity,
            write_timeout: config.database.timeout,
        },
        writer_metrics,
    );
    // Bounds the log's disk: partitions ahead, whole partitions dropped past the window.
    let retention = tokio::spawn(retention::run(
        db.clone(),
        config.retention_days,
        retention::RetentionMetrics::register(&metrics.registry)?,
    ));
    let routes = tonic::service::Routes::new(PredictionLogServer::new(
        service::PredictionLogService::new(queue, db),
    ));
    let options = config.server.internal_serve_options(vec![name])?;
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
    retention.abort();
    // The routes (and with them the queue's sender) are gone: the writer flushes and ends.
    match tokio::time::timeout(config.server.grace, writer).await {
        Ok(_) => tracing::info!("prediction log flushed"),
        Err(_) => {
            tracing::error!(grace = ?config.server.grace, "prediction log not flushed within the grace period")
        }
    }
    Ok(served?)
}
