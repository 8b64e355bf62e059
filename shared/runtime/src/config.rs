//! Configuration from environment variables, with every default in one place: each service
//! declares a table of [`Setting`]s (variable, default, meaning), reads its sections through
//! [`Settings`], and a test checks the README's configuration table against those tables. A
//! value that does not parse is a [`ConfigError`] naming the variable and the value, raised
//! before anything binds.

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

/// The default of a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Default {
    /// This value, parsed like one from the environment.
    Value(&'static str),
    /// Worked out at start (the text says from what, as the README says it).
    Derived(&'static str),
    /// No value (the text says what that means).
    Unset(&'static str),
}

/// One environment variable a service reads.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The variable, e.g. `MESH_LISTEN_ADDR`.
    pub variable: &'static str,
    /// Its default.
    pub default: Default,
    /// What it sets.
    pub help: &'static str,
}

impl Setting {
    /// A setting with a literal default.
    pub const fn value(variable: &'static str, default: &'static str, help: &'static str) -> Self {
        Self {
            variable,
            default: Default::Value(default),
            help,
        }
    }

    /// A setting whose default is worked out at start.
    pub const fn derived(variable: &'static str, from: &'static str, help: &'static str) -> Self {
        Self {
            variable,
            default: Default::Derived(from),
            help,
        }
    }

    /// A setting that is off unless set.
    pub const fn unset(variable: &'static str, meaning: &'static str, help: &'static str) -> Self {
        Self {
            variable,
            default: Default::Unset(meaning),
            help,
        }
    }
}

/// A service's settings table: the settings every service has (read by
/// [`ServerConfig::read`]), with this service's listen address, metrics address and concurrency
/// limit, then its own settings.
#[macro_export]
macro_rules! settings_table {
    ($listen:expr, $metrics:expr, $concurrency:expr; $($setting:expr),* $(,)?) => {
        &[
            $crate::config::Setting::value("MESH_LISTEN_ADDR", $listen, "gRPC listen address"),
            $crate::config::Setting::value(
                "MESH_METRICS_ADDR",
                $metrics,
                "`/metrics` address; `off` disables it",
            ),
            $crate::config::Setting::value(
                "MESH_MAX_CONCURRENCY",
                $concurrency,
                "concurrent RPCs before shedding with `RESOURCE_EXHAUSTED`",
            ),
            $crate::config::Setting::value(
                "MESH_DRAIN_DELAY_MS",
                "1000",
                "keep answering this long after health turns `NOT_SERVING`",
            ),
            $crate::config::Setting::value(
                "MESH_GRACE_MS",
                "10000",
                "longest wait for in-flight calls (and for flushing queued records)",
            ),
            $crate::config::Setting::value(
                "MESH_MAX_CONNECTIONS",
                "4096",
                "open client connections; one more is closed on arrival",
            ),
            $crate::config::Setting::value(
                "MESH_MAX_CONNECTIONS_PER_PEER",
                "512",
                "open client connections from one IP address",
            ),
            $crate::config::Setting::value(
                "MESH_FIRST_REQUEST_TIMEOUT_MS",
                "10000",
                "close a connection that has started no call this long after opening",
            ),
            $crate::config::Setting::value(
                "MESH_IDLE_TIMEOUT_MS",
                "300000",
                "close a connection with no call in flight for this long",
            ),
            $crate::config::Setting::value(
                "MESH_KEEPALIVE_MS",
                "20000",
                "HTTP/2 ping interval; a peer that does not answer within as long is closed",
            ),
            $crate::config::Setting::value(
                "MESH_MAX_STREAMS_PER_CONNECTION",
                "256",
                "concurrent calls on one connection",
            ),
            $crate::config::Setting::unset(
                "MESH_INTERNAL_TOKEN",
                "unset: internal services refuse to start",
                "shared secret of the internal hops (16+ visible ASCII characters): features, inference and the logger require it in `x-mesh-internal-token`; the gateway presents it",
            ),
            $($setting),*
        ]
    };
}

/// Where setting values come from: a variable's name to its value, if set.
type Lookup<'a> = Box<dyn Fn(&str) -> Option<String> + 'a>;

/// Values of a service's settings: from a lookup (the environment, or a test's map), else the
/// table's defaults.
pub struct Settings<'a> {
    table: &'a [Setting],
    lookup: Lookup<'a>,
}

