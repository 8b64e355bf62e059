//! The set's membership: a replica that joins takes calls only once its health says SERVING,
//! one that leaves takes no new call while the calls already on it finish, and its metric
//! series go. Each replica is a real `grpc.health.v1` server on 127.0.0.1:0 (the watch is what
//! is tested; no inference runs here).

use std::time::Duration;

use mesh_runtime::internal::WithToken;
use prometheus::Registry;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use super::*;

/// A health server on 127.0.0.1:0 reporting `status` for the server as a whole; the reporter
/// changes it, and the server stops with the returned task.
async fn health_server(status: ServingStatus) -> (String, HealthReporter, JoinHandle<()>) {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_service_status("", status).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    });
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await;
    });
    (url, reporter, task)
}

fn endpoint(url: &str) -> (Endpoint, InternalChannel) {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("url")
        .connect_lazy();
    (
        Endpoint {
            url: url.to_owned(),
            source: "dns:///inference:50053".into(),
        },
        WithToken::new(channel, None),
    )
}

fn set() -> (ReplicaHandle, Registry) {
    let registry = Registry::new();
    let metrics = ReplicaMetrics::register(&registry).expect("metrics");
    (
        ReplicaSet::start(OutlierConfig::default(), metrics),
        registry,
    )
}

/// Waits (at most 5 s) until `url`'s health watch says `serving`.
async fn until_watched(set: &ReplicaSet, url: &str, serving: bool) {
    for _ in 0..500 {
        if set
            .states()
            .iter()
            .any(|s| s.url == url && s.serving == serving)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{url} never watched as serving={serving}: {:?}",
        set.states()
    );
}

fn picks(set: &ReplicaSet, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| set.pick(&[]).expect("a replica").url().to_owned())
        .collect()
}

#[tokio::test]
async fn a_replica_that_joins_takes_calls_only_once_its_health_says_serving() {
    let (a, _a_health, _a_task) = health_server(ServingStatus::Serving).await;
    let (b, b_health, _b_task) = health_server(ServingStatus::NotServing).await;
    let (set, _) = set();
    assert!(set.pick(&[]).is_none(), "no replica yet: nothing to pick");
    set.update(vec![endpoint(&a)], &[]);
    until_watched(&set, &a, true).await;
    set.update(vec![endpoint(&b)], &[]);
    assert_eq!(set.urls(), [a.clone(), b.clone()]);
    // Before its watch has answered at all (this runtime has not run it yet): no call.
    assert!(picks(&set, 200).iter().all(|url| url == &a));
    // Joined and watched, but NOT_SERVING (a replica still warming up): no call goes there.
    until_watched(&set, &b, false).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(picks(&set, 200).iter().all(|url| url == &a));
    b_health
        .set_service_status("", ServingStatus::Serving)
        .await;
    until_watched(&set, &b, true).await;
    let to_b = picks(&set, 200).iter().filter(|url| **url == b).count();
    assert!(to_b > 20, "B SERVING took {to_b} of 200 picks");
}

