//! The mesh on HA stores, with real failovers (issue 11): a Patroni cluster (etcd, a primary and
//! a synchronous standby) and Redis under three Sentinels, started by `mesh_testkit::ha`; and
//! Redis as the materialized online store that serves existing entities while PostgreSQL is
//! down. Every fault is real: `kill -9` of processes, a stopped PostgreSQL, a flushed Redis.
//! Failover times are measured and printed (`cargo test --test ha -- --nocapture`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use mesh_proto::features::{EntityFeatures, GetFeaturesRequest, PutFeaturesRequest};
use mesh_proto::types::FeatureTier;
use mesh_testkit::ha::{PatroniCluster, SentinelRedis};
use mesh_tests::ha_mesh::{wait_delivered, HaMesh, Load, Outcome};
use mesh_tests::*;

/// Demo entities the load asks for (all seeded).
const ENTITIES: usize = 200;

fn summary(what: &str, outcomes: &[Outcome]) -> Vec<String> {
    let ok: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().ok().cloned())
        .collect();
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().err())
        .map(|s| format!("{:?}: {}", s.code(), s.message()))
        .collect();
    println!(
        "{what}: {} requests, {} OK ({:.2} %), failures: {:?}",
        outcomes.len(),
        ok.len(),
        100.0 * ok.len() as f64 / outcomes.len().max(1) as f64,
        failed.iter().take(5).collect::<Vec<_>>()
    );
    ok
}

