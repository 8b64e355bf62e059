//! Retries that cannot amplify an outage, and circuit breakers that stop calling a dependency
//! that is down.
//!
//! - [`RetryBudget`]: retries may add at most `ratio` of the recent request volume plus a small
//!   floor per second (Envoy's and Linkerd's retry budgets), over a sliding window.
//! - [`backoff`]: exponential back-off with full jitter; [`retry_pause`] refuses a pause that
//!   would not leave time for the retry before the deadline.
//! - [`CircuitBreaker`]: closed → open after consecutive failures → half-open after a cool-down,
//!   where one probe decides between closed and open again (with a longer cool-down).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use rand::Rng as _;
use tokio::time::Instant;

use crate::Deadline;

/// Window of the retry budget, in one-second slots.
const WINDOW_SLOTS: usize = 10;

#[derive(Default, Clone, Copy)]
struct Slot {
    second: u64,
    requests: u64,
    retries: u64,
}

/// A budget for retries toward one downstream.
#[derive(Clone)]
pub struct RetryBudget {
    ratio: f64,
    floor_per_second: f64,
    started: Instant,
    slots: Arc<Mutex<[Slot; WINDOW_SLOTS]>>,
}

impl RetryBudget {
    /// Retries may add `ratio` (e.g. 0.2) of requests plus `floor_per_second`.
    pub fn new(ratio: f64, floor_per_second: f64) -> Self {
        Self {
            ratio,
            floor_per_second,
            started: Instant::now(),
            slots: Arc::new(Mutex::new([Slot::default(); WINDOW_SLOTS])),
        }
    }

    fn with_current<R>(&self, f: impl FnOnce(&mut [Slot; WINDOW_SLOTS], usize) -> R) -> Option<R> {
        let second = self.started.elapsed().as_secs();
        let mut slots = self.slots.lock().ok()?;
        let index = (second as usize) % WINDOW_SLOTS;
        if slots[index].second != second {
            slots[index] = Slot {
                second,
                requests: 0,
                retries: 0,
            };
        }
        Some(f(&mut slots, index))
    }

    /// Counts an original request.
    pub fn record_request(&self) {
        self.with_current(|slots, i| slots[i].requests += 1);
    }

    /// Takes a retry from the budget if the window allows one more.
    pub fn try_retry(&self) -> bool {
        let now = self.started.elapsed().as_secs();
        self.with_current(|slots, i| {
            let live = slots
                .iter()
                .filter(|s| s.second + WINDOW_SLOTS as u64 > now);
            let (requests, retries) =
                live.fold((0, 0), |(q, r), s| (q + s.requests, r + s.retries));
            let allowed =
                self.ratio * requests as f64 + self.floor_per_second * WINDOW_SLOTS as f64;
            if (retries as f64) < allowed {
                slots[i].retries += 1;
                true
            } else {
                false
            }
        })
        .unwrap_or(false)
    }
}

/// Full-jitter exponential back-off: uniformly random in `[0, min(cap, base · 2^attempt)]`.
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
    ceiling.mul_f64(rand::rng().random::<f64>())
}

/// The pause before retry `attempt`, or `None` if after it less than `min_left` of the
/// deadline would remain (a retry that cannot finish in time is not worth starting).
pub fn retry_pause(
    attempt: u32,
    deadline: Deadline,
    base: Duration,
    cap: Duration,
    min_left: Duration,
) -> Option<Duration> {
    let pause = backoff(attempt, base, cap);
    (deadline.remaining() > pause + min_left).then_some(pause)
}

/// Breaker states, as exported in `mesh_breaker_state` (0 closed, 1 open, 2 half-open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Calls fail fast until the cool-down ends.
    Open,
    /// One probe call is allowed to test the dependency.
    HalfOpen,
}

/// Settings of a breaker.
#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// First cool-down while open.
    pub open_for: Duration,
    /// Longest cool-down (it doubles on each failed probe).
    pub max_open_for: Duration,
}

