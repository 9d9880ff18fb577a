//! Sandbox controller: drives bound sandboxes to Running on their agent, syncs status, deletes, and detects loss.
//!
//! This module is the per-sandbox reconcile; `agent_sync` is the periodic pass over every node's agent.

mod agent_sync;

pub use agent_sync::needs_sync;

use crate::agent::{AgentAddr, AgentClient, AgentError};
use crate::clock::Clock;
use crate::objects::{ObjectClient, ObjectError};
use crate::prober::Prober;
use crate::runtime::controller::{every, Controller};
use crate::runtime::error::ControllerError;
use crate::runtime::informer::{Change, Informer};
use crate::runtime::queue::{Outcome, Reconciled};
use crate::status::write_status;
use parking_lot::Mutex;
use sandboxd_api::agent::{AgentCreateRequest, AgentPhase, AgentPort, AgentSandbox};
use sandboxd_api::event::ObjectReference;
use sandboxd_api::sandbox::{PendingEviction, RestartPolicy};
use sandboxd_api::taints::{
    eviction, with_default_tolerations, with_system_taints, Eviction, Taint, Toleration, NOT_READY_TAINT,
};
use sandboxd_api::time::parse_rfc3339;
use sandboxd_api::{Node, NodeState, Phase, Sandbox, SandboxStatus, MANAGED_LABEL};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Settings of the sandbox controller, from configuration.
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    pub node_lost_grace: Duration,
    pub sync_period: Duration,
    /// Reconciles (agent calls) in flight at once.
    pub workers: usize,
    /// How soon a sandbox the agent still reports `creating` is looked at again.
    pub creating_poll: Duration,
    /// How long a sandbox may stay Scheduled or Creating before it fails with `CreateTimeout`.
    pub creating_timeout: Duration,
    /// Where the lifecycle events of sandboxes (Created, Started, Killing, NodeLost, …) go.
    pub events: crate::events::Events,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        SandboxSettings {
            node_lost_grace: Duration::from_secs(60),
            sync_period: Duration::from_secs(30),
            workers: 64,
            creating_poll: Duration::from_millis(100),
            creating_timeout: Duration::from_secs(300),
            events: Default::default(),
        }
    }
}

/// What a bound sandbox's node means for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeVerdict {
    /// Ready: act on the agent; come back at this Unix time, when a NoExecute toleration runs out.
    Usable { evict_at: Option<i64> },
    /// Not Ready yet, or NotReady within what the sandbox tolerates: look again after this long.
    Wait(Duration),
    /// The sandbox leaves the node: `(reason, message)`, `NodeLost` or `Evicted`.
    Leave(&'static str, String),
}

/// Judges a sandbox's node (pure). A deleted node is lost at once. A NotReady node carries the
/// system's NoExecute taint `sandboxd.io/not-ready`, and a sandbox that does not say how long it
/// tolerates it gets `grace` (Kubernetes' default toleration); when it runs out the sandbox is
/// `NodeLost`, unless every node is NotReady. Other NoExecute taints evict it (`Evicted`).
///
/// NotReady counts only from `watching_since` (when this controller started) at the earliest: a state
/// recorded before a restart was not observed by us and may be stale.
pub fn judge_node(
    node: Option<&Node>,
    tolerations: &[Toleration],
    now_unix: i64,
    grace: Duration,
    every_node_not_ready: bool,
    watching_since: i64,
) -> NodeVerdict {
    let Some(node) = node else {
        return NodeVerdict::Leave("NodeLost", "the node was deleted".into());
    };
    if node.status.state == NodeState::Unknown {
        return NodeVerdict::Wait(Duration::from_secs(1));
    }
    let taints = observed_taints(node, now_unix, watching_since);
    let tolerations = with_default_tolerations(tolerations, grace.as_secs() as i64);
    let not_ready = node.status.state == NodeState::NotReady;
    let evict_at = match eviction(&taints, &tolerations, now_unix) {
        Eviction::Now(taint) if taint.key == NOT_READY_TAINT && every_node_not_ready => {
            // We are probably the one cut off: fail nothing until some node is Ready again.
            return NodeVerdict::Wait(Duration::from_secs(5));
        }
        Eviction::Now(taint) if taint.key == NOT_READY_TAINT => {
            return NodeVerdict::Leave(
                "NodeLost",
                format!("node {} is NotReady past what the sandbox tolerates", node.name),
            );
        }
        Eviction::Now(taint) => {
            let message = format!("node {} has the taint {taint}, which the sandbox does not tolerate", node.name);
            return NodeVerdict::Leave("Evicted", message);
        }
        Eviction::At(at, _) => Some(at),
        Eviction::Never => None,
    };
    match (not_ready, evict_at) {
        (false, evict_at) => NodeVerdict::Usable { evict_at },
        (true, Some(at)) => NodeVerdict::Wait(Duration::from_secs(at.saturating_sub(now_unix).max(0) as u64 + 1)),
        // Tolerated for ever: the node's next change brings the sandbox back.
        (true, None) => NodeVerdict::Wait(Duration::from_secs(60)),
    }
}

/// The node's taints as this controller judges them: the stored ones with the not-ready taint
/// derived from the state (so it holds even before the registry stamped it), counted from our start
/// at the earliest.
fn observed_taints(node: &Node, now_unix: i64, watching_since: i64) -> Vec<Taint> {
    let since = (node.status.state == NodeState::NotReady).then(|| {
        let since = node.status.last_transition_at.as_deref().and_then(parse_rfc3339).unwrap_or(now_unix);
        sandboxd_api::time::format_unix(since.max(watching_since))
    });
    let mut taints = with_system_taints(&node.taints, None);
    taints.extend(with_system_taints(&[], since.as_deref()));
    taints
}

