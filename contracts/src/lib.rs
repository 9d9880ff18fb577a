//! The contracts between the controllers and the world: `ObjectClient`, `LeaseClient`, `AgentClient`,
//! their errors, and the clock. Below both `controllers` (which uses them) and `client` (which
//! implements them over HTTP), so neither depends on the other.
#![forbid(unsafe_code)]

pub mod agent;
pub mod clock;
pub mod lease;
pub mod objects;

pub use agent::{AgentClient, AgentError};
pub use lease::LeaseClient;
pub use objects::{ObjectClient, ObjectError, ObjectKind};
