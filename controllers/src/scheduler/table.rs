//! The scheduler's node table: each node's room, what bound sandboxes hold (assumed on bind, before
//! the informer shows the bind), and the host ports in use.

use super::placement::{
    choose, feasible_nodes_to_score, label_fit, name_hash, tie_seed, victims_cost, victims_on_node, Candidate,
    LabelFit, NodeView, Policy, Request, VictimsCost,
};
use sandboxd_api::affinity::Affinity;
use sandboxd_api::taints::Taint;
use sandboxd_api::{AssignedPort, Node, NodeState, Protocol, RuntimeClasses};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// What one sandbox holds on its node.
#[derive(Debug, Clone)]
struct Held {
    slot: usize,
    cpu_milli: u64,
    memory_bytes: u64,
    ports: Vec<(Protocol, u16)>,
    /// For preemption: its priority, and whether it is already on its way out.
    priority: i32,
    terminating: bool,
}

/// One node as the scheduler keeps it: the last reported figures and what is bound to it.
#[derive(Debug, Default)]
struct Slot {
    name: String,
    name_hash: u64,
    /// Still registered (a deleted node keeps its slot until its sandboxes are released).
    present: bool,
    ready: bool,
    unschedulable: bool,
    labels: BTreeMap<String, String>,
    runtime_classes: RuntimeClasses,
    taints: Vec<Taint>,
    available_cpu_milli: u64,
    available_memory_bytes: u64,
    allocatable_cpu_milli: u64,
    allocatable_memory_bytes: u64,
    bound_cpu_milli: u64,
    bound_memory_bytes: u64,
    /// Sandboxes held here.
    sandboxes: usize,
    ports: BTreeSet<(Protocol, u16)>,
}

impl Slot {
    fn view(&self) -> NodeView<'_> {
        NodeView {
            name: &self.name,
            name_hash: self.name_hash,
            ready: self.present && self.ready,
            unschedulable: self.unschedulable,
            labels: &self.labels,
            label_fit: None,
            runtime_classes: self.runtime_classes,
            taints: &self.taints,
            available_cpu_milli: self.available_cpu_milli,
            available_memory_bytes: self.available_memory_bytes,
            allocatable_cpu_milli: self.allocatable_cpu_milli,
            allocatable_memory_bytes: self.allocatable_memory_bytes,
            bound_cpu_milli: self.bound_cpu_milli,
            bound_memory_bytes: self.bound_memory_bytes,
            sandboxes: self.sandboxes,
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
    /// Slots whose node is registered, kept so a placement does not count them every time.
    present: usize,
    by_name: HashMap<String, usize>,
    held: HashMap<String, Held>,
    /// Where the next placement starts scanning, so sampled placements rotate over all nodes.
    next_start: usize,
    /// Bumped whenever a node's labels change or a node is added, so cached label fits expire.
    labels_generation: u64,
    fit_cache: LabelFitCache,
    /// How many held sandboxes have each priority, so that a placement that fails looks for
    /// victims only when some sandbox ranks below it (with every priority 0, never).
    priorities: BTreeMap<i32, usize>,
}

/// Which nodes fit the last label rules placed, filled in as nodes are scanned. Most sandboxes of
/// a workload share their selector and affinity, so a node's labels are judged once per rules and
/// label change instead of at every placement (a profile put label matching at 15 % of the server's
/// CPU in scheduling-selectors).
#[derive(Debug, Default)]
struct LabelFitCache {
    generation: u64,
    node_selector: BTreeMap<String, String>,
    affinity: Option<Affinity>,
    /// By slot; `None` until that node is scanned for these rules.
    fits: Vec<Option<LabelFit>>,
}

impl LabelFitCache {
    /// Keeps what is known when the rules and labels are the same as last time; starts over otherwise.
    fn prepare(&mut self, generation: u64, request: &Request, slots: usize) {
        let same = self.generation == generation
            && self.node_selector == request.node_selector
            && self.affinity == request.affinity;
        if !same {
            self.generation = generation;
            self.node_selector = request.node_selector.clone();
            self.affinity = request.affinity.clone();
            self.fits.clear();
        }
        self.fits.resize(slots, None);
    }

