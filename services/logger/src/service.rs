//! The `mesh.logger.v1.PredictionLog` handlers.

use deadpool_postgres::Pool;
use mesh_proto::logger::prediction_log_server::PredictionLog;
use mesh_proto::logger::{GetPredictionRequest, PredictionRecord, RecordRequest, RecordResponse};
use mesh_proto::types::{feature_value::Kind, FeatureTier, FeatureValue};
use tonic::{Request, Response, Status};

use crate::error::LoggerError;
use crate::writer::{Committed, LogQueue, Refused, Reject};

/// Most records one Record call may carry.
pub const MAX_RECORDS_PER_CALL: usize = 10_000;

/// The gRPC service.
pub struct PredictionLogService {
    queue: LogQueue,
    db: Pool,
}

impl PredictionLogService {
    /// A service queueing into `queue` and reading back from `db`.
    pub fn new(queue: LogQueue, db: Pool) -> Self {
        Self { queue, db }
    }
}

/// Most bytes in one id (prediction, entity, trace) or in the model name or version.
pub const MAX_ID_BYTES: usize = 512;

/// Served-at times PostgreSQL can store and a prediction can plausibly have: from 1970 up to
/// the year 10000 (exclusive), in Unix microseconds.
const TIME_RANGE: std::ops::Range<i64> = 0..253_402_300_800_000_000;

fn check_call(records: &[PredictionRecord]) -> Result<(), LoggerError> {
    if records.len() > MAX_RECORDS_PER_CALL {
        return Err(LoggerError::InvalidArgument(format!(
            "{} records in one call; the limit is {MAX_RECORDS_PER_CALL}",
            records.len()
        )));
    }
    Ok(())
}

/// What is wrong with `r`, if anything: the reason it goes to the rejects table.
pub fn problem(r: &PredictionRecord) -> Option<String> {
    let missing: Vec<&str> = [
        ("prediction_id", r.prediction_id.is_empty()),
        ("model", r.model.is_empty()),
        ("model_version", r.model_version.is_empty()),
    ]
    .into_iter()
    .filter(|(_, empty)| *empty)
    .map(|(name, _)| name)
    .collect();
    if !missing.is_empty() {
        return Some(format!("lacks {}", missing.join(", ")));
    }
    let long: Vec<&str> = [
        ("prediction_id", &r.prediction_id),
        ("model", &r.model),
        ("model_version", &r.model_version),
        ("entity_id", &r.entity_id),
        ("trace_id", &r.trace_id),
        ("shadow_of", &r.shadow_of),
    ]
    .into_iter()
    .filter(|(_, value)| value.len() > MAX_ID_BYTES)
    .map(|(name, _)| name)
    .collect();
    if !long.is_empty() {
        return Some(format!(
            "{} longer than {MAX_ID_BYTES} bytes",
            long.join(", ")
        ));
    }
    if !r.shadow_of.is_empty() && r.shadow_of == r.prediction_id {
        return Some("shadow_of names the record itself".into());
    }
    if !r.score.is_finite() {
        return Some(format!("score {} is not a finite number", r.score));
    }
    if !TIME_RANGE.contains(&r.time_unix_micros) {
        return Some(format!(
            "time_unix_micros {} is outside 1970-01-01..10000-01-01",
            r.time_unix_micros
        ));
    }
    if i64::try_from(r.latency_micros).is_err() {
        return Some(format!("latency_micros {} is too large", r.latency_micros));
    }
    None
}

/// Splits `records` into those to store and those refused by [`problem`].
fn sort_out(records: Vec<PredictionRecord>) -> (Vec<PredictionRecord>, Vec<Reject>) {
    let mut good = Vec::with_capacity(records.len());
    let mut rejects = Vec::new();
    for record in records {
        match problem(&record) {
            None => good.push(record),
            Some(reason) => {
                tracing::info!(prediction_id = %record.prediction_id, %reason, "invalid prediction record; stored in prediction_rejects");
                rejects.push(Reject { record, reason });
            }
        }
    }
    (good, rejects)
}

