//! Node write rules: register or update (a config node stays one), status writes that never
//! re-create a deleted node, and deletes.

use super::{encode, Registry, RegistryError, RegistryResult};
use crate::store::{Kind, StoreError, Versioned};
use sandboxd_api::node::{NodeSpec, NodeStatus};
use sandboxd_api::taints::{is_system_taint, with_system_taints, Taint};
use sandboxd_api::{Node, NodeSource, NodeState};
use sandboxd_contracts::agent::AgentAddr;
use sandboxd_controllers::node::{derive_resources, Reported};

impl Registry {
    pub async fn get_node(&self, name: &str) -> RegistryResult<Versioned> {
        self.store
            .get(Kind::Nodes, name)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("node {name:?} not found")))
    }

    /// Creates the node (`true`) or updates its spec (`false`), retrying when another write intervenes.
    /// A literal `spec.ip` the agent address policy refuses is `Invalid`, with the reason.
    pub async fn register_node(
        &self,
        id: &str,
        spec: &NodeSpec,
        source: NodeSource,
    ) -> RegistryResult<(bool, Versioned)> {
        // A host name passes here; the agent client checks what it resolves to at every call.
        self.agent_policy
            .check_host(&spec.ip)
            .map_err(|refusal| RegistryError::Invalid(format!("spec.ip: {refusal}")))?;
        loop {
            let result = match self.store.get(Kind::Nodes, id).await? {
                Some(current) => self.update_node_spec(current, spec, source).await.map(|v| (false, v)),
                None => self.create_node(id, spec, source).await.map(|v| (true, v)),
            };
            match result {
                Ok(done) => return Ok(done),
                // Someone else wrote the node between our read and write: read again.
                Err(StoreError::Conflict { .. } | StoreError::AlreadyExists { .. } | StoreError::NotFound { .. }) => {
                    continue
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn create_node(&self, id: &str, spec: &NodeSpec, source: NodeSource) -> Result<Versioned, StoreError> {
        let mut node = new_node(id, spec, source, self.default_max_alloc_percent, self.clock.rfc3339_now());
        if let Some(agents) = &self.agents {
            // Best effort and bounded, so the create answer already carries resources; not a heartbeat.
            if let Ok(report) = agents.status(AgentAddr::of(&node), self.initial_status_bound).await {
                let reported = Reported::from_agent(&report, &self.clock.rfc3339_now());
                node.status.resources = derive_resources(&node, &reported, self.default_max_alloc_percent);
                node.status.node_info = sandboxd_api::node::NodeInfo::reported(&report);
            }
        }
        let json = serde_json::to_value(&node).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.store.create(Kind::Nodes, id, json).await
    }

    async fn update_node_spec(
        &self,
        current: Versioned,
        spec: &NodeSpec,
        source: NodeSource,
    ) -> Result<Versioned, StoreError> {
        let mut node: Node = current.decode()?;
        // A node the config file declares stays a config node, whoever posts it later.
        if source == NodeSource::Config {
            node.source = NodeSource::Config;
        }
        let port = spec.port as u16;
        if node.ip != spec.ip || node.port != port {
            // Heartbeats of the old address say nothing about the new one.
            node.status = NodeStatus { resources: node.status.resources.clone(), ..NodeStatus::default() };
            node.status.last_transition_at = Some(self.clock.rfc3339_now());
        }
        node.ip = spec.ip.clone();
        node.port = port;
        node.sbxlet_base_url = Node::base_url(&node.ip, node.port);
        node.external = spec.external.clone().filter(|e| !e.is_empty());
        node.max_alloc_percent = spec.max_alloc_percent.map(|p| p as u32);
        if let Some(unschedulable) = spec.unschedulable {
            node.unschedulable = unschedulable;
            if !unschedulable {
                // An uncordon ends a drain: evictions already under way go on, nothing new is evicted.
                node.draining = None;
            }
        }
        if let Some(labels) = &spec.labels {
            node.labels = labels.clone();
        }
        if let Some(taints) = &spec.taints {
            let system: Vec<Taint> = node.taints.iter().filter(|t| is_system_taint(&t.key)).cloned().collect();
            node.taints = stamped_taints(taints, &node.taints, &self.clock.rfc3339_now());
            node.taints.extend(system);
        }
        let not_ready_since = self.not_ready_since(&node.status);
        node.taints = with_system_taints(&node.taints, not_ready_since.as_deref());
        let reported = Reported::from_resources(&node.status.resources);
        node.status.resources = derive_resources(&node, &reported, self.default_max_alloc_percent);
        node.updated_at = self.clock.rfc3339_now();
        let json = serde_json::to_value(&node).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.store.update(Kind::Nodes, &current.name, json, Some(current.revision)).await
    }

    /// Writes a node's status (CAS when `expect` is set, retried otherwise); a deleted node is never re-created.
    pub async fn write_node_status(
        &self,
        name: &str,
        status: &NodeStatus,
        expect: Option<u64>,
    ) -> RegistryResult<(Versioned, Node)> {
        loop {
            let current = self.get_node(name).await?;
            let mut node: Node = current.decode()?;
            node.status = status.clone();
            node.taints = with_system_taints(&node.taints, self.not_ready_since(&node.status).as_deref());
            node.updated_at = self.clock.rfc3339_now();
            let guard = expect.or(Some(current.revision));
            match self.store.update_encoded(Kind::Nodes, name, encode(&node)?, guard).await {
                Err(StoreError::Conflict { .. }) if expect.is_none() => continue,
                // The typed copy saves in-process callers decoding what was just encoded.
                result => {
                    let stored = result?;
                    node.resource_version = stored.revision.to_string();
                    return Ok((stored, node));
                }
            }
        }
    }

    /// When a node became NotReady (its last transition), or `None` while it is not NotReady.
    fn not_ready_since(&self, status: &NodeStatus) -> Option<String> {
        (status.state == NodeState::NotReady)
            .then(|| status.last_transition_at.clone().unwrap_or_else(|| self.clock.rfc3339_now()))
    }

    pub async fn delete_node(&self, name: &str) -> RegistryResult<()> {
        self.store.delete(Kind::Nodes, name, None).await?;
        Ok(())
    }
}

/// The taints a node gets from `wanted`: each stamped with when it appeared (kept from `current`
/// when it was there already, else `now`, whatever the request said), listed once. The system's
/// taints are not the user's to set: they are left out here and kept by the caller.
fn stamped_taints(wanted: &[Taint], current: &[Taint], now: &str) -> Vec<Taint> {
    let mut taints: Vec<Taint> = Vec::with_capacity(wanted.len());
    for taint in wanted {
        if is_system_taint(&taint.key) || taints.iter().any(|t| t.same_as(taint)) {
            continue;
        }
        let added_at = current.iter().find(|t| t.same_as(taint)).and_then(|t| t.added_at.clone());
        taints.push(Taint { added_at: Some(added_at.unwrap_or_else(|| now.to_string())), ..taint.clone() });
    }
    taints
}

/// A freshly registered node: state Unknown, streaks zero, resources empty until the agent reports.
fn new_node(id: &str, spec: &NodeSpec, source: NodeSource, default_max_alloc_percent: u32, at: String) -> Node {
    let port = spec.port as u16;
    let mut node = Node {
        id: id.to_string(),
        name: id.to_string(),
        ip: spec.ip.clone(),
        port,
        external: spec.external.clone().filter(|e| !e.is_empty()),
        max_alloc_percent: spec.max_alloc_percent.map(|p| p as u32),
        source,
        unschedulable: spec.unschedulable.unwrap_or(false),
        labels: spec.labels.clone().unwrap_or_default(),
        taints: stamped_taints(spec.taints.as_deref().unwrap_or_default(), &[], &at),
        draining: None,
        status: NodeStatus::default(),
        created_at: at.clone(),
        updated_at: at,
        sbxlet_base_url: Node::base_url(&spec.ip, port),
        resource_version: String::new(),
    };
    node.status.resources = derive_resources(&node, &Reported::default(), default_max_alloc_percent);
    node
}
