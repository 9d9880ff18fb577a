//! Placement, pure: whether a node fits a sandbox, how nodes score, and which host ports it gets.

use sandboxd_api::affinity::{selector_matches, Affinity};
use sandboxd_api::taints::{untolerated, Taint, Toleration};
use sandboxd_api::validate::{sandbox_requests, SandboxPolicy};
use sandboxd_api::{AssignedPort, Protocol, RuntimeClass, RuntimeClasses, SandboxSpec};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// How nodes are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Least allocated first.
    Spread,
    /// Most allocated first.
    Binpack,
}

/// What a sandbox asks of a node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Request {
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    /// (protocol, container port, pinned host port)
    pub ports: Vec<(Protocol, u16, Option<u16>)>,
    /// Labels the node must carry with exactly these values.
    pub node_selector: BTreeMap<String, String>,
    pub affinity: Option<Affinity>,
    pub runtime_class: RuntimeClass,
    /// Sandboxes of a lower priority may be preempted to make room.
    pub priority: i32,
    pub tolerations: Vec<Toleration>,
}

impl Request {
    /// The requests of a sandbox spec, with defaults for containers without `resource`.
    pub fn of(spec: &SandboxSpec, defaults: &SandboxPolicy) -> Request {
        let (cpu_milli, memory_bytes) = sandbox_requests(spec, defaults);
        let ports =
            spec.ports.iter().map(|p| (p.protocol, p.container_port as u16, p.host_port.map(|h| h as u16))).collect();
        Request {
            cpu_milli,
            memory_bytes,
            ports,
            node_selector: spec.node_selector.clone(),
            affinity: spec.affinity.clone(),
            runtime_class: spec.runtime_class,
            priority: spec.priority,
            tolerations: spec.tolerations.clone(),
        }
    }

    /// The summed weight of the preferred affinity expressions `labels` satisfy.
    fn preference(&self, labels: &BTreeMap<String, String>) -> u64 {
        self.affinity.as_ref().map_or(0, |a| a.preference_weight(labels))
    }

    /// Whether the request has any rule on node labels.
    pub fn has_label_rules(&self) -> bool {
        !self.node_selector.is_empty() || self.affinity.is_some()
    }
}

/// How a node's labels fit a request's selector and affinity: the preferred weight, or why not.
pub type LabelFit = Result<u64, Rejection>;

/// Judges a node's labels against a request's selector and affinity (pure).
pub fn label_fit(request: &Request, labels: &BTreeMap<String, String>) -> LabelFit {
    if !selector_matches(&request.node_selector, labels) {
        return Err(Rejection::NodeSelectorMismatch);
    }
    if request.affinity.as_ref().is_some_and(|a| !a.required_match(labels)) {
        return Err(Rejection::AffinityMismatch);
    }
    Ok(request.preference(labels))
}

/// Why a node does not fit a sandbox; the order is the order of the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rejection {
    NotReady,
    Unschedulable,
    NodeSelectorMismatch,
    AffinityMismatch,
    UntoleratedTaint,
    RuntimeClassMissing,
    InsufficientCpu,
    InsufficientMemory,
    HostPortInUse,
    NoFreeHostPort,
}

