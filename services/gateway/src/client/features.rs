//! The features service: `GetFeatures` for the entities a prediction needs. Reads are
//! idempotent, so an unreachable service is retried within the budget; it has one address, so
//! a slow attempt is not retried.

use std::time::Duration;

use mesh_proto::features::features_client::FeaturesClient;
use mesh_proto::features::{GetFeaturesRequest, GetFeaturesResponse};
use mesh_runtime::internal::InternalChannel;
use mesh_runtime::resilience::{retry_kind, RetryKind};
use mesh_runtime::{Bulkhead, Deadline};
use mesh_telemetry::propagation::client_span;

use super::call::traced;
use super::{Attempt, Attempts, Downstream};

/// The features service.
#[derive(Clone)]
pub struct FeaturesDownstream {
    client: FeaturesClient<InternalChannel>,
    margin: Duration,
    downstream: Downstream,
}

impl FeaturesDownstream {
    /// A client over `channel`; `margin` is kept back from each budget for the way back.
    pub fn new(channel: InternalChannel, margin: Duration, downstream: Downstream) -> Self {
        Self {
            client: FeaturesClient::new(channel),
            margin,
            downstream,
        }
    }

    /// `GetFeatures` for `entity_ids` within `deadline`, in `bulkhead`.
    pub async fn get(
        &self,
        entity_ids: Vec<String>,
        deadline: Deadline,
        bulkhead: &Bulkhead,
    ) -> Result<GetFeaturesResponse, tonic::Status> {
        let _permit = bulkhead.try_enter()?;
        let attempts = FeatureAttempts {
            client: &self.client,
            entity_ids,
            margin: self.margin,
        };
        let (response, _) = self.downstream.call(deadline, attempts).await?;
        Ok(response)
    }
}

struct FeatureAttempts<'a> {
    client: &'a FeaturesClient<InternalChannel>,
    entity_ids: Vec<String>,
    margin: Duration,
}

impl Attempts for FeatureAttempts<'_> {
    type Response = GetFeaturesResponse;

    fn has_alternative(&self) -> bool {
        false
    }

    async fn attempt(&mut self, deadline: Deadline) -> Attempt<Self::Response> {
        let span = client_span(mesh_proto::service_names::FEATURES, "GetFeatures");
        let mut client = self.client.clone();
        let message = GetFeaturesRequest {
            entity_ids: self.entity_ids.clone(),
        };
        let judged = traced(span, message, deadline, self.margin, |r| async move {
            client.get_features(r).await
        })
        .await;
        let retry = matches!(&judged.result, Err(s) if retry_kind(s) == RetryKind::Anywhere);
        Attempt {
            result: judged.result,
            verdict: judged.verdict,
            retry,
            note: None,
        }
    }
}
