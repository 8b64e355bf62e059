//! Validation of requests against limits and the model's manifest, and assembly of the full
//! feature vector from stored and request features.
//!
//! Every size a caller declares is checked against a named limit before anything is built from
//! it, and messages quote caller-supplied strings only up to [`QUOTE_BYTES`], so an error is
//! never an echo of a 4 MiB request.

use std::collections::{BTreeMap, HashMap};

use mesh_proto::types::{feature_value::Kind, FeatureValue};
use mesh_runtime::registry::{FeatureKind, FeatureSpec, ModelManifest};
use mesh_runtime::text::control_character;

use crate::error::GatewayError;

pub use mesh_runtime::text::MAX_STRING_BYTES;

/// Most features one item (a `Predict` or one `PredictBatch` item) may carry.
pub const MAX_FEATURES_PER_ITEM: usize = 256;
/// Most bytes of a caller's string quoted back in an error message.
pub const QUOTE_BYTES: usize = 64;
/// Most unknown feature names listed in one error message.
const MAX_NAMES_LISTED: usize = 10;

/// `s` quoted for a message, cut at [`QUOTE_BYTES`] (on a character boundary).
pub fn quoted(s: &str) -> String {
    if s.len() <= QUOTE_BYTES {
        return format!("{s:?}");
    }
    let mut end = QUOTE_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..end], s.len())
}

/// Checks an entity id.
pub fn entity_id(id: &str) -> Result<(), GatewayError> {
    match mesh_runtime::text::entity_id_problem(id) {
        Some(problem) => Err(GatewayError::InvalidArgument(format!(
            "entity_id {problem}"
        ))),
        None => Ok(()),
    }
}

/// Checks the model name and version pin before they are looked up (or quoted).
pub fn model_ref(model: &str, version: &str) -> Result<(), GatewayError> {
    for (field, value) in [("model", model), ("model_version", version)] {
        if value.len() > MAX_STRING_BYTES {
            return Err(GatewayError::InvalidArgument(format!(
                "{field} is {} bytes long; the limit is {MAX_STRING_BYTES}",
                value.len()
            )));
        }
        if let Some(c) = control_character(value) {
            return Err(GatewayError::InvalidArgument(format!(
                "{field} contains a control character ({c})"
            )));
        }
    }
    Ok(())
}

/// Checks the number of items of a `PredictBatch` against `max` (`MESH_MAX_BATCH_ITEMS`).
pub fn batch_len(len: usize, max: usize) -> Result<(), GatewayError> {
    if len == 0 {
        return Err(GatewayError::InvalidArgument("items is empty".into()));
    }
    if len > max {
        return Err(GatewayError::InvalidArgument(format!(
            "{len} items in one batch; the limit is {max} (MESH_MAX_BATCH_ITEMS)"
        )));
    }
    Ok(())
}

/// Checks one item: its entity id, then its request features.
pub fn item(
    manifest: &ModelManifest,
    id: &str,
    features: &HashMap<String, FeatureValue>,
) -> Result<(), GatewayError> {
    entity_id(id)?;
    request_features(manifest, features)
}

