//! The shadow's rows: which copies it can score, and the `ModelInfer` request for a batch.

use mesh_proto::types::feature_value::Kind;
use mesh_runtime::registry::{FeatureKind, ModelManifest};
use mesh_tensor::{encode_input, Column};

use super::Copied;

/// Whether the copy has every feature the shadow manifest needs, of the right type.
pub(super) fn fits(manifest: &ModelManifest, copy: &Copied) -> bool {
    manifest.features.iter().all(|spec| {
        match (
            spec.kind,
            copy.features.get(&spec.name).and_then(|v| v.kind.as_ref()),
        ) {
            (FeatureKind::Number, Some(Kind::Number(_))) => true,
            (FeatureKind::Category, Some(Kind::Category(c))) => spec.allows_category(c),
            _ => false,
        }
    })
}

/// The KServe request for the copies' rows in the shadow manifest's order; `None` if a row
/// lacks one of its features or has one of the wrong type.
pub(super) fn request(
    manifest: &ModelManifest,
    rows: &[Copied],
) -> Option<mesh_proto::inference::ModelInferRequest> {
    let mut inputs = Vec::with_capacity(manifest.features.len());
    for spec in &manifest.features {
        let values = rows
            .iter()
            .map(|r| r.features.get(&spec.name).and_then(|v| v.kind.as_ref()));
        let column = match spec.kind {
            FeatureKind::Number => Column::Numbers(
                values
                    .map(|v| match v {
                        Some(Kind::Number(n)) => Some(*n as f32),
                        _ => None,
                    })
                    .collect::<Option<_>>()?,
            ),
            FeatureKind::Category => Column::Categories(
                values
                    .map(|v| match v {
                        Some(Kind::Category(c)) if spec.allows_category(c) => Some(c.clone()),
                        _ => None,
                    })
                    .collect::<Option<_>>()?,
            ),
        };
        inputs.push(encode_input(&spec.name, column));
    }
    Some(mesh_proto::inference::ModelInferRequest {
        model_name: manifest.name.clone(),
        model_version: manifest.version.clone(),
        inputs,
        outputs: vec![
            mesh_proto::inference::model_infer_request::InferRequestedOutputTensor {
                name: manifest.output.name.clone(),
                parameters: Default::default(),
            },
        ],
        ..Default::default()
    })
}
