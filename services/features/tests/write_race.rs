//! A load racing a `PutFeatures` must not write the old values back into memory or Redis (which
//! holds the write's values, written through with a newer version).
//!
//! Deterministic: the store's load hook holds the load exactly between its reads (Redis, then
//! PostgreSQL, both done) and its cache fills, the write runs to completion, then the load is
//! let go. Real PostgreSQL and Redis from the test kit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mesh_features::config::RedisSettings;
use mesh_features::memory::FeatureCache;
use mesh_features::metrics::FeatureMetrics;
use mesh_features::store::{redis_key, FeatureStore, LoadHook, RedisLink};
use mesh_proto::features::EntityFeatures;
use mesh_proto::types::{feature_value::Kind, FeatureValue};
use mesh_testkit::{PostgresServer, RedisServer};
use prost::Message as _;
use tokio::sync::{mpsc, Semaphore};

/// Holds loads at the hook while armed: says when one arrived, lets it go on `release`.
struct Gate {
    armed: Arc<AtomicBool>,
    reached: mpsc::UnboundedReceiver<()>,
    release: Arc<Semaphore>,
}

impl Gate {
    fn new() -> (Self, LoadHook) {
        let armed = Arc::new(AtomicBool::new(false));
        let release = Arc::new(Semaphore::new(0));
        let (tx, reached) = mpsc::unbounded_channel();
        let hook: LoadHook = {
            let (armed, release) = (armed.clone(), release.clone());
            Arc::new(move || {
                let (armed, release, tx) = (armed.clone(), release.clone(), tx.clone());
                Box::pin(async move {
                    if armed.load(Ordering::SeqCst) {
                        let _ = tx.send(());
                        if let Ok(permit) = release.acquire().await {
                            permit.forget();
                        }
                    }
                })
            })
        };
        let gate = Self {
            armed,
            reached,
            release,
        };
        (gate, hook)
    }
}

struct Backends {
    pg: PostgresServer,
    redis: RedisServer,
}

async fn backends() -> Backends {
    let pg = PostgresServer::start().expect("postgres");
    let redis = RedisServer::start().expect("redis");
    let pool = mesh_runtime::postgres::pool(&pg.url(), 2, Duration::from_secs(5)).expect("pool");
    mesh_runtime::postgres::migrate(&pool, "features", mesh_features::MIGRATIONS)
        .await
        .expect("migrate");
    Backends { pg, redis }
}

async fn store(b: &Backends, hook: Option<LoadHook>) -> (Arc<FeatureStore>, FeatureMetrics) {
    let metrics = FeatureMetrics::register(&prometheus::Registry::new()).expect("metrics");
    let settings = RedisSettings {
        url: Some(b.redis.url()),
        timeout: Duration::from_millis(500),
        cooldown: Duration::from_millis(100),
        sentinels: Vec::new(),
        master_name: "mesh".into(),
        ttl: Duration::ZERO,
        materialize_interval: Duration::ZERO,
    };
    let redis = RedisLink::from_settings(&settings).expect("redis link");
    let pool = mesh_runtime::postgres::pool(&b.pg.url(), 4, Duration::from_secs(5)).expect("pool");
    let memory = FeatureCache::new(Duration::from_secs(60), 100, 100);
    let mut store = FeatureStore::new(
        settings,
        Duration::from_secs(5),
        memory,
        redis,
        pool,
        metrics.clone(),
    );
    if let Some(hook) = hook {
        store = store.with_load_hook(hook);
    }
    (Arc::new(store), metrics)
}

fn entity(x: f64) -> EntityFeatures {
    EntityFeatures {
        entity_id: "cust-race".into(),
        found: true,
        features: [(
            "x".to_owned(),
            FeatureValue {
                kind: Some(Kind::Number(x)),
            },
        )]
        .into(),
        tier: 0,
    }
}

fn x_of(store_answer: &mesh_features::store::LoadResult) -> f64 {
    let served = store_answer.as_ref().expect("served");
    match served.entity.features["x"].kind {
        Some(Kind::Number(x)) => x,
        ref other => panic!("x is {other:?}"),
    }
}