/// What the agent's view of a sandbox means for its phase (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentVerdict {
    StillCreating,
    Running,
    Failed { reason: &'static str, message: String },
}

/// Maps the agent's phase of a sandbox to what the orchestrator does.
pub fn judge_agent(observed: Result<&AgentSandbox, &AgentError>, node: &str) -> Option<AgentVerdict> {
    match observed {
        Err(e) if e.is_not_found() => {
            Some(AgentVerdict::Failed { reason: "Vanished", message: format!("sandbox is missing on node {node}") })
        }
        Err(_) => None,
        Ok(a) => Some(match a.phase {
            AgentPhase::Creating => AgentVerdict::StillCreating,
            AgentPhase::Running => AgentVerdict::Running,
            AgentPhase::Failed | AgentPhase::Exited => AgentVerdict::Failed {
                reason: "AgentFailed",
                message: if a.message.is_empty() {
                    format!("agent reports {}", a.phase.as_str())
                } else {
                    a.message.clone()
                },
            },
            AgentPhase::Deleting | AgentPhase::Deleted => AgentVerdict::Failed {
                reason: "Vanished",
                message: format!("agent on node {node} reports it {}", a.phase.as_str()),
            },
        }),
    }
}

/// How soon to look again at a sandbox the agent still reports creating: every `base` for the first
/// two seconds (a real container starts in tens of milliseconds, and the transition time has whole
/// seconds, so one second tells nothing), then a quarter of the time it has been creating, up to 5 s,
/// so slow image pulls are not polled 20 times a second.
pub fn creating_poll_after(status: &SandboxStatus, base: Duration, now_unix: i64) -> Duration {
    let since = status.last_transition_at.as_deref().and_then(parse_rfc3339).unwrap_or(now_unix);
    let creating_for = Duration::from_secs((now_unix - since).max(0) as u64);
    (creating_for.saturating_sub(Duration::from_secs(2)) / 4).clamp(base, Duration::from_secs(5))
}

/// Why a Scheduled or Creating sandbox has waited too long for its agent (pure), or `None`.
///
/// The clock starts at the last phase change: the bind for Scheduled, the agent's acceptance for
/// Creating. The last agent error, when there is one, is in the message, so a sandbox whose agent
/// kept refusing it ends with what the agent said.
pub fn creation_overdue(status: &SandboxStatus, timeout: Duration, now_unix: i64) -> Option<String> {
    if !matches!(status.phase, Phase::Scheduled | Phase::Creating) {
        return None;
    }
    let since = status.last_transition_at.as_deref().and_then(parse_rfc3339)?;
    let waited = now_unix.saturating_sub(since);
    if waited < 0 || Duration::from_secs(waited as u64) <= timeout {
        return None;
    }
    let node = status.node_name.as_deref().unwrap_or("?");
    let what = if status.phase == Phase::Scheduled { "not accepted by" } else { "still creating on" };
    let mut message = format!("{what} node {node} after {waited}s (creating_timeout {}s)", timeout.as_secs());
    if let Some(last) = status.message.as_deref().filter(|m| !m.is_empty()) {
        message.push_str(&format!("; last: {last}"));
    }
    Some(message)
}

/// The status of an evicted sandbox that goes back to Pending, unbound, to be placed on another node.
pub fn rescheduled(status: &SandboxStatus, why: &str) -> SandboxStatus {
    let from = status.node_name.as_deref().unwrap_or("?");
    SandboxStatus {
        phase: Phase::Pending,
        reason: Some("Rescheduled".into()),
        message: Some(format!("{why}; placing it on another node (was on {from})")),
        reschedules: status.reschedules + 1,
        expire_at: status.expire_at.clone(),
        last_transition_at: status.last_transition_at.clone(),
        ..SandboxStatus::default()
    }
}

/// A Failed copy of `status` with reason and message.
pub fn failed(status: &SandboxStatus, reason: &str, message: String) -> SandboxStatus {
    SandboxStatus {
        phase: Phase::Failed,
        ready: false,
        reason: Some(reason.to_string()),
        message: Some(message),
        eviction: None,
        ..status.clone()
    }
}

/// The create request an agent gets for a bound sandbox.
pub fn agent_request(sandbox: &Sandbox) -> AgentCreateRequest {
    let mut labels = sandbox.spec.labels.clone();
    labels.insert(MANAGED_LABEL.to_string(), "true".to_string());
    AgentCreateRequest {
        id: sandbox.id.clone(),
        egress: sandbox.spec.egress,
        labels,
        ports: sandbox
            .status
            .assigned_ports
            .iter()
            .map(|p| AgentPort { host_port: p.host_port, container_port: p.container_port, protocol: p.protocol })
            .collect(),
        containers: sandbox.spec.containers.clone(),
        runtime_class: sandbox.spec.runtime_class,
    }
}

/// The sandbox controller.
pub struct SandboxController {
    nodes: Informer<Node>,
    sandboxes: Informer<Sandbox>,
    objects: Arc<dyn ObjectClient>,
    agents: Arc<dyn AgentClient>,
    prober: Arc<Prober>,
    settings: SandboxSettings,
    controller: Controller<String>,
    /// Sandbox ids bound to each node, so a node change re-examines exactly its sandboxes.
    by_node: Arc<Mutex<HashMap<String, HashSet<String>>>>,
    /// When this controller started, in Unix seconds; node-lost grace never counts from earlier.
    started_unix: i64,
    clock: Arc<dyn Clock>,
    /// Graceful stops of evicted sandboxes, by id, while they run and until `evict` reads the result.
    stops: Arc<Mutex<HashMap<String, StopState>>>,
    /// Bounds the graceful stops in flight, so a drain of thousands does not open thousands of calls.
    stop_slots: Arc<tokio::sync::Semaphore>,
    /// When each new sandbox was first seen Pending, until it is first seen Running (the startup
    /// histogram) or leaves otherwise.
    first_seen: Arc<Mutex<HashMap<String, std::time::Instant>>>,
}

