//! The prediction log cannot fill the disk: `predictions` and `shadow_predictions` (by
//! `served_at`) and `prediction_rejects` (by `rejected_at`) are partitioned by UTC day
//! (migrations 3 and 4), and a
//! maintenance task, hourly, creates the partitions of the next [`DAYS_AHEAD`] days and drops
//! every partition whose rows are all older than the retention window
//! (`MESH_LOG_RETENTION_DAYS`). Dropping a partition frees its disk at once and costs no vacuum:
//! rows are never deleted one by one.
//!
//! A record whose day has no partition (served before the window, or more than
//! [`DAYS_AHEAD`] days in the future) is refused by PostgreSQL and kept in
//! `prediction_rejects` with that reason, like any record PostgreSQL refuses.
//!
//! Maintenance takes an advisory lock, so several loggers on one database do not race on the
//! catalog; a failed run (PostgreSQL down) is retried at the next tick and counted.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::Pool;
use mesh_runtime::postgres::{bounded, connection, PgError};
use prometheus::{Gauge, IntCounter, IntCounterVec, Opts, Registry};

/// Partitions created ahead of today, so a logger stopped for a few days (or a clock a little
/// ahead) still finds its records' partitions.
pub const DAYS_AHEAD: i32 = 3;

/// Autovacuum's cost delay, in milliseconds, of every partition (its default is 2): the
/// insert-only log is vacuumed and analyzed in the background at a fifth of the default I/O
/// rate. At the default, a vacuum of the day's partition after about 230,000 new rows took 3 s
/// and, in open-loop Predict runs at 3,500/s, the run's p99.9 was 17–39 ms (median 36.5)
/// against 16–21 ms (median 20) at 20 ms, where the vacuum took 16 s; in a 10-minute soak the
/// slowest seconds fell on autovacuum's runs over the log (README, Benchmark). Migration 5
/// gives it to the partitions made before it, and must match.
pub const VACUUM_COST_DELAY_MS: u32 = 20;

/// How often maintenance runs once it has succeeded; after a failure, [`RETRY`].
pub const EVERY: Duration = Duration::from_secs(3600);
/// How soon a failed maintenance run is tried again.
pub const RETRY: Duration = Duration::from_secs(30);

/// The partitioned tables and their partition keys.
const TABLES: &[(&str, &str)] = &[
    ("predictions", "served_at"),
    ("prediction_rejects", "rejected_at"),
    ("shadow_predictions", "served_at"),
];

/// What one maintenance run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Maintained {
    /// Partitions created.
    pub created: Vec<String>,
    /// Partitions dropped.
    pub dropped: Vec<String>,
}

/// Counters of maintenance.
#[derive(Clone)]
pub struct RetentionMetrics {
    partitions: IntCounterVec,
    errors: IntCounter,
    last_success: Gauge,
    database_bytes: Gauge,
}

impl RetentionMetrics {
    /// Registers `mesh_log_partitions_total{action}` (`created`, `dropped`),
    /// `mesh_log_maintenance_errors_total`, `mesh_log_maintenance_last_success_timestamp_seconds`
    /// and `mesh_log_database_bytes`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let partitions = IntCounterVec::new(
            Opts::new(
                "mesh_log_partitions_total",
                "Daily partitions of predictions, shadow_predictions and prediction_rejects, by action: \
                 created, dropped",
            ),
            &["action"],
        )?;
        for action in ["created", "dropped"] {
            partitions.with_label_values(&[action]);
        }
        let errors = IntCounter::new(
            "mesh_log_maintenance_errors_total",
            "Partition maintenance runs that failed (retried)",
        )?;
        let last_success = Gauge::new(
            "mesh_log_maintenance_last_success_timestamp_seconds",
            "When partition maintenance last succeeded (Unix time; 0 before the first success)",
        )?;
        let database_bytes = Gauge::new(
            "mesh_log_database_bytes",
            "Size of the logger's PostgreSQL database, measured at each maintenance run",
        )?;
        registry.register(Box::new(partitions.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(last_success.clone()))?;
        registry.register(Box::new(database_bytes.clone()))?;
        Ok(Self {
            partitions,
            errors,
            last_success,
            database_bytes,
        })
    }
}

