//! `Backend`: what the agent API asks of a runtime, simulated (`sim`) or real (`runc`).

use crate::error::RuntimeError;
use crate::exec::ExecProcess;
use crate::files::ContainerRoot;
use sandboxd_api::agent::{AgentCreateRequest, AgentLogs, AgentSandbox, AgentSandboxList, AgentStatus};
use sandboxd_api::dataplane::ExecRequest;
use std::path::PathBuf;

/// Caps of the data plane (exec output, file sizes, open sessions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataPlaneLimits {
    /// Largest file read or written, and largest archive, in bytes (over it: 413).
    pub max_file_bytes: u64,
    /// Bytes of stdout and of stderr a buffered exec keeps (the rest is dropped and `truncated` set).
    pub max_exec_output_bytes: usize,
    /// Streamed execs and log follows open at once; more are refused with 429.
    pub max_sessions: usize,
}

impl Default for DataPlaneLimits {
    fn default() -> Self {
        DataPlaneLimits { max_file_bytes: 100 << 20, max_exec_output_bytes: 1 << 20, max_sessions: 4096 }
    }
}

/// The outcome of a create: a new sandbox, or the one already held under that id with the same spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    New(AgentSandbox),
    Existing(AgentSandbox),
}

/// The sandboxes of one node, as the agent API serves them.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Admits a sandbox; an id already held with the same spec is `Existing` (idempotent).
    async fn create(&self, request: AgentCreateRequest) -> Result<Created, RuntimeError>;
    /// Removes a sandbox and everything it holds on the node, first giving its containers `grace`
    /// between SIGTERM and SIGKILL (zero: killed at once).
    async fn delete(&self, id: &str, grace: std::time::Duration) -> Result<(), RuntimeError>;
    async fn get(&self, id: &str) -> Result<AgentSandbox, RuntimeError>;
    /// Up to `limit` sandboxes with ids after `cursor`, in id order.
    async fn list(&self, cursor: &str, limit: usize) -> AgentSandboxList;
    /// Log lines of a whole sandbox (`container` None) or one container, optionally the last `tail`.
    async fn logs(&self, id: &str, container: Option<&str>, tail: Option<usize>) -> Result<AgentLogs, RuntimeError>;
    async fn status(&self) -> AgentStatus;
    /// Re-checks every sandbox against the runtime; vanished ones are marked failed.
    async fn reconcile(&self);
    /// Starts `request.command` in a running container of sandbox `id` (its first when unnamed).
    async fn exec(&self, id: &str, request: &ExecRequest) -> Result<ExecProcess, RuntimeError>;
    /// The directory that is `/` for a running container's processes, opened for file access (and
    /// checked to be that container's root, not whatever now has a recorded pid).
    async fn container_root(&self, id: &str, container: Option<&str>) -> Result<ContainerRoot, RuntimeError> {
        let _ = (id, container);
        Err(RuntimeError::Unsupported("this runtime has no container files (it is simulated)".into()))
    }
    /// The files a sandbox's containers log to, as `(container, path)`, for following; `None` when
    /// the runtime keeps no log files (the simulator), whose `logs` are then polled.
    async fn log_files(
        &self,
        id: &str,
        container: Option<&str>,
    ) -> Result<Option<Vec<(String, PathBuf)>>, RuntimeError> {
        let _ = (id, container);
        Ok(None)
    }
    fn limits(&self) -> DataPlaneLimits {
        DataPlaneLimits::default()
    }
}
