//! The real mesh as separate processes, configured like `scripts/up.sh` (MESH_* variables), on
//! free loopback ports: PostgreSQL and Redis (mesh-testkit), features, two inference replicas,
//! logger and gateway. Dropping it stops everything it started, services first (by PID: SIGTERM,
//! then SIGKILL after a timeout), then Redis and PostgreSQL; temporary directories go with it.
//! Every service gets the same random `MESH_INTERNAL_TOKEN`; [`Mesh::internal_token`] is what
//! the suite's direct calls to internal services send as `x-mesh-internal-token`.
//!
//! The mesh runs with the live model registry in its PostgreSQL (`MESH_REGISTRY_DATABASE_URL`
//! on both gateways and both inference replicas) and a random admin key
//! ([`Mesh::admin_key`], id `chaos`). Its models directory is a temporary copy
//! ([`crate::lifecycle::models_dir`]): churn 1 and 2, the broken test versions 90–93, and
//! version 3 (version 2's graph) for scenario 13. A second gateway ([`Mesh::gateway2`]) follows
//! the same registry; scenarios 1–10 load only the first.
//!
//! With `--ha` ([`StoreMode::Ha`]) the stores are the HA ones `make up-ha` runs
//! (`mesh_testkit::ha`): a Patroni cluster (etcd, a primary and a synchronous standby) that every
//! service reaches through one multi-host URL with `target_session_attrs=read-write`, and Redis
//! under three Sentinels that the features service follows (`MESH_REDIS_SENTINELS`,
//! `MESH_REDIS_MASTER_NAME`). The gateways then find the inference replicas through DNS
//! discovery (see [`crate::ha`]): both replicas listen on one port, on 127.0.0.2 and 127.0.0.3,
//! behind one name that each gateway resolves through the system resolver in a private
//! `/etc/hosts` ([`DnsHosts`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use mesh_testkit::ha::{PatroniCluster, SentinelRedis};
use mesh_testkit::proxy::DelayProxy;
use mesh_testkit::{free_port, PostgresServer, RedisServer};

use crate::ha::DnsHosts;
use crate::procs::{wait_serving, Frozen, Service};
use crate::say;

/// Where the binaries and data are.
pub struct Paths {
    /// The repository root.
    pub repo: PathBuf,
    /// `target/<profile>`.
    pub bin: PathBuf,
    /// `chaos-results/logs`.
    pub logs: PathBuf,
}

/// The running mesh.
pub struct Mesh {
    /// Binaries and logs.
    pub paths: Paths,
    /// The gateway.
    pub gateway: Service,
    /// A second gateway (its own spool), following the same registry: the lifecycle scenarios
    /// check that a change reaches every gateway.
    pub gateway2: Service,
    /// The prediction logger.
    pub logger: Service,
    /// The feature store.
    pub features: Service,
    /// Inference replica 1 (the gateway calls it directly).
    pub inference1: Service,
    /// Inference replica 2 (the gateway calls it through [`Mesh::proxy`]).
    pub inference2: Service,
    /// THE ONE INJECTED FAKE: a TCP proxy in this process between the gateway and inference
    /// replica 2. A real replica cannot be told to be slow, so scenario 4 adds latency here.
    /// Every other fault is real (processes killed, servers stopped).
    pub proxy: DelayProxy,
    /// PostgreSQL (the features' source of truth, the prediction log, the model registry) and
    /// Redis.
    pub stores: Stores,
    /// `--ha`: the name the gateways resolve to find the inference replicas, in their private
    /// `/etc/hosts`.
    pub dns: Option<DnsHosts>,
    /// The internal credential every service was started with.
    pub internal_token: String,
    /// The admin key (`x-admin-key`) both gateways accept for `mesh.admin.v1.ModelAdmin`.
    pub admin_key: String,
    /// The models directory every service reads (a temporary copy).
    pub models: PathBuf,
    /// Holds the gateway's spool (`MESH_SPOOL_DIR`).
    _tmp: tempfile::TempDir,
}

