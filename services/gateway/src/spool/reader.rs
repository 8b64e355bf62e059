//! The delivering side of the spool: frames in order from a position, across segments.

use std::fs::File;
use std::io::{self, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::frame::{read_frame, FRAME_HEADER, HEADER_LEN};
use super::{segment_path, segments};

/// Reads frames in order from a position.
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
    /// A reader at `cursor` in the spool in `dir`. A cursor before the first segment (its
    /// segments were freed but the cursor could not be recorded) reads from the first segment.
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
            pos: cursor.max(segment_start + HEADER_LEN),
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
            let file = File::open(segment_path(&self.dir, self.segment_start))?;
            // Never read past the file, nor past what the writer has made durable.
            let limit = (self.segment_start + file.metadata()?.len()).min(end);
            let mut file = BufReader::new(file);
            file.seek(SeekFrom::Start(self.pos - self.segment_start))?;
            let mut stopped = false;
            while frames.len() < max && self.pos < end {
                match read_frame(&mut file, limit.saturating_sub(self.pos))? {
                    Ok(payload) => {
                        let offset = self.pos;
                        self.pos += FRAME_HEADER + payload.len() as u64;
                        frames.push(Frame { offset, payload });
                    }
                    Err(_) => {
                        stopped = true;
                        break;
                    }
                }
            }
            if !stopped {
                break;
            }
            // End of this segment (or corruption in it): continue in the next one.
            let Some(next) = segments(&self.dir)?
                .into_iter()
                .find(|s| *s > self.segment_start && *s < end)
            else {
                break;
            };
            skipped += next.saturating_sub(self.pos);
            self.segment_start = next;
            self.pos = next + HEADER_LEN;
        }
        Ok((frames, skipped))
    }
}
