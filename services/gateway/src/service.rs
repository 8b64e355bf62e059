//! The `mesh.gateway.v1.Gateway` handlers: validate, fetch features, infer, answer, log.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use mesh_proto::features::EntityFeatures;
use mesh_proto::gateway::gateway_server::Gateway;
use mesh_proto::gateway::{
    batch_result, BatchResult, ItemError, PredictBatchRequest, PredictBatchResponse,
    PredictRequest, PredictResponse,
};
use mesh_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use mesh_proto::inference::{InferTensorContents, ModelInferRequest, ModelInferResponse};
use mesh_proto::logger::PredictionRecord;
use mesh_proto::types::{feature_value::Kind, FeatureTier, FeatureValue};
use mesh_runtime::registry::{FeatureKind, ModelManifest, ModelRegistry};
use mesh_runtime::{Bulkhead, Deadline};
use mesh_telemetry::propagation::current_trace_id;
use tonic::{Request, Response, Status};

use crate::downstream::{from_status, Compartments, FeaturesDownstream, InferenceDownstream};
use crate::error::GatewayError;
use crate::logship::LogShipper;
use crate::validate;

/// Everything a handler needs.
pub struct GatewayService {
    /// Models and their manifests.
    pub registry: Arc<ModelRegistry>,
    /// The features service.
    pub features: FeaturesDownstream,
    /// The inference replicas.
    pub inference: InferenceDownstream,
    /// Where records go.
    pub log: LogShipper,
    /// Bulkheads for online traffic (`Predict`).
    pub online: Compartments,
    /// Bulkheads for batch traffic (`PredictBatch`).
    pub batch: Compartments,
    /// Admission of `PredictBatch` calls themselves.
    pub batch_calls: Bulkhead,
    /// Most items per `PredictBatch`.
    pub max_batch_items: usize,
    /// Budget when the caller sent none (also applied by the deadline layer).
    pub default_budget: std::time::Duration,
}

/// Longest a prediction waits for its record to be on disk before it is answered anyway.
pub const SPOOL_WAIT: std::time::Duration = std::time::Duration::from_millis(50);
/// Kept back from the deadline when waiting for the spool, for the answer's way back.
const SPOOL_WAIT_MARGIN: std::time::Duration = std::time::Duration::from_millis(2);

