//! Limits and checks: every size a caller declares (entities per call, features per entity,
//! string lengths) is checked before the store allocates for it, and every number is checked
//! against the float32 range the models use, both when it is written and when it is served.

use std::collections::HashSet;

use mesh_proto::features::EntityFeatures;
use mesh_proto::types::feature_value::Kind;
use mesh_runtime::text::{control_character, entity_id_problem, MAX_STRING_BYTES};

use crate::error::FeaturesError;
use crate::store::Entity;

/// Most entities one call may ask for or write.
pub const MAX_ENTITIES_PER_CALL: usize = 1000;
/// Most features one entity may carry in one `PutFeatures`.
pub const MAX_FEATURES_PER_ENTITY: usize = 256;

/// What is wrong with `n` as a model input, if anything: the models take float32, so a double
/// outside its range would become infinity on the way in.
pub fn number_problem(n: f64) -> Option<String> {
    if !n.is_finite() {
        Some(format!("{n} is not a finite number"))
    } else if n.abs() > f32::MAX as f64 {
        // Scientific notation: `{}` would print all 300 digits of 1e300.
        Some(format!(
            "{n:e} is outside the float32 range the models use (|x| ≤ {:e})",
            f32::MAX
        ))
    } else {
        None
    }
}

/// Checks the entity ids of a call: how many, and each one.
pub fn ids<'a>(ids: impl Iterator<Item = &'a str>, count: usize) -> Result<(), FeaturesError> {
    if count == 0 {
        return Err(FeaturesError::InvalidArgument("no entity ids given".into()));
    }
    if count > MAX_ENTITIES_PER_CALL {
        return Err(FeaturesError::InvalidArgument(format!(
            "{count} entities in one call; the limit is {MAX_ENTITIES_PER_CALL} (MAX_ENTITIES_PER_CALL)"
        )));
    }
    for (i, id) in ids.enumerate() {
        if let Some(problem) = entity_id_problem(id) {
            return Err(FeaturesError::InvalidArgument(format!(
                "entity id #{i} {problem}"
            )));
        }
    }
    Ok(())
}

/// Checks a `PutFeatures` request: ids (each once), then every feature of every entity.
pub fn put(entities: &[EntityFeatures]) -> Result<(), FeaturesError> {
    ids(
        entities.iter().map(|e| e.entity_id.as_str()),
        entities.len(),
    )?;
    let mut seen = HashSet::with_capacity(entities.len());
    for entity in entities {
        // One upsert statement cannot touch a row twice: PostgreSQL would refuse the batch.
        if !seen.insert(entity.entity_id.as_str()) {
            return Err(FeaturesError::InvalidArgument(format!(
                "entity {:?} appears more than once; send each entity once per call",
                entity.entity_id
            )));
        }
        entity_features(entity)?;
    }
    Ok(())
}

fn entity_features(entity: &EntityFeatures) -> Result<(), FeaturesError> {
    let id = &entity.entity_id;
    let invalid = |msg: String| Err(FeaturesError::InvalidArgument(msg));
    if entity.features.len() > MAX_FEATURES_PER_ENTITY {
        return invalid(format!(
            "entity {id:?} has {} features; the limit is {MAX_FEATURES_PER_ENTITY} (MAX_FEATURES_PER_ENTITY)",
            entity.features.len()
        ));
    }
    for (name, value) in &entity.features {
        if name.trim().is_empty() {
            return invalid(format!("entity {id:?} has a feature with an empty name"));
        }
        if name.len() > MAX_STRING_BYTES {
            return invalid(format!(
                "entity {id:?} has a feature name of {} bytes; the limit is {MAX_STRING_BYTES}",
                name.len()
            ));
        }
        let text = match &value.kind {
            Some(Kind::Category(c)) if c.len() > MAX_STRING_BYTES => {
                return invalid(format!(
                    "entity {id:?} feature {name:?} is a category of {} bytes; the limit is {MAX_STRING_BYTES}",
                    c.len()
                ))
            }
            Some(Kind::Category(c)) => Some(c.as_str()),
            Some(Kind::Number(n)) => {
                if let Some(problem) = number_problem(*n) {
                    return invalid(format!("entity {id:?} feature {name:?}: {problem}"));
                }
                None
            }
            None => return invalid(format!("entity {id:?} feature {name:?} has no value")),
        };
        if let Some(c) = [Some(name.as_str()), text]
            .into_iter()
            .flatten()
            .find_map(control_character)
        {
            return invalid(format!(
                "entity {id:?} feature {name:?} contains a control character ({c})"
            ));
        }
    }
    Ok(())
}

