//! Harness for the whole-mesh tests: real Redis and PostgreSQL (from `mesh-testkit`) and the
//! four real services, each started through its library `serve` on `127.0.0.1:0` and spoken to
//! through generated gRPC clients, exactly as separate deployments would be.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh_proto::features::features_client::FeaturesClient;
use mesh_proto::features::{EntityFeatures, PutFeaturesRequest};
use mesh_proto::gateway::gateway_client::GatewayClient;
use mesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use mesh_proto::types::{feature_value::Kind, FeatureValue};
use mesh_runtime::config::FromSettings as _;
use mesh_runtime::internal::{InternalChannel, InternalToken, WithToken};
use mesh_testkit::proxy::DelayProxy;
use mesh_testkit::{PostgresServer, RedisServer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub mod ha_mesh;
mod scratch;

pub use scratch::scratch_dir;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The ONNX Runtime library, from `ORT_DYLIB_PATH` (set by `make test` via .tools/env).
pub fn ort_dylib() -> PathBuf {
    std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .expect(
        "ORT_DYLIB_PATH is not set: run the tests with `make test` (it runs scripts/bootstrap.sh)",
    )
}

/// Installs logging and in-process tracing once (trace ids exist; nothing is exported).
pub fn telemetry() {
    let installed = mesh_telemetry::init(&mesh_telemetry::TelemetryConfig {
        service_name: "mesh-tests".into(),
        otlp_endpoint: None,
        sample_ratio: 1.0,
        log_format: mesh_telemetry::LogFormat::Text,
        default_log_filter: "warn".into(),
    });
    // The provider must outlive every test in this process: dropping the guard shuts it
    // down, after which spans are no-ops without trace ids.
    std::mem::forget(installed.expect("telemetry"));
}

/// A running service: its address, and the trigger of its graceful shutdown.
pub struct Running {
    /// gRPC address.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts the graceful shutdown (as SIGTERM would) without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down and waits (at most 20 s) until `serve` has returned, keeping the handle.
    pub async fn stop(&mut self) {
        self.begin_shutdown();
        let started = std::time::Instant::now();
        while !self.finished() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{} does not stop",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Shuts down and waits until `serve` has returned.
    pub async fn shutdown(mut self) {
        self.begin_shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(20), &mut self.task).await;
    }

    /// Whether `serve` has returned.
    pub fn finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}

/// Starts a service: binds port 0, calls its `serve` with a shutdown trigger.
pub async fn spawn_service<F, Fut, E>(serve: F) -> Running
where
    F: FnOnce(TcpListener, oneshot::Receiver<()>) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    spawn_service_at("127.0.0.1:0".parse().expect("addr"), serve).await
}

/// Like [`spawn_service`], on a given address (to restart a service where clients expect it).
pub async fn spawn_service_at<F, Fut, E>(addr: SocketAddr, serve: F) -> Running
where
    F: FnOnce(TcpListener, oneshot::Receiver<()>) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    let listener = TcpListener::bind(addr).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel();
    let fut = serve(listener, stopped);
    let task = tokio::spawn(async move {
        if let Err(e) = fut.await {
            panic!("service on {addr} failed: {e}");
        }
    });
    Running {
        addr,
        stop: Some(stop),
        task,
    }
}

async fn until(stopped: oneshot::Receiver<()>) {
    let _ = stopped.await;
}

/// Server settings for a test service: port from the listener, no metrics endpoint, short drain.
pub fn test_server(max_concurrency: usize) -> mesh_runtime::config::ServerConfig {
    mesh_runtime::config::ServerConfig {
        listen_addr: String::new(),
        metrics_addr: None,
        max_concurrency,
        drain_delay: Duration::from_millis(50),
        grace: Duration::from_secs(5),
        connections: mesh_runtime::ServeOptions::new(Vec::new()).connections,
        internal_token: Some(test_token()),
    }
}

/// The admin key of [`Mesh::start_live`] (id `ops`).
pub const ADMIN_KEY: &str = "admin-secret-for-tests";

/// The internal token every test service shares (`MESH_INTERNAL_TOKEN` of spawned binaries).
pub const TEST_TOKEN: &str = "mesh-tests-internal-token";

/// [`TEST_TOKEN`] as a token.
pub fn test_token() -> InternalToken {
    InternalToken::new(TEST_TOKEN).expect("token")
}

/// A lazily connecting channel to the internal service at `addr`, presenting the test token.
pub fn internal_channel(addr: SocketAddr) -> InternalChannel {
    WithToken::new(channel(addr), Some(&test_token()))
}