/// One row to score.
struct Row {
    entity_id: String,
    values: Vec<Kind>,
    logged: std::collections::BTreeMap<String, FeatureValue>,
    tier: FeatureTier,
    degraded: Vec<String>,
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl GatewayService {
    fn deadline<T>(&self, request: &Request<T>) -> Deadline {
        Deadline::of(request).unwrap_or_else(|| Deadline::after(self.default_budget))
    }

    /// Stored features of `ids` (deduplicated by the caller) and the degradations the features
    /// service reported, or its failure.
    async fn fetch(
        &self,
        ids: Vec<String>,
        deadline: Deadline,
        compartments: &Compartments,
    ) -> Result<(HashMap<String, EntityFeatures>, Vec<String>), Status> {
        let response = self
            .features
            .get(ids, deadline, &compartments.features)
            .await?;
        let found = response
            .entities
            .into_iter()
            .map(|e| (e.entity_id.clone(), e))
            .collect();
        Ok((found, response.degraded))
    }

    async fn predict_one(
        &self,
        request: Request<PredictRequest>,
    ) -> Result<PredictResponse, GatewayError> {
        let started = Instant::now();
        let deadline = self.deadline(&request);
        let PredictRequest {
            model,
            entity_id,
            features,
            model_version,
        } = request.into_inner();
        let version = self.registry.resolve(&model, &model_version)?;
        let manifest = &version.manifest;
        validate::entity_id(&entity_id)?;
        validate::request_features(manifest, &features)?;

        let (stored, tier, degraded) = if validate::request_is_complete(manifest, &features) {
            (None, FeatureTier::Request, Vec::new())
        } else {
            match self
                .fetch(vec![entity_id.clone()], deadline, &self.online)
                .await
            {
                Ok((mut found, degraded)) => {
                    let entity = found.remove(&entity_id).ok_or_else(|| {
                        GatewayError::Internal("features service omitted the entity".into())
                    })?;
                    if !entity.found {
                        return Err(GatewayError::NotFound(format!(
                            "entity {entity_id:?} is not in the feature store; supply {} in the request to score it anyway",
                            validate::missing_from_request(manifest, &features).join(", ")
                        )));
                    }
                    let tier =
                        FeatureTier::try_from(entity.tier).unwrap_or(FeatureTier::Unspecified);
                    (Some(entity.features), tier, degraded)
                }
                Err(status) => {
                    let error = from_status("features service", &status);
                    // Out of time or shed: say so, so the caller knows to back off or not.
                    if matches!(
                        error,
                        GatewayError::DeadlineExceeded | GatewayError::Overloaded(_)
                    ) {
                        return Err(error);
                    }
                    return Err(GatewayError::Unavailable(format!(
                        "{error}; the request does not supply {} to score without it",
                        validate::missing_from_request(manifest, &features).join(", ")
                    )));
                }
            }
        };
        let values = validate::assemble(manifest, &entity_id, &features, stored.as_ref())?;
        let logged = validate::merged(&features, stored.as_ref());
        let rows = vec![Row {
            entity_id,
            values,
            logged,
            tier,
            degraded,
        }];
        let scores = self.score(manifest, &rows, deadline, &self.online).await?;
        let mut responses = self.answer(manifest, rows, scores, started, deadline).await;
        responses
            .pop()
            .ok_or_else(|| GatewayError::Internal("no score for the row".into()))
    }

    /// One ModelInfer call for all `rows`; their scores in order, and what degraded on the way
    /// (a replica failed over).
    async fn score(
        &self,
        manifest: &ModelManifest,
        rows: &[Row],
        deadline: Deadline,
        compartments: &Compartments,
    ) -> Result<(Vec<f64>, Vec<String>), GatewayError> {
        let request = infer_request(manifest, rows);
        let (response, degraded) = self
            .inference
            .infer(request, deadline, &compartments.inference)
            .await
            .map_err(|s| from_status("inference", &s))?;
        Ok((scores(manifest, &response, rows.len())?, degraded))
    }

    /// Responses for scored rows, each written to the prediction log's spool first. The wait
    /// for the disk is bounded by [`SPOOL_WAIT`] and the deadline; a record that could not be
    /// kept is said in its response's `degraded` list, the answer is not withheld.
    async fn answer(
        &self,
        manifest: &ModelManifest,
        rows: Vec<Row>,
        (scores, inference_notes): (Vec<f64>, Vec<String>),
        started: Instant,
        deadline: Deadline,
    ) -> Vec<PredictResponse> {
        let trace_id = current_trace_id().unwrap_or_default();
        let latency = started.elapsed().as_micros() as u64;
        let time = now_micros();
        let wait = SPOOL_WAIT.min(deadline.remaining().saturating_sub(SPOOL_WAIT_MARGIN));
        let delivery_note = self.log.status().delivery_failing().then(|| {
            "prediction-log: delivery delayed (logger unavailable; record kept in the spool)"
                .to_owned()
        });
        let records: Vec<PredictionRecord> = rows
            .iter()
            .zip(&scores)
            .map(|(row, score)| PredictionRecord {
                prediction_id: uuid::Uuid::now_v7().to_string(),
                time_unix_micros: time,
                model: manifest.name.clone(),
                model_version: manifest.version.clone(),
                entity_id: row.entity_id.clone(),
                features: row
                    .logged
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                score: *score,
                latency_micros: latency,
                feature_tier: row.tier as i32,
                trace_id: trace_id.clone(),
            })
            .collect();
        let kept =
            futures::future::join_all(records.iter().map(|r| self.log.record(r, wait))).await;
        records
            .into_iter()
            .zip(rows)
            .zip(kept)
            .map(|((record, row), kept)| {
                let mut degraded = row.degraded;
                degraded.extend(inference_notes.iter().cloned());
                match kept {
                    Ok(()) => degraded.extend(delivery_note.clone()),
                    Err(not_kept) => degraded.push(not_kept.note()),
                }
                PredictResponse {
                    prediction_id: record.prediction_id,
                    model: record.model,
                    model_version: record.model_version,
                    score: record.score,
                    feature_tier: record.feature_tier,
                    trace_id: record.trace_id,
                    degraded,
                }
            })
            .collect()
    }

    async fn predict_batch(
        &self,
        request: Request<PredictBatchRequest>,
    ) -> Result<PredictBatchResponse, GatewayError> {
        let started = Instant::now();
        let deadline = self.deadline(&request);
        let _admitted = self
            .batch_calls
            .try_enter()
            .map_err(|s| GatewayError::Overloaded(s.message().to_owned()))?;
        let PredictBatchRequest {
            model,
            items,
            model_version,
        } = request.into_inner();
        let version = self.registry.resolve(&model, &model_version)?;
        let manifest = &version.manifest;
        if items.is_empty() {
            return Err(GatewayError::InvalidArgument("items is empty".into()));
        }
        if items.len() > self.max_batch_items {
            return Err(GatewayError::InvalidArgument(format!(
                "{} items in one batch; the limit is {} (MESH_MAX_BATCH_ITEMS)",
                items.len(),
                self.max_batch_items
            )));
        }
        let mut outcome: Vec<Option<Result<PredictResponse, GatewayError>>> =
            vec![None; items.len()];
        let mut need_store: Vec<String> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let checked = validate::entity_id(&item.entity_id)
                .and_then(|_| validate::request_features(manifest, &item.features));
            match checked {
                Err(e) => outcome[i] = Some(Err(e)),
                Ok(()) if !validate::request_is_complete(manifest, &item.features) => {
                    if !need_store.contains(&item.entity_id) {
                        need_store.push(item.entity_id.clone());
                    }
                }
                Ok(()) => {}
            }
        }
        let stored = if need_store.is_empty() {
            Ok((HashMap::new(), Vec::new()))
        } else {
            self.fetch(need_store, deadline, &self.batch).await
        };
        if let Err(status) = &stored {
            let error = from_status("features service", status);
            if matches!(
                error,
                GatewayError::DeadlineExceeded | GatewayError::Overloaded(_)
            ) {
                return Err(error);
            }
        }
        let mut rows = Vec::new();
        let mut row_items = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            if outcome[i].is_some() {
                continue;
            }
            let complete = validate::request_is_complete(manifest, &item.features);
            let (features, tier, degraded) = if complete {
                (None, FeatureTier::Request, Vec::new())
            } else {
                match &stored {
                    Err(status) => {
                        outcome[i] = Some(Err(GatewayError::Unavailable(format!(
                            "{}; the item does not supply {}",
                            from_status("features service", status),
                            validate::missing_from_request(manifest, &item.features).join(", ")
                        ))));
                        continue;
                    }
                    Ok((found, notes)) => match found.get(&item.entity_id) {
                        Some(e) if e.found => (
                            Some(&e.features),
                            FeatureTier::try_from(e.tier).unwrap_or(FeatureTier::Unspecified),
                            notes.clone(),
                        ),
                        _ => {
                            outcome[i] = Some(Err(GatewayError::NotFound(format!(
                                "entity {:?} is not in the feature store",
                                item.entity_id
                            ))));
                            continue;
                        }
                    },
                }
            };
            match validate::assemble(manifest, &item.entity_id, &item.features, features) {
                Ok(values) => {
                    rows.push(Row {
                        logged: validate::merged(&item.features, features),
                        entity_id: item.entity_id,
                        values,
                        tier,
                        degraded,
                    });
                    row_items.push(i);
                }
                Err(e) => outcome[i] = Some(Err(e)),
            }
        }
        if !rows.is_empty() {
            let scores = self.score(manifest, &rows, deadline, &self.batch).await?;
            for (i, response) in row_items
                .into_iter()
                .zip(self.answer(manifest, rows, scores, started, deadline).await)
            {
                outcome[i] = Some(Ok(response));
            }
        }
        let results = outcome
            .into_iter()
            .map(|o| BatchResult {
                result: Some(match o {
                    Some(Ok(p)) => batch_result::Result::Prediction(p),
                    Some(Err(e)) => batch_result::Result::Error(ItemError {
                        code: e.code() as i32,
                        message: e.public_message(),
                    }),
                    None => batch_result::Result::Error(ItemError {
                        code: tonic::Code::Internal as i32,
                        message: "item not processed".into(),
                    }),
                }),
            })
            .collect();
        Ok(PredictBatchResponse {
            results,
            model_version: manifest.version.clone(),
        })
    }
}

