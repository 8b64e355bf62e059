//! Why a service cannot start, kept apart from each service's request errors: a startup
//! problem never reaches an API caller (it may name a setting), and a request error never
//! names one.

/// Why a service cannot start (or stopped serving).
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A setting cannot be used (the message names the variable).
    #[error("configuration: {0}")]
    Config(String),
    /// A setting does not parse.
    #[error("configuration: {0}")]
    Setting(#[from] crate::config::ConfigError),
    /// The model registry cannot be read.
    #[error("model registry: {0}")]
    Registry(#[from] crate::registry::RegistryError),
    /// A metric could not be registered (a bug: two with one name).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The database connection settings cannot be used.
    #[error("database: {0}")]
    Database(#[from] crate::postgres::PgError),
    /// A file or directory the service needs cannot be used.
    #[error("{what}: {source}")]
    Io {
        /// What it is, e.g. `spool /var/lib/mesh/spool`.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The server failed while serving.
    #[error("server: {0}")]
    Serve(#[from] crate::server::ServeError),
}
