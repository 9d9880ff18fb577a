//! The simulated runtime of one agent: the sandboxes it holds, with their addresses, host ports and resource use.

pub mod ip_pool;
pub mod logs;
pub mod phase;

pub use crate::error::RuntimeError;
use crate::ports::{PortUnavailable, PublishedPort};
use ip_pool::IpPool;
use phase::{container_in, phase_at};
use sandboxd_api::agent::{
    AgentCreateRequest, AgentLogs, AgentPhase, AgentSandbox, AgentSandboxList, AgentStatus, LogLines,
};
use sandboxd_api::validate::{sandbox_requests, validate_name, validate_sandbox_spec, SandboxPolicy};
use sandboxd_api::{FieldErrors, PortSpec, Protocol, RuntimeClasses, SandboxSpec};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::ops::Bound;
use std::time::{Duration, Instant};

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

pub use crate::backend::Created;

/// Capacity and timing of a runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeLimits {
    pub capacity_cpu_milli: u64,
    pub capacity_memory_bytes: u64,
    pub create_delay: Duration,
    /// The runtime classes this simulated node claims to run.
    pub classes: RuntimeClasses,
}

/// One sandbox the agent holds.
#[derive(Debug)]
struct HeldSandbox {
    request: AgentCreateRequest,
    private_ip: Ipv4Addr,
    created: Instant,
    created_at: String,
    cpu_milli: u64,
    memory_bytes: u64,
    failure: Option<String>,
    listeners: Vec<PublishedPort>,
}

/// Every sandbox one agent holds, ordered by id.
#[derive(Debug)]
pub struct Runtime {
    limits: RuntimeLimits,
    pool: IpPool,
    sandboxes: BTreeMap<String, HeldSandbox>,
    used_cpu_milli: u64,
    used_memory_bytes: u64,
}

// === impl Runtime ===

impl Runtime {
    /// An empty runtime handing out addresses from `pool`.
    pub fn new(limits: RuntimeLimits, pool: IpPool) -> Runtime {
        Runtime { limits, pool, sandboxes: BTreeMap::new(), used_cpu_milli: 0, used_memory_bytes: 0 }
    }

    /// Admits a sandbox: checks spec, host ports and capacity, then takes an address and publishes its tcp ports.
    ///
    /// `publish` binds the tcp host ports; nothing is kept when any step fails.
    pub fn create<F>(
        &mut self,
        request: AgentCreateRequest,
        now: Instant,
        created_at: String,
        publish: F,
    ) -> Result<Created>
    where
        F: FnOnce(&[u16]) -> Result<Vec<PublishedPort>, PortUnavailable>,
    {
        let spec = validate_request(&request)?;
        crate::admission::check_runtime_class(self.limits.classes, &request)?;
        if let Some(held) = self.sandboxes.get(&request.id) {
            if held.request != request {
                return Err(RuntimeError::SpecConflict(request.id));
            }
            return Ok(Created::Existing(self.view(&request.id, held, self.phase_of(held, now))));
        }
        self.check_host_ports_free(&request)?;
        let (cpu_milli, memory_bytes) = sandbox_requests(&spec, &SandboxPolicy::default());
        self.check_capacity(cpu_milli, memory_bytes)?;
        let private_ip = self.pool.allocate().ok_or(RuntimeError::PoolExhausted)?;
        let listeners = match publish(&tcp_host_ports(&request)) {
            Ok(listeners) => listeners,
            Err(e) => {
                self.pool.release(private_ip);
                return Err(e.into());
            }
        };
        let id = request.id.clone();
        let held = HeldSandbox {
            request,
            private_ip,
            created: now,
            created_at,
            cpu_milli,
            memory_bytes,
            failure: None,
            listeners,
        };
        self.used_cpu_milli += cpu_milli;
        self.used_memory_bytes += memory_bytes;
        // The create answer always says creating, whatever the delay; reads show the clock's phase.
        let view = self.view(&id, &held, AgentPhase::Creating);
        self.sandboxes.insert(id, held);
        Ok(Created::New(view))
    }

