//! Deadline budgets. The caller's `grpc-timeout` header is the budget; without one, a service
//! may apply a default. Every downstream call carries what remains as its own `grpc-timeout`
//! (`tonic::Request::set_timeout`), and no service works on a request whose deadline passed.
//!
//! [`DeadlineLayer`] reads the header, answers `DEADLINE_EXCEEDED` at once if nothing is left,
//! stores a [`Deadline`] in the request's extensions for handlers, and cuts the handler off with
//! `DEADLINE_EXCEEDED` when the budget runs out (tonic's own server timeout says `CANCELLED`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

/// The instant by which a request must be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(Instant);

impl Deadline {
    /// A deadline `budget` from now.
    pub fn after(budget: Duration) -> Self {
        Self(Instant::now() + budget)
    }

    /// The deadline the [`DeadlineLayer`] stored for this request, if any.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<Self> {
        request.extensions().get::<Deadline>().copied()
    }

    /// Time left (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// The instant itself.
    pub fn instant(&self) -> Instant {
        self.0
    }

    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        Instant::now() >= self.0
    }

    /// Gives an outgoing request what remains of this budget minus `margin` (time for the answer
    /// to travel back), as its `grpc-timeout`. Fails with `DEADLINE_EXCEEDED` if nothing remains.
    pub fn propagate<T>(
        &self,
        request: &mut tonic::Request<T>,
        margin: Duration,
    ) -> Result<Duration, tonic::Status> {
        let remaining = self.remaining().saturating_sub(margin);
        if remaining.is_zero() {
            return Err(exceeded());
        }
        request.set_timeout(remaining);
        Ok(remaining)
    }

    /// Runs `fut` until this deadline; past it, `DEADLINE_EXCEEDED`.
    pub async fn run<F, T>(&self, fut: F) -> Result<T, tonic::Status>
    where
        F: Future<Output = Result<T, tonic::Status>>,
    {
        match tokio::time::timeout_at(self.0, fut).await {
            Ok(result) => result,
            Err(_) => Err(exceeded()),
        }
    }
}

/// The status every component returns when a budget runs out.
pub fn exceeded() -> tonic::Status {
    tonic::Status::deadline_exceeded("deadline exceeded")
}

/// Parses a `grpc-timeout` header value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    // Bytes, not chars: a multi-byte last character must not split a string mid-character.
    let (unit, digits) = value.as_bytes().split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Applies deadlines to every RPC except health checks and reflection.
#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    default_budget: Option<Duration>,
    max_budget: Duration,
}

impl DeadlineLayer {
    /// `default_budget` applies when the caller sent no `grpc-timeout` (`None`: only
    /// `max_budget`); no request runs longer than `max_budget`.
    pub fn new(default_budget: Option<Duration>, max_budget: Duration) -> Self {
        Self {
            default_budget,
            max_budget,
        }
    }
}

impl<S> tower_layer::Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct DeadlineService<S> {
    inner: S,
    layer: DeadlineLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// Paths that must answer even for a caller without a budget: probes and tooling.
pub(crate) fn is_control_path(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

impl<S, B> tower_service::Service<http::Request<B>> for DeadlineService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if is_control_path(req.uri().path()) {
            return Box::pin(inner.call(req));
        }
        let requested = match req.headers().get("grpc-timeout") {
            None => self.layer.default_budget,
            Some(value) => match value.to_str().ok().and_then(parse_grpc_timeout) {
                Some(budget) => Some(budget),
                None => {
                    let status = malformed_timeout(&String::from_utf8_lossy(value.as_bytes()));
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            },
        };
        let budget = requested
            .map(|b| b.min(self.layer.max_budget))
            .unwrap_or(self.layer.max_budget);
        if budget.is_zero() {
            return Box::pin(async { Ok(exceeded().into_http()) });
        }
        // Give up slightly before the caller does, so it receives our DEADLINE_EXCEEDED
        // rather than its own timer's cancellation.
        let deadline = Deadline::after(budget.saturating_sub(response_margin(budget)));
        req.extensions_mut().insert(deadline);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline.instant(), inner.call(req)).await {
                Ok(result) => result,
                Err(_) => Ok(exceeded().into_http()),
            }
        })
    }
}

