//! The service processes mesh-chaos starts: each one spawned from `target/<profile>/<binary>`
//! with its `MESH_*` environment, its output appended to `chaos-results/logs/<name>.log`, and
//! signalled only through the PID of the child we spawned and have not reaped. A service may
//! listen on another loopback address than 127.0.0.1 ([`Service::on`]) and may be started
//! through a wrapper that `exec`s it ([`Service::wrapped`]), so the PID is still the service's.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use mesh_testkit::procs::children_of;

/// Sends `signal` to `pid`. Callers pass only PIDs of children they spawned and have not
/// reaped (checked with `try_wait` first), so the PID cannot belong to another process.
#[allow(unsafe_code)]
pub fn send_signal(pid: u32, signal: i32) -> bool {
    // SAFETY: kill(2) takes two integers and has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, signal) == 0 }
}

/// One service process (restartable with the same environment and port).
pub struct Service {
    /// Name in logs and reports (`gateway`, `inference-1`, …).
    pub name: String,
    /// Its gRPC port on [`Service::ip`].
    pub port: u16,
    /// Its metrics port on 127.0.0.1.
    pub metrics_port: u16,
    /// The loopback address its gRPC port listens on (127.0.0.1 unless [`Service::on`]).
    pub ip: Ipv4Addr,
    /// Program and arguments run in front of the binary (which they must `exec`).
    wrapper: Vec<OsString>,
    binary: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Service {
    /// A service not yet started.
    pub fn new(
        name: &str,
        binary: &Path,
        port: u16,
        metrics_port: u16,
        env: Vec<(String, String)>,
        logs: &Path,
    ) -> Self {
        Self {
            name: name.to_owned(),
            port,
            metrics_port,
            ip: Ipv4Addr::LOCALHOST,
            wrapper: Vec::new(),
            binary: binary.to_owned(),
            env,
            log: logs.join(format!("{name}.log")),
            child: None,
            starts: 0,
        }
    }

    /// Another process of the same binary, wrapper and environment (one more replica, say),
    /// with `overrides` replacing or adding variables; not started.
    pub fn like(
        &self,
        name: &str,
        port: u16,
        metrics_port: u16,
        overrides: &[(&str, String)],
        logs: &Path,
    ) -> Self {
        let mut env: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(k, _)| !overrides.iter().any(|(o, _)| o == k))
            .cloned()
            .collect();
        env.extend(overrides.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        Self::new(name, &self.binary, port, metrics_port, env, logs)
            .on(self.ip)
            .wrapped(self.wrapper.clone())
    }

    /// Listens on `ip` (another loopback address: Linux routes all of 127/8 to `lo`).
    pub fn on(mut self, ip: Ipv4Addr) -> Self {
        self.ip = ip;
        self
    }

    /// Started as `wrapper… <binary>`; the wrapper must `exec` the binary, so that the PID this
    /// program holds and signals is the service's own.
    pub fn wrapped(mut self, wrapper: Vec<OsString>) -> Self {
        self.wrapper = wrapper;
        self
    }

    /// `http://<ip>:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.ip, self.port)
    }

    /// The PID of the running child, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process (again, on the same port, with the same environment).
    pub fn start(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "{} is already running", self.name);
        let mut log = OpenOptions::new()
            .create(true)
            .write(true)
            .append(self.starts > 0)
            .truncate(self.starts == 0)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        if self.starts > 0 {
            writeln!(
                log,
                "==== mesh-chaos: restarting {} (start #{}) at unix ms {} ====",
                self.name,
                self.starts + 1,
                crate::unix_ms()
            )?;
        }
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(&self.binary);
                cmd
            }
            None => Command::new(&self.binary),
        };
        // The service's configuration is exactly what we pass: drop inherited MESH_* settings.
        for (key, _) in std::env::vars() {
            if key.starts_with("MESH_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("MESH_LISTEN_ADDR", format!("{}:{}", self.ip, self.port))
            .env(
                "MESH_METRICS_ADDR",
                format!("127.0.0.1:{}", self.metrics_port),
            )
            .env("MESH_LOG_FORMAT", "json")
            .env("OTEL_SERVICE_NAME", &self.name)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    /// Whether the child is still running: not exited (`try_wait`) and `kill -0` succeeds.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(child) => match child.try_wait() {
                Ok(None) => send_signal(child.id(), 0),
                _ => false,
            },
        }
    }

    /// Sends `signal` to the running child (no wait).
    pub fn signal(&mut self, signal: i32) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)) && send_signal(child.id(), signal),
            None => false,
        }
    }

    /// `kill -9`, then reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                send_signal(child.id(), libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }

    /// Polls until the child has exited (reaping it) or `timeout` passes; true if it exited.
    pub async fn wait_exit(&mut self, timeout: Duration) -> bool {
        let started = Instant::now();
        loop {
            match self.child.as_mut().map(Child::try_wait) {
                None => return true,
                Some(Ok(Some(_))) | Some(Err(_)) => {
                    self.child = None;
                    return true;
                }
                Some(Ok(None)) => {}
            }
            if started.elapsed() >= timeout {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace` (blocking).
    pub fn terminate(&mut self, grace: Duration) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                send_signal(child.id(), libc::SIGTERM);
                let started = Instant::now();
                while started.elapsed() < grace {
                    if !matches!(child.try_wait(), Ok(None)) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                send_signal(child.id(), libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(15));
    }
}

/// Runs `meshctl health --url … --wait-secs N`; true when it reported SERVING.
pub async fn wait_serving(meshctl: &Path, url: &str, wait_secs: u64) -> bool {
    tokio::process::Command::new(meshctl)
        .args([
            "health",
            "--url",
            url,
            "--wait-secs",
            &wait_secs.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Resident set size of `pid` in KiB (`VmRSS` in `/proc/<pid>/status`), if readable.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// A process and its children stopped with SIGSTOP; dropping it sends SIGCONT to all of them,
/// so the processes resume whatever happens to the scenario (error, Ctrl-C) in between.
pub struct Frozen {
    pids: Vec<u32>,
}

impl Frozen {
    /// SIGSTOPs `pid` first (so it forks no new children), then each of its children.
    /// `pid` must be a process this program started (or a child of one).
    pub fn stop(pid: u32) -> Self {
        let mut pids = Vec::new();
        if send_signal(pid, libc::SIGSTOP) {
            pids.push(pid);
        }
        // Twice: a child forked just before the parent stopped shows up on the second pass.
        for _ in 0..2 {
            for child in children_of(pid) {
                if !pids.contains(&child) && send_signal(child, libc::SIGSTOP) {
                    pids.push(child);
                }
            }
        }
        Self { pids }
    }

    /// How many processes are stopped.
    pub fn count(&self) -> usize {
        self.pids.len()
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // Children first, then the parent, so the parent finds them running when it resumes.
        for pid in self.pids.iter().rev() {
            send_signal(*pid, libc::SIGCONT);
        }
    }
}
