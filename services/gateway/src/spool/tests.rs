//! Unit tests of the spool: order, recovery, the cursor, and the disk failing under it.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::disk::FaultyDisk;
use super::*;

pub(crate) fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("mesh-spool-{name}-{}", uuid::Uuid::now_v7()));
    fs::create_dir_all(&dir).expect("temp dir");
    TempDir(dir)
}

/// A test's spool directory, removed when the test ends (declared before the spool, it is
/// dropped after it, so no spare thread is still writing into it).
pub(crate) struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Opens the spool, retrying for up to 2 s while its lock is held. Other tests of this binary
/// spawn programs (`mount`, `umount`): between fork and exec such a child holds a copy of every
/// descriptor, this spool's `flock`ed one included, so a reopen right after a drop can find the
/// lock taken for a moment (seen once on a loaded machine). A lock that stays taken still fails.
fn open(dir: &Path, segment_bytes: u64) -> Recovered {
    let started = std::time::Instant::now();
    loop {
        match Spool::open(dir, segment_bytes, Arc::new(RealDisk)) {
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && started.elapsed() < std::time::Duration::from_secs(2) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other.expect("open"),
        }
    }
}

fn payloads(range: std::ops::Range<u32>) -> Vec<Vec<u8>> {
    range.map(|i| format!("record-{i}").into_bytes()).collect()
}

fn append(spool: &mut Spool, range: std::ops::Range<u32>) -> std::io::Result<Vec<u64>> {
    let p = payloads(range);
    spool.append(&p.iter().map(|p| p.as_slice()).collect::<Vec<_>>())
}

pub(crate) fn read_all(dir: &Path, cursor: u64, end: u64) -> Vec<String> {
    let mut reader = Reader::new(dir, cursor).expect("reader");
    let (frames, skipped) = reader.read(end, usize::MAX).expect("read");
    assert_eq!(skipped, 0);
    frames
        .into_iter()
        .map(|f| String::from_utf8(f.payload).expect("utf8"))
        .collect()
}

fn names(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("record-{i}")).collect()
}

#[test]
fn records_are_read_back_in_order_across_segments_and_after_reopening() {
    let dir = temp_dir("order");
    let mut spool = open(&dir, 64).spool;
    for chunk in [0..5, 5..9, 9..20] {
        append(&mut spool, chunk).expect("append");
    }
    let end = spool.end();
    assert!(
        segments(&dir).expect("list").len() >= 3,
        "small segments rotate"
    );
    assert_eq!(read_all(&dir, 0, end), names(0..20));

    // Acknowledge the first 7; reopening delivers the rest, and keeps appending after them.
    let mut reader = Reader::new(&dir, 0).expect("reader");
    let (first, _) = reader.read(end, 7).expect("read");
    assert_eq!(first.len(), 7);
    release(&dir, reader.segment_start()).expect("release");
    cursor::write(&RealDisk, &dir, reader.position()).expect("cursor");
    drop(spool);
    let recovered = open(&dir, 64);
    assert_eq!(recovered.pending_records, 13);
    assert_eq!(recovered.cursor, reader.position());
    assert_eq!(
        recovered.cursor_found,
        CursorFound::Valid(reader.position())
    );
    let mut spool = recovered.spool;
    append(&mut spool, 20..21).expect("append");
    assert_eq!(read_all(&dir, recovered.cursor, spool.end()), names(7..21));
}

#[test]
fn a_torn_tail_is_cut_off_and_appending_resumes_after_the_last_good_record() {
    let dir = temp_dir("torn");
    let mut spool = open(&dir, 1 << 20).spool;
    append(&mut spool, 0..3).expect("append");
    let good = spool.end();
    drop(spool);
    // A crash in the middle of the next write: a header promising more than was written.
    let path = segment_path(&dir, 0);
    let mut file = OpenOptions::new().append(true).open(&path).expect("open");
    file.write_all(&100u32.to_le_bytes()).expect("write");
    file.write_all(&[1, 2, 3, 4, 5, 6]).expect("write");
    drop(file);

    let recovered = open(&dir, 1 << 20);
    assert_eq!(recovered.pending_records, 3);
    assert_eq!(recovered.dropped_bytes, 10);
    assert_eq!(recovered.spool.end(), good);
    let mut spool = recovered.spool;
    append(&mut spool, 3..4).expect("append");
    assert_eq!(read_all(&dir, 0, spool.end()), names(0..4));
}

#[test]
fn a_spool_in_use_cannot_be_opened_twice() {
    let dir = temp_dir("lock");
    let first = open(&dir, 1 << 20);
    let second = Spool::open(&dir, 1 << 20, Arc::new(RealDisk));
    assert!(
        matches!(&second, Err(e) if e.to_string().contains("in use by another process")),
        "second open must fail"
    );
    drop(first);
    // Free once closed (`open` panics if the lock stays taken).
    let _reopened = open(&dir, 1 << 20);
}