/// The answer to a `grpc-timeout` header that does not parse: the caller's deadline is unknown,
/// and guessing one would hide its bug.
pub fn malformed_timeout(value: &str) -> tonic::Status {
    let shown: String = value.chars().take(32).collect();
    tonic::Status::invalid_argument(format!(
        "grpc-timeout {shown:?} is malformed: expected 1 to 8 digits and a unit (H, M, S, m, u or n), e.g. 250m"
    ))
}

/// Time kept back from a server's budget for its answer to reach the caller: a tenth of the
/// budget, at most 2 ms.
pub fn response_margin(budget: Duration) -> Duration {
    (budget / 10).min(Duration::from_millis(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_grpc_timeout_unit() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("900u"), Some(Duration::from_micros(900)));
        assert_eq!(
            parse_grpc_timeout("1000n"),
            Some(Duration::from_nanos(1000))
        );
        assert_eq!(
            parse_grpc_timeout("12345678m"),
            Some(Duration::from_millis(12_345_678))
        );
    }

    #[test]
    fn rejects_malformed_grpc_timeouts() {
        for bad in ["", "m", "5", "5x", "-5m", "123456789m", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?} should not parse");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn propagate_gives_the_remainder_minus_margin_and_refuses_when_spent() {
        let deadline = Deadline::after(Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(40)).await;
        let mut req = tonic::Request::new(());
        let sent = deadline
            .propagate(&mut req, Duration::from_millis(5))
            .expect("budget left");
        assert_eq!(sent, Duration::from_millis(55));
        tokio::time::advance(Duration::from_millis(58)).await;
        let err = deadline
            .propagate(&mut req, Duration::from_millis(5))
            .expect_err("only 2 ms left, less than the margin");
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
    }

    fn status_of(response: &http::Response<tonic::body::Body>) -> Option<String> {
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap_or_default().to_owned())
    }

    /// Sends a request with `grpc-timeout: value` through the layer: the grpc-status answered,
    /// its message, and whether the handler ran.
    async fn with_timeout_header(value: &str) -> (Option<String>, Option<String>, bool) {
        use tower::{Layer as _, Service as _, ServiceExt as _};
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = ran.clone();
        let inner = tower::service_fn(move |_req: http::Request<()>| {
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
            async {
                Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
            }
        });
        let mut service = DeadlineLayer::new(None, Duration::from_secs(30)).layer(inner);
        let request = http::Request::builder()
            .uri("/mesh.gateway.v1.Gateway/Predict")
            .header("grpc-timeout", value)
            .body(())
            .expect("request");
        let response = service
            .ready()
            .await
            .expect("ready")
            .call(request)
            .await
            .expect("response");
        let message = response
            .headers()
            .get("grpc-message")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        (
            status_of(&response),
            message,
            ran.load(std::sync::atomic::Ordering::SeqCst),
        )
    }

    #[tokio::test]
    async fn work_whose_deadline_passed_is_refused_without_running_the_handler() {
        let (status, _, ran) = with_timeout_header("0m").await;
        assert_eq!(status.as_deref(), Some("4"), "DEADLINE_EXCEEDED");
        assert!(!ran, "handler must not run");
    }

    #[tokio::test]
    async fn a_malformed_grpc_timeout_is_refused_naming_the_value() {
        let (status, message, ran) = with_timeout_header("soon").await;
        assert_eq!(status.as_deref(), Some("3"), "INVALID_ARGUMENT");
        let message = message.unwrap_or_default();
        assert!(
            message.contains("grpc-timeout") && message.contains("soon"),
            "{message}"
        );
        assert!(!ran, "handler must not run");
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_outliving_its_budget_is_cut_off_with_deadline_exceeded() {
        use tower::{Layer as _, Service as _, ServiceExt as _};
        let inner = tower::service_fn(|_req: http::Request<()>| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
        });
        let mut service =
            DeadlineLayer::new(Some(Duration::from_millis(100)), Duration::from_secs(30))
                .layer(inner);
        let request = http::Request::builder()
            .uri("/inference.GRPCInferenceService/ModelInfer")
            .body(())
            .expect("request");
        let started = tokio::time::Instant::now();
        let response = service
            .ready()
            .await
            .expect("ready")
            .call(request)
            .await
            .expect("response");
        assert_eq!(status_of(&response).as_deref(), Some("4"));
        assert!(started.elapsed() <= Duration::from_millis(100));
    }
}
