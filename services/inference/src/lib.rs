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
use std::time::Duration;

use mesh_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use mesh_runtime::config::{env_millis, env_parse, env_positive, env_str, metrics_addr};
use mesh_runtime::{serve_grpc, Health, ServeOptions, ServiceMetrics};
use tokio::net::TcpListener;

pub use error::InferenceError;
pub use service::InferenceService;

/// Configuration, from `MESH_*` environment variables (see README).
#[derive(Debug, Clone)]
pub struct Config {
    /// `MESH_LISTEN_ADDR`, default `0.0.0.0:50053`.
    pub listen_addr: String,
    /// `MESH_METRICS_ADDR`, default `0.0.0.0:9103`; `off` disables.
    pub metrics_addr: Option<String>,
    /// `MESH_MODELS_DIR`, default `models`.
    pub models_dir: PathBuf,
    /// `ORT_DYLIB_PATH`: the ONNX Runtime shared library.
    pub ort_dylib: PathBuf,
    /// `MESH_SESSIONS_PER_MODEL`, default: the number of cores.
    pub sessions_per_model: usize,
    /// `MESH_WARMUP_ITERATIONS` per session before SERVING, default 20.
    pub warmup_iterations: usize,
    /// `MESH_MAX_CONCURRENCY`, default 256: concurrent RPCs before shedding.
    pub max_concurrency: usize,
    /// `MESH_MAX_BATCH_ROWS`, default 4096: rows per ModelInfer call.
    pub max_batch_rows: usize,
    /// `MESH_DRAIN_DELAY_MS`, default 1000.
    pub drain_delay: Duration,
    /// `MESH_GRACE_MS`, default 10000.
    pub grace: Duration,
    /// `MESH_REPLICA_ID`, reported in ServerMetadata; default the listen address.
    pub replica_id: String,
}

impl Config {
    /// Reads the environment; fails naming the variable that does not parse.
    pub fn from_env() -> Result<Self, InferenceError> {
        let cfg = |e: mesh_runtime::config::ConfigError| InferenceError::Config(e.to_string());
        let listen_addr = env_str("MESH_LISTEN_ADDR").unwrap_or_else(|| "0.0.0.0:50053".into());
        let ort_dylib = env_str("ORT_DYLIB_PATH").map(PathBuf::from).ok_or_else(|| {
            InferenceError::Config(
                "ORT_DYLIB_PATH is not set: point it at libonnxruntime.so (scripts/bootstrap.sh installs one)".into(),
            )
        })?;
        Ok(Self {
            metrics_addr: metrics_addr("0.0.0.0:9103"),
            models_dir: env_str("MESH_MODELS_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("models")),
            ort_dylib,
            sessions_per_model: env_positive("MESH_SESSIONS_PER_MODEL", default_parallelism())
                .map_err(cfg)?,
            warmup_iterations: env_parse("MESH_WARMUP_ITERATIONS", 20).map_err(cfg)?,
            max_concurrency: env_positive("MESH_MAX_CONCURRENCY", 256).map_err(cfg)?,
            max_batch_rows: env_positive("MESH_MAX_BATCH_ROWS", 4096).map_err(cfg)?,
            drain_delay: env_millis("MESH_DRAIN_DELAY_MS", Duration::from_secs(1)).map_err(cfg)?,
            grace: env_millis("MESH_GRACE_MS", Duration::from_secs(10)).map_err(cfg)?,
            replica_id: env_str("MESH_REPLICA_ID").unwrap_or_else(|| listen_addr.clone()),
            listen_addr,
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
    let mut options = ServeOptions::new(vec![name]);
    options.max_concurrency = config.max_concurrency;
    options.drain_delay = config.drain_delay;
    options.grace = config.grace;
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