    fn check_host_ports_free(&self, request: &AgentCreateRequest) -> Result<()> {
        let held = self.sandboxes.iter().map(|(id, held)| (id, held.request.ports.as_slice()));
        crate::admission::check_ports_free(held, request)
    }

    fn check_capacity(&self, cpu_milli: u64, memory_bytes: u64) -> Result<()> {
        let capacity = (self.limits.capacity_cpu_milli, self.limits.capacity_memory_bytes);
        crate::admission::check_capacity(
            capacity,
            (self.used_cpu_milli, self.used_memory_bytes),
            (cpu_milli, memory_bytes),
        )
    }

    /// Forgets a sandbox and frees its address; its listeners are handed back for release.
    pub fn remove(&mut self, id: &str) -> Result<Vec<PublishedPort>> {
        let held = self.sandboxes.remove(id).ok_or_else(|| RuntimeError::SandboxNotFound(id.to_string()))?;
        self.pool.release(held.private_ip);
        self.used_cpu_milli -= held.cpu_milli;
        self.used_memory_bytes -= held.memory_bytes;
        Ok(held.listeners)
    }

    /// Forgets every sandbox, as a crashed agent would; all listeners are handed back for release.
    pub fn forget_all(&mut self) -> Vec<PublishedPort> {
        self.pool.clear();
        self.used_cpu_milli = 0;
        self.used_memory_bytes = 0;
        std::mem::take(&mut self.sandboxes).into_values().flat_map(|held| held.listeners).collect()
    }

    /// Marks a held sandbox failed with `message`; false when it is not held.
    pub fn fail(&mut self, id: &str, message: &str) -> bool {
        match self.sandboxes.get_mut(id) {
            Some(held) => {
                held.failure = Some(message.to_string());
                true
            }
            None => false,
        }
    }

    /// Re-checks every sandbox against its listeners and marks those with a dead one failed; returns how many.
    pub fn reconcile(&mut self) -> usize {
        let mut newly_failed = 0;
        for held in self.sandboxes.values_mut().filter(|h| h.failure.is_none()) {
            if let Some(dead) = held.listeners.iter().find(|l| !l.is_answering()) {
                held.failure = Some(format!("published port {} stopped listening", dead.port()));
                newly_failed += 1;
            }
        }
        newly_failed
    }

    /// One sandbox as seen at `now`.
    pub fn get(&self, id: &str, now: Instant) -> Result<AgentSandbox> {
        let held = self.held(id)?;
        Ok(self.view(id, held, self.phase_of(held, now)))
    }

    /// Up to `limit` sandboxes with ids after `cursor` (all when empty), in id order.
    pub fn list(&self, cursor: &str, limit: usize, now: Instant) -> AgentSandboxList {
        let after = if cursor.is_empty() { Bound::Unbounded } else { Bound::Excluded(cursor) };
        let mut page = self.sandboxes.range::<str, _>((after, Bound::Unbounded));
        let items: Vec<AgentSandbox> =
            page.by_ref().take(limit).map(|(id, held)| self.view(id, held, self.phase_of(held, now))).collect();
        let more_remain = page.next().is_some();
        let next_cursor = match items.last() {
            Some(last) if more_remain => last.id.clone(),
            _ => String::new(),
        };
        AgentSandboxList { items, next_cursor }
    }

    /// Log lines of a whole sandbox (`container` None) or of one of its containers, optionally only the last `tail`.
    pub fn logs(&self, id: &str, container: Option<&str>, tail: Option<usize>, now: Instant) -> Result<AgentLogs> {
        let held = self.held(id)?;
        let phase = self.phase_of(held, now);
        let failure = held.failure.as_deref();
        let lines = match container {
            None => logs::sandbox_lines(&held.request.containers, phase, failure),
            Some(name) => {
                let c = held.request.containers.iter().find(|c| c.name == name).ok_or_else(|| {
                    RuntimeError::ContainerNotFound { sandbox: id.to_string(), container: name.to_string() }
                })?;
                logs::container_lines(c, phase, failure)
            }
        };
        Ok(AgentLogs {
            sandbox_id: id.to_string(),
            container: container.map(str::to_string),
            logs: LogLines { lines: logs::keep_tail(lines, tail) },
        })
    }

