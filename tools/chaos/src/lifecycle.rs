//! Scenarios 11–13: the model lifecycle under open-loop load, on the live registry.
//!
//! - 11, promote under load: 50 promotions and rollbacks alternating churn 1 ↔ 2 through the
//!   admin API, each waited for until every gateway answers with the new version.
//! - 12, canary of a broken version: a 10 % rollout of version 91 (version 1's graph, NaN when
//!   `tenure_months` > 1,000). It first runs healthy (normal inputs only); then inputs it breaks
//!   on start to arrive. The canary must roll itself back on every gateway within 10 s of the
//!   first such input, callers never seeing a NaN.
//! - 13, replica killed while it loads a new version: promote version 3 (version 2's graph),
//!   `kill -9` inference-1 while version 3 is LOADING there, restart it; no request may be sent
//!   to a replica for a version it has not reported ready.
//!
//! The load is two `mesh-bench` processes, one per gateway, at half the scenario rate each.
//! Besides the load, the scenarios send requests of their own (routing probes, the broken
//! inputs); every one of them counts in the scenario's requests and success rate.
//!
//! One injected fault besides the real ones: in scenario 13 version 3's `golden.json` is a FIFO
//! that this program holds open, so a replica's load of version 3 cannot finish (it blocks
//! reading its golden fixture, as it would on a slow artifact store) until the suite writes the
//! fixture into it. That makes "killed while loading" certain instead of a race with a 60 ms
//! load. The model, the fixture's content and the check are the real ones.

mod canary;
mod loading;
mod probe;
mod scenarios;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use mesh_proto::admin::model_admin_client::ModelAdminClient;
use mesh_proto::types::{feature_value::Kind, FeatureValue};
use tonic::transport::Channel;

pub use scenarios::run;

/// Names of scenarios 11, 12, 13.
pub const NAMES: [&str; 3] = [
    "promote/rollback 1<->2 x50 under load",
    "canary of a broken version (91) at 10 % under load",
    "kill -9 inference-1 while it loads a new version (3)",
];

/// The first lifecycle scenario.
pub const FIRST: u8 = 11;

/// The model the scenarios change.
const MODEL: &str = "churn";

/// Copies the repository's models and the broken test versions (90–93) into `tmp/models`, and
/// adds version 3: version 2's graph, manifest and fixture under another number, for scenario
/// 13 to promote (a version no other scenario loads). Returns the directory.
pub fn models_dir(repo: &Path, tmp: &Path) -> anyhow::Result<PathBuf> {
    let models = tmp.join("models");
    copy_dir(&repo.join("models"), &models)?;
    for broken in ["90", "91", "92", "93"] {
        copy_dir(
            &repo.join("tests/fixtures/models/churn").join(broken),
            &models.join(MODEL).join(broken),
        )?;
    }
    let three = models.join(MODEL).join("3");
    copy_dir(&models.join(MODEL).join("2"), &three)?;
    let path = three.join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    manifest["version"] = "3".into();
    manifest["description"] =
        "CHAOS ONLY: version 2's graph and fixture as version 3, for mesh-chaos scenario 13".into();
    std::fs::write(&path, serde_json::to_string_pretty(&manifest)?)?;
    Ok(models)
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("{}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// An admin client of one gateway (the admin key and a 5 s deadline on every call).
pub type Admin = mesh_proto::admin_key::AdminClient<Channel>;

/// An admin client of the gateway at `url`.
pub fn admin(url: &str, key: &str) -> anyhow::Result<Admin> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    Ok(ModelAdminClient::with_interceptor(
        channel,
        mesh_proto::admin_key::AdminKey::new(key, Duration::from_secs(5)).context("admin key")?,
    ))
}

/// Churn's versions on the replica at `url` (`ListVersions`, bounded to 1 s): version →
/// (state, since unix µs). `None` when the replica cannot be asked (down, starting).
pub async fn catalog(url: &str, token: &str) -> Option<BTreeMap<String, (String, i64)>> {
    use mesh_proto::catalog::model_catalog_client::ModelCatalogClient;
    let ask = async {
        let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
            .ok()?
            .connect_timeout(Duration::from_millis(500))
            .connect()
            .await
            .ok()?;
        let token = mesh_runtime::internal::InternalToken::new(token).ok()?;
        let mut client = ModelCatalogClient::new(mesh_runtime::internal::WithToken::new(
            channel,
            Some(&token),
        ));
        let versions = client
            .list_versions(mesh_proto::catalog::ListVersionsRequest {})
            .await
            .ok()?
            .into_inner()
            .versions;
        Some(
            versions
                .into_iter()
                .filter(|v| v.model == MODEL)
                .map(|v| {
                    let state = v.state().as_str_name().to_owned();
                    (v.version, (state, v.since_unix_micros))
                })
                .collect(),
        )
    };
    tokio::time::timeout(Duration::from_secs(1), ask)
        .await
        .ok()
        .flatten()
}

/// The features of the first row of version 1's golden fixture (with `tenure_months` set to
/// `tenure`, if given): a complete request (it needs nothing from the feature store).
pub fn complete_features(
    models: &Path,
    tenure: Option<f64>,
) -> anyhow::Result<std::collections::HashMap<String, FeatureValue>> {
    let path = models.join(MODEL).join("1").join("golden.json");
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let row = golden["rows"][0]["features"]
        .as_object()
        .with_context(|| format!("{}: no rows[0].features", path.display()))?;
    let mut features = std::collections::HashMap::new();
    for (name, value) in row {
        let kind = match value {
            serde_json::Value::Number(n) => Kind::Number(n.as_f64().unwrap_or_default()),
            serde_json::Value::String(s) => Kind::Category(s.clone()),
            other => anyhow::bail!("{}: feature {name} is {other}", path.display()),
        };
        features.insert(name.clone(), FeatureValue { kind: Some(kind) });
    }
    if let Some(tenure) = tenure {
        features.insert(
            "tenure_months".into(),
            FeatureValue {
                kind: Some(Kind::Number(tenure)),
            },
        );
    }
    Ok(features)
}

/// `name{labels} value` lines of a service's `/metrics` whose name is `name`: (labels, value).
pub async fn metric(port: u16, name: &str) -> Option<Vec<(String, f64)>> {
    let (status, body) = crate::probe::http_get(port, "/metrics").await.ok()?;
    if status != 200 {
        return None;
    }
    Some(
        body.lines()
            .filter(|l| {
                l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{'))
            })
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((series[name.len()..].to_owned(), value.trim().parse().ok()?))
            })
            .collect(),
    )
}

