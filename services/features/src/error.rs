//! The features service's errors and their one mapping to gRPC status.

/// Everything that can go wrong serving features.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FeaturesError {
    /// The request is malformed; the message names what is wrong.
    #[error("{0}")]
    InvalidArgument(String),
    /// Neither cache had the entity and PostgreSQL could not be reached.
    #[error("feature store unavailable: {0}")]
    Unavailable(String),
    /// A bug (details logged, not returned).
    #[error("internal: {0}")]
    Internal(String),
}

impl From<FeaturesError> for tonic::Status {
    fn from(e: FeaturesError) -> Self {
        match e {
            FeaturesError::InvalidArgument(msg) => {
                tracing::info!(error = %msg, "invalid features request");
                tonic::Status::invalid_argument(msg)
            }
            FeaturesError::Unavailable(msg) => {
                tracing::error!(error = %msg, "feature store unavailable");
                let mut status =
                    tonic::Status::unavailable("feature store unavailable: database unreachable");
                status.metadata_mut().insert(
                    mesh_runtime::resilience::STORE_UNAVAILABLE,
                    tonic::metadata::MetadataValue::from_static("postgresql"),
                );
                status
            }
            FeaturesError::Internal(msg) => {
                tracing::error!(error = %msg, "features failed");
                tonic::Status::internal("internal error")
            }
        }
    }
}
