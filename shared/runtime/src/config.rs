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