/// Checks a stored entity before serving it: a number stored before the float32 range check
/// existed (or written around this service) is the server's data problem, said for this entity
/// only and never blamed on the caller.
pub fn stored(id: &str, entity: &Entity) -> Result<(), FeaturesError> {
    let problems: Vec<String> = entity
        .features
        .iter()
        .filter_map(|(name, value)| match value.kind {
            Some(Kind::Number(n)) => number_problem(n).map(|p| format!("{name:?}: {p}")),
            _ => None,
        })
        .collect();
    if problems.is_empty() {
        return Ok(());
    }
    Err(FeaturesError::StoredData(format!(
        "stored features of entity {id:?} are unusable: {}; the stored data must be corrected",
        problems.join("; ")
    )))
}

#[cfg(test)]
mod tests {
    use mesh_proto::types::FeatureValue;

    use super::*;

    fn entity(id: &str, features: &[(&str, Kind)]) -> EntityFeatures {
        EntityFeatures {
            entity_id: id.into(),
            found: true,
            features: features
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        FeatureValue {
                            kind: Some(v.clone()),
                        },
                    )
                })
                .collect(),
            tier: 0,
        }
    }

    fn message(result: Result<(), FeaturesError>) -> String {
        match result {
            Err(FeaturesError::InvalidArgument(msg)) => msg,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn numbers_outside_float32_are_refused_naming_entity_feature_and_value() {
        let msg = message(put(&[entity("e1", &[("x", Kind::Number(1e300))])]));
        assert!(
            msg.contains("\"e1\"") && msg.contains("\"x\"") && msg.contains("1e300"),
            "{msg}"
        );
        assert!(msg.contains("float32"), "{msg}");
        let max = f32::MAX as f64;
        assert!(put(&[entity("e1", &[("x", Kind::Number(max))])]).is_ok());
        assert!(put(&[entity("e1", &[("x", Kind::Number(-max))])]).is_ok());
        message(put(&[entity("e1", &[("x", Kind::Number(f64::NAN))])]));
        message(put(&[entity("e1", &[("x", Kind::Number(max * 1.001))])]));
    }

    #[test]
    fn sizes_are_checked_against_named_limits() {
        let many: Vec<(String, Kind)> = (0..=MAX_FEATURES_PER_ENTITY)
            .map(|i| (format!("f{i}"), Kind::Number(1.0)))
            .collect();
        let refs: Vec<(&str, Kind)> = many.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let msg = message(put(&[entity("e", &refs)]));
        assert!(msg.contains("MAX_FEATURES_PER_ENTITY"), "{msg}");
        let long = "n".repeat(MAX_STRING_BYTES + 1);
        assert!(message(put(&[entity("e", &[(&long, Kind::Number(1.0))])])).contains("limit"));
        let long_category = Kind::Category("c".repeat(MAX_STRING_BYTES + 1));
        assert!(message(put(&[entity("e", &[("c", long_category)])])).contains("limit is 256"));
        let too_many: Vec<EntityFeatures> = (0..=MAX_ENTITIES_PER_CALL)
            .map(|i| entity(&format!("e{i}"), &[]))
            .collect();
        assert!(message(put(&too_many)).contains("MAX_ENTITIES_PER_CALL"));
        let twice = [entity("e", &[]), entity("e", &[])];
        assert!(message(put(&twice)).contains("more than once"));
    }

    #[test]
    fn an_unusable_stored_number_is_the_servers_problem_naming_the_feature() {
        let mut stored_entity = Entity {
            found: true,
            ..Entity::default()
        };
        stored_entity.features.insert(
            "monthly_charges".into(),
            FeatureValue {
                kind: Some(Kind::Number(1e300)),
            },
        );
        match stored("cust-1", &stored_entity) {
            Err(e @ FeaturesError::StoredData(_)) => {
                assert_eq!(e.code(), tonic::Code::FailedPrecondition);
                assert!(e.to_string().contains("monthly_charges"), "{e}");
            }
            other => panic!("expected a stored-data error, got {other:?}"),
        }
    }
}
