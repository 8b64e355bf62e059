//! `meshctl models drift`: drift of a model's versions computed from the prediction log.
//!
//! For each version that served in the window (or the one asked for), PostgreSQL bins the
//! logged scores and features with the version's training reference (`reference.json` under
//! `--models-dir`): `width_bucket` over the reference's inner edges is exactly the binning of
//! [`mesh_runtime::reference`], which the gateway's live `mesh_model_drift_psi` gauges use too.
//! Only counts per bin and a few aggregates travel back, however many predictions the window
//! holds. Each distribution gets its PSI against the reference, plus a summary: mean, min and
//! max for numbers, the largest shares for categories, and how many predictions lacked it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use mesh_runtime::reference::{inner_edges, psi, Reference, ReferenceFile};
use serde::Serialize;
use tokio_postgres::Client;

/// Above this PSI a distribution has drifted (the `MeshModelDriftHigh` alert's threshold).
pub const DRIFT_PSI: f64 = 0.2;

/// `meshctl models drift` arguments.
#[derive(Args)]
pub struct DriftArgs {
    /// The model.
    model: String,
    /// One version (default: every version that served in the window).
    #[arg(long)]
    version: Option<String>,
    /// How far back, in minutes.
    #[arg(long, default_value_t = 60)]
    window_mins: u32,
    /// The prediction log's PostgreSQL (the logger's MESH_DATABASE_URL).
    #[arg(long, env = "MESH_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Where the versions' reference.json files are.
    #[arg(long, env = "MESH_MODELS_DIR", default_value = "models")]
    models_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One distribution's drift.
#[derive(Debug, Serialize)]
pub struct Distribution {
    /// `score` or the feature's name.
    pub name: String,
    /// Against the version's reference.
    pub psi: f64,
    /// Predictions that had this value.
    pub count: i64,
    /// Predictions in the window without it.
    pub missing: i64,
    /// Numbers: mean, min, max.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub range: Option<(f64, f64, f64)>,
    /// Categories: the largest shares (at most 5), with values outside the reference marked.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<(String, f64)>,
}

/// One version's drift.
#[derive(Debug, Serialize)]
pub struct VersionDrift {
    /// The model.
    pub model: String,
    /// The version.
    pub version: String,
    /// Predictions it served in the window.
    pub predictions: i64,
    /// Why there is no PSI (no reference.json), if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The score first, then each reference feature.
    pub distributions: Vec<Distribution>,
}

impl DriftArgs {
    /// Queries the log and prints the report.
    pub async fn run(self) -> anyhow::Result<()> {
        let (client, connection) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_postgres::connect(&self.database_url, tokio_postgres::NoTls),
        )
        .await
        .context("PostgreSQL did not answer within 5 s")?
        .context("cannot connect to the prediction log's PostgreSQL (--database-url)")?;
        tokio::spawn(connection);
        // A window over a busy log is a scan: bounded, and said so if it is cut off.
        client
            .batch_execute("SET statement_timeout = '120s'")
            .await?;
        let window = Window {
            model: self.model.clone(),
            secs: f64::from(self.window_mins) * 60.0,
        };
        let versions = match &self.version {
            Some(v) => vec![(v.clone(), window.count(&client, v).await?)],
            None => window.versions(&client).await?,
        };
        if versions.is_empty() {
            anyhow::bail!(
                "no predictions of model {:?} in the last {} min",
                self.model,
                self.window_mins
            );
        }
        let mut report = Vec::new();
        for (version, predictions) in versions {
            let path = self
                .models_dir
                .join(&self.model)
                .join(&version)
                .join("reference.json");
            let reference = match std::fs::read_to_string(&path) {
                Ok(text) => ReferenceFile::parse(&text)
                    .with_context(|| format!("{} is not a reference file", path.display()))?,
                Err(e) => {
                    report.push(VersionDrift {
                        model: self.model.clone(),
                        version,
                        predictions,
                        note: Some(format!("no reference ({}: {e})", path.display())),
                        distributions: Vec::new(),
                    });
                    continue;
                }
            };
            let mut distributions = Vec::new();
            for (name, reference) in reference.distributions() {
                let d = window
                    .distribution(&client, &version, predictions, &name, &reference)
                    .await
                    .with_context(|| format!("version {version}, {name}"))?;
                distributions.push(d);
            }
            report.push(VersionDrift {
                model: self.model.clone(),
                version,
                predictions,
                note: None,
                distributions,
            });
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_report(&report, self.window_mins);
        }
        Ok(())
    }
}

/// The predictions of one model over the last `secs` seconds.
struct Window {
    model: String,
    secs: f64,
}

/// The rows of the window, with `$1` the model, `$2` the version, `$3` the window in seconds.
const ROWS: &str = "FROM predictions WHERE model = $1 AND model_version = $2
                    AND served_at >= now() - make_interval(secs => $3)";

