//! Model lifecycle on a real inference replica and a real PostgreSQL: a version that fails its
//! golden fixture or fails to load never serves while the others do, and a replica loads and
//! unloads versions as the live registry changes, without a restart.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    let unloaded_in = until("gone", "2", Duration::from_secs(5)).await;
    let status = inference_client(replica.addr)
        .model_infer(infer_request("2"))
        .await
        .expect_err("unloaded");
    assert_eq!(status.code(), Code::NotFound);
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
