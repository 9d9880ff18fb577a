//! Scheduler: places Pending sandboxes on Ready nodes with room, picks host ports, and binds with one CAS write.
//!
//! `placement` is the pure algorithm, `table` the node table it runs over, and this module the controller.

mod placement;
mod table;

pub use placement::*;
pub use table::AllocationIndex;

use crate::objects::ObjectClient;
use crate::runtime::controller::Controller;
use crate::runtime::error::ControllerError;
use crate::runtime::informer::{Change, Informer};
use crate::runtime::queue::{Outcome, Reconciled};
use parking_lot::Mutex;
use sandboxd_api::event::ObjectReference;
use sandboxd_api::validate::SandboxPolicy;
use sandboxd_api::{AssignedPort, Node, NodeState, Phase, Protocol, Sandbox};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Settings of the scheduler, from configuration.
#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    pub policy: Policy,
    pub host_port_range: (u16, u16),
    pub requests: SandboxPolicy,
    /// Binds written concurrently; placement itself is serialized.
    pub workers: usize,
    /// Where Scheduled, FailedScheduling and Preempted events go.
    pub events: crate::events::Events,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        SchedulerSettings {
            policy: Policy::Spread,
            host_port_range: (10000, 19999),
            requests: SandboxPolicy::default(),
            workers: 32,
            events: Default::default(),
        }
    }
}

/// ` (host ports 10000->80/tcp, …)` for an event's message, or nothing without ports.
fn ports_note(ports: &[AssignedPort]) -> String {
    if ports.is_empty() {
        return String::new();
    }
    let each: Vec<String> =
        ports.iter().map(|p| format!("{}->{}/{}", p.host_port, p.container_port, p.protocol.as_str())).collect();
    format!(" (host ports {})", each.join(", "))
}

/// The scheduler controller.
pub struct Scheduler {
    nodes: Informer<Node>,
    sandboxes: Informer<Sandbox>,
    objects: Arc<dyn ObjectClient>,
    settings: SchedulerSettings,
    index: Mutex<AllocationIndex>,
    controller: Controller<String>,
    /// Pending sandboxes that fit nowhere; retried when nodes or capacity change, not in a loop.
    unschedulable: Mutex<HashSet<String>>,
    /// Bumped whenever room may have appeared, so a placement that failed meanwhile is retried.
    releases: AtomicU64,
}

impl crate::runtime::footprint::Footprint for Scheduler {
    fn footprint(&self) -> Vec<(&'static str, usize)> {
        let mut sizes =
            vec![("held", self.index.lock().held_count()), ("unschedulable", self.unschedulable.lock().len())];
        sizes.extend(self.controller.queue().footprint());
        sizes
    }
}

impl Scheduler {
    pub fn new(
        nodes: Informer<Node>,
        sandboxes: Informer<Sandbox>,
        objects: Arc<dyn ObjectClient>,
        settings: SchedulerSettings,
    ) -> Arc<Scheduler> {
        let controller = Controller::new("scheduler", settings.workers);
        let scheduler = Arc::new(Scheduler {
            nodes,
            sandboxes,
            objects,
            settings,
            index: Mutex::new(AllocationIndex::default()),
            controller,
            unschedulable: Mutex::new(HashSet::new()),
            releases: AtomicU64::new(0),
        });
        scheduler.subscribe();
        crate::runtime::footprint::register("scheduler", &scheduler);
        scheduler
    }

    fn subscribe(self: &Arc<Self>) {
        // The node table is updated before a key is queued, so a placement sees the change it follows.
        let me = Arc::downgrade(self);
        self.controller.watches_with(&self.sandboxes, move |change, _| {
            if let Some(me) = me.upgrade() {
                me.on_sandbox_change(change);
            }
        });
        let me = Arc::downgrade(self);
        self.controller.watches_with(&self.nodes, move |change, _| {
            if let Some(me) = me.upgrade() {
                me.on_node_change(change);
            }
        });
    }

