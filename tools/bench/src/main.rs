//! `mesh-bench`: load generator for the mesh.
//!
//! Drives `Gateway/Predict` or KServe `ModelInfer` either closed-loop (N workers, each sending
//! its next request when the last one answered) or open-loop (requests started at a fixed rate
//! whatever the answers do; latency is measured from the intended start, so a stall is not
//! hidden by coordinated omission). Bounded by a duration or a request count. Prints throughput,
//! p50/p90/p99/p99.9 latency (HDR histogram) and errors by status code, and writes the same as
//! JSON.
//!
//! For fault-injection runs (`mesh-chaos`): the target may be unreachable at start or during the
//! run (failures are counted and the load goes on); `--timeline` adds per-second buckets to the
//! report, `--ids-out` writes the prediction id of every OK Predict answer (`--versions-out`
//! the same ids with the `model_version` that scored each), `--requests-out`
//! writes one line per request, and `--stop-on-signal` lets SIGTERM/SIGINT end the run early
//! with a complete report. The report always carries `started_unix_ms`, the wall-clock start of
//! the measured run, to which `--timeline` seconds and `--requests-out` offsets are relative.
//!
//! `mesh-bench floor` serves the other side instead: the bare KServe server ([`floor`]) whose
//! throughput `make bench` divides the mesh's by.

mod cpu;
mod floor;
mod pace;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use mesh_proto::gateway::gateway_client::GatewayClient;
use mesh_proto::gateway::PredictRequest;
use mesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use mesh_proto::inference::model_infer_request::InferRequestedOutputTensor;
use mesh_proto::inference::ModelInferRequest;
use mesh_proto::types::{feature_value::Kind, FeatureValue};
use mesh_runtime::internal::{InternalChannel, InternalToken, WithToken};
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
        /// The mesh's internal token (inference answers no one without it).
        #[arg(long, env = "MESH_INTERNAL_TOKEN", hide_env_values = true, value_parser = parse_token)]
        internal_token: InternalToken,
        /// Rows per request.
        #[arg(long, default_value_t = 1)]
        rows: usize,
    },
    /// Serve the transport floor: a bare tonic KServe server that decodes each ModelInfer and
    /// answers a fixed tensor (no model, no middleware), until SIGTERM or Ctrl-C.
    Floor {
        /// Where to listen (loopback).
        #[arg(long, default_value = "127.0.0.1:50099")]
        listen: std::net::SocketAddr,
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
    /// Add per-second buckets to the report: requests started in that second, OK, OK within
    /// the deadline, errors by code, not accepted, client-side timeouts, p99 and max latency.
    #[arg(long, global = true)]
    timeline: bool,
    /// Write the prediction id of every OK Predict answer to this file, one per line.
    #[arg(long, global = true)]
    ids_out: Option<std::path::PathBuf>,
    /// Write `<prediction_id> <model_version>` of every OK Predict answer to this file, one per
    /// line (which version scored each answer, e.g. while versions are promoted).
    #[arg(long, global = true)]
    versions_out: Option<std::path::PathBuf>,
    /// Write one line per measured request to this file (flushed every 100 ms):
    /// `start_us latency_us code class` (code: gRPC status code number, 0 = OK; class: `server`
    /// (an answer from the server), `timeout` (the client's own deadline timer fired),
    /// `not_accepted` (never reached the server: connection refused, refused by HTTP/2 GOAWAY,
    /// or never handed to the connection), `transport` (any other local or connection
    /// failure)); local failures add their error chain, spaces replaced by `_`. The first line
    /// is `# started_unix_ms <ms> timeout_ms <ms>`.
    #[arg(long, global = true)]
    requests_out: Option<std::path::PathBuf>,
    /// End the run early on SIGTERM or SIGINT: stop starting requests, let those in flight
    /// finish, and write the report as usual.
    #[arg(long, global = true)]
    stop_on_signal: bool,
    /// Also report the CPU time per request of these processes on this machine, each with its
    /// child processes, over the measured run (`NAME=PID[,PID...]`, repeatable; the load generator's own is always
    /// reported, as `client`), under `cpu_us_per_request` with their `total`.
    #[arg(long = "cpu-of", global = true, value_name = "NAME=PID[,PID...]")]
    cpu_of: Vec<cpu::Watched>,
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
        Vec<GrpcInferenceServiceClient<InternalChannel>>,
        Arc<ModelInferRequest>,
    ),
}

