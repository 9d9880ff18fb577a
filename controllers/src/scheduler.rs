//! Scheduler: places Pending sandboxes on Ready nodes with room, picks host ports, and binds with one CAS write.

use crate::objects::ObjectClient;
use crate::runtime::informer::{Change, Informer};
use crate::runtime::queue::{run_until_shutdown, Outcome, WorkQueue};
use parking_lot::Mutex;
use sandboxd_api::validate::{sandbox_requests, SandboxPolicy};
use sandboxd_api::{AssignedPort, Node, NodeState, Phase, Protocol, Sandbox, SandboxSpec};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// How nodes are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Least allocated first.
    Spread,
    /// Most allocated first.
    Binpack,
}

/// Settings of the scheduler, from configuration.
#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    pub policy: Policy,
    pub host_port_range: (u16, u16),
    pub requests: SandboxPolicy,
    /// Binds written concurrently; placement itself is serialized.
    pub workers: usize,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        SchedulerSettings {
            policy: Policy::Spread,
            host_port_range: (10000, 19999),
            requests: SandboxPolicy::default(),
            workers: 32,
        }
    }
}

/// What a sandbox asks of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    /// (protocol, container port, pinned host port)
    pub ports: Vec<(Protocol, u16, Option<u16>)>,
}

impl Request {
    /// The requests of a sandbox spec, with defaults for containers without `resource`.
    pub fn of(spec: &SandboxSpec, defaults: &SandboxPolicy) -> Request {
        let (cpu_milli, memory_bytes) = sandbox_requests(spec, defaults);
        let ports =
            spec.ports.iter().map(|p| (p.protocol, p.container_port as u16, p.host_port.map(|h| h as u16))).collect();
        Request { cpu_milli, memory_bytes, ports }
    }
}

/// Why a node does not fit a sandbox; the order is the order of the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rejection {
    NotReady,
    InsufficientCpu,
    InsufficientMemory,
    HostPortInUse,
    NoFreeHostPort,
}

impl Rejection {
    fn describe(self) -> &'static str {
        match self {
            Rejection::NotReady => "not ready",
            Rejection::InsufficientCpu => "insufficient cpu",
            Rejection::InsufficientMemory => "insufficient memory",
            Rejection::HostPortInUse => "host port in use",
            Rejection::NoFreeHostPort => "no free host port",
        }
    }
}

/// A node as the scheduler sees it: reported figures plus what the store has already bound to it.
#[derive(Debug, Clone)]
pub struct NodeView<'a> {
    pub name: &'a str,
    pub ready: bool,
    pub available_cpu_milli: u64,
    pub available_memory_bytes: u64,
    pub allocatable_cpu_milli: u64,
    pub allocatable_memory_bytes: u64,
    pub bound_cpu_milli: u64,
    pub bound_memory_bytes: u64,
    pub used_ports: &'a BTreeSet<(Protocol, u16)>,
}

/// Checks whether a node fits a request: Ready, room by both reported and bound figures, pinned ports free.
pub fn filter(node: &NodeView<'_>, request: &Request, range: (u16, u16)) -> Result<(), Rejection> {
    if !node.ready {
        return Err(Rejection::NotReady);
    }
    let free_cpu = node.allocatable_cpu_milli.saturating_sub(node.bound_cpu_milli);
    if request.cpu_milli > node.available_cpu_milli || request.cpu_milli > free_cpu {
        return Err(Rejection::InsufficientCpu);
    }
    let free_memory = node.allocatable_memory_bytes.saturating_sub(node.bound_memory_bytes);
    if request.memory_bytes > node.available_memory_bytes || request.memory_bytes > free_memory {
        return Err(Rejection::InsufficientMemory);
    }
    if request.ports.iter().any(|(proto, _, pinned)| pinned.is_some_and(|h| node.used_ports.contains(&(*proto, h)))) {
        return Err(Rejection::HostPortInUse);
    }
    if pick_ports(node.used_ports, request, range).is_none() {
        return Err(Rejection::NoFreeHostPort);
    }
    Ok(())
}

