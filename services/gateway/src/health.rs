//! The gateway's detailed health report (`GET /health` on the metrics port): each dependency's
//! `grpc.health.v1` status and an overall verdict, the way seed 000's health check reports it.
//!
//! - `unhealthy` (HTTP 503): no inference replica is SERVING: no prediction can be made.
//! - `degraded` (HTTP 200): something is down but predictions still flow (some replicas, the
//!   features service: requests carrying all features still work, the logger: records queue).
//! - `healthy` (HTTP 200): every dependency SERVING.
//!
//! Readiness is the gRPC health status (SERVING once configured, NOT_SERVING while draining);
//! liveness is `GET /health/live`.

use std::sync::Arc;
use std::time::Duration;

use mesh_runtime::internal::InternalChannel;
use mesh_telemetry::metrics::HealthProbe;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::client::InferenceDownstream;
use crate::logship::SpoolStatus;

/// One dependency to check.
#[derive(Clone)]
pub struct Dependency {
    /// Name in the report, e.g. `inference http://10.0.0.7:50053`.
    pub name: String,
    /// What it is, which decides how its absence counts.
    pub role: Role,
    /// A channel to it.
    pub channel: InternalChannel,
}

/// How a dependency's absence counts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The features service.
    Features,
    /// One inference replica.
    Inference,
    /// The prediction log.
    Logger,
}

async fn status_of(channel: InternalChannel) -> &'static str {
    let mut client = HealthClient::new(channel);
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    request.set_timeout(Duration::from_millis(300));
    match tokio::time::timeout(Duration::from_millis(400), client.check(request)).await {
        Ok(Ok(r)) if r.get_ref().status() == ServingStatus::Serving => "SERVING",
        Ok(Ok(_)) => "NOT_SERVING",
        Ok(Err(_)) | Err(_) => "UNREACHABLE",
    }
}

/// The probe over `dependencies`; the report also shows what the gateway itself knows of the
/// replicas (health watch, ejection) and of its spool.
pub fn probe(
    dependencies: Vec<Dependency>,
    inference: InferenceDownstream,
    log: SpoolStatus,
) -> HealthProbe {
    let dependencies = Arc::new(dependencies);
    Arc::new(move || {
        let dependencies = dependencies.clone();
        let inference = inference.clone();
        let log = log.clone();
        Box::pin(async move {
            let statuses = futures::future::join_all(
                dependencies.iter().map(|d| status_of(d.channel.clone())),
            )
            .await;
            let serving = |role: Role| {
                dependencies
                    .iter()
                    .zip(&statuses)
                    .filter(|(d, _)| d.role == role)
                    .map(|(_, s)| *s == "SERVING")
                    .collect::<Vec<_>>()
            };
            let replicas = serving(Role::Inference);
            let overall = if !replicas.iter().any(|ok| *ok) {
                "unhealthy"
            } else if statuses.iter().all(|s| *s == "SERVING") {
                "healthy"
            } else {
                "degraded"
            };
            let checks: serde_json::Map<String, serde_json::Value> = dependencies
                .iter()
                .zip(&statuses)
                .map(|(d, s)| (d.name.clone(), serde_json::Value::from(*s)))
                .collect();
            let replica_states: serde_json::Map<String, serde_json::Value> = inference
                .states()
                .into_iter()
                .map(|r| {
                    (
                        r.url,
                        serde_json::json!({"watched_serving": r.serving, "ejected": r.ejected}),
                    )
                })
                .collect();
            let (pending_records, pending_bytes) = log.pending();
            let body = serde_json::json!({
                "status": overall,
                "checks": checks,
                "inference_replicas_serving": replicas.iter().filter(|ok| **ok).count(),
                "replicas": replica_states,
                "spool": {
                    "pending_records": pending_records,
                    "pending_bytes": pending_bytes,
                    "delivery": if log.delivery_failing() { "failing" } else { "ok" },
                },
            });
            (
                if overall == "unhealthy" { 503 } else { 200 },
                body.to_string(),
            )
        })
    })
}