impl<'a> Settings<'a> {
    /// `table`'s settings from the process environment.
    pub fn from_env(table: &'a [Setting]) -> Self {
        Self::with(table, |name| std::env::var(name).ok())
    }

    /// `table`'s defaults only (tests start from these).
    pub fn defaults(table: &'a [Setting]) -> Self {
        Self::with(table, |_| None)
    }

    /// `table`'s settings from `lookup`.
    pub fn with(table: &'a [Setting], lookup: impl Fn(&str) -> Option<String> + 'a) -> Self {
        Self {
            table,
            lookup: Box::new(lookup),
        }
    }

    /// The raw value: set and not blank, else the literal default; `None` for a derived or
    /// unset default.
    pub fn raw(&self, variable: &str) -> Option<String> {
        let set = (self.lookup)(variable).filter(|v| !v.trim().is_empty());
        if set.is_some() {
            return set;
        }
        let setting = self.table.iter().find(|s| s.variable == variable);
        debug_assert!(setting.is_some(), "{variable} is not in the settings table");
        match setting.map(|s| s.default) {
            Some(Default::Value(v)) => Some(v.to_owned()),
            _ => None,
        }
    }

    /// The value as a string (empty if unset without a default).
    pub fn string(&self, variable: &str) -> String {
        self.raw(variable).unwrap_or_default()
    }

    /// The value, or `None` if unset or `off`.
    pub fn optional(&self, variable: &str) -> Option<String> {
        self.raw(variable).filter(|v| v.trim() != "off")
    }

    /// The value parsed as `T`; `None` if unset without a default.
    pub fn parse_optional<T>(&self, variable: &str) -> Result<Option<T>, ConfigError>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        self.raw(variable)
            .map(|raw| {
                raw.trim().parse::<T>().map_err(|e| ConfigError {
                    variable: variable.to_owned(),
                    value: raw.clone(),
                    problem: e.to_string(),
                })
            })
            .transpose()
    }

    /// The value parsed as `T`.
    pub fn parse<T>(&self, variable: &str) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        self.parse_optional(variable)?.ok_or_else(|| ConfigError {
            variable: variable.to_owned(),
            value: String::new(),
            problem: "must be set".to_owned(),
        })
    }

    /// A whole number of milliseconds.
    pub fn millis(&self, variable: &str) -> Result<Duration, ConfigError> {
        Ok(Duration::from_millis(self.parse::<u64>(variable)?))
    }

    /// A positive count (a limit of zero would refuse all work); `None` if unset without a
    /// default.
    pub fn positive_optional(&self, variable: &str) -> Result<Option<usize>, ConfigError> {
        match self.parse_optional::<usize>(variable)? {
            Some(0) => Err(ConfigError {
                variable: variable.to_owned(),
                value: "0".to_owned(),
                problem: "must be at least 1".to_owned(),
            }),
            other => Ok(other),
        }
    }

    /// A positive count.
    pub fn positive(&self, variable: &str) -> Result<usize, ConfigError> {
        self.positive_optional(variable)?
            .ok_or_else(|| ConfigError {
                variable: variable.to_owned(),
                value: String::new(),
                problem: "must be set".to_owned(),
            })
    }

    /// A comma-separated list.
    pub fn list(&self, variable: &str) -> Vec<String> {
        self.string(variable)
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    }
}

/// A service's configuration, read from its settings table.
pub trait FromSettings: Sized {
    /// Every variable the service reads, with its default.
    const SETTINGS: &'static [Setting];

