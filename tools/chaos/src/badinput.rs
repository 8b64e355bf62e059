//! Scenario 7: bad input at volume. Requests are written directly with HTTP/2 (the `h2` crate),
//! so anything can be sent: malformed gRPC frames and protobuf, oversized messages, invalid or
//! binary metadata, huge headers, unknown paths, and well-formed messages carrying invalid
//! values (NaN, ±infinity, 1 MiB strings, empty ids). Each answer is classified (gRPC status,
//! HTTP status, stream reset, connection error) and counted. Loopback only; bounded in count,
//! concurrency and time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use mesh_proto::types::{feature_value::Kind, FeatureValue};
use prost::Message as _;

/// A request to send.
#[derive(Clone)]
pub struct Bad {
    /// Which kind (for the report).
    pub kind: &'static str,
    /// Target address.
    pub addr: SocketAddr,
    /// HTTP method.
    pub method: http::Method,
    /// `:path`.
    pub path: String,
    /// Extra headers; `content-type` defaults to `application/grpc` unless given here.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body as sent.
    pub body: Bytes,
}

/// A gRPC length-prefixed message (uncompressed).
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(message.len() + 5);
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out.into()
}

fn value(kind: Kind) -> FeatureValue {
    FeatureValue { kind: Some(kind) }
}

fn predict(entity: &str, calls: f64, channel: &str) -> Vec<u8> {
    mesh_proto::gateway::PredictRequest {
        model: "churn".into(),
        entity_id: entity.into(),
        features: [
            ("support_calls_30d".to_owned(), value(Kind::Number(calls))),
            (
                "channel".to_owned(),
                value(Kind::Category(channel.to_owned())),
            ),
        ]
        .into_iter()
        .collect(),
        model_version: String::new(),
    }
    .encode_to_vec()
}

/// A deterministic pseudo-random byte stream (xorshift), so runs are repeatable.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn header(name: &str, value: &[u8]) -> Option<(HeaderName, HeaderValue)> {
    Some((
        HeaderName::from_bytes(name.as_bytes()).ok()?,
        HeaderValue::from_bytes(value).ok()?,
    ))
}

/// The addresses of the services under attack.
pub struct Targets {
    /// The gateway.
    pub gateway: SocketAddr,
    /// The features service.
    pub features: SocketAddr,
    /// Inference replica 1.
    pub inference: SocketAddr,
    /// The logger.
    pub logger: SocketAddr,
    /// Sent as `x-mesh-internal-token` on requests to features, inference and logger (except
    /// the kinds named "no internal token"), so the bad input reaches their handlers.
    pub internal_token: String,
}