/// The KServe request for `rows`: one input per feature, `[N, 1]`, FP32 or BYTES.
fn infer_request(manifest: &ModelManifest, rows: &[Row]) -> ModelInferRequest {
    let n = rows.len() as i64;
    let inputs = manifest
        .features
        .iter()
        .enumerate()
        .map(|(col, spec)| {
            let contents = match spec.kind {
                FeatureKind::Number => InferTensorContents {
                    fp32_contents: rows
                        .iter()
                        .map(|r| match &r.values[col] {
                            Kind::Number(v) => *v as f32,
                            Kind::Category(_) => f32::NAN,
                        })
                        .collect(),
                    ..Default::default()
                },
                FeatureKind::Category => InferTensorContents {
                    bytes_contents: rows
                        .iter()
                        .map(|r| match &r.values[col] {
                            Kind::Category(c) => c.as_bytes().to_vec(),
                            Kind::Number(_) => Vec::new(),
                        })
                        .collect(),
                    ..Default::default()
                },
            };
            InferInputTensor {
                name: spec.name.clone(),
                datatype: match spec.kind {
                    FeatureKind::Number => "FP32",
                    FeatureKind::Category => "BYTES",
                }
                .to_owned(),
                shape: vec![n, 1],
                parameters: Default::default(),
                contents: Some(contents),
            }
        })
        .collect();
    ModelInferRequest {
        model_name: manifest.name.clone(),
        model_version: manifest.version.clone(),
        id: String::new(),
        parameters: Default::default(),
        inputs,
        outputs: vec![InferRequestedOutputTensor {
            name: manifest.output.name.clone(),
            parameters: Default::default(),
        }],
        raw_input_contents: Vec::new(),
    }
}

