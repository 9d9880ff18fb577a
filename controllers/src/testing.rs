//! Test doubles for controller tests: an in-memory `ObjectClient` that serves a list, plays scripted
//! watches (then keeps them open without events), and records every call and write.

use crate::objects::{ObjectClient, ObjectError, ObjectKind, ObjectResult, RawEvent, RawWatch};
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
    /// Revision every list answers with.
    list_revision: Mutex<u64>,
    lists: Mutex<usize>,
    /// Sandboxes and revision of the next lists, before falling back to `sandboxes`.
    queued_lists: Mutex<std::collections::VecDeque<(Vec<Sandbox>, u64)>>,
    /// The `from` of every watch opened, in order.
    watched_from: Mutex<Vec<u64>>,
    /// What the next watches do: fail, or deliver these events and end. Afterwards: open, silent.
    scripted_watches: Mutex<std::collections::VecDeque<ObjectResult<Vec<ObjectResult<RawEvent>>>>>,
    /// Every event recorded, in order.
    events: Mutex<Vec<sandboxd_api::event::EventRecord>>,
    /// How long each node status write takes, as a store commit would.
    node_write_latency: std::time::Duration,
    /// Node status writes in flight now, and the most ever at once.
    node_writes_in_flight: Mutex<(usize, usize)>,
}

impl FakeObjects {
    pub fn new(nodes: Vec<Node>, sandboxes: Vec<Sandbox>) -> FakeObjects {
        FakeObjects {
            nodes: Mutex::new(nodes),
            sandboxes: Mutex::new(sandboxes),
            list_revision: Mutex::new(1),
            ..FakeObjects::default()
        }
    }

    /// Node status writes that each take `latency` from now on.
    pub fn with_node_write_latency(self, latency: std::time::Duration) -> FakeObjects {
        FakeObjects { node_write_latency: latency, ..self }
    }

    /// The most node status writes that were ever in flight at once.
    pub fn max_node_writes_in_flight(&self) -> usize {
        self.node_writes_in_flight.lock().1
    }

    /// What lists answer from now on.
    pub fn set_sandboxes(&self, sandboxes: Vec<Sandbox>, revision: u64) {
        *self.sandboxes.lock() = sandboxes;
        *self.list_revision.lock() = revision;
    }

    /// Queues what a later list of sandboxes answers (after the lists already queued).
    pub fn queue_list(&self, sandboxes: Vec<Sandbox>, revision: u64) {
        self.queued_lists.lock().push_back((sandboxes, revision));
    }

    /// Queues what the next watch does.
    pub fn script_watch(&self, script: ObjectResult<Vec<ObjectResult<RawEvent>>>) {
        self.scripted_watches.lock().push_back(script);
    }

    pub fn lists(&self) -> usize {
        *self.lists.lock()
    }

    pub fn watched_from(&self) -> Vec<u64> {
        self.watched_from.lock().clone()
    }

    pub fn writes(&self) -> Vec<Write> {
        self.writes.lock().clone()
    }

    /// `(object, reason)` of every event recorded, in order.
    pub fn event_reasons(&self) -> Vec<(String, String)> {
        self.events.lock().iter().map(|e| (e.involved_object.to_string(), e.reason.clone())).collect()
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
        if kind == ObjectKind::Sandboxes {
            if let Some((sandboxes, revision)) = self.queued_lists.lock().pop_front() {
                self.set_sandboxes(sandboxes, revision);
            }
        }
        let items = match kind {
            ObjectKind::Nodes => encode_all(&self.nodes.lock()),
            ObjectKind::Sandboxes => encode_all(&self.sandboxes.lock()),
            ObjectKind::Leases | ObjectKind::Tokens | ObjectKind::Events => Vec::new(),
        };
        *self.lists.lock() += 1;
        Ok((items, *self.list_revision.lock()))
    }

    async fn watch(&self, _: ObjectKind, from: u64) -> ObjectResult<RawWatch> {
        self.watched_from.lock().push(from);
        match self.scripted_watches.lock().pop_front() {
            Some(Err(e)) => Err(e),
            Some(Ok(events)) => Ok(futures::stream::iter(events).boxed()),
            None => Ok(futures::stream::pending().boxed()),
        }
    }

    async fn get_node(&self, name: &str) -> ObjectResult<Option<Node>> {
        Ok(self.nodes.lock().iter().find(|n| n.name == name).cloned())
    }

    async fn get_sandbox(&self, id: &str) -> ObjectResult<Option<Sandbox>> {
        Ok(self.sandboxes.lock().iter().find(|s| s.id == id).cloned())
    }