    /// Reads every section from `settings`; fails naming the variable that cannot be used.
    fn read(settings: &Settings<'_>) -> Result<Self, crate::StartupError>;

    /// Reads the process environment.
    fn from_env() -> Result<Self, crate::StartupError> {
        Self::read(&Settings::from_env(Self::SETTINGS))
    }

    /// The table's defaults (tests start from these and change what they need). Panics only
    /// if a default in the table does not parse, which the services' tests would show.
    fn defaults() -> Self {
        match Self::read(&Settings::defaults(Self::SETTINGS)) {
            Ok(config) => config,
            Err(e) => panic!("a default in the settings table does not parse: {e}"),
        }
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
    /// `MESH_DRAIN_DELAY_MS`: answering on after health turned NOT_SERVING.
    pub drain_delay: Duration,
    /// `MESH_GRACE_MS`: the wait for in-flight calls at shutdown.
    pub grace: Duration,
    /// `MESH_MAX_CONNECTIONS*`, `MESH_*_TIMEOUT_MS`, `MESH_KEEPALIVE_MS`,
    /// `MESH_MAX_STREAMS_PER_CONNECTION`: what connections the server keeps.
    pub connections: crate::connections::ConnectionLimits,
    /// `MESH_INTERNAL_TOKEN`: required by internal services, presented by the gateway.
    pub internal_token: Option<crate::internal::InternalToken>,
}

impl ServerConfig {
    /// Reads the settings every service has (see [`settings_table!`](crate::settings_table)).
    pub fn read(settings: &Settings<'_>) -> Result<Self, ConfigError> {
        Ok(Self {
            listen_addr: settings.string("MESH_LISTEN_ADDR"),
            metrics_addr: settings.optional("MESH_METRICS_ADDR"),
            max_concurrency: settings.positive("MESH_MAX_CONCURRENCY")?,
            drain_delay: settings.millis("MESH_DRAIN_DELAY_MS")?,
            grace: settings.millis("MESH_GRACE_MS")?,
            connections: crate::connections::ConnectionLimits {
                max_total: settings.positive("MESH_MAX_CONNECTIONS")?,
                max_per_peer: settings.positive("MESH_MAX_CONNECTIONS_PER_PEER")?,
                first_request_timeout: settings.millis("MESH_FIRST_REQUEST_TIMEOUT_MS")?,
                idle_timeout: settings.millis("MESH_IDLE_TIMEOUT_MS")?,
                keepalive: settings.millis("MESH_KEEPALIVE_MS")?,
                max_streams: settings.positive("MESH_MAX_STREAMS_PER_CONNECTION")? as u32,
            },
            internal_token: match settings.optional("MESH_INTERNAL_TOKEN") {
                None => None,
                Some(token) => Some(crate::internal::InternalToken::new(&token).map_err(
                    |problem| ConfigError {
                        variable: "MESH_INTERNAL_TOKEN".into(),
                        value: "<hidden>".into(),
                        problem,
                    },
                )?),
            },
        })
    }

    /// Serving options for `services` with these settings (no internal token required: the
    /// gateway's public port).
    pub fn serve_options(&self, services: Vec<&'static str>) -> crate::ServeOptions {
        let mut options = crate::ServeOptions::new(services);
        options.max_concurrency = self.max_concurrency;
        options.drain_delay = self.drain_delay;
        options.grace = self.grace;
        options.connections = self.connections;
        options
    }

    /// Serving options for an internal service: every call but health's must present
    /// `MESH_INTERNAL_TOKEN`, so the service refuses to start without one.
    pub fn internal_serve_options(
        &self,
        services: Vec<&'static str>,
    ) -> Result<crate::ServeOptions, crate::StartupError> {
        let token = self.internal_token.clone().ok_or_else(|| {
            crate::StartupError::Config(
                "MESH_INTERNAL_TOKEN is not set: internal services answer only callers that \
                 present this shared secret (set the same value on the gateway; `make up` \
                 generates one in .run/internal-token)"
                    .into(),
            )
        })?;
        let mut options = self.serve_options(services);
        options.internal_token = Some(token);
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &[Setting] = &[
        Setting::value("MESH_A_MS", "250", "a"),
        Setting::unset("MESH_B", "unset (off)", "b"),
        Setting::value("MESH_C", "4", "c"),
    ];

    #[test]
    fn values_come_from_the_lookup_else_the_table() {
        let settings = Settings::with(TABLE, |v| (v == "MESH_C").then(|| "8".to_owned()));
        assert_eq!(
            settings.millis("MESH_A_MS").expect("default"),
            Duration::from_millis(250)
        );
        assert_eq!(settings.positive("MESH_C").expect("set"), 8);
        assert_eq!(settings.optional("MESH_B"), None);
        let bad = Settings::with(TABLE, |_| Some("0".to_owned()));
        let error = bad.positive("MESH_C").expect_err("zero");
        assert_eq!(error.to_string(), "MESH_C: must be at least 1 (got \"0\")");
        let bad = Settings::with(TABLE, |_| Some("soon".to_owned()));
        assert!(bad
            .millis("MESH_A_MS")
            .expect_err("not a number")
            .to_string()
            .starts_with("MESH_A_MS:"));
    }
}
