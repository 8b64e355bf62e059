//! Scenario 12: a 10 % canary of version 91 (NaN when `tenure_months` > 1,000) under load. It
//! runs healthy on normal inputs first; then inputs it breaks on arrive, and it must roll itself
//! back on every gateway within 10 s of the first of them, callers never seeing a NaN.

use std::time::{Duration, Instant};

use serde_json::json;

use super::probe::{Kind, Shot};
use super::scenarios::{entities_in_rollout, model_status, start_traffic, until_state, Ctx, Fault};
use super::{complete_features, metric, MODEL};
use crate::{say, unix_ms, Check};

/// The rollout's share of entities.
const PERCENT: f64 = 10.0;
/// The broken version.
const CANDIDATE: &str = "91";
/// How long the canary runs healthy before the broken inputs start.
const HEALTHY: Duration = Duration::from_secs(5);
/// Target: every gateway back on production within this of the breach.
const ROLLBACK_BOUND: Duration = Duration::from_secs(10);

/// When gateway `g` stopped routing the probe entity to the candidate for good: the first OK
/// probe after its last answer from the candidate (unix ms), if there is one.
fn rolled_back_at(shots: &[Shot], g: usize) -> Option<u64> {
    let mine: Vec<&Shot> = shots
        .iter()
        .filter(|s| s.kind == Kind::Probe && s.gateway == g)
        .collect();
    let last = mine.iter().rposition(|s| s.version == CANDIDATE)?;
    mine[last + 1..]
        .iter()
        .find(|s| s.code == 0)
        .map(|s| s.at_unix_ms)
}

