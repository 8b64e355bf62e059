//! The spool's writes and syncs, behind a trait so tests can make them fail.
//!
//! A full disk, a failed `fsync` of a directory or a crash between two calls cannot be produced
//! safely on a shared machine or in CI; the spool's answer to each can. Production uses
//! [`RealDisk`]; unit tests use a `FaultyDisk` that records every call and fails the ones asked.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt as _;
use std::path::Path;

/// The calls whose failure or ordering decides what survives a crash.
pub trait Disk: Send + Sync {
    /// Writes all of `bytes` to `file` (at `path`).
    fn write(&self, file: &mut File, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let _ = path;
        file.write_all(bytes)
    }

    /// Writes all of `bytes` to `file` (at `path`) at position `offset`.
    fn write_at(&self, file: &File, path: &Path, bytes: &[u8], offset: u64) -> io::Result<()> {
        let _ = path;
        file.write_all_at(bytes, offset)
    }

    /// `fdatasync` of `file` (at `path`).
    fn sync_data(&self, file: &File, path: &Path) -> io::Result<()> {
        let _ = path;
        file.sync_data()
    }

    /// Renames `from` to `to` (atomic within a directory).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    /// `fsync` of the directory itself, so that names created, renamed or removed in it
    /// survive a crash.
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// The real file system.
pub struct RealDisk;

impl Disk for RealDisk {}

#[cfg(test)]
pub(crate) use faulty::FaultyDisk;

#[cfg(test)]
mod faulty {
    use std::fs::File;
    use std::io::{self, Write};
    use std::os::unix::fs::FileExt as _;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Mutex;

    use super::Disk;

    /// ENOSPC on Linux: what `write(2)` returns on a full disk.
    const ENOSPC: i32 = 28;

    /// A disk that records its calls (`write cursor.tmp`, `sync cursor.tmp`, `rename
    /// cursor.tmp cursor`, `sync-dir`) and fails the ones it is told to.
    #[derive(Default)]
    pub(crate) struct FaultyDisk {
        ops: Mutex<Vec<String>>,
        full: AtomicBool,
        dir_sync_failures: AtomicU32,
    }

    fn name(path: &Path) -> String {
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    impl FaultyDisk {
        /// While `full`, every write stores half its bytes and fails with ENOSPC, as a write
        /// to a full disk does.
        pub(crate) fn set_full(&self, full: bool) {
            self.full.store(full, Ordering::SeqCst);
        }

        /// The next `n` directory syncs fail with EIO.
        pub(crate) fn fail_dir_syncs(&self, n: u32) {
            self.dir_sync_failures.store(n, Ordering::SeqCst);
        }

        /// The calls made so far, and forgets them.
        pub(crate) fn take_ops(&self) -> Vec<String> {
            self.ops
                .lock()
                .map(|mut o| std::mem::take(&mut *o))
                .unwrap_or_default()
        }

        fn log(&self, op: String) {
            if let Ok(mut ops) = self.ops.lock() {
                ops.push(op);
            }
        }
    }

    impl Disk for FaultyDisk {
        fn write(&self, file: &mut File, path: &Path, bytes: &[u8]) -> io::Result<()> {
            self.log(format!("write {}", name(path)));
            if self.full.load(Ordering::SeqCst) {
                file.write_all(&bytes[..bytes.len() / 2])?;
                return Err(io::Error::from_raw_os_error(ENOSPC));
            }
            file.write_all(bytes)
        }

        fn write_at(&self, file: &File, path: &Path, bytes: &[u8], offset: u64) -> io::Result<()> {
            self.log(format!("write {}", name(path)));
            if self.full.load(Ordering::SeqCst) {
                file.write_all_at(&bytes[..bytes.len() / 2], offset)?;
                return Err(io::Error::from_raw_os_error(ENOSPC));
            }
            file.write_all_at(bytes, offset)
        }

        fn sync_data(&self, file: &File, path: &Path) -> io::Result<()> {
            self.log(format!("sync {}", name(path)));
            file.sync_data()
        }

        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            self.log(format!("rename {} {}", name(from), name(to)));
            std::fs::rename(from, to)
        }

        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            self.log("sync-dir".into());
            let failing = self
                .dir_sync_failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                return Err(io::Error::other("injected EIO on directory fsync"));
            }
            File::open(dir)?.sync_all()
        }
    }
}
