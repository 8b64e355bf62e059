//! The bytes of a segment file: an 8-byte header naming the format, then frames back to back.
//!
//! - Header: `MESHSPL` and the format version, `2`. Format 1 (gateways before it) had no
//!   header; its files are recognised by the header's absence (see the spool's recovery).
//! - Frame: `[length: u32 LE][crc: u32 LE][payload]`, where `crc` is the CRC-32 (IEEE) of the
//!   four length bytes followed by the payload. The length is covered, so a damaged length is
//!   caught like a damaged payload; and eight zero bytes are not a valid empty frame, because
//!   the CRC-32 of four zero bytes is not zero.
//!
//! Every length read from disk is a claim: it is checked against the bytes remaining before
//! anything is allocated for it.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// The first bytes of every segment file of this format.
pub(super) const SEGMENT_HEADER: [u8; 8] = *b"MESHSPL\x02";
/// Length of [`SEGMENT_HEADER`]; the first frame of a segment starts here.
pub(super) const HEADER_LEN: u64 = SEGMENT_HEADER.len() as u64;
/// Length of a frame's `[length][crc]` prefix.
pub(super) const FRAME_HEADER: u64 = 8;
/// A frame longer than this is corruption, not a record.
const MAX_FRAME: u64 = 64 * 1024 * 1024;

/// The checksum of a frame: over the length bytes, then the payload.
fn checksum(len: u32, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Appends `payload` as one frame to `buf`.
pub(super) fn encode(payload: &[u8], buf: &mut Vec<u8>) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| u64::from(*l) <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "record too large"))?;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&checksum(len, payload).to_le_bytes());
    buf.extend_from_slice(payload);
    Ok(())
}

/// Why reading stopped short of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// No bytes remain.
    End,
    /// Fewer bytes remain than the frame needs (a write cut short), or than it claims.
    Torn,
    /// The checksum does not match: damaged bytes.
    Corrupt,
}

/// Reads the frame at the reader's position, `remaining` bytes being all that may be read.
/// Returns its payload, or why there is none.
pub(super) fn read_frame(
    reader: &mut impl Read,
    remaining: u64,
) -> io::Result<Result<Vec<u8>, Stop>> {
    if remaining == 0 {
        return Ok(Err(Stop::End));
    }
    if remaining < FRAME_HEADER {
        return Ok(Err(Stop::Torn));
    }
    let mut header = [0u8; FRAME_HEADER as usize];
    if let Err(e) = reader.read_exact(&mut header) {
        return eof_is(e, Stop::Torn);
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    // Checked before allocating: a damaged length must not make us allocate gigabytes.
    if u64::from(len) > MAX_FRAME || u64::from(len) > remaining - FRAME_HEADER {
        return Ok(Err(Stop::Torn));
    }
    let mut payload = vec![0u8; len as usize];
    if let Err(e) = reader.read_exact(&mut payload) {
        return eof_is(e, Stop::Torn);
    }
    if checksum(len, &payload) != crc {
        return Ok(Err(Stop::Corrupt));
    }
    Ok(Ok(payload))
}

fn eof_is(e: io::Error, stop: Stop) -> io::Result<Result<Vec<u8>, Stop>> {
    match e.kind() {
        // The file shrank under us (another reader's recovery cannot run: the spool is locked),
        // or a length was wrong: either way, nothing more to read here.
        io::ErrorKind::UnexpectedEof => Ok(Err(stop)),
        _ => Err(e),
    }
}

/// What the first bytes of a segment file say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Header {
    /// This format.
    Valid,
    /// Empty, the start of the header only, or zeros (a spare whose header was never written):
    /// created but never written to (a crash or a failed write at creation). It holds no
    /// record.
    Unwritten,
    /// Something else: format 1 (no header), or damage.
    Foreign,
}

/// Reads the header of the segment at `path`.
pub(super) fn header(path: &Path) -> io::Result<Header> {
    let mut file = File::open(path)?;
    let mut bytes = Vec::with_capacity(SEGMENT_HEADER.len());
    (&mut file).take(HEADER_LEN).read_to_end(&mut bytes)?;
    Ok(if bytes == SEGMENT_HEADER {
        Header::Valid
    } else if SEGMENT_HEADER.starts_with(&bytes) || bytes.iter().all(|b| *b == 0) {
        Header::Unwritten
    } else {
        Header::Foreign
    })
}

/// The result of scanning a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Scan {
    /// Whole, valid frames from the starting position.
    pub(super) frames: u64,
    /// File position just past the last of them.
    pub(super) good_end: u64,
    /// Length of the file.
    pub(super) len: u64,
    /// Whether everything after `good_end` is zeros (a spare's unused space, or nothing): a
    /// clean end, not a torn or damaged tail.
    pub(super) clean: bool,
}

/// Frames of the segment at `path` from file position `from` (at least [`HEADER_LEN`]).
pub(super) fn scan(path: &Path, from: u64) -> io::Result<Scan> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let from = from.max(HEADER_LEN);
    if from >= len {
        return Ok(Scan {
            frames: 0,
            good_end: len,
            len,
            clean: true,
        });
    }
    let mut reader = BufReader::new(file);
    reader.seek(SeekFrom::Start(from))?;
    let (mut frames, mut at) = (0, from);
    while let Ok(payload) = read_frame(&mut reader, len - at)? {
        frames += 1;
        at += FRAME_HEADER + payload.len() as u64;
    }
    reader.seek(SeekFrom::Start(at))?;
    Ok(Scan {
        frames,
        good_end: at,
        len,
        clean: only_zeros(reader)?,
    })
}

/// Whether everything `reader` has left is zeros.
fn only_zeros(mut reader: impl Read) -> io::Result<bool> {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut chunk)? {
            0 => return Ok(true),
            n if chunk[..n].iter().any(|b| *b != 0) => return Ok(false),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_zero_bytes_are_not_an_empty_record() {
        let zeros = [0u8; 8];
        assert_eq!(
            read_frame(&mut zeros.as_slice(), 8).expect("read"),
            Err(Stop::Corrupt)
        );
        let mut empty = Vec::new();
        encode(b"", &mut empty).expect("encode");
        assert_ne!(empty, zeros, "a real empty frame has a non-zero checksum");
        assert_eq!(
            read_frame(&mut empty.as_slice(), 8).expect("read"),
            Ok(Vec::new())
        );
    }

    #[test]
    fn a_damaged_length_is_caught_by_the_checksum() {
        let mut frame = Vec::new();
        encode(b"abcdef", &mut frame).expect("encode");
        frame.extend_from_slice(b"tail-of-next-frame");
        // Length 6 becomes 4: the old checksum (payload only) would not notice if the shorter
        // payload's checksum happened to match; this one covers the length itself.
        frame[0] = 4;
        let remaining = frame.len() as u64;
        assert_eq!(
            read_frame(&mut frame.as_slice(), remaining).expect("read"),
            Err(Stop::Corrupt)
        );
    }

    #[test]
    fn a_length_beyond_the_bytes_remaining_is_refused_before_allocating() {
        // Claims 60 MiB (under the frame limit) in a 20-byte file.
        let mut bytes = (60u32 << 20).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0u8; 16]);
        let remaining = bytes.len() as u64;
        assert_eq!(
            read_frame(&mut bytes.as_slice(), remaining).expect("read"),
            Err(Stop::Torn)
        );
    }
}