/// Configuration of the features service for tests.
pub fn features_config(redis: Option<&RedisServer>, pg: &PostgresServer) -> mesh_features::Config {
    let mut config = mesh_features::Config::defaults();
    config.server = test_server(512);
    config.redis.url = redis.map(RedisServer::url);
    config.redis.cooldown = Duration::from_millis(500);
    config.database.url = pg.url();
    config.database.pool_size = 8;
    config.cache.capacity = 10_000;
    config
}

/// Configuration of an inference replica for tests.
pub fn inference_config() -> mesh_inference::Config {
    mesh_inference::Config {
        server: test_server(256),
        models: mesh_inference::config::ModelSettings {
            dir: repo().join("models"),
            ort_dylib: ort_dylib(),
            sessions_per_model: 2,
            warmup_iterations: 5,
        },
        max_batch_rows: 4096,
        replica_id: "test".into(),
        registry: Default::default(),
    }
}

/// Configuration of the logger for tests (short flush so records appear quickly).
pub fn logger_config(pg: &PostgresServer) -> mesh_logger::Config {
    let mut config = mesh_logger::Config::defaults();
    config.server = test_server(256);
    config.database.url = pg.url();
    config.batching.batch_size = 100;
    config.batching.flush_interval = Duration::from_millis(20);
    config.batching.queue_capacity = 10_000;
    config
}

/// Configuration of the gateway for tests, pointing at the given downstreams (each with a
/// spool directory of its own).
pub fn gateway_config(
    features: String,
    inference: Vec<String>,
    logger: String,
) -> mesh_gateway::Config {
    let mut config = mesh_gateway::Config::defaults();
    config.server = test_server(1024);
    config.downstreams.features_url = features;
    config.downstreams.inference_urls = inference;
    config.downstreams.logger_url = logger;
    config.models_dir = repo().join("models");
    config.budgets.default = Duration::from_millis(1000);
    config.spool.dir = scratch_dir("spool");
    config.spool.max_bytes = 64 << 20;
    config.spool.segment_bytes = 1 << 20;
    config.spool.queue = 10_000;
    config.spool.batch_size = 100;
    config.spool.flush = Duration::from_millis(10);
    config.access.rate_limit = None;
    config
}

/// Starts the features service.
pub async fn start_features(config: mesh_features::Config) -> Running {
    spawn_service(|l, s| mesh_features::serve(config, l, None, until(s))).await
}

/// Starts the features service on `addr`.
pub async fn start_features_at(config: mesh_features::Config, addr: SocketAddr) -> Running {
    spawn_service_at(addr, |l, s| mesh_features::serve(config, l, None, until(s))).await
}

/// Starts the features service with its `/metrics` endpoint; returns that endpoint's address.
pub async fn start_features_with_metrics(config: mesh_features::Config) -> (Running, SocketAddr) {
    let metrics = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind metrics");
    let addr = metrics.local_addr().expect("addr");
    let running =
        spawn_service(|l, s| mesh_features::serve(config, l, Some(metrics), until(s))).await;
    (running, addr)
}

/// `GET path` on a service's HTTP (metrics) port: status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    mesh_testkit::http_get(addr, path, Duration::from_secs(10))
        .await
        .expect("http endpoint")
}

/// The gateway's breaker state for the features service (0 closed, 1 open, 2 half-open).
pub const FEATURES_BREAKER: &str = r#"mesh_breaker_state{downstream="features"}"#;

/// The value of the Prometheus sample `name` (with labels, as printed) at `addr`/metrics.
pub async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics").await;
    body.lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Starts an inference replica.
pub async fn start_inference(config: mesh_inference::Config) -> Running {
    spawn_service(|l, s| mesh_inference::serve(config, l, None, until(s))).await
}

/// Starts an inference replica on `addr` with its `/metrics` endpoint (on 127.0.0.1:0);
/// returns that endpoint's address.
pub async fn start_inference_with_metrics_at(
    config: mesh_inference::Config,
    addr: SocketAddr,
) -> (Running, SocketAddr) {
    let metrics = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind metrics");
    let metrics_addr = metrics.local_addr().expect("addr");
    let running = spawn_service_at(addr, |l, s| {
        mesh_inference::serve(config, l, Some(metrics), until(s))
    })
    .await;
    (running, metrics_addr)
}

