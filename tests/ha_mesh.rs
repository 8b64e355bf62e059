//! The whole mesh on the HA stores (tests/ha.rs): the four services in this process, as in
//! [`crate::Mesh`], against a Patroni cluster's multi-host URL and Redis through Sentinel; and
//! a steady prediction load that records what every request got.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_proto::gateway::gateway_client::GatewayClient;
use mesh_proto::gateway::PredictRequest;
use tokio::task::JoinHandle;

use crate::*;

/// The services, started against the given stores, with the live model registry.
pub struct HaMesh {
    /// The features service.
    pub features: Running,
    /// Two inference replicas.
    pub inference: Vec<Running>,
    /// The logger.
    pub logger: Running,
    /// The gateway.
    pub gateway: Running,
    /// The gateway's HTTP port.
    pub gateway_http: SocketAddr,
}

impl HaMesh {
    /// Starts every service with PostgreSQL at `db_url` and Redis through `sentinels`
    /// (`host:port,...`, master name `mesh`), and waits until each is SERVING.
    pub async fn start(db_url: &str, sentinels: &str) -> Self {
        telemetry();
        let mut features_config = mesh_features::Config::defaults();
        features_config.server = test_server(512);
        features_config.redis.sentinels = sentinels.split(',').map(str::to_owned).collect();
        features_config.redis.master_name = mesh_testkit::ha::MASTER_NAME.into();
        features_config.redis.cooldown = Duration::from_millis(500);
        // The failovers are under test here, not the 20 ms budget: a debug build on a busy
        // machine misses that now and then, which would send reads to PostgreSQL.
        features_config.redis.timeout = Duration::from_millis(200);
        features_config.database.url = db_url.to_owned();
        features_config.database.pool_size = 8;
        let features = start_features(features_config).await;
        // The live model registry in the same cluster: the gateway and the replicas follow it
        // through the failover too.
        let mut inference = Vec::new();
        for _ in 0..2 {
            let mut config = inference_config();
            config.registry.url = Some(db_url.to_owned());
            config.models.warmup_iterations = 1;
            inference.push(start_inference(config).await);
        }
        let mut logger_config = mesh_logger::Config::defaults();
        logger_config.server = test_server(256);
        logger_config.database.url = db_url.to_owned();
        logger_config.batching.batch_size = 100;
        logger_config.batching.flush_interval = Duration::from_millis(20);
        let logger = start_logger(logger_config).await;
        let mut config = gateway_config(
            features.url(),
            inference.iter().map(Running::url).collect(),
            logger.url(),
        );
        config.lifecycle.registry.url = Some(db_url.to_owned());
        config.lifecycle.admin_keys =
            mesh_gateway::auth::parse_key_list("MESH_ADMIN_KEYS", &format!("ops:{ADMIN_KEY}"))
                .expect("admin key");
        let (gateway, gateway_http) = start_gateway_with_http(config).await;
        wait_replicas_ready(gateway_http, inference.len()).await;
        for addr in [features.addr, logger.addr, gateway.addr]
            .into_iter()
            .chain(inference.iter().map(|r| r.addr))
        {
            wait_serving(addr, Duration::from_secs(60)).await;
        }
        Self {
            features,
            inference,
            logger,
            gateway,
            gateway_http,
        }
    }

    /// A client of the features service.
    pub fn features_client(
        &self,
    ) -> mesh_proto::features::features_client::FeaturesClient<
        mesh_runtime::internal::InternalChannel,
    > {
        mesh_proto::features::features_client::FeaturesClient::new(internal_channel(
            self.features.addr,
        ))
    }
}

/// What one request of the load got.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// When it was sent.
    pub sent: Instant,
    /// The prediction id of an OK answer; the status otherwise.
    pub result: Result<String, tonic::Status>,
}

/// A steady load of `Predict` calls (the first `entities` demo entities in turn, the rest of
/// their features from the store), each with a 3 s deadline, until stopped. (The failovers are
/// under test, not latency: a debug build on a shared 2-core machine stalls now and then, and
/// the chaos suite measures latency on its own.)
pub struct Load {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<Outcome>>,
}

impl Load {
    /// Starts `per_second` requests a second against `gateway`.
    pub fn start(gateway: SocketAddr, per_second: u32, entities: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let client = GatewayClient::new(channel(gateway));
                let mut calls = Vec::new();
                let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let mut client = client.clone();
                    let entity = format!("cust-{:05}", i % entities + 1);
                    i += 1;
                    // Each call on its own task: a slow answer does not hold back the next.
                    calls.push(tokio::spawn(async move {
                        let sent = Instant::now();
                        let mut request = tonic::Request::new(PredictRequest {
                            model: "churn".into(),
                            entity_id: entity,
                            features: [
                                ("support_calls_30d".to_owned(), num(2.0)),
                                ("channel".to_owned(), cat("web")),
                            ]
                            .into(),
                            model_version: String::new(),
                        });
                        request.set_timeout(Duration::from_secs(3));
                        let result = client
                            .predict(request)
                            .await
                            .map(|r| r.into_inner().prediction_id);
                        Outcome { sent, result }
                    }));
                }
                let mut outcomes = Vec::new();
                for call in calls {
                    outcomes.push(call.await.expect("load call"));
                }
                outcomes
            }
        });
        Self { stop, task }
    }

    /// Stops sending and returns every request's outcome, in the order sent.
    pub async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("load task")
    }
}

/// Waits (at most `within`) until every id in `ids` is in `predictions` at `db_url`; returns
/// (distinct ids found, rows they make).
pub async fn wait_delivered(db_url: &str, ids: &[String], within: Duration) -> (i64, i64) {
    let until = Instant::now() + within;
    let mut last = (0, 0);
    while Instant::now() < until {
        if let Ok(Ok((db, connection))) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_postgres::connect(db_url, tokio_postgres::NoTls),
        )
        .await
        {
            tokio::spawn(connection);
            if let Ok(row) = db
                .query_one(
                    "SELECT count(DISTINCT prediction_id), count(*) FROM predictions WHERE prediction_id = ANY($1)",
                    &[&ids],
                )
                .await
            {
                last = (row.get(0), row.get(1));
                if last.0 == ids.len() as i64 {
                    return last;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    last
}
