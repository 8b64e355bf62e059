//! The gateway's configuration: nested sections read from `MESH_*` variables through one
//! settings table ([`SETTINGS`]), the only place a default is written. The README's table is
//! checked against it by a test.

use std::path::PathBuf;
use std::time::Duration;

use mesh_runtime::config::{ConfigError, FromSettings, ServerConfig, Setting, Settings};
use mesh_runtime::resilience::BreakerConfig;

use crate::auth::{self, ApiKey, RateLimit};
use crate::client::replicas::OutlierConfig;
use crate::error::StartupError;

mod table;

pub use table::SETTINGS;

/// Longest cool-down of an open breaker (it doubles per failed probe up to this).
const MAX_BREAKER_OPEN: Duration = Duration::from_secs(30);

/// The gateway's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address, metrics, concurrency limit and shutdown timing.
    pub server: ServerConfig,
    /// `MESH_MODELS_DIR`: manifests for validation.
    pub models_dir: PathBuf,
    /// Where the downstreams are.
    pub downstreams: Downstreams,
    /// Deadlines.
    pub budgets: Budgets,
    /// Concurrency per downstream and traffic class.
    pub bulkheads: Bulkheads,
    /// The durable spool of prediction records and its shipping.
    pub spool: SpoolSettings,
    /// Breakers, retries and outlier ejection.
    pub resilience: Resilience,
    /// API keys, rate limits and TLS on the public port.
    pub access: Access,
    /// The live model registry and the admin keys.
    pub lifecycle: crate::lifecycle::LifecycleSettings,
}

/// Where the downstreams are.
#[derive(Debug, Clone)]
pub struct Downstreams {
    /// `MESH_FEATURES_URL`.
    pub features_url: String,
    /// `MESH_INFERENCE_URLS`: the replicas: URLs, and `dns:///name:port` entries whose every
    /// address is a replica (see [`crate::client::discovery`]).
    pub inference_urls: Vec<String>,
    /// `MESH_DISCOVERY_INTERVAL_MS`: how often the DNS entries are re-resolved.
    pub discovery_interval: Duration,
    /// What resolves the DNS entries: the system's resolver (tests inject their own).
    pub resolver: crate::client::discovery::Resolver,
    /// `MESH_LOGGER_URL`.
    pub logger_url: String,
}

/// Deadlines.
#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    /// `MESH_DEFAULT_BUDGET_MS`: deadline when the caller sends no `grpc-timeout`.
    pub default: Duration,
    /// `MESH_MAX_BUDGET_MS`: no call runs longer, whatever the caller asks.
    pub max: Duration,
    /// `MESH_DOWNSTREAM_MARGIN_MS`: kept back from each downstream budget.
    pub downstream_margin: Duration,
}

/// Concurrency per downstream and traffic class.
#[derive(Debug, Clone, Copy)]
pub struct Bulkheads {
    /// `MESH_FEATURES_CONCURRENCY`: online calls to features in flight.
    pub features: usize,
    /// `MESH_INFERENCE_CONCURRENCY`: online calls to inference in flight.
    pub inference: usize,
    /// `MESH_BATCH_CONCURRENCY`: `PredictBatch` calls in flight (and their downstream calls,
    /// in compartments of their own).
    pub batch: usize,
    /// `MESH_LOGGER_CONCURRENCY`: `Record` calls in flight.
    pub logger: usize,
    /// `MESH_SHADOW_CONCURRENCY`: shadow scoring calls in flight; more are shed (counted).
    pub shadow: usize,
    /// `MESH_SHADOW_QUEUE`: shadow copies waiting per shadow; beyond, new ones are shed.
    pub shadow_queue: usize,
    /// `MESH_PREDICT_COALESCE`: `Predict`s of one model run together at most (1: never).
    pub coalesce: usize,
    /// `MESH_PREDICT_RUNS`: runs of one model in flight before further `Predict`s queue.
    pub coalesce_runs: usize,
    /// `MESH_PREDICT_RUN_STALL_MS`: a run in flight longer no longer holds back the queue.
    pub coalesce_stall: Duration,
    /// `MESH_MAX_BATCH_ITEMS`: items per `PredictBatch`.
    pub max_batch_items: usize,
}