/// Starts the logger.
pub async fn start_logger(config: mesh_logger::Config) -> Running {
    spawn_service(|l, s| mesh_logger::serve(config, l, None, until(s))).await
}

/// Starts the logger on `addr` (e.g. again where a stopped one was).
pub async fn start_logger_at(config: mesh_logger::Config, addr: SocketAddr) -> Running {
    spawn_service_at(addr, |l, s| mesh_logger::serve(config, l, None, until(s))).await
}

/// Starts the gateway.
pub async fn start_gateway(config: mesh_gateway::Config) -> Running {
    spawn_service(|l, s| mesh_gateway::serve(config, l, None, until(s))).await
}

/// Starts the gateway with its HTTP port (metrics, health); returns that port's address.
pub async fn start_gateway_with_http(config: mesh_gateway::Config) -> (Running, SocketAddr) {
    let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let addr = http.local_addr().expect("addr");
    let running = spawn_service(|l, s| mesh_gateway::serve(config, l, Some(http), until(s))).await;
    (running, addr)
}

/// Waits (at most 60 s) until the gateway at `http` has seen each of its `replicas` report a
/// ready model version (`mesh_replica_versions_ready`).
pub async fn wait_replicas_ready(http: SocketAddr, replicas: usize) {
    let started = std::time::Instant::now();
    loop {
        let (_, body) = http_get(http, "/metrics").await;
        let ready = body
            .lines()
            .filter(|l| l.starts_with("mesh_replica_versions_ready{"))
            .filter(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) > Some(0.0))
            .count();
        if ready >= replicas {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the gateway did not see {replicas} replicas ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A built binary of the workspace: next to the test's `deps/` directory (`make test` builds
/// them first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built; run `cargo build --bins` (make test does)",
        path.display()
    );
    path
}

/// A lazily connecting channel to `addr`.
pub fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect_lazy()
}

/// A KServe client of the inference replica at `addr`.
pub fn inference_client(addr: SocketAddr) -> GrpcInferenceServiceClient<InternalChannel> {
    GrpcInferenceServiceClient::new(internal_channel(addr))
}

/// The `grpc.health.v1` status of `service` at `addr` (`""`: the server as a whole).
pub async fn health(addr: SocketAddr, service: &str) -> Option<i32> {
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel(addr));
    let mut request = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    });
    request.set_timeout(Duration::from_secs(1));
    client
        .check(request)
        .await
        .ok()
        .map(|r| r.into_inner().status)
}

