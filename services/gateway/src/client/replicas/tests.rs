//! Outlier ejection and the choice of replica, on a set built by hand (no health watch: each
//! test sets what the health check would have said).

use super::*;

fn set(n: usize) -> ReplicaSet {
    let metrics = ReplicaMetrics::register(&prometheus::Registry::new()).expect("metrics");
    let replicas = (0..n)
        .map(|i| {
            let url = format!("http://127.0.0.1:{}", 1 + i);
            let channel = tonic::transport::Endpoint::from_shared(url.clone())
                .expect("url")
                .connect_lazy();
            Replica {
                client: GrpcInferenceServiceClient::new(InternalChannel::new(channel, None)),
                in_flight: metrics.in_flight.with_label_values(&[url.as_str()]),
                calls: ["success", "failure", "ignore"]
                    .map(|verdict| metrics.calls.with_label_values(&[url.as_str(), verdict])),
                url,
                serving: AtomicBool::new(true),
                outlier: Mutex::new(Outlier::default()),
            }
        })
        .collect();
    ReplicaSet {
        replicas,
        outlier: OutlierConfig::default(),
        metrics,
    }
}

fn fail(set: &ReplicaSet, index: usize) {
    for _ in 0..set.outlier.consecutive_failures {
        set.observe(index, Verdict::Failure);
    }
}

#[tokio::test]
async fn the_last_available_replica_is_never_ejected() {
    let set = set(2);
    // Replica 0 is dead (its health check fails); replica 1 stalls and fails for a moment.
    set.replicas[0].serving.store(false, Ordering::Relaxed);
    fail(&set, 1);
    assert!(
        !set.replicas[1].ejected(Instant::now()),
        "ejecting it would leave no replica to serve"
    );
    assert_eq!(set.pick(&[]), 1, "the live one, not the dead one");
    // With replica 0 back, the same failures eject replica 1 (within the cap of one).
    set.replicas[0].serving.store(true, Ordering::Relaxed);
    fail(&set, 1);
    assert!(set.replicas[1].ejected(Instant::now()));
    assert_eq!(set.pick(&[]), 0);
}

#[tokio::test]
async fn with_none_available_an_ejected_replica_that_is_serving_beats_a_dead_one() {
    let set = set(3);
    fail(&set, 2);
    assert!(set.replicas[2].ejected(Instant::now()));
    // Now the other two die: none is available.
    set.replicas[0].serving.store(false, Ordering::Relaxed);
    set.replicas[1].serving.store(false, Ordering::Relaxed);
    for _ in 0..50 {
        assert_eq!(
            set.pick(&[]),
            2,
            "panic mode tries the one that answers its health check"
        );
    }
}

#[tokio::test]
async fn a_replica_that_has_the_version_beats_one_that_lacks_it_even_if_ejected() {
    let set = set(2);
    fail(&set, 1);
    assert!(set.replicas[1].ejected(Instant::now()));
    // Replica 0 lacks the version (the request counts it as failed): the ejected replica 1,
    // whose health says SERVING and which has it, takes the request.
    assert_eq!(set.pick(&[0]), 1);
    // Had it failed there too, any available one is tried again.
    assert_eq!(set.pick(&[0, 1]), 0);
}
