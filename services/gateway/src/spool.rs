//! The durable spool of prediction records: append-only segment files on local disk.
//!
//! Every byte ever appended has a global offset. A segment file is named after the offset of
//! its first byte (`00000000000000123456.spool`) and holds frames back to back:
//! `[length: u32 LE][crc32 of payload: u32 LE][payload]`, the payload being one encoded
//! `PredictionRecord`. Appends are written and `fdatasync`ed in groups (one sync for every
//! record that arrived while the previous sync ran). The file `cursor` holds the offset up to
//! which records were acknowledged by the logger (written atomically: temp file + rename);
//! segments wholly before it are deleted.
//!
//! Recovery on open: segments before the cursor are removed, the rest are scanned, and a torn
//! tail (a frame cut short by a crash, or with a wrong checksum) is truncated from the newest
//! segment. Records after the cursor are delivered again: the logger's insert is idempotent on
//! the prediction id, so a record acknowledged but not yet in the cursor is stored once.
//!
//! A `lock` file held with an exclusive lock keeps two processes from sharing a spool.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const SUFFIX: &str = ".spool";
const HEADER: u64 = 8;
/// A frame longer than this is corruption, not a record.
const MAX_FRAME: u32 = 64 * 1024 * 1024;

fn segment_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{start:020}{SUFFIX}"))
}

/// Start offsets of the segment files in `dir`, ascending.
fn segments(dir: &Path) -> io::Result<Vec<u64>> {
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

/// The acknowledged offset recorded in `dir` (0 for a new spool).
fn read_cursor(dir: &Path) -> io::Result<u64> {
    match fs::read_to_string(dir.join("cursor")) {
        Ok(text) => text.trim().parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: not an offset: {:?}",
                    dir.join("cursor").display(),
                    text.trim()
                ),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Records `cursor` as acknowledged and, given `release`, deletes the segments wholly before
/// it (the segment the reader is in).
pub fn commit(dir: &Path, cursor: u64, release: Option<u64>) -> io::Result<()> {
    let tmp = dir.join("cursor.tmp");
    fs::write(&tmp, cursor.to_string())?;
    fs::rename(&tmp, dir.join("cursor"))?;
    let Some(keep_from) = release else {
        return Ok(());
    };
    for start in segments(dir)? {
        if start < keep_from {
            fs::remove_file(segment_path(dir, start))?;
        }
    }
    Ok(())
}

/// Reads the frame at the reader's position: its payload, or `None` at the end of the file or
/// at a torn or corrupt frame.
fn read_frame(reader: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; HEADER as usize];
    if let Err(e) = reader.read_exact(&mut header) {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof => Ok(None),
            _ => Err(e),
        };
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_FRAME {
        return Ok(None);
    }
    let mut payload = vec![0u8; len as usize];
    if let Err(e) = reader.read_exact(&mut payload) {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof => Ok(None),
            _ => Err(e),
        };
    }
    Ok((crc32fast::hash(&payload) == crc).then_some(payload))
}

/// Frames in `path` from byte `from`: (count, end of the last good frame, file length).
fn scan(path: &Path, from: u64) -> io::Result<(u64, u64, u64)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if from >= len {
        return Ok((0, len, len));
    }
    let mut reader = BufReader::new(file);
    reader.seek(SeekFrom::Start(from))?;
    let (mut count, mut at) = (0, from);
    while let Some(payload) = read_frame(&mut reader)? {
        count += 1;
        at += HEADER + payload.len() as u64;
    }
    Ok((count, at, len))
}

/// The appending side, owned by one writer thread.
pub struct Spool {
    dir: PathBuf,
    segment_bytes: u64,
    file: File,
    segment_start: u64,
    end: u64,
    _lock: File,
}