struct BreakerInner {
    state: BreakerState,
    failures: u32,
    open_until: Instant,
    cool_down: Duration,
    probe_in_flight: bool,
}

/// Metrics of every breaker of a service.
#[derive(Clone)]
pub struct BreakerMetrics {
    state: IntGaugeVec,
    rejected: IntCounterVec,
}

impl BreakerMetrics {
    /// Registers `mesh_breaker_state{downstream}` and `mesh_breaker_rejected_total{downstream}`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let state = IntGaugeVec::new(
            Opts::new(
                "mesh_breaker_state",
                "Circuit breaker state: 0 closed, 1 open, 2 half-open",
            ),
            &["downstream"],
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "mesh_breaker_rejected_total",
                "Calls failed fast by an open breaker",
            ),
            &["downstream"],
        )?;
        registry.register(Box::new(state.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        Ok(Self { state, rejected })
    }
}

/// A circuit breaker for one downstream.
#[derive(Clone)]
pub struct CircuitBreaker {
    name: Arc<str>,
    config: BreakerConfig,
    inner: Arc<Mutex<BreakerInner>>,
    metrics: BreakerMetrics,
}

impl CircuitBreaker {
    /// A closed breaker called `name`.
    pub fn new(name: &str, config: BreakerConfig, metrics: &BreakerMetrics) -> Self {
        metrics.state.with_label_values(&[name]).set(0);
        metrics.rejected.with_label_values(&[name]);
        Self {
            name: name.into(),
            config,
            inner: Arc::new(Mutex::new(BreakerInner {
                state: BreakerState::Closed,
                failures: 0,
                open_until: Instant::now(),
                cool_down: config.open_for,
                probe_in_flight: false,
            })),
            metrics: metrics.clone(),
        }
    }

    fn set(&self, inner: &mut BreakerInner, state: BreakerState) {
        if inner.state != state {
            tracing::warn!(downstream = %self.name, from = ?inner.state, to = ?state, "circuit breaker");
        }
        inner.state = state;
        let code = match state {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        };
        self.metrics
            .state
            .with_label_values(&[&self.name])
            .set(code);
    }

    /// The current state (an open breaker whose cool-down ended reads as half-open).
    pub fn state(&self) -> BreakerState {
        match self.inner.lock() {
            Ok(inner)
                if inner.state == BreakerState::Open && Instant::now() >= inner.open_until =>
            {
                BreakerState::HalfOpen
            }
            Ok(inner) => inner.state,
            Err(_) => BreakerState::Closed,
        }
    }

    /// Whether a call may go now; `false` means fail fast. In half-open, only one probe goes.
    pub fn allow(&self) -> bool {
        let Ok(mut inner) = self.inner.lock() else {
            return true;
        };
        match inner.state {
            BreakerState::Closed => true,
            BreakerState::Open if Instant::now() >= inner.open_until => {
                self.set(&mut inner, BreakerState::HalfOpen);
                inner.probe_in_flight = true;
                true
            }
            BreakerState::HalfOpen if !inner.probe_in_flight => {
                inner.probe_in_flight = true;
                true
            }
            BreakerState::Open | BreakerState::HalfOpen => {
                self.metrics.rejected.with_label_values(&[&self.name]).inc();
                false
            }
        }
    }

