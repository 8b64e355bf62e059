//! Hostile input against the real services: each test reproduces a failure an outside review
//! found (a crafted tensor shape, a record PostgreSQL refuses, invented method paths) and
//! asserts the mesh keeps serving and keeps every record.

use std::time::Duration;

use mesh_proto::inference::model_infer_request::InferInputTensor;
use mesh_proto::inference::ModelInferRequest;
use mesh_proto::logger::prediction_log_client::PredictionLogClient;
use mesh_proto::logger::{PredictionRecord, RecordRequest};
use mesh_tests::*;
use tonic::Code;

/// A record the gateway could have sent, for `id`.
fn record(id: &str) -> PredictionRecord {
    PredictionRecord {
        prediction_id: id.into(),
        time_unix_micros: 1_767_000_000_000_000,
        model: "churn".into(),
        model_version: "1".into(),
        entity_id: "cust-1".into(),
        features: [("tenure_months".to_owned(), num(3.0))].into(),
        score: 0.25,
        latency_micros: 900,
        feature_tier: 1,
        trace_id: String::new(),
        shadow_of: String::new(),
    }
}

/// A BYTES input that declares 2^48 rows but carries one, in `raw_input_contents`: the
/// declared count used to be allocated before it was checked, aborting the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_huge_shape_is_refused_and_the_replica_stays_up() {
    telemetry();
    let replica = start_inference(inference_config()).await;
    wait_serving(replica.addr, Duration::from_secs(60)).await;
    let mut client = inference_client(replica.addr);
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("models/churn/1/manifest.json")).expect("manifest"),
    )
    .expect("json");
    let mut inputs = Vec::new();
    let mut raw = Vec::new();
    for feature in manifest["features"].as_array().expect("features") {
        let number = feature["type"] == "number";
        inputs.push(InferInputTensor {
            name: feature["name"].as_str().expect("name").into(),
            datatype: if number { "FP32" } else { "BYTES" }.into(),
            shape: vec![1 << 48, 1],
            parameters: Default::default(),
            contents: None,
        });
        raw.push(if number {
            1.0f32.to_le_bytes().to_vec()
        } else {
            [&2u32.to_le_bytes()[..], b"ab"].concat()
        });
    }
    let status = client
        .model_infer(ModelInferRequest {
            model_name: "churn".into(),
            inputs,
            raw_input_contents: raw,
            ..Default::default()
        })
        .await
        .expect_err("a shape the bytes do not carry");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("declares 281474976710656 rows"),
        "the error names the claim: {status:?}"
    );
    assert!(!replica.finished(), "the replica died");
    let live = client
        .server_ready(mesh_proto::inference::ServerReadyRequest {})
        .await
        .expect("ready after the hostile call");
    assert!(live.into_inner().ready);
    replica.shutdown().await;
}