/// Where a graceful stop of an evicted sandbox stands.
#[derive(Debug, Clone)]
enum StopState {
    Stopping,
    Done(Result<(), String>),
}

/// Graceful stops in flight at once, over every node.
const MAX_STOPS_IN_FLIGHT: usize = 64;

impl crate::runtime::footprint::Footprint for SandboxController {
    fn footprint(&self) -> Vec<(&'static str, usize)> {
        let by_node = self.by_node.lock();
        let mut sizes = vec![
            ("by_node_nodes", by_node.len()),
            ("by_node_sandboxes", by_node.values().map(|s| s.len()).sum()),
            ("stops", self.stops.lock().len()),
            ("startup_clocks", self.first_seen.lock().len()),
        ];
        sizes.extend(self.controller.queue().footprint());
        sizes
    }
}

impl SandboxController {
    pub fn new(
        nodes: Informer<Node>,
        sandboxes: Informer<Sandbox>,
        objects: Arc<dyn ObjectClient>,
        agents: Arc<dyn AgentClient>,
        prober: Arc<Prober>,
        settings: SandboxSettings,
        clock: Arc<dyn Clock>,
    ) -> Arc<SandboxController> {
        let harness = Controller::new("sandbox", settings.workers);
        let controller = Arc::new(SandboxController {
            nodes,
            sandboxes,
            objects,
            agents,
            prober,
            settings,
            controller: harness,
            by_node: Default::default(),
            started_unix: clock.unix_now(),
            clock,
            stops: Default::default(),
            stop_slots: Arc::new(tokio::sync::Semaphore::new(MAX_STOPS_IN_FLIGHT)),
            first_seen: Default::default(),
        });
        controller.subscribe();
        crate::runtime::footprint::register("sandbox", &controller);
        controller
    }

    fn subscribe(self: &Arc<Self>) {
        // Registered first, so the node mapping below already sees a sandbox bound by the same change.
        let me = Arc::downgrade(self);
        self.sandboxes.subscribe(move |change| {
            if let Some(me) = me.upgrade() {
                me.index(change);
            }
        });
        self.controller.watches(&self.sandboxes, |change| match change {
            Change::Upsert { new, .. } if new.status.phase != Phase::Pending => Some(new.id.clone()),
            _ => None,
        });
        let by_node = self.by_node.clone();
        self.controller.watches(&self.nodes, move |change| {
            let (name, changed) = match change {
                // State decides NodeLost; taints decide NoExecute evictions; a drain evicts everything.
                Change::Upsert { old, new } => (
                    &new.name,
                    old.is_none_or(|o| {
                        o.status.state != new.status.state || o.taints != new.taints || o.draining != new.draining
                    }),
                ),
                Change::Delete(gone) => (&gone.name, true),
            };
            let on_node = if changed { by_node.lock().get(name).cloned() } else { None };
            on_node.into_iter().flatten()
        });
    }

    /// Keeps `by_node` current and stops probing deleted sandboxes.
    fn index(&self, change: &Change<'_, Sandbox>) {
        match change {
            Change::Upsert { old, new } => {
                let before = old.and_then(|o| o.status.node_name.as_deref());
                if before.is_some() && before != new.status.node_name.as_deref() {
                    // Rescheduled by a drain: it left its node.
                    self.unindex(before.unwrap_or_default(), &new.id);
                    self.prober.forget(&new.id);
                }
                if let Some(node) = &new.status.node_name {
                    self.by_node.lock().entry(node.clone()).or_default().insert(new.id.clone());
                }
                self.time_startup(old.is_none(), new);
            }
            Change::Delete(gone) => {
                if let Some(node) = &gone.status.node_name {
                    self.unindex(node, &gone.id);
                }
                self.prober.forget(&gone.id);
                self.stops.lock().remove(&gone.id);
                self.first_seen.lock().remove(&gone.id);
            }
        }
    }

    /// Starts a new Pending sandbox's startup clock, and records create → Running when it first runs.
    /// Both ends are seen through the same watch, so its delay cancels out. Sandboxes of the first
    /// list are not timed (they were created before this process watched), and only the leader
    /// records, so replicas do not count a startup twice.
    fn time_startup(&self, is_new: bool, sandbox: &Sandbox) {
        let mut first_seen = self.first_seen.lock();
        match sandbox.status.phase {
            Phase::Pending if is_new && self.sandboxes.has_synced() => {
                first_seen.entry(sandbox.id.clone()).or_insert_with(std::time::Instant::now);
            }
            Phase::Pending | Phase::Scheduled | Phase::Creating => {}
            Phase::Running => {
                let since = first_seen.remove(&sandbox.id);
                if let Some(since) = since.filter(|_| self.controller.queue().is_active()) {
                    crate::runtime::metrics::METRICS.sandbox_startup.observe(since.elapsed().as_secs_f64());
                }
            }
            Phase::Failed | Phase::Terminating => {
                first_seen.remove(&sandbox.id);
            }
        }
    }

