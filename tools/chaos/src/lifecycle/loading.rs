//! Scenario 13: version 3 is promoted under load; inference-1 is killed with SIGKILL while it
//! loads version 3 and restarted later. No request may reach a replica for a version it has not
//! reported ready; the restarted replica must load version 3 and routing must converge.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use super::probe::{Kind, Shot};
use super::scenarios::{promote, rollback, start_traffic, until_state, Ctx, Fault};
use super::{catalog, infer_codes, metric, MODEL};
use crate::{say, unix_ms, Check};

/// The version promoted.
const VERSION: &str = "3";
/// What a replica answers for a version it has not got ready: seeing one means the gateway sent
/// a request there that it should not have.
const NOT_READY_CODES: [&str; 3] = ["UNAVAILABLE", "NOT_FOUND", "FAILED_PRECONDITION"];

/// THE INJECTED FAULT of this scenario: version 3's `golden.json` replaced by a FIFO that this
/// program holds open for reading and writing, so a replica loading version 3 blocks reading
/// its golden fixture (as on a slow artifact store) until [`HeldFixture::release`] writes the
/// real fixture into it. Dropping it releases it, so no load stays blocked.
struct HeldFixture {
    path: PathBuf,
    content: String,
    fifo: Option<std::fs::File>,
}

impl HeldFixture {
    fn arm(version_dir: &Path) -> anyhow::Result<Self> {
        let path = version_dir.join("golden.json");
        let content = std::fs::read_to_string(&path)?;
        let fifo_path = version_dir.join("golden.fifo");
        let _ = std::fs::remove_file(&fifo_path);
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo_path)
            .status()?;
        anyhow::ensure!(made.success(), "mkfifo {} failed", fifo_path.display());
        // Read and write: opening a FIFO so never blocks, and readers see no end of file while
        // this end is open.
        let fifo = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo_path)?;
        std::fs::rename(&fifo_path, &path)?;
        Ok(Self {
            path,
            content,
            fifo: Some(fifo),
        })
    }

    /// The real file back for loads that start from now on, then the fixture into the FIFO
    /// (and its end) for the loads blocked reading it.
    fn release(&mut self) -> anyhow::Result<()> {
        let Some(mut fifo) = self.fifo.take() else {
            return Ok(());
        };
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, &self.content)?;
        std::fs::rename(&tmp, &self.path)?;
        fifo.write_all(self.content.as_bytes())?;
        Ok(())
    }
}

