//! Controller runtime and the node, scheduler, sandbox and ttl controllers of sandboxd-o.
#![forbid(unsafe_code)]

pub mod agent;
pub mod clock;
pub mod node;
pub mod objects;
pub mod prober;
pub mod runtime;
pub mod sandbox;
pub mod scheduler;
pub mod ttl;

pub use agent::{AgentClient, AgentError};
pub use objects::{ObjectClient, ObjectError, ObjectKind};