    /// Writes a Failed status, then reports it (stamped before the write, as what it reports).
    async fn fail(&self, sandbox: &Sandbox, status: SandboxStatus) -> Result<(), ControllerError> {
        let at = crate::events::Events::stamp();
        let (reason, message) = (status.reason.clone().unwrap_or_default(), status.message.clone().unwrap_or_default());
        write_status(self.objects.as_ref(), sandbox, status).await?;
        self.settings.events.warning_at(at, ObjectReference::sandbox(&sandbox.id), &reason, message);
        Ok(())
    }

    fn event_normal(&self, sandbox: &Sandbox, reason: &str, message: &str) {
        self.settings.events.normal(ObjectReference::sandbox(&sandbox.id), reason, message);
    }

    fn event_warning(&self, sandbox: &Sandbox, reason: &str, message: &str) {
        self.settings.events.warning(ObjectReference::sandbox(&sandbox.id), reason, message);
    }

    fn unindex(&self, node: &str, id: &str) {
        let mut by_node = self.by_node.lock();
        if let Some(ids) = by_node.get_mut(node) {
            ids.remove(id);
            if ids.is_empty() {
                by_node.remove(node);
            }
        }
    }

    /// Drives one sandbox one step toward its desired state.
    pub async fn reconcile(&self, id: &str) -> Reconciled {
        let Some(sandbox) = self.sandboxes.get(id) else {
            self.prober.forget(id);
            return Ok(Outcome::Done);
        };
        let result = match sandbox.status.phase {
            Phase::Pending => return Ok(Outcome::Done),
            Phase::Terminating => self.terminate(&sandbox).await,
            Phase::Failed => self.clean_up_failed(&sandbox).await,
            Phase::Scheduled | Phase::Creating | Phase::Running => self.drive(&sandbox).await,
        };
        result.map_err(|e| e.context(format!("sandbox {id}")))
    }

    fn node_of(&self, sandbox: &Sandbox) -> Option<Arc<Node>> {
        sandbox.status.node_name.as_deref().and_then(|n| self.nodes.get(n))
    }

    fn every_node_not_ready(&self) -> bool {
        let nodes = self.nodes.list();
        !nodes.is_empty() && nodes.iter().all(|n| n.status.state == NodeState::NotReady)
    }

    async fn drive(&self, sandbox: &Sandbox) -> Result<Outcome, ControllerError> {
        let Some(node_name) = sandbox.status.node_name.clone() else { return Ok(Outcome::Done) };
        let node = self.node_of(sandbox);
        if let Some(eviction) = &sandbox.status.eviction {
            return self.evict(sandbox, node.as_deref(), eviction).await;
        }
        if let Some(terms) = node.as_ref().and_then(|n| n.draining.as_ref()) {
            return self.mark_evicted(sandbox, terms).await;
        }
        // Scanning every node is only worth it when this one is NotReady.
        let all_down =
            node.as_ref().is_some_and(|n| n.status.state == NodeState::NotReady) && self.every_node_not_ready();
        let now = self.clock.unix_now();
        let grace = self.settings.node_lost_grace;
        let tolerations = &sandbox.spec.tolerations;
        let evict_at = match judge_node(node.as_deref(), tolerations, now, grace, all_down, self.started_unix) {
            NodeVerdict::Leave(reason, message) => {
                let message = if node.is_none() { format!("node {node_name} was deleted") } else { message };
                self.fail(sandbox, failed(&sandbox.status, reason, message)).await?;
                self.prober.forget(&sandbox.id);
                return Ok(Outcome::Done);
            }
            NodeVerdict::Wait(after) => return Ok(Outcome::Requeue(after)),
            NodeVerdict::Usable { evict_at } => evict_at,
        };
        let node = node.expect("usable nodes exist");
        if let Some(why) = creation_overdue(&sandbox.status, self.settings.creating_timeout, now) {
            // Failed keeps the binding, so the Failed clean-up removes whatever the agent made.
            self.fail(sandbox, failed(&sandbox.status, "CreateTimeout", why)).await?;
            self.prober.forget(&sandbox.id);
            return Ok(Outcome::Done);
        }
        let outcome = if sandbox.status.phase == Phase::Scheduled {
            self.create_on_agent(sandbox, &node).await?
        } else {
            self.sync_with_agent(sandbox, &node).await?
        };
        Ok(match evict_at {
            // Back when a NoExecute toleration runs out.
            Some(at) => {
                let left = Duration::from_secs(at.saturating_sub(now).max(0) as u64 + 1);
                match outcome {
                    Outcome::Requeue(after) => Outcome::Requeue(after.min(left)),
                    _ => Outcome::Requeue(left),
                }
            }
            None => outcome,
        })
    }

    /// Puts a draining node's terms on a sandbox bound there that has none yet (one bound while the
    /// drain was posted); the write brings it back here, to `evict`.
    async fn mark_evicted(&self, sandbox: &Sandbox, terms: &PendingEviction) -> Result<Outcome, ControllerError> {
        let status = SandboxStatus { eviction: Some(terms.clone()), ready: false, ..sandbox.status.clone() };
        write_status(self.objects.as_ref(), sandbox, status).await?;
        Ok(Outcome::Done)
    }

