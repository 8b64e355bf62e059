//! Model lifecycle on the gateway: which version scores each request, and the admin API that
//! changes it.
//!
//! # Layout
//! - [`readiness`]: which versions each inference replica reports ready (its catalog, polled).
//! - [`routing`]: the version for a request: a pinned version or alias, else the live
//!   registry's policy for the entity (a sticky rollout), never a version no replica has ready.
//! - [`canary`]: a rollout whose candidate breaches its error rate or latency against
//!   production stops itself.
//! - [`drift`]: PSI of each version's recent scores and features against its training reference.
//! - [`shadow`]: copies of live predictions scored by a shadow version, compared, never waited for.
//! - [`admin`]: `mesh.admin.v1.ModelAdmin`, behind the admin keys.

pub mod admin;
pub mod canary;
pub mod drift;
pub mod readiness;
pub mod routing;
pub mod shadow;

use mesh_registry::RegistrySettings;
use mesh_runtime::config::{ConfigError, Settings};

use crate::auth::{parse_key_list, ApiKey};
use crate::error::StartupError;

/// Where the live registry is and who may change it.
#[derive(Debug, Clone, Default)]
pub struct LifecycleSettings {
    /// `MESH_REGISTRY_DATABASE_URL`, `MESH_REGISTRY_INTERVAL_MS`.
    pub registry: RegistrySettings,
    /// `MESH_ADMIN_KEYS`: who may call the admin API (none: nobody).
    pub admin_keys: Vec<ApiKey>,
    /// `MESH_AUDIT_RETENTION_DAYS`: days of audit records kept (see
    /// [`mesh_registry::retention`]).
    pub audit_retention_days: u32,
    /// `MESH_CANARY_LATENCY_SLACK_MS`: added to twice production's p99 before a candidate's p99
    /// is a breach (see [`canary`]).
    pub canary_latency_slack: std::time::Duration,
}

impl LifecycleSettings {
    /// Reads the settings.
    pub fn read(s: &Settings<'_>) -> Result<Self, StartupError> {
        Ok(Self {
            registry: RegistrySettings::read(s)?,
            admin_keys: parse_key_list("MESH_ADMIN_KEYS", &s.string("MESH_ADMIN_KEYS"))
                .map_err(StartupError::Config)?,
            audit_retention_days: match s.parse::<u32>("MESH_AUDIT_RETENTION_DAYS")? {
                0 => {
                    return Err(StartupError::Setting(ConfigError {
                        variable: "MESH_AUDIT_RETENTION_DAYS".into(),
                        value: "0".into(),
                        problem: "must be at least 1 day (an audit log kept for no time is none)"
                            .into(),
                    }))
                }
                days => days,
            },
            canary_latency_slack: s.millis("MESH_CANARY_LATENCY_SLACK_MS")?,
        })
    }
}
