//! The logger's configuration: sections read from `MESH_*` variables through one settings
//! table ([`SETTINGS`]), the only place a default is written.

use std::time::Duration;

use mesh_runtime::config::{FromSettings, ServerConfig, Setting, Settings};
use mesh_runtime::StartupError;

/// Every variable the logger reads, with its default.
pub const SETTINGS: &[Setting] = mesh_runtime::settings_table!(
    "0.0.0.0:50055", "0.0.0.0:9105", "256";
    Setting::value("MESH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres", "PostgreSQL"),
    Setting::value("MESH_LOG_BATCH_SIZE", "500", "records per `INSERT`"),
    Setting::value("MESH_LOG_FLUSH_MS", "100", "longest wait before a partial batch is written"),
    Setting::value("MESH_LOG_QUEUE", "100000", "records held in memory before shedding with `RESOURCE_EXHAUSTED`"),
    Setting::value("MESH_DB_TIMEOUT_MS", "2000", "one PostgreSQL write or connection attempt"),
    Setting::value("MESH_LOG_RETENTION_DAYS", "30", "days of `predictions`, `shadow_predictions` and `prediction_rejects` kept; older daily partitions are dropped whole"),
);

/// Connections the logger keeps to PostgreSQL (one writer, plus reads).
pub const DB_POOL_SIZE: usize = 4;

/// The logger's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address, metrics, concurrency limit and shutdown timing.
    pub server: ServerConfig,
    /// PostgreSQL.
    pub database: DatabaseSettings,
    /// The queue and its batches.
    pub batching: Batching,
    /// `MESH_LOG_RETENTION_DAYS`: days of records kept (see [`crate::retention`]).
    pub retention_days: u32,
}

/// PostgreSQL.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// `MESH_DATABASE_URL`.
    pub url: String,
    /// `MESH_DB_TIMEOUT_MS`: one write or connection attempt.
    pub timeout: Duration,
}

/// The queue and its batches.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// `MESH_LOG_BATCH_SIZE`: records per `INSERT`.
    pub batch_size: usize,
    /// `MESH_LOG_FLUSH_MS`: longest a record waits for its batch.
    pub flush_interval: Duration,
    /// `MESH_LOG_QUEUE`: records held in memory before `Record` sheds.
    pub queue_capacity: usize,
}

impl FromSettings for Config {
    const SETTINGS: &'static [Setting] = SETTINGS;

    fn read(s: &Settings<'_>) -> Result<Self, StartupError> {
        Ok(Self {
            server: ServerConfig::read(s)?,
            database: DatabaseSettings {
                url: s.string("MESH_DATABASE_URL"),
                timeout: s.millis("MESH_DB_TIMEOUT_MS")?,
            },
            batching: Batching {
                batch_size: s.positive("MESH_LOG_BATCH_SIZE")?,
                flush_interval: s.millis("MESH_LOG_FLUSH_MS")?,
                queue_capacity: s.positive("MESH_LOG_QUEUE")?,
            },
            retention_days: match s.parse::<u32>("MESH_LOG_RETENTION_DAYS")? {
                0 => {
                    return Err(mesh_runtime::config::ConfigError {
                        variable: "MESH_LOG_RETENTION_DAYS".into(),
                        value: "0".into(),
                        problem: "must be at least 1 day".into(),
                    }
                    .into())
                }
                days => days,
            },
        })
    }
}
