//! Which alerts each scenario must fire and which it may fire; any other alert that fires is
//! unexpected and fails the scenario. Read from the rules' real expressions
//! (`deploy/prometheus/rules/alerts.yml`) at the chaos time scale (`render`), then checked by
//! running. A new scenario adds one arm here.
//!
//! "May" covers side effects whose firing depends on timing rather than on the fault being
//! seen: e.g. `MeshProcessRestarted` needs the old and the new `process_start_time_seconds`
//! inside its (scaled) 15 s window, which a 10 s fault gives and a 30 s fault does not; the
//! burn-rate alerts fire when the few errors or slow answers around a fault happen to exceed
//! their ratio. Everything else that fires is a false page.
//!
//! [`tolerated`] names the alerts that are right to fire on the chaos run itself, whatever the
//! fault: they are reported, marked, and not judged (nor waited for).

/// The alerts a scenario must fire, and those it may fire besides.
pub struct Expected {
    /// Each must fire (and resolve) during the scenario.
    pub must: &'static [&'static str],
    /// Each may fire.
    pub may: &'static [&'static str],
}

/// Burn-rate alerts: a fault that fails or slows some requests may burn the budget fast
/// enough, depending on where the errors fall in the (scaled) windows.
const BURN: [&str; 3] = ["MeshSLOFastBurn", "MeshSLOSlowBurn", "MeshSLOBudgetBurn"];

/// The expectations of scenario `n` (0 is the steady baseline: nothing may fire).
pub fn expected_alerts(n: u8) -> Expected {
    const NONE: &[&str] = &[];
    match n {
        // Steady load, no fault: a healthy mesh pages nobody.
        0 => Expected {
            must: NONE,
            may: NONE,
        },
        // kill -9 inference-1: its scrape fails (P2 service down), the gateway stops sending to
        // it (P3 replica unavailable); the survivor keeps serving, so no P0.
        1 => Expected {
            must: &["MeshServiceDown", "MeshReplicaUnavailable"],
            may: &[
                "MeshProcessRestarted",
                "MeshBreakerOpen",
                BURN[0],
                BURN[1],
                BURN[2],
            ],
        },
        // Redis stopped: the features service counts Redis errors as cached entities expire.
        2 => Expected {
            must: &["MeshRedisUnreachable"],
            may: &[BURN[0], BURN[1], BURN[2]],
        },
        // PostgreSQL stopped: records age in the spool (log delivery) while the logger's writes
        // fail. The store alert may fire but is not required here: the logger retries the one
        // batch in hand with back-off up to 2 s and refuses new calls at once, so its write
        // errors come every 2 s, and on the compressed scale (a 2 s rate window, `for: 2s`)
        // the rate flickers to zero between them; on the shipped scale (2 m, 2 m) it holds,
        // which the promtool unit tests check. Seen in a CI run: not fired in a 10 s fault.
        3 => Expected {
            must: &["MeshLogDeliveryLagging"],
            may: &[
                "MeshPostgresUnreachable",
                "MeshBreakerOpen",
                BURN[0],
                BURN[1],
                BURN[2],
            ],
        },
        // +500 ms on inference-2: the gateway ejects it or its health check times out.
        4 => Expected {
            must: &["MeshReplicaUnavailable"],
            may: &["MeshBreakerOpen", BURN[0], BURN[1], BURN[2]],
        },
        // kill -9 logger: not scraped (service down); records wait in the spool.
        5 => Expected {
            must: &["MeshServiceDown", "MeshLogDeliveryLagging"],
            may: &[
                "MeshProcessRestarted",
                "MeshBreakerOpen",
                BURN[0],
                BURN[1],
                BURN[2],
            ],
        },
        // SIGTERM and kill -9 of the gateway: the public entry is gone (P0) until restarted.
        6 | 8 => Expected {
            must: &["MeshGatewayDown"],
            may: &[
                "MeshProcessRestarted",
                "MeshLogDeliveryLagging",
                BURN[0],
                BURN[1],
                BURN[2],
            ],
        },
        // Bad input at volume: refused with INVALID_ARGUMENT (not an SLO error); limits may
        // shed or refuse connections, and a few bad records may reach the rejects table.
        7 => Expected {
            must: NONE,
            may: &[
                "MeshBulkheadShedding",
                "MeshConnectionsRefused",
                "MeshLogRejectsGrowing",
                BURN[0],
                BURN[1],
                BURN[2],
            ],
        },
        // PostgreSQL hung: writes hang rather than fail, so the store alert may or may not see
        // errors; records certainly age in the spool.
        9 => Expected {
            must: &["MeshLogDeliveryLagging"],
            may: &[
                "MeshPostgresUnreachable",
                "MeshBreakerOpen",
                BURN[0],
                BURN[1],
                BURN[2],
            ],
        },
        // Poison records: the logger keeps them in prediction_rejects (over 10 in the window).
        10 => Expected {
            must: &["MeshLogRejectsGrowing"],
            may: NONE,
        },
        // HA: kill -9 of the PostgreSQL primary. Patroni fails over in seconds; meanwhile the
        // logger's writes fail and records wait in the spool, so the store and delivery
        // alerts may fire (whether they do depends on the failover time against their scaled
        // `for:`), as may the logger breaker's. Predictions are served from the caches, so
        // nothing must fire: a failover that the mesh rides out pages nobody.
        14 => Expected {
            must: NONE,
            may: &[
                "MeshPostgresUnreachable",
                "MeshLogDeliveryLagging",
                "MeshBreakerOpen",
                BURN[0],
                BURN[1],
                BURN[2],
            ],
        },
        // HA: kill -9 of the Redis master. The features service counts Redis errors until the
        // Sentinels name the new master and it follows, so the Redis alert may fire.
        15 => Expected {
            must: NONE,
            may: &["MeshRedisUnreachable", BURN[0], BURN[1], BURN[2]],
        },
        // HA: inference scaled 2 -> 3 -> 1 through DNS. Scaling is not a fault: the replicas
        // that leave drop out of the gateway's metrics (no replica alert), the one that keeps
        // running stays scraped, and the added one is not scraped. Only the burn-rate alerts
        // may fire, if requests fail around the changes.
        16 => Expected {
            must: NONE,
            may: &[BURN[0], BURN[1], BURN[2]],
        },
        // A scenario without expectations yet: report what fires, require nothing, allow
        // nothing (so a new scenario's alerts are looked at before they are accepted).
        _ => Expected {
            must: NONE,
            may: NONE,
        },
    }
}

/// Why an alert that fired (its key, see `receiver::key_of`) is right to fire on the chaos run
/// itself and is not judged, if it is.
pub fn tolerated(key: &str) -> Option<&'static str> {
    let name = key.split(' ').next().unwrap_or_default();
    if name == "MeshModelDriftHigh" {
        // mesh-bench sends support_calls_30d = n % 11 and channel = one of three in turn: not
        // the training distribution (measured PSI 1.16 and 0.22, score 0.52). True drift.
        return Some("the load's request features are synthetic (mesh-bench), not the training distribution: true drift");
    }
    if key.contains("slo=latency") && BURN.contains(&name) {
        // The objective (99 % under 25 ms) was set from the benchmark on a quiet machine; on a
        // shared one the baseline's own p99 exceeds it (measured 54 ms, release build, load
        // average 15 on 2 cores), whatever the fault.
        return Some("the latency objective (25 ms) measures the shared machine's load here");
    }
    None
}