/// Scores a fitting node; higher is better. Spread prefers the most free share, binpack the least.
pub fn score(node: &NodeView<'_>, request: &Request, policy: Policy) -> u64 {
    let free_share = |allocatable: u64, bound: u64, asked: u64| -> u64 {
        if allocatable == 0 {
            return 0;
        }
        let free = allocatable.saturating_sub(bound).saturating_sub(asked);
        (u128::from(free) * 10_000 / u128::from(allocatable)) as u64
    };
    let cpu = free_share(node.allocatable_cpu_milli, node.bound_cpu_milli, request.cpu_milli);
    let memory = free_share(node.allocatable_memory_bytes, node.bound_memory_bytes, request.memory_bytes);
    let free = (cpu + memory) / 2;
    match policy {
        Policy::Spread => free,
        Policy::Binpack => 10_000 - free.min(10_000),
    }
}

/// Host ports for every requested port: the pinned one, else the lowest free in `range` per protocol.
pub fn pick_ports(used: &BTreeSet<(Protocol, u16)>, request: &Request, range: (u16, u16)) -> Option<Vec<AssignedPort>> {
    let mut taken: Vec<(Protocol, u16)> = Vec::with_capacity(request.ports.len());
    let is_free = |taken: &[(Protocol, u16)], key: (Protocol, u16)| !used.contains(&key) && !taken.contains(&key);
    let mut assigned = Vec::with_capacity(request.ports.len());
    // Pinned ports first, so an automatic pick never takes a port another entry pins.
    for (proto, _, pinned) in &request.ports {
        if let Some(h) = pinned {
            if !is_free(&taken, (*proto, *h)) {
                return None;
            }
            taken.push((*proto, *h));
        }
    }
    for (proto, container_port, pinned) in &request.ports {
        let host_port = match pinned {
            Some(h) => *h,
            None => {
                let free = (range.0..=range.1).find(|p| is_free(&taken, (*proto, *p)))?;
                taken.push((*proto, free));
                free
            }
        };
        assigned.push(AssignedPort { host_port, container_port: *container_port, protocol: *proto });
    }
    Some(assigned)
}

/// `0/3 nodes available: 2 insufficient cpu, 1 not ready`.
pub fn unschedulable_message(total: usize, rejections: &HashMap<Rejection, usize>) -> String {
    if total == 0 {
        return "0/0 nodes available: no nodes registered".into();
    }
    let mut counts: Vec<(Rejection, usize)> = rejections.iter().map(|(r, n)| (*r, *n)).collect();
    counts.sort();
    let parts: Vec<String> = counts.iter().map(|(r, n)| format!("{n} {}", r.describe())).collect();
    format!("0/{total} nodes available: {}", parts.join(", "))
}

/// How many feasible nodes to score before choosing, as kube-scheduler's adaptive
/// `percentageOfNodesToScore`: all of a small cluster, 10 % of 5,000 nodes, never fewer than 100.
pub fn feasible_nodes_to_score(nodes: usize) -> usize {
    let percent = 50usize.saturating_sub(nodes / 125).max(5);
    (nodes * percent / 100).max(100)
}

