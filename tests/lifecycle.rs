//! Model lifecycle on a real inference replica and a real PostgreSQL: a version that fails its
//! golden fixture or fails to load never serves while the others do, and a replica loads and
//! unloads versions as the live registry changes, without a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use mesh_proto::catalog::model_catalog_client::ModelCatalogClient;
use mesh_proto::catalog::version_state::State;
use mesh_proto::catalog::{ListVersionsRequest, VersionState};
use mesh_proto::inference::{ModelInferRequest, ModelReadyRequest};
use mesh_registry::{Change, RegistryStore};
use mesh_tests::*;
use tonic::Code;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir").flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// A models directory with churn's committed versions and the given broken test versions.
fn models_with(broken: &[&str]) -> PathBuf {
    let dir = scratch_dir("models");
    copy_dir(&repo().join("models"), &dir);
    for version in broken {
        copy_dir(
            &repo().join("tests/fixtures/models/churn").join(version),
            &dir.join("churn").join(version),
        );
    }
    dir
}

async fn versions(addr: std::net::SocketAddr) -> Vec<VersionState> {
    ModelCatalogClient::new(internal_channel(addr))
        .list_versions(ListVersionsRequest {})
        .await
        .expect("catalog")
        .into_inner()
        .versions
}

fn state_of<'a>(versions: &'a [VersionState], version: &str) -> Option<&'a VersionState> {
    versions
        .iter()
        .find(|v| v.model == "churn" && v.version == version)
}