/// Review item 1. The sequence of calls is observed through the fault-injection disk: whether
/// an `fsync` happened cannot be seen from the file system without crashing the machine.
#[test]
fn the_cursor_is_synced_then_renamed_then_its_directory_synced() {
    let dir = temp_dir("cursor-sync");
    let disk = FaultyDisk::default();
    cursor::write(&disk, &dir, 4242).expect("cursor");
    assert_eq!(
        disk.take_ops(),
        [
            "write cursor.tmp",
            "sync cursor.tmp",
            "rename cursor.tmp cursor",
            "sync-dir"
        ]
    );
    assert_eq!(cursor::read(&dir), CursorFound::Valid(4242));
}

/// Review item 2: a garbled cursor is recognised (not read as an offset), start-up goes on,
/// and everything in the spool is pending again (the logger stores a redelivered record once).
#[test]
fn a_garbled_or_missing_cursor_does_not_stop_the_open_and_delivery_restarts_at_the_first_segment() {
    let dir = temp_dir("garbled");
    let mut spool = open(&dir, 64).spool;
    append(&mut spool, 0..10).expect("append");
    let end = spool.end();
    cursor::write(&RealDisk, &dir, end).expect("cursor");
    drop(spool);
    for (garbage, expected) in [
        (&b"spool-cursor 2 123 deadbeef\n"[..], "garbled"),
        (&b"\0\0\0\0\0\0\0\0"[..], "garbled"),
        (&b"\xff\xfe"[..], "garbled"),
    ] {
        fs::write(dir.join("cursor"), garbage).expect("garble");
        let recovered = open(&dir, 64);
        assert!(
            matches!(recovered.cursor_found, CursorFound::Garbled(_)),
            "{expected}"
        );
        assert_eq!(recovered.pending_records, 10, "all pending again");
        assert_eq!(read_all(&dir, recovered.cursor, end), names(0..10));
    }
    fs::remove_file(dir.join("cursor")).expect("remove");
    let recovered = open(&dir, 64);
    assert_eq!(recovered.cursor_found, CursorFound::Missing);
    assert_eq!(recovered.pending_records, 10);
}

/// Review item 3, at the spool: a fault injection at the write call (this machine cannot
/// safely fill a disk in CI). A write to a full disk fails with ENOSPC after storing part of
/// the group; nothing of it counts, the cursor cannot be written but delivered segments are
/// still freed, and once there is space again appends resume at the right offsets.
#[test]
fn a_full_disk_refuses_appends_frees_delivered_segments_and_recovers_when_space_returns() {
    let dir = temp_dir("enospc");
    let disk = Arc::new(FaultyDisk::default());
    let mut spool = Spool::open(&dir, 64, disk.clone()).expect("open").spool;
    for i in 0..10 {
        append(&mut spool, i..i + 1).expect("append");
    }
    let before = spool.end();
    disk.set_full(true);
    let error = append(&mut spool, 10..12).expect_err("disk full");
    assert_eq!(error.kind(), std::io::ErrorKind::StorageFull);
    assert_eq!(spool.end(), before, "nothing of the failed group counts");

    // Everything so far is delivered: the segments go although the cursor cannot be written.
    let mut reader = Reader::new(&dir, 0).expect("reader");
    let (frames, _) = reader.read(before, usize::MAX).expect("read");
    assert_eq!(frames.len(), 10);
    let freed = release(&dir, reader.segment_start()).expect("release");
    assert!(
        freed >= 2,
        "delivered segments freed on a full disk: {freed}"
    );
    assert!(cursor::write(&*disk, &dir, reader.position()).is_err());

    disk.set_full(false);
    append(&mut spool, 12..14).expect("append once space is back");
    assert_eq!(
        read_all(&dir, reader.position(), spool.end()),
        names(12..14)
    );
    drop(spool);
    // The cursor on disk is missing (never written); the first segment left is read again.
    let recovered = Spool::open(&dir, 64, disk).expect("reopen");
    let pending = read_all(&dir, recovered.cursor, recovered.spool.end());
    assert!(pending.ends_with(&names(12..14)), "{pending:?}");
}

/// Review item 3, recovery: a cursor behind the first segment (segments freed, cursor not
/// written) reads from the first segment.
#[test]
fn a_cursor_behind_the_first_segment_reads_from_the_first_segment() {
    let dir = temp_dir("behind");
    let mut spool = open(&dir, 64).spool;
    append(&mut spool, 0..3).expect("append");
    cursor::write(&RealDisk, &dir, 8).expect("cursor");
    for i in 3..12 {
        append(&mut spool, i..i + 1).expect("append");
    }
    let end = spool.end();
    let starts = segments(&dir).expect("segments");
    release(&dir, starts[2]).expect("release");
    drop(spool);
    let recovered = open(&dir, 64);
    assert_eq!(recovered.cursor, starts[2] + 8);
    let read = read_all(&dir, recovered.cursor, end);
    assert!(read.ends_with(&names(11..12)) && read.len() as u64 == recovered.pending_records);
}

