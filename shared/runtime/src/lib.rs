//! What every mesh service shares, so each service crate holds only its own logic.
//!
//! # Layout
//! - [`config`]: environment variables with defaults and errors that name the variable.
//! - [`deadline`]: the request's deadline budget, read from `grpc-timeout` and passed on.
//! - [`bulkhead`]: concurrency limits that shed load with `RESOURCE_EXHAUSTED` instead of queueing.
//! - [`resilience`]: the classifier (success / failure / ignore), circuit breakers with guard
//!   permits, the retry budget and back-off.
//! - [`server`]: the serving scaffold: tower stack, health, reflection, metrics, graceful drain.
//! - [`connections`]: bounded client connections (caps, quiet-connection timeouts).
//! - [`internal`]: the token of the internal hops, required by servers and presented by clients.
//! - [`batch`]: draining a queue in batches (the record shipper and the logger's writer).
//! - [`postgres`]: connection pools and schema migrations.
//! - [`registry`]: the model registry on disk (manifests, versions, aliases).
//! - [`reference`](mod@reference): training reference distributions and PSI (drift).
//! - [`clock`]: wall-clock time in Unix microseconds.
//! - [`text`]: what stored strings (entity ids, categories) may contain.
//! - [`startup`]: why a service cannot start, apart from request errors.

pub mod batch;
pub mod bulkhead;
pub mod clock;
pub mod config;
pub mod connections;
pub mod deadline;
pub mod internal;
pub mod postgres;
pub mod reference;
pub mod registry;
pub mod resilience;
pub mod server;
pub mod startup;
pub mod text;

pub use bulkhead::{Bulkhead, BulkheadLayer};
pub use deadline::{Deadline, DeadlineLayer};
pub use server::{serve_grpc, Health, ServeOptions, ServiceMetrics};
pub use startup::StartupError;
