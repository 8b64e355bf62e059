//! The inference service's errors and their one mapping to gRPC status.

/// Everything that can go wrong serving an inference.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// The request is malformed; the message names the offending input.
    #[error("{0}")]
    InvalidInput(String),
    /// No such model or version.
    #[error("{0}")]
    NotFound(String),
    /// Models are still loading or warming up.
    #[error("models are not loaded yet; retry shortly")]
    NotReady,
    /// This version is loading on this replica (another may have it).
    #[error("{0}")]
    VersionLoading(String),
    /// This version failed to load or failed its golden fixture here: it takes no traffic.
    #[error("{0}")]
    VersionFailed(String),
    /// ONNX Runtime failed (details are logged, not returned).
    #[error("onnx runtime: {0}")]
    Runtime(String),
}

impl From<InferenceError> for tonic::Status {
    fn from(e: InferenceError) -> Self {
        match e {
            InferenceError::InvalidInput(msg) => {
                tracing::info!(error = %msg, "invalid inference request");
                tonic::Status::invalid_argument(msg)
            }
            InferenceError::NotFound(msg) => {
                tracing::info!(error = %msg, "unknown model");
                tonic::Status::not_found(msg)
            }
            InferenceError::NotReady | InferenceError::VersionLoading(_) => {
                tonic::Status::unavailable(e.to_string())
            }
            InferenceError::VersionFailed(msg) => tonic::Status::failed_precondition(msg),
            InferenceError::Runtime(msg) => {
                tracing::error!(error = %msg, "inference failed");
                tonic::Status::internal("inference failed")
            }
        }
    }
}

impl From<mesh_runtime::registry::RegistryError> for InferenceError {
    fn from(e: mesh_runtime::registry::RegistryError) -> Self {
        use mesh_runtime::registry::RegistryError as R;
        match e {
            R::UnknownModel(_) | R::UnknownVersion { .. } => {
                InferenceError::NotFound(e.to_string())
            }
            // The registry is read while loading; these say it cannot be used.
            R::Io { .. } | R::Json { .. } | R::Invalid(_) => InferenceError::Runtime(e.to_string()),
        }
    }
}
