//! Wire types of the sbxlet node-agent API (see `sbxlet-api.md`).

use crate::sandbox::{Container, Protocol};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `GET /healthz` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub ok: bool,
}

/// `GET /api/v1/status` answer.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AgentStatus {
    pub capacity_cpu_milli: u64,
    pub capacity_memory_bytes: u64,
    pub used_cpu_milli: u64,
    pub used_memory_bytes: u64,
    #[serde(default)]
    pub external: String,
    #[serde(default)]
    pub sandboxes: u64,
    /// The machine's host name (simulated agents on one machine share it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    /// The machine's architecture, as Rust names it (`x86_64`, `aarch64`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub arch: String,
    /// The runtime behind the agent: `sim` or `runc`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub runtime: String,
    /// The runtime classes (`runc`, `gvisor`) this agent can run, found at its start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runtime_classes: Vec<String>,
}

/// The agent's own lower-case view of a sandbox's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentPhase {
    Creating,
    Running,
    Failed,
    Exited,
    Deleting,
    Deleted,
}

impl AgentPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentPhase::Creating => "creating",
            AgentPhase::Running => "running",
            AgentPhase::Failed => "failed",
            AgentPhase::Exited => "exited",
            AgentPhase::Deleting => "deleting",
            AgentPhase::Deleted => "deleted",
        }
    }
}

/// A host-to-container port mapping on an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentPort {
    pub host_port: u16,
    pub container_port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

/// State of one container on an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentContainer {
    pub name: String,
    pub state: String,
    #[serde(default)]
    pub restart_count: u32,
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Why an ended container ended: `Completed` (exit 0), `Error`, or `OOMKilled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A sandbox as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSandbox {
    pub id: String,
    pub phase: AgentPhase,
    #[serde(default)]
    pub private_ip: String,
    #[serde(default)]
    pub ports: Vec<AgentPort>,
    #[serde(default)]
    pub containers: Vec<AgentContainer>,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub created_at: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// `POST /api/v1/sandboxes` body on an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentCreateRequest {
    pub id: String,
    #[serde(default)]
    pub egress: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<AgentPort>,
    #[serde(default)]
    pub containers: Vec<Container>,
    /// An agent refuses a class it does not offer (400); absent: `runc`.
    #[serde(default, skip_serializing_if = "crate::sandbox::RuntimeClass::is_default")]
    pub runtime_class: crate::sandbox::RuntimeClass,
}

/// `{"sandbox": {...}}` envelope of create and get answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSandboxEnvelope {
    pub sandbox: AgentSandbox,
}

/// One page of `GET /api/v1/sandboxes`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AgentSandboxList {
    pub items: Vec<AgentSandbox>,
    #[serde(default)]
    pub next_cursor: String,
}

/// `DELETE /api/v1/sandboxes/{id}` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentDeleted {
    pub id: String,
    pub phase: AgentPhase,
}

/// Log lines of a sandbox or one of its containers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LogLines {
    pub lines: Vec<String>,
}

/// `GET .../logs` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentLogs {
    pub sandbox_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    pub logs: LogLines,
}

/// `{"ok": true}` answer of reconcile.
pub type Ok = Health;

/// The common error body `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
