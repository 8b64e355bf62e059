//! Finding the inference replicas. `MESH_INFERENCE_URLS` lists static URLs (`http://host:port`,
//! connected as given, as before) and DNS names written the way gRPC names them,
//! `dns:///host:port`: a name that resolves to many addresses (a Kubernetes headless Service)
//! is re-resolved every `MESH_DISCOVERY_INTERVAL_MS`, and each address becomes a replica of its
//! own at `http://<address>`, identified by that socket address.
//!
//! What changes goes through [`Membership::apply`], in one place: replicas that appear join the
//! balancer ([`ReplicaSet`]) and the catalog polls ([`ReplicaVersions`]), and take traffic once
//! their `grpc.health.v1` says SERVING (and, for a version, once their catalog lists it ready);
//! replicas that vanish leave both at once, and calls already on their way finish there.
//!
//! A failed or empty answer keeps the name's last good addresses: a resolver hiccup must not
//! empty the balancer. It is logged and counted (`mesh_discovery_resolutions_total`).
//!
//! The resolver is injectable ([`Resolve`]): the system's (`tokio::net::lookup_host`, which
//! reads `/etc/hosts` and the configured DNS servers) by default; tests give a map of their own
//! ([`MapResolver`]) so they can move addresses behind a name without touching the machine.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use mesh_runtime::internal::InternalChannel;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

use super::replicas::ReplicaSet;
use crate::lifecycle::readiness::ReplicaVersions;

/// Longest wait for one name's resolution; past it, the attempt counts as failed.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The scheme of a DNS entry in `MESH_INFERENCE_URLS`.
const DNS_SCHEME: &str = "dns:///";

/// One entry of `MESH_INFERENCE_URLS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A URL connected as given (tonic resolves a host name itself, on each connect).
    Static(String),
    /// `dns:///host:port`: every address the name resolves to is a replica on `port`.
    Dns {
        /// The entry as configured: the name shown in logs and metric labels.
        entry: String,
        /// The name to resolve.
        host: String,
        /// The replicas' port.
        port: u16,
    },
}

impl Target {
    /// Reads one entry; the error says what is wrong with it.
    pub fn parse(entry: &str) -> Result<Self, String> {
        let entry = entry.trim();
        if let Some(rest) = entry.strip_prefix(DNS_SCHEME) {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("{entry:?}: a DNS entry needs a port (dns:///name:port)"))?;
            let port: u16 = port
                .parse()
                .map_err(|_| format!("{entry:?}: {port:?} is not a port"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() || host.contains('/') {
                return Err(format!("{entry:?}: expected dns:///name:port"));
            }
            return Ok(Self::Dns {
                entry: entry.to_owned(),
                host: host.to_owned(),
                port,
            });
        }
        if entry.starts_with("dns:") {
            return Err(format!(
                "{entry:?}: only dns:///name:port is understood (the system resolver; no \
                 DNS server in the name)"
            ));
        }
        if entry.is_empty() {
            return Err("an empty entry".into());
        }
        // Anything else is a URL as before; making its channel checks it.
        Ok(Self::Static(entry.to_owned()))
    }
}

/// Every entry of `MESH_INFERENCE_URLS`; at least one.
pub fn parse_targets(entries: &[String]) -> Result<Vec<Target>, String> {
    if entries.is_empty() {
        return Err("lists no replica".into());
    }
    entries.iter().map(|e| Target::parse(e)).collect()
}

/// One replica to reach: its URL (its identity and its `replica` metric label) and the entry
/// it came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// `http://<address>` for a resolved address; the configured URL for a static entry.
    pub url: String,
    /// The configured entry (the DNS name, or the URL itself).
    pub source: String,
}

/// Resolves a name to addresses.
pub trait Resolve: Send + Sync {
    /// The addresses `host` has on `port`.
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, std::io::Result<Vec<SocketAddr>>>;
}

/// The system's resolver: `tokio::net::lookup_host` (getaddrinfo: `/etc/hosts`, then DNS).
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, std::io::Result<Vec<SocketAddr>>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// Each name's answer: its addresses, or the error resolving it gives.
type Answers = HashMap<String, Result<Vec<IpAddr>, String>>;

