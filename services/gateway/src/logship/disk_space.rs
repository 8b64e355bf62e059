//! `mesh_spool_disk_free_bytes` and `mesh_spool_disk_size_bytes`: the file system holding the
//! spool, measured (`statvfs`) when scraped; and `mesh_spool_max_bytes`, the spool's bound
//! (`MESH_SPOOL_MAX_BYTES`). The bound only holds if the disk has room for it: the disk is
//! shared, and when something else fills it, appends fail and records are refused (`io_error`).
//! Free space below what the spool may still grow by is the `MeshSpoolDiskFilling` alert.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::IntGauge;

/// The spool directory's file system, as gauges filled in at scrape time.
#[derive(Clone)]
pub struct SpoolDisk {
    dir: Arc<OnceLock<PathBuf>>,
    free: IntGauge,
    size: IntGauge,
    bound: IntGauge,
}

impl SpoolDisk {
    /// The collector; it reports nothing until [`SpoolDisk::watch`] names the directory.
    pub fn new() -> prometheus::Result<Self> {
        Ok(Self {
            dir: Arc::new(OnceLock::new()),
            free: IntGauge::new(
                "mesh_spool_disk_free_bytes",
                "Bytes available to the gateway on the spool directory's file system",
            )?,
            size: IntGauge::new(
                "mesh_spool_disk_size_bytes",
                "Size of the spool directory's file system",
            )?,
            bound: IntGauge::new(
                "mesh_spool_max_bytes",
                "MESH_SPOOL_MAX_BYTES: undelivered bytes the spool keeps before refusing records",
            )?,
        })
    }

    /// Measures the file system holding `dir` (a spool bounded at `max_bytes`) from now on.
    pub fn watch(&self, dir: &Path, max_bytes: u64) {
        self.bound.set(i64::try_from(max_bytes).unwrap_or(i64::MAX));
        let _ = self.dir.set(dir.to_path_buf());
    }
}

impl Collector for SpoolDisk {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.free.desc();
        descs.extend(self.size.desc());
        descs.extend(self.bound.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(dir) = self.dir.get() else {
            return Vec::new();
        };
        match space(dir) {
            Ok((free, size)) => {
                self.free.set(i64::try_from(free).unwrap_or(i64::MAX));
                self.size.set(i64::try_from(size).unwrap_or(i64::MAX));
                let mut families = self.free.collect();
                families.extend(self.size.collect());
                families.extend(self.bound.collect());
                families
            }
            Err(error) => {
                tracing::warn!(%error, dir = %dir.display(), "statvfs of the spool directory failed");
                Vec::new()
            }
        }
    }
}

/// Bytes available to an unprivileged process, and the size, of the file system holding `path`.
// The statvfs fields are u64 here but narrower on other targets, hence the casts.
#[allow(unsafe_code, clippy::unnecessary_cast)]
fn space(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `path` is NUL-terminated and outlives the call; `stat` points to memory valid for
    // one `statvfs`, which the call writes.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: zero-initialised (a valid `statvfs`), and filled by the successful call above.
    let stat = unsafe { stat.assume_init() };
    let block = stat.f_frsize as u64;
    Ok((stat.f_bavail as u64 * block, stat.f_blocks as u64 * block))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spool_file_system_is_measured_once_watched() {
        let disk = SpoolDisk::new().expect("gauges");
        assert!(disk.collect().is_empty(), "nothing before watch");
        let dir = std::env::temp_dir();
        disk.watch(&dir, 1 << 30);
        let families = disk.collect();
        assert_eq!(families.len(), 3);
        let (free, size) = space(&dir).expect("statvfs");
        assert!(size > 0 && free <= size, "free {free} of {size}");
        assert!(space(Path::new("/no/such/dir")).is_err());
    }
}
