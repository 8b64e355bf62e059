//! Scratch directories for the services the tests start, and their removal once the test
//! process that made them is gone.

use std::path::{Path, PathBuf};

/// A new empty directory for this test process, under `mesh-tests-<pid>-<nanos>` in the system's
/// temporary directory.
///
/// Tests hand these to services that outlive the test's scope (a gateway's spool, a TLS key), so
/// nothing removes them when a test ends. Instead the first call in each process removes the
/// directories of test processes that are gone: a run leaves behind at most what its last test
/// processes made (a gateway's spool holds a 16 MiB spare segment while it runs).
pub fn scratch_dir(what: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    static PROCESS_DIR: OnceLock<PathBuf> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let parent = PROCESS_DIR.get_or_init(|| {
        remove_dirs_of_finished_tests();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        std::env::temp_dir().join(format!("mesh-tests-{}-{nanos}", std::process::id()))
    });
    let dir = parent.join(format!("{what}-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Removes `mesh-tests-<pid>-*` directories (and the older `mesh-test-<what>-<pid>-<n>-<nanos>`
/// ones) of processes that no longer run.
fn remove_dirs_of_finished_tests() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let pid = if let Some(rest) = name.strip_prefix("mesh-tests-") {
            rest.split('-').next()
        } else if name.starts_with("mesh-test-") {
            name.rsplit('-').nth(2)
        } else {
            None
        };
        let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
