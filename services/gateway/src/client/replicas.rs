//! The inference replicas: which one takes a call, how many calls each has in flight, which
//! are ejected for failing, and which say they are SERVING.
//!
//! The choice is a randomized power of two choices on in-flight calls (Mitzenmacher; as
//! tower's p2c `Balance` and linkerd): of two replicas drawn from those SERVING and not ejected,
//! the less busy wins. Written here, not `tower::balance::p2c`, because a retry must avoid the
//! replicas that already failed the same request, which p2c's ready set cannot express.
//!
//! Outlier detection follows Envoy's: a replica failing `consecutive_failures` calls in a row is
//! ejected for `base_ejection` × the number of times it has been ejected, at most
//! `max_ejection` (the count falls by one for every 5 × `base_ejection` it then stays in);
//! never more than `max_ejected_percent` of the replicas at once, and never the last available.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use mesh_runtime::internal::InternalChannel;
use mesh_runtime::resilience::Verdict;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use rand::Rng as _;

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

/// Per-replica gauges and counters. The label values are the configured replica URLs.
#[derive(Clone)]
pub struct ReplicaMetrics {
    ejected: IntGaugeVec,
    ejections: IntCounterVec,
    serving: IntGaugeVec,
    in_flight: IntGaugeVec,
    calls: IntCounterVec,
}

impl ReplicaMetrics {
    /// Registers `mesh_replica_ejected`, `mesh_replica_ejections_total`,
    /// `mesh_replica_serving`, `mesh_replica_in_flight` (all by `replica`) and
    /// `mesh_replica_calls_total{replica, verdict}`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["replica"]);
        let metrics = Self {
            ejected: gauge(
                "mesh_replica_ejected",
                "1 while the inference replica is ejected by outlier detection",
            )?,
            ejections: IntCounterVec::new(
                Opts::new(
                    "mesh_replica_ejections_total",
                    "Times the inference replica was ejected after consecutive failures",
                ),
                &["replica"],
            )?,
            serving: gauge(
                "mesh_replica_serving",
                "1 while the replica's grpc.health.v1 Watch says SERVING",
            )?,
            in_flight: gauge(
                "mesh_replica_in_flight",
                "ModelInfer calls the gateway has in flight to the replica",
            )?,
            calls: IntCounterVec::new(
                Opts::new(
                    "mesh_replica_calls_total",
                    "ModelInfer attempts per replica, by the classifier's verdict (success, failure, ignore)",
                ),
                &["replica", "verdict"],
            )?,
        };
        registry.register(Box::new(metrics.ejected.clone()))?;
        registry.register(Box::new(metrics.ejections.clone()))?;
        registry.register(Box::new(metrics.serving.clone()))?;
        registry.register(Box::new(metrics.in_flight.clone()))?;
        registry.register(Box::new(metrics.calls.clone()))?;
        Ok(metrics)
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
    client: GrpcInferenceServiceClient<InternalChannel>,
    /// Calls in flight: the load the choice compares, exported as `mesh_replica_in_flight`.
    in_flight: IntGauge,
    /// `mesh_replica_calls_total` by verdict (success, failure, ignore), resolved once.
    calls: [IntCounter; 3],
    /// Its `grpc.health.v1` status (optimistic until the first answer).
    serving: AtomicBool,
    outlier: Mutex<Outlier>,
}

impl Replica {
    /// The replica's URL.
    pub fn url(&self) -> &str {
        &self.url
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

    fn available(&self, now: Instant) -> bool {
        self.serving.load(Ordering::Relaxed) && !self.ejected(now)
    }

    /// Counts a call in flight until the returned guard is dropped.
    pub fn lease(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }
}

/// One call in flight to a replica; dropping it (answered or cancelled) ends the count.
#[must_use = "the call counts as in flight only while the guard lives"]
pub struct InFlight(IntGauge);

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
    /// Whether its health watch says SERVING.
    pub serving: bool,
    /// Whether outlier detection has ejected it.
    pub ejected: bool,
}

/// Aborts the background tasks (health watches, ejection decay) when dropped.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// The replicas of the inference service.
pub struct ReplicaSet {
    replicas: Vec<Replica>,
    outlier: OutlierConfig,
    metrics: ReplicaMetrics,
}