/// How a request that did not get OK failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    /// The server answered with this status.
    Server,
    /// The client's own deadline timer fired first (no answer in time).
    Timeout,
    /// The request never reached a server: connection refused, or refused by an HTTP/2 GOAWAY
    /// (a stream above the GOAWAY's last stream id was, by RFC 9113 §6.8, not processed).
    NotAccepted,
    /// Any other local or connection-level failure (e.g. the connection broke mid-call).
    Transport,
}

impl Class {
    fn as_str(self) -> &'static str {
        match self {
            Class::Server => "server",
            Class::Timeout => "timeout",
            Class::NotAccepted => "not_accepted",
            Class::Transport => "transport",
        }
    }
}

/// A failed request: its status code, how it failed and, for local failures, why.
#[derive(Clone, Debug)]
struct Failure {
    code: tonic::Code,
    class: Class,
    /// The error chain of a local (non-server) failure; empty for server answers.
    detail: String,
}

impl Failure {
    fn of(status: &tonic::Status) -> Self {
        use std::error::Error as _;
        let code = status.code();
        // tonic's own deadline timer (the grpc-timeout we set is enforced locally too).
        if code == tonic::Code::Cancelled && status.message() == "Timeout expired" {
            return Self {
                code,
                class: Class::Timeout,
                detail: status.message().to_owned(),
            };
        }
        // A status parsed from the server's answer has no source; local failures have one.
        let Some(mut source) = status.source() else {
            return Self {
                code,
                class: Class::Server,
                detail: String::new(),
            };
        };
        let mut text = status.message().to_owned();
        let mut connect_error = false;
        loop {
            connect_error |= source.downcast_ref::<tonic::ConnectError>().is_some();
            text.push_str(" | ");
            text.push_str(&source.to_string());
            match source.source() {
                Some(next) => source = next,
                None => break,
            }
        }
        let not_accepted = connect_error
            || text.contains("REFUSED_STREAM")
            || text.contains("refused stream")
            || text.contains("Connection refused")
            // h2: streams above a GOAWAY's last stream id fail with the GOAWAY's reason.
            || text.contains("connection error received: not a result of an error")
            // hyper had not handed the request to the connection ("connection closed" /
            // "connection was not ready"): it was never sent.
            || text.contains("operation was canceled");
        Self {
            code,
            class: if not_accepted {
                Class::NotAccepted
            } else {
                Class::Transport
            },
            detail: text,
        }
    }
}

impl Caller {
    /// One request; the prediction id and the answering model version on a Predict OK.
    async fn call(&self, n: u64, timeout: Duration) -> Result<Option<Answer>, Failure> {
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
                    .map(|r| {
                        let r = r.into_inner();
                        Some(Answer {
                            id: r.prediction_id,
                            version: r.model_version,
                        })
                    })
                    .map_err(|s| Failure::of(&s))
            }
            Caller::Infer(clients, template) => {
                let mut client = clients[n as usize % clients.len()].clone();
                let mut request = tonic::Request::new((**template).clone());
                request.set_timeout(timeout);
                client
                    .model_infer(request)
                    .await
                    .map(|_| None)
                    .map_err(|s| Failure::of(&s))
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
    use mesh_tensor::{encode_input, Column};
    let num = |name: &str, v: f32| encode_input(name, Column::Numbers(vec![v; rows]));
    let cat =
        |name: &str, v: &str| encode_input(name, Column::Categories(vec![v.to_owned(); rows]));
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

/// One second of the timeline (by intended start).
#[derive(Default)]
struct Bucket {
    started: u64,
    ok: u64,
    ok_within_deadline: u64,
    not_accepted: u64,
    client_timeouts: u64,
    errors: BTreeMap<String, u64>,
    latencies_us: Vec<u64>,
}

/// Results gathered across workers.
struct Recorder {
    histogram: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    ok: AtomicU64,
    ok_within_deadline: AtomicU64,
    deadline: Duration,
    timeline: Option<Mutex<BTreeMap<u64, Bucket>>>,
    ids: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
    versions: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
    requests: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
}

/// What an OK Predict answer carried that the outputs record.
struct Answer {
    id: String,
    version: String,
}

fn create(path: &std::path::Path) -> anyhow::Result<std::io::BufWriter<std::fs::File>> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    Ok(std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?,
    ))
}

