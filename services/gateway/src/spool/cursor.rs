//! The file `cursor`: the offset up to which the logger has committed the spool's records.
//!
//! Its one line checks itself: `spool-cursor 2 <offset> <crc32 of the text before it, hex>`,
//! so a garbled cursor is recognised as garbled rather than read as a wrong offset. It is
//! written to `cursor.tmp`, synced, renamed over `cursor`, and the directory synced: after a
//! crash the file holds the old cursor or the new one, never a mix, and the rename is not lost.
//!
//! A cursor that is missing or garbled is not fatal: delivery starts again from the oldest
//! segment. That is safe because the logger's insert is idempotent on the prediction id; it
//! costs redelivering what was delivered.

use std::fs::{self, File};
use std::io;
use std::path::Path;

use super::disk::Disk;

const FILE: &str = "cursor";
const TMP: &str = "cursor.tmp";
const TAG: &str = "spool-cursor 2";

/// What the cursor file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A checked offset.
    Valid(u64),
    /// A bare number, as gateways before format 2 wrote it (not checked; accepted so that an
    /// upgraded gateway knows what its predecessor delivered).
    Legacy(u64),
    /// No cursor file.
    Missing,
    /// A cursor file that cannot be trusted, and why.
    Garbled(String),
}

fn line(offset: u64) -> String {
    let text = format!("{TAG} {offset}");
    let crc = crc32fast::hash(text.as_bytes());
    format!("{text} {crc:08x}\n")
}

/// Parses the contents of a cursor file.
fn parse(text: &str) -> Found {
    let trimmed = text.trim();
    if !trimmed.is_empty() && trimmed.len() <= 20 && trimmed.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(offset) = trimmed.parse() {
            return Found::Legacy(offset);
        }
    }
    let checked = trimmed.rsplit_once(' ').and_then(|(text, crc)| {
        let crc = u32::from_str_radix(crc, 16).ok()?;
        let offset = text.strip_prefix(TAG)?.strip_prefix(' ')?.parse().ok()?;
        (crc32fast::hash(text.as_bytes()) == crc).then_some(offset)
    });
    match checked {
        Some(offset) => Found::Valid(offset),
        None => Found::Garbled(format!(
            "{:?}",
            trimmed.chars().take(80).collect::<String>()
        )),
    }
}

/// Reads the cursor in `dir`. Never fails: an unreadable file is reported as garbled.
pub fn read(dir: &Path) -> Found {
    match fs::read(dir.join(FILE)) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => parse(&text),
            Err(_) => Found::Garbled("not text".into()),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Found::Missing,
        Err(e) => Found::Garbled(format!("unreadable: {e}")),
    }
}

/// Records `offset` durably: temp file, its sync, rename, directory sync.
pub fn write(disk: &dyn Disk, dir: &Path, offset: u64) -> io::Result<()> {
    let tmp = dir.join(TMP);
    let result = (|| {
        let mut file = File::create(&tmp)?;
        disk.write(&mut file, &tmp, line(offset).as_bytes())?;
        disk.sync_data(&file, &tmp)?;
        disk.rename(&tmp, &dir.join(FILE))?;
        disk.sync_dir(dir)
    })();
    if result.is_err() {
        // A half-written temp file is never read; removing it frees its block on a full disk.
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_and_any_damage_is_recognised() {
        let good = line(123_456);
        assert_eq!(parse(&good), Found::Valid(123_456));
        assert_eq!(parse("98765\n"), Found::Legacy(98_765));
        for bad in [
            good.replace("123456", "123457"),
            good.replace("spool", "spoil"),
            good[..good.len() - 3].to_owned(),
            String::new(),
            "\0\0\0\0".into(),
            "-5".into(),
            "99999999999999999999999".into(),
        ] {
            assert!(matches!(parse(&bad), Found::Garbled(_)), "{bad:?}");
        }
    }
}