/// Deletes the entity from Redis (value and version), as if it predated the materialization:
/// the next load reads PostgreSQL and writes back what it read.
async fn redis_forget(b: &Backends) {
    let client = redis::Client::open(b.redis.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    redis::cmd("DEL")
        .arg(redis_key("cust-race"))
        .arg(mesh_features::store::redis_version_key("cust-race"))
        .query_async::<()>(&mut conn)
        .await
        .expect("DEL");
}

/// `x` of the entity Redis holds, if any.
async fn redis_x(b: &Backends) -> Option<f64> {
    let client = redis::Client::open(b.redis.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let bytes: Option<Vec<u8>> = redis::cmd("GET")
        .arg(redis_key("cust-race"))
        .query_async(&mut conn)
        .await
        .expect("GET");
    let decoded = EntityFeatures::decode(bytes?.as_slice()).expect("a stored entity");
    match decoded.features["x"].kind {
        Some(Kind::Number(x)) => Some(x),
        ref other => panic!("x is {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_started_before_a_write_does_not_fill_memory_or_redis_with_old_values() {
    let b = backends().await;
    let (mut gate, hook) = Gate::new();
    let (store, metrics) = store(&b, Some(hook)).await;
    store.put_many(&[entity(1.0)]).await.expect("write v1");
    redis_forget(&b).await;

    gate.armed.store(true, Ordering::SeqCst);
    let load = tokio::spawn({
        let store = store.clone();
        async move { store.get_many(&["cust-race".to_owned()]).await }
    });
    gate.reached
        .recv()
        .await
        .expect("the load reached the hook");
    // The load has read v1 everywhere; now the write.
    store.put_many(&[entity(2.0)]).await.expect("write v2");
    gate.armed.store(false, Ordering::SeqCst);
    gate.release.add_permits(1);
    let raced = load.await.expect("join").expect("get");
    assert_eq!(x_of(&raced[0]), 1.0, "the racing caller gets what was read");

    assert!(
        store.memory().get("cust-race").is_none(),
        "the racing load filled memory with old values"
    );
    assert_eq!(metrics.stale_skipped_total("memory"), 1);
    assert_eq!(
        redis_x(&b).await,
        Some(2.0),
        "Redis holds the write, not the old values"
    );
    let after = store
        .get_many(&["cust-race".to_owned()])
        .await
        .expect("get");
    assert_eq!(x_of(&after[0]), 2.0, "a read after the write sees it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instances_write_makes_redis_refuse_the_old_write_back() {
    let b = backends().await;
    let (mut gate, hook) = Gate::new();
    let (loading, loading_metrics) = store(&b, Some(hook)).await;
    let (writing, _) = store(&b, None).await;
    writing.put_many(&[entity(1.0)]).await.expect("write v1");
    redis_forget(&b).await;

    gate.armed.store(true, Ordering::SeqCst);
    let load = tokio::spawn({
        let loading = loading.clone();
        async move { loading.get_many(&["cust-race".to_owned()]).await }
    });
    gate.reached
        .recv()
        .await
        .expect("the load reached the hook");
    // Another instance writes: it cannot reach the first one's memory, only Redis.
    writing.put_many(&[entity(2.0)]).await.expect("write v2");
    gate.armed.store(false, Ordering::SeqCst);
    gate.release.add_permits(1);
    load.await.expect("join").expect("get");

    // The write-back runs on its own task; wait for its verdict (an event, not a guess).
    let started = std::time::Instant::now();
    while loading_metrics.stale_skipped_total("redis") == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the write-back never reported"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(loading_metrics.stale_skipped_total("redis"), 1);
    assert_eq!(
        redis_x(&b).await,
        Some(2.0),
        "Redis took the old values back"
    );
    let fresh = writing
        .get_many(&["cust-race".to_owned()])
        .await
        .expect("get");
    assert_eq!(x_of(&fresh[0]), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_materialization_restores_what_redis_lost_and_never_puts_an_older_version_over_a_newer_one(
) {
    let b = backends().await;
    let (store, _) = store(&b, None).await;
    store.put_many(&[entity(1.0)]).await.expect("write v1");
    store.put_many(&[entity(2.0)]).await.expect("write v2");
    redis_forget(&b).await;
    let report = store.materialize().await.expect("materialize");
    assert_eq!((report.entities, report.written), (1, 1));
    assert_eq!(
        redis_x(&b).await,
        Some(2.0),
        "Redis lost it; the materialization put it back"
    );

    // A newer version than PostgreSQL's (as a write-through racing the materialization's read
    // would leave): the materialization must not put its older read over it.
    let client = redis::Client::open(b.redis.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let newer = EntityFeatures {
        features: [(
            "x".to_owned(),
            FeatureValue {
                kind: Some(Kind::Number(9.0)),
            },
        )]
        .into(),
        ..entity(0.0)
    };
    redis::pipe()
        .set(redis_key("cust-race"), newer.encode_to_vec())
        .set(mesh_features::store::redis_version_key("cust-race"), 99)
        .query_async::<()>(&mut conn)
        .await
        .expect("SET");
    let report = store.materialize().await.expect("materialize");
    assert_eq!((report.entities, report.written), (1, 0));
    assert_eq!(
        redis_x(&b).await,
        Some(9.0),
        "an older version overwrote a newer one"
    );
}

/// During a Redis failover every write-through fails and asks for a materialization: a burst of
/// such requests is served by one run after `REPAIR_GAP`, not one full run each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_failed_write_throughs_costs_one_materialization_not_one_each() {
    use mesh_features::store::materialize::REPAIR_GAP;
    let b = backends().await;
    let (store, metrics) = store(&b, None).await;
    let runs = || metrics.materializations.with_label_values(&["ok"]).get();
    let _task = store.spawn_materializer().expect("a Redis tier");
    let started = std::time::Instant::now();
    while runs() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no run at start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..20 {
        store.materialize_soon();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(runs(), 1, "held back: the start's run only, 1 s after it");
    tokio::time::sleep(REPAIR_GAP + Duration::from_secs(1)).await;
    assert_eq!(runs(), 2, "the twenty requests served by one run");
}