impl Rejection {
    fn describe(self) -> &'static str {
        match self {
            Rejection::NotReady => "not ready",
            Rejection::Unschedulable => "unschedulable (cordoned)",
            Rejection::NodeSelectorMismatch => "node selector mismatch",
            Rejection::AffinityMismatch => "affinity mismatch",
            Rejection::UntoleratedTaint => "untolerated taint",
            Rejection::RuntimeClassMissing => "without the runtime class",
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
    /// `name_hash(name)`, kept with the node so the tie-break does not hash the name per placement.
    pub name_hash: u64,
    pub ready: bool,
    /// Cordoned by an operator.
    pub unschedulable: bool,
    pub labels: &'a BTreeMap<String, String>,
    /// `label_fit` of these labels for the request at hand, when the caller already knows it.
    pub label_fit: Option<LabelFit>,
    pub runtime_classes: RuntimeClasses,
    /// NoSchedule and NoExecute both keep a sandbox that does not tolerate them off the node.
    pub taints: &'a [Taint],
    pub available_cpu_milli: u64,
    pub available_memory_bytes: u64,
    pub allocatable_cpu_milli: u64,
    pub allocatable_memory_bytes: u64,
    pub bound_cpu_milli: u64,
    pub bound_memory_bytes: u64,
    /// Sandboxes bound (or assumed) to the node: the first tie-break between equal scores.
    pub sandboxes: usize,
    pub used_ports: &'a BTreeSet<(Protocol, u16)>,
}

/// Checks whether a node fits a request: Ready, not cordoned, labels, runtime class, room by both
/// reported and bound figures, pinned ports free.
pub fn filter(node: &NodeView<'_>, request: &Request, range: (u16, u16)) -> Result<(), Rejection> {
    if !node.ready {
        return Err(Rejection::NotReady);
    }
    if node.unschedulable {
        return Err(Rejection::Unschedulable);
    }
    node.label_fit.unwrap_or_else(|| label_fit(request, node.labels))?;
    if untolerated(node.taints, &request.tolerations).is_some() {
        return Err(Rejection::UntoleratedTaint);
    }
    if !node.runtime_classes.contains(request.runtime_class) {
        return Err(Rejection::RuntimeClassMissing);
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
    if !ports_fit(node.used_ports, request, range) {
        return Err(Rejection::NoFreeHostPort);
    }
    Ok(())
}

/// Whether `pick_ports` would find host ports for `request`, without building them: it runs for
/// every node scored (about 500 per placement at 5,000 nodes), and `pick_ports`' allocations were a
/// fifth of a placement's time. Pinned ports must be free and distinct; per protocol, the range must
/// hold as many ports neither used nor pinned by the request as it has unpinned ones.
fn ports_fit(used: &BTreeSet<(Protocol, u16)>, request: &Request, range: (u16, u16)) -> bool {
    let ports = &request.ports;
    let pinned = |proto: Protocol, port: u16| ports.iter().any(|(p, _, h)| *p == proto && *h == Some(port));
    for (i, (proto, _, host)) in ports.iter().enumerate() {
        let Some(h) = host else { continue };
        let pinned_again = ports[..i].iter().any(|(p, _, earlier)| p == proto && *earlier == Some(*h));
        if pinned_again || used.contains(&(*proto, *h)) {
            return false;
        }
    }
    for (i, (proto, _, host)) in ports.iter().enumerate() {
        let counted = ports[..i].iter().any(|(p, _, earlier)| p == proto && earlier.is_none());
        if host.is_some() || counted {
            continue;
        }
        let wanted = ports.iter().filter(|(p, _, h)| p == proto && h.is_none()).count();
        let free = (range.0..=range.1).filter(|port| !used.contains(&(*proto, *port)) && !pinned(*proto, *port));
        if free.take(wanted).count() < wanted {
            return false;
        }
    }
    true
}

/// The scale of a score: a node's free share in billionths, fine enough that one millicore of a
/// 1,000-core node still counts.
const SCORE_SCALE: u128 = 1_000_000_000;

/// Scores a fitting node; higher is better. Spread prefers the most free share, binpack the least.
pub fn score(node: &NodeView<'_>, request: &Request, policy: Policy) -> u64 {
    let free_share = |allocatable: u64, bound: u64, asked: u64| -> u64 {
        if allocatable == 0 {
            return 0;
        }
        let free = allocatable.saturating_sub(bound).saturating_sub(asked);
        // Most products fit in 64 bits (millicores always do), and a 64-bit division is several
        // times cheaper than a 128-bit one; memory in bytes can overflow and takes the wide path.
        match free.checked_mul(SCORE_SCALE as u64) {
            Some(scaled) => scaled / allocatable,
            None => (u128::from(free) * SCORE_SCALE / u128::from(allocatable)) as u64,
        }
    };
    let cpu = free_share(node.allocatable_cpu_milli, node.bound_cpu_milli, request.cpu_milli);
    let memory = free_share(node.allocatable_memory_bytes, node.bound_memory_bytes, request.memory_bytes);
    let free = (cpu + memory) / 2;
    match policy {
        Policy::Spread => free,
        Policy::Binpack => (SCORE_SCALE as u64).saturating_sub(free),
    }
}

/// The last tie-break between nodes of equal score and equal sandbox count: a hash of the sandbox
/// and the node, so equal nodes are picked evenly across sandboxes (kube-scheduler picks at random
/// among equal scores) while one sandbox's placement stays reproducible.
pub fn tie_break(seed: u64, node: &str) -> u64 {
    tie_break_hashed(seed, name_hash(node))
}

/// `tie_break` with the node's `name_hash` already known.
pub fn tie_break_hashed(seed: u64, name_hash: u64) -> u64 {
    // A final mix (MurmurHash3's) so that close seeds and close names spread apart.
    let mut h = seed ^ name_hash;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// FNV-1a of a name.
pub fn name_hash(name: &str) -> u64 {
    name.as_bytes().iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// The seed of `tie_break` for a sandbox id.
pub fn tie_seed(sandbox: &str) -> u64 {
    tie_break(0, sandbox)
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

/// A sandbox held on a node, as preemption weighs it.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub id: &'a str,
    pub priority: i32,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub ports: &'a [(Protocol, u16)],
    /// Already on its way out (Failed, being cleaned up): its room is counted as free, and it is
    /// never chosen again.
    pub terminating: bool,
}

/// The sandboxes to evict from `node` so that `request` fits there, or `None` when no set of
/// lower-priority sandboxes would do (or the node is ruled out for other reasons: state, cordon,
/// labels, runtime class). Like kube-scheduler: take every lower-priority sandbox away, then give
/// back as many as still leave room, highest priority first, so the victims are the lowest.
/// Sandboxes of an equal or higher priority are never victims. An empty list: the room that
/// terminating sandboxes free is enough.
pub fn victims_on_node(
    node: &NodeView<'_>,
    request: &Request,
    range: (u16, u16),
    candidates: &[Candidate<'_>],
) -> Option<Vec<usize>> {
    let fits_without = |gone: &[usize]| {
        let mut ports = node.used_ports.clone();
        let mut view = node.clone();
        for i in
            gone.iter().copied().chain(candidates.iter().enumerate().filter(|(_, c)| c.terminating).map(|(i, _)| i))
        {
            let c = &candidates[i];
            view.bound_cpu_milli = view.bound_cpu_milli.saturating_sub(c.cpu_milli);
            view.bound_memory_bytes = view.bound_memory_bytes.saturating_sub(c.memory_bytes);
            view.available_cpu_milli += c.cpu_milli;
            view.available_memory_bytes += c.memory_bytes;
            for port in c.ports {
                ports.remove(port);
            }
        }
        filter(&NodeView { used_ports: &ports, ..view }, request, range).is_ok()
    };
    let mut eligible: Vec<usize> = (0..candidates.len())
        .filter(|i| !candidates[*i].terminating && candidates[*i].priority < request.priority)
        .collect();
    if !fits_without(&eligible) {
        return None;
    }
    // Highest priority first, then the largest (keeping a big one back spares more victims).
    eligible.sort_by_key(|i| (std::cmp::Reverse(candidates[*i].priority), std::cmp::Reverse(candidates[*i].cpu_milli)));
    let mut victims = eligible.clone();
    for i in eligible {
        let without: Vec<usize> = victims.iter().copied().filter(|v| *v != i).collect();
        if fits_without(&without) {
            victims = without;
        }
    }
    Some(victims)
}

/// (victims, highest priority among them, sum of their priorities).
pub type VictimsCost = (usize, i64, i64);

/// How a node's victims rank against another node's: fewer victims first, then the lower highest
/// priority among them, then the lower sum of priorities; lower is better.
pub fn victims_cost(candidates: &[Candidate<'_>], victims: &[usize]) -> VictimsCost {
    let priorities = victims.iter().map(|i| i64::from(candidates[*i].priority));
    (victims.len(), priorities.clone().max().unwrap_or(i64::MIN), priorities.sum())
}

/// `0/3 nodes available: 2 insufficient cpu, 1 not ready`; a missing runtime class is named
/// (`1 without the runtime class gvisor`).
pub fn unschedulable_message(total: usize, rejections: &HashMap<Rejection, usize>, class: RuntimeClass) -> String {
    if total == 0 {
        return "0/0 nodes available: no nodes registered".into();
    }
    let mut counts: Vec<(Rejection, usize)> = rejections.iter().map(|(r, n)| (*r, *n)).collect();
    counts.sort();
    let parts: Vec<String> = counts
        .iter()
        .map(|(r, n)| match r {
            Rejection::RuntimeClassMissing => format!("{n} {} {class}", r.describe()),
            _ => format!("{n} {}", r.describe()),
        })
        .collect();
    format!("0/{total} nodes available: {}", parts.join(", "))
}

/// How many feasible nodes to score before choosing, as kube-scheduler's adaptive
/// `percentageOfNodesToScore`: all of a small cluster, 10 % of 5,000 nodes, never fewer than 100.
pub fn feasible_nodes_to_score(nodes: usize) -> usize {
    let percent = 50usize.saturating_sub(nodes / 125).max(5);
    (nodes * percent / 100).max(100)
}

/// How a feasible node ranks: preferred affinity weight, then score, then fewer sandboxes, then the
/// tie-break hash; higher wins.
type Rank = (u64, u64, std::cmp::Reverse<usize>, u64);

/// Picks the best of the first `sample` feasible nodes and its host ports, or explains why none fits.
/// Between equal scores the node with fewer sandboxes wins, then `tie_break` with `seed`.
pub fn choose<'a>(
    nodes: impl IntoIterator<Item = NodeView<'a>>,
    request: &Request,
    policy: Policy,
    range: (u16, u16),
    sample: usize,
    seed: u64,
) -> Result<(String, Vec<AssignedPort>), String> {
    let mut best: Option<(Rank, NodeView<'a>)> = None;
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
                let preference = match &node.label_fit {
                    Some(fit) => fit.unwrap_or(0),
                    None => request.preference(node.labels),
                };
                let rank = (
                    preference,
                    score(&node, request, policy),
                    std::cmp::Reverse(node.sandboxes),
                    tie_break_hashed(seed, node.name_hash),
                );
                if best.as_ref().is_none_or(|(best_rank, _)| rank > *best_rank) {
                    best = Some((rank, node));
                }
            }
        }
    }
    match best {
        Some((_, node)) => {
            let ports = pick_ports(node.used_ports, request, range).expect("filter checked the ports");
            Ok((node.name.to_string(), ports))
        }
        None => Err(unschedulable_message(total, &rejections, request.runtime_class)),
    }
}

/// A request for `cpu` millicores, 64Mi and tcp `ports` of (container port, pinned host port).
#[cfg(test)]
pub(crate) fn test_request(cpu: u64, ports: &[(u16, Option<u16>)]) -> Request {
    Request {
        cpu_milli: cpu,
        memory_bytes: 64 << 20,
        ports: ports.iter().map(|(c, h)| (Protocol::Tcp, *c, *h)).collect(),
        ..Request::default()
    }
}

#[cfg(test)]
mod tests {
    use super::test_request as request;
    use super::*;
    use sandboxd_api::affinity::{Expression, Operator, Preference};

    static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

    fn view<'a>(name: &'a str, ports: &'a BTreeSet<(Protocol, u16)>) -> NodeView<'a> {
        NodeView {
            name,
            name_hash: name_hash(name),
            ready: true,
            unschedulable: false,
            labels: &NO_LABELS,
            label_fit: None,
            runtime_classes: RuntimeClasses::only(RuntimeClass::Runc),
            taints: &[],
            available_cpu_milli: 3600,
            available_memory_bytes: 8 << 30,
            allocatable_cpu_milli: 3600,
            allocatable_memory_bytes: 8 << 30,
            bound_cpu_milli: 0,
            bound_memory_bytes: 0,
            sandboxes: 0,
            used_ports: ports,
        }
    }

    /// `filter` checks ports with `ports_fit`, which must agree with `pick_ports` everywhere: every
    /// request of up to three ports (tcp or udp, automatic or pinned in or past the range) against
    /// every set of used ports in a three-port range.
    #[test]
    fn ports_fit_agrees_with_pick_ports() {
        let range = (10000, 10002);
        let all: Vec<(Protocol, u16)> =
            [Protocol::Tcp, Protocol::Udp].iter().flat_map(|p| (10000..=10002).map(move |h| (*p, h))).collect();
        let choices: Vec<(Protocol, u16, Option<u16>)> = [Protocol::Tcp, Protocol::Udp]
            .iter()
            .flat_map(|p| [None, Some(10000), Some(10001), Some(10002), Some(10003)].map(move |h| (*p, 80, h)))
            .collect();
        let mut requests: Vec<Vec<(Protocol, u16, Option<u16>)>> = vec![Vec::new()];
        for _ in 0..3 {
            let longer: Vec<_> = requests
                .iter()
                .filter(|r| r.len() == requests.last().map_or(0, Vec::len))
                .flat_map(|r| choices.iter().map(move |c| [r.clone(), vec![*c]].concat()))
                .collect();
            requests.extend(longer);
        }
        let mut checked = 0;
        for mask in 0..(1u32 << all.len()) {
            let used: BTreeSet<_> =
                all.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, p)| *p).collect();
            for ports in &requests {
                let request = Request { ports: ports.clone(), ..Request::default() };
                let picked = pick_ports(&used, &request, range).is_some();
                assert_eq!(ports_fit(&used, &request, range), picked, "used {used:?}, request {ports:?}");
                checked += 1;
            }
        }
        assert_eq!(checked, 64 * (1 + 10 + 100 + 1000));
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
            ..Request::default()
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
        let pick = |policy| choose([idle.clone(), busy.clone()], &req, policy, (10000, 19999), 100, 0).unwrap().0;
        assert_eq!(pick(Policy::Spread), "idle");
        assert_eq!(pick(Policy::Binpack), "busy");
    }

    #[test]
    fn equal_scores_go_to_the_node_with_fewer_sandboxes() {
        let none = BTreeSet::new();
        let nodes = [
            NodeView { sandboxes: 4, ..view("a", &none) },
            NodeView { sandboxes: 1, ..view("b", &none) },
            NodeView { sandboxes: 2, ..view("c", &none) },
        ];
        for seed in 0..20 {
            let got = choose(nodes.clone(), &request(1, &[]), Policy::Spread, (1, 2), 100, seed);
            assert_eq!(got.unwrap().0, "b", "seed {seed}");
        }
    }

    #[test]
    fn fully_equal_nodes_are_picked_evenly_across_sandboxes_and_reproducibly() {
        let none = BTreeSet::new();
        let nodes = [view("a", &none), view("b", &none), view("c", &none)];
        let mut picks: HashMap<String, usize> = HashMap::new();
        for i in 0..300 {
            let seed = tie_seed(&format!("sbx-{i}"));
            let pick = choose(nodes.clone(), &request(1, &[]), Policy::Spread, (1, 2), 100, seed).unwrap().0;
            let again = choose(nodes.clone(), &request(1, &[]), Policy::Spread, (1, 2), 100, seed).unwrap().0;
            assert_eq!(pick, again, "one sandbox's placement is reproducible");
            *picks.entry(pick).or_default() += 1;
        }
        assert_eq!(picks.len(), 3, "{picks:?}");
        assert!(picks.values().all(|n| *n >= 60), "no node starves: {picks:?}");
    }

    fn labeled<'a>(
        name: &'a str,
        labels: &'a BTreeMap<String, String>,
        none: &'a BTreeSet<(Protocol, u16)>,
    ) -> NodeView<'a> {
        NodeView { labels, ..view(name, none) }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn selectors_and_required_affinity_filter_and_are_counted() {
        let none = BTreeSet::new();
        let (gpu, cpu_eu, cpu_us) =
            (labels(&[("gpu", "a100"), ("zone", "eu")]), labels(&[("zone", "eu")]), labels(&[("zone", "us")]));
        let nodes = [labeled("gpu", &gpu, &none), labeled("eu", &cpu_eu, &none), labeled("us", &cpu_us, &none)];
        let pick = |req: &Request| choose(nodes.clone(), req, Policy::Spread, (1, 2), 100, 0);

        let selector = Request { node_selector: labels(&[("gpu", "a100")]), ..request(1, &[]) };
        assert_eq!(pick(&selector).unwrap().0, "gpu");
        let nowhere = Request { node_selector: labels(&[("gpu", "h100")]), ..request(1, &[]) };
        assert_eq!(pick(&nowhere).unwrap_err(), "0/3 nodes available: 3 node selector mismatch");

        let expression = |key: &str, operator, values: &[&str]| Expression {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        };
        let not_eu_no_gpu =
            Affinity { required: vec![expression("zone", Operator::NotIn, &["eu"])], preferred: vec![] };
        assert_eq!(pick(&Request { affinity: Some(not_eu_no_gpu), ..request(1, &[]) }).unwrap().0, "us");
        let gpu_in_us = Affinity {
            required: vec![expression("gpu", Operator::Exists, &[]), expression("zone", Operator::In, &["us"])],
            preferred: vec![],
        };
        let both = Request { affinity: Some(gpu_in_us), node_selector: labels(&[("zone", "eu")]), ..request(1, &[]) };
        assert_eq!(pick(&both).unwrap_err(), "0/3 nodes available: 1 node selector mismatch, 2 affinity mismatch");
    }

