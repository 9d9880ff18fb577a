//! Controller runtime and the node, scheduler, sandbox and ttl controllers of sandboxd-o.
#![forbid(unsafe_code)]

pub mod events;
pub mod node;
pub mod prober;
pub mod runtime;
pub mod sandbox;
pub mod scheduler;
pub mod status;
#[cfg(test)]
pub(crate) mod testing;
pub mod ttl;

// The contracts live in their own crate, below `client` too; re-exported so paths stay `crate::objects`.
pub use sandboxd_contracts::{agent, clock, objects};
pub use sandboxd_contracts::{AgentClient, AgentError, ObjectClient, ObjectError, ObjectKind};