    fn on_sandbox_change(&self, change: &Change<'_, Sandbox>) {
        match change {
            Change::Upsert { old, new } => {
                let unbound = old.is_some_and(|o| o.status.node_name.is_some()) && new.status.node_name.is_none();
                if unbound && self.index.lock().release(&new.id) {
                    // A drain rescheduled it: its old node's room and ports are free, and it needs a new one.
                    self.retry_unschedulable();
                }
                if new.status.holds_node_resources() {
                    let node = new.status.node_name.as_deref().unwrap_or_default();
                    let request = Request::of(&new.spec, &self.settings.requests);
                    let ports = new.status.assigned_ports.iter().map(|p| (p.protocol, p.host_port)).collect();
                    let terminating = matches!(new.status.phase, Phase::Failed | Phase::Terminating);
                    let mut index = self.index.lock();
                    index.hold(&new.id, node, request.cpu_milli, request.memory_bytes, ports);
                    index.mark(&new.id, request.priority, terminating);
                } else if new.status.node_name.is_some() && self.index.lock().release(&new.id) {
                    // Only a bound sandbox's release frees anything: a Pending copy may predate our own bind
                    // (a relist, or the event of the bind not yet applied) and must not undo the assumption.
                    self.retry_unschedulable();
                }
                if new.status.phase == Phase::Pending && new.status.node_name.is_none() {
                    self.controller.queue().add(new.id.clone());
                }
            }
            Change::Delete(gone) => {
                self.unschedulable.lock().remove(&gone.id);
                if self.index.lock().release(&gone.id) {
                    self.retry_unschedulable();
                }
            }
        }
    }

    fn on_node_change(&self, change: &Change<'_, Node>) {
        let (old, new) = match change {
            Change::Upsert { old, new } => (old, new),
            Change::Delete(gone) => {
                self.index.lock().remove_node(&gone.name);
                return;
            }
        };
        self.index.lock().upsert_node(new);
        let more_room = match old {
            None => true,
            Some(old) => {
                let (o, n) = (&old.status.resources, &new.status.resources);
                old.status.state != new.status.state
                    || n.available_cpu_milli > o.available_cpu_milli
                    || n.available_memory_bytes > o.available_memory_bytes
                    || n.allocatable_cpu_milli != o.allocatable_cpu_milli
                    || n.allocatable_memory_bytes != o.allocatable_memory_bytes
            }
        };
        // A state or cordon change either way makes the recorded reasons ("1 not ready") stale, so retry then too.
        let state_changed = old.is_some_and(|o| {
            o.status.state != new.status.state
                || o.unschedulable != new.unschedulable
                || o.labels != new.labels
                || o.taints != new.taints
                || o.status.node_info != new.status.node_info
        });
        if state_changed || (more_room && new.status.state == NodeState::Ready) {
            self.retry_unschedulable();
        }
    }

    fn release_assumption(&self, id: &str) {
        if self.index.lock().release(id) {
            self.retry_unschedulable();
        }
    }

    fn retry_unschedulable(&self) {
        self.releases.fetch_add(1, Ordering::SeqCst);
        let waiting: Vec<String> = self.unschedulable.lock().drain().collect();
        for id in waiting {
            self.controller.queue().add(id);
        }
    }

    /// Places one Pending sandbox: choose and assume under the index lock, then bind with a CAS write.
    pub async fn schedule_one(&self, id: &str) -> Reconciled {
        let Some(sandbox) = self.sandboxes.get(id) else { return Ok(Outcome::Done) };
        if sandbox.status.phase != Phase::Pending || sandbox.status.node_name.is_some() {
            return Ok(Outcome::Done);
        }
        // Held already: our bind succeeded and its event has not reached the cache yet.
        if self.index.lock().holds(id) {
            return Ok(Outcome::Done);
        }
        let request = Request::of(&sandbox.spec, &self.settings.requests);
        let releases_before = self.releases.load(Ordering::SeqCst);
        let decision = self.choose_and_assume(id, &request);
        match decision {
            Ok((node, ports)) => self.bind(&sandbox, node, ports).await,
            Err(message) => {
                let plan = self.index.lock().preemption_plan(&request, self.settings.host_port_range);
                let message = match plan {
                    Some((node, victims)) if victims.is_empty() => {
                        format!("{message}; waiting for preempted sandboxes to leave node {node}")
                    }
                    Some((node, victims)) => {
                        self.preempt(&sandbox, request.priority, &node, &victims).await?;
                        format!("{message}; preempting {} lower-priority sandbox(es) on node {node}", victims.len())
                    }
                    None => message,
                };
                let outcome = self.mark_unschedulable(&sandbox, message).await;
                // Room freed while we looked: the retry that release triggered may have missed us.
                if self.releases.load(Ordering::SeqCst) != releases_before {
                    self.retry_unschedulable();
                }
                outcome
            }
        }
    }