impl ReplicaSet {
    /// The replicas at `channels` (URL and channel each). Spawns a health watch per replica and
    /// the ejection decay; they stop when the returned handle's last clone is dropped.
    pub fn start(
        channels: &[(String, InternalChannel)],
        outlier: OutlierConfig,
        metrics: ReplicaMetrics,
    ) -> ReplicaHandle {
        let replicas = channels
            .iter()
            .map(|(url, channel)| Replica {
                url: url.clone(),
                client: GrpcInferenceServiceClient::new(channel.clone())
                    .max_decoding_message_size(64 * 1024 * 1024),
                in_flight: metrics.in_flight.with_label_values(&[url.as_str()]),
                calls: ["success", "failure", "ignore"]
                    .map(|verdict| metrics.calls.with_label_values(&[url.as_str(), verdict])),
                serving: AtomicBool::new(true),
                outlier: Mutex::new(Outlier::default()),
            })
            .collect();
        let set = Arc::new(Self {
            replicas,
            outlier,
            metrics,
        });
        let mut tasks: Vec<_> = channels
            .iter()
            .enumerate()
            .map(|(i, (_, channel))| tokio::spawn(watch_health(set.clone(), i, channel.clone())))
            .collect();
        tasks.push(tokio::spawn(decay_ejections(set.clone())));
        ReplicaHandle {
            set,
            _tasks: Arc::new(Tasks(tasks)),
        }
    }

    /// Replica `index`.
    pub fn get(&self, index: usize) -> &Replica {
        &self.replicas[index]
    }

    fn available(&self, now: Instant) -> impl Iterator<Item = usize> + '_ {
        (0..self.replicas.len()).filter(move |&i| self.replicas[i].available(now))
    }

    /// How many available replicas a request that failed on `failed` has not tried yet.
    pub fn untried(&self, failed: &[usize]) -> usize {
        self.available(Instant::now())
            .filter(|i| !failed.contains(i))
            .count()
    }

    /// The replica for the next attempt of a request that already failed on `failed` (or that
    /// lacks its version): power of two choices within the first non-empty tier of: available
    /// and not failed on; SERVING by its health (though ejected) and not failed on; available;
    /// SERVING; any (trying beats refusing: Envoy's panic mode). A replica that answers its
    /// health check beats one that does not, which, having nothing in flight, would look best.
    pub fn pick(&self, failed: &[usize]) -> usize {
        let now = Instant::now();
        let available = |i: &usize| self.replicas[*i].available(now);
        let serving = |i: &usize| self.replicas[*i].serving.load(Ordering::Relaxed);
        let fresh = |i: &usize| !failed.contains(i);
        let all = 0..self.replicas.len();
        let tiers: [&dyn Fn(&usize) -> bool; 5] = [
            &|i| available(i) && fresh(i),
            &|i| serving(i) && fresh(i),
            &available,
            &serving,
            &|_| true,
        ];
        let pool = tiers
            .iter()
            .map(|tier| all.clone().filter(|i| tier(i)).collect::<Vec<usize>>())
            .find(|pool| !pool.is_empty())
            .unwrap_or_else(|| all.collect());
        self.less_busy_of_two(&pool)
    }

    fn less_busy_of_two(&self, pool: &[usize]) -> usize {
        if pool.len() == 1 {
            return pool[0];
        }
        let mut rng = rand::rng();
        let a = rng.random_range(0..pool.len());
        let mut b = rng.random_range(0..pool.len() - 1);
        if b >= a {
            b += 1;
        }
        let load = |k: usize| self.replicas[pool[k]].in_flight.get();
        if load(b) < load(a) {
            pool[b]
        } else {
            pool[a]
        }
    }

    /// Each replica's URL, health and ejection.
    pub fn states(&self) -> Vec<ReplicaState> {
        let now = Instant::now();
        self.replicas
            .iter()
            .map(|r| ReplicaState {
                url: r.url.clone(),
                serving: r.serving.load(Ordering::Relaxed),
                ejected: r.ejected(now),
            })
            .collect()
    }

    /// Outlier detection reads the classifier's verdict of a call to replica `index`: a
    /// success clears its failure streak, a failure adds to it and ejects it at the threshold
    /// (within the cap on the share ejected), an ignored outcome does neither.
    pub fn observe(&self, index: usize, verdict: Verdict) {
        let replica = &self.replicas[index];
        let slot = match verdict {
            Verdict::Success => 0,
            Verdict::Failure => 1,
            Verdict::Ignore => 2,
        };
        replica.calls[slot].inc();
        match verdict {
            Verdict::Ignore => {}
            Verdict::Success => replica.outlier().consecutive_failures = 0,
            Verdict::Failure => self.count_failure(index),
        }
    }

    fn count_failure(&self, index: usize) {
        let replica = &self.replicas[index];
        let now = Instant::now();
        let failures = {
            let mut state = replica.outlier();
            state.consecutive_failures += 1;
            state.consecutive_failures
        };
        if failures < self.outlier.consecutive_failures || replica.ejected(now) {
            return;
        }
        let total = self.replicas.len();
        let allowed = (total * self.outlier.max_ejected_percent as usize / 100)
            .max(1)
            .min(total - 1);
        let ejected_now = self.replicas.iter().filter(|r| r.ejected(now)).count();
        // The cap counts ejections, not replicas down: never eject the last one available.
        let others_available = (0..total)
            .filter(|&i| i != index && self.replicas[i].available(now))
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
        let url = [replica.url.as_str()];
        self.metrics.ejected.with_label_values(&url).set(1);
        self.metrics.ejections.with_label_values(&url).inc();
        tracing::warn!(replica = %replica.url, failures, ejection = times, length = ?length, "inference replica ejected");
    }
}

