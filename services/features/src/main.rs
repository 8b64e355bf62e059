//! `mesh-features`: the binary. Configuration: see the README's table.

use mesh_runtime::config::FromSettings;

/// mimalloc: glibc's malloc/free took 14-16 % of every service's CPU under load (README,
/// Benchmark); `--no-default-features` builds with the system allocator for A/B runs.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = mesh_features::Config::from_env()?;
    let _telemetry =
        mesh_telemetry::init(&mesh_telemetry::TelemetryConfig::from_env("mesh-features")?)?;
    let (listener, metrics) = mesh_runtime::server::bind(
        &config.server.listen_addr,
        config.server.metrics_addr.as_deref(),
    )
    .await?;
    let shutdown = mesh_runtime::server::shutdown_signal();
    mesh_features::serve(config, listener, metrics, shutdown).await?;
    Ok(())
}
