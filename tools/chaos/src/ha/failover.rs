//! Scenarios 14 and 15: `kill -9` of the PostgreSQL primary (Patroni fails over) and of the
//! Redis master (Sentinel fails over) under the scenario's load, and what each failover is
//! measured by: when the new primary commits a write, when the features service's writes and
//! the logger's records land there, when the Sentinels name a new master and when the features
//! service's write-through reaches it.

use std::time::{Duration, Instant};

use anyhow::bail;
use mesh_proto::features::features_client::FeaturesClient;
use mesh_proto::features::{EntityFeatures, PutFeaturesRequest};
use mesh_proto::types::{feature_value::Kind, FeatureValue};
use mesh_testkit::ha::{PatroniCluster, SentinelRedis};
use serde_json::json;

use crate::mesh::{Mesh, Stores};
use crate::{say, Check};

/// The entity the scenarios write through the features service.
const PROBE: &str = "chaos-ha-probe";

/// Failover target (issue 11): the new primary takes writes within this.
const PG_FAILOVER_TARGET: Duration = Duration::from_secs(15);

/// What was killed, and when.
pub struct Kill {
    /// The old primary's PostgreSQL port, or the old master's Redis port.
    pub old_port: u16,
    killed: Instant,
    killed_unix_ms: u64,
}

/// What a failover took.
#[derive(Default)]
pub struct Failover {
    /// The new primary's or master's port.
    pub new_port: Option<u16>,
    /// From the kill until the new primary committed a write / a Sentinel named a new master.
    pub failover_s: Option<f64>,
    /// From the kill until the features service accepted a `PutFeatures` (14), or until its
    /// write-through was on the new master (15).
    pub features_s: Option<f64>,
    /// 14: from the kill until the logger's first record committed on the new primary.
    pub logger_s: Option<f64>,
    /// 14: from the kill until the old primary was back as the synchronous standby.
    pub rejoined_s: Option<f64>,
}

/// Patroni's `/cluster` shows a leader and a synchronous standby.
fn whole(pg: &PatroniCluster) -> bool {
    let roles = tokio::task::block_in_place(|| pg.roles());
    roles.iter().any(|r| r == "leader") && roles.iter().any(|r| r == "sync_standby")
}

fn patroni(mesh: &Mesh) -> anyhow::Result<&PatroniCluster> {
    match &mesh.stores {
        Stores::Ha { pg, .. } => Ok(pg),
        Stores::Single { .. } => bail!("scenario 14 needs --ha (Patroni)"),
    }
}

fn sentinel(mesh: &mut Mesh) -> anyhow::Result<&mut SentinelRedis> {
    match &mut mesh.stores {
        Stores::Ha { redis, .. } => Ok(redis),
        Stores::Single { .. } => bail!("scenario 15 needs --ha (Sentinel)"),
    }
}

/// Scenario 14's fault: `kill -9` of the primary's postmaster.
pub fn kill_primary(mesh: &Mesh) -> anyhow::Result<Kill> {
    let pg = patroni(mesh)?;
    let old_port = tokio::task::block_in_place(|| pg.kill_primary_postgres())?;
    Ok(Kill {
        old_port,
        killed: Instant::now(),
        killed_unix_ms: crate::unix_ms(),
    })
}

/// Scenario 15's fault: `kill -9` of the Redis master.
pub fn kill_master(mesh: &mut Mesh) -> anyhow::Result<Kill> {
    let redis = sentinel(mesh)?;
    let old_port = tokio::task::block_in_place(|| redis.kill_master())?;
    Ok(Kill {
        old_port,
        killed: Instant::now(),
        killed_unix_ms: crate::unix_ms(),
    })
}

/// Writes `x` on [`PROBE`] through the features service (with the internal token, 2 s).
async fn put_probe(mesh: &Mesh, x: f64) -> Result<(), tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(mesh.features.url())
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy();
    let mut client = FeaturesClient::new(channel);
    let mut request = tonic::Request::new(PutFeaturesRequest {
        entities: vec![EntityFeatures {
            entity_id: PROBE.into(),
            found: true,
            features: [(
                "x".to_owned(),
                FeatureValue {
                    kind: Some(Kind::Number(x)),
                },
            )]
            .into(),
            tier: 0,
        }],
    });
    let token = mesh
        .internal_token
        .parse()
        .map_err(|_| tonic::Status::internal("token"))?;
    request
        .metadata_mut()
        .insert("x-mesh-internal-token", token);
    request.set_timeout(Duration::from_secs(2));
    client.put_features(request).await.map(|_| ())
}

