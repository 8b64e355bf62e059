//! Configuration from environment variables. Every setting has a documented default; a value
//! that does not parse is an error naming the variable and the value, raised before binding.

use std::str::FromStr;
use std::time::Duration;

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {problem} (got {value:?})")]
pub struct ConfigError {
    /// The environment variable.
    pub variable: String,
    /// Its value.
    pub value: String,
    /// What is wrong with it.
    pub problem: String,
}

/// Reads an environment variable; unset or empty means `None`.
pub fn env_str(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Parses `name` as `T`, or returns `default` when it is unset.
pub fn env_parse<T>(name: &str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    match env_str(name) {
        None => Ok(default),
        Some(raw) => raw.trim().parse::<T>().map_err(|e| ConfigError {
            variable: name.to_owned(),
            value: raw,
            problem: e.to_string(),
        }),
    }
}

/// Parses `name` as a whole number of milliseconds.
pub fn env_millis(name: &str, default: Duration) -> Result<Duration, ConfigError> {
    let ms = env_parse::<u64>(name, default.as_millis() as u64)?;
    Ok(Duration::from_millis(ms))
}

/// Parses `name` as a positive count (a limit of zero would refuse all work).
pub fn env_positive(name: &str, default: usize) -> Result<usize, ConfigError> {
    let value = env_parse::<usize>(name, default)?;
    if value == 0 {
        return Err(ConfigError {
            variable: name.to_owned(),
            value: "0".to_owned(),
            problem: "must be at least 1".to_owned(),
        });
    }
    Ok(value)
}

/// Parses a comma-separated list; unset means `default`.
pub fn env_list(name: &str, default: &[&str]) -> Vec<String> {
    match env_str(name) {
        None => default.iter().map(|s| (*s).to_owned()).collect(),
        Some(raw) => raw
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
    }
}

/// `MESH_METRICS_ADDR` with a per-service default; `off` disables the endpoint.
pub fn metrics_addr(default: &str) -> Option<String> {
    match env_str("MESH_METRICS_ADDR") {
        Some(v) if v == "off" => None,
        Some(v) => Some(v),
        None => Some(default.to_owned()),
    }
}

/// The settings every service has, from the same variables everywhere.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `MESH_LISTEN_ADDR`: the gRPC address.
    pub listen_addr: String,
    /// `MESH_METRICS_ADDR`: the `/metrics` address; `off` disables it.
    pub metrics_addr: Option<String>,
    /// `MESH_MAX_CONCURRENCY`: concurrent RPCs before the server sheds.
    pub max_concurrency: usize,
    /// `MESH_DRAIN_DELAY_MS`, default 1000: answering on after health turned NOT_SERVING.
    pub drain_delay: Duration,
    /// `MESH_GRACE_MS`, default 10000: the wait for in-flight calls at shutdown.
    pub grace: Duration,
}

impl ServerConfig {
    /// Reads the common variables with this service's defaults.
    pub fn from_env(
        default_listen: &str,
        default_metrics: &str,
        default_concurrency: usize,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            listen_addr: env_str("MESH_LISTEN_ADDR").unwrap_or_else(|| default_listen.to_owned()),
            metrics_addr: metrics_addr(default_metrics),
            max_concurrency: env_positive("MESH_MAX_CONCURRENCY", default_concurrency)?,
            drain_delay: env_millis("MESH_DRAIN_DELAY_MS", Duration::from_secs(1))?,
            grace: env_millis("MESH_GRACE_MS", Duration::from_secs(10))?,
        })
    }

    /// Serving options for `services` with these settings.
    pub fn serve_options(&self, services: Vec<&'static str>) -> crate::ServeOptions {
        let mut options = crate::ServeOptions::new(services);
        options.max_concurrency = self.max_concurrency;
        options.drain_delay = self.drain_delay;
        options.grace = self.grace;
        options
    }
}