impl Window {
    async fn versions(&self, client: &Client) -> anyhow::Result<Vec<(String, i64)>> {
        let rows = client
            .query(
                "SELECT model_version, count(*) FROM predictions
                 WHERE model = $1 AND served_at >= now() - make_interval(secs => $2)
                 GROUP BY 1 ORDER BY 1",
                &[&self.model, &self.secs],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn count(&self, client: &Client, version: &str) -> anyhow::Result<i64> {
        let row = client
            .query_one(
                &format!("SELECT count(*) {ROWS}"),
                &[&self.model, &version, &self.secs],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Bins `name` (`score` or a feature) of `version`'s window with `reference`.
    async fn distribution(
        &self,
        client: &Client,
        version: &str,
        predictions: i64,
        name: &str,
        reference: &Reference,
    ) -> anyhow::Result<Distribution> {
        match reference {
            Reference::Bins { fractions, .. } => {
                let value = if name == "score" {
                    "score".to_owned()
                } else {
                    // A logged value of another type counts as missing, not as an error.
                    "CASE WHEN jsonb_typeof(features -> $5) = 'number'
                          THEN (features ->> $5)::float8 END"
                        .to_owned()
                };
                let sql = format!(
                    "SELECT width_bucket(v, $4::float8[]), count(*), sum(v), min(v), max(v)
                     FROM (SELECT {value} AS v {ROWS}) x WHERE v IS NOT NULL GROUP BY 1"
                );
                let edges = inner_edges(reference).to_vec();
                let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                    vec![&self.model, &version, &self.secs, &edges];
                if name != "score" {
                    params.push(&name);
                }
                let rows = client.query(&sql, &params).await?;
                let mut counts = vec![0u64; fractions.len()];
                let (mut count, mut sum) = (0i64, 0.0);
                let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
                for row in &rows {
                    let bin: i32 = row.get(0);
                    let n: i64 = row.get(1);
                    let slot = usize::try_from(bin).unwrap_or(0).min(counts.len() - 1);
                    counts[slot] += n as u64;
                    count += n;
                    sum += row.get::<_, f64>(2);
                    min = min.min(row.get(3));
                    max = max.max(row.get(4));
                }
                Ok(Distribution {
                    name: name.to_owned(),
                    psi: psi(reference, &counts, 0),
                    count,
                    missing: predictions - count,
                    range: (count > 0).then(|| (sum / count as f64, min, max)),
                    top: Vec::new(),
                })
            }
            Reference::Categories { categories } => {
                let sql = format!(
                    "SELECT v, count(*) FROM (SELECT features ->> $4 AS v {ROWS}) x
                     WHERE v IS NOT NULL GROUP BY 1"
                );
                let rows = client
                    .query(&sql, &[&self.model, &version, &self.secs, &name])
                    .await?;
                let seen: BTreeMap<String, i64> =
                    rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                let counts: Vec<u64> = categories
                    .keys()
                    .map(|k| seen.get(k).copied().unwrap_or(0) as u64)
                    .collect();
                let count: i64 = seen.values().sum();
                let outside = count as u64 - counts.iter().sum::<u64>();
                let mut top: Vec<(String, f64)> = seen
                    .iter()
                    .map(|(k, n)| {
                        let label = if categories.contains_key(k) {
                            k.clone()
                        } else {
                            format!("{k} (not in training)")
                        };
                        (label, *n as f64 / count.max(1) as f64)
                    })
                    .collect();
                top.sort_by(|a, b| b.1.total_cmp(&a.1));
                top.truncate(5);
                Ok(Distribution {
                    name: name.to_owned(),
                    psi: psi(reference, &counts, outside),
                    count,
                    missing: predictions - count,
                    range: None,
                    top,
                })
            }
        }
    }
}

fn print_report(report: &[VersionDrift], window_mins: u32) {
    for v in report {
        println!(
            "{} version {}: {} predictions in the last {window_mins} min (prediction log)",
            v.model, v.version, v.predictions
        );
        if let Some(note) = &v.note {
            println!("  {note}");
            continue;
        }
        println!("  {:<22} {:>7}  {:<6} summary", "distribution", "PSI", "");
        for d in &v.distributions {
            let flag = if d.psi > DRIFT_PSI { "DRIFT" } else { "" };
            let summary = match (&d.range, d.top.is_empty()) {
                (Some((mean, min, max)), _) => {
                    format!("mean {mean:.4}, min {min:.4}, max {max:.4}")
                }
                (None, false) => d
                    .top
                    .iter()
                    .map(|(k, share)| format!("{k} {:.1} %", share * 100.0))
                    .collect::<Vec<_>>()
                    .join(", "),
                (None, true) => "no values".to_owned(),
            };
            let missing = if d.missing > 0 {
                format!("; missing in {}", d.missing)
            } else {
                String::new()
            };
            println!(
                "  {:<22} {:>7.4}  {flag:<6} {summary}{missing}",
                d.name, d.psi
            );
        }
    }
}