/// What [`Spool::open`] found.
pub struct Recovered {
    /// The spool, positioned to append.
    pub spool: Spool,
    /// Offset of the first record not yet acknowledged.
    pub cursor: u64,
    /// Records after the cursor (to be delivered).
    pub pending_records: u64,
    /// Bytes of torn or corrupt frames that were dropped.
    pub dropped_bytes: u64,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, recovering after a crash.
    pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<Recovered> {
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
        let mut cursor = read_cursor(dir)?;
        let mut starts = segments(dir)?;
        // Segments wholly before the cursor were delivered.
        while starts.len() > 1 && starts[1] <= cursor {
            fs::remove_file(segment_path(dir, starts[0]))?;
            starts.remove(0);
        }
        if starts.is_empty() {
            File::create(segment_path(dir, cursor))?;
            starts.push(cursor);
        }
        cursor = cursor.max(starts[0]);
        let (mut pending_records, mut dropped_bytes) = (0, 0);
        for (i, &start) in starts.iter().enumerate() {
            let path = segment_path(dir, start);
            let (count, good_end, len) = scan(&path, cursor.saturating_sub(start))?;
            pending_records += count;
            if good_end < len {
                dropped_bytes += len - good_end;
                if i + 1 == starts.len() {
                    // A torn tail of the newest segment: cut it off and append after the last
                    // good frame.
                    OpenOptions::new()
                        .write(true)
                        .open(&path)?
                        .set_len(good_end)?;
                }
            }
        }
        let segment_start = *starts.last().unwrap_or(&cursor);
        let path = segment_path(dir, segment_start);
        let file = OpenOptions::new().append(true).open(&path)?;
        let end = segment_start + file.metadata()?.len();
        Ok(Recovered {
            spool: Spool {
                dir: dir.to_owned(),
                segment_bytes,
                file,
                segment_start,
                end,
                _lock: lock,
            },
            cursor: cursor.min(end),
            pending_records,
            dropped_bytes,
        })
    }

    /// Offset just past the last durable byte.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Bytes a record of `payload_len` takes on disk.
    pub fn frame_len(payload_len: usize) -> u64 {
        HEADER + payload_len as u64
    }

    /// Appends `payloads` as frames and syncs them to disk; returns each frame's offset. On
    /// error nothing of this group remains in the file.
    pub fn append(&mut self, payloads: &[&[u8]]) -> io::Result<Vec<u64>> {
        if self.end - self.segment_start >= self.segment_bytes {
            self.rotate()?;
        }
        let mut buf = Vec::with_capacity(payloads.iter().map(|p| p.len() + 8).sum());
        let mut offsets = Vec::with_capacity(payloads.len());
        for payload in payloads {
            offsets.push(self.end + buf.len() as u64);
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
            buf.extend_from_slice(payload);
        }
        let written = self
            .file
            .write_all(&buf)
            .and_then(|_| self.file.sync_data());
        if let Err(e) = written {
            let _ = self.file.set_len(self.end - self.segment_start);
            return Err(e);
        }
        self.end += buf.len() as u64;
        Ok(offsets)
    }

    fn rotate(&mut self) -> io::Result<()> {
        let path = segment_path(&self.dir, self.end);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        // The new name must survive a crash too.
        File::open(&self.dir)?.sync_all()?;
        self.file = file;
        self.segment_start = self.end;
        Ok(())
    }
}

/// The delivering side: reads frames in order from a position.
pub struct Reader {
    dir: PathBuf,
    segment_start: u64,
    pos: u64,
}

/// A record read from the spool.
pub struct Frame {
    /// Offset of the frame.
    pub offset: u64,
    /// The encoded record.
    pub payload: Vec<u8>,
}

impl Reader {
    /// A reader at `cursor` in the spool in `dir`.
    pub fn new(dir: &Path, cursor: u64) -> io::Result<Self> {
        let starts = segments(dir)?;
        let segment_start = starts
            .iter()
            .rev()
            .find(|s| **s <= cursor)
            .or(starts.first())
            .copied()
            .unwrap_or(cursor);
        Ok(Self {
            dir: dir.to_owned(),
            segment_start,
            pos: cursor.max(segment_start),
        })
    }

    /// Offset of the next frame to read.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Start of the segment being read (segments before it may be deleted once acknowledged).
    pub fn segment_start(&self) -> u64 {
        self.segment_start
    }

