//! Writing one batch to PostgreSQL so that no record can stop the line.
//!
//! A batch goes in as one `INSERT … SELECT FROM UNNEST`. When PostgreSQL *refuses* it (a data
//! error: a value it cannot represent, a constraint), the batch is split in halves and each half
//! tried again, down to single records: the good records commit, and each refused record is
//! stored in `prediction_rejects` with PostgreSQL's reason. When PostgreSQL is *down* (no
//! connection, a timeout, a hung server), the same statement is retried with capped back-off;
//! every attempt is bounded in time, so a hung database costs a bounded wait per attempt.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool_postgres::Pool;
use mesh_proto::logger::PredictionRecord;
use mesh_proto::types::{feature_value::Kind, FeatureTier};
use mesh_runtime::postgres::{bounded, connection, PgError};
use prost::Message as _;
use tokio_postgres::error::SqlState;
use tracing::Instrument as _;

use super::WriterMetrics;

/// A record that will not be stored in `predictions`, and why.
#[derive(Debug, Clone)]
pub struct Reject {
    /// The record as it arrived.
    pub record: PredictionRecord,
    /// Why it was refused (validation, or PostgreSQL's own message).
    pub reason: String,
}

/// Why a statement did not commit.
#[derive(Debug)]
enum WriteError {
    /// PostgreSQL refused the data: the same rows will be refused again.
    Refused(String),
    /// PostgreSQL did not answer, or failed for a reason unrelated to the rows.
    Down(String),
}

impl From<PgError> for WriteError {
    fn from(e: PgError) -> Self {
        match &e {
            PgError::Query(db) if refuses_data(db) => WriteError::Refused(
                db.as_db_error()
                    .map(|d| d.message().to_owned())
                    .unwrap_or_else(|| db.to_string()),
            ),
            _ => WriteError::Down(e.to_string()),
        }
    }
}

/// Whether `e` is PostgreSQL refusing the rows themselves: SQLSTATE class 22 (data exception,
/// e.g. a timestamp out of range or an untranslatable character), 23 (integrity constraint) or
/// 54 (program limit exceeded, e.g. a value too large). A statement timeout (57014) is not:
/// it says the server is slow, not that the rows are bad.
fn refuses_data(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|code| {
        *code != SqlState::QUERY_CANCELED
            && matches!(code.code().get(..2), Some("22") | Some("23") | Some("54"))
    })
}

/// Writes `records` (predictions to `predictions`, shadow predictions to `shadow_predictions`);
/// returns the positions PostgreSQL refused, each with its reason. Retries while the database
/// is down (raising `store_down` meanwhile), so it returns only once every record is either
/// committed or refused.
pub async fn write_predictions(
    db: &Pool,
    records: &[PredictionRecord],
    limit: Duration,
    metrics: &WriterMetrics,
    store_down: &AtomicBool,
) -> Vec<(usize, String)> {
    // Positions in `records`, primaries first: each range below holds one kind only.
    let (primaries, shadows): (Vec<usize>, Vec<usize>) =
        (0..records.len()).partition(|&i| records[i].shadow_of.is_empty());
    let split = primaries.len();
    let order: Vec<usize> = primaries.into_iter().chain(shadows).collect();
    let mut refused = Vec::new();
    let mut pending: Vec<Range<usize>> = Vec::with_capacity(16);
    pending.push(split..order.len());
    pending.push(0..split);
    while let Some(range) = pending.pop() {
        if range.is_empty() {
            continue;
        }
        let part: Vec<&PredictionRecord> =
            order[range.clone()].iter().map(|&i| &records[i]).collect();
        let table = if range.start < split {
            Table::Predictions
        } else {
            Table::Shadows
        };
        let result = until_answered(store_down, metrics, table.name(), || async {
            let timer = metrics.batch_seconds.start_timer();
            let result = insert_predictions(db, &part, table, limit).await;
            if result.is_ok() {
                timer.observe_duration();
            } else {
                timer.stop_and_discard();
            }
            result
        })
        .await;
        match result {
            Ok(inserted) => metrics.written.inc_by(inserted),
            Err(reason) if range.len() == 1 => refused.push((order[range.start], reason)),
            Err(reason) => {
                tracing::warn!(records = range.len(), %reason, "PostgreSQL refused a batch; splitting it to find the records it refuses");
                let middle = range.start + range.len() / 2;
                pending.push(middle..range.end);
                pending.push(range.start..middle);
            }
        }
    }
    refused
}

