//! Prometheus metrics: the exposition of the agent's counts (built at scrape
//! time from the live index, the kernel's counters as of the last reconcile,
//! and what the agent observed), and the HTTP server that answers `/metrics`
//! when `metrics_listen` is set.

pub mod exposition;
pub mod http;

pub use exposition::render;
pub use http::{bind, serve, MetricsError};
