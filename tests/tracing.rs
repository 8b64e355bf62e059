//! Distributed tracing across separate processes: the four service binaries export spans over
//! OTLP/gRPC to a receiver inside this test; one traced Predict must yield a single trace with
//! spans from every service, correctly parented, including Redis/PostgreSQL and model spans.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_proto::gateway::PredictRequest;
use mesh_testkit::{free_port, PostgresServer, RedisServer};
use mesh_tests::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

/// A span as received: the exporting service and the OTLP span.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s),
                    ) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        name: span.name,
                        trace_id: span.trace_id,
                        span_id: span.span_id,
                        parent_span_id: span.parent_span_id,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A service binary started by this test; SIGTERM (graceful, flushes spans) on drop.
struct Process {
    name: &'static str,
    child: Child,
}

impl Process {
    fn terminate(&mut self) {
        mesh_testkit::sigterm(&mut self.child);
    }

    fn wait(&mut self, timeout: Duration) {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("{} did not stop within {timeout:?} of SIGTERM", self.name);
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn(name: &'static str, bin: &str, port: u16, otlp: &str, env: &[(&str, String)]) -> Process {
    let mut cmd = Command::new(binary(bin));
    cmd.env("MESH_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("MESH_METRICS_ADDR", "off")
        .env("MESH_DRAIN_DELAY_MS", "100")
        .env("MESH_INTERNAL_TOKEN", TEST_TOKEN)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
        // Only traces whose caller asked for sampling are recorded: ours.
        .env("OTEL_TRACES_SAMPLER_ARG", "0")
        .env("RUST_LOG", "warn")
        .env("MESH_MODELS_DIR", repo().join("models"))
        .env("MESH_SPOOL_DIR", mesh_tests::scratch_dir("spool"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Process {
        name,
        child: cmd.spawn().expect("spawn service"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_prediction_is_one_trace_across_all_four_services() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let otlp = format!("http://{}", listener.local_addr().expect("addr"));
    let server = TraceServiceServer::new(receiver.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(tokio_stream_listener(listener)),
    );

    let redis = RedisServer::start().expect("redis");
    let pg = PostgresServer::start().expect("postgres");
    let ports: Vec<u16> = (0..4).map(|_| free_port().expect("port")).collect();
    let (features_port, inference_port, logger_port, gateway_port) =
        (ports[0], ports[1], ports[2], ports[3]);
    let url = |p: u16| format!("http://127.0.0.1:{p}");
    let mut processes = [
        spawn(
            "features",
            "mesh-features",
            features_port,
            &otlp,
            &[
                ("MESH_REDIS_URL", redis.url()),
                ("MESH_DATABASE_URL", pg.url()),
            ],
        ),
        spawn("inference", "mesh-inference", inference_port, &otlp, &[]),
        spawn(
            "logger",
            "mesh-logger",
            logger_port,
            &otlp,
            &[
                ("MESH_DATABASE_URL", pg.url()),
                ("MESH_LOG_FLUSH_MS", "10".into()),
            ],
        ),
        spawn(
            "gateway",
            "mesh-gateway",
            gateway_port,
            &otlp,
            &[
                ("MESH_FEATURES_URL", url(features_port)),
                ("MESH_INFERENCE_URLS", url(inference_port)),
                ("MESH_LOGGER_URL", url(logger_port)),
                ("MESH_LOG_FLUSH_MS", "10".into()),
            ],
        ),
    ];
    for port in &ports {
        wait_serving(
            format!("127.0.0.1:{port}").parse().expect("addr"),
            Duration::from_secs(60),
        )
        .await;
    }
    seed(
        mesh_proto::features::features_client::FeaturesClient::new(internal_channel(
            format!("127.0.0.1:{features_port}").parse().expect("addr"),
        )),
        3,
    )
    .await;
    // PutFeatures wrote it through to Redis: take it out, so that the prediction's features
    // come from PostgreSQL and its span is there to check.
    forget_in_redis(redis.port(), &["cust-00001"]).await;

    // The caller's own span: a sampled W3C traceparent.
    let trace_id: [u8; 16] = *b"mesh-trace-test!";
    let caller_span: [u8; 8] = *b"caller01";
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut request = tonic::Request::new(PredictRequest {
        model: "churn".into(),
        entity_id: "cust-00001".into(),
        features: HashMap::from([
            ("support_calls_30d".to_owned(), num(2.0)),
            ("channel".to_owned(), cat("web")),
        ]),
        model_version: String::new(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{}-{}-01", hex(&trace_id), hex(&caller_span))
            .parse()
            .expect("header"),
    );
    request.set_timeout(Duration::from_secs(2));
    let mut gateway = mesh_proto::gateway::gateway_client::GatewayClient::new(channel(
        format!("127.0.0.1:{gateway_port}").parse().expect("addr"),
    ));
    let response = gateway
        .predict(request)
        .await
        .expect("predict")
        .into_inner();
    assert_eq!(
        response.trace_id,
        hex(&trace_id),
        "the response names the caller's trace"
    );

    // Let the record reach the logger, then stop everything gracefully: exporters flush.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for p in processes.iter_mut().rev() {
        p.terminate();
    }
    for p in processes.iter_mut() {
        p.wait(Duration::from_secs(20));
    }

    let spans: Vec<Received> = receiver
        .spans
        .lock()
        .expect("lock")
        .iter()
        .filter(|s| s.trace_id == trace_id)
        .cloned()
        .collect();
    let find = |service: &str, name: &str| -> Received {
        spans
            .iter()
            .find(|s| s.service == service && s.name == name)
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "no span {name:?} from {service} in {:#?}",
                    spans
                        .iter()
                        .map(|s| (&s.service, &s.name))
                        .collect::<Vec<_>>()
                )
            })
    };
    let by_id = |id: &[u8]| spans.iter().find(|s| s.span_id == id).cloned();

    let gateway_server = find("mesh-gateway", "mesh.gateway.v1.Gateway/Predict");
    assert_eq!(
        gateway_server.parent_span_id, caller_span,
        "gateway continues the caller's span"
    );

    for (service, server_name, client_name) in [
        (
            "mesh-features",
            "mesh.features.v1.Features/GetFeatures",
            "mesh.features.v1.Features/GetFeatures",
        ),
        (
            "mesh-inference",
            "inference.GRPCInferenceService/ModelInfer",
            "inference.GRPCInferenceService/ModelInfer",
        ),
    ] {
        let server = find(service, server_name);
        let client = by_id(&server.parent_span_id)
            .unwrap_or_else(|| panic!("{service}: parent span missing"));
        assert_eq!(
            (client.service.as_str(), client.name.as_str()),
            ("mesh-gateway", client_name)
        );
        assert_eq!(
            client.parent_span_id, gateway_server.span_id,
            "{client_name} client span is a child of Predict"
        );
    }

    let logger_server = find("mesh-logger", "mesh.logger.v1.PredictionLog/Record");
    let record_client = by_id(&logger_server.parent_span_id).expect("Record client span");
    assert_eq!(record_client.service, "mesh-gateway");
    let ship = by_id(&record_client.parent_span_id).expect("shipping span");
    assert_eq!(
        ship.parent_span_id, gateway_server.span_id,
        "log shipping follows the prediction"
    );

    // Store and model spans sit under their services' server spans.
    let features_server = find("mesh-features", "mesh.features.v1.Features/GetFeatures");
    let db = find("mesh-features", "SELECT feature_values");
    assert_eq!(db.parent_span_id, features_server.span_id);
    find("mesh-features", "redis MGET");
    let model = find("mesh-inference", "onnx.run");
    assert_eq!(
        model.parent_span_id,
        find(
            "mesh-inference",
            "inference.GRPCInferenceService/ModelInfer"
        )
        .span_id
    );
    find("mesh-logger", "INSERT predictions");
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(s, _)| s);
        Some((accepted, listener))
    })
}
