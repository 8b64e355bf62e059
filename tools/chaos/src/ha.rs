//! Scenarios 14–16, the HA mode (`mesh-chaos --ha`, `make chaos-ha`): the mesh on the stores
//! `make up-ha` runs (a Patroni cluster and Redis under Sentinel, `mesh_testkit::ha`), with the
//! gateways finding the inference replicas through DNS discovery.
//!
//! - 14, `kill -9` of the PostgreSQL primary's postmaster under load (Patroni promotes the
//!   standby): predictions keep flowing, writes resume on the new primary (a committed write
//!   through the multi-host URL, a `PutFeatures` through the features service, the logger's
//!   records) without a restart of any mesh service, and every served record is on the new
//!   primary exactly once. Failover time: from the kill until the new primary commits a write.
//! - 15, `kill -9` of the Redis master under load (the Sentinels promote the replica): no
//!   request fails beyond the Redis-down behaviour (features from memory and PostgreSQL), and
//!   the features service follows the new master (a write-through lands there).
//! - 16, inference scaled 2 → 3 → 1 under load through DNS discovery: the gateways are given
//!   `dns:///inference.chaos.test:<port>`; the third replica's address is published before it
//!   listens and must take no call before it is SERVING; scaling down, one replica leaves DNS
//!   and is stopped (SIGTERM), the other leaves DNS but keeps running and must drain out by
//!   discovery alone; at the end it is put back.
//!
//! Which resolver, and why it does not change the machine: every gateway runs under
//! `unshare --mount` with a private hosts file bind-mounted over `/etc/hosts` ([`DnsHosts`]);
//! the gateway resolves through the system resolver (`getaddrinfo`, which reads `/etc/hosts`
//! on every lookup). The suite rewrites that file in place (same inode, fixed size, one write),
//! so the bind mount sees each change; nothing outside the gateways' mount namespaces sees
//! it. The replicas listen on one port on 127.0.0.2, .3 and .4 (Linux routes 127/8 to `lo`),
//! as pods behind a headless Service share a port on addresses of their own.
//!
//! Every fault is real (`kill -9` of the store processes, replicas started and stopped). The
//! HA mode needs Debian's `patroni`, `etcd-server` and `redis-sentinel`
//! (`scripts/bootstrap.sh --ha`); a plain `make chaos` runs none of this and needs none of them.

pub mod failover;
pub mod scaling;

use std::ffi::OsString;
use std::io::{Seek as _, SeekFrom, Write as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::mesh::Mesh;
use crate::Check;

/// Names of scenarios 14, 15, 16.
pub const NAMES: [&str; 3] = [
    "kill -9 PostgreSQL primary (Patroni failover)",
    "kill -9 Redis master (Sentinel failover)",
    "inference scaled 2 -> 3 -> 1 via DNS discovery",
];

/// The first HA scenario.
pub const FIRST: u8 = 14;

/// The last HA scenario.
pub const LAST: u8 = 16;

/// The gateways' `MESH_DISCOVERY_INTERVAL_MS` in the HA mode (the default is 5 s; the chaos
/// time scale is shorter).
pub const DISCOVERY_INTERVAL_MS: u64 = 1000;

/// The name the gateways resolve.
pub const NAME: &str = "inference.chaos.test";

/// The hosts file is always written as exactly this many bytes (content, then a comment of
/// spaces), in one write at offset 0 without truncating: a reader never sees it empty or short.
const HOSTS_SIZE: usize = 1024;

/// Replica `n`'s address: 127.0.0.(n+1).
pub fn replica_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n + 1)
}

/// A port free on 127.0.0.2, .3 and .4 alike, for which `claim` returns true (the caller's
/// record of ports handed out).
pub fn shared_port(mut claim: impl FnMut(u16) -> bool) -> anyhow::Result<u16> {
    for _ in 0..50 {
        let first = std::net::TcpListener::bind((replica_ip(1), 0))
            .context("bind 127.0.0.2 (Linux routes 127/8 to lo)")?;
        let port = first.local_addr()?.port();
        let others_free =
            (2..=3).all(|n| std::net::TcpListener::bind((replica_ip(n), port)).is_ok());
        if others_free && claim(port) {
            return Ok(port);
        }
    }
    anyhow::bail!("no port free on 127.0.0.2, .3 and .4 in 50 tries")
}

/// The gateways' private hosts file: [`NAME`] → the replicas in DNS now.
pub struct DnsHosts {
    /// The file bind-mounted over `/etc/hosts` in each gateway's mount namespace.
    pub path: PathBuf,
    /// The replicas' port.
    pub port: u16,
}

impl DnsHosts {
    /// Writes the file in `dir` with replicas 1 and 2.
    pub fn create(dir: &Path, port: u16) -> anyhow::Result<Self> {
        let hosts = Self {
            path: dir.join("hosts"),
            port,
        };
        std::fs::write(&hosts.path, vec![b' '; HOSTS_SIZE])?;
        hosts.set(&[1, 2])?;
        Ok(hosts)
    }

