//! The audit log is bounded: against a real PostgreSQL, records older than the retention
//! window are deleted (in batches: more old rows than one batch holds), recent ones stay and
//! are still read by `history`.

use std::time::Duration;

use mesh_registry::retention::BATCH;
use mesh_registry::{Change, RegistryStore};
use mesh_testkit::PostgresServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_audit_records_go_and_recent_ones_stay() {
    let pg = PostgresServer::start().expect("postgres");
    let pool = mesh_runtime::postgres::pool(&pg.url(), 2, Duration::from_secs(5)).expect("pool");
    let store = RegistryStore::new(pool, Duration::from_secs(5));
    store.migrate().await.expect("migrate");
    assert!(store.seed("churn", "1").await.expect("seed"));
    store
        .apply(
            "churn",
            Change::SetShadow {
                version: "2".into(),
            },
            "ops-1",
            "compare v2",
            serde_json::json!({}),
        )
        .await
        .expect("a recent change");

    // Old records, as a mesh running for years would have: 2.5 batches 400 to 900 days old,
    // and one just inside a 365-day window.
    let old = BATCH * 5 / 2;
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
        .execute(
            "INSERT INTO model_audit (at, actor, model, action, reason)
             SELECT now() - make_interval(days => (400 + i % 500)::int), 'ops-old', 'churn', 'set_alias', 'old'
             FROM generate_series(1, $1::int8) AS i",
            &[&old],
        )
        .await
        .expect("old rows");
    client
        .execute(
            "INSERT INTO model_audit (at, actor, model, action, reason)
             VALUES (now() - make_interval(days => 364), 'ops-edge', 'churn', 'set_alias', 'inside')",
            &[],
        )
        .await
        .expect("edge row");
    let count = |sql: &'static str| {
        let client = &client;
        async move {
            let row = client.query_one(sql, &[]).await.expect("count");
            row.get::<_, i64>(0)
        }
    };
    assert_eq!(count("SELECT count(*) FROM model_audit").await, old + 3);

    let deleted = store.trim_audit(365).await.expect("trim");
    assert_eq!(deleted, old as u64, "every record older than 365 days");
    assert_eq!(
        count("SELECT count(*) FROM model_audit WHERE actor = 'ops-old'").await,
        0
    );
    let history = store.history(Some("churn"), 10).await.expect("history");
    let reasons: Vec<&str> = history.iter().map(|r| r.reason.as_str()).collect();
    assert_eq!(
        reasons,
        [
            "inside",
            "compare v2",
            "first start: production from aliases.json"
        ],
        "the recent records stay, newest first"
    );
    assert_eq!(
        store.trim_audit(365).await.expect("trim again"),
        0,
        "nothing more to delete"
    );
}
