//! Scheduler: places Pending sandboxes on Ready nodes with room, picks host ports, and binds with one CAS write.

use crate::objects::ObjectClient;
use crate::runtime::informer::{Change, Informer};
use crate::runtime::queue::{run_workers, Outcome, WorkQueue};
use parking_lot::Mutex;
use sandboxd_api::validate::{sandbox_requests, SandboxPolicy};
use sandboxd_api::{AssignedPort, Node, NodeState, Phase, Protocol, Sandbox, SandboxSpec};
use std::collections::{BTreeSet, HashMap, HashSet};
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

/// Picks the best node and its host ports, or explains why none fits.
pub fn choose<'a>(
    nodes: impl IntoIterator<Item = NodeView<'a>>,
    request: &Request,
    policy: Policy,
    range: (u16, u16),
) -> Result<(String, Vec<AssignedPort>), String> {
    let mut best: Option<(u64, NodeView<'a>)> = None;
    let mut rejections: HashMap<Rejection, usize> = HashMap::new();
    let mut total = 0;
    for node in nodes {
        total += 1;
        match filter(&node, request, range) {
            Err(why) => *rejections.entry(why).or_default() += 1,
            Ok(()) => {
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
    node: String,
    cpu_milli: u64,
    memory_bytes: u64,
    ports: Vec<(Protocol, u16)>,
}

#[derive(Debug, Default)]
struct NodeAllocation {
    cpu_milli: u64,
    memory_bytes: u64,
    ports: BTreeSet<(Protocol, u16)>,
}

/// Resources and host ports bound per node, from the store plus binds not yet seen back ("assumed").
#[derive(Debug, Default)]
pub struct AllocationIndex {
    nodes: HashMap<String, NodeAllocation>,
    held: HashMap<String, Held>,
}

impl AllocationIndex {
    /// Records that `sandbox` holds resources on `node`; idempotent.
    pub fn hold(&mut self, sandbox: &str, node: &str, cpu_milli: u64, memory_bytes: u64, ports: Vec<(Protocol, u16)>) {
        if let Some(existing) = self.held.get(sandbox) {
            if existing.node == node {
                return;
            }
            self.release(sandbox);
        }
        let allocation = self.nodes.entry(node.to_string()).or_default();
        allocation.cpu_milli += cpu_milli;
        allocation.memory_bytes += memory_bytes;
        allocation.ports.extend(ports.iter().copied());
        self.held.insert(sandbox.to_string(), Held { node: node.to_string(), cpu_milli, memory_bytes, ports });
    }

    /// Frees what `sandbox` held; returns whether it held anything.
    pub fn release(&mut self, sandbox: &str) -> bool {
        let Some(held) = self.held.remove(sandbox) else { return false };
        if let Some(allocation) = self.nodes.get_mut(&held.node) {
            allocation.cpu_milli = allocation.cpu_milli.saturating_sub(held.cpu_milli);
            allocation.memory_bytes = allocation.memory_bytes.saturating_sub(held.memory_bytes);
            for port in &held.ports {
                allocation.ports.remove(port);
            }
        }
        true
    }

    /// Bound (cpu, memory, ports) of a node.
    fn bound(&self, node: &str) -> (u64, u64, Option<&BTreeSet<(Protocol, u16)>>) {
        match self.nodes.get(node) {
            Some(a) => (a.cpu_milli, a.memory_bytes, Some(&a.ports)),
            None => (0, 0, None),
        }
    }

    /// Host ports in use on a node.
    pub fn used_ports(&self, node: &str) -> Vec<(Protocol, u16)> {
        self.nodes.get(node).map(|a| a.ports.iter().copied().collect()).unwrap_or_default()
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
        });
        scheduler.subscribe();
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
                } else if self.index.lock().release(&new.id) {
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
        let Change::Upsert { old, new } = change else { return };
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
        if more_room && new.status.state == NodeState::Ready {
            self.retry_unschedulable();
        }
    }

    fn retry_unschedulable(&self) {
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
        let request = Request::of(&sandbox.spec, &self.settings.requests);
        let decision = self.choose_and_assume(id, &request);
        match decision {
            Ok((node, ports)) => self.bind(&sandbox, node, ports).await,
            Err(message) => self.mark_unschedulable(&sandbox, message).await,
        }
    }

    fn choose_and_assume(&self, id: &str, request: &Request) -> Result<(Arc<Node>, Vec<AssignedPort>), String> {
        let nodes = self.nodes.list();
        let mut index = self.index.lock();
        let empty = BTreeSet::new();
        let views = nodes.iter().map(|n| {
            let (bound_cpu, bound_memory, ports) = index.bound(&n.name);
            let r = &n.status.resources;
            NodeView {
                name: &n.name,
                ready: n.status.state == NodeState::Ready,
                available_cpu_milli: r.available_cpu_milli,
                available_memory_bytes: r.available_memory_bytes,
                allocatable_cpu_milli: r.allocatable_cpu_milli,
                allocatable_memory_bytes: r.allocatable_memory_bytes,
                bound_cpu_milli: bound_cpu,
                bound_memory_bytes: bound_memory,
                used_ports: ports.unwrap_or(&empty),
            }
        });
        let (name, ports) = choose(views, request, self.settings.policy, self.settings.host_port_range)?;
        let held_ports = ports.iter().map(|p| (p.protocol, p.host_port)).collect();
        index.hold(id, &name, request.cpu_milli, request.memory_bytes, held_ports);
        let node = nodes.into_iter().find(|n| n.name == name).expect("chosen from this list");
        Ok((node, ports))
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
                self.index.lock().release(&sandbox.id);
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
        let stop = queue.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            stop.shut_down();
        });
        let me = self.clone();
        let workers = self.settings.workers.max(1);
        run_workers(queue, workers, move |id: String| {
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
        let pick = |policy| choose([idle.clone(), busy.clone()], &req, policy, (10000, 19999)).unwrap().0;
        assert_eq!(pick(Policy::Spread), "idle");
        assert_eq!(pick(Policy::Binpack), "busy");
    }

    #[test]
    fn ties_go_to_the_lowest_name() {
        let none = BTreeSet::new();
        let got =
            choose([view("b", &none), view("a", &none), view("c", &none)], &request(1, &[]), Policy::Spread, (1, 2));
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
        let err = choose(nodes, &request(200, &[]), Policy::Spread, (1, 2)).unwrap_err();
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

    #[test]
    fn eighteen_of_200m_fill_a_3600m_node_and_the_nineteenth_does_not_fit() {
        let mut index = AllocationIndex::default();
        let req = request(200, &[]);
        let mut placed = 0;
        for i in 0..19 {
            let (cpu, mem, ports) = index.bound("n");
            let empty = BTreeSet::new();
            let node = NodeView { bound_cpu_milli: cpu, bound_memory_bytes: mem, ..view("n", ports.unwrap_or(&empty)) };
            if let Ok((name, _)) = choose([node], &req, Policy::Spread, (10000, 19999)) {
                index.hold(&format!("s{i}"), &name, req.cpu_milli, req.memory_bytes, vec![]);
                placed += 1;
            }
        }
        assert_eq!(placed, 18);
    }
}
