//! Loaded ONNX models and the pool of sessions that runs them.
//!
//! `ort::Session::run` takes `&mut self`, so one session cannot serve two requests at once. For
//! models this small, handing a request to another thread costs more than the inference, so
//! each model keeps one session per core (one intra-op thread each); a request scans the pool
//! with `try_lock` and runs inline on its own task. With as many tokio workers as sessions, a
//! free session is almost always found; otherwise the request waits on one lock.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use mesh_runtime::registry::{FeatureKind, ModelManifest, ModelVersion};
use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};

use crate::error::InferenceError;

/// ONNX Runtime allows one environment per process (a second `build()` fails even after the
/// first is dropped), so it lives here once, shared by every model and by tests that start
/// several replicas in one process.
static ENVIRONMENT: OnceLock<Environment> = OnceLock::new();
static ENVIRONMENT_INIT: Mutex<()> = Mutex::new(());

/// Loads `libonnxruntime.so` from `dylib` (once per process) and returns the environment.
pub fn environment(dylib: &Path) -> Result<Environment, InferenceError> {
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env.clone());
    }
    let _guard = ENVIRONMENT_INIT
        .lock()
        .map_err(|_| InferenceError::Runtime("environment lock poisoned".into()))?;
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env.clone());
    }
    let env = ort::init_from(dylib)
        .map_err(|e| {
            InferenceError::Runtime(format!(
                "cannot load ONNX Runtime from {}: {e} (set ORT_DYLIB_PATH; scripts/bootstrap.sh installs it)",
                dylib.display()
            ))
        })?
        .with_name("mesh-inference")
        .with_telemetry(false)
        .build()
        .map_err(|e| InferenceError::Runtime(e.to_string()))?;
    let _ = ENVIRONMENT.set(env.clone());
    Ok(env)
}

pub use mesh_tensor::{Column, OutputData};

/// One output tensor.
#[derive(Debug, Clone)]
pub struct Output {
    /// ONNX output name.
    pub name: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// Values, row-major.
    pub data: OutputData,
}

/// An output's name and KServe datatype, for metadata.
#[derive(Debug, Clone)]
pub struct OutputInfo {
    /// Name.
    pub name: String,
    /// KServe datatype (`FP32`, `INT64`).
    pub datatype: &'static str,
    /// Shape with -1 for dynamic dimensions.
    pub shape: Vec<i64>,
}

/// Most one-row category tensors made at load per input: a manifest declaring more (rare; each
/// costs a small ONNX Runtime tensor) has the rest made per call, as for several rows.
const PREBUILT_CATEGORIES: usize = 1024;

/// A model version ready to run.
pub struct LoadedModel {
    /// Its manifest: input names and types.
    pub manifest: ModelManifest,
    /// Outputs of the graph.
    pub outputs: Vec<OutputInfo>,
    sessions: Vec<Mutex<Slot>>,
    next: AtomicUsize,
    /// Per input (in manifest order; empty for numbers): a one-row string tensor of each
    /// category the manifest declares. Most calls are one row, and ONNX Runtime copies every
    /// string into a tensor it creates, so these are made once at load and passed by reference
    /// (ONNX Runtime does not write to its inputs).
    one_row_categories: Vec<HashMap<String, DynValue>>,
}

/// A session of the pool, and per input (in manifest order; `None` for categories) a one-row
/// number tensor only it uses: a one-row call, holding the session, writes its numbers into
/// them and passes them by reference instead of having ONNX Runtime make tensors per call.
struct Slot {
    session: Session,
    one_row_numbers: Vec<Option<Tensor<f32>>>,
}

impl Slot {
    fn new(session: Session, manifest: &ModelManifest) -> Result<Self, InferenceError> {
        let one_row_numbers = manifest
            .features
            .iter()
            .map(|f| match f.kind {
                FeatureKind::Number => Tensor::from_array(([1usize, 1usize], vec![0f32])).map(Some),
                FeatureKind::Category => Ok(None),
            })
            .collect::<ort::Result<Vec<_>>>()
            .map_err(|e| InferenceError::Runtime(e.to_string()))?;
        Ok(Self {
            session,
            one_row_numbers,
        })
    }
}

