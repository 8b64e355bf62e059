//! What scenarios 11–13 share (the policy reset before each, the end: stop the traffic, wait
//! for delivery, the figures) and scenario 11; 12 is in `canary`, 13 in `loading`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use super::probe::{Gateways, Merged, Shot, Traffic};
use super::{admin, catalog, complete_features, Admin, FIRST, MODEL, NAMES};
use crate::load::{self, Class};
use crate::mesh::Mesh;
use crate::{say, unix_ms, Check, Opts, Outcome};

/// What a scenario body hands to the common end.
pub(super) struct Fault {
    pub traffic: Traffic,
    /// The fault's start and end (unix ms): the window of "p99 during the fault".
    pub inject_unix: u64,
    pub lift_unix: u64,
    pub checks: Vec<Check>,
    pub details: serde_json::Value,
    pub notes: Vec<String>,
    pub time_to_recover_s: Option<f64>,
    pub recovery: String,
    /// The versions any answer may come from.
    pub allowed_versions: &'static [&'static str],
    /// Scenario 11: the steady window before the swaps (unix ms), for the p99 comparison.
    pub steady: Option<(u64, u64)>,
}

/// Shared by a scenario's steps.
pub(super) struct Ctx<'a> {
    pub mesh: &'a mut Mesh,
    pub opts: &'a Opts,
    pub dir: std::path::PathBuf,
    pub n: u8,
    pub ops: Admin,
    pub gateways: Gateways,
    /// A complete, normal request's features (version 1's first golden row).
    pub normal: std::collections::HashMap<String, mesh_proto::types::FeatureValue>,
}

/// Runs lifecycle scenario `n` (11–13).
pub async fn run(mesh: &mut Mesh, opts: &Opts, n: u8, out: &Path) -> anyhow::Result<Outcome> {
    let name = NAMES[usize::from(n - FIRST)];
    say!("── scenario {n}: {name}");
    let mut notes = Vec::new();
    let revived = mesh.revive().await?;
    if !revived.is_empty() {
        notes.push(format!(
            "restarted before the scenario (were not running): {}",
            revived.join(", ")
        ));
    }
    if !crate::wait_healthy(mesh, Duration::from_secs(30)).await {
        notes.push("gateway /health was not `healthy` before the scenario (waited 30 s)".into());
    }
    let mut ctx = Ctx {
        ops: admin(&mesh.gateway.url(), &mesh.admin_key)?,
        gateways: Gateways::new(mesh, Duration::from_millis(opts.timeout_ms))?,
        normal: complete_features(&mesh.models, None)?,
        dir: out.join(format!("scenario-{n}")),
        mesh,
        opts,
        n,
    };
    reset(&mut ctx).await?;
    let pg_url = ctx.mesh.db_url();
    let rows_before = crate::probe::log_counts(&pg_url, &[]).await?.rows;
    let mut fault = match n {
        11 => promote_under_load(&mut ctx).await?,
        12 => super::canary::run(&mut ctx).await?,
        _ => super::loading::run(&mut ctx).await?,
    };
    notes.append(&mut fault.notes);
    fault.notes = notes;
    finish(&mut ctx, name, fault, rows_before).await
}

/// Production 1, no rollout, no shadow; every gateway answering from 1.
async fn reset(ctx: &mut Ctx<'_>) -> anyhow::Result<()> {
    let reason = format!("mesh-chaos: reset before scenario {}", ctx.n);
    let status = model_status(&mut ctx.ops).await?;
    if !status.rollout_candidate.is_empty() {
        ctx.ops
            .stop_rollout(stop_request(&reason))
            .await
            .map_err(|s| anyhow::anyhow!("stop rollout: {s}"))?;
    }
    if !status.shadow.is_empty() {
        ctx.ops
            .stop_shadow(stop_request(&reason))
            .await
            .map_err(|s| anyhow::anyhow!("stop shadow: {s}"))?;
    }
    if status.aliases.get("production").map(String::as_str) != Some("1") {
        promote(&mut ctx.ops, "1", &reason).await?;
    }
    let took = ctx
        .gateways
        .until_version("reset-probe", &ctx.normal, "1", Duration::from_secs(30))
        .await;
    anyhow::ensure!(
        took.is_some(),
        "the gateways did not answer from version 1 within 30 s"
    );
    Ok(())
}

pub(super) fn stop_request(reason: &str) -> mesh_proto::admin::StopRequest {
    mesh_proto::admin::StopRequest {
        model: MODEL.into(),
        reason: reason.into(),
    }
}