#[tokio::test]
async fn a_replica_that_leaves_takes_no_new_call_and_its_calls_finish_there() {
    let (a, _a_health, _a_task) = health_server(ServingStatus::Serving).await;
    let (b, _b_health, _b_task) = health_server(ServingStatus::Serving).await;
    let (set, registry) = set();
    set.update(vec![endpoint(&a), endpoint(&b)], &[]);
    until_watched(&set, &a, true).await;
    until_watched(&set, &b, true).await;
    // A call on its way to B when B leaves.
    let on_b = loop {
        let replica = set.pick(&[]).expect("a replica");
        if replica.url() == b {
            break replica;
        }
    };
    let lease = on_b.lease();
    set.update(Vec::new(), std::slice::from_ref(&b));
    assert_eq!(set.urls(), std::slice::from_ref(&a));
    assert!(picks(&set, 200).iter().all(|url| url == &a));
    // Even a request that failed on A is not sent to a replica that left.
    let a_only = set.pick(std::slice::from_ref(&a)).expect("panic mode");
    assert_eq!(a_only.url(), a);
    // The call in flight still reaches B over the channel it holds.
    let mut health = tonic_health::pb::health_client::HealthClient::new(on_b.channel());
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("a call on a replica that left finishes");
    assert_eq!(
        answer.into_inner().status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    for _ in 0..10 {
        set.observe(&on_b, Verdict::Failure);
    }
    drop(lease);
    let exported = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("encode");
    assert!(exported.contains(&format!("replica=\"{a}\"")), "{exported}");
    assert!(
        !exported.contains(&format!("replica=\"{b}\"")),
        "B's series stay after it left: {exported}"
    );
    assert!(
        set.states().iter().all(|s| !s.ejected),
        "failures of a replica that left eject nothing"
    );
}

/// A set of `n` replicas built by hand, with no health watch: each test sets what the watch
/// would have said.
fn unwatched(n: usize) -> (ReplicaSet, Vec<Arc<Replica>>) {
    let metrics = ReplicaMetrics::register(&Registry::new()).expect("metrics");
    let replicas: Vec<Arc<Replica>> = (0..n)
        .map(|i| {
            let (endpoint, channel) = endpoint(&format!("http://127.0.0.1:{}", 1 + i));
            let replica = Replica::new(endpoint, channel, &metrics);
            replica.serving.store(true, Ordering::Relaxed);
            Arc::new(replica)
        })
        .collect();
    let set = ReplicaSet {
        members: RwLock::new(Arc::new(replicas.clone())),
        watches: Mutex::new(HashMap::new()),
        outlier: OutlierConfig::default(),
        metrics,
    };
    (set, replicas)
}

fn fail(set: &ReplicaSet, replica: &Replica) {
    for _ in 0..set.outlier.consecutive_failures {
        set.observe(replica, Verdict::Failure);
    }
}

fn picked(set: &ReplicaSet, failed: &[String]) -> String {
    set.pick(failed).expect("a replica").url().to_owned()
}

#[tokio::test]
async fn the_last_available_replica_is_never_ejected() {
    let (set, r) = unwatched(2);
    // Replica 0 is dead (its health check fails); replica 1 stalls and fails for a moment.
    r[0].serving.store(false, Ordering::Relaxed);
    fail(&set, &r[1]);
    assert!(
        !r[1].ejected(Instant::now()),
        "ejecting it would leave no replica to serve"
    );
    assert_eq!(
        picked(&set, &[]),
        r[1].url,
        "the live one, not the dead one"
    );
    // With replica 0 back, the same failures eject replica 1 (within the cap of one).
    r[0].serving.store(true, Ordering::Relaxed);
    fail(&set, &r[1]);
    assert!(r[1].ejected(Instant::now()));
    assert_eq!(picked(&set, &[]), r[0].url);
}

#[tokio::test]
async fn with_none_available_an_ejected_replica_that_is_serving_beats_a_dead_one() {
    let (set, r) = unwatched(3);
    fail(&set, &r[2]);
    assert!(r[2].ejected(Instant::now()));
    // Now the other two die: none is available.
    r[0].serving.store(false, Ordering::Relaxed);
    r[1].serving.store(false, Ordering::Relaxed);
    for _ in 0..50 {
        assert_eq!(
            picked(&set, &[]),
            r[2].url,
            "panic mode tries the one that answers its health check"
        );
    }
}

#[tokio::test]
async fn a_replica_that_has_the_version_beats_one_that_lacks_it_even_if_ejected() {
    let (set, r) = unwatched(2);
    fail(&set, &r[1]);
    assert!(r[1].ejected(Instant::now()));
    // Replica 0 lacks the version (the request counts it as failed): the ejected replica 1,
    // whose health says SERVING and which has it, takes the request.
    assert_eq!(picked(&set, &[r[0].url.clone()]), r[1].url);
    // Had it failed there too, any available one is tried again.
    assert_eq!(
        picked(&set, &[r[0].url.clone(), r[1].url.clone()]),
        r[0].url
    );
}