/// Picks the best of the first `sample` feasible nodes and its host ports, or explains why none fits.
pub fn choose<'a>(
    nodes: impl IntoIterator<Item = NodeView<'a>>,
    request: &Request,
    policy: Policy,
    range: (u16, u16),
    sample: usize,
) -> Result<(String, Vec<AssignedPort>), String> {
    let mut best: Option<(u64, NodeView<'a>)> = None;
    let mut rejections: HashMap<Rejection, usize> = HashMap::new();
    let mut total = 0;
    let mut feasible = 0;
    for node in nodes {
        if feasible >= sample.max(1) {
            break;
        }
        total += 1;
        match filter(&node, request, range) {
            Err(why) => *rejections.entry(why).or_default() += 1,
            Ok(()) => {
                feasible += 1;
                let s = score(&node, request, policy);
                // Ties go to the lowest name so placement is deterministic.
                let better = match &best {
                    None => true,
                    Some((bs, bn)) => s > *bs || (s == *bs && node.name < bn.name),
                };
                if better {
                    best = Some((s, node));
                }
            }
        }
    }
    match best {
        Some((_, node)) => {
            let ports = pick_ports(node.used_ports, request, range).expect("filter checked the ports");
            Ok((node.name.to_string(), ports))
        }
        None => Err(unschedulable_message(total, &rejections)),
    }
}

/// What one sandbox holds on its node.
#[derive(Debug, Clone)]
struct Held {
    slot: usize,
    cpu_milli: u64,
    memory_bytes: u64,
    ports: Vec<(Protocol, u16)>,
}

/// One node as the scheduler keeps it: the last reported figures and what is bound to it.
#[derive(Debug, Default)]
struct Slot {
    name: String,
    /// Still registered (a deleted node keeps its slot until its sandboxes are released).
    present: bool,
    ready: bool,
    available_cpu_milli: u64,
    available_memory_bytes: u64,
    allocatable_cpu_milli: u64,
    allocatable_memory_bytes: u64,
    bound_cpu_milli: u64,
    bound_memory_bytes: u64,
    ports: BTreeSet<(Protocol, u16)>,
}

impl Slot {
    fn view(&self) -> NodeView<'_> {
        NodeView {
            name: &self.name,
            ready: self.present && self.ready,
            available_cpu_milli: self.available_cpu_milli,
            available_memory_bytes: self.available_memory_bytes,
            allocatable_cpu_milli: self.allocatable_cpu_milli,
            allocatable_memory_bytes: self.allocatable_memory_bytes,
            bound_cpu_milli: self.bound_cpu_milli,
            bound_memory_bytes: self.bound_memory_bytes,
            used_ports: &self.ports,
        }
    }
}

/// Nodes and what is bound to them, from the store plus binds not yet seen back ("assumed").
///
/// Nodes live in a flat table so a placement scans memory without hashing or cloning.
#[derive(Debug, Default)]
pub struct AllocationIndex {
    slots: Vec<Slot>,
    by_name: HashMap<String, usize>,
    held: HashMap<String, Held>,
    /// Where the next placement starts scanning, so sampled placements rotate over all nodes.
    next_start: usize,
}

impl AllocationIndex {
    fn slot_of(&mut self, node: &str) -> usize {
        if let Some(i) = self.by_name.get(node) {
            return *i;
        }
        self.slots.push(Slot { name: node.to_string(), ..Slot::default() });
        self.by_name.insert(node.to_string(), self.slots.len() - 1);
        self.slots.len() - 1
    }

    /// Records a node's latest state and reported resources.
    pub fn upsert_node(&mut self, node: &Node) {
        let i = self.slot_of(&node.name);
        let r = &node.status.resources;
        let slot = &mut self.slots[i];
        slot.present = true;
        slot.ready = node.status.state == NodeState::Ready;
        slot.available_cpu_milli = r.available_cpu_milli;
        slot.available_memory_bytes = r.available_memory_bytes;
        slot.allocatable_cpu_milli = r.allocatable_cpu_milli;
        slot.allocatable_memory_bytes = r.allocatable_memory_bytes;
    }

    /// A deleted node takes no new sandboxes; what its sandboxes hold is released with them.
    pub fn remove_node(&mut self, node: &str) {
        if let Some(i) = self.by_name.get(node) {
            self.slots[*i].present = false;
        }
    }

    /// Records that `sandbox` holds resources on `node`; idempotent.
    pub fn hold(&mut self, sandbox: &str, node: &str, cpu_milli: u64, memory_bytes: u64, ports: Vec<(Protocol, u16)>) {
        let slot = self.slot_of(node);
        if let Some(existing) = self.held.get(sandbox) {
            if existing.slot == slot {
                return;
            }
            self.release(sandbox);
        }
        let s = &mut self.slots[slot];
        s.bound_cpu_milli += cpu_milli;
        s.bound_memory_bytes += memory_bytes;
        s.ports.extend(ports.iter().copied());
        self.held.insert(sandbox.to_string(), Held { slot, cpu_milli, memory_bytes, ports });
    }

    /// Whether `sandbox` holds (or is assumed to hold) resources.
    pub fn holds(&self, sandbox: &str) -> bool {
        self.held.contains_key(sandbox)
    }

