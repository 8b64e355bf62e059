//! The one KServe V2 (Open Inference Protocol) tensor codec of the mesh: the gateway encodes
//! feature columns and decodes scores with it, inference decodes inputs and encodes outputs
//! with it, and the bench builds its requests with it.
//!
//! Inputs may come as typed contents (`fp32_contents`, `bytes_contents`, ...) or as
//! `raw_input_contents` (little-endian values; BYTES as a 4-byte little-endian length and the
//! bytes), as the protocol allows. Shapes `[N]` and `[N, 1]` are accepted for every column.
//! Every size a tensor declares is checked against the values it carries before anything is
//! allocated for it.

use mesh_proto::inference::model_infer_request::InferInputTensor;
use mesh_proto::inference::model_infer_response::InferOutputTensor;
use mesh_proto::inference::{InferTensorContents, ModelInferResponse};

/// One column of input: the values of one feature for every row.
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    /// float32 values of a number feature (KServe `FP32`).
    Numbers(Vec<f32>),
    /// Strings of a category feature (KServe `BYTES`).
    Categories(Vec<String>),
}

impl Column {
    /// Number of rows.
    pub fn len(&self) -> usize {
        match self {
            Column::Numbers(v) => v.len(),
            Column::Categories(v) => v.len(),
        }
    }

    /// Whether it has no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The kind of column a model expects for an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// Numbers (`FP32`; `FP64` is accepted and narrowed).
    Number,
    /// Strings (`BYTES`, UTF-8).
    Category,
}

/// The values of one output tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputData {
    /// `FP32`.
    F32(Vec<f32>),
    /// `INT64`.
    I64(Vec<i64>),
}

/// A tensor that cannot be read; the message names the tensor and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TensorError(String);

/// `column` as the input tensor `name`, shape `[N, 1]`, in typed contents.
pub fn encode_input(name: &str, column: Column) -> InferInputTensor {
    let rows = column.len() as i64;
    let (datatype, contents) = match column {
        Column::Numbers(values) => (
            "FP32",
            InferTensorContents {
                fp32_contents: values,
                ..Default::default()
            },
        ),
        Column::Categories(values) => (
            "BYTES",
            InferTensorContents {
                bytes_contents: values.into_iter().map(String::into_bytes).collect(),
                ..Default::default()
            },
        ),
    };
    InferInputTensor {
        name: name.to_owned(),
        datatype: datatype.to_owned(),
        shape: vec![rows, 1],
        parameters: Default::default(),
        contents: Some(contents),
    }
}

/// The row count `input`'s shape declares (`[N]` or `[N, 1]`). Only a claim: the decoders
/// check it against the values carried.
pub fn declared_rows(input: &InferInputTensor) -> Result<usize, TensorError> {
    match input.shape.as_slice() {
        [n] | [n, 1] if *n >= 0 => Ok(*n as usize),
        other => Err(TensorError(format!(
            "input {} has shape {other:?}; expected [N] or [N, 1]",
            input.name
        ))),
    }
}

/// Reads `input` as a column of `kind`, from `raw` (its `raw_input_contents` entry) if the
/// request carried raw contents, else from its typed contents. Numbers must be finite.
pub fn decode_input(
    input: &InferInputTensor,
    raw: Option<&[u8]>,
    kind: ColumnKind,
) -> Result<Column, TensorError> {
    let rows = declared_rows(input)?;
    let column = match kind {
        ColumnKind::Number => Column::Numbers(numbers(input, raw, rows)?),
        ColumnKind::Category => Column::Categories(strings(input, raw, rows)?),
    };
    Ok(column)
}

fn wrong_count(input: &InferInputTensor, rows: usize, got: usize) -> TensorError {
    TensorError(format!(
        "input {} declares {rows} rows but carries {got} values",
        input.name
    ))
}

/// Little-endian values of `width` bytes each, exactly `rows` of them.
fn raw_values<'a>(
    input: &InferInputTensor,
    bytes: &'a [u8],
    rows: usize,
    width: usize,
) -> Result<std::slice::ChunksExact<'a, u8>, TensorError> {
    if rows.checked_mul(width) != Some(bytes.len()) {
        return Err(wrong_count(input, rows, bytes.len() / width));
    }
    Ok(bytes.chunks_exact(width))
}

fn numbers(
    input: &InferInputTensor,
    raw: Option<&[u8]>,
    rows: usize,
) -> Result<Vec<f32>, TensorError> {
    let values: Vec<f32> = match (input.datatype.as_str(), raw) {
        ("FP32", Some(bytes)) => raw_values(input, bytes, rows, 4)?
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        ("FP64", Some(bytes)) => raw_values(input, bytes, rows, 8)?
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                f64::from_le_bytes(b) as f32
            })
            .collect(),
        ("FP32", None) => contents(input).fp32_contents.clone(),
        ("FP64", None) => contents(input)
            .fp64_contents
            .iter()
            .map(|v| *v as f32)
            .collect(),
        (other, _) => {
            return Err(TensorError(format!(
                "input {} must be FP32 (a number feature), got {other}",
                input.name
            )))
        }
    };
    if values.len() != rows {
        return Err(wrong_count(input, rows, values.len()));
    }
    if let Some(pos) = values.iter().position(|v| !v.is_finite()) {
        return Err(TensorError(format!(
            "input {} row {pos} is not a finite number",
            input.name
        )));
    }
    Ok(values)
}

