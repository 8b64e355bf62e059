//! Steady open-loop load: `mesh-bench predict --rate R` as a child process, writing one line per
//! request (`--requests-out`), the prediction ids of OK answers (`--ids-out`; with the version
//! that scored each in `versions.txt`, `--versions-out`) and a report with
//! a per-second timeline (`--timeline`). mesh-chaos reads the request lines while the run goes
//! on to see recovery, and all of them afterwards for the scenario's figures.

use std::collections::HashSet;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};

/// How a request ended (mesh-bench's `--requests-out` classes).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Class {
    /// The server answered (OK or an error status).
    Server,
    /// The client's deadline timer fired before any answer.
    Timeout,
    /// Never reached a server (connection refused, refused by GOAWAY).
    NotAccepted,
    /// Another local or connection-level failure.
    Transport,
}

/// One request of the load.
#[derive(Clone, Debug)]
pub struct Req {
    /// Intended start, ms since the bench's start (fractional).
    pub start_ms: f64,
    /// Client-observed latency from the intended start, ms.
    pub latency_ms: f64,
    /// gRPC status code (0 = OK).
    pub code: i32,
    /// How it ended.
    pub class: Class,
    /// For local failures: the client's error chain (spaces as `_`).
    pub detail: String,
}

impl Req {
    /// OK, and within `deadline_ms`.
    pub fn ok_within(&self, deadline_ms: f64) -> bool {
        self.code == 0 && self.latency_ms <= deadline_ms
    }
}

/// A running mesh-bench.
pub struct Load {
    child: tokio::process::Child,
    /// Its directory of outputs.
    pub dir: PathBuf,
    /// Wall clock of the bench's start, unix ms.
    pub start_unix_ms: u64,
    requests_path: PathBuf,
    read_offset: u64,
    partial: String,
    /// Requests read so far.
    pub reqs: Vec<Req>,
}

/// What mesh-bench reported at the end.
pub struct Finished {
    /// Every request.
    pub reqs: Vec<Req>,
    /// Prediction ids of OK answers, in order.
    pub ids: Vec<String>,
    /// The JSON report.
    pub report: serde_json::Value,
}

