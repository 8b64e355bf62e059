//! `mesh-bench`: load generator for the mesh.
//!
//! Drives `Gateway/Predict` or KServe `ModelInfer` either closed-loop (N workers, each sending
//! its next request when the last one answered) or open-loop (requests started at a fixed rate
//! whatever the answers do; latency is measured from the intended start, so a stall is not
//! hidden by coordinated omission). Bounded by a duration or a request count. Prints throughput,
//! p50/p90/p99/p99.9 latency (HDR histogram) and errors by status code, and writes the same as
//! JSON.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use mesh_proto::gateway::gateway_client::GatewayClient;
use mesh_proto::gateway::PredictRequest;
use mesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use mesh_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use mesh_proto::inference::{InferTensorContents, ModelInferRequest};
use mesh_proto::types::{feature_value::Kind, FeatureValue};
use tonic::transport::Channel;

#[derive(Parser)]
#[command(
    version,
    about = "Load generator for the model-serving mesh (loopback targets only)"
)]
struct Cli {
    #[command(subcommand)]
    target: Target,
    #[command(flatten)]
    load: Load,
}

#[derive(Subcommand, Clone)]
enum Target {
    /// `mesh.gateway.v1.Gateway/Predict`, one entity per request.
    Predict {
        /// Gateway address.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        url: String,
        /// Entities cycled through (cust-00001 …).
        #[arg(long, default_value_t = 1000)]
        entities: usize,
    },
    /// `inference.GRPCInferenceService/ModelInfer` directly.
    Infer {
        /// Inference replica address.
        #[arg(long, default_value = "http://127.0.0.1:50053")]
        url: String,
        /// Rows per request.
        #[arg(long, default_value_t = 1)]
        rows: usize,
    },
}

#[derive(clap::Args, Clone)]
struct Load {
    /// Closed loop with this many concurrent workers (ignored when --rate is given).
    #[arg(long, global = true, default_value_t = 32)]
    concurrency: usize,
    /// Open loop: requests started per second.
    #[arg(long, global = true)]
    rate: Option<u64>,
    /// How long to run, in seconds.
    #[arg(long, global = true, default_value_t = 20.0)]
    duration: f64,
    /// Stop after this many requests instead (whichever comes first).
    #[arg(long, global = true)]
    requests: Option<u64>,
    /// Seconds of unrecorded warm-up load before measuring.
    #[arg(long, global = true, default_value_t = 2.0)]
    warmup: f64,
    /// Deadline of each request in milliseconds (sent as grpc-timeout).
    #[arg(long, global = true, default_value_t = 250)]
    timeout_ms: u64,
    /// HTTP/2 connections to spread requests over.
    #[arg(long, global = true, default_value_t = 4)]
    connections: usize,
    /// Open loop: most requests outstanding at once (bounds memory if the target stalls).
    #[arg(long, global = true, default_value_t = 20_000)]
    max_outstanding: u64,
    /// Where to write the JSON report.
    #[arg(long, global = true)]
    output: Option<std::path::PathBuf>,
    /// A label for the report.
    #[arg(long, global = true, default_value = "")]
    name: String,
    /// Output format on stdout.
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

/// What one request does.
#[derive(Clone)]
enum Caller {
    Predict(Vec<GatewayClient<Channel>>, usize),
    Infer(
        Vec<GrpcInferenceServiceClient<Channel>>,
        Arc<ModelInferRequest>,
    ),
}

impl Caller {
    async fn call(&self, n: u64, timeout: Duration) -> Result<(), tonic::Code> {
        match self {
            Caller::Predict(clients, entities) => {
                let mut client = clients[n as usize % clients.len()].clone();
                let mut request = tonic::Request::new(PredictRequest {
                    model: "churn".into(),
                    entity_id: format!("cust-{:05}", n as usize % entities + 1),
                    features: [
                        (
                            "support_calls_30d".to_owned(),
                            Kind::Number((n % 11) as f64),
                        ),
                        (
                            "channel".to_owned(),
                            Kind::Category(["web", "mobile", "store"][n as usize % 3].into()),
                        ),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k, FeatureValue { kind: Some(v) }))
                    .collect(),
                    model_version: String::new(),
                });
                request.set_timeout(timeout);
                client
                    .predict(request)
                    .await
                    .map(|_| ())
                    .map_err(|s| s.code())
            }
            Caller::Infer(clients, template) => {
                let mut client = clients[n as usize % clients.len()].clone();
                let mut request = tonic::Request::new((**template).clone());
                request.set_timeout(timeout);
                client
                    .model_infer(request)
                    .await
                    .map(|_| ())
                    .map_err(|s| s.code())
            }
        }
    }