    /// Capacity and the summed requests of every held sandbox.
    pub fn status(&self, external: &str) -> AgentStatus {
        AgentStatus {
            capacity_cpu_milli: self.limits.capacity_cpu_milli,
            capacity_memory_bytes: self.limits.capacity_memory_bytes,
            used_cpu_milli: self.used_cpu_milli,
            used_memory_bytes: self.used_memory_bytes,
            external: external.to_string(),
            sandboxes: self.sandboxes.len() as u64,
            runtime: "sim".into(),
            runtime_classes: self.limits.classes.names(),
            ..AgentStatus::default()
        }
    }

    /// Ids of every held sandbox, in order.
    pub fn ids(&self) -> Vec<String> {
        self.sandboxes.keys().cloned().collect()
    }

    fn held(&self, id: &str) -> Result<&HeldSandbox> {
        self.sandboxes.get(id).ok_or_else(|| RuntimeError::SandboxNotFound(id.to_string()))
    }

    fn phase_of(&self, held: &HeldSandbox, now: Instant) -> AgentPhase {
        phase_at(held.created, now, self.limits.create_delay, held.failure.as_deref())
    }

    fn view(&self, id: &str, held: &HeldSandbox, phase: AgentPhase) -> AgentSandbox {
        AgentSandbox {
            id: id.to_string(),
            phase,
            private_ip: held.private_ip.to_string(),
            ports: held.request.ports.clone(),
            containers: held.request.containers.iter().map(|c| container_in(&c.name, phase)).collect(),
            message: held.failure.clone().unwrap_or_default(),
            created_at: held.created_at.clone(),
            labels: held.request.labels.clone(),
        }
    }
}

/// The tcp host ports a create request publishes.
pub fn tcp_host_ports(request: &AgentCreateRequest) -> Vec<u16> {
    request.ports.iter().filter(|p| p.protocol == Protocol::Tcp).map(|p| p.host_port).collect()
}

/// Checks the id and spec of a create request with the orchestrator's own rules; returns the spec view.
pub fn validate_request(request: &AgentCreateRequest) -> Result<SandboxSpec> {
    let spec = SandboxSpec {
        egress: request.egress,
        ports: request
            .ports
            .iter()
            .map(|p| PortSpec {
                container_port: i64::from(p.container_port),
                protocol: p.protocol,
                host_port: Some(i64::from(p.host_port)),
            })
            .collect(),
        containers: request.containers.clone(),
        labels: request.labels.clone(),
        ..SandboxSpec::default()
    };
    let mut problems = Vec::new();
    if let Err(e) = validate_name("id", &request.id) {
        problems.push(e);
    }
    if let Err(e) = validate_sandbox_spec(&spec, &SandboxPolicy::default()) {
        problems.push(e);
    }
    if problems.is_empty() {
        return Ok(spec);
    }
    Err(RuntimeError::Invalid(describe(problems)))
}

