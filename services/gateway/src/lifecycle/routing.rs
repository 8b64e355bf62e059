//! The version that scores a request.
//!
//! - A request that pins a version gets that version; one that names an alias (`production`,
//!   `staging`, ...) gets what the alias points at.
//! - Otherwise the live registry's policy decides for the entity: a rollout candidate for its
//!   sticky share of entities, production for the rest.
//! - Never a version that no replica reports ready when another referenced version is: right
//!   after a promotion (or the start of a rollout) replicas are still loading the new version, so
//!   its share stays on the version that served it before, and moves over once a replica has it
//!   ready. A promotion therefore costs no failed request. Such fallbacks are counted in
//!   `mesh_route_fallbacks_total{model}`.
//!
//! Without a live registry (`MESH_REGISTRY_DATABASE_URL` unset), production is the disk's
//! `aliases.json`, read at start.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use mesh_registry::{Following, Policy, RegistryState};
use mesh_runtime::registry::{ModelRegistry, ModelVersion, RegistryError};
use prometheus::{IntCounterVec, Opts, Registry};
use tokio::sync::watch;

use super::readiness::ReplicaVersions;
use crate::error::GatewayError;

/// Chooses versions for requests.
pub struct Router {
    models_dir: PathBuf,
    disk: RwLock<Arc<ModelRegistry>>,
    /// When the disk was last re-read for an unknown version (at most once a second, so
    /// requests naming invented versions cannot turn into a directory scan each).
    reread_at: std::sync::Mutex<Option<std::time::Instant>>,
    state: Option<watch::Receiver<Arc<RegistryState>>>,
    /// Keeps the live registry followed while the router lives.
    _following: Option<Following>,
    ready: Arc<ReplicaVersions>,
    fallbacks: IntCounterVec,
}

impl Router {
    /// A router over the models in `models_dir` (already read as `disk`), following the live
    /// registry when there is one, and `ready` for what replicas can serve.
    pub fn new(
        models_dir: PathBuf,
        disk: Arc<ModelRegistry>,
        following: Option<Following>,
        ready: Arc<ReplicaVersions>,
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        let fallbacks = IntCounterVec::new(
            Opts::new(
                "mesh_route_fallbacks_total",
                "Requests scored by the version they had before, because the one the policy \
                 names (a new production, a rollout candidate) was not ready on any replica yet",
            ),
            &["model"],
        )?;
        registry.register(Box::new(fallbacks.clone()))?;
        for model in disk.models.keys() {
            fallbacks.with_label_values(&[model.as_str()]);
        }
        Ok(Self {
            models_dir,
            disk: RwLock::new(disk),
            reread_at: std::sync::Mutex::new(None),
            state: following.as_ref().map(|f| f.state.clone()),
            _following: following,
            ready,
            fallbacks,
        })
    }

    /// The models on disk (re-read when a version appears that was not there at start).
    pub fn disk(&self) -> Arc<ModelRegistry> {
        self.disk.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The live registry's current state, if the gateway follows one.
    pub fn state(&self) -> Option<Arc<RegistryState>> {
        self.state.as_ref().map(|s| s.borrow().clone())
    }

    /// What replicas report ready.
    pub fn ready(&self) -> &Arc<ReplicaVersions> {
        &self.ready
    }

    /// The version on disk, re-reading the disk (at most once a second) if it is not known yet.
    pub fn version(&self, model: &str, version: &str) -> Result<ModelVersion, GatewayError> {
        match self.disk().resolve(model, version) {
            Ok(found) => return Ok(found.clone()),
            Err(RegistryError::UnknownModel(_)) => {}
            Err(RegistryError::UnknownVersion { .. }) => {
                let due = {
                    let mut at = self.reread_at.lock().unwrap_or_else(|e| e.into_inner());
                    let due = at.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1));
                    if due {
                        *at = Some(std::time::Instant::now());
                    }
                    due
                };
                if due {
                    if let Ok(fresh) = ModelRegistry::load(&self.models_dir) {
                        *self.disk.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
                    }
                }
            }
            Err(other) => return Err(other.into()),
        }
        Ok(self.disk().resolve(model, version)?.clone())
    }

    /// The rollout candidate of `model` and its production version, while a rollout runs.
    pub fn candidate_and_production(&self, model: &str) -> Option<(String, String)> {
        let state = self.state()?;
        let policy = state.policy(model)?;
        Some((
            policy.rollout.as_ref()?.candidate.clone(),
            policy.production()?.to_owned(),
        ))
    }

    /// The shadow version's manifest for requests that `primary` scored, if the policy names a
    /// shadow other than `primary` and some replica has it ready.
    pub fn shadow_for(
        &self,
        model: &str,
        primary: &str,
    ) -> Option<mesh_runtime::registry::ModelManifest> {
        let state = self.state()?;
        let shadow = state.policy(model)?.shadow.clone()?;
        if shadow == primary || !self.ready.ready_anywhere(model, &shadow) {
            return None;
        }
        self.version(model, &shadow).ok().map(|v| v.manifest)
    }

    /// The version that scores `entity_id` for a request of `model` naming `requested` (a
    /// version, an alias, or nothing).
    pub fn route(
        &self,
        model: &str,
        requested: &str,
        entity_id: &str,
    ) -> Result<String, GatewayError> {
        let state = self.state();
        let policy = state.as_ref().and_then(|s| s.policy(model));
        let Some(policy) = policy else {
            // No live policy for the model: the disk's alias or the pinned version.
            return Ok(self.version(model, requested)?.manifest.version);
        };
        if !requested.is_empty() {
            return Ok(policy
                .aliases
                .get(requested)
                .cloned()
                .unwrap_or_else(|| requested.to_owned()));
        }
        let Some(preferred) = policy.route(entity_id) else {
            return Ok(self.version(model, "")?.manifest.version);
        };
        if !self.ready.known() || self.ready.ready_anywhere(model, preferred) {
            return Ok(preferred.to_owned());
        }
        match fallback(policy, preferred, |v| self.ready.ready_anywhere(model, v)) {
            Some(version) => {
                self.fallbacks
                    .with_label_values(&[policy.model.as_str()])
                    .inc();
                Ok(version.to_owned())
            }
            None => Ok(preferred.to_owned()),
        }
    }
}

/// The version to use instead of `preferred` (not ready anywhere): production, then the
/// previous production, the first that is ready.
fn fallback<'a>(
    policy: &'a Policy,
    preferred: &str,
    ready: impl Fn(&str) -> bool,
) -> Option<&'a str> {
    [policy.production(), policy.previous_production.as_deref()]
        .into_iter()
        .flatten()
        .find(|v| *v != preferred && ready(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_not_ready_anywhere_falls_back_to_production_then_the_previous_one() {
        let policy = Policy {
            model: "churn".into(),
            aliases: [("production".to_owned(), "3".to_owned())].into(),
            previous_production: Some("2".into()),
            rollout: None,
            shadow: None,
            generation: 4,
        };
        // Just promoted to 3, which no replica has loaded yet: the previous production serves.
        assert_eq!(fallback(&policy, "3", |v| v == "2"), Some("2"));
        // A candidate not ready: production.
        assert_eq!(fallback(&policy, "9", |v| v != "9"), Some("3"));
        // Nothing ready: no fallback (the preferred version is tried and its error is honest).
        assert_eq!(fallback(&policy, "3", |_| false), None);
    }
}
