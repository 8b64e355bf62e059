//! The `mesh.logger.v1.PredictionLog` handlers.

use deadpool_postgres::Pool;
use mesh_proto::logger::prediction_log_server::PredictionLog;
use mesh_proto::logger::{GetPredictionRequest, PredictionRecord, RecordRequest, RecordResponse};
use mesh_proto::types::{feature_value::Kind, FeatureTier, FeatureValue};
use tonic::{Request, Response, Status};

use crate::error::LoggerError;
use crate::writer::{LogQueue, Refused};

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

fn check(records: &[PredictionRecord]) -> Result<(), LoggerError> {
    if records.len() > MAX_RECORDS_PER_CALL {
        return Err(LoggerError::InvalidArgument(format!(
            "{} records in one call; the limit is {MAX_RECORDS_PER_CALL}",
            records.len()
        )));
    }
    for (i, r) in records.iter().enumerate() {
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
            return Err(LoggerError::InvalidArgument(format!(
                "record #{i} lacks {}",
                missing.join(", ")
            )));
        }
        if !r.score.is_finite() {
            return Err(LoggerError::InvalidArgument(format!(
                "record #{i} ({}) has a score that is not a finite number",
                r.prediction_id
            )));
        }
    }
    Ok(())
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
        let RecordRequest { mut records } = request.into_inner();
        check(&records)?;
        records.iter_mut().for_each(make_storable);
        let accepted = records.len() as u32;
        // Acknowledged only once committed: the sender may forget what we acknowledge.
        match self.queue.commit(records).await {
            Ok(()) => Ok(Response::new(RecordResponse { accepted })),
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
        }))
    }
}
