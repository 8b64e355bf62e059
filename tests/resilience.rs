//! Feature tiers, deadlines, bulkheads, health, reflection and drain, against real servers.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mesh_proto::features::GetFeaturesRequest;
use mesh_proto::gateway::PredictRequest;
use mesh_proto::types::{FeatureTier, FeatureValue};
use mesh_testkit::{PostgresServer, RedisServer};
use mesh_tests::*;
use tonic::Code;

const SERVING: i32 = 1;

/// A deadline miss as a tonic client sees it: the server's DEADLINE_EXCEEDED, or, when the
/// client's own timer fires first (tight budgets on a loaded machine), tonic's local
/// CANCELLED "Timeout expired". Anything else (or success) is wrong.
fn assert_deadline_miss(status: &tonic::Status) {
    let local_expiry =
        status.code() == Code::Cancelled && status.message().contains("Timeout expired");
    assert!(
        status.code() == Code::DeadlineExceeded || local_expiry,
        "expected a deadline miss, got {status:?}"
    );
}
const NOT_SERVING: i32 = 2;

fn request_only(row: &FixtureRow) -> HashMap<String, FeatureValue> {
    json_features(&row.features)
}

fn predict_request(
    entity: &str,
    features: HashMap<String, FeatureValue>,
    timeout: Duration,
) -> tonic::Request<PredictRequest> {
    let mut request = tonic::Request::new(PredictRequest {
        model: "churn".into(),
        entity_id: entity.into(),
        features,
        model_version: String::new(),
    });
    request.set_timeout(timeout);
    request
}