/// A resolver answering from a shared map of names to addresses, for tests: what a hosts file
/// would hold, changed while the gateway runs. A name set to fail answers with an error.
#[derive(Clone, Default)]
pub struct MapResolver {
    names: Arc<Mutex<Answers>>,
}

impl MapResolver {
    /// `name` resolves to `addresses` from now on.
    pub fn set(&self, name: &str, addresses: &[IpAddr]) {
        self.lock().insert(name.to_owned(), Ok(addresses.to_vec()));
    }

    /// Resolving `name` fails with `why` from now on (as a DNS server timing out would).
    pub fn fail(&self, name: &str, why: &str) {
        self.lock().insert(name.to_owned(), Err(why.to_owned()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Answers> {
        self.names.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Resolve for MapResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, std::io::Result<Vec<SocketAddr>>> {
        let answer = match self.lock().get(host) {
            Some(Ok(ips)) => Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect()),
            Some(Err(why)) => Err(std::io::Error::other(why.clone())),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{host}: no such name"),
            )),
        };
        Box::pin(std::future::ready(answer))
    }
}

/// The resolver DNS entries go through: the system's unless a test injects its own.
#[derive(Clone)]
pub struct Resolver(Arc<dyn Resolve>);

impl Resolver {
    /// Resolves through `resolve`.
    pub fn new(resolve: impl Resolve + 'static) -> Self {
        Self(Arc::new(resolve))
    }
}

impl Default for Resolver {
    fn default() -> Self {
        Self::new(SystemResolver)
    }
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

/// `mesh_discovery_resolutions_total{name, outcome}` and `mesh_discovery_addresses{name}`;
/// `name` is a configured DNS entry, so the label set is bounded by the configuration.
#[derive(Clone)]
pub struct DiscoveryMetrics {
    resolutions: IntCounterVec,
    addresses: IntGaugeVec,
}

impl DiscoveryMetrics {
    /// Registers both in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let resolutions = IntCounterVec::new(
            Opts::new(
                "mesh_discovery_resolutions_total",
                "Resolutions of a DNS entry of MESH_INFERENCE_URLS, by outcome (ok, failed, \
                 empty); failed and empty keep the last good addresses",
            ),
            &["name", "outcome"],
        )?;
        let addresses = IntGaugeVec::new(
            Opts::new(
                "mesh_discovery_addresses",
                "Addresses of the DNS entry in use as inference replicas",
            ),
            &["name"],
        )?;
        registry.register(Box::new(resolutions.clone()))?;
        registry.register(Box::new(addresses.clone()))?;
        Ok(Self {
            resolutions,
            addresses,
        })
    }
}

/// The configured entries and each DNS name's last good addresses.
pub struct Discovery {
    targets: Vec<Target>,
    resolver: Resolver,
    last_good: HashMap<String, Vec<SocketAddr>>,
    metrics: DiscoveryMetrics,
}

impl Discovery {
    /// Discovery of `targets` through `resolver`.
    pub fn new(targets: Vec<Target>, resolver: Resolver, metrics: DiscoveryMetrics) -> Self {
        Self {
            targets,
            resolver,
            last_good: HashMap::new(),
            metrics,
        }
    }

    /// Whether any entry is a DNS name (else there is nothing to re-resolve).
    pub fn has_names(&self) -> bool {
        self.targets.iter().any(|t| matches!(t, Target::Dns { .. }))
    }

    /// Resolves every DNS entry once and returns every replica, each URL once (the first entry
    /// naming it is its source): the static URLs, and each name's addresses (its last good ones
    /// when this resolution failed or came back empty).
    pub async fn endpoints(&mut self) -> Vec<Endpoint> {
        let mut endpoints: BTreeMap<String, String> = BTreeMap::new();
        for target in &self.targets {
            match target {
                Target::Static(url) => {
                    endpoints.entry(url.clone()).or_insert_with(|| url.clone());
                }
                Target::Dns { entry, host, port } => {
                    let addresses = resolve_entry(
                        &self.resolver,
                        &mut self.last_good,
                        &self.metrics,
                        (entry, host, *port),
                    )
                    .await;
                    for address in addresses {
                        endpoints
                            .entry(format!("http://{address}"))
                            .or_insert_with(|| entry.clone());
                    }
                }
            }
        }
        endpoints
            .into_iter()
            .map(|(url, source)| Endpoint { url, source })
            .collect()
    }
}

