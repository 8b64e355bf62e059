//! The logger's errors and their one mapping to gRPC status.

/// Everything that can go wrong in the prediction log.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    /// A record is malformed; the message names it.
    #[error("{0}")]
    InvalidArgument(String),
    /// The in-memory queue is full (the database is behind or down).
    #[error("prediction log queue is full")]
    QueueFull,
    /// No record with that id (yet).
    #[error("{0}")]
    NotFound(String),
    /// PostgreSQL is unreachable.
    #[error("database: {0}")]
    Unavailable(String),
}

impl From<LoggerError> for tonic::Status {
    fn from(e: LoggerError) -> Self {
        match e {
            LoggerError::InvalidArgument(msg) => {
                tracing::info!(error = %msg, "invalid records");
                tonic::Status::invalid_argument(msg)
            }
            LoggerError::QueueFull => {
                tracing::error!("prediction log queue full; shedding");
                tonic::Status::resource_exhausted("prediction log queue is full; retry later")
            }
            LoggerError::NotFound(msg) => tonic::Status::not_found(msg),
            LoggerError::Unavailable(msg) => {
                tracing::error!(error = %msg, "database unavailable");
                tonic::Status::unavailable("prediction log database unavailable")
            }
        }
    }
}