/// Which stores the mesh runs on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum StoreMode {
    /// One PostgreSQL, one Redis (scenarios 0–13).
    Single,
    /// Patroni and Sentinel (scenarios 14–16, `--ha`).
    Ha,
}

/// The stores, as started.
pub enum Stores {
    /// One PostgreSQL, one Redis.
    Single {
        /// PostgreSQL.
        pg: PostgresServer,
        /// Redis (`None` while stopped).
        redis: Option<RedisServer>,
        /// Redis's port, kept across restarts.
        redis_port: u16,
    },
    /// PostgreSQL on Patroni, Redis under Sentinel.
    Ha {
        /// etcd, a primary and a synchronous standby.
        pg: PatroniCluster,
        /// A master, a replica and three Sentinels.
        redis: SentinelRedis,
    },
}

impl Stores {
    async fn start(mode: StoreMode) -> anyhow::Result<Self> {
        Ok(match mode {
            StoreMode::Single => {
                let pg = tokio::task::block_in_place(PostgresServer::start)
                    .context("cannot start PostgreSQL")?;
                let redis = tokio::task::block_in_place(RedisServer::start)
                    .context("cannot start Redis")?;
                say!(
                    "PostgreSQL on 127.0.0.1:{}, Redis on 127.0.0.1:{}",
                    pg.port(),
                    redis.port()
                );
                let redis_port = redis.port();
                Self::Single {
                    pg,
                    redis: Some(redis),
                    redis_port,
                }
            }
            StoreMode::Ha => {
                let started = std::time::Instant::now();
                let pg = tokio::task::block_in_place(PatroniCluster::start).context(
                    "cannot start the Patroni cluster (scripts/bootstrap.sh --ha installs patroni and etcd)",
                )?;
                let redis = tokio::task::block_in_place(SentinelRedis::start).context(
                    "cannot start Redis under Sentinel (scripts/bootstrap.sh --ha installs redis-sentinel)",
                )?;
                say!(
                    "HA stores up in {:.1} s: Patroni (primary on 127.0.0.1:{}, {}; logs in {}), Redis master 127.0.0.1:{} with a replica, Sentinels {}",
                    started.elapsed().as_secs_f64(),
                    pg.primary_port().unwrap_or_default(),
                    pg.url(),
                    pg.dir().display(),
                    redis.master_port().unwrap_or_default(),
                    redis.sentinels()
                );
                Self::Ha { pg, redis }
            }
        })
    }

    /// The URL every service is given (`MESH_DATABASE_URL`, `MESH_REGISTRY_DATABASE_URL`).
    pub fn db_url(&self) -> String {
        match self {
            Self::Single { pg, .. } => pg.url(),
            Self::Ha { pg, .. } => pg.url(),
        }
    }

    /// The features service's Redis settings.
    fn redis_env(&self) -> Vec<(&'static str, String)> {
        match self {
            Self::Single { redis_port, .. } => {
                vec![("MESH_REDIS_URL", format!("redis://127.0.0.1:{redis_port}"))]
            }
            Self::Ha { redis, .. } => vec![
                ("MESH_REDIS_SENTINELS", redis.sentinels()),
                (
                    "MESH_REDIS_MASTER_NAME",
                    mesh_testkit::ha::MASTER_NAME.to_owned(),
                ),
            ],
        }
    }
}

