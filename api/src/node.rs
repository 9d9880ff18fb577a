//! The Node object: a worker running one sbxlet, with its heartbeat state and resources.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Readiness of a node as judged by heartbeats (with hysteresis).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum NodeState {
    #[default]
    Unknown,
    Ready,
    NotReady,
}

/// Where a node registration came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum NodeSource {
    #[default]
    Api,
    Config,
}

/// What a user declares about a node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// IPv4/IPv6 address or DNS name of the node agent.
    #[serde(default)]
    pub ip: String,
    /// Port of the node agent, 1–65535.
    #[serde(default)]
    pub port: i64,
    /// Address clients outside the cluster use; overrides the agent's report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<String>,
    /// Share of capacity that may be allocated on this node (1–100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_alloc_percent: Option<i64>,
    /// Cordon (`true`) or uncordon (`false`): a cordoned node takes no new sandboxes and keeps its
    /// running ones. Absent leaves the node as it is, so re-registering never uncordons it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unschedulable: Option<bool>,
    /// The node's labels, matched by sandboxes' `node_selector` and `affinity`. Present replaces
    /// them all; absent leaves them as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// The node's taints. Present replaces them all (a taint already there keeps its `added_at`);
    /// absent leaves them as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taints: Option<Vec<crate::taints::Taint>>,
}

/// Body of `POST /api/v1/nodes`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeCreateRequest {
    #[serde(alias = "name", default)]
    pub id: String,
    #[serde(default, deserialize_with = "crate::objects_only::one")]
    pub spec: NodeSpec,
}

/// Resources reported by the agent and derived by the orchestrator.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct NodeResources {
    pub capacity_cpu_milli: u64,
    pub capacity_memory_bytes: u64,
    pub allocatable_cpu_milli: u64,
    pub allocatable_memory_bytes: u64,
    pub used_cpu_milli: u64,
    pub used_memory_bytes: u64,
    pub available_cpu_milli: u64,
    pub available_memory_bytes: u64,
    pub max_alloc_percent: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub external: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

impl NodeResources {
    /// Derives allocatable and available figures from an agent report, as semantics.md defines them.
    pub fn derive(
        capacity_cpu_milli: u64,
        capacity_memory_bytes: u64,
        used_cpu_milli: u64,
        used_memory_bytes: u64,
        max_alloc_percent: u32,
    ) -> NodeResources {
        let allocatable = |capacity: u64| (u128::from(capacity) * u128::from(max_alloc_percent) / 100) as u64;
        let allocatable_cpu_milli = allocatable(capacity_cpu_milli);
        let allocatable_memory_bytes = allocatable(capacity_memory_bytes);
        NodeResources {
            capacity_cpu_milli,
            capacity_memory_bytes,
            allocatable_cpu_milli,
            allocatable_memory_bytes,
            used_cpu_milli,
            used_memory_bytes,
            available_cpu_milli: allocatable_cpu_milli.saturating_sub(used_cpu_milli),
            available_memory_bytes: allocatable_memory_bytes.saturating_sub(used_memory_bytes),
            max_alloc_percent,
            external: String::new(),
            updated_at: None,
        }
    }
}

/// The part of a node that controllers write (`PUT /api/v1/nodes/{id}/status`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct NodeStatus {
    pub state: NodeState,
    pub last_error: String,
    pub success_streak: u32,
    pub failure_streak: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_transition_at: Option<String>,
    pub resources: NodeResources,
    /// What the agent says about its machine; the source of the well-known labels.
    #[serde(skip_serializing_if = "NodeInfo::is_empty")]
    pub node_info: NodeInfo,
}

/// The machine behind a node's agent, from its last status report.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct NodeInfo {
    pub hostname: String,
    pub arch: String,
    pub runtime: String,
    /// The runtime classes the agent can run (`runc`, `gvisor`); empty: it did not say (`runc`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runtime_classes: Vec<String>,
}