impl Drop for HeldFixture {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// ModelInfer answers of `port`'s replica whose code says "not ready here".
fn not_ready(codes: &Option<BTreeMap<String, f64>>) -> f64 {
    codes.as_ref().map_or(0.0, |c| {
        NOT_READY_CODES.iter().filter_map(|code| c.get(*code)).sum()
    })
}

fn delta(after: &Option<BTreeMap<String, f64>>, before: &Option<BTreeMap<String, f64>>) -> f64 {
    not_ready(after) - not_ready(before)
}

/// Runs scenario 13.
pub(super) async fn run(ctx: &mut Ctx<'_>) -> anyhow::Result<Fault> {
    let opts = ctx.opts;
    let hold = Duration::from_secs(opts.fault_secs) / 2;
    let token = ctx.mesh.internal_token.clone();
    let replicas = [ctx.mesh.inference1.url(), ctx.mesh.inference2.url()];
    for url in &replicas {
        let held = catalog(url, &token).await.unwrap_or_default();
        anyhow::ensure!(
            !held.contains_key(VERSION),
            "version {VERSION} is already held by {url} ({held:?}): scenario 13 needs a version no replica has loaded"
        );
    }
    let mut fixture = HeldFixture::arm(&ctx.mesh.models.join(MODEL).join(VERSION))?;
    let traffic = start_traffic(ctx, opts.baseline_secs).await?;
    let codes_start = [
        infer_codes(ctx.mesh.inference1.metrics_port).await,
        infer_codes(ctx.mesh.inference2.metrics_port).await,
    ];
    let probes = ctx
        .gateways
        .spawn_probes("load-probe", &ctx.normal, Duration::from_millis(100));
    traffic
        .sleep_until(opts.baseline_secs as f64 * 1000.0)
        .await;
    let promoted_unix = unix_ms();
    promote(
        &mut ctx.ops,
        VERSION,
        "mesh-chaos 13: promote while a replica dies",
    )
    .await?;
    let loading = until_state(
        &replicas,
        &token,
        VERSION,
        "LOADING",
        Duration::from_secs(20),
    )
    .await;
    anyhow::ensure!(
        loading.is_some(),
        "version {VERSION} was not LOADING on both replicas within 20 s of the promotion"
    );
    // Both are now blocked on the held fixture (a load takes well under this otherwise).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_kill = catalog(&replicas[0], &token).await;
    let state_before_kill = before_kill
        .as_ref()
        .and_then(|c| c.get(VERSION))
        .map(|(s, _)| s.clone());
    let codes_before_kill = infer_codes(ctx.mesh.inference1.metrics_port).await;
    let checked_at = Instant::now();
    ctx.mesh.inference1.kill9();
    let inject_unix = unix_ms();
    let checked_ms = checked_at.elapsed().as_secs_f64() * 1e3;
    say!(
        "fault injected: kill -9 inference-1 while version {VERSION} is {state_before_kill:?} there ({checked_ms:.0} ms after that read)"
    );
    tokio::time::sleep(hold / 2).await;
    fixture.release()?;
    let release_unix = unix_ms();
    let ready2 = until_state(
        &replicas[1..],
        &token,
        VERSION,
        "READY",
        Duration::from_secs(20),
    )
    .await;
    say!(
        "fixture released: inference-2 has version {VERSION} ready: {}",
        ready2.is_some()
    );
    tokio::time::sleep_until(tokio::time::Instant::from_std(checked_at) + hold).await;
    ctx.mesh.inference1.start()?;
    let lift_unix = unix_ms();
    say!("fault lifted: inference-1 restarted");
    let recovered = recover(ctx, &token).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    probes.stop().await;
    let codes_end = [
        infer_codes(ctx.mesh.inference1.metrics_port).await,
        infer_codes(ctx.mesh.inference2.metrics_port).await,
    ];
    let fallbacks = metric(ctx.mesh.gateway.metrics_port, "mesh_route_fallbacks_total").await;
    let shots = ctx.gateways.shots();
    let misrouted = delta(&codes_before_kill, &codes_start[0])
        + not_ready(&codes_end[0])
        + delta(&codes_end[1], &codes_start[1]);
    let first_ready_unix = ready2.map(|us| (us / 1000) as u64);
    let early: Vec<&Shot> = shots
        .iter()
        .filter(|s| s.kind == Kind::Probe && s.version == VERSION)
        .filter(|s| first_ready_unix.is_none_or(|r| s.at_unix_ms < r))
        .collect();
    let from_version: usize = shots
        .iter()
        .filter(|s| s.at_unix_ms >= promoted_unix && s.version == VERSION)
        .count();
    let (ttr, recovery, rec_checks) = recovered.verdict(lift_unix, opts.recover_secs);
    let mut checks = vec![
        Check {
            what: format!(
                "inference-1 was killed while version {VERSION} was loading there (its catalog said {state_before_kill:?} {checked_ms:.0} ms before the kill; the load could not finish: its fixture was held)"
            ),
            pass: state_before_kill.as_deref() == Some("LOADING"),
            invariant: true,
        },
        Check {
            what: format!(
                "no request sent to a replica for a version it had not reported ready: ModelInfer answered {NOT_READY_CODES:?} by the replicas: {misrouted} (inference-1 before the kill, after the restart; inference-2 throughout)"
            ),
            pass: misrouted == 0.0 && codes_start.iter().all(Option::is_some),
            invariant: true,
        },
        Check {
            what: format!(
                "no probe answered from version {VERSION} before a replica reported it READY ({} early; {from_version} probes answered from it after the promotion)",
                early.len()
            ),
            pass: early.is_empty() && first_ready_unix.is_some() && from_version > 0,
            invariant: true,
        },
    ];
    checks.extend(rec_checks);
    drop(fixture);
    // Back to 1 for whatever runs next (after the figures: not part of the scenario).
    let _ = rollback(&mut ctx.ops, "mesh-chaos 13: back to 1").await;
    Ok(Fault {
        traffic,
        inject_unix,
        lift_unix,
        checks,
        details: json!({
            "version": VERSION,
            "promoted_unix_ms": promoted_unix,
            "killed_unix_ms": inject_unix,
            "fixture_released_unix_ms": release_unix,
            "ready_on_inference_2_unix_ms": first_ready_unix,
            "restarted_unix_ms": lift_unix,
            "recovery": recovered.json(lift_unix),
            "model_infer_codes": {"inference-1 at start": codes_start[0], "inference-1 before kill": codes_before_kill,
                                  "inference-1 after restart": codes_end[0], "inference-2 at start": codes_start[1], "inference-2 at end": codes_end[1]},
            "route_fallbacks_gateway_1": fallbacks,
        }),
        notes: vec![format!(
            "promoted {VERSION} at +0 ms; inference-1 killed at +{} ms; fixture released at +{} ms; inference-2 READY at +{}; inference-1 restarted at +{} ms",
            inject_unix - promoted_unix,
            release_unix - promoted_unix,
            first_ready_unix.map_or("never".into(), |r| format!("{} ms", r.saturating_sub(promoted_unix))),
            lift_unix - promoted_unix
        )],
        time_to_recover_s: ttr,
        recovery,
        allowed_versions: &["1", VERSION],
        steady: None,
    })
}

/// When the restarted replica had version 3 ready, every gateway saw both replicas with two
/// versions ready, and the restarted replica answered ModelInfer OK again (unix ms each).
#[derive(Default)]
struct Recovered {
    loaded: Option<u64>,
    converged: Option<u64>,
    serving: Option<u64>,
}

/// Waits (≤ the recovery bound) for the restarted replica and the gateways.
async fn recover(ctx: &Ctx<'_>, token: &str) -> Recovered {
    let mut r = Recovered::default();
    let bound = Instant::now() + Duration::from_secs(ctx.opts.recover_secs);
    while Instant::now() < bound {
        if r.loaded.is_none() {
            let c = catalog(&ctx.mesh.inference1.url(), token).await;
            if c.and_then(|c| c.get(VERSION).cloned())
                .is_some_and(|(s, _)| s == "READY")
            {
                r.loaded = Some(unix_ms());
            }
        }
        if r.converged.is_none() {
            let mut all = true;
            for gateway in [&ctx.mesh.gateway, &ctx.mesh.gateway2] {
                let lines = metric(gateway.metrics_port, "mesh_replica_versions_ready").await;
                all &= lines.is_some_and(|l| l.len() == 2 && l.iter().all(|(_, v)| *v >= 2.0));
            }
            if all {
                r.converged = Some(unix_ms());
            }
        }
        if r.serving.is_none() {
            let codes = infer_codes(ctx.mesh.inference1.metrics_port).await;
            if codes.and_then(|c| c.get("OK").copied()).unwrap_or(0.0) > 0.0 {
                r.serving = Some(unix_ms());
            }
        }
        if r.loaded.is_some() && r.converged.is_some() && r.serving.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    r
}

impl Recovered {
    fn json(&self, from: u64) -> serde_json::Value {
        let s = |t: Option<u64>| t.map(|t| t.saturating_sub(from) as f64 / 1000.0);
        json!({"loaded_s": s(self.loaded), "converged_s": s(self.converged), "serving_s": s(self.serving)})
    }

    /// Time to recover, its text, and the checks.
    fn verdict(&self, from: u64, bound_s: u64) -> (Option<f64>, String, Vec<Check>) {
        let s = |t: Option<u64>| t.map(|t| t.saturating_sub(from) as f64 / 1000.0);
        let f = |t: Option<f64>| t.map_or("never".to_owned(), |t| format!("{t:.1} s"));
        let (loaded, converged, serving) = (s(self.loaded), s(self.converged), s(self.serving));
        let all = match (loaded, converged, serving) {
            (Some(a), Some(b), Some(c)) => Some(((a.max(b).max(c)) * 10.0).round() / 10.0),
            _ => None,
        };
        let text = match all {
            Some(t) => format!(
                "{t:.1} s (version {VERSION} ready {}, routing converged {}, serving {})",
                f(loaded),
                f(converged),
                f(serving)
            ),
            None => format!(
                "not within {bound_s} s (version {VERSION} ready {}, routing converged {}, serving {})",
                f(loaded),
                f(converged),
                f(serving)
            ),
        };
        let checks = vec![
            Check {
                what: format!(
                    "the restarted inference-1 loads and reports version {VERSION} READY ({} after the restart)",
                    f(loaded)
                ),
                pass: loaded.is_some(),
                invariant: true,
            },
            Check {
                what: format!(
                    "routing converges: every gateway sees both replicas with 2 versions ready ({}), and inference-1 answers ModelInfer OK again ({})",
                    f(converged),
                    f(serving)
                ),
                pass: converged.is_some() && serving.is_some(),
                invariant: true,
            },
        ];
        (all, text, checks)
    }
}