/// The durable spool of prediction records and its shipping.
#[derive(Debug, Clone)]
pub struct SpoolSettings {
    /// `MESH_SPOOL_DIR`: one directory per gateway process (locked while in use).
    pub dir: PathBuf,
    /// `MESH_SPOOL_MAX_BYTES` of undelivered records; beyond it new records are not kept
    /// (counted, and said in the response).
    pub max_bytes: u64,
    /// `MESH_SPOOL_SEGMENT_BYTES`: size of one spool file.
    pub segment_bytes: u64,
    /// `MESH_LOG_QUEUE`: records waiting for the spool's writer thread.
    pub queue: usize,
    /// `MESH_LOG_BATCH_SIZE`: records per `Record` call.
    pub batch_size: usize,
    /// `MESH_LOG_FLUSH_MS`: longest wait before a partial batch is sent.
    pub flush: Duration,
    /// `MESH_LOG_DELIVERY_DEGRADED_MS`: delivery failing this long makes `/health` degraded.
    pub delivery_degraded_after: Duration,
}

/// Breakers, retries and outlier ejection.
#[derive(Debug, Clone, Copy)]
pub struct Resilience {
    /// `MESH_BREAKER_FAILURES` consecutive failures open a downstream's breaker for
    /// `MESH_BREAKER_OPEN_MS`, doubling per failed probe up to 30 s.
    pub breaker: BreakerConfig,
    /// `MESH_RETRY_BUDGET_RATIO`: retries may add this share of requests…
    pub retry_ratio: f32,
    /// …plus `MESH_RETRY_BUDGET_FLOOR` per second.
    pub retry_floor: u32,
    /// Outlier detection of inference replicas (`MESH_OUTLIER_*`).
    pub outlier: OutlierConfig,
}

/// API keys, rate limits and TLS on the public port.
#[derive(Debug, Clone)]
pub struct Access {
    /// `MESH_API_KEYS`: `id:secret` pairs; empty turns access control off (local use only).
    pub api_keys: Vec<ApiKey>,
    /// `MESH_RATE_LIMIT_RPS` and `MESH_RATE_LIMIT_BURST` per key; `None` when `off`.
    pub rate_limit: Option<RateLimit>,
    /// `MESH_TLS_CERT` and `MESH_TLS_KEY`: both or neither (plaintext, for local use or behind
    /// a TLS-terminating proxy).
    pub tls: Option<TlsFiles>,
}

/// Where the public port's TLS identity is.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

impl FromSettings for Config {
    const SETTINGS: &'static [Setting] = SETTINGS;