    /// A drain's eviction: stop the sandbox on its agent within the grace, then place it again
    /// (`Reschedule`) or fail it (`Evicted`). The stop runs on a task of its own, so a long grace
    /// never holds one of the controller's workers. Past the deadline (counted from this
    /// controller's start at the earliest, as NotReady is) it leaves the node even if the agent never
    /// confirmed; the orphan sweep removes what is left there once the agent answers again.
    async fn evict(
        &self,
        sandbox: &Sandbox,
        node: Option<&Node>,
        eviction: &PendingEviction,
    ) -> Result<Outcome, ControllerError> {
        self.prober.forget(&sandbox.id);
        let now = self.clock.unix_now();
        let deadline = parse_rfc3339(&eviction.deadline_at)
            .unwrap_or(now)
            .max(self.started_unix + self.settings.node_lost_grace.as_secs() as i64);
        let finished = self.stops.lock().get(&sandbox.id).cloned();
        match finished {
            Some(StopState::Stopping) => return Ok(Outcome::Requeue(Duration::from_secs(5))),
            Some(StopState::Done(result)) => {
                self.stops.lock().remove(&sandbox.id);
                return match result {
                    Ok(()) => self.finish_eviction(sandbox, eviction, true).await,
                    Err(_) if now >= deadline => self.finish_eviction(sandbox, eviction, false).await,
                    Err(e) => Err(ControllerError::Transient(format!("evicting {}: {e}", sandbox.id))),
                };
            }
            None => {}
        }
        let Some(node) = node else { return self.finish_eviction(sandbox, eviction, true).await };
        if node.status.state == NodeState::Ready {
            let left = Duration::from_secs(deadline.saturating_sub(now).max(0) as u64);
            let grace = Duration::from_secs(u64::from(eviction.grace_seconds)).min(left);
            let why =
                format!("stopping it on node {} (grace {}s): {}", node.name, eviction.grace_seconds, eviction.message);
            self.event_normal(sandbox, "Killing", &why);
            self.start_stop(&sandbox.id, node, grace);
            return Ok(Outcome::Done);
        }
        // Not Ready: wait for it until the deadline, and for ever while every node is down (we are
        // probably the one cut off, as for NodeLost).
        if now < deadline || self.every_node_not_ready() {
            return Ok(Outcome::Requeue(Duration::from_secs(deadline.saturating_sub(now).clamp(1, 5) as u64)));
        }
        self.finish_eviction(sandbox, eviction, false).await
    }

    /// Stops a sandbox on its agent on a task of its own (bounded in number), then queues it again.
    fn start_stop(&self, id: &str, node: &Node, grace: Duration) {
        self.stops.lock().insert(id.to_string(), StopState::Stopping);
        let (agents, stops, slots, queue) =
            (self.agents.clone(), self.stops.clone(), self.stop_slots.clone(), self.controller.queue().clone());
        let (id, name, base_url) = (id.to_string(), node.name.clone(), node.sbxlet_base_url.clone());
        tokio::spawn(async move {
            let _slot = slots.acquire_owned().await;
            let addr = AgentAddr { node: &name, base_url: &base_url };
            let result = match agents.stop_sandbox(addr, &id, grace).await {
                Ok(()) => Ok(()),
                Err(e) if e.is_not_found() => Ok(()),
                Err(e) => Err(format!("node {name}: {e}")),
            };
            // Gone from the map: the sandbox was deleted meanwhile, and nothing waits for the result.
            if let Some(state) = stops.lock().get_mut(&id) {
                *state = StopState::Done(result);
            }
            queue.add(id);
        });
    }

    async fn finish_eviction(
        &self,
        sandbox: &Sandbox,
        eviction: &PendingEviction,
        stopped: bool,
    ) -> Result<Outcome, ControllerError> {
        let status = match sandbox.spec.restart_policy {
            RestartPolicy::Reschedule => rescheduled(&sandbox.status, &eviction.message),
            RestartPolicy::Never => {
                let mut status = failed(&sandbox.status, "Evicted", eviction.message.clone());
                status.released = stopped;
                status
            }
        };
        write_status(self.objects.as_ref(), sandbox, status.clone()).await?;
        let message = status.message.as_deref().unwrap_or_default();
        match sandbox.spec.restart_policy {
            RestartPolicy::Reschedule => self.event_normal(sandbox, "Rescheduled", message),
            RestartPolicy::Never => self.event_warning(sandbox, "Evicted", message),
        }
        let node = sandbox.status.node_name.as_deref().unwrap_or("");
        tracing::info!(sandbox = %sandbox.id, node, stopped, policy = ?sandbox.spec.restart_policy, "sandbox evicted");
        Ok(Outcome::Done)
    }

    async fn create_on_agent(&self, sandbox: &Sandbox, node: &Node) -> Result<Outcome, ControllerError> {
        let at = crate::events::Events::stamp();
        match self.agents.create_sandbox(AgentAddr::of(node), &agent_request(sandbox)).await {
            Ok(created) => {
                let mut status = sandbox.status.clone();
                status.phase = Phase::Creating;
                status.reason = None;
                status.message = None;
                apply_agent_view(&mut status, &created, node);
                // Read it back before writing: one already running goes from Scheduled straight to
                // Running, one store write instead of two (what the Creating write used to trigger).
                self.sync_from(sandbox, node, status, Some(at)).await
            }
            Err(e) if e.is_client_error() => {
                let status = failed(&sandbox.status, "AgentRejected", format!("node {}: {e}", node.name));
                self.fail(sandbox, status).await?;
                Ok(Outcome::Done)
            }
            Err(e) => {
                // Retried with backoff; say why in the status so `describe` shows what it is waiting for.
                let message = format!("creating on node {}: {e} (retrying)", node.name);
                self.event_warning(sandbox, "FailedCreate", &message);
                if sandbox.status.message.as_deref() != Some(message.as_str()) {
                    let mut status = sandbox.status.clone();
                    status.reason = Some("AgentError".into());
                    status.message = Some(message.clone());
                    let _ = write_status(self.objects.as_ref(), sandbox, status).await;
                }
                Err(ControllerError::Transient(message))
            }
        }
    }

    async fn sync_with_agent(&self, sandbox: &Sandbox, node: &Node) -> Result<Outcome, ControllerError> {
        self.sync_from(sandbox, node, sandbox.status.clone(), None).await
    }

