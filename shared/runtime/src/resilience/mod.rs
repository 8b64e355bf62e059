//! The rules that keep a failing dependency from taking its callers down, in one place each.
//!
//! # Layout
//! - [`classify`](mod@classify): the one judgement of a downstream result (success, failure or ignore) and
//!   what kind of retry it allows. Breakers, outlier ejection and retries all read it.
//! - [`breaker`]: closed → open → half-open circuit breakers whose call permits (and the
//!   half-open probe) are guards: a call dropped mid-flight can never wedge one.
//! - [`retry`]: the retry budget (tower's `TpsBudget`) and full-jitter back-off that never
//!   pauses past the deadline.

pub mod breaker;
pub mod classify;
pub mod retry;

pub use breaker::{BreakerConfig, BreakerMetrics, BreakerPermit, BreakerState, CircuitBreaker};
pub use classify::{
    classify, is_store_unavailable, retry_kind, RetryKind, Verdict, FAIR_BUDGET, STORE_UNAVAILABLE,
};
pub use retry::{backoff, retry_pause, RetryBudget, RetryTiming};