/// The request mix, `total` requests in all (≈ 90 % at the gateway).
pub fn plan(t: &Targets, total: usize) -> Vec<Bad> {
    const PREDICT: &str = "/mesh.gateway.v1.Gateway/Predict";
    const BATCH: &str = "/mesh.gateway.v1.Gateway/PredictBatch";
    let grpc = |kind: &'static str, addr: SocketAddr, path: &str, body: Bytes| Bad {
        kind,
        addr,
        method: http::Method::POST,
        path: path.to_owned(),
        headers: Vec::new(),
        body,
    };
    let with = |mut b: Bad, headers: Vec<Option<(HeaderName, HeaderValue)>>| {
        b.headers.extend(headers.into_iter().flatten());
        b
    };
    let good = || frame(&predict("cust-00001", 1.0, "web"));
    let mib = "x".repeat(1 << 20);
    // Each template is repeated by weight; heavy ones (MiB bodies) get weight 1.
    let mut templates: Vec<(usize, Bad)> = Vec::new();
    let mut add = |weight: usize, bad: Bad| templates.push((weight, bad));

    // Malformed gRPC framing and protobuf.
    for seed in 0..8 {
        add(
            4,
            grpc(
                "garbage protobuf",
                t.gateway,
                PREDICT,
                frame(&noise(seed, 16 + seed as usize * 37)),
            ),
        );
    }
    add(
        4,
        grpc("truncated frame", t.gateway, PREDICT, {
            let mut b = frame(&predict("cust-00001", 1.0, "web")).to_vec();
            b.truncate(b.len() - 3);
            b.into()
        }),
    );
    add(
        4,
        grpc(
            "frame shorter than its header",
            t.gateway,
            PREDICT,
            Bytes::from_static(&[0, 0, 0]),
        ),
    );
    add(
        4,
        grpc(
            "compressed flag without grpc-encoding",
            t.gateway,
            PREDICT,
            {
                let mut b = good().to_vec();
                b[0] = 1;
                b.into()
            },
        ),
    );
    add(
        4,
        grpc("length prefix 4 GiB", t.gateway, PREDICT, {
            let mut b = vec![0, 0xff, 0xff, 0xff, 0xff];
            b.extend_from_slice(&predict("cust-00001", 1.0, "web"));
            b.into()
        }),
    );
    add(4, grpc("empty body", t.gateway, PREDICT, Bytes::new()));
    add(
        4,
        grpc("two messages in a unary call", t.gateway, PREDICT, {
            let mut b = good().to_vec();
            b.extend_from_slice(&good());
            b.into()
        }),
    );
    add(
        4,
        grpc(
            "invalid wire type",
            t.gateway,
            PREDICT,
            frame(&[0x0f, 0xff, 0xff, 0xff]),
        ),
    );
    add(
        4,
        grpc(
            "invalid UTF-8 in a string field",
            t.gateway,
            PREDICT,
            frame(&[0x0a, 0x03, 0xff, 0xfe, 0xfd]),
        ),
    );
    add(
        4,
        with(
            grpc("unknown grpc-encoding", t.gateway, PREDICT, good()),
            vec![header("grpc-encoding", b"bogus")],
        ),
    );
    add(
        4,
        with(
            grpc("gzip declared, body not gzip", t.gateway, PREDICT, {
                let mut b = good().to_vec();
                b[0] = 1;
                b.into()
            }),
            vec![header("grpc-encoding", b"gzip")],
        ),
    );
    add(
        4,
        with(
            grpc(
                "wrong content-type",
                t.gateway,
                PREDICT,
                Bytes::from_static(b"{\"model\":\"churn\"}"),
            ),
            vec![header("content-type", b"application/json")],
        ),
    );
    add(4, {
        let mut b = grpc("GET instead of POST", t.gateway, PREDICT, Bytes::new());
        b.method = http::Method::GET;
        b
    });
    // Oversized messages (> 4 MiB), real and claimed.
    add(
        1,
        grpc(
            "oversized message (5 MiB)",
            t.gateway,
            PREDICT,
            frame(&predict(&"e".repeat(5 << 20), 1.0, "web")),
        ),
    );
    add(
        2,
        grpc("length prefix 5 MiB, body short", t.gateway, PREDICT, {
            let mut b = vec![0];
            b.extend_from_slice(&(5u32 << 20).to_be_bytes());
            b.extend_from_slice(&[0x0a, 0x01, b'x']);
            b.into()
        }),
    );
    // Garbage metadata.
    for value in [
        &b"abc"[..],
        b"-5m",
        b"99999999999999999999n",
        b"1",
        b"10x",
        b"0m",
        b"",
        b"18446744073709551616S",
        b"1.5S",
        b"1000000H",
    ] {
        add(
            3,
            with(
                grpc("invalid grpc-timeout", t.gateway, PREDICT, good()),
                vec![header("grpc-timeout", value)],
            ),
        );
    }
    add(
        3,
        with(
            grpc("non-ASCII header values", t.gateway, PREDICT, good()),
            vec![
                header("x-api-key", "schlüssel-ключ".as_bytes()),
                header("x-chaos", &[0x80, 0xfe, 0xff, 0xc3, 0x28]),
                header("grpc-timeout", &[0xff, b'm']),
            ],
        ),
    );
    add(
        3,
        with(
            grpc(
                "binary metadata with invalid base64",
                t.gateway,
                PREDICT,
                good(),
            ),
            vec![
                header("x-chaos-bin", b"!!!not base64!!!"),
                header("grpc-trace-bin", b"%%%"),
                header("traceparent", b"00-zz-yy-01"),
            ],
        ),
    );
    add(
        3,
        with(
            grpc("authorization garbage", t.gateway, PREDICT, good()),
            vec![
                header("authorization", b"Bearer \x01\x02"),
                header("authorization", b"Basic ????"),
            ],
        ),
    );
    for size in [8 << 10, 15 << 10] {
        add(
            2,
            with(
                grpc("huge header value (8-15 KiB)", t.gateway, PREDICT, good()),
                vec![header("x-chaos-big", "v".repeat(size).as_bytes())],
            ),
        );
    }
    for size in [64 << 10, 1 << 20] {
        add(
            1,
            with(
                grpc(
                    "huge header value (64 KiB-1 MiB)",
                    t.gateway,
                    PREDICT,
                    good(),
                ),
                vec![header("x-chaos-big", "v".repeat(size).as_bytes())],
            ),
        );
    }
    add(
        1,
        with(
            grpc("200 headers", t.gateway, PREDICT, good()),
            (0..200)
                .map(|i| header(&format!("x-chaos-{i}"), b"v"))
                .collect(),
        ),
    );
    // Unknown methods and services, odd paths.
    for path in [
        "/mesh.gateway.v1.Gateway/NoSuchMethod",
        "/no.such.Service/Call",
        "/",
        "/mesh.gateway.v1.Gateway",
        "/mesh.gateway.v1.Gateway/Predict/extra",
        "//",
        "/grpc.health.v1.Health/Nope",
    ] {
        add(
            3,
            grpc("unknown method or service", t.gateway, path, good()),
        );
    }
    // Invalid feature values in well-formed messages.
    for (kind, calls, channel, entity) in [
        ("NaN feature", f64::NAN, "web", "cust-00002"),
        ("+infinity feature", f64::INFINITY, "web", "cust-00003"),
        ("-infinity feature", f64::NEG_INFINITY, "web", "cust-00004"),
        ("huge number feature", f64::MAX, "web", "cust-00005"),
        ("1 MiB category", 1.0, mib.as_str(), "cust-00006"),
        ("unknown category", 1.0, "carrier-pigeon", "cust-00007"),
        ("empty entity id", 1.0, "web", ""),
        ("1 MiB entity id", 1.0, "web", mib.as_str()),
        ("NUL in entity id", 1.0, "web", "cust\0-00008"),
    ] {
        let weight = if calls.is_finite() && channel.len() < 100 && entity.len() < 100 {
            6
        } else if channel.len() > 100 || entity.len() > 100 {
            1
        } else {
            6
        };
        add(
            weight,
            grpc(
                kind,
                t.gateway,
                PREDICT,
                frame(&predict(entity, calls, channel)),
            ),
        );
    }
    add(
        6,
        grpc("unknown model", t.gateway, PREDICT, {
            let mut m =
                mesh_proto::gateway::PredictRequest::decode(&predict("cust-00001", 1.0, "web")[..])
                    .unwrap_or_default();
            m.model = "no-such-model".into();
            frame(&m.encode_to_vec())
        }),
    );
    add(
        6,
        grpc("missing features, no model", t.gateway, PREDICT, frame(&[])),
    );
    add(
        4,
        grpc(
            "wrong-typed feature (category for number)",
            t.gateway,
            PREDICT,
            {
                let mut m = mesh_proto::gateway::PredictRequest::decode(
                    &predict("cust-00001", 1.0, "web")[..],
                )
                .unwrap_or_default();
                m.features.insert(
                    "support_calls_30d".into(),
                    value(Kind::Category("many".into())),
                );
                m.features
                    .insert("no_such_feature".into(), value(Kind::Number(1.0)));
                frame(&m.encode_to_vec())
            },
        ),
    );
    add(
        2,
        grpc("PredictBatch with NaN and empty items", t.gateway, BATCH, {
            let item = |entity: &str, calls: f64| mesh_proto::gateway::BatchItem {
                entity_id: entity.into(),
                features: [
                    ("support_calls_30d".to_owned(), value(Kind::Number(calls))),
                    ("channel".to_owned(), value(Kind::Category("web".into()))),
                ]
                .into_iter()
                .collect(),
            };
            frame(
                &mesh_proto::gateway::PredictBatchRequest {
                    model: "churn".into(),
                    items: vec![
                        item("cust-00001", f64::NAN),
                        item("", 1.0),
                        item("cust-00002", f64::INFINITY),
                    ],
                    model_version: String::new(),
                }
                .encode_to_vec(),
            )
        }),
    );
    add(
        1,
        grpc(
            "PredictBatch over the item limit (1001)",
            t.gateway,
            BATCH,
            {
                frame(
                    &mesh_proto::gateway::PredictBatchRequest {
                        model: "churn".into(),
                        items: (0..1001)
                            .map(|i| mesh_proto::gateway::BatchItem {
                                entity_id: format!("cust-{:05}", i % 1000 + 1),
                                features: Default::default(),
                            })
                            .collect(),
                        model_version: String::new(),
                    }
                    .encode_to_vec(),
                )
            },
        ),
    );

    // A few at the other services' ports.
    const GET_FEATURES: &str = "/mesh.features.v1.Features/GetFeatures";
    const PUT_FEATURES: &str = "/mesh.features.v1.Features/PutFeatures";
    add(
        2,
        grpc(
            "features: garbage protobuf",
            t.features,
            GET_FEATURES,
            frame(&noise(99, 64)),
        ),
    );
    add(
        2,
        grpc("features: empty and 1 MiB ids", t.features, GET_FEATURES, {
            frame(
                &mesh_proto::features::GetFeaturesRequest {
                    entity_ids: vec![String::new(), mib.clone()],
                }
                .encode_to_vec(),
            )
        }),
    );
    add(
        1,
        grpc("features: 20,000 ids", t.features, GET_FEATURES, {
            frame(
                &mesh_proto::features::GetFeaturesRequest {
                    entity_ids: (0..20_000).map(|i| format!("nobody-{i}")).collect(),
                }
                .encode_to_vec(),
            )
        }),
    );
    let put_features = |entity_id: &str, features: Vec<(&str, FeatureValue)>| {
        frame(
            &mesh_proto::features::PutFeaturesRequest {
                entities: vec![mesh_proto::features::EntityFeatures {
                    entity_id: entity_id.into(),
                    found: true,
                    features: features
                        .into_iter()
                        .map(|(name, v)| (name.to_owned(), v))
                        .collect(),
                    tier: 0,
                }],
            }
            .encode_to_vec(),
        )
    };
    add(
        1,
        grpc(
            "features: PutFeatures NaN/inf for a scratch entity",
            t.features,
            PUT_FEATURES,
            put_features(
                "chaos-scratch-nan",
                vec![
                    ("tenure_months", value(Kind::Number(f64::NAN))),
                    ("monthly_charges", value(Kind::Number(f64::INFINITY))),
                ],
            ),
        ),
    );
    add(
        1,
        grpc(
            "features: PutFeatures empty entity id",
            t.features,
            PUT_FEATURES,
            put_features("", Vec::new()),
        ),
    );
    add(
        2,
        grpc(
            "features: unknown method",
            t.features,
            "/mesh.features.v1.Features/Nope",
            frame(&[]),
        ),
    );

    const INFER: &str = "/inference.GRPCInferenceService/ModelInfer";
    let tensor = |name: &str, shape: Vec<i64>, fp32: Vec<f32>| {
        mesh_proto::inference::model_infer_request::InferInputTensor {
            name: name.into(),
            datatype: "FP32".into(),
            shape,
            parameters: Default::default(),
            contents: Some(mesh_proto::inference::InferTensorContents {
                fp32_contents: fp32,
                ..Default::default()
            }),
        }
    };
    let infer = |inputs| {
        frame(
            &mesh_proto::inference::ModelInferRequest {
                model_name: "churn".into(),
                inputs,
                ..Default::default()
            }
            .encode_to_vec(),
        )
    };
    add(
        2,
        grpc(
            "inference: garbage protobuf",
            t.inference,
            INFER,
            frame(&noise(7, 200)),
        ),
    );
    add(
        2,
        grpc(
            "inference: NaN/inf tensors",
            t.inference,
            INFER,
            infer(vec![
                tensor("tenure_months", vec![2, 1], vec![f32::NAN, f32::INFINITY]),
                tensor("monthly_charges", vec![2, 1], vec![f32::NEG_INFINITY, 1.0]),
            ]),
        ),
    );
    add(
        2,
        grpc(
            "inference: shape/content mismatch",
            t.inference,
            INFER,
            infer(vec![tensor("tenure_months", vec![1 << 40, 1], vec![1.0])]),
        ),
    );
    add(
        2,
        grpc(
            "inference: negative shape",
            t.inference,
            INFER,
            infer(vec![tensor("tenure_months", vec![-1, -1], vec![1.0])]),
        ),
    );
    add(
        2,
        grpc("inference: unknown model", t.inference, INFER, {
            frame(
                &mesh_proto::inference::ModelInferRequest {
                    model_name: "no-such-model".into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            )
        }),
    );

    const RECORD: &str = "/mesh.logger.v1.PredictionLog/Record";
    // Only invalid records: the logger must refuse them (nothing may reach `predictions`).
    add(
        2,
        grpc(
            "logger: garbage protobuf",
            t.logger,
            RECORD,
            frame(&noise(3, 80)),
        ),
    );
    add(
        2,
        grpc(
            "logger: records with empty ids and NaN score",
            t.logger,
            RECORD,
            {
                frame(
                    &mesh_proto::logger::RecordRequest {
                        records: vec![
                            mesh_proto::logger::PredictionRecord {
                                prediction_id: String::new(),
                                model: "churn".into(),
                                model_version: "1".into(),
                                ..Default::default()
                            },
                            mesh_proto::logger::PredictionRecord {
                                prediction_id: "chaos-invalid-nan".into(),
                                model: "churn".into(),
                                model_version: "1".into(),
                                score: f64::NAN,
                                ..Default::default()
                            },
                        ],
                    }
                    .encode_to_vec(),
                )
            },
        ),
    );
    add(
        2,
        grpc(
            "logger: unknown method",
            t.logger,
            "/mesh.logger.v1.PredictionLog/Nope",
            frame(&[]),
        ),
    );

    // Internal services without the credential, or with a wrong one: refused (UNAUTHENTICATED),
    // whatever the body. First in the list: the expansion below may cut the last templates short.
    templates.insert(
        0,
        (
            2,
            grpc(
                "features: no internal token",
                t.features,
                GET_FEATURES,
                frame(&[]),
            ),
        ),
    );
    templates.insert(
        1,
        (
            2,
            with(
                grpc("logger: wrong internal token", t.logger, RECORD, frame(&[])),
                vec![header("x-mesh-internal-token", b"not-the-token-0123456789")],
            ),
        ),
    );
    let token = HeaderValue::from_str(&t.internal_token).ok();
    for (_, bad) in templates.iter_mut() {
        let internal = bad.addr != t.gateway;
        let refused_kind = bad.kind.ends_with("internal token");
        if let (true, false, Some(token)) = (internal, refused_kind, &token) {
            bad.headers.push((
                HeaderName::from_static("x-mesh-internal-token"),
                token.clone(),
            ));
        }
    }

    // Expand by weight, cycling until `total`.
    let weight_sum: usize = templates.iter().map(|(w, _)| w).sum();
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        for (w, bad) in &templates {
            // Rounded down, so one pass fits in `total` and no template at the end of the
            // list is cut short; the outer loop tops up from the start.
            let n = (w * total / weight_sum).max(1);
            for _ in 0..n {
                if out.len() < total {
                    out.push(bad.clone());
                }
            }
        }
    }
    // Interleave kinds so the mix stays even over time.
    let stride = 7919 % total.max(1);
    if total > 1 && stride > 0 && gcd(stride, total) == 1 {
        out = (0..total)
            .map(|i| out[(i * stride) % total].clone())
            .collect();
    }
    out
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// How one bad request ended.
fn outcome_of_response(
    status: http::StatusCode,
    headers: &http::HeaderMap,
    trailers: Option<&http::HeaderMap>,
) -> String {
    let grpc = trailers
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok());
    match grpc {
        Some(code) => format!("grpc {:?}", tonic::Code::from_i32(code)),
        None => format!("http {} (no grpc-status)", status.as_u16()),
    }
}