/// Waits until `addr` reports SERVING; panics after `timeout`.
pub async fn wait_serving(addr: SocketAddr, timeout: Duration) {
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let started = std::time::Instant::now();
    while started.elapsed() < timeout {
        if health(addr, "").await == Some(serving) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{addr} did not become SERVING within {timeout:?}");
}

/// The whole mesh: Redis, PostgreSQL, features, two inference replicas, logger, gateway.
pub struct Mesh {
    /// Redis (stop it to simulate an outage).
    pub redis: RedisServer,
    /// PostgreSQL.
    pub pg: PostgresServer,
    /// The features service.
    pub features: Running,
    /// The inference replicas.
    pub inference: Vec<Running>,
    /// The logger.
    pub logger: Running,
    /// The gateway.
    pub gateway: Running,
    /// The gateway's HTTP port: `/metrics`, `/health`, `/health/live`.
    pub gateway_http: SocketAddr,
    /// The gateway's spool directory.
    pub spool_dir: PathBuf,
    /// Proxy between the gateway and features (no delay unless a test sets one).
    pub features_proxy: DelayProxy,
    /// Proxies between the gateway and each inference replica.
    pub inference_proxies: Vec<DelayProxy>,
}

impl Mesh {
    /// Starts everything (two inference replicas) and waits until every service is SERVING;
    /// `tune` adjusts the gateway's configuration.
    pub async fn start(tune: impl FnOnce(&mut mesh_gateway::Config)) -> Self {
        Self::start_with(2, tune).await
    }

    /// Like [`Mesh::start`], with `replicas` inference replicas.
    pub async fn start_with(replicas: usize, tune: impl FnOnce(&mut mesh_gateway::Config)) -> Self {
        Self::start_inner(replicas, false, repo().join("models"), tune).await
    }

    /// Like [`Mesh::start`], with the live model registry in the mesh's PostgreSQL: the
    /// gateway and every inference replica follow it, and [`ADMIN_KEY`] may change it.
    pub async fn start_live(tune: impl FnOnce(&mut mesh_gateway::Config)) -> Self {
        Self::start_inner(2, true, repo().join("models"), tune).await
    }

    /// Like [`Mesh::start_live`], with the models in `models` (for every replica and the
    /// gateway).
    pub async fn start_live_with_models(
        models: PathBuf,
        tune: impl FnOnce(&mut mesh_gateway::Config),
    ) -> Self {
        Self::start_inner(2, true, models, tune).await
    }

    async fn start_inner(
        replicas: usize,
        live: bool,
        models: PathBuf,
        tune: impl FnOnce(&mut mesh_gateway::Config),
    ) -> Self {
        telemetry();
        let redis = RedisServer::start().expect("redis");
        let pg = PostgresServer::start().expect("postgres");
        let features = start_features(features_config(Some(&redis), &pg)).await;
        let mut inference = Vec::new();
        for _ in 0..replicas {
            let mut config = inference_config();
            config.models.dir = models.clone();
            if live {
                config.registry.url = Some(pg.url());
                config.models.warmup_iterations = 1;
            }
            inference.push(start_inference(config).await);
        }
        let logger = start_logger(logger_config(&pg)).await;
        let features_proxy = DelayProxy::start(features.addr).await.expect("proxy");
        let mut inference_proxies = Vec::new();
        for replica in &inference {
            inference_proxies.push(DelayProxy::start(replica.addr).await.expect("proxy"));
        }
        let mut config = gateway_config(
            features_proxy.url(),
            inference_proxies.iter().map(DelayProxy::url).collect(),
            logger.url(),
        );
        config.models_dir = models;
        if live {
            config.lifecycle.registry.url = Some(pg.url());
            config.lifecycle.admin_keys =
                mesh_gateway::auth::parse_key_list("MESH_ADMIN_KEYS", &format!("ops:{ADMIN_KEY}"))
                    .expect("admin key");
        }
        tune(&mut config);
        let spool_dir = config.spool.dir.clone();
        let plaintext = config.access.tls.is_none();
        let (gateway, gateway_http) = start_gateway_with_http(config).await;
        // The gateway routes only to replicas it has seen report a ready version: wait until
        // it has (its catalog polls run every half second).
        if plaintext {
            wait_replicas_ready(gateway_http, inference.len()).await;
        }
        // (A TLS gateway's health is checked by the test that configured it.)
        for addr in [features.addr, logger.addr]
            .into_iter()
            .chain(plaintext.then_some(gateway.addr))
            .chain(inference.iter().map(|r| r.addr))
        {
            wait_serving(addr, Duration::from_secs(60)).await;
        }
        Self {
            redis,
            pg,
            features,
            inference,
            logger,
            gateway,
            gateway_http,
            spool_dir,
            features_proxy,
            inference_proxies,
        }
    }

    /// A client of the gateway.
    pub fn gateway_client(&self) -> GatewayClient<Channel> {
        GatewayClient::new(channel(self.gateway.addr))
    }

    /// Waits (at most 3 s) until the gateway holds nothing for calls that have ended: every
    /// `mesh_replica_in_flight` and `mesh_bulkhead_in_flight` sample back at 0. Call it after
    /// every load: a count left behind by a cancelled call skews the balancer (or sheds) for
    /// the rest of the process's life.
    pub async fn assert_idle(&self) {
        let started = std::time::Instant::now();
        loop {
            let (_, body) = http_get(self.gateway_http, "/metrics").await;
            let busy: Vec<&str> = body
                .lines()
                .filter(|l| {
                    l.starts_with("mesh_replica_in_flight{")
                        || l.starts_with("mesh_bulkhead_in_flight{")
                })
                .filter(|l| l.rsplit(' ').next() != Some("0"))
                .collect();
            if busy.is_empty() {
                assert!(
                    body.contains("mesh_replica_in_flight{"),
                    "the gateway exports no mesh_replica_in_flight"
                );
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "calls still counted in flight after the load ended: {busy:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client of the features service (direct, not through the proxy).
    pub fn features_client(&self) -> FeaturesClient<InternalChannel> {
        FeaturesClient::new(internal_channel(self.features.addr))
    }

    /// A client of the first inference replica.
    pub fn inference_client(&self) -> GrpcInferenceServiceClient<InternalChannel> {
        inference_client(self.inference[0].addr)
    }

    /// A PostgreSQL client.
    pub async fn db(&self) -> tokio_postgres::Client {
        connect_db(&self.pg).await
    }

    /// Writes the first `n` demo entities into the feature store.
    pub async fn seed(&self, n: usize) {
        seed(self.features_client(), n).await;
    }
}

/// A PostgreSQL client for `pg`.
pub async fn connect_db(pg: &PostgresServer) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .expect("connect to postgres");
    tokio::spawn(connection);
    client
}

/// Writes the first `n` entities of data/demo_entities.jsonl through PutFeatures.
pub async fn seed(mut client: FeaturesClient<InternalChannel>, n: usize) {
    let text =
        std::fs::read_to_string(repo().join("data/demo_entities.jsonl")).expect("demo entities");
    let entities: Vec<EntityFeatures> = text
        .lines()
        .take(n)
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("json line");
            EntityFeatures {
                entity_id: v["entity_id"].as_str().expect("id").to_owned(),
                found: true,
                features: json_features(&v["features"]),
                tier: 0,
            }
        })
        .collect();
    client
        .put_features(PutFeaturesRequest { entities })
        .await
        .expect("seed");
}

/// `{"a": 1, "b": "x"}` as typed feature values.
pub fn json_features(v: &serde_json::Value) -> std::collections::HashMap<String, FeatureValue> {
    v.as_object()
        .expect("object")
        .iter()
        .map(|(k, v)| {
            let kind = match v {
                serde_json::Value::Number(n) => Kind::Number(n.as_f64().expect("f64")),
                serde_json::Value::String(s) => Kind::Category(s.clone()),
                other => panic!("unexpected feature value {other}"),
            };
            (k.clone(), FeatureValue { kind: Some(kind) })
        })
        .collect()
}

/// The request-time features of a fixture row, `support_calls_30d` and `channel`: the rest
/// come from the store (the entity must be seeded).
pub fn request_features(row: &FixtureRow) -> std::collections::HashMap<String, FeatureValue> {
    let all = json_features(&row.features);
    ["support_calls_30d", "channel"]
        .iter()
        .map(|k| ((*k).to_owned(), all[*k].clone()))
        .collect()
}

/// One row of the training/serving skew fixture made by the Python pipeline.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct FixtureRow {
    /// Entity.
    pub entity_id: String,
    /// All features of the row.
    pub features: serde_json::Value,
    /// scikit-learn's predict_proba[:, 1].
    pub probability: f64,
}