    fn read(s: &Settings<'_>) -> Result<Self, StartupError> {
        Ok(Self {
            server: ServerConfig::read(s)?,
            models_dir: PathBuf::from(s.string("MESH_MODELS_DIR")),
            downstreams: read_downstreams(s)?,
            budgets: Budgets {
                default: s.millis("MESH_DEFAULT_BUDGET_MS")?,
                max: s.millis("MESH_MAX_BUDGET_MS")?,
                downstream_margin: s.millis("MESH_DOWNSTREAM_MARGIN_MS")?,
            },
            bulkheads: Bulkheads {
                features: s.positive("MESH_FEATURES_CONCURRENCY")?,
                inference: s.positive("MESH_INFERENCE_CONCURRENCY")?,
                batch: s.positive("MESH_BATCH_CONCURRENCY")?,
                logger: s.positive("MESH_LOGGER_CONCURRENCY")?,
                shadow: s.positive("MESH_SHADOW_CONCURRENCY")?,
                shadow_queue: s.positive("MESH_SHADOW_QUEUE")?,
                coalesce: s.positive("MESH_PREDICT_COALESCE")?,
                coalesce_runs: s.positive("MESH_PREDICT_RUNS")?,
                coalesce_stall: Duration::from_millis(
                    s.positive("MESH_PREDICT_RUN_STALL_MS")? as u64
                ),
                max_batch_items: s.positive("MESH_MAX_BATCH_ITEMS")?,
            },
            spool: SpoolSettings {
                dir: PathBuf::from(s.string("MESH_SPOOL_DIR")),
                max_bytes: s.positive("MESH_SPOOL_MAX_BYTES")? as u64,
                segment_bytes: s.positive("MESH_SPOOL_SEGMENT_BYTES")? as u64,
                queue: s.positive("MESH_LOG_QUEUE")?,
                batch_size: s.positive("MESH_LOG_BATCH_SIZE")?,
                flush: s.millis("MESH_LOG_FLUSH_MS")?,
                delivery_degraded_after: s.millis("MESH_LOG_DELIVERY_DEGRADED_MS")?,
            },
            resilience: read_resilience(s)?,
            access: read_access(s)?,
            lifecycle: crate::lifecycle::LifecycleSettings::read(s)?,
        })
    }
}

fn read_downstreams(s: &Settings<'_>) -> Result<Downstreams, StartupError> {
    let inference_urls = s.list("MESH_INFERENCE_URLS");
    crate::client::discovery::parse_targets(&inference_urls)
        .map_err(|problem| invalid("MESH_INFERENCE_URLS", inference_urls.join(","), &problem))?;
    let discovery_interval = s.millis("MESH_DISCOVERY_INTERVAL_MS")?;
    if discovery_interval.is_zero() {
        return Err(invalid("MESH_DISCOVERY_INTERVAL_MS", 0, "must be above 0"));
    }
    Ok(Downstreams {
        features_url: s.string("MESH_FEATURES_URL"),
        inference_urls,
        discovery_interval,
        resolver: Default::default(),
        logger_url: s.string("MESH_LOGGER_URL"),
    })
}

fn read_resilience(s: &Settings<'_>) -> Result<Resilience, StartupError> {
    let percent = s.positive("MESH_OUTLIER_MAX_EJECTED_PERCENT")?;
    if percent > 100 {
        return Err(invalid(
            "MESH_OUTLIER_MAX_EJECTED_PERCENT",
            percent,
            "must be at most 100",
        ));
    }
    let ratio: f32 = s.parse("MESH_RETRY_BUDGET_RATIO")?;
    if !(0.0..=1000.0).contains(&ratio) {
        return Err(invalid(
            "MESH_RETRY_BUDGET_RATIO",
            ratio,
            "must be between 0 and 1000",
        ));
    }
    Ok(Resilience {
        breaker: BreakerConfig {
            failure_threshold: s.positive("MESH_BREAKER_FAILURES")? as u32,
            open_for: s.millis("MESH_BREAKER_OPEN_MS")?,
            max_open_for: MAX_BREAKER_OPEN,
        },
        retry_ratio: ratio,
        retry_floor: s.parse("MESH_RETRY_BUDGET_FLOOR")?,
        outlier: OutlierConfig {
            consecutive_failures: s.positive("MESH_OUTLIER_CONSECUTIVE_FAILURES")? as u32,
            base_ejection: s.millis("MESH_OUTLIER_BASE_EJECTION_MS")?,
            max_ejection: s.millis("MESH_OUTLIER_MAX_EJECTION_MS")?,
            max_ejected_percent: percent as u32,
        },
    })
}