    /// Frees what `sandbox` held; returns whether it held anything.
    pub fn release(&mut self, sandbox: &str) -> bool {
        let Some(held) = self.held.remove(sandbox) else { return false };
        let s = &mut self.slots[held.slot];
        s.bound_cpu_milli = s.bound_cpu_milli.saturating_sub(held.cpu_milli);
        s.bound_memory_bytes = s.bound_memory_bytes.saturating_sub(held.memory_bytes);
        for port in &held.ports {
            s.ports.remove(port);
        }
        true
    }

    /// Chooses a node for `request` (scanning from a rotating start) and assumes the placement at once.
    pub fn place(
        &mut self,
        sandbox: &str,
        request: &Request,
        policy: Policy,
        range: (u16, u16),
    ) -> Result<(String, Vec<AssignedPort>), String> {
        let n = self.slots.len();
        let start = if n == 0 { 0 } else { self.next_start % n };
        let sample = feasible_nodes_to_score(self.slots.iter().filter(|s| s.present).count());
        let order = self.slots[start..].iter().chain(self.slots[..start].iter()).filter(|s| s.present);
        let (name, ports) = choose(order.map(Slot::view), request, policy, range, sample)?;
        self.next_start = start + 1;
        let held_ports = ports.iter().map(|p| (p.protocol, p.host_port)).collect();
        self.hold(sandbox, &name, request.cpu_milli, request.memory_bytes, held_ports);
        Ok((name, ports))
    }

    /// Bound (cpu, memory) of a node.
    #[cfg(test)]
    fn bound(&self, node: &str) -> (u64, u64) {
        self.by_name
            .get(node)
            .map(|i| (self.slots[*i].bound_cpu_milli, self.slots[*i].bound_memory_bytes))
            .unwrap_or_default()
    }

    /// Host ports in use on a node.
    pub fn used_ports(&self, node: &str) -> Vec<(Protocol, u16)> {
        self.by_name.get(node).map(|i| self.slots[*i].ports.iter().copied().collect()).unwrap_or_default()
    }
}

/// The scheduler controller.
pub struct Scheduler {
    nodes: Informer<Node>,
    sandboxes: Informer<Sandbox>,
    objects: Arc<dyn ObjectClient>,
    settings: SchedulerSettings,
    index: Mutex<AllocationIndex>,
    queue: WorkQueue<String>,
    /// Pending sandboxes that fit nowhere; retried when nodes or capacity change, not in a loop.
    unschedulable: Mutex<HashSet<String>>,
    /// Bumped whenever room may have appeared, so a placement that failed meanwhile is retried.
    releases: AtomicU64,
}

impl crate::runtime::footprint::Footprint for Scheduler {
    fn footprint(&self) -> Vec<(&'static str, usize)> {
        let mut sizes =
            vec![("held", self.index.lock().held.len()), ("unschedulable", self.unschedulable.lock().len())];
        sizes.extend(self.queue.footprint());
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
        let scheduler = Arc::new(Scheduler {
            nodes,
            sandboxes,
            objects,
            settings,
            index: Mutex::new(AllocationIndex::default()),
            queue: WorkQueue::new(),
            unschedulable: Mutex::new(HashSet::new()),
            releases: AtomicU64::new(0),
        });
        scheduler.subscribe();
        crate::runtime::footprint::register("scheduler", &scheduler);
        scheduler
    }

    fn subscribe(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        self.sandboxes.subscribe(move |change| {
            if let Some(me) = me.upgrade() {
                me.on_sandbox_change(change);
            }
        });
        let me = Arc::downgrade(self);
        self.nodes.subscribe(move |change| {
            if let Some(me) = me.upgrade() {
                me.on_node_change(change);
            }
        });
    }

