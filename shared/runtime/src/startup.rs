//! Why a service cannot start, kept apart from each service's request errors: a startup
//! problem never reaches an API caller (it may name a setting), and a request error never
//! names one.
//!
//! Each variant's message already includes its cause, so none is also reported as a
//! `source` (which `anyhow` would print a second time under "Caused by").

/// Why a service cannot start (or stopped serving).
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A setting cannot be used (the message names the variable).
    #[error("configuration: {0}")]
    Config(String),
    /// A setting does not parse.
    #[error("configuration: {0}")]
    Setting(crate::config::ConfigError),
    /// The model registry cannot be read.
    #[error("model registry: {0}")]
    Registry(crate::registry::RegistryError),
    /// A metric could not be registered (a bug: two with one name).
    #[error("metrics: {0}")]
    Metrics(prometheus::Error),
    /// The database connection settings cannot be used.
    #[error("database: {0}")]
    Database(crate::postgres::PgError),
    /// A file or directory the service needs cannot be used.
    #[error("{what}: {error}")]
    Io {
        /// What it is, e.g. `spool /var/lib/mesh/spool`.
        what: String,
        /// Why.
        error: std::io::Error,
    },
    /// The server failed while serving.
    #[error("server: {0}")]
    Serve(crate::server::ServeError),
}

macro_rules! from_cause {
    ($($cause:ty => $variant:ident),* $(,)?) => {$(
        impl From<$cause> for StartupError {
            fn from(cause: $cause) -> Self {
                StartupError::$variant(cause)
            }
        }
    )*};
}

from_cause!(
    crate::config::ConfigError => Setting,
    crate::registry::RegistryError => Registry,
    prometheus::Error => Metrics,
    crate::postgres::PgError => Database,
    crate::server::ServeError => Serve,
);