fn outcome_of_error(e: &h2::Error) -> String {
    if let Some(reason) = e.reason() {
        if e.is_go_away() {
            format!("h2 GOAWAY {reason:?}")
        } else {
            format!("h2 stream reset {reason:?}")
        }
    } else if e.is_io() {
        "connection closed (io)".to_owned()
    } else {
        format!("h2 client refused to send: {e}")
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    let tcp = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await??;
    tcp.set_nodelay(true)?;
    let (send, connection) = h2::client::Builder::new()
        .max_send_buffer_size(8 << 20)
        .handshake::<_, Bytes>(tcp)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(send)
}

/// Sends one request on `conn` (opening a connection if needed); the outcome. A connection
/// that failed is dropped so the next request opens a new one.
async fn send(
    conn: &mut Option<(SocketAddr, h2::client::SendRequest<Bytes>)>,
    bad: &Bad,
) -> String {
    let attempt = async {
        if conn.as_ref().map(|(a, _)| *a) != Some(bad.addr) {
            *conn = None;
        }
        let sender = match conn {
            Some((_, s)) => s.clone(),
            None => {
                let s = connect(bad.addr)
                    .await
                    .map_err(|e| format!("cannot connect: {e}"))?;
                *conn = Some((bad.addr, s.clone()));
                s
            }
        };
        let mut sender = sender.ready().await.map_err(|e| outcome_of_error(&e))?;
        let mut request = http::Request::builder()
            .method(bad.method.clone())
            .uri(format!("http://{}{}", bad.addr, bad.path))
            .header("te", "trailers")
            .body(())
            .map_err(|e| format!("cannot build: {e}"))?;
        let has_type = bad.headers.iter().any(|(k, _)| k == "content-type");
        if !has_type {
            request
                .headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
        }
        for (k, v) in &bad.headers {
            request.headers_mut().append(k.clone(), v.clone());
        }
        let (response, mut stream) = sender
            .send_request(request, bad.body.is_empty())
            .map_err(|e| outcome_of_error(&e))?;
        if !bad.body.is_empty() {
            stream
                .send_data(bad.body.clone(), true)
                .map_err(|e| outcome_of_error(&e))?;
        }
        let response = response.await.map_err(|e| outcome_of_error(&e))?;
        let (parts, mut body) = response.into_parts();
        if parts.headers.contains_key("grpc-status") {
            return Ok(outcome_of_response(parts.status, &parts.headers, None));
        }
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| outcome_of_error(&e))?;
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body.trailers().await.map_err(|e| outcome_of_error(&e))?;
        Ok::<String, String>(outcome_of_response(
            parts.status,
            &parts.headers,
            trailers.as_ref(),
        ))
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(outcome)) => {
            *conn = None;
            outcome
        }
        Err(_) => {
            *conn = None;
            "no answer within 10 s".to_owned()
        }
    }
}

