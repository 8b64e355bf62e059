//! The model registry on disk, as the gateway (validation) and inference (loading) both read it:
//!
//! ```text
//! models/<name>/aliases.json          {"production": "<version>"}
//! models/<name>/<version>/model.onnx  the graph, preprocessing included
//! models/<name>/<version>/manifest.json   named, typed features and the output to read
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A feature's type as the model sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureKind {
    /// A number, fed to the model as float32.
    Number,
    /// A category, fed to the model as a string.
    Category,
}

impl FeatureKind {
    /// The word users see in errors.
    pub fn as_str(self) -> &'static str {
        match self {
            FeatureKind::Number => "number",
            FeatureKind::Category => "category",
        }
    }
}

/// Where a feature normally comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureSource {
    /// The feature store, by entity id.
    Entity,
    /// The caller, with each request.
    Request,
}

/// One input feature of a model.
#[derive(Debug, Clone, Deserialize)]
pub struct FeatureSpec {
    /// Name, equal to the ONNX input's name.
    pub name: String,
    /// Type.
    #[serde(rename = "type")]
    pub kind: FeatureKind,
    /// Usual origin.
    pub source: FeatureSource,
    /// The categories the graph's one-hot encoding was trained on. A value outside them is
    /// refused (the graph would encode it as all-zero, silently), unless `open_ended`.
    #[serde(default)]
    pub categories: Vec<String>,
    /// Whether values outside `categories` are accepted (and encoded as all-zero by the graph).
    #[serde(default)]
    pub open_ended: bool,
}

impl FeatureSpec {
    /// Whether `value` is a category this feature accepts.
    pub fn allows_category(&self, value: &str) -> bool {
        self.open_ended || self.categories.iter().any(|c| c == value)
    }
}

/// Which output carries the score.
#[derive(Debug, Clone, Deserialize)]
pub struct OutputSpec {
    /// ONNX output name, e.g. `probabilities`.
    pub name: String,
    /// Column of that output holding the score, e.g. 1 for the positive class.
    pub index: usize,
}

/// `manifest.json` of one model version.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelManifest {
    /// Model name (equal to its directory).
    pub name: String,
    /// Version (equal to its directory).
    pub version: String,
    /// What the model does.
    #[serde(default)]
    pub description: String,
    /// Inputs, in order.
    pub features: Vec<FeatureSpec>,
    /// Score output.
    pub output: OutputSpec,
}

impl ModelManifest {
    /// The feature called `name`.
    pub fn feature(&self, name: &str) -> Option<&FeatureSpec> {
        self.features.iter().find(|f| f.name == name)
    }
}

/// One version on disk.
#[derive(Debug, Clone)]
pub struct ModelVersion {
    /// Its manifest.
    pub manifest: ModelManifest,
    /// Path of `model.onnx`.
    pub model_path: PathBuf,
}

/// All versions of one model.
#[derive(Debug, Clone)]
pub struct Model {
    /// Name.
    pub name: String,
    /// Version the `production` alias points at.
    pub production: String,
    /// Versions by name.
    pub versions: BTreeMap<String, ModelVersion>,
}

/// Every model under a registry directory.
#[derive(Debug, Clone, Default)]
pub struct ModelRegistry {
    /// Models by name.
    pub models: BTreeMap<String, Model>,
}

/// A registry that cannot be read, or a lookup that finds nothing.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A file is missing or unreadable.
    #[error("model registry: cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A JSON file does not parse.
    #[error("model registry: {path} is not valid: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// The registry is inconsistent.
    #[error("model registry: {0}")]
    Invalid(String),
    /// No model by that name.
    #[error("unknown model {0:?}")]
    UnknownModel(String),
    /// The model has no such version.
    #[error("model {model:?} has no version {version:?}")]
    UnknownVersion {
        /// The model.
        model: String,
        /// The version asked for.
        version: String,
    },
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, RegistryError> {
    let bytes = std::fs::read(path).map_err(|source| RegistryError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| RegistryError::Json {
        path: path.to_owned(),
        source,
    })
}

#[derive(Deserialize)]
struct Aliases {
    production: String,
}

impl ModelRegistry {
    /// Reads every `<name>/<version>/manifest.json` and `<name>/aliases.json` under `root`.
    pub fn load(root: &Path) -> Result<Self, RegistryError> {
        let entries = std::fs::read_dir(root).map_err(|source| RegistryError::Io {
            path: root.to_owned(),
            source,
        })?;
        let mut models = BTreeMap::new();
        for entry in entries.flatten() {
            let dir = entry.path();
            if !dir.is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let aliases: Aliases = read_json(&dir.join("aliases.json"))?;
            let mut versions = BTreeMap::new();
            for v in std::fs::read_dir(&dir)
                .map_err(|source| RegistryError::Io {
                    path: dir.clone(),
                    source,
                })?
                .flatten()
            {
                let vdir = v.path();
                if !vdir.join("manifest.json").exists() {
                    continue;
                }
                let manifest: ModelManifest = read_json(&vdir.join("manifest.json"))?;
                let version = v.file_name().to_string_lossy().into_owned();
                if manifest.name != name || manifest.version != version {
                    return Err(RegistryError::Invalid(format!(
                        "{} says {}/{} but lives in {name}/{version}",
                        vdir.join("manifest.json").display(),
                        manifest.name,
                        manifest.version
                    )));
                }
                if let Some(f) = manifest.features.iter().find(|f| {
                    f.kind == FeatureKind::Category && !f.open_ended && f.categories.is_empty()
                }) {
                    return Err(RegistryError::Invalid(format!(
                        "{}: category feature {} lists no `categories` and is not `open_ended`",
                        vdir.join("manifest.json").display(),
                        f.name
                    )));
                }
                versions.insert(
                    version,
                    ModelVersion {
                        manifest,
                        model_path: vdir.join("model.onnx"),
                    },
                );
            }
            if !versions.contains_key(&aliases.production) {
                return Err(RegistryError::Invalid(format!(
                    "{name}: production alias points at version {:?}, which does not exist",
                    aliases.production
                )));
            }
            models.insert(
                name.clone(),
                Model {
                    name,
                    production: aliases.production,
                    versions,
                },
            );
        }
        if models.is_empty() {
            return Err(RegistryError::Invalid(format!(
                "no models under {}",
                root.display()
            )));
        }
        Ok(Self { models })
    }

    /// The version `version` of `model`; an empty version or `production` means the alias.
    pub fn resolve(&self, model: &str, version: &str) -> Result<&ModelVersion, RegistryError> {
        let entry = self
            .models
            .get(model)
            .ok_or_else(|| RegistryError::UnknownModel(model.to_owned()))?;
        let version = if version.is_empty() || version == "production" {
            entry.production.as_str()
        } else {
            version
        };
        entry
            .versions
            .get(version)
            .ok_or_else(|| RegistryError::UnknownVersion {
                model: model.to_owned(),
                version: version.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_models() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models")
    }

    #[test]
    fn loads_the_committed_registry_and_resolves_the_production_alias() {
        let registry = ModelRegistry::load(&repo_models()).expect("registry loads");
        let v = registry.resolve("churn", "").expect("production");
        assert_eq!(v.manifest.version, registry.models["churn"].production);
        assert!(v.model_path.exists());
        assert_eq!(
            v.manifest.feature("contract").map(|f| f.kind),
            Some(FeatureKind::Category)
        );
        assert!(matches!(
            registry.resolve("nope", ""),
            Err(RegistryError::UnknownModel(_))
        ));
        assert!(matches!(
            registry.resolve("churn", "999"),
            Err(RegistryError::UnknownVersion { .. })
        ));
    }
}