impl Load {
    /// Starts `mesh-bench predict` against `gateway_url` for at most `max_secs`.
    pub async fn start(
        bench: &Path,
        gateway_url: &str,
        rate: u64,
        timeout_ms: u64,
        max_secs: f64,
        dir: &Path,
        name: &str,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let requests_path = dir.join("requests.txt");
        let _ = std::fs::remove_file(&requests_path);
        let log = std::fs::File::create(dir.join("bench.log"))?;
        let child = tokio::process::Command::new(bench)
            .args(["predict", "--url", gateway_url])
            .args(["--rate", &rate.to_string()])
            .args(["--timeout-ms", &timeout_ms.to_string()])
            .args(["--duration", &format!("{max_secs:.1}")])
            .args(["--warmup", "0", "--timeline", "--stop-on-signal"])
            .args(["--name", name, "--format", "json"])
            .arg("--ids-out")
            .arg(dir.join("ids.txt"))
            .arg("--versions-out")
            .arg(dir.join("versions.txt"))
            .arg("--requests-out")
            .arg(&requests_path)
            .arg("--output")
            .arg(dir.join("bench.json"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bench.display()))?;
        let mut load = Self {
            child,
            dir: dir.to_owned(),
            start_unix_ms: 0,
            requests_path,
            read_offset: 0,
            partial: String::new(),
            reqs: Vec::new(),
        };
        // The first line of the request log carries the start time.
        for _ in 0..200 {
            if let Ok(text) = std::fs::read_to_string(&load.requests_path) {
                if let Some(first) = text.lines().next() {
                    let fields: Vec<&str> = first.split_whitespace().collect();
                    if fields.len() >= 3 && fields[1] == "started_unix_ms" {
                        load.start_unix_ms = fields[2].parse()?;
                        return Ok(load);
                    }
                }
            }
            if let Ok(Some(status)) = load.child.try_wait() {
                bail!(
                    "mesh-bench exited at start ({status}); see {}",
                    dir.join("bench.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("mesh-bench did not start within 10 s")
    }

    /// Now, in ms since the bench's start.
    pub fn now_ms(&self) -> f64 {
        crate::unix_ms() as f64 - self.start_unix_ms as f64
    }

    /// `unix_ms` in ms since the bench's start.
    pub fn offset_of(&self, unix_ms: u64) -> f64 {
        unix_ms as f64 - self.start_unix_ms as f64
    }

    /// Reads the request lines written since the last call.
    pub fn poll(&mut self) -> anyhow::Result<()> {
        let mut file = std::fs::File::open(&self.requests_path)?;
        file.seek(SeekFrom::Start(self.read_offset))?;
        let mut text = String::new();
        let n = file.read_to_string(&mut text)?;
        self.read_offset += n as u64;
        self.partial.push_str(&text);
        let complete = match self.partial.rfind('\n') {
            Some(i) => i + 1,
            None => return Ok(()),
        };
        let lines: String = self.partial.drain(..complete).collect();
        for line in lines.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 {
                continue;
            }
            let class = match f[3] {
                "server" => Class::Server,
                "timeout" => Class::Timeout,
                "not_accepted" => Class::NotAccepted,
                _ => Class::Transport,
            };
            self.reqs.push(Req {
                start_ms: f[0].parse::<f64>()? / 1000.0,
                latency_ms: f[1].parse::<f64>()? / 1000.0,
                code: f[2].parse()?,
                class,
                detail: f.get(4).map(|d| d.replace('_', " ")).unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// Asks the bench to stop (SIGTERM: it finishes the requests in flight and writes its
    /// report), waits for it (bounded) and reads everything it wrote.
    pub async fn finish(mut self) -> anyhow::Result<Finished> {
        if let Some(pid) = self.child.id() {
            if matches!(self.child.try_wait(), Ok(None)) {
                crate::procs::send_signal(pid, libc::SIGTERM);
            }
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!(
                        "mesh-bench failed ({status}); see {}",
                        self.dir.join("bench.log").display()
                    );
                }
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("mesh-bench did not stop within 30 s of SIGTERM");
            }
        }
        self.poll()?;
        let ids = std::fs::read_to_string(self.dir.join("ids.txt"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        let report = serde_json::from_str(
            &std::fs::read_to_string(self.dir.join("bench.json")).context("bench.json")?,
        )?;
        Ok(Finished {
            reqs: std::mem::take(&mut self.reqs),
            ids,
            report,
        })
    }
}

/// The first instant `t` (ms since the bench's start, on a 100 ms grid from `from_ms`) such that
/// every request started in `[t, t + 1 s)` succeeded within the deadline, among windows that are
/// complete by `now_ms` (all their requests have ended). `None` if no such window yet.
pub fn success_back_at(reqs: &[Req], from_ms: f64, now_ms: f64, deadline_ms: f64) -> Option<f64> {
    let mut sorted: Vec<&Req> = reqs.iter().filter(|r| r.start_ms >= from_ms).collect();
    sorted.sort_by(|a, b| a.start_ms.total_cmp(&b.start_ms));
    let mut t = from_ms;
    // A window is complete once its last request can no longer be running.
    while t + 1000.0 + deadline_ms + 300.0 <= now_ms {
        let lo = sorted.partition_point(|r| r.start_ms < t);
        let hi = sorted.partition_point(|r| r.start_ms < t + 1000.0);
        let window = &sorted[lo..hi];
        if !window.is_empty() && window.iter().all(|r| r.ok_within(deadline_ms)) {
            return Some(t);
        }
        t += 100.0;
    }
    None
}

/// The `q` quantile of latencies (nearest rank), ms.
pub fn quantile(latencies: &mut [f64], q: f64) -> Option<f64> {
    if latencies.is_empty() {
        return None;
    }
    latencies.sort_by(f64::total_cmp);
    let rank = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len());
    Some(latencies[rank - 1])
}

/// Ids that appear more than once.
pub fn duplicate_ids(ids: &[String]) -> usize {
    let mut seen = HashSet::new();
    ids.iter().filter(|id| !seen.insert(id.as_str())).count()
}
