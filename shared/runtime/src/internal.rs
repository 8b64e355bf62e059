//! The credential of the mesh's internal hops: features, inference and the logger answer only
//! callers that present the shared internal token (the gateway, operators' tools), so reaching
//! their port is not enough to overwrite features or read logged ones.
//!
//! The token travels in the `x-mesh-internal-token` metadata entry and is compared in constant
//! time (its length is not secret). `grpc.health.v1.Health` stays open: probes and load
//! balancers carry no credentials and learn nothing from it. TLS between services is
//! independent of this and configured per service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::HeaderValue;

/// The metadata entry that carries the token.
pub const TOKEN_HEADER: &str = "x-mesh-internal-token";

/// The fewest characters a token may have.
pub const MIN_TOKEN_LEN: usize = 16;

/// The shared secret of the internal hops. `Debug` does not show it.
#[derive(Clone)]
pub struct InternalToken(Arc<str>);

impl std::fmt::Debug for InternalToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InternalToken(<hidden>)")
    }
}

impl InternalToken {
    /// `token`, if it is long enough and can travel as a metadata value (visible ASCII).
    pub fn new(token: &str) -> Result<Self, String> {
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "must have at least {MIN_TOKEN_LEN} characters (e.g. `head -c 32 /dev/urandom | base64`)"
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be visible ASCII characters without spaces".into());
        }
        Ok(Self(token.into()))
    }

    /// Whether `presented` is this token; takes the same time wherever they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        if presented.len() != expected.len() {
            return false;
        }
        expected
            .iter()
            .zip(presented)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }

    fn header_value(&self) -> HeaderValue {
        let mut value = HeaderValue::from_str(&self.0).unwrap_or(HeaderValue::from_static(""));
        value.set_sensitive(true);
        value
    }
}

/// Refuses with `UNAUTHENTICATED` every call but health's that lacks the token.
#[derive(Debug, Clone)]
pub struct InternalAuthLayer {
    token: InternalToken,
}

impl InternalAuthLayer {
    /// A layer requiring `token`.
    pub fn new(token: InternalToken) -> Self {
        Self { token }
    }
}

impl<S> tower_layer::Layer<S> for InternalAuthLayer {
    type Service = InternalAuth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        InternalAuth {
            inner,
            token: self.token.clone(),
        }
    }
}

/// The service made by [`InternalAuthLayer`].
#[derive(Debug, Clone)]
pub struct InternalAuth<S> {
    inner: S,
    token: InternalToken,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for InternalAuth<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let open = request.uri().path().starts_with("/grpc.health.v1.Health/");
        let presented = request
            .headers()
            .get(TOKEN_HEADER)
            .is_some_and(|v| self.token.matches(v.as_bytes()));
        if open || presented {
            return Box::pin(self.inner.call(request));
        }
        tracing::info!(path = %request.uri().path(), "internal call without a valid token refused");
        let status = tonic::Status::unauthenticated(format!(
            "this service answers only the mesh's own services: present the internal token in \
             `{TOKEN_HEADER}`"
        ));
        Box::pin(std::future::ready(Ok(status.into_http())))
    }
}

/// A client-side service (e.g. over a tonic `Channel`) that presents the token on every call.
#[derive(Debug, Clone)]
pub struct WithToken<S> {
    inner: S,
    value: Option<HeaderValue>,
}

impl<S> WithToken<S> {
    /// `inner`, presenting `token` (nothing when `None`: for services that need none).
    pub fn new(inner: S, token: Option<&InternalToken>) -> Self {
        Self {
            inner,
            value: token.map(InternalToken::header_value),
        }
    }
}

/// A channel to an internal service, presenting the token.
pub type InternalChannel = WithToken<tonic::transport::Channel>;

impl<S, B> tower_service::Service<http::Request<B>> for WithToken<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if let Some(value) = &self.value {
            request.headers_mut().insert(TOKEN_HEADER, value.clone());
        }
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_whole_and_never_shown() {
        assert!(InternalToken::new("short").is_err());
        assert!(InternalToken::new("has a space in it!!").is_err());
        let token = InternalToken::new("0123456789abcdef").expect("token");
        assert!(token.matches(b"0123456789abcdef"));
        assert!(!token.matches(b"0123456789abcdeF"));
        assert!(!token.matches(b"0123456789abcde"));
        assert!(!token.matches(b""));
        assert_eq!(format!("{token:?}"), "InternalToken(<hidden>)");
    }
}
