//! Cancellation at every `.await` of the gateway's client path leaves nothing behind: a call
//! dropped mid-flight (its client resets the stream, or the deadline layer cuts the handler
//! off) releases the breaker's half-open probe, the replica's in-flight count and the bulkhead
//! permits it held.
//!
//! The faults are real services behind the test proxy (`mesh_testkit::proxy`, the one faked
//! fault: it holds every byte, as a paused network would, or refuses connections); the
//! breaker, balancer and bulkheads are the gateway's own, observed through its `/metrics`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mesh_proto::gateway::gateway_client::GatewayClient;
use mesh_proto::gateway::PredictRequest;
use mesh_proto::types::FeatureValue;
use mesh_testkit::proxy::Fault;
use mesh_tests::*;
use tonic::transport::Channel;

/// The breaker's cool-down in the test gateway (`gateway_config`).
const COOL_DOWN: Duration = Duration::from_secs(1);

fn request(
    entity: &str,
    features: &HashMap<String, FeatureValue>,
    timeout: Duration,
) -> tonic::Request<PredictRequest> {
    let mut r = tonic::Request::new(PredictRequest {
        model: "churn".into(),
        entity_id: entity.into(),
        features: features.clone(),
        model_version: String::new(),
    });
    r.set_timeout(timeout);
    r
}

/// Features of the first fixture row: all of them, and a part that needs the store.
fn features() -> (
    String,
    HashMap<String, FeatureValue>,
    HashMap<String, FeatureValue>,
) {
    let row = fixture()[0].clone();
    let complete = json_features(&row.features);
    let partial = complete
        .iter()
        .filter(|(k, _)| *k == "support_calls_30d" || *k == "channel")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    (row.entity_id, complete, partial)
}

/// Sends `request` and cancels it from the client side after `after` (the future is dropped,
/// so the client resets the HTTP/2 stream). Panics if it was answered before that.
async fn cancel_after(
    gateway: &mut GatewayClient<Channel>,
    request: tonic::Request<PredictRequest>,
    after: Duration,
) {
    let answered = tokio::time::timeout(after, gateway.predict(request)).await;
    assert!(
        answered.is_err(),
        "answered before the cancel: {answered:?}"
    );
}

/// Opens the features breaker by holding features: predictions that need stored features time
/// out with fair budgets until it opens.
async fn open_features_breaker(mesh: &Mesh, entity: &str, partial: &HashMap<String, FeatureValue>) {
    mesh.features_proxy.set_fault(Fault::Hold);
    let mut gateway = mesh.gateway_client();
    for _ in 0..40 {
        if metric(mesh.gateway_http, FEATURES_BREAKER).await == 1.0 {
            return;
        }
        let status = gateway
            .predict(request(entity, partial, Duration::from_millis(150)))
            .await
            .expect_err("features is held");
        // (CANCELLED when the client's own timer wins the 2 ms race with the gateway's.)
        assert!(
            matches!(
                status.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ),
            "{status:?}"
        );
    }
    panic!("the features breaker did not open while features was held");
}