/// Creates the partitions of the days up to [`DAYS_AHEAD`] after `now` (and none before the
/// window) and drops those entirely older than `keep_days` days before `now`, in one
/// transaction under an advisory lock.
pub async fn maintain(
    db: &Pool,
    now: SystemTime,
    keep_days: u32,
    limit: Duration,
) -> Result<Maintained, PgError> {
    let keep_days = i32::try_from(keep_days).unwrap_or(i32::MAX);
    let work = async {
        let mut client = connection(db).await?;
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('mesh-logger-retention'))",
            &[],
        )
        .await?;
        let mut done = Maintained::default();
        for (table, _key) in TABLES {
            let old = tx
                .query(
                    &format!(
                        "{PARTITIONS} SELECT name FROM parts
                         WHERE upper <= $2::timestamptz - make_interval(days => $3::int)
                         ORDER BY upper"
                    ),
                    &[table, &now, &keep_days],
                )
                .await?;
            for row in old {
                let name: String = row.get(0);
                tx.batch_execute(&format!("DROP TABLE {}", ident(&name)))
                    .await?;
                done.dropped.push(name);
            }
            let days = tx
                .query(
                    &format!(
                        "{PARTITIONS}, today AS (SELECT date_trunc('day', $2::timestamptz, 'UTC') AS t)
                         SELECT to_char(d AT TIME ZONE 'UTC', 'YYYYMMDD'),
                                to_char(d AT TIME ZONE 'UTC', 'YYYY-MM-DD'),
                                to_char((d + interval '1 day') AT TIME ZONE 'UTC', 'YYYY-MM-DD')
                         FROM today, generate_series(
                             greatest((SELECT max(upper) FROM parts),
                                      today.t - make_interval(days => $3::int)),
                             today.t + make_interval(days => {DAYS_AHEAD}),
                             interval '1 day') AS d"
                    ),
                    &[table, &now, &keep_days],
                )
                .await?;
            for row in days {
                let (suffix, from, to): (String, String, String) =
                    (row.get(0), row.get(1), row.get(2));
                let name = format!("{table}_p{suffix}");
                tx.batch_execute(&format!(
                    "CREATE TABLE {} PARTITION OF {table}
                     FOR VALUES FROM ('{from} 00:00:00+00') TO ('{to} 00:00:00+00')
                     WITH (autovacuum_vacuum_cost_delay = {VACUUM_COST_DELAY_MS})",
                    ident(&name)
                ))
                .await?;
                done.created.push(name);
            }
        }
        tx.commit().await?;
        Ok(done)
    };
    bounded(limit, work).await
}

/// The partitions of table `$1` and the exclusive upper bound of each (NULL for MAXVALUE).
const PARTITIONS: &str = "WITH parts AS (
        SELECT c.relname::text AS name,
               (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']+)''\\)'))[1]::timestamptz AS upper
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = $1::text::regclass
    )";

/// `name` quoted as an identifier. Names here are the tables' own and
/// `<table>_p<YYYYMMDD>`; anything else is refused rather than interpolated.
fn ident(name: &str) -> String {
    assert!(
        name.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
        "unexpected partition name {name:?}"
    );
    format!("\"{name}\"")
}

/// The schema version since which every table in [`TABLES`] exists, partitioned
/// ([`crate::MIGRATIONS`]).
const PARTITIONED_SINCE: i32 = 4;

/// Longest one maintenance run may take (it takes catalog locks; dropping is quick).
pub const LIMIT: Duration = Duration::from_secs(60);

/// Whether the migration that partitions the tables has been applied.
async fn schema_ready(db: &Pool) -> bool {
    let check = bounded(LIMIT, async {
        let client = connection(db).await?;
        let row = client
            .query_opt(
                "SELECT 1 FROM mesh_schema_migrations WHERE component = 'logger' AND version = $1",
                &[&PARTITIONED_SINCE],
            )
            .await?;
        Ok(row.is_some())
    });
    check.await.unwrap_or(false)
}

