//! What every mesh service shares, so each service crate holds only its own logic.
//!
//! # Layout
//! - [`config`]: environment variables with defaults and errors that name the variable.
//! - [`deadline`]: the request's deadline budget, read from `grpc-timeout` and passed on.
//! - [`bulkhead`]: concurrency limits that shed load with `RESOURCE_EXHAUSTED` instead of queueing.
//! - [`server`]: the serving scaffold: tower stack, health, reflection, metrics, graceful drain.
//! - [`postgres`]: connection pools and schema migrations.
//! - [`text`]: what stored strings (ids, categories) may contain.

pub mod batch;
pub mod bulkhead;
pub mod config;
pub mod deadline;
pub mod postgres;
pub mod registry;
pub mod retry;
pub mod server;
pub mod text;

pub use bulkhead::{Bulkhead, BulkheadLayer};
pub use deadline::{Deadline, DeadlineLayer};
pub use server::{serve_grpc, Health, ServeOptions, ServiceMetrics};
