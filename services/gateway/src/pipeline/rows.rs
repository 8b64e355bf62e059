//! The pipeline's pure steps: planning items, assembling rows, building the KServe request.

use mesh_proto::features::EntityFeatures;
use mesh_proto::inference::model_infer_request::InferRequestedOutputTensor;
use mesh_proto::inference::ModelInferRequest;
use mesh_proto::types::{feature_value::Kind, FeatureTier};
use mesh_runtime::registry::{FeatureKind, ModelManifest};
use mesh_tensor::{encode_input, Column};

use super::{Item, Row, Slot, Stored};
use crate::error::GatewayError;
use crate::validate;

/// Step 2: checks each item; those whose request lacks features wait for the store.
pub(super) fn plan(manifest: &ModelManifest, items: Vec<Item>) -> Vec<Slot> {
    items
        .into_iter()
        .map(
            |item| match validate::item(manifest, &item.entity_id, &item.features) {
                Err(error) => Slot::Failed(error),
                Ok(()) if validate::request_is_complete(manifest, &item.features) => {
                    Slot::Complete(item)
                }
                Ok(()) => Slot::NeedsStore(item),
            },
        )
        .collect()
}

/// Step 4: an item's row from its request features and, if it needed them, its stored ones;
/// or its error, naming the features a caller could supply to score it without the store.
pub(super) fn assemble(
    manifest: &ModelManifest,
    slot: Slot,
    stored: &Stored,
) -> Result<Row, GatewayError> {
    let (item, entity, notes) = match slot {
        Slot::Failed(error) => return Err(error),
        Slot::Complete(item) => (item, None, Vec::new()),
        Slot::NeedsStore(item) => {
            let (entity, notes) = stored_entity(manifest, &item, stored)?;
            (item, Some(entity), notes)
        }
    };
    let stored_features = entity.map(|e| &e.features);
    let values = validate::assemble(manifest, &item.entity_id, &item.features, stored_features)?;
    let tier = match entity {
        None => FeatureTier::Request,
        Some(e) => FeatureTier::try_from(e.tier).unwrap_or(FeatureTier::Unspecified),
    };
    Ok(Row {
        logged: validate::merged(&item.features, stored_features),
        entity_id: item.entity_id,
        arrived: item.arrived,
        trace_id: item.trace_id,
        values,
        tier,
        degraded: notes,
    })
}

/// An item's stored entity and the notes of its answer; or its error (the whole fetch failed,
/// this entity failed, or the store does not know it), naming the features a caller could
/// supply to score it without the store.
pub(super) fn stored_entity<'s>(
    manifest: &ModelManifest,
    item: &Item,
    stored: &'s Stored,
) -> Result<(&'s EntityFeatures, Vec<String>), GatewayError> {
    let missing = || validate::missing_from_request(manifest, &item.features).join(", ");
    let id = validate::quoted(&item.entity_id);
    let (entities, failed, notes) = match stored {
        Stored::Unavailable(error) => {
            return Err(GatewayError::Unavailable(format!(
                "{error}; the request does not supply {} to score without it",
                missing()
            )))
        }
        Stored::Found {
            entities,
            failed,
            notes,
        } => (entities, failed, notes),
    };
    if let Some(error) = failed.get(&item.entity_id) {
        return Err(match tonic::Code::from(error.code) {
            tonic::Code::Unavailable => GatewayError::Unavailable(format!(
                "features service cannot reach its database and has no cached features for entity {id}; the request does not supply {} to score without it",
                missing()
            )),
            tonic::Code::FailedPrecondition => GatewayError::FailedPrecondition(format!(
                "{}; supply {} in the request to score it anyway",
                error.message,
                missing()
            )),
            code => GatewayError::Internal(format!(
                "features service failed entity {id}: {code:?}: {}",
                error.message
            )),
        });
    }
    match entities.get(&item.entity_id) {
        Some(entity) if entity.found => Ok((entity, notes.clone())),
        Some(_) => Err(GatewayError::NotFound(format!(
            "entity {id} is not in the feature store; supply {} in the request to score it anyway",
            missing()
        ))),
        None => Err(GatewayError::Internal(
            "features service omitted an entity it was asked for".into(),
        )),
    }
}

/// The KServe request for `rows`: one input per feature, `[N, 1]`, FP32 or BYTES.
pub(super) fn infer_request(manifest: &ModelManifest, rows: &[Row]) -> ModelInferRequest {
    let inputs = manifest
        .features
        .iter()
        .enumerate()
        .map(|(col, spec)| {
            let column = match spec.kind {
                FeatureKind::Number => Column::Numbers(
                    rows.iter()
                        .map(|r| match &r.values[col] {
                            Kind::Number(v) => *v as f32,
                            Kind::Category(_) => f32::NAN,
                        })
                        .collect(),
                ),
                FeatureKind::Category => Column::Categories(
                    rows.iter()
                        .map(|r| match &r.values[col] {
                            Kind::Category(c) => c.clone(),
                            Kind::Number(_) => String::new(),
                        })
                        .collect(),
                ),
            };
            encode_input(&spec.name, column)
        })
        .collect();
    ModelInferRequest {
        model_name: manifest.name.clone(),
        model_version: manifest.version.clone(),
        id: String::new(),
        parameters: Default::default(),
        inputs,
        outputs: vec![InferRequestedOutputTensor {
            name: manifest.output.name.clone(),
            parameters: Default::default(),
        }],
        raw_input_contents: Vec::new(),
    }
}
