//! What telemetry costs a request that writes no log line, before and after the log layer
//! stopped formatting span fields ([`mesh_telemetry::logs`]), measured in one process: the two
//! subscribers are built side by side and run alternately (A, B, A, B, A, B), each on the same
//! simulated request: a server span like `ServerTrace`'s, entered, its trace id read and recorded
//! on it (as `ServerTrace` and the gateway do); two client spans (features, inference) entered and closed.
//! Sampling as shipped (parent-based, 5 %), no exporter. Counts allocations with a counting
//! allocator. Run: `cargo run --release -p mesh-telemetry --example span_cost`.

#![allow(unsafe_code)] // the counting allocator below

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

struct Counting;
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const REQUESTS: u64 = 200_000;

fn request() -> usize {
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = "mesh.gateway.v1.Gateway/Predict",
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = "mesh.gateway.v1.Gateway",
        rpc.method = "Predict",
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    let _entered = span.enter();
    // As `ServerTrace` does (for log lines) and the gateway (for the answer).
    let id = mesh_telemetry::propagation::current_trace_id().unwrap_or_default();
    span.record("trace_id", id.as_str());
    for (service, method) in [
        ("mesh.features.v1.Features", "GetFeatures"),
        ("inference.GRPCInferenceService", "ModelInfer"),
    ] {
        let client = mesh_telemetry::propagation::client_span(service, method);
        let _client = client.enter();
        mesh_telemetry::propagation::record_client_status(&client, tonic::Code::Ok);
    }
    span.record("rpc.grpc.status_code", 0);
    id.len()
}

fn otel() -> impl tracing_subscriber::Layer<tracing_subscriber::Registry> {
    let provider = SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            0.05,
        ))))
        .build();
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("mesh"))
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
}

/// Nanoseconds and allocations per request under `dispatch`.
fn measure(dispatch: &tracing::Dispatch) -> (f64, f64) {
    tracing::dispatcher::with_default(dispatch, || {
        let mut sink = 0;
        for _ in 0..1_000 {
            sink += request();
        }
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let started = Instant::now();
        for _ in 0..REQUESTS {
            sink += request();
        }
        let elapsed = started.elapsed();
        let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
        std::hint::black_box(sink);
        (
            elapsed.as_nanos() as f64 / REQUESTS as f64,
            allocations as f64 / REQUESTS as f64,
        )
    })
}

fn main() {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    // Before: the fmt layer's JSON with the current span's fields in each line.
    let before = tracing::Dispatch::new(
        tracing_subscriber::registry().with(otel()).with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .with_writer(std::io::sink)
                .with_filter(EnvFilter::new("info")),
        ),
    );
    // After: the mesh's log layer (no spans; trace id looked up when a line is written).
    let after = tracing::Dispatch::new(tracing_subscriber::registry().with(otel()).with(
        mesh_telemetry::logs::layer(
            mesh_telemetry::LogFormat::Json,
            EnvFilter::new("info"),
            std::io::sink,
        ),
    ));
    println!("per request (server span, trace id, two client spans), {REQUESTS} requests a run");
    let mut ratios = Vec::new();
    for pair in 1..=3 {
        let (a_ns, a_alloc) = measure(&before);
        let (b_ns, b_alloc) = measure(&after);
        ratios.push(b_ns / a_ns);
        println!(
            "pair {pair}: before {a_ns:.0} ns, {a_alloc:.1} allocations; after {b_ns:.0} ns, {b_alloc:.1} allocations; after/before {:.3}",
            b_ns / a_ns
        );
    }
    println!(
        "after/before time per pair: {}",
        ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