impl Recorder {
    fn new(deadline: Duration) -> anyhow::Result<Self> {
        Ok(Self {
            histogram: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
            errors: Mutex::new(BTreeMap::new()),
            ok: AtomicU64::new(0),
            ok_within_deadline: AtomicU64::new(0),
            deadline,
            timeline: None,
            ids: None,
            versions: None,
            requests: None,
        })
    }

    /// A recorder for the measured run, with the optional outputs of `load`.
    fn measured(load: &Load, started_unix_ms: u128) -> anyhow::Result<Self> {
        let mut recorder = Self::new(Duration::from_millis(load.timeout_ms))?;
        if load.timeline {
            recorder.timeline = Some(Mutex::new(BTreeMap::new()));
        }
        if let Some(path) = &load.ids_out {
            recorder.ids = Some(Mutex::new(create(path)?));
        }
        if let Some(path) = &load.versions_out {
            recorder.versions = Some(Mutex::new(create(path)?));
        }
        if let Some(path) = &load.requests_out {
            let mut out = create(path)?;
            writeln!(
                out,
                "# started_unix_ms {started_unix_ms} timeout_ms {}",
                load.timeout_ms
            )?;
            out.flush()?;
            recorder.requests = Some(Mutex::new(out));
        }
        Ok(recorder)
    }

    /// Records one request that started `offset` after the run began.
    fn record(&self, offset: Duration, latency: Duration, result: Result<Option<Answer>, Failure>) {
        if let Ok(mut h) = self.histogram.lock() {
            let _ = h.record((latency.as_micros() as u64).max(1));
        }
        let within = latency <= self.deadline;
        match &result {
            Ok(id) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                if within {
                    self.ok_within_deadline.fetch_add(1, Ordering::Relaxed);
                }
                if let (Some(ids), Some(answer)) = (&self.ids, id) {
                    if let Ok(mut ids) = ids.lock() {
                        let _ = writeln!(ids, "{}", answer.id);
                    }
                }
                if let (Some(versions), Some(answer)) = (&self.versions, id) {
                    if let Ok(mut versions) = versions.lock() {
                        let _ = writeln!(versions, "{} {}", answer.id, answer.version);
                    }
                }
            }
            Err(failure) => {
                if let Ok(mut e) = self.errors.lock() {
                    *e.entry(format!("{:?}", failure.code)).or_default() += 1;
                }
            }
        }
        if let Some(timeline) = &self.timeline {
            if let Ok(mut timeline) = timeline.lock() {
                let bucket = timeline.entry(offset.as_secs()).or_default();
                bucket.started += 1;
                bucket.latencies_us.push(latency.as_micros() as u64);
                match &result {
                    Ok(_) => {
                        bucket.ok += 1;
                        if within {
                            bucket.ok_within_deadline += 1;
                        }
                    }
                    Err(failure) => {
                        *bucket
                            .errors
                            .entry(format!("{:?}", failure.code))
                            .or_default() += 1;
                        match failure.class {
                            Class::NotAccepted => bucket.not_accepted += 1,
                            Class::Timeout => bucket.client_timeouts += 1,
                            Class::Server | Class::Transport => {}
                        }
                    }
                }
            }
        }
        if let Some(requests) = &self.requests {
            let (code, class, detail) = match &result {
                Ok(_) => (0, Class::Server, String::new()),
                Err(f) => (f.code as i32, f.class, f.detail.clone()),
            };
            // The detail of a local failure, on one line without spaces.
            let detail: String = detail
                .chars()
                .map(|c| if c.is_whitespace() { '_' } else { c })
                .take(200)
                .collect();
            if let Ok(mut out) = requests.lock() {
                let _ = writeln!(
                    out,
                    "{} {} {code} {}{}{detail}",
                    offset.as_micros(),
                    latency.as_micros(),
                    class.as_str(),
                    if detail.is_empty() { "" } else { " " },
                );
            }
        }
    }

    /// Flushes the files (periodically while running, and at the end).
    fn flush(&self) {
        for out in [&self.ids, &self.versions, &self.requests]
            .into_iter()
            .flatten()
        {
            if let Ok(mut out) = out.lock() {
                let _ = out.flush();
            }
        }
    }

    fn timeline_json(&self) -> Option<serde_json::Value> {
        let timeline = self.timeline.as_ref()?.lock().ok()?;
        Some(serde_json::Value::Array(
            timeline
                .iter()
                .map(|(second, b)| {
                    let mut sorted = b.latencies_us.clone();
                    sorted.sort_unstable();
                    let p99 = if sorted.is_empty() {
                        0
                    } else {
                        sorted[((sorted.len() as f64 * 0.99).ceil() as usize)
                            .clamp(1, sorted.len())
                            - 1]
                    };
                    serde_json::json!({
                        "second": second,
                        "started": b.started,
                        "ok": b.ok,
                        "ok_within_deadline": b.ok_within_deadline,
                        "errors": b.errors,
                        "not_accepted": b.not_accepted,
                        "client_timeouts": b.client_timeouts,
                        "p99_ms": p99 as f64 / 1000.0,
                        "max_ms": sorted.last().copied().unwrap_or(0) as f64 / 1000.0,
                    })
                })
                .collect(),
        ))
    }
}

