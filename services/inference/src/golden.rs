//! The golden fixture: the skew check a version passes before it takes traffic.
//!
//! `models/<name>/<version>/golden.json` holds input rows (every manifest feature) and the score
//! the training pipeline computed for each: `{"tolerance": 1e-4, "rows": [{"features": {...},
//! "score": 0.54}]}`. After loading and warming a version, inference scores those rows through
//! the same path requests take and compares: a missing feature, a non-finite score or a
//! difference beyond the tolerance fails the version, with the reason. A version without the file
//! passes with a warning (an older artifact); every version this repository ships has one.

use std::path::Path;

use mesh_tensor::{Column, OutputData};
use serde::Deserialize;

use crate::model::LoadedModel;

/// The file name, beside `model.onnx`.
pub const FILE: &str = "golden.json";

#[derive(Debug, Deserialize)]
struct Golden {
    tolerance: f64,
    rows: Vec<GoldenRow>,
}

#[derive(Debug, Deserialize)]
struct GoldenRow {
    features: serde_json::Map<String, serde_json::Value>,
    score: f64,
}

/// What the check found.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Every row within the tolerance; the largest difference seen.
    Passed {
        /// Largest |score - expected|.
        max_abs_diff: f64,
        /// Rows checked.
        rows: usize,
    },
    /// No fixture beside the model.
    Missing,
}

/// Runs `dir/golden.json` through `model`: the verdict, or why the version must not serve.
pub fn check(model: &LoadedModel, dir: &Path) -> Result<Verdict, String> {
    let path = dir.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Verdict::Missing),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let golden: Golden = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a golden fixture: {e}", path.display()))?;
    if golden.rows.is_empty() || !golden.tolerance.is_finite() || golden.tolerance < 0.0 {
        return Err(format!(
            "{}: needs rows and a finite, non-negative tolerance",
            path.display()
        ));
    }
    let columns = columns(model, &golden.rows)?;
    let outputs = model
        .run(columns)
        .map_err(|e| format!("golden run failed: {e}"))?;
    let output = &model.manifest.output;
    let scores = outputs
        .iter()
        .find(|o| o.name == output.name)
        .and_then(|o| match &o.data {
            OutputData::F32(values) => Some((values, o.shape.get(1).copied().unwrap_or(1))),
            OutputData::I64(_) => None,
        })
        .ok_or_else(|| format!("the graph has no float output {:?}", output.name))?;
    let (values, width) = (scores.0, scores.1.max(1) as usize);
    let mut max_abs_diff = 0.0f64;
    for (i, row) in golden.rows.iter().enumerate() {
        let got = values
            .get(i * width + output.index)
            .copied()
            .map(f64::from)
            .ok_or_else(|| format!("golden row {i}: no score in the output"))?;
        if !got.is_finite() {
            return Err(format!(
                "golden row {i}: the score is {got}, not a finite number"
            ));
        }
        let diff = (got - row.score).abs();
        max_abs_diff = max_abs_diff.max(diff);
        if diff > golden.tolerance {
            return Err(format!(
                "golden row {i}: score {got:.6} differs from the expected {:.6} by {diff:.2e}, \
                 over the tolerance {:.0e} (training/serving skew)",
                row.score, golden.tolerance
            ));
        }
    }
    Ok(Verdict::Passed {
        max_abs_diff,
        rows: golden.rows.len(),
    })
}

/// The rows as one column per manifest feature, in manifest order.
fn columns(model: &LoadedModel, rows: &[GoldenRow]) -> Result<Vec<Column>, String> {
    use mesh_runtime::registry::FeatureKind;
    model
        .manifest
        .features
        .iter()
        .map(|feature| {
            let value = |i: usize, row: &GoldenRow| {
                row.features
                    .get(&feature.name)
                    .cloned()
                    .ok_or_else(|| format!("golden row {i} lacks feature {}", feature.name))
            };
            match feature.kind {
                FeatureKind::Number => rows
                    .iter()
                    .enumerate()
                    .map(|(i, row)| {
                        value(i, row)?.as_f64().map(|n| n as f32).ok_or_else(|| {
                            format!("golden row {i}: {} is not a number", feature.name)
                        })
                    })
                    .collect::<Result<Vec<f32>, String>>()
                    .map(Column::Numbers),
                FeatureKind::Category => rows
                    .iter()
                    .enumerate()
                    .map(|(i, row)| match value(i, row)? {
                        serde_json::Value::String(s) => Ok(s),
                        _ => Err(format!("golden row {i}: {} is not a string", feature.name)),
                    })
                    .collect::<Result<Vec<String>, String>>()
                    .map(Column::Categories),
            }
        })
        .collect()
}
