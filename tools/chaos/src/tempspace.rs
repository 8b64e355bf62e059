//! The temporary directory the chaos mesh runs in (its gateways' spools, PostgreSQL's and
//! Prometheus's data), and the spool bound it is sized for.

use std::path::Path;

use anyhow::{bail, Context as _};

/// The chaos gateways' spool bound (`MESH_SPOOL_MAX_BYTES`). No scenario spools more than a few
/// MB (300 records/s through a 30 s outage). With the shipped 1 GiB default, a temporary
/// directory with less than 1 GiB free makes `MeshSpoolDiskFilling` fire, truthfully, in every
/// scenario, and every scenario's alert check then fails for something that is not its fault.
pub const SPOOL_MAX_BYTES: u64 = 128 << 20;

/// Free space the temporary directory needs: both gateways' spools up to their bound, each with
/// its open and spare 16 MiB segments, and PostgreSQL's and Prometheus's data beside them.
const TEMP_SPACE_NEEDED: u64 = 2 * (SPOOL_MAX_BYTES + (32 << 20)) + (192 << 20);

/// Fails, naming the directory and the figures, when `dir` (where the spools, PostgreSQL's data
/// and Prometheus's data go) has too little free space for a run whose alerts mean anything.
pub fn check(dir: &Path) -> anyhow::Result<()> {
    let out = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .context("running df on the temporary directory")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let free: u64 = text
        .lines()
        .nth(1)
        .and_then(|line| line.trim().parse().ok())
        .with_context(|| format!("df printed no free space for {}: {text}", dir.display()))?;
    if free < TEMP_SPACE_NEEDED {
        bail!(
            "{} has {} MiB free; the chaos mesh needs {} MiB there (two gateway spools bounded at {} MiB, \
             their segments, PostgreSQL's and Prometheus's data). Free some space or point TMPDIR \
             at a larger file system.",
            dir.display(),
            free >> 20,
            TEMP_SPACE_NEEDED >> 20,
            SPOOL_MAX_BYTES >> 20
        );
    }
    Ok(())
}
