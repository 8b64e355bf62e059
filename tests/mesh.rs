//! Whole-mesh tests: the four services on real Redis, PostgreSQL and ONNX Runtime, talking
//! gRPC over loopback. Each test starts its own servers on free ports.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mesh_proto::gateway::{batch_result, BatchItem, PredictBatchRequest, PredictRequest};
use mesh_proto::types::{FeatureTier, FeatureValue};
use mesh_tests::*;
use tonic::Code;

fn predict(model: &str, entity: &str, features: HashMap<String, FeatureValue>) -> PredictRequest {
    PredictRequest {
        model: model.into(),
        entity_id: entity.into(),
        features,
        model_version: String::new(),
    }
}

/// Scores are float32 inside the graph; the fixture is scikit-learn's float64.
const SKEW_TOLERANCE: f64 = 1e-5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predict_matches_the_python_pipeline_and_is_logged_with_its_trace_id() {
    let mesh = Mesh::start(|_| {}).await;
    mesh.seed(50).await;
    let mut gateway = mesh.gateway_client();
    let rows = fixture();
    assert!(rows.len() >= 20, "fixture too small");
    let mut served = Vec::new();
    for row in rows.iter().take(20) {
        let response = gateway
            .predict(predict("churn", &row.entity_id, request_features(row)))
            .await
            .unwrap_or_else(|s| panic!("predict {}: {s}", row.entity_id))
            .into_inner();
        assert!(
            (response.score - row.probability).abs() < SKEW_TOLERANCE,
            "{}: mesh {} vs python {}",
            row.entity_id,
            response.score,
            row.probability
        );
        assert_eq!(response.model_version, "1");
        assert_eq!(
            response.trace_id.len(),
            32,
            "trace id {:?}",
            response.trace_id
        );
        assert_ne!(response.trace_id, "0".repeat(32));
        assert!(matches!(
            FeatureTier::try_from(response.feature_tier),
            Ok(FeatureTier::Database | FeatureTier::Memory | FeatureTier::Redis)
        ));
        served.push(response);
    }

    // Every served prediction reaches PostgreSQL with the same id, trace id and score.
    let db = mesh.db().await;
    let started = Instant::now();
    loop {
        let count: i64 = db
            .query_one("SELECT count(*) FROM predictions", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if count as usize >= served.len() || started.elapsed() > Duration::from_secs(10) {
            assert_eq!(count as usize, served.len(), "records in PostgreSQL");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for response in &served {
        let row = db
            .query_one(
                "SELECT trace_id, score, entity_id, features->>'channel' FROM predictions WHERE prediction_id = $1",
                &[&response.prediction_id],
            )
            .await
            .expect("logged record");
        assert_eq!(row.get::<_, String>(0), response.trace_id);
        assert_eq!(row.get::<_, f64>(1), response.score);
        assert!(row.get::<_, Option<String>>(3).is_some(), "features logged");
    }
    mesh.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predict_batch_scores_good_items_and_reports_bad_ones() {
    let mesh = Mesh::start(|_| {}).await;
    mesh.seed(10).await;
    let rows = fixture();
    let mut items: Vec<BatchItem> = rows
        .iter()
        .take(3)
        .map(|r| BatchItem {
            entity_id: r.entity_id.clone(),
            features: request_features(r),
        })
        .collect();
    items.push(BatchItem {
        entity_id: "nobody".into(),
        features: request_features(&rows[0]),
    });
    items.push(BatchItem {
        entity_id: rows[0].entity_id.clone(),
        features: HashMap::from([("support_calls_30d".to_owned(), cat("many"))]),
    });
    items.push(BatchItem {
        entity_id: String::new(),
        features: request_features(&rows[0]),
    });
    let response = mesh
        .gateway_client()
        .predict_batch(PredictBatchRequest {
            model: "churn".into(),
            items,
            model_version: String::new(),
        })
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(response.results.len(), 6);
    for (i, row) in rows.iter().take(3).enumerate() {
        match &response.results[i].result {
            Some(batch_result::Result::Prediction(p)) => {
                assert!(
                    (p.score - row.probability).abs() < SKEW_TOLERANCE,
                    "item {i}"
                )
            }
            other => panic!("item {i}: {other:?}"),
        }
    }
    let error = |i: usize| match &response.results[i].result {
        Some(batch_result::Result::Error(e)) => e.clone(),
        other => panic!("item {i} should have failed: {other:?}"),
    };
    assert_eq!(error(3).code, Code::NotFound as i32);
    assert!(error(3).message.contains("nobody"));
    assert_eq!(error(4).code, Code::InvalidArgument as i32);
    assert!(error(4).message.contains("support_calls_30d"));
    assert_eq!(error(5).code, Code::InvalidArgument as i32);
    assert!(error(5).message.contains("entity_id"));
    mesh.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_clear_errors_naming_the_culprit() {
    let mesh = Mesh::start(|_| {}).await;
    mesh.seed(5).await;
    let mut gateway = mesh.gateway_client();
    let row = &fixture()[0];
    let good = request_features(row);

    let check = |result: Result<tonic::Response<_>, tonic::Status>, code: Code, names: &[&str]| {
        let Err(status) = result else {
            panic!("should fail")
        };
        assert_eq!(status.code(), code, "{status:?}");
        for name in names {
            assert!(
                status.message().contains(name),
                "{:?} should name {name}",
                status.message()
            );
        }
    };

    let mut missing = good.clone();
    missing.remove("channel");
    check(
        gateway
            .predict(predict("churn", &row.entity_id, missing))
            .await,
        Code::InvalidArgument,
        &["missing", "channel"],
    );

    let mut unknown = good.clone();
    unknown.insert("shoe_size".into(), num(44.0));
    check(
        gateway
            .predict(predict("churn", &row.entity_id, unknown))
            .await,
        Code::InvalidArgument,
        &["unknown", "shoe_size"],
    );

    let mut wrong = good.clone();
    wrong.insert("channel".into(), num(3.0));
    check(
        gateway
            .predict(predict("churn", &row.entity_id, wrong))
            .await,
        Code::InvalidArgument,
        &["channel", "category"],
    );

    let mut nan = good.clone();
    nan.insert("support_calls_30d".into(), num(f64::NAN));
    check(
        gateway.predict(predict("churn", &row.entity_id, nan)).await,
        Code::InvalidArgument,
        &["support_calls_30d", "finite"],
    );

    check(
        gateway
            .predict(predict("fraud", &row.entity_id, good.clone()))
            .await,
        Code::NotFound,
        &["fraud"],
    );
    check(
        gateway.predict(predict("churn", "", good.clone())).await,
        Code::InvalidArgument,
        &["entity_id"],
    );
    check(
        gateway
            .predict(predict("churn", "cust-99999", good.clone()))
            .await,
        Code::NotFound,
        &["cust-99999"],
    );

    // Control characters (PostgreSQL cannot store NUL) are refused before any lookup, so such
    // requests never reach a store and never count against its circuit breaker.
    for _ in 0..8 {
        check(
            gateway
                .predict(predict("churn", "cust-\u{0}1", good.clone()))
                .await,
            Code::InvalidArgument,
            &["entity_id", "control character", "U+0000"],
        );
    }
    assert_eq!(metric(mesh.gateway_http, FEATURES_BREAKER).await, 0.0);
    let mut nul = good.clone();
    nul.insert("channel".into(), cat("we\0b"));
    check(
        gateway.predict(predict("churn", &row.entity_id, nul)).await,
        Code::InvalidArgument,
        &["channel", "control character"],
    );

    let mut pinned = predict("churn", &row.entity_id, good.clone());
    pinned.model_version = "42".into();
    check(gateway.predict(pinned).await, Code::NotFound, &["42"]);

    // A request that brings every feature needs no feature store at all.
    let complete = json_features(&row.features);
    let response = gateway
        .predict(predict("churn", "walk-in", complete))
        .await
        .expect("complete request")
        .into_inner();
    assert_eq!(response.feature_tier, FeatureTier::Request as i32);
    assert!((response.score - row.probability).abs() < SKEW_TOLERANCE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_alone_reproduces_every_fixture_probability_in_one_batch() {
    use mesh_proto::inference::model_infer_request::InferInputTensor;
    use mesh_proto::inference::{InferTensorContents, ModelInferRequest};
    telemetry();
    let replica = start_inference(inference_config()).await;
    wait_serving(replica.addr, Duration::from_secs(60)).await;
    let rows = fixture();
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("models/churn/1/manifest.json")).expect("manifest"),
    )
    .expect("json");
    let inputs = manifest["features"]
        .as_array()
        .expect("features")
        .iter()
        .map(|f| {
            let name = f["name"].as_str().expect("name");
            let number = f["type"] == "number";
            let contents = if number {
                InferTensorContents {
                    fp32_contents: rows
                        .iter()
                        .map(|r| r.features[name].as_f64().expect("num") as f32)
                        .collect(),
                    ..Default::default()
                }
            } else {
                InferTensorContents {
                    bytes_contents: rows
                        .iter()
                        .map(|r| r.features[name].as_str().expect("str").as_bytes().to_vec())
                        .collect(),
                    ..Default::default()
                }
            };
            InferInputTensor {
                name: name.into(),
                datatype: if number { "FP32" } else { "BYTES" }.into(),
                shape: vec![rows.len() as i64, 1],
                parameters: Default::default(),
                contents: Some(contents),
            }
        })
        .collect();
    let mut client =
        mesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient::new(
            internal_channel(replica.addr),
        );
    let response = client
        .model_infer(ModelInferRequest {
            model_name: "churn".into(),
            inputs,
            ..Default::default()
        })
        .await
        .expect("infer")
        .into_inner();
    let probabilities = response
        .outputs
        .iter()
        .find(|o| o.name == "probabilities")
        .expect("probabilities output");
    assert_eq!(probabilities.shape, vec![rows.len() as i64, 2]);
    let values = &probabilities
        .contents
        .as_ref()
        .expect("contents")
        .fp32_contents;
    let worst = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (values[i * 2 + 1] as f64 - r.probability).abs())
        .fold(0.0f64, f64::max);
    assert!(
        worst < SKEW_TOLERANCE,
        "largest training/serving difference {worst}"
    );

    // KServe metadata describes the manifest's typed inputs.
    let metadata = client
        .model_metadata(mesh_proto::inference::ModelMetadataRequest {
            name: "churn".into(),
            version: String::new(),
        })
        .await
        .expect("metadata")
        .into_inner();
    let contract = metadata
        .inputs
        .iter()
        .find(|i| i.name == "contract")
        .expect("contract input");
    assert_eq!(contract.datatype, "BYTES");
    let live = client
        .server_ready(mesh_proto::inference::ServerReadyRequest {})
        .await
        .expect("ready");
    assert!(live.into_inner().ready);
    replica.shutdown().await;
}
