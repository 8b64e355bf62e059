//! The durable prediction log: every answered prediction reaches PostgreSQL exactly once, in
//! order, through a logger outage, a PostgreSQL outage and a gateway restart (real logger, real
//! PostgreSQL, the gateway's real on-disk spool), and through a garbled spool cursor; and the
//! spool's bound is explicit.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mesh_proto::gateway::{PredictRequest, PredictResponse};
use mesh_proto::types::FeatureValue;
use mesh_tests::*;

const DELAYED: &str = "prediction-log: delivery delayed";
const FULL: &str = "prediction-log: not recorded (spool full)";

fn complete_features() -> HashMap<String, FeatureValue> {
    json_features(&fixture()[0].features)
}

async fn predict(
    mesh_gateway: &mut mesh_proto::gateway::gateway_client::GatewayClient<
        tonic::transport::Channel,
    >,
    i: usize,
) -> PredictResponse {
    let mut request = tonic::Request::new(PredictRequest {
        model: "churn".into(),
        entity_id: format!("cust-{:05}", i % 20 + 1),
        features: complete_features(),
        model_version: String::new(),
    });
    request.set_timeout(Duration::from_secs(2));
    mesh_gateway
        .predict(request)
        .await
        .unwrap_or_else(|s| panic!("prediction {i} failed: {s:?}"))
        .into_inner()
}

/// How many of `ids` are in the predictions table, and how many rows they make.
async fn stored(db: &tokio_postgres::Client, ids: &[String]) -> (i64, i64) {
    let row = db
        .query_one(
            "SELECT count(DISTINCT prediction_id), count(*) FROM predictions WHERE prediction_id = ANY($1)",
            &[&ids],
        )
        .await
        .expect("count");
    (row.get(0), row.get(1))
}