impl Mesh {
    /// Starts everything and waits until every service reports SERVING.
    pub async fn start(paths: Paths, mode: StoreMode) -> anyhow::Result<Self> {
        for binary in [
            "mesh-gateway",
            "mesh-features",
            "mesh-inference",
            "mesh-logger",
            "meshctl",
            "mesh-bench",
        ] {
            if !paths.bin.join(binary).exists() {
                bail!(
                    "{} is missing: build first (scripts/chaos.sh does)",
                    paths.bin.join(binary).display()
                );
            }
        }
        if std::env::var_os("ORT_DYLIB_PATH").is_none() {
            bail!("ORT_DYLIB_PATH is not set: `source .tools/env` first (scripts/chaos.sh does)");
        }
        std::fs::create_dir_all(&paths.logs)?;
        crate::tempspace::check(&std::env::temp_dir())?;
        let stores = Stores::start(mode).await?;
        let db_url = stores.db_url();
        let tmp = tempfile::Builder::new().prefix("mesh-chaos-").tempdir()?;
        let spool = tmp.path().join("spool");
        std::fs::create_dir_all(&spool)?;
        let spool2 = tmp.path().join("spool-2");
        std::fs::create_dir_all(&spool2)?;
        let models = crate::lifecycle::models_dir(&paths.repo, tmp.path())?;

        let internal_token = random_token()?;
        let admin_key = random_token()?;
        let common = |extra: &[(&str, String)]| -> Vec<(String, String)> {
            let mut env = vec![
                ("MESH_MODELS_DIR".to_owned(), models.display().to_string()),
                ("MESH_INTERNAL_TOKEN".to_owned(), internal_token.clone()),
            ];
            env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
            env
        };
        // `free_port` binds and releases, so two calls can return the same port before either
        // service has bound it (seen: the logger and inference-2 given one port). Every port
        // handed out here is distinct.
        let taken = std::cell::RefCell::new(std::collections::HashSet::new());
        let distinct = || -> anyhow::Result<u16> {
            loop {
                let port = free_port()?;
                if taken.borrow_mut().insert(port) {
                    return Ok(port);
                }
            }
        };
        let ports = || -> anyhow::Result<(u16, u16)> { Ok((distinct()?, distinct()?)) };
        let bin = |name: &str| paths.bin.join(name);
        // --ha: both replicas on one port, on addresses of their own, behind one name.
        let dns = match mode {
            StoreMode::Single => None,
            StoreMode::Ha => {
                let port = crate::ha::shared_port(|p| taken.borrow_mut().insert(p))?;
                Some(DnsHosts::create(tmp.path(), port)?)
            }
        };
        let mut inference = Vec::new();
        for n in 1..=2u8 {
            let port = match &dns {
                Some(d) => d.port,
                None => distinct()?,
            };
            let service = Service::new(
                &format!("inference-{n}"),
                &bin("mesh-inference"),
                port,
                distinct()?,
                common(&[
                    ("MESH_REPLICA_ID", format!("inference-{n}")),
                    ("MESH_REGISTRY_DATABASE_URL", db_url.clone()),
                ]),
                &paths.logs,
            );
            inference.push(match &dns {
                Some(_) => service.on(crate::ha::replica_ip(n)),
                None => service,
            });
        }
        let mut inference2 = inference.pop().context("two replicas")?;
        let mut inference1 = inference.pop().context("two replicas")?;
        let mut features_env = vec![("MESH_DATABASE_URL", db_url.clone())];
        features_env.extend(stores.redis_env());
        let (p, m) = ports()?;
        let mut features = Service::new(
            "features",
            &bin("mesh-features"),
            p,
            m,
            common(&features_env),
            &paths.logs,
        );
        let (p, m) = ports()?;
        let mut logger = Service::new(
            "logger",
            &bin("mesh-logger"),
            p,
            m,
            common(&[("MESH_DATABASE_URL", db_url.clone())]),
            &paths.logs,
        );
        inference1.start()?;
        inference2.start()?;
        features.start()?;
        logger.start()?;
        // The injected fake: replica 2 is reached through this proxy (see `Mesh::proxy`); with
        // --ha the gateways find the replicas through DNS instead and the proxy is not used.
        let proxy = DelayProxy::start((inference2.ip, inference2.port).into()).await?;
        let inference_urls = match &dns {
            Some(d) => {
                say!(
                    "--ha: the gateways resolve {} in a private /etc/hosts ({}: {}); no injected proxy",
                    d.target(),
                    d.path.display(),
                    d.describe()
                );
                d.target()
            }
            None => {
                say!(
                    "injected fake: DelayProxy {} -> inference-2 127.0.0.1:{} (adds latency in scenario 4; every other fault is real)",
                    proxy.addr(),
                    inference2.port
                );
                format!("{},{}", inference1.url(), proxy.url())
            }
        };
        let gateway_env = |spool: &Path| {
            let mut env = common(&[
                ("MESH_FEATURES_URL", features.url()),
                ("MESH_INFERENCE_URLS", inference_urls.clone()),
                ("MESH_LOGGER_URL", logger.url()),
                ("MESH_SPOOL_DIR", spool.display().to_string()),
                (
                    "MESH_SPOOL_MAX_BYTES",
                    crate::tempspace::SPOOL_MAX_BYTES.to_string(),
                ),
                ("MESH_REGISTRY_DATABASE_URL", db_url.clone()),
                ("MESH_ADMIN_KEYS", format!("chaos:{admin_key}")),
            ]);
            if dns.is_some() {
                env.push((
                    "MESH_DISCOVERY_INTERVAL_MS".into(),
                    crate::ha::DISCOVERY_INTERVAL_MS.to_string(),
                ));
            }
            env
        };
        let gateway_service = |name: &str, spool: &Path| -> anyhow::Result<Service> {
            let (p, m) = ports()?;
            let service = Service::new(
                name,
                &bin("mesh-gateway"),
                p,
                m,
                gateway_env(spool),
                &paths.logs,
            );
            Ok(match &dns {
                Some(d) => service.wrapped(d.wrapper()),
                None => service,
            })
        };
        let mut gateway = gateway_service("gateway", &spool)?;
        gateway.start()?;
        let mut gateway2 = gateway_service("gateway-2", &spool2)?;
        gateway2.start()?;
        let mesh = Self {
            paths,
            gateway,
            gateway2,
            logger,
            features,
            inference1,
            inference2,
            proxy,
            stores,
            dns,
            internal_token,
            admin_key,
            models,
            _tmp: tmp,
        };
        for service in mesh.services() {
            if !wait_serving(&mesh.meshctl(), &service.url(), 60).await {
                bail!(
                    "{} on port {} did not become SERVING within 60 s; see {}/{}.log",
                    service.name,
                    service.port,
                    mesh.paths.logs.display(),
                    service.name
                );
            }
        }
        say!(
            "all services SERVING: gateway 127.0.0.1:{} (metrics {}), gateway-2 {}, features {}, inference {} and {}, logger {}; live model registry in PostgreSQL; logs in {}",
            mesh.gateway.port,
            mesh.gateway.metrics_port,
            mesh.gateway2.port,
            mesh.features.port,
            mesh.inference1.port,
            mesh.inference2.port,
            mesh.logger.port,
            mesh.paths.logs.display()
        );
        Ok(mesh)
    }

