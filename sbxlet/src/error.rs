//! `RuntimeError`: why a runtime, simulated or real, refused or failed a request.

use crate::ports::PortUnavailable;
use sandboxd_api::Protocol;

/// Why a runtime refused or failed a request; the HTTP layer maps each kind to a status once.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid sandbox: {0}")]
    Invalid(String),
    #[error("sandbox {0:?} already exists with a different spec")]
    SpecConflict(String),
    #[error("sandbox {0:?} is being deleted; create it again once it is gone")]
    Deleting(String),
    #[error("host port {port}/{} is already used by sandbox {owner:?}", protocol.as_str())]
    PortTaken { port: u16, protocol: Protocol, owner: String },
    #[error(transparent)]
    PortUnavailable(#[from] PortUnavailable),
    #[error("insufficient cpu: sandbox requests {requested}m, {available}m of {capacity}m available")]
    InsufficientCpu { requested: u64, available: u64, capacity: u64 },
    #[error("insufficient memory: sandbox requests {requested} bytes, {available} of {capacity} bytes available")]
    InsufficientMemory { requested: u64, available: u64, capacity: u64 },
    #[error("ip pool exhausted")]
    PoolExhausted,
    #[error("sandbox {0:?} not found")]
    SandboxNotFound(String),
    #[error("container {container:?} not found in sandbox {sandbox:?}")]
    ContainerNotFound { sandbox: String, container: String },
    /// The sandbox exists but is not running (exec and files need a running container).
    #[error("{0}")]
    NotRunning(String),
    /// This runtime does not offer the operation (the simulator has no files).
    #[error("{0}")]
    Unsupported(String),
    /// A path inside a container that does not exist.
    #[error("{0}")]
    NoSuchPath(String),
    /// A path that is not allowed or not of the kind asked for (a directory where a file is needed).
    #[error("{0}")]
    BadPath(String),
    /// A body or file over a configured cap.
    #[error("{0}")]
    TooLarge(String),
    /// The node could not do what was asked (a runtime, network or image step failed).
    #[error("{0}")]
    Failed(String),
}