    /// Reports the outcome of an allowed call.
    pub fn record(&self, success: bool) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        inner.probe_in_flight = false;
        if success {
            inner.failures = 0;
            inner.cool_down = self.config.open_for;
            self.set(&mut inner, BreakerState::Closed);
            return;
        }
        inner.failures += 1;
        let trip = match inner.state {
            BreakerState::HalfOpen => {
                // The probe failed: stay away longer this time.
                inner.cool_down = (inner.cool_down * 2).min(self.config.max_open_for);
                true
            }
            BreakerState::Closed => inner.failures >= self.config.failure_threshold,
            BreakerState::Open => false,
        };
        if trip {
            inner.open_until = Instant::now() + inner.cool_down;
            self.set(&mut inner, BreakerState::Open);
        }
    }

    /// The breaker's name (its downstream).
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Metadata key a service sets on an error it answered because a store *behind it* failed (e.g.
/// features: entity in no cache and PostgreSQL down). The service itself is up and answering:
/// its breaker must not open (that would also refuse what it serves from cache), and retrying
/// it at once does not help.
pub const STORE_UNAVAILABLE: &str = "mesh-store-unavailable";

/// Whether `status` was answered by a live service whose own store failed (see
/// [`STORE_UNAVAILABLE`]).
pub fn is_store_unavailable(status: &tonic::Status) -> bool {
    status.metadata().contains_key(STORE_UNAVAILABLE)
}

/// Codes that count against a dependency's health: it is down, failing or too slow. Caller
/// mistakes and push-back (`RESOURCE_EXHAUSTED`) do not.
pub fn is_failure(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Internal
            | tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> (CircuitBreaker, BreakerMetrics) {
        let metrics = BreakerMetrics::register(&Registry::new()).expect("metrics");
        let config = BreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(1),
            max_open_for: Duration::from_secs(4),
        };
        (CircuitBreaker::new("features", config, &metrics), metrics)
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_after_consecutive_failures_and_probes_when_half_open() {
        let (b, metrics) = breaker();
        for _ in 0..2 {
            assert!(b.allow());
            b.record(false);
        }
        assert!(b.allow());
        b.record(true);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "a success resets the count"
        );
        for _ in 0..3 {
            assert!(b.allow());
            b.record(false);
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow(), "open: fail fast");
        assert_eq!(metrics.rejected.with_label_values(&["features"]).get(), 1);

        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.allow(), "one probe");
        assert!(!b.allow(), "only one probe at a time");
        b.record(false);
        assert_eq!(b.state(), BreakerState::Open, "failed probe reopens");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.state(), BreakerState::Open, "cool-down doubled to 2 s");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.allow());
        b.record(true);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(metrics.state.with_label_values(&["features"]).get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_budget_allows_a_fifth_of_traffic_plus_a_floor() {
        let budget = RetryBudget::new(0.2, 1.0);
        // The floor alone: 1 per second over the 10 s window.
        let floor = (0..100).filter(|_| budget.try_retry()).count();
        assert_eq!(floor, 10);
        for _ in 0..1000 {
            budget.record_request();
        }
        let more = (0..1000).filter(|_| budget.try_retry()).count();
        assert_eq!(more, 200, "20 % of 1000 requests");
        // The window slides: after 10 s, old requests and retries no longer count.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!((0..100).filter(|_| budget.try_retry()).count(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_jittered_below_an_exponential_cap_and_respects_the_deadline() {
        for attempt in 0..8 {
            let ceiling =
                Duration::from_millis(10 * (1 << attempt)).min(Duration::from_millis(200));
            for _ in 0..50 {
                assert!(
                    backoff(
                        attempt,
                        Duration::from_millis(10),
                        Duration::from_millis(200)
                    ) <= ceiling
                );
            }
        }
        let distinct: std::collections::HashSet<_> = (0..50)
            .map(|_| backoff(5, Duration::from_millis(10), Duration::from_secs(1)))
            .collect();
        assert!(distinct.len() > 10, "full jitter spreads retries");
        let tight = Deadline::after(Duration::from_millis(5));
        assert_eq!(
            retry_pause(
                3,
                tight,
                Duration::from_millis(10),
                Duration::from_secs(1),
                Duration::from_millis(5)
            ),
            None
        );
        let roomy = Deadline::after(Duration::from_secs(5));
        assert!(retry_pause(
            3,
            roomy,
            Duration::from_millis(10),
            Duration::from_secs(1),
            Duration::from_millis(5)
        )
        .is_some());
    }
}
