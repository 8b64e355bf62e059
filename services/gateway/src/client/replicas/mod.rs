//! The inference replicas: which one takes a call, how many calls each has in flight, which
//! are ejected for failing, which say they are SERVING, and which are members at all.
//!
//! The choice is a randomized power of two choices on in-flight calls (Mitzenmacher; what
//! tower's p2c `Balance` and linkerd do): two distinct replicas drawn at random from those that
//! are SERVING and not ejected, the less busy one wins. It is written here rather than taken
//! from `tower::balance::p2c` because a retry must avoid the replicas that already failed the
//! same request, which p2c's ready set cannot express, and ejection and health state live
//! beside the count.
//!
//! Membership changes while calls run ([`super::discovery`]): the members are an immutable
//! list swapped whole, so a call holds the `Arc<Replica>` it picked and finishes there even if
//! the replica has left meanwhile; a replica is named by its URL, never by a position in the
//! list, so nothing a request remembers goes stale. A replica that joins counts as not serving
//! until its health watch says SERVING.
//!
//! Outlier detection follows Envoy's: a replica failing `consecutive_failures` calls in a row is
//! ejected for `base_ejection` × the number of times it has been ejected, at most
//! `max_ejection` (the count falls by one for every 5 × `base_ejection` it then stays in);
//! never more than `max_ejected_percent` of the replicas at once, and never the last available.

mod metrics;
mod watch;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use mesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use mesh_runtime::internal::InternalChannel;
use mesh_runtime::resilience::Verdict;
use rand::Rng as _;
use tokio::task::JoinHandle;

pub use metrics::ReplicaMetrics;

use super::discovery::Endpoint;
use metrics::ReplicaSeries;

/// Outlier detection settings (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Consecutive failures that eject a replica.
    pub consecutive_failures: u32,
    /// First ejection's length; it grows with each repeat.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
    /// Most replicas ejected at once, in percent (never all).
    pub max_ejected_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

/// What outlier detection knows of one replica.
#[derive(Default)]
struct Outlier {
    consecutive_failures: u32,
    /// Times ejected, decaying while it behaves; sets the next ejection's length.
    ejections: u32,
    ejected_until: Option<Instant>,
    /// Time in since the last ejection ended, for the decay.
    in_for: Duration,
}

/// One inference replica.
pub struct Replica {
    url: String,
    source: String,
    channel: InternalChannel,
    client: GrpcInferenceServiceClient<InternalChannel>,
    series: ReplicaSeries,
    /// Its `grpc.health.v1` status (not serving until its watch says so).
    serving: AtomicBool,
    outlier: Mutex<Outlier>,
}

impl Replica {
    fn new(endpoint: Endpoint, channel: InternalChannel, metrics: &ReplicaMetrics) -> Self {
        Self {
            series: metrics.series(&endpoint.url),
            url: endpoint.url,
            source: endpoint.source,
            client: GrpcInferenceServiceClient::new(channel.clone())
                .max_decoding_message_size(64 * 1024 * 1024),
            channel,
            serving: AtomicBool::new(false),
            outlier: Mutex::new(Outlier::default()),
        }
    }

    /// The replica's URL: its identity.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The configured entry it came from (its URL, or the DNS name it resolved from).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Its channel (for the health report's checks).
    pub fn channel(&self) -> InternalChannel {
        self.channel.clone()
    }

    /// A client of the replica.
    pub fn client(&self) -> GrpcInferenceServiceClient<InternalChannel> {
        self.client.clone()
    }

    fn outlier(&self) -> MutexGuard<'_, Outlier> {
        // Plain counters: a panic elsewhere cannot leave them half-written.
        self.outlier.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ejected(&self, now: Instant) -> bool {
        matches!(self.outlier().ejected_until, Some(until) if now < until)
    }

    fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    fn available(&self, now: Instant) -> bool {
        self.serving() && !self.ejected(now)
    }

    /// Counts a call in flight until the returned guard is dropped.
    pub fn lease(&self) -> InFlight {
        self.series.in_flight.inc();
        InFlight(self.series.in_flight.clone())
    }
}

