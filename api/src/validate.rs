//! Validation of user-submitted specs, reporting every violated rule with its field path.

use crate::names::name_problem;
use crate::node::NodeSpec;
use crate::quantity::{parse_bytes, parse_cpu_milli};
use crate::sandbox::{Probe, Protocol, SandboxSpec};
use crate::syntax::{image_problem, is_env_name, is_printable, label_key_problem, label_value_problem, shown};
use std::collections::HashSet;
use std::fmt;

/// One violated rule: `spec.containers[1].name: duplicate "a"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every rule a submission broke, in field order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldErrors(pub Vec<FieldError>);

impl FieldErrors {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError { path: path.into(), message: message.into() });
    }

    fn into_result(self) -> Result<(), FieldErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FieldErrors {}

/// Limits and defaults from configuration that validation and request sums need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPolicy {
    pub max_ttl_seconds: i64,
    pub default_cpu_milli: u64,
    pub default_memory_bytes: u64,
    /// Where a pinned `host_port` must lie (the orchestrator's `host_port_range`); `None` on agents,
    /// which take whatever port the orchestrator chose.
    pub host_port_range: Option<(u16, u16)>,
}

impl Default for SandboxPolicy {
    fn default() -> Self {
        SandboxPolicy {
            max_ttl_seconds: 86_400,
            default_cpu_milli: 100,
            default_memory_bytes: 128 << 20,
            host_port_range: None,
        }
    }
}

/// Most containers in one sandbox.
pub const MAX_CONTAINERS: usize = 32;
/// Most ports one sandbox publishes.
pub const MAX_PORTS: usize = 100;
/// Most environment variables, and most arguments, of one container.
pub const MAX_ENV: usize = 512;
pub const MAX_ARGS: usize = 1024;
/// Most labels on one object.
pub const MAX_LABELS: usize = 64;
/// Largest spec, encoded as JSON.
pub const MAX_SPEC_BYTES: usize = 256 * 1024;

/// Checks an object name (`id`) against the DNS-label rules.
/// Page size of a list that names no `limit`.
pub const DEFAULT_PAGE: usize = 100;
/// Largest page a list may ask for.
pub const MAX_PAGE: usize = 1000;

/// The one page-size rule of every paged list (the API's and the agent's): default 100, at most 1000.
pub fn page_limit(limit: Option<usize>) -> Result<usize, String> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(n) => Err(format!("limit: {n} is not in 1-{MAX_PAGE}")),
    }
}

pub fn validate_name(path: &str, name: &str) -> Result<(), FieldErrors> {
    let mut errors = FieldErrors::default();
    if let Some(problem) = name_problem(name) {
        errors.push(path, problem);
    }
    errors.into_result()
}

/// Checks a node spec: address and port.
pub fn validate_node_spec(spec: &NodeSpec) -> Result<(), FieldErrors> {
    let mut errors = FieldErrors::default();
    if spec.ip.is_empty() {
        errors.push("spec.ip", "required");
    } else if !is_ip_or_dns_name(&spec.ip) {
        errors.push("spec.ip", format!("{:?} is not an IP address or DNS name", spec.ip));
    }
    if !(1..=65535).contains(&spec.port) {
        errors.push("spec.port", format!("{} is not in 1-65535", spec.port));
    }
    if let Some(p) = spec.max_alloc_percent {
        if !(1..=100).contains(&p) {
            errors.push("spec.max_alloc_percent", format!("{p} is not in 1-100"));
        }
    }
    if let Some(e) = &spec.external {
        if !e.is_empty() && !is_ip_or_dns_name(e) {
            errors.push("spec.external", format!("{e:?} is not an IP address or DNS name"));
        }
    }
    if let Some(labels) = &spec.labels {
        validate_labels("spec.labels", labels, &mut errors);
    }
    if let Some(taints) = &spec.taints {
        validate_taints(taints, &mut errors);
    }
    errors.into_result()
}

/// The most taints on a node, and tolerations on a sandbox.
pub const MAX_TAINTS: usize = 32;

/// The longest `toleration_seconds`: a year.
pub const MAX_TOLERATION_SECONDS: i64 = 365 * 24 * 3600;

