//! One model's policy: which version serves whom.
//!
//! A rollout is sticky: an entity's bucket is a stable hash of (model, entity id) in
//! `0..10_000`, and the candidate takes the buckets below `percent × 100`. The same entity gets
//! the same version while the percentage is unchanged, and raising it only moves entities from
//! production to the candidate, never back. The hash is FNV-1a (64 bit), fixed by this code, so
//! every gateway, of any build, routes an entity the same way.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Buckets an entity can fall in; a percentage of them goes to the candidate.
pub const BUCKETS: u64 = 10_000;

/// A candidate version taking a share of the entities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// The candidate version.
    pub candidate: String,
    /// Share of entities, 0 to 100.
    pub percent: f64,
    /// Promote the candidate to production once it has been out this long (seconds) and the
    /// canary judges it healthy; `None`: a person promotes it.
    #[serde(default)]
    pub promote_after_secs: Option<f64>,
    /// When this candidate's rollout started (Unix microseconds; adjusting the percentage keeps
    /// it), the start of its bake.
    #[serde(default)]
    pub since_unix_micros: i64,
}

/// One model's policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// The model.
    pub model: String,
    /// Alias → version; `production` is the one requests without a version get.
    pub aliases: BTreeMap<String, String>,
    /// Production before the last promotion: where a rollback goes.
    pub previous_production: Option<String>,
    /// A candidate taking a share of the entities.
    pub rollout: Option<Rollout>,
    /// A version that receives a copy of live requests.
    pub shadow: Option<String>,
    /// Bumped by every change.
    pub generation: i64,
}

/// The alias every model has.
pub const PRODUCTION: &str = "production";

impl Policy {
    /// The production version.
    pub fn production(&self) -> Option<&str> {
        self.aliases.get(PRODUCTION).map(String::as_str)
    }

    /// The version that scores `entity_id` when the request names no version: the rollout's
    /// candidate for its share of entities, production otherwise.
    pub fn route(&self, entity_id: &str) -> Option<&str> {
        if let Some(rollout) = &self.rollout {
            if takes(&self.model, entity_id, rollout.percent) {
                return Some(&rollout.candidate);
            }
        }
        self.production()
    }

    /// Every version this policy references (aliases, rollback target, candidate, shadow):
    /// what inference replicas keep loaded.
    pub fn referenced_versions(&self) -> Vec<&str> {
        let mut versions: Vec<&str> = self.aliases.values().map(String::as_str).collect();
        versions.extend(self.previous_production.as_deref());
        versions.extend(self.rollout.as_ref().map(|r| r.candidate.as_str()));
        versions.extend(self.shadow.as_deref());
        versions.sort_unstable();
        versions.dedup();
        versions
    }
}

/// Whether an entity with this (model, entity id) falls in the first `percent` % of buckets.
pub fn takes(model: &str, entity_id: &str, percent: f64) -> bool {
    (bucket(model, entity_id) as f64) < percent * (BUCKETS as f64) / 100.0
}

/// The entity's bucket in `0..BUCKETS`: FNV-1a over `model`, a zero byte, `entity_id`.
pub fn bucket(model: &str, entity_id: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for byte in model.bytes().chain([0u8]).chain(entity_id.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    hash % BUCKETS
}

/// Every model's policy, as last read from PostgreSQL.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegistryState {
    /// Policies by model.
    pub policies: BTreeMap<String, Policy>,
}

impl RegistryState {
    /// The policy of `model`.
    pub fn policy(&self, model: &str) -> Option<&Policy> {
        self.policies.get(model)
    }

    /// Every (model, version) some policy references.
    pub fn referenced(&self) -> Vec<(String, String)> {
        self.policies
            .values()
            .flat_map(|p| {
                p.referenced_versions()
                    .into_iter()
                    .map(|v| (p.model.clone(), v.to_owned()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(percent: f64) -> Policy {
        Policy {
            model: "churn".into(),
            aliases: [(PRODUCTION.to_owned(), "1".to_owned())].into(),
            previous_production: None,
            rollout: Some(Rollout {
                candidate: "2".into(),
                percent,
                promote_after_secs: None,
                since_unix_micros: 0,
            }),
            shadow: None,
            generation: 1,
        }
    }

    #[test]
    fn a_rollout_is_sticky_monotonic_and_close_to_its_percentage() {
        let entities: Vec<String> = (0..10_000).map(|i| format!("cust-{i:05}")).collect();
        let mut previous: Option<Vec<bool>> = None;
        for percent in [0.0, 10.0, 50.0, 90.0, 100.0] {
            let p = policy(percent);
            let on_candidate: Vec<bool> =
                entities.iter().map(|e| p.route(e) == Some("2")).collect();
            // Sticky: routing the same entity again gives the same version.
            assert!(entities
                .iter()
                .zip(&on_candidate)
                .all(|(e, c)| (p.route(e) == Some("2")) == *c));
            let share = on_candidate.iter().filter(|c| **c).count() as f64 / 100.0;
            assert!(
                (share - percent).abs() <= 1.5,
                "{share} % on the candidate at {percent} %"
            );
            // Monotonic: raising the percentage never moves an entity back.
            if let Some(before) = &previous {
                assert!(before.iter().zip(&on_candidate).all(|(b, a)| !b || *a));
            }
            previous = Some(on_candidate);
        }
    }

    #[test]
    fn the_bucket_is_fixed_by_this_code() {
        // Every gateway must route an entity the same way: these values may never change.
        assert_eq!(bucket("churn", "cust-00001"), bucket("churn", "cust-00001"));
        assert_ne!(bucket("churn", "ab"), bucket("churna", "b"));
        assert_eq!(bucket("", ""), 0xaf63_bd4c_8601_b7df % BUCKETS);
    }
}
