//! `mesh-chaos`: the chaos suite. Starts the real mesh as separate processes (PostgreSQL, Redis,
//! features, two inference replicas, logger, two gateways, the live model registry in that
//! PostgreSQL; loopback ports only), seeds it, drives
//! steady open-loop load with `mesh-bench`, injects one fault at a time while the load runs, and
//! reports per scenario: requests, the share that succeeded within the deadline, p99 during the
//! fault, time to recover, and predictions served against predictions found in PostgreSQL.
//!
//! The invariants count what the client received, never what the schema already guarantees:
//! something was served (`served > 0`), every OK answer carried a prediction id (`served` ==
//! OK answers), no id reached the client twice, every served id is in `predictions`, and the
//! records carry their own serve time (`served_at`, the record's `time_unix_micros`): in the
//! order the client received the answers, no record is stamped later than a following one by
//! more than the longest OK latency (plus 100 ms), which a record stamped when it was written
//! (after an outage, a replay) breaks.
//!
//! Scenario 0 is the steady baseline (load, no fault). A real Prometheus and Alertmanager watch
//! the mesh throughout ([`alerts`]): each scenario's alerts must be the ones it expects
//! (scenarios 11-13, the model lifecycle, are not judged on alerts).
//!
//! Every fault is real (processes killed or stopped, servers stopped) except two: the 500 ms
//! latency of scenario 4 is added by a TCP proxy inside this process
//! (`mesh_testkit::proxy::DelayProxy`) between the gateway and inference replica 2, and in
//! scenario 13 a version's golden fixture is a FIFO this process holds, so a replica's load of
//! it lasts until released (see `lifecycle`). Scenarios 11-13 (the model lifecycle) are in
//! `lifecycle`.
//!
//! Scenarios 14–16 are the HA mode (`--ha`, [`ha`]): the mesh on a Patroni cluster and Redis
//! under Sentinel, the gateways finding the inference replicas through DNS discovery; `kill -9`
//! of the PostgreSQL primary, `kill -9` of the Redis master, and inference scaled 2 → 3 → 1.
//! Without `--ha` none of it runs, and Patroni, etcd and Sentinel are not needed.
//!
//! Everything is bounded in time; only processes this program started are signalled (by PID);
//! all of them stop on exit, on error and on Ctrl-C (the mesh is a guard that stops what it
//! started when dropped).

mod alerts;
mod badinput;
mod ha;
mod lifecycle;
mod load;
mod mesh;
mod poison;
mod probe;
mod procs;
mod tempspace;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use serde_json::json;

use crate::load::{Class, Load};
use crate::mesh::{Mesh, Paths, StoreMode};

/// Wall clock, unix ms.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Prints a progress line with the time since start.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!("[chaos {:>6.1}s] {}", $crate::elapsed_s(), format!($($arg)*))
    };
}

/// Seconds since the program started.
pub fn elapsed_s() -> f64 {
    STARTED.get_or_init(Instant::now).elapsed().as_secs_f64()
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Profile {
    Release,
    Debug,
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Chaos suite for the mesh: real processes, real faults, open-loop load, a report"
)]
struct Opts {
    /// Which build's binaries to run (`target/<profile>/…`).
    #[arg(long, value_enum, default_value_t = Profile::Release)]
    profile: Profile,
    /// The repository root.
    #[arg(long, default_value = ".")]
    repo: PathBuf,
    /// Where to write summary.md, chaos.json and logs/.
    #[arg(long, default_value = "chaos-results")]
    out: PathBuf,
    /// Scenarios to run, e.g. `1,4` (default: all, 0-13; 0 is the steady baseline, 11-13 the
    /// model lifecycle; with `--ha`: 14-16).
    #[arg(long, value_delimiter = ',')]
    only: Vec<u8>,
    /// The HA mode: the mesh on Patroni and Sentinel with DNS discovery of the inference
    /// replicas, and scenarios 14-16 (PostgreSQL primary killed, Redis master killed, inference
    /// scaled 2 -> 3 -> 1). Needs patroni, etcd and redis-sentinel (scripts/bootstrap.sh --ha).
    #[arg(long)]
    ha: bool,
    /// Open-loop load, requests per second.
    #[arg(long, default_value_t = 300)]
    rate: u64,
    /// Deadline of each request (grpc-timeout), ms.
    #[arg(long, default_value_t = 250)]
    timeout_ms: u64,
    /// How long each fault lasts, seconds.
    #[arg(long, default_value_t = 30)]
    fault_secs: u64,
    /// Load before the fault, seconds.
    #[arg(long, default_value_t = 5)]
    baseline_secs: u64,
    /// Longest wait for recovery after the fault is lifted, seconds.
    #[arg(long, default_value_t = 30)]
    recover_secs: u64,
    /// Longest wait for the prediction records to reach PostgreSQL after the load, seconds.
    #[arg(long, default_value_t = 60)]
    deliver_secs: u64,
    /// Scenario 7: bad requests to send in all.
    #[arg(long, default_value_t = 4000)]
    bad_requests: usize,
    /// Longest wait after each scenario until no alert is pending or firing, seconds.
    #[arg(long, default_value_t = 120)]
    alerts_quiet_secs: u64,
    /// Exit non-zero if any target fails.
    #[arg(long)]
    enforce: bool,
    /// Exit non-zero only if an invariant fails (served > 0, served == OK answers, found ==
    /// served, no id received twice, records keep their serve time, no crashes, scenario 6:
    /// every accepted request completes, scenario 9: memory bounded, scenario 10: valid records
    /// stored and poison ones kept as rejects, scenarios 11-13: every answer from an allowed
    /// version, each swap or rollback reaching every gateway, no request to a version a replica
    /// has not reported ready, scenarios 14-16: no mesh service restarted, writes resume on the
    /// new primary with every served record there once, the features service follows the new
    /// Redis master, an added replica joins only once SERVING and removed ones drain out); the
    /// other targets are printed.
    #[arg(long, conflicts_with = "enforce")]
    enforce_invariants: bool,
}

const NAMES: [&str; 11] = [
    "steady load, no fault (baseline)",
    "kill -9 inference-1, restart",
    "Redis stopped, restarted",
    "PostgreSQL stopped, restarted",
    "+500 ms on inference-2 (injected proxy)",
    "kill -9 logger, restart",
    "SIGTERM gateway in flight, restart",
    "bad input at volume",
    "kill -9 gateway under load, restart on its spool",
    "PostgreSQL hung (SIGSTOP), resumed",
    "poison records to the logger at volume",
];

/// The highest scenario number (11 and above: `lifecycle::NAMES`).
const LAST: u8 = 13;

/// One target or invariant and whether it held.
#[derive(Clone, serde::Serialize)]
struct Check {
    what: String,
    pass: bool,
    /// Must hold regardless of machine noise (enforced by `--enforce-invariants`).
    invariant: bool,
}

