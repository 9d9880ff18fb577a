//! Controller runtime: work queue, informer, backoff.

pub mod backoff;
pub mod informer;
pub mod queue;
