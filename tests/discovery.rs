//! Replica discovery through DNS, whole mesh: the gateway is given one name,
//! `dns:///inference.test:<port>`, that resolves to several loopback addresses (127.0.0.2, .3,
//! .4: Linux routes all of 127/8 to `lo`, so each replica binds the same port on an address of
//! its own, as pods behind a headless Service share a port on addresses of their own).
//!
//! Which resolver: the name resolves through the gateway's injectable resolver, here
//! `MapResolver`, a map the test edits while the mesh runs, standing in for the Service's DNS
//! records. (Editing `/etc/hosts` would change the machine for every other process on it.)
//! The last test resolves `localhost` through the system resolver (`lookup_host`) instead.
//!
//! Inference is scaled 2 → 3 → 1 under a steady load; every replica is real and counts the
//! `ModelInfer` calls it serves on its own `/metrics`, which is how the test sees where calls
//! went.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_gateway::client::discovery::{MapResolver, Resolver};
use mesh_proto::gateway::PredictRequest;
use mesh_tests::*;

const NAME: &str = "inference.test";

/// Each request's deadline: "within deadline" means answered OK within it.
const DEADLINE: Duration = Duration::from_secs(1);

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn request(row: &FixtureRow) -> tonic::Request<PredictRequest> {
    let mut r = tonic::Request::new(PredictRequest {
        model: "churn".into(),
        entity_id: row.entity_id.clone(),
        features: json_features(&row.features),
        model_version: String::new(),
    });
    r.set_timeout(DEADLINE);
    r
}

/// A replica: the service, its `/metrics` address, and its gateway-side URL.
struct Replica {
    running: Running,
    metrics: SocketAddr,
    url: String,
}

async fn start_replica(ip: IpAddr, port: u16) -> Replica {
    let addr = SocketAddr::new(ip, port);
    let (running, metrics) = start_inference_with_metrics_at(inference_config(), addr).await;
    Replica {
        running,
        metrics,
        url: format!("http://{addr}"),
    }
}