/// Waits for the schema to be partitioned, then runs [`maintain`] now and every [`EVERY`]
/// (every [`RETRY`] after a failure) until the task is dropped.
pub async fn run(db: Pool, keep_days: u32, metrics: RetentionMetrics) {
    while !schema_ready(&db).await {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let limit = LIMIT;
    loop {
        let wait = match maintain(&db, SystemTime::now(), keep_days, limit).await {
            Ok(done) => {
                let count = |action: &str, n: usize| {
                    metrics
                        .partitions
                        .with_label_values(&[action])
                        .inc_by(n as u64)
                };
                count("created", done.created.len());
                count("dropped", done.dropped.len());
                if !done.dropped.is_empty() || !done.created.is_empty() {
                    tracing::info!(created = ?done.created, dropped = ?done.dropped, keep_days, "prediction log partitions maintained");
                }
                let unix = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                metrics.last_success.set(unix);
                if let Ok(bytes) = database_bytes(&db, limit).await {
                    metrics.database_bytes.set(bytes as f64);
                }
                EVERY
            }
            Err(error) => {
                metrics.errors.inc();
                tracing::warn!(%error, retry_in = ?RETRY, "prediction log partition maintenance failed");
                RETRY
            }
        };
        tokio::time::sleep(wait).await;
    }
}

async fn database_bytes(db: &Pool, limit: Duration) -> Result<i64, PgError> {
    bounded(limit, async {
        let client = connection(db).await?;
        let row = client
            .query_one("SELECT pg_database_size(current_database())", &[])
            .await?;
        Ok(row.get(0))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MIGRATIONS;
    use mesh_runtime::postgres::{migrate, pool};
    use mesh_testkit::PostgresServer;

    const DAY: Duration = Duration::from_secs(86_400);

    async fn client(db: &Pool) -> deadpool_postgres::Object {
        connection(db).await.expect("connection")
    }

    /// Inserts a prediction served at `at` the way the writer does; the rows inserted.
    async fn insert(db: &Pool, id: &str, at: SystemTime) -> Result<u64, tokio_postgres::Error> {
        client(db)
            .await
            .execute(
                "INSERT INTO predictions (prediction_id, served_at, model, model_version, entity_id,
                                          features, score, latency_us, feature_tier, trace_id)
                 VALUES ($1, $2, 'churn', '1', 'cust-1', '{}', 0.5, 10, 'memory', '')
                 ON CONFLICT (prediction_id, served_at) DO NOTHING",
                &[&id, &at],
            )
            .await
    }

    async fn count(db: &Pool, sql: &str) -> i64 {
        client(db)
            .await
            .query_one(sql, &[])
            .await
            .expect(sql)
            .get(0)
    }

    /// A fresh PostgreSQL with the logger's first `version` migrations applied (keep the
    /// server: dropping it stops PostgreSQL).
    async fn log_migrated_to(version: usize) -> (PostgresServer, Pool) {
        let pg = PostgresServer::start().expect("postgres");
        let db = pool(&pg.url(), 2, Duration::from_secs(10)).expect("pool");
        migrate(&db, "logger", &MIGRATIONS[..version])
            .await
            .unwrap_or_else(|e| panic!("migrate 1-{version}: {e}"));
        (pg, db)
    }

    /// Leaf partitions of the three tables: (all, those with autovacuum's cost delay set to
    /// [`VACUUM_COST_DELAY_MS`]).
    async fn gentle_partitions(db: &Pool) -> (i64, i64) {
        let row = client(db)
            .await
            .query_one(
                &format!(
                    "SELECT count(*),
                            count(*) FILTER (WHERE c.reloptions @> ARRAY['autovacuum_vacuum_cost_delay={VACUUM_COST_DELAY_MS}'])
                     FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                     WHERE i.inhparent IN ('predictions'::regclass, 'prediction_rejects'::regclass,
                                           'shadow_predictions'::regclass)
                       AND c.relkind = 'r'"
                ),
                &[],
            )
            .await
            .expect("partitions");
        (row.get(0), row.get(1))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_partition_is_vacuumed_gently_those_made_before_and_after_migration_5() {
        // A log partitioned before migration 5, with partitions that maintenance made then.
        let (_pg, db) = log_migrated_to(4).await;
        let now = SystemTime::now();
        client(&db)
            .await
            .batch_execute(
                "DO $$
                 DECLARE tomorrow timestamptz := date_trunc('day', now(), 'UTC') + interval '1 day';
                 BEGIN
                     EXECUTE format('CREATE TABLE predictions_old_day PARTITION OF predictions
                                     FOR VALUES FROM (%L) TO (%L)',
                                    tomorrow, tomorrow + interval '1 day');
                 END $$;",
            )
            .await
            .expect("a partition made before migration 5");
        assert_eq!(gentle_partitions(&db).await, (4, 0));
        migrate(&db, "logger", MIGRATIONS).await.expect("migrate 5");
        assert_eq!(gentle_partitions(&db).await, (4, 4), "migration 5");
        // Partitions made from now on carry it too.
        let done = maintain(&db, now, 30, LIMIT).await.expect("maintain");
        let made = 4 + done.created.len() as i64;
        assert!(
            done.created.iter().any(|p| p.starts_with("predictions_p")),
            "{done:?}"
        );
        assert_eq!(gentle_partitions(&db).await, (made, made), "{done:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn old_partitions_are_dropped_whole_and_recent_data_is_untouched() {
        // A log from before partitioning, with a record and a reject.
        let (_pg, db) = log_migrated_to(2).await;
        let now = SystemTime::now();
        // Before partitioning the unique key was prediction_id alone.
        client(&db)
            .await
            .execute(
                "INSERT INTO predictions (prediction_id, served_at, model, model_version, entity_id,
                                          features, score, latency_us, feature_tier, trace_id)
                 VALUES ('before', $1, 'churn', '1', 'cust-1', '{}', 0.5, 10, 'memory', '')",
                &[&(now - DAY)],
            )
            .await
            .expect("insert before partitioning");
        client(&db)
            .await
            .execute(
                "INSERT INTO prediction_rejects (prediction_id, reason, record) VALUES ('r', 'x', '')",
                &[],
            )
            .await
            .expect("reject");

        // Partitioning keeps it (as the legacy partition) and the insert stays idempotent.
        migrate(&db, "logger", MIGRATIONS).await.expect("migrate 3");
        assert_eq!(count(&db, "SELECT count(*) FROM predictions").await, 1);
        assert_eq!(
            count(&db, "SELECT count(*) FROM prediction_rejects").await,
            1
        );
        assert_eq!(insert(&db, "before", now - DAY).await.expect("again"), 0);
        assert_eq!(
            count(&db, "SELECT count(*) FROM ONLY predictions_legacy").await,
            1
        );

        // Today: partitions for the days ahead, nothing dropped.
        let done = maintain(&db, now, 30, LIMIT).await.expect("maintain");
        assert!(done.dropped.is_empty(), "{done:?}");
        assert_eq!(
            done.created.len(),
            TABLES.len() * DAYS_AHEAD as usize,
            "{done:?}"
        );
        assert_eq!(insert(&db, "ahead", now + 2 * DAY).await.expect("ahead"), 1);
        // A second run the same day changes nothing.
        assert_eq!(
            maintain(&db, now, 30, LIMIT).await.expect("again"),
            Maintained::default()
        );

        // 35 days later: everything up to 5 days after `now` is past the 30-day window.
        let later = now + 35 * DAY;
        let done = maintain(&db, later, 30, LIMIT).await.expect("later");
        assert!(
            done.dropped.contains(&"predictions_legacy".to_owned())
                && done
                    .dropped
                    .contains(&"prediction_rejects_legacy".to_owned())
                && done
                    .dropped
                    .contains(&"shadow_predictions_legacy".to_owned()),
            "{done:?}"
        );
        assert_eq!(
            done.dropped.len(),
            TABLES.len() * (1 + DAYS_AHEAD as usize),
            "{done:?}"
        );
        assert_eq!(count(&db, "SELECT count(*) FROM predictions").await, 0);
        assert_eq!(
            count(&db, "SELECT count(*) FROM prediction_rejects").await,
            0
        );

        // Recent data, written and read around the next drop, is untouched by it.
        for i in 0..50 {
            let at = later - DAY + Duration::from_secs(i * 60);
            assert_eq!(
                insert(&db, &format!("recent-{i}"), at)
                    .await
                    .expect("recent"),
                1
            );
        }
        let done = maintain(&db, later + DAY, 30, LIMIT)
            .await
            .expect("next day");
        assert_eq!(
            done.dropped.len(),
            TABLES.len(),
            "one day of each table: {done:?}"
        );
        let recent = "SELECT count(*) FROM predictions WHERE model = 'churn' AND served_at > now() + interval '30 days'";
        assert_eq!(count(&db, recent).await, 50);
        let one: i64 = client(&db)
            .await
            .query_one(
                "SELECT count(*) FROM predictions WHERE prediction_id = 'recent-7'",
                &[],
            )
            .await
            .expect("by id")
            .get(0);
        assert_eq!(one, 1);

        // A record older than the window has no partition: PostgreSQL refuses it (class 23,
        // which the writer stores in prediction_rejects with the reason).
        let refused = insert(&db, "too-old", now).await.expect_err("no partition");
        let code = refused.code().expect("SQLSTATE").code().to_owned();
        assert!(code.starts_with("23"), "{code}: {refused}");
    }
}
