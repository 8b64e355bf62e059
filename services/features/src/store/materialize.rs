//! Bulk materialization: every entity in PostgreSQL copied into Redis, so that Redis can answer
//! for every entity that exists while PostgreSQL is down (the online store of Feast and its
//! kind, with PostgreSQL the source of truth it is rebuilt from).
//!
//! One background task per features instance ([`FeatureStore::spawn_materializer`]) runs a
//! materialization:
//!
//! - at start;
//! - every `MESH_MATERIALIZE_INTERVAL_MS` (it also repairs an entry a failed write-through or a
//!   Redis failover left behind);
//! - on `SIGHUP` (the on-demand trigger: `kill -HUP <features pid>`);
//! - when Redis lost the entries: the task checks every [`CHECK_EVERY`] that the marker key
//!   [`MATERIALIZED_KEY`] (set after each complete run) still exists, so a Redis restarted empty
//!   is refilled within seconds;
//! - after a write-through failed ([`FeatureStore::materialize_soon`]), but no sooner than
//!   [`REPAIR_GAP`] after the previous run ended: during a Redis failover every write-through
//!   fails, and one full run per failure (seen: four back to back in 1.5 s) would starve the
//!   machine for the sake of a few entities; the requests in between are served by one run.
//!
//! Entities are read in pages of [`PAGE`] by entity id and written with the same version check
//! as every other Redis write, so a materialization racing `PutFeatures` never puts an older
//! version over a newer one. A run that fails (PostgreSQL or Redis down) is retried at the next
//! check.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::postgres_tier::entities_of;
use super::FeatureStore;
use crate::error::FeaturesError;

/// Redis key set when a materialization completed; its absence means Redis lost the entries.
pub const MATERIALIZED_KEY: &str = "mesh:features-materialized:v1";
/// How often the task checks for [`MATERIALIZED_KEY`] and for a requested run.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Least time between the end of a run and a run asked for by a failed write-through.
pub const REPAIR_GAP: Duration = Duration::from_secs(5);
/// Entities per page (one PostgreSQL query and one Redis script call each).
pub const PAGE: i64 = 500;
/// One page's PostgreSQL query or Redis call may take this long.
const PAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// The entities of one page after `$1` (by id), whole, with their versions.
const PAGE_SQL: &str = "WITH page AS (
       SELECT entity_id, version FROM feature_entity_versions
       WHERE entity_id > $1 ORDER BY entity_id LIMIT $2)
     SELECT p.entity_id, p.version, f.name, f.number, f.category
     FROM page p JOIN feature_values f USING (entity_id)
     ORDER BY p.entity_id";

/// What one materialization did.
#[derive(Debug, Clone, Copy, Default)]
pub struct MaterializeReport {
    /// Entities read from PostgreSQL.
    pub entities: u64,
    /// Entities written to Redis (the others were already there at their version or newer).
    pub written: u64,
    /// How long it took.
    pub took: Duration,
}

/// Stops the materializer task when dropped (when `serve` returns).
pub struct MaterializerGuard(JoinHandle<()>);

impl Drop for MaterializerGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `error` and its sources ("db error: canceling statement due to statement timeout"): the
/// driver's own message alone says only "db error".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

impl FeatureStore {
    /// Asks the materializer for a run at its next check (after a failed write-through).
    pub fn materialize_soon(&self) {
        self.materialize_wanted.notify_one();
    }

