//! Test harness: real Redis and PostgreSQL servers on free loopback ports, each in its own
//! temporary directory and stopped (by the PID this harness started) when dropped, even when
//! the test panics.
//!
//! PostgreSQL refuses to run as root; when the tests run as root the server runs as the
//! unprivileged `postgres` user (override with `MESH_PG_USER`). Binaries are found through
//! `MESH_PG_BIN` (the directory holding `initdb`/`postgres`) and `PATH` for `redis-server`.
//!
//! # Layout
//! - this module: [`RedisServer`], [`PostgresServer`], [`http_get`].
//! - [`ha`]: the HA stores of `make up-ha`: a Patroni cluster, Redis under Sentinel.
//! - [`proxy`]: the fault-injecting TCP proxy (delay, hold, refuse).
//! - [`procs`]: processes on this machine, from `/proc` (a process's children).
//! - [`readme`]: the README's configuration table checked against the services' settings.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What can go wrong starting a server.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A binary is missing or failed.
    #[error("{0}")]
    Setup(String),
    /// An I/O error.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// A free TCP port on 127.0.0.1 (bound, then released), below the kernel's ephemeral range and
/// not handed out before by this process.
///
/// A port from the ephemeral range (what binding port 0 gives) can be taken at any moment as
/// the local end of an outgoing connection, between this check and the server's own bind: seen
/// in CI, where a Patroni member's PostgreSQL could not bind its port seconds later. Below that
/// range only another listener can take it.
pub fn free_port() -> Result<u16, HarnessError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    static DRAWS: AtomicU64 = AtomicU64::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOW: u16 = 10_000;
    if ephemeral_low <= LOW + 1_000 {
        return Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
    }
    let span = u64::from(ephemeral_low - LOW);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ (u64::from(std::process::id()) << 32);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1_000 {
        // splitmix64 over a per-process counter: spread, and different in every process.
        let mut x = seed.wrapping_add(
            DRAWS
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        let port = LOW + (x % span) as u16;
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return Ok(port);
        }
    }
    Err(HarnessError::Setup(format!(
        "no free loopback port in {LOW}..{ephemeral_low} after 1000 tries"
    )))
}

fn wait_for_port(port: u16, timeout: Duration, what: &str) -> Result<(), HarnessError> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(HarnessError::Setup(format!(
        "{what} did not accept connections on port {port} within {timeout:?}"
    )))
}

/// A redis-server on a loopback port, without persistence.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server on a free port.
    pub fn start() -> Result<Self, HarnessError> {
        let port = free_port()?;
        Self::start_on(port)
    }

    /// Starts a server on `port` (used to restart one where clients expect it).
    pub fn start_on(port: u16) -> Result<Self, HarnessError> {
        let dir = tempfile::tempdir()?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                HarnessError::Setup(format!(
                    "cannot start redis-server ({e}); run scripts/bootstrap.sh to install it"
                ))
            })?;
        let mut server = Self {
            child: Some(child),
            port,
            _dir: dir,
        };
        if let Err(e) = wait_for_port(port, Duration::from_secs(10), "redis-server") {
            server.stop();
            return Err(e);
        }
        Ok(server)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops it now (SIGTERM, then SIGKILL after 10 s).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, libc::SIGTERM);
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A PostgreSQL server in a fresh temporary cluster, with `fsync=off` (tests only).
pub struct PostgresServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    run_as: Option<(u32, u32)>,
}