    fn choose_and_assume(&self, id: &str, request: &Request) -> Result<(Arc<Node>, Vec<AssignedPort>), String> {
        let (name, ports) =
            self.index.lock().place(id, request, self.settings.policy, self.settings.host_port_range)?;
        match self.nodes.get(&name) {
            Some(node) => Ok((node, ports)),
            None => {
                self.release_assumption(id);
                Err(format!("node {name} disappeared while placing"))
            }
        }
    }

    async fn bind(&self, sandbox: &Sandbox, node: Arc<Node>, ports: Vec<AssignedPort>) -> Reconciled {
        let mut status = sandbox.status.clone();
        status.phase = Phase::Scheduled;
        status.node_name = Some(node.name.clone());
        status.assigned_ports = ports;
        status.external = Some(node.effective_external().to_string()).filter(|e| !e.is_empty());
        status.reason = None;
        status.message = None;
        let at = crate::events::Events::stamp();
        match self.objects.put_sandbox_status(&sandbox.id, &status, &sandbox.resource_version).await {
            Ok(_) => {
                crate::runtime::metrics::METRICS.binds.inc();
                self.unschedulable.lock().remove(&sandbox.id);
                self.settings.events.normal_at(
                    at,
                    ObjectReference::sandbox(&sandbox.id),
                    "Scheduled",
                    format!("placed on node {}{}", node.name, ports_note(&status.assigned_ports)),
                );
                tracing::info!(sandbox = %sandbox.id, node = %node.name, from = "Pending", to = "Scheduled", "sandbox phase changed");
                Ok(Outcome::Done)
            }
            Err(e) => {
                // The bind did not happen: take back the assumption so the ports and room are free again.
                self.release_assumption(&sandbox.id);
                Err(ControllerError::from(e).context(format!("binding {} to {}", sandbox.id, node.name)))
            }
        }
    }

    /// Fails each victim with reason `Preempted`; the sandbox controller then removes it from its
    /// agent and releases its room, which retries the preemptor (kept Pending meanwhile).
    async fn preempt(
        &self,
        by: &Sandbox,
        priority: i32,
        node: &str,
        victims: &[String],
    ) -> Result<(), ControllerError> {
        for id in victims {
            let Some(victim) = self.sandboxes.get(id) else { continue };
            if matches!(victim.status.phase, Phase::Failed | Phase::Terminating) {
                continue;
            }
            let mut status = victim.status.clone();
            status.phase = Phase::Failed;
            status.ready = false;
            status.reason = Some("Preempted".into());
            status.message =
                Some(format!("preempted by sandbox {} (priority {priority} over {})", by.id, victim.spec.priority));
            self.objects
                .put_sandbox_status(id, &status, &victim.resource_version)
                .await
                .map_err(|e| ControllerError::from(e).context(format!("preempting {id} on {node}")))?;
            self.index.lock().mark(id, victim.spec.priority, true);
            self.settings.events.warning(
                ObjectReference::sandbox(id),
                "Preempted",
                status.message.clone().unwrap_or_default(),
            );
            tracing::info!(sandbox = %id, node, by = %by.id, from = victim.status.phase.as_str(), to = "Failed", reason = "Preempted", "sandbox phase changed");
        }
        Ok(())
    }

    async fn mark_unschedulable(&self, sandbox: &Sandbox, message: String) -> Reconciled {
        self.unschedulable.lock().insert(sandbox.id.clone());
        let unchanged = sandbox.status.reason.as_deref() == Some("Unschedulable")
            && sandbox.status.message.as_deref() == Some(message.as_str());
        if unchanged {
            return Ok(Outcome::Done);
        }
        let at = crate::events::Events::stamp();
        let mut status = sandbox.status.clone();
        status.reason = Some("Unschedulable".into());
        status.message = Some(message.clone());
        match self.objects.put_sandbox_status(&sandbox.id, &status, &sandbox.resource_version).await {
            Ok(_) => {
                self.settings.events.warning_at(at, ObjectReference::sandbox(&sandbox.id), "FailedScheduling", message);
                Ok(Outcome::Done)
            }
            Err(e) => Err(ControllerError::from(e).context(format!("recording why {} is unschedulable", sandbox.id))),
        }
    }