    /// Reads the sandbox from its agent and writes the status that follows from `base` (the stored
    /// status, or Creating right after the agent accepted it at `accepted_at`), if it differs from
    /// the stored one. The `Created` event is recorded once that write succeeds, so a write lost
    /// to a conflict and retried does not count the acceptance twice.
    async fn sync_from(
        &self,
        sandbox: &Sandbox,
        node: &Node,
        base: SandboxStatus,
        accepted_at: Option<String>,
    ) -> Result<Outcome, ControllerError> {
        let record_accepted = |at: Option<String>| {
            if let Some(at) = at {
                let accepted = format!("node {} accepted the sandbox", node.name);
                self.settings.events.normal_at(at, ObjectReference::sandbox(&sandbox.id), "Created", accepted);
            }
        };
        let observed = self.agents.get_sandbox(AgentAddr::of(node), &sandbox.id).await;
        let Some(verdict) = judge_agent(observed.as_ref(), &node.name) else {
            if base != sandbox.status {
                // The agent accepted it: that much is recorded even when it cannot be read back now.
                write_status(self.objects.as_ref(), sandbox, base).await?;
                record_accepted(accepted_at);
            }
            let e = observed.unwrap_err();
            self.event_warning(sandbox, "FailedSync", &format!("reading it from node {}: {e}", node.name));
            return Err(ControllerError::from(e).context(format!("reading from node {}", node.name)));
        };
        let mut status = base;
        if let Ok(view) = &observed {
            apply_agent_view(&mut status, view, node);
        }
        let outcome = match verdict {
            AgentVerdict::Failed { reason, message } => {
                self.prober.forget(&sandbox.id);
                self.fail(sandbox, failed(&status, reason, message)).await?;
                record_accepted(accepted_at);
                return Ok(Outcome::Done);
            }
            AgentVerdict::StillCreating => Outcome::Requeue(creating_poll_after(
                &sandbox.status,
                self.settings.creating_poll,
                self.clock.unix_now(),
            )),
            AgentVerdict::Running => match &sandbox.spec.readiness_probe {
                None => {
                    status.ready = true;
                    status.phase = Phase::Running;
                    Outcome::Done
                }
                Some(_) => {
                    // The prober owns `ready`; the phase follows it.
                    self.prober.track(sandbox);
                    if status.ready {
                        status.phase = Phase::Running;
                    }
                    Outcome::Done
                }
            },
        };
        if status != sandbox.status {
            write_status(self.objects.as_ref(), sandbox, status.clone()).await?;
            record_accepted(accepted_at);
            if status.phase == Phase::Running && sandbox.status.phase != Phase::Running {
                self.event_normal(sandbox, "Started", &format!("running on node {}", node.name));
            }
        }
        Ok(outcome)
    }

    async fn terminate(&self, sandbox: &Sandbox) -> Result<Outcome, ControllerError> {
        self.prober.forget(&sandbox.id);
        // A released sandbox's agent already confirmed it gone: nothing to delete there.
        let on_agent = if sandbox.status.released { None } else { self.node_of(sandbox) };
        if let Some(node) = on_agent {
            self.event_normal(sandbox, "Killing", &format!("removing it from node {}", node.name));
            match self.agents.delete_sandbox(AgentAddr::of(&node), &sandbox.id).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    self.event_warning(sandbox, "FailedKill", &format!("removing it from node {}: {e}", node.name));
                    return Err(ControllerError::from(e).context(format!("deleting on node {}", node.name)));
                }
            }
        }
        match self.objects.remove_sandbox(&sandbox.id, &sandbox.resource_version).await {
            Ok(()) | Err(ObjectError::NotFound(_)) => {
                tracing::info!(sandbox = %sandbox.id, node = sandbox.status.node_name.as_deref().unwrap_or(""), "sandbox removed");
                Ok(Outcome::Done)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A Failed sandbox's leftovers leave its agent; only then are its ports and resources released.
    async fn clean_up_failed(&self, sandbox: &Sandbox) -> Result<Outcome, ControllerError> {
        if !sandbox.status.holds_node_resources() {
            return Ok(Outcome::Done);
        }
        let release = match self.node_of(sandbox) {
            None => true,
            Some(node) if node.status.state != NodeState::Ready => {
                return Ok(Outcome::Requeue(self.settings.sync_period));
            }
            Some(node) => match self.agents.delete_sandbox(AgentAddr::of(&node), &sandbox.id).await {
                Ok(()) => true,
                Err(e) if e.is_not_found() => true,
                Err(e) => {
                    let why = format!("removing its leftovers from node {}: {e}", node.name);
                    self.event_warning(sandbox, "FailedKill", &why);
                    return Err(ControllerError::from(e).context(format!("removing leftovers on node {}", node.name)));
                }
            },
        };
        if release {
            let status = SandboxStatus { released: true, ..sandbox.status.clone() };
            self.objects.put_sandbox_status(&sandbox.id, &status, &sandbox.resource_version).await?;
        }
        Ok(Outcome::Done)
    }

    /// Runs the controller until `shutdown`: workers, a periodic resync and the orphan sweep.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        self.controller.wait_synced().await;
        let resync = self.clone();
        every(self.settings.sync_period, shutdown.clone(), move || {
            let resync = resync.clone();
            async move { resync.sync_with_agents().await }
        });
        let me = self.clone();
        self.controller
            .run(shutdown, move |id: String| {
                let me = me.clone();
                async move { me.reconcile(&id).await }
            })
            .await;
    }
}

