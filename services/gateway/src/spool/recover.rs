//! Opening a spool: the lock, the cursor, and what a crash (or an older gateway) left on disk.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::Arc;

use super::cursor::{self, Found};
use super::disk::Disk;
use super::frame::{self, HEADER_LEN};
use super::spare::Spare;
use super::{create_segment, segment_path, segments, Recovered, Spool};

/// A segment file the spool cannot use, and what to do about it.
#[derive(Debug, thiserror::Error)]
#[error(
    "spool segment {path} does not start with the format-2 header and holds records after the \
     cursor: it was written by a gateway before the spool format changed (deliver it by running \
     that version until its spool is empty), or its header is damaged (move it out of the spool \
     directory to start; its records are then not delivered)"
)]
pub struct ForeignSegment {
    /// The file.
    pub path: String,
}

/// See [`Spool::open`].
pub(super) fn open(dir: &Path, segment_bytes: u64, disk: Arc<dyn Disk>) -> io::Result<Recovered> {
    fs::create_dir_all(dir)?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    if lock.try_lock().is_err() {
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("{} is in use by another process", dir.display()),
        ));
    }
    let cursor_found = cursor::read(dir);
    let mut cursor = match cursor_found {
        Found::Valid(offset) | Found::Legacy(offset) => offset,
        // Deliver again from the first segment: the logger stores each record once.
        Found::Missing | Found::Garbled(_) => 0,
    };
    let mut starts = usable_segments(dir, cursor)?;
    if starts.is_empty() {
        create_segment(&*disk, dir, cursor)?;
        starts.push(cursor);
    }
    cursor = cursor.max(starts[0] + HEADER_LEN);
    let (mut pending_records, mut dropped_bytes, mut newest_end) = (0, 0, HEADER_LEN);
    for (i, &start) in starts.iter().enumerate() {
        let path = segment_path(dir, start);
        let scan = frame::scan(&path, cursor.saturating_sub(start))?;
        pending_records += scan.frames;
        newest_end = scan.good_end;
        if !scan.clean {
            dropped_bytes += scan.len - scan.good_end;
            if i + 1 == starts.len() {
                // A torn tail of the newest segment: cut it off and append after the last
                // good frame. (Zeros after it are a spare's unused space, kept.)
                OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(scan.good_end)?;
            }
        }
    }
    let segment_start = starts[starts.len() - 1];
    let file = OpenOptions::new()
        .write(true)
        .open(segment_path(dir, segment_start))?;
    let end = segment_start + newest_end.max(HEADER_LEN);
    Ok(Recovered {
        spool: Spool {
            dir: dir.to_owned(),
            disk,
            segment_bytes,
            file,
            segment_start,
            end,
            torn_tail: false,
            spare: Spare::new(dir, segment_bytes),
            _lock: lock,
        },
        cursor: cursor.min(end),
        cursor_found,
        pending_records,
        dropped_bytes,
    })
}

/// The segments in `dir` still to be read, after deleting those the cursor says were
/// delivered and those that never held a record; the newest of the latter is kept (with its
/// header written) when it is the only one.
fn usable_segments(dir: &Path, cursor: u64) -> io::Result<Vec<u64>> {
    let mut starts = segments(dir)?;
    // Segments wholly before the cursor were delivered.
    while starts.len() > 1 && starts[1] <= cursor {
        fs::remove_file(segment_path(dir, starts[0]))?;
        starts.remove(0);
    }
    let mut usable = Vec::with_capacity(starts.len());
    for (i, &start) in starts.iter().enumerate() {
        let path = segment_path(dir, start);
        let newest = i + 1 == starts.len();
        match frame::header(&path)? {
            frame::Header::Valid => usable.push(start),
            frame::Header::Unwritten if newest => {
                // Created, but the header never made it (a crash, or a failed rotation): write
                // it now; the segment holds no record.
                write_header(&path)?;
                usable.push(start);
            }
            frame::Header::Unwritten => fs::remove_file(&path)?,
            frame::Header::Foreign => {
                let len = fs::metadata(&path)?.len();
                if start + len <= cursor {
                    // A format-1 segment the cursor says was delivered.
                    fs::remove_file(&path)?;
                } else {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        ForeignSegment {
                            path: path.display().to_string(),
                        },
                    ));
                }
            }
        }
    }
    Ok(usable)
}

/// Starts the file at `path` afresh with the segment header, synced.
fn write_header(path: &Path) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).truncate(true).open(path)?;
    io::Write::write_all(&mut file, &frame::SEGMENT_HEADER)?;
    file.sync_data()
}