fn strings(
    input: &InferInputTensor,
    raw: Option<&[u8]>,
    rows: usize,
) -> Result<Vec<String>, TensorError> {
    if input.datatype != "BYTES" {
        return Err(TensorError(format!(
            "input {} must be BYTES (a category feature), got {}",
            input.name, input.datatype
        )));
    }
    let utf8 = |b: &[u8]| {
        String::from_utf8(b.to_vec()).map_err(|_| {
            TensorError(format!(
                "input {} holds a value that is not UTF-8",
                input.name
            ))
        })
    };
    let values: Vec<String> = match raw {
        Some(mut bytes) => {
            // Each element takes at least its 4-byte prefix: the bytes carried bound the count,
            // whatever the shape declares.
            let mut out = Vec::with_capacity(rows.min(bytes.len() / 4));
            while !bytes.is_empty() {
                if out.len() == rows {
                    return Err(TensorError(format!(
                        "input {} declares {rows} rows but carries more values",
                        input.name
                    )));
                }
                let Some((prefix, rest)) = bytes.split_first_chunk::<4>() else {
                    return Err(TensorError(format!(
                        "input {}: truncated BYTES length prefix",
                        input.name
                    )));
                };
                let len = u32::from_le_bytes(*prefix) as usize;
                if rest.len() < len {
                    return Err(TensorError(format!(
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
    if values.len() != rows {
        return Err(wrong_count(input, rows, values.len()));
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

/// The output tensor `name` with `shape` and `data`: typed contents, or (when `raw`, because
/// the caller sent raw inputs) no contents and the little-endian bytes to put in
/// `raw_output_contents`.
pub fn encode_output(
    name: String,
    shape: Vec<i64>,
    data: OutputData,
    raw: bool,
) -> (InferOutputTensor, Option<Vec<u8>>) {
    let (datatype, contents, bytes) = match data {
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
    let tensor = InferOutputTensor {
        name,
        datatype: datatype.to_owned(),
        shape,
        parameters: Default::default(),
        contents,
    };
    (tensor, bytes)
}

/// The `FP32` output `name` of `response` as rows of `width` values: (values, width).
pub fn decode_output_f32(
    response: &ModelInferResponse,
    name: &str,
) -> Result<(Vec<f32>, usize), TensorError> {
    let (index, output) = response
        .outputs
        .iter()
        .enumerate()
        .find(|(_, o)| o.name == name)
        .ok_or_else(|| TensorError(format!("inference returned no {name} output")))?;
    let values: Vec<f32> = match (&output.contents, response.raw_output_contents.get(index)) {
        (Some(c), _) if !c.fp32_contents.is_empty() => c.fp32_contents.clone(),
        (_, Some(raw)) => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        _ => Vec::new(),
    };
    let width = output.shape.get(1).copied().unwrap_or(1).max(1) as usize;
    if !values.len().is_multiple_of(width) {
        return Err(TensorError(format!(
            "output {name} has {} values, not rows of width {width}",
            values.len()
        )));
    }
    Ok((values, width))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_input(name: &str, datatype: &str, rows: i64) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: vec![rows, 1],
            parameters: Default::default(),
            contents: None,
        }
    }

    #[test]
    fn encoded_columns_decode_to_the_same_columns() {
        for (column, kind) in [
            (Column::Numbers(vec![1.5, -2.0, 0.0]), ColumnKind::Number),
            (
                Column::Categories(vec!["a".into(), "é".into(), String::new()]),
                ColumnKind::Category,
            ),
        ] {
            let tensor = encode_input("x", column.clone());
            assert_eq!(tensor.shape, vec![3, 1]);
            assert_eq!(decode_input(&tensor, None, kind), Ok(column));
        }
    }

    #[test]
    fn raw_contents_are_read_little_endian_with_length_prefixes() {
        let numbers: Vec<u8> = [1.0f32, 2.5].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            decode_input(
                &raw_input("n", "FP32", 2),
                Some(&numbers),
                ColumnKind::Number
            ),
            Ok(Column::Numbers(vec![1.0, 2.5]))
        );
        let mut strings = Vec::new();
        for s in ["ab", ""] {
            strings.extend((s.len() as u32).to_le_bytes());
            strings.extend(s.as_bytes());
        }
        assert_eq!(
            decode_input(
                &raw_input("c", "BYTES", 2),
                Some(&strings),
                ColumnKind::Category
            ),
            Ok(Column::Categories(vec!["ab".into(), String::new()]))
        );
    }

    #[test]
    fn declared_sizes_are_checked_against_the_bytes_carried() {
        let huge = i64::MAX / 2;
        let error = decode_input(
            &raw_input("c", "BYTES", huge),
            Some(&[1, 0, 0, 0, b'a']),
            ColumnKind::Category,
        )
        .expect_err("declared rows exceed the data");
        assert!(error.to_string().contains("declares"), "{error}");
        let error = decode_input(
            &raw_input("n", "FP32", huge),
            Some(&[0; 8]),
            ColumnKind::Number,
        )
        .expect_err("declared rows exceed the data");
        assert!(error.to_string().contains("carries 2 values"), "{error}");
        let bad = raw_input("n", "FP32", -1);
        assert!(decode_input(&bad, None, ColumnKind::Number).is_err());
    }

    #[test]
    fn outputs_round_trip_typed_and_raw() {
        for raw in [false, true] {
            let (tensor, bytes) = encode_output(
                "probabilities".into(),
                vec![2, 2],
                OutputData::F32(vec![0.25, 0.75, 0.5, 0.5]),
                raw,
            );
            let response = ModelInferResponse {
                outputs: vec![tensor],
                raw_output_contents: bytes.into_iter().collect(),
                ..Default::default()
            };
            let (values, width) = decode_output_f32(&response, "probabilities").expect("decodes");
            assert_eq!((values, width), (vec![0.25, 0.75, 0.5, 0.5], 2));
        }
    }
}