/// Runs scenario 12.
pub(super) async fn run(ctx: &mut Ctx<'_>) -> anyhow::Result<Fault> {
    let opts = ctx.opts;
    let probe_entity = entities_in_rollout("canary-probe", PERCENT, 1).remove(0);
    let broken_entities = entities_in_rollout("walk-in", PERCENT, 500);
    let broken = complete_features(&ctx.mesh.models, Some(5_000.0))?;
    let replicas = [ctx.mesh.inference1.url(), ctx.mesh.inference2.url()];
    let token = ctx.mesh.internal_token.clone();
    let traffic = start_traffic(ctx, opts.baseline_secs).await?;
    traffic
        .sleep_until(opts.baseline_secs as f64 * 1000.0)
        .await;
    let probes = ctx
        .gateways
        .spawn_probes(&probe_entity, &ctx.normal, Duration::from_millis(100));
    let inject_unix = unix_ms();
    let started = ctx
        .ops
        .set_rollout(mesh_proto::admin::SetRolloutRequest {
            model: MODEL.into(),
            candidate: CANDIDATE.into(),
            percent: PERCENT,
            reason: "mesh-chaos 12: canary of a broken version".into(),
            // No bake: this canary must be judged, never promoted.
            promote_after_secs: 0.0,
        })
        .await
        .map_err(|s| anyhow::anyhow!("SetRollout: {s}"))?
        .into_inner();
    let rollout_id = started.audit.map(|a| a.id).unwrap_or_default();
    say!("fault injected: rollout of {CANDIDATE} at {PERCENT} % (normal inputs only so far)");
    let ready = until_state(
        &replicas,
        &token,
        CANDIDATE,
        "READY",
        Duration::from_secs(30),
    )
    .await;
    let routed = Instant::now();
    let mut taking = false;
    while !taking && routed.elapsed() < Duration::from_secs(10) {
        let shots = ctx.gateways.shots();
        taking = (0..ctx.gateways.len()).all(|g| {
            shots
                .iter()
                .any(|s| s.gateway == g && s.kind == Kind::Probe && s.version == CANDIDATE)
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    say!(
        "canary READY on both replicas: {}; every gateway routes to it: {taking}",
        ready.is_some()
    );
    tokio::time::sleep(HEALTHY).await;
    let healthy_status = model_status(&mut ctx.ops).await?;
    let survived_healthy = healthy_status.rollout_candidate == CANDIDATE;

    // The breach: inputs the candidate scores NaN, for entities in its share.
    let breach_unix = unix_ms();
    let rate = (opts.rate / 10).max(10);
    let stream = ctx
        .gateways
        .spawn_stream(Kind::Broken, broken_entities, broken, rate);
    say!("breach: {rate}/s requests with tenure_months 5000 for entities in the canary's share");
    let mut audit = None;
    let mut back: Vec<Option<u64>> = vec![None; ctx.gateways.len()];
    let bound = Instant::now() + Duration::from_secs(30);
    while Instant::now() < bound {
        let shots = ctx.gateways.shots();
        for (g, at) in back.iter_mut().enumerate() {
            // Rolled back for good: no answer from the candidate for 1 s after.
            *at = rolled_back_at(&shots, g).filter(|t| unix_ms() >= t + 1000);
        }
        if audit.is_none() {
            audit = mesh_rollback(ctx, rollout_id).await;
        }
        if audit.is_some() && back.iter().all(Option::is_some) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stream.stop().await;
    probes.stop().await;
    let lift_unix = unix_ms();
    let rollbacks = canary_rollbacks(ctx).await;
    say!(
        "canary: audit {:?}, gateways back at {back:?}",
        audit.as_ref().map(|a| a.id)
    );
    let shots = ctx.gateways.shots();
    Ok(verdict(Verdict {
        traffic,
        inject_unix,
        lift_unix,
        ready_unix_ms: ready.map(|us| (us / 1000) as u64),
        taking,
        survived_healthy,
        breach_unix,
        back,
        audit,
        rollbacks,
        shots,
    }))
}

/// The stop of the rollout by actor `mesh` after audit record `after`, if there is one.
async fn mesh_rollback(ctx: &mut Ctx<'_>, after: i64) -> Option<mesh_proto::admin::AuditEntry> {
    let history = ctx
        .ops
        .history(mesh_proto::admin::HistoryRequest {
            model: MODEL.into(),
            limit: 20,
        })
        .await
        .ok()?
        .into_inner();
    history
        .entries
        .into_iter()
        .find(|e| e.id > after && e.action == "stop_rollout" && e.actor == "mesh")
}

/// `mesh_canary_rollbacks_total{model="churn"}` of each gateway.
async fn canary_rollbacks(ctx: &Ctx<'_>) -> Vec<Option<f64>> {
    let mut all = Vec::new();
    for gateway in [&ctx.mesh.gateway, &ctx.mesh.gateway2] {
        let lines = metric(gateway.metrics_port, "mesh_canary_rollbacks_total").await;
        all.push(lines.and_then(|l| {
            l.into_iter()
                .find(|(labels, _)| labels.contains("\"churn\""))
                .map(|(_, v)| v)
        }));
    }
    all
}

struct Verdict {
    traffic: super::probe::Traffic,
    inject_unix: u64,
    lift_unix: u64,
    ready_unix_ms: Option<u64>,
    taking: bool,
    survived_healthy: bool,
    breach_unix: u64,
    back: Vec<Option<u64>>,
    audit: Option<mesh_proto::admin::AuditEntry>,
    rollbacks: Vec<Option<f64>>,
    shots: Vec<Shot>,
}

fn verdict(v: Verdict) -> Fault {
    // A rollback before the breach (a false alarm while the canary was healthy) has no time
    // after the breach to measure.
    let early = v
        .audit
        .as_ref()
        .is_some_and(|a| a.at_unix_micros / 1000 < v.breach_unix as i64);
    let after_breach: Vec<Option<f64>> = v
        .back
        .iter()
        .map(|b| b.filter(|_| !early))
        .map(|b| b.map(|t| t.saturating_sub(v.breach_unix) as f64 / 1000.0))
        .collect();
    let detected_s = v
        .audit
        .as_ref()
        .map(|a| (a.at_unix_micros / 1000 - v.breach_unix as i64) as f64 / 1000.0);
    let broken: Vec<&Shot> = v.shots.iter().filter(|s| s.kind == Kind::Broken).collect();
    let broken_ok = broken.iter().filter(|s| s.code == 0).count();
    let seen_nan = broken.iter().filter(|s| s.code == 0 && !s.finite).count();
    let broken_not_production = broken
        .iter()
        .filter(|s| s.code == 0 && s.version != "1")
        .count();
    let figures = v
        .audit
        .as_ref()
        .map(|a| a.details.clone())
        .unwrap_or_default();
    let has_figures = figures.contains("\"candidate\"")
        && figures.contains("\"production\"")
        && figures.contains("\"error_rate\"")
        && figures.contains("\"calls\"");
    let fmt_s = |s: &Option<f64>| s.map_or("never".to_owned(), |s| format!("{s:.1} s"));
    let checks = vec![
        Check {
            what: format!(
                "the canary was in place and healthy first: {CANDIDATE} READY on both replicas ({}), every gateway routed to it ({}), not rolled back during {} s of normal inputs ({})",
                v.ready_unix_ms.is_some(),
                v.taking,
                HEALTHY.as_secs(),
                v.survived_healthy
            ),
            pass: v.ready_unix_ms.is_some() && v.taking && v.survived_healthy,
            invariant: false,
        },
        Check {
            what: format!(
                "the canary rolled itself back: audit record stop_rollout by actor `mesh` with the candidate's and production's figures ({}; {})",
                v.audit.as_ref().map_or("none".to_owned(), |a| format!("{:?}", a.reason)),
                if has_figures { figures.as_str() } else { "no figures" }
            ),
            pass: v.audit.is_some() && has_figures,
            invariant: true,
        },
        Check {
            what: format!(
                "every gateway back on production within {} s of the breach (first broken input): {}gateway-1 {}, gateway-2 {} (audit record {} after it)",
                ROLLBACK_BOUND.as_secs(),
                if early { "ROLLED BACK BEFORE THE BREACH; " } else { "" },
                fmt_s(&after_breach[0]),
                fmt_s(&after_breach[1]),
                fmt_s(&detected_s)
            ),
            pass: after_breach
                .iter()
                .all(|s| s.is_some_and(|s| s <= ROLLBACK_BOUND.as_secs_f64())),
            invariant: false,
        },
        Check {
            what: format!(
                "callers never saw the canary's failures: of {} broken inputs, {broken_ok} answered OK, {seen_nan} with a non-finite score, {broken_not_production} not from production (1)",
                broken.len()
            ),
            pass: !broken.is_empty() && seen_nan == 0 && broken_not_production == 0,
            invariant: true,
        },
    ];
    Fault {
        traffic: v.traffic,
        inject_unix: v.inject_unix,
        lift_unix: v.lift_unix,
        checks,
        details: json!({
            "candidate": CANDIDATE,
            "percent": PERCENT,
            "ready_unix_ms": v.ready_unix_ms,
            "breach_unix_ms": v.breach_unix,
            "back_on_production_after_breach_s": after_breach,
            "audit_after_breach_s": detected_s,
            "audit": v.audit.as_ref().map(|a| json!({"id": a.id, "actor": a.actor, "action": a.action, "reason": a.reason, "details": a.details})),
            "canary_rollbacks_per_gateway": v.rollbacks,
            "broken_inputs": broken.len(),
        }),
        notes: vec![format!(
            "breach at unix ms {}; back on production after {} (gateway-1) and {} (gateway-2); audit record by `mesh` after {}; mesh_canary_rollbacks_total per gateway {:?}",
            v.breach_unix,
            fmt_s(&after_breach[0]),
            fmt_s(&after_breach[1]),
            fmt_s(&detected_s),
            v.rollbacks
        )],
        time_to_recover_s: None,
        recovery: "n/a".into(),
        allowed_versions: &["1", CANDIDATE],
        steady: None,
    }
}