    /// Places Pending sandboxes until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let me = self.clone();
        self.controller
            .run(shutdown, move |id: String| {
                let me = me.clone();
                async move { me.schedule_one(&id).await }
            })
            .await;
    }

    /// Host ports currently held on a node (for tests and diagnostics).
    pub fn used_ports(&self, node: &str) -> Vec<(Protocol, u16)> {
        self.index.lock().used_ports(node)
    }
}

#[cfg(test)]
mod assumption_tests {
    use super::*;
    use crate::objects::{ObjectError, ObjectKind, ObjectResult, RawWatch};
    use async_trait::async_trait;
    use sandboxd_api::node::NodeStatus;
    use sandboxd_api::SandboxStatus;

    struct NoObjects;

    #[async_trait]
    impl ObjectClient for NoObjects {
        async fn list(&self, _: ObjectKind) -> ObjectResult<(Vec<Vec<u8>>, u64)> {
            Err(ObjectError::Unavailable("test".into()))
        }
        async fn watch(&self, _: ObjectKind, _: u64) -> ObjectResult<RawWatch> {
            Err(ObjectError::Unavailable("test".into()))
        }
        async fn get_node(&self, _: &str) -> ObjectResult<Option<Node>> {
            Ok(None)
        }
        async fn get_sandbox(&self, _: &str) -> ObjectResult<Option<Sandbox>> {
            Ok(None)
        }
        async fn put_node_status(&self, _: &str, _: &NodeStatus, _: &str) -> ObjectResult<Node> {
            Err(ObjectError::Unavailable("test".into()))
        }
        async fn put_sandbox_status(&self, _: &str, _: &SandboxStatus, _: &str) -> ObjectResult<Sandbox> {
            Err(ObjectError::Unavailable("test".into()))
        }
        async fn remove_sandbox(&self, _: &str, _: &str) -> ObjectResult<()> {
            Err(ObjectError::Unavailable("test".into()))
        }
        async fn record_events(&self, _: &[sandboxd_api::event::EventRecord]) -> ObjectResult<()> {
            Ok(())
        }
    }

    fn sandbox(id: &str, node: Option<&str>, port: u16) -> Arc<Sandbox> {
        let mut s: Sandbox = serde_json::from_value(serde_json::json!({
            "id": id, "created_at": "", "updated_at": "",
            "spec": {"containers": [{"name": "c", "image": "i"}], "ports": [{"container_port": 80}]}
        }))
        .unwrap();
        if let Some(node) = node {
            s.status.phase = Phase::Scheduled;
            s.status.node_name = Some(node.into());
            s.status.assigned_ports =
                vec![AssignedPort { host_port: port, container_port: 80, protocol: Protocol::Tcp }];
        }
        Arc::new(s)
    }

    #[test]
    fn a_stale_pending_copy_never_releases_an_assumed_bind() {
        let scheduler =
            Scheduler::new(Informer::new(), Informer::new(), Arc::new(NoObjects), SchedulerSettings::default());
        scheduler.index.lock().hold("s", "n", 100, 1, vec![(Protocol::Tcp, 10000)]);
        // A relist (or a late event) delivers the sandbox as it was before our bind.
        let pending = sandbox("s", None, 0);
        scheduler.on_sandbox_change(&Change::Upsert { old: None, new: &pending });
        assert_eq!(scheduler.used_ports("n"), [(Protocol::Tcp, 10000)], "the assumed port stays taken");
        // The bind's own event and then a deletion do release it.
        let bound = sandbox("s", Some("n"), 10000);
        scheduler.on_sandbox_change(&Change::Upsert { old: None, new: &bound });
        scheduler.on_sandbox_change(&Change::Delete(&bound));
        assert!(scheduler.used_ports("n").is_empty());
    }
}