impl LoadedModel {
    /// Loads `version` into `pool_size` sessions and checks that the graph's inputs are the
    /// manifest's features with matching types.
    pub fn load(
        env: &Environment,
        version: &ModelVersion,
        pool_size: usize,
    ) -> Result<Self, InferenceError> {
        let mut sessions = Vec::with_capacity(pool_size);
        for _ in 0..pool_size.max(1) {
            let session = open_session(env, &version.model_path)?;
            sessions.push(Mutex::new(Slot::new(session, &version.manifest)?));
        }
        let guard = sessions[0]
            .lock()
            .map_err(|_| InferenceError::Runtime("session lock poisoned".into()))?;
        let first = &guard.session;
        for feature in &version.manifest.features {
            let input = first
                .inputs()
                .iter()
                .find(|i| i.name() == feature.name)
                .ok_or_else(|| {
                    InferenceError::Runtime(format!(
                        "{}: manifest feature {:?} is not an input of the graph",
                        version.model_path.display(),
                        feature.name
                    ))
                })?;
            let want = match feature.kind {
                FeatureKind::Number => ort::value::TensorElementType::Float32,
                FeatureKind::Category => ort::value::TensorElementType::String,
            };
            if input.dtype().tensor_type() != Some(want) {
                return Err(InferenceError::Runtime(format!(
                    "{}: input {:?} has type {:?}, manifest says {}",
                    version.model_path.display(),
                    feature.name,
                    input.dtype().tensor_type(),
                    feature.kind.as_str()
                )));
            }
        }
        let outputs = first
            .outputs()
            .iter()
            .map(|o| OutputInfo {
                name: o.name().to_owned(),
                datatype: match o.dtype().tensor_type() {
                    Some(ort::value::TensorElementType::Int64) => "INT64",
                    _ => "FP32",
                },
                shape: o
                    .dtype()
                    .tensor_shape()
                    .map(|s| s.to_vec())
                    .unwrap_or_default(),
            })
            .collect();
        drop(guard);
        let one_row_categories = one_row_categories(&version.manifest)?;
        Ok(Self {
            manifest: version.manifest.clone(),
            outputs,
            sessions,
            next: AtomicUsize::new(0),
            one_row_categories,
        })
    }

    /// Runs the graph on `columns` (one per manifest feature, in manifest order, equal lengths).
    pub fn run(&self, columns: Vec<Column>) -> Result<Vec<Output>, InferenceError> {
        let rows = columns.first().map(Column::len).unwrap_or(0);
        // In an unsampled trace (most calls) the span would never be exported: none is opened.
        let _span = (!mesh_telemetry::propagation::in_unsampled_trace()).then(|| {
            tracing::info_span!(
                "onnx.run",
                otel.name = "onnx.run",
                model = self.manifest.name.as_str(),
                version = self.manifest.version.as_str(),
                rows
            )
            .entered()
        });
        let mut slot = self.acquire()?;
        let Slot {
            session,
            one_row_numbers,
        } = &mut *slot;
        let inputs = self.tensors(columns, one_row_numbers)?;
        let outputs = session
            .run(inputs)
            .map_err(|e| InferenceError::Runtime(e.to_string()))?;
        let mut result = Vec::with_capacity(self.outputs.len());
        for info in &self.outputs {
            let Some(value) = outputs.get(info.name.as_str()) else {
                continue;
            };
            let (shape, data) = if info.datatype == "INT64" {
                let (shape, data) = value
                    .try_extract_tensor::<i64>()
                    .map_err(|e| InferenceError::Runtime(e.to_string()))?;
                (shape.to_vec(), OutputData::I64(data.to_vec()))
            } else {
                let (shape, data) = value
                    .try_extract_tensor::<f32>()
                    .map_err(|e| InferenceError::Runtime(e.to_string()))?;
                (shape.to_vec(), OutputData::F32(data.to_vec()))
            };
            result.push(Output {
                name: info.name.clone(),
                shape,
                data,
            });
        }
        Ok(result)
    }