    /// Puts exactly `replicas` (numbers, see [`replica_ip`]) behind the name, rewriting the file
    /// in place: same inode (a bind mount follows the inode, not the name), same size.
    pub fn set(&self, replicas: &[u8]) -> anyhow::Result<()> {
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for n in replicas {
            text.push_str(&format!("{} {NAME}\n", replica_ip(*n)));
        }
        text.push('#');
        anyhow::ensure!(text.len() < HOSTS_SIZE, "hosts file too long");
        let mut bytes = text.into_bytes();
        bytes.resize(HOSTS_SIZE - 1, b' ');
        bytes.push(b'\n');
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .with_context(|| format!("{}", self.path.display()))?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&bytes)?;
        Ok(())
    }

    /// `dns:///inference.chaos.test:<port>`.
    pub fn target(&self) -> String {
        format!("dns:///{NAME}:{}", self.port)
    }

    /// The replicas' URL as the gateway names them.
    pub fn replica_url(&self, n: u8) -> String {
        format!("http://{}:{}", replica_ip(n), self.port)
    }

    /// "inference.chaos.test → 127.0.0.2, 127.0.0.3 on port P".
    pub fn describe(&self) -> String {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let ips: Vec<&str> = text
            .lines()
            .filter(|l| l.ends_with(NAME))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        format!("{NAME} -> {} on port {}", ips.join(", "), self.port)
    }

    /// The wrapper a gateway runs under: a new mount namespace (private propagation, so the
    /// mount is seen by nothing else), the hosts file bind-mounted over `/etc/hosts`, then
    /// `exec` of the gateway (the PID stays the gateway's). Not root: a user namespace too.
    pub fn wrapper(&self) -> Vec<OsString> {
        let mut argv: Vec<OsString> = vec!["unshare".into(), "--mount".into()];
        #[allow(unsafe_code)]
        // SAFETY: geteuid(2) takes no arguments and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            argv.push("--map-root-user".into());
        }
        argv.extend(
            [
                "--",
                "sh",
                "-c",
                r#"mount --bind "$0" /etc/hosts && exec "$1""#,
            ]
            .map(OsString::from),
        );
        argv.push(self.path.clone().into_os_string());
        argv
    }
}

/// The PIDs of the mesh's services, to show that none was restarted.
pub fn pids(mesh: &Mesh) -> Vec<(String, Option<u32>)> {
    mesh.services()
        .iter()
        .map(|s| (s.name.clone(), s.pid()))
        .collect()
}

/// No mesh service restarted: every one alive with the PID it had before the fault.
pub fn no_restart_check(mesh: &mut Mesh, before: &[(String, Option<u32>)]) -> Check {
    let mut changed = Vec::new();
    for service in mesh.services_mut() {
        let was = before
            .iter()
            .find(|(name, _)| *name == service.name)
            .and_then(|(_, pid)| *pid);
        if !service.alive() || service.pid() != was || was.is_none() {
            changed.push(format!("{} ({was:?} -> {:?})", service.name, service.pid()));
        }
    }
    Check {
        what: format!(
            "no mesh service restarted: all {} alive with the PIDs they had before the fault{}",
            before.len(),
            if changed.is_empty() {
                String::new()
            } else {
                format!(" (changed: {})", changed.join(", "))
            }
        ),
        pass: changed.is_empty(),
        invariant: true,
    }
}

/// Definitions of the HA scenarios' figures, for summary.md.
pub const DEFINITIONS: &str = "
- **scenarios 14–16** (`--ha`): the stores are `make up-ha`'s, started by `mesh_testkit::ha`: a
  Patroni cluster (one etcd, a primary and a synchronous standby; `ttl` 10 s, `loop_wait` 1 s,
  `retry_timeout` 3 s, `primary_start_timeout` 0) that every service reaches through one
  multi-host URL with `target_session_attrs=read-write`, and Redis (a master and a replica)
  under three Sentinels (quorum 2, `down-after-milliseconds` 1000) that the features service
  follows (`MESH_REDIS_SENTINELS`, `MESH_REDIS_MASTER_NAME`). Both gateways find the inference
  replicas through DNS discovery (`dns:///inference.chaos.test:<port>`, re-resolved every 1 s),
  each under `unshare --mount` with a private hosts file bind-mounted over `/etc/hosts`.
  No mesh service may be restarted in these scenarios (same PIDs before and after: invariant).
- **scenario 14**: `kill -9` of the primary's postmaster (Patroni stays up). Failover time (the
  fault column): from the kill until a write through the multi-host URL commits on another
  member (target < 15 s). Also measured: until the features service accepts a `PutFeatures`
  (invariant: within 30 s of the failover), and until the logger's first record is committed on
  the new primary (`logged_at` after the kill). Time to recover (14 and 15: nothing is lifted):
  from the kill until the first 1 s window, after the last request of the fault time that did
  not succeed within its deadline, in which every request did (0 if none failed). Found
  is read through the same URL, i.e. on the new primary; exactly once: the served ids have as
  many rows there as distinct ids (`predictions`' key is (id, served_at), so a second row for an
  id is possible and counted). Afterwards the suite waits for the old primary to rejoin as the
  synchronous standby (time noted).
- **scenario 15**: `kill -9` of the Redis master. Failover time: from the kill until the first
  Sentinel names another master. Then a `PutFeatures` is repeated until its write-through
  version is on the new master (the version key read there equals the entity's version in
  PostgreSQL): the features service followed Sentinel (invariant, within 20 s). Time to recover
  as in 14. The killed master is not restarted (the HA mode's Redis has no replica after it).
- **scenario 16**: scale up: the third address (127.0.0.4) is put in DNS first, then its replica
  is started (a Service publishing not-ready addresses: the hardest order); it must take no
  call before the gateway's health watch sees it SERVING (`mesh_replica_calls_total` of it with
  verdict failure stays 0), and then take calls. Halfway through the fault time, scale down to
  one: 127.0.0.3 and .4 leave DNS, inference-3 gets SIGTERM at once, inference-2 keeps running
  and must take no ModelInfer from one deadline after the gateway dropped it to the end of the
  fault (it drained out by discovery alone). Lift: 127.0.0.3 back in DNS (inference-2 rejoins).
  inference-3 is not scraped by Prometheus (its port was not known when Prometheus started).
";