fn parse_token(token: &str) -> Result<InternalToken, String> {
    InternalToken::new(token)
}

async fn connect(url: &str, connections: usize) -> anyhow::Result<Vec<Channel>> {
    let host = url.split("//").nth(1).unwrap_or(url);
    if !(host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]")) {
        anyhow::bail!("refusing to load {url}: mesh-bench only targets loopback addresses");
    }
    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(1));
        match endpoint.connect().await {
            Ok(channel) => channels.push(channel),
            Err(e) => {
                // Unreachable now: connect on first use and count failures as errors.
                eprintln!(
                    "mesh-bench: cannot connect to {url} yet ({}); going on, failures count as errors",
                    anyhow::Error::from(e)
                );
                channels.push(endpoint.connect_lazy());
            }
        }
    }
    Ok(channels)
}

/// Set once SIGTERM/SIGINT asked the run to end (with `--stop-on-signal`).
#[derive(Clone, Default)]
struct Stop {
    requested: Arc<AtomicBool>,
    notify: Arc<tokio::sync::Notify>,
}

impl Stop {
    fn requested(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }

    fn listen(&self) -> anyhow::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let stop = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            eprintln!("mesh-bench: stop requested; finishing requests in flight");
            stop.requested.store(true, Ordering::Relaxed);
            stop.notify.notify_waiters();
        });
        Ok(())
    }
}