/// One record PostgreSQL cannot store (a timestamp out of its range) used to fail its batch for
/// good: the writer retried it forever and refused every later call. Now it goes to
/// `prediction_rejects` and the 500 good records of its call commit, and so do later calls. Shadow
/// predictions in the same call go to `shadow_predictions`, a refused one to the rejects too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_lands_in_rejects_and_the_rest_keep_flowing() {
    telemetry();
    let pg = mesh_testkit::PostgresServer::start().expect("postgres");
    let logger = start_logger(logger_config(&pg)).await;
    wait_serving(logger.addr, Duration::from_secs(30)).await;
    let mut client = PredictionLogClient::new(internal_channel(logger.addr));

    let mut records: Vec<PredictionRecord> =
        (0..500).map(|i| record(&format!("good-{i}"))).collect();
    // Out of range for the validation and for PostgreSQL both.
    let mut far_future = record("poison-time");
    far_future.time_unix_micros = i64::MAX;
    records.insert(250, far_future);
    // Passes validation; PostgreSQL refuses it. Every value the gateway can produce is now
    // storable, so the test makes PostgreSQL itself refuse one with a CHECK constraint: a real
    // refusal from the real server, through the same path as any other data error.
    let db = connect_db(&pg).await;
    db.batch_execute(
        "ALTER TABLE predictions ADD CONSTRAINT refuse_for_test CHECK (entity_id <> 'refused-by-db')",
    )
    .await
    .expect("constraint");
    let mut bad_json = record("poison-db");
    bad_json.entity_id = "refused-by-db".into();
    records.insert(100, bad_json.clone());
    // Shadow predictions in the same call go to their own table, bisected the same way.
    db.batch_execute(
        "ALTER TABLE shadow_predictions ADD CONSTRAINT refuse_for_test CHECK (entity_id <> 'refused-by-db')",
    )
    .await
    .expect("constraint");
    for i in 0..100 {
        let mut shadow = record(&format!("shadow-{i}"));
        shadow.shadow_of = format!("good-{i}");
        shadow.entity_id = if i == 40 {
            "refused-by-db".into()
        } else {
            shadow.entity_id
        };
        records.insert(3 * i, shadow);
    }
    let mut call = tonic::Request::new(RecordRequest { records });
    call.set_timeout(Duration::from_secs(20));
    let answer = client
        .record(call)
        .await
        .expect("the call commits what it can")
        .into_inner();
    assert_eq!((answer.accepted, answer.rejected), (599, 3), "{answer:?}");
    let shadows: i64 = db
        .query_one(
            "SELECT count(*) FROM shadow_predictions WHERE primary_id LIKE 'good-%'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        shadows, 99,
        "every shadow but the refused one, in its own table"
    );

    let good: i64 = db
        .query_one(
            "SELECT count(*) FROM predictions WHERE prediction_id LIKE 'good-%'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(good, 500);
    let rejects = db
        .query(
            "SELECT prediction_id, reason, record FROM prediction_rejects ORDER BY prediction_id",
            &[],
        )
        .await
        .expect("rejects");
    let ids: Vec<String> = rejects.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, ["poison-db", "poison-time", "shadow-40"]);
    let reason: String = rejects[1].get(1);
    assert!(reason.contains("time_unix_micros"), "{reason}");
    let reason: String = rejects[0].get(1);
    assert!(
        reason.contains("refuse_for_test"),
        "PostgreSQL's reason is kept: {reason}"
    );
    let bytes: Vec<u8> = rejects[0].get(2);
    use prost::Message as _;
    let kept = PredictionRecord::decode(bytes.as_slice()).expect("the record is kept whole");
    assert_eq!(kept, bad_json);

    // Later records are not blocked behind the poison.
    let mut later = tonic::Request::new(RecordRequest {
        records: vec![record("later")],
    });
    later.set_timeout(Duration::from_secs(5));
    let answer = client.record(later).await.expect("later call").into_inner();
    assert_eq!((answer.accepted, answer.rejected), (1, 0));
    logger.shutdown().await;
}

/// Each distinct invented method path used to become a `method` label, before any key check:
/// unbounded series from unauthenticated callers. 5,000 of them now leave the gateway's series
/// count as it was (they all count as `unknown`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_method_paths_do_not_grow_the_metrics() {
    let mesh = Mesh::start(|_| {}).await;
    let series = |body: &str| body.lines().filter(|l| !l.starts_with('#')).count();
    let path = |i: usize| format!("/mesh.gateway.v1.Gateway/Invented{i}");
    // One call first, so the `unknown` series exist before counting.
    let status = raw_call(mesh.gateway.addr, &path(0)).await;
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    let (_, before) = http_get(mesh.gateway_http, "/metrics").await;
    let calls = futures::stream::iter(1..5_000)
        .map(|i| raw_call(mesh.gateway.addr, path(i)))
        .buffer_unordered(32);
    let statuses: Vec<tonic::Status> = futures::StreamExt::collect(calls).await;
    assert!(statuses.iter().all(|s| s.code() == Code::Unimplemented));
    let (_, after) = http_get(mesh.gateway_http, "/metrics").await;
    let grown = series(&after) as i64 - series(&before) as i64;
    assert!(
        grown.abs() <= 5,
        "series {} -> {} after 5,000 invented paths",
        series(&before),
        series(&after)
    );
    assert!(
        after.contains(r#"mesh_rpc_requests_total{code="UNIMPLEMENTED",method="unknown"} 5000"#),
        "the calls are counted as unknown"
    );
    assert!(!after.contains("Invented"), "a request path became a label");
}

use futures::StreamExt as _;

/// A unary call with an empty message to any `path` at `addr`; its status.
async fn raw_call(addr: std::net::SocketAddr, path: impl AsRef<str>) -> tonic::Status {
    let path = path.as_ref();
    let mut grpc = tonic::client::Grpc::new(channel(addr));
    if let Err(e) = grpc.ready().await {
        return tonic::Status::unavailable(e.to_string());
    }
    let path = http::uri::PathAndQuery::try_from(path).expect("path");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    match grpc.unary(tonic::Request::new(()), path, codec).await {
        Ok(_) => tonic::Status::ok(""),
        Err(status) => status,
    }
}

