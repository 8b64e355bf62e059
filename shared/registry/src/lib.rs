//! The live model registry. Artifacts stay on disk (`models/<name>/<version>/`); which version
//! each alias points to, a percentage rollout of a candidate, and a shadow version live in
//! PostgreSQL, the one durable source of truth every gateway and inference replica follows.
//!
//! Why PostgreSQL: the mesh already runs it (the feature store and the prediction log), it gives
//! transactions for "change the policy and write the audit record" as one step, and
//! `LISTEN/NOTIFY` tells followers of a change at once; a periodic re-read covers a missed
//! notification or a reconnect. No new component to operate.
//!
//! # Layout
//! - [`schema`]: the tables and their migrations.
//! - [`policy`]: one model's policy, and routing an entity by a stable hash (sticky rollouts).
//! - [`change`](mod@change): the changes and what each does to a policy (checked, pure).
//! - [`store`]: reading the state, and every change as one transaction with its audit record.
//! - [`follow`](mod@follow): a task that keeps a current copy of the state (`LISTEN` + periodic re-read).
//! - [`retention`]: the audit log trimmed to a retention window, in bounded batches.

pub mod change;
pub mod follow;
pub mod policy;
pub mod retention;
pub mod schema;
pub mod store;

pub use follow::{follow, Following};
pub use policy::{Policy, RegistryState, Rollout};
pub use store::{AuditRecord, Change, RegistryStore, StoreError};

/// Where the live registry is, for a service that follows it: `MESH_REGISTRY_DATABASE_URL`
/// (unset: no live registry; models and the production alias come from the disk, read at
/// start) and `MESH_REGISTRY_INTERVAL_MS` (the re-read interval behind `LISTEN/NOTIFY`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrySettings {
    /// PostgreSQL URL of the registry, if any.
    pub url: Option<String>,
    /// Longest a follower goes without re-reading.
    pub interval: std::time::Duration,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            url: None,
            interval: std::time::Duration::from_secs(1),
        }
    }
}

impl RegistrySettings {
    /// Reads both settings (they must be in the service's table).
    pub fn read(
        s: &mesh_runtime::config::Settings<'_>,
    ) -> Result<Self, mesh_runtime::config::ConfigError> {
        Ok(Self {
            url: s.optional("MESH_REGISTRY_DATABASE_URL"),
            interval: s.millis("MESH_REGISTRY_INTERVAL_MS")?,
        })
    }
}
