//! Outlier ejection and health watching of inference replicas, against real replicas behind
//! fault-injecting TCP proxies (the proxy adds latency, the one fault real replicas cannot be
//! asked to produce on demand).

use std::time::{Duration, Instant};

use mesh_proto::gateway::PredictRequest;
use mesh_tests::*;

async fn predict_ok(mesh: &Mesh) -> (Duration, Vec<String>) {
    let mut request = tonic::Request::new(PredictRequest {
        model: "churn".into(),
        entity_id: "cust-00001".into(),
        features: json_features(&fixture()[0].features),
        model_version: String::new(),
    });
    request.set_timeout(Duration::from_millis(600));
    let started = Instant::now();
    let answer = mesh
        .gateway_client()
        .predict(request)
        .await
        .expect("prediction succeeds")
        .into_inner();
    (started.elapsed(), answer.degraded)
}

async fn wait_metric(mesh: &Mesh, name: &str, value: f64, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if metric(mesh.gateway_http, name).await == value {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_replica_is_ejected_for_a_growing_time_and_a_draining_one_is_avoided() {
    let base = Duration::from_secs(2);
    let mesh = Mesh::start(|c| c.resilience.outlier.base_ejection = base).await;
    let slow = mesh.inference_proxies[0].url();
    let ejected = format!(r#"mesh_replica_ejected{{replica="{slow}"}}"#);
    let ejections = format!(r#"mesh_replica_ejections_total{{replica="{slow}"}}"#);
    assert_eq!(metric(mesh.gateway_http, &ejected).await, 0.0);

    // Replica 0 answers 400 ms late: each try there times out at half the budget and the
    // other replica answers. Five such failures in a row eject it. The balancer draws replicas
    // at random (one call at a time, both are idle), so it takes about ten calls to try the
    // slow one five times; at most 60 are sent.
    mesh.inference_proxies[0].set_delay(Duration::from_millis(400));
    let mut failed_over = 0;
    for _ in 0..60 {
        let (_, degraded) = predict_ok(&mesh).await;
        failed_over += degraded.iter().any(|d| d.contains(&slow)) as usize;
        if failed_over == 5 {
            break;
        }
    }
    assert!(
        failed_over >= 5,
        "answers say a replica failed over: {failed_over}"
    );
    assert_eq!(metric(mesh.gateway_http, &ejected).await, 1.0, "ejected");
    assert_eq!(metric(mesh.gateway_http, &ejections).await, 1.0);
    let ejected_at = Instant::now();

    // While ejected, no request goes there: every answer is fast and unremarkable.
    for _ in 0..20 {
        let (took, degraded) = predict_ok(&mesh).await;
        assert!(
            took < Duration::from_millis(150),
            "ejected replica avoided: {took:?}"
        );
        assert!(degraded.is_empty(), "{degraded:?}");
    }

    // After the base time it is back in the rotation; still slow, it is ejected again, now for
    // twice as long.
    assert!(
        wait_metric(&mesh, &ejected, 0.0, base + Duration::from_secs(2)).await,
        "ejection ends"
    );
    assert!(ejected_at.elapsed() >= base - Duration::from_millis(100));
    for _ in 0..60 {
        predict_ok(&mesh).await;
        if metric(mesh.gateway_http, &ejections).await >= 2.0 {
            break;
        }
    }
    assert_eq!(
        metric(mesh.gateway_http, &ejections).await,
        2.0,
        "ejected again"
    );
    let second = Instant::now();
    tokio::time::sleep(base + Duration::from_millis(500)).await;
    assert_eq!(
        metric(mesh.gateway_http, &ejected).await,
        1.0,
        "the second ejection lasts 2 × base (still out after {:?})",
        second.elapsed()
    );
    mesh.inference_proxies[0].set_delay(Duration::ZERO);

    // Health watching: a replica that starts draining says NOT_SERVING, and the gateway's
    // watch sees it at once, before any request has to fail there.
    let serving = format!(
        r#"mesh_replica_serving{{replica="{}"}}"#,
        mesh.inference_proxies[1].url()
    );
    assert_eq!(metric(mesh.gateway_http, &serving).await, 1.0);
    let mut mesh = mesh;
    mesh.inference[1].begin_shutdown();
    assert!(
        wait_metric(&mesh, &serving, 0.0, Duration::from_secs(3)).await,
        "the health watch sees replica 1 go NOT_SERVING"
    );
    mesh.assert_idle().await;
}
