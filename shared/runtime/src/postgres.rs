//! PostgreSQL: connection pools from a URL, and schema migrations applied at start.
//!
//! Migrations are numbered per component (`features`, `logger`) and recorded in
//! `mesh_schema_migrations`; each runs in its own transaction under an advisory lock, so two
//! replicas starting together apply each step once.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

/// One schema step.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Position in the component's sequence, from 1.
    pub version: i32,
    /// Short description, stored with the step.
    pub name: &'static str,
    /// The SQL, run as one transaction.
    pub sql: &'static str,
}

/// What can go wrong with the database.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The URL does not parse.
    #[error("database URL: {0}")]
    Url(String),
    /// The pool could not be built.
    #[error("database pool: {0}")]
    Pool(String),
    /// Getting a connection failed or timed out.
    #[error("database connection: {0}")]
    Connect(String),
    /// A statement failed.
    #[error("database: {0}")]
    Query(#[from] tokio_postgres::Error),
    /// No answer within the time allowed (PostgreSQL hung, or a lock was held too long).
    #[error("database: no answer within {0:?}")]
    TimedOut(Duration),
}

/// A pool of at most `max_size` connections to `url`; waiting for or opening a connection gives
/// up after `timeout`. Connections open lazily, so this succeeds while the database is down.
///
/// Every statement on these connections also runs under a server-side `statement_timeout` of
/// `timeout` (a slow query is cancelled by PostgreSQL itself), and TCP keepalives notice a
/// peer that vanished. Neither helps against a PostgreSQL that hangs without dying (a stopped
/// process enforces no timeout): callers bound each call on their side too, see [`bounded`].
pub fn pool(url: &str, max_size: usize, timeout: Duration) -> Result<Pool, PgError> {
    let mut config =
        tokio_postgres::Config::from_str(url).map_err(|e| PgError::Url(e.to_string()))?;
    config.connect_timeout(timeout);
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(10));
    let existing = config.get_options().unwrap_or_default().to_owned();
    config.options(format!(
        "{existing} -c statement_timeout={}",
        timeout.as_millis().max(1)
    ));
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .build()
        .map_err(|e| PgError::Pool(e.to_string()))
}

/// A connection from `pool`.
pub async fn connection(pool: &Pool) -> Result<deadpool_postgres::Object, PgError> {
    pool.get()
        .await
        .map_err(|e| PgError::Connect(e.to_string()))
}

/// `work` (getting a connection and running statements on it), given up after `limit`: a
/// PostgreSQL that hangs instead of failing costs a bounded wait, never an unbounded queue.
pub async fn bounded<T>(
    limit: Duration,
    work: impl std::future::Future<Output = Result<T, PgError>>,
) -> Result<T, PgError> {
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(PgError::TimedOut(limit)))
}

/// Applies the steps of `component` not yet recorded, in order.
pub async fn migrate(pool: &Pool, component: &str, steps: &[Migration]) -> Result<usize, PgError> {
    let mut client = connection(pool).await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS mesh_schema_migrations (
                component  text        NOT NULL,
                version    integer     NOT NULL,
                name       text        NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (component, version)
            )",
        )
        .await
        .or_else(ignore_concurrent_create)?;
    let mut applied = 0;
    for step in steps {
        let tx = client.transaction().await?;
        // Schema steps may take longer than a request's statement; waiting for another
        // replica's migration lock may too.
        tx.batch_execute("SET LOCAL statement_timeout = '120s'")
            .await?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&component])
            .await?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM mesh_schema_migrations WHERE component = $1 AND version = $2",
                &[&component, &step.version],
            )
            .await?
            .is_some();
        if done {
            tx.commit().await?;
            continue;
        }
        tx.batch_execute(step.sql).await?;
        tx.execute(
            "INSERT INTO mesh_schema_migrations (component, version, name) VALUES ($1, $2, $3)",
            &[&component, &step.version, &step.name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(
            component,
            version = step.version,
            name = step.name,
            "migration applied"
        );
        applied += 1;
    }
    Ok(applied)
}

/// Two services creating the bookkeeping table at once can race on the catalog; the loser's
/// error is harmless because the table exists afterwards.
fn ignore_concurrent_create(e: tokio_postgres::Error) -> Result<(), tokio_postgres::Error> {
    match e.code() {
        Some(code)
            if *code == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
                || *code == tokio_postgres::error::SqlState::DUPLICATE_TABLE =>
        {
            Ok(())
        }
        _ => Err(e),
    }
}

/// Migrates `component` on a background task, retrying every 500 ms while PostgreSQL is
/// unreachable, and reports SERVING on `health` once the schema is in place.
pub fn migrate_then_serve(
    pool: Pool,
    component: &'static str,
    steps: &'static [Migration],
    health: crate::Health,
) {
    tokio::spawn(async move {
        let mut attempt = 0u32;
        loop {
            match migrate(&pool, component, steps).await {
                Ok(_) => {
                    health.set_serving().await;
                    return;
                }
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, component, "schema migration failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
}