/// Copies what the agent reports (private IP, agent phase) and the node's external address into a status.
pub fn apply_agent_view(status: &mut SandboxStatus, view: &AgentSandbox, node: &Node) {
    if !view.private_ip.is_empty() {
        status.private_ip = Some(view.private_ip.clone());
    }
    status.agent_phase = Some(view.phase.as_str().to_string());
    let external = node.effective_external();
    if !external.is_empty() {
        status.external = Some(external.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TokioClock;

    #[test]
    fn a_creating_sandbox_is_polled_at_the_base_rate_first_then_less_often() {
        let since = |secs_ago: i64| SandboxStatus {
            last_transition_at: Some(sandboxd_api::time::format_unix(1_000 - secs_ago)),
            ..SandboxStatus::default()
        };
        let base = Duration::from_millis(50);
        assert_eq!(creating_poll_after(&since(0), base, 1_000), base);
        assert_eq!(creating_poll_after(&since(2), base, 1_000), base, "still within the first two seconds");
        assert_eq!(creating_poll_after(&since(10), base, 1_000), Duration::from_secs(2));
        assert_eq!(creating_poll_after(&since(600), base, 1_000), Duration::from_secs(5));
    }
    use crate::node::test_node as node;
    use crate::testing::{FakeObjects, ScriptedAgent};

    fn running_on(id: &str, node: &str) -> Sandbox {
        serde_json::from_value(serde_json::json!({
            "id": id, "created_at": "", "updated_at": "", "resource_version": "1", "spec": {"containers": []},
            "status": {"phase": "Running", "node_name": node, "ready": true}
        }))
        .unwrap()
    }

    /// Runs a sandbox controller (grace 60 s) on paused time over `nodes` and `sandboxes`.
    async fn start_controller(nodes: Vec<Node>, sandboxes: Vec<Sandbox>, t0: i64) -> Arc<FakeObjects> {
        let objects = Arc::new(FakeObjects::new(nodes, sandboxes));
        let (node_informer, sandbox_informer) = (Informer::new(), Informer::new());
        let agents: Arc<dyn AgentClient> = Arc::new(ScriptedAgent::unreachable());
        let prober = Prober::new(
            node_informer.clone(),
            sandbox_informer.clone(),
            objects.clone(),
            agents.clone(),
            1,
            Default::default(),
        );
        let settings = SandboxSettings { node_lost_grace: Duration::from_secs(60), ..SandboxSettings::default() };
        let clock = Arc::new(TokioClock::starting_at(t0));
        let controller = SandboxController::new(
            node_informer.clone(),
            sandbox_informer.clone(),
            objects.clone(),
            agents,
            prober,
            settings,
            clock,
        );
        let stop = CancellationToken::new();
        tokio::spawn(node_informer.run(objects.clone(), stop.clone()));
        tokio::spawn(sandbox_informer.run(objects.clone(), stop.clone()));
        tokio::spawn(controller.run(stop));
        objects
    }

    async fn settle() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_sandbox_on_a_not_ready_node_fails_with_node_lost_only_after_the_grace() {
        let t0 = parse_rfc3339("2026-05-15T04:30:00Z").unwrap();
        let down = node(NodeState::NotReady, Some("2026-05-15T04:30:00Z"));
        let up = Node { id: "m".into(), name: "m".into(), ..node(NodeState::Ready, None) };
        let objects = start_controller(vec![down, up], vec![running_on("s", "n")], t0).await;
        settle().await;
        assert_eq!(objects.last_sandbox_status("s"), None, "inside the grace nothing is written");

        tokio::time::advance(Duration::from_secs(59)).await;
        settle().await;
        assert_eq!(objects.last_sandbox_status("s"), None, "still inside the grace at 59 s");

        tokio::time::advance(Duration::from_secs(2)).await;
        settle().await;
        let status = objects.last_sandbox_status("s").expect("written once the grace is over");
        assert_eq!((status.phase, status.reason.as_deref()), (Phase::Failed, Some("NodeLost")));
        assert_eq!(status.node_name.as_deref(), Some("n"), "it keeps its binding");
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_fails_while_every_node_is_not_ready() {
        let t0 = parse_rfc3339("2026-05-15T04:30:00Z").unwrap();
        let down = node(NodeState::NotReady, Some("2026-05-15T04:30:00Z"));
        let objects = start_controller(vec![down], vec![running_on("s", "n")], t0).await;
        tokio::time::advance(Duration::from_secs(600)).await;
        settle().await;
        assert_eq!(objects.last_sandbox_status("s"), None, "we are probably the one cut off");
    }

    #[test]
    fn node_verdicts_follow_state_grace_tolerations_and_the_cut_off_rule() {
        use sandboxd_api::taints::{TaintEffect, TolerationOperator};
        let t0 = parse_rfc3339("2026-05-15T04:30:00Z").unwrap();
        let grace = Duration::from_secs(60);
        let not_ready = node(NodeState::NotReady, Some("2026-05-15T04:30:00Z"));
        let lost = NodeVerdict::Leave("NodeLost", "node n is NotReady past what the sandbox tolerates".into());
        let deleted = NodeVerdict::Leave("NodeLost", "the node was deleted".into());
        let cases = [
            ("deleted", None, t0, false, deleted),
            ("ready", Some(node(NodeState::Ready, None)), t0, false, NodeVerdict::Usable { evict_at: None }),
            ("within grace", Some(not_ready.clone()), t0 + 20, false, NodeVerdict::Wait(Duration::from_secs(41))),
            ("past grace", Some(not_ready.clone()), t0 + 60, false, lost.clone()),
            (
                "past grace but everyone is down",
                Some(not_ready.clone()),
                t0 + 600,
                true,
                NodeVerdict::Wait(Duration::from_secs(5)),
            ),
            ("unknown", Some(node(NodeState::Unknown, None)), t0, false, NodeVerdict::Wait(Duration::from_secs(1))),
        ];
        for (what, node, now, all_down, want) in cases {
            assert_eq!(judge_node(node.as_ref(), &[], now, grace, all_down, t0), want, "{what}");
        }
        let restarted_later = judge_node(Some(&not_ready), &[], t0 + 90, grace, false, t0 + 60);
        assert_eq!(restarted_later, NodeVerdict::Wait(Duration::from_secs(31)), "grace counts from our own start");

        let tolerate = |seconds: Option<i64>| Toleration {
            key: NOT_READY_TAINT.into(),
            operator: TolerationOperator::Exists,
            value: String::new(),
            effect: Some(TaintEffect::NoExecute),
            toleration_seconds: seconds,
        };
        let longer = [tolerate(Some(600))];
        assert_eq!(
            judge_node(Some(&not_ready), &longer, t0 + 120, grace, false, t0),
            NodeVerdict::Wait(Duration::from_secs(481))
        );
        assert_eq!(judge_node(Some(&not_ready), &longer, t0 + 600, grace, false, t0), lost);
        let shorter = [tolerate(Some(5))];
        assert_eq!(
            judge_node(Some(&not_ready), &shorter, t0 + 5, grace, false, t0),
            lost,
            "its own shorter toleration"
        );
        let forever = [tolerate(None)];
        assert!(matches!(judge_node(Some(&not_ready), &forever, t0 + 99_999, grace, false, t0), NodeVerdict::Wait(_)));

        let mut maintenance = node(NodeState::Ready, None);
        maintenance.taints = vec![Taint {
            key: "maintenance".into(),
            value: String::new(),
            effect: TaintEffect::NoExecute,
            added_at: Some("2026-05-15T04:30:00Z".into()),
        }];
        let evicted = NodeVerdict::Leave(
            "Evicted",
            "node n has the taint maintenance:NoExecute, which the sandbox does not tolerate".into(),
        );
        assert_eq!(judge_node(Some(&maintenance), &[], t0, grace, false, t0), evicted);
    }

    pub(super) fn agent_sandbox(phase: AgentPhase, message: &str) -> AgentSandbox {
        AgentSandbox {
            id: "s".into(),
            phase,
            private_ip: "10.88.0.5".into(),
            ports: vec![],
            containers: vec![],
            message: message.into(),
            created_at: String::new(),
            labels: Default::default(),
        }
    }

    #[test]
    fn agent_views_map_to_phases() {
        let not_found = AgentError::Status { status: 404, message: "no".into() };
        let down = AgentError::Unreachable("refused".into());
        assert_eq!(
            judge_agent(Err(&not_found), "n"),
            Some(AgentVerdict::Failed { reason: "Vanished", message: "sandbox is missing on node n".into() })
        );
        assert_eq!(judge_agent(Err(&down), "n"), None, "an unreachable agent says nothing about the sandbox");
        assert_eq!(judge_agent(Ok(&agent_sandbox(AgentPhase::Creating, "")), "n"), Some(AgentVerdict::StillCreating));
        assert_eq!(judge_agent(Ok(&agent_sandbox(AgentPhase::Running, "")), "n"), Some(AgentVerdict::Running));
        assert_eq!(
            judge_agent(Ok(&agent_sandbox(AgentPhase::Failed, "oom")), "n"),
            Some(AgentVerdict::Failed { reason: "AgentFailed", message: "oom".into() })
        );
    }

    #[test]
    fn creation_is_overdue_only_in_scheduled_or_creating_past_the_timeout() {
        let at = |phase: Phase, since: &str, message: Option<&str>| SandboxStatus {
            phase,
            node_name: Some("n".into()),
            last_transition_at: Some(since.into()),
            message: message.map(String::from),
            ..SandboxStatus::default()
        };
        let t0 = parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
        let timeout = Duration::from_secs(300);
        let creating = at(Phase::Creating, "2026-01-01T00:00:00Z", None);
        assert_eq!(creation_overdue(&creating, timeout, t0 + 300), None, "at the timeout: not yet");
        assert_eq!(
            creation_overdue(&creating, timeout, t0 + 301).as_deref(),
            Some("still creating on node n after 301s (creating_timeout 300s)")
        );
        let refused = at(Phase::Scheduled, "2026-01-01T00:00:00Z", Some("creating on node n: 503 (retrying)"));
        assert_eq!(
            creation_overdue(&refused, timeout, t0 + 400).as_deref(),
            Some("not accepted by node n after 400s (creating_timeout 300s); last: creating on node n: 503 (retrying)")
        );
        for phase in [Phase::Pending, Phase::Running, Phase::Terminating, Phase::Failed] {
            assert_eq!(
                creation_overdue(&at(phase, "2026-01-01T00:00:00Z", None), timeout, t0 + 9999),
                None,
                "{phase:?}"
            );
        }
        let no_time = SandboxStatus { last_transition_at: None, ..creating };
        assert_eq!(creation_overdue(&no_time, timeout, t0 + 9999), None);
    }

    #[test]
    fn failed_keeps_binding_and_drops_readiness() {
        let status =
            SandboxStatus { phase: Phase::Running, node_name: Some("n".into()), ready: true, ..Default::default() };
        let f = failed(&status, "Vanished", "gone".into());
        assert_eq!((f.phase, f.ready, f.node_name.as_deref()), (Phase::Failed, false, Some("n")));
        assert!(f.holds_node_resources(), "ports stay held until the agent confirms");
    }
}
