//! Conversion between Open Inference Protocol (KServe V2) tensors and model columns.
//!
//! Inputs may come as typed contents (`fp32_contents`, `bytes_contents`, ...) or as
//! `raw_input_contents` (little-endian values; BYTES as 4-byte little-endian length + bytes),
//! as the protocol allows. Shapes `[N]` and `[N, 1]` are accepted for every feature.

use mesh_proto::inference::model_infer_request::InferInputTensor;
use mesh_proto::inference::model_infer_response::InferOutputTensor;
use mesh_proto::inference::{InferTensorContents, ModelInferRequest};
use mesh_runtime::registry::{FeatureKind, ModelManifest};

use crate::error::InferenceError;
use crate::model::{Column, Output, OutputData};

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
        let n = rows_of(input)?;
        let raw_bytes = raw.then(|| request.raw_input_contents[index].as_slice());
        let column = match feature.kind {
            FeatureKind::Number => Column::Numbers(numbers(input, raw_bytes, n)?),
            FeatureKind::Category => Column::Categories(strings(input, raw_bytes, n)?),
        };
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

fn rows_of(input: &InferInputTensor) -> Result<usize, InferenceError> {
    match input.shape.as_slice() {
        [n] | [n, 1] if *n >= 0 => Ok(*n as usize),
        other => Err(InferenceError::InvalidInput(format!(
            "input {} has shape {other:?}; expected [N] or [N, 1]",
            input.name
        ))),
    }
}

fn numbers(
    input: &InferInputTensor,
    raw: Option<&[u8]>,
    n: usize,
) -> Result<Vec<f32>, InferenceError> {
    let wrong_len = |got: usize| {
        InferenceError::InvalidInput(format!(
            "input {} declares {n} rows but carries {got} values",
            input.name
        ))
    };
    let values: Vec<f32> = match (input.datatype.as_str(), raw) {
        ("FP32", Some(bytes)) => {
            if bytes.len() != n * 4 {
                return Err(wrong_len(bytes.len() / 4));
            }
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }
        ("FP64", Some(bytes)) => {
            if bytes.len() != n * 8 {
                return Err(wrong_len(bytes.len() / 8));
            }
            bytes
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    f64::from_le_bytes(b) as f32
                })
                .collect()
        }
        ("FP32", None) => contents(input).fp32_contents.clone(),
        ("FP64", None) => contents(input)
            .fp64_contents
            .iter()
            .map(|v| *v as f32)
            .collect(),
        (other, _) => {
            return Err(InferenceError::InvalidInput(format!(
                "input {} must be FP32 (a number feature), got {other}",
                input.name
            )))
        }
    };
    if values.len() != n {
        return Err(wrong_len(values.len()));
    }
    if let Some(pos) = values.iter().position(|v| !v.is_finite()) {
        return Err(InferenceError::InvalidInput(format!(
            "input {} row {pos} is not a finite number",
            input.name
        )));
    }
    Ok(values)
}

fn strings(
    input: &InferInputTensor,
    raw: Option<&[u8]>,
    n: usize,
) -> Result<Vec<String>, InferenceError> {
    if input.datatype != "BYTES" {
        return Err(InferenceError::InvalidInput(format!(
            "input {} must be BYTES (a category feature), got {}",
            input.name, input.datatype
        )));
    }
    let utf8 = |b: &[u8]| {
        String::from_utf8(b.to_vec()).map_err(|_| {
            InferenceError::InvalidInput(format!(
                "input {} holds a value that is not UTF-8",
                input.name
            ))
        })
    };
    let values: Vec<String> = match raw {
        Some(mut bytes) => {
            let mut out = Vec::with_capacity(n);
            while !bytes.is_empty() {
                if bytes.len() < 4 {
                    return Err(InferenceError::InvalidInput(format!(
                        "input {}: truncated BYTES length prefix",
                        input.name
                    )));
                }
                let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
                let rest = &bytes[4..];
                if rest.len() < len {
                    return Err(InferenceError::InvalidInput(format!(
                        "input {}: BYTES element longer than the data",
                        input.name
                    )));
                }
                out.push(utf8(&rest[..len])?);
                bytes = &rest[len..];
            }
            out
        }
        None => contents(input)
            .bytes_contents
            .iter()
            .map(|b| utf8(b))
            .collect::<Result<_, _>>()?,
    };
    if values.len() != n {
        return Err(InferenceError::InvalidInput(format!(
            "input {} declares {n} rows but carries {} values",
            input.name,
            values.len()
        )));
    }
    Ok(values)
}

fn contents(input: &InferInputTensor) -> &InferTensorContents {
    static EMPTY: InferTensorContents = InferTensorContents {
        bool_contents: Vec::new(),
        int_contents: Vec::new(),
        int64_contents: Vec::new(),
        uint_contents: Vec::new(),
        uint64_contents: Vec::new(),
        fp32_contents: Vec::new(),
        fp64_contents: Vec::new(),
        bytes_contents: Vec::new(),
    };
    input.contents.as_ref().unwrap_or(&EMPTY)
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
        let (datatype, contents, bytes) = match output.data {
            OutputData::F32(v) => {
                let bytes = raw.then(|| v.iter().flat_map(|x| x.to_le_bytes()).collect());
                let contents = (!raw).then(|| InferTensorContents {
                    fp32_contents: v,
                    ..Default::default()
                });
                ("FP32", contents, bytes)
            }
            OutputData::I64(v) => {
                let bytes = raw.then(|| v.iter().flat_map(|x| x.to_le_bytes()).collect());
                let contents = (!raw).then(|| InferTensorContents {
                    int64_contents: v,
                    ..Default::default()
                });
                ("INT64", contents, bytes)
            }
        };
        tensors.push(InferOutputTensor {
            name: output.name,
            datatype: datatype.to_owned(),
            shape: output.shape,
            parameters: Default::default(),
            contents,
        });
        if let Some(bytes) = bytes {
            raw_contents.push(bytes);
        }
    }
    Ok((tensors, raw_contents))
}