    fn fit(&mut self, slot: usize, request: &Request, labels: &BTreeMap<String, String>) -> LabelFit {
        *self.fits[slot].get_or_insert_with(|| label_fit(request, labels))
    }
}

impl AllocationIndex {
    /// Sandboxes holding resources on some node (bound, or assumed and not yet seen bound).
    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    fn slot_of(&mut self, node: &str) -> usize {
        if let Some(i) = self.by_name.get(node) {
            return *i;
        }
        self.slots.push(Slot { name: node.to_string(), name_hash: name_hash(node), ..Slot::default() });
        self.labels_generation += 1;
        self.by_name.insert(node.to_string(), self.slots.len() - 1);
        self.slots.len() - 1
    }

    /// Records a node's latest state and reported resources.
    pub fn upsert_node(&mut self, node: &Node) {
        let i = self.slot_of(&node.name);
        let r = &node.status.resources;
        let slot = &mut self.slots[i];
        if !slot.present {
            slot.present = true;
            self.present += 1;
        }
        slot.ready = node.status.state == NodeState::Ready;
        slot.unschedulable = node.unschedulable;
        let labels = node.effective_labels();
        if slot.labels != labels {
            slot.labels = labels;
            self.labels_generation += 1;
        }
        slot.runtime_classes = node.status.node_info.runtime_classes();
        slot.taints.clone_from(&node.taints);
        slot.available_cpu_milli = r.available_cpu_milli;
        slot.available_memory_bytes = r.available_memory_bytes;
        slot.allocatable_cpu_milli = r.allocatable_cpu_milli;
        slot.allocatable_memory_bytes = r.allocatable_memory_bytes;
    }

    /// A deleted node takes no new sandboxes; what its sandboxes hold is released with them.
    pub fn remove_node(&mut self, node: &str) {
        if let Some(i) = self.by_name.get(node) {
            if std::mem::replace(&mut self.slots[*i].present, false) {
                self.present -= 1;
            }
        }
    }

    /// Records that `sandbox` holds resources on `node`; idempotent.
    pub fn hold(&mut self, sandbox: &str, node: &str, cpu_milli: u64, memory_bytes: u64, ports: Vec<(Protocol, u16)>) {
        let slot = self.slot_of(node);
        if let Some(existing) = self.held.get(sandbox) {
            // The same node with other ports is a new placement (a drain rescheduled it back here).
            if existing.slot == slot && existing.ports == ports {
                return;
            }
            self.release(sandbox);
        }
        let s = &mut self.slots[slot];
        s.bound_cpu_milli += cpu_milli;
        s.bound_memory_bytes += memory_bytes;
        s.sandboxes += 1;
        s.ports.extend(ports.iter().copied());
        self.held.insert(
            sandbox.to_string(),
            Held { slot, cpu_milli, memory_bytes, ports, priority: 0, terminating: false },
        );
        *self.priorities.entry(0).or_default() += 1;
    }

    fn forget_priority(&mut self, priority: i32) {
        if let Some(n) = self.priorities.get_mut(&priority) {
            *n -= 1;
            if *n == 0 {
                self.priorities.remove(&priority);
            }
        }
    }

    /// Records what preemption needs to know of a held sandbox (nothing when it holds nothing).
    pub fn mark(&mut self, sandbox: &str, priority: i32, terminating: bool) {
        let Some(held) = self.held.get_mut(sandbox) else { return };
        let old = held.priority;
        held.priority = priority;
        held.terminating = terminating;
        if old != priority {
            self.forget_priority(old);
            *self.priorities.entry(priority).or_default() += 1;
        }
    }

