//! The prediction log: `Record` calls from the spool's shipper. No breaker or retry here: the
//! shipper redelivers from the durable spool until the logger acknowledges.

use std::time::Duration;

use mesh_proto::logger::prediction_log_client::PredictionLogClient;
use mesh_proto::logger::{RecordRequest, RecordResponse};
use mesh_runtime::internal::InternalChannel;
use mesh_runtime::{Bulkhead, Deadline};
use mesh_telemetry::propagation::client_span;

use super::call::traced;

/// The prediction log.
#[derive(Clone)]
pub struct LoggerDownstream {
    client: PredictionLogClient<InternalChannel>,
}

impl LoggerDownstream {
    /// A client over `channel`.
    pub fn new(channel: InternalChannel) -> Self {
        Self {
            client: PredictionLogClient::new(channel),
        }
    }

    /// `Record` with its own budget (log shipping is not tied to any prediction's deadline).
    pub async fn record(
        &self,
        request: RecordRequest,
        timeout: Duration,
        bulkhead: &Bulkhead,
    ) -> Result<RecordResponse, tonic::Status> {
        let _permit = bulkhead.try_enter()?;
        let span = client_span(mesh_proto::service_names::LOGGER, "Record");
        let mut client = self.client.clone();
        let deadline = Deadline::after(timeout);
        traced(span, request, deadline, Duration::ZERO, |r| async move {
            client.record(r).await
        })
        .await
        .result
    }
}
