//! One judgement of every downstream result, read by breakers, outlier ejection and retries.
//!
//! A classifier with two outcomes turns "this says nothing about the dependency" into
//! "success", and a hopeless request that happens to be a breaker's half-open probe then closes
//! it without any answer from the dependency. So there are three: [`Verdict::Success`] (the
//! dependency answered), [`Verdict::Failure`] (it is down, failing or too slow) and
//! [`Verdict::Ignore`] (the outcome says nothing about its health: neither counts).

use std::time::Duration;

use tonic::Code;

/// What an attempt's outcome says about the dependency's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The dependency answered (an answer naming the caller's mistake is an answer too).
    Success,
    /// The dependency is down, failing or too slow: counts toward opening its breaker and
    /// ejecting the replica.
    Failure,
    /// Says nothing about the dependency's health: neither resets nor adds to its failures.
    Ignore,
}

/// The smallest budget whose expiry counts as the dependency's failure: a caller sending
/// hopeless deadlines must not open the breaker (or eject a replica) for everyone.
pub const FAIR_BUDGET: Duration = Duration::from_millis(20);

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

/// What a status code says happened, the one exhaustive grouping both [`classify`] and
/// [`retry_kind`] read (a new code in tonic breaks the build here until it is placed).
enum Outcome {
    /// The downstream answered (a caller's mistake is an answer too).
    Answered,
    /// It could not be reached or the connection broke (tonic reports a reset connection as
    /// `UNKNOWN`).
    Unreachable,
    /// The attempt ran out of its time, or was cut off for it.
    TimedOut,
    /// The downstream protected itself from overload.
    PushedBack,
    /// The downstream failed while answering.
    Broken,
}

fn outcome(code: Code) -> Outcome {
    match code {
        Code::Unavailable | Code::Unknown => Outcome::Unreachable,
        Code::DeadlineExceeded | Code::Cancelled => Outcome::TimedOut,
        Code::ResourceExhausted => Outcome::PushedBack,
        Code::Internal | Code::DataLoss => Outcome::Broken,
        Code::Ok
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Unauthenticated => Outcome::Answered,
    }
}

/// Judges the result of one attempt that had `budget` to run.
pub fn classify<T>(result: &Result<T, tonic::Status>, budget: Duration) -> Verdict {
    let status = match result {
        Ok(_) => return Verdict::Success,
        Err(status) => status,
    };
    if is_store_unavailable(status) {
        // The service answered; the store behind it failed. Opening the breaker would also
        // refuse everything the service still serves from its caches.
        return Verdict::Ignore;
    }
    match outcome(status.code()) {
        Outcome::Answered => Verdict::Success,
        Outcome::TimedOut if budget < FAIR_BUDGET => Verdict::Ignore,
        Outcome::TimedOut | Outcome::Unreachable | Outcome::Broken => Verdict::Failure,
        // Push-back from a live service: it protects itself, which is what it should do.
        Outcome::PushedBack => Verdict::Ignore,
    }
}

/// Where a failed attempt of an idempotent call may be tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryKind {
    /// Not at all: the answer would be the same, or nothing is left to try with.
    Never,
    /// Anywhere, the same endpoint included: it could not be reached or the connection broke;
    /// a new connection may succeed.
    Anywhere,
    /// Only on another replica: this one timed out its share of the budget or pushed back
    /// with `RESOURCE_EXHAUSTED`; sending it the same work again would only add to its load.
    Elsewhere,
}

/// What a failed attempt allows next.
pub fn retry_kind(status: &tonic::Status) -> RetryKind {
    if is_store_unavailable(status) {
        return RetryKind::Never;
    }
    match outcome(status.code()) {
        Outcome::Unreachable => RetryKind::Anywhere,
        Outcome::TimedOut | Outcome::PushedBack => RetryKind::Elsewhere,
        Outcome::Answered | Outcome::Broken => RetryKind::Never,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAIR: Duration = Duration::from_millis(100);

    fn status(code: Code) -> Result<(), tonic::Status> {
        Err(tonic::Status::new(code, "x"))
    }

    fn store_down() -> tonic::Status {
        let mut s = tonic::Status::unavailable("store down");
        s.metadata_mut()
            .insert(STORE_UNAVAILABLE, "postgres".parse().expect("ascii"));
        s
    }

    #[test]
    fn answers_are_successes_outages_are_failures() {
        assert_eq!(
            classify(&Ok::<_, tonic::Status>(()), FAIR),
            Verdict::Success
        );
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
        ] {
            assert_eq!(classify(&status(code), FAIR), Verdict::Success, "{code:?}");
        }
        for code in [
            Code::Unavailable,
            Code::Unknown,
            Code::Internal,
            Code::DeadlineExceeded,
        ] {
            assert_eq!(classify(&status(code), FAIR), Verdict::Failure, "{code:?}");
        }
    }

    #[test]
    fn hopeless_budgets_push_back_and_store_outages_are_ignored() {
        let hopeless = FAIR_BUDGET - Duration::from_millis(1);
        assert_eq!(
            classify(&status(Code::DeadlineExceeded), hopeless),
            Verdict::Ignore
        );
        assert_eq!(
            classify(&status(Code::Cancelled), hopeless),
            Verdict::Ignore
        );
        assert_eq!(
            classify(&status(Code::DeadlineExceeded), FAIR_BUDGET),
            Verdict::Failure
        );
        assert_eq!(
            classify(&status(Code::ResourceExhausted), FAIR),
            Verdict::Ignore
        );
        assert_eq!(classify(&Err::<(), _>(store_down()), FAIR), Verdict::Ignore);
    }

    #[test]
    fn retries_go_where_they_can_help() {
        let kind = |code| retry_kind(&tonic::Status::new(code, "x"));
        assert_eq!(kind(Code::Unavailable), RetryKind::Anywhere);
        assert_eq!(kind(Code::Unknown), RetryKind::Anywhere);
        assert_eq!(kind(Code::DeadlineExceeded), RetryKind::Elsewhere);
        assert_eq!(kind(Code::ResourceExhausted), RetryKind::Elsewhere);
        assert_eq!(kind(Code::InvalidArgument), RetryKind::Never);
        assert_eq!(kind(Code::Internal), RetryKind::Never);
        assert_eq!(retry_kind(&store_down()), RetryKind::Never);
    }
}