/// One row of fixture features as a typed KServe request for `version`.
fn infer_request(version: &str) -> ModelInferRequest {
    let row = &fixture()[0];
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("models/churn/1/manifest.json")).expect("manifest"),
    )
    .expect("json");
    let columns = manifest["features"]
        .as_array()
        .expect("features")
        .iter()
        .map(|f| {
            let name = f["name"].as_str().expect("name");
            let column = match &row.features[name] {
                serde_json::Value::Number(n) => {
                    mesh_tensor::Column::Numbers(vec![n.as_f64().expect("f64") as f32])
                }
                v => mesh_tensor::Column::Categories(vec![v.as_str().expect("str").to_owned()]),
            };
            mesh_tensor::encode_input(name, column)
        })
        .collect();
    ModelInferRequest {
        model_name: "churn".into(),
        model_version: version.into(),
        inputs: columns,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_failing_its_golden_fixture_or_its_load_never_serves_and_the_rest_do() {
    telemetry();
    let mut config = inference_config();
    config.models.dir = models_with(&["90", "93"]);
    config.models.warmup_iterations = 1;
    let replica = start_inference(config).await;
    wait_serving(replica.addr, Duration::from_secs(60)).await;
    // SERVING comes after the first round, in which every version was tried.
    let all = versions(replica.addr).await;
    let one = state_of(&all, "1").expect("version 1");
    assert_eq!(one.state, State::Ready as i32, "{one:?}");
    assert!(one.golden_max_abs_diff < 1e-4, "{one:?}");
    assert_eq!(
        state_of(&all, "2").map(|v| v.state),
        Some(State::Ready as i32)
    );
    let wrong = state_of(&all, "90").expect("version 90");
    assert_eq!(wrong.state, State::Failed as i32);
    assert!(
        wrong.reason.contains("golden row") && wrong.reason.contains("skew"),
        "{wrong:?}"
    );
    let garbage = state_of(&all, "93").expect("version 93");
    assert_eq!(garbage.state, State::Failed as i32);
    assert!(garbage.reason.contains("cannot load"), "{garbage:?}");

    let mut client = inference_client(replica.addr);
    for (version, ready) in [
        ("1", true),
        ("2", true),
        ("90", false),
        ("93", false),
        ("", true),
    ] {
        let answer = client
            .model_ready(ModelReadyRequest {
                name: "churn".into(),
                version: version.into(),
            })
            .await
            .expect("model ready");
        assert_eq!(answer.into_inner().ready, ready, "version {version:?}");
    }
    let status = client
        .model_infer(infer_request("90"))
        .await
        .expect_err("a failed version takes no traffic");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("golden"), "{status:?}");
    client
        .model_infer(infer_request("1"))
        .await
        .expect("version 1 serves");
    replica.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_loads_and_unloads_versions_as_the_live_registry_changes() {
    telemetry();
    let pg = mesh_testkit::PostgresServer::start().expect("postgres");
    let mut config = inference_config();
    config.models.warmup_iterations = 1;
    config.registry.url = Some(pg.url());
    let replica = start_inference(config).await;
    wait_serving(replica.addr, Duration::from_secs(60)).await;
    let pool = mesh_runtime::postgres::pool(&pg.url(), 2, Duration::from_secs(2)).expect("pool");
    let store = RegistryStore::new(pool, Duration::from_secs(2));
    // SERVING comes with the disk's production, which may be before the replica has migrated
    // and seeded the registry: do it here too (idempotent, as every service does).
    mesh_registry::store::prepare(&store, &[("churn".into(), "1".into())]).await;

    // Seeded from aliases.json (production 1): version 2 is on disk but referenced by nothing.
    let until = |want: &'static str, version: &'static str, limit: Duration| {
        let addr = replica.addr;
        async move {
            let started = Instant::now();
            loop {
                let all = versions(addr).await;
                let state = state_of(&all, version).map(|v| v.state);
                let done = match want {
                    "ready" => state == Some(State::Ready as i32),
                    _ => state.is_none(),
                };
                if done {
                    return started.elapsed();
                }
                assert!(
                    started.elapsed() < limit,
                    "version {version} not {want}: {all:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    until("gone", "2", Duration::from_secs(10)).await;
    let none = serde_json::json!({});
    store
        .apply(
            "churn",
            Change::SetRollout {
                candidate: "2".into(),
                percent: 10.0,
                promote_after_secs: None,
            },
            "test",
            "canary",
            none.clone(),
        )
        .await
        .expect("rollout");
    let loaded_in = until("ready", "2", Duration::from_secs(20)).await;
    inference_client(replica.addr)
        .model_infer(infer_request("2"))
        .await
        .expect("the candidate serves");
    store
        .apply("churn", Change::StopRollout, "test", "done", none.clone())
        .await
        .expect("stop");
    // Kept a grace period for gateways a moment behind, then unloaded.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    inference_client(replica.addr)
        .model_infer(infer_request("2"))
        .await
        .expect("still served within the unload grace");
    let unloaded_in =
        until("gone", "2", Duration::from_secs(8)).await + Duration::from_millis(1500);
    assert!(
        unloaded_in >= mesh_inference::lifecycle::UNLOAD_GRACE,
        "unloaded after {unloaded_in:?}"
    );
    let status = inference_client(replica.addr)
        .model_infer(infer_request("2"))
        .await
        .expect_err("unloaded");
    // On disk but not held here: the replica's state, not the caller's mistake.
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("not loaded on this replica"),
        "{status:?}"
    );
    let status = inference_client(replica.addr)
        .model_infer(infer_request("77"))
        .await
        .expect_err("no such version");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    // Promotion moves what an empty version means, without a restart.
    store
        .apply(
            "churn",
            Change::SetAlias {
                alias: "production".into(),
                version: "2".into(),
            },
            "test",
            "promote",
            none,
        )
        .await
        .expect("promote");
    until("ready", "2", Duration::from_secs(20)).await;
    let started = Instant::now();
    loop {
        let answer = inference_client(replica.addr)
            .model_infer(infer_request(""))
            .await
            .expect("production serves")
            .into_inner();
        if answer.model_version == "2" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "production still {}",
            answer.model_version
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("registry → replica: loaded in {loaded_in:?}, unloaded in {unloaded_in:?}");
    replica.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_following_the_registry_starts_with_production_not_every_version_on_disk() {
    telemetry();
    let pg = mesh_testkit::PostgresServer::start().expect("postgres");
    let mut config = inference_config();
    // Version 92 takes seconds to warm up and 93 fails to load: neither is referenced.
    config.models.dir = models_with(&["92", "93"]);
    config.models.warmup_iterations = 1;
    config.registry.url = Some(pg.url());
    let replica = start_inference(config).await;
    // Every version the catalog shows from the start until SERVING, and a little after.
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let started = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    let mut serving_at = None;
    while serving_at.is_none_or(|at: Instant| at.elapsed() < Duration::from_millis(500)) {
        if let Ok(answer) = ModelCatalogClient::new(internal_channel(replica.addr))
            .list_versions(ListVersionsRequest {})
            .await
        {
            seen.extend(answer.into_inner().versions.into_iter().map(|v| v.version));
        }
        if serving_at.is_none() && health(replica.addr, "").await == Some(serving) {
            serving_at = Some(Instant::now());
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not SERVING: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        seen,
        std::collections::BTreeSet::from(["1".to_owned()]),
        "only the production version (aliases.json, the registry's seed) is held"
    );
}

/// Adds `x-admin-key` (when there is one) and a 5 s deadline to every admin call.
#[derive(Clone)]
struct AdminKey(Option<&'static str>);

impl tonic::service::Interceptor for AdminKey {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(key) = self.0 {
            request.metadata_mut().insert(
                mesh_proto::admin_key::ADMIN_KEY_HEADER,
                key.parse().expect("key"),
            );
        }
        request.set_timeout(Duration::from_secs(5));
        Ok(request)
    }
}

type AdminClient = mesh_proto::admin::model_admin_client::ModelAdminClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, AdminKey>,
>;

/// An admin client of the gateway at `addr`, presenting `key` (if any) as `x-admin-key`.
fn admin(addr: std::net::SocketAddr, key: Option<&'static str>) -> AdminClient {
    mesh_proto::admin::model_admin_client::ModelAdminClient::with_interceptor(
        channel(addr),
        AdminKey(key),
    )
}

/// Waits (at most 20 s) until the admin API shows churn `version` READY on `replicas` replicas.
async fn until_ready_on(ops: &mut AdminClient, version: &str, replicas: usize) {
    let started = Instant::now();
    loop {
        let models = ops
            .list_models(mesh_proto::admin::ListModelsRequest {})
            .await
            .expect("list")
            .into_inner();
        let churn = &models.models[0];
        let ready = churn
            .replicas
            .iter()
            .filter(|r| r.version == version && r.state == "READY")
            .count();
        if ready >= replicas {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{churn:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn predict(entity: &str) -> mesh_proto::gateway::PredictRequest {
    let row = &fixture()[0];
    mesh_proto::gateway::PredictRequest {
        model: "churn".into(),
        entity_id: entity.into(),
        // Demo entities lack these two; the request brings them.
        features: json_features(&serde_json::json!({
            "support_calls_30d": row.features["support_calls_30d"],
            "channel": row.features["channel"],
        })),
        model_version: String::new(),
    }
}

/// Predicts through every gateway in turn until each answers with `version`; every answer on
/// the way must be OK (a switch costs no failed request). Returns how long it took.
async fn until_version(gateways: &[std::net::SocketAddr], version: &str) -> Duration {
    let started = Instant::now();
    let mut done = vec![false; gateways.len()];
    let mut n = 0;
    while done.iter().any(|d| !d) {
        for (i, addr) in gateways.iter().enumerate() {
            n += 1;
            let answer = mesh_proto::gateway::gateway_client::GatewayClient::new(channel(*addr))
                .predict(predict(&format!("cust-{:05}", 1 + n % 50)))
                .await
                .expect("every prediction during a switch succeeds")
                .into_inner();
            done[i] |= answer.model_version == version;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "gateways did not all reach version {version}"
        );
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_rollback_and_a_sticky_rollout_reach_every_gateway_without_a_failed_request() {
    // Stickiness, not the canary, is under test: version 2 (boosted trees) is slower than 1 in a
    // debug build on a busy machine, and the canary would rightly roll it back for latency.
    let slack = Duration::from_secs(10);
    let mesh = Mesh::start_live(|c| c.lifecycle.canary_latency_slack = slack).await;
    mesh.seed(200).await;
    // A second gateway on the same registry and replicas, as a second pod would be.
    let mut second_config = gateway_config(
        mesh.features_proxy.url(),
        mesh.inference_proxies.iter().map(|p| p.url()).collect(),
        mesh.logger.url(),
    );
    second_config.lifecycle.registry.url = Some(mesh.pg.url());
    second_config.lifecycle.canary_latency_slack = slack;
    let second = start_gateway(second_config).await;
    wait_serving(second.addr, Duration::from_secs(30)).await;
    let gateways = [mesh.gateway.addr, second.addr];
    until_version(&gateways, "1").await;

    // The admin API wants its own key: none, a wrong one, an API key are all refused.
    let status = admin(mesh.gateway.addr, None)
        .list_models(mesh_proto::admin::ListModelsRequest {})
        .await
        .expect_err("no key");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = admin(mesh.gateway.addr, Some("not-the-admin-key"))
        .list_models(mesh_proto::admin::ListModelsRequest {})
        .await
        .expect_err("wrong key");
    assert_eq!(status.code(), Code::Unauthenticated);
    // The second gateway has no admin keys: its admin API is off.
    let status = admin(second.addr, Some(ADMIN_KEY))
        .list_models(mesh_proto::admin::ListModelsRequest {})
        .await
        .expect_err("admin API off");
    assert_eq!(status.code(), Code::PermissionDenied);

    let mut ops = admin(mesh.gateway.addr, Some(ADMIN_KEY));
    let status = ops
        .promote(mesh_proto::admin::PromoteRequest {
            model: "churn".into(),
            version: "7".into(),
            alias: String::new(),
            reason: "typo".into(),
        })
        .await
        .expect_err("no such version");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    // Promote 2: both gateways move to it, and no prediction fails while replicas load it.
    let change = ops
        .promote(mesh_proto::admin::PromoteRequest {
            model: "churn".into(),
            version: "2".into(),
            alias: String::new(),
            reason: "v2 passed offline evaluation".into(),
        })
        .await
        .expect("promote")
        .into_inner();
    assert_eq!(change.audit.as_ref().map(|a| a.actor.as_str()), Some("ops"));
    let promoted_in = until_version(&gateways, "2").await;

    // Roll back in one call.
    ops.rollback(mesh_proto::admin::RollbackRequest {
        model: "churn".into(),
        reason: "latency regression".into(),
    })
    .await
    .expect("rollback");
    let rolled_back_in = until_version(&gateways, "1").await;

    // A sticky 50 % rollout of 2: once a replica has 2 ready, each entity's version is the
    // policy's bucket for it, on both gateways, in Predict and in PredictBatch alike.
    ops.set_rollout(mesh_proto::admin::SetRolloutRequest {
        model: "churn".into(),
        candidate: "2".into(),
        percent: 50.0,
        reason: "canary".into(),
        promote_after_secs: 0.0,
    })
    .await
    .expect("rollout");
    until_ready_on(&mut ops, "2", 2).await;
    tokio::time::sleep(Duration::from_millis(600)).await; // one readiness poll
    let entities: Vec<String> = (1..=200).map(|i| format!("cust-{i:05}")).collect();
    let mut on_candidate = 0;
    for (i, entity) in entities.iter().enumerate() {
        let want = if mesh_registry::policy::takes("churn", entity, 50.0) {
            "2"
        } else {
            "1"
        };
        on_candidate += usize::from(want == "2");
        let answer =
            mesh_proto::gateway::gateway_client::GatewayClient::new(channel(gateways[i % 2]))
                .predict(predict(entity))
                .await
                .expect("predict")
                .into_inner();
        assert_eq!(answer.model_version, want, "{entity}");
    }
    assert!(
        (60..=140).contains(&on_candidate),
        "{on_candidate} of 200 on the candidate"
    );
    let row = &fixture()[0];
    let batch = mesh
        .gateway_client()
        .predict_batch(mesh_proto::gateway::PredictBatchRequest {
            model: "churn".into(),
            items: entities
                .iter()
                .map(|e| mesh_proto::gateway::BatchItem {
                    entity_id: e.clone(),
                    features: json_features(&serde_json::json!({
                        "support_calls_30d": row.features["support_calls_30d"],
                        "channel": row.features["channel"],
                    })),
                })
                .collect(),
            model_version: String::new(),
        })
        .await
        .expect("batch")
        .into_inner();
    for (entity, result) in entities.iter().zip(&batch.results) {
        let Some(mesh_proto::gateway::batch_result::Result::Prediction(p)) = &result.result else {
            panic!("{entity}: {result:?}");
        };
        let want = if mesh_registry::policy::takes("churn", entity, 50.0) {
            "2"
        } else {
            "1"
        };
        assert_eq!(p.model_version, want, "{entity} in the batch");
    }

    let history = ops
        .history(mesh_proto::admin::HistoryRequest {
            model: "churn".into(),
            limit: 10,
        })
        .await
        .expect("history")
        .into_inner()
        .entries;
    let actions: Vec<(&str, &str, &str)> = history
        .iter()
        .map(|e| (e.action.as_str(), e.actor.as_str(), e.reason.as_str()))
        .collect();
    assert_eq!(
        actions[..3],
        [
            ("set_rollout", "ops", "canary"),
            ("rollback", "ops", "latency regression"),
            ("set_alias", "ops", "v2 passed offline evaluation"),
        ]
    );
    eprintln!("promotion reached both gateways in {promoted_in:?}, rollback in {rolled_back_in:?}");
    mesh.assert_idle().await;
}

/// Runs `meshctl models <args>` against the gateway at `addr` with the test admin key; its
/// standard output, or a panic with its error output.
fn meshctl(addr: std::net::SocketAddr, args: &[&str]) -> String {
    let output = std::process::Command::new(binary("meshctl"))
        .arg("models")
        .args([
            "--gateway-url",
            &format!("http://{addr}"),
            "--admin-key",
            ADMIN_KEY,
        ])
        .args(args)
        .output()
        .expect("run meshctl");
    assert!(
        output.status.success(),
        "meshctl models {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_models_promotes_rolls_back_and_shows_the_audit_log() {
    let mesh = Mesh::start_live(|_| {}).await;
    let addr = mesh.gateway.addr;
    let listed = tokio::task::spawn_blocking(move || meshctl(addr, &["list"]))
        .await
        .expect("list");
    assert!(
        listed.contains("churn: versions [1, 2], production=1"),
        "{listed}"
    );
    let promoted = tokio::task::spawn_blocking(move || {
        meshctl(addr, &["promote", "churn", "2", "--reason", "better AUC"])
    })
    .await
    .expect("promote");
    assert!(
        promoted.contains("production=2, rollback to 1"),
        "{promoted}"
    );
    let status = tokio::task::spawn_blocking(move || {
        meshctl(addr, &["rollback", "churn", "--reason", "slower"]);
        meshctl(addr, &["status", "churn"])
    })
    .await
    .expect("status");
    assert!(status.contains("production=1"), "{status}");
    assert!(status.contains("version 1 READY"), "{status}");
    let history = tokio::task::spawn_blocking(move || meshctl(addr, &["history", "churn"]))
        .await
        .expect("history");
    let lines: Vec<&str> = history.lines().collect();
    assert!(
        lines[0].contains("ops churn rollback: 2 -> 1 (slower)"),
        "{history}"
    );
    assert!(
        lines[1].contains("ops churn set_alias: 1 -> 2 (better AUC)"),
        "{history}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_is_compared_and_shed_but_never_seen_by_callers() {
    let mesh = Mesh::start_live(|c| {
        c.bulkheads.shadow = 1;
        c.bulkheads.shadow_queue = 4;
    })
    .await;
    mesh.seed(50).await;
    let mut ops = admin(mesh.gateway.addr, Some(ADMIN_KEY));
    ops.set_shadow(mesh_proto::admin::SetShadowRequest {
        model: "churn".into(),
        version: "2".into(),
        reason: "compare v2 on live traffic".into(),
    })
    .await
    .expect("shadow");
    // Wait until a replica has the shadow ready (the gateway sends copies only then).
    until_ready_on(&mut ops, "2", 1).await;
    tokio::time::sleep(Duration::from_millis(600)).await; // one readiness poll

    // 200 predictions, 16 at a time: every one answered by production, as if there were no
    // shadow; the shadow scores them in batches, and its queue of 4 sheds some copies.
    let calls = futures::stream::iter(0..200)
        .map(|i| {
            let mut client = mesh.gateway_client();
            async move {
                client
                    .predict(predict(&format!("cust-{:05}", 1 + i % 50)))
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .buffer_unordered(16);
    let answers: Vec<_> = futures::StreamExt::collect(calls).await;
    for answer in &answers {
        let answer = answer
            .as_ref()
            .expect("the primary never fails because of a shadow");
        assert_eq!(answer.model_version, "1", "the caller sees production only");
        assert!(
            answer.degraded.iter().all(|d| !d.contains("shadow")),
            "{answer:?}"
        );
    }
    // The last copies are scored within their 1 s budget.
    let started = Instant::now();
    let shadow = loop {
        let report = ops
            .shadow_report(mesh_proto::admin::ShadowReportRequest {
                model: "churn".into(),
            })
            .await
            .expect("report")
            .into_inner();
        let shadow = report
            .shadows
            .into_iter()
            .find(|s| s.shadow_version == "2")
            .expect("a shadow summary");
        if shadow.count + shadow.shed >= 200 || started.elapsed() > Duration::from_secs(5) {
            break shadow;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(shadow.count > 0, "{shadow:?}");
    assert_eq!(shadow.errors, 0, "{shadow:?}");
    assert_eq!(
        shadow.count + shadow.shed,
        200,
        "every copy compared or shed: {shadow:?}"
    );
    assert!(
        shadow.shed > 0,
        "a queue of 4 for 16 concurrent callers sheds some: {shadow:?}"
    );
    // Scored in batches: every compared copy was in exactly one call, and calls carried
    // several copies.
    let calls = metric(
        mesh.gateway_http,
        r#"mesh_shadow_batch_rows_count{model="churn",version="2"}"#,
    )
    .await;
    let rows = metric(
        mesh.gateway_http,
        r#"mesh_shadow_batch_rows_sum{model="churn",version="2"}"#,
    )
    .await;
    println!(
        "shadow: {} copies compared in {calls} calls, {} shed",
        shadow.count, shadow.shed
    );
    assert_eq!(rows as u64, shadow.count, "each compared copy in one call");
    assert!(
        calls < rows,
        "several copies per call: {calls} calls for {rows} copies"
    );
    // Version 2 is a different model: its scores differ, and mostly agree at 0.5.
    assert!(shadow.mean_abs_diff > 0.001, "{shadow:?}");
    assert!(shadow.agreement > 0.5, "{shadow:?}");
    let shed = metric(
        mesh.gateway_http,
        r#"mesh_shadow_predictions_total{model="churn",outcome="shed",version="2"}"#,
    )
    .await;
    assert_eq!(shed as u64, shadow.shed);

    // Each scored copy is logged, beside the predictions, naming the primary it copied.
    let primaries: std::collections::HashSet<String> = answers
        .iter()
        .map(|a| a.as_ref().expect("answer").prediction_id.clone())
        .collect();
    let db = mesh.db().await;
    let mut rows = Vec::new();
    for _ in 0..100 {
        rows = db
            .query(
                "SELECT prediction_id, primary_id, model_version FROM shadow_predictions",
                &[],
            )
            .await
            .expect("shadow_predictions");
        if rows.len() as u64 >= shadow.count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        rows.len() as u64,
        shadow.count,
        "every scored copy logged once"
    );
    for row in &rows {
        let (id, primary, version): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(version, "2");
        assert!(primaries.contains(&primary), "{primary} is a primary's id");
        assert!(!primaries.contains(&id), "a shadow has its own id");
    }
    let primaries_logged: i64 = db
        .query_one(
            "SELECT count(*) FROM predictions WHERE model_version = '1'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    let shadows_in_predictions: i64 = db
        .query_one(
            "SELECT count(*) FROM predictions WHERE model_version <> '1'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(primaries_logged, 200, "the primaries are logged as usual");
    assert_eq!(shadows_in_predictions, 0, "no shadow among the predictions");
    mesh.assert_idle().await;
}

/// A complete request for `entity` that brings every feature, with `tenure_months` as given
/// (version 91 of the test models scores NaN above 1,000).
fn complete_predict(entity: &str, tenure: f64) -> mesh_proto::gateway::PredictRequest {
    let mut features = fixture()[0].features.clone();
    features["tenure_months"] = serde_json::json!(tenure);
    mesh_proto::gateway::PredictRequest {
        model: "churn".into(),
        entity_id: entity.into(),
        features: json_features(&features),
        model_version: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_with_a_bake_promotes_itself_once_and_callers_never_fail() {
    // Version 2 is slower than 1 in a debug build on a busy machine: a generous latency slack
    // keeps this test about the bake (errors still breach).
    let mesh =
        Mesh::start_live(|c| c.lifecycle.canary_latency_slack = Duration::from_secs(10)).await;
    mesh.seed(200).await;
    let mut ops = admin(mesh.gateway.addr, Some(ADMIN_KEY));
    // The bake counts from the rollout's start.
    let started = Instant::now();
    ops.set_rollout(mesh_proto::admin::SetRolloutRequest {
        model: "churn".into(),
        candidate: "2".into(),
        percent: 50.0,
        reason: "canary of 2 with a bake".into(),
        promote_after_secs: 3.0,
    })
    .await
    .expect("rollout");
    let listed = ops
        .list_models(mesh_proto::admin::ListModelsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.models[0].rollout_promote_after_secs, 3.0);
    until_ready_on(&mut ops, "2", 2).await;
    tokio::time::sleep(Duration::from_millis(600)).await; // one readiness poll

    // Both versions answer well: once the 3 s bake is over and each side has 50 calls in the
    // window, the gateway promotes 2. Every answer on the way is OK.
    let mut gateway = mesh.gateway_client();
    let mut promoted_after = None;
    for i in 0..3000 {
        let answer = gateway
            .predict(predict(&format!("cust-{:05}", 1 + i % 200)))
            .await
            .expect("every prediction answered")
            .into_inner();
        assert!(answer.score.is_finite(), "{answer:?}");
        if i % 20 == 0
            && metric(
                mesh.gateway_http,
                r#"mesh_canary_promotions_total{model="churn"}"#,
            )
            .await
                >= 1.0
        {
            promoted_after = Some(started.elapsed());
            break;
        }
    }
    let elapsed = promoted_after.expect("the canary promoted itself");
    assert!(
        elapsed >= Duration::from_secs(3) && elapsed < Duration::from_secs(15),
        "promoted after {elapsed:?} with a 3 s bake"
    );
    let models = ops
        .list_models(mesh_proto::admin::ListModelsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(models.models[0].aliases["production"], "2");
    assert_eq!(models.models[0].previous_production, "1");
    assert_eq!(
        models.models[0].rollout_candidate, "",
        "the rollout is over"
    );
    let last = ops
        .history(mesh_proto::admin::HistoryRequest {
            model: "churn".into(),
            limit: 1,
        })
        .await
        .expect("history")
        .into_inner()
        .entries
        .remove(0);
    assert_eq!(
        (
            last.action.as_str(),
            last.actor.as_str(),
            last.to_version.as_str()
        ),
        ("promote_candidate", "mesh", "2")
    );
    assert!(last.reason.starts_with("healthy bake"), "{last:?}");
    assert!(last.details.contains("\"calls\""), "{}", last.details);
    // A bake is no licence to skip the judge: a broken candidate is not promoted (the next
    // test's canary has a 1 s bake and is rolled back).
    eprintln!("a healthy canary with a 3 s bake promoted itself after {elapsed:?}");
    mesh.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_breaks_rolls_itself_back_and_callers_never_see_it() {
    let mesh = Mesh::start_live_with_models(models_with(&["91"]), |_| {}).await;
    let mut ops = admin(mesh.gateway.addr, Some(ADMIN_KEY));
    ops.set_rollout(mesh_proto::admin::SetRolloutRequest {
        model: "churn".into(),
        candidate: "91".into(),
        percent: 50.0,
        reason: "canary of 91".into(),
        promote_after_secs: 1.0,
    })
    .await
    .expect("rollout");
    until_ready_on(&mut ops, "91", 2).await;
    tokio::time::sleep(Duration::from_millis(600)).await; // one readiness poll

    // Every request's tenure is above 1,000: version 91 scores NaN for all of them. Half the
    // entities are the candidate's; each of those fails there and is retried on production.
    let started = Instant::now();
    let mut rolled_back_after = None;
    let mut gateway = mesh.gateway_client();
    for i in 0..400 {
        let answer = gateway
            .predict(complete_predict(&format!("walk-in-{i}"), 5_000.0))
            .await
            .expect("callers never see the canary's failures")
            .into_inner();
        assert!(answer.score.is_finite(), "{answer:?}");
        assert_eq!(
            answer.model_version, "1",
            "a failed candidate call is answered by production"
        );
        if rolled_back_after.is_none()
            && metric(
                mesh.gateway_http,
                r#"mesh_canary_rollbacks_total{model="churn"}"#,
            )
            .await
                >= 1.0
        {
            rolled_back_after = Some((i, started.elapsed()));
            break;
        }
    }
    let (calls, elapsed) = rolled_back_after.expect("the canary rolled itself back");
    assert!(
        elapsed < Duration::from_secs(10),
        "rolled back after {elapsed:?}"
    );
    let history = ops
        .history(mesh_proto::admin::HistoryRequest {
            model: "churn".into(),
            limit: 1,
        })
        .await
        .expect("history")
        .into_inner()
        .entries;
    let last = &history[0];
    assert_eq!(
        (last.action.as_str(), last.actor.as_str()),
        ("stop_rollout", "mesh")
    );
    assert!(
        last.reason.contains("canary breach: error rate 100.0 %"),
        "{last:?}"
    );
    assert!(
        last.details.contains("\"calls\""),
        "the figures are kept: {}",
        last.details
    );
    let models = ops
        .list_models(mesh_proto::admin::ListModelsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        models.models[0].rollout_candidate, "",
        "the rollout is over"
    );
    eprintln!("canary of a broken version rolled back after {calls} calls, {elapsed:?}");
    mesh.assert_idle().await;
}

/// `meshctl models drift churn --version 1 --json` against the mesh's prediction log: each
/// distribution's PSI by name.
fn drift_from_log(pg_url: String) -> BTreeMap<String, f64> {
    let output = std::process::Command::new(binary("meshctl"))
        .args(["models", "drift", "churn", "--version", "1", "--json"])
        .arg("--models-dir")
        .arg(repo().join("models"))
        .env("MESH_DATABASE_URL", pg_url)
        .output()
        .expect("run meshctl");
    assert!(
        output.status.success(),
        "meshctl models drift failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    report[0]["distributions"]
        .as_array()
        .expect("distributions")
        .iter()
        .map(|d| {
            (
                d["name"].as_str().expect("name").to_owned(),
                d["psi"].as_f64().expect("psi"),
            )
        })
        .collect()
}

/// Predicts each of `requests` (16 at a time); all must succeed.
async fn predict_all(mesh: &Mesh, requests: Vec<mesh_proto::gateway::PredictRequest>) {
    let calls = futures::stream::iter(requests)
        .map(|request| {
            let mut client = mesh.gateway_client();
            async move { client.predict(request).await.map(|_| ()) }
        })
        .buffer_unordered(16);
    let answers: Vec<_> = futures::StreamExt::collect(calls).await;
    assert!(
        answers.iter().all(Result::is_ok),
        "every prediction answered"
    );
}

/// Waits until `n` predictions are in the log, then until the gateway's PSI gauges equal the
/// ones `meshctl models drift` computes from the log (same predictions, same bins).
async fn drift_agrees(mesh: &Mesh, n: i64) -> BTreeMap<String, f64> {
    let db = mesh.db().await;
    let started = Instant::now();
    while db
        .query_one("SELECT count(*) FROM predictions", &[])
        .await
        .expect("count")
        .get::<_, i64>(0)
        < n
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{n} predictions logged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let url = mesh.pg.url();
    let from_log = tokio::task::spawn_blocking(move || drift_from_log(url))
        .await
        .expect("meshctl");
    assert!(from_log.contains_key("score") && from_log.contains_key("tenure_months"));
    for (name, psi) in &from_log {
        let gauge =
            format!(r#"mesh_model_drift_psi{{feature="{name}",model="churn",version="1"}}"#);
        loop {
            let live = metric(mesh.gateway_http, &gauge).await;
            if (live - psi).abs() < 1e-9 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(40),
                "{name}: the gateway says {live}, the prediction log {psi}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    from_log
}

/// A request for demo entity `i` (of 1,000) whose request-time features are drawn from the
/// training reference by stratified sampling: `support_calls_30d` and `channel` take the
/// reference's shares over the 1,000 (the stored features of the demo entities already do).
fn reference_like(i: usize) -> mesh_proto::gateway::PredictRequest {
    fn pick<T: Copy>(u: f64, shares: &[(T, f64)]) -> T {
        let mut cumulative = 0.0;
        for (value, share) in shares {
            cumulative += share;
            if u < cumulative {
                return *value;
            }
        }
        shares[shares.len() - 1].0
    }
    let u = (i as f64 + 0.5) / 1000.0;
    let v = ((i * 7919) % 1000) as f64 / 1000.0 + 0.0005;
    let calls = pick(u, &[(0, 0.21), (1, 0.32125), (2, 0.2505), (3, 0.21825)]);
    let channel = pick(
        v,
        &[("web", 0.51175), ("mobile", 0.336), ("store", 0.15225)],
    );
    mesh_proto::gateway::PredictRequest {
        model: "churn".into(),
        entity_id: format!("cust-{:05}", i + 1),
        features: json_features(&serde_json::json!({
            "support_calls_30d": calls,
            "channel": channel,
        })),
        model_version: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_from_the_gateway_and_the_prediction_log_agree_near_zero_then_flag_a_shift() {
    let mesh = Mesh::start(|_| {}).await;
    // The demo entities are drawn like the training holdout: no drift.
    mesh.seed(1000).await;
    predict_all(&mesh, (0..1000).map(reference_like).collect()).await;
    let calm = drift_agrees(&mesh, 1000).await;
    eprintln!("PSI on reference-like traffic: {calm:?}");
    for (name, psi) in &calm {
        assert!(*psi < 0.05, "{name}: PSI {psi} on reference-like data");
    }
    // Then 1,000 walk-ins with tenures far beyond anything in training: half the window now
    // lands in the reference's last tenure bin.
    predict_all(
        &mesh,
        (0..1000)
            .map(|i| complete_predict(&format!("walk-in-{i}"), 500.0))
            .collect(),
    )
    .await;
    let shifted = drift_agrees(&mesh, 2000).await;
    eprintln!("PSI after the shift: {shifted:?}");
    assert!(shifted["tenure_months"] > 0.2, "{shifted:?}");
}
