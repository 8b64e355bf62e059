//! The `mesh.gateway.v1.Gateway` handlers: admission and limits, then the one prediction
//! pipeline ([`crate::pipeline`]) for both RPCs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_proto::gateway::gateway_server::Gateway;
use mesh_proto::gateway::{
    batch_result, BatchResult, ItemError, PredictBatchRequest, PredictBatchResponse,
    PredictRequest, PredictResponse,
};
use mesh_runtime::{Bulkhead, Deadline};
use tonic::{Request, Response, Status};

use crate::client::{Compartments, FeaturesDownstream, InferenceDownstream};
use crate::coalesce::{Coalescer, Joined, Pending};
use crate::error::GatewayError;
use crate::lifecycle::routing::Router;
use crate::logship::LogShipper;
use crate::pipeline::{Call, Item};
use crate::prediction_metrics::PredictionMetrics;

/// Everything a handler needs.
pub struct GatewayService {
    /// The version for each request, and the manifests.
    pub router: Arc<Router>,
    /// The features service.
    pub features: FeaturesDownstream,
    /// The inference replicas.
    pub inference: InferenceDownstream,
    /// Shadow copies of predictions.
    pub shadow: Arc<crate::lifecycle::shadow::Shadow>,
    /// Drift of each version against its training reference.
    pub drift: Arc<crate::lifecycle::drift::Drift>,
    /// Keeps the drift gauges updated while the service lives.
    pub _exporting: crate::lifecycle::drift::Exporting,
    /// The canary judge's windows.
    pub canary: Arc<crate::lifecycle::canary::Canary>,
    /// Keeps the canary judging while the service lives (with a live registry).
    pub _judging: Option<crate::lifecycle::canary::Judging>,
    /// Keeps the live registry's audit log within `MESH_AUDIT_RETENTION_DAYS` (if there is one).
    pub _trimming: Option<mesh_registry::retention::AuditRetention>,
    /// Where records go.
    pub log: LogShipper,
    /// Predictions by model version, tier and outcome.
    pub predictions: PredictionMetrics,
    /// Bulkheads for online traffic (`Predict`).
    pub online: Compartments,
    /// Bulkheads for batch traffic (`PredictBatch`).
    pub batch: Compartments,
    /// Admission of `PredictBatch` calls themselves.
    pub batch_calls: Bulkhead,
    /// Most items per `PredictBatch`.
    pub max_batch_items: usize,
    /// Budget when the caller sent none (also applied by the deadline layer).
    pub default_budget: Duration,
    /// Concurrent `Predict`s of one model, run together.
    pub coalescer: Coalescer,
    /// This service itself, for the coalescer's workers.
    pub me: std::sync::Weak<GatewayService>,
}

impl GatewayService {
    fn deadline<T>(&self, request: &Request<T>) -> Deadline {
        Deadline::of(request).unwrap_or_else(|| Deadline::after(self.default_budget))
    }

    /// `Predict`: the pipeline with one item, run by this call or, while another run of the
    /// same model is in flight, coalesced with other calls ([`crate::coalesce`]); its error is
    /// the call's.
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
        crate::validate::model_ref(&model, &model_version)?;
        let item = Item {
            entity_id,
            features,
            arrived: started,
            trace_id: None,
        };
        let key = (model, model_version);
        let answer = match self.join(key.clone(), Pending { item, deadline }) {
            Joined::Lead(_lead, Pending { item, .. }) => {
                let call = Call {
                    started,
                    deadline,
                    compartments: &self.online,
                };
                let outcome = self.run(&key.0, &key.1, vec![item], call).await?;
                return outcome.results.into_iter().next().unwrap_or_else(|| {
                    Err(GatewayError::Internal("no result for the item".into()))
                });
            }
            Joined::Wait(answer) => answer,
        };
        self.wait(&key, answer, deadline).await
    }

    /// `PredictBatch`: admission in the batch class, limits, then the pipeline; each item's
    /// error is said in its own result.
    async fn predict_many(
        &self,
        request: Request<PredictBatchRequest>,
    ) -> Result<PredictBatchResponse, GatewayError> {
        let call = Call {
            started: Instant::now(),
            deadline: self.deadline(&request),
            compartments: &self.batch,
        };
        let _admitted = self
            .batch_calls
            .try_enter()
            .map_err(|s| GatewayError::Overloaded(s.message().to_owned()))?;
        let PredictBatchRequest {
            model,
            items,
            model_version,
        } = request.into_inner();
        crate::validate::batch_len(items.len(), self.max_batch_items)?;
        let items = items
            .into_iter()
            .map(|i| Item {
                entity_id: i.entity_id,
                features: i.features,
                arrived: call.started,
                trace_id: None,
            })
            .collect();
        let outcome = self.run(&model, &model_version, items, call).await?;
        let results = outcome
            .results
            .into_iter()
            .map(|result| BatchResult {
                result: Some(match result {
                    Ok(p) => batch_result::Result::Prediction(p),
                    Err(e) => batch_result::Result::Error(ItemError {
                        code: e.code() as i32,
                        message: e.public_message(),
                    }),
                }),
            })
            .collect();
        Ok(PredictBatchResponse {
            results,
            model_version: outcome.model_version,
        })
    }
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
        Ok(Response::new(self.predict_many(request).await?))
    }
}
