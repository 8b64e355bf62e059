//! Retries that cannot amplify an outage.
//!
//! - [`RetryBudget`]: retries may add at most a share of the recent request volume plus a small
//!   floor per second (Envoy's and Linkerd's retry budgets). It is tower's
//!   [`tower::retry::budget::TpsBudget`], shared by every clone.
//! - [`backoff`]: exponential back-off with full jitter; [`retry_pause`] refuses a pause that
//!   would not leave time for the retry before the deadline.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use tower::retry::budget::{Budget as _, TpsBudget};

use crate::Deadline;

/// How long a request counts toward the budget.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// A budget for retries toward one downstream.
#[derive(Clone)]
pub struct RetryBudget(Arc<TpsBudget>);

impl RetryBudget {
    /// Retries may add `ratio` (e.g. 0.2) of requests plus `floor_per_second`, over a 10 s
    /// window.
    pub fn new(ratio: f32, floor_per_second: u32) -> Self {
        Self(Arc::new(TpsBudget::new(
            BUDGET_WINDOW,
            floor_per_second,
            ratio.clamp(0.0, 1000.0),
        )))
    }

    /// Counts an original request (it earns the share of a retry).
    pub fn record_request(&self) {
        self.0.deposit();
    }

    /// Takes a retry from the budget if the window allows one more.
    pub fn try_retry(&self) -> bool {
        self.0.withdraw()
    }
}

/// Back-off timing of retries.
#[derive(Debug, Clone, Copy)]
pub struct RetryTiming {
    /// Ceiling of the first pause; it doubles per attempt up to `cap` (full jitter below it).
    pub base: Duration,
    /// Longest pause.
    pub cap: Duration,
    /// A retry is only started if at least this much of the deadline remains after its pause.
    pub min_left: Duration,
}

impl Default for RetryTiming {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(5),
            cap: Duration::from_millis(100),
            min_left: Duration::from_millis(5),
        }
    }
}

/// Full-jitter exponential back-off: uniformly random in `[0, min(cap, base · 2^attempt)]`.
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
    ceiling.mul_f64(rand::rng().random::<f64>())
}

/// The pause before retry `attempt`, or `None` if after it less than `timing.min_left` of the
/// deadline would remain (a retry that cannot finish in time is not worth starting).
pub fn retry_pause(attempt: u32, deadline: Deadline, timing: RetryTiming) -> Option<Duration> {
    let pause = backoff(attempt, timing.base, timing.cap);
    (deadline.remaining() > pause + timing.min_left).then_some(pause)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retry_budget_allows_a_fifth_of_traffic_plus_a_floor() {
        let budget = RetryBudget::new(0.2, 1);
        // The floor alone: 1 per second over the 10 s window.
        let floor = (0..100).filter(|_| budget.try_retry()).count();
        assert_eq!(floor, 10);
        for _ in 0..1000 {
            budget.record_request();
        }
        let more = (0..1000).filter(|_| budget.try_retry()).count();
        assert_eq!(more, 200, "20 % of 1000 requests");
        // The window slides: after it, old requests and retries no longer count.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!((0..100).filter(|_| budget.try_retry()).count(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_jittered_below_an_exponential_cap_and_respects_the_deadline() {
        for attempt in 0..8 {
            let ceiling =
                Duration::from_millis(10 * (1 << attempt)).min(Duration::from_millis(200));
            for _ in 0..50 {
                let pause = backoff(
                    attempt,
                    Duration::from_millis(10),
                    Duration::from_millis(200),
                );
                assert!(pause <= ceiling);
            }
        }
        let distinct: std::collections::HashSet<_> = (0..50)
            .map(|_| backoff(5, Duration::from_millis(10), Duration::from_secs(1)))
            .collect();
        assert!(distinct.len() > 10, "full jitter spreads retries");
        let timing = RetryTiming {
            base: Duration::from_millis(10),
            cap: Duration::from_secs(1),
            min_left: Duration::from_millis(5),
        };
        let tight = Deadline::after(Duration::from_millis(5));
        assert_eq!(retry_pause(3, tight, timing), None);
        let roomy = Deadline::after(Duration::from_secs(5));
        assert!(retry_pause(3, roomy, timing).is_some());
    }
}
