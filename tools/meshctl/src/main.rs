//! `meshctl`: operator commands for the mesh.
//!
//! - `seed`: loads entities' features from a JSON-lines file through `Features/PutFeatures`.
//! - `predict`: sends one `Gateway/Predict` and prints the answer.
//! - `health`: exits 0 iff a server's `grpc.health.v1` says SERVING (container health checks).
//! - `models`: list, status, promote, rollback, rollout, shadow, history ([`models`]).

mod drift;
mod models;

use std::collections::HashMap;
use std::io::BufRead as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use mesh_proto::features::features_client::FeaturesClient;
use mesh_proto::features::{EntityFeatures, PutFeaturesRequest};
use mesh_proto::gateway::gateway_client::GatewayClient;
use mesh_proto::gateway::PredictRequest;
use mesh_proto::types::{feature_value::Kind, FeatureTier, FeatureValue};

#[derive(Parser)]
#[command(version, about = "Operator commands for the model-serving mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Model lifecycle through the gateway's admin API: list, status, promote, rollback,
    /// rollout, shadow, history; and drift from the prediction log.
    Models(models::Admin),
    /// Load entity features from a JSON-lines file:
    /// {"entity_id": "cust-1", "features": {"tenure_months": 12, "contract": "one_year"}}
    Seed {
        /// The features service.
        #[arg(
            long,
            env = "MESH_FEATURES_URL",
            default_value = "http://127.0.0.1:50052"
        )]
        features_url: String,
        /// The JSON-lines file.
        #[arg(long, default_value = "data/demo_entities.jsonl")]
        file: PathBuf,
        /// Entities per PutFeatures call.
        #[arg(long, default_value_t = 200)]
        batch: usize,
        /// The mesh's internal token (the features service answers no one without it).
        #[arg(long, env = "MESH_INTERNAL_TOKEN", hide_env_values = true)]
        internal_token: String,
    },
    /// Send one prediction and print the answer as JSON.
    Predict {
        /// The gateway.
        #[arg(
            long,
            env = "MESH_GATEWAY_URL",
            default_value = "http://127.0.0.1:50051"
        )]
        gateway_url: String,
        /// Model name.
        #[arg(long, default_value = "churn")]
        model: String,
        /// Entity id.
        #[arg(long, default_value = "cust-00001")]
        entity: String,
        /// A request-time feature, NAME=VALUE (numbers are numbers, anything else a category).
        #[arg(long = "feature", value_name = "NAME=VALUE")]
        features: Vec<String>,
        /// Deadline in milliseconds.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// API key, sent as x-api-key (needed when the gateway has MESH_API_KEYS).
        #[arg(long, env = "MESH_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
    /// Exit 0 if the server reports SERVING, 1 otherwise.
    Health {
        /// The server.
        #[arg(long)]
        url: String,
        /// A service name; empty means the server as a whole.
        #[arg(long, default_value = "")]
        service: String,
        /// Keep asking until SERVING or this many seconds have passed.
        #[arg(long, default_value_t = 0)]
        wait_secs: u64,
    },
}

#[derive(serde::Deserialize)]
struct SeedLine {
    entity_id: String,
    features: HashMap<String, serde_json::Value>,
}

fn feature_value(name: &str, value: &serde_json::Value) -> anyhow::Result<FeatureValue> {
    let kind = match value {
        serde_json::Value::Number(n) => Kind::Number(
            n.as_f64()
                .with_context(|| format!("feature {name}: {n} is not a float"))?,
        ),
        serde_json::Value::String(s) => Kind::Category(s.clone()),
        other => bail!("feature {name}: {other} is neither a number nor a string"),
    };
    Ok(FeatureValue { kind: Some(kind) })
}