    /// Up to `max` frames from the position, not reading at or past `end` (the durable end).
    /// Returns the frames and the bytes skipped over corrupt data.
    pub fn read(&mut self, end: u64, max: usize) -> io::Result<(Vec<Frame>, u64)> {
        let mut frames = Vec::new();
        let mut skipped = 0;
        while frames.len() < max && self.pos < end {
            let mut file = BufReader::new(File::open(segment_path(&self.dir, self.segment_start))?);
            file.seek(SeekFrom::Start(self.pos - self.segment_start))?;
            let mut broken = false;
            while frames.len() < max && self.pos < end {
                match read_frame(&mut file)? {
                    Some(payload) => {
                        let offset = self.pos;
                        self.pos += HEADER + payload.len() as u64;
                        frames.push(Frame { offset, payload });
                    }
                    None => {
                        broken = true;
                        break;
                    }
                }
            }
            if !broken {
                break;
            }
            // End of this segment (or corruption in it): continue in the next one.
            let Some(next) = segments(&self.dir)?
                .into_iter()
                .find(|s| *s > self.segment_start && *s <= end)
            else {
                break;
            };
            skipped += next.saturating_sub(self.pos);
            self.segment_start = next;
            self.pos = next;
        }
        Ok((frames, skipped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mesh-spool-{name}-{}", uuid::Uuid::now_v7()));
        fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn payloads(range: std::ops::Range<u32>) -> Vec<Vec<u8>> {
        range.map(|i| format!("record-{i}").into_bytes()).collect()
    }

    fn read_all(dir: &Path, cursor: u64, end: u64) -> Vec<String> {
        let mut reader = Reader::new(dir, cursor).expect("reader");
        let (frames, skipped) = reader.read(end, usize::MAX).expect("read");
        assert_eq!(skipped, 0);
        frames
            .into_iter()
            .map(|f| String::from_utf8(f.payload).expect("utf8"))
            .collect()
    }

    #[test]
    fn records_are_read_back_in_order_across_segments_and_after_reopening() {
        let dir = temp_dir("order");
        let mut spool = Spool::open(&dir, 64).expect("open").spool;
        for chunk in [0..5, 5..9, 9..20] {
            let p = payloads(chunk);
            spool
                .append(&p.iter().map(|p| p.as_slice()).collect::<Vec<_>>())
                .expect("append");
        }
        let end = spool.end();
        assert!(
            segments(&dir).expect("list").len() >= 3,
            "small segments rotate"
        );
        let expected: Vec<String> = (0..20).map(|i| format!("record-{i}")).collect();
        assert_eq!(read_all(&dir, 0, end), expected);

        // Acknowledge the first 7; reopening delivers the rest, and keeps appending after them.
        let mut reader = Reader::new(&dir, 0).expect("reader");
        let (first, _) = reader.read(end, 7).expect("read");
        assert_eq!(first.len(), 7);
        commit(&dir, reader.position(), Some(reader.segment_start())).expect("commit");
        drop(spool);
        let recovered = Spool::open(&dir, 64).expect("reopen");
        assert_eq!(recovered.pending_records, 13);
        assert_eq!(recovered.cursor, reader.position());
        let mut spool = recovered.spool;
        spool.append(&[b"record-20".as_slice()]).expect("append");
        let expected: Vec<String> = (7..21).map(|i| format!("record-{i}")).collect();
        assert_eq!(read_all(&dir, recovered.cursor, spool.end()), expected);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_appending_resumes_after_the_last_good_record() {
        let dir = temp_dir("torn");
        let mut spool = Spool::open(&dir, 1 << 20).expect("open").spool;
        let p = payloads(0..3);
        spool
            .append(&p.iter().map(|p| p.as_slice()).collect::<Vec<_>>())
            .expect("append");
        let good = spool.end();
        drop(spool);
        // A crash in the middle of the next write: a header promising more than was written.
        let path = segment_path(&dir, 0);
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(&100u32.to_le_bytes()).expect("write");
        file.write_all(&[1, 2, 3, 4, 5, 6]).expect("write");
        drop(file);

        let recovered = Spool::open(&dir, 1 << 20).expect("reopen");
        assert_eq!(recovered.pending_records, 3);
        assert_eq!(recovered.dropped_bytes, 10);
        assert_eq!(recovered.spool.end(), good);
        let mut spool = recovered.spool;
        spool.append(&[b"record-3".as_slice()]).expect("append");
        let expected: Vec<String> = (0..4).map(|i| format!("record-{i}")).collect();
        assert_eq!(read_all(&dir, 0, spool.end()), expected);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_spool_in_use_cannot_be_opened_twice() {
        let dir = temp_dir("lock");
        let first = Spool::open(&dir, 1 << 20).expect("open");
        let second = Spool::open(&dir, 1 << 20);
        assert!(
            matches!(&second, Err(e) if e.to_string().contains("in use by another process")),
            "second open must fail"
        );
        drop(first);
        assert!(Spool::open(&dir, 1 << 20).is_ok(), "free once closed");
        let _ = fs::remove_dir_all(&dir);
    }
}