/// The addresses of one DNS entry (`entry`, `host`, `port`): this resolution's if it gave any,
/// else the last good ones (a failure or an empty answer is logged and counted, and changes
/// nothing).
async fn resolve_entry(
    resolver: &Resolver,
    last_good: &mut HashMap<String, Vec<SocketAddr>>,
    metrics: &DiscoveryMetrics,
    (entry, host, port): (&str, &str, u16),
) -> Vec<SocketAddr> {
    let resolved = tokio::time::timeout(RESOLVE_TIMEOUT, resolver.0.resolve(host, port))
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("timed out")));
    let kept = last_good.get(entry).map_or(0, Vec::len);
    let outcome = match resolved {
        Ok(addresses) if !addresses.is_empty() => {
            last_good.insert(entry.to_owned(), addresses);
            "ok"
        }
        Ok(_) => {
            tracing::warn!(name = %entry, kept, "the name resolved to no address; keeping the last good addresses");
            "empty"
        }
        Err(error) => {
            tracing::warn!(name = %entry, %error, kept, "resolving inference replicas failed; keeping the last good addresses");
            "failed"
        }
    };
    metrics
        .resolutions
        .with_label_values(&[entry, outcome])
        .inc();
    let addresses = last_good.get(entry).cloned().unwrap_or_default();
    metrics
        .addresses
        .with_label_values(&[entry])
        .set(addresses.len() as i64);
    addresses
}

/// Makes a channel to a replica's URL (lazily connected, presenting the internal token).
pub type Connect = Arc<dyn Fn(&str) -> Result<InternalChannel, String> + Send + Sync>;

/// Where replicas join and leave: the balancer and the catalog polls, kept in step.
pub struct Membership {
    /// The balancer's replicas.
    pub replicas: Arc<ReplicaSet>,
    /// The catalog polls.
    pub versions: Arc<ReplicaVersions>,
    /// Channels for replicas that join: one for calls, one for catalog polls, so polls never
    /// queue behind (or in front of) predictions on a slow connection.
    pub connect: Connect,
}

impl Membership {
    /// Makes `endpoints` the replicas: those not yet known join (they take traffic once their
    /// health says SERVING), those no longer listed leave (calls already on them finish).
    pub fn apply(&self, endpoints: &[Endpoint]) {
        let current = self.replicas.urls();
        let left: Vec<String> = current
            .iter()
            .filter(|url| !endpoints.iter().any(|e| &e.url == *url))
            .cloned()
            .collect();
        let mut joined = Vec::new();
        let mut polled = Vec::new();
        for endpoint in endpoints.iter().filter(|e| !current.contains(&e.url)) {
            match ((self.connect)(&endpoint.url), (self.connect)(&endpoint.url)) {
                (Ok(calls), Ok(catalog)) => {
                    joined.push((endpoint.clone(), calls));
                    polled.push((endpoint.url.clone(), catalog));
                }
                (Err(error), _) | (_, Err(error)) => {
                    tracing::error!(replica = %endpoint.url, %error, "cannot make a channel to the replica; leaving it out");
                }
            }
        }
        if joined.is_empty() && left.is_empty() {
            return;
        }
        for endpoint in &joined {
            tracing::info!(replica = %endpoint.0.url, source = %endpoint.0.source, "inference replica joins (takes traffic once SERVING)");
        }
        for url in &left {
            tracing::info!(replica = %url, "inference replica leaves (calls on it finish there)");
        }
        self.versions.update(polled, &left);
        self.replicas.update(joined, &left);
    }
}

/// Re-resolves every `interval` and applies what changed, for as long as the task runs.
pub async fn follow(mut discovery: Discovery, membership: Membership, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let endpoints = discovery.endpoints().await;
        membership.apply(&endpoints);
    }
}

#[cfg(test)]
mod tests;
