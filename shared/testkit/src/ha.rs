//! The HA stores for tests, as `make up-ha` runs them (scripts/ha.sh): a Patroni cluster (one
//! etcd member, a primary and a synchronous standby) and Redis under Sentinel (a master, a
//! replica, three Sentinels), on free loopback ports in a temporary directory, stopped by PID
//! when dropped.
//!
//! Patroni and the PostgreSQL it runs refuse root: when the tests run as root, Patroni runs as
//! the unprivileged `postgres` user (like [`crate::PostgresServer`]). Binaries: `etcd`,
//! `patroni`, `redis-server`, `redis-sentinel`, `redis-cli` on `PATH` (scripts/bootstrap.sh
//! --ha installs them); PostgreSQL from `MESH_PG_BIN` or `/usr/lib/postgresql/*/bin`.

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{
    as_user, free_port, pg_bin, stop_child, unprivileged_user, wait_for_port, HarnessError,
};

/// The Patroni timings of scripts/ha.sh (see its header): `ttl`, `loop_wait`, `retry_timeout`.
pub const PATRONI_TIMINGS: (u32, u32, u32) = (10, 1, 3);

/// One Patroni member: its process, PostgreSQL port and REST port.
struct Member {
    child: Option<Child>,
    pg_port: u16,
    rest_port: u16,
}

/// A Patroni cluster: etcd, a primary and a synchronous standby.
pub struct PatroniCluster {
    members: Vec<Member>,
    etcd: Option<Child>,
    dir: tempfile::TempDir,
}

fn spawn(cmd: &mut Command, log: &Path, what: &str) -> Result<Child, HarnessError> {
    let out = std::fs::File::create(log)?;
    cmd.stdout(out.try_clone()?)
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| {
            HarnessError::Setup(format!(
                "cannot start {what} ({e}); run scripts/bootstrap.sh --ha to install it"
            ))
        })
}

/// `GET path` on 127.0.0.1:`port` with a plain HTTP/1.0 request: status and body, `None` if
/// nothing answered within a second.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

