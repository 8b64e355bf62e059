//! Circuit breakers: closed → open after consecutive failures → half-open after a cool-down,
//! where one probe decides between closed and open again (with a longer cool-down).
//!
//! Every admitted call holds a [`BreakerPermit`] and reports its [`Verdict`] through it. A
//! permit dropped without a verdict (the call was cancelled: the deadline layer drops handlers
//! by design, clients reset streams) counts as nothing; if it was the half-open probe, the
//! breaker stays half-open with the probe free for the next call. A flag set on admission and
//! cleared by a separate call after an `.await` would leak on every such drop and wedge the
//! breaker open for the life of the process.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::time::Instant;

use super::classify::Verdict;

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

impl BreakerState {
    fn code(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
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
    probe_taken: bool,
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

/// The right to make one call through a breaker; report the outcome with
/// [`BreakerPermit::record`]. Dropped without a verdict, it counts as nothing (and frees the
/// half-open probe).
#[must_use = "a permit reports the call's verdict; dropping it counts as nothing"]
pub struct BreakerPermit {
    breaker: CircuitBreaker,
    probe: bool,
    recorded: bool,
}

/// The breaker refused the call: it is open (or half-open with its probe out).
#[derive(Debug, Clone, Copy)]
pub struct BreakerOpen;

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
                probe_taken: false,
            })),
            metrics: metrics.clone(),
        }
    }

    /// The breaker's name (its downstream).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> MutexGuard<'_, BreakerInner> {
        // A panic while holding the lock cannot leave the state half-written (every update is
        // a few plain assignments), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, inner: &mut BreakerInner, state: BreakerState) {
        if inner.state != state {
            tracing::warn!(downstream = %self.name, from = ?inner.state, to = ?state, "circuit breaker");
        }
        inner.state = state;
        self.metrics
            .state
            .with_label_values(&[&self.name])
            .set(state.code());
    }

    /// The current state (an open breaker whose cool-down ended reads as half-open).
    pub fn state(&self) -> BreakerState {
        let inner = self.lock();
        if inner.state == BreakerState::Open && Instant::now() >= inner.open_until {
            BreakerState::HalfOpen
        } else {
            inner.state
        }
    }

    /// A permit for one call, or [`BreakerOpen`] to fail fast. In half-open, only one probe
    /// goes at a time.
    pub fn admit(&self) -> Result<BreakerPermit, BreakerOpen> {
        let mut inner = self.lock();
        let probe = match inner.state {
            BreakerState::Closed => false,
            BreakerState::Open if Instant::now() >= inner.open_until => {
                self.set(&mut inner, BreakerState::HalfOpen);
                true
            }
            BreakerState::HalfOpen if !inner.probe_taken => true,
            BreakerState::Open | BreakerState::HalfOpen => {
                self.metrics.rejected.with_label_values(&[&self.name]).inc();
                return Err(BreakerOpen);
            }
        };
        inner.probe_taken |= probe;
        Ok(BreakerPermit {
            breaker: self.clone(),
            probe,
            recorded: false,
        })
    }

    fn settle(&self, probe: bool, verdict: Verdict) {
        let mut inner = self.lock();
        if probe {
            inner.probe_taken = false;
        }
        match verdict {
            Verdict::Ignore => {}
            Verdict::Success => {
                // A late success of a call admitted while closed says nothing about a breaker
                // that has opened since: only the probe closes it.
                if inner.state == BreakerState::Closed || probe {
                    inner.failures = 0;
                    inner.cool_down = self.config.open_for;
                    self.set(&mut inner, BreakerState::Closed);
                }
            }
            Verdict::Failure => {
                inner.failures = inner.failures.saturating_add(1);
                let trip = match inner.state {
                    BreakerState::HalfOpen if probe => {
                        // The probe failed: stay away longer this time.
                        inner.cool_down = (inner.cool_down * 2).min(self.config.max_open_for);
                        true
                    }
                    BreakerState::Closed => inner.failures >= self.config.failure_threshold,
                    BreakerState::HalfOpen | BreakerState::Open => false,
                };
                if trip {
                    inner.open_until = Instant::now() + inner.cool_down;
                    self.set(&mut inner, BreakerState::Open);
                }
            }
        }
    }
}

impl BreakerPermit {
    /// Reports the call's verdict.
    pub fn record(mut self, verdict: Verdict) {
        self.recorded = true;
        self.breaker.settle(self.probe, verdict);
    }

    /// Whether this permit is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for BreakerPermit {
    fn drop(&mut self) {
        if !self.recorded {
            self.breaker.settle(self.probe, Verdict::Ignore);
        }
    }
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

    fn call(b: &CircuitBreaker, verdict: Verdict) {
        b.admit().expect("admitted").record(verdict);
    }

    async fn open(b: &CircuitBreaker) {
        for _ in 0..3 {
            call(b, Verdict::Failure);
        }
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_after_consecutive_failures_and_probes_when_half_open() {
        let (b, metrics) = breaker();
        for _ in 0..2 {
            call(&b, Verdict::Failure);
        }
        call(&b, Verdict::Success);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "a success resets the count"
        );
        for _ in 0..3 {
            call(&b, Verdict::Failure);
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.admit().is_err(), "open: fail fast");
        assert_eq!(metrics.rejected.with_label_values(&["features"]).get(), 1);

        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let probe = b.admit().expect("one probe");
        assert!(probe.is_probe());
        assert!(b.admit().is_err(), "only one probe at a time");
        probe.record(Verdict::Failure);
        assert_eq!(b.state(), BreakerState::Open, "failed probe reopens");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.state(), BreakerState::Open, "cool-down doubled to 2 s");
        tokio::time::advance(Duration::from_secs(1)).await;
        call(&b, Verdict::Success);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(metrics.state.with_label_values(&["features"]).get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_frees_the_probe_instead_of_wedging_the_breaker() {
        let (b, metrics) = breaker();
        open(&b).await;
        let probe = b.admit().expect("probe");
        assert!(b.admit().is_err());
        drop(probe); // the call was cancelled: no verdict
        assert_eq!(b.state(), BreakerState::HalfOpen, "no verdict, no change");
        let next = b.admit().expect("the probe is free again");
        assert!(next.is_probe());
        next.record(Verdict::Success);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(metrics.state.with_label_values(&["features"]).get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn ignored_outcomes_neither_close_nor_open_nor_reset() {
        let (b, _) = breaker();
        call(&b, Verdict::Failure);
        call(&b, Verdict::Failure);
        call(&b, Verdict::Ignore);
        call(&b, Verdict::Failure);
        assert_eq!(
            b.state(),
            BreakerState::Open,
            "an ignore did not reset the count"
        );

        tokio::time::advance(Duration::from_secs(1)).await;
        let probe = b.admit().expect("probe");
        probe.record(Verdict::Ignore);
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen,
            "an ignored probe does not close it"
        );
        assert!(b.admit().expect("probe free again").is_probe());
    }

    #[tokio::test(start_paused = true)]
    async fn late_answers_of_calls_admitted_while_closed_do_not_decide_the_probe() {
        let (b, _) = breaker();
        let early = b.admit().expect("closed");
        open(&b).await;
        early.record(Verdict::Success);
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen,
            "only the probe closes it"
        );
        let probe = b.admit().expect("probe");
        probe.record(Verdict::Success);
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