/// Runs load for `duration` (or `limit` requests) and records into `recorder`.
async fn run(
    caller: &Caller,
    load: &Load,
    duration: Duration,
    limit: Option<u64>,
    recorder: Arc<Recorder>,
    stop: &Stop,
) -> anyhow::Result<Duration> {
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
    let flusher =
        (recorder.ids.is_some() || recorder.versions.is_some() || recorder.requests.is_some())
            .then(|| {
                let recorder = recorder.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        recorder.flush();
                    }
                })
            });
    match load.rate {
        None => {
            let workers = (0..load.concurrency.max(1)).map(|_| {
                let caller = caller.clone();
                let recorder = recorder.clone();
                let take = take.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    while Instant::now() < end && !stop.requested() {
                        let Some(n) = take() else { break };
                        let t = Instant::now();
                        let result = caller.call(n, timeout).await;
                        recorder.record(t - started, t.elapsed(), result);
                    }
                })
            });
            for w in futures::future::join_all(workers).await {
                let _ = w;
            }
        }
        Some(rate) => {
            // Paced on this task and spawned onto this (single-threaded, see `main`) runtime:
            // no thread but the runtime's wakes for a request.
            let caller = Arc::new(caller.clone());
            let outstanding = Arc::new(AtomicU64::new(0));
            let mut tasks = tokio::task::JoinSet::new();
            let (timeout_ms, max_outstanding) = (load.timeout_ms, load.max_outstanding);
            let paced = pace::open_loop(
                rate,
                started,
                end,
                || stop.requested(),
                |intended| {
                    let Some(n) = take() else { return false };
                    if outstanding.load(Ordering::Relaxed) >= max_outstanding {
                        recorder.record(
                            intended - started,
                            Duration::from_millis(timeout_ms),
                            Err(Failure {
                                code: tonic::Code::ResourceExhausted,
                                class: Class::Transport,
                                detail: "mesh-bench: --max-outstanding reached, not sent".into(),
                            }),
                        );
                        return true;
                    }
                    outstanding.fetch_add(1, Ordering::Relaxed);
                    let (caller, recorder, outstanding) =
                        (caller.clone(), recorder.clone(), outstanding.clone());
                    tasks.spawn(async move {
                        let result = caller.call(n, timeout).await;
                        recorder.record(intended - started, intended.elapsed(), result);
                        outstanding.fetch_sub(1, Ordering::Relaxed);
                    });
                    // Reap what finished, so a long run does not keep every task's result.
                    while tasks.try_join_next().is_some() {}
                    true
                },
            )
            .await;
            while tasks.join_next().await.is_some() {}
            paced.context("open-loop pacing (timerfd) failed")?;
        }
    }
    if let Some(flusher) = flusher {
        flusher.abort();
    }
    recorder.flush();
    Ok(started.elapsed())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // An open loop paces on the runtime's thread and its requests stay on it: one thread is
    // cheaper for the machine under test than two that wake each other (see `pace`). A closed
    // loop, and the floor server, get a thread per core: the floor's rate is what the mesh is
    // divided by, so it must not be held down by its client.
    let runtime = match cli.load.rate {
        Some(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
    };
    runtime.block_on(run_cli(cli))
}

async fn run_cli(cli: Cli) -> anyhow::Result<()> {
    let load = cli.load.clone();
    let stop = Stop::default();
    if load.stop_on_signal {
        stop.listen()?;
    }
    let (caller, target_name) = match &cli.target {
        Target::Floor { listen } => return floor::serve(*listen).await,
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
        Target::Infer {
            url,
            rows,
            internal_token,
        } => (
            Caller::Infer(
                connect(url, load.connections)
                    .await?
                    .into_iter()
                    .map(|c| WithToken::new(c, Some(internal_token)))
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
            Arc::new(Recorder::new(Duration::from_millis(load.timeout_ms))?),
            &stop,
        )
        .await?;
    }
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let recorder = Arc::new(Recorder::measured(&load, started_unix_ms)?);
    let cpu_before = cpu::Snapshot::take(&load.cpu_of);
    let elapsed = run(
        &caller,
        &load,
        Duration::from_secs_f64(load.duration),
        load.requests,
        recorder.clone(),
        &stop,
    )
    .await?;
    let cpu_after = cpu::Snapshot::take(&load.cpu_of);

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
    let mut report = serde_json::json!({
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
        "started_unix_ms": started_unix_ms as u64,
    });
    let cpu = cpu_before.per_request(&cpu_after, total);
    report["cpu_us_per_request"] = serde_json::json!(cpu);
    if let Some(timeline) = recorder.timeline_json() {
        report["ok_within_deadline"] = recorder.ok_within_deadline.load(Ordering::Relaxed).into();
        report["timeline"] = timeline;
    }
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
            if !cpu.is_empty() {
                println!(
                    "  CPU us per request: {}",
                    cpu.iter()
                        .map(|(k, v)| format!("{k} {v:.1}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
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