    fn acquire(&self) -> Result<std::sync::MutexGuard<'_, Slot>, InferenceError> {
        let n = self.sessions.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            if let Ok(guard) = self.sessions[(start + i) % n].try_lock() {
                return Ok(guard);
            }
        }
        self.sessions[start]
            .lock()
            .map_err(|_| InferenceError::Runtime("session lock poisoned".into()))
    }

    /// One row of plausible inputs built from the manifest, for warm-up.
    pub fn warmup_columns(&self) -> Vec<Column> {
        self.manifest
            .features
            .iter()
            .map(|f| match f.kind {
                FeatureKind::Number => Column::Numbers(vec![1.0]),
                FeatureKind::Category => {
                    Column::Categories(vec![f.categories.first().cloned().unwrap_or_default()])
                }
            })
            .collect()
    }

    /// Runs every session `iterations` times so first requests do not pay for lazy
    /// initialisation inside ONNX Runtime.
    pub fn warm_up(&self, iterations: usize) -> Result<(), InferenceError> {
        for session in &self.sessions {
            let mut slot = session
                .lock()
                .map_err(|_| InferenceError::Runtime("session lock poisoned".into()))?;
            let Slot {
                session,
                one_row_numbers,
            } = &mut *slot;
            for _ in 0..iterations.max(1) {
                let inputs = self.tensors(self.warmup_columns(), one_row_numbers)?;
                session
                    .run(inputs)
                    .map_err(|e| InferenceError::Runtime(format!("warm-up failed: {e}")))?;
            }
        }
        Ok(())
    }

    /// The graph's inputs for `columns`, by name: one-row categories from
    /// `one_row_categories`, one-row numbers written into the session's `numbers`, everything
    /// else made for this call.
    fn tensors<'a>(
        &'a self,
        columns: Vec<Column>,
        numbers: &'a mut [Option<Tensor<f32>>],
    ) -> Result<Vec<(&'a str, SessionInputValue<'a>)>, InferenceError> {
        let rows = columns.first().map(Column::len).unwrap_or(0);
        for (tensor, column) in numbers.iter_mut().zip(&columns) {
            if let (Some(tensor), Column::Numbers(v), 1) = (tensor, column, rows) {
                if let ([value], [slot]) = (v.as_slice(), tensor.extract_tensor_mut().1) {
                    *slot = *value;
                }
            }
        }
        let numbers: &'a [Option<Tensor<f32>>] = numbers;
        self.manifest
            .features
            .iter()
            .zip(&self.one_row_categories)
            .zip(numbers)
            .zip(columns)
            .map(|(((feature, made), number), column)| {
                let value: SessionInputValue<'a> = match column {
                    Column::Numbers(v) => match number {
                        Some(tensor) if rows == 1 && v.len() == 1 => tensor.into(),
                        _ => Tensor::from_array(([rows, 1usize], v))
                            .map_err(|e| InferenceError::Runtime(e.to_string()))?
                            .into_dyn()
                            .into(),
                    },
                    Column::Categories(v) => match v.first().and_then(|c| made.get(c)) {
                        Some(tensor) if rows == 1 => tensor.into(),
                        _ => Tensor::from_string_array(([rows, 1usize], v.as_slice()))
                            .map_err(|e| InferenceError::Runtime(e.to_string()))?
                            .into_dyn()
                            .into(),
                    },
                };
                Ok((feature.name.as_str(), value))
            })
            .collect()
    }
}

/// Per input of `manifest` (empty for numbers): a one-row string tensor of each declared
/// category, up to [`PREBUILT_CATEGORIES`].
fn one_row_categories(
    manifest: &ModelManifest,
) -> Result<Vec<HashMap<String, DynValue>>, InferenceError> {
    manifest
        .features
        .iter()
        .map(|f| match f.kind {
            FeatureKind::Number => Ok(HashMap::new()),
            FeatureKind::Category => f
                .categories
                .iter()
                .take(PREBUILT_CATEGORIES)
                .map(|c| {
                    let t = Tensor::from_string_array(([1usize, 1usize], std::slice::from_ref(c)))?;
                    Ok((c.clone(), t.into_dyn()))
                })
                .collect(),
        })
        .collect::<ort::Result<Vec<_>>>()
        .map_err(|e| InferenceError::Runtime(e.to_string()))
}

fn open_session(env: &Environment, path: &Path) -> Result<Session, InferenceError> {
    let build = || -> ort::Result<Session> {
        Session::builder(env)?
            .with_optimization_level(GraphOptimizationLevel::Level3)?
            .with_intra_threads(1)?
            .with_inter_threads(1)?
            .commit_from_file(path)
    };
    build().map_err(|e| InferenceError::Runtime(format!("cannot load {}: {e}", path.display())))
}
