//! Unit tests of segments made from spares: zeros after the last frame are a clean end, what a
//! crash leaves in them is not, and a spare renamed into place without its header holds nothing.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::tests::{read_all, temp_dir};
use super::*;

const SEGMENT: u64 = 4096;

fn record(i: u32) -> Vec<u8> {
    format!("record-{i:04}").into_bytes()
}

fn names(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("record-{i:04}")).collect()
}

/// Waits until the spare of the spool in `dir` is ready (made by its own thread).
fn spare_ready(dir: &Path) {
    let started = Instant::now();
    while !dir.join("spare.prealloc").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no spare was made"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Appends records one by one from `next` until the spool has rotated into a new segment and
/// written one record there; returns the next record's number.
fn fill_into_next_segment(spool: &mut Spool, dir: &Path, mut next: u32) -> u32 {
    let before = segments(dir).expect("segments").len();
    while segments(dir).expect("segments").len() == before {
        spool.append(&[record(next).as_slice()]).expect("append");
        next += 1;
    }
    next
}

/// Opens (or reopens) the spool in `dir` with small segments on the real disk.
fn open(dir: &Path) -> Recovered {
    Spool::open(dir, SEGMENT, Arc::new(RealDisk)).expect("open")
}

fn newest_segment(dir: &Path) -> (u64, std::path::PathBuf) {
    let start = *segments(dir).expect("segments").last().expect("a segment");
    (start, segment_path(dir, start))
}

#[test]
fn a_segment_made_from_the_spare_is_full_size_and_its_zeros_are_a_clean_end() {
    let dir = temp_dir("spare");
    let mut spool = open(&dir).spool;
    spare_ready(&dir);
    let next = fill_into_next_segment(&mut spool, &dir, 0);
    let (start, path) = newest_segment(&dir);
    assert_eq!(
        fs::metadata(&path).expect("metadata").len(),
        SEGMENT,
        "the new segment is the preallocated spare"
    );
    assert!(spool.end() < start + SEGMENT, "its tail is zeros");
    assert_eq!(read_all(&dir, 0, spool.end()), names(0..next));
    let end = spool.end();
    drop(spool);

    let recovered = open(&dir);
    assert_eq!(recovered.dropped_bytes, 0, "zeros are not a torn tail");
    assert_eq!(recovered.pending_records, u64::from(next));
    assert_eq!(
        recovered.spool.end(),
        end,
        "appending resumes after the last frame"
    );
    assert_eq!(
        fs::metadata(&path).expect("metadata").len(),
        SEGMENT,
        "and the zeros are kept"
    );
    let mut spool = recovered.spool;
    spool
        .append(&[record(next).as_slice()])
        .expect("append after reopening");
    assert_eq!(read_all(&dir, 0, spool.end()), names(0..next + 1));
}

#[test]
fn a_write_torn_by_a_crash_inside_the_spare_is_cut_off_and_counted() {
    let dir = temp_dir("spare-torn");
    let mut spool = open(&dir).spool;
    spare_ready(&dir);
    let next = fill_into_next_segment(&mut spool, &dir, 0);
    let (start, path) = newest_segment(&dir);
    let end = spool.end();
    drop(spool);
    // A crash in the middle of the next group: a header promising 100 bytes, 6 written, and a
    // later page of the same write that did reach the disk, zeros between.
    let file = OpenOptions::new().write(true).open(&path).expect("open");
    let at = end - start;
    file.write_all_at(&100u32.to_le_bytes(), at).expect("write");
    file.write_all_at(&[9; 6], at + 8).expect("write");
    file.write_all_at(&[7; 3], at + 600).expect("write");
    drop(file);

    let recovered = open(&dir);
    assert_eq!(recovered.pending_records, u64::from(next));
    assert_eq!(
        recovered.dropped_bytes,
        SEGMENT - at,
        "the whole damaged tail"
    );
    assert_eq!(recovered.spool.end(), end);
    let mut spool = recovered.spool;
    spool.append(&[record(next).as_slice()]).expect("append");
    assert_eq!(read_all(&dir, 0, spool.end()), names(0..next + 1));
    drop(spool);
    let reopened = open(&dir);
    assert_eq!(reopened.dropped_bytes, 0, "cut off once, for good");
}

#[test]
fn a_spare_renamed_into_place_without_its_header_holds_no_record() {
    let dir = temp_dir("spare-headerless");
    let mut spool = open(&dir).spool;
    let mut next = 0;
    while spool.end() < 200 {
        spool.append(&[record(next).as_slice()]).expect("append");
        next += 1;
    }
    let end = spool.end();
    drop(spool);
    // A crash between the rename of the spare and its header's write.
    fs::write(segment_path(&dir, end), vec![0u8; SEGMENT as usize]).expect("spare");

    let recovered = open(&dir);
    assert_eq!(recovered.pending_records, u64::from(next));
    assert_eq!(recovered.dropped_bytes, 0);
    let mut spool = recovered.spool;
    spool.append(&[record(next).as_slice()]).expect("append");
    assert_eq!(read_all(&dir, 0, spool.end()), names(0..next + 1));
}

#[test]
fn a_closed_spool_leaves_no_spare_behind() {
    let dir = temp_dir("spare-closed");
    let mut spool = open(&dir).spool;
    spool.append(&[record(0).as_slice()]).expect("append");
    spare_ready(&dir);
    drop(spool);
    assert!(
        !dir.join("spare.prealloc").exists() && !dir.join("spare.prealloc.tmp").exists(),
        "a spare outlived its spool"
    );
    assert_eq!(open(&dir).pending_records, 1, "the records stay");
}

#[test]
fn a_spare_removed_by_hand_does_not_refuse_records() {
    let dir = temp_dir("spare-removed");
    let mut spool = open(&dir).spool;
    spare_ready(&dir);
    fs::remove_file(dir.join("spare.prealloc")).expect("remove the spare");
    let next = fill_into_next_segment(&mut spool, &dir, 0);
    assert_eq!(read_all(&dir, 0, spool.end()), names(0..next));
}