/// Replaces NUL characters, which PostgreSQL cannot store in text or jsonb, with U+FFFD. The
/// gateway never sends them (it refuses control characters in ids and categories); a record
/// from elsewhere must not become a batch that can never be written, blocking all behind it.
fn make_storable(record: &mut PredictionRecord) {
    fn clean(s: &mut String) {
        if s.contains('\0') {
            tracing::warn!("NUL character in a prediction record replaced");
            *s = s.replace('\0', "\u{FFFD}");
        }
    }
    for s in [
        &mut record.prediction_id,
        &mut record.model,
        &mut record.model_version,
        &mut record.entity_id,
        &mut record.trace_id,
        &mut record.shadow_of,
    ] {
        clean(s);
    }
    if record.features.keys().any(|k| k.contains('\0')) {
        record.features = std::mem::take(&mut record.features)
            .into_iter()
            .map(|(mut k, v)| {
                clean(&mut k);
                (k, v)
            })
            .collect();
    }
    for value in record.features.values_mut() {
        if let Some(Kind::Category(c)) = &mut value.kind {
            clean(c);
        }
    }
}

#[tonic::async_trait]
impl PredictionLog for PredictionLogService {
    async fn record(
        &self,
        request: Request<RecordRequest>,
    ) -> Result<Response<RecordResponse>, Status> {
        let RecordRequest { records } = request.into_inner();
        check_call(&records)?;
        let (mut records, rejects) = sort_out(records);
        records.iter_mut().for_each(make_storable);
        // Acknowledged only once committed: the sender may forget what we acknowledge.
        match self.queue.commit(records, rejects).await {
            Ok(Committed { accepted, rejected }) => {
                Ok(Response::new(RecordResponse { accepted, rejected }))
            }
            Err(Refused::Full) => Err(LoggerError::QueueFull.into()),
            Err(Refused::StoreDown) => Err(LoggerError::Unavailable(
                "writes are failing; the batch in hand is being retried".into(),
            )
            .into()),
            Err(Refused::Closed) => Err(Status::unavailable("prediction log is shutting down")),
        }
    }

    async fn get_prediction(
        &self,
        request: Request<GetPredictionRequest>,
    ) -> Result<Response<PredictionRecord>, Status> {
        let GetPredictionRequest { prediction_id } = request.into_inner();
        if prediction_id.is_empty() {
            return Err(LoggerError::InvalidArgument("prediction_id is empty".into()).into());
        }
        let client = mesh_runtime::postgres::connection(&self.db)
            .await
            .map_err(|e| LoggerError::Unavailable(e.to_string()))?;
        let row = client
            .query_opt(
                "SELECT prediction_id, (extract(epoch FROM served_at) * 1e6)::int8, model, model_version,
                        entity_id, features::text, score, latency_us, feature_tier, trace_id
                 FROM predictions WHERE prediction_id = $1",
                &[&prediction_id],
            )
            .await
            .map_err(|e| LoggerError::Unavailable(e.to_string()))?
            .ok_or_else(|| LoggerError::NotFound(format!("no logged prediction {prediction_id:?}")))?;
        let features_text: String = row.get(5);
        let features =
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&features_text)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(k, v)| {
                    let kind = match v {
                        serde_json::Value::Number(n) => Kind::Number(n.as_f64()?),
                        serde_json::Value::String(s) => Kind::Category(s),
                        _ => return None,
                    };
                    Some((k, FeatureValue { kind: Some(kind) }))
                })
                .collect();
        let tier: String = row.get(8);
        let feature_tier = match tier.as_str() {
            "memory" => FeatureTier::Memory,
            "redis" => FeatureTier::Redis,
            "database" => FeatureTier::Database,
            "request" => FeatureTier::Request,
            _ => FeatureTier::Unspecified,
        };
        Ok(Response::new(PredictionRecord {
            prediction_id: row.get(0),
            time_unix_micros: row.get(1),
            model: row.get(2),
            model_version: row.get(3),
            entity_id: row.get(4),
            features,
            score: row.get(6),
            latency_micros: row.get::<_, i64>(7) as u64,
            feature_tier: feature_tier as i32,
            trace_id: row.get(9),
            shadow_of: String::new(),
        }))
    }
}