/// Well-known node labels, filled in from `NodeInfo`; they win over user labels of the same key.
pub const HOSTNAME_LABEL: &str = "sandboxd.io/hostname";
pub const ARCH_LABEL: &str = "sandboxd.io/arch";
pub const RUNTIME_LABEL: &str = "sandboxd.io/runtime";

impl NodeInfo {
    /// What an agent's status report says about its machine.
    pub fn reported(report: &crate::agent::AgentStatus) -> NodeInfo {
        NodeInfo {
            hostname: report.hostname.clone(),
            arch: report.arch.clone(),
            runtime: report.runtime.clone(),
            runtime_classes: report.runtime_classes.clone(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.hostname.is_empty() && self.arch.is_empty() && self.runtime.is_empty() && self.runtime_classes.is_empty()
    }

    /// The runtime classes the node offers (`runc` alone when it reported none).
    pub fn runtime_classes(&self) -> crate::sandbox::RuntimeClasses {
        crate::sandbox::RuntimeClasses::from_reported(&self.runtime_classes)
    }

    /// The well-known labels of the reported fields that are not empty.
    pub fn labels(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [(HOSTNAME_LABEL, &self.hostname), (ARCH_LABEL, &self.arch), (RUNTIME_LABEL, &self.runtime)]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k, v.as_str()))
    }
}

/// The default of `grace_seconds` in a drain (Kubernetes' default termination grace).
pub const DEFAULT_DRAIN_GRACE_SECONDS: i64 = 30;
/// The default of `deadline_seconds` in a drain.
pub const DEFAULT_DRAIN_DEADLINE_SECONDS: i64 = 300;
/// The longest `grace_seconds` a drain accepts.
pub const MAX_DRAIN_GRACE_SECONDS: i64 = 3_600;
/// The longest `deadline_seconds` a drain accepts.
pub const MAX_DRAIN_DEADLINE_SECONDS: i64 = 86_400;

/// Body of `POST /api/v1/nodes/{name}/drain` (every field optional; `{}` drains with the defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// How long each sandbox's containers get between SIGTERM and SIGKILL (0–3600, default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_seconds: Option<i64>,
    /// How long the drain may take: past it, a sandbox whose agent has not confirmed its stop leaves
    /// the node anyway (1–86400, default 300, or grace_seconds when that is longer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_seconds: Option<i64>,
}

impl DrainRequest {
    /// `(grace, deadline)` in seconds with the defaults filled in, or why they are refused.
    pub fn bounds(&self) -> Result<(u32, u32), String> {
        let grace = self.grace_seconds.unwrap_or(DEFAULT_DRAIN_GRACE_SECONDS);
        let deadline = self.deadline_seconds.unwrap_or(DEFAULT_DRAIN_DEADLINE_SECONDS.max(grace));
        if !(0..=MAX_DRAIN_GRACE_SECONDS).contains(&grace) {
            return Err(format!("grace_seconds: {grace} is outside 0..{MAX_DRAIN_GRACE_SECONDS}"));
        }
        if !(1..=MAX_DRAIN_DEADLINE_SECONDS).contains(&deadline) {
            return Err(format!("deadline_seconds: {deadline} is outside 1..{MAX_DRAIN_DEADLINE_SECONDS}"));
        }
        Ok((grace as u32, deadline as u32))
    }
}

/// Answer of a drain: the node, now cordoned, and the sandboxes it evicts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DrainResponse {
    pub node: Node,
    /// Sandboxes that end `Failed` with reason `Evicted`.
    pub evicted: Vec<String>,
    /// Sandboxes (`restart_policy: Reschedule`) that are placed again on another node.
    pub rescheduled: Vec<String>,
    /// When the drain gives up waiting for the node's agent.
    pub deadline_at: String,
}

/// Body of `PUT /api/v1/nodes/{id}/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeStatusUpdate {
    #[serde(default)]
    pub resource_version: Option<String>,
    pub status: NodeStatus,
}