    /// `target/<profile>/meshctl`.
    pub fn meshctl(&self) -> PathBuf {
        self.paths.bin.join("meshctl")
    }

    /// `target/<profile>/mesh-bench`.
    pub fn bench(&self) -> PathBuf {
        self.paths.bin.join("mesh-bench")
    }

    /// The services, in start order (the gateways last).
    pub fn services(&self) -> [&Service; 6] {
        [
            &self.features,
            &self.inference1,
            &self.inference2,
            &self.logger,
            &self.gateway,
            &self.gateway2,
        ]
    }

    /// The services, mutable.
    pub fn services_mut(&mut self) -> [&mut Service; 6] {
        [
            &mut self.features,
            &mut self.inference1,
            &mut self.inference2,
            &mut self.logger,
            &mut self.gateway,
            &mut self.gateway2,
        ]
    }

    /// Seeds the demo entities through `meshctl seed`.
    pub async fn seed(&self, file: &Path) -> anyhow::Result<()> {
        let out = tokio::process::Command::new(self.meshctl())
            .args(["seed", "--features-url", &self.features.url(), "--file"])
            .arg(file)
            .env("MESH_INTERNAL_TOKEN", &self.internal_token)
            .kill_on_drop(true)
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "meshctl seed failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        say!("{}", String::from_utf8_lossy(&out.stdout).trim());
        Ok(())
    }

