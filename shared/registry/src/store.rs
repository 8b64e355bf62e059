//! Reading the registry, and changing it: every change is one transaction that locks the
//! model's row, checks the change against the current policy, writes the new policy and its
//! audit record, and notifies followers.

use std::collections::BTreeMap;
use std::time::Duration;

use deadpool_postgres::Pool;
use mesh_runtime::postgres::{bounded, connection, PgError};
use serde::Serialize;

use crate::change::changed;
pub use crate::change::Change;
use crate::policy::{Policy, RegistryState, Rollout, PRODUCTION};
use crate::schema::CHANNEL;

/// One audited change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    /// Sequence number.
    pub id: i64,
    /// When, in Unix microseconds.
    pub at_unix_micros: i64,
    /// Who: an admin key's id, or `mesh` for the mesh's own actions.
    pub actor: String,
    /// The model.
    pub model: String,
    /// What (`set_alias`, `rollback`, ...).
    pub action: String,
    /// The version before, where it applies.
    pub from_version: Option<String>,
    /// The version after, where it applies.
    pub to_version: Option<String>,
    /// Why, as the actor said.
    pub reason: String,
    /// The change itself and any figures behind it, as JSON.
    pub details: String,
}

/// Why a change or a read failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed or did not answer.
    #[error("{0}")]
    Database(#[from] PgError),
    /// No policy for the model.
    #[error("no model {0:?} in the registry")]
    UnknownModel(String),
    /// The change does not apply to the current policy; the message says why.
    #[error("{0}")]
    Refused(String),
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Database(PgError::Query(e))
    }
}

/// The registry in PostgreSQL.
#[derive(Clone)]
pub struct RegistryStore {
    pool: Pool,
    limit: Duration,
}

const POLICY_COLUMNS: &str =
    "model, aliases::text, previous_production, candidate, candidate_percent, shadow, generation,
     promote_after_secs, coalesce((extract(epoch FROM rollout_since) * 1e6)::int8, 0)";

fn policy_of(row: &tokio_postgres::Row) -> Result<Policy, StoreError> {
    let aliases: String = row.get(1);
    let aliases: BTreeMap<String, String> = serde_json::from_str(&aliases)
        .map_err(|e| StoreError::Refused(format!("stored aliases are not a map: {e}")))?;
    let candidate: Option<String> = row.get(3);
    let percent: f64 = row.get(4);
    Ok(Policy {
        model: row.get(0),
        aliases,
        previous_production: row.get(2),
        rollout: candidate.map(|candidate| Rollout {
            candidate,
            percent,
            promote_after_secs: row.get(7),
            since_unix_micros: row.get(8),
        }),
        shadow: row.get(5),
        generation: row.get(6),
    })
}

impl RegistryStore {
    /// The registry in `pool`'s database; every read or change gives up after `limit`.
    pub fn new(pool: Pool, limit: Duration) -> Self {
        Self { pool, limit }
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    pub(crate) fn limit(&self) -> Duration {
        self.limit
    }

    /// Applies the registry's schema steps.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        mesh_runtime::postgres::migrate(&self.pool, "registry", crate::schema::MIGRATIONS).await?;
        Ok(())
    }

    /// Every model's policy.
    pub async fn read(&self) -> Result<RegistryState, StoreError> {
        bounded(self.limit, async {
            let client = connection(&self.pool).await?;
            let rows = client
                .query(&format!("SELECT {POLICY_COLUMNS} FROM model_policies"), &[])
                .await?;
            Ok(rows)
        })
        .await?
        .iter()
        .map(|row| policy_of(row).map(|p| (p.model.clone(), p)))
        .collect::<Result<_, _>>()
        .map(|policies| RegistryState { policies })
    }

