//! The features service's configuration: sections read from `MESH_*` variables through one
//! settings table ([`SETTINGS`]), the only place a default is written.

use std::time::Duration;

use mesh_runtime::config::{FromSettings, ServerConfig, Setting, Settings};
use mesh_runtime::StartupError;

/// Every variable the features service reads, with its default.
pub const SETTINGS: &[Setting] = mesh_runtime::settings_table!(
    "0.0.0.0:50052", "0.0.0.0:9102", "512";
    Setting::value("MESH_REDIS_URL", "redis://127.0.0.1:6379", "Redis; `off` disables the Redis tier"),
    Setting::value("MESH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres", "PostgreSQL"),
    Setting::value("MESH_CACHE_TTL_MS", "10000", "memory tier TTL"),
    Setting::value("MESH_CACHE_CAPACITY", "100000", "entities in the memory tier"),
    Setting::value("MESH_CACHE_NEGATIVE_CAPACITY", "10000", "ids known to be absent in the memory tier (a separate budget)"),
    Setting::value("MESH_REDIS_TIMEOUT_MS", "20", "per Redis call"),
    Setting::value("MESH_REDIS_COOLDOWN_MS", "1000", "Redis is skipped this long after a failure"),
    Setting::unset("MESH_REDIS_SENTINELS", "unset: MESH_REDIS_URL is used", "Redis Sentinels (`host:port,...`): the features service follows the master they name, and MESH_REDIS_URL is not used"),
    Setting::value("MESH_REDIS_MASTER_NAME", "mesh", "the master's name in the Sentinels' `sentinel monitor` line"),
    Setting::value("MESH_REDIS_TTL_MS", "0", "TTL of entries in Redis; 0: none (Redis is the materialized online store: every entity in PostgreSQL is kept there)"),
    Setting::value("MESH_MATERIALIZE_INTERVAL_MS", "600000", "full copy of PostgreSQL's entities into Redis this often (also at start, on SIGHUP, and when Redis lost them); 0: not periodically"),
    Setting::value("MESH_DB_TIMEOUT_MS", "1000", "one PostgreSQL load or connection attempt"),
    Setting::value("MESH_DB_POOL_SIZE", "16", "PostgreSQL connections"),
);

/// The features service's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address, metrics, concurrency limit and shutdown timing.
    pub server: ServerConfig,
    /// The in-process memory tier.
    pub cache: CacheSettings,
    /// The Redis tier.
    pub redis: RedisSettings,
    /// PostgreSQL, the source of truth.
    pub database: DatabaseSettings,
}

/// The in-process memory tier.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    /// `MESH_CACHE_TTL_MS`: how long an entity stays.
    pub ttl: Duration,
    /// `MESH_CACHE_CAPACITY`: entities held.
    pub capacity: usize,
    /// `MESH_CACHE_NEGATIVE_CAPACITY`: ids known to be absent, held apart from the entities so
    /// that random ids cannot push real entities out.
    pub negative_capacity: usize,
}

/// The Redis tier.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `MESH_REDIS_URL`; `None` (`off`) disables the tier.
    pub url: Option<String>,
    /// `MESH_REDIS_TIMEOUT_MS`: per Redis call.
    pub timeout: Duration,
    /// `MESH_REDIS_COOLDOWN_MS`: Redis is skipped this long after a failure.
    pub cooldown: Duration,
    /// `MESH_REDIS_SENTINELS`: when not empty, Redis is whichever server these Sentinels name
    /// master (and `url` is not used).
    pub sentinels: Vec<String>,
    /// `MESH_REDIS_MASTER_NAME`: the master's name at the Sentinels.
    pub master_name: String,
    /// `MESH_REDIS_TTL_MS`: TTL of entries in Redis; zero: none (the materialized store).
    pub ttl: Duration,
    /// `MESH_MATERIALIZE_INTERVAL_MS`: a full materialization this often; zero: only at start,
    /// on SIGHUP and when Redis lost the entries.
    pub materialize_interval: Duration,
}

/// PostgreSQL.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// `MESH_DATABASE_URL`.
    pub url: String,
    /// `MESH_DB_TIMEOUT_MS`: one load or connection attempt.
    pub timeout: Duration,
    /// `MESH_DB_POOL_SIZE`: connections.
    pub pool_size: usize,
}

impl FromSettings for Config {
    const SETTINGS: &'static [Setting] = SETTINGS;

    fn read(s: &Settings<'_>) -> Result<Self, StartupError> {
        Ok(Self {
            server: ServerConfig::read(s)?,
            cache: CacheSettings {
                ttl: s.millis("MESH_CACHE_TTL_MS")?,
                capacity: s.positive("MESH_CACHE_CAPACITY")?,
                negative_capacity: s.positive("MESH_CACHE_NEGATIVE_CAPACITY")?,
            },
            redis: RedisSettings {
                url: s.optional("MESH_REDIS_URL"),
                timeout: s.millis("MESH_REDIS_TIMEOUT_MS")?,
                cooldown: s.millis("MESH_REDIS_COOLDOWN_MS")?,
                sentinels: s.list("MESH_REDIS_SENTINELS"),
                master_name: s.string("MESH_REDIS_MASTER_NAME"),
                ttl: s.millis("MESH_REDIS_TTL_MS")?,
                materialize_interval: s.millis("MESH_MATERIALIZE_INTERVAL_MS")?,
            },
            database: DatabaseSettings {
                url: s.string("MESH_DATABASE_URL"),
                timeout: s.millis("MESH_DB_TIMEOUT_MS")?,
                pool_size: s.positive("MESH_DB_POOL_SIZE")?,
            },
        })
    }
}
