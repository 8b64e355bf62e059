//! The gateway's detailed health report (`GET /health` on the metrics port): each dependency's
//! `grpc.health.v1` status and an overall verdict, the way seed 000's health check reports it.
//!
//! - `unhealthy` (HTTP 503): no inference replica is SERVING: no prediction can be made.
//! - `degraded` (HTTP 200): something is down but predictions still flow (some replicas, the
//!   features service: requests carrying all features still work, the logger: records queue),
//!   or delivery of the spool to the logger has been failing for longer than
//!   `MESH_LOG_DELIVERY_DEGRADED_MS` (the logger may answer its health check and still refuse
//!   records, e.g. while PostgreSQL is down).
//! - `healthy` (HTTP 200): every dependency SERVING.
//!
//! `reasons` in the report lists what made it less than healthy.
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

/// The overall verdict and the reasons for it, from each check's `(name, role, status)` and
/// the spool's reason to be degraded, if any.
fn verdict(checks: &[(&str, Role, &str)], spool: Option<String>) -> (&'static str, Vec<String>) {
    let mut reasons: Vec<String> = checks
        .iter()
        .filter(|(_, _, status)| *status != "SERVING")
        .map(|(name, _, status)| format!("{name}: {status}"))
        .collect();
    reasons.extend(spool);
    let replica_serving = checks
        .iter()
        .any(|(_, role, status)| *role == Role::Inference && *status == "SERVING");
    let overall = if !replica_serving {
        reasons.insert(0, "no inference replica is serving".into());
        "unhealthy"
    } else if reasons.is_empty() {
        "healthy"
    } else {
        "degraded"
    };
    (overall, reasons)
}

/// The probe over `dependencies` and the inference replicas current at each check (they come
/// and go with discovery); the report also shows what the gateway itself knows of the replicas
/// (health watch, ejection, the entry each came from) and of its spool.
pub fn probe(
    dependencies: Vec<Dependency>,
    inference: InferenceDownstream,
    log: SpoolStatus,
) -> HealthProbe {
    let dependencies = Arc::new(dependencies);
    Arc::new(move || {
        let mut dependencies = dependencies.as_ref().clone();
        let inference = inference.clone();
        let log = log.clone();
        dependencies.extend(inference.members().iter().map(|replica| Dependency {
            name: format!("inference {}", replica.url()),
            role: Role::Inference,
            channel: replica.channel(),
        }));
        Box::pin(async move {
            let statuses = futures::future::join_all(
                dependencies.iter().map(|d| status_of(d.channel.clone())),
            )
            .await;
            let named: Vec<(&str, Role, &str)> = dependencies
                .iter()
                .zip(&statuses)
                .map(|(d, s)| (d.name.as_str(), d.role, *s))
                .collect();
            let (overall, reasons) = verdict(&named, log.degraded_reason());
            let replicas_serving = named
                .iter()
                .filter(|(_, role, s)| *role == Role::Inference && *s == "SERVING")
                .count();
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
                        serde_json::json!({
                            "watched_serving": r.serving,
                            "ejected": r.ejected,
                            "source": r.source,
                        }),
                    )
                })
                .collect();
            let (pending_records, pending_bytes) = log.pending();
            let body = serde_json::json!({
                "status": overall,
                "reasons": reasons,
                "checks": checks,
                "inference_replicas_serving": replicas_serving,
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

#[cfg(test)]
mod tests {
    use super::*;

    const REPLICA: (&str, Role, &str) = ("inference a", Role::Inference, "SERVING");
    const LOGGER: (&str, Role, &str) = ("logger", Role::Logger, "SERVING");

    #[test]
    fn the_verdict_names_its_reasons() {
        assert_eq!(verdict(&[REPLICA, LOGGER], None), ("healthy", vec![]));
        let logger_down = ("logger", Role::Logger, "UNREACHABLE");
        assert_eq!(
            verdict(&[REPLICA, logger_down], None),
            ("degraded", vec!["logger: UNREACHABLE".to_owned()])
        );
        let replica_down = ("inference a", Role::Inference, "NOT_SERVING");
        let (overall, reasons) = verdict(&[replica_down, LOGGER], None);
        assert_eq!(overall, "unhealthy");
        assert_eq!(reasons[0], "no inference replica is serving");
    }

    /// Review item 7: every dependency answers its health check, but delivery of the spool has
    /// been failing for longer than the threshold (the logger refusing records while PostgreSQL
    /// is down looks like this): degraded, saying why.
    #[test]
    fn delivery_failing_past_the_threshold_is_degraded_with_its_reason() {
        let reason = "prediction-log delivery failing for 31 s (over 30 s)".to_owned();
        let (overall, reasons) = verdict(&[REPLICA, LOGGER], Some(reason.clone()));
        assert_eq!((overall, reasons), ("degraded", vec![reason]));
    }
}