    /// Creates `model`'s policy with `production` if it has none (the first start of a mesh
    /// reads it from `models/<name>/aliases.json`); returns whether it did.
    pub async fn seed(&self, model: &str, production: &str) -> Result<bool, StoreError> {
        let aliases = serde_json::json!({ PRODUCTION: production }).to_string();
        let limit = self.limit;
        bounded(limit, async {
            let mut client = connection(&self.pool).await?;
            let tx = client.transaction().await?;
            let created = tx
                .execute(
                    "INSERT INTO model_policies (model, aliases) VALUES ($1, $2::text::jsonb)
                     ON CONFLICT (model) DO NOTHING",
                    &[&model, &aliases],
                )
                .await?
                == 1;
            if created {
                tx.execute(
                    "INSERT INTO model_audit (actor, model, action, to_version, reason)
                     VALUES ('mesh', $1, 'seed', $2, 'first start: production from aliases.json')",
                    &[&model, &production],
                )
                .await?;
                tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &model])
                    .await?;
            }
            tx.commit().await?;
            Ok(created)
        })
        .await
        .map_err(StoreError::from)
    }

    /// Applies `change` to `model`'s policy as `actor` for `reason`, with `details` (figures
    /// behind an automatic change) kept in the audit record. Returns the new policy and the
    /// audit record.
    pub async fn apply(
        &self,
        model: &str,
        change: Change,
        actor: &str,
        reason: &str,
        details: serde_json::Value,
    ) -> Result<(Policy, AuditRecord), StoreError> {
        let limit = self.limit;
        let work = async {
            let mut client = connection(&self.pool).await.map_err(StoreError::from)?;
            let tx = client.transaction().await?;
            let row = tx
                .query_opt(
                    &format!(
                        "SELECT {POLICY_COLUMNS} FROM model_policies WHERE model = $1 FOR UPDATE"
                    ),
                    &[&model],
                )
                .await?
                .ok_or_else(|| StoreError::UnknownModel(model.to_owned()))?;
            let before = policy_of(&row)?;
            let (after, from, to) = changed(&before, &change)?;
            let (id, at_unix_micros, details) = record_change(
                &tx,
                model,
                &after,
                &change,
                actor,
                reason,
                details,
                (&from, &to),
            )
            .await?;
            tx.commit().await?;
            let record = AuditRecord {
                id,
                at_unix_micros,
                actor: actor.to_owned(),
                model: model.to_owned(),
                action: change.action().to_owned(),
                from_version: from,
                to_version: to,
                reason: reason.to_owned(),
                details,
            };
            let after = Policy {
                generation: before.generation + 1,
                ..after
            };
            Ok::<_, StoreError>((after, record))
        };
        match tokio::time::timeout(limit, work).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Database(PgError::TimedOut(limit))),
        }
    }

    /// The newest `limit` audit records, of `model` or of all models.
    pub async fn history(
        &self,
        model: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = bounded(self.limit, async {
            let client = connection(&self.pool).await?;
            Ok(client
                .query(
                    "SELECT id, (extract(epoch FROM at) * 1e6)::int8, actor, model, action,
                            from_version, to_version, reason, details::text
                     FROM model_audit WHERE $1::text IS NULL OR model = $1
                     ORDER BY id DESC LIMIT $2",
                    &[&model, &limit],
                )
                .await?)
        })
        .await?;
        Ok(rows
            .iter()
            .map(|r| AuditRecord {
                id: r.get(0),
                at_unix_micros: r.get(1),
                actor: r.get(2),
                model: r.get(3),
                action: r.get(4),
                from_version: r.get(5),
                to_version: r.get(6),
                reason: r.get(7),
                details: r.get(8),
            })
            .collect())
    }
}

/// Writes `after` as `model`'s policy and the audit record of `change`; returns the record's
/// id, time and details as stored.
#[allow(clippy::too_many_arguments)]
async fn record_change(
    tx: &deadpool_postgres::Transaction<'_>,
    model: &str,
    after: &Policy,
    change: &Change,
    actor: &str,
    reason: &str,
    mut details: serde_json::Value,
    (from, to): (&Option<String>, &Option<String>),
) -> Result<(i64, i64, String), StoreError> {
    let aliases =
        serde_json::to_string(&after.aliases).map_err(|e| StoreError::Refused(e.to_string()))?;
    let (candidate, percent, bake, since) = match &after.rollout {
        Some(r) => (
            Some(r.candidate.clone()),
            r.percent,
            r.promote_after_secs,
            Some(r.since_unix_micros),
        ),
        None => (None, 0.0, None, None),
    };
    tx.execute(
        "UPDATE model_policies SET aliases = $2::text::jsonb, previous_production = $3,
                candidate = $4, candidate_percent = $5, shadow = $6,
                promote_after_secs = $7, rollout_since = to_timestamp($8::int8 / 1e6),
                generation = generation + 1, updated_at = now()
         WHERE model = $1",
        &[
            &model,
            &aliases,
            &after.previous_production,
            &candidate,
            &percent,
            &after.shadow,
            &bake,
            &since,
        ],
    )
    .await?;
    if let serde_json::Value::Object(map) = &mut details {
        map.insert(
            "change".into(),
            serde_json::to_value(change).unwrap_or_default(),
        );
    }
    let details = details.to_string();
    let audit = tx
        .query_one(
            "INSERT INTO model_audit (actor, model, action, from_version, to_version, reason, details)
             VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb)
             RETURNING id, (extract(epoch FROM at) * 1e6)::int8",
            &[&actor, &model, &change.action(), from, to, &reason, &details],
        )
        .await?;
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &model])
        .await?;
    Ok((audit.get(0), audit.get(1), details))
}

/// Migrates the registry and seeds every model's production from the disk, retrying every
/// 500 ms while PostgreSQL is unreachable (a service starts before its database).
pub async fn prepare(store: &RegistryStore, seeds: &[(String, String)]) {
    let mut attempt = 0u32;
    loop {
        let result = async {
            store.migrate().await?;
            for (model, production) in seeds {
                if store.seed(model, production).await? {
                    tracing::info!(%model, %production, "model registry seeded from aliases.json");
                }
            }
            Ok::<_, StoreError>(())
        }
        .await;
        match result {
            Ok(()) => return,
            Err(error) => {
                attempt += 1;
                tracing::warn!(%error, attempt, "model registry not ready; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