/// Writes `x` on entity `ha-probe` through the features service until PostgreSQL accepts it.
async fn put_until_accepted(mesh: &HaMesh, x: f64, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut client = mesh.features_client();
    while started.elapsed() < within {
        let entities = vec![EntityFeatures {
            entity_id: "ha-probe".into(),
            found: true,
            features: [("x".to_owned(), num(x))].into(),
            tier: 0,
        }];
        if client
            .put_features(PutFeaturesRequest { entities })
            .await
            .is_ok()
        {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Promotes churn `version` through the gateway's admin API until the registry (on the new
/// primary) accepts it, then waits until a prediction is answered by that version: the
/// gateway's and the replicas' registry connections followed the failover. Returns how long.
async fn promote_after_failover(mesh: &HaMesh, version: &str) -> Duration {
    let started = Instant::now();
    let mut admin = mesh_proto::admin::model_admin_client::ModelAdminClient::with_interceptor(
        channel(mesh.gateway.addr),
        mesh_proto::admin_key::AdminKey::new(ADMIN_KEY, Duration::from_secs(10))
            .expect("ascii key"),
    );
    let promote = mesh_proto::admin::PromoteRequest {
        model: "churn".into(),
        version: version.into(),
        alias: String::new(),
        reason: "after the failover".into(),
    };
    while let Err(status) = admin.promote(promote.clone()).await {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "promotion refused for 30 s: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut gateway =
        mesh_proto::gateway::gateway_client::GatewayClient::new(channel(mesh.gateway.addr));
    loop {
        let request = mesh_proto::gateway::PredictRequest {
            model: "churn".into(),
            entity_id: "cust-00001".into(),
            features: [
                ("support_calls_30d".to_owned(), num(1.0)),
                ("channel".to_owned(), cat("web")),
            ]
            .into(),
            model_version: String::new(),
        };
        if let Ok(answer) = gateway.predict(request).await {
            if answer.into_inner().model_version == version {
                return started.elapsed();
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "version {version} never answered after the promotion"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How long until a write through `url` lands on a primary other than `old` (PostgreSQL port).
async fn wait_new_primary(url: &str, old: u16, within: Duration) -> Option<u16> {
    let started = Instant::now();
    while started.elapsed() < within {
        let connect = tokio_postgres::connect(url, tokio_postgres::NoTls);
        if let Ok(Ok((db, connection))) =
            tokio::time::timeout(Duration::from_secs(1), connect).await
        {
            tokio::spawn(connection);
            if let Ok(row) = db
                .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
                .await
            {
                let (port, standby): (i32, bool) = (row.get(0), row.get(1));
                if !standby && port as u16 != old {
                    return Some(port as u16);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_postgres_primary_and_redis_master_fail_over_under_load_without_a_restart() {
    let started = Instant::now();
    let pg = PatroniCluster::start().expect("patroni cluster");
    let mut redis = SentinelRedis::start().expect("redis under sentinel");
    println!("HA stores up in {:.1} s", started.elapsed().as_secs_f64());
    let mesh = HaMesh::start(&pg.url(), &redis.sentinels()).await;
    seed(mesh.features_client(), ENTITIES).await;
    postgres_primary_killed(&pg, &mesh).await;
    redis_master_killed(&mut redis, &pg, &mesh).await;
}

/// `kill -9` of the primary's postmaster under load: the standby is promoted, predictions keep
/// flowing, writes resume on the new primary, every served record lands there once.
async fn postgres_primary_killed(pg: &PatroniCluster, mesh: &HaMesh) {
    let url = pg.url();
    let load = Load::start(mesh.gateway.addr, 50, ENTITIES);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let old = pg.kill_primary_postgres().expect("kill the primary");
    let killed = Instant::now();
    let new = wait_new_primary(&url, old, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("no new primary within 30 s; logs in {}", pg.dir().display()));
    let failover = killed.elapsed();
    let write_resumed = put_until_accepted(mesh, 2.0, Duration::from_secs(30))
        .await
        .expect("PutFeatures resumes on the new primary");
    let features_write = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let outcomes = load.finish().await;
    println!(
        "PostgreSQL failover: primary {old} killed, {new} accepted writes after {:.2} s; the features service's first write after the kill succeeded {:.2} s after it ({:.2} s of retries)",
        failover.as_secs_f64(),
        features_write.as_secs_f64(),
        write_resumed.as_secs_f64()
    );
    assert!(
        failover < Duration::from_secs(15),
        "failover took {failover:?}"
    );
    let served = summary("load across the PostgreSQL failover", &outcomes);
    let during: Vec<&Outcome> = outcomes.iter().filter(|o| o.sent >= killed).collect();
    assert!(
        !during.is_empty() && !served.is_empty(),
        "requests were sent and served"
    );
    let failed_on_db = during
        .iter()
        .filter(|o| matches!(&o.result, Err(s) if s.message().contains("database")))
        .count();
    let ok_during = during.iter().filter(|o| o.result.is_ok()).count();
    println!(
        "requests sent after the kill: {}, OK {ok_during}, failed for want of PostgreSQL {failed_on_db}",
        during.len()
    );
    assert_eq!(
        failed_on_db, 0,
        "predictions keep flowing from memory and Redis while PostgreSQL fails over"
    );
    assert!(
        ok_during * 1000 >= during.len() * 999,
        "at least 99.9 % of the requests during the failover succeed"
    );
    let distinct: HashSet<&String> = served.iter().collect();
    assert_eq!(
        distinct.len(),
        served.len(),
        "no prediction id answered twice"
    );
    let (found, rows) = wait_delivered(&url, &served, Duration::from_secs(60)).await;
    println!(
        "records: served {}, found on the new primary {found}, rows {rows}",
        served.len()
    );
    assert_eq!(
        (found, rows),
        (served.len() as i64, served.len() as i64),
        "every served record reaches the new primary exactly once"
    );
    let promoted = promote_after_failover(mesh, "2").await;
    println!(
        "registry: churn 2 promoted on the new primary and serving {:.2} s after the request",
        promoted.as_secs_f64()
    );
    let read = mesh
        .features_client()
        .get_features(GetFeaturesRequest {
            entity_ids: vec!["ha-probe".into()],
        })
        .await
        .expect("read the probe")
        .into_inner();
    assert_eq!(read.entities[0].features.get("x"), Some(&num(2.0)));
}

/// `kill -9` of the Redis master under load: Sentinel promotes the replica, and the features
/// service follows it without a restart.
async fn redis_master_killed(redis: &mut SentinelRedis, pg: &PatroniCluster, mesh: &HaMesh) {
    let url = pg.url();
    let load = Load::start(mesh.gateway.addr, 50, ENTITIES);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let old_master = redis.kill_master().expect("kill the redis master");
    let killed = Instant::now();
    let mut promoted = None;
    while killed.elapsed() < Duration::from_secs(30) {
        if let Some(port) = redis.master_port().filter(|p| *p != old_master) {
            promoted = Some((port, killed.elapsed()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (new_master, sentinel_failover) = promoted.expect("Sentinel promoted the replica");
    println!(
        "Redis failover: master {old_master} killed, Sentinel named {new_master} after {:.2} s",
        sentinel_failover.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let outcomes = load.finish().await;
    let served = summary("load across the Redis failover", &outcomes);
    assert!(!served.is_empty());
    assert!(
        served.len() * 1000 >= outcomes.len() * 999,
        "at least 99.9 % succeed: Redis down is served from memory and PostgreSQL"
    );
    // A write now goes through to the new master: the features service follows Sentinel.
    let mut written = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !written && Instant::now() < deadline {
        put_until_accepted(mesh, 3.0, Duration::from_secs(5)).await;
        written = redis_cli(
            new_master,
            &["EXISTS", &mesh_features::store::redis_key("ha-probe")],
        )
        .trim()
            == "1"
            && redis_cli(
                new_master,
                &["GET", &mesh_features::store::redis_version_key("ha-probe")],
            )
            .trim()
                == "3";
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        written,
        "the probe's version 3 reached the new master {new_master}"
    );
    let (found, rows) = wait_delivered(&url, &served, Duration::from_secs(60)).await;
    assert_eq!((found, rows), (served.len() as i64, served.len() as i64));
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Scenario 3 of the chaos suite, for entities that exist: with Redis materialized from
/// PostgreSQL, stopping PostgreSQL costs nothing. The entities are written straight into
/// PostgreSQL (never through the service, never read), and Redis is flushed (as if restarted
/// empty): only the materializer can have put them there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_stopped_materialized_redis_serves_every_existing_entity() {
    let mut mesh = Mesh::start(|_| {}).await;
    mesh.seed(100).await;
    let db = mesh.db().await;
    db.batch_execute(
        "INSERT INTO feature_values (entity_id, name, number, category)
           SELECT 'bulk-' || i, 'tenure_months', i, NULL FROM generate_series(1, 400) i;
         INSERT INTO feature_entity_versions (entity_id, version)
           SELECT 'bulk-' || i, 1 FROM generate_series(1, 400) i",
    )
    .await
    .expect("bulk insert");
    redis_cli(mesh.redis.port(), &["FLUSHALL"]);
    let ids: Vec<String> = (1..=100)
        .map(|i| format!("cust-{i:05}"))
        .chain((1..=400).map(|i| format!("bulk-{i}")))
        .collect();
    // The materializer notices the flush (its marker key is gone) within seconds.
    let started = Instant::now();
    let keys = loop {
        let n: usize = redis_cli(mesh.redis.port(), &["DBSIZE"])
            .trim()
            .parse()
            .unwrap_or(0);
        // A value and a version key per entity, plus the marker.
        if n > 2 * ids.len() || started.elapsed() > Duration::from_secs(20) {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "rematerialized {keys} keys in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(keys, 2 * ids.len() + 1, "every entity materialized");

    mesh.pg.stop();
    let mut client = mesh.features_client();
    let mut served = 0;
    for chunk in ids.chunks(100) {
        let answer = client
            .get_features(GetFeaturesRequest {
                entity_ids: chunk.to_vec(),
            })
            .await
            .expect("GetFeatures with PostgreSQL stopped")
            .into_inner();
        for entity in &answer.entities {
            assert!(entity.found, "{} was not served", entity.entity_id);
            assert_ne!(entity.tier, FeatureTier::Database as i32);
            served += 1;
        }
        assert!(answer.failed.is_empty(), "{:?}", answer.failed);
    }
    assert_eq!(served, ids.len());
}
