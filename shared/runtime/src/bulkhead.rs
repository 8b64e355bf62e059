//! Bulkheads: a fixed number of concurrent calls per compartment (a service, or one downstream
//! of the gateway). When a compartment is full the call is shed with `RESOURCE_EXHAUSTED` at
//! once rather than queued, so one slow dependency cannot take every task and overload turns
//! into fast, retryable errors instead of growing latency.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// In-flight and shed counts of every bulkhead of a service.
#[derive(Clone)]
pub struct BulkheadMetrics {
    in_flight: IntGaugeVec,
    limit: IntGaugeVec,
    shed: IntCounterVec,
}

impl BulkheadMetrics {
    /// Registers `mesh_bulkhead_in_flight`, `mesh_bulkhead_limit` and `mesh_bulkhead_shed_total`,
    /// each labelled by bulkhead name.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let in_flight = IntGaugeVec::new(
            Opts::new(
                "mesh_bulkhead_in_flight",
                "Calls currently inside the bulkhead",
            ),
            &["bulkhead"],
        )?;
        let limit = IntGaugeVec::new(
            Opts::new(
                "mesh_bulkhead_limit",
                "Configured concurrency limit of the bulkhead",
            ),
            &["bulkhead"],
        )?;
        let shed = IntCounterVec::new(
            Opts::new(
                "mesh_bulkhead_shed_total",
                "Calls refused with RESOURCE_EXHAUSTED because the bulkhead was full",
            ),
            &["bulkhead"],
        )?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(limit.clone()))?;
        registry.register(Box::new(shed.clone()))?;
        Ok(Self {
            in_flight,
            limit,
            shed,
        })
    }
}

/// One compartment with a concurrency limit.
#[derive(Clone)]
pub struct Bulkhead {
    name: Arc<str>,
    semaphore: Arc<Semaphore>,
    metrics: BulkheadMetrics,
}

/// A place in a bulkhead; the place frees when this drops.
pub struct BulkheadPermit {
    _permit: OwnedSemaphorePermit,
    in_flight: prometheus::IntGauge,
}

impl Drop for BulkheadPermit {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

impl Bulkhead {
    /// A bulkhead called `name` admitting `limit` concurrent calls.
    pub fn new(name: &str, limit: usize, metrics: &BulkheadMetrics) -> Self {
        metrics.limit.with_label_values(&[name]).set(limit as i64);
        metrics.in_flight.with_label_values(&[name]).set(0);
        metrics.shed.with_label_values(&[name]);
        Self {
            name: name.into(),
            semaphore: Arc::new(Semaphore::new(limit)),
            metrics: metrics.clone(),
        }
    }

    /// Takes a place, or fails with `RESOURCE_EXHAUSTED` naming the bulkhead when it is full.
    pub fn try_enter(&self) -> Result<BulkheadPermit, tonic::Status> {
        match self.semaphore.clone().try_acquire_owned() {
            Ok(permit) => {
                let in_flight = self.metrics.in_flight.with_label_values(&[&self.name]);
                in_flight.inc();
                Ok(BulkheadPermit {
                    _permit: permit,
                    in_flight,
                })
            }
            Err(_) => {
                self.metrics.shed.with_label_values(&[&self.name]).inc();
                Err(tonic::Status::resource_exhausted(format!(
                    "overloaded: the {} bulkhead is full; retry with backoff",
                    self.name
                )))
            }
        }
    }

    /// Free places right now.
    pub fn available(&self) -> usize {
        self.semaphore.available_permits()
    }

    /// The bulkhead's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Puts every RPC of a server, except health checks and reflection, behind one [`Bulkhead`], so
/// a saturated service still answers its probes.
#[derive(Clone)]
pub struct BulkheadLayer {
    bulkhead: Bulkhead,
}

impl BulkheadLayer {
    /// A layer admitting calls through `bulkhead`.
    pub fn new(bulkhead: Bulkhead) -> Self {
        Self { bulkhead }
    }
}

impl<S> tower_layer::Layer<S> for BulkheadLayer {
    type Service = BulkheadService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BulkheadService {
            inner,
            bulkhead: self.bulkhead.clone(),
        }
    }
}

/// The service made by [`BulkheadLayer`].
#[derive(Clone)]
pub struct BulkheadService<S> {
    inner: S,
    bulkhead: Bulkhead,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for BulkheadService<S>
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

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if crate::deadline::is_control_path(req.uri().path()) {
            return Box::pin(inner.call(req));
        }
        match self.bulkhead.try_enter() {
            Ok(permit) => Box::pin(async move {
                let response = inner.call(req).await;
                drop(permit);
                response
            }),
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheds_when_full_and_admits_again_after_release() {
        let registry = Registry::new();
        let metrics = BulkheadMetrics::register(&registry).expect("register");
        let bulkhead = Bulkhead::new("inference", 2, &metrics);
        let a = bulkhead.try_enter().expect("first");
        let _b = bulkhead.try_enter().expect("second");
        let err = bulkhead.try_enter().err().expect("third is shed");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("inference"), "{}", err.message());
        assert_eq!(metrics.shed.with_label_values(&["inference"]).get(), 1);
        assert_eq!(metrics.in_flight.with_label_values(&["inference"]).get(), 2);
        drop(a);
        assert!(bulkhead.try_enter().is_ok());
    }
}
