//! The changes an admin (or the mesh itself) can make to a model's policy, and what each does
//! to it: pure functions of the policy before, checked before anything is written.

use serde::Serialize;

use crate::policy::{Policy, Rollout, PRODUCTION};
use crate::store::StoreError;

/// A change to one model's policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Change {
    /// Point `alias` at `version`. Promoting `production` remembers the old production for
    /// [`Change::Rollback`] and ends a rollout of that same version (it has fully arrived).
    SetAlias {
        /// The alias, e.g. `production` or `staging`.
        alias: String,
        /// The version.
        version: String,
    },
    /// Production back to the version before the last promotion; any rollout stops.
    Rollback,
    /// Start or adjust a rollout of `candidate` to `percent` % of entities.
    SetRollout {
        /// The candidate version.
        candidate: String,
        /// 0 to 100.
        percent: f64,
        /// Promote it after this many seconds of healthy bake (`None`: never by itself).
        promote_after_secs: Option<f64>,
    },
    /// Make the rollout's `candidate` production (the bake passed). Refused unless `candidate`
    /// is still the rollout's candidate, so of several gateways judging at once one promotes.
    PromoteCandidate {
        /// The candidate version.
        candidate: String,
    },
    /// End the rollout: every entity back on production.
    StopRollout,
    /// Copy live requests to `version`.
    SetShadow {
        /// The shadow version.
        version: String,
    },
    /// Stop shadowing.
    StopShadow,
}

impl Change {
    pub(crate) fn action(&self) -> &'static str {
        match self {
            Change::SetAlias { .. } => "set_alias",
            Change::Rollback => "rollback",
            Change::SetRollout { .. } => "set_rollout",
            Change::PromoteCandidate { .. } => "promote_candidate",
            Change::StopRollout => "stop_rollout",
            Change::SetShadow { .. } => "set_shadow",
            Change::StopShadow => "stop_shadow",
        }
    }
}

/// `before` with `change` applied, and the (from, to) versions for the audit record; or why
/// the change does not apply.
pub(crate) fn changed(
    before: &Policy,
    change: &Change,
) -> Result<(Policy, Option<String>, Option<String>), StoreError> {
    let mut after = before.clone();
    let production = before.production().map(str::to_owned);
    match change {
        Change::SetAlias { alias, version } => {
            let from = after.aliases.insert(alias.clone(), version.clone());
            if alias == PRODUCTION {
                if from.as_deref() != Some(version.as_str()) {
                    after.previous_production = from.clone();
                }
                if after
                    .rollout
                    .as_ref()
                    .is_some_and(|r| &r.candidate == version)
                {
                    after.rollout = None;
                }
            }
            Ok((after, from, Some(version.clone())))
        }
        Change::Rollback => {
            let Some(previous) = before.previous_production.clone() else {
                return Err(StoreError::Refused(format!(
                    "model {} has no previous production version to roll back to",
                    before.model
                )));
            };
            after.aliases.insert(PRODUCTION.into(), previous.clone());
            after.previous_production = production.clone();
            after.rollout = None;
            Ok((after, production, Some(previous)))
        }
        Change::SetRollout {
            candidate,
            percent,
            promote_after_secs,
        } => {
            after.rollout = Some(rollout(before, candidate, *percent, *promote_after_secs)?);
            Ok((after, production, Some(candidate.clone())))
        }
        Change::PromoteCandidate { candidate } => {
            if before.rollout.as_ref().map(|r| &r.candidate) != Some(candidate) {
                return Err(StoreError::Refused(format!(
                    "version {candidate} is no longer the rollout's candidate of model {}",
                    before.model
                )));
            }
            after.aliases.insert(PRODUCTION.into(), candidate.clone());
            after.previous_production = production.clone();
            after.rollout = None;
            Ok((after, production, Some(candidate.clone())))
        }
        Change::StopRollout => {
            let Some(rollout) = before.rollout.clone() else {
                return Err(StoreError::Refused(format!(
                    "model {} has no rollout to stop",
                    before.model
                )));
            };
            after.rollout = None;
            Ok((after, Some(rollout.candidate), production))
        }
        Change::SetShadow { version } => {
            after.shadow = Some(version.clone());
            Ok((after, before.shadow.clone(), Some(version.clone())))
        }
        Change::StopShadow => {
            after.shadow = None;
            Ok((after, before.shadow.clone(), None))
        }
    }
}

/// The rollout `SetRollout` asks for, checked against `before`.
fn rollout(
    before: &Policy,
    candidate: &str,
    percent: f64,
    promote_after_secs: Option<f64>,
) -> Result<Rollout, StoreError> {
    if !(0.0..=100.0).contains(&percent) || percent.is_nan() {
        return Err(StoreError::Refused(format!(
            "rollout percentage {percent} is outside 0..100"
        )));
    }
    if let Some(bake) = promote_after_secs.filter(|b| !(b.is_finite() && *b > 0.0)) {
        return Err(StoreError::Refused(format!(
            "promote-after {bake} s is not a positive number of seconds"
        )));
    }
    if before.production() == Some(candidate) {
        return Err(StoreError::Refused(format!(
            "version {candidate} is already production"
        )));
    }
    // Adjusting the same candidate keeps its bake's start; a new candidate starts anew.
    let since = match &before.rollout {
        Some(r) if r.candidate == candidate && r.since_unix_micros > 0 => r.since_unix_micros,
        _ => mesh_runtime::clock::unix_micros(),
    };
    Ok(Rollout {
        candidate: candidate.to_owned(),
        percent,
        promote_after_secs,
        since_unix_micros: since,
    })
}
