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
//! - [`store`]: reading the state, and every change as one transaction with its audit record.
//! - [`follow`]: a task that keeps a current copy of the state (`LISTEN` + periodic re-read).

pub mod follow;
pub mod policy;
pub mod schema;
pub mod store;

pub use follow::{follow, Following};
pub use policy::{Policy, RegistryState, Rollout};
pub use store::{AuditRecord, Change, RegistryStore, StoreError};
