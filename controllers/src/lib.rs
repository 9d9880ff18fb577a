//! Controller runtime and the node, scheduler, sandbox and ttl controllers of sandboxd-o.
#![forbid(unsafe_code)]

pub mod runtime;