fn validate_taints(taints: &[crate::taints::Taint], errors: &mut FieldErrors) {
    if taints.len() > MAX_TAINTS {
        errors.push("spec.taints", format!("{} taints is more than {MAX_TAINTS}", taints.len()));
        return;
    }
    for (i, taint) in taints.iter().enumerate() {
        if let Some(problem) = label_key_problem(&taint.key).or_else(|| label_value_problem(&taint.value)) {
            errors.push(format!("spec.taints[{i}]"), problem);
        }
    }
}

/// Syntax and bounds only, so that the OpenAPI schema can say all of it: an empty key (which only
/// `Exists` makes useful), a value under `Exists`, and `toleration_seconds` on a NoSchedule
/// toleration are accepted and mean nothing, as Kubernetes ignores the last.
fn validate_tolerations(tolerations: &[crate::taints::Toleration], errors: &mut FieldErrors) {
    if tolerations.len() > MAX_TAINTS {
        errors.push("spec.tolerations", format!("{} tolerations is more than {MAX_TAINTS}", tolerations.len()));
        return;
    }
    for (i, t) in tolerations.iter().enumerate() {
        let at = format!("spec.tolerations[{i}]");
        let key_problem = if t.key.is_empty() { None } else { label_key_problem(&t.key) };
        if let Some(problem) = key_problem.or_else(|| label_value_problem(&t.value)) {
            errors.push(at.clone(), problem);
        }
        if let Some(seconds) = t.toleration_seconds {
            if !(0..=MAX_TOLERATION_SECONDS).contains(&seconds) {
                errors.push(at, format!("toleration_seconds {seconds} is not in 0-{MAX_TOLERATION_SECONDS}"));
            }
        }
    }
}

pub fn is_ip_or_dns_name(s: &str) -> bool {
    if s.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    // A dotted string of digits that is not a valid IP is a typo, not a host name.
    if s.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The largest priority a user may give (as Kubernetes bounds user priority classes).
pub const MAX_PRIORITY: i32 = 1_000_000_000;

/// Checks a sandbox spec against every rule of semantics.md.
pub fn validate_sandbox_spec(spec: &SandboxSpec, policy: &SandboxPolicy) -> Result<(), FieldErrors> {
    let mut errors = FieldErrors::default();
    let size = serde_json::to_vec(spec).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > MAX_SPEC_BYTES {
        // Each rule below would report on a huge spec at length: the size alone is the answer.
        errors.push("spec", format!("{size} bytes encoded is more than {MAX_SPEC_BYTES}"));
        return errors.into_result();
    }
    validate_containers(spec, &mut errors);
    validate_ports(spec, policy, &mut errors);
    if let Some(ttl) = spec.ttl_seconds {
        if ttl < 0 {
            errors.push("spec.ttl_seconds", format!("{ttl} must not be negative"));
        } else if ttl > policy.max_ttl_seconds {
            errors.push("spec.ttl_seconds", format!("{ttl} exceeds the maximum of {}", policy.max_ttl_seconds));
        }
    }
    if let Some(probe) = &spec.readiness_probe {
        validate_probe(probe, spec, &mut errors);
    }
    if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&spec.priority) {
        errors.push("spec.priority", format!("{} is outside -{MAX_PRIORITY}..{MAX_PRIORITY}", spec.priority));
    }
    validate_labels("spec.labels", &spec.labels, &mut errors);
    validate_labels("spec.node_selector", &spec.node_selector, &mut errors);
    validate_tolerations(&spec.tolerations, &mut errors);
    if let Some(affinity) = &spec.affinity {
        validate_affinity(affinity, &mut errors);
    }
    errors.into_result()
}

/// Affinity expressions: label-syntax keys and values, values only where the operator compares
/// them, weights 1–100, and bounded counts.
fn validate_affinity(affinity: &crate::affinity::Affinity, errors: &mut FieldErrors) {
    use crate::affinity::MAX_EXPRESSIONS;
    let at = "spec.affinity";
    for (list, len) in [("required", affinity.required.len()), ("preferred", affinity.preferred.len())] {
        if len > MAX_EXPRESSIONS {
            errors.push(format!("{at}.{list}"), format!("{len} expressions is more than {MAX_EXPRESSIONS}"));
            return;
        }
    }
    let required = affinity.required.iter().enumerate().map(|(i, e)| (format!("{at}.required[{i}]"), e));
    let preferred =
        affinity.preferred.iter().enumerate().map(|(i, p)| (format!("{at}.preferred[{i}].expression"), &p.expression));
    for (path, expression) in required.chain(preferred) {
        validate_expression(&path, expression, errors);
    }
    for (i, p) in affinity.preferred.iter().enumerate() {
        if !(1..=100).contains(&p.weight) {
            errors.push(format!("{at}.preferred[{i}].weight"), format!("{} is not in 1-100", p.weight));
        }
    }
}

