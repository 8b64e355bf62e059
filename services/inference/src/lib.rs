//! The inference service: ONNX models from a versioned registry on disk, served over the Open
//! Inference Protocol (KServe V2, `inference.GRPCInferenceService`) so any KServe V2 client can
//! call it and a Triton server could stand in for it.
//!
//! # Layout
//! - [`config`]: settings in sections, every default in one table.
//! - [`model`]: ONNX Runtime environment, loaded models, the session pool.
//! - [`catalog`]: the versions held and their state (loading, ready, failed with the reason).
//! - [`lifecycle`]: what to hold (the live registry, or the disk) and the task that loads and
//!   unloads; [`golden`]: the golden fixture a version passes before it serves.
//! - [`kserve`]: a request matched against the manifest (tensors through `mesh_tensor`).
//! - [`service`]: the gRPC handlers.
//! - [`error`]: one error enum, one mapping to `tonic::Status`.
//!
//! Start-up: the server answers health checks at once with NOT_SERVING while models load, warm
//! up and pass their golden fixtures on a blocking thread; health says SERVING once one version
//! is ready. Versions then come and go with the live registry, without a restart.

pub mod catalog;
pub mod config;
pub mod error;
pub mod golden;
pub mod kserve;
pub mod lifecycle;
pub mod model;
pub mod service;

use std::future::Future;
use std::sync::Arc;

use mesh_proto::catalog::model_catalog_server::ModelCatalogServer;
use mesh_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use mesh_runtime::registry::ModelRegistry;
use mesh_runtime::{serve_grpc, Health, ServiceMetrics, StartupError};
use tokio::net::TcpListener;
use tokio::sync::watch;

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
    // Fail fast on an unreadable registry directory, before binding anything else.
    let disk = ModelRegistry::load(&config.models.dir)?;
    let desired = desired_versions(&config, &disk);
    tokio::spawn(lifecycle::run(service.clone(), desired, health.clone()));

    let routes = tonic::service::Routes::new(
        GrpcInferenceServiceServer::from_arc(service.clone())
            .max_decoding_message_size(64 * 1024 * 1024),
    )
    .add_service(ModelCatalogServer::from_arc(service));
    let options = config
        .server
        .internal_serve_options(vec![name, mesh_proto::service_names::CATALOG])?;
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

/// What to hold: without a live registry, the disk's versions; with one, the disk's
/// production versions at once, then what its policies reference, for as long as the process
/// runs.
fn desired_versions(config: &Config, disk: &ModelRegistry) -> watch::Receiver<lifecycle::Desired> {
    let initial = match config.registry.url {
        Some(_) => lifecycle::production_from_disk(disk),
        None => lifecycle::from_disk(disk),
    };
    let (sender, receiver) = watch::channel(initial);
    let Some(url) = config.registry.url.clone() else {
        // No live registry: the disk's versions, for the life of the process.
        std::mem::forget(sender);
        return receiver;
    };
    let seeds: Vec<(String, String)> = disk
        .models
        .values()
        .map(|m| (m.name.clone(), m.production.clone()))
        .collect();
    let interval = config.registry.interval;
    tokio::spawn(async move {
        let store = match mesh_runtime::postgres::pool(&url, 2, std::time::Duration::from_secs(2)) {
            Ok(pool) => mesh_registry::RegistryStore::new(pool, std::time::Duration::from_secs(2)),
            Err(error) => {
                tracing::error!(%error, "MESH_REGISTRY_DATABASE_URL unusable; holding the disk's production versions");
                return;
            }
        };
        mesh_registry::store::prepare(&store, &seeds).await;
        let mut following = mesh_registry::follow(store, url, interval);
        loop {
            let state = following.state.borrow_and_update().clone();
            // An empty state is "not read yet": keep what is held rather than unload it all.
            if !state.policies.is_empty() {
                sender.send_if_modified(|current| {
                    let next = lifecycle::from_registry(&state);
                    let changed = *current != next;
                    *current = next;
                    changed
                });
            }
            if following.state.changed().await.is_err() {
                return;
            }
        }
    });
    receiver
}