async fn seed(
    features_url: String,
    file: PathBuf,
    batch: usize,
    internal_token: String,
) -> anyhow::Result<()> {
    let reader = std::io::BufReader::new(
        std::fs::File::open(&file).with_context(|| format!("cannot open {}", file.display()))?,
    );
    let mut entities = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: SeedLine = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not a seed line", file.display(), n + 1))?;
        let features = parsed
            .features
            .iter()
            .map(|(k, v)| Ok((k.clone(), feature_value(k, v)?)))
            .collect::<anyhow::Result<_>>()
            .with_context(|| format!("{}:{}", file.display(), n + 1))?;
        entities.push(EntityFeatures {
            entity_id: parsed.entity_id,
            found: true,
            features,
            tier: FeatureTier::Unspecified as i32,
        });
    }
    let token = mesh_runtime::internal::InternalToken::new(&internal_token)
        .map_err(|problem| anyhow::anyhow!("--internal-token / MESH_INTERNAL_TOKEN {problem}"))?;
    let channel = tonic::transport::Endpoint::from_shared(features_url.clone())?
        .connect()
        .await
        .with_context(|| format!("cannot reach the features service at {features_url}"))?;
    let mut client = FeaturesClient::new(mesh_runtime::internal::WithToken::new(
        channel,
        Some(&token),
    ));
    let mut written = 0;
    let total = entities.len();
    for chunk in entities.chunks(batch.max(1)) {
        let mut request = tonic::Request::new(PutFeaturesRequest {
            entities: chunk.to_vec(),
        });
        request.set_timeout(Duration::from_secs(10));
        let response = client.put_features(request).await?.into_inner();
        written += response.entities_written as usize;
        eprintln!("seeded {written}/{total} entities");
    }
    println!("seeded {written} entities from {}", file.display());
    Ok(())
}

async fn predict(
    gateway_url: String,
    model: String,
    entity: String,
    features: Vec<String>,
    timeout_ms: u64,
    api_key: Option<String>,
) -> anyhow::Result<()> {
    let mut parsed = HashMap::new();
    for f in features {
        let (name, value) = f
            .split_once('=')
            .with_context(|| format!("--feature {f:?}: expected NAME=VALUE"))?;
        let kind = match value.parse::<f64>() {
            Ok(n) => Kind::Number(n),
            Err(_) => Kind::Category(value.to_owned()),
        };
        parsed.insert(name.to_owned(), FeatureValue { kind: Some(kind) });
    }
    let mut client = GatewayClient::connect(gateway_url.clone())
        .await
        .with_context(|| format!("cannot reach the gateway at {gateway_url}"))?;
    let mut request = tonic::Request::new(PredictRequest {
        model,
        entity_id: entity,
        features: parsed,
        model_version: String::new(),
    });
    request.set_timeout(Duration::from_millis(timeout_ms));
    if let Some(key) = api_key {
        request.metadata_mut().insert(
            "x-api-key",
            key.parse().context("--api-key is not valid metadata")?,
        );
    }
    match client.predict(request).await {
        Ok(response) => {
            let r = response.into_inner();
            let tier = FeatureTier::try_from(r.feature_tier)
                .map(|t| t.as_str_name())
                .unwrap_or("?");
            println!(
                "{}",
                serde_json::json!({
                    "prediction_id": r.prediction_id,
                    "model": r.model,
                    "model_version": r.model_version,
                    "score": r.score,
                    "feature_tier": tier,
                    "trace_id": r.trace_id,
                    "degraded": r.degraded,
                })
            );
            Ok(())
        }
        Err(status) => bail!("{:?}: {}", status.code(), status.message()),
    }
}

async fn health(url: String, service: String, wait_secs: u64) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(wait_secs);
    loop {
        let status = async {
            let channel = tonic::transport::Endpoint::from_shared(url.clone())?
                .connect_timeout(Duration::from_secs(1))
                .connect()
                .await?;
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
            let mut request = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
                service: service.clone(),
            });
            request.set_timeout(Duration::from_secs(1));
            let response = client.check(request).await?.into_inner();
            anyhow::Ok(response.status())
        }
        .await;
        match status {
            Ok(tonic_health::pb::health_check_response::ServingStatus::Serving) => {
                println!("SERVING");
                return Ok(());
            }
            other if std::time::Instant::now() >= deadline => {
                match other {
                    Ok(s) => println!("{}", s.as_str_name()),
                    Err(e) => println!("UNREACHABLE: {e}"),
                }
                std::process::exit(1);
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Seed {
            features_url,
            file,
            batch,
            internal_token,
        } => seed(features_url, file, batch, internal_token).await,
        Command::Predict {
            gateway_url,
            model,
            entity,
            features,
            timeout_ms,
            api_key,
        } => predict(gateway_url, model, entity, features, timeout_ms, api_key).await,
        Command::Health {
            url,
            service,
            wait_secs,
        } => health(url, service, wait_secs).await,
        Command::Models(admin) => admin.run().await,
    }
}
