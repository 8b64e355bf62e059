//! The gateway's outbound calls, as a stack read top to bottom like the server's
//! (`mesh_runtime::server`). A call to a downstream passes, in order:
//!
//! 1. **bulkhead** ([`Bulkhead::try_enter`](mesh_runtime::Bulkhead::try_enter)): a permit in
//!    the traffic class's compartment, so one slow dependency cannot take the others' capacity
//!    and batch traffic cannot take online's.
//! 2. **deadline share** ([`Downstream::call`]): each attempt gets what remains of the caller's
//!    budget; with another replica to turn to, only half of it, so one that hangs cannot take
//!    all.
//! 3. **retry** ([`Downstream::call`]): only what the classifier's
//!    [`retry_kind`](mesh_runtime::resilience::retry_kind) and the layer below allow, within
//!    the downstream's retry budget, after a full-jitter pause that never runs past the
//!    deadline.
//! 4. **breaker** ([`CircuitBreaker::admit`]): fails fast while the downstream is down. Its
//!    permit (the half-open probe included) is a guard: a cancelled call frees it.
//! 5. **balance** ([`replicas::ReplicaSet`], inference only): randomized power of two choices
//!    on in-flight calls among the replicas that are SERVING and not ejected, never one that
//!    failed this request while another is available. The in-flight count is a guard.
//! 6. **traced call** ([`call::traced`]): a client span, `grpc-timeout`, trace context in the
//!    metadata; the result judged once by
//!    [`classify`](mesh_runtime::resilience::classify()) into success, failure or ignore, which
//!    the breaker, outlier ejection and the retry decision all read.
//!
//! Why functions over typed requests and not tower layers over the `Channel`: tonic's
//! `Channel` is a service of HTTP requests whose gRPC status arrives in the body's trailers,
//! so a tower `Retry` or breaker there would have to wrap and buffer bodies to judge them;
//! tower's p2c `Balance` picks from its ready set with no memory of which replica failed this
//! request; and the per-attempt deadline share needs the typed request. What tower does
//! provide and fits, the retry budget (`TpsBudget`), is used as is. Every resource held across
//! an `.await` (bulkhead permit, breaker permit, in-flight count) is a value whose `Drop`
//! releases it, because handlers are dropped mid-flight by design.
//!
//! # Layout
//! - [`call`]: channels and the traced call at the bottom of the stack.
//! - [`replicas`]: the inference replica set: choice, in-flight guards, outlier ejection,
//!   health watching, members that join and leave.
//! - [`discovery`]: which replicas there are: static URLs and DNS names re-resolved.
//! - [`features`], [`inference`], [`logger`]: one typed client per downstream.

pub mod call;
pub mod discovery;
pub mod features;
pub mod inference;
pub mod logger;
pub mod replicas;

use std::future::Future;

use mesh_runtime::resilience::{retry_pause, CircuitBreaker, RetryBudget, RetryTiming, Verdict};
use mesh_runtime::Deadline;

pub use features::FeaturesDownstream;
pub use inference::InferenceDownstream;
pub use logger::LoggerDownstream;

/// How a fail-fast answer of an open breaker ends, so callers can tell it from an outage seen
/// on the wire.
pub const CIRCUIT_OPEN: &str = "circuit open: failing fast";

/// Bulkheads of one traffic class (online or batch) toward each downstream.
#[derive(Clone)]
pub struct Compartments {
    /// Toward the features service.
    pub features: mesh_runtime::Bulkhead,
    /// Toward inference (all replicas).
    pub inference: mesh_runtime::Bulkhead,
}

/// One attempt's outcome, as the layers below the retry report it.
pub struct Attempt<R> {
    /// The answer or the failure.
    pub result: Result<R, tonic::Status>,
    /// The classifier's judgement of it.
    pub verdict: Verdict,
    /// Whether the layer below sees a point in trying again (the classifier allows it and there
    /// is somewhere to send it).
    pub retry: bool,
    /// What degraded, said in the answer if a later attempt succeeds.
    pub note: Option<String>,
}

/// The layers below the retry: makes one attempt per call.
pub trait Attempts {
    /// The downstream's answer.
    type Response;

    /// Whether another target could take a retry of a slow attempt (then an attempt gets only
    /// half of what remains).
    fn has_alternative(&self) -> bool;

    /// One attempt within `deadline`.
    fn attempt(
        &mut self,
        deadline: Deadline,
    ) -> impl Future<Output = Attempt<Self::Response>> + Send;
}

/// What guards calls to one downstream: a breaker that fails fast while it is down, and a
/// budget that keeps retries from amplifying an outage.
#[derive(Clone)]
pub struct Downstream {
    breaker: CircuitBreaker,
    budget: RetryBudget,
    timing: RetryTiming,
}

impl Downstream {
    /// Calls through `breaker`, retrying within `budget`.
    pub fn new(breaker: CircuitBreaker, budget: RetryBudget) -> Self {
        Self {
            breaker,
            budget,
            timing: RetryTiming::default(),
        }
    }

    /// Deadline share → retry → breaker, around `attempts` (balance and traced call). Returns
    /// the answer and the notes of attempts that failed before it.
    pub async fn call<A: Attempts>(
        &self,
        deadline: Deadline,
        mut attempts: A,
    ) -> Result<(A::Response, Vec<String>), tonic::Status> {
        self.budget.record_request();
        let mut notes = Vec::new();
        let mut number = 0u32;
        loop {
            let share = if attempts.has_alternative() {
                Deadline::after(deadline.remaining() / 2)
            } else {
                deadline
            };
            let permit = self.breaker.admit().map_err(|_| {
                tonic::Status::unavailable(format!("{} {CIRCUIT_OPEN}", self.breaker.name()))
            })?;
            let Attempt {
                result,
                verdict,
                retry,
                note,
            } = attempts.attempt(share).await;
            permit.record(verdict);
            let status = match result {
                Ok(response) => return Ok((response, notes)),
                Err(status) => status,
            };
            let pause = (retry && !deadline.expired())
                .then(|| retry_pause(number, deadline, self.timing))
                .flatten()
                .filter(|_| self.budget.try_retry());
            let Some(pause) = pause else {
                return Err(status);
            };
            tracing::warn!(downstream = %self.breaker.name(), code = ?status.code(), error = %status.message(), "call failed; retrying");
            notes.extend(note);
            number += 1;
            tokio::time::sleep(pause).await;
        }
    }
}