/// Idle connections used to be unlimited: 24,000 that sent the HTTP/2 preface and nothing else
/// were all held open. Now a connection beyond the cap is closed on arrival, one that starts no
/// call is closed after the first-request timeout, and a client already connected is served
/// throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_refused_and_silent_ones_are_closed() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    telemetry();
    let pg = mesh_testkit::PostgresServer::start().expect("postgres");
    let mut config = logger_config(&pg);
    config.server.connections.max_total = 8;
    config.server.connections.max_per_peer = 8;
    config.server.connections.first_request_timeout = Duration::from_millis(1500);
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let metrics_addr = metrics.local_addr().expect("addr");
    let logger = spawn_service(|l, s| async move {
        mesh_logger::serve(config, l, Some(metrics), async {
            let _ = s.await;
        })
        .await
    })
    .await;
    wait_serving(logger.addr, Duration::from_secs(30)).await;
    let mut client = PredictionLogClient::new(internal_channel(logger.addr));
    let lookup = || mesh_proto::logger::GetPredictionRequest {
        prediction_id: "nothing-here".into(),
    };
    let status = client.get_prediction(lookup()).await.expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound);

    /// Whether the server closes `stream` within `limit` (its SETTINGS frame is read past).
    async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> bool {
        let mut buf = vec![0u8; 4096];
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
            }
        }
    }
    // Silent connections: the preface, then nothing (wait_serving's connection may still be
    // open too, so the cap leaves room for six or seven of them).
    let mut silent = Vec::new();
    for _ in 0..40 {
        let mut stream = tokio::net::TcpStream::connect(logger.addr)
            .await
            .expect("connect");
        let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        silent.push(stream);
    }
    let mut admitted = Vec::new();
    let mut refused = 0;
    for mut stream in silent {
        if closed_within(&mut stream, Duration::from_millis(300)).await {
            refused += 1;
        } else {
            admitted.push(stream);
        }
    }
    assert!(
        (32..=40).contains(&refused),
        "{refused} of 40 connections over a cap of 8 were closed at once"
    );
    // The client connected before the flood is still served.
    let status = client.get_prediction(lookup()).await.expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    // The admitted silent ones are closed by the server after the first-request timeout,
    // which frees room for new clients.
    for stream in &mut admitted {
        assert!(
            closed_within(stream, Duration::from_millis(2500)).await,
            "a silent connection outlived the first-request timeout"
        );
    }
    let mut fresh = PredictionLogClient::new(internal_channel(logger.addr));
    let status = fresh.get_prediction(lookup()).await.expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let refused_metric = metric(
        metrics_addr,
        r#"mesh_connections_refused_total{reason="total"}"#,
    )
    .await;
    assert!(refused_metric >= 32.0, "refusals counted: {refused_metric}");
    let quiet = metric(
        metrics_addr,
        r#"mesh_connections_closed_total{reason="no_request"}"#,
    )
    .await;
    assert!(
        quiet >= admitted.len() as f64,
        "silent connections closed: {quiet}"
    );
    let open = metric(metrics_addr, "mesh_connections_open").await;
    assert!(open <= 3.0, "connections still open: {open}");
    logger.shutdown().await;
}