/// One committed write through `url` (bounded to 2 s): the port of the server that took it.
async fn committed_write(url: &str) -> Option<u16> {
    let write = async {
        let db = crate::probe::pg(url).await?;
        db.batch_execute(
            "CREATE TABLE IF NOT EXISTS chaos_failover_probe (at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
        let row = db
            .query_one(
                "INSERT INTO chaos_failover_probe DEFAULT VALUES RETURNING inet_server_port()",
                &[],
            )
            .await?;
        anyhow::Ok(row.get::<_, i32>(0) as u16)
    };
    tokio::time::timeout(Duration::from_secs(2), write)
        .await
        .ok()?
        .ok()
}

/// Records the logger committed after `unix_ms` (`logged_at` is the writing transaction's
/// start), read through `url`.
async fn logged_since(url: &str, unix_ms: u64) -> Option<i64> {
    let read = async {
        let db = crate::probe::pg(url).await?;
        let row = db
            .query_one(
                "SELECT count(*) FROM predictions WHERE logged_at > to_timestamp($1::float8)",
                &[&(unix_ms as f64 / 1000.0)],
            )
            .await?;
        anyhow::Ok(row.get::<_, i64>(0))
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .ok()?
        .ok()
}

/// Scenario 14's hold: until a write commits on another member (bounded 30 s), then until the
/// features service takes a write and the logger's records land (each bounded 30 s), then
/// (for the rest of the fault time) until the old primary is back as the synchronous standby.
pub async fn watch_pg(mesh: &Mesh, kill: &Kill, until: tokio::time::Instant) -> Failover {
    let url = mesh.db_url();
    let mut f = Failover::default();
    let since = |k: &Kill| (k.killed.elapsed().as_secs_f64() * 100.0).round() / 100.0;
    while kill.killed.elapsed() < Duration::from_secs(30) {
        if let Some(port) = committed_write(&url).await.filter(|p| *p != kill.old_port) {
            f.new_port = Some(port);
            f.failover_s = Some(since(kill));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match (f.new_port, f.failover_s) {
        (Some(port), Some(s)) => say!(
            "PostgreSQL failover: primary {} killed, 127.0.0.1:{port} committed a write after {s:.2} s",
            kill.old_port
        ),
        _ => say!("PostgreSQL failover: no other member committed a write within 30 s"),
    }
    let bound = Instant::now() + Duration::from_secs(30);
    let mut x = 1.0;
    while f.features_s.is_none() && Instant::now() < bound {
        if put_probe(mesh, x).await.is_ok() {
            f.features_s = Some(since(kill));
        } else {
            x += 1.0;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    while f.logger_s.is_none() && Instant::now() < bound {
        if logged_since(&url, kill.killed_unix_ms).await.unwrap_or(0) > 0 {
            f.logger_s = Some(since(kill));
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    say!(
        "after the kill: features service's write accepted after {}, logger's first record on the new primary after {}",
        fmt_s(f.features_s),
        fmt_s(f.logger_s)
    );
    if let Ok(pg) = patroni(mesh) {
        while f.rejoined_s.is_none() && tokio::time::Instant::now() < until {
            if whole(pg) {
                f.rejoined_s = Some(since(kill));
                say!(
                    "the old primary is back as the synchronous standby after {}",
                    fmt_s(f.rejoined_s)
                );
            } else {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    tokio::time::sleep_until(until).await;
    f
}

/// The Redis master the first Sentinel names (blocking: redis-cli).
fn master_port(mesh: &mut Mesh) -> Option<u16> {
    let redis = sentinel(mesh).ok()?;
    tokio::task::block_in_place(|| redis.master_port())
}

fn redis_get(port: u16, key: &str) -> String {
    tokio::task::block_in_place(|| {
        std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "GET", key])
            .stderr(std::process::Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    })
}

/// The probe's version in PostgreSQL.
async fn pg_version(url: &str) -> Option<i64> {
    let db = crate::probe::pg(url).await.ok()?;
    db.query_opt(
        "SELECT version FROM feature_entity_versions WHERE entity_id = $1",
        &[&PROBE],
    )
    .await
    .ok()?
    .map(|row| row.get(0))
}

/// Scenario 15's hold: until a Sentinel names another master (bounded 30 s), then until a
/// `PutFeatures`' write-through is on it (bounded 20 s), then the rest of the fault time.
pub async fn watch_redis(mesh: &mut Mesh, kill: &Kill, until: tokio::time::Instant) -> Failover {
    let mut f = Failover::default();
    let since = |k: &Kill| (k.killed.elapsed().as_secs_f64() * 100.0).round() / 100.0;
    while kill.killed.elapsed() < Duration::from_secs(30) {
        if let Some(port) = master_port(mesh).filter(|p| *p != kill.old_port) {
            f.new_port = Some(port);
            f.failover_s = Some(since(kill));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    say!(
        "Redis failover: master {} killed, Sentinel named {:?} after {}",
        kill.old_port,
        f.new_port,
        fmt_s(f.failover_s)
    );
    if let Some(port) = f.new_port {
        let url = mesh.db_url();
        let key = mesh_features::store::redis_version_key(PROBE);
        let bound = Instant::now() + Duration::from_secs(20);
        let mut x = 100.0;
        while Instant::now() < bound {
            x += 1.0;
            if put_probe(mesh, x).await.is_ok() {
                let pg = pg_version(&url).await;
                if pg.is_some() && pg.map(|v| v.to_string()) == Some(redis_get(port, &key)) {
                    f.features_s = Some(since(kill));
                    say!(
                        "the features service's write-through (version {}) is on the new master after {}",
                        pg.unwrap_or_default(),
                        fmt_s(f.features_s)
                    );
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tokio::time::sleep_until(until).await;
    f
}

fn fmt_s(s: Option<f64>) -> String {
    s.map_or_else(
        || "— (not within the bound)".to_owned(),
        |s| format!("{s:.2} s"),
    )
}

/// Rows of the served ids and distinct ids among them, and the port of the server read.
async fn rows_per_id(url: &str, ids: &[String]) -> anyhow::Result<(i64, i64, u16)> {
    let db = crate::probe::pg(url).await?;
    let row = db
        .query_one(
            "SELECT count(*), count(DISTINCT prediction_id), inet_server_port()
             FROM predictions WHERE prediction_id = ANY($1)",
            &[&ids],
        )
        .await?;
    Ok((row.get(0), row.get(1), row.get::<_, i32>(2) as u16))
}

/// Scenario 14's own checks and figures, then waits (bounded) for the old primary to rejoin.
pub async fn pg_checks(
    mesh: &Mesh,
    kill: &Kill,
    f: &Failover,
    served_ids: &[String],
    checks: &mut Vec<Check>,
    details: &mut serde_json::Value,
    notes: &mut Vec<String>,
) {
    checks.push(Check {
        what: format!(
            "failover: another member committed a write within {} s of the kill ({})",
            PG_FAILOVER_TARGET.as_secs(),
            fmt_s(f.failover_s)
        ),
        pass: f
            .failover_s
            .is_some_and(|s| s < PG_FAILOVER_TARGET.as_secs_f64()),
        invariant: false,
    });
    checks.push(Check {
        what: format!(
            "writes resume without a restart: the features service accepted a PutFeatures ({} after the kill) and the logger committed records on the new primary ({})",
            fmt_s(f.features_s),
            fmt_s(f.logger_s)
        ),
        pass: f.features_s.is_some() && f.logger_s.is_some(),
        invariant: true,
    });
    let mut distinct: Vec<String> = served_ids.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let (rows, ids, port) = rows_per_id(&mesh.db_url(), &distinct)
        .await
        .unwrap_or((-1, -1, 0));
    checks.push(Check {
        what: format!(
            "every served record on the new primary exactly once: {rows} rows for {ids} distinct served ids found of {} (read on 127.0.0.1:{port}; the killed primary was {})",
            distinct.len(),
            kill.old_port
        ),
        pass: rows == ids && ids == distinct.len() as i64 && port != kill.old_port,
        invariant: true,
    });
    details["failover"] = json!({
        "old_primary_port": kill.old_port,
        "new_primary_port": f.new_port,
        "write_committed_after_s": f.failover_s,
        "features_write_after_s": f.features_s,
        "logger_record_after_s": f.logger_s,
        "rows_for_served_ids": rows,
        "old_primary_back_as_sync_standby_after_s": f.rejoined_s,
        "patroni_timings_ttl_loop_wait_retry_timeout_s": mesh_testkit::ha::PATRONI_TIMINGS,
    });
    if let Some(s) = f.rejoined_s {
        notes.push(format!(
            "failover {}; the old primary was back as the synchronous standby {s:.2} s after the kill",
            fmt_s(f.failover_s)
        ));
        return;
    }
    // Not back within the fault time: wait for it here (bounded), so the next scenario starts
    // on a whole cluster.
    let healthy = match patroni(mesh) {
        Ok(pg) => tokio::task::block_in_place(|| pg.wait_healthy(Duration::from_secs(90))).is_ok(),
        Err(_) => false,
    };
    notes.push(if healthy {
        format!(
            "the old primary was back as the synchronous standby by {:.1} s after the kill (seen after the delivery)",
            kill.killed.elapsed().as_secs_f64()
        )
    } else {
        "the cluster had no synchronous standby again within 90 s of the delivery".to_owned()
    });
}

/// Scenario 15's own checks and figures.
pub fn redis_checks(
    kill: &Kill,
    f: &Failover,
    checks: &mut Vec<Check>,
    details: &mut serde_json::Value,
) {
    checks.push(Check {
        what: format!(
            "failover: a Sentinel named another master ({}) and the features service's write-through reached it within 20 s ({} after the kill)",
            fmt_s(f.failover_s),
            fmt_s(f.features_s)
        ),
        pass: f.new_port.is_some() && f.features_s.is_some(),
        invariant: true,
    });
    details["failover"] = json!({
        "old_master_port": kill.old_port,
        "new_master_port": f.new_port,
        "sentinel_named_new_master_after_s": f.failover_s,
        "write_through_on_new_master_after_s": f.features_s,
    });
}