    /// Copies every entity from PostgreSQL into Redis, page by page, then sets
    /// [`MATERIALIZED_KEY`]. Does nothing without a Redis tier.
    pub async fn materialize(&self) -> Result<MaterializeReport, FeaturesError> {
        let started = Instant::now();
        let mut report = MaterializeReport::default();
        let Some(mut redis) = self.redis.clone() else {
            return Ok(report);
        };
        let unavailable = |e: &dyn std::error::Error| FeaturesError::Unavailable(chain(e));
        let mut after = String::new();
        loop {
            let query = async {
                let client = mesh_runtime::postgres::connection(&self.db).await?;
                Ok(client.query(PAGE_SQL, &[&after, &PAGE]).await?)
            };
            let rows = mesh_runtime::postgres::bounded(PAGE_TIMEOUT, query)
                .await
                .map_err(|e| unavailable(&e))?;
            let Some(last) = rows.last().map(|r| r.get::<_, String>(0)) else {
                break;
            };
            let page: Vec<_> = entities_of(rows)
                .into_iter()
                .map(|(id, entity)| (id, Arc::new(entity)))
                .collect();
            let (script, count) = self.set_if_newer(&page);
            let write = script.invoke_async::<u64>(&mut redis);
            let written = tokio::time::timeout(PAGE_TIMEOUT, write)
                .await
                .map_err(|_| {
                    FeaturesError::Unavailable("Redis did not answer a page within 10 s".into())
                })?
                .map_err(|e| unavailable(&e))?;
            report.entities += count as u64;
            report.written += written;
            after = last;
        }
        let mut mark = redis::cmd("SET");
        mark.arg(MATERIALIZED_KEY).arg(report.entities);
        let mark = mark.query_async::<()>(&mut redis);
        tokio::time::timeout(PAGE_TIMEOUT, mark)
            .await
            .map_err(|_| FeaturesError::Unavailable("Redis did not answer SET within 10 s".into()))?
            .map_err(|e| unavailable(&e))?;
        report.took = started.elapsed();
        Ok(report)
    }

    /// Whether Redis lost the entries ([`MATERIALIZED_KEY`] is gone); `false` when Redis
    /// cannot be asked (nothing to refill then).
    async fn redis_lost_entries(&self) -> bool {
        let Some(mut redis) = self.redis.clone() else {
            return false;
        };
        let mut exists = redis::cmd("EXISTS");
        exists.arg(MATERIALIZED_KEY);
        let exists = exists.query_async::<u64>(&mut redis);
        matches!(
            tokio::time::timeout(self.redis_settings.timeout * 10, exists).await,
            Ok(Ok(0))
        )
    }

    /// Starts the materializer task (see the module doc); `None` without a Redis tier.
    pub fn spawn_materializer(self: &Arc<Self>) -> Option<MaterializerGuard> {
        self.redis.as_ref()?;
        let store = self.clone();
        Some(MaterializerGuard(tokio::spawn(async move {
            store.materialize_forever().await
        })))
    }

    async fn materialize_forever(&self) {
        let interval = self.redis_settings.materialize_interval;
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        // A run is owed: at start, on SIGHUP, after a failed run.
        let mut wanted = true;
        // A failed write-through asked for one (held back by REPAIR_GAP).
        let mut repair = false;
        let mut last_run: Option<Instant> = None;
        loop {
            let since = |gap: Duration| last_run.is_none_or(|t| t.elapsed() >= gap);
            let due = !interval.is_zero() && last_run.is_some() && since(interval);
            if wanted || due || (repair && since(REPAIR_GAP)) || self.redis_lost_entries().await {
                let outcome = self.materialize().await;
                let label = if outcome.is_ok() { "ok" } else { "failed" };
                self.metrics
                    .materializations
                    .with_label_values(&[label])
                    .inc();
                match outcome {
                    Ok(report) => {
                        tracing::info!(
                            entities = report.entities,
                            written = report.written,
                            took_ms = report.took.as_millis() as u64,
                            "materialized PostgreSQL's entities into Redis"
                        );
                        wanted = false;
                        repair = false;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "materialization failed; retrying shortly");
                        wanted = true;
                    }
                }
                last_run = Some(Instant::now());
            }
            let hup = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            let wake = match last_run {
                // Woken for a held-back repair as soon as its gap is over.
                Some(t) if repair => CHECK_EVERY.min(REPAIR_GAP.saturating_sub(t.elapsed())),
                _ => CHECK_EVERY,
            };
            tokio::select! {
                // The regular check: the marker, the interval, a failed run to retry.
                _ = tokio::time::sleep(wake) => {}
                // A write-through failed: its entity may be stale in Redis.
                _ = self.materialize_wanted.notified() => repair = true,
                // The operator asked for a run.
                _ = hup => wanted = true,
            }
        }
    }
}
