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

/// The call ran out of time: the gateway's DEADLINE_EXCEEDED, or CANCELLED when the client's
/// own timer wins the 2 ms race with the gateway's deadline layer on a loaded machine.
fn assert_timed_out(status: &tonic::Status) {
    assert!(
        matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{status:?}"
    );
}

/// Ends the features fault, then checks that predictions recover within the cool-down + 1 s
/// and that nothing is left counted in flight.
async fn heal_features(mesh: &Mesh, entity: &str, partial: &HashMap<String, FeatureValue>) {
    let since = Instant::now();
    mesh.features_proxy.set_fault(Fault::None);
    recovers(mesh, entity, partial, since).await;
    mesh.assert_idle().await;
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

/// The outcome of one of [`fan_out`]'s predictions: its answer, or `None` if the client gave up
/// first (dropping the call, so the client reset the stream).
type Sent = Option<Result<tonic::Response<mesh_proto::gateway::PredictResponse>, tonic::Status>>;

/// Sends `count` predictions for `entity` with `features` at once; call `i` carries
/// `plan(i).0` as its `grpc-timeout` and its client gives up after `plan(i).1`.
async fn fan_out(
    mesh: &Mesh,
    entity: &str,
    features: &HashMap<String, FeatureValue>,
    count: u64,
    plan: impl Fn(u64) -> (Duration, Duration),
) -> Vec<Sent> {
    let calls = (0..count).map(|i| {
        let mut gateway = mesh.gateway_client();
        let (timeout, give_up) = plan(i);
        let request = request(entity, features, timeout);
        async move {
            tokio::time::timeout(give_up, gateway.predict(request))
                .await
                .ok()
        }
    });
    futures::future::join_all(calls).await
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
        assert_timed_out(&status);
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
    heal_features(&mesh, &entity, &partial).await;
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
    assert_timed_out(&status);
    assert_eq!(
        metric(mesh.gateway_http, FEATURES_BREAKER).await,
        2.0,
        "an ignored probe leaves the breaker half-open"
    );
    heal_features(&mesh, &entity, &partial).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_cancelled_or_cut_off_during_the_features_call_leave_nothing_behind() {
    let mesh = Mesh::start(|_| {}).await;
    mesh.seed(5).await;
    let (entity, _, partial) = features();
    mesh.features_proxy.set_fault(Fault::Hold);
    // Even calls are cut off by the gateway's deadline layer (2 ms before the client's own
    // timer, which may still win on a loaded machine: then tonic says CANCELLED); odd ones
    // are cancelled by their client.
    let sent = fan_out(&mesh, &entity, &partial, 16, |i| {
        if i % 2 == 0 {
            (Duration::from_millis(100), Duration::from_secs(10))
        } else {
            (Duration::from_secs(10), Duration::from_millis(100))
        }
    })
    .await;
    for (i, outcome) in sent.into_iter().enumerate() {
        if i % 2 == 0 {
            let status = outcome
                .expect("the deadline layer answers")
                .expect_err("features is held");
            assert_timed_out(&status);
        } else {
            assert!(outcome.is_none(), "answered before the cancel: {outcome:?}");
        }
    }
    heal_features(&mesh, &entity, &partial).await;
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
    fan_out(&mesh, &entity, &partial, 24, |i| {
        (Duration::from_secs(10), Duration::from_millis(5 + 7 * i))
    })
    .await;
    heal_features(&mesh, &entity, &partial).await;
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
    let held = fan_out(&mesh, &entity, &complete, 8, |_| {
        (Duration::from_secs(10), Duration::from_millis(400))
    });
    let watch = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_, body) = http_get(mesh.gateway_http, "/metrics").await;
        in_flight(&body)
    };
    let (sent, during) = tokio::join!(held, watch);
    assert!(
        sent.iter().all(Option::is_none),
        "answered before the cancel: {sent:?}"
    );
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