/// The score column of the manifest's output, one value per row.
fn scores(
    manifest: &ModelManifest,
    response: &ModelInferResponse,
    rows: usize,
) -> Result<Vec<f64>, GatewayError> {
    let (index, output) = response
        .outputs
        .iter()
        .enumerate()
        .find(|(_, o)| o.name == manifest.output.name)
        .ok_or_else(|| {
            GatewayError::Internal(format!(
                "inference returned no {} output",
                manifest.output.name
            ))
        })?;
    let values: Vec<f32> = match (&output.contents, response.raw_output_contents.get(index)) {
        (Some(c), _) if !c.fp32_contents.is_empty() => c.fp32_contents.clone(),
        (_, Some(raw)) => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        _ => Vec::new(),
    };
    let width = output.shape.get(1).copied().unwrap_or(1).max(1) as usize;
    if values.len() != rows * width || manifest.output.index >= width {
        return Err(GatewayError::Internal(format!(
            "inference output {} has {} values for {rows} rows of width {width}",
            output.name,
            values.len()
        )));
    }
    Ok((0..rows)
        .map(|r| values[r * width + manifest.output.index] as f64)
        .collect())
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn predict(
        &self,
        request: Request<PredictRequest>,
    ) -> Result<Response<PredictResponse>, Status> {
        Ok(Response::new(self.predict_one(request).await?))
    }

    async fn predict_batch(
        &self,
        request: Request<PredictBatchRequest>,
    ) -> Result<Response<PredictBatchResponse>, Status> {
        Ok(Response::new(
            GatewayService::predict_batch(self, request).await?,
        ))
    }
}
