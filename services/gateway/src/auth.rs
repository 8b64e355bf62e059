//! Access control and abuse limits at the public edge: API keys and a per-key rate limit.
//!
//! - A key comes in the `x-api-key` metadata entry or as `authorization: Bearer <key>`.
//!   Missing or unknown keys get `UNAUTHENTICATED`. Keys are compared in constant time against
//!   every configured key, and never logged: logs and metrics name the key's *id*.
//! - Each key has a token bucket (`rate` per second, `burst` deep). An empty bucket answers
//!   `RESOURCE_EXHAUSTED` with a `retry-after-ms` metadata entry saying when a token is due.
//! - With no keys configured, access control is off (local development) and start-up says so.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// One configured key: an id for logs and metrics, and the secret.
#[derive(Clone)]
pub struct ApiKey {
    /// Names the key in logs and metrics.
    pub id: String,
    /// The secret callers send.
    pub secret: String,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Parses `MESH_API_KEYS`: comma-separated `id:secret` pairs.
pub fn parse_keys(raw: &str) -> Result<Vec<ApiKey>, String> {
    parse_key_list("MESH_API_KEYS", raw)
}

/// Parses comma-separated `id:secret` pairs read from `variable` (named in errors).
pub fn parse_key_list(variable: &str, raw: &str) -> Result<Vec<ApiKey>, String> {
    let mut keys = Vec::new();
    for (i, part) in raw
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .enumerate()
    {
        let Some((id, secret)) = part.split_once(':') else {
            return Err(format!("{variable} entry #{} is not id:secret", i + 1));
        };
        if id.is_empty() || secret.len() < 8 {
            return Err(format!(
                "{variable} entry #{} needs an id and a secret of at least 8 characters",
                i + 1
            ));
        }
        if keys.iter().any(|k: &ApiKey| k.id == id) {
            return Err(format!("{variable} names the id {id:?} twice"));
        }
        keys.push(ApiKey {
            id: id.to_owned(),
            secret: secret.to_owned(),
        });
    }
    Ok(keys)
}

/// Per-key request rate.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    /// Tokens added per second.
    pub per_second: f64,
    /// Bucket depth: the largest burst.
    pub burst: f64,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// The gatekeeper: which key a request carries, and whether it may pass now.
#[derive(Clone)]
pub struct AccessControl {
    keys: Arc<Vec<ApiKey>>,
    limit: Option<RateLimit>,
    buckets: Arc<Mutex<HashMap<String, Bucket>>>,
    rejected: prometheus::IntCounterVec,
}

/// Compares without an early exit, so timing does not reveal how much of a key matched.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | ((a.len() ^ b.len()) >> 8) as u8;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    diff == 0
}