fn read_access(s: &Settings<'_>) -> Result<Access, StartupError> {
    let tls = match (s.raw("MESH_TLS_CERT"), s.raw("MESH_TLS_KEY")) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
        }),
        _ => {
            return Err(StartupError::Config(
                "MESH_TLS_CERT and MESH_TLS_KEY go together: set both (PEM files) or neither"
                    .into(),
            ))
        }
    };
    let rate_limit = match s.string("MESH_RATE_LIMIT_RPS").trim() {
        "off" => None,
        _ => {
            let per_second: f64 = s.parse("MESH_RATE_LIMIT_RPS")?;
            let burst: f64 = s
                .parse_optional("MESH_RATE_LIMIT_BURST")?
                .unwrap_or(per_second * 2.0);
            if !(per_second > 0.0 && burst >= 1.0) {
                return Err(StartupError::Config(
                    "MESH_RATE_LIMIT_RPS must be > 0 and MESH_RATE_LIMIT_BURST >= 1".into(),
                ));
            }
            Some(RateLimit { per_second, burst })
        }
    };
    Ok(Access {
        api_keys: auth::parse_keys(&s.string("MESH_API_KEYS")).map_err(StartupError::Config)?,
        rate_limit,
        tls,
    })
}

fn invalid(variable: &str, value: impl std::fmt::Display, problem: &str) -> StartupError {
    StartupError::from(ConfigError {
        variable: variable.to_owned(),
        value: value.to_string(),
        problem: problem.to_owned(),
    })
}

impl TlsFiles {
    /// Reads both files; fails naming the one that cannot be read.
    pub fn load(&self) -> Result<tonic::transport::ServerTlsConfig, StartupError> {
        let read = |path: &PathBuf, variable: &str| {
            std::fs::read(path)
                .map_err(|e| StartupError::Config(format!("{variable}={}: {e}", path.display())))
        };
        let cert = read(&self.cert, "MESH_TLS_CERT")?;
        let key = read(&self.key, "MESH_TLS_KEY")?;
        for (bytes, variable, what) in [
            (&cert, "MESH_TLS_CERT", "CERTIFICATE"),
            (&key, "MESH_TLS_KEY", "PRIVATE KEY"),
        ] {
            if !String::from_utf8_lossy(bytes).contains(&format!("{what}-----")) {
                return Err(StartupError::Config(format!(
                    "{variable}: no PEM {what} block in the file"
                )));
            }
        }
        Ok(tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_read_into_their_sections_and_bad_values_are_named() {
        let defaults = Config::defaults();
        assert_eq!(defaults.budgets.default, Duration::from_millis(250));
        assert_eq!(defaults.downstreams.inference_urls.len(), 2);
        assert_eq!(defaults.access.rate_limit.map(|r| r.burst), Some(2000.0));
        assert!(defaults.access.tls.is_none());
        let table = |pairs: &'static [(&'static str, &'static str)]| {
            Settings::with(SETTINGS, move |v| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == v)
                    .map(|(_, x)| (*x).to_owned())
            })
        };
        let error = Config::read(&table(&[("MESH_OUTLIER_MAX_EJECTED_PERCENT", "101")]))
            .expect_err("over 100");
        assert!(
            error
                .to_string()
                .contains("MESH_OUTLIER_MAX_EJECTED_PERCENT"),
            "{error}"
        );
        let error =
            Config::read(&table(&[("MESH_TLS_CERT", "cert.pem")])).expect_err("cert without key");
        assert!(error.to_string().contains("MESH_TLS_KEY"), "{error}");
        let error = Config::read(&table(&[("MESH_INFERENCE_URLS", "dns:///inference")]))
            .expect_err("a DNS entry without a port");
        assert!(error.to_string().contains("needs a port"), "{error}");
        let discovered = Config::read(&table(&[(
            "MESH_INFERENCE_URLS",
            "dns:///inference.mesh.svc:50053,http://10.0.0.7:50053",
        )]))
        .expect("a DNS entry beside a URL");
        assert_eq!(discovered.downstreams.inference_urls.len(), 2);
        assert_eq!(
            defaults.downstreams.discovery_interval,
            Duration::from_secs(5)
        );
        let off = Config::read(&table(&[("MESH_RATE_LIMIT_RPS", "off")])).expect("off");
        assert!(off.access.rate_limit.is_none());
    }
}
