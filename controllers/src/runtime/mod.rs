//! Controller runtime: work queue, informer, backoff and metrics.

pub mod backoff;
pub mod informer;
pub mod lease;
pub mod metrics;
pub mod queue;
