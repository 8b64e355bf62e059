//! The bottom of the client stack: channels, and one traced call whose result is judged once.

use std::future::Future;
use std::time::Duration;

use mesh_runtime::internal::{InternalChannel, InternalToken, WithToken};
use mesh_runtime::resilience::{classify, Verdict};
use mesh_runtime::Deadline;
use mesh_telemetry::propagation::{inject_current, record_client_status};
use tonic::transport::Endpoint;
use tracing::Instrument as _;

/// A lazily connected channel to `url` (the process starts even if the dependency is down),
/// presenting the internal `token` on every call.
pub fn channel(
    url: &str,
    token: &InternalToken,
) -> Result<InternalChannel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    Ok(WithToken::new(endpoint.connect_lazy(), Some(token)))
}

/// A call's result and the classifier's verdict on it.
pub struct Judged<R> {
    /// The answer or the failure.
    pub result: Result<R, tonic::Status>,
    /// Success, failure or ignore, for the breaker, outlier ejection and retries.
    pub verdict: Verdict,
}

/// Sends `message` through `call` inside `span` (a client span): what remains of `deadline`
/// minus `margin` as its `grpc-timeout`, trace context in its metadata, the outcome on the span,
/// and the result judged by [`classify()`] against the budget the attempt had.
pub async fn traced<T, R, F, Fut>(
    span: tracing::Span,
    message: T,
    deadline: Deadline,
    margin: Duration,
    call: F,
) -> Judged<R>
where
    F: FnOnce(tonic::Request<T>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
{
    let budget = deadline.remaining();
    let result = async move {
        let mut request = tonic::Request::new(message);
        deadline.propagate(&mut request, margin)?;
        inject_current(request.metadata_mut());
        let result = call(request).await;
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        };
        record_client_status(&tracing::Span::current(), code);
        result.map(tonic::Response::into_inner)
    }
    .instrument(span)
    .await;
    let verdict = classify(&result, budget);
    Judged { result, verdict }
}
