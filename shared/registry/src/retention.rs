//! The audit log stays bounded: records older than the retention window
//! (`MESH_AUDIT_RETENTION_DAYS` in the gateway, a year by default) are deleted, hourly, in
//! batches of [`BATCH`] rows, each batch its own short statement.
//!
//! Why deletes and not the prediction log's daily partitions: `model_audit` holds one row per
//! change to a policy (an admin action or an automatic rollback), a few a day at most, not
//! 1,500 a second. Partitioning it would add a partition per day (365 catalog objects for a
//! year of a few hundred rows), a task creating them ahead, and a primary key that must carry
//! the partition key. At this volume a run deletes a handful of rows through the index on `at`
//! (migration 2) and autovacuum reclaims them; the batch bound keeps even a first run on a
//! years-old table from holding locks or a long transaction.

use std::time::Duration;

use mesh_runtime::postgres::{bounded, connection};
use tokio::task::JoinHandle;

use crate::store::{RegistryStore, StoreError};

/// Rows deleted per statement.
pub const BATCH: i64 = 1000;
/// How often the audit log is trimmed.
pub const EVERY: Duration = Duration::from_secs(3600);

impl RegistryStore {
    /// Deletes the audit records older than `keep_days` days, [`BATCH`] rows per statement,
    /// until none is left; returns how many went.
    pub async fn trim_audit(&self, keep_days: u32) -> Result<u64, StoreError> {
        let days = i32::try_from(keep_days).unwrap_or(i32::MAX);
        let mut deleted = 0;
        loop {
            let n = bounded(self.limit(), async {
                let client = connection(self.pool()).await?;
                Ok(client
                    .execute(
                        "DELETE FROM model_audit WHERE id IN (
                             SELECT id FROM model_audit
                             WHERE at < now() - make_interval(days => $1)
                             ORDER BY at LIMIT $2)",
                        &[&days, &BATCH],
                    )
                    .await?)
            })
            .await?;
            deleted += n;
            if n < BATCH as u64 {
                return Ok(deleted);
            }
        }
    }
}

/// The running trimmer; dropping it stops the task.
pub struct AuditRetention {
    task: JoinHandle<()>,
}

impl Drop for AuditRetention {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Trims `store`'s audit log to `keep_days` days now and every [`EVERY`]; a failed run (the
/// database unreachable) is logged and tried again at the next tick.
pub fn spawn(store: RegistryStore, keep_days: u32) -> AuditRetention {
    let task = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match store.trim_audit(keep_days).await {
                Ok(0) => {}
                Ok(deleted) => {
                    tracing::info!(deleted, keep_days, "model_audit: old records deleted")
                }
                Err(error) => tracing::warn!(%error, "model_audit: trimming failed; next hour"),
            }
        }
    });
    AuditRetention { task }
}
