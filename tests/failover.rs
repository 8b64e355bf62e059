//! Retries and circuit breakers at the gateway, against real services that really stop.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mesh_proto::gateway::PredictRequest;
use mesh_proto::types::FeatureValue;
use mesh_tests::*;
use tonic::Code;

fn request(
    entity: &str,
    features: HashMap<String, FeatureValue>,
) -> tonic::Request<PredictRequest> {
    let mut r = tonic::Request::new(PredictRequest {
        model: "churn".into(),
        entity_id: entity.into(),
        features,
        model_version: String::new(),
    });
    r.set_timeout(Duration::from_millis(500));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_survive_a_dead_replica_and_a_dead_features_service_trips_the_breaker() {
    let mut mesh = Mesh::start(|_| {}).await;
    mesh.seed(5).await;
    let mut gateway = mesh.gateway_client();
    let row = fixture()[0].clone();
    let complete: HashMap<String, FeatureValue> = json_features(&row.features);
    let partial: HashMap<String, FeatureValue> = complete
        .iter()
        .filter(|(k, _)| *k == "support_calls_30d" || *k == "channel")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();

    let report = |body: &str| serde_json::from_str::<serde_json::Value>(body).expect("json report");
    assert_eq!(http_get(mesh.gateway_http, "/health/live").await.0, 200);
    let (code, body) = http_get(mesh.gateway_http, "/health").await;
    assert_eq!(
        (code, report(&body)["status"].as_str()),
        (200, Some("healthy")),
        "{body}"
    );

    // A client sending hopeless deadlines gets its errors but does not open the breaker for
    // everyone else.
    for _ in 0..10 {
        let mut hopeless = request(&row.entity_id, partial.clone());
        hopeless.set_timeout(Duration::from_millis(1));
        let _ = gateway.predict(hopeless).await;
    }
    assert_eq!(
        metric(mesh.gateway_http, FEATURES_BREAKER).await,
        0.0,
        "breaker stays closed"
    );
    gateway
        .predict(request(&row.entity_id, partial.clone()))
        .await
        .expect("others are unaffected");

    // One inference replica stops for good: every prediction is still answered by the other.
    let dead = mesh.inference.remove(0);
    dead.shutdown().await;
    let (code, body) = http_get(mesh.gateway_http, "/health").await;
    assert_eq!(
        (code, report(&body)["status"].as_str()),
        (200, Some("degraded")),
        "{body}"
    );
    assert_eq!(report(&body)["inference_replicas_serving"], 1, "{body}");
    for i in 0..40 {
        let response = gateway
            .predict(request(&row.entity_id, partial.clone()))
            .await
            .unwrap_or_else(|s| panic!("prediction {i} with one replica down: {s:?}"));
        assert!((response.into_inner().score - row.probability).abs() < 1e-5);
    }

    // The features service stops: its breaker opens after 5 consecutive failures.
    let features_addr = mesh.features.addr;
    let features = std::mem::replace(&mut mesh.features, spawn_placeholder().await);
    features.shutdown().await;
    let mut codes = Vec::new();
    for _ in 0..8 {
        let status = gateway
            .predict(request(&row.entity_id, partial.clone()))
            .await
            .expect_err("features are down and the request is incomplete");
        codes.push(status.code());
    }
    // Until the breaker opens, each call ends in a clear error within its deadline: UNAVAILABLE,
    // or DEADLINE_EXCEEDED while the client channel is still trying to reconnect.
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, Code::Unavailable | Code::DeadlineExceeded)),
        "{codes:?}"
    );
    let started = Instant::now();
    let status = gateway
        .predict(request(&row.entity_id, partial.clone()))
        .await
        .expect_err("breaker open");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("circuit open"), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "fails fast: {:?}",
        started.elapsed()
    );
    // Degradation: a request that brings every feature is still served.
    gateway
        .predict(request("walk-in", complete.clone()))
        .await
        .expect("complete requests need no features service");

    // Features come back where they were; after the cool-down a probe closes the breaker.
    mesh.features =
        start_features_at(features_config(Some(&mesh.redis), &mesh.pg), features_addr).await;
    wait_serving(features_addr, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let response = gateway
        .predict(request(&row.entity_id, partial.clone()))
        .await
        .expect("recovered after the half-open probe");
    assert!((response.into_inner().score - row.probability).abs() < 1e-5);

    // No inference replica left: the report says unhealthy, with 503 for load balancers.
    let last = mesh.inference.remove(0);
    last.shutdown().await;
    let (code, body) = http_get(mesh.gateway_http, "/health").await;
    assert_eq!(
        (code, report(&body)["status"].as_str()),
        (503, Some("unhealthy")),
        "{body}"
    );
    mesh.assert_idle().await;
}

/// A stand-in `Running` (an idle listener) so the mesh struct stays whole while a service is down.
async fn spawn_placeholder() -> Running {
    spawn_service(|listener, stopped| async move {
        drop(listener);
        let _ = stopped.await;
        Ok::<(), std::convert::Infallible>(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_behind_features_does_not_open_its_breaker() {
    let mut mesh = Mesh::start(|_| {}).await;
    mesh.seed(5).await;
    let mut gateway = mesh.gateway_client();
    let row = fixture()[0].clone();
    let partial: HashMap<String, FeatureValue> = json_features(&row.features)
        .into_iter()
        .filter(|(k, _)| k == "support_calls_30d" || k == "channel")
        .collect();
    // cust-00001 is loaded (and cached); the others never were, and are taken out of Redis
    // (which holds every entity written) so that only PostgreSQL has them.
    forget_in_redis(
        mesh.redis.port(),
        &["cust-00002", "cust-00003", "cust-00004", "cust-00005"],
    )
    .await;
    gateway
        .predict(request("cust-00001", partial.clone()))
        .await
        .expect("cached entity");
    mesh.pg.stop();
    for i in 2..=5 {
        for _ in 0..3 {
            let error = gateway
                .predict(request(&format!("cust-{i:05}"), partial.clone()))
                .await
                .expect_err("uncached entity while PostgreSQL is down");
            assert_eq!(error.code(), Code::Unavailable, "{error:?}");
            assert!(
                error.message().contains("cannot reach its database"),
                "{error:?}"
            );
        }
    }
    // Twelve failures in a row, but the features service answered every one: its breaker stays
    // closed and what it has cached is still served.
    assert_eq!(metric(mesh.gateway_http, FEATURES_BREAKER).await, 0.0);
    let answer = gateway
        .predict(request("cust-00001", partial.clone()))
        .await
        .expect("cached entity still served")
        .into_inner();
    assert!(
        answer
            .degraded
            .iter()
            .any(|d| d.starts_with("features: PostgreSQL unavailable")),
        "{:?}",
        answer.degraded
    );
    mesh.pg.restart().expect("restart postgres");
    mesh.assert_idle().await;
}
