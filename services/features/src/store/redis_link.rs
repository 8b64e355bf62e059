//! The connection to Redis: straight to one server (`MESH_REDIS_URL`), or to whichever server
//! the Sentinels name master (`MESH_REDIS_SENTINELS`, `MESH_REDIS_MASTER_NAME`).
//!
//! Failover is Sentinel's: this module only follows it. The `redis` crate's `ConnectionManager`
//! reconnects to one fixed address, so with Sentinels the link keeps one multiplexed connection
//! to the master it was told about and forgets it on any failure (a dead master's connection
//! errors; a demoted one answers `READONLY`; the store also calls [`RedisLink::forget`] after a
//! timeout). The next call asks the Sentinels again, so after a promotion the first call past the
//! store's cool-down reaches the new master.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use crate::config::RedisSettings;

/// How long one look-up of the master (Sentinels, then a connection to the master) may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(1);
/// The connection's own bound on one answer. Requests on the answer's path are bounded far
/// tighter by the store (`MESH_REDIS_TIMEOUT_MS`); this one covers a materialization page and
/// keeps a hung server from holding requests forever.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Redis, direct or through Sentinel; cheap to clone, usable wherever the crate takes a
/// connection.
#[derive(Clone)]
pub enum RedisLink {
    /// One server at a fixed address, reconnected by the crate's manager.
    Direct(ConnectionManager),
    /// The master named by Sentinels.
    Sentinel(Arc<SentinelLink>),
}

/// The Sentinel side of [`RedisLink`].
pub struct SentinelLink {
    sentinels: tokio::sync::Mutex<SentinelClient>,
    master: Mutex<Option<MultiplexedConnection>>,
    connection: AsyncConnectionConfig,
}

impl RedisLink {
    /// A link for `settings`: `None` when the Redis tier is off (`MESH_REDIS_URL=off` and no
    /// Sentinels). Connects lazily, so this succeeds while Redis is down.
    pub fn from_settings(settings: &RedisSettings) -> Result<Option<Self>, String> {
        let connect = settings.timeout.max(Duration::from_millis(100));
        if !settings.sentinels.is_empty() {
            let urls: Vec<String> = settings
                .sentinels
                .iter()
                .map(|s| match s.contains("://") {
                    true => s.clone(),
                    false => format!("redis://{s}"),
                })
                .collect();
            let client = SentinelClient::build(
                urls,
                settings.master_name.clone(),
                None,
                SentinelServerType::Master,
            )
            .map_err(|e| format!("MESH_REDIS_SENTINELS: {e}"))?;
            let connection = AsyncConnectionConfig::new()
                .set_response_timeout(Some(RESPONSE_TIMEOUT))
                .set_connection_timeout(Some(connect));
            return Ok(Some(Self::Sentinel(Arc::new(SentinelLink {
                sentinels: tokio::sync::Mutex::new(client),
                master: Mutex::new(None),
                connection,
            }))));
        }
        let Some(url) = &settings.url else {
            return Ok(None);
        };
        let invalid = |e: RedisError| format!("MESH_REDIS_URL: {e}");
        let client = redis::Client::open(url.as_str()).map_err(invalid)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(connect))
            .set_number_of_retries(1);
        ConnectionManager::new_lazy_with_config(client, config)
            .map(|m| Some(Self::Direct(m)))
            .map_err(invalid)
    }

    /// After a failure the caller could not see here (its own timeout): with Sentinels, ask
    /// them again on the next call. The direct manager reconnects by itself.
    pub fn forget(&self) {
        if let Self::Sentinel(link) = self {
            link.forget();
        }
    }
}

impl SentinelLink {
    fn forget(&self) {
        if let Ok(mut master) = self.master.lock() {
            *master = None;
        }
    }

    /// The connection to the current master, asking the Sentinels when there is none.
    async fn connection(self: &Arc<Self>) -> RedisResult<MultiplexedConnection> {
        if let Some(master) = self.master.lock().ok().and_then(|m| m.clone()) {
            return Ok(master);
        }
        let link = self.clone();
        // Own task: the look-up finishes and is kept even when the caller's short timeout
        // drops this call, so a slow look-up is not restarted by every request.
        let resolve = tokio::spawn(async move {
            tokio::time::timeout(RESOLVE_TIMEOUT, link.resolve())
                .await
                .unwrap_or_else(|_| Err(io_error("no Redis master found through Sentinel in 1 s")))
        });
        resolve
            .await
            .unwrap_or_else(|_| Err(io_error("Sentinel look-up task failed")))
    }

    async fn resolve(&self) -> RedisResult<MultiplexedConnection> {
        let mut sentinels = self.sentinels.lock().await;
        // Another caller may have found the master while this one waited for the lock.
        if let Some(master) = self.master.lock().ok().and_then(|m| m.clone()) {
            return Ok(master);
        }
        let master = sentinels
            .get_async_connection_with_config(&self.connection)
            .await?;
        if let Ok(mut slot) = self.master.lock() {
            *slot = Some(master.clone());
        }
        Ok(master)
    }

    /// Forgets the master after `error`, unless the error says nothing about the server
    /// (a script not loaded yet is loaded and retried by the crate).
    fn judge(&self, error: &RedisError) {
        if error.code() != Some("NOSCRIPT") {
            tracing::warn!(%error, "redis master failed; asking the Sentinels again on the next call");
            self.forget();
        }
    }
}

fn io_error(what: &'static str) -> RedisError {
    RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
}

impl ConnectionLike for RedisLink {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Direct(manager) => manager.req_packed_command(cmd),
            Self::Sentinel(link) => Box::pin(async move {
                let mut master = link.connection().await?;
                let result = master.req_packed_command(cmd).await;
                if let Err(e) = &result {
                    link.judge(e);
                }
                result
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Direct(manager) => manager.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(link) => Box::pin(async move {
                let mut master = link.connection().await?;
                let result = master.req_packed_commands(pipeline, offset, count).await;
                if let Err(e) = &result {
                    link.judge(e);
                }
                result
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Direct(manager) => manager.get_db(),
            Self::Sentinel(_) => 0,
        }
    }
}
