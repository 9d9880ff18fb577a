//! The `AgentClient` trait: every call the controllers make to a node agent, each bounded by a timeout.

use async_trait::async_trait;
use sandboxd_api::agent::{AgentCreateRequest, AgentLogs, AgentSandbox, AgentSandboxList, AgentStatus};
use std::time::Duration;

/// How an agent call failed; the node proxy and `last_error` keep these apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// Connect failure or timeout: the agent could not be reached.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The agent answered with an error status.
    #[error("agent answered {status}: {message}")]
    Status { status: u16, message: String },
    /// The agent answered something that is not the expected JSON.
    #[error("invalid answer: {0}")]
    Invalid(String),
}

impl AgentError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, AgentError::Status { status: 404, .. })
    }

    /// A 4xx answer: the agent understood and refused; retrying the same call will not help.
    /// 408 and 429 are the exceptions: they mean "not now".
    pub fn is_client_error(&self) -> bool {
        matches!(self, AgentError::Status { status, .. } if (400..500).contains(status) && *status != 408 && *status != 429)
    }
}

pub type AgentResult<T> = Result<T, AgentError>;

/// One node's agent: where it listens, and the node's name, which its credential is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentAddr<'a> {
    pub node: &'a str,
    /// `http://ip:port`.
    pub base_url: &'a str,
}

impl<'a> AgentAddr<'a> {
    /// The agent of a registered node.
    pub fn of(node: &'a sandboxd_api::Node) -> AgentAddr<'a> {
        AgentAddr { node: &node.name, base_url: &node.sbxlet_base_url }
    }
}

/// Calls to the sbxlet API of one node, addressed by its name and base URL.
#[async_trait]
pub trait AgentClient: Send + Sync + 'static {
    /// `GET /healthz`: Ok only for 2xx with `{"ok": true}`.
    async fn health(&self, agent: AgentAddr<'_>, timeout: Duration) -> AgentResult<()>;
    /// `GET /api/v1/status`.
    async fn status(&self, agent: AgentAddr<'_>, timeout: Duration) -> AgentResult<AgentStatus>;
    /// `POST /api/v1/sandboxes` (idempotent on the agent).
    async fn create_sandbox(&self, agent: AgentAddr<'_>, request: &AgentCreateRequest) -> AgentResult<AgentSandbox>;
    /// `GET /api/v1/sandboxes/{id}`.
    async fn get_sandbox(&self, agent: AgentAddr<'_>, id: &str) -> AgentResult<AgentSandbox>;
    /// `GET /api/v1/sandboxes?cursor=&limit=`.
    async fn list_sandboxes(&self, agent: AgentAddr<'_>, cursor: &str, limit: usize) -> AgentResult<AgentSandboxList>;
    /// `DELETE /api/v1/sandboxes/{id}`; a 404 is returned as an error for the caller to judge.
    async fn delete_sandbox(&self, agent: AgentAddr<'_>, id: &str) -> AgentResult<()>;
    /// `DELETE /api/v1/sandboxes/{id}?grace_seconds=N`: SIGTERM, up to `grace` for the containers to
    /// end, then SIGKILL and removal. The call's own timeout covers the grace.
    async fn stop_sandbox(&self, agent: AgentAddr<'_>, id: &str, grace: Duration) -> AgentResult<()>;
    /// `GET .../logs`, of one container when `container` is set.
    async fn logs(
        &self,
        agent: AgentAddr<'_>,
        id: &str,
        container: Option<&str>,
        tail: Option<usize>,
    ) -> AgentResult<AgentLogs>;
    /// `POST /api/v1/reconcile`.
    async fn reconcile(&self, agent: AgentAddr<'_>) -> AgentResult<()>;
    /// One readiness probe try against a sandbox's published port; `Err` says why it failed.
    async fn probe(&self, target: &ProbeTarget) -> Result<(), String>;
}

/// Where and how to probe a sandbox: `host:port` on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    pub host: String,
    pub port: u16,
    /// `Some(path)` for an HTTP probe (200-399 is a success), `None` for a TCP connect.
    pub http_path: Option<String>,
    pub timeout: Duration,
}

/// Lists every sandbox an agent holds, following `next_cursor`.
pub async fn list_all_sandboxes(agents: &dyn AgentClient, agent: AgentAddr<'_>) -> AgentResult<Vec<AgentSandbox>> {
    let mut all = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = agents.list_sandboxes(agent, &cursor, 1000).await?;
        all.extend(page.items);
        if page.next_cursor.is_empty() || page.next_cursor == cursor {
            return Ok(all);
        }
        cursor = page.next_cursor;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_are_permanent_and_not_now_answers_are_retried() {
        let status = |status| AgentError::Status { status, message: String::new() };
        assert!(status(400).is_client_error());
        assert!(status(409).is_client_error());
        assert!(!status(408).is_client_error(), "408 is retried");
        assert!(!status(429).is_client_error(), "429 is retried");
        assert!(!status(500).is_client_error());
        assert!(!AgentError::Unreachable("x".into()).is_client_error());
        assert!(status(404).is_not_found());
    }
}