/// What the barrage saw.
#[derive(Default)]
pub struct Barrage {
    /// Requests sent.
    pub sent: usize,
    /// Outcome → count.
    pub outcomes: BTreeMap<String, u64>,
    /// Kind → (outcome → count).
    pub by_kind: BTreeMap<String, BTreeMap<String, u64>>,
}

/// Sends `plan` with `concurrency` workers, stopping early at `deadline`.
pub async fn run(plan: Vec<Bad>, concurrency: usize, deadline: tokio::time::Instant) -> Barrage {
    let queue = Arc::new(Mutex::new(plan.into_iter().rev().collect::<Vec<_>>()));
    let result = Arc::new(Mutex::new(Barrage::default()));
    let workers = (0..concurrency.max(1)).map(|_| {
        let queue = queue.clone();
        let result = result.clone();
        tokio::spawn(async move {
            let mut conn = None;
            loop {
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                let Some(bad) = queue.lock().ok().and_then(|mut q| q.pop()) else {
                    break;
                };
                let outcome = send(&mut conn, &bad).await;
                if let Ok(mut r) = result.lock() {
                    r.sent += 1;
                    *r.outcomes.entry(outcome.clone()).or_default() += 1;
                    *r.by_kind
                        .entry(bad.kind.to_owned())
                        .or_default()
                        .entry(outcome)
                        .or_default() += 1;
                }
            }
        })
    });
    futures::future::join_all(workers).await;
    let mut out = result
        .lock()
        .map(|mut r| std::mem::take(&mut *r))
        .unwrap_or_default();
    out.sent = out.outcomes.values().sum::<u64>() as usize;
    out
}