/// A registered node as stored and returned by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Node {
    pub id: String,
    pub name: String,
    pub ip: String,
    pub port: u16,
    /// The spec's `external`, when the user set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<String>,
    /// The spec's `max_alloc_percent`, when the user set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_alloc_percent: Option<u32>,
    #[serde(default)]
    pub source: NodeSource,
    /// Cordoned: the scheduler places nothing new here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unschedulable: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<crate::taints::Taint>,
    /// Set by a drain, cleared by an uncordon: every sandbox bound here is evicted on these terms,
    /// including one bound while the drain was being posted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining: Option<crate::sandbox::PendingEviction>,
    #[serde(flatten)]
    pub status: NodeStatus,
    pub created_at: String,
    pub updated_at: String,
    pub sbxlet_base_url: String,
    #[serde(default)]
    pub resource_version: String,
}

impl Node {
    /// The base URL of the node's agent: `http://{ip}:{port}`, IPv6 in brackets.
    pub fn base_url(ip: &str, port: u16) -> String {
        if ip.contains(':') {
            format!("http://[{ip}]:{port}")
        } else {
            format!("http://{ip}:{port}")
        }
    }

    /// The spec part of the node, as a user would post it.
    pub fn spec(&self) -> NodeSpec {
        NodeSpec {
            ip: self.ip.clone(),
            port: i64::from(self.port),
            external: self.external.clone(),
            max_alloc_percent: self.max_alloc_percent.map(i64::from),
            unschedulable: self.unschedulable.then_some(true),
            labels: (!self.labels.is_empty()).then(|| self.labels.clone()),
            taints: (!self.taints.is_empty()).then(|| self.taints.clone()),
        }
    }

    /// The labels selectors and affinity match: the user's, with the well-known ones on top.
    pub fn effective_labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.labels.clone();
        for (key, value) in self.status.node_info.labels() {
            labels.insert(key.to_string(), value.to_string());
        }
        labels
    }

    /// The address clients outside the cluster use to reach this node.
    pub fn effective_external(&self) -> &str {
        match &self.external {
            Some(e) if !e.is_empty() => e,
            _ => &self.status.resources.external,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_derive_floors_allocatable_and_clamps_available() {
        let r = NodeResources::derive(4000, 16_709_799_936, 100, 134_217_728, 90);
        assert_eq!(r.allocatable_cpu_milli, 3600);
        assert_eq!(r.allocatable_memory_bytes, 15_038_819_942);
        assert_eq!(r.available_cpu_milli, 3500);
        assert_eq!(r.available_memory_bytes, 14_904_602_214);
        let over = NodeResources::derive(1000, 1000, 5000, 5000, 50);
        assert_eq!((over.available_cpu_milli, over.available_memory_bytes), (0, 0));
    }

    #[test]
    fn base_url_brackets_ipv6() {
        assert_eq!(Node::base_url("192.168.0.3", 8080), "http://192.168.0.3:8080");
        assert_eq!(Node::base_url("::1", 8080), "http://[::1]:8080");
    }

    #[test]
    fn drain_bounds_default_and_refuse_what_cannot_work() {
        assert_eq!(DrainRequest::default().bounds(), Ok((30, 300)));
        let with = |grace, deadline| DrainRequest { grace_seconds: grace, deadline_seconds: deadline }.bounds();
        assert_eq!(with(Some(0), Some(1)), Ok((0, 1)));
        assert_eq!(with(Some(600), None), Ok((600, 600)), "the default deadline is never shorter than the grace");
        assert!(with(Some(-1), None).unwrap_err().starts_with("grace_seconds"));
        assert!(with(Some(3_601), None).unwrap_err().starts_with("grace_seconds"));
        assert!(with(None, Some(0)).unwrap_err().starts_with("deadline_seconds"));
        assert_eq!(with(Some(60), Some(10)), Ok((60, 10)), "a deadline within the grace cuts waiting short");
    }
}