/// training/fixtures/churn_v1.json.
pub fn fixture() -> Vec<FixtureRow> {
    #[derive(serde::Deserialize)]
    struct File {
        rows: Vec<FixtureRow>,
    }
    let text =
        std::fs::read_to_string(repo().join("training/fixtures/churn_v1.json")).expect("fixture");
    serde_json::from_str::<File>(&text)
        .expect("fixture json")
        .rows
}

/// A number feature.
pub fn num(v: f64) -> FeatureValue {
    FeatureValue {
        kind: Some(Kind::Number(v)),
    }
}

/// A category feature.
pub fn cat(v: &str) -> FeatureValue {
    FeatureValue {
        kind: Some(Kind::Category(v.into())),
    }
}

/// Deletes `ids` from the Redis on `redis_port` (value and version keys), as for entities Redis
/// lost: their next read goes to PostgreSQL. First waits (at most 20 s) for the features
/// service's first complete materialization (its marker key), which would otherwise put them
/// back.
pub async fn forget_in_redis(redis_port: u16, ids: &[&str]) {
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &redis_port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let started = std::time::Instant::now();
    while cli(&["EXISTS", mesh_features::store::MATERIALIZED_KEY]) != "1" {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no materialization in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let keys: Vec<String> = ids
        .iter()
        .flat_map(|id| {
            [
                mesh_features::store::redis_key(id),
                mesh_features::store::redis_version_key(id),
            ]
        })
        .collect();
    let mut args = vec!["DEL"];
    args.extend(keys.iter().map(String::as_str));
    assert_eq!(cli(&args), keys.len().to_string(), "every key was there");
}

/// Waits (at most 20 s) until the Redis on `redis_port` holds every entity of `ids` (written
/// through or materialized).
pub async fn wait_in_redis(redis_port: u16, ids: &[&str]) {
    let started = std::time::Instant::now();
    for id in ids {
        loop {
            let out = std::process::Command::new("redis-cli")
                .args(["-p", &redis_port.to_string(), "EXISTS"])
                .arg(mesh_features::store::redis_key(id))
                .output()
                .expect("redis-cli");
            if String::from_utf8_lossy(&out.stdout).trim() == "1" {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{id} not in Redis after 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