    fn on_sandbox_change(&self, change: &Change<'_, Sandbox>) {
        match change {
            Change::Upsert { new, .. } => {
                if new.status.holds_node_resources() {
                    let node = new.status.node_name.as_deref().unwrap_or_default();
                    let request = Request::of(&new.spec, &self.settings.requests);
                    let ports = new.status.assigned_ports.iter().map(|p| (p.protocol, p.host_port)).collect();
                    self.index.lock().hold(&new.id, node, request.cpu_milli, request.memory_bytes, ports);
                } else if new.status.node_name.is_some() && self.index.lock().release(&new.id) {
                    // Only a bound sandbox's release frees anything: a Pending copy may predate our own bind
                    // (a relist, or the event of the bind not yet applied) and must not undo the assumption.
                    self.retry_unschedulable();
                }
                if new.status.phase == Phase::Pending && new.status.node_name.is_none() {
                    self.queue.add(new.id.clone());
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
        // A state change either way makes the recorded reasons ("1 not ready") stale, so retry then too.
        let state_changed = old.is_some_and(|o| o.status.state != new.status.state);
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
            self.queue.add(id);
        }
    }

    /// Places one Pending sandbox: choose and assume under the index lock, then bind with a CAS write.
    pub async fn schedule_one(&self, id: &str) -> Outcome {
        let Some(sandbox) = self.sandboxes.get(id) else { return Outcome::Done };
        if sandbox.status.phase != Phase::Pending || sandbox.status.node_name.is_some() {
            return Outcome::Done;
        }
        // Held already: our bind succeeded and its event has not reached the cache yet.
        if self.index.lock().holds(id) {
            return Outcome::Done;
        }
        let request = Request::of(&sandbox.spec, &self.settings.requests);
        let releases_before = self.releases.load(Ordering::SeqCst);
        let decision = self.choose_and_assume(id, &request);
        match decision {
            Ok((node, ports)) => self.bind(&sandbox, node, ports).await,
            Err(message) => {
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

    async fn bind(&self, sandbox: &Sandbox, node: Arc<Node>, ports: Vec<AssignedPort>) -> Outcome {
        let mut status = sandbox.status.clone();
        status.phase = Phase::Scheduled;
        status.node_name = Some(node.name.clone());
        status.assigned_ports = ports;
        status.external = Some(node.effective_external().to_string()).filter(|e| !e.is_empty());
        status.reason = None;
        status.message = None;
        match self.objects.put_sandbox_status(&sandbox.id, &status, &sandbox.resource_version).await {
            Ok(_) => {
                crate::runtime::metrics::METRICS.binds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.unschedulable.lock().remove(&sandbox.id);
                tracing::info!(sandbox = %sandbox.id, node = %node.name, from = "Pending", to = "Scheduled", "sandbox phase changed");
                Outcome::Done
            }
            Err(e) => {
                // The bind did not happen: take back the assumption so the ports and room are free again.
                self.release_assumption(&sandbox.id);
                Outcome::Err(format!("binding {} to {}: {e}", sandbox.id, node.name))
            }
        }
    }

    async fn mark_unschedulable(&self, sandbox: &Sandbox, message: String) -> Outcome {
        self.unschedulable.lock().insert(sandbox.id.clone());
        let unchanged = sandbox.status.reason.as_deref() == Some("Unschedulable")
            && sandbox.status.message.as_deref() == Some(message.as_str());
        if unchanged {
            return Outcome::Done;
        }
        let mut status = sandbox.status.clone();
        status.reason = Some("Unschedulable".into());
        status.message = Some(message);
        match self.objects.put_sandbox_status(&sandbox.id, &status, &sandbox.resource_version).await {
            Ok(_) => Outcome::Done,
            Err(e) => Outcome::Err(format!("recording why {} is unschedulable: {e}", sandbox.id)),
        }
    }

    /// Places Pending sandboxes until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        self.nodes.wait_synced().await;
        self.sandboxes.wait_synced().await;
        let queue = self.queue.clone();
        let me = self.clone();
        let workers = self.settings.workers.max(1);
        run_until_shutdown(queue, workers, shutdown, move |id: String| {
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
mod tests {
    use super::*;

    fn view<'a>(name: &'a str, ports: &'a BTreeSet<(Protocol, u16)>) -> NodeView<'a> {
        NodeView {
            name,
            ready: true,
            available_cpu_milli: 3600,
            available_memory_bytes: 8 << 30,
            allocatable_cpu_milli: 3600,
            allocatable_memory_bytes: 8 << 30,
            bound_cpu_milli: 0,
            bound_memory_bytes: 0,
            used_ports: ports,
        }
    }

    fn request(cpu: u64, ports: &[(u16, Option<u16>)]) -> Request {
        Request {
            cpu_milli: cpu,
            memory_bytes: 64 << 20,
            ports: ports.iter().map(|(c, h)| (Protocol::Tcp, *c, *h)).collect(),
        }
    }

    #[test]
    fn filter_rejects_for_each_reason() {
        let none = BTreeSet::new();
        let used: BTreeSet<_> = [(Protocol::Tcp, 10000)].into();
        let full: BTreeSet<_> = (10000..=10001).map(|p| (Protocol::Tcp, p)).collect();
        let range = (10000, 10001);
        let cases: Vec<(&str, NodeView<'_>, Request, Result<(), Rejection>)> = vec![
            ("fits", view("a", &none), request(200, &[(80, None)]), Ok(())),
            ("not ready", NodeView { ready: false, ..view("a", &none) }, request(200, &[]), Err(Rejection::NotReady)),
            (
                "reported available too low",
                NodeView { available_cpu_milli: 100, ..view("a", &none) },
                request(200, &[]),
                Err(Rejection::InsufficientCpu),
            ),
            (
                "bound requests fill allocatable",
                NodeView { bound_cpu_milli: 3500, ..view("a", &none) },
                request(200, &[]),
                Err(Rejection::InsufficientCpu),
            ),
            (
                "memory",
                NodeView { bound_memory_bytes: 8 << 30, ..view("a", &none) },
                request(200, &[]),
                Err(Rejection::InsufficientMemory),
            ),
            ("pinned port taken", view("a", &used), request(200, &[(80, Some(10000))]), Err(Rejection::HostPortInUse)),
            ("pinned port elsewhere free", view("a", &used), request(200, &[(80, Some(10001))]), Ok(())),
            ("range exhausted", view("a", &full), request(200, &[(80, None)]), Err(Rejection::NoFreeHostPort)),
            ("exact fit", NodeView { bound_cpu_milli: 3400, ..view("a", &none) }, request(200, &[]), Ok(())),
        ];
        for (what, node, req, want) in cases {
            assert_eq!(filter(&node, &req, range), want, "{what}");
        }
    }

    #[test]
    fn ports_are_lowest_free_per_protocol_and_pins_are_honoured() {
        let used: BTreeSet<_> = [(Protocol::Tcp, 10000), (Protocol::Tcp, 10002)].into();
        let req = Request {
            cpu_milli: 1,
            memory_bytes: 1,
            ports: vec![
                (Protocol::Tcp, 80, None),
                (Protocol::Tcp, 81, None),
                (Protocol::Udp, 53, None),
                (Protocol::Tcp, 82, Some(10001)),
            ],
        };
        let got = pick_ports(&used, &req, (10000, 19999)).unwrap();
        let host: Vec<(Protocol, u16, u16)> = got.iter().map(|p| (p.protocol, p.container_port, p.host_port)).collect();
        assert_eq!(
            host,
            [
                (Protocol::Tcp, 80, 10003),
                (Protocol::Tcp, 81, 10004),
                (Protocol::Udp, 53, 10000),
                (Protocol::Tcp, 82, 10001)
            ],
            "10001 is pinned by a later entry, so automatic picks skip it"
        );
    }

    #[test]
    fn spread_prefers_least_allocated_and_binpack_most() {
        let none = BTreeSet::new();
        let idle = view("idle", &none);
        let busy = NodeView { bound_cpu_milli: 3000, bound_memory_bytes: 6 << 30, ..view("busy", &none) };
        let req = request(100, &[]);
        let pick = |policy| choose([idle.clone(), busy.clone()], &req, policy, (10000, 19999), 100).unwrap().0;
        assert_eq!(pick(Policy::Spread), "idle");
        assert_eq!(pick(Policy::Binpack), "busy");
    }

    #[test]
    fn ties_go_to_the_lowest_name() {
        let none = BTreeSet::new();
        let got = choose(
            [view("b", &none), view("a", &none), view("c", &none)],
            &request(1, &[]),
            Policy::Spread,
            (1, 2),
            100,
        );
        assert_eq!(got.unwrap().0, "a");
    }

    #[test]
    fn unschedulable_message_counts_reasons() {
        let none = BTreeSet::new();
        let nodes = [
            NodeView { ready: false, ..view("a", &none) },
            NodeView { bound_cpu_milli: 3600, ..view("b", &none) },
            NodeView { bound_cpu_milli: 3600, ..view("c", &none) },
        ];
        let err = choose(nodes, &request(200, &[]), Policy::Spread, (1, 2), 100).unwrap_err();
        assert_eq!(err, "0/3 nodes available: 1 not ready, 2 insufficient cpu");
        assert_eq!(unschedulable_message(0, &HashMap::new()), "0/0 nodes available: no nodes registered");
    }

    #[test]
    fn index_hold_is_idempotent_and_release_frees_ports() {
        let mut index = AllocationIndex::default();
        index.hold("s1", "n", 200, 10, vec![(Protocol::Tcp, 10000)]);
        index.hold("s1", "n", 200, 10, vec![(Protocol::Tcp, 10000)]);
        assert_eq!(index.bound("n").0, 200);
        assert_eq!(index.used_ports("n"), [(Protocol::Tcp, 10000)]);
        assert!(index.release("s1"));
        assert!(!index.release("s1"));
        assert_eq!(index.bound("n").0, 0);
        assert!(index.used_ports("n").is_empty());
    }

    fn ready_node(name: &str, allocatable_cpu: u64) -> Node {
        let mut node: Node = serde_json::from_value(serde_json::json!({
            "id": name, "name": name, "ip": "127.0.0.1", "port": 1, "state": "Ready",
            "created_at": "", "updated_at": "", "sbxlet_base_url": ""
        }))
        .unwrap();
        node.status.resources = sandboxd_api::NodeResources::derive(allocatable_cpu * 10 / 9, 16 << 30, 0, 0, 90);
        node
    }

    #[test]
    fn eighteen_of_200m_fill_a_3600m_node_and_the_nineteenth_does_not_fit() {
        let mut index = AllocationIndex::default();
        index.upsert_node(&ready_node("n", 3600));
        let req = request(200, &[]);
        let placed =
            (0..19).filter(|i| index.place(&format!("s{i}"), &req, Policy::Spread, (10000, 19999)).is_ok()).count();
        assert_eq!(placed, 18);
        assert_eq!(
            index.place("s19", &req, Policy::Spread, (10000, 19999)).unwrap_err(),
            "0/1 nodes available: 1 insufficient cpu"
        );
    }

    #[test]
    fn placements_rotate_over_equal_nodes_and_never_reuse_a_port() {
        let mut index = AllocationIndex::default();
        for name in ["a", "b", "c"] {
            index.upsert_node(&ready_node(name, 3600));
        }
        let req = request(10, &[(80, None)]);
        let mut seen = HashSet::new();
        for i in 0..300 {
            let (node, ports) = index.place(&format!("s{i}"), &req, Policy::Spread, (10000, 10099)).unwrap();
            assert!(seen.insert((node, ports[0].host_port)), "a (node, port) pair was handed out twice");
        }
        assert!(
            index.place("s300", &req, Policy::Spread, (10000, 10099)).is_err(),
            "300 ports of 3 nodes are all used"
        );
    }

    #[test]
    fn removed_nodes_take_nothing_new() {
        let mut index = AllocationIndex::default();
        index.upsert_node(&ready_node("a", 3600));
        index.remove_node("a");
        assert!(index.place("s", &request(10, &[]), Policy::Spread, (1, 2)).is_err());
    }

    #[test]
    fn sample_size_follows_the_kube_scheduler_rule() {
        assert_eq!(feasible_nodes_to_score(3), 100);
        assert_eq!(feasible_nodes_to_score(1000), 420);
        assert_eq!(feasible_nodes_to_score(5000), 500);
        assert_eq!(feasible_nodes_to_score(100_000), 5000);
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