/// One call in flight to a replica; dropping it (answered or cancelled) ends the count.
#[must_use = "the call counts as in flight only while the guard lives"]
pub struct InFlight(prometheus::IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A replica's state as the health report shows it.
#[derive(Debug, Clone)]
pub struct ReplicaState {
    /// Its URL.
    pub url: String,
    /// The configured entry it came from.
    pub source: String,
    /// Whether its health watch says SERVING.
    pub serving: bool,
    /// Whether outlier detection has ejected it.
    pub ejected: bool,
}

/// The members, swapped whole when one joins or leaves.
type Members = Arc<Vec<Arc<Replica>>>;

/// The replicas of the inference service.
pub struct ReplicaSet {
    members: RwLock<Members>,
    /// Each member's health watch, by URL; aborted when it leaves.
    watches: Mutex<HashMap<String, JoinHandle<()>>>,
    outlier: OutlierConfig,
    metrics: ReplicaMetrics,
}

impl Drop for ReplicaSet {
    fn drop(&mut self) {
        for (_, watch) in self
            .watches
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            watch.abort();
        }
    }
}

impl ReplicaSet {
    /// A set with no replica yet (they join through [`ReplicaSet::update`]). Spawns the
    /// ejection decay; it stops when the returned handle's last clone is dropped.
    pub fn start(outlier: OutlierConfig, metrics: ReplicaMetrics) -> ReplicaHandle {
        let set = Arc::new(Self {
            members: RwLock::new(Arc::new(Vec::new())),
            watches: Mutex::new(HashMap::new()),
            outlier,
            metrics,
        });
        let decay = tokio::spawn(watch::decay_ejections(Arc::downgrade(&set)));
        ReplicaHandle {
            set,
            tasks: Arc::new(Tasks(Mutex::new(vec![decay]))),
        }
    }

    /// The current members. A call keeps the replica it picked from them, whatever changes.
    pub fn members(&self) -> Members {
        self.members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The members' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.members().iter().map(|r| r.url.clone()).collect()
    }

    /// Adds the `joined` replicas (each with a channel to it; each counts as not serving until
    /// its health watch says SERVING) and removes those at `left`, in one swap. Calls on their
    /// way to a replica that left finish there; its metric series go.
    pub fn update(&self, joined: Vec<(Endpoint, InternalChannel)>, left: &[String]) {
        let mut watches = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let mut members: Vec<Arc<Replica>> = self
            .members()
            .iter()
            .filter(|r| !left.contains(&r.url))
            .cloned()
            .collect();
        for (endpoint, channel) in joined {
            if members.iter().any(|r| r.url == endpoint.url) {
                continue;
            }
            let replica = Arc::new(Replica::new(endpoint, channel, &self.metrics));
            let watch = tokio::spawn(watch::watch_health(replica.clone()));
            if let Some(old) = watches.insert(replica.url.clone(), watch) {
                old.abort();
            }
            members.push(replica);
        }
        *self.members.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(members);
        for url in left {
            if let Some(watch) = watches.remove(url) {
                watch.abort();
            }
            self.metrics.remove(url);
        }
    }

    /// How many available replicas a request that failed on `failed` has not tried yet.
    pub fn untried(&self, failed: &[String]) -> usize {
        let now = Instant::now();
        self.members()
            .iter()
            .filter(|r| r.available(now) && !failed.contains(&r.url))
            .count()
    }

    /// The replica for the next attempt of a request that already failed on `failed` (or that
    /// lacks its version): power of two choices within the first non-empty tier of: available
    /// and not failed on; SERVING by its health (though ejected) and not failed on; available;
    /// SERVING; any (trying beats refusing: Envoy's panic mode). A replica that answers its
    /// health check beats one that does not, which, having nothing in flight, would look best.
    /// `None` only while there is no replica at all (a DNS name that has not resolved yet).
    pub fn pick(&self, failed: &[String]) -> Option<Arc<Replica>> {
        let members = self.members();
        let now = Instant::now();
        let fresh = |r: &Replica| !failed.contains(&r.url);
        let tiers: [&dyn Fn(&Replica) -> bool; 5] = [
            &|r| r.available(now) && fresh(r),
            &|r| r.serving() && fresh(r),
            &|r| r.available(now),
            &|r| r.serving(),
            &|_| true,
        ];
        let pool = tiers
            .iter()
            .map(|tier| members.iter().filter(|r| tier(r)).collect::<Vec<_>>())
            .find(|pool| !pool.is_empty())?;
        less_busy_of_two(&pool).cloned()
    }