    #[test]
    fn preferred_affinity_outweighs_free_room_but_never_overrides_a_filter() {
        let none = BTreeSet::new();
        let (ssd, plain) = (labels(&[("disk", "ssd")]), labels(&[]));
        let busy_ssd = NodeView { bound_cpu_milli: 3000, ..labeled("busy-ssd", &ssd, &none) };
        let idle = labeled("idle", &plain, &none);
        let prefer_ssd = Affinity {
            required: vec![],
            preferred: vec![Preference {
                weight: 10,
                expression: Expression { key: "disk".into(), operator: Operator::In, values: vec!["ssd".into()] },
            }],
        };
        let req = Request { affinity: Some(prefer_ssd), ..request(100, &[]) };
        let got = choose([idle.clone(), busy_ssd.clone()], &req, Policy::Spread, (1, 2), 100, 0).unwrap().0;
        assert_eq!(got, "busy-ssd", "the preference wins over the spread score");
        let full_ssd = NodeView { bound_cpu_milli: 3600, ..busy_ssd };
        let got = choose([idle, full_ssd], &req, Policy::Spread, (1, 2), 100, 0).unwrap().0;
        assert_eq!(got, "idle", "a preferred node that does not fit is not chosen");
    }

    #[test]
    fn unschedulable_message_counts_reasons() {
        let none = BTreeSet::new();
        let nodes = [
            NodeView { ready: false, ..view("a", &none) },
            NodeView { bound_cpu_milli: 3600, ..view("b", &none) },
            NodeView { bound_cpu_milli: 3600, ..view("c", &none) },
            NodeView { unschedulable: true, ..view("d", &none) },
        ];
        let err = choose(nodes, &request(200, &[]), Policy::Spread, (1, 2), 100, 0).unwrap_err();
        assert_eq!(err, "0/4 nodes available: 1 not ready, 1 unschedulable (cordoned), 2 insufficient cpu");
        assert_eq!(
            unschedulable_message(0, &HashMap::new(), RuntimeClass::Runc),
            "0/0 nodes available: no nodes registered"
        );
    }