    fn rows(&self) -> u64 {
        match self {
            Caller::Predict(..) => 1,
            Caller::Infer(_, t) => t
                .inputs
                .first()
                .and_then(|i| i.shape.first())
                .copied()
                .unwrap_or(1) as u64,
        }
    }
}

fn infer_template(rows: usize) -> ModelInferRequest {
    let num = |name: &str, v: f32| InferInputTensor {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![rows as i64, 1],
        parameters: Default::default(),
        contents: Some(InferTensorContents {
            fp32_contents: vec![v; rows],
            ..Default::default()
        }),
    };
    let cat = |name: &str, v: &str| InferInputTensor {
        name: name.into(),
        datatype: "BYTES".into(),
        shape: vec![rows as i64, 1],
        parameters: Default::default(),
        contents: Some(InferTensorContents {
            bytes_contents: vec![v.as_bytes().to_vec(); rows],
            ..Default::default()
        }),
    };
    ModelInferRequest {
        model_name: "churn".into(),
        model_version: String::new(),
        id: String::new(),
        parameters: Default::default(),
        inputs: vec![
            num("tenure_months", 12.0),
            num("monthly_charges", 70.35),
            num("total_charges", 850.2),
            cat("contract", "one_year"),
            cat("payment_method", "card"),
            cat("internet_service", "fiber"),
            num("support_calls_30d", 2.0),
            cat("channel", "web"),
        ],
        outputs: vec![InferRequestedOutputTensor {
            name: "probabilities".into(),
            parameters: Default::default(),
        }],
        raw_input_contents: Vec::new(),
    }
}

/// Results gathered across workers.
struct Recorder {
    histogram: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    ok: AtomicU64,
}

impl Recorder {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            histogram: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
            errors: Mutex::new(BTreeMap::new()),
            ok: AtomicU64::new(0),
        })
    }

    fn record(&self, latency: Duration, result: Result<(), tonic::Code>) {
        if let Ok(mut h) = self.histogram.lock() {
            let _ = h.record((latency.as_micros() as u64).max(1));
        }
        match result {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(code) => {
                if let Ok(mut e) = self.errors.lock() {
                    *e.entry(format!("{code:?}")).or_default() += 1;
                }
            }
        }
    }
}

async fn connect(url: &str, connections: usize) -> anyhow::Result<Vec<Channel>> {
    let host = url.split("//").nth(1).unwrap_or(url);
    if !(host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]")) {
        anyhow::bail!("refusing to load {url}: mesh-bench only targets loopback addresses");
    }
    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        channels.push(
            tonic::transport::Endpoint::from_shared(url.to_owned())?
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("cannot connect to {url}"))?,
        );
    }
    Ok(channels)
}

