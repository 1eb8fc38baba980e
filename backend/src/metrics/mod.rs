//! Prometheus metrics: counters and histograms kept in atomics on the serving path
//! ([`registry`], [`crate::histogram`]), rendered in the Prometheus text exposition format (version
//! 0.0.4) by a small HTTP endpoint ([`exporter`]: `--metrics ADDR`, off by default), which also
//! answers `/healthz` and `/readyz`. The end-to-end test parses the output with an independent
//! parser (`prometheus-parse`).
//!
//! docs/metrics.md lists every metric and what to alert on.

pub mod exporter;
pub mod registry;

pub use exporter::{Exporter, MetricsError, Readiness};
pub use registry::Metrics;