    #[test]
    fn a_runtime_class_is_placed_only_where_offered_and_the_rest_are_counted() {
        let none = BTreeSet::new();
        let both = RuntimeClasses::only(RuntimeClass::Runc).with(RuntimeClass::Gvisor);
        let gvisor = Request { runtime_class: RuntimeClass::Gvisor, ..request(200, &[]) };
        let runc = request(200, &[]);
        let cases: Vec<(&str, NodeView<'_>, &Request, Result<(), Rejection>)> = vec![
            ("runc on a runc node", view("a", &none), &runc, Ok(())),
            ("gvisor on a runc-only node", view("a", &none), &gvisor, Err(Rejection::RuntimeClassMissing)),
            ("gvisor where offered", NodeView { runtime_classes: both, ..view("a", &none) }, &gvisor, Ok(())),
            (
                "runc on a gvisor-only node",
                NodeView { runtime_classes: RuntimeClasses::only(RuntimeClass::Gvisor), ..view("a", &none) },
                &runc,
                Err(Rejection::RuntimeClassMissing),
            ),
            (
                "a cordoned node is counted as cordoned first",
                NodeView { unschedulable: true, ..view("a", &none) },
                &gvisor,
                Err(Rejection::Unschedulable),
            ),
        ];
        for (what, node, req, want) in cases {
            assert_eq!(filter(&node, req, (1, 2)), want, "{what}");
        }
        let nodes = [
            view("a", &none),
            view("b", &none),
            NodeView { runtime_classes: both, bound_cpu_milli: 3600, ..view("c", &none) },
        ];
        let err = choose(nodes, &gvisor, Policy::Spread, (1, 2), 100, 0).unwrap_err();
        assert_eq!(err, "0/3 nodes available: 2 without the runtime class gvisor, 1 insufficient cpu");
        let nodes = [view("a", &none), NodeView { runtime_classes: both, ..view("b", &none) }];
        assert_eq!(choose(nodes, &gvisor, Policy::Spread, (1, 2), 100, 0).unwrap().0, "b");
    }

