//! The inference service's configuration: sections read from `MESH_*` variables (and
//! `ORT_DYLIB_PATH`) through one settings table ([`SETTINGS`]), the only place a default is
//! written.

use std::path::PathBuf;

use mesh_runtime::config::{FromSettings, ServerConfig, Setting, Settings};
use mesh_runtime::StartupError;

/// Every variable inference reads, with its default.
pub const SETTINGS: &[Setting] = mesh_runtime::settings_table!(
    "0.0.0.0:50053", "0.0.0.0:9103", "256";
    Setting::value("MESH_MODELS_DIR", "models", "model registry"),
    Setting::unset("ORT_DYLIB_PATH", "none (required)", "path to `libonnxruntime.so`"),
    Setting::derived("MESH_SESSIONS_PER_MODEL", "number of cores", "ONNX Runtime sessions per model version"),
    Setting::value("MESH_WARMUP_ITERATIONS", "20", "warm-up runs per session before `SERVING`"),
    Setting::value("MESH_MAX_BATCH_ROWS", "4096", "rows per `ModelInfer`"),
    Setting::derived("MESH_REPLICA_ID", "the listen address", "reported in `ServerMetadata`"),
    Setting::unset("MESH_REGISTRY_DATABASE_URL", "unset: every version on disk, production from aliases.json", "PostgreSQL of the live model registry, followed for what to load"),
    Setting::value("MESH_REGISTRY_INTERVAL_MS", "1000", "re-read the live registry at least this often (changes are notified at once)"),
);

/// The inference service's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address, metrics, concurrency limit and shutdown timing.
    pub server: ServerConfig,
    /// Where the models are and how they are run.
    pub models: ModelSettings,
    /// `MESH_MAX_BATCH_ROWS`: rows per `ModelInfer` call.
    pub max_batch_rows: usize,
    /// `MESH_REPLICA_ID`, reported in `ServerMetadata`; default the listen address.
    pub replica_id: String,
    /// `MESH_REGISTRY_*`: the live model registry to follow, if any.
    pub registry: mesh_registry::RegistrySettings,
}

/// Where the models are and how they are run.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    /// `MESH_MODELS_DIR`: the registry.
    pub dir: PathBuf,
    /// `ORT_DYLIB_PATH`: the ONNX Runtime shared library.
    pub ort_dylib: PathBuf,
    /// `MESH_SESSIONS_PER_MODEL`: sessions per model version (default: the cores).
    pub sessions_per_model: usize,
    /// `MESH_WARMUP_ITERATIONS`: warm-up runs per session before SERVING.
    pub warmup_iterations: usize,
}

impl FromSettings for Config {
    const SETTINGS: &'static [Setting] = SETTINGS;

    fn read(s: &Settings<'_>) -> Result<Self, StartupError> {
        let server = ServerConfig::read(s)?;
        let ort_dylib = s.raw("ORT_DYLIB_PATH").map(PathBuf::from).ok_or_else(|| {
            StartupError::Config(
                "ORT_DYLIB_PATH is not set: point it at libonnxruntime.so (scripts/bootstrap.sh installs one)".into(),
            )
        })?;
        Ok(Self {
            models: ModelSettings {
                dir: PathBuf::from(s.string("MESH_MODELS_DIR")),
                ort_dylib,
                sessions_per_model: s
                    .positive_optional("MESH_SESSIONS_PER_MODEL")?
                    .unwrap_or_else(default_parallelism),
                warmup_iterations: s.parse("MESH_WARMUP_ITERATIONS")?,
            },
            max_batch_rows: s.positive("MESH_MAX_BATCH_ROWS")?,
            registry: mesh_registry::RegistrySettings::read(s)?,
            replica_id: s
                .raw("MESH_REPLICA_ID")
                .unwrap_or_else(|| server.listen_addr.clone()),
            server,
        })
    }
}

/// Cores available to this process.
pub fn default_parallelism() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}
