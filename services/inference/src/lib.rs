//! The inference service: ONNX models from a versioned registry on disk, served over the Open
//! Inference Protocol (KServe V2, `inference.GRPCInferenceService`) so any KServe V2 client can
//! call it and a Triton server could stand in for it.
//!
//! # Layout
//! - [`config`]: settings in sections, every default in one table.
//! - [`model`]: ONNX Runtime environment, loaded models, the session pool.
//! - [`kserve`]: a request matched against the manifest (tensors through `mesh_tensor`).
//! - [`service`]: the gRPC handlers.
//! - [`error`]: one error enum, one mapping to `tonic::Status`.
//!
//! Start-up: the server answers health checks at once with NOT_SERVING while models load and
//! warm up on a blocking thread; only then does health say SERVING.

pub mod config;
pub mod error;
pub mod kserve;
pub mod model;
pub mod service;

use std::future::Future;
use std::sync::Arc;

use mesh_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use mesh_runtime::{serve_grpc, Health, ServiceMetrics, StartupError};
use tokio::net::TcpListener;

pub use config::{default_parallelism, Config, SETTINGS};
pub use error::InferenceError;
pub use service::InferenceService;

/// Serves inference on `listener` until `shutdown` resolves. Models load in the background;
/// health reports NOT_SERVING until they are warm.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartupError> {
    let name = mesh_proto::service_names::INFERENCE;
    let health = Health::new(&[name]).await;
    let metrics = ServiceMetrics::new("inference")?;
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
    let options = config.server.internal_serve_options(vec![name])?;
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
    .map_err(StartupError::from)
}