async fn wait_stored(
    pg: &mesh_testkit::PostgresServer,
    ids: &[String],
    within: Duration,
) -> (i64, i64) {
    let db = connect_db(pg).await;
    let until = Instant::now() + within;
    loop {
        let counts = stored(&db, ids).await;
        if counts.0 == ids.len() as i64 || Instant::now() > until {
            return counts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_predictions_survive_logger_and_database_outages_and_a_gateway_restart() {
    // Tiny segments, so delivery crosses (and deletes) several spool files.
    let mut mesh = Mesh::start(|c| c.spool.segment_bytes = 4096).await;
    let mut gateway = mesh.gateway_client();
    let mut ids: Vec<String> = Vec::new();
    for i in 0..5 {
        ids.push(predict(&mut gateway, i).await.prediction_id);
    }
    assert_eq!(
        wait_stored(&mesh.pg, &ids, Duration::from_secs(10)).await,
        (5, 5)
    );

    // 1. The logger stops. Predictions are still answered; once delivery has failed, answers
    //    say the record waits in the spool.
    let logger_addr = mesh.logger.addr;
    mesh.logger.stop().await;
    let mut delayed = 0;
    for i in 0..60 {
        let answer = predict(&mut gateway, i).await;
        delayed += answer.degraded.iter().any(|d| d.starts_with(DELAYED)) as usize;
        ids.push(answer.prediction_id);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        delayed > 0,
        "answers say delivery is delayed while the logger is down"
    );
    let pending = metric(mesh.gateway_http, "mesh_spool_pending_records").await;
    assert!(pending >= 50.0, "records wait in the spool: {pending}");
    let (code, body) = http_get(mesh.gateway_http, "/health").await;
    let report: serde_json::Value = serde_json::from_str(&body).expect("health json");
    assert_eq!(code, 200, "predictions still flow: {body}");
    assert_eq!(report["status"], "degraded", "{body}");
    assert_eq!(report["spool"]["delivery"], "failing", "{body}");
    assert!(
        report["reasons"].as_array().is_some_and(|r| r
            .iter()
            .any(|r| r.as_str().is_some_and(|r| r.starts_with("logger")))),
        "the report says why: {body}"
    );
    assert!(
        report["spool"]["pending_records"].as_i64() >= Some(50),
        "{body}"
    );

    // 2. The gateway stops too (gracefully; the logger is still down): the spool stays on disk.
    let dir = mesh.spool_dir.clone();
    let files_before: usize = std::fs::read_dir(&dir).expect("spool dir").count();
    assert!(
        files_before > 2,
        "several segments were written: {files_before}"
    );
    mesh.gateway.stop().await;

    // 3. The logger comes back; a new gateway on the same spool delivers everything, once,
    //    although its cursor was garbled meanwhile: it starts, delivers again from the first
    //    segment, and the logger stores each record once.
    std::fs::write(dir.join("cursor"), b"\0\0garbled\xff").expect("garble the cursor");
    let logger = start_logger_at(logger_config(&mesh.pg), logger_addr).await;
    wait_serving(logger.addr, Duration::from_secs(30)).await;
    let mut config = gateway_config(
        mesh.features_proxy.url(),
        mesh.inference_proxies.iter().map(|p| p.url()).collect(),
        logger.url(),
    );
    config.spool.dir = dir.clone();
    config.spool.segment_bytes = 4096;
    let (gateway2, http2) = start_gateway_with_http(config).await;
    let (distinct, rows) = wait_stored(&mesh.pg, &ids, Duration::from_secs(20)).await;
    assert_eq!(
        (distinct, rows),
        (ids.len() as i64, ids.len() as i64),
        "all delivered, none twice"
    );
    let until = Instant::now() + Duration::from_secs(5);
    while metric(http2, "mesh_spool_pending_records").await != 0.0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(http2, "mesh_spool_pending_records").await, 0.0);
    assert_eq!(
        metric(http2, r#"mesh_spool_cursor_errors_total{kind="garbled"}"#).await,
        1.0,
        "the garbled cursor is counted"
    );
    let segments = std::fs::read_dir(&dir)
        .expect("spool dir")
        .filter(|e| {
            e.as_ref()
                .map(|e| e.file_name().to_string_lossy().ends_with(".spool"))
                .unwrap_or(false)
        })
        .count();
    assert!(
        segments <= 2,
        "delivered segments are deleted: {segments} left"
    );

    // Delivered in order: the ids are time-ordered (UUIDv7, made one after another here), and
    // a record is never committed before one made earlier.
    let db = mesh.db().await;
    let order = db
        .query(
            "SELECT prediction_id, logged_at FROM predictions WHERE prediction_id = ANY($1) ORDER BY prediction_id",
            &[&ids],
        )
        .await
        .expect("order");
    let times: Vec<std::time::SystemTime> = order.iter().map(|r| r.get(1)).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "committed in the order served"
    );

    // 4. PostgreSQL stops: predictions with complete features are still answered; their
    //    records wait and arrive once it is back.
    let mut gateway =
        mesh_proto::gateway::gateway_client::GatewayClient::new(channel(gateway2.addr));
    mesh.pg.stop();
    let mut during: Vec<String> = Vec::new();
    for i in 0..40 {
        during.push(predict(&mut gateway, i).await.prediction_id);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    mesh.pg.restart().expect("postgres restart");
    let (distinct, rows) = wait_stored(&mesh.pg, &during, Duration::from_secs(30)).await;
    assert_eq!(
        (distinct, rows),
        (40, 40),
        "records made while PostgreSQL was down arrive, once"
    );
    assert_eq!(
        metric(http2, r#"mesh_spool_dropped_total{reason="full"}"#).await,
        0.0
    );
    gateway2.shutdown().await;
    logger.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_keeps_answering_and_says_which_records_were_not_kept() {
    // Room for a few records only.
    let mut mesh = Mesh::start(|c| c.spool.max_bytes = 2_000).await;
    let mut gateway = mesh.gateway_client();
    mesh.logger.stop().await;
    let mut not_kept = 0;
    for i in 0..30 {
        let answer = predict(&mut gateway, i).await;
        assert!(answer.score > 0.0 && answer.score < 1.0);
        not_kept += answer.degraded.iter().any(|d| d == FULL) as usize;
    }
    assert!(
        not_kept > 0 && not_kept < 30,
        "some kept, the rest said: {not_kept}"
    );
    let dropped = metric(
        mesh.gateway_http,
        r#"mesh_spool_dropped_total{reason="full"}"#,
    )
    .await;
    assert_eq!(dropped, not_kept as f64, "each refusal is counted");
    let bytes = metric(mesh.gateway_http, "mesh_spool_pending_bytes").await;
    assert!(bytes <= 2_000.0, "the bound holds: {bytes}");
    mesh.assert_idle().await;
}