async fn tier_of(
    client: &mut mesh_proto::features::features_client::FeaturesClient<
        mesh_runtime::internal::InternalChannel,
    >,
    id: &str,
) -> FeatureTier {
    let mut request = tonic::Request::new(GetFeaturesRequest {
        entity_ids: vec![id.into()],
    });
    request.set_timeout(Duration::from_millis(500));
    let response = client
        .get_features(request)
        .await
        .expect("get features")
        .into_inner();
    let entity = &response.entities[0];
    assert!(entity.found, "{id} should be found");
    assert_eq!(entity.features.len(), 6, "all six stored features of {id}");
    FeatureTier::try_from(entity.tier).expect("tier")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_come_from_redis_memory_and_postgres_and_survive_redis_stopping() {
    telemetry();
    let mut redis = RedisServer::start().expect("redis");
    let pg = PostgresServer::start().expect("postgres");
    let mut config = features_config(Some(&redis), &pg);
    config.cache.ttl = Duration::from_millis(300);
    let (features, metrics) = start_features_with_metrics(config).await;
    wait_serving(features.addr, Duration::from_secs(30)).await;
    seed(
        mesh_proto::features::features_client::FeaturesClient::new(internal_channel(features.addr)),
        20,
    )
    .await;
    let mut client =
        mesh_proto::features::features_client::FeaturesClient::new(internal_channel(features.addr));

    // PutFeatures wrote the entity through to Redis: the first read comes from there.
    assert_eq!(tier_of(&mut client, "cust-00001").await, FeatureTier::Redis);
    assert_eq!(
        tier_of(&mut client, "cust-00001").await,
        FeatureTier::Memory
    );
    // An entity Redis does not hold comes from PostgreSQL and is written back.
    forget_in_redis(redis.port(), &["cust-00002"]).await;
    assert_eq!(
        tier_of(&mut client, "cust-00002").await,
        FeatureTier::Database
    );
    assert_eq!(
        tier_of(&mut client, "cust-00002").await,
        FeatureTier::Memory
    );
    // Write-back to Redis is asynchronous; give it a moment, then let memory expire.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(tier_of(&mut client, "cust-00002").await, FeatureTier::Redis);

    // Unknown entities are answered, not failed.
    let response = client
        .get_features(GetFeaturesRequest {
            entity_ids: vec!["cust-99999".into()],
        })
        .await
        .expect("unknown entity")
        .into_inner();
    assert!(!response.entities[0].found);

    // Redis down: answers keep coming from PostgreSQL, each well inside a 250 ms budget.
    redis.stop();
    for id in ["cust-00002", "cust-00001", "cust-00003"] {
        tokio::time::sleep(Duration::from_millis(350)).await;
        let started = Instant::now();
        let tier = tier_of(&mut client, id).await;
        let took = started.elapsed();
        assert!(
            matches!(tier, FeatureTier::Database | FeatureTier::Memory),
            "{id}: {tier:?}"
        );
        assert!(
            took < Duration::from_millis(250),
            "{id} took {took:?} with Redis down"
        );
    }

    // Concurrent misses for one entity are coalesced into a single load: of twenty callers,
    // exactly one load reaches PostgreSQL; every other caller joined it or found its result
    // in memory.
    let db_hits = r#"mesh_feature_tier_hits_total{tier="database"}"#;
    let memory_hits = r#"mesh_feature_tier_hits_total{tier="memory"}"#;
    let (db_before, mem_before, joined_before) = (
        metric(metrics, db_hits).await,
        metric(metrics, memory_hits).await,
        metric(metrics, "mesh_feature_coalesced_total").await,
    );
    let calls = (0..20).map(|_| {
        let mut c = client.clone();
        async move { tier_of(&mut c, "cust-00010").await }
    });
    let tiers = futures::future::join_all(calls).await;
    assert!(tiers
        .iter()
        .all(|t| *t == FeatureTier::Database || *t == FeatureTier::Memory));
    assert_eq!(
        metric(metrics, db_hits).await - db_before,
        1.0,
        "one load for twenty callers"
    );
    let joined = metric(metrics, "mesh_feature_coalesced_total").await - joined_before;
    let from_memory = metric(metrics, memory_hits).await - mem_before;
    assert_eq!(
        joined + from_memory,
        19.0,
        "joined {joined}, memory {from_memory}"
    );
    features.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_are_kept_even_when_a_dependency_is_slow() {
    let mesh = Mesh::start(|_| {}).await;
    mesh.seed(5).await;
    let mut gateway = mesh.gateway_client();
    let row = &fixture()[0];
    let mut partial = request_only(row);
    partial.retain(|k, _| k == "support_calls_30d" || k == "channel");

    // A 1 ms budget is refused fast with DEADLINE_EXCEEDED.
    let started = Instant::now();
    let status = gateway
        .predict(predict_request(
            &row.entity_id,
            partial.clone(),
            Duration::from_millis(1),
        ))
        .await
        .expect_err("1 ms is not enough");
    assert_deadline_miss(&status);
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "took {:?}",
        started.elapsed()
    );

    // Fault injection (a real service cannot be told to be slow): the test proxy in front of
    // the features service adds 500 ms. A 100 ms Predict must fail on time, not hang.
    mesh.features_proxy.set_delay(Duration::from_millis(500));
    for _ in 0..3 {
        let started = Instant::now();
        let status = gateway
            .predict(predict_request(
                &row.entity_id,
                partial.clone(),
                Duration::from_millis(100),
            ))
            .await
            .expect_err("features are too slow");
        let took = started.elapsed();
        assert_deadline_miss(&status);
        assert!(
            took < Duration::from_millis(100 + 40),
            "deadline overrun: {took:?}"
        );
    }
    // Without a client deadline the gateway's default budget (1 s in tests) applies.
    let started = Instant::now();
    let mut request = tonic::Request::new(PredictRequest {
        model: "churn".into(),
        entity_id: row.entity_id.clone(),
        features: partial.clone(),
        model_version: String::new(),
    });
    mesh.features_proxy.set_delay(Duration::from_millis(1500));
    request.metadata_mut().remove("grpc-timeout");
    let status = gateway.predict(request).await.expect_err("default budget");
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(
        started.elapsed() < Duration::from_millis(1000 + 100),
        "took {:?}",
        started.elapsed()
    );

    // Features slow but the request complete: no feature fetch, answered on time.
    let response = gateway
        .predict(predict_request(
            "walk-in",
            request_only(row),
            Duration::from_millis(200),
        ))
        .await
        .expect("complete request needs no features");
    assert_eq!(
        response.into_inner().feature_tier,
        FeatureTier::Request as i32
    );
    mesh.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_inference_bulkhead_sheds_excess_and_health_still_answers() {
    // Coalescing off: every Predict makes its own downstream calls, so ten of them at once are
    // ten calls against a limit of two (coalesced, they would share one or two calls).
    let mesh = Mesh::start(|config| {
        config.bulkheads.inference = 2;
        config.bulkheads.features = 2;
        config.bulkheads.coalesce = 1;
    })
    .await;
    // Fault injection via the test proxy: inference takes 300 ms, so calls pile up.
    for proxy in &mesh.inference_proxies {
        proxy.set_delay(Duration::from_millis(300));
    }
    let row = fixture()[0].clone();
    let calls = (0..10).map(|_| {
        let mut gateway = mesh.gateway_client();
        let features = request_only(&row);
        async move {
            gateway
                .predict(predict_request("walk-in", features, Duration::from_secs(2)))
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }
    });
    let probe = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        let status = health(mesh.gateway.addr, "mesh.gateway.v1.Gateway").await;
        (status, started.elapsed())
    };
    let (results, (probe_status, probe_took)) =
        tokio::join!(futures::future::join_all(calls), probe);
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let shed = results
        .iter()
        .filter(|r| **r == Err(Code::ResourceExhausted))
        .count();
    assert_eq!(
        ok + shed,
        10,
        "only successes and sheds expected: {results:?}"
    );
    assert!(ok >= 2, "the bulkhead admits its limit: {results:?}");
    assert!(shed >= 6, "excess calls are shed, not queued: {results:?}");
    assert_eq!(
        probe_status,
        Some(SERVING),
        "health answered while saturated"
    );
    assert!(
        probe_took < Duration::from_millis(100),
        "health took {probe_took:?}"
    );

    // The features compartment sheds the same way (and is separate: inference is idle now).
    mesh.seed(3).await;
    for proxy in &mesh.inference_proxies {
        proxy.set_delay(Duration::ZERO);
    }
    mesh.features_proxy.set_delay(Duration::from_millis(300));
    let mut partial = request_only(&row);
    partial.retain(|k, _| k == "support_calls_30d" || k == "channel");
    let calls = (0..8).map(|_| {
        let mut gateway = mesh.gateway_client();
        let features = partial.clone();
        async move {
            gateway
                .predict(predict_request(
                    "cust-00001",
                    features,
                    Duration::from_secs(2),
                ))
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }
    });
    let results = futures::future::join_all(calls).await;
    let shed = results
        .iter()
        .filter(|r| **r == Err(Code::ResourceExhausted))
        .count();
    assert!(
        shed >= 4,
        "a full features compartment answers RESOURCE_EXHAUSTED: {results:?}"
    );
    assert!(
        results
            .iter()
            .all(|r| r.is_ok() || *r == Err(Code::ResourceExhausted)),
        "{results:?}"
    );
    mesh.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_public_services() {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    let mesh = Mesh::start(|_| {}).await;
    let expectations = [
        (mesh.gateway.addr, "mesh.gateway.v1.Gateway"),
        (mesh.features.addr, "mesh.features.v1.Features"),
        (mesh.inference[0].addr, "inference.GRPCInferenceService"),
        (mesh.logger.addr, "mesh.logger.v1.PredictionLog"),
    ];
    for (addr, service) in expectations {
        let mut client = ServerReflectionClient::new(internal_channel(addr));
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(futures::stream::iter(vec![request]))
            .await
            .expect("reflection")
            .into_inner();
        let response = stream.message().await.expect("message").expect("some");
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("unexpected reflection response");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.contains(&service.to_owned()), "{addr}: {names:?}");
        assert!(
            names.contains(&"grpc.health.v1.Health".to_owned()),
            "{names:?}"
        );
        // Inference also serves the mesh's catalog of its model versions, the gateway the
        // admin API.
        let own = match service {
            "inference.GRPCInferenceService" | "mesh.gateway.v1.Gateway" => 3,
            _ => 2,
        };
        assert_eq!(names.len(), own, "only its own services: {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_before_warm_up_and_while_draining() {
    telemetry();
    // Many warm-up rounds make warm-up last long enough to observe from outside.
    let mut config = inference_config();
    config.models.warmup_iterations = 30_000;
    config.server.drain_delay = Duration::from_millis(800);
    let mut replica = start_inference(config).await;
    assert_eq!(
        health(replica.addr, "").await,
        Some(NOT_SERVING),
        "before warm-up"
    );
    assert_eq!(
        health(replica.addr, "inference.GRPCInferenceService").await,
        Some(NOT_SERVING)
    );
    let mut client =
        mesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient::new(
            internal_channel(replica.addr),
        );
    let ready = client
        .server_ready(mesh_proto::inference::ServerReadyRequest {})
        .await
        .expect("ready rpc");
    assert!(!ready.into_inner().ready);
    wait_serving(replica.addr, Duration::from_secs(120)).await;

    replica.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        health(replica.addr, "").await,
        Some(NOT_SERVING),
        "while draining"
    );
    // Still answering requests during the drain delay.
    let live = client
        .server_live(mesh_proto::inference::ServerLiveRequest {})
        .await;
    assert!(
        live.is_ok(),
        "in-flight traffic is still served while draining"
    );
    let started = Instant::now();
    while !replica.finished() && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(replica.finished(), "drain finished within the grace period");
}
