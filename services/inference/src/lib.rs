//! The inference service: ONNX models from a versioned registry on disk, served over the Open
//! Inference Protocol (KServe V2, `inference.GRPCInferenceService`) so any KServe V2 client can
//! call it and a Triton server could stand in for it.
//!
//! # Layout
//! - [`model`]: ONNX Runtime environment, loaded models, the session pool.
//! - [`kserve`]: KServe tensors to model columns and back.
//! - [`service`]: the gRPC handlers.
//! - [`error`]: one error enum, one mapping to `tonic::Status`.
//!
//! Start-up: the server answers health checks at once with NOT_SERVING while models load and
//! warm up on a blocking thread; only then does health say SERVING.

pub mod error;
pub mod kserve;
pub mod model;
pub mod service;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use mesh_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use mesh_runtime::config::{ServerConfig, Setting, Settings};
use mesh_runtime::{serve_grpc, Health, ServiceMetrics};
use tokio::net::TcpListener;

pub use error::InferenceError;
pub use service::InferenceService;

/// Configuration, from `MESH_*` environment variables (see README).
#[derive(Debug, Clone)]
pub struct Config {
    /// Address, metrics, concurrency limit and shutdown timing (`MESH_LISTEN_ADDR`,
    /// `MESH_METRICS_ADDR`, `MESH_MAX_CONCURRENCY`, `MESH_DRAIN_DELAY_MS`, `MESH_GRACE_MS`).
    pub server: ServerConfig,
    /// `MESH_MODELS_DIR`, default `models`.
    pub models_dir: PathBuf,
    /// `ORT_DYLIB_PATH`: the ONNX Runtime shared library.
    pub ort_dylib: PathBuf,
    /// `MESH_SESSIONS_PER_MODEL`, default: the number of cores.
    pub sessions_per_model: usize,
    /// `MESH_WARMUP_ITERATIONS` per session before SERVING, default 20.
    pub warmup_iterations: usize,
    /// `MESH_MAX_BATCH_ROWS`, default 4096: rows per ModelInfer call.
    pub max_batch_rows: usize,
    /// `MESH_REPLICA_ID`, reported in ServerMetadata; default the listen address.
    pub replica_id: String,
}

/// Every variable inference reads, with its default: the one place defaults are written.
pub const SETTINGS: &[Setting] = mesh_runtime::settings_table!(
    "0.0.0.0:50053", "0.0.0.0:9103", "256";
        Setting::value("MESH_MODELS_DIR", "models", "model registry"),
        Setting::unset(
            "ORT_DYLIB_PATH",
            "none (required)",
            "path to `libonnxruntime.so`",
        ),
        Setting::derived(
            "MESH_SESSIONS_PER_MODEL",
            "number of cores",
            "ONNX Runtime sessions per model version",
        ),
        Setting::value(
            "MESH_WARMUP_ITERATIONS",
            "20",
            "warm-up runs per session before `SERVING`",
        ),
        Setting::value("MESH_MAX_BATCH_ROWS", "4096", "rows per `ModelInfer`"),
        Setting::derived(
            "MESH_REPLICA_ID",
            "the listen address",
            "reported in `ServerMetadata`",
        ),
);

impl Config {
    /// Reads the process environment; fails naming the variable that does not parse.
    pub fn from_env() -> Result<Self, InferenceError> {
        Self::read(&Settings::from_env(SETTINGS))
    }

    /// Reads the settings from `s`.
    pub fn read(s: &Settings<'_>) -> Result<Self, InferenceError> {
        let cfg = |e: mesh_runtime::config::ConfigError| InferenceError::Config(e.to_string());
        let server = ServerConfig::read(s).map_err(cfg)?;
        let ort_dylib = s.raw("ORT_DYLIB_PATH").map(PathBuf::from).ok_or_else(|| {
            InferenceError::Config(
                "ORT_DYLIB_PATH is not set: point it at libonnxruntime.so (scripts/bootstrap.sh installs one)".into(),
            )
        })?;
        Ok(Self {
            models_dir: PathBuf::from(s.string("MESH_MODELS_DIR")),
            ort_dylib,
            sessions_per_model: s
                .positive_optional("MESH_SESSIONS_PER_MODEL")
                .map_err(cfg)?
                .unwrap_or_else(default_parallelism),
            warmup_iterations: s.parse("MESH_WARMUP_ITERATIONS").map_err(cfg)?,
            max_batch_rows: s.positive("MESH_MAX_BATCH_ROWS").map_err(cfg)?,
            replica_id: s
                .raw("MESH_REPLICA_ID")
                .unwrap_or_else(|| server.listen_addr.clone()),
            server,
        })
    }
}

/// Cores available to this process.
pub fn default_parallelism() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// Serves inference on `listener` until `shutdown` resolves. Models load in the background;
/// health reports NOT_SERVING until they are warm.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), InferenceError> {
    let name = mesh_proto::service_names::INFERENCE;
    let health = Health::new(&[name]).await;
    let metrics = ServiceMetrics::new().map_err(|e| InferenceError::Config(e.to_string()))?;
    let service = Arc::new(InferenceService::new(config.clone()));

    let loader = service.clone();
    let loader_health = health.clone();
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let load = tokio::task::spawn_blocking(move || loader.load_and_warm()).await;
        match load {
            Ok(Ok(())) => {
                tracing::info!(elapsed = ?started.elapsed(), "models loaded and warm: SERVING");
                loader_health.set_serving().await;
            }
            Ok(Err(e)) => tracing::error!(error = %e, "model loading failed; staying NOT_SERVING"),
            Err(e) => tracing::error!(error = %e, "model loading panicked; staying NOT_SERVING"),
        }
    });

    let routes = tonic::service::Routes::new(
        GrpcInferenceServiceServer::from_arc(service).max_decoding_message_size(64 * 1024 * 1024),
    );
    let options = config.server.serve_options(vec![name]);
    serve_grpc(
        routes,
        options,
        health,
        metrics,
        listener,
        metrics_listener,
        shutdown,
    )
    .await
    .map_err(|e| InferenceError::Config(e.to_string()))
}