fn validate_expression(path: &str, e: &crate::affinity::Expression, errors: &mut FieldErrors) {
    use crate::affinity::{Operator, MAX_VALUES};
    if let Some(problem) = label_key_problem(&e.key) {
        errors.push(format!("{path}.key"), problem);
    }
    match e.operator {
        Operator::Exists if !e.values.is_empty() => errors.push(format!("{path}.values"), "must be empty for Exists"),
        Operator::In | Operator::NotIn if e.values.is_empty() => {
            errors.push(format!("{path}.values"), "at least one value is required for In and NotIn")
        }
        _ => {}
    }
    if e.values.len() > MAX_VALUES {
        errors.push(format!("{path}.values"), format!("{} values is more than {MAX_VALUES}", e.values.len()));
    } else if let Some(problem) = e.values.iter().find_map(|v| label_value_problem(v)) {
        errors.push(format!("{path}.values"), problem);
    }
}

/// Label keys and values by Kubernetes' rules, at most `MAX_LABELS` of them.
pub fn validate_labels(at: &str, labels: &std::collections::BTreeMap<String, String>, errors: &mut FieldErrors) {
    if labels.len() > MAX_LABELS {
        errors.push(at, format!("{} labels is more than {MAX_LABELS}", labels.len()));
        return;
    }
    for (key, value) in labels {
        if let Some(problem) = label_key_problem(key).or_else(|| label_value_problem(value)) {
            errors.push(at, problem);
        }
    }
}

fn validate_containers(spec: &SandboxSpec, errors: &mut FieldErrors) {
    if spec.containers.is_empty() {
        errors.push("spec.containers", "at least one container is required");
    }
    if spec.containers.len() > MAX_CONTAINERS {
        errors.push("spec.containers", format!("{} containers is more than {MAX_CONTAINERS}", spec.containers.len()));
        return;
    }
    let mut seen = HashSet::new();
    for (i, c) in spec.containers.iter().enumerate() {
        let at = format!("spec.containers[{i}]");
        if let Some(problem) = name_problem(&c.name) {
            errors.push(format!("{at}.name"), problem);
        } else if !seen.insert(c.name.as_str()) {
            errors.push(format!("{at}.name"), format!("duplicate {:?}", c.name));
        }
        if let Some(problem) = image_problem(&c.image) {
            errors.push(format!("{at}.image"), problem);
        }
        if c.env.len() > MAX_ENV {
            errors.push(format!("{at}.env"), format!("{} variables is more than {MAX_ENV}", c.env.len()));
        }
        for (j, env) in c.env.iter().enumerate().take(MAX_ENV) {
            if !is_env_name(&env.name) {
                errors.push(format!("{at}.env[{j}].name"), format!("{} is not a C identifier", shown(&env.name)));
            }
            if !is_printable(&env.value, true) {
                errors.push(format!("{at}.env[{j}].value"), "control characters other than tab and newline");
            }
        }
        if c.args.len() > MAX_ARGS {
            errors.push(format!("{at}.args"), format!("{} arguments is more than {MAX_ARGS}", c.args.len()));
        }
        if let Some(j) = c.args.iter().position(|a| !is_printable(a, true)) {
            errors.push(format!("{at}.args[{j}]"), "control characters other than tab and newline");
        }
        if !c.work_dir.is_empty() && (!c.work_dir.starts_with('/') || !is_printable(&c.work_dir, false)) {
            errors.push(format!("{at}.work_dir"), format!("{} must be an absolute path", shown(&c.work_dir)));
        }
        let Some(r) = &c.resource else { continue };
        if let Some(cpu) = &r.cpu {
            check_positive(errors, format!("{at}.resource.cpu"), cpu, parse_cpu_milli(cpu));
        }
        if let Some(mem) = &r.memory {
            check_positive(errors, format!("{at}.resource.memory"), mem, parse_bytes(mem));
        }
        if let Some(eph) = &r.ephemeral_storage {
            check_positive(errors, format!("{at}.resource.ephemeral_storage"), eph, parse_bytes(eph));
        }
    }
}

