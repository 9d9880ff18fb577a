//! Controller runtime: work queue, informer, backoff and metrics.

pub mod backoff;
pub mod error;
pub mod footprint;
pub mod informer;
pub mod lease;
pub mod metrics;
pub mod queue;