    /// Each replica's URL, health and ejection.
    pub fn states(&self) -> Vec<ReplicaState> {
        let now = Instant::now();
        self.members()
            .iter()
            .map(|r| ReplicaState {
                url: r.url.clone(),
                source: r.source.clone(),
                serving: r.serving(),
                ejected: r.ejected(now),
            })
            .collect()
    }

    /// Outlier detection reads the classifier's verdict of a call to `replica`: a success
    /// clears its failure streak, a failure adds to it and ejects it at the threshold (within
    /// the cap on the share ejected; never a replica that has left), an ignored outcome does
    /// neither.
    pub fn observe(&self, replica: &Replica, verdict: Verdict) {
        let slot = match verdict {
            Verdict::Success => 0,
            Verdict::Failure => 1,
            Verdict::Ignore => 2,
        };
        replica.series.calls[slot].inc();
        match verdict {
            Verdict::Ignore => {}
            Verdict::Success => replica.outlier().consecutive_failures = 0,
            Verdict::Failure => self.count_failure(replica),
        }
    }

    fn count_failure(&self, replica: &Replica) {
        let now = Instant::now();
        let failures = {
            let mut state = replica.outlier();
            state.consecutive_failures += 1;
            state.consecutive_failures
        };
        if failures < self.outlier.consecutive_failures || replica.ejected(now) {
            return;
        }
        let members = self.members();
        if !members.iter().any(|r| std::ptr::eq(r.as_ref(), replica)) {
            return;
        }
        let total = members.len();
        let allowed = (total * self.outlier.max_ejected_percent as usize / 100)
            .max(1)
            .min(total - 1);
        let ejected_now = members.iter().filter(|r| r.ejected(now)).count();
        // The cap counts ejections, not replicas down: never eject the last one available.
        let others_available = members
            .iter()
            .filter(|r| !std::ptr::eq(r.as_ref(), replica) && r.available(now))
            .count();
        if ejected_now >= allowed || others_available == 0 {
            tracing::warn!(replica = %replica.url, failures, ejected_now, others_available, "replica failing but the ejection cap is reached or no other is available; keeping it");
            return;
        }
        let (times, length) = {
            let mut state = replica.outlier();
            state.ejections += 1;
            let length = self
                .outlier
                .base_ejection
                .saturating_mul(state.ejections)
                .min(self.outlier.max_ejection);
            state.ejected_until = Some(now + length);
            state.consecutive_failures = 0;
            state.in_for = Duration::ZERO;
            (state.ejections, length)
        };
        replica.series.ejected.set(1);
        replica.series.ejections.inc();
        tracing::warn!(replica = %replica.url, failures, ejection = times, length = ?length, "inference replica ejected");
    }
}

fn less_busy_of_two<'a>(pool: &[&'a Arc<Replica>]) -> Option<&'a Arc<Replica>> {
    if pool.len() <= 1 {
        return pool.first().copied();
    }
    let mut rng = rand::rng();
    let a = rng.random_range(0..pool.len());
    let mut b = rng.random_range(0..pool.len() - 1);
    if b >= a {
        b += 1;
    }
    let load = |k: usize| pool[k].series.in_flight.get();
    Some(if load(b) < load(a) { pool[b] } else { pool[a] })
}

/// Aborts the background tasks (ejection decay, discovery) when dropped.
struct Tasks(Mutex<Vec<JoinHandle<()>>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in self.0.get_mut().unwrap_or_else(|e| e.into_inner()).iter() {
            task.abort();
        }
    }
}

/// The replica set and the lifetime of its background tasks.
#[derive(Clone)]
pub struct ReplicaHandle {
    set: Arc<ReplicaSet>,
    tasks: Arc<Tasks>,
}

impl ReplicaHandle {
    /// The set itself, for what changes its members.
    pub fn set(&self) -> &Arc<ReplicaSet> {
        &self.set
    }

    /// Ties `task` (e.g. discovery) to the set's lifetime: it is aborted with the last clone
    /// of the handle. The task must not hold a handle itself, only the set.
    pub fn hold(&self, task: JoinHandle<()>) {
        self.tasks
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
    }
}

impl std::ops::Deref for ReplicaHandle {
    type Target = ReplicaSet;

    fn deref(&self) -> &ReplicaSet {
        &self.set
    }
}

#[cfg(test)]
mod tests;