/// Runs load for `duration` (or `limit` requests) and records into `recorder`.
async fn run(
    caller: &Caller,
    load: &Load,
    duration: Duration,
    limit: Option<u64>,
    recorder: Arc<Recorder>,
) -> Duration {
    let timeout = Duration::from_millis(load.timeout_ms);
    let started = Instant::now();
    let end = started + duration;
    let sent = Arc::new(AtomicU64::new(0));
    let take = {
        let sent = sent.clone();
        move || {
            let n = sent.fetch_add(1, Ordering::Relaxed);
            match limit {
                Some(l) if n >= l => None,
                _ => Some(n),
            }
        }
    };
    match load.rate {
        None => {
            let workers = (0..load.concurrency.max(1)).map(|_| {
                let caller = caller.clone();
                let recorder = recorder.clone();
                let take = take.clone();
                tokio::spawn(async move {
                    while Instant::now() < end {
                        let Some(n) = take() else { break };
                        let t = Instant::now();
                        let result = caller.call(n, timeout).await;
                        recorder.record(t.elapsed(), result);
                    }
                })
            });
            for w in futures::future::join_all(workers).await {
                let _ = w;
            }
        }
        Some(rate) => {
            let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            let outstanding = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::new();
            let mut k: u64 = 0;
            loop {
                // Each request has an intended start on a fixed schedule.
                let intended = started + interval.mul_f64(k as f64);
                if intended >= end {
                    break;
                }
                tokio::time::sleep_until(tokio::time::Instant::from_std(intended)).await;
                let Some(n) = take() else { break };
                k += 1;
                if outstanding.load(Ordering::Relaxed) >= load.max_outstanding {
                    recorder.record(
                        Duration::from_millis(load.timeout_ms),
                        Err(tonic::Code::ResourceExhausted),
                    );
                    continue;
                }
                outstanding.fetch_add(1, Ordering::Relaxed);
                let caller = caller.clone();
                let recorder = recorder.clone();
                let outstanding = outstanding.clone();
                tasks.push(tokio::spawn(async move {
                    let result = caller.call(n, timeout).await;
                    recorder.record(intended.elapsed(), result);
                    outstanding.fetch_sub(1, Ordering::Relaxed);
                }));
                if tasks.len() > 4096 {
                    tasks.retain(|t| !t.is_finished());
                }
            }
            for t in tasks {
                let _ = t.await;
            }
        }
    }
    started.elapsed()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let load = cli.load.clone();
    let (caller, target_name) = match &cli.target {
        Target::Predict { url, entities } => (
            Caller::Predict(
                connect(url, load.connections)
                    .await?
                    .into_iter()
                    .map(GatewayClient::new)
                    .collect(),
                (*entities).max(1),
            ),
            "predict".to_owned(),
        ),
        Target::Infer { url, rows } => (
            Caller::Infer(
                connect(url, load.connections)
                    .await?
                    .into_iter()
                    .map(|c| GrpcInferenceServiceClient::new(c).max_decoding_message_size(64 << 20))
                    .collect(),
                Arc::new(infer_template((*rows).max(1))),
            ),
            format!("infer-{}rows", rows),
        ),
    };
    let mode = match load.rate {
        Some(r) => format!("open-loop {r}/s"),
        None => format!("closed-loop c={}", load.concurrency),
    };
    eprintln!(
        "mesh-bench: {target_name}, {mode}, warm-up {}s, then {}s",
        load.warmup, load.duration
    );
    if load.warmup > 0.0 {
        run(
            &caller,
            &load,
            Duration::from_secs_f64(load.warmup),
            None,
            Arc::new(Recorder::new()?),
        )
        .await;
    }
    let recorder = Arc::new(Recorder::new()?);
    let elapsed = run(
        &caller,
        &load,
        Duration::from_secs_f64(load.duration),
        load.requests,
        recorder.clone(),
    )
    .await;

    let histogram = recorder
        .histogram
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let errors = recorder
        .errors
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let ok = recorder.ok.load(Ordering::Relaxed);
    let total = histogram.len();
    let secs = elapsed.as_secs_f64();
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let report = serde_json::json!({
        "name": if load.name.is_empty() { format!("{target_name} {mode}") } else { load.name.clone() },
        "target": target_name,
        "mode": mode,
        "concurrency": load.rate.is_none().then_some(load.concurrency),
        "rate": load.rate,
        "timeout_ms": load.timeout_ms,
        "duration_s": secs,
        "requests": total,
        "ok": ok,
        "errors": errors,
        "throughput_rps": total as f64 / secs,
        "ok_rps": ok as f64 / secs,
        "rows_per_s": (ok * caller.rows()) as f64 / secs,
        "latency_ms": {
            "p50": ms(0.50), "p90": ms(0.90), "p99": ms(0.99), "p99_9": ms(0.999),
            "max": histogram.max() as f64 / 1000.0, "mean": histogram.mean() / 1000.0,
        },
    });
    if let Some(path) = &load.output {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    match load.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Text => {
            println!("{} — {}", report["name"].as_str().unwrap_or_default(), mode);
            println!(
                "  requests {total} in {secs:.1}s: {:.0} req/s ({:.0} ok/s, {:.0} rows/s)",
                total as f64 / secs,
                ok as f64 / secs,
                (ok * caller.rows()) as f64 / secs
            );
            println!(
                "  latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
                ms(0.5),
                ms(0.9),
                ms(0.99),
                ms(0.999),
                histogram.max() as f64 / 1000.0
            );
            if errors.is_empty() {
                println!("  errors: none");
            } else {
                println!(
                    "  errors: {}",
                    errors
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
    }
    Ok(())
}
