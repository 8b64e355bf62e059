//! The durable spool of prediction records: append-only segment files on local disk.
//!
//! Every byte ever appended has a global offset. A segment file is named after the offset of
//! its first byte (`00000000000000123456.spool`): an 8-byte header naming the format, then
//! frames back to back, each one encoded `PredictionRecord` with its length and a checksum over
//! both (see `frame` for the bytes). Appends are written and `fdatasync`ed in
//! groups (one sync for every record that arrived while the previous sync ran). A new segment
//! is synced, and so is the directory, before records go into it; a rotation that fails is
//! tried again at the next append. A new segment is, when one is ready, the spare: a file of
//! zeros made ahead of time (see `spare`), so the bytes after a segment's last frame may be
//! zeros. The file `cursor` holds the offset up to which the logger
//! has committed the records (see [`cursor`]); segments wholly before it are deleted.
//!
//! Recovery on open: segments before the cursor are removed, the rest are scanned, and a torn
//! tail (a frame cut short by a crash, or with a wrong checksum) is truncated from the newest
//! segment; zeros after the last frame are a clean end, not a torn tail. Records after the cursor are delivered again: the logger's insert is idempotent on
//! the prediction id, so a record acknowledged but not yet in the cursor is stored once. For
//! the same reason a missing or garbled cursor, or one behind the first segment (segments are
//! freed before the cursor is written, so that a full disk cannot keep them), only means
//! delivering again from the first segment.
//!
//! Segments of format 1 (no header; gateways before this format) are deleted if the cursor
//! says they were delivered; one holding undelivered records stops the open with an error
//! naming it: deliver it with the previous version first.
//!
//! A `lock` file held with an exclusive lock keeps two processes from sharing a spool.
//!
//! # Layout
//!
//! - `frame`: segment header and frame bytes; reading a frame, scanning a segment.
//! - [`cursor`]: the self-checking cursor file.
//! - [`disk`]: the writes and syncs, behind a trait for fault injection in tests.
//! - `spare`: the next segment, zero-filled ahead of time off the writer's path, so that an
//!   append's sync writes data only.
//! - `reader`: [`Reader`], the delivering side.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod cursor;
pub mod disk;
mod frame;
mod reader;
mod recover;
mod spare;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod spare_tests;
#[cfg(test)]
pub(crate) mod tests;

pub use cursor::Found as CursorFound;
pub use disk::{Disk, RealDisk};
pub use reader::{Frame, Reader};

use frame::{FRAME_HEADER, HEADER_LEN, SEGMENT_HEADER};

/// Bytes of a segment's header: the first record of the spool is at this offset.
pub const SEGMENT_HEADER_LEN: u64 = HEADER_LEN;

const SUFFIX: &str = ".spool";

fn segment_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{start:020}{SUFFIX}"))
}

/// Start offsets of the segment files in `dir`, ascending.
pub(crate) fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut starts = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(start) = name
            .strip_suffix(SUFFIX)
            .and_then(|s| s.parse::<u64>().ok())
        {
            starts.push(start);
        }
    }
    starts.sort_unstable();
    Ok(starts)
}