/// `ModelInfer` calls the replica has handled (every code), from its own `/metrics`.
async fn served(replica: &Replica) -> u64 {
    let (_, body) = http_get(replica.metrics, "/metrics").await;
    body.lines()
        .filter(|l| l.starts_with("mesh_rpc_requests_total{") && l.contains("/ModelInfer\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Waits (at most `within`) until the gateway's `/metrics` satisfies `done`; returns how long.
async fn until_gateway(
    http: SocketAddr,
    within: Duration,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let (_, body) = http_get(http, "/metrics").await;
        if done(&body) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{what} within {within:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Outcomes of the steady load.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    late: AtomicU64,
    failed: AtomicU64,
}

/// `workers` closed-loop callers with a short pause between calls, until `stop`.
fn steady_load(
    gateway: SocketAddr,
    workers: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let rows = Arc::new(fixture());
    (0..workers)
        .map(|w| {
            let (stop, tally, rows) = (stop.clone(), tally.clone(), rows.clone());
            let mut client =
                mesh_proto::gateway::gateway_client::GatewayClient::new(channel(gateway));
            tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let answer = client.predict(request(&rows[i % rows.len()])).await;
                    let counter = match answer {
                        Ok(_) if started.elapsed() <= DEADLINE => &tally.ok,
                        Ok(_) => &tally.late,
                        Err(status) => {
                            eprintln!(
                                "prediction failed: {:?} {}",
                                status.code(),
                                status.message()
                            );
                            &tally.failed
                        }
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    i += workers;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect()
}

/// A free port on 127.0.0.2, bound by the first replica; the others bind it on their own
/// addresses.
async fn first_replica() -> (Replica, u16) {
    let probe = tokio::net::TcpListener::bind((loopback(2), 0))
        .await
        .expect("bind 127.0.0.2 (Linux routes 127/8 to lo)");
    let port = probe.local_addr().expect("addr").port();
    drop(probe);
    (start_replica(loopback(2), port).await, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_scaled_2_3_1_under_load_through_dns_discovery() {
    telemetry();
    let pg = mesh_testkit::PostgresServer::start().expect("postgres");
    let features = start_features(features_config(None, &pg)).await;
    let logger = start_logger(logger_config(&pg)).await;
    let (a, port) = first_replica().await;
    let mut b = start_replica(loopback(3), port).await;
    let resolver = MapResolver::default();
    resolver.set(NAME, &[loopback(2), loopback(3)]);
    let mut config = gateway_config(
        features.url(),
        vec![format!("dns:///{NAME}:{port}")],
        logger.url(),
    );
    config.downstreams.resolver = Resolver::new(resolver.clone());
    config.downstreams.discovery_interval = Duration::from_millis(200);
    let (gateway, http) = start_gateway_with_http(config).await;
    wait_replicas_ready(http, 2).await;
    wait_serving(gateway.addr, Duration::from_secs(30)).await;
    let test_started = Instant::now();

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let load = steady_load(gateway.addr, 4, stop.clone(), tally.clone());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (a_two, b_two) = (served(&a).await, served(&b).await);
    assert!(
        a_two > 0 && b_two > 0,
        "2 replicas: {a_two} and {b_two} calls"
    );

    // 2 → 3. The new address is in DNS before its replica even listens (the hardest order:
    // a Service publishing not-ready addresses): it must take no call until SERVING.
    resolver.set(NAME, &[loopback(2), loopback(3), loopback(4)]);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let scaled_up = Instant::now();
    let mut c = start_replica(loopback(4), port).await;
    let serving_c = format!(r#"mesh_replica_serving{{replica="{}"}} 1"#, c.url);
    until_gateway(
        http,
        Duration::from_secs(30),
        "the third replica SERVING",
        |m| m.contains(&serving_c),
    )
    .await;
    let joined_after = scaled_up.elapsed();
    // While C's address refused connections and while it warmed up, the gateway tried it not
    // once (a refused attempt would count as a failure here, even if its retry then succeeded).
    let tried_early = metric(
        http,
        &format!(
            r#"mesh_replica_calls_total{{replica="{}",verdict="failure"}}"#,
            c.url
        ),
    )
    .await;
    assert_eq!(tried_early, 0.0, "calls sent to C before it was SERVING");
    let c_joined = served(&c).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (a_three, b_three, c_three) = (served(&a).await, served(&b).await, served(&c).await);
    let window = (a_three - a_two) + (b_three - b_two) + (c_three - c_joined);
    let to_c = c_three - c_joined;
    assert!(
        to_c * 10 >= window,
        "the joined replica took {to_c} of {window} calls in 5 s"
    );

    // A resolver outage keeps the last good set.
    resolver.fail(NAME, "SERVFAIL");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let failures = metric(
        http,
        &format!(
            r#"mesh_discovery_resolutions_total{{name="dns:///{NAME}:{port}",outcome="failed"}}"#
        ),
    )
    .await;
    assert!(failures >= 3.0, "{failures} failed resolutions counted");
    let c_during = served(&c).await;
    assert!(
        c_during > c_three,
        "the set did not shrink while resolving failed"
    );

    // 3 → 1. B leaves DNS but keeps running (it must drain out by discovery alone); C leaves
    // DNS and is stopped at once, as a scaled-down pod gets SIGTERM.
    resolver.set(NAME, &[loopback(2)]);
    let scaled_down = Instant::now();
    c.running.begin_shutdown();
    let (b_url, c_url) = (b.url.clone(), c.url.clone());
    let left_after = until_gateway(http, Duration::from_secs(5), "B and C leave", |m| {
        !m.contains(&format!(r#"replica="{b_url}""#))
            && !m.contains(&format!(r#"replica="{c_url}""#))
    })
    .await;
    // Calls already on B finish within their deadline; after that it gets none.
    tokio::time::sleep(DEADLINE).await;
    let (a_one, b_one) = (served(&a).await, served(&b).await);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (a_end, b_end) = (served(&a).await, served(&b).await);
    stop.store(true, Ordering::Relaxed);
    futures::future::join_all(load).await;
    let load_secs = test_started.elapsed().as_secs_f64();

    let ok = tally.ok.load(Ordering::Relaxed);
    let late = tally.late.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    let total = ok + late + failed;
    let within = ok as f64 / total as f64;
    println!(
        "2 → 3 → 1 through DNS discovery: {total} predictions in {load_secs:.1} s, {ok} OK within \
         {DEADLINE:?} ({:.3} %), {late} late, {failed} failed; the third replica SERVING {:.2} s \
         after it was started and took {to_c} of {window} calls in the next 5 s; B and C gone from \
         the gateway {:.2} s after leaving DNS; after draining B took {} calls, A {}",
        within * 100.0,
        joined_after.as_secs_f64(),
        left_after.as_secs_f64(),
        b_end - b_one,
        a_end - a_one,
    );
    assert!(scaled_down.elapsed() < Duration::from_secs(30));
    assert_eq!(b_end, b_one, "B took calls after it left DNS and drained");
    assert!(
        a_end > a_one + 50,
        "A alone served the last 5 s: {}",
        a_end - a_one
    );
    assert!(total >= 1000, "too little load to judge: {total}");
    assert!(within >= 0.999, "{within:.4} within deadline, below 99.9 %");
    b.running.stop().await;
    c.running.stop().await;
    gateway.shutdown().await;
}

/// The system resolver: `dns:///localhost:<port>` through `lookup_host`, with the replica on
/// 127.0.0.1 (an IPv6 answer, `::1`, is a replica that never says SERVING, so it takes no call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_resolver_finds_a_replica_behind_localhost() {
    telemetry();
    let pg = mesh_testkit::PostgresServer::start().expect("postgres");
    let features = start_features(features_config(None, &pg)).await;
    let logger = start_logger(logger_config(&pg)).await;
    let replica = start_inference(inference_config()).await;
    let config = gateway_config(
        features.url(),
        vec![format!("dns:///localhost:{}", replica.addr.port())],
        logger.url(),
    );
    let (gateway, http) = start_gateway_with_http(config).await;
    wait_replicas_ready(http, 1).await;
    let mut client = mesh_proto::gateway::gateway_client::GatewayClient::new(channel(gateway.addr));
    let rows = fixture();
    for row in rows.iter().take(20) {
        client.predict(request(row)).await.expect("prediction");
    }
    let calls = metric(
        http,
        &format!(
            r#"mesh_replica_calls_total{{replica="http://127.0.0.1:{}",verdict="success"}}"#,
            replica.addr.port()
        ),
    )
    .await;
    assert_eq!(
        calls, 20.0,
        "every call went to the replica localhost resolved to"
    );
    gateway.shutdown().await;
}
