//! Wire types of the sandboxd-o API and the sbxlet agent API, quantity parsing and validation.
#![forbid(unsafe_code)]

pub mod affinity;
pub mod agent;
pub mod auth;
pub mod dataplane;
pub mod event;
pub mod lease;
pub mod names;
pub mod node;
pub mod objects_only;
pub mod quantity;
pub mod sandbox;
pub mod schema_rules;
pub mod syntax;
pub mod taints;
pub mod time;
pub mod validate;
pub mod watch;

pub use lease::Lease;
pub use node::{Node, NodeResources, NodeSource, NodeState};
pub use sandbox::{
    AssignedPort, Container, ContainerResource, EnvVar, Phase, PortSpec, Probe, ProbeProtocol, Protocol, Readiness,
    RuntimeClass, RuntimeClasses, Sandbox, SandboxSpec, SandboxStatus,
};
pub use validate::{FieldError, FieldErrors};
pub use watch::{EventType, WatchEvent};

/// Label every sandbox created by the orchestrator carries on its agent.
pub const MANAGED_LABEL: &str = "sandboxd.io/managed";
