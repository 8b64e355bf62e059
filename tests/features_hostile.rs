//! Hostile input and poison data (issue 8): random entity ids cannot empty the features memory
//! tier, one uncached entity during a PostgreSQL outage fails only its own batch item, and
//! stored values the models cannot take are the server's problem, never the caller's.

use std::collections::HashMap;
use std::time::Duration;

use mesh_proto::features::{EntityFeatures, GetFeaturesRequest, PutFeaturesRequest};
use mesh_proto::gateway::{batch_result, BatchItem, PredictBatchRequest, PredictRequest};
use mesh_proto::types::{FeatureTier, FeatureValue};
use mesh_testkit::PostgresServer;
use mesh_tests::*;
use tonic::Code;

/// The two request-time features of the first fixture row (the rest must come from the store).
fn partial() -> HashMap<String, FeatureValue> {
    json_features(&fixture()[0].features)
        .into_iter()
        .filter(|(k, _)| k == "support_calls_30d" || k == "channel")
        .collect()
}

fn predict(
    entity: &str,
    features: HashMap<String, FeatureValue>,
) -> tonic::Request<PredictRequest> {
    let mut request = tonic::Request::new(PredictRequest {
        model: "churn".into(),
        entity_id: entity.into(),
        features,
        model_version: String::new(),
    });
    request.set_timeout(Duration::from_secs(2));
    request
}