    async fn put_node_status(&self, name: &str, status: &NodeStatus, _: &str) -> ObjectResult<Node> {
        let node = self.get_node(name).await?.ok_or_else(|| ObjectError::NotFound(name.to_string()))?;
        {
            let mut in_flight = self.node_writes_in_flight.lock();
            in_flight.0 += 1;
            in_flight.1 = in_flight.1.max(in_flight.0);
        }
        tokio::time::sleep(self.node_write_latency).await;
        self.node_writes_in_flight.lock().0 -= 1;
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

    async fn record_events(&self, events: &[sandboxd_api::event::EventRecord]) -> ObjectResult<()> {
        self.events.lock().extend(events.iter().cloned());
        Ok(())
    }
}

fn unreachable<T>() -> crate::agent::AgentResult<T> {
    Err(crate::agent::AgentError::Unreachable("test agents are unreachable".into()))
}

/// An agent whose `/healthz` and status calls answer `health` and `status`, each after `delay`; it
/// counts the status calls and the most calls it had in flight at once. Every other call is
/// unreachable, so controllers act on the store alone.
pub struct ScriptedAgent {
    health: crate::agent::AgentResult<()>,
    status: crate::agent::AgentResult<AgentStatus>,
    delay: std::time::Duration,
    in_flight: std::sync::atomic::AtomicUsize,
    pub max_in_flight: std::sync::atomic::AtomicUsize,
    pub status_calls: std::sync::atomic::AtomicUsize,
}

impl ScriptedAgent {
    /// Every call fails as unreachable, at once.
    pub fn unreachable() -> ScriptedAgent {
        ScriptedAgent::new(unreachable(), std::time::Duration::ZERO)
    }

    /// `/healthz` answers `health`, the status call succeeds; both after `delay`.
    pub fn new(health: crate::agent::AgentResult<()>, delay: std::time::Duration) -> ScriptedAgent {
        let status = health.clone().map(|()| AgentStatus::default());
        ScriptedAgent {
            health,
            status,
            delay,
            in_flight: Default::default(),
            max_in_flight: Default::default(),
            status_calls: Default::default(),
        }
    }

    async fn call<T>(&self, answer: crate::agent::AgentResult<T>) -> crate::agent::AgentResult<T> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.in_flight.fetch_add(1, SeqCst) + 1;
        self.max_in_flight.fetch_max(now, SeqCst);
        tokio::time::sleep(self.delay).await;
        self.in_flight.fetch_sub(1, SeqCst);
        answer
    }
}

#[async_trait]
impl crate::agent::AgentClient for ScriptedAgent {
    async fn health(&self, _: crate::agent::AgentAddr<'_>, _: std::time::Duration) -> crate::agent::AgentResult<()> {
        self.call(self.health.clone()).await
    }
    async fn status(
        &self,
        _: crate::agent::AgentAddr<'_>,
        _: std::time::Duration,
    ) -> crate::agent::AgentResult<AgentStatus> {
        self.status_calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.call(self.status.clone()).await
    }
    async fn create_sandbox(
        &self,
        _: crate::agent::AgentAddr<'_>,
        _: &AgentCreateRequest,
    ) -> crate::agent::AgentResult<AgentSandbox> {
        unreachable()
    }
    async fn get_sandbox(&self, _: crate::agent::AgentAddr<'_>, _: &str) -> crate::agent::AgentResult<AgentSandbox> {
        unreachable()
    }
    async fn list_sandboxes(
        &self,
        _: crate::agent::AgentAddr<'_>,
        _: &str,
        _: usize,
    ) -> crate::agent::AgentResult<AgentSandboxList> {
        unreachable()
    }
    async fn delete_sandbox(&self, _: crate::agent::AgentAddr<'_>, _: &str) -> crate::agent::AgentResult<()> {
        unreachable()
    }
    async fn stop_sandbox(
        &self,
        _: crate::agent::AgentAddr<'_>,
        _: &str,
        _: std::time::Duration,
    ) -> crate::agent::AgentResult<()> {
        unreachable()
    }
    async fn logs(
        &self,
        _: crate::agent::AgentAddr<'_>,
        _: &str,
        _: Option<&str>,
        _: Option<usize>,
    ) -> crate::agent::AgentResult<AgentLogs> {
        unreachable()
    }
    async fn reconcile(&self, _: crate::agent::AgentAddr<'_>) -> crate::agent::AgentResult<()> {
        unreachable()
    }
    async fn probe(&self, _: &crate::agent::ProbeTarget) -> Result<(), String> {
        Err("test agents are unreachable".into())
    }
}
