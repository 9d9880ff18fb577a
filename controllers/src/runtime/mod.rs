//! Controller runtime: the controller harness, work queue, informer, lease, backoff and metrics.

pub mod backoff;
pub mod controller;
pub mod error;
pub mod footprint;
pub mod informer;
pub mod lease;
pub mod metrics;
pub mod queue;
