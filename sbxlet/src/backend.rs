//! `Backend`: what the agent API asks of a runtime, simulated (`sim`) or real (`runc`).

use crate::error::RuntimeError;
use sandboxd_api::agent::{AgentCreateRequest, AgentLogs, AgentSandbox, AgentSandboxList, AgentStatus};

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
    /// Removes a sandbox and everything it holds on the node.
    async fn delete(&self, id: &str) -> Result<(), RuntimeError>;
    async fn get(&self, id: &str) -> Result<AgentSandbox, RuntimeError>;
    /// Up to `limit` sandboxes with ids after `cursor`, in id order.
    async fn list(&self, cursor: &str, limit: usize) -> AgentSandboxList;
    /// Log lines of a whole sandbox (`container` None) or one container, optionally the last `tail`.
    async fn logs(&self, id: &str, container: Option<&str>, tail: Option<usize>) -> Result<AgentLogs, RuntimeError>;
    async fn status(&self) -> AgentStatus;
    /// Re-checks every sandbox against the runtime; vanished ones are marked failed.
    async fn reconcile(&self);
}
