//! Drift per model version: the live distribution of the score and of every feature, over the
//! last [`WINDOW`] predictions the gateway served with that version, against the reference
//! distribution stored with the version at training time (`reference.json`, see
//! `training/README.md`), as the population stability index (PSI), exported as
//! `mesh_model_drift_psi{model,version,feature}` (`feature="score"` for the score) every
//! [`EVERY`] once a version has [`MIN_SAMPLE`] predictions in its window.
//!
//! Binning and PSI are [`mesh_runtime::reference`]'s, shared with `meshctl models drift`, which
//! computes the same figures from the prediction log.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proto::types::{feature_value::Kind, FeatureValue};
use mesh_runtime::reference::{bucket, psi, size, Reference, ReferenceFile, Value};
use mesh_runtime::registry::ModelManifest;
use prometheus::{GaugeVec, Opts, Registry};

/// Predictions per version the live distribution is taken over.
pub const WINDOW: usize = 5_000;
/// Predictions a version needs before its PSI is exported.
pub const MIN_SAMPLE: usize = 200;
/// How often PSI is recomputed.
pub const EVERY: Duration = Duration::from_secs(5);
/// One version's distributions (the score first, then each reference feature), each with its
/// live counts per bucket and outside the reference, kept equal to the window's contents: a
/// prediction's buckets are counted when it enters the window and uncounted when it leaves.
struct Tracked {
    distributions: Vec<(String, Reference)>,
    counts: Vec<(Vec<u64>, u64)>,
    /// Per prediction in the window, each distribution's place: `Some(Some(b))` bucket `b`,
    /// `Some(None)` outside the reference, `None` the prediction had no such feature.
    recent: VecDeque<Vec<Option<Option<usize>>>>,
}

impl Tracked {
    fn new(reference: ReferenceFile) -> Self {
        let distributions = reference.distributions();
        let counts = distributions
            .iter()
            .map(|(_, r)| (vec![0; size(r)], 0))
            .collect();
        Self {
            distributions,
            counts,
            recent: VecDeque::new(),
        }
    }

    fn count(&mut self, places: &[Option<Option<usize>>], delta: i64) {
        for ((buckets, outside), place) in self.counts.iter_mut().zip(places) {
            let counter = match place {
                Some(Some(b)) => &mut buckets[*b],
                Some(None) => outside,
                None => continue,
            };
            *counter = counter.saturating_add_signed(delta);
        }
    }

    fn push(&mut self, score: f64, features: &BTreeMap<String, FeatureValue>) {
        let places: Vec<Option<Option<usize>>> = self
            .distributions
            .iter()
            .enumerate()
            .map(|(i, (name, reference))| {
                let value = if i == 0 {
                    Value::Number(score)
                } else {
                    match features.get(name)?.kind.as_ref()? {
                        Kind::Number(n) => Value::Number(*n),
                        Kind::Category(c) => Value::Category(c),
                    }
                };
                Some(bucket(reference, &value).filter(|b| *b < size(reference)))
            })
            .collect();
        if self.recent.len() == WINDOW {
            if let Some(old) = self.recent.pop_front() {
                self.count(&old, -1);
            }
        }
        self.count(&places, 1);
        self.recent.push_back(places);
    }
}

/// Drift of every version that has a reference.
pub struct Drift {
    versions: Mutex<HashMap<(String, String), Option<Tracked>>>,
    psi: GaugeVec,
    models_dir: std::path::PathBuf,
}

impl Drift {
    /// Drift for the versions under `models_dir`; registers `mesh_model_drift_psi`.
    pub fn new(models_dir: &Path, registry: &Registry) -> prometheus::Result<Arc<Self>> {
        let psi = GaugeVec::new(
            Opts::new(
                "mesh_model_drift_psi",
                "Population stability index of the last predictions' score (feature=\"score\") \
                 or feature against the version's training reference; above 0.2 is drift",
            ),
            &["model", "version", "feature"],
        )?;
        registry.register(Box::new(psi.clone()))?;
        Ok(Arc::new(Self {
            versions: Mutex::default(),
            psi,
            models_dir: models_dir.to_owned(),
        }))
    }

    /// Notes the score and features of predictions `manifest` made.
    pub fn observe(
        &self,
        manifest: &ModelManifest,
        rows: &[(f64, &BTreeMap<String, FeatureValue>)],
    ) {
        let key = (manifest.name.clone(), manifest.version.clone());
        let mut versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        let tracked = versions.entry(key).or_insert_with(|| {
            let path = self
                .models_dir
                .join(&manifest.name)
                .join(&manifest.version)
                .join("reference.json");
            let text = std::fs::read_to_string(path).ok()?;
            let reference = ReferenceFile::parse(&text).ok()?;
            Some(Tracked::new(reference))
        });
        let Some(tracked) = tracked else { return };
        for (score, features) in rows {
            tracked.push(*score, features);
        }
    }

    /// Recomputes every version's PSI gauges.
    pub fn export(&self) {
        let versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        for ((model, version), tracked) in versions.iter() {
            let Some(tracked) = tracked else { continue };
            if tracked.recent.len() < MIN_SAMPLE {
                continue;
            }
            for ((name, reference), (counts, outside)) in
                tracked.distributions.iter().zip(&tracked.counts)
            {
                self.psi
                    .with_label_values(&[model.as_str(), version.as_str(), name])
                    .set(psi(reference, counts, *outside));
            }
        }
    }
}

/// Exports PSI every [`EVERY`] while the returned guard lives.
pub fn spawn(drift: Arc<Drift>) -> Exporting {
    Exporting(tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        loop {
            tick.tick().await;
            drift.export();
        }
    }))
}

/// The exporting task; dropping it stops the task.
pub struct Exporting(tokio::task::JoinHandle<()>);

impl Drop for Exporting {
    fn drop(&mut self) {
        self.0.abort();
    }
}
