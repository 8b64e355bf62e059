//! Which versions a replica holds, and the task that makes it so.
//!
//! What is wanted comes from the live registry (every version some policy references: aliases,
//! the rollback target, a rollout candidate, a shadow) or, without one, from the disk (every
//! version, the `aliases.json` production). On every change the task unloads what is no longer
//! wanted, [`UNLOAD_GRACE`] later (calls still running on it finish first: they hold it), and
//! loads what is new, one
//! version at a time on a blocking thread: load, warm up, run the golden fixture, and only then
//! mark it ready. A version that fails is marked failed with the reason and never serves; the
//! others keep serving. The replica reports SERVING once the first round is done and at least
//! one version is ready.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mesh_registry::RegistryState;
use mesh_runtime::registry::ModelRegistry;
use mesh_runtime::Health;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::catalog::{Key, State};
use crate::golden::{self, Verdict};
use crate::model::LoadedModel;
use crate::InferenceService;

/// How long a version no policy references any more is kept before it is unloaded. Gateways
/// learn of a change at about the same moment as replicas, but not at the same instant: a
/// gateway a few milliseconds behind may still send the old candidate a request, which would
/// otherwise find it gone (and be retried elsewhere). Longer than the registry's notification
/// and the gateways' 500 ms readiness poll.
pub const UNLOAD_GRACE: Duration = Duration::from_secs(3);

/// What the replica should hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// Versions to hold.
    pub versions: BTreeSet<Key>,
    /// Model → production version.
    pub production: BTreeMap<String, String>,
}

/// Every version on disk, production from `aliases.json`.
pub fn from_disk(disk: &ModelRegistry) -> Desired {
    Desired {
        versions: disk
            .models
            .values()
            .flat_map(|m| m.versions.keys().map(|v| (m.name.clone(), v.clone())))
            .collect(),
        production: disk
            .models
            .values()
            .map(|m| (m.name.clone(), m.production.clone()))
            .collect(),
    }
}

/// What a replica following a live registry holds before its first read of it: each model's
/// `aliases.json` production (what the registry is seeded with). It can serve with that while
/// PostgreSQL is unreachable, without first loading every version on disk (old ones, broken
/// ones, slow ones), reporting SERVING only once they are all done, to drop them a moment later
/// when the registry is read.
pub fn production_from_disk(disk: &ModelRegistry) -> Desired {
    let production = from_disk(disk).production;
    Desired {
        versions: production
            .iter()
            .map(|(model, version)| (model.clone(), version.clone()))
            .collect(),
        production,
    }
}

/// Every version the registry's policies reference, production from the registry.
pub fn from_registry(state: &RegistryState) -> Desired {
    Desired {
        versions: state.referenced().into_iter().collect(),
        production: state
            .policies
            .values()
            .filter_map(|p| Some((p.model.clone(), p.production()?.to_owned())))
            .collect(),
    }
}

/// Keeps `service`'s catalog equal to what `desired` says (a version leaving it
/// [`UNLOAD_GRACE`] later), until the sender is dropped.
pub async fn run(
    service: Arc<InferenceService>,
    mut desired: watch::Receiver<Desired>,
    health: Health,
) {
    let mut serving = false;
    // Versions no longer wanted, and when they go.
    let mut leaving: BTreeMap<Key, Instant> = BTreeMap::new();
    loop {
        let want = desired.borrow_and_update().clone();
        service.set_production(want.production.clone());
        // The disk is read once per round, for what is on it and for every version loaded.
        let models_dir = &service.config().models.dir;
        let disk = ModelRegistry::load(models_dir)
            .map_err(|e| format!("{e} (models under {})", models_dir.display()));
        if let Ok(disk) = &disk {
            service.set_on_disk(from_disk(disk).versions);
        }
        let keep = keep_for_now(&service, &want.versions, &mut leaving);
        for (model, version) in service.catalog().retain(&keep) {
            tracing::info!(%model, %version, "version no longer referenced: unloaded once its calls end");
        }
        let missing: Vec<Key> = want
            .versions
            .difference(&service.catalog().keys())
            .cloned()
            .collect();
        for key in &missing {
            service.catalog().set(key.clone(), State::Loading);
        }
        let loader = service.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for key in missing {
                let state = load(&loader, &disk, &key);
                loader.catalog().set(key, state);
            }
        })
        .await;
        if !serving && service.catalog().any_ready() {
            serving = true;
            tracing::info!("models loaded and warm: SERVING");
            health.set_serving().await;
        }
        // Why wake: a change, or the next leaving version's time is up.
        let next = leaving.values().min().copied();
        tokio::select! {
            changed = desired.changed() => if changed.is_err() { return },
            () = sleep_until(next) => {}
        }
    }
}

/// What the catalog keeps this round: what is wanted, and what stopped being wanted less than
/// [`UNLOAD_GRACE`] ago (noted in `leaving` when first seen unwanted).
fn keep_for_now(
    service: &InferenceService,
    want: &BTreeSet<Key>,
    leaving: &mut BTreeMap<Key, Instant>,
) -> BTreeSet<Key> {
    let now = Instant::now();
    for key in service.catalog().keys() {
        if !want.contains(&key) {
            leaving.entry(key).or_insert(now + UNLOAD_GRACE);
        }
    }
    leaving.retain(|key, until| !want.contains(key) && *until > now);
    want.iter().chain(leaving.keys()).cloned().collect()
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Loads, warms and checks one version of `disk` (the registry as read this round). Blocking.
fn load(
    service: &InferenceService,
    disk: &Result<ModelRegistry, String>,
    (model, version): &Key,
) -> State {
    let started = std::time::Instant::now();
    let models = &service.config().models;
    let result = (|| {
        let entry = disk
            .as_ref()
            .map_err(Clone::clone)?
            .resolve(model, version)
            .map_err(|e| format!("{e} on disk under {}", models.dir.display()))?;
        let env = service.environment().map_err(|e| e.to_string())?;
        let loaded =
            LoadedModel::load(env, entry, models.sessions_per_model).map_err(|e| e.to_string())?;
        loaded
            .warm_up(models.warmup_iterations)
            .map_err(|e| e.to_string())?;
        let dir = entry.model_path.parent().unwrap_or(Path::new("."));
        let diff = match golden::check(&loaded, dir)? {
            Verdict::Passed { max_abs_diff, rows } => {
                tracing::info!(%model, %version, rows, max_abs_diff, "golden fixture passed");
                Some(max_abs_diff)
            }
            Verdict::Missing => {
                tracing::warn!(%model, %version, "no golden.json beside the model: serving it unchecked");
                None
            }
        };
        Ok::<_, String>(State::Ready(Arc::new(loaded), diff))
    })();
    match result {
        Ok(state) => {
            tracing::info!(%model, %version, elapsed = ?started.elapsed(), "version ready");
            state
        }
        Err(reason) => {
            tracing::error!(%model, %version, %reason, "version failed to load; it takes no traffic");
            State::Failed(reason)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_a_live_registry_a_replica_starts_with_production_only() {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        let disk = ModelRegistry::load(&models).expect("the repository's models");
        let everything = from_disk(&disk);
        assert!(everything.versions.len() > 1, "{everything:?}");
        let start = production_from_disk(&disk);
        let production = disk.models["churn"].production.clone();
        assert_eq!(
            start.versions,
            BTreeSet::from([("churn".to_owned(), production)])
        );
        assert_eq!(start.production, everything.production);
    }
}
