//! The versions a replica holds and their state: loading, ready (takes traffic) or failed (with
//! the reason; never takes traffic). A call holds its version's `Arc`, so a version removed from
//! the catalog is freed when the last call using it ends: unloading never cuts a call short.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use crate::error::InferenceError;
use crate::model::LoadedModel;

/// (model, version).
pub type Key = (String, String);

/// Where a version is in its life on this replica.
#[derive(Clone)]
pub enum State {
    /// Loading, warming up or running its golden fixture.
    Loading,
    /// Serving; the golden fixture's largest difference, when it had one.
    Ready(Arc<LoadedModel>, Option<f64>),
    /// Not serving, and why.
    Failed(String),
}

/// One version's entry.
#[derive(Clone)]
pub struct Slot {
    /// Its state.
    pub state: State,
    /// When it entered that state, Unix microseconds.
    pub since_unix_micros: i64,
}

/// Every version this replica was asked to hold.
#[derive(Default)]
pub struct Catalog {
    slots: RwLock<BTreeMap<Key, Slot>>,
}

impl Catalog {
    /// Sets `key`'s state.
    pub fn set(&self, key: Key, state: State) {
        let slot = Slot {
            state,
            since_unix_micros: mesh_runtime::clock::unix_micros(),
        };
        self.slots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, slot);
    }

    /// The loaded version, or why it cannot serve.
    pub fn get(&self, model: &str, version: &str) -> Result<Arc<LoadedModel>, InferenceError> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        match slots
            .get(&(model.to_owned(), version.to_owned()))
            .map(|s| &s.state)
        {
            Some(State::Ready(loaded, _)) => Ok(loaded.clone()),
            Some(State::Loading) => Err(InferenceError::VersionLoading(format!(
                "model {model} version {version} is still loading on this replica"
            ))),
            Some(State::Failed(reason)) => Err(InferenceError::VersionFailed(format!(
                "model {model} version {version} failed to load on this replica: {reason}"
            ))),
            None => Err(InferenceError::NotFound(format!(
                "model {model:?} version {version:?} is not loaded on this replica"
            ))),
        }
    }

    /// The keys present.
    pub fn keys(&self) -> BTreeSet<Key> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.keys().cloned().collect()
    }

    /// Every slot, for reporting.
    pub fn snapshot(&self) -> Vec<(Key, Slot)> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.iter().map(|(k, s)| (k.clone(), s.clone())).collect()
    }

    /// Whether any version can serve.
    pub fn any_ready(&self) -> bool {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.values().any(|s| matches!(s.state, State::Ready(..)))
    }

    /// Removes every version not in `keep`; returns the ones removed. Calls still running on a
    /// removed version keep it alive until they end.
    pub fn retain(&self, keep: &BTreeSet<Key>) -> Vec<Key> {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let removed: Vec<Key> = slots
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for key in &removed {
            slots.remove(key);
        }
        removed
    }
}