/// The replica set and the lifetime of its background tasks.
#[derive(Clone)]
pub struct ReplicaHandle {
    set: Arc<ReplicaSet>,
    _tasks: Arc<Tasks>,
}

impl std::ops::Deref for ReplicaHandle {
    type Target = ReplicaSet;

    fn deref(&self) -> &ReplicaSet {
        &self.set
    }
}

/// Follows replica `index`'s `grpc.health.v1` status with `Watch`; while the stream cannot be
/// opened or breaks, the replica counts as not serving (re-tried every second).
async fn watch_health(set: Arc<ReplicaSet>, index: usize, channel: InternalChannel) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let replica = &set.replicas[index];
    let gauge = set
        .metrics
        .serving
        .with_label_values(&[replica.url.as_str()]);
    let update = |serving: bool| {
        if replica.serving.swap(serving, Ordering::Relaxed) != serving {
            tracing::info!(replica = %replica.url, serving, "inference replica health changed");
        }
        gauge.set(serving as i64);
    };
    gauge.set(1);
    let mut client = HealthClient::new(channel);
    loop {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        if let Ok(response) = client.watch(request).await {
            let mut stream = response.into_inner();
            while let Ok(Some(message)) = stream.message().await {
                update(message.status() == ServingStatus::Serving);
            }
        }
        update(false);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A replica's ejection count falls by one for every this many base ejection times it stays in.
const EJECTION_DECAY_FACTOR: u32 = 5;

/// Every second: clears the ejected gauge of replicas whose ejection ended, and lowers the
/// ejection count of replicas that stayed in for [`EJECTION_DECAY_FACTOR`] base ejection times.
async fn decay_ejections(set: Arc<ReplicaSet>) {
    let tick = Duration::from_secs(1);
    let decay_after = set
        .outlier
        .base_ejection
        .saturating_mul(EJECTION_DECAY_FACTOR);
    loop {
        tokio::time::sleep(tick).await;
        let now = Instant::now();
        for replica in &set.replicas {
            let mut state = replica.outlier();
            if matches!(state.ejected_until, Some(until) if now < until) {
                continue;
            }
            set.metrics
                .ejected
                .with_label_values(&[replica.url.as_str()])
                .set(0);
            state.in_for += tick;
            if state.in_for >= decay_after {
                state.in_for = Duration::ZERO;
                state.ejections = state.ejections.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests;