/// Joins field errors, dropping the `spec.` prefix: agent requests carry those fields at top level.
fn describe(problems: Vec<FieldErrors>) -> String {
    problems
        .into_iter()
        .flat_map(|e| e.0)
        .map(|e| format!("{}: {}", e.path.strip_prefix("spec.").unwrap_or(&e.path), e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandboxd_api::agent::AgentPort;
    use sandboxd_api::RuntimeClass;
    use sandboxd_api::{Container, ContainerResource};

    fn limits() -> RuntimeLimits {
        RuntimeLimits {
            capacity_cpu_milli: 1000,
            capacity_memory_bytes: 1 << 30,
            create_delay: Duration::from_secs(1),
            classes: RuntimeClasses::only(RuntimeClass::Runc),
        }
    }

    fn runtime() -> Runtime {
        Runtime::new(limits(), IpPool::parse("10.88.0.0/16").unwrap())
    }

    fn sandbox(id: &str) -> AgentCreateRequest {
        AgentCreateRequest {
            id: id.into(),
            egress: false,
            labels: BTreeMap::new(),
            ports: vec![],
            containers: vec![Container {
                name: "web".into(),
                image: "nginx:latest".into(),
                args: vec![],
                env: vec![],
                work_dir: String::new(),
                resource: None,
            }],
            runtime_class: RuntimeClass::Runc,
        }
    }

    fn with_cpu(mut r: AgentCreateRequest, cpu: &str) -> AgentCreateRequest {
        r.containers[0].resource = Some(ContainerResource { cpu: Some(cpu.into()), ..ContainerResource::default() });
        r
    }

    fn with_port(mut r: AgentCreateRequest, host_port: u16, protocol: Protocol) -> AgentCreateRequest {
        r.ports.push(AgentPort { host_port, container_port: 80, protocol });
        r
    }

    fn admit(rt: &mut Runtime, r: AgentCreateRequest, now: Instant) -> Result<Created> {
        rt.create(r, now, "2026-01-01T00:00:00Z".into(), |_| Ok(vec![]))
    }

    #[test]
    fn new_sandbox_is_creating_then_running_after_the_delay() {
        let mut rt = runtime();
        let t0 = Instant::now();
        let Created::New(s) = admit(&mut rt, sandbox("a"), t0).unwrap() else { panic!("not new") };
        assert_eq!(s.phase, AgentPhase::Creating);
        assert_eq!(s.private_ip, "10.88.0.2");
        assert_eq!(rt.get("a", t0).unwrap().phase, AgentPhase::Creating);
        assert_eq!(rt.get("a", t0 + Duration::from_secs(1)).unwrap().phase, AgentPhase::Running);
    }

    #[test]
    fn create_answer_says_creating_even_without_a_delay() {
        let mut rt = Runtime::new(
            RuntimeLimits { create_delay: Duration::ZERO, ..limits() },
            IpPool::parse("10.88.0.0/16").unwrap(),
        );
        let t0 = Instant::now();
        let Created::New(s) = admit(&mut rt, sandbox("a"), t0).unwrap() else { panic!("not new") };
        assert_eq!((s.phase, s.containers[0].state.as_str()), (AgentPhase::Creating, "waiting"));
        assert_eq!(rt.get("a", t0).unwrap().phase, AgentPhase::Running);
        let Created::Existing(again) = admit(&mut rt, sandbox("a"), t0).unwrap() else { panic!("not existing") };
        assert_eq!(again.phase, AgentPhase::Running);
    }

    #[test]
    fn same_spec_is_idempotent_and_a_different_spec_conflicts() {
        let mut rt = runtime();
        let t0 = Instant::now();
        admit(&mut rt, sandbox("a"), t0).unwrap();
        assert!(matches!(admit(&mut rt, sandbox("a"), t0), Ok(Created::Existing(_))));
        assert!(matches!(admit(&mut rt, with_cpu(sandbox("a"), "200m"), t0), Err(RuntimeError::SpecConflict(_))));
        assert_eq!(rt.status("").sandboxes, 1);
    }

    #[test]
    fn host_port_clash_is_per_protocol() {
        let mut rt = runtime();
        let t0 = Instant::now();
        admit(&mut rt, with_port(sandbox("a"), 10000, Protocol::Tcp), t0).unwrap();
        let clash = admit(&mut rt, with_port(sandbox("b"), 10000, Protocol::Tcp), t0);
        assert!(matches!(clash, Err(RuntimeError::PortTaken { port: 10000, .. })), "{clash:?}");
        admit(&mut rt, with_port(sandbox("c"), 10000, Protocol::Udp), t0).unwrap();
    }

    #[test]
    fn capacity_is_the_sum_of_requests() {
        let mut rt = runtime();
        let t0 = Instant::now();
        admit(&mut rt, with_cpu(sandbox("a"), "600m"), t0).unwrap();
        let err = admit(&mut rt, with_cpu(sandbox("b"), "500m"), t0).unwrap_err();
        assert!(err.to_string().starts_with("insufficient cpu"), "{err}");
        admit(&mut rt, with_cpu(sandbox("b"), "400m"), t0).unwrap();
        assert_eq!(rt.status("").used_cpu_milli, 1000);
        rt.remove("a").unwrap();
        assert_eq!(rt.status("").used_cpu_milli, 400);
    }

    #[test]
    fn failed_publish_keeps_nothing() {
        let mut rt = runtime();
        let t0 = Instant::now();
        let refused = rt.create(with_port(sandbox("a"), 10000, Protocol::Tcp), t0, String::new(), |ports| {
            assert_eq!(ports, [10000]);
            Err(PortUnavailable { port: 10000, source: std::io::ErrorKind::AddrInUse.into() })
        });
        assert!(matches!(refused, Err(RuntimeError::PortUnavailable(_))));
        assert_eq!(
            rt.status(""),
            AgentStatus {
                capacity_cpu_milli: 1000,
                capacity_memory_bytes: 1 << 30,
                runtime: "sim".into(),
                runtime_classes: vec!["runc".into()],
                ..AgentStatus::default()
            }
        );
        let Created::New(s) = admit(&mut rt, sandbox("b"), t0).unwrap() else { panic!("not new") };
        assert_eq!(s.private_ip, "10.88.0.2", "address was not returned to the pool");
    }

    #[test]
    fn a_runtime_class_the_node_does_not_offer_is_refused_and_nothing_is_kept() {
        let mut rt = runtime();
        let t0 = Instant::now();
        let gvisor = AgentCreateRequest { runtime_class: RuntimeClass::Gvisor, ..sandbox("a") };
        let err = admit(&mut rt, gvisor, t0).unwrap_err();
        assert!(matches!(err, RuntimeError::Invalid(_)), "{err:?}");
        assert!(
            err.to_string().contains("runtime class gvisor is not offered by this node (it offers: runc)"),
            "{err}"
        );
        assert_eq!((rt.status("").sandboxes, rt.status("").used_cpu_milli), (0, 0));
        assert!(admit(&mut rt, sandbox("a"), t0).is_ok(), "runc is");
    }

    #[test]
    fn invalid_requests_name_the_field() {
        let mut bad = sandbox("Bad_Id");
        bad.containers[0].image.clear();
        let Err(RuntimeError::Invalid(msg)) = validate_request(&bad) else { panic!("accepted") };
        assert!(msg.contains("id: ") && msg.contains("containers[0].image: required"), "{msg}");
    }

    #[test]
    fn list_pages_by_id_after_the_cursor() {
        let mut rt = runtime();
        let t0 = Instant::now();
        for id in ["c", "a", "b"] {
            admit(&mut rt, sandbox(id), t0).unwrap();
        }
        let first = rt.list("", 2, t0);
        assert_eq!(first.items.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(first.next_cursor, "b");
        let second = rt.list("b", 2, t0);
        assert_eq!(second.items.len(), 1);
        assert_eq!(second.next_cursor, "");
        assert_eq!(rt.list("", 3, t0).next_cursor, "");
    }

    #[tokio::test]
    async fn reconcile_fails_sandboxes_whose_listener_died() {
        let mut rt = runtime();
        let t0 = Instant::now();
        let dead = PublishedPort::stopped(10000).await;
        rt.create(with_port(sandbox("a"), 10000, Protocol::Tcp), t0, String::new(), |_| Ok(vec![dead])).unwrap();
        admit(&mut rt, sandbox("b"), t0).unwrap();
        assert_eq!(rt.reconcile(), 1);
        let a = rt.get("a", t0).unwrap();
        assert_eq!(a.phase, AgentPhase::Failed);
        assert!(a.message.contains("10000"), "{}", a.message);
        assert_eq!(rt.get("b", t0).unwrap().phase, AgentPhase::Creating);
        assert_eq!(rt.reconcile(), 0, "already failed sandboxes are not counted again");
    }

    #[test]
    fn fail_and_forget_all() {
        let mut rt = runtime();
        let t0 = Instant::now();
        admit(&mut rt, sandbox("a"), t0).unwrap();
        assert!(rt.fail("a", "oom"));
        assert!(!rt.fail("zz", "oom"));
        let a = rt.get("a", t0).unwrap();
        assert_eq!((a.phase, a.message.as_str()), (AgentPhase::Failed, "oom"));
        rt.forget_all();
        assert!(rt.ids().is_empty());
        assert_eq!(rt.status("").used_memory_bytes, 0);
    }
}
