//! The `inference.GRPCInferenceService` handlers.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use mesh_proto::inference as pb;
use mesh_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use mesh_runtime::registry::{FeatureKind, ModelRegistry};
use mesh_runtime::Deadline;
use tonic::{Request, Response, Status};

use crate::error::InferenceError;
use crate::kserve::{decode_inputs, encode_outputs};
use crate::model::{environment, LoadedModel};
use crate::Config;

/// Everything loaded: the registry (for aliases) and every version's sessions.
struct Loaded {
    registry: ModelRegistry,
    models: HashMap<(String, String), Arc<LoadedModel>>,
}

/// The gRPC service. Models appear once [`InferenceService::load_and_warm`] has run.
pub struct InferenceService {
    config: Config,
    loaded: OnceLock<Loaded>,
}

impl InferenceService {
    /// A service that has loaded nothing yet.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            loaded: OnceLock::new(),
        }
    }

    /// Loads every model version of the registry and warms each session up. Blocking.
    pub fn load_and_warm(&self) -> Result<(), InferenceError> {
        let registry = ModelRegistry::load(&self.config.models.dir)?;
        let env = environment(&self.config.models.ort_dylib)?;
        let mut models = HashMap::new();
        for model in registry.models.values() {
            for (version, entry) in &model.versions {
                let loaded = LoadedModel::load(&env, entry, self.config.models.sessions_per_model)?;
                loaded.warm_up(self.config.models.warmup_iterations)?;
                tracing::info!(model = %model.name, %version, sessions = self.config.models.sessions_per_model, "model loaded");
                models.insert((model.name.clone(), version.clone()), Arc::new(loaded));
            }
        }
        let _ = self.loaded.set(Loaded { registry, models });
        Ok(())
    }

    fn model(&self, name: &str, version: &str) -> Result<Arc<LoadedModel>, InferenceError> {
        let loaded = self.loaded.get().ok_or(InferenceError::NotReady)?;
        let resolved = loaded.registry.resolve(name, version)?;
        loaded
            .models
            .get(&(name.to_owned(), resolved.manifest.version.clone()))
            .cloned()
            .ok_or_else(|| {
                InferenceError::NotFound(format!(
                    "model {name:?} version {version:?} is not loaded"
                ))
            })
    }

    /// Runs one ModelInfer request (the handler without the gRPC envelope).
    pub fn infer(
        &self,
        request: pb::ModelInferRequest,
    ) -> Result<pb::ModelInferResponse, InferenceError> {
        let model = self.model(&request.model_name, &request.model_version)?;
        let columns = decode_inputs(&model.manifest, &request)?;
        let rows = columns.first().map(|c| c.len()).unwrap_or(0);
        if rows > self.config.max_batch_rows {
            return Err(InferenceError::InvalidInput(format!(
                "{rows} rows exceed the limit of {} per request (MESH_MAX_BATCH_ROWS)",
                self.config.max_batch_rows
            )));
        }
        let outputs = model.run(columns)?;
        let requested: Vec<String> = request.outputs.iter().map(|o| o.name.clone()).collect();
        let raw = !request.raw_input_contents.is_empty();
        let (outputs, raw_output_contents) = encode_outputs(outputs, &requested, raw)?;
        Ok(pb::ModelInferResponse {
            model_name: model.manifest.name.clone(),
            model_version: model.manifest.version.clone(),
            id: request.id,
            parameters: Default::default(),
            outputs,
            raw_output_contents,
        })
    }
}

fn kserve_datatype(kind: FeatureKind) -> &'static str {
    match kind {
        FeatureKind::Number => "FP32",
        FeatureKind::Category => "BYTES",
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _request: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _request: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.loaded.get().is_some(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = request.into_inner();
        let ready = match self.model(&r.name, &r.version) {
            Ok(_) => true,
            Err(InferenceError::NotReady) => false,
            Err(e) => return Err(e.into()),
        };
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _request: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: format!("mesh-inference ({})", self.config.replica_id),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = request.into_inner();
        let model = self.model(&r.name, &r.version)?;
        let loaded = self.loaded.get().ok_or(InferenceError::NotReady)?;
        let versions = loaded
            .registry
            .models
            .get(&r.name)
            .map(|m| m.versions.keys().cloned().collect())
            .unwrap_or_default();
        Ok(Response::new(pb::ModelMetadataResponse {
            name: model.manifest.name.clone(),
            versions,
            platform: "onnxruntime_onnx".to_owned(),
            inputs: model
                .manifest
                .features
                .iter()
                .map(|f| pb::model_metadata_response::TensorMetadata {
                    name: f.name.clone(),
                    datatype: kserve_datatype(f.kind).to_owned(),
                    shape: vec![-1, 1],
                })
                .collect(),
            outputs: model
                .outputs
                .iter()
                .map(|o| pb::model_metadata_response::TensorMetadata {
                    name: o.name.clone(),
                    datatype: o.datatype.to_owned(),
                    shape: o.shape.clone(),
                })
                .collect(),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        // The deadline layer bounds the wait; here we only refuse work that is already late.
        if Deadline::of(&request).is_some_and(|d| d.expired()) {
            return Err(mesh_runtime::deadline::exceeded());
        }
        // Runs inline: for small models moving to another thread costs more than the inference.
        Ok(Response::new(self.infer(request.into_inner())?))
    }
}