    /// The URL every service is given for PostgreSQL.
    pub fn db_url(&self) -> String {
        self.stores.db_url()
    }

    /// The single PostgreSQL (scenarios 3 and 9 stop and hang it).
    fn single_pg(&mut self) -> anyhow::Result<&mut PostgresServer> {
        match &mut self.stores {
            Stores::Single { pg, .. } => Ok(pg),
            Stores::Ha { .. } => {
                bail!("this scenario needs the single PostgreSQL (run without --ha)")
            }
        }
    }

    /// Stops Redis (its data goes: it has no persistence, like in `make up`).
    pub fn stop_redis(&mut self) -> anyhow::Result<()> {
        match &mut self.stores {
            Stores::Single { redis, .. } => {
                if let Some(mut redis) = redis.take() {
                    tokio::task::block_in_place(|| redis.stop());
                }
                Ok(())
            }
            Stores::Ha { .. } => bail!("scenario 2 needs the single Redis (run without --ha)"),
        }
    }

    /// Starts Redis again on the same port.
    pub fn start_redis(&mut self) -> anyhow::Result<()> {
        if let Stores::Single {
            redis: redis @ None,
            redis_port,
            ..
        } = &mut self.stores
        {
            let port = *redis_port;
            *redis = Some(tokio::task::block_in_place(|| RedisServer::start_on(port))?);
        }
        Ok(())
    }

    /// Stops PostgreSQL (fast shutdown), keeping its data.
    pub fn stop_pg(&mut self) -> anyhow::Result<()> {
        let pg = self.single_pg()?;
        tokio::task::block_in_place(|| pg.stop());
        Ok(())
    }

    /// Starts PostgreSQL again on the same port with the same data.
    pub fn restart_pg(&mut self) -> anyhow::Result<()> {
        let pg = self.single_pg()?;
        tokio::task::block_in_place(|| pg.restart())?;
        Ok(())
    }

    /// SIGSTOPs PostgreSQL's postmaster and its children (the server hangs: connections stay
    /// open, nothing answers) until the returned guard is dropped. The postmaster's PID comes
    /// from `postmaster.pid` in the cluster this suite created, and must be our own child.
    pub fn freeze_pg(&mut self) -> anyhow::Result<Frozen> {
        let pid_file = self.single_pg()?.dir().join("data").join("postmaster.pid");
        let text = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("cannot read {}", pid_file.display()))?;
        let pid: u32 = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .with_context(|| format!("no PID in {}", pid_file.display()))?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let parent = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        anyhow::ensure!(
            parent == Some(std::process::id()),
            "postmaster {pid} is not a child of mesh-chaos (parent {parent:?}): not signalling it"
        );
        Ok(Frozen::stop(pid))
    }

    /// Restarts any service that is not running (e.g. after a failed scenario); returns names.
    pub async fn revive(&mut self) -> anyhow::Result<Vec<String>> {
        let meshctl = self.meshctl();
        let mut revived = Vec::new();
        for service in self.services_mut() {
            if !service.alive() {
                service.kill9();
                service.start()?;
                wait_serving(&meshctl, &service.url(), 60).await;
                revived.push(service.name.clone());
            }
        }
        Ok(revived)
    }
}

/// 32 random bytes from the kernel, as hex: the internal token for this run.
fn random_token() -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl Drop for Mesh {
    fn drop(&mut self) {
        say!("stopping the mesh (only the processes mesh-chaos started)");
        // Gateway first (it flushes records to the logger), then the logger, then the rest;
        // Redis and PostgreSQL stop when their fields drop, after this.
        let grace = Duration::from_secs(20);
        self.gateway.terminate(grace);
        self.gateway2.terminate(grace);
        self.logger.terminate(grace);
        self.features.terminate(grace);
        self.inference2.terminate(grace);
        self.inference1.terminate(grace);
        self.proxy.set_delay(Duration::ZERO);
    }
}
