//! The gateway's errors and their one mapping to gRPC status. Messages name the culprit
//! (feature, model, entity, downstream); internal details stay in the logs.

/// Everything a prediction can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// The request is malformed (names the offending fields).
    #[error("{0}")]
    InvalidArgument(String),
    /// Unknown model, version or entity.
    #[error("{0}")]
    NotFound(String),
    /// Stored data does not fit the model (e.g. a stored feature of the wrong type).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A dependency is down and no degraded answer is possible.
    #[error("{0}")]
    Unavailable(String),
    /// The budget ran out.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// A bulkhead or a downstream shed the call.
    #[error("{0}")]
    Overloaded(String),
    /// A bug or an unexpected answer from a dependency (details logged).
    #[error("{0}")]
    Internal(String),
}

pub use mesh_runtime::StartupError;

impl GatewayError {
    /// The gRPC code this error maps to.
    pub fn code(&self) -> tonic::Code {
        match self {
            GatewayError::InvalidArgument(_) => tonic::Code::InvalidArgument,
            GatewayError::NotFound(_) => tonic::Code::NotFound,
            GatewayError::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            GatewayError::Unavailable(_) => tonic::Code::Unavailable,
            GatewayError::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            GatewayError::Overloaded(_) => tonic::Code::ResourceExhausted,
            GatewayError::Internal(_) => tonic::Code::Internal,
        }
    }

    /// The message callers see.
    pub fn public_message(&self) -> String {
        match self {
            GatewayError::Internal(_) => "internal error".to_owned(),
            other => other.to_string(),
        }
    }
}

impl GatewayError {
    /// A downstream's failure as the gateway's error, naming the downstream.
    pub fn from_downstream(downstream: &str, status: &tonic::Status) -> Self {
        use crate::client::CIRCUIT_OPEN;
        use tonic::Code::*;
        match status.code() {
            DeadlineExceeded | Cancelled => GatewayError::DeadlineExceeded,
            ResourceExhausted => GatewayError::Overloaded(format!("{downstream} is overloaded")),
            Unavailable if mesh_runtime::resilience::is_store_unavailable(status) => {
                GatewayError::Unavailable(format!(
                    "{downstream} cannot reach its database and has no cached features for the entity"
                ))
            }
            Unavailable if status.message().ends_with(CIRCUIT_OPEN) => {
                GatewayError::Unavailable(format!("{downstream} is unavailable ({CIRCUIT_OPEN})"))
            }
            Unavailable | Unknown => {
                GatewayError::Unavailable(format!("{downstream} is unavailable"))
            }
            InvalidArgument => GatewayError::InvalidArgument(status.message().to_owned()),
            NotFound => GatewayError::NotFound(status.message().to_owned()),
            Ok | AlreadyExists | PermissionDenied | FailedPrecondition | Aborted | OutOfRange
            | Unimplemented | Internal | DataLoss | Unauthenticated => {
                GatewayError::Internal(format!(
                    "{downstream} answered {:?}: {}",
                    status.code(),
                    status.message()
                ))
            }
        }
    }
}

impl From<GatewayError> for tonic::Status {
    fn from(e: GatewayError) -> Self {
        match &e {
            GatewayError::InvalidArgument(_)
            | GatewayError::NotFound(_)
            | GatewayError::FailedPrecondition(_)
            | GatewayError::DeadlineExceeded => tracing::info!(error = %e, "prediction refused"),
            GatewayError::Unavailable(_) | GatewayError::Overloaded(_) => {
                tracing::warn!(error = %e, "prediction failed")
            }
            GatewayError::Internal(_) => {
                tracing::error!(error = %e, "prediction failed")
            }
        }
        tonic::Status::new(e.code(), e.public_message())
    }
}

impl From<mesh_runtime::registry::RegistryError> for GatewayError {
    fn from(e: mesh_runtime::registry::RegistryError) -> Self {
        use mesh_runtime::registry::RegistryError as R;
        match e {
            R::UnknownModel(_) | R::UnknownVersion { .. } => GatewayError::NotFound(e.to_string()),
            // Only loading reads files; a request that meets these found a bug.
            R::Io { .. } | R::Json { .. } | R::Invalid(_) => GatewayError::Internal(e.to_string()),
        }
    }
}
