//! Property tests of what the runtime reads from request metadata: the `grpc-timeout` header
//! (parser and the deadline layer around a service), the internal token, and W3C trace
//! context. Whatever a client sends: no panic, and a refusal is `INVALID_ARGUMENT` or
//! `UNAUTHENTICATED` with a message.

use std::convert::Infallible;
use std::time::Duration;

use mesh_runtime::deadline::{parse_grpc_timeout, DeadlineLayer};
use mesh_runtime::internal::{InternalAuthLayer, InternalToken, TOKEN_HEADER};
use proptest::prelude::*;
use tower::{Layer as _, Service as _, ServiceExt as _};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        rng_algorithm: proptest::test_runner::RngAlgorithm::ChaCha,
        ..ProptestConfig::default()
    }
}

/// The service behind the layers: answers OK.
fn ok_service(
) -> tower::util::BoxCloneService<http::Request<()>, http::Response<tonic::body::Body>, Infallible>
{
    tower::util::BoxCloneService::new(tower::service_fn(|_req: http::Request<()>| async {
        Ok::<_, Infallible>(http::Response::new(tonic::body::Body::empty()))
    }))
}

/// The gRPC status a response carries (OK when it has none).
fn status_of(response: &http::Response<tonic::body::Body>) -> (tonic::Code, String) {
    match tonic::Status::from_header_map(response.headers()) {
        Some(status) => (status.code(), status.message().to_owned()),
        None => (tonic::Code::Ok, String::new()),
    }
}

/// Header values: well-formed timeouts, near misses, and arbitrary bytes a header may hold.
fn timeout_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        ("[0-9]{1,8}", "[HMSmun]").prop_map(|(d, u)| format!("{d}{u}").into_bytes()),
        "[+-]?[0-9]{0,10}[HMSmunxé]?".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..16),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn grpc_timeout_parsing_takes_only_the_spec_form(value in "\\PC{0,12}") {
        if let Some(budget) = parse_grpc_timeout(&value) {
            let (digits, unit) = value.split_at(value.len() - 1);
            prop_assert!((1..=8).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()));
            prop_assert!("HMSmun".contains(unit));
            prop_assert!(budget <= Duration::from_secs(99_999_999 * 3600));
        }
    }

    #[test]
    fn the_deadline_layer_refuses_a_malformed_timeout_with_a_message(value in timeout_value()) {
        let Ok(header) = http::HeaderValue::from_bytes(&value) else {
            return Ok(()); // not a value HTTP/2 can carry
        };
        let layer = DeadlineLayer::new(None, Duration::from_secs(30));
        let mut service = layer.layer(ok_service());
        let mut request = http::Request::new(());
        *request.uri_mut() = "/mesh.gateway.v1.Gateway/Predict".parse().expect("uri");
        request.headers_mut().insert("grpc-timeout", header);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("rt");
        let response = runtime.block_on(async {
            service.ready().await.expect("ready");
            service.call(request).await.expect("infallible")
        });
        let (code, message) = status_of(&response);
        let parsed = std::str::from_utf8(&value).ok().and_then(parse_grpc_timeout);
        match parsed {
            Some(budget) if !budget.is_zero() => prop_assert_eq!(code, tonic::Code::Ok),
            Some(_) => prop_assert_eq!(code, tonic::Code::DeadlineExceeded),
            None => {
                prop_assert_eq!(code, tonic::Code::InvalidArgument);
                prop_assert!(message.contains("grpc-timeout"), "{}", message);
            }
        }
    }

    #[test]
    fn only_the_exact_internal_token_is_let_through(presented in prop::collection::vec(any::<u8>(), 0..40)) {
        let token = InternalToken::new("0123456789abcdef-token").expect("token");
        let mut service = InternalAuthLayer::new(token.clone()).layer(ok_service());
        let mut request = http::Request::new(());
        *request.uri_mut() = "/mesh.features.v1.Features/PutFeatures".parse().expect("uri");
        if let Ok(value) = http::HeaderValue::from_bytes(&presented) {
            request.headers_mut().insert(TOKEN_HEADER, value);
        }
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("rt");
        let response = runtime.block_on(async {
            service.ready().await.expect("ready");
            service.call(request).await.expect("infallible")
        });
        let (code, message) = status_of(&response);
        if presented == b"0123456789abcdef-token" {
            prop_assert_eq!(code, tonic::Code::Ok);
        } else {
            prop_assert_eq!(code, tonic::Code::Unauthenticated);
            prop_assert!(message.contains(TOKEN_HEADER));
        }
    }

    #[test]
    fn any_trace_context_is_read_without_panicking(
        traceparent in prop::collection::vec(any::<u8>(), 0..80),
        tracestate in prop::collection::vec(any::<u8>(), 0..120),
    ) {
        let mut headers = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_bytes(&traceparent) {
            headers.insert("traceparent", v);
        }
        if let Ok(v) = http::HeaderValue::from_bytes(&tracestate) {
            headers.insert("tracestate", v);
        }
        let _ = mesh_telemetry::propagation::extract(&headers);
    }
}

#[test]
fn a_multibyte_last_character_is_malformed_not_a_panic() {
    assert_eq!(parse_grpc_timeout("1é"), None);
    assert_eq!(parse_grpc_timeout("+5m"), None);
    assert_eq!(parse_grpc_timeout("123456789m"), None);
    assert_eq!(
        parse_grpc_timeout("99999999H"),
        Some(Duration::from_secs(99_999_999 * 3600))
    );
}