#[derive(serde::Serialize)]
struct Outcome {
    scenario: u8,
    name: String,
    requests: usize,
    ok_within_deadline: usize,
    ok_within_deadline_pct: f64,
    p99_during_fault_ms: Option<f64>,
    /// `None`: n/a (scenario 7) or not recovered within the bound (see `recovery`).
    time_to_recover_s: Option<f64>,
    recovery: String,
    /// Prediction ids the client received in OK answers.
    served: usize,
    /// OK answers the client received.
    ok_answers: usize,
    /// Distinct served ids found in `predictions`.
    found: i64,
    rows_added: i64,
    /// Served ids the client received more than once.
    duplicates: usize,
    delivery: String,
    fault_s: f64,
    checks: Vec<Check>,
    /// What Prometheus and Alertmanager notified during the scenario.
    alerts: alerts::Report,
    details: serde_json::Value,
    notes: Vec<String>,
}

impl Outcome {
    fn pass(&self) -> bool {
        self.checks.iter().all(|c| c.pass)
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    STARTED.get_or_init(Instant::now);
    let opts = Opts::parse();
    let signal = async {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        result = run(opts) => match result {
            Ok(code) => code,
            Err(e) => {
                say!("error: {e:#}");
                ExitCode::from(2)
            }
        },
        _ = signal => {
            say!("interrupted: stopping everything mesh-chaos started");
            ExitCode::from(130)
        }
    }
}

async fn run(opts: Opts) -> anyhow::Result<ExitCode> {
    let repo = std::fs::canonicalize(&opts.repo).context("--repo")?;
    let profile = match opts.profile {
        Profile::Release => "release",
        Profile::Debug => "debug",
    };
    let out = if opts.out.is_absolute() {
        opts.out.clone()
    } else {
        repo.join(&opts.out)
    };
    let (first, last) = if opts.ha {
        (ha::FIRST, ha::LAST)
    } else {
        (0, LAST)
    };
    let scenarios: Vec<u8> = if opts.only.is_empty() {
        (first..=last).collect()
    } else {
        let mut s = opts.only.clone();
        s.sort_unstable();
        s.dedup();
        if let Some(bad) = s.iter().find(|n| !(first..=last).contains(*n)) {
            anyhow::bail!(
                "--only: scenario {bad} is not in {first}-{last}{}",
                if opts.ha {
                    " (--ha runs only the HA scenarios)"
                } else {
                    " (14-16 need --ha)"
                }
            );
        }
        s
    };
    if out.join("logs").exists() {
        std::fs::remove_dir_all(out.join("logs"))?;
    }
    for n in 0..=ha::LAST {
        let _ = std::fs::remove_dir_all(out.join(format!("scenario-{n}")));
    }
    std::fs::create_dir_all(out.join("logs"))?;
    say!(
        "mesh-chaos: {profile} build{}, scenarios {:?}, load {}/s open-loop, deadline {} ms, faults {} s",
        if opts.ha { ", HA mode (Patroni, Sentinel, DNS discovery)" } else { "" },
        scenarios,
        opts.rate,
        opts.timeout_ms,
        opts.fault_secs
    );
    let suite_started = Instant::now();
    let mut mesh = Mesh::start(
        Paths {
            repo: repo.clone(),
            bin: repo.join("target").join(profile),
            logs: out.join("logs"),
        },
        if opts.ha {
            StoreMode::Ha
        } else {
            StoreMode::Single
        },
    )
    .await?;
    mesh.seed(&repo.join("data/demo_entities.jsonl")).await?;
    let targets: Vec<alerts::Target> = mesh
        .services()
        .iter()
        .map(|s| alerts::Target::of(&s.name, s.metrics_port))
        .collect();
    let alerting = alerts::AlertStack::start(
        &repo,
        &out,
        &targets,
        Duration::from_secs(opts.alerts_quiet_secs),
    )
    .await?;

    // Warm caches and connections (not measured), and let its records land.
    say!("warm-up: 3 s of load (not measured)");
    let warm = Load::start(
        &mesh.bench(),
        &mesh.gateway.url(),
        opts.rate,
        opts.timeout_ms,
        3.0,
        &out.join("warmup"),
        "warmup",
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let warm = warm.finish().await?;
    let warm_ok = warm.reqs.iter().filter(|r| r.code == 0).count();
    say!("warm-up: {warm_ok}/{} OK", warm.reqs.len());
    wait_delivery(&mesh, &warm.ids, Duration::from_secs(opts.deliver_secs)).await;
    let _ = std::fs::remove_dir_all(out.join("warmup"));

    let mut outcomes = Vec::new();
    for &n in &scenarios {
        let outcome = if (lifecycle::FIRST..ha::FIRST).contains(&n) {
            lifecycle::run(&mut mesh, &opts, n, &out).await?
        } else {
            scenario(&mut mesh, &alerting, &opts, n, &out).await?
        };
        print_row(&outcome);
        outcomes.push(outcome);
    }
    let total = suite_started.elapsed();
    drop(alerting);
    drop(mesh);

    let (summary, failed_enforced) = summarise(&opts, profile, &outcomes, total);
    std::fs::write(out.join("summary.md"), &summary)?;
    std::fs::write(
        out.join("chaos.json"),
        serde_json::to_string_pretty(&json!({
            "profile": profile,
            "ha": opts.ha,
            "rate": opts.rate,
            "timeout_ms": opts.timeout_ms,
            "fault_secs": opts.fault_secs,
            "baseline_secs": opts.baseline_secs,
            "recover_secs": opts.recover_secs,
            "deliver_secs": opts.deliver_secs,
            "enforce": if opts.enforce { "all" } else if opts.enforce_invariants { "invariants" } else { "none" },
            "duration_s": total.as_secs_f64(),
            "scenarios": outcomes,
        }))?,
    )?;
    println!("{summary}");
    say!(
        "wrote {} and {}",
        out.join("summary.md").display(),
        out.join("chaos.json").display()
    );
    if failed_enforced.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        say!("FAILED (enforced): {}", failed_enforced.join("; "));
        Ok(ExitCode::from(1))
    }
}

/// Waits until the gateway's `/health` says healthy (bounded); whether it did.
async fn wait_healthy(mesh: &Mesh, bound: Duration) -> bool {
    let until = Instant::now() + bound;
    while Instant::now() < until {
        if probe::gateway_health(mesh.gateway.metrics_port)
            .await
            .as_deref()
            == Some("healthy")
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

struct Delivery {
    found: i64,
    rows: i64,
    pending: Option<f64>,
    metric_present: bool,
    waited: Duration,
    settled: bool,
}

/// Waits until the gateway's spool is empty (`mesh_spool_pending_records` 0; absent counts as 0)
/// and the prediction log has stopped growing, with every id in `ids` found or the row count
/// stable for 5 s; bounded by `bound`.
async fn wait_delivery(mesh: &Mesh, ids: &[String], bound: Duration) -> Delivery {
    let started = Instant::now();
    let url = mesh.db_url();
    let mut last_rows = -1;
    let mut rows_since = Instant::now();
    let mut d = Delivery {
        found: 0,
        rows: 0,
        pending: None,
        metric_present: false,
        waited: Duration::ZERO,
        settled: false,
    };
    loop {
        let pending = match probe::spool_pending(mesh.gateway.metrics_port).await {
            Ok(Some(v)) => {
                d.metric_present = true;
                Some(v)
            }
            Ok(None) => Some(0.0),
            Err(_) => None,
        };
        d.pending = pending;
        if let Ok(c) = probe::log_counts(&url, ids).await {
            d.found = c.found;
            if c.rows != last_rows {
                last_rows = c.rows;
                rows_since = Instant::now();
            }
            d.rows = c.rows;
            let stable = rows_since.elapsed();
            if pending == Some(0.0)
                && ((d.found == ids.len() as i64 && stable >= Duration::from_secs(2))
                    || stable >= Duration::from_secs(5))
            {
                d.settled = true;
                break;
            }
        }
        if started.elapsed() >= bound {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    d.waited = started.elapsed();
    d
}

async fn sleep_until_offset(load: &Load, offset_ms: f64) {
    let wait = offset_ms - load.now_ms();
    if wait > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(wait / 1000.0)).await;
    }
}

/// Runs scenario `n`.
async fn scenario(
    mesh: &mut Mesh,
    alerting: &alerts::AlertStack,
    opts: &Opts,
    n: u8,
    out: &std::path::Path,
) -> anyhow::Result<Outcome> {
    let name = if n >= ha::FIRST {
        ha::NAMES[usize::from(n - ha::FIRST)]
    } else {
        NAMES[n as usize]
    };
    let deadline_ms = opts.timeout_ms as f64;
    let fault = Duration::from_secs(opts.fault_secs);
    let mut notes = Vec::new();
    say!("── scenario {n}: {name}");
    let alerts_mark = alerting.mark();
    let revived = mesh.revive().await?;
    if !revived.is_empty() {
        notes.push(format!(
            "restarted before the scenario (were not running): {}",
            revived.join(", ")
        ));
    }
    if !wait_healthy(mesh, Duration::from_secs(30)).await {
        notes.push("gateway /health was not `healthy` before the scenario (waited 30 s)".into());
    }
    let pg_url = mesh.db_url();
    let rows_before = probe::log_counts(&pg_url, &[]).await?.rows;
    let max_secs = (opts.baseline_secs + opts.fault_secs + opts.recover_secs + 60) as f64;
    let mut load = Load::start(
        &mesh.bench(),
        &mesh.gateway.url(),
        opts.rate,
        opts.timeout_ms,
        max_secs,
        &out.join(format!("scenario-{n}")),
        &format!("chaos-{n}"),
    )
    .await?;
    sleep_until_offset(&load, opts.baseline_secs as f64 * 1000.0).await;

    // Inject.
    let inject_unix = unix_ms();
    let mut details = json!({});
    let mut barrage = None;
    let mut frozen = None;
    let mut poisoner = None;
    let mut memory = MemoryWatch::default();
    let pids_before = ha::pids(mesh);
    let mut killed = None;
    let mut scaling = None;
    match n {
        0 => say!("no fault: steady load (the baseline; no alert may fire)"),
        1 => {
            mesh.inference1.kill9();
            say!("fault injected: kill -9 inference-1");
        }
        2 => {
            mesh.stop_redis()?;
            say!("fault injected: Redis stopped");
        }
        3 => {
            mesh.stop_pg()?;
            say!("fault injected: PostgreSQL stopped");
        }
        4 => {
            mesh.proxy.set_delay(Duration::from_millis(500));
            say!("fault injected: +500 ms on inference-2 (the injected fake: DelayProxy in mesh-chaos)");
        }
        5 => {
            mesh.logger.kill9();
            say!("fault injected: kill -9 logger");
        }
        6 => {
            mesh.gateway.signal(libc::SIGTERM);
            say!("fault injected: SIGTERM to the gateway");
        }
        7 => {
            let addr = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let plan = badinput::plan(
                &badinput::Targets {
                    gateway: addr(mesh.gateway.port),
                    features: addr(mesh.features.port),
                    inference: addr(mesh.inference1.port),
                    logger: addr(mesh.logger.port),
                    internal_token: mesh.internal_token.clone(),
                },
                opts.bad_requests,
            );
            let until = tokio::time::Instant::now() + fault * 3 + Duration::from_secs(30);
            say!(
                "fault injected: {} bad requests (gateway, and a few at features/inference/logger)",
                plan.len()
            );
            barrage = Some(tokio::spawn(badinput::run(plan, 4, until)));
        }
        8 => {
            mesh.gateway.kill9();
            say!("fault injected: kill -9 gateway (its spool stays on disk)");
        }
        9 => {
            memory.sample(mesh).await;
            let guard = mesh.freeze_pg()?;
            say!(
                "fault injected: PostgreSQL hung (SIGSTOP to the postmaster and {} children)",
                guard.count().saturating_sub(1)
            );
            frozen = Some(guard);
        }
        10 => {
            let plan = poison::Plan {
                logger_url: mesh.logger.url(),
                internal_token: mesh.internal_token.clone(),
                records_per_call: 20,
                poison_every: 5,
                interval: Duration::from_millis(100),
                until: tokio::time::Instant::now() + fault,
                id_prefix: format!("chaos-poison-{inject_unix}"),
            };
            say!("fault injected: Record calls straight to the logger, 20 records each, 1 in 5 poison (timestamp i64::MAX or NaN score)");
            poisoner = Some(tokio::spawn(poison::run(plan)));
        }
        14 => {
            let kill = ha::failover::kill_primary(mesh)?;
            say!(
                "fault injected: kill -9 of the PostgreSQL primary's postmaster (127.0.0.1:{}); Patroni fails over",
                kill.old_port
            );
            killed = Some(kill);
        }
        15 => {
            let kill = ha::failover::kill_master(mesh)?;
            say!(
                "fault injected: kill -9 of the Redis master (127.0.0.1:{}); Sentinel fails over",
                kill.old_port
            );
            killed = Some(kill);
        }
        16 => {
            let metrics_port = mesh_testkit::free_port()?;
            scaling = Some(ha::scaling::Scaling::scale_up(mesh, metrics_port).await?);
        }
        _ => unreachable!(),
    }

    // Hold.
    let hold_until = tokio::time::Instant::now() + fault;
    let mut failed_over = None;
    match n {
        6 => {
            let exited = mesh.gateway.wait_exit(Duration::from_secs(60)).await;
            let exit_after = (unix_ms() - inject_unix) as f64 / 1000.0;
            if exited {
                say!("gateway exited {exit_after:.1} s after SIGTERM");
            } else {
                say!("gateway still running 60 s after SIGTERM: killing it");
                mesh.gateway.kill9();
                notes.push("the gateway did not exit within 60 s of SIGTERM (killed)".into());
            }
            details["gateway_exit_after_sigterm_s"] = json!(exit_after);
            tokio::time::sleep_until(hold_until).await;
        }
        7 => {
            let result = match barrage.take() {
                Some(task) => task.await?,
                None => badinput::Barrage::default(),
            };
            say!(
                "bad input done: {} requests, {} kinds of answer",
                result.sent,
                result.outcomes.len()
            );
            details["bad_requests_sent"] = json!(result.sent);
            details["bad_request_outcomes"] = json!(result.outcomes);
            details["bad_request_outcomes_by_kind"] = json!(result.by_kind);
        }
        9 => {
            // Watch memory and the spool while PostgreSQL hangs.
            while tokio::time::Instant::now() < hold_until {
                memory.sample(mesh).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        // The failovers are measured while the load goes on.
        14 | 15 => {
            if let Some(kill) = &killed {
                let failover = if n == 14 {
                    ha::failover::watch_pg(mesh, kill, hold_until).await
                } else {
                    ha::failover::watch_redis(mesh, kill, hold_until).await
                };
                failed_over = Some(failover);
            }
        }
        16 => {
            if let Some(s) = scaling.as_mut() {
                // The fault time counts from the scale-up: half on three replicas, half on one.
                let inject_at = hold_until - fault;
                s.scale_down(
                    mesh,
                    inject_at + fault / 2,
                    hold_until,
                    Duration::from_millis(opts.timeout_ms),
                )
                .await?;
            }
        }
        _ => tokio::time::sleep_until(hold_until).await,
    }

    // Lift.
    match n {
        1 => mesh.inference1.start()?,
        2 => mesh.start_redis()?,
        3 => mesh.restart_pg()?,
        4 => mesh.proxy.set_delay(Duration::ZERO),
        5 => mesh.logger.start()?,
        6 | 8 => mesh.gateway.start()?,
        // SIGCONT to every process it stopped.
        9 => drop(frozen.take()),
        16 => {
            if let Some(s) = scaling.as_mut() {
                s.restore(mesh).await?;
            }
        }
        _ => {}
    }
    let poisoned = match poisoner.take() {
        Some(task) => Some(task.await?),
        None => None,
    };
    let lift_unix = unix_ms();
    let fault_s = (lift_unix - inject_unix) as f64 / 1000.0;
    say!(
        "fault lifted after {fault_s:.1} s{}",
        match n {
            1 => ": inference-1 restarted on its port",
            2 => ": Redis restarted on its port",
            3 => ": PostgreSQL restarted",
            4 => ": delay 0",
            5 => ": logger restarted",
            6 | 8 => ": gateway restarted with the same MESH_SPOOL_DIR",
            9 => ": PostgreSQL resumed (SIGCONT)",
            10 => ": poison sender done",
            14 | 15 => ": nothing to lift (the stores failed over by themselves; recovery counts from the kill)",
            16 => ": 127.0.0.3 back in DNS (inference-2 rejoined)",
            _ => "",
        }
    );

    // Recover (load goes on meanwhile).
    let lift_off = load.offset_of(lift_unix);
    let inject_off = load.offset_of(inject_unix);
    // A failover has nothing to lift: how long predictions were disturbed counts from the kill,
    // until the first clean window after the last request of the fault time that failed.
    let recover_from = if matches!(n, 14 | 15) {
        load.poll()?;
        load.reqs
            .iter()
            .filter(|r| r.start_ms >= inject_off && r.start_ms < lift_off)
            .filter(|r| !r.ok_within(deadline_ms))
            .map(|r| r.start_ms)
            .fold(inject_off, f64::max)
    } else {
        lift_off
    };
    let (time_to_recover_s, recovery) = if n == 7 {
        // No fault to recover from: keep the load a little longer, then check survival.
        tokio::time::sleep(Duration::from_secs(2)).await;
        (None, "n/a".to_owned())
    } else {
        let bound = Instant::now() + Duration::from_secs(opts.recover_secs);
        let mut healthy_at = None;
        let mut success_at = None;
        loop {
            if healthy_at.is_none()
                && probe::gateway_health(mesh.gateway.metrics_port)
                    .await
                    .as_deref()
                    == Some("healthy")
            {
                healthy_at = Some(load.offset_of(unix_ms()));
            }
            load.poll()?;
            if success_at.is_none() {
                success_at =
                    load::success_back_at(&load.reqs, recover_from, load.now_ms(), deadline_ms);
            }
            if (healthy_at.is_some() && success_at.is_some()) || Instant::now() >= bound {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match (healthy_at, success_at) {
            (Some(h), Some(s)) if matches!(n, 14 | 15) => {
                // 14, 15: health is read only after the fault time, so it cannot say when
                // during the failover the gateway was healthy; the success rate can.
                let t = ((s - inject_off) / 1000.0).max(0.0);
                let t = (t * 10.0).round() / 10.0;
                say!(
                    "recovered {t:.1} s after the kill (success back to 100 %; health healthy {:.1} s after the fault time)",
                    (h - lift_off).max(0.0) / 1000.0
                );
                (
                    Some(t),
                    format!(
                        "{t:.1} s after the kill (success {t:.1} s; health healthy {:.1} s after the fault time)",
                        (h - lift_off).max(0.0) / 1000.0
                    ),
                )
            }
            (Some(h), Some(s)) => {
                let t = ((h.max(s) - lift_off) / 1000.0).max(0.0);
                let t = (t * 10.0).round() / 10.0;
                say!(
                    "recovered after {t:.1} s (health healthy after {:.1} s, success back to 100 % after {:.1} s)",
                    (h - lift_off) / 1000.0,
                    (s - lift_off) / 1000.0
                );
                (
                    Some(t),
                    format!(
                        "{t:.1} s (health {:.1} s, success {:.1} s)",
                        (h - lift_off).max(0.0) / 1000.0,
                        (s - lift_off).max(0.0) / 1000.0
                    ),
                )
            }
            (h, s) => {
                let what = match (h, s) {
                    (None, None) => "neither health nor success rate",
                    (None, _) => "gateway /health never said healthy",
                    _ => "the per-second success rate never got back to 100 %",
                };
                say!("NOT recovered within {} s: {what}", opts.recover_secs);
                (None, format!("not within {} s ({what})", opts.recover_secs))
            }
        }
    };

    // Scenario 7: survival, checked while the load still runs and again after.
    let mut survival = None;
    if n == 7 {
        survival = Some(survival_check(mesh).await);
    }

    // Stop the load and let the records land.
    let load_start_unix = load.start_unix_ms;
    let fin = load.finish().await?;
    let load_end_unix = unix_ms();
    say!("load stopped: {} requests", fin.reqs.len());
    let delivery = wait_delivery(mesh, &fin.ids, Duration::from_secs(opts.deliver_secs)).await;
    let served = fin.ids.len();
    let distinct_served = {
        let mut ids: Vec<&String> = fin.ids.iter().collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    };
    let delivery_text = format!(
        "{}found {}/{} after {:.1} s; spool pending {}",
        if delivery.settled { "" } else { "NOT SETTLED: " },
        delivery.found,
        served,
        delivery.waited.as_secs_f64(),
        match (delivery.pending, delivery.metric_present) {
            (Some(p), true) => format!("{p}"),
            (Some(_), false) => "n/a (gateway has no mesh_spool_pending_records; waited for the PostgreSQL count to settle)".to_owned(),
            (None, _) => "unreadable".to_owned(),
        }
    );
    say!("delivered: {delivery_text}");

    // Figures.
    let reqs = &fin.reqs;
    let requests = reqs.len();
    let ok_within = reqs.iter().filter(|r| r.ok_within(deadline_ms)).count();
    let pct = |a: usize, b: usize| {
        if b == 0 {
            0.0
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    let mut in_fault: Vec<f64> = reqs
        .iter()
        .filter(|r| r.start_ms >= inject_off && r.start_ms < lift_off)
        .map(|r| r.latency_ms)
        .collect();
    let p99 = load::quantile(&mut in_fault, 0.99);
    let ok_pct = pct(ok_within, requests);
    let duplicates = load::duplicate_ids(&fin.ids);
    let ok_answers = reqs.iter().filter(|r| r.code == 0).count();
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    for r in reqs {
        *codes
            .entry(format!(
                "{:?}{}",
                tonic::Code::from_i32(r.code),
                match r.class {
                    Class::Server => "",
                    Class::Timeout => " (client deadline timer)",
                    Class::NotAccepted => " (not accepted)",
                    Class::Transport => " (transport)",
                }
            ))
            .or_default() += 1;
    }
    details["answers"] = json!(codes);
    details["ok"] = json!(ok_answers);
    details["requests_during_fault"] = json!(in_fault.len());
    details["bench_report"] = fin.report.clone();

    let order = serve_time_order(&pg_url, &fin.ids, reqs, load_start_unix, load_end_unix).await;
    details["serve_time_order"] = json!({
        "checked": order.checked,
        "max_inversion_ms": order.max_inversion_ms,
        "bound_ms": order.bound_ms,
        "outside_run": order.outside_run,
    });
    let mut checks = vec![
        Check {
            what: format!("served > 0 ({served})"),
            pass: served > 0,
            invariant: true,
        },
        Check {
            what: format!(
                "served == OK answers the client received ({served} ids / {ok_answers} OK)"
            ),
            pass: served == ok_answers,
            invariant: true,
        },
        Check {
            what: format!(
                "found == served: every served id in `predictions` ({} / {distinct_served} distinct)",
                delivery.found
            ),
            pass: delivery.found == distinct_served as i64,
            invariant: true,
        },
        Check {
            what: format!("no prediction id received twice by the client ({duplicates})"),
            pass: duplicates == 0,
            invariant: true,
        },
        Check {
            what: format!(
                "records keep their serve time: {}/{served} checked, largest served_at inversion in the order answers arrived {:.1} ms (bound {:.0} ms), {} outside the load's run",
                order.checked, order.max_inversion_ms, order.bound_ms, order.outside_run
            ),
            pass: order.checked == distinct_served
                && order.max_inversion_ms <= order.bound_ms
                && order.outside_run == 0,
            invariant: true,
        },
    ];
    match n {
        0 | 1 | 2 | 4 | 5 | 14 | 15 | 16 => checks.push(Check {
            what: format!("succeeded within deadline >= 99.9 % ({ok_pct:.2} %)"),
            pass: ok_pct >= 99.9,
            invariant: false,
        }),
        3 | 9 => {
            let slack = deadline_ms + 50.0;
            let answered = reqs
                .iter()
                .filter(|r| r.class == Class::Server && r.latency_ms <= slack)
                .count();
            let timeouts = reqs.iter().filter(|r| r.class == Class::Timeout).count();
            let late = reqs
                .iter()
                .filter(|r| r.class == Class::Server && r.latency_ms > slack)
                .count();
            let other = reqs
                .iter()
                .filter(|r| matches!(r.class, Class::Transport | Class::NotAccepted))
                .count();
            details["answered_within_deadline_plus_50ms"] = json!(answered);
            details["client_deadline_timer_fired"] = json!(timeouts);
            details["answered_later_than_deadline_plus_50ms"] = json!(late);
            details["transport_failures"] = json!(other);
            checks.push(Check {
                what: format!(
                    "every request answered by the server (OK or error status) within deadline + 50 ms ({answered}/{requests}; {timeouts} client deadline expiries, {late} late, {other} transport)"
                ),
                pass: answered == requests,
                invariant: false,
            });
        }
        6 => {
            // Requests that could have been in flight at SIGTERM or arrived before the restart.
            let window: Vec<_> = reqs
                .iter()
                .filter(|r| r.start_ms >= inject_off - deadline_ms && r.start_ms < lift_off)
                .collect();
            let not_accepted = window
                .iter()
                .filter(|r| r.class == Class::NotAccepted)
                .count();
            let accepted: Vec<_> = window
                .iter()
                .filter(|r| r.class != Class::NotAccepted)
                .collect();
            let completed = accepted.iter().filter(|r| r.code == 0).count();
            let late = accepted
                .iter()
                .filter(|r| r.code == 0 && r.latency_ms > deadline_ms)
                .count();
            let mut violations: BTreeMap<String, usize> = BTreeMap::new();
            for r in accepted.iter().filter(|r| r.code != 0) {
                *violations
                    .entry(format!(
                        "{:?} ({:?}{}{})",
                        tonic::Code::from_i32(r.code),
                        r.class,
                        if r.detail.is_empty() { "" } else { ": " },
                        r.detail
                    ))
                    .or_default() += 1;
            }
            let violation_count: usize = violations.values().sum();
            details["drain_window_requests"] = json!(window.len());
            details["accepted"] = json!(accepted.len());
            details["accepted_completed_ok"] = json!(completed);
            details["accepted_completed_ok_but_late"] = json!(late);
            details["not_accepted"] = json!(not_accepted);
            details["violations"] = json!(violations);
            notes.push(format!(
                "from SIGTERM − deadline to the restart: {} requests; accepted {} (completed OK {completed}, of which {late} later than the deadline), not accepted (connection refused / refused by GOAWAY / never handed to the connection) {not_accepted}, accepted then failed {violation_count}{}",
                window.len(),
                accepted.len(),
                if violations.is_empty() {
                    String::new()
                } else {
                    format!(": {violations:?}")
                }
            ));
            checks.push(Check {
                what: format!(
                    "every accepted request completes ({violation_count} accepted then failed)"
                ),
                pass: violation_count == 0,
                invariant: true,
            });
        }
        7 => {
            let mut s = survival.take().unwrap_or_default();
            // And once more after the load stopped and the records landed.
            let after = survival_check(mesh).await;
            s.dead.extend(after.dead);
            s.dead.sort();
            s.dead.dedup();
            s.not_serving.extend(after.not_serving);
            s.not_serving.sort();
            s.not_serving.dedup();
            s.predicts_ok = s.predicts_ok.min(after.predicts_ok);
            notes.push(format!(
                "rows added also counts predictions made for bad requests that were still valid enough to be answered OK ({} such answers), for the barrage's PredictBatch items and for the {} survival-check Predicts: those were not served to the load, so rows added exceeds served here",
                details["bad_request_outcomes"]["grpc Ok"].as_u64().unwrap_or(0),
                s.predicts * 2
            ));
            details["crashes"] = json!(s.dead.len());
            details["dead"] = json!(s.dead);
            details["not_serving"] = json!(s.not_serving);
            details["normal_predicts_ok"] = json!(format!("{}/{}", s.predicts_ok, s.predicts));
            checks.push(Check {
                what: format!("crashes: {} (every process alive: kill -0)", s.dead.len()),
                pass: s.dead.is_empty(),
                invariant: true,
            });
            checks.push(Check {
                what: format!(
                    "every service answers grpc.health.v1 SERVING{}",
                    if s.not_serving.is_empty() {
                        String::new()
                    } else {
                        format!(" (not: {})", s.not_serving.join(", "))
                    }
                ),
                pass: s.not_serving.is_empty(),
                invariant: true,
            });
            checks.push(Check {
                what: format!("normal Predicts succeed ({}/{})", s.predicts_ok, s.predicts),
                pass: s.predicts_ok == s.predicts,
                invariant: true,
            });
        }
        _ => {}
    }
    if n == 9 {
        let growth = memory.max_growth_mib();
        details["memory"] = json!({
            "rss_kib_at_injection_and_peak": memory.rss.iter().map(|(s, a, p)| json!({"service": s, "at_injection": a, "peak": p})).collect::<Vec<_>>(),
            "spool_pending_peak": memory.spool_peak,
            "samples": memory.samples,
        });
        let rss: Vec<String> = memory
            .rss
            .iter()
            .map(|(name, at, peak)| {
                format!(
                    "{name} {:.0} -> {:.0} MiB",
                    *at as f64 / 1024.0,
                    *peak as f64 / 1024.0
                )
            })
            .collect();
        checks.push(Check {
            what: format!(
                "memory bounded while PostgreSQL hangs: RSS growth < {MEMORY_GROWTH_BOUND_MIB:.0} MiB ({}; {} samples); spool pending peak {} records",
                rss.join(", "),
                memory.samples,
                memory.spool_peak
            ),
            pass: memory.rss.len() == 3 && growth < MEMORY_GROWTH_BOUND_MIB,
            invariant: true,
        });
    }
    if let Some(sent) = &poisoned {
        poison_checks(&pg_url, sent, opts, &mut checks, &mut details).await;
    }
    if n >= ha::FIRST {
        match (n, &killed, &failed_over) {
            (14, Some(kill), Some(f)) => {
                ha::failover::pg_checks(
                    mesh,
                    kill,
                    f,
                    &fin.ids,
                    &mut checks,
                    &mut details,
                    &mut notes,
                )
                .await
            }
            (15, Some(kill), Some(f)) => {
                ha::failover::redis_checks(kill, f, &mut checks, &mut details)
            }
            _ => {}
        }
        if let Some(s) = &scaling {
            s.checks(&mut checks, &mut details);
        }
        checks.push(ha::no_restart_check(mesh, &pids_before));
    }
    let alerts = alerting
        .settle(
            n,
            alerts_mark,
            (inject_unix, lift_unix),
            &mesh.gateway.url(),
        )
        .await;
    say!(
        "alerts fired: {}; resolved: {}",
        alerts.fired_text(),
        alerts.resolved_text()
    );
    for (what, pass) in alerts.checks() {
        checks.push(Check {
            what,
            pass,
            invariant: true,
        });
    }
    if !delivery.settled {
        notes.push(format!(
            "delivery did not settle within {} s",
            opts.deliver_secs
        ));
    }
    let outcome = Outcome {
        scenario: n,
        name: name.to_owned(),
        requests,
        ok_within_deadline: ok_within,
        ok_within_deadline_pct: ok_pct,
        p99_during_fault_ms: p99,
        time_to_recover_s,
        recovery,
        served,
        ok_answers,
        found: delivery.found,
        rows_added: delivery.rows - rows_before,
        duplicates,
        delivery: delivery_text,
        fault_s,
        checks,
        alerts,
        details,
        notes,
    };
    Ok(outcome)
}

/// How the served records' `served_at` relates to the order the client received the answers.
struct ServeTimeOrder {
    /// Served ids (first occurrence) whose record was found.
    checked: usize,
    /// Largest amount by which a record's `served_at` exceeds that of a record answered later.
    max_inversion_ms: f64,
    /// The longest OK latency plus 100 ms: no inversion can exceed it if records carry their
    /// serve time (a record answered earlier was stamped before its answer; one answered later
    /// was stamped after its request started, at most one OK latency before its answer).
    bound_ms: f64,
    /// Records stamped more than 1 s outside the load's run.
    outside_run: usize,
}

/// Reads `served_at` of the served ids and walks them in the order the client received the
/// answers (`ids`), tracking the largest inversion.
async fn serve_time_order(
    url: &str,
    ids: &[String],
    reqs: &[load::Req],
    run_start_unix_ms: u64,
    run_end_unix_ms: u64,
) -> ServeTimeOrder {
    let longest_ok = reqs
        .iter()
        .filter(|r| r.code == 0)
        .map(|r| r.latency_ms)
        .fold(0.0, f64::max);
    let mut order = ServeTimeOrder {
        checked: 0,
        max_inversion_ms: 0.0,
        bound_ms: longest_ok + 100.0,
        outside_run: 0,
    };
    let stamps = match probe::served_at_micros(url, ids).await {
        Ok(stamps) => stamps,
        Err(e) => {
            say!("cannot read served_at: {e:#}");
            return order;
        }
    };
    let earliest = (run_start_unix_ms as i64 - 1000) * 1000;
    let latest = (run_end_unix_ms as i64 + 1000) * 1000;
    let mut seen = std::collections::HashSet::new();
    let mut running_max: Option<i64> = None;
    for id in ids {
        if !seen.insert(id.as_str()) {
            continue;
        }
        let Some(&t) = stamps.get(id) else { continue };
        order.checked += 1;
        if !(earliest..=latest).contains(&t) {
            order.outside_run += 1;
        }
        if let Some(m) = running_max {
            order.max_inversion_ms = order.max_inversion_ms.max((m - t) as f64 / 1000.0);
        }
        running_max = Some(running_max.map_or(t, |m| m.max(t)));
    }
    order
}

/// Peak memory of the gateway, logger and features and peak spool backlog while PostgreSQL
/// hangs (scenario 9), against their values when the fault was injected.
#[derive(Default)]
struct MemoryWatch {
    /// (service, RSS KiB at injection, peak RSS KiB).
    rss: Vec<(String, u64, u64)>,
    /// Peak `mesh_spool_pending_records`.
    spool_peak: f64,
    samples: usize,
}

impl MemoryWatch {
    async fn sample(&mut self, mesh: &Mesh) {
        for service in [&mesh.gateway, &mesh.logger, &mesh.features] {
            let Some(kib) = service.pid().and_then(procs::rss_kib) else {
                continue;
            };
            match self
                .rss
                .iter_mut()
                .find(|(name, _, _)| *name == service.name)
            {
                Some((_, _, peak)) => *peak = (*peak).max(kib),
                None => self.rss.push((service.name.clone(), kib, kib)),
            }
        }
        if let Ok(Some(pending)) = probe::spool_pending(mesh.gateway.metrics_port).await {
            self.spool_peak = self.spool_peak.max(pending);
        }
        self.samples += 1;
    }

    /// Largest RSS growth, MiB.
    fn max_growth_mib(&self) -> f64 {
        self.rss
            .iter()
            .map(|(_, at, peak)| peak.saturating_sub(*at) as f64 / 1024.0)
            .fold(0.0, f64::max)
    }
}

/// RSS growth allowed while PostgreSQL hangs: the queues in front of it are bounded, so memory
/// must not grow with the length of the outage.
const MEMORY_GROWTH_BOUND_MIB: f64 = 128.0;

/// Scenario 10: every Record call answered OK, the valid records in `predictions`, the poison
/// ones in `prediction_rejects` and not in `predictions` (waits up to half the delivery bound
/// for them to land).
async fn poison_checks(
    pg_url: &str,
    sent: &poison::Sent,
    opts: &Opts,
    checks: &mut Vec<Check>,
    details: &mut serde_json::Value,
) {
    let until = Instant::now() + Duration::from_secs(opts.deliver_secs / 2);
    let (mut valid_found, mut rejects, mut poison_logged) = (-1, -1, -1);
    loop {
        if let (Ok(v), Ok(r), Ok(p)) = (
            probe::log_counts(pg_url, &sent.valid).await,
            probe::rejects_found(pg_url, &sent.poison).await,
            probe::log_counts(pg_url, &sent.poison).await,
        ) {
            (valid_found, rejects, poison_logged) = (v.found, r, p.found);
        }
        let complete =
            valid_found == sent.valid.len() as i64 && rejects == sent.poison.len() as i64;
        if complete || Instant::now() >= until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    say!(
        "poison: {} calls ({} OK), valid {}/{} in predictions, poison {}/{} in prediction_rejects ({} in predictions)",
        sent.calls,
        sent.calls_ok,
        valid_found,
        sent.valid.len(),
        rejects,
        sent.poison.len(),
        poison_logged
    );
    details["poison"] = json!({
        "calls": sent.calls,
        "calls_ok": sent.calls_ok,
        "accepted": sent.accepted,
        "outcomes": sent.outcomes,
        "valid_sent": sent.valid.len(),
        "valid_in_predictions": valid_found,
        "poison_sent": sent.poison.len(),
        "poison_in_prediction_rejects": rejects,
        "poison_in_predictions": poison_logged,
    });
    checks.push(Check {
        what: format!(
            "every Record call with poison in it answered OK ({}/{}; answers {:?})",
            sent.calls_ok, sent.calls, sent.outcomes
        ),
        pass: sent.calls > 0 && sent.calls_ok == sent.calls,
        invariant: true,
    });
    checks.push(Check {
        what: format!(
            "every valid record sent with poison is in `predictions` ({valid_found}/{})",
            sent.valid.len()
        ),
        pass: !sent.valid.is_empty() && valid_found == sent.valid.len() as i64,
        invariant: true,
    });
    checks.push(Check {
        what: format!(
            "every poison record is in `prediction_rejects` ({rejects}/{}) and none in `predictions` ({poison_logged})",
            sent.poison.len()
        ),
        pass: !sent.poison.is_empty()
            && rejects == sent.poison.len() as i64
            && poison_logged == 0,
        invariant: true,
    });
}

#[derive(Default)]
struct Survival {
    dead: Vec<String>,
    not_serving: Vec<String>,
    predicts: usize,
    predicts_ok: usize,
}

/// Every process alive (`kill -0` on our PIDs), SERVING on grpc.health.v1, and normal Predicts
/// still answered OK.
async fn survival_check(mesh: &mut Mesh) -> Survival {
    let mut s = Survival::default();
    for service in mesh.services_mut() {
        if !service.alive() {
            s.dead
                .push(format!("{} (pid {:?})", service.name, service.pid()));
        }
    }
    for service in mesh.services() {
        if !probe::grpc_serving(&service.url()).await {
            s.not_serving.push(service.name.clone());
        }
    }
    s.predicts = 20;
    if let Ok(channel) = tonic::transport::Endpoint::from_shared(mesh.gateway.url()) {
        let mut client =
            mesh_proto::gateway::gateway_client::GatewayClient::new(channel.connect_lazy());
        for i in 0..s.predicts {
            let mut request = tonic::Request::new(mesh_proto::gateway::PredictRequest {
                model: "churn".into(),
                entity_id: format!("cust-{:05}", 100 + i),
                features: [
                    (
                        "support_calls_30d",
                        mesh_proto::types::feature_value::Kind::Number(2.0),
                    ),
                    (
                        "channel",
                        mesh_proto::types::feature_value::Kind::Category("web".into()),
                    ),
                ]
                .into_iter()
                .map(|(k, v)| {
                    (
                        k.to_owned(),
                        mesh_proto::types::FeatureValue { kind: Some(v) },
                    )
                })
                .collect(),
                model_version: String::new(),
            });
            request.set_timeout(Duration::from_secs(1));
            if client.predict(request).await.is_ok() {
                s.predicts_ok += 1;
            }
        }
    }
    s
}

fn fmt_opt(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(v) => format!("{v:.1}{unit}"),
        None => "—".to_owned(),
    }
}

fn print_row(o: &Outcome) {
    say!(
        "scenario {} {}: {} requests, {} OK, {:.2} % within deadline, p99 in fault {}, recover {}, served {} found {} (rows added {}, received twice {}), alerts fired {}, resolved {} → {}",
        o.scenario,
        o.name,
        o.requests,
        o.ok_answers,
        o.ok_within_deadline_pct,
        fmt_opt(o.p99_during_fault_ms, " ms"),
        o.recovery,
        o.served,
        o.found,
        o.rows_added,
        o.duplicates,
        o.alerts.fired_text(),
        o.alerts.resolved_text(),
        if o.pass() { "PASS" } else { "FAIL" }
    );
    for c in o.checks.iter().filter(|c| !c.pass) {
        say!("  FAIL: {}", c.what);
    }
}

/// The Markdown summary, and the enforced checks that failed.
fn summarise(
    opts: &Opts,
    profile: &str,
    outcomes: &[Outcome],
    total: Duration,
) -> (String, Vec<String>) {
    let mut s = String::new();
    let mut failed = Vec::new();
    let enforce = if opts.enforce {
        "all targets"
    } else if opts.enforce_invariants {
        "invariants only (served > 0, served == OK answers, found == served, no id received twice, serve time kept, no crashes, scenario 6: accepted requests complete, scenario 9: memory bounded, scenario 10: valid stored and poison kept as rejects, alerts (0-10, 14-16): expected fired, nothing unexpected, all resolved, scenarios 11-13: answers from allowed versions, swaps and rollbacks reach every gateway, nothing sent to a version not ready, scenarios 14-16: no mesh service restarted, 14: writes resume and every served record on the new primary once, 15: the features service follows the new master, 16: the added replica joins only once SERVING, the removed ones drain out)"
    } else {
        "nothing (report only)"
    };
    s.push_str(&format!(
        "# Chaos suite\n\n{profile} build; open-loop load {} req/s, deadline {} ms; faults {} s; baseline {} s; recovery bound {} s; delivery bound {} s; suite took {:.0} s. Enforced: {enforce}.\n\n",
        opts.rate, opts.timeout_ms, opts.fault_secs, opts.baseline_secs, opts.recover_secs, opts.deliver_secs, total.as_secs_f64()
    ));
    s.push_str("| # | scenario | requests | OK answers | succeeded within deadline | p99 during fault | time to recover | served | found | rows added | received twice | alerts fired (after fault) | alerts resolved (after lift) | result |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for o in outcomes {
        let result = if o.pass() { "PASS" } else { "FAIL" };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} % | {} | {} | {} | {} | {} | {} | {} | {} | {result} |\n",
            o.scenario,
            o.name,
            o.requests,
            o.ok_answers,
            o.ok_within_deadline_pct,
            fmt_opt(o.p99_during_fault_ms, " ms"),
            match o.time_to_recover_s {
                Some(t) => format!("{t:.1} s"),
                None if o.scenario == 7 || o.recovery == "n/a" => "n/a".to_owned(),
                None => format!("> {} s", opts.recover_secs),
            },
            o.served,
            o.found,
            o.rows_added,
            o.duplicates,
            o.alerts.fired_text(),
            o.alerts.resolved_text(),
        ));
    }
    s.push_str("\n## Targets\n\n");
    for o in outcomes {
        for c in &o.checks {
            let enforced = opts.enforce || (opts.enforce_invariants && c.invariant);
            s.push_str(&format!(
                "- {} scenario {}: {}{}{}\n",
                if c.pass { "PASS" } else { "FAIL" },
                o.scenario,
                c.what,
                if c.invariant { " [invariant]" } else { "" },
                if enforced { "" } else { " (not enforced)" },
            ));
            if !c.pass && enforced {
                failed.push(format!("scenario {}: {}", o.scenario, c.what));
            }
        }
    }
    s.push_str("\n## Details\n\n");
    for o in outcomes {
        s.push_str(&format!(
            "- **{} {}**: fault held {:.1} s; recovery: {}; delivery: {}; answers: {}\n",
            o.scenario, o.name, o.fault_s, o.recovery, o.delivery, o.details["answers"]
        ));
        for note in &o.notes {
            s.push_str(&format!("  - {note}\n"));
        }
        s.push_str(&format!(
            "  - alerts: must fire {}; may fire {}; fired {}\n",
            o.alerts.must.join(", "),
            o.alerts.may.join(", "),
            o.alerts
                .fired
                .iter()
                .map(|f| format!(
                    "{} [{} → {}]{}",
                    f.key,
                    f.severity,
                    f.receiver,
                    f.tolerated
                        .map(|why| format!(" (tolerated: {why})"))
                        .unwrap_or_default()
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        if o.scenario == 7 {
            s.push_str(&format!(
                "  - crashes: {}; bad requests sent: {}; not SERVING: {}; normal Predicts OK: {}\n  - answers to bad requests: {}\n",
                o.details["crashes"],
                o.details["bad_requests_sent"],
                o.details["not_serving"],
                o.details["normal_predicts_ok"],
                o.details["bad_request_outcomes"]
            ));
        }
    }
    s.push_str(DEFINITIONS);
    s.push_str(lifecycle::DEFINITIONS);
    if opts.ha {
        s.push_str(ha::DEFINITIONS);
    }
    (s, failed)
}

const DEFINITIONS: &str = "
## Definitions

- **requests**: requests the load generator (`mesh-bench predict`, open loop, one request
  every 1/rate s whatever the answers do) started during the scenario: baseline, fault and
  recovery.
- **succeeded within deadline**: the bench got OK within the request's deadline (sent as
  `grpc-timeout`); latency is measured from the request's intended start, and an OK that took
  longer than the deadline counts as a failure.
- **p99 during the fault**: p99 latency of the requests (any outcome) started between injecting
  and lifting the fault.
- **time to recover**: from lifting the fault (scenario 6: from restarting the gateway) until
  the gateway's `GET /health` reports `\"status\":\"healthy\"` and the load's success rate is back
  to 100 % (the first 1 s window of request starts, on a 100 ms grid, in which every request
  succeeded within its deadline), the later of the two, with 100 ms resolution; n/a for
  scenario 7; `> N s` when not reached within the recovery bound.
- **OK answers / served / found**: OK answers = requests the bench got OK for; served =
  prediction ids it received in those answers (must equal OK answers, and be > 0); found = how
  many of the distinct served ids are in PostgreSQL's `predictions` table after delivery (the
  gateway's `mesh_spool_pending_records` at 0, or absent, and the table settled).
- **rows added**: rows the table gained during the scenario. It can exceed served: a prediction
  the gateway made and logged after the client had given up (deadline passed) is logged but not
  served.
- **received twice**: prediction ids the bench received in more than one OK answer. (Rows in
  PostgreSQL are not counted: its primary key already makes them unique.)
- **records keep their serve time**: every served record's `served_at` (the record's own
  `time_unix_micros`) is read back and walked in the order the bench received the answers; no
  record may be stamped later than a record answered after it by more than the longest OK
  latency + 100 ms, and none more than 1 s outside the load's run. A record stamped when it was
  written rather than when it was served (after an outage, a spool replay) fails this.
- **scenario 3 answered**: the server's own status (OK or an error code), not a hang, arrived
  within deadline + 50 ms. The client also enforces the deadline itself, so a request with no
  answer by its deadline counts as not answered: the check is at least as strict as the target.
- **scenario 6 accepted**: a request is not accepted when it never reached the gateway: its
  connection was refused (port closed), HTTP/2 refused its stream (above the GOAWAY's last
  stream id: not processed), or the client's HTTP/2 connection had closed before the request
  was handed to it (hyper: \"operation was canceled\", never sent). Every other request started
  from SIGTERM − deadline until the restart was accepted and must end OK; the client's error
  text of any that did not is printed.
- **scenario 8**: the gateway is killed with SIGKILL (no drain) and restarted on the same
  `MESH_SPOOL_DIR`; every OK answer's record must still reach `predictions` (found == served).
- **scenario 9**: PostgreSQL's postmaster and its children are stopped with SIGSTOP (the server
  hangs: connections stay open, nothing answers) for the fault time, then resumed with SIGCONT.
  Every request must be answered (OK or an error status) within deadline + 50 ms (a target, like
  scenario 3); the RSS of gateway, logger and features may not grow by 128 MiB or more during
  the hang (invariant); everything served is delivered afterwards.
- **scenario 10**: `Record` calls straight to the logger (with the internal token), 20 records
  each, one in five poison (`time_unix_micros = i64::MAX`, or a NaN score), every 100 ms for the
  fault time, while the gateway load goes on. Every call must be answered OK, every valid record
  land in `predictions`, every poison one in `prediction_rejects` and none in `predictions`; the
  gateway's records must all be delivered as in every scenario.
- **scenario 7 crashes**: processes started by mesh-chaos that are no longer running
  (`kill -0` on their PIDs) after the bad input; each must also answer grpc.health.v1 SERVING
  and normal Predicts must still succeed.
- **scenario 0**: steady load, no fault, for the fault time: the baseline. No alert may fire.
- **alerts fired / alerts resolved**: a real Prometheus scrapes every service every 500 ms and
  evaluates the shipped rules (`deploy/prometheus/rules/*.yml`) rendered on the chaos time
  scale: every `for:`, range window and age threshold divided by 60, windows at least 2 s,
  every duration at most 60 s (the rendered files are in `chaos-results/alerting/`). A real
  Alertmanager with the shipped routing (1 s grouping) posts to a webhook inside mesh-chaos.
  Fired: each alert's first firing notification, in seconds after the fault was injected
  (instance = the service); resolved: its resolved notification, in seconds after the fault
  was lifted. After each scenario the suite waits (at most `--alerts-quiet-secs`) until nothing
  is pending or firing, so alerts do not leak into the next scenario. Each scenario lists the
  alerts that must fire and those that may (tools/chaos/src/alerts/expect.rs); a missing one,
  any other one, one firing before the fault, or one not resolved fails the scenario
  (invariants). Scenarios 11-13 (the model lifecycle) are not judged on alerts.
- The injected fakes are scenario 4's latency, a TCP proxy inside mesh-chaos
  (`mesh_testkit::proxy::DelayProxy`) between the gateway and inference-2, and scenario 13's
  held golden fixture (below). Every other fault is real: processes killed (`kill -9`) or
  signalled (SIGTERM), Redis and PostgreSQL stopped.
";