/// Deletes the segments wholly before `keep_from` (the segment the reader is in): their
/// records are committed by the logger. Does not depend on the cursor having been written.
/// Returns how many were deleted.
pub fn release(dir: &Path, keep_from: u64) -> io::Result<usize> {
    let mut deleted = 0;
    for start in segments(dir)? {
        if start < keep_from {
            fs::remove_file(segment_path(dir, start))?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Creates the segment starting at `start` with its header, synced with its directory entry.
/// A file left there by an earlier attempt never held a record, so it is started afresh.
fn create_segment(disk: &dyn Disk, dir: &Path, start: u64) -> io::Result<File> {
    let path = segment_path(dir, start);
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)?;
    start_segment(disk, dir, &path, file)
}

/// Makes the spare at `spare` the segment starting at `start` (see `spare`).
fn adopt_spare(disk: &dyn Disk, dir: &Path, spare: &Path, start: u64) -> io::Result<File> {
    let path = segment_path(dir, start);
    disk.rename(spare, &path)?;
    let file = OpenOptions::new().write(true).open(&path)?;
    start_segment(disk, dir, &path, file)
}

/// Writes the header of the new segment `file` at `path`, synced with its directory entry.
fn start_segment(disk: &dyn Disk, dir: &Path, path: &Path, file: File) -> io::Result<File> {
    disk.write_at(&file, path, &SEGMENT_HEADER, 0)?;
    disk.sync_data(&file, path)?;
    // The new name must survive a crash too.
    disk.sync_dir(dir)?;
    Ok(file)
}

/// The appending side, owned by one writer thread.
pub struct Spool {
    dir: PathBuf,
    disk: Arc<dyn Disk>,
    segment_bytes: u64,
    file: File,
    segment_start: u64,
    end: u64,
    /// A failed append left bytes after `end` that could not be cut off yet.
    torn_tail: bool,
    /// The next segment, made ahead (dropped, and so stopped, before the lock is released).
    spare: spare::Spare,
    _lock: File,
}

/// What [`Spool::open`] found.
pub struct Recovered {
    /// The spool, positioned to append.
    pub spool: Spool,
    /// Offset of the first record not yet acknowledged.
    pub cursor: u64,
    /// What the cursor file said (anything but valid means delivering again from the start).
    pub cursor_found: CursorFound,
    /// Records after the cursor (to be delivered).
    pub pending_records: u64,
    /// Bytes of torn or corrupt frames that were dropped.
    pub dropped_bytes: u64,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, recovering after a crash.
    pub fn open(dir: &Path, segment_bytes: u64, disk: Arc<dyn Disk>) -> io::Result<Recovered> {
        recover::open(dir, segment_bytes, disk)
    }

    /// Offset just past the last durable byte.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Waits until no spare is being made (tests that fill a disk: a spare being made holds
    /// space, and gives it back when it fails).
    #[cfg(test)]
    pub(super) fn settle_spare(&self) {
        self.spare.settle();
    }

    /// Bytes a record of `payload_len` takes on disk.
    pub fn frame_len(payload_len: usize) -> u64 {
        FRAME_HEADER + payload_len as u64
    }

    /// Appends `payloads` as frames and syncs them to disk; returns each frame's offset. On
    /// error nothing of this group counts as written, and the next append tries again from the
    /// same offset (a failed rotation included).
    pub fn append(&mut self, payloads: &[&[u8]]) -> io::Result<Vec<u64>> {
        if self.torn_tail {
            self.file.set_len(self.end - self.segment_start)?;
            self.torn_tail = false;
        }
        if self.end - self.segment_start >= self.segment_bytes {
            self.rotate()?;
        }
        let mut buf = Vec::with_capacity(payloads.iter().map(|p| p.len() + 8).sum());
        let mut offsets = Vec::with_capacity(payloads.len());
        for payload in payloads {
            offsets.push(self.end + buf.len() as u64);
            frame::encode(payload, &mut buf)?;
        }
        let path = segment_path(&self.dir, self.segment_start);
        let written = self
            .disk
            .write_at(&self.file, &path, &buf, self.end - self.segment_start)
            .and_then(|_| self.disk.sync_data(&self.file, &path));
        if let Err(e) = written {
            // Complete frames this write left after `end` must not be read as records by a
            // recovery: cut off (losing the rest of a spare's zeros, which only makes this
            // segment's later syncs slower).
            if self.file.set_len(self.end - self.segment_start).is_err() {
                self.torn_tail = true;
            }
            return Err(e);
        }
        self.end += buf.len() as u64;
        Ok(offsets)
    }

    /// Starts a new segment at the end: the spare if one is ready, else a new file. On failure
    /// the current one stays in use and the next append tries again (the half-made file is
    /// started afresh then).
    fn rotate(&mut self) -> io::Result<()> {
        let next = match self.spare.take() {
            // A spare removed by hand is not a reason to refuse records.
            Some(spare) => adopt_spare(&*self.disk, &self.dir, &spare, self.end).or_else(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    create_segment(&*self.disk, &self.dir, self.end)
                } else {
                    Err(e)
                }
            }),
            None => create_segment(&*self.disk, &self.dir, self.end),
        };
        self.spare.start();
        self.file = next?;
        self.segment_start = self.end;
        self.end += HEADER_LEN;
        Ok(())
    }
}
