//! What every service says about its process: CPU, memory, open file descriptors and threads
//! (the `prometheus` crate's process collector, `process_*`), and which build is running
//! (`mesh_build_info{version,service}` = 1).
//!
//! `process_start_time_seconds` changes when a service restarts, which is how the alert rules
//! see a crash loop without a supervisor's help.

use prometheus::{IntGaugeVec, Opts, Registry};

/// Registers the process collector and `mesh_build_info` for `service` in `registry`.
///
/// Several services may share one test process: each registry gets its own collector, and
/// they report the same process.
pub fn register(registry: &Registry, service: &str) -> prometheus::Result<()> {
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    let build_info = IntGaugeVec::new(
        Opts::new(
            "mesh_build_info",
            "Always 1; the labels say which build of which service is running",
        ),
        &["version", "service"],
    )?;
    build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION"), service])
        .set(1);
    registry.register(Box::new(build_info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_and_build_info_are_exported() {
        let registry = Registry::new();
        register(&registry, "gateway").expect("register");
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_threads",
            "process_start_time_seconds",
            "mesh_build_info",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} missing: {names:?}");
        }
    }
}