impl PatroniCluster {
    /// Starts etcd and two Patroni members, and waits (at most 90 s) until one is primary and
    /// the other its synchronous standby.
    pub fn start() -> Result<Self, HarnessError> {
        let bin = pg_bin()?;
        let run_as = unprivileged_user()?;
        let dir = tempfile::Builder::new().prefix("mesh-ha-").tempdir()?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        let (etcd_port, peer_port) = (free_port()?, free_port()?);
        let mut etcd = Command::new("etcd");
        let client_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        etcd.arg("--name=mesh-etcd")
            .arg(format!("--data-dir={}", dir.path().join("etcd").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=mesh-etcd={peer_url}"));
        let etcd = spawn(&mut etcd, &dir.path().join("etcd.log"), "etcd")?;
        let mut cluster = Self {
            members: Vec::new(),
            etcd: Some(etcd),
            dir,
        };
        wait_for_port(etcd_port, Duration::from_secs(20), "etcd")?;
        for n in 1..=2 {
            let (pg_port, rest_port) = (free_port()?, free_port()?);
            let yml = cluster.dir.path().join(format!("patroni-{n}.yml"));
            std::fs::write(
                &yml,
                patroni_yml(n, cluster.dir.path(), &bin, etcd_port, pg_port, rest_port),
            )?;
            let mut cmd = Command::new("patroni");
            cmd.arg(&yml);
            as_user(&mut cmd, run_as);
            let log = cluster.dir.path().join(format!("patroni-{n}.log"));
            let child = spawn(&mut cmd, &log, "patroni")?;
            cluster.members.push(Member {
                child: Some(child),
                pg_port,
                rest_port,
            });
        }
        cluster.wait_healthy(Duration::from_secs(90))?;
        Ok(cluster)
    }

    /// Waits until a primary runs with a synchronous standby streaming from it.
    pub fn wait_healthy(&self, within: Duration) -> Result<(), HarnessError> {
        let started = Instant::now();
        loop {
            let roles = self.roles();
            if roles.iter().any(|r| r == "leader") && roles.iter().any(|r| r == "sync_standby") {
                return Ok(());
            }
            if started.elapsed() > within {
                return Err(HarnessError::Setup(format!(
                    "no primary with a synchronous standby within {within:?} (roles {roles:?}); {}",
                    self.log_tails()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Each member's role as Patroni's `/cluster` reports it (`leader`, `sync_standby`,
    /// `replica`), running members only.
    pub fn roles(&self) -> Vec<String> {
        let Some((200, body)) = self
            .members
            .iter()
            .find_map(|m| get(m.rest_port, "/cluster"))
        else {
            return Vec::new();
        };
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&body) else {
            return Vec::new();
        };
        json["members"]
            .as_array()
            .map(|members| {
                members
                    .iter()
                    .filter(|m| m["state"] == "running" || m["state"] == "streaming")
                    .filter_map(|m| m["role"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The multi-host URL the services use: both members, writes only on the primary.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.pg_port))
            .collect();
        format!(
            "postgres://postgres@{}/postgres?target_session_attrs=read-write",
            hosts.join(",")
        )
    }

    /// The PostgreSQL port of the member Patroni says is primary now.
    pub fn primary_port(&self) -> Option<u16> {
        self.members
            .iter()
            .find(|m| matches!(get(m.rest_port, "/primary"), Some((200, _))))
            .map(|m| m.pg_port)
    }

    /// `kill -9` of the primary's postmaster (Patroni stays up and fails over): returns the
    /// old primary's PostgreSQL port.
    pub fn kill_primary_postgres(&self) -> Result<u16, HarnessError> {
        let port = self
            .primary_port()
            .ok_or_else(|| HarnessError::Setup("no primary to kill".into()))?;
        let n = self
            .members
            .iter()
            .position(|m| m.pg_port == port)
            .unwrap_or(0)
            + 1;
        let pid_file = self.dir.path().join(format!("pg-{n}/postmaster.pid"));
        let text = std::fs::read_to_string(&pid_file)?;
        let pid: i32 = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| HarnessError::Setup(format!("no PID in {}", pid_file.display())))?;
        // The postmaster is a child of the Patroni this harness started.
        crate::unsafe_kill(pid, libc::SIGKILL);
        Ok(port)
    }

    /// The last lines of each log (the directory goes with the cluster).
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for name in ["etcd.log", "patroni-1.log", "patroni-2.log"] {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(12)..].join("\n");
            // The first complaints usually say why; the tail says where it ended.
            let errors: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.contains("ERROR") || l.contains("FATAL") || l.contains("WARNING"))
                .take(8)
                .collect();
            out.push_str(&format!(
                "\n--- {name}, first errors:\n{}\n--- {name}, last lines:\n{tail}",
                errors.join("\n")
            ));
        }
        out
    }

    /// The directory holding the logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn patroni_yml(n: u32, dir: &Path, bin: &Path, etcd: u16, pg: u16, rest: u16) -> String {
    let (ttl, loop_wait, retry) = PATRONI_TIMINGS;
    let data = dir.join(format!("pg-{n}"));
    let data = data.display();
    format!(
        r#"scope: mesh
namespace: /mesh/
name: pg-{n}
restapi: {{listen: "127.0.0.1:{rest}", connect_address: "127.0.0.1:{rest}"}}
etcd3: {{hosts: "127.0.0.1:{etcd}"}}
bootstrap:
  dcs:
    ttl: {ttl}
    loop_wait: {loop_wait}
    retry_timeout: {retry}
    primary_start_timeout: 0
    synchronous_mode: true
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters: {{wal_log_hints: "on", max_wal_senders: 5, max_replication_slots: 5, hot_standby: "on", max_connections: 200, fsync: "off"}}
  initdb: [{{encoding: UTF8}}, {{username: postgres}}, {{auth: trust}}]
postgresql:
  listen: "127.0.0.1:{pg}"
  connect_address: "127.0.0.1:{pg}"
  data_dir: "{data}"
  bin_dir: "{bin}"
  pgpass: "{data}.pgpass"
  pg_hba: ["local all all trust", "host all all 127.0.0.1/32 trust", "host replication all 127.0.0.1/32 trust"]
  authentication:
    superuser: {{username: postgres}}
    replication: {{username: postgres}}
    rewind: {{username: postgres}}
  parameters: {{unix_socket_directories: "{dir}"}}
"#,
        bin = bin.display(),
        dir = dir.display(),
    )
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        // Both members at once (neither promotes itself as the other stops), etcd last.
        for member in &self.members {
            if let Some(child) = &member.child {
                crate::unsafe_kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                stop_child(&mut child, libc::SIGTERM);
            }
        }
        if let Some(mut etcd) = self.etcd.take() {
            stop_child(&mut etcd, libc::SIGTERM);
        }
    }
}

/// Redis under Sentinel: a master, a replica, three Sentinels (quorum 2).
pub struct SentinelRedis {
    /// redis-server processes by port (the master first at start).
    servers: Vec<(u16, Option<Child>)>,
    sentinels: Vec<(u16, Option<Child>)>,
    dir: tempfile::TempDir,
}

/// The master's name at the Sentinels.
pub const MASTER_NAME: &str = "mesh";

impl SentinelRedis {
    /// Starts them and waits (at most 30 s) until every Sentinel knows the replica and the
    /// other Sentinels (before that a failover could not be agreed).
    pub fn start() -> Result<Self, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("mesh-sentinel-")
            .tempdir()?;
        let mut this = Self {
            servers: Vec::new(),
            sentinels: Vec::new(),
            dir,
        };
        let master = free_port()?;
        for (i, port) in [master, free_port()?].into_iter().enumerate() {
            let mut cmd = Command::new("redis-server");
            cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                // A replica writes the snapshot it syncs from: into the temporary directory.
                .arg("--dir")
                .arg(this.dir.path());
            if i > 0 {
                cmd.args(["--replicaof", "127.0.0.1", &master.to_string()]);
            }
            let log = this.dir.path().join(format!("redis-{port}.log"));
            this.servers
                .push((port, Some(spawn(&mut cmd, &log, "redis-server")?)));
            wait_for_port(port, Duration::from_secs(10), "redis-server")?;
        }
        for n in 0..3 {
            let port = free_port()?;
            let conf = this.dir.path().join(format!("sentinel-{n}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\nsentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\nsentinel failover-timeout {MASTER_NAME} 5000\n",
                    dir = this.dir.path().display()
                ),
            )?;
            let mut cmd = Command::new("redis-sentinel");
            cmd.arg(&conf);
            let log = this.dir.path().join(format!("sentinel-{n}.log"));
            this.sentinels
                .push((port, Some(spawn(&mut cmd, &log, "redis-sentinel")?)));
            wait_for_port(port, Duration::from_secs(10), "redis-sentinel")?;
        }
        this.wait_settled(Duration::from_secs(30))?;
        Ok(this)
    }

    /// Waits until every Sentinel sees a master with one replica and the two other Sentinels.
    pub fn wait_settled(&self, within: Duration) -> Result<(), HarnessError> {
        let started = Instant::now();
        loop {
            let settled = self.sentinels.iter().all(|(port, _)| {
                let info = redis_cli(*port, &["sentinel", "master", MASTER_NAME]);
                field(&info, "num-slaves") == Some("1")
                    && field(&info, "num-other-sentinels") == Some("2")
                    && field(&info, "flags") == Some("master")
            });
            if settled {
                return Ok(());
            }
            if started.elapsed() > within {
                return Err(HarnessError::Setup(format!(
                    "the Sentinels did not settle within {within:?}; logs in {}",
                    self.dir.path().display()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `host:port` of each Sentinel, comma-separated (`MESH_REDIS_SENTINELS`).
    pub fn sentinels(&self) -> String {
        let all: Vec<String> = self
            .sentinels
            .iter()
            .map(|(p, _)| format!("127.0.0.1:{p}"))
            .collect();
        all.join(",")
    }

    /// The master's port as the first Sentinel names it.
    pub fn master_port(&self) -> Option<u16> {
        let out = redis_cli(
            self.sentinels[0].0,
            &["sentinel", "get-master-addr-by-name", MASTER_NAME],
        );
        out.lines().nth(1)?.trim().parse().ok()
    }

    /// `kill -9` of the master: returns its port.
    pub fn kill_master(&mut self) -> Result<u16, HarnessError> {
        let port = self
            .master_port()
            .ok_or_else(|| HarnessError::Setup("the Sentinels name no master".into()))?;
        let child = self
            .servers
            .iter_mut()
            .find(|(p, _)| *p == port)
            .and_then(|(_, c)| c.take())
            .ok_or_else(|| HarnessError::Setup(format!("the master {port} is not ours")))?;
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        Ok(port)
    }
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The value after `name` in redis-cli's one-item-per-line answer.
fn field<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let mut lines = answer.lines();
    while let Some(line) = lines.next() {
        if line.trim() == name {
            return lines.next().map(str::trim);
        }
    }
    None
}

impl Drop for SentinelRedis {
    fn drop(&mut self) {
        for (_, child) in self.sentinels.iter_mut().chain(self.servers.iter_mut()) {
            if let Some(mut child) = child.take() {
                stop_child(&mut child, libc::SIGTERM);
            }
        }
    }
}
