//! The Sandbox object: a group of containers placed on one node, with host ports and a readiness probe.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Transport protocol of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A port the sandbox exposes; `host_port` pins the host side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub container_port: i64,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<i64>,
}

/// Protocol of a readiness probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ProbeProtocol {
    Http,
    Tcp,
}

fn default_period() -> i64 {
    10
}
fn one() -> i64 {
    1
}
fn three() -> i64 {
    3
}

/// Readiness probe; defaults are filled in at parse time so stored specs are explicit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub protocol: ProbeProtocol,
    pub port: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default)]
    pub initial_delay_seconds: i64,
    #[serde(default = "default_period")]
    pub period_seconds: i64,
    #[serde(default = "one")]
    pub timeout_seconds: i64,
    #[serde(default = "one")]
    pub success_threshold: i64,
    #[serde(default = "three")]
    pub failure_threshold: i64,
}

impl Probe {
    /// The HTTP path probed (`/` by default).
    pub fn http_path(&self) -> &str {
        self.path.as_deref().filter(|p| !p.is_empty()).unwrap_or("/")
    }
}

/// An environment variable of a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EnvVar {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

/// Resource requests of a container as quantity strings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ContainerResource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_storage: Option<String>,
}

/// One container of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub image: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "crate::objects_only::list")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub work_dir: String,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "crate::objects_only::optional")]
    pub resource: Option<ContainerResource>,
}

/// What a user declares about a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    #[serde(default)]
    pub egress: bool,
    /// Seconds after creation at which the sandbox expires; 0 or absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "crate::objects_only::list")]
    pub ports: Vec<PortSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "crate::objects_only::optional")]
    pub readiness_probe: Option<Probe>,
    #[serde(default, deserialize_with = "crate::objects_only::list")]
    pub containers: Vec<Container>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Node labels the sandbox's node must carry, each with exactly this value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Required and preferred expressions on node labels.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "crate::objects_only::optional")]
    pub affinity: Option<crate::affinity::Affinity>,
    /// The isolation the containers run under; only nodes that offer it are chosen.
    #[serde(default, skip_serializing_if = "RuntimeClass::is_default")]
    pub runtime_class: RuntimeClass,
    /// When nothing fits, the scheduler may preempt sandboxes of a lower priority (default 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    /// Taints of nodes this sandbox may be placed on, or keep running on.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "crate::objects_only::list")]
    pub tolerations: Vec<crate::taints::Toleration>,
    /// What happens when the sandbox is evicted by a drain: `Never` (it ends Failed, `Evicted`) or
    /// `Reschedule` (it is created again on another node under the same id).
    #[serde(default, skip_serializing_if = "RestartPolicy::is_default")]
    pub restart_policy: RestartPolicy,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// What a drain does to a sandbox once it has left its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum RestartPolicy {
    /// It ends `Failed` with reason `Evicted`.
    #[default]
    Never,
    /// It goes back to Pending, unbound, and the scheduler places it on another node.
    Reschedule,
}

impl RestartPolicy {
    pub fn is_default(&self) -> bool {
        *self == RestartPolicy::Never
    }
}

/// An eviction under way (a drain asked for it): the sandbox controller stops the sandbox on its
/// agent within `grace_seconds`, then fails it or, with `restart_policy: Reschedule`, places it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PendingEviction {
    /// Why, e.g. `node n1 is drained`.
    pub message: String,
    /// How long the containers get between SIGTERM and SIGKILL.
    pub grace_seconds: u32,
    /// After this time the sandbox leaves the node even if its agent never confirmed the stop.
    pub deadline_at: String,
}

/// How a sandbox's containers are isolated from the node (a Kubernetes RuntimeClass, fixed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum RuntimeClass {
    /// Namespaces, cgroups and seccomp on the node's own kernel.
    #[default]
    Runc,
    /// gVisor (`runsc`): a user-space kernel between the containers and the node's kernel.
    Gvisor,
}

impl RuntimeClass {
    pub const ALL: [RuntimeClass; 2] = [RuntimeClass::Runc, RuntimeClass::Gvisor];

    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeClass::Runc => "runc",
            RuntimeClass::Gvisor => "gvisor",
        }
    }

    pub fn parse(name: &str) -> Option<RuntimeClass> {
        RuntimeClass::ALL.into_iter().find(|c| c.as_str() == name)
    }

    pub fn is_default(&self) -> bool {
        *self == RuntimeClass::default()
    }
}

impl std::fmt::Display for RuntimeClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The runtime classes a node offers, as a set small enough to copy into every scheduling view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RuntimeClasses(u8);

impl RuntimeClasses {
    /// What a node reported; a node that reported none (an older agent) offers `runc` only. Names
    /// this build does not know are ignored.
    pub fn from_reported(names: &[String]) -> RuntimeClasses {
        if names.is_empty() {
            return RuntimeClasses::only(RuntimeClass::Runc);
        }
        names.iter().filter_map(|n| RuntimeClass::parse(n)).collect()
    }