impl PostgresServer {
    /// Creates a cluster (`initdb`) and starts it on a free port.
    pub fn start() -> Result<Self, HarnessError> {
        let bin = pg_bin()?;
        let run_as = unprivileged_user()?;
        let dir = tempfile::Builder::new().prefix("mesh-pg-").tempdir()?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_user(&mut initdb, run_as);
        let out = initdb.output()?;
        if !out.status.success() {
            return Err(HarnessError::Setup(format!(
                "initdb in {} failed (the PostgreSQL user must be able to enter it; TMPDIR \
                 picks its parent): {}",
                dir.path().display(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let port = free_port()?;
        let mut server = Self {
            child: None,
            port,
            dir,
            bin,
            run_as,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), HarnessError> {
        let data = self.dir.path().join("data");
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1"])
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(self.log_file()?);
        as_user(&mut cmd, self.run_as);
        self.child = Some(cmd.spawn().map_err(|e| {
            HarnessError::Setup(format!(
                "cannot start postgres from {}: {e}",
                self.bin.display()
            ))
        })?);
        // Accepting TCP is not enough: wait until it accepts a real login.
        let started = Instant::now();
        loop {
            wait_for_port(self.port, Duration::from_secs(20), "postgres")
                .map_err(|e| self.with_log(e))?;
            let ready = Command::new(self.bin.join("pg_isready"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(20) {
                let e = HarnessError::Setup("postgres never became ready".into());
                return Err(self.with_log(e));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's stderr, appended across restarts, so a failed start can say why.
    fn log_file(&self) -> Result<std::fs::File, HarnessError> {
        let path = self.dir.path().join("postgres.log");
        Ok(std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?)
    }

    /// `e` with the last lines of the server's log: the reason, not just the symptom.
    fn with_log(&self, e: HarnessError) -> HarnessError {
        let log = std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(10)..].join("\n");
        HarnessError::Setup(format!("{e}; the end of postgres's log:\n{tail}"))
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for the `postgres` database and user.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (fast shutdown), keeping its data for [`PostgresServer::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT is PostgreSQL's "fast" shutdown: abort transactions, exit cleanly.
            stop_child(&mut child, libc::SIGINT);
        }
    }

    /// Starts the stopped server again on the same port with the same data.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop();
        self.spawn()
    }

    /// The data directory's parent (for logs when debugging).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn pg_bin() -> Result<PathBuf, HarnessError> {
    if let Some(dir) = std::env::var_os("MESH_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| HarnessError::Setup("PostgreSQL not found under /usr/lib/postgresql; run scripts/bootstrap.sh or set MESH_PG_BIN".into()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found
        .pop()
        .ok_or_else(|| HarnessError::Setup("no initdb under /usr/lib/postgresql/*/bin".into()))
}

/// `(uid, gid)` to run PostgreSQL as when we are root; `None` when we are not.
fn unprivileged_user() -> Result<Option<(u32, u32)>, HarnessError> {
    #[allow(unsafe_code)]
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Ok(None);
    }
    let user = std::env::var("MESH_PG_USER").unwrap_or_else(|_| "postgres".into());
    let id = |flag: &str| -> Result<u32, HarnessError> {
        let out = Command::new("id").arg(flag).arg(&user).output()?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| {
                HarnessError::Setup(format!(
                    "running as root and no user {user:?} to run PostgreSQL as"
                ))
            })
    };
    Ok(Some((id("-u")?, id("-g")?)))
}

fn as_user(cmd: &mut Command, run_as: Option<(u32, u32)>) {
    use std::os::unix::process::CommandExt as _;
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid).gid(gid);
        // The tests' working directory may be unreadable to that user.
        cmd.current_dir("/");
    }
}

/// `GET path` on an HTTP/1.1 endpoint at `addr` (a service's metrics port), with
/// `Connection: close`: the status code and the body. Fails if no full answer comes `within`.
pub async fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
    within: Duration,
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        let response = String::from_utf8_lossy(&raw);
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(within, fetch).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("GET {path} on {addr}: no answer within {within:?}"),
        )
    })?
}

pub mod ha;
pub mod procs;
mod signal;

pub use signal::sigterm;
use signal::{stop_child, unsafe_kill};
pub mod proxy;

/// The README's configuration table and the services' settings tables.
pub mod readme {
    use mesh_runtime::config::{Default, Setting};

    /// Checks a README configuration table (rows `` | `VAR` | services | default | meaning | ``)
    /// against `service`'s settings table: every setting has a row naming the service whose
    /// default cell says the table's default. Returns each disagreement. tests/config.rs calls this for every service, so the documentation cannot drift from the code.
    pub fn check_readme_table(readme: &str, service: &str, table: &[Setting]) -> Vec<String> {
        let rows: Vec<Vec<String>> = readme
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                l.trim_matches('|')
                    .split(" | ")
                    .map(|c| c.trim().to_owned())
                    .collect()
            })
            .collect();
        let mut problems = Vec::new();
        for setting in table {
            let quoted = format!("`{}`", setting.variable);
            let expected = match setting.default {
                Default::Value(v) | Default::Derived(v) | Default::Unset(v) => v,
            };
            let matching = rows.iter().filter(|r| {
                r.len() >= 4
                    && r[0].split(", ").any(|v| v == quoted)
                    && r[1].split([',', '/']).any(|s| {
                        let s = s.trim();
                        s == service || s == "all"
                    })
            });
            let defaults: Vec<&str> = matching.map(|r| r[2].trim_matches('`')).collect();
            if defaults.is_empty() {
                problems.push(format!("{}: no README row for {service}", setting.variable));
            } else if !defaults.contains(&expected) {
                problems.push(format!(
                    "{}: README says default {defaults:?} for {service}, the code {expected:?}",
                    setting.variable
                ));
            }
        }
        problems
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const TABLE: &[Setting] = &[
            Setting::value("MESH_A_MS", "250", "a"),
            Setting::unset("MESH_B", "unset (off)", "b"),
            Setting::value("MESH_C", "4", "c"),
        ];

        #[test]
        fn the_readme_check_finds_missing_rows_and_wrong_defaults() {
            let readme =
                "| `MESH_A_MS` | all | 250 | a |\n| `MESH_C` | gateway, logger | 4 | c |\n";
            let problems = check_readme_table(readme, "gateway", TABLE);
            assert_eq!(
                problems,
                vec!["MESH_B: no README row for gateway".to_owned()]
            );
            let problems = check_readme_table(readme, "features", &TABLE[2..]);
            assert_eq!(
                problems,
                vec!["MESH_C: no README row for features".to_owned()]
            );
            let wrong = "| `MESH_C` | gateway | 5 | c |\n";
            assert_eq!(check_readme_table(wrong, "gateway", &TABLE[2..]).len(), 1);
        }
    }
}