/// Predictions that need stored features succeed again within the breaker's cool-down + 1 s
/// of `since`.
async fn recovers(
    mesh: &Mesh,
    entity: &str,
    partial: &HashMap<String, FeatureValue>,
    since: Instant,
) {
    let mut gateway = mesh.gateway_client();
    loop {
        match gateway
            .predict(request(entity, partial, Duration::from_millis(500)))
            .await
        {
            Ok(_) => break,
            Err(status) => assert!(
                since.elapsed() < COOL_DOWN + Duration::from_secs(1),
                "still failing {:?} after the downstream came back: {status:?} (breaker state {})",
                since.elapsed(),
                metric(mesh.gateway_http, FEATURES_BREAKER).await
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric(mesh.gateway_http, FEATURES_BREAKER).await,
        0.0,
        "closed again"
    );
}

/// A mesh with seeded features whose features breaker is open and whose cool-down has ended
/// (the next call is the half-open probe); features is still held.
async fn half_open_mesh() -> (Mesh, String, HashMap<String, FeatureValue>) {
    let mesh = Mesh::start(|_| {}).await;
    mesh.seed(5).await;
    let (entity, _, partial) = features();
    mesh.gateway_client()
        .predict(request(&entity, &partial, Duration::from_secs(2)))
        .await
        .expect("healthy mesh");
    open_features_breaker(&mesh, &entity, &partial).await;
    tokio::time::sleep(COOL_DOWN + Duration::from_millis(100)).await;
    (mesh, entity, partial)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_probe_cancelled_by_its_client_does_not_wedge_the_breaker() {
    let (mesh, entity, partial) = half_open_mesh().await;
    // The probe's client gives up while features still holds it.
    cancel_after(
        &mut mesh.gateway_client(),
        request(&entity, &partial, Duration::from_secs(10)),
        Duration::from_millis(300),
    )
    .await;
    assert_eq!(
        metric(mesh.gateway_http, FEATURES_BREAKER).await,
        2.0,
        "half-open"
    );
    mesh.features_proxy.set_fault(Fault::None);
    recovers(&mesh, &entity, &partial, Instant::now()).await;
    mesh.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hopeless_probe_neither_closes_nor_reopens_the_breaker() {
    let (mesh, entity, partial) = half_open_mesh().await;
    // A hopeless request becomes the probe: its timeout says nothing about features.
    let status = mesh
        .gateway_client()
        .predict(request(&entity, &partial, Duration::from_millis(8)))
        .await
        .expect_err("hopeless budget");
    assert!(
        matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{status:?}"
    );
    assert_eq!(
        metric(mesh.gateway_http, FEATURES_BREAKER).await,
        2.0,
        "an ignored probe leaves the breaker half-open"
    );
    mesh.features_proxy.set_fault(Fault::None);
    recovers(&mesh, &entity, &partial, Instant::now()).await;
    mesh.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_cancelled_or_cut_off_during_the_features_call_leave_nothing_behind() {
    let mesh = Mesh::start(|_| {}).await;
    mesh.seed(5).await;
    let (entity, _, partial) = features();
    mesh.features_proxy.set_fault(Fault::Hold);
    let calls = (0..16).map(|i| {
        let mut gateway = mesh.gateway_client();
        let partial = partial.clone();
        let entity = entity.clone();
        async move {
            if i % 2 == 0 {
                // Cut off by the gateway's deadline layer (2 ms before the client's own timer,
                // which may still win on a loaded machine: then tonic says CANCELLED).
                let status = gateway
                    .predict(request(&entity, &partial, Duration::from_millis(100)))
                    .await
                    .expect_err("features is held");
                assert!(
                    matches!(
                        status.code(),
                        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                    ),
                    "{status:?}"
                );
            } else {
                // Cancelled by the client.
                cancel_after(
                    &mut gateway,
                    request(&entity, &partial, Duration::from_secs(10)),
                    Duration::from_millis(100),
                )
                .await;
            }
        }
    });
    futures::future::join_all(calls).await;
    let since = Instant::now();
    mesh.features_proxy.set_fault(Fault::None);
    recovers(&mesh, &entity, &partial, since).await;
    mesh.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_cancelled_during_retry_back_off_leave_nothing_behind() {
    let mesh = Mesh::start(|_| {}).await;
    mesh.seed(5).await;
    let (entity, _, partial) = features();
    // Features refuses connections: every attempt fails at once with UNAVAILABLE and is
    // retried after a jittered pause, so the cancels below land in back-off pauses as well as
    // in connection attempts.
    mesh.features_proxy.set_fault(Fault::Refuse);
    let calls = (0..24u64).map(|i| {
        let mut gateway = mesh.gateway_client();
        let partial = partial.clone();
        let entity = entity.clone();
        async move {
            let cancel = Duration::from_millis(5 + 7 * i);
            let _ = tokio::time::timeout(
                cancel,
                gateway.predict(request(&entity, &partial, Duration::from_secs(10))),
            )
            .await;
        }
    });
    futures::future::join_all(calls).await;
    let since = Instant::now();
    mesh.features_proxy.set_fault(Fault::None);
    recovers(&mesh, &entity, &partial, since).await;
    mesh.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_cancelled_during_a_replica_call_release_its_in_flight_count() {
    let mesh = Mesh::start(|_| {}).await;
    let (entity, complete, _) = features();
    for proxy in &mesh.inference_proxies {
        proxy.set_fault(Fault::Hold);
    }
    let in_flight = |body: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with("mesh_replica_in_flight{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let held = (0..8).map(|_| {
        let mut gateway = mesh.gateway_client();
        let complete = complete.clone();
        let entity = entity.clone();
        async move {
            cancel_after(
                &mut gateway,
                request(&entity, &complete, Duration::from_secs(10)),
                Duration::from_millis(400),
            )
            .await;
        }
    });
    let watch = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_, body) = http_get(mesh.gateway_http, "/metrics").await;
        in_flight(&body)
    };
    let (_, during) = tokio::join!(futures::future::join_all(held), watch);
    assert!(
        during >= 1.0,
        "calls were in flight to the held replicas: {during}"
    );
    // Still held: only the cancellation can have released the counts.
    mesh.assert_idle().await;
    for proxy in &mesh.inference_proxies {
        proxy.set_fault(Fault::None);
    }
    let mut gateway = mesh.gateway_client();
    for _ in 0..20 {
        gateway
            .predict(request(&entity, &complete, Duration::from_secs(2)))
            .await
            .expect("replicas are back");
    }
    mesh.assert_idle().await;
}