    /// The node where preempting sandboxes of a lower priority lets `request` fit, with the fewest
    /// victims (then the lowest priorities; see `victims_cost`), or `None`. Victims come back in
    /// no particular order; an empty list means that room being freed already will do.
    pub fn preemption_plan(&self, request: &Request, range: (u16, u16)) -> Option<(String, Vec<String>)> {
        self.priorities.range(..request.priority).next()?;
        let mut by_slot: HashMap<usize, Vec<Candidate<'_>>> = HashMap::new();
        for (id, held) in &self.held {
            by_slot.entry(held.slot).or_default().push(Candidate {
                id,
                priority: held.priority,
                cpu_milli: held.cpu_milli,
                memory_bytes: held.memory_bytes,
                ports: &held.ports,
                terminating: held.terminating,
            });
        }
        let mut best: Option<(VictimsCost, usize, Vec<String>)> = None;
        for (slot, candidates) in &by_slot {
            let s = &self.slots[*slot];
            if !s.present {
                continue;
            }
            let Some(victims) = victims_on_node(&s.view(), request, range, candidates) else { continue };
            let cost = victims_cost(candidates, &victims);
            let better = best.as_ref().is_none_or(|(c, best_slot, _)| (cost, *slot) < (*c, *best_slot));
            if better {
                best = Some((cost, *slot, victims.iter().map(|i| candidates[*i].id.to_string()).collect()));
            }
        }
        best.map(|(_, slot, victims)| (self.slots[slot].name.clone(), victims))
    }

    /// Whether `sandbox` holds (or is assumed to hold) resources.
    pub fn holds(&self, sandbox: &str) -> bool {
        self.held.contains_key(sandbox)
    }

