//! A `ModelInferRequest` matched against the model's manifest (every input a feature, every
//! feature present, all with the same rows), and the requested outputs encoded for the answer.
//! The tensors themselves go through the mesh's one codec, `mesh_tensor`.

use mesh_proto::inference::model_infer_response::InferOutputTensor;
use mesh_proto::inference::ModelInferRequest;
use mesh_runtime::registry::{FeatureKind, ModelManifest};
use mesh_tensor::{decode_input, encode_output, Column, ColumnKind};

use crate::error::InferenceError;
use crate::model::Output;

/// Columns in manifest order, from the request's inputs. Every input must be a manifest
/// feature, every feature must be present, and all must have the same number of rows.
pub fn decode_inputs(
    manifest: &ModelManifest,
    request: &ModelInferRequest,
) -> Result<Vec<Column>, InferenceError> {
    let raw = !request.raw_input_contents.is_empty();
    if raw && request.raw_input_contents.len() != request.inputs.len() {
        return Err(InferenceError::InvalidInput(format!(
            "raw_input_contents has {} entries for {} inputs",
            request.raw_input_contents.len(),
            request.inputs.len()
        )));
    }
    let unknown: Vec<&str> = request
        .inputs
        .iter()
        .filter(|i| manifest.feature(&i.name).is_none())
        .map(|i| i.name.as_str())
        .collect();
    if !unknown.is_empty() {
        return Err(InferenceError::InvalidInput(format!(
            "unknown inputs for model {}: {}",
            manifest.name,
            unknown.join(", ")
        )));
    }
    let missing: Vec<&str> = manifest
        .features
        .iter()
        .filter(|f| !request.inputs.iter().any(|i| i.name == f.name))
        .map(|f| f.name.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(InferenceError::InvalidInput(format!(
            "missing inputs for model {}: {}",
            manifest.name,
            missing.join(", ")
        )));
    }
    let mut columns = Vec::with_capacity(manifest.features.len());
    let mut rows: Option<usize> = None;
    for feature in &manifest.features {
        let (index, input) = request
            .inputs
            .iter()
            .enumerate()
            .find(|(_, i)| i.name == feature.name)
            .ok_or_else(|| {
                InferenceError::InvalidInput(format!("missing input {}", feature.name))
            })?;
        let raw_bytes = raw.then(|| request.raw_input_contents[index].as_slice());
        let kind = match feature.kind {
            FeatureKind::Number => ColumnKind::Number,
            FeatureKind::Category => ColumnKind::Category,
        };
        let column = decode_input(input, raw_bytes, kind)
            .map_err(|e| InferenceError::InvalidInput(e.to_string()))?;
        let n = column.len();
        match rows {
            None => rows = Some(n),
            Some(r) if r != n => {
                return Err(InferenceError::InvalidInput(format!(
                    "input {} has {n} rows, earlier inputs have {r}",
                    input.name
                )))
            }
            Some(_) => {}
        }
        columns.push(column);
    }
    if rows == Some(0) {
        return Err(InferenceError::InvalidInput("inputs have zero rows".into()));
    }
    Ok(columns)
}

/// Response tensors for the outputs the caller asked for (all when it named none), as typed
/// contents, or as `raw_output_contents` when `raw` (the caller sent raw inputs).
pub fn encode_outputs(
    outputs: Vec<Output>,
    requested: &[String],
    raw: bool,
) -> Result<(Vec<InferOutputTensor>, Vec<Vec<u8>>), InferenceError> {
    if let Some(unknown) = requested
        .iter()
        .find(|r| !outputs.iter().any(|o| &o.name == *r))
    {
        return Err(InferenceError::InvalidInput(format!(
            "unknown output {unknown}; the model has {}",
            outputs
                .iter()
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let mut tensors = Vec::new();
    let mut raw_contents = Vec::new();
    for output in outputs {
        if !requested.is_empty() && !requested.contains(&output.name) {
            continue;
        }
        let (tensor, bytes) = encode_output(output.name, output.shape, output.data, raw);
        tensors.push(tensor);
        raw_contents.extend(bytes);
    }
    Ok((tensors, raw_contents))
}
