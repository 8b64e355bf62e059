//! Access control at the gateway over real gRPC: API keys and the per-key rate limit.

use std::collections::HashMap;
use std::time::Duration;

use mesh_gateway::auth::{parse_keys, RateLimit};
use mesh_proto::gateway::PredictRequest;
use mesh_tests::*;
use tonic::Code;

fn request(key: Option<&str>) -> tonic::Request<PredictRequest> {
    let row = &fixture()[0];
    let mut r = tonic::Request::new(PredictRequest {
        model: "churn".into(),
        entity_id: "walk-in".into(),
        features: json_features(&row.features)
            .into_iter()
            .collect::<HashMap<_, _>>(),
        model_version: String::new(),
    });
    r.set_timeout(Duration::from_secs(2));
    if let Some(key) = key {
        r.metadata_mut()
            .insert("x-api-key", key.parse().expect("key"));
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_required_and_each_key_is_rate_limited() {
    let mesh = Mesh::start(|config| {
        config.access.api_keys =
            parse_keys("team-a:secret-team-a,team-b:secret-team-b").expect("keys");
        config.access.rate_limit = Some(RateLimit {
            per_second: 1.0,
            burst: 3.0,
        });
    })
    .await;
    let mut gateway = mesh.gateway_client();

    let missing = gateway.predict(request(None)).await.expect_err("no key");
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert!(missing.message().contains("x-api-key"), "{missing:?}");
    let wrong = gateway
        .predict(request(Some("secret-team-c")))
        .await
        .expect_err("bad key");
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert!(
        !wrong.message().contains("secret-team-c"),
        "the key is not echoed"
    );

    for _ in 0..3 {
        gateway
            .predict(request(Some("secret-team-a")))
            .await
            .expect("within the burst");
    }
    let limited = gateway
        .predict(request(Some("secret-team-a")))
        .await
        .expect_err("burst spent");
    assert_eq!(limited.code(), Code::ResourceExhausted);
    let hint: u64 = limited
        .metadata()
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("retry-after-ms hint");
    assert!(hint > 0 && hint <= 1000, "hint {hint}");
    // Another key has its own bucket; probes need no key.
    gateway
        .predict(request(Some("secret-team-b")))
        .await
        .expect("team-b unaffected");
    assert_eq!(
        health(mesh.gateway.addr, "mesh.gateway.v1.Gateway").await,
        Some(1)
    );
    // After the hinted wait, team-a may call again.
    tokio::time::sleep(Duration::from_millis(hint + 20)).await;
    gateway
        .predict(request(Some("secret-team-a")))
        .await
        .expect("token returned");
    mesh.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_port_serves_tls_when_given_a_certificate() {
    use mesh_gateway::TlsFiles;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

    // A throw-away self-signed certificate for 127.0.0.1, made with the openssl CLI.
    let dir = scratch_dir("tls");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (installed by scripts/bootstrap.sh)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );

    // Unusable files are refused at start, naming the variable.
    let missing = TlsFiles {
        cert: dir.join("absent.pem"),
        key: key.clone(),
    };
    let error = missing.load().expect_err("missing certificate refused");
    assert!(error.to_string().contains("MESH_TLS_CERT"), "{error}");
    let swapped = TlsFiles {
        cert: key.clone(),
        key: cert.clone(),
    };
    let error = swapped.load().expect_err("a key is not a certificate");
    assert!(error.to_string().contains("no PEM CERTIFICATE"), "{error}");

    let mesh = Mesh::start(|c| {
        c.access.tls = Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        })
    })
    .await;
    let pem = std::fs::read(&cert).expect("cert");
    let secure = Endpoint::from_shared(format!("https://127.0.0.1:{}", mesh.gateway.addr.port()))
        .expect("url")
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pem))
                .domain_name("localhost"),
        )
        .expect("tls config")
        .connect()
        .await
        .expect("TLS handshake");
    let answer = mesh_proto::gateway::gateway_client::GatewayClient::new(secure)
        .predict(request(None))
        .await
        .expect("prediction over TLS")
        .into_inner();
    assert!(answer.score > 0.0 && answer.score < 1.0);

    // Plaintext on the TLS port gets no answer: the server drops the
    // connection during the handshake, which hyper reports as a closed
    // connection (CANCELLED) or a refused stream (UNAVAILABLE), depending on
    // timing.
    let plain = mesh
        .gateway_client()
        .predict(request(None))
        .await
        .expect_err("plaintext refused");
    assert!(
        matches!(
            plain.code(),
            Code::Unavailable | Code::Cancelled | Code::Unknown | Code::Internal
        ),
        "{plain:?}"
    );
}