    /// Frees what `sandbox` held; returns whether it held anything.
    pub fn release(&mut self, sandbox: &str) -> bool {
        let Some(held) = self.held.remove(sandbox) else { return false };
        self.forget_priority(held.priority);
        let s = &mut self.slots[held.slot];
        s.bound_cpu_milli = s.bound_cpu_milli.saturating_sub(held.cpu_milli);
        s.bound_memory_bytes = s.bound_memory_bytes.saturating_sub(held.memory_bytes);
        s.sandboxes = s.sandboxes.saturating_sub(1);
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
        let sample = feasible_nodes_to_score(self.present);
        let rules = request.has_label_rules();
        if rules {
            self.fit_cache.prepare(self.labels_generation, request, n);
        }
        let (slots, cache) = (&self.slots, &mut self.fit_cache);
        let order = (start..n).chain(0..start).filter(|i| slots[*i].present).map(|i| {
            let mut view = slots[i].view();
            if rules {
                view.label_fit = Some(cache.fit(i, request, &slots[i].labels));
            }
            view
        });
        let (name, ports) = choose(order, request, policy, range, sample, tie_seed(sandbox))?;
        self.next_start = start + 1;
        let held_ports = ports.iter().map(|p| (p.protocol, p.host_port)).collect();
        self.hold(sandbox, &name, request.cpu_milli, request.memory_bytes, held_ports);
        self.mark(sandbox, request.priority, false);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::placement::test_request as request;
    use std::collections::HashSet;

    #[test]
    fn the_count_of_registered_nodes_follows_adds_updates_and_removals() {
        let mut index = AllocationIndex::default();
        let counted = |index: &AllocationIndex| index.slots.iter().filter(|s| s.present).count();
        for name in ["a", "b", "a"] {
            index.upsert_node(&ready_node(name, 1000));
        }
        assert_eq!((index.present, counted(&index)), (2, 2), "an update is not a second node");
        index.remove_node("a");
        index.remove_node("a");
        index.remove_node("never-added");
        assert_eq!((index.present, counted(&index)), (1, 1));
        index.upsert_node(&ready_node("a", 1000));
        assert_eq!((index.present, counted(&index)), (2, 2));
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

    /// The case of issue 18: 300 sandboxes of 1m on five idle 1000-core nodes used to land
    /// 90/90/90/30/0 in node-name order, because every node scored the same at 1/10,000.
    #[test]
    fn tiny_requests_spread_evenly_over_idle_nodes() {
        let mut index = AllocationIndex::default();
        for name in ["n1", "n2", "n3", "n4", "n5"] {
            index.upsert_node(&ready_node(name, 1_000_000));
        }
        let req = Request { cpu_milli: 1, memory_bytes: 1 << 20, ..Request::default() };
        let mut per_node: HashMap<String, usize> = HashMap::new();
        for i in 0..300 {
            let (node, _) = index.place(&format!("s{i}"), &req, Policy::Spread, (10000, 19999)).unwrap();
            *per_node.entry(node).or_default() += 1;
        }
        let mut counts: Vec<usize> = per_node.values().copied().collect();
        counts.sort();
        assert_eq!(counts, [60, 60, 60, 60, 60], "{per_node:?}");
    }

    #[test]
    fn a_cordoned_node_takes_nothing_new_and_uncordoned_takes_again() {
        let mut index = AllocationIndex::default();
        let mut node = ready_node("a", 3600);
        index.upsert_node(&node);
        index.place("before", &request(10, &[]), Policy::Spread, (1, 2)).unwrap();
        node.unschedulable = true;
        index.upsert_node(&node);
        let refused = index.place("during", &request(10, &[]), Policy::Spread, (1, 2)).unwrap_err();
        assert_eq!(refused, "0/1 nodes available: 1 unschedulable (cordoned)");
        assert!(index.holds("before"), "what runs there stays");
        node.unschedulable = false;
        index.upsert_node(&node);
        assert!(index.place("after", &request(10, &[]), Policy::Spread, (1, 2)).is_ok());
    }

    #[test]
    fn label_fits_are_judged_again_after_a_label_change() {
        let mut index = AllocationIndex::default();
        let mut node = ready_node("a", 3600);
        index.upsert_node(&node);
        let wants_gpu = Request { node_selector: [("gpu".to_string(), "yes".to_string())].into(), ..request(10, &[]) };
        let refused = index.place("s0", &wants_gpu, Policy::Spread, (1, 2)).unwrap_err();
        assert_eq!(refused, "0/1 nodes available: 1 node selector mismatch");
        node.labels = [("gpu".to_string(), "yes".to_string())].into();
        index.upsert_node(&node);
        assert!(index.place("s1", &wants_gpu, Policy::Spread, (1, 2)).is_ok(), "the cached mismatch expired");
        index.upsert_node(&ready_node("b", 3600));
        node.labels.clear();
        index.upsert_node(&node);
        let refused = index.place("s2", &wants_gpu, Policy::Spread, (1, 2)).unwrap_err();
        assert_eq!(refused, "0/2 nodes available: 2 node selector mismatch");
    }

    #[test]
    fn a_preemption_plan_picks_the_node_with_the_fewest_victims_and_waits_for_terminating_ones() {
        let mut index = AllocationIndex::default();
        for name in ["a", "b"] {
            index.upsert_node(&ready_node(name, 1000));
        }
        // a: two small priority-0 sandboxes; b: one big priority-1 one. Both full.
        index.hold("a1", "a", 500, 0, vec![]);
        index.hold("a2", "a", 500, 0, vec![]);
        index.hold("b1", "b", 1000, 0, vec![]);
        index.mark("b1", 1, false);
        let high = Request { priority: 5, ..request(800, &[]) };
        assert_eq!(index.preemption_plan(&high, (1, 2)), Some(("b".to_string(), vec!["b1".to_string()])));
        let low = Request { priority: 0, ..request(800, &[]) };
        assert_eq!(index.preemption_plan(&low, (1, 2)), None, "priority 0 preempts nothing");
        index.mark("b1", 1, true);
        assert_eq!(index.preemption_plan(&high, (1, 2)), Some(("b".to_string(), vec![])), "b1 is leaving already");
        index.release("b1");
        index.release("a1");
        index.release("a2");
        assert!(index.priorities.is_empty(), "released sandboxes leave no count behind");
    }

    #[test]
    fn removed_nodes_take_nothing_new() {
        let mut index = AllocationIndex::default();
        index.upsert_node(&ready_node("a", 3600));
        index.remove_node("a");
        assert!(index.place("s", &request(10, &[]), Policy::Spread, (1, 2)).is_err());
    }
}