/// Review item 4, by fault injection (a directory `fsync` cannot be made to fail for real).
#[test]
fn a_failed_directory_sync_at_rotation_does_not_wedge_later_rotations() {
    let dir = temp_dir("rotate");
    let disk = Arc::new(FaultyDisk::default());
    let mut spool = Spool::open(&dir, 64, disk.clone()).expect("open").spool;
    append(&mut spool, 0..5).expect("fills the first segment");
    disk.fail_dir_syncs(1);
    assert!(append(&mut spool, 5..6).is_err(), "this rotation fails");
    append(&mut spool, 5..6).expect("the next one is tried again and succeeds");
    for i in 6..30 {
        append(&mut spool, i..i + 1).expect("later rotations work");
    }
    assert!(segments(&dir).expect("segments").len() >= 4);
    assert_eq!(read_all(&dir, 0, spool.end()), names(0..30));
    drop(spool);
    let recovered = open(&dir, 64);
    assert_eq!(recovered.pending_records, 30);
}

/// Review item 5: segments of the old format (no header, checksum over the payload only).
#[test]
fn old_format_segments_are_deleted_once_delivered_and_otherwise_named_in_a_clear_error() {
    let dir = temp_dir("format1");
    let mut old = Vec::new();
    for p in payloads(0..3) {
        old.extend_from_slice(&(p.len() as u32).to_le_bytes());
        old.extend_from_slice(&crc32fast::hash(&p).to_le_bytes());
        old.extend_from_slice(&p);
    }
    fs::write(segment_path(&dir, 0), &old).expect("write");
    fs::write(dir.join("cursor"), "10").expect("legacy cursor");
    let error = Spool::open(&dir, 64, Arc::new(RealDisk))
        .err()
        .expect("undelivered old records");
    assert!(error.to_string().contains("format-2 header"), "{error}");

    fs::write(dir.join("cursor"), old.len().to_string()).expect("legacy cursor");
    let recovered = open(&dir, 64);
    assert_eq!(
        recovered.cursor_found,
        CursorFound::Legacy(old.len() as u64)
    );
    assert_eq!(recovered.pending_records, 0);
    assert_eq!(segments(&dir).expect("segments"), [old.len() as u64]);
}

/// A small tmpfs mounted for one test, unmounted (and its mount point removed) when dropped,
/// however the test ends.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `256k`), or says why it cannot (not root, no
    /// CAP_SYS_ADMIN, no `mount`).
    fn mount(size: &str) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("mesh-spool-tmpfs-{}", uuid::Uuid::now_v7()));
        fs::create_dir_all(&dir).map_err(|e| format!("mount point: {e}"))?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => Ok(Self(dir)),
            other => {
                let _ = fs::remove_dir(&dir);
                Err(format!("mount -t tmpfs not permitted here ({other:?})"))
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = fs::remove_dir(&self.0);
    }
}

/// Review item 3 on a real full file system, where the machine allows it: a 256 KiB tmpfs
/// filled by the spool itself. Skipped, saying why, where `mount` is not permitted; the
/// fault-injection tests above cover the same paths everywhere.
#[test]
fn a_real_full_tmpfs_refuses_appends_and_recovers_once_delivered_segments_are_freed() {
    let tmpfs = match Tmpfs::mount("256k") {
        Ok(t) => t,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let dir = tmpfs.0.join("spool");
    let mut spool = open(&dir, 16 * 1024).spool;
    let record = vec![b'x'; 1000];
    let mut kept = 0u32;
    // Full means refused with no spare being made: a spare in the making holds space, and gives
    // it back when it fails, so appends may fit again after it settles.
    let mut refusals = 0;
    let full_end = loop {
        let before = spool.end();
        match spool.append(&[record.as_slice()]) {
            Ok(_) => kept += 1,
            Err(error) => {
                assert_eq!(error.kind(), std::io::ErrorKind::StorageFull, "{error}");
                assert_eq!(spool.end(), before, "failed appends leave no trace");
                refusals += 1;
                spool.settle_spare();
                if spool.append(&[record.as_slice()]).is_err() {
                    assert_eq!(spool.end(), before, "failed appends leave no trace");
                    break before;
                }
                kept += 1;
            }
        }
        assert!(kept < 10_000, "a 256 KiB file system never filled");
        assert!(refusals < 100, "appends kept fitting again after refusals");
    };

    // Deliver everything: the segments are freed although the disk is full.
    let mut reader = Reader::new(&dir, 0).expect("reader");
    let (frames, skipped) = reader.read(full_end, usize::MAX).expect("read");
    assert_eq!((frames.len() as u32, skipped), (kept, 0));
    assert!(release(&dir, reader.segment_start()).expect("release") > 0);
    // Freed first, so the cursor has room to be written.
    cursor::write(&RealDisk, &dir, reader.position()).expect("cursor once segments are freed");

    spool.append(&[b"after".as_slice()]).expect("space is back");
    assert_eq!(read_all(&dir, reader.position(), spool.end()), ["after"]);
    drop(spool);
    let recovered = open(&dir, 16 * 1024);
    assert_eq!(
        read_all(&dir, recovered.cursor, recovered.spool.end()),
        ["after"]
    );
}