/// Checks request-time features: how many, then each must be a feature of the model, of the
/// right type, with a usable value. All problems are reported together, each naming its
/// feature.
pub fn request_features(
    manifest: &ModelManifest,
    features: &HashMap<String, FeatureValue>,
) -> Result<(), GatewayError> {
    if features.len() > MAX_FEATURES_PER_ITEM {
        return Err(GatewayError::InvalidArgument(format!(
            "{} features in one item; the limit is {MAX_FEATURES_PER_ITEM} (MAX_FEATURES_PER_ITEM)",
            features.len()
        )));
    }
    let mut unknown = Vec::new();
    let mut problems = Vec::new();
    let mut names: Vec<&String> = features.keys().collect();
    names.sort();
    for name in names {
        match manifest.feature(name) {
            None => unknown.push(quoted(name)),
            Some(spec) => problems.extend(value_problem(spec, &features[name].kind)),
        }
    }
    let mut parts = Vec::new();
    if !unknown.is_empty() {
        let more = unknown.len().saturating_sub(MAX_NAMES_LISTED);
        unknown.truncate(MAX_NAMES_LISTED);
        let mut list = unknown.join(", ");
        if more > 0 {
            list.push_str(&format!(" and {more} more"));
        }
        parts.push(format!(
            "unknown features for model {}: {list}",
            manifest.name
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

/// What is wrong with a value of feature `spec`, if anything (the same rules for request and
/// stored values; who is to blame is the caller's decision).
fn value_problem(spec: &FeatureSpec, value: &Option<Kind>) -> Option<String> {
    let name = &spec.name;
    match (value, spec.kind) {
        (None, _) => Some(format!("{name} has no value")),
        (Some(Kind::Number(n)), FeatureKind::Number) if !n.is_finite() => {
            Some(format!("{name} must be a finite number, got {n}"))
        }
        (Some(Kind::Number(n)), FeatureKind::Number) if n.abs() > f32::MAX as f64 => Some(format!(
            "{name} is {n:e}, outside the float32 range the model uses (|x| ≤ {:e})",
            f32::MAX
        )),
        (Some(Kind::Category(c)), FeatureKind::Category) if c.len() > MAX_STRING_BYTES => {
            Some(format!(
                "{name} is {} bytes long; the limit is {MAX_STRING_BYTES}",
                c.len()
            ))
        }
        (Some(Kind::Category(c)), FeatureKind::Category) if control_character(c).is_some() => {
            Some(format!(
                "{name} contains a control character ({})",
                control_character(c).unwrap_or_default()
            ))
        }
        (Some(Kind::Category(c)), FeatureKind::Category) if !spec.allows_category(c) => {
            Some(format!(
                "{name} is {}, not one of the model's categories: {}",
                quoted(c),
                spec.categories.join(", ")
            ))
        }
        (Some(Kind::Number(_)), FeatureKind::Category) => {
            Some(format!("{name} must be a category, got a number"))
        }
        (Some(Kind::Category(_)), FeatureKind::Number) => {
            Some(format!("{name} must be a number, got a category"))
        }
        _ => None,
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
/// Fails naming missing features (`INVALID_ARGUMENT`), or stored values the model cannot take
/// (`FAILED_PRECONDITION`: the stored data is at fault, not the request): a wrong type, a number
/// outside float32, a category outside the manifest's vocabulary.
pub fn assemble(
    manifest: &ModelManifest,
    entity_id: &str,
    request: &HashMap<String, FeatureValue>,
    stored: Option<&HashMap<String, FeatureValue>>,
) -> Result<Vec<Kind>, GatewayError> {
    let mut row = Vec::with_capacity(manifest.features.len());
    let mut missing = Vec::new();
    let mut unusable = Vec::new();
    for spec in &manifest.features {
        let (value, from_request) = match request.get(&spec.name) {
            Some(v) => (v.kind.clone(), true),
            None => (
                stored
                    .and_then(|s| s.get(&spec.name))
                    .and_then(|v| v.kind.clone()),
                false,
            ),
        };
        if value.is_none() {
            missing.push(spec.name.as_str());
            continue;
        }
        // Request values were checked in planning; stored ones are checked here.
        if !from_request {
            if let Some(problem) = value_problem(spec, &value) {
                unusable.push(problem);
                continue;
            }
        }
        match (value, spec.kind) {
            (Some(Kind::Number(n)), FeatureKind::Number) => row.push(Kind::Number(n)),
            (Some(Kind::Category(c)), FeatureKind::Category) => row.push(Kind::Category(c)),
            (_, kind) => unusable.push(format!("{} (expected {})", spec.name, kind.as_str())),
        }
    }
    if !missing.is_empty() {
        return Err(GatewayError::InvalidArgument(format!(
            "missing features for model {} and entity {}: {} (supply them in the request)",
            manifest.name,
            quoted(entity_id),
            missing.join(", ")
        )));
    }
    if !unusable.is_empty() {
        return Err(GatewayError::FailedPrecondition(format!(
            "stored features of entity {} do not fit model {}: {} (supply them in the request to score it anyway)",
            quoted(entity_id),
            manifest.name,
            unusable.join("; ")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> ModelManifest {
        serde_json::from_value(serde_json::json!({
            "name": "m",
            "version": "1",
            "features": [
                {"name": "n", "type": "number", "source": "entity"},
                {"name": "plan", "type": "category", "source": "entity",
                 "categories": ["basic", "pro"]},
                {"name": "city", "type": "category", "source": "request", "open_ended": true}
            ],
            "output": {"name": "p", "index": 0}
        }))
        .expect("manifest")
    }

    fn values(pairs: &[(&str, Kind)]) -> HashMap<String, FeatureValue> {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    FeatureValue {
                        kind: Some(v.clone()),
                    },
                )
            })
            .collect()
    }

    fn category(c: &str) -> Kind {
        Kind::Category(c.into())
    }

    #[test]
    fn an_unknown_request_category_names_the_feature_and_the_allowed_values() {
        let m = manifest();
        let error = request_features(&m, &values(&[("plan", category("gold"))]));
        match error {
            Err(GatewayError::InvalidArgument(msg)) => {
                assert!(msg.contains("plan") && msg.contains("\"gold\""), "{msg}");
                assert!(msg.contains("basic, pro"), "{msg}");
            }
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
        assert!(request_features(&m, &values(&[("plan", category("pro"))])).is_ok());
        // Open-ended: any value the graph can encode (as all-zero if unseen) is accepted.
        assert!(request_features(&m, &values(&[("city", category("Lisbon"))])).is_ok());
    }

    #[test]
    fn unusable_stored_values_are_the_stores_fault_naming_the_feature() {
        let m = manifest();
        let request = values(&[("city", category("x"))]);
        for (stored, feature) in [
            (
                values(&[("n", Kind::Number(1e300)), ("plan", category("pro"))]),
                "n",
            ),
            (
                values(&[("n", Kind::Number(1.0)), ("plan", category("gold"))]),
                "plan",
            ),
            (
                values(&[("n", Kind::Number(1.0)), ("plan", Kind::Number(2.0))]),
                "plan",
            ),
        ] {
            match assemble(&m, "e", &request, Some(&stored)) {
                Err(GatewayError::FailedPrecondition(msg)) => {
                    assert!(msg.contains(feature) && msg.contains("\"e\""), "{msg}")
                }
                other => panic!("expected FAILED_PRECONDITION, got {other:?}"),
            }
        }
    }

    #[test]
    fn declared_sizes_are_checked_and_echoes_are_bounded() {
        let m = manifest();
        let many: HashMap<String, FeatureValue> = (0..=MAX_FEATURES_PER_ITEM)
            .map(|i| (format!("f{i}"), FeatureValue::default()))
            .collect();
        let Err(GatewayError::InvalidArgument(msg)) = request_features(&m, &many) else {
            panic!("too many features accepted");
        };
        assert!(msg.contains("MAX_FEATURES_PER_ITEM"), "{msg}");
        let unknown: HashMap<String, FeatureValue> = (0..50)
            .map(|i| {
                (
                    format!("{i:02}{}", "x".repeat(10_000)),
                    FeatureValue::default(),
                )
            })
            .collect();
        let Err(GatewayError::InvalidArgument(msg)) = request_features(&m, &unknown) else {
            panic!("unknown features accepted");
        };
        assert!(
            msg.contains("and 40 more") && msg.len() < 2_000,
            "{}",
            msg.len()
        );
        assert!(model_ref(&"m".repeat(MAX_STRING_BYTES + 1), "").is_err());
        assert!(model_ref("m", "1\n").is_err());
        assert!(batch_len(0, 10).is_err() && batch_len(11, 10).is_err());
        assert!(batch_len(10, 10).is_ok());
        assert_eq!(
            quoted("é".repeat(40).as_str())
                .chars()
                .filter(|c| *c == 'é')
                .count(),
            32
        );
    }
}