impl AccessControl {
    /// Access control over `keys` (empty: off) with an optional per-key `limit`; rejections
    /// are counted in `mesh_gateway_rejected_total{reason}` in `registry`.
    pub fn new(
        keys: Vec<ApiKey>,
        limit: Option<RateLimit>,
        registry: &prometheus::Registry,
    ) -> prometheus::Result<Self> {
        let rejected = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "mesh_gateway_rejected_total",
                "Requests refused at the edge, by reason (unauthenticated, rate_limited)",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(rejected.clone()))?;
        Ok(Self {
            keys: Arc::new(keys),
            limit,
            buckets: Arc::new(Mutex::new(HashMap::new())),
            rejected,
        })
    }

    /// Whether keys are required.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    fn presented(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
        if let Some(v) = metadata.get("x-api-key").and_then(|v| v.to_str().ok()) {
            return Some(v.trim());
        }
        metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
    }

    /// The id of the key `metadata` carries, or `UNAUTHENTICATED`.
    pub fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<String, tonic::Status> {
        let Some(presented) = Self::presented(metadata) else {
            self.rejected.with_label_values(&["unauthenticated"]).inc();
            return Err(tonic::Status::unauthenticated(
                "missing API key: send it as x-api-key or authorization: Bearer <key>",
            ));
        };
        let mut found: Option<&ApiKey> = None;
        for key in self.keys.iter() {
            // Every key is compared, matched or not, so timing does not tell which one matched.
            if constant_time_eq(presented.as_bytes(), key.secret.as_bytes()) {
                found = Some(key);
            }
        }
        match found {
            Some(key) => Ok(key.id.clone()),
            None => {
                self.rejected.with_label_values(&["unauthenticated"]).inc();
                Err(tonic::Status::unauthenticated("invalid API key"))
            }
        }
    }

    /// Takes a token from `key_id`'s bucket, or says when one will be there.
    pub fn admit(&self, key_id: &str) -> Result<(), Duration> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        let now = Instant::now();
        let mut buckets = self.buckets.lock().map_err(|_| Duration::ZERO)?;
        let bucket = buckets.entry(key_id.to_owned()).or_insert(Bucket {
            tokens: limit.burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limit.per_second).min(limit.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / limit.per_second,
            ))
        }
    }

    /// The interceptor put in front of the Gateway service: authenticate, then rate-limit.
    pub fn check(&self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if !self.enabled() {
            return Ok(request);
        }
        let key_id = self.authenticate(request.metadata())?;
        if let Err(wait) = self.admit(&key_id) {
            self.rejected.with_label_values(&["rate_limited"]).inc();
            tracing::info!(key = %key_id, retry_after = ?wait, "rate limited");
            let millis = wait.as_millis().max(1);
            let mut status = tonic::Status::resource_exhausted(format!(
                "rate limit exceeded for key {key_id}; retry after {millis} ms"
            ));
            if let Ok(v) = millis.to_string().parse() {
                status.metadata_mut().insert("retry-after-ms", v);
            }
            return Err(status);
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(limit: Option<RateLimit>) -> AccessControl {
        let keys = parse_keys("alice:alice-secret-1, bob:bob-secret-22").expect("keys");
        AccessControl::new(keys, limit, &prometheus::Registry::new()).expect("control")
    }

    fn with_header(name: &'static str, value: &str) -> tonic::Request<()> {
        let mut r = tonic::Request::new(());
        r.metadata_mut().insert(name, value.parse().expect("value"));
        r
    }

    #[test]
    fn keys_parse_and_bad_entries_are_named() {
        assert_eq!(parse_keys("a:12345678,b:abcdefgh").expect("ok").len(), 2);
        assert!(parse_keys("nocolon").expect_err("rejected").contains("#1"));
        assert!(parse_keys("a:short")
            .expect_err("rejected")
            .contains("8 characters"));
        assert!(parse_keys("a:12345678,a:abcdefgh")
            .expect_err("rejected")
            .contains("twice"));
        assert!(!format!("{:?}", parse_keys("a:12345678").expect("ok")).contains("12345678"));
    }

    #[test]
    fn only_configured_keys_pass_in_either_header() {
        let c = control(None);
        assert!(c.check(with_header("x-api-key", "bob-secret-22")).is_ok());
        assert!(c
            .check(with_header("authorization", "Bearer alice-secret-1"))
            .is_ok());
        for bad in [
            with_header("x-api-key", "alice-secret-"),
            with_header("x-api-key", "alice-secret-12"),
            tonic::Request::new(()),
        ] {
            assert_eq!(
                c.check(bad).expect_err("rejected").code(),
                tonic::Code::Unauthenticated
            );
        }
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[tokio::test(start_paused = true)]
    async fn each_key_has_its_own_bucket_and_learns_when_to_retry() {
        let c = control(Some(RateLimit {
            per_second: 10.0,
            burst: 2.0,
        }));
        let alice = || with_header("x-api-key", "alice-secret-1");
        assert!(c.check(alice()).is_ok());
        assert!(c.check(alice()).is_ok());
        let refused = c.check(alice()).expect_err("bucket empty");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            refused
                .metadata()
                .get("retry-after-ms")
                .and_then(|v| v.to_str().ok()),
            Some("100")
        );
        assert!(
            c.check(with_header("x-api-key", "bob-secret-22")).is_ok(),
            "bob is not limited by alice"
        );
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(
            c.check(alice()).is_ok(),
            "a token came back after the hinted wait"
        );
    }
}
