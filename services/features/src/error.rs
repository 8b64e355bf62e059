//! The features service's errors and their one mapping to gRPC status (for a whole call) or to
//! an `EntityError` (for one entity of a `GetFeatures` call).

use mesh_proto::features::EntityError;

/// Everything that can go wrong serving features.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FeaturesError {
    /// The request is malformed; the message names what is wrong.
    #[error("{0}")]
    InvalidArgument(String),
    /// Neither cache had the entity and PostgreSQL could not be reached.
    #[error("feature store unavailable: {0}")]
    Unavailable(String),
    /// A stored value cannot be served (e.g. outside the float32 range the models use): the
    /// server's data is wrong, not the caller's request. The message names entity and feature.
    #[error("{0}")]
    StoredData(String),
    /// A bug (details logged, not returned).
    #[error("internal: {0}")]
    Internal(String),
}

impl FeaturesError {
    /// The gRPC code this error maps to.
    pub fn code(&self) -> tonic::Code {
        match self {
            FeaturesError::InvalidArgument(_) => tonic::Code::InvalidArgument,
            FeaturesError::Unavailable(_) => tonic::Code::Unavailable,
            FeaturesError::StoredData(_) => tonic::Code::FailedPrecondition,
            FeaturesError::Internal(_) => tonic::Code::Internal,
        }
    }

    /// The message callers see: internal details and database errors stay in the logs.
    pub fn public_message(&self) -> String {
        match self {
            FeaturesError::InvalidArgument(msg) | FeaturesError::StoredData(msg) => msg.clone(),
            FeaturesError::Unavailable(_) => {
                "feature store unavailable: database unreachable".to_owned()
            }
            FeaturesError::Internal(_) => "internal error".to_owned(),
        }
    }

    /// Logs the error once: caller-caused at info, server-caused at error.
    pub fn log(&self) {
        match self {
            FeaturesError::InvalidArgument(msg) => {
                tracing::info!(error = %msg, "invalid features request")
            }
            FeaturesError::Unavailable(msg) => {
                tracing::error!(error = %msg, "feature store unavailable")
            }
            FeaturesError::StoredData(msg) => {
                tracing::error!(error = %msg, "stored feature data is unusable")
            }
            FeaturesError::Internal(msg) => tracing::error!(error = %msg, "features failed"),
        }
    }

    /// This error as one entity's entry in `GetFeaturesResponse.failed` (not logged here: the
    /// caller logs once per call, not once per entity).
    pub fn for_entity(&self, entity_id: &str) -> EntityError {
        EntityError {
            entity_id: entity_id.to_owned(),
            code: self.code() as i32,
            message: self.public_message(),
        }
    }
}

impl From<FeaturesError> for tonic::Status {
    fn from(e: FeaturesError) -> Self {
        e.log();
        let mut status = tonic::Status::new(e.code(), e.public_message());
        if let FeaturesError::Unavailable(_) = e {
            status.metadata_mut().insert(
                mesh_runtime::resilience::STORE_UNAVAILABLE,
                tonic::metadata::MetadataValue::from_static("postgresql"),
            );
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_code_and_hides_internal_details() {
        let stored = FeaturesError::StoredData("entity \"a\" feature \"x\" ...".into());
        assert_eq!(stored.code(), tonic::Code::FailedPrecondition);
        let down = FeaturesError::Unavailable("connection refused at 10.0.0.3".into());
        let entry = down.for_entity("a");
        assert_eq!(entry.code, tonic::Code::Unavailable as i32);
        assert!(!entry.message.contains("10.0.0.3"), "{}", entry.message);
        let status = tonic::Status::from(down);
        assert!(mesh_runtime::resilience::is_store_unavailable(&status));
        let bug = FeaturesError::Internal("lock poisoned".into());
        assert_eq!(bug.public_message(), "internal error");
    }
}