/// Internal services used to answer anyone who reached their port: `PutFeatures` could
/// overwrite features and `GetPrediction` read logged ones. Now every call but health's needs
/// the internal token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_services_refuse_calls_without_the_token() {
    use mesh_proto::features::features_client::FeaturesClient;
    use mesh_proto::features::{EntityFeatures, PutFeaturesRequest};
    let mesh = Mesh::start(|_| {}).await;
    let put = || PutFeaturesRequest {
        entities: vec![EntityFeatures {
            entity_id: "cust-00001".into(),
            found: true,
            features: [("tenure_months".to_owned(), num(1.0))].into(),
            tier: 0,
        }],
    };
    let wrong = mesh_runtime::internal::InternalToken::new("not-the-mesh-token-at-all").expect("t");
    for token in [None, Some(&wrong)] {
        let features = mesh_runtime::internal::WithToken::new(channel(mesh.features.addr), token);
        let status = FeaturesClient::new(features)
            .put_features(put())
            .await
            .expect_err("no valid token");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(
            status.message().contains("x-mesh-internal-token"),
            "{status:?}"
        );
        let logger = mesh_runtime::internal::WithToken::new(channel(mesh.logger.addr), token);
        let status = PredictionLogClient::new(logger)
            .get_prediction(mesh_proto::logger::GetPredictionRequest {
                prediction_id: "x".into(),
            })
            .await
            .expect_err("no valid token");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        let status = raw_call(
            mesh.inference[0].addr,
            "/inference.GRPCInferenceService/ServerLive",
        )
        .await;
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    // Health stays open for probes; the gateway, which has the token, serves predictions.
    assert!(health(mesh.features.addr, "").await.is_some());
    mesh.seed(1).await;
    let mut with_token = put();
    with_token.entities[0].entity_id = "cust-token".into();
    mesh.features_client()
        .put_features(with_token)
        .await
        .expect("with the token");
    let answer = mesh
        .gateway_client()
        .predict(mesh_proto::gateway::PredictRequest {
            model: "churn".into(),
            entity_id: "cust-00001".into(),
            // The demo entities lack these two; the request brings them.
            features: json_features(&serde_json::json!({
                "support_calls_30d": 1.0,
                "channel": fixture()[0].features["channel"],
            })),
            ..Default::default()
        })
        .await
        .expect("the gateway presents the token")
        .into_inner();
    assert_ne!(
        answer.feature_tier,
        mesh_proto::types::FeatureTier::Request as i32,
        "stored features were read through the internal hop"
    );
}

/// A PostgreSQL that hangs (accepts bytes, answers nothing) used to block the logger's writer
/// without bound: there was no statement or client-side timeout. Now a call waits at most its
/// deadline, later calls are refused at once while the writer's bounded attempts fail, and once
/// PostgreSQL answers again every record accepted is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_postgres_costs_a_bounded_wait_and_loses_nothing() {
    use mesh_testkit::proxy::{DelayProxy, Fault};
    telemetry();
    let pg = mesh_testkit::PostgresServer::start().expect("postgres");
    let proxy = DelayProxy::start(format!("127.0.0.1:{}", pg.port()).parse().expect("addr"))
        .await
        .expect("proxy");
    let mut config = logger_config(&pg);
    config.database.url = format!("postgres://postgres@{}/postgres", proxy.addr());
    config.database.timeout = Duration::from_millis(500);
    let logger = start_logger(config).await;
    wait_serving(logger.addr, Duration::from_secs(30)).await;
    let mut client = PredictionLogClient::new(internal_channel(logger.addr));
    let call = |ids: std::ops::Range<usize>, timeout: Duration| {
        let mut request = tonic::Request::new(RecordRequest {
            records: ids.map(|i| record(&format!("hung-{i}"))).collect(),
        });
        request.set_timeout(timeout);
        request
    };
    client
        .record(call(0..10, Duration::from_secs(5)))
        .await
        .expect("before the hang");

    proxy.set_fault(Fault::Hold);
    let started = std::time::Instant::now();
    let first = client.record(call(10..20, Duration::from_secs(1))).await;
    let waited = started.elapsed();
    assert!(first.is_err(), "nothing can commit while PostgreSQL hangs");
    assert!(
        waited < Duration::from_millis(1500),
        "the call waited {waited:?}, past its 1 s deadline"
    );
    // The writer's attempt gives up after MESH_DB_TIMEOUT_MS; from then on calls are refused
    // at once instead of queueing behind it.
    tokio::time::sleep(Duration::from_millis(700)).await;
    for batch in 0..5 {
        let started = std::time::Instant::now();
        let status = client
            .record(call(
                100 + batch * 10..110 + batch * 10,
                Duration::from_secs(2),
            ))
            .await
            .expect_err("refused while PostgreSQL hangs");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            started.elapsed() < Duration::from_millis(300),
            "refused at once"
        );
    }

    proxy.set_fault(Fault::None);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let result = client.record(call(20..30, Duration::from_secs(5))).await;
        if result.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the logger did not recover: {result:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let db = connect_db(&pg).await;
    let rows = db
        .query(
            "SELECT prediction_id FROM predictions WHERE prediction_id LIKE 'hung-%' ORDER BY 1",
            &[],
        )
        .await
        .expect("rows");
    let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    // The first 10, the 10 accepted when the hang began (their caller timed out, the writer
    // kept them), and the 10 after: each once. The refused calls' records were never taken.
    let expected: Vec<String> = {
        let mut v: Vec<String> = (0..30).map(|i| format!("hung-{i}")).collect();
        v.sort();
        v
    };
    assert_eq!(ids, expected);
    logger.shutdown().await;
}
