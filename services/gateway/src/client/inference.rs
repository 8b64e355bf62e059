//! Inference across replicas: `ModelInfer` is idempotent, so a replica that is unreachable,
//! times out its share of the budget, or pushes back with `RESOURCE_EXHAUSTED` is followed by
//! another replica (never one that already failed this request while another is available),
//! while the retry budget and the deadline allow.

use std::sync::Arc;
use std::time::Duration;

use mesh_proto::inference::{ModelInferRequest, ModelInferResponse};
use mesh_runtime::bulkhead::BulkheadPermit;
use mesh_runtime::resilience::{retry_kind, RetryKind, Verdict};
use mesh_runtime::{Bulkhead, Deadline};
use mesh_telemetry::propagation::client_span;

use super::call::traced;
use super::replicas::{Replica, ReplicaHandle, ReplicaState};
use super::{Attempt, Attempts, Downstream};
use crate::lifecycle::readiness::ReplicaVersions;

/// The inference replicas behind one breaker and retry budget.
#[derive(Clone)]
pub struct InferenceDownstream {
    replicas: ReplicaHandle,
    versions: Arc<ReplicaVersions>,
    margin: Duration,
    downstream: Downstream,
}

impl InferenceDownstream {
    /// Calls to `replicas`, each request only to those that report its version ready in
    /// `versions` (when any does); `margin` is kept back from each budget for the way back.
    pub fn new(
        replicas: ReplicaHandle,
        versions: Arc<ReplicaVersions>,
        margin: Duration,
        downstream: Downstream,
    ) -> Self {
        Self {
            replicas,
            versions,
            margin,
            downstream,
        }
    }

    /// Each replica's URL, health and ejection, for the health report.
    pub fn states(&self) -> Vec<ReplicaState> {
        self.replicas.states()
    }

    /// The current replicas, for the health report's checks.
    pub fn members(&self) -> Arc<Vec<Arc<Replica>>> {
        self.replicas.members()
    }

    /// `ModelInfer` within `deadline`, in `bulkhead`, and notes of what degraded (a replica
    /// that failed before another answered).
    pub async fn infer(
        &self,
        request: ModelInferRequest,
        deadline: Deadline,
        bulkhead: &Bulkhead,
    ) -> Result<(ModelInferResponse, Vec<String>), tonic::Status> {
        let permit = bulkhead.try_enter()?;
        self.infer_admitted(request, deadline, permit).await
    }

    /// Like [`InferenceDownstream::infer`], for a call already admitted to its bulkhead: it
    /// holds `permit` until it ends.
    pub async fn infer_admitted(
        &self,
        request: ModelInferRequest,
        deadline: Deadline,
        _permit: BulkheadPermit,
    ) -> Result<(ModelInferResponse, Vec<String>), tonic::Status> {
        // Replicas that do not have the version ready count as already failed for this
        // request: it goes to those that have it.
        let lacking = self
            .versions
            .lacking(&request.model_name, &request.model_version);
        let attempts = ReplicaAttempts {
            replicas: &self.replicas,
            request,
            failed: lacking,
            margin: self.margin,
        };
        self.downstream.call(deadline, attempts).await
    }
}

/// Balance and traced call for one request: remembers the replicas it failed on, by URL.
struct ReplicaAttempts<'a> {
    replicas: &'a ReplicaHandle,
    request: ModelInferRequest,
    failed: Vec<String>,
    margin: Duration,
}

impl Attempts for ReplicaAttempts<'_> {
    type Response = ModelInferResponse;

    fn has_alternative(&self) -> bool {
        self.replicas.untried(&self.failed) > 1
    }

    async fn attempt(&mut self, deadline: Deadline) -> Attempt<Self::Response> {
        let Some(replica) = self.replicas.pick(&self.failed) else {
            // A DNS name that has not resolved yet: nothing to call, nowhere to retry.
            return Attempt {
                result: Err(tonic::Status::unavailable(
                    "inference: no replica discovered yet",
                )),
                verdict: Verdict::Failure,
                retry: false,
                note: None,
            };
        };
        let span = client_span(mesh_proto::service_names::INFERENCE, "ModelInfer");
        span.record("server.address", replica.url());
        let mut client = replica.client();
        let _in_flight = replica.lease();
        let judged = traced(
            span,
            self.request.clone(),
            deadline,
            self.margin,
            |r| async move { client.model_infer(r).await },
        )
        .await;
        self.replicas.observe(&replica, judged.verdict);
        let Err(status) = &judged.result else {
            return Attempt {
                result: judged.result,
                verdict: judged.verdict,
                retry: false,
                note: None,
            };
        };
        self.failed.push(replica.url().to_owned());
        let retry = match retry_kind(status) {
            RetryKind::Never => false,
            RetryKind::Anywhere => true,
            RetryKind::Elsewhere => self.replicas.untried(&self.failed) > 0,
        };
        let note = format!(
            "inference: replica {} failed ({:?}); retried on another",
            replica.url(),
            status.code()
        );
        Attempt {
            result: judged.result,
            verdict: judged.verdict,
            retry,
            note: Some(note),
        }
    }
}
