//! One pipeline serves `Predict` and `PredictBatch`: a prediction is a batch of one. Its named
//! steps, in order:
//!
//! 1. **resolve** each item's model version: the one the request pins or names by alias, else
//!    the live registry's policy for its entity (a sticky rollout), never one no replica has
//!    ready (see [`crate::lifecycle::routing`]); items sharing a version go through the
//!    following steps together, the groups side by side;
//! 2. **plan**: check each item (entity id, request features) and note which need stored
//!    features;
//! 3. **fetch** stored features for those entities in one `GetFeatures` call;
//! 4. **assemble** each item's feature vector (request values win over stored ones);
//! 5. **score** every assembled row in one `ModelInfer` call;
//! 6. **record** each prediction in the durable spool (a bounded wait);
//! 7. **answer**, each item with its own result and its own notes of what degraded.
//!
//! An item's problem (bad input, unknown entity, features it cannot get) is that item's error;
//! only what makes every item fail (out of time, shed, inference down) fails the call.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use mesh_proto::features::{EntityError, EntityFeatures};
use mesh_proto::gateway::PredictResponse;
use mesh_proto::logger::PredictionRecord;
use mesh_proto::types::{feature_value::Kind, FeatureTier, FeatureValue};
use mesh_runtime::registry::ModelManifest;
use mesh_runtime::Deadline;
use mesh_telemetry::propagation::current_trace_id;
use mesh_tensor::decode_output_f32;

mod rows;

use rows::{assemble, infer_request, plan};

use crate::client::Compartments;
use crate::error::GatewayError;
use crate::lifecycle::shadow::Copied;
use crate::prediction_metrics::Step;
use crate::service::GatewayService;
use crate::validate;

/// Longest a prediction waits for its record to be on disk before it is answered anyway.
pub const SPOOL_WAIT: std::time::Duration = std::time::Duration::from_millis(50);
/// Kept back from the deadline when waiting for the spool, for the answer's way back.
const SPOOL_WAIT_MARGIN: std::time::Duration = std::time::Duration::from_millis(2);

/// One item to score: an entity and the features the caller supplied.
#[derive(Clone)]
pub struct Item {
    /// The entity.
    pub entity_id: String,
    /// Request-time features (they win over stored ones).
    pub features: HashMap<String, FeatureValue>,
    /// When its call arrived (the latency in its record).
    pub arrived: Instant,
    /// Its call's trace id, when the pipeline runs outside that call's span (a coalesced run);
    /// `None`: the current span's.
    pub trace_id: Option<String>,
}

/// What one call of the pipeline is for.
pub struct Call<'a> {
    /// When the call arrived (for the recorded latency).
    pub started: Instant,
    /// The caller's deadline.
    pub deadline: Deadline,
    /// The traffic class's bulkheads (online or batch).
    pub compartments: &'a Compartments,
}

/// Each item's answer or error, in the items' order, and the model version that scored them.
pub struct Outcome {
    /// The version that scored the most items (each answer names its own).
    pub model_version: String,
    /// One result per item.
    pub results: Vec<Result<PredictResponse, GatewayError>>,
}

/// An item after planning: failed already, or waiting for its row.
enum Slot {
    Failed(GatewayError),
    Complete(Item),
    NeedsStore(Item),
}

/// Stored features of the entities that needed them, or why there are none.
enum Stored {
    /// The answer: entities by id, the entities that failed on their own (by id), and the
    /// degradation notes.
    Found {
        entities: HashMap<String, EntityFeatures>,
        failed: HashMap<String, EntityError>,
        notes: Vec<String>,
    },
    /// The whole call failed.
    Unavailable(GatewayError),
}

/// One row to score.
struct Row {
    entity_id: String,
    arrived: Instant,
    trace_id: Option<String>,
    values: Vec<Kind>,
    logged: BTreeMap<String, FeatureValue>,
    tier: FeatureTier,
    degraded: Vec<String>,
}

