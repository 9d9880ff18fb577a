//! Test doubles for controller tests: an in-memory `ObjectClient` that serves a fixed list, keeps its
//! watches open without events, and records every write.

use crate::objects::{ObjectClient, ObjectError, ObjectKind, ObjectResult, RawWatch};
use async_trait::async_trait;
use futures::StreamExt;
use parking_lot::Mutex;
use sandboxd_api::agent::{AgentCreateRequest, AgentLogs, AgentSandbox, AgentSandboxList, AgentStatus};
use sandboxd_api::node::NodeStatus;
use sandboxd_api::{Node, Sandbox, SandboxStatus};

/// One write a controller made.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    SandboxStatus { id: String, status: SandboxStatus },
    NodeStatus { name: String, status: NodeStatus },
    Removed { id: String },
}

/// Objects a test starts with, and the writes controllers made to them.
#[derive(Default)]
pub struct FakeObjects {
    nodes: Mutex<Vec<Node>>,
    sandboxes: Mutex<Vec<Sandbox>>,
    writes: Mutex<Vec<Write>>,
}

impl FakeObjects {
    pub fn new(nodes: Vec<Node>, sandboxes: Vec<Sandbox>) -> FakeObjects {
        FakeObjects { nodes: Mutex::new(nodes), sandboxes: Mutex::new(sandboxes), writes: Mutex::default() }
    }

    pub fn writes(&self) -> Vec<Write> {
        self.writes.lock().clone()
    }

    /// The last status written for sandbox `id`, if any.
    pub fn last_sandbox_status(&self, id: &str) -> Option<SandboxStatus> {
        self.writes.lock().iter().rev().find_map(|w| match w {
            Write::SandboxStatus { id: written, status } if written == id => Some(status.clone()),
            _ => None,
        })
    }

    pub fn removed(&self, id: &str) -> bool {
        self.writes.lock().iter().any(|w| matches!(w, Write::Removed { id: removed } if removed == id))
    }
}

fn encode_all<T: serde::Serialize>(objects: &[T]) -> Vec<Vec<u8>> {
    objects.iter().map(|o| serde_json::to_vec(o).expect("test objects serialize")).collect()
}

#[async_trait]
impl ObjectClient for FakeObjects {
    async fn list(&self, kind: ObjectKind) -> ObjectResult<(Vec<Vec<u8>>, u64)> {
        let items = match kind {
            ObjectKind::Nodes => encode_all(&self.nodes.lock()),
            ObjectKind::Sandboxes => encode_all(&self.sandboxes.lock()),
            ObjectKind::Leases => Vec::new(),
        };
        Ok((items, 1))
    }

    async fn watch(&self, _: ObjectKind, _: u64) -> ObjectResult<RawWatch> {
        Ok(futures::stream::pending().boxed())
    }

    async fn get_node(&self, name: &str) -> ObjectResult<Option<Node>> {
        Ok(self.nodes.lock().iter().find(|n| n.name == name).cloned())
    }

    async fn get_sandbox(&self, id: &str) -> ObjectResult<Option<Sandbox>> {
        Ok(self.sandboxes.lock().iter().find(|s| s.id == id).cloned())
    }

    async fn put_node_status(&self, name: &str, status: &NodeStatus, _: &str) -> ObjectResult<Node> {
        let node = self.get_node(name).await?.ok_or_else(|| ObjectError::NotFound(name.to_string()))?;
        self.writes.lock().push(Write::NodeStatus { name: name.to_string(), status: status.clone() });
        Ok(Node { status: status.clone(), ..node })
    }

    async fn put_sandbox_status(&self, id: &str, status: &SandboxStatus, _: &str) -> ObjectResult<Sandbox> {
        let sandbox = self.get_sandbox(id).await?.ok_or_else(|| ObjectError::NotFound(id.to_string()))?;
        self.writes.lock().push(Write::SandboxStatus { id: id.to_string(), status: status.clone() });
        Ok(Sandbox { status: status.clone(), ..sandbox })
    }

    async fn remove_sandbox(&self, id: &str, _: &str) -> ObjectResult<()> {
        self.writes.lock().push(Write::Removed { id: id.to_string() });
        Ok(())
    }
}

/// An agent client for which every node is unreachable: the controllers act on the store alone.
pub struct UnreachableAgents;

fn unreachable<T>() -> crate::agent::AgentResult<T> {
    Err(crate::agent::AgentError::Unreachable("test agents are unreachable".into()))
}

#[async_trait]
impl crate::agent::AgentClient for UnreachableAgents {
    async fn health(&self, _: &str, _: std::time::Duration) -> crate::agent::AgentResult<()> {
        unreachable()
    }
    async fn status(&self, _: &str, _: std::time::Duration) -> crate::agent::AgentResult<AgentStatus> {
        unreachable()
    }
    async fn create_sandbox(&self, _: &str, _: &AgentCreateRequest) -> crate::agent::AgentResult<AgentSandbox> {
        unreachable()
    }
    async fn get_sandbox(&self, _: &str, _: &str) -> crate::agent::AgentResult<AgentSandbox> {
        unreachable()
    }
    async fn list_sandboxes(&self, _: &str, _: &str, _: usize) -> crate::agent::AgentResult<AgentSandboxList> {
        unreachable()
    }
    async fn delete_sandbox(&self, _: &str, _: &str) -> crate::agent::AgentResult<()> {
        unreachable()
    }
    async fn logs(&self, _: &str, _: &str, _: Option<&str>, _: Option<usize>) -> crate::agent::AgentResult<AgentLogs> {
        unreachable()
    }
    async fn reconcile(&self, _: &str) -> crate::agent::AgentResult<()> {
        unreachable()
    }
    async fn probe(&self, _: &crate::agent::ProbeTarget) -> Result<(), String> {
        Err("test agents are unreachable".into())
    }
}
