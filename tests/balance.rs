//! The balancer at the gateway: randomized power of two choices on in-flight calls, and retries
//! that never return to the replica that just failed the request while another is available.
//!
//! Faults come from the test proxy in front of each real replica (`mesh_testkit::proxy`, the one
//! faked fault: added latency, or every byte held as on a paused network). The choices are
//! observed through the gateway's `mesh_replica_calls_total` and the answers' degraded notes.

use std::time::Duration;

use mesh_proto::gateway::PredictRequest;
use mesh_testkit::proxy::Fault;
use mesh_tests::*;

fn request(timeout: Duration) -> tonic::Request<PredictRequest> {
    let row = fixture()[0].clone();
    let mut r = tonic::Request::new(PredictRequest {
        model: "churn".into(),
        entity_id: row.entity_id,
        features: json_features(&row.features),
        model_version: String::new(),
    });
    r.set_timeout(timeout);
    r
}

/// Successful ModelInfer attempts the gateway sent to `url`.
async fn successes(mesh: &Mesh, url: &str) -> f64 {
    let name = format!(r#"mesh_replica_calls_total{{replica="{url}",verdict="success"}}"#);
    metric(mesh.gateway_http, &name).await
}

/// With the load measured as calls in flight, a replica `k` times slower settles at about
/// `1 / (k + 1)` of the calls (closed-loop callers keep as many calls in flight on each);
/// 400 ms of added latency against the ~10-20 ms of a debug-build prediction makes that well under
/// a tenth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowed_replica_gets_at_most_a_tenth_of_the_calls() {
    // Coalescing off: one ModelInfer per prediction, so the calls count the predictions.
    let mesh = Mesh::start(|c| c.bulkheads.coalesce = 1).await;
    let slow = mesh.inference_proxies[0].url();
    let fast = mesh.inference_proxies[1].url();
    mesh.inference_proxies[0].set_delay(Duration::from_millis(400));
    let (slow_before, fast_before) = (successes(&mesh, &slow).await, successes(&mesh, &fast).await);
    let workers = (0..8).map(|_| {
        let mut gateway = mesh.gateway_client();
        async move {
            for _ in 0..40 {
                gateway
                    .predict(request(Duration::from_secs(5)))
                    .await
                    .expect("prediction");
            }
        }
    });
    futures::future::join_all(workers).await;
    let to_slow = successes(&mesh, &slow).await - slow_before;
    let to_fast = successes(&mesh, &fast).await - fast_before;
    assert_eq!(to_slow + to_fast, 320.0, "every call answered once");
    assert!(
        to_fast >= 0.9 * 320.0,
        "the fast replica took {to_fast} of 320 calls, the slowed one {to_slow}"
    );
    mesh.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_never_returns_to_the_replica_that_failed_the_request() {
    // Ejection off, so the hanging replica stays in the choice and keeps being tried.
    let mesh = Mesh::start_with(3, |c| c.resilience.outlier.consecutive_failures = 1_000_000).await;
    let held = mesh.inference_proxies[0].url();
    mesh.inference_proxies[0].set_fault(Fault::Hold);
    let mut gateway = mesh.gateway_client();
    let mut failed_over = 0;
    for i in 0..30 {
        let response = gateway
            .predict(request(Duration::from_millis(800)))
            .await
            .unwrap_or_else(|s| panic!("prediction {i}: {s:?}"))
            .into_inner();
        let notes_on_held = response
            .degraded
            .iter()
            .filter(|n| n.contains(&held))
            .count();
        assert!(
            notes_on_held <= 1,
            "prediction {i} went back to the replica it failed on: {:?}",
            response.degraded
        );
        failed_over += notes_on_held;
    }
    assert!(
        failed_over > 0,
        "no prediction tried the held replica: the test did not exercise a retry"
    );
    mesh.inference_proxies[0].set_fault(Fault::None);
    mesh.assert_idle().await;
}