/// ModelInfer calls a replica answered, by gRPC code (`mesh_rpc_requests_total`).
pub async fn infer_codes(port: u16) -> Option<BTreeMap<String, f64>> {
    let lines = metric(port, "mesh_rpc_requests_total").await?;
    let mut codes = BTreeMap::new();
    for (labels, value) in lines {
        if !labels.contains("ModelInfer\"") {
            continue;
        }
        if let Some(code) = labels
            .split("code=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
        {
            *codes.entry(code.to_owned()).or_insert(0.0) += value;
        }
    }
    Some(codes)
}

/// Definitions of the lifecycle scenarios' figures, for summary.md.
pub const DEFINITIONS: &str = "
- **scenarios 11–13** (model lifecycle, live registry in PostgreSQL, two gateways following it):
  the load is two `mesh-bench` processes, one per gateway, at half the rate each. Requests and
  succeeded within deadline count every request the scenario sent to a gateway: both benches,
  the routing probes (one Predict per gateway every 100 ms, or in a loop while a swap is
  awaited, to see which version each gateway routes to) and, in scenario 12, the broken inputs. Served, OK answers and found are
  the benches' (their ids are the ones checked in `predictions`); rows added also counts the
  probes' and broken inputs' records.
- **scenario 11**: the steady p99 is measured over the last 10 s (at least) before the first
  swap, after both versions had been loaded (a promotion to 2 and a rollback before the load
  started: with the registry, both versions then stay loaded, one as production and one as the
  rollback target), and the RSS of each inference replica (`VmRSS`) is read at the end of that
  window and again 2 s after the last swap, both under load. The swaps are spread over the fault
  time; each waits until every gateway answers a probe with the new version. p99 during the
  swaps: requests started from the first swap to the last swap's convergence.
- **scenario 12**: the rollout starts at 10 % with only normal inputs; once version 91 is READY
  on both replicas and each gateway has answered a probe from it, it runs healthy for 5 s (it
  must not be rolled back then). Then a stream of complete requests with `tenure_months` 5,000
  for walk-in entities in the candidate's 10 % starts (10 % of the scenario rate, alternating
  gateways): version 91 scores them NaN. The breach starts with the first of them (it cannot
  start earlier); a gateway has rolled back when its probes for an entity in the candidate's
  share stop answering from 91 for good (a rollback before the breach, a false alarm while the
  canary was healthy, fails this target). The audit record must be the rollout's stop by actor
  `mesh` with the candidate's and production's figures; no answer may carry a non-finite score.
- **scenario 13**: version 3 (version 2's graph, a copy made by mesh-chaos) is promoted while
  its `golden.json` is a FIFO held by mesh-chaos (the one injected fault here): each replica's
  load of it blocks reading the fixture. Once both replicas show 3 LOADING, inference-1 is
  killed with SIGKILL; halfway through the fault time the fixture is written into the FIFO (and
  the FIFO replaced by the file), so inference-2 finishes loading; at the end of the fault time
  inference-1 is restarted. No ModelInfer may be answered UNAVAILABLE, NOT_FOUND or
  FAILED_PRECONDITION by a replica (`mesh_rpc_requests_total` of each, the killed one read
  just before the kill): that would be a request sent to a version the replica had not reported
  ready. No probe may be answered by version 3 before a replica reported it READY. Time to
  recover: from the restart until the restarted replica reports 3 READY, every gateway sees
  both replicas with 2 versions ready (`mesh_replica_versions_ready`), and the restarted
  replica has answered ModelInfer OK again.
";

/// The standard invariants every scenario checks, for the benches' answers.
pub fn common_checks(
    served: usize,
    ok_answers: usize,
    found: i64,
    distinct_served: usize,
    duplicates: usize,
    order: &crate::ServeTimeOrder,
) -> Vec<crate::Check> {
    use crate::Check;
    vec![
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
                "found == served: every served id in `predictions` ({found} / {distinct_served} distinct)"
            ),
            pass: found == distinct_served as i64,
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
    ]
}