fn check_positive<E: fmt::Display>(errors: &mut FieldErrors, path: String, raw: &str, parsed: Result<u64, E>) {
    match parsed {
        Err(e) => errors.push(path, e.to_string()),
        Ok(0) => errors.push(path, format!("{raw:?} must be greater than zero")),
        Ok(_) => {}
    }
}

fn validate_ports(spec: &SandboxSpec, policy: &SandboxPolicy, errors: &mut FieldErrors) {
    if spec.ports.len() > MAX_PORTS {
        errors.push("spec.ports", format!("{} ports is more than {MAX_PORTS}", spec.ports.len()));
        return;
    }
    let mut seen: HashSet<(Protocol, i64)> = HashSet::new();
    let mut pinned: HashSet<(Protocol, i64)> = HashSet::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let at = format!("spec.ports[{i}]");
        if !(1..=65535).contains(&p.container_port) {
            errors.push(format!("{at}.container_port"), format!("{} is not in 1-65535", p.container_port));
        } else if !seen.insert((p.protocol, p.container_port)) {
            errors.push(
                format!("{at}.container_port"),
                format!("duplicate {}/{}", p.container_port, p.protocol.as_str()),
            );
        }
        if let Some(h) = p.host_port {
            let range = policy.host_port_range.map_or(1..=65535, |(low, high)| i64::from(low)..=i64::from(high));
            if !range.contains(&h) {
                errors.push(format!("{at}.host_port"), format!("{h} is not in {}-{}", range.start(), range.end()));
            } else if !pinned.insert((p.protocol, h)) {
                errors.push(format!("{at}.host_port"), format!("duplicate {h}/{}", p.protocol.as_str()));
            }
        }
    }
}

fn validate_probe(probe: &Probe, spec: &SandboxSpec, errors: &mut FieldErrors) {
    let at = "spec.readiness_probe";
    if !spec.ports.iter().any(|p| p.container_port == probe.port) {
        errors.push(format!("{at}.port"), format!("{} is not a container port in spec.ports", probe.port));
    } else if !spec.ports.iter().any(|p| p.container_port == probe.port && p.protocol == Protocol::Tcp) {
        errors.push(format!("{at}.port"), format!("{} is not a tcp port: probes connect over tcp", probe.port));
    }
    if probe.path.is_some() && probe.protocol == crate::sandbox::ProbeProtocol::Tcp {
        errors.push(format!("{at}.path"), "only http probes take a path");
    }
    if let Some(path) = &probe.path {
        if !is_printable(path, false) || path.contains(' ') {
            errors.push(format!("{at}.path"), "must be a URL path without spaces or control characters");
        } else if !path.is_empty() && !path.starts_with('/') {
            errors.push(format!("{at}.path"), format!("{path:?} must start with '/'"));
        }
    }
    let bounds = [
        ("initial_delay_seconds", probe.initial_delay_seconds, 0),
        ("period_seconds", probe.period_seconds, 1),
        ("timeout_seconds", probe.timeout_seconds, 1),
        ("success_threshold", probe.success_threshold, 1),
        ("failure_threshold", probe.failure_threshold, 1),
    ];
    for (field, value, min) in bounds {
        if value < min {
            errors.push(format!("{at}.{field}"), format!("{value} must be at least {min}"));
        } else if value > 86_400 {
            errors.push(format!("{at}.{field}"), format!("{value} must be at most 86400"));
        }
    }
}

/// Total CPU (millicores) and memory (bytes) a sandbox requests; containers without `resource` use the defaults.
///
/// Call only on a validated spec: unparsable quantities count as the defaults.
pub fn sandbox_requests(spec: &SandboxSpec, policy: &SandboxPolicy) -> (u64, u64) {
    spec.containers.iter().fold((0u64, 0u64), |(cpu, mem), c| {
        let (c_cpu, c_mem) = container_requests(c, policy);
        (cpu.saturating_add(c_cpu), mem.saturating_add(c_mem))
    })
}

