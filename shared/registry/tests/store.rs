//! The registry against a real PostgreSQL: changes are checked, audited and seen by every
//! follower within a notification's time.

use std::time::{Duration, Instant};

use mesh_registry::{follow, Change, RegistryStore, StoreError};
use mesh_testkit::PostgresServer;

async fn store(pg: &PostgresServer) -> RegistryStore {
    let pool = mesh_runtime::postgres::pool(&pg.url(), 4, Duration::from_secs(2)).expect("pool");
    let store = RegistryStore::new(pool, Duration::from_secs(2));
    store.migrate().await.expect("migrate");
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_rollback_and_rollout_are_checked_audited_and_followed() {
    let pg = PostgresServer::start().expect("postgres");
    let store = store(&pg).await;
    assert!(store.seed("churn", "1").await.expect("seed"));
    assert!(
        !store.seed("churn", "9").await.expect("seed again"),
        "a seed never overwrites"
    );

    // Two followers, as two gateways would be.
    let interval = Duration::from_secs(30); // long: only a notification can be this quick
    let mut a = follow(store.clone(), pg.url(), interval);
    let mut b = follow(store.clone(), pg.url(), interval);
    for f in [&mut a, &mut b] {
        f.state
            .wait_for(|s| s.policy("churn").and_then(|p| p.production()) == Some("1"))
            .await
            .expect("first read");
    }

    let started = Instant::now();
    let none = serde_json::json!({});
    let (policy, audit) = store
        .apply(
            "churn",
            Change::SetAlias {
                alias: "production".into(),
                version: "2".into(),
            },
            "ops-1",
            "v2 passed review",
            none.clone(),
        )
        .await
        .expect("promote");
    assert_eq!(policy.production(), Some("2"));
    assert_eq!(policy.previous_production.as_deref(), Some("1"));
    assert_eq!(
        (audit.from_version.as_deref(), audit.to_version.as_deref()),
        (Some("1"), Some("2"))
    );
    for f in [&mut a, &mut b] {
        tokio::time::timeout(
            Duration::from_secs(2),
            f.state
                .wait_for(|s| s.policy("churn").and_then(|p| p.production()) == Some("2")),
        )
        .await
        .expect("followed within 2 s")
        .expect("follower alive");
    }
    let converged = started.elapsed();
    assert!(converged < Duration::from_secs(2), "{converged:?}");

    let (policy, _) = store
        .apply(
            "churn",
            Change::Rollback,
            "ops-2",
            "latency regression",
            none.clone(),
        )
        .await
        .expect("rollback");
    assert_eq!(policy.production(), Some("1"));

    let (policy, _) = store
        .apply(
            "churn",
            Change::SetRollout {
                candidate: "2".into(),
                percent: 10.0,
                promote_after_secs: None,
            },
            "ops-1",
            "canary",
            none.clone(),
        )
        .await
        .expect("rollout");
    assert_eq!(policy.rollout.as_ref().map(|r| r.percent), Some(10.0));
    for bad in [
        Change::SetRollout {
            candidate: "2".into(),
            percent: 101.0,
            promote_after_secs: None,
        },
        Change::SetRollout {
            candidate: "1".into(),
            percent: 5.0,
            promote_after_secs: None,
        },
        Change::SetRollout {
            candidate: "2".into(),
            percent: 5.0,
            promote_after_secs: Some(-1.0),
        },
        Change::PromoteCandidate {
            candidate: "3".into(),
        },
    ] {
        match store
            .apply("churn", bad.clone(), "ops-1", "x", none.clone())
            .await
        {
            Err(StoreError::Refused(message)) => assert!(!message.is_empty()),
            other => panic!("{bad:?} was not refused: {other:?}"),
        }
    }
    assert!(matches!(
        store
            .apply("nope", Change::Rollback, "ops-1", "x", none.clone())
            .await,
        Err(StoreError::UnknownModel(_))
    ));
    // Promoting the candidate ends its rollout.
    let (policy, _) = store
        .apply(
            "churn",
            Change::SetAlias {
                alias: "production".into(),
                version: "2".into(),
            },
            "ops-1",
            "canary healthy",
            none,
        )
        .await
        .expect("promote the candidate");
    assert_eq!(policy.rollout, None);

    let history = store.history(Some("churn"), 10).await.expect("history");
    let actions: Vec<&str> = history.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions,
        ["set_alias", "set_rollout", "rollback", "set_alias", "seed"]
    );
    assert_eq!(history[2].actor, "ops-2");
    assert_eq!(history[2].reason, "latency regression");
    assert!(
        history[2].details.contains("rollback"),
        "{}",
        history[2].details
    );
}
