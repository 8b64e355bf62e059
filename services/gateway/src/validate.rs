//! Validation of request-time features against the model's manifest, and assembly of the
//! full feature vector from stored and request features.

use std::collections::{BTreeMap, HashMap};

use mesh_proto::types::{feature_value::Kind, FeatureValue};
use mesh_runtime::registry::{FeatureKind, ModelManifest};
use mesh_runtime::text::control_character;

use crate::error::GatewayError;

pub use mesh_runtime::text::MAX_STRING_BYTES;

/// Checks an entity id.
pub fn entity_id(id: &str) -> Result<(), GatewayError> {
    match mesh_runtime::text::entity_id_problem(id) {
        Some(problem) => Err(GatewayError::InvalidArgument(format!(
            "entity_id {problem}"
        ))),
        None => Ok(()),
    }
}

/// Checks request-time features: each must be a feature of the model, of the right type, with
/// a usable value. All problems are reported together, each naming its feature.
pub fn request_features(
    manifest: &ModelManifest,
    features: &HashMap<String, FeatureValue>,
) -> Result<(), GatewayError> {
    let mut unknown = Vec::new();
    let mut problems = Vec::new();
    let mut names: Vec<&String> = features.keys().collect();
    names.sort();
    for name in names {
        let value = &features[name];
        let Some(spec) = manifest.feature(name) else {
            unknown.push(name.as_str());
            continue;
        };
        match (&value.kind, spec.kind) {
            (None, _) => problems.push(format!("{name} has no value")),
            (Some(Kind::Number(n)), FeatureKind::Number) if !n.is_finite() => {
                problems.push(format!("{name} must be a finite number, got {n}"))
            }
            (Some(Kind::Number(n)), FeatureKind::Number) if n.abs() > f32::MAX as f64 => {
                problems.push(format!("{name} is out of float32 range"))
            }
            (Some(Kind::Category(c)), FeatureKind::Category) if c.len() > MAX_STRING_BYTES => {
                problems.push(format!(
                    "{name} is {} bytes long; the limit is {MAX_STRING_BYTES}",
                    c.len()
                ))
            }
            (Some(Kind::Category(c)), FeatureKind::Category) if control_character(c).is_some() => {
                problems.push(format!(
                    "{name} contains a control character ({})",
                    control_character(c).unwrap_or_default()
                ))
            }
            (Some(Kind::Number(_)), FeatureKind::Category) => {
                problems.push(format!("{name} must be a category, got a number"))
            }
            (Some(Kind::Category(_)), FeatureKind::Number) => {
                problems.push(format!("{name} must be a number, got a category"))
            }
            _ => {}
        }
    }
    let mut parts = Vec::new();
    if !unknown.is_empty() {
        parts.push(format!(
            "unknown features for model {}: {}",
            manifest.name,
            unknown.join(", ")
        ));
    }
    if !problems.is_empty() {
        parts.push(format!("invalid features: {}", problems.join("; ")));
    }
    if parts.is_empty() {
        Ok(())
    } else {
        Err(GatewayError::InvalidArgument(parts.join("; ")))
    }
}

/// Whether the request alone supplies every feature of the model.
pub fn request_is_complete(
    manifest: &ModelManifest,
    features: &HashMap<String, FeatureValue>,
) -> bool {
    manifest
        .features
        .iter()
        .all(|f| features.contains_key(&f.name))
}

/// The features the model needs that the request does not supply.
pub fn missing_from_request<'m>(
    manifest: &'m ModelManifest,
    features: &HashMap<String, FeatureValue>,
) -> Vec<&'m str> {
    manifest
        .features
        .iter()
        .filter(|f| !features.contains_key(&f.name))
        .map(|f| f.name.as_str())
        .collect()
}

/// The model's feature vector (manifest order): request values first, stored ones otherwise.
/// Fails naming missing features, or stored features whose type does not fit.
pub fn assemble(
    manifest: &ModelManifest,
    entity_id: &str,
    request: &HashMap<String, FeatureValue>,
    stored: Option<&HashMap<String, FeatureValue>>,
) -> Result<Vec<Kind>, GatewayError> {
    let mut row = Vec::with_capacity(manifest.features.len());
    let mut missing = Vec::new();
    let mut mistyped = Vec::new();
    for spec in &manifest.features {
        let value = request
            .get(&spec.name)
            .or_else(|| stored.and_then(|s| s.get(&spec.name)))
            .and_then(|v| v.kind.clone());
        match (value, spec.kind) {
            (None, _) => missing.push(spec.name.as_str()),
            (Some(Kind::Number(n)), FeatureKind::Number) => row.push(Kind::Number(n)),
            (Some(Kind::Category(c)), FeatureKind::Category) => row.push(Kind::Category(c)),
            (Some(_), kind) => mistyped.push(format!("{} (expected {})", spec.name, kind.as_str())),
        }
    }
    if !missing.is_empty() {
        return Err(GatewayError::InvalidArgument(format!(
            "missing features for model {} and entity {entity_id:?}: {} (supply them in the request)",
            manifest.name,
            missing.join(", ")
        )));
    }
    if !mistyped.is_empty() {
        return Err(GatewayError::FailedPrecondition(format!(
            "stored features of entity {entity_id:?} do not fit model {}: {}",
            manifest.name,
            mistyped.join(", ")
        )));
    }
    Ok(row)
}

/// Request and stored features merged (request wins), for the prediction log.
pub fn merged(
    request: &HashMap<String, FeatureValue>,
    stored: Option<&HashMap<String, FeatureValue>>,
) -> BTreeMap<String, FeatureValue> {
    let mut out: BTreeMap<String, FeatureValue> = stored
        .map(|s| s.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    for (k, v) in request {
        out.insert(k.clone(), v.clone());
    }
    out
}