    pub fn only(class: RuntimeClass) -> RuntimeClasses {
        RuntimeClasses(0).with(class)
    }

    pub fn with(self, class: RuntimeClass) -> RuntimeClasses {
        RuntimeClasses(self.0 | 1 << class as u8)
    }

    pub fn contains(self, class: RuntimeClass) -> bool {
        self.0 & (1 << class as u8) != 0
    }

    pub fn iter(self) -> impl Iterator<Item = RuntimeClass> {
        RuntimeClass::ALL.into_iter().filter(move |c| self.contains(*c))
    }

    /// The names an agent reports (`["runc", "gvisor"]`).
    pub fn names(self) -> Vec<String> {
        self.iter().map(|c| c.as_str().to_string()).collect()
    }
}

impl FromIterator<RuntimeClass> for RuntimeClasses {
    fn from_iter<I: IntoIterator<Item = RuntimeClass>>(classes: I) -> RuntimeClasses {
        classes.into_iter().fold(RuntimeClasses(0), RuntimeClasses::with)
    }
}

/// Lifecycle phase of a sandbox as the orchestrator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Phase {
    #[default]
    Pending,
    Scheduled,
    Creating,
    Running,
    Terminating,
    Failed,
}

impl Phase {
    /// Position in the lifecycle; phases never move to a lower rank (Failed and Terminating are terminal-ish).
    pub fn rank(self) -> u8 {
        match self {
            Phase::Pending => 0,
            Phase::Scheduled => 1,
            Phase::Creating => 2,
            Phase::Running => 3,
            Phase::Failed => 4,
            Phase::Terminating => 5,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Scheduled => "Scheduled",
            Phase::Creating => "Creating",
            Phase::Running => "Running",
            Phase::Terminating => "Terminating",
            Phase::Failed => "Failed",
        }
    }
}

/// A host port handed to one sandbox port on its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AssignedPort {
    pub host_port: u16,
    pub container_port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

/// Readiness probe bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct Readiness {
    pub success_streak: u32,
    pub failure_streak: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_probe_at: Option<String>,
    pub last_error: String,
}

/// The part of a sandbox that controllers write.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct SandboxStatus {
    pub phase: Phase,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub assigned_ports: Vec<AssignedPort>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_ip: Option<String>,
    pub ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Readiness>,
    /// The agent's own lower-case phase, as last synced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_phase: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_transition_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expire_at: Option<String>,
    /// A Failed sandbox's agent confirmed its leftovers gone: its host ports and resources are free again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
    /// Set while a drain evicts the sandbox from its node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eviction: Option<PendingEviction>,
    /// How many times a drain moved the sandbox to another node.
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub reschedules: u32,
}

impl SandboxStatus {
    /// Whether this sandbox still holds resources and host ports on its node.
    pub fn holds_node_resources(&self) -> bool {
        self.node_name.is_some() && !self.released
    }
}

/// A sandbox as stored and returned by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Sandbox {
    pub id: String,
    pub spec: SandboxSpec,
    #[serde(default)]
    pub status: SandboxStatus,
    pub created_at: String,
    pub updated_at: String,
    #[serde(default)]
    pub resource_version: String,
}

/// Body of `POST /api/v1/sandboxes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxCreateRequest {
    #[serde(alias = "name", default)]
    pub id: String,
    #[serde(deserialize_with = "crate::objects_only::one")]
    pub spec: SandboxSpec,
}

/// Body of `PUT /api/v1/sandboxes/{id}`: the whole spec, optionally guarded by `resource_version`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxUpdateRequest {
    #[serde(default)]
    pub resource_version: Option<String>,
    #[serde(deserialize_with = "crate::objects_only::one")]
    pub spec: SandboxSpec,
}

/// Body of `PUT /api/v1/sandboxes/{id}/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxStatusUpdate {
    #[serde(default)]
    pub resource_version: Option<String>,
    pub status: SandboxStatus,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_defaults_are_filled_in() {
        let p: Probe = serde_json::from_str(r#"{"protocol":"http","port":80}"#).unwrap();
        assert_eq!((p.initial_delay_seconds, p.period_seconds, p.timeout_seconds), (0, 10, 1));
        assert_eq!((p.success_threshold, p.failure_threshold), (1, 3));
        assert_eq!(p.http_path(), "/");
    }

    #[test]
    fn unknown_spec_fields_and_enum_values_are_rejected() {
        assert!(serde_json::from_str::<SandboxSpec>(r#"{"ttl_second": 5}"#).is_err());
        assert!(serde_json::from_str::<PortSpec>(r#"{"container_port":80,"protocol":"sctp"}"#).is_err());
    }

    #[test]
    fn phases_only_rank_forward_into_terminating() {
        assert!(Phase::Pending.rank() < Phase::Running.rank());
        assert!(Phase::Failed.rank() < Phase::Terminating.rank());
    }
}