impl GatewayService {
    /// Runs the pipeline for `items` of `model`: each item at the version the router picks for
    /// it (`version` pinned or named by alias, else the policy for its entity); items sharing a
    /// version are scored together, the groups side by side.
    pub async fn run(
        &self,
        model: &str,
        version: &str,
        items: Vec<Item>,
        call: Call<'_>,
    ) -> Result<Outcome, GatewayError> {
        validate::model_ref(model, version)?;
        let count = items.len();
        let mut groups: BTreeMap<String, Vec<(usize, Item)>> = BTreeMap::new();
        for (i, item) in items.into_iter().enumerate() {
            let chosen = self.router.route(model, version, &item.entity_id)?;
            groups.entry(chosen).or_default().push((i, item));
        }
        let mut manifests = Vec::with_capacity(groups.len());
        for chosen in groups.keys() {
            manifests.push(self.router.version(model, chosen)?.manifest);
        }
        let call = &call;
        let runs = groups
            .into_values()
            .zip(&manifests)
            .map(|(members, manifest)| async move {
                let (positions, items): (Vec<usize>, Vec<Item>) = members.into_iter().unzip();
                let observed = self
                    .predictions
                    .observe(manifest, items.len(), call.started);
                let results =
                    observed.finish(self.run_judged(manifest, version, items, call).await)?;
                Ok::<_, GatewayError>((positions, results))
            });
        let mut results: Vec<Option<Result<PredictResponse, GatewayError>>> =
            (0..count).map(|_| None).collect();
        let mut largest = (0, String::new());
        for (run, manifest) in futures::future::join_all(runs)
            .await
            .into_iter()
            .zip(&manifests)
        {
            let (positions, group) = run?;
            if positions.len() > largest.0 {
                largest = (positions.len(), manifest.version.clone());
            }
            for (position, result) in positions.into_iter().zip(group) {
                results[position] = Some(result);
            }
        }
        Ok(Outcome {
            model_version: largest.1,
            results: results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err(GatewayError::Internal("item not scored".into()))))
                .collect(),
        })
    }

    /// Steps 2 to 7 for a group, observed by the canary. A group routed to a rollout candidate
    /// (the request named no version) that fails, or scores a non-finite number, is retried on
    /// production within the same deadline: callers do not see a bad canary's failures.
    async fn run_judged(
        &self,
        manifest: &ModelManifest,
        requested: &str,
        items: Vec<Item>,
        call: &Call<'_>,
    ) -> Result<Vec<Result<PredictResponse, GatewayError>>, GatewayError> {
        let candidate = requested
            .is_empty()
            .then(|| self.router.candidate_and_production(&manifest.name))
            .flatten()
            .filter(|(c, _)| *c == manifest.version);
        let started = Instant::now();
        let Some((_, production)) = candidate else {
            let result = self.run_version(manifest, items, call, false).await;
            self.canary.observe(
                &manifest.name,
                &manifest.version,
                result.is_err(),
                started.elapsed(),
            );
            return result;
        };
        let result = self.run_version(manifest, items.clone(), call, true).await;
        self.canary.observe(
            &manifest.name,
            &manifest.version,
            result.is_err(),
            started.elapsed(),
        );
        match result {
            Ok(results) => Ok(results),
            Err(error) if !call.deadline.expired() => {
                tracing::warn!(%error, candidate = %manifest.version, %production, "candidate failed; retrying on production");
                let production = self.router.version(&manifest.name, &production)?.manifest;
                self.run_version(&production, items, call, false).await
            }
            Err(error) => Err(error),
        }
    }

    /// Steps 2 to 7 for `items` that one version (`manifest`) scores; `strict` (a candidate):
    /// a non-finite score fails the group before anything is recorded or answered.
    async fn run_version(
        &self,
        manifest: &ModelManifest,
        items: Vec<Item>,
        call: &Call<'_>,
        strict: bool,
    ) -> Result<Vec<Result<PredictResponse, GatewayError>>, GatewayError> {
        let slots = plan(manifest, items);
        let stored = self.fetch(&slots, call).await?;
        let mut rows = Vec::new();
        let mut results: Vec<Option<Result<PredictResponse, GatewayError>>> = Vec::new();
        let mut row_of = Vec::new();
        for slot in slots {
            match assemble(manifest, slot, &stored) {
                Ok(row) => {
                    row_of.push(results.len());
                    rows.push(row);
                    results.push(None);
                }
                Err(error) => results.push(Some(Err(error))),
            }
        }
        if !rows.is_empty() {
            let scored = self
                .predictions
                .timed(Step::Score, self.score(manifest, &rows, call))
                .await?;
            if strict && scored.0.iter().any(|s| !s.is_finite()) {
                return Err(GatewayError::Unavailable(format!(
                    "version {} returned a score that is not a finite number",
                    manifest.version
                )));
            }
            let observed: Vec<_> = scored
                .0
                .iter()
                .copied()
                .zip(rows.iter().map(|r| &r.logged))
                .collect();
            self.drift.observe(manifest, &observed);
            // A copy for the shadow, if there is one: sent once the answers are known, never
            // waited for.
            let shadow = self
                .router
                .shadow_for(&manifest.name, &manifest.version)
                .map(|m| {
                    let room = self.shadow.admit(&m, rows.len());
                    (
                        m,
                        rows.iter()
                            .take(room)
                            .map(|r| (r.logged.clone(), r.entity_id.clone()))
                            .collect::<Vec<_>>(),
                    )
                });
            let answers = self
                .predictions
                .timed(
                    Step::Record,
                    self.record_and_answer(manifest, rows, scored, call),
                )
                .await;
            if let Some((shadow_manifest, rows)) = shadow.filter(|(_, rows)| !rows.is_empty()) {
                let copies = rows
                    .into_iter()
                    .zip(&answers)
                    .map(|((features, entity_id), answer)| Copied {
                        features,
                        score: answer.score,
                        prediction_id: answer.prediction_id.clone(),
                        entity_id,
                        trace_id: answer.trace_id.clone(),
                    })
                    .collect();
                self.shadow.send(shadow_manifest, copies);
            }
            for (i, answer) in row_of.into_iter().zip(answers) {
                results[i] = Some(Ok(answer));
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(GatewayError::Internal("item not scored".into()))))
            .collect())
    }

    /// Step 3: one `GetFeatures` for the entities that need stored features. Out of time or
    /// shed fails the call (the caller should know to back off); any other failure becomes
    /// each such item's error in step 4.
    async fn fetch(&self, slots: &[Slot], call: &Call<'_>) -> Result<Stored, GatewayError> {
        let mut seen = std::collections::HashSet::new();
        let ids: Vec<String> = slots
            .iter()
            .filter_map(|slot| match slot {
                Slot::NeedsStore(item) if seen.insert(item.entity_id.as_str()) => {
                    Some(item.entity_id.clone())
                }
                _ => None,
            })
            .collect();
        if ids.is_empty() {
            return Ok(Stored::Found {
                entities: HashMap::new(),
                failed: HashMap::new(),
                notes: Vec::new(),
            });
        }
        let bulkhead = &call.compartments.features;
        let fetch = self.features.get(ids, call.deadline, bulkhead);
        match self.predictions.timed(Step::Fetch, fetch).await {
            Ok(response) => Ok(Stored::Found {
                entities: response
                    .entities
                    .into_iter()
                    .map(|e| (e.entity_id.clone(), e))
                    .collect(),
                failed: response
                    .failed
                    .into_iter()
                    .map(|e| (e.entity_id.clone(), e))
                    .collect(),
                notes: response.degraded,
            }),
            Err(status) => match GatewayError::from_downstream("features service", &status) {
                error @ (GatewayError::DeadlineExceeded | GatewayError::Overloaded(_)) => {
                    Err(error)
                }
                error => Ok(Stored::Unavailable(error)),
            },
        }
    }

    /// Step 5: one `ModelInfer` for all rows; their scores in order, and what degraded on the
    /// way (a replica failed over).
    async fn score(
        &self,
        manifest: &ModelManifest,
        rows: &[Row],
        call: &Call<'_>,
    ) -> Result<(Vec<f64>, Vec<String>), GatewayError> {
        let request = infer_request(manifest, rows);
        let bulkhead = &call.compartments.inference;
        let (response, degraded) = self
            .inference
            .infer(request, call.deadline, bulkhead)
            .await
            .map_err(|s| GatewayError::from_downstream("inference", &s))?;
        let (values, width) = decode_output_f32(&response, &manifest.output.name)
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        if values.len() != rows.len() * width || manifest.output.index >= width {
            return Err(GatewayError::Internal(format!(
                "inference output {} has {} values for {} rows of width {width}",
                manifest.output.name,
                values.len(),
                rows.len()
            )));
        }
        let scores = (0..rows.len())
            .map(|r| values[r * width + manifest.output.index] as f64)
            .collect();
        Ok((scores, degraded))
    }

    /// Steps 6 and 7: each scored row's record written to the spool, then its answer. The wait
    /// for the disk is bounded by [`SPOOL_WAIT`] and the deadline; a record that could not be
    /// kept is said in its answer's `degraded` list, the answer is not withheld.
    async fn record_and_answer(
        &self,
        manifest: &ModelManifest,
        rows: Vec<Row>,
        (scores, inference_notes): (Vec<f64>, Vec<String>),
        call: &Call<'_>,
    ) -> Vec<PredictResponse> {
        let trace_id = current_trace_id().unwrap_or_default();
        let time = mesh_runtime::clock::unix_micros();
        let remaining = call.deadline.remaining();
        let wait = SPOOL_WAIT.min(remaining.saturating_sub(SPOOL_WAIT_MARGIN));
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
                latency_micros: row.arrived.elapsed().as_micros() as u64,
                feature_tier: row.tier as i32,
                trace_id: row.trace_id.clone().unwrap_or_else(|| trace_id.clone()),
                shadow_of: String::new(),
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
}