/// Where a record goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    /// What a caller received.
    Predictions,
    /// What a shadow version scored (the record names its primary in `shadow_of`).
    Shadows,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Predictions => "predictions",
            Table::Shadows => "shadow_predictions",
        }
    }
}

/// Stores `rejects` in `prediction_rejects`, retrying while the database is down. A reject the
/// table itself refuses (it takes any text and bytes, so this means a bug) is logged with its
/// record and counted in `mesh_log_rejects_unstorable_total`.
pub async fn write_rejects(
    db: &Pool,
    rejects: &[Reject],
    limit: Duration,
    metrics: &WriterMetrics,
    store_down: &AtomicBool,
) {
    if rejects.is_empty() {
        return;
    }
    let result = until_answered(store_down, metrics, "prediction_rejects", || {
        insert_rejects(db, rejects, limit)
    })
    .await;
    match result {
        Ok(_) => {}
        Err(reason) => {
            metrics.unstorable.inc_by(rejects.len() as u64);
            for reject in rejects {
                tracing::error!(%reason, prediction_id = %reject.record.prediction_id, record = ?reject.record, "a rejected record could not be stored in prediction_rejects either");
            }
        }
    }
}

/// Runs `attempt` until PostgreSQL answers: `Ok`, or `Err` with its reason for refusing the
/// rows. While it does not answer, waits with capped exponential back-off and keeps
/// `store_down` raised so new calls are refused at once instead of queueing.
async fn until_answered<T, F, Fut>(
    store_down: &AtomicBool,
    metrics: &WriterMetrics,
    table: &'static str,
    mut attempt: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, WriteError>>,
{
    let mut backoff = Duration::from_millis(50);
    loop {
        match attempt().await {
            Ok(value) => {
                store_down.store(false, Ordering::Relaxed);
                return Ok(value);
            }
            Err(WriteError::Refused(reason)) => {
                store_down.store(false, Ordering::Relaxed);
                return Err(reason);
            }
            Err(WriteError::Down(error)) => {
                metrics.write_errors.inc();
                store_down.store(true, Ordering::Relaxed);
                tracing::warn!(%error, table, retry_in = ?backoff, "prediction log write failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn tier_name(tier: i32) -> &'static str {
    match FeatureTier::try_from(tier).unwrap_or(FeatureTier::Unspecified) {
        FeatureTier::Memory => "memory",
        FeatureTier::Redis => "redis",
        FeatureTier::Database => "database",
        FeatureTier::Request => "request",
        FeatureTier::Unspecified => "unspecified",
    }
}

/// The record's features as a JSON object: numbers as numbers, categories as strings.
pub fn features_json(record: &PredictionRecord) -> String {
    let mut map = serde_json::Map::new();
    for (name, value) in &record.features {
        let json = match &value.kind {
            Some(Kind::Number(n)) => serde_json::Number::from_f64(*n)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Some(Kind::Category(c)) => serde_json::Value::String(c.clone()),
            None => serde_json::Value::Null,
        };
        map.insert(name.clone(), json);
    }
    serde_json::Value::Object(map).to_string()
}

/// Inserts `batch` (all of one kind) into `table` in one statement; returns how many rows
/// were new.
async fn insert_predictions(
    db: &Pool,
    batch: &[&PredictionRecord],
    table: Table,
    limit: Duration,
) -> Result<u64, WriteError> {
    let span = mesh_telemetry::propagation::store_span(
        "postgresql",
        match table {
            Table::Predictions => "INSERT predictions",
            Table::Shadows => "INSERT shadow_predictions",
        },
        batch.len(),
    );
    let ids: Vec<&str> = batch.iter().map(|r| r.prediction_id.as_str()).collect();
    let times: Vec<i64> = batch.iter().map(|r| r.time_unix_micros).collect();
    let models: Vec<&str> = batch.iter().map(|r| r.model.as_str()).collect();
    let versions: Vec<&str> = batch.iter().map(|r| r.model_version.as_str()).collect();
    let entities: Vec<&str> = batch.iter().map(|r| r.entity_id.as_str()).collect();
    let scores: Vec<f64> = batch.iter().map(|r| r.score).collect();
    // Validation refused latencies beyond i64 before they got here.
    let latencies: Vec<i64> = batch
        .iter()
        .map(|r| i64::try_from(r.latency_micros).unwrap_or(i64::MAX))
        .collect();
    let traces: Vec<&str> = batch.iter().map(|r| r.trace_id.as_str()).collect();
    // The column only one kind has: features and tier for a prediction, its primary for a shadow.
    let (extra, tiers): (Vec<String>, Vec<&str>) = match table {
        Table::Predictions => batch
            .iter()
            .map(|r| (features_json(r), tier_name(r.feature_tier)))
            .unzip(),
        Table::Shadows => (
            batch.iter().map(|r| r.shadow_of.clone()).collect(),
            Vec::new(),
        ),
    };
    let work = async {
        let client = connection(db).await?;
        let common: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
            &ids, &times, &models, &versions, &entities, &scores, &latencies, &traces, &extra,
        ];
        let inserted = match table {
            Table::Predictions => {
                let stmt = client.prepare_cached(INSERT_PREDICTIONS).await?;
                let mut params = common.to_vec();
                params.push(&tiers);
                client.execute(&stmt, &params).await?
            }
            Table::Shadows => {
                let stmt = client.prepare_cached(INSERT_SHADOWS).await?;
                client.execute(&stmt, &common).await?
            }
        };
        Ok(inserted)
    };
    bounded(limit, work)
        .instrument(span)
        .await
        .map_err(WriteError::from)
}

/// Parameters: ids, serve times (µs), models, versions, entities, scores, latencies (µs),
/// trace ids, features (JSON text), tiers.
const INSERT_PREDICTIONS: &str =
    "INSERT INTO predictions (prediction_id, served_at, model, model_version, entity_id,
                              score, latency_us, trace_id, features, feature_tier)
     SELECT id, to_timestamp(t::double precision / 1e6), m, v, e, s, l, tr, f::jsonb, tier
     FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::float8[],
                 $7::int8[], $8::text[], $9::text[], $10::text[])
          AS x(id, t, m, v, e, s, l, tr, f, tier)
     ON CONFLICT (prediction_id, served_at) DO NOTHING";

/// Parameters: as [`INSERT_PREDICTIONS`]' first eight, then the primaries' ids.
const INSERT_SHADOWS: &str =
    "INSERT INTO shadow_predictions (prediction_id, served_at, model, model_version, entity_id,
                                     score, latency_us, trace_id, primary_id)
     SELECT id, to_timestamp(t::double precision / 1e6), m, v, e, s, l, tr, p
     FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::float8[],
                 $7::int8[], $8::text[], $9::text[])
          AS x(id, t, m, v, e, s, l, tr, p)
     ON CONFLICT (prediction_id, served_at) DO NOTHING";

/// Inserts `rejects` into `prediction_rejects` in one statement.
async fn insert_rejects(db: &Pool, rejects: &[Reject], limit: Duration) -> Result<u64, WriteError> {
    let span = mesh_telemetry::propagation::store_span(
        "postgresql",
        "INSERT prediction_rejects",
        rejects.len(),
    );
    // Text columns cannot hold NUL; the record bytes keep the original exactly.
    let ids: Vec<String> = rejects
        .iter()
        .map(|r| r.record.prediction_id.replace('\0', "\u{FFFD}"))
        .collect();
    let reasons: Vec<String> = rejects
        .iter()
        .map(|r| r.reason.replace('\0', "\u{FFFD}"))
        .collect();
    let records: Vec<Vec<u8>> = rejects.iter().map(|r| r.record.encode_to_vec()).collect();
    let work = async {
        let client = connection(db).await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO prediction_rejects (prediction_id, reason, record)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[])",
            )
            .await?;
        Ok(client.execute(&stmt, &[&ids, &reasons, &records]).await?)
    };
    bounded(limit, work)
        .instrument(span)
        .await
        .map_err(WriteError::from)
}