fn batch(ids: &[&str]) -> tonic::Request<PredictBatchRequest> {
    let mut request = tonic::Request::new(PredictBatchRequest {
        model: "churn".into(),
        items: ids
            .iter()
            .map(|id| BatchItem {
                entity_id: (*id).into(),
                features: partial(),
            })
            .collect(),
        model_version: String::new(),
    });
    request.set_timeout(Duration::from_secs(2));
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_unknown_ids_do_not_push_cached_entities_out_of_memory() {
    telemetry();
    let pg = PostgresServer::start().expect("postgres");
    let mut config = features_config(None, &pg);
    config.cache.ttl = Duration::from_secs(60);
    config.cache.capacity = 100;
    config.cache.negative_capacity = 50;
    let features = start_features(config).await;
    wait_serving(features.addr, Duration::from_secs(30)).await;
    let mut client =
        mesh_proto::features::features_client::FeaturesClient::new(internal_channel(features.addr));
    seed(client.clone(), 5).await;
    let known: Vec<String> = (1..=5).map(|i| format!("cust-{i:05}")).collect();
    let get = |ids: Vec<String>| GetFeaturesRequest { entity_ids: ids };
    for _ in 0..3 {
        client
            .get_features(get(known.clone()))
            .await
            .expect("known");
    }
    // Three thousand ids nobody has: thirty times the memory tier's capacity.
    for round in 0..3 {
        let random: Vec<String> = (0..1000).map(|i| format!("random-{round}-{i}")).collect();
        let answer = client
            .get_features(get(random))
            .await
            .expect("random")
            .into_inner();
        assert!(answer.entities.iter().all(|e| !e.found));
    }
    let answer = client
        .get_features(get(known))
        .await
        .expect("known")
        .into_inner();
    for entity in &answer.entities {
        assert!(entity.found, "{}", entity.entity_id);
        assert_eq!(
            FeatureTier::try_from(entity.tier),
            Ok(FeatureTier::Memory),
            "{} was pushed out of memory by unknown ids",
            entity.entity_id
        );
    }
    features.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_database_outage_only_the_uncached_items_of_a_batch_fail() {
    let mut mesh = Mesh::start_with(1, |_| {}).await;
    mesh.seed(5).await;
    // Redis holds every entity written (materialized): take two out of it, so that only
    // PostgreSQL has them.
    forget_in_redis(mesh.redis.port(), &["cust-00003", "cust-00004"]).await;
    wait_in_redis(mesh.redis.port(), &["cust-00005"]).await;
    let mut gateway = mesh.gateway_client();
    for id in ["cust-00001", "cust-00002"] {
        gateway
            .predict(predict(id, partial()))
            .await
            .expect("cached now");
    }
    mesh.pg.stop();
    // cust-00005 was never read: Redis serves it.
    let ids = [
        "cust-00001",
        "cust-00003",
        "cust-00002",
        "cust-00004",
        "cust-00005",
    ];
    let answer = gateway
        .predict_batch(batch(&ids))
        .await
        .expect("the batch is answered, item by item")
        .into_inner();
    assert_eq!(answer.results.len(), ids.len());
    for (id, result) in ids.iter().zip(&answer.results) {
        match (*id, &result.result) {
            (
                "cust-00001" | "cust-00002" | "cust-00005",
                Some(batch_result::Result::Prediction(p)),
            ) => {
                assert!(p.score > 0.0 && p.score < 1.0, "{id}: {p:?}")
            }
            ("cust-00003" | "cust-00004", Some(batch_result::Result::Error(e))) => {
                assert_eq!(e.code, Code::Unavailable as i32, "{id}: {e:?}");
                assert!(e.message.contains("cannot reach its database"), "{e:?}");
                assert!(e.message.contains(id), "{e:?}");
            }
            (id, other) => panic!("{id}: unexpected {other:?}"),
        }
    }
    mesh.pg.restart().expect("restart postgres");
    mesh.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_values_are_refused_on_write_and_blamed_on_the_store_on_read() {
    let mesh = Mesh::start_with(1, |_| {}).await;
    mesh.seed(5).await;
    let mut gateway = mesh.gateway_client();
    let mut features = mesh.features_client();

    // Writes: a double that float32 cannot hold is refused, naming entity, feature and value.
    let status = features
        .put_features(PutFeaturesRequest {
            entities: vec![EntityFeatures {
                entity_id: "cust-00009".into(),
                found: true,
                features: HashMap::from([("monthly_charges".to_owned(), num(1e300))]),
                tier: 0,
            }],
        })
        .await
        .expect_err("1e300 is not a float32");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    for part in ["cust-00009", "monthly_charges", "1e300", "float32"] {
        assert!(status.message().contains(part), "{part}: {status:?}");
    }

    // Reads: values already in the database (from before the check) are the store's problem.
    let db = mesh.db().await;
    db.execute(
        "UPDATE feature_values SET number = 1e300 WHERE entity_id = 'cust-00002' AND name = 'monthly_charges'",
        &[],
    )
    .await
    .expect("poison a number");
    db.execute(
        "UPDATE feature_values SET category = 'weekly' WHERE entity_id = 'cust-00003' AND name = 'contract'",
        &[],
    )
    .await
    .expect("poison a category");
    // A change made in SQL bypasses the write-through: take the entities out of Redis so that
    // they are read from PostgreSQL.
    forget_in_redis(mesh.redis.port(), &["cust-00002", "cust-00003"]).await;
    let status = gateway
        .predict(predict("cust-00002", partial()))
        .await
        .expect_err("stored 1e300");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("monthly_charges"), "{status:?}");
    let status = gateway
        .predict(predict("cust-00003", partial()))
        .await
        .expect_err("stored unknown category");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("contract"), "{status:?}");

    // In a batch the poisoned entities fail alone.
    let answer = gateway
        .predict_batch(batch(&["cust-00001", "cust-00002", "cust-00003"]))
        .await
        .expect("batch")
        .into_inner();
    let codes: Vec<i32> = answer
        .results
        .iter()
        .map(|r| match &r.result {
            Some(batch_result::Result::Prediction(_)) => 0,
            Some(batch_result::Result::Error(e)) => e.code,
            None => -1,
        })
        .collect();
    let failed = Code::FailedPrecondition as i32;
    assert_eq!(codes, vec![0, failed, failed]);

    // A request-supplied category outside the vocabulary is the caller's: named, with the
    // allowed values.
    let mut tv = partial();
    tv.insert("channel".into(), cat("tv"));
    let status = gateway
        .predict(predict("cust-00001", tv))
        .await
        .expect_err("unknown channel");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    for part in ["channel", "\"tv\"", "web, mobile, store"] {
        assert!(status.message().contains(part), "{part}: {status:?}");
    }
    mesh.assert_idle().await;
}