    fn candidate(id: &'static str, priority: i32, cpu_milli: u64) -> Candidate<'static> {
        Candidate { id, priority, cpu_milli, memory_bytes: 0, ports: &[], terminating: false }
    }

    #[test]
    fn preemption_evicts_the_lowest_priorities_and_never_an_equal_or_higher_one() {
        let none = BTreeSet::new();
        // A 3600m node that is full.
        let full = NodeView { bound_cpu_milli: 3600, available_cpu_milli: 0, ..view("n", &none) };
        let wants = |cpu, priority| Request { priority, ..request(cpu, &[]) };
        let held = [
            candidate("a-p0", 0, 1000),
            candidate("b-p0", 0, 600),
            candidate("c-p1", 1, 1000),
            candidate("d-p5", 5, 1000),
        ];
        let names = |victims: Vec<usize>| {
            let mut names: Vec<&str> = victims.iter().map(|i| held[*i].id).collect();
            names.sort();
            names
        };
        let cases: Vec<(&str, Request, Option<Vec<&str>>)> = vec![
            ("the lowest that make room", wants(1000, 5), Some(vec!["a-p0"])),
            ("two of the lowest", wants(1500, 5), Some(vec!["a-p0", "b-p0"])),
            ("the next priority once the lowest are not enough", wants(2500, 5), Some(vec!["a-p0", "b-p0", "c-p1"])),
            ("not an equal priority", wants(3000, 5), None),
            ("priority 0 preempts nothing at 0", wants(500, 0), None),
            ("a higher one is never a victim", wants(3700, 9), None),
        ];
        for (what, req, want) in cases {
            let got = victims_on_node(&full, &req, (1, 2), &held).map(names);
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn preemption_counts_terminating_room_and_frees_pinned_ports() {
        let none = BTreeSet::new();
        let full = NodeView { bound_cpu_milli: 3600, available_cpu_milli: 0, ..view("n", &none) };
        let leaving = Candidate { terminating: true, ..candidate("gone", 0, 1000) };
        let got = victims_on_node(&full, &Request { priority: 1, ..request(1000, &[]) }, (1, 2), &[leaving]);
        assert_eq!(got, Some(vec![]), "the room being freed is enough: nobody else goes");

        let port = [(Protocol::Tcp, 10000)];
        let used: BTreeSet<_> = port.into();
        let node = view("n", &used);
        let holder = Candidate { ports: &port, ..candidate("holder", 0, 100) };
        let pinned = Request { priority: 1, ..request(100, &[(80, Some(10000))]) };
        assert_eq!(victims_on_node(&node, &pinned, (10000, 10001), std::slice::from_ref(&holder)), Some(vec![0]));
        let cordoned = NodeView { unschedulable: true, ..node.clone() };
        assert_eq!(victims_on_node(&cordoned, &pinned, (10000, 10001), &[holder]), None, "no help on a cordoned node");
    }

    #[test]
    fn a_taint_keeps_off_every_sandbox_that_does_not_tolerate_it() {
        use sandboxd_api::taints::{TaintEffect, TolerationOperator};
        let none = BTreeSet::new();
        let taint = |effect| Taint { key: "dedicated".into(), value: "gpu".into(), effect, added_at: None };
        let tolerate = |operator, value: &str, effect| Request {
            tolerations: vec![Toleration {
                key: "dedicated".into(),
                operator,
                value: value.into(),
                effect,
                toleration_seconds: None,
            }],
            ..request(100, &[])
        };
        let (no_schedule, no_execute) = ([taint(TaintEffect::NoSchedule)], [taint(TaintEffect::NoExecute)]);
        type Case<'a> = (&'a str, &'a [Taint], Request, Result<(), Rejection>);
        let cases: Vec<Case<'_>> = vec![
            ("no toleration, NoSchedule", &no_schedule, request(100, &[]), Err(Rejection::UntoleratedTaint)),
            ("no toleration, NoExecute", &no_execute, request(100, &[]), Err(Rejection::UntoleratedTaint)),
            ("Equal, same value", &no_schedule, tolerate(TolerationOperator::Equal, "gpu", None), Ok(())),
            (
                "Equal, other value",
                &no_schedule,
                tolerate(TolerationOperator::Equal, "tpu", None),
                Err(Rejection::UntoleratedTaint),
            ),
            ("Exists", &no_execute, tolerate(TolerationOperator::Exists, "", None), Ok(())),
            (
                "the other effect only",
                &no_execute,
                tolerate(TolerationOperator::Exists, "", Some(TaintEffect::NoSchedule)),
                Err(Rejection::UntoleratedTaint),
            ),
            ("an untainted node", &[], request(100, &[]), Ok(())),
        ];
        for (what, taints, req, want) in cases {
            assert_eq!(filter(&NodeView { taints, ..view("n", &none) }, &req, (1, 2)), want, "{what}");
        }
    }

    #[test]
    fn nodes_rank_by_fewest_victims_then_lowest_priority() {
        let one_high = [candidate("x", 3, 1000)];
        let two_low = [candidate("y", 0, 500), candidate("z", 0, 500)];
        assert!(victims_cost(&one_high, &[0]) < victims_cost(&two_low, &[0, 1]), "fewer victims first");
        assert!(victims_cost(&two_low, &[0]) < victims_cost(&one_high, &[0]), "then the lower priority");
    }

    #[test]
    fn a_node_that_reports_no_classes_offers_runc_only() {
        let reported = RuntimeClasses::from_reported(&[]);
        assert!(reported.contains(RuntimeClass::Runc) && !reported.contains(RuntimeClass::Gvisor));
        let reported = RuntimeClasses::from_reported(&["gvisor".into(), "kata".into()]);
        assert!(!reported.contains(RuntimeClass::Runc) && reported.contains(RuntimeClass::Gvisor));
    }

    #[test]
    fn sample_size_follows_the_kube_scheduler_rule() {
        assert_eq!(feasible_nodes_to_score(3), 100);
        assert_eq!(feasible_nodes_to_score(1000), 420);
        assert_eq!(feasible_nodes_to_score(5000), 500);
        assert_eq!(feasible_nodes_to_score(100_000), 5000);
    }
}