pub(super) async fn model_status(
    ops: &mut Admin,
) -> anyhow::Result<mesh_proto::admin::ModelStatus> {
    let models = ops
        .list_models(mesh_proto::admin::ListModelsRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("ListModels: {s}"))?
        .into_inner();
    anyhow::ensure!(
        models.live_registry,
        "the gateway runs without the live registry"
    );
    models
        .models
        .into_iter()
        .find(|m| m.model == MODEL)
        .ok_or_else(|| anyhow::anyhow!("the admin API lists no model {MODEL}"))
}

pub(super) async fn promote(ops: &mut Admin, version: &str, reason: &str) -> anyhow::Result<i64> {
    let change = ops
        .promote(mesh_proto::admin::PromoteRequest {
            model: MODEL.into(),
            version: version.into(),
            alias: String::new(),
            reason: reason.into(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("promote {version}: {s}"))?
        .into_inner();
    Ok(change.audit.map(|a| a.id).unwrap_or_default())
}

pub(super) async fn rollback(ops: &mut Admin, reason: &str) -> anyhow::Result<i64> {
    let change = ops
        .rollback(mesh_proto::admin::RollbackRequest {
            model: MODEL.into(),
            reason: reason.into(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("rollback: {s}"))?
        .into_inner();
    Ok(change.audit.map(|a| a.id).unwrap_or_default())
}

/// RSS of both inference replicas, KiB.
pub(super) fn inference_rss(mesh: &Mesh) -> Vec<(String, Option<u64>)> {
    [&mesh.inference1, &mesh.inference2]
        .iter()
        .map(|s| (s.name.clone(), s.pid().and_then(crate::procs::rss_kib)))
        .collect()
}

/// Scenario 11: 50 promotions and rollbacks alternating 1 ↔ 2 under load.
async fn promote_under_load(ctx: &mut Ctx<'_>) -> anyhow::Result<Fault> {
    const SWAPS: usize = 50;
    let probe_entity = "swap-probe";
    // Both versions loaded once before measuring; they then both stay loaded (production and
    // the rollback target).
    promote(
        &mut ctx.ops,
        "2",
        "mesh-chaos 11: load version 2 once before measuring",
    )
    .await?;
    let warm2 = ctx
        .gateways
        .until_version(probe_entity, &ctx.normal, "2", Duration::from_secs(30))
        .await;
    rollback(&mut ctx.ops, "mesh-chaos 11: back to 1 before measuring").await?;
    let warm1 = ctx
        .gateways
        .until_version(probe_entity, &ctx.normal, "1", Duration::from_secs(30))
        .await;
    anyhow::ensure!(
        warm2.is_some() && warm1.is_some(),
        "warm-up swap did not reach the gateways (to 2: {warm2:?}, back to 1: {warm1:?})"
    );
    let steady_secs = ctx.opts.baseline_secs.max(10);
    let fault = Duration::from_secs(ctx.opts.fault_secs);
    let traffic = start_traffic(ctx, steady_secs).await?;
    traffic.sleep_until(steady_secs as f64 * 1000.0).await;
    let rss_before = inference_rss(ctx.mesh);
    let inject_unix = unix_ms();
    say!(
        "fault injected: {SWAPS} promotions/rollbacks 1<->2 over {} s",
        fault.as_secs()
    );
    let started = Instant::now();
    let mut converge_ms = Vec::new();
    let mut errors = Vec::new();
    for i in 0..SWAPS {
        let (target, change) = if i % 2 == 0 {
            (
                "2",
                promote(&mut ctx.ops, "2", &format!("mesh-chaos 11: swap {}", i + 1)).await,
            )
        } else {
            (
                "1",
                rollback(&mut ctx.ops, &format!("mesh-chaos 11: swap {}", i + 1)).await,
            )
        };
        let t0 = Instant::now();
        if let Err(e) = change {
            errors.push(format!("swap {}: {e:#}", i + 1));
            continue;
        }
        match ctx
            .gateways
            .until_version(probe_entity, &ctx.normal, target, Duration::from_secs(10))
            .await
        {
            Some(_) => converge_ms.push(t0.elapsed().as_secs_f64() * 1e3),
            None => errors.push(format!(
                "swap {} to {target}: not on every gateway within 10 s",
                i + 1
            )),
        }
        let next = fault.mul_f64((i + 1) as f64 / SWAPS as f64);
        if let Some(wait) = next.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    let lift_unix = unix_ms();
    say!(
        "swaps done after {:.1} s: {} converged on every gateway, {} problems",
        started.elapsed().as_secs_f64(),
        converge_ms.len(),
        errors.len()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = inference_rss(ctx.mesh);
    let mut sorted = converge_ms.clone();
    let p50 = load::quantile(&mut sorted, 0.5).unwrap_or(f64::NAN);
    let max = sorted.last().copied().unwrap_or(f64::NAN);
    let mut checks = vec![Check {
        what: format!(
            "every one of {SWAPS} swaps reached every gateway (probe answered from the new version) within 10 s ({} did; convergence p50 {p50:.0} ms, max {max:.0} ms){}",
            converge_ms.len(),
            if errors.is_empty() { String::new() } else { format!("; {}", errors.join("; ")) }
        ),
        pass: converge_ms.len() == SWAPS && errors.is_empty(),
        invariant: true,
    }];
    let mut rss_ok = true;
    let mut rss_text = Vec::new();
    for ((name, before), (_, after)) in rss_before.iter().zip(&rss_after) {
        let (Some(b), Some(a)) = (before, after) else {
            rss_ok = false;
            rss_text.push(format!("{name}: unreadable"));
            continue;
        };
        let change = 100.0 * (*a as f64 - *b as f64) / *b as f64;
        rss_ok &= change.abs() <= 10.0;
        rss_text.push(format!(
            "{name} {:.1} -> {:.1} MiB ({change:+.1} %)",
            *b as f64 / 1024.0,
            *a as f64 / 1024.0
        ));
    }
    checks.push(Check {
        what: format!(
            "every inference replica's RSS after the swaps within ±10 % of before (before: after both versions were loaded once, at the end of the steady window): {}",
            rss_text.join(", ")
        ),
        pass: rss_ok,
        invariant: false,
    });
    Ok(Fault {
        traffic,
        inject_unix,
        lift_unix,
        checks,
        details: json!({
            "swaps": SWAPS,
            "converged": converge_ms.len(),
            "convergence_ms": converge_ms,
            "problems": errors,
            "steady_secs": steady_secs,
            "rss_kib_before": rss_before,
            "rss_kib_after": rss_after,
        }),
        notes: Vec::new(),
        time_to_recover_s: None,
        recovery: "n/a".into(),
        allowed_versions: &["1", "2"],
        steady: Some((inject_unix - steady_secs * 1000, inject_unix)),
    })
}

pub(super) async fn start_traffic(ctx: &Ctx<'_>, before_secs: u64) -> anyhow::Result<Traffic> {
    let opts = ctx.opts;
    let max_secs = (before_secs + 2 * opts.fault_secs + opts.recover_secs + 90) as f64;
    Traffic::start(
        ctx.mesh,
        opts.rate,
        opts.timeout_ms,
        max_secs,
        &ctx.dir,
        &format!("chaos-{}", ctx.n),
    )
    .await
}

/// Entities whose bucket puts them in a rollout of `percent` (the first `count` of
/// `<prefix>-0`, `<prefix>-1`, …).
pub(super) fn entities_in_rollout(prefix: &str, percent: f64, count: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|e| mesh_registry::policy::takes(MODEL, e, percent))
        .take(count)
        .collect()
}

/// Waits (≤ `bound`) until `version` is in `state` on every replica at `urls`; the latest
/// `since` (unix µs) among them.
pub(super) async fn until_state(
    urls: &[String],
    token: &str,
    version: &str,
    state: &str,
    bound: Duration,
) -> Option<i64> {
    let started = Instant::now();
    while started.elapsed() < bound {
        let mut latest = Some(0);
        for url in urls {
            latest = match (latest, catalog(url, token).await) {
                (Some(l), Some(c)) => match c.get(version) {
                    Some((s, since)) if s == state => Some(l.max(*since)),
                    _ => None,
                },
                _ => None,
            };
        }
        if latest.is_some() {
            return latest;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Bench answers and the scenario's own answers by version.
pub(super) fn versions_answered(merged: &Merged, shots: &[Shot]) -> BTreeMap<String, usize> {
    let mut versions = merged.versions.clone();
    for shot in shots.iter().filter(|s| s.code == 0) {
        *versions.entry(shot.version.clone()).or_default() += 1;
    }
    versions
}

/// The check that every answer came from one of `allowed`.
pub(super) fn versions_check(versions: &BTreeMap<String, usize>, allowed: &[&str]) -> Check {
    let others: Vec<String> = versions
        .iter()
        .filter(|(v, _)| !allowed.contains(&v.as_str()))
        .map(|(v, n)| format!("{v:?}: {n}"))
        .collect();
    Check {
        what: format!(
            "every answer's model_version is one of {allowed:?} (answers by version: {versions:?})"
        ),
        pass: others.is_empty() && !versions.is_empty(),
        invariant: true,
    }
}

/// Waits (≤ `bound`) until gateway-2's spool is empty (gateway 1's is waited for by
/// [`crate::wait_delivery`]).
async fn wait_spool2(mesh: &Mesh, bound: Duration) {
    let started = Instant::now();
    while started.elapsed() < bound {
        if matches!(
            crate::probe::spool_pending(mesh.gateway2.metrics_port).await,
            Ok(None | Some(0.0))
        ) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Stops the traffic, waits for delivery, and computes the figures and the common checks.
async fn finish(
    ctx: &mut Ctx<'_>,
    name: &str,
    fault: Fault,
    rows_before: i64,
) -> anyhow::Result<Outcome> {
    let (opts, n) = (ctx.opts, ctx.n);
    let deadline_ms = opts.timeout_ms as f64;
    let base = fault.traffic.base_unix_ms;
    let (inject_off, lift_off) = (
        fault.traffic.offset_of(fault.inject_unix),
        fault.traffic.offset_of(fault.lift_unix),
    );
    let merged = fault.traffic.finish().await?;
    let end_unix = unix_ms();
    let shots: Vec<Shot> = ctx
        .gateways
        .shots()
        .into_iter()
        .filter(|s| s.at_unix_ms >= base)
        .collect();
    say!(
        "load stopped: {} bench requests, {} of the scenario's own",
        merged.reqs.len(),
        shots.len()
    );
    let ids = merged.ids();
    wait_spool2(ctx.mesh, Duration::from_secs(opts.deliver_secs)).await;
    let delivery =
        crate::wait_delivery(ctx.mesh, &ids, Duration::from_secs(opts.deliver_secs)).await;
    let served = ids.len();
    let distinct_served = ids.iter().collect::<BTreeSet<_>>().len();
    let delivery_text = format!(
        "{}found {}/{} after {:.1} s; spool pending {}",
        if delivery.settled {
            ""
        } else {
            "NOT SETTLED: "
        },
        delivery.found,
        served,
        delivery.waited.as_secs_f64(),
        delivery
            .pending
            .map_or("unreadable".into(), |p| p.to_string())
    );
    say!("delivered: {delivery_text}");
    let pg_url = ctx.mesh.db_url();
    let mut order = crate::ServeTimeOrder {
        checked: 0,
        max_inversion_ms: 0.0,
        bound_ms: 0.0,
        outside_run: 0,
    };
    for (ids, reqs, start) in &merged.per_load {
        let one = crate::serve_time_order(&pg_url, ids, reqs, *start, end_unix).await;
        order.checked += one.checked;
        order.max_inversion_ms = order.max_inversion_ms.max(one.max_inversion_ms);
        order.bound_ms = order.bound_ms.max(one.bound_ms);
        order.outside_run += one.outside_run;
    }
    let ok_answers = merged.reqs.iter().filter(|r| r.code == 0).count();
    let requests = merged.reqs.len() + shots.len();
    let ok_within = merged
        .reqs
        .iter()
        .filter(|r| r.ok_within(deadline_ms))
        .count()
        + shots.iter().filter(|s| s.ok_within(deadline_ms)).count();
    let ok_pct = if requests == 0 {
        0.0
    } else {
        100.0 * ok_within as f64 / requests as f64
    };
    let mut in_fault: Vec<f64> = merged
        .reqs
        .iter()
        .filter(|r| r.start_ms >= inject_off && r.start_ms < lift_off)
        .map(|r| r.latency_ms)
        .chain(
            shots
                .iter()
                .filter(|s| s.at_unix_ms >= fault.inject_unix && s.at_unix_ms < fault.lift_unix)
                .map(|s| s.latency_ms),
        )
        .collect();
    let p99 = load::quantile(&mut in_fault, 0.99);
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    for r in &merged.reqs {
        let class = match r.class {
            Class::Server => "",
            Class::Timeout => " (client deadline timer)",
            Class::NotAccepted => " (not accepted)",
            Class::Transport => " (transport)",
        };
        *codes
            .entry(format!("{:?}{class}", tonic::Code::from_i32(r.code)))
            .or_default() += 1;
    }
    for s in &shots {
        *codes
            .entry(format!(
                "{:?} ({:?})",
                tonic::Code::from_i32(s.code),
                s.kind
            ))
            .or_default() += 1;
    }
    let mut details = fault.details;
    details["answers"] = json!(codes);
    details["ok"] = json!(ok_answers);
    details["requests_during_fault"] = json!(in_fault.len());
    details["own_requests"] = json!(shots.len());
    details["answers_by_version"] = json!(versions_answered(&merged, &shots));
    details["bench_reports"] = json!(merged.reports);
    let p99_in = |from: u64, to: u64| {
        let (from, to) = (from as f64 - base as f64, to as f64 - base as f64);
        let mut l: Vec<f64> = merged
            .reqs
            .iter()
            .filter(|r| r.start_ms >= from && r.start_ms < to)
            .map(|r| r.latency_ms)
            .collect();
        load::quantile(&mut l, 0.99)
    };
    let mut targets = Vec::new();
    if let Some((from, to)) = fault.steady {
        let failed = requests - ok_within;
        // Overload answers UNAVAILABLE (a breaker open), DEADLINE_EXCEEDED or CANCELLED; these
        // are what a swap itself could cause (a version unknown, failed, or refused).
        let swap_codes = [
            tonic::Code::NotFound,
            tonic::Code::FailedPrecondition,
            tonic::Code::InvalidArgument,
            tonic::Code::Internal,
        ]
        .map(|c| c as i32);
        let errors = merged
            .reqs
            .iter()
            .filter(|r| swap_codes.contains(&r.code))
            .count()
            + shots
                .iter()
                .filter(|s| swap_codes.contains(&s.code))
                .count();
        targets.push(Check {
            what: format!("zero failed requests: every request OK within the deadline ({failed} of {requests} not)"),
            pass: failed == 0,
            invariant: false,
        });
        targets.push(Check {
            what: format!(
                "no request answered NOT_FOUND, FAILED_PRECONDITION, INVALID_ARGUMENT or INTERNAL, the errors a swap could cause ({errors})"
            ),
            pass: errors == 0,
            invariant: true,
        });
        let steady = p99_in(from, to);
        let swaps = p99_in(fault.inject_unix, fault.lift_unix);
        details["steady_p99_ms"] = json!(steady);
        details["swaps_p99_ms"] = json!(swaps);
        targets.push(Check {
            what: format!(
                "p99 during the swaps <= 2x the steady p99 (bench requests: {} during, {} steady {:.0} s before)",
                crate::fmt_opt(swaps, " ms"),
                crate::fmt_opt(steady, " ms"),
                (to - from) as f64 / 1000.0
            ),
            pass: matches!((swaps, steady), (Some(s), Some(b)) if s <= 2.0 * b),
            invariant: false,
        });
    } else {
        targets.push(Check {
            what: format!("succeeded within deadline >= 99.9 % ({ok_pct:.2} %, all requests: benches and the scenario's own)"),
            pass: ok_pct >= 99.9,
            invariant: false,
        });
    }
    targets.push(versions_check(
        &versions_answered(&merged, &shots),
        fault.allowed_versions,
    ));
    let duplicates = load::duplicate_ids(&ids);
    let mut checks = super::common_checks(
        served,
        ok_answers,
        delivery.found,
        distinct_served,
        duplicates,
        &order,
    );
    checks.extend(fault.checks);
    checks.extend(targets);
    let mut notes = fault.notes;
    if !delivery.settled {
        notes.push(format!(
            "delivery did not settle within {} s",
            opts.deliver_secs
        ));
    }
    let rows = crate::probe::log_counts(&pg_url, &[]).await?.rows;
    Ok(Outcome {
        scenario: n,
        name: name.to_owned(),
        requests,
        ok_within_deadline: ok_within,
        ok_within_deadline_pct: ok_pct,
        p99_during_fault_ms: p99,
        time_to_recover_s: fault.time_to_recover_s,
        recovery: fault.recovery,
        served,
        ok_answers,
        found: delivery.found,
        rows_added: rows - rows_before,
        duplicates,
        delivery: delivery_text,
        fault_s: (fault.lift_unix.saturating_sub(fault.inject_unix)) as f64 / 1000.0,
        checks,
        // The model lifecycle's scenarios are not judged on alerts.
        alerts: crate::alerts::Report::default(),
        details,
        notes,
    })
}