/// CPU (millicores) and memory (bytes) one container requests, or the defaults (a node agent turns
/// these into the container's cgroup limits).
pub fn container_requests(container: &crate::sandbox::Container, policy: &SandboxPolicy) -> (u64, u64) {
    let r = container.resource.as_ref();
    let cpu =
        r.and_then(|r| r.cpu.as_deref()).and_then(|q| parse_cpu_milli(q).ok()).unwrap_or(policy.default_cpu_milli);
    let memory =
        r.and_then(|r| r.memory.as_deref()).and_then(|q| parse_bytes(q).ok()).unwrap_or(policy.default_memory_bytes);
    (cpu, memory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::affinity::{Affinity, Expression, Operator, Preference};
    use crate::sandbox::{Container, ContainerResource, EnvVar, PortSpec, ProbeProtocol};

    fn container(name: &str) -> Container {
        Container {
            name: name.into(),
            image: "nginx:latest".into(),
            args: vec![],
            env: vec![],
            work_dir: String::new(),
            resource: None,
        }
    }

    fn spec() -> SandboxSpec {
        SandboxSpec { containers: vec![container("web")], ..Default::default() }
    }

    fn port(container_port: i64) -> PortSpec {
        PortSpec { container_port, protocol: Protocol::Tcp, host_port: None }
    }

    fn probe(port: i64) -> Probe {
        Probe {
            protocol: ProbeProtocol::Http,
            port,
            path: None,
            initial_delay_seconds: 0,
            period_seconds: 10,
            timeout_seconds: 1,
            success_threshold: 1,
            failure_threshold: 3,
        }
    }

    /// The orchestrator's policy: pinned host ports must lie in 10000-19999.
    fn policy() -> SandboxPolicy {
        SandboxPolicy { host_port_range: Some((10_000, 19_999)), ..SandboxPolicy::default() }
    }

    fn messages(spec: &SandboxSpec) -> Vec<String> {
        match validate_sandbox_spec(spec, &policy()) {
            Ok(()) => vec![],
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn a_minimal_spec_is_valid() {
        assert_eq!(messages(&spec()), Vec::<String>::new());
    }

    fn affinity_with(operator: Operator, values: &[&str]) -> Affinity {
        let expression =
            Expression { key: "zone".into(), operator, values: values.iter().map(|v| v.to_string()).collect() };
        Affinity { required: vec![expression], preferred: vec![] }
    }

    #[test]
    fn every_violated_rule_is_reported_with_its_path() {
        type Case = (&'static str, fn(&mut SandboxSpec), &'static str);
        let cases: Vec<Case> = vec![
            ("no containers", |s| s.containers.clear(), "spec.containers: at least one container is required"),
            (
                "selector key not a label key",
                |s| s.node_selector = [("-zone".to_string(), "eu".to_string())].into(),
                "spec.node_selector: key \"-zone\": the name must be 1-63 characters, alphanumerics with '-', '_' or '.' inside",
            ),
            (
                "In without values",
                |s| s.affinity = Some(affinity_with(Operator::In, &[])),
                "spec.affinity.required[0].values: at least one value is required for In and NotIn",
            ),
            (
                "Exists with values",
                |s| s.affinity = Some(affinity_with(Operator::Exists, &["x"])),
                "spec.affinity.required[0].values: must be empty for Exists",
            ),
            (
                "value not a label value",
                |s| s.affinity = Some(affinity_with(Operator::NotIn, &["a b"])),
                "spec.affinity.required[0].values: value \"a b\": must be at most 63 characters, alphanumerics with '-', '_' or '.' inside",
            ),
            (
                "preference weight out of range",
                |s| {
                    let expression = affinity_with(Operator::Exists, &[]).required.remove(0);
                    s.affinity = Some(Affinity { required: vec![], preferred: vec![Preference { weight: 0, expression }] });
                },
                "spec.affinity.preferred[0].weight: 0 is not in 1-100",
            ),
            ("duplicate name", |s| s.containers.push(container("web")), "spec.containers[1].name: duplicate \"web\""),
            (
                "bad name",
                |s| s.containers[0].name = "Web_1".into(),
                "spec.containers[0].name: \"Web_1\" may contain only lowercase letters, digits, '-' and '.'",
            ),
            ("empty image", |s| s.containers[0].image = " ".into(), "spec.containers[0].image: required"),
            (
                "escape in image",
                |s| s.containers[0].image = "busy\u{1b}[2Jbox".into(),
                "spec.containers[0].image: \"busy\\u{1b}[2Jbox\": path components are lower-case letters and digits, separated by '.', '_', '__' or '-'",
            ),
            (
                "env name not an identifier",
                |s| s.containers[0].env = vec![EnvVar { name: "A-B".into(), value: String::new() }],
                "spec.containers[0].env[0].name: \"A-B\" is not a C identifier",
            ),
            (
                "escape in an argument",
                |s| s.containers[0].args = vec!["ok".into(), "\u{1b}]0;pwned\u{7}".into()],
                "spec.containers[0].args[1]: control characters other than tab and newline",
            ),
            (
                "relative work dir",
                |s| s.containers[0].work_dir = "srv".into(),
                "spec.containers[0].work_dir: \"srv\" must be an absolute path",
            ),
            (
                "label key with an escape",
                |s| {
                    s.labels.insert("a\u{1b}b".into(), "v".into());
                },
                "spec.labels: key \"a\\u{1b}b\": the name must be 1-63 characters, alphanumerics with '-', '_' or '.' inside",
            ),
            (
                "label value too long",
                |s| {
                    s.labels.insert("tier".into(), "v".repeat(64));
                },
                "spec.labels: value \"vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv\": must be at most 63 characters, alphanumerics with '-', '_' or '.' inside",
            ),
            (
                "too many containers",
                |s| s.containers = (0..MAX_CONTAINERS + 1).map(|i| container(&format!("c{i}"))).collect(),
                "spec.containers: 33 containers is more than 32",
            ),
            (
                "too many ports",
                |s| s.ports = (1..=MAX_PORTS as i64 + 1).map(port).collect(),
                "spec.ports: 101 ports is more than 100",
            ),
            (
                "pinned host port outside the range",
                |s| s.ports = vec![PortSpec { host_port: Some(22), ..port(80) }],
                "spec.ports[0].host_port: 22 is not in 10000-19999",
            ),
            (
                "a huge spec",
                |s| {
                    s.containers[0].args = vec!["x".repeat(MAX_SPEC_BYTES)];
                },
                "spec: 262225 bytes encoded is more than 262144",
            ),
            (
                "bad cpu",
                |s| s.containers[0].resource = Some(ContainerResource { cpu: Some("2x".into()), ..Default::default() }),
                "spec.containers[0].resource.cpu: invalid quantity \"2x\"",
            ),
            (
                "zero memory",
                |s| {
                    s.containers[0].resource =
                        Some(ContainerResource { memory: Some("0".into()), ..Default::default() })
                },
                "spec.containers[0].resource.memory: \"0\" must be greater than zero",
            ),
            (
                "bad storage",
                |s| {
                    s.containers[0].resource =
                        Some(ContainerResource { ephemeral_storage: Some("1.5.5".into()), ..Default::default() })
                },
                "spec.containers[0].resource.ephemeral_storage: invalid quantity \"1.5.5\"",
            ),
            ("port zero", |s| s.ports.push(port(0)), "spec.ports[0].container_port: 0 is not in 1-65535"),
            ("port too big", |s| s.ports.push(port(70000)), "spec.ports[0].container_port: 70000 is not in 1-65535"),
            (
                "duplicate port",
                |s| s.ports = vec![port(80), port(80)],
                "spec.ports[1].container_port: duplicate 80/tcp",
            ),
            ("negative ttl", |s| s.ttl_seconds = Some(-1), "spec.ttl_seconds: -1 must not be negative"),
            ("ttl over max", |s| s.ttl_seconds = Some(86_401), "spec.ttl_seconds: 86401 exceeds the maximum of 86400"),
            (
                "probe on unknown port",
                |s| s.readiness_probe = Some(probe(80)),
                "spec.readiness_probe.port: 80 is not a container port in spec.ports",
            ),
            (
                "probe zero period",
                |s| {
                    s.ports.push(port(80));
                    s.readiness_probe = Some(Probe { period_seconds: 0, ..probe(80) });
                },
                "spec.readiness_probe.period_seconds: 0 must be at least 1",
            ),
            (
                "probe zero threshold",
                |s| {
                    s.ports.push(port(80));
                    s.readiness_probe = Some(Probe { success_threshold: 0, ..probe(80) });
                },
                "spec.readiness_probe.success_threshold: 0 must be at least 1",
            ),
            (
                "probe on a udp port",
                |s| {
                    s.ports.push(PortSpec { protocol: Protocol::Udp, ..port(53) });
                    s.readiness_probe = Some(Probe { protocol: ProbeProtocol::Tcp, ..probe(53) });
                },
                "spec.readiness_probe.port: 53 is not a tcp port: probes connect over tcp",
            ),
            (
                "tcp probe with path",
                |s| {
                    s.ports.push(port(80));
                    s.readiness_probe =
                        Some(Probe { protocol: ProbeProtocol::Tcp, path: Some("/".into()), ..probe(80) });
                },
                "spec.readiness_probe.path: only http probes take a path",
            ),
        ];
        for (what, mutate, want) in cases {
            let mut s = spec();
            mutate(&mut s);
            assert_eq!(messages(&s), vec![want.to_string()], "case {what}");
        }
    }

    #[test]
    fn agents_take_any_pinned_port_and_the_orchestrator_only_its_range() {
        let mut s = spec();
        s.ports = vec![PortSpec { host_port: Some(22), ..port(80) }];
        assert!(validate_sandbox_spec(&s, &SandboxPolicy::default()).is_ok(), "agents have no range");
        s.ports[0].host_port = Some(10_000);
        assert!(validate_sandbox_spec(&s, &policy()).is_ok());
    }

    #[test]
    fn several_violations_are_all_reported() {
        let mut s = spec();
        s.containers.push(container("web"));
        s.ttl_seconds = Some(-5);
        s.ports.push(port(0));
        let got = messages(&s);
        assert_eq!(got.len(), 3, "{got:?}");
        let joined = validate_sandbox_spec(&s, &SandboxPolicy::default()).unwrap_err().to_string();
        assert!(joined.contains("; "), "{joined}");
    }

    #[test]
    fn same_port_number_on_two_protocols_is_allowed() {
        let mut s = spec();
        s.ports = vec![port(53), PortSpec { protocol: Protocol::Udp, ..port(53) }];
        assert_eq!(messages(&s), Vec::<String>::new());
    }

    #[test]
    fn node_spec_rules() {
        let ok = NodeSpec { ip: "127.0.1.5".into(), port: 8080, ..Default::default() };
        assert!(validate_node_spec(&ok).is_ok());
        assert!(validate_node_spec(&NodeSpec { ip: "::1".into(), ..ok.clone() }).is_ok());
        assert!(validate_node_spec(&NodeSpec { ip: "worker-1.example".into(), ..ok.clone() }).is_ok());
        let cases = [
            (NodeSpec { ip: String::new(), ..ok.clone() }, "spec.ip: required"),
            (
                NodeSpec { ip: "300.1.1.1".into(), ..ok.clone() },
                "spec.ip: \"300.1.1.1\" is not an IP address or DNS name",
            ),
            (
                NodeSpec { ip: "bad host".into(), ..ok.clone() },
                "spec.ip: \"bad host\" is not an IP address or DNS name",
            ),
            (NodeSpec { port: 0, ..ok.clone() }, "spec.port: 0 is not in 1-65535"),
            (NodeSpec { port: 65536, ..ok.clone() }, "spec.port: 65536 is not in 1-65535"),
            (NodeSpec { max_alloc_percent: Some(0), ..ok.clone() }, "spec.max_alloc_percent: 0 is not in 1-100"),
        ];
        for (spec, want) in cases {
            assert_eq!(validate_node_spec(&spec).unwrap_err().to_string(), want);
        }
    }

    #[test]
    fn requests_sum_containers_and_apply_defaults() {
        let mut s = spec();
        s.containers[0].resource =
            Some(ContainerResource { cpu: Some("200m".into()), memory: Some("256Mi".into()), ephemeral_storage: None });
        s.containers.push(container("sidecar"));
        assert_eq!(sandbox_requests(&s, &SandboxPolicy::default()), (300, (256 + 128) << 20));
    }
}
