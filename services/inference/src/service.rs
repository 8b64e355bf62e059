//! The `inference.GRPCInferenceService` handlers.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, RwLock};

use mesh_proto::inference as pb;
use mesh_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use mesh_runtime::registry::FeatureKind;
use mesh_runtime::Deadline;
use ort::environment::Environment;
use tonic::{Request, Response, Status};

use crate::catalog::{Catalog, State};
use crate::error::InferenceError;
use crate::kserve::{decode_inputs, encode_outputs};
use crate::model::{environment, LoadedModel};
use crate::Config;

/// The gRPC service. Versions appear in its [`Catalog`] as the lifecycle task loads them
/// (see [`crate::lifecycle`]).
pub struct InferenceService {
    config: Config,
    catalog: Catalog,
    /// Model → its production version, from the live registry (or the disk aliases).
    production: RwLock<BTreeMap<String, String>>,
    env: OnceLock<Environment>,
}

impl InferenceService {
    /// A service that has loaded nothing yet.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            catalog: Catalog::default(),
            production: RwLock::new(BTreeMap::new()),
            env: OnceLock::new(),
        }
    }

    /// The service's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Every version held, with its state.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Sets what an empty version (or `production`) means, per model.
    pub fn set_production(&self, production: BTreeMap<String, String>) {
        *self.production.write().unwrap_or_else(|e| e.into_inner()) = production;
    }

    /// The ONNX Runtime environment, created on first use. Blocking.
    pub fn environment(&self) -> Result<&Environment, InferenceError> {
        if let Some(env) = self.env.get() {
            return Ok(env);
        }
        let env = environment(&self.config.models.ort_dylib)?;
        Ok(self.env.get_or_init(|| env))
    }

    fn model(&self, name: &str, version: &str) -> Result<Arc<LoadedModel>, InferenceError> {
        let version = if version.is_empty() || version == "production" {
            let production = self.production.read().unwrap_or_else(|e| e.into_inner());
            match production.get(name) {
                Some(v) => v.clone(),
                None if !self.catalog.any_ready() => return Err(InferenceError::NotReady),
                None => return Err(InferenceError::NotFound(format!("unknown model {name:?}"))),
            }
        } else {
            version.to_owned()
        };
        self.catalog.get(name, &version)
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
            ready: self.catalog.any_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = request.into_inner();
        let ready = match self.model(&r.name, &r.version) {
            Ok(_) => true,
            Err(
                InferenceError::NotReady
                | InferenceError::VersionLoading(_)
                | InferenceError::VersionFailed(_),
            ) => false,
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
        let versions = self
            .catalog
            .snapshot()
            .into_iter()
            .filter(|((name, _), slot)| name == &r.name && matches!(slot.state, State::Ready(..)))
            .map(|((_, version), _)| version)
            .collect();
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

#[tonic::async_trait]
impl mesh_proto::catalog::model_catalog_server::ModelCatalog for InferenceService {
    async fn list_versions(
        &self,
        _request: Request<mesh_proto::catalog::ListVersionsRequest>,
    ) -> Result<Response<mesh_proto::catalog::ListVersionsResponse>, Status> {
        use mesh_proto::catalog::version_state::State as Pb;
        let versions = self
            .catalog
            .snapshot()
            .into_iter()
            .map(|((model, version), slot)| {
                let (state, reason, diff) = match slot.state {
                    State::Loading => (Pb::Loading, String::new(), 0.0),
                    State::Ready(_, diff) => (Pb::Ready, String::new(), diff.unwrap_or(0.0)),
                    State::Failed(reason) => (Pb::Failed, reason, 0.0),
                };
                mesh_proto::catalog::VersionState {
                    model,
                    version,
                    state: state as i32,
                    reason,
                    since_unix_micros: slot.since_unix_micros,
                    golden_max_abs_diff: diff,
                }
            })
            .collect();
        Ok(Response::new(mesh_proto::catalog::ListVersionsResponse {
            replica_id: self.config.replica_id.clone(),
            versions,
        }))
    }
}
