//! The real runtime (`sbxlet --runtime runc`): each sandbox is a network namespace with a private IP
//! on the node bridge, its containers are OCI containers from OCI images, run by runc or by gVisor's
//! runsc (the sandbox's runtime class), and its host ports are proxied to it. State lives under
//! `--state-dir`, so a restarted agent re-adopts what runs.

mod cgroups;
pub mod classes;
mod container;
mod exec;
mod host;
pub mod image;
mod network;
mod proxy;
mod spec;
mod unpack;

use crate::backend::{Backend, Created, DataPlaneLimits};
use crate::error::RuntimeError;
use crate::sim::ip_pool::IpPool;
use crate::sim::{logs::keep_tail, validate_request};
use cgroups::Cgroups;
use classes::{ClassSettings, Runtimes};
use container::{Bundle, ContainerState, OciRuntime};
use image::{ImageSettings, ImageStore};
use network::{Network, SandboxNet};
use parking_lot::Mutex;
use sandboxd_api::agent::{
    AgentContainer, AgentCreateRequest, AgentLogs, AgentPhase, AgentSandbox, AgentSandboxList, AgentStatus, LogLines,
};
use sandboxd_api::dataplane::ExecRequest;
use sandboxd_api::validate::{sandbox_requests, SandboxPolicy};
use sandboxd_api::RuntimeClass;
use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often running containers are checked (vanished ones, log rotation) and images collected.
const MONITOR_PERIOD: Duration = Duration::from_secs(1);

/// Everything one real agent needs to start.
#[derive(Debug, Clone)]
pub struct RuncConfig {
    /// Address of the agent API; host ports are published on the same IP.
    pub listen: SocketAddr,
    /// Where images, sandbox records, bundles and runc's own state live.
    pub state_dir: PathBuf,
    /// IPv4 CIDR sandbox addresses come from; its first address is the bridge's.
    pub ip_pool: String,
    /// The node bridge (created when missing).
    pub bridge: String,
    /// Cgroup under which every sandbox gets one of its own.
    pub cgroup_parent: String,
    /// CPU capacity reported; `None` counts the node's CPUs.
    pub capacity_cpu_milli: Option<u64>,
    /// Memory capacity reported; `None` reads the node's memory.
    pub capacity_memory_bytes: Option<u64>,
    pub external: String,
    pub images: ImageSettings,
    /// The OCI runtime binary and flags of each runtime class.
    pub classes: ClassSettings,
    /// A container's log is rotated past this size.
    pub log_max_bytes: u64,
    /// Images no sandbox used for this long are removed.
    pub image_gc_after: Duration,
    /// Caps of exec output, file transfers and streaming sessions.
    pub data_plane: DataPlaneLimits,
    /// Every route but `/healthz` needs this bearer token; `None`: none is asked for.
    pub token: Option<String>,
}

impl Default for RuncConfig {
    fn default() -> Self {
        RuncConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            state_dir: PathBuf::from("/var/lib/sbxlet"),
            ip_pool: "10.88.0.0/16".into(),
            bridge: "sbx0".into(),
            cgroup_parent: "sandboxd".into(),
            capacity_cpu_milli: None,
            capacity_memory_bytes: None,
            external: String::new(),
            images: ImageSettings::default(),
            classes: ClassSettings::default(),
            log_max_bytes: 10 << 20,
            image_gc_after: Duration::from_secs(3600),
            data_plane: DataPlaneLimits::default(),
            token: None,
        }
    }
}

/// What a sandbox's record on disk holds: enough to re-adopt or remove it after a restart.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Record {
    request: AgentCreateRequest,
    ip: Ipv4Addr,
    net: Option<SandboxNet>,
    created_at: String,
    /// Image reference of each container, in order (for image garbage collection).
    images: Vec<String>,
    /// Every container was started.
    started: bool,
    /// Why the sandbox failed outside its containers (creation, a vanished container).
    failure: Option<String>,
}

/// One sandbox the agent holds.
struct Held {
    record: Record,
    cpu_milli: u64,
    memory_bytes: u64,
    /// Closed when the sandbox is removed (by drop).
    _proxies: Option<proxy::Proxies>,
    /// Serializes bring-up, monitoring writes and removal of this sandbox; also tells this
    /// incarnation of the id from a later one (`Arc::ptr_eq`).
    busy: Arc<tokio::sync::Mutex<()>>,
    /// Being removed: the id cannot be created again until the removal ends.
    deleting: bool,
}

struct State {
    sandboxes: BTreeMap<String, Held>,
    pool: IpPool,
    used_cpu_milli: u64,
    used_memory_bytes: u64,
}

/// The runc runtime of one node.
pub struct RuncRuntime {
    config: RuncConfig,
    node_ip: IpAddr,
    runtimes: Runtimes,
    network: Network,
    cgroups: Cgroups,
    images: Arc<ImageStore>,
    capacity: (u64, u64),
    state: Mutex<State>,
}

/// The network namespace and host-side veth names of sandbox `id` on `bridge` (for audits of leftovers).
pub fn host_names_of(bridge: &str, id: &str) -> (String, String) {
    network::host_names(bridge, id)
}

/// Why the runtime cannot start on this host.
pub fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    let is_root = std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false);
    if !is_root {
        missing.push("root (namespaces, mounts, cgroups and iptables need it)".to_string());
    }
    for (program, why) in
        [("runc", "runc"), ("ip", "iproute2"), ("iptables", "iptables"), ("setsid", "util-linux"), ("mount", "mount")]
    {
        if which(program).is_none() {
            missing.push(format!("{program} (Debian package {why})"));
        }
    }
    missing
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|dir| Path::new(dir).join(program)).find(|p| p.is_file())
}

impl RuncRuntime {
    /// Prepares the state directory and the bridge, then re-adopts the sandboxes of an earlier run.
    pub async fn open(config: RuncConfig) -> Result<Arc<RuncRuntime>, RuntimeError> {
        let missing = missing_prerequisites();
        if !missing.is_empty() {
            return Err(RuntimeError::Failed(format!("the runc runtime needs {}", missing.join(", "))));
        }
        let pool = IpPool::parse(&config.ip_pool).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        let io = |what: &'static str| move |e: std::io::Error| RuntimeError::Failed(format!("{what}: {e}"));
        std::fs::create_dir_all(config.state_dir.join("sandboxes")).map_err(io("state dir"))?;
        let images =
            ImageStore::open(&config.state_dir.join("images"), config.images.clone()).map_err(io("image store"))?;
        let network = Network {
            bridge: config.bridge.clone(),
            gateway: pool.gateway(),
            prefix_len: pool.prefix_len(),
            cidr: pool.cidr(),
        };
        network.ensure_bridge().await?;
        let capacity = (
            config.capacity_cpu_milli.unwrap_or_else(node_cpu_milli),
            config.capacity_memory_bytes.unwrap_or_else(node_memory_bytes),
        );
        let runtime = Arc::new(RuncRuntime {
            node_ip: config.listen.ip(),
            runtimes: Runtimes::probe(&config.classes, &config.state_dir).await?,
            cgroups: Cgroups { version: cgroups::detect(), parent: config.cgroup_parent.clone() },
            network,
            images,
            capacity,
            state: Mutex::new(State { sandboxes: BTreeMap::new(), pool, used_cpu_milli: 0, used_memory_bytes: 0 }),
            config,
        });
        runtime.readopt();
        Ok(runtime)
    }

    /// The image store (for `sbxlet image import`).
    pub fn images(&self) -> &Arc<ImageStore> {
        &self.images
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.config.state_dir.join("sandboxes").join(id)
    }

    fn bundle(&self, id: &str, container: &str) -> Bundle {
        Bundle::new(container_id(id, container), self.sandbox_dir(id).join("containers").join(container))
    }

    fn save(&self, id: &str, record: &Record) {
        let dir = self.sandbox_dir(id);
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            let partial = dir.join("record.json.partial");
            std::fs::write(&partial, serde_json::to_vec(record).expect("records serialize"))?;
            std::fs::rename(&partial, dir.join("record.json"))
        };
        if let Err(e) = write() {
            tracing::error!(sandbox = id, error = %e, "sandbox record not saved; a restart will not re-adopt it");
        }
    }

    /// Takes back every sandbox recorded under the state directory, with its address, resources and ports.
    fn readopt(self: &Arc<Self>) {
        let Ok(entries) = std::fs::read_dir(self.config.state_dir.join("sandboxes")) else { return };
        for entry in entries.flatten() {
            let path = entry.path().join("record.json");
            let Some(mut record) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Record>(&b).ok())
            else {
                continue;
            };
            let id = record.request.id.clone();
            if !record.started && record.failure.is_none() {
                record.failure = Some("the agent restarted while the sandbox was being created".into());
            }
            let proxies = match proxy::publish(self.node_ip, IpAddr::V4(record.ip), &record.request.ports) {
                Ok(p) => Some(p),
                Err(e) => {
                    record.failure.get_or_insert_with(|| format!("host ports not re-published: {e}"));
                    None
                }
            };
            let (cpu_milli, memory_bytes) = requests_of(&record.request);
            let mut state = self.state.lock();
            state.pool.claim(record.ip);
            state.used_cpu_milli += cpu_milli;
            state.used_memory_bytes += memory_bytes;
            self.save(&id, &record);
            tracing::info!(sandbox = %id, "sandbox re-adopted");
            let held =
                Held { record, cpu_milli, memory_bytes, _proxies: proxies, busy: Default::default(), deleting: false };
            state.sandboxes.insert(id, held);
        }
    }

    /// Brings a new sandbox up: network, images, rootfs, containers. A failure is recorded on the
    /// sandbox, which keeps what it holds until it is deleted.
    async fn bring_up(self: Arc<Self>, id: String, busy: Arc<tokio::sync::Mutex<()>>) {
        let _busy = busy.lock().await;
        // A delete that got the lock first ends this incarnation; the id may be a new sandbox now.
        let Some(record) = self.record_of(&id, &busy) else { return };
        let outcome = self.try_bring_up(&id, &record).await;
        let mut state = self.state.lock();
        let Some(held) = state.sandboxes.get_mut(&id).filter(|h| Arc::ptr_eq(&h.busy, &busy)) else { return };
        match outcome {
            Ok(net) => {
                held.record.net = Some(net);
                held.record.started = true;
            }
            Err((net, e)) => {
                held.record.net = net;
                tracing::warn!(sandbox = %id, error = %e, "sandbox failed to start");
                held.record.failure = Some(e.to_string());
            }
        }
        let record = held.record.clone();
        drop(state);
        self.save(&id, &record);
    }

    async fn try_bring_up(&self, id: &str, record: &Record) -> Result<SandboxNet, (Option<SandboxNet>, RuntimeError)> {
        let request = &record.request;
        let started = std::time::Instant::now();
        // Images first: a pull that fails leaves nothing on the network to undo.
        let mut images = Vec::new();
        for container in &request.containers {
            images.push(self.images.ensure(&container.image).await.map_err(|e| (None, e))?);
        }
        let images_at = started.elapsed();
        let net = self.network.set_up(id, record.ip, request.egress).await.map_err(|e| (None, e))?;
        let network_at = started.elapsed();
        let hosts = format!("127.0.0.1\tlocalhost\n::1\tlocalhost\n{}\t{}\n", record.ip, hostname_of(id));
        std::fs::write(self.sandbox_dir(id).join("hosts"), hosts)
            .map_err(|e| (Some(net.clone()), RuntimeError::Failed(format!("writing /etc/hosts: {e}"))))?;
        // Saved now, so a crash from here on still finds the namespace to remove.
        let mut saved = record.clone();
        saved.net = Some(net.clone());
        self.save(id, &saved);
        let runtime = self.runtimes.get(request.runtime_class);
        for (container, image) in request.containers.iter().zip(&images) {
            let bundle = self.bundle(id, &container.name);
            bundle.mount_rootfs(&self.images.lower_dirs(image)).await.map_err(|e| (Some(net.clone()), e))?;
            if runtime.class == RuntimeClass::Gvisor {
                bundle.ensure_tmp().map_err(|e| (Some(net.clone()), e))?;
            }
            let spec = self.container_spec(id, container, image, &net);
            self.cgroups.limit_memory(id, &container.name, spec.memory_bytes).map_err(|e| {
                (Some(net.clone()), RuntimeError::Failed(format!("memory cgroup of {}: {e}", container.name)))
            })?;
            bundle
                .start(runtime, &spec::runtime_config(&spec, runtime.class))
                .await
                .map_err(|e| (Some(net.clone()), e))?;
            let quota = spec::cpu_quota_us(spec.cpu_milli);
            if let Err(e) = self.cgroups.limit_cpu(id, &container.name, quota, spec::CPU_PERIOD_US) {
                // A container that already ended has no cgroup left to limit.
                if bundle.state(runtime).await == ContainerState::Running {
                    return Err((
                        Some(net.clone()),
                        RuntimeError::Failed(format!("cpu quota of {}: {e}", container.name)),
                    ));
                }
            }
        }
        tracing::debug!(
            sandbox = id,
            images_ms = images_at.as_millis() as u64,
            network_ms = (network_at - images_at).as_millis() as u64,
            containers_ms = (started.elapsed() - network_at).as_millis() as u64,
            "sandbox up"
        );
        Ok(net)
    }

    fn container_spec(
        &self,
        id: &str,
        container: &sandboxd_api::Container,
        image: &image::Image,
        net: &SandboxNet,
    ) -> spec::ContainerSpec {
        // Kubernetes' rule: `args` replaces the image's Cmd; the image's Entrypoint stays.
        let mut args = image.entrypoint.clone();
        args.extend(if container.args.is_empty() { image.cmd.clone() } else { container.args.clone() });
        let mut env = image.env.clone();
        env.extend(container.env.iter().map(|e| format!("{}={}", e.name, e.value)));
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        }
        let cwd = [container.work_dir.as_str(), image.working_dir.as_str()]
            .into_iter()
            .find(|d| !d.is_empty())
            .unwrap_or("/")
            .to_string();
        let policy = SandboxPolicy::default();
        let (cpu_milli, memory_bytes) = sandboxd_api::validate::container_requests(container, &policy);
        spec::ContainerSpec {
            args,
            env,
            cwd,
            hostname: hostname_of(id),
            netns_path: format!("/var/run/netns/{}", net.netns),
            cgroups_path: self.cgroups.runc_path(id, &container.name),
            memory_bytes,
            memory_limit_in_leaf: self.cgroups.memory_limit_in_leaf(),
            cpu_milli,
            hosts_file: self.sandbox_dir(id).join("hosts").display().to_string(),
            resolv_conf: net.egress.then(|| "/etc/resolv.conf".to_string()),
            rootfs_tmp: self.bundle(id, &container.name).rootfs().join("tmp").display().to_string(),
        }
    }

    /// The sandbox as the API shows it, with its record.
    fn current(&self, id: &str) -> Result<(Record, AgentSandbox), RuntimeError> {
        let (record, deleting) = self
            .state
            .lock()
            .sandboxes
            .get(id)
            .map(|h| (h.record.clone(), h.deleting))
            .ok_or_else(|| RuntimeError::SandboxNotFound(id.to_string()))?;
        let view = self.view_of(id, &record, deleting);
        Ok((record, view))
    }

    /// The bundle of a running container of a running sandbox (`container`, or the first), and the
    /// runtime that runs it.
    fn running_container(&self, id: &str, container: Option<&str>) -> Result<(Bundle, &OciRuntime), RuntimeError> {
        let (record, view) = self.current(id)?;
        if view.phase != AgentPhase::Running {
            return Err(RuntimeError::NotRunning(format!("sandbox {id:?} is {}, not running", view.phase.as_str())));
        }
        let name = container.unwrap_or_else(|| record.request.containers[0].name.as_str());
        let state = view
            .containers
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| RuntimeError::ContainerNotFound { sandbox: id.to_string(), container: name.to_string() })?;
        if state.state != "running" {
            return Err(RuntimeError::NotRunning(format!("container {name:?} of sandbox {id:?} is {}", state.state)));
        }
        Ok((self.bundle(id, name), self.runtimes.get(record.request.runtime_class)))
    }

    fn record(&self, id: &str) -> Option<Record> {
        self.state.lock().sandboxes.get(id).map(|h| h.record.clone())
    }

    /// The record of this incarnation of `id` (the one `busy` belongs to), unless it is being removed.
    fn record_of(&self, id: &str, busy: &Arc<tokio::sync::Mutex<()>>) -> Option<Record> {
        let state = self.state.lock();
        let held = state.sandboxes.get(id)?;
        (Arc::ptr_eq(&held.busy, busy) && !held.deleting).then(|| held.record.clone())
    }

    /// The sandbox as the API shows it, from its record and its containers' recorded ends.
    fn view(&self, id: &str, record: &Record) -> AgentSandbox {
        let containers: Vec<AgentContainer> =
            record.request.containers.iter().map(|c| self.container_view(id, &c.name, record.started)).collect();
        let (phase, message) = sandbox_phase(record, &containers);
        AgentSandbox {
            id: id.to_string(),
            phase,
            private_ip: record.ip.to_string(),
            ports: record.request.ports.clone(),
            containers,
            message,
            created_at: record.created_at.clone(),
            labels: record.request.labels.clone(),
        }
    }

    /// `view`, showing `deleting` while a removal runs.
    fn view_of(&self, id: &str, record: &Record, deleting: bool) -> AgentSandbox {
        let mut view = self.view(id, record);
        if deleting {
            view.phase = AgentPhase::Deleting;
        }
        view
    }

    fn container_view(&self, id: &str, name: &str, started: bool) -> AgentContainer {
        let exit = std::fs::read_to_string(self.bundle(id, name).dir.join("exit_code"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let (state, reason) = match exit {
            Some(0) => ("exited", Some("Completed".to_string())),
            Some(137) if self.cgroups.oom_killed(id, name) => ("exited", Some("OOMKilled".into())),
            Some(_) => ("exited", Some("Error".to_string())),
            None if started => ("running", None),
            None => ("creating", None),
        };
        AgentContainer { name: name.to_string(), state: state.into(), restart_count: 0, exit_code: exit, reason }
    }

    /// One monitoring pass: containers runc no longer knows (and that recorded no end) fail their
    /// sandbox as vanished; logs are rotated; unused images are collected.
    async fn monitor_once(&self) {
        let sandboxes: Vec<(String, Record, Arc<tokio::sync::Mutex<()>>)> = {
            let state = self.state.lock();
            state.sandboxes.iter().map(|(id, h)| (id.clone(), h.record.clone(), h.busy.clone())).collect()
        };
        for (id, record, busy) in &sandboxes {
            for container in &record.request.containers {
                // Failed sandboxes may still have running containers that write.
                self.bundle(id, &container.name).rotate_log(self.config.log_max_bytes);
            }
            if !record.started || record.failure.is_some() {
                continue;
            }
            let runtime = self.runtimes.get(record.request.runtime_class);
            for container in &record.request.containers {
                if self.vanished(runtime, &self.bundle(id, &container.name)).await {
                    self.fail(id, busy, format!("container {} vanished", container.name));
                }
            }
        }
        let in_use: HashSet<String> =
            sandboxes.iter().flat_map(|(_, r, _)| r.images.iter().filter_map(|i| image::normalized(i))).collect();
        let images = self.images.clone();
        let unused_for = self.config.image_gc_after;
        let _ = tokio::task::spawn_blocking(move || images.collect_garbage(&in_use, unused_for)).await;
    }

    /// Whether a container is gone without a recorded end. Asked twice: `runc run` removes its state
    /// a moment before the shim records the exit code, and a normal end must not read as vanished.
    async fn vanished(&self, runtime: &OciRuntime, bundle: &Bundle) -> bool {
        if bundle.state(runtime).await != ContainerState::Vanished {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        bundle.state(runtime).await == ContainerState::Vanished
    }

    /// Records why this incarnation of `id` failed (a later sandbox of the same id is left alone).
    fn fail(&self, id: &str, busy: &Arc<tokio::sync::Mutex<()>>, message: String) {
        let record = {
            let mut state = self.state.lock();
            let Some(held) = state.sandboxes.get_mut(id).filter(|h| Arc::ptr_eq(&h.busy, busy)) else { return };
            if held.record.failure.is_some() || held.deleting {
                return;
            }
            held.record.failure = Some(message);
            held.record.clone()
        };
        self.save(id, &record);
    }

    /// Runs `monitor_once` every second until `stop`.
    pub fn spawn_monitor(self: &Arc<Self>, stop: CancellationToken) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(MONITOR_PERIOD) => {}
                }
                let Some(me) = me.upgrade() else { return };
                me.monitor_once().await;
            }
        });
    }

    /// Removes a sandbox and all it holds. The entry stays, marked deleting, until the removal ends,
    /// so the id cannot be created again (on the same names) meanwhile.
    async fn remove(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let busy = self
            .state
            .lock()
            .sandboxes
            .get(id)
            .map(|h| h.busy.clone())
            .ok_or_else(|| RuntimeError::SandboxNotFound(id.to_string()))?;
        let _busy = busy.lock().await;
        let (record, cpu_milli, memory_bytes) = {
            let mut state = self.state.lock();
            let Some(held) = state.sandboxes.get_mut(id).filter(|h| Arc::ptr_eq(&h.busy, &busy)) else {
                return Err(RuntimeError::SandboxNotFound(id.to_string()));
            };
            held.deleting = true;
            held._proxies = None;
            (held.record.clone(), held.cpu_milli, held.memory_bytes)
        };
        let runtime = self.runtimes.get(record.request.runtime_class);
        if !grace.is_zero() {
            let bundles: Vec<Bundle> = record.request.containers.iter().map(|c| self.bundle(id, &c.name)).collect();
            futures::future::join_all(bundles.iter().map(|b| b.stop(runtime, grace))).await;
        }
        for container in &record.request.containers {
            self.bundle(id, &container.name).remove(runtime).await;
        }
        let net = record.net.clone().unwrap_or_else(|| SandboxNet {
            netns: self.network.names_of(id).0,
            host_veth: self.network.names_of(id).1,
            ip: record.ip,
            egress: record.request.egress,
        });
        self.network.tear_down(id, &net).await;
        self.cgroups.remove_sandbox(id);
        if let Err(e) = std::fs::remove_dir_all(self.sandbox_dir(id)) {
            tracing::warn!(sandbox = id, error = %e, "sandbox directory not removed");
        }
        let mut state = self.state.lock();
        state.sandboxes.remove(id);
        state.pool.release(record.ip);
        state.used_cpu_milli -= cpu_milli;
        state.used_memory_bytes -= memory_bytes;
        Ok(())
    }
}

/// The agent phase of a sandbox and why, from its record and its containers.
fn sandbox_phase(record: &Record, containers: &[AgentContainer]) -> (AgentPhase, String) {
    if let Some(failure) = &record.failure {
        return (AgentPhase::Failed, failure.clone());
    }
    if !record.started {
        return (AgentPhase::Creating, String::new());
    }
    if let Some(bad) = containers.iter().find(|c| c.exit_code.is_some_and(|code| code != 0)) {
        let reason = bad.reason.as_deref().unwrap_or("Error");
        let code = bad.exit_code.unwrap_or_default();
        return (AgentPhase::Failed, format!("container {}: {reason} (exit code {code})", bad.name));
    }
    if containers.iter().all(|c| c.exit_code == Some(0)) {
        return (AgentPhase::Exited, String::new());
    }
    (AgentPhase::Running, String::new())
}

/// The runc id of a container: `_` cannot occur in sandbox ids or container names, so no two
/// (sandbox, container) pairs share one.
fn container_id(id: &str, container: &str) -> String {
    format!("{id}_{container}")
}

/// A sandbox's hostname: its id, cut to the 63 characters a hostname may have.
fn hostname_of(id: &str) -> String {
    id.chars().take(63).collect()
}

fn requests_of(request: &AgentCreateRequest) -> (u64, u64) {
    match validate_request(request) {
        Ok(spec) => sandbox_requests(&spec, &SandboxPolicy::default()),
        Err(_) => (0, 0),
    }
}

fn node_cpu_milli() -> u64 {
    std::thread::available_parallelism().map(|n| n.get() as u64 * 1000).unwrap_or(1000)
}

fn node_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map(|kib| kib * 1024)
        .unwrap_or(1 << 30)
}

#[async_trait::async_trait]
impl Backend for Arc<RuncRuntime> {
    async fn create(&self, request: AgentCreateRequest) -> Result<Created, RuntimeError> {
        let spec = validate_request(&request)?;
        crate::admission::check_runtime_class(self.runtimes.offered(), &request)?;
        let (cpu_milli, memory_bytes) = sandbox_requests(&spec, &SandboxPolicy::default());
        let id = request.id.clone();
        let (record, busy) = {
            let mut state = self.state.lock();
            if let Some(held) = state.sandboxes.get(&id) {
                if held.deleting {
                    return Err(RuntimeError::Deleting(id));
                }
                if held.record.request != request {
                    return Err(RuntimeError::SpecConflict(id));
                }
                let record = held.record.clone();
                drop(state);
                return Ok(Created::Existing(self.view(&id, &record)));
            }
            let held = state.sandboxes.iter().map(|(id, h)| (id, h.record.request.ports.as_slice()));
            crate::admission::check_ports_free(held, &request)?;
            let used = (state.used_cpu_milli, state.used_memory_bytes);
            crate::admission::check_capacity(self.capacity, used, (cpu_milli, memory_bytes))?;
            let ip = state.pool.allocate().ok_or(RuntimeError::PoolExhausted)?;
            let proxies = match proxy::publish(self.node_ip, IpAddr::V4(ip), &request.ports) {
                Ok(p) => p,
                Err(e) => {
                    state.pool.release(ip);
                    return Err(e);
                }
            };
            let record = Record {
                images: request.containers.iter().map(|c| c.image.clone()).collect(),
                request,
                ip,
                net: None,
                created_at: sandboxd_api::time::rfc3339_now(),
                started: false,
                failure: None,
            };
            let busy: Arc<tokio::sync::Mutex<()>> = Default::default();
            state.used_cpu_milli += cpu_milli;
            state.used_memory_bytes += memory_bytes;
            let held = Held {
                record: record.clone(),
                cpu_milli,
                memory_bytes,
                _proxies: Some(proxies),
                busy: busy.clone(),
                deleting: false,
            };
            state.sandboxes.insert(id.clone(), held);
            (record, busy)
        };
        self.save(&id, &record);
        tokio::spawn(self.clone().bring_up(id.clone(), busy));
        Ok(Created::New(self.view(&id, &record)))
    }

    /// Runs the removal on a task of its own: a caller that gives up (a timeout, a disconnect) must
    /// not leave the sandbox half removed with its address and resources still counted.
    async fn delete(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let (me, id) = (self.clone(), id.to_string());
        tokio::spawn(async move { me.remove(&id, grace).await })
            .await
            .map_err(|e| RuntimeError::Failed(format!("removal stopped: {e}")))?
    }

    async fn get(&self, id: &str) -> Result<AgentSandbox, RuntimeError> {
        self.current(id).map(|(_, view)| view)
    }

    async fn list(&self, cursor: &str, limit: usize) -> AgentSandboxList {
        let page: Vec<(String, Record, bool)> = {
            let state = self.state.lock();
            let after = if cursor.is_empty() { Bound::Unbounded } else { Bound::Excluded(cursor) };
            state
                .sandboxes
                .range::<str, _>((after, Bound::Unbounded))
                .take(limit + 1)
                .map(|(id, h)| (id.clone(), h.record.clone(), h.deleting))
                .collect()
        };
        let more_remain = page.len() > limit;
        let items: Vec<AgentSandbox> = page.iter().take(limit).map(|(id, r, d)| self.view_of(id, r, *d)).collect();
        let next_cursor = match items.last() {
            Some(last) if more_remain => last.id.clone(),
            _ => String::new(),
        };
        AgentSandboxList { items, next_cursor }
    }

    async fn logs(&self, id: &str, container: Option<&str>, tail: Option<usize>) -> Result<AgentLogs, RuntimeError> {
        let record = self.record(id).ok_or_else(|| RuntimeError::SandboxNotFound(id.to_string()))?;
        let names: Vec<&str> = record.request.containers.iter().map(|c| c.name.as_str()).collect();
        let lines = match container {
            Some(name) if !names.contains(&name) => {
                return Err(RuntimeError::ContainerNotFound { sandbox: id.to_string(), container: name.to_string() })
            }
            Some(name) => self.bundle(id, name).log_lines(),
            None => names
                .iter()
                .flat_map(|name| self.bundle(id, name).log_lines().into_iter().map(move |l| format!("[{name}] {l}")))
                .collect(),
        };
        Ok(AgentLogs {
            sandbox_id: id.to_string(),
            container: container.map(str::to_string),
            logs: LogLines { lines: keep_tail(lines, tail) },
        })
    }

    async fn status(&self) -> AgentStatus {
        let state = self.state.lock();
        AgentStatus {
            capacity_cpu_milli: self.capacity.0,
            capacity_memory_bytes: self.capacity.1,
            used_cpu_milli: state.used_cpu_milli,
            used_memory_bytes: state.used_memory_bytes,
            external: self.config.external.clone(),
            sandboxes: state.sandboxes.len() as u64,
            runtime: "runc".into(),
            runtime_classes: self.runtimes.offered().names(),
            ..AgentStatus::default()
        }
    }

    async fn exec(&self, id: &str, request: &ExecRequest) -> Result<crate::exec::ExecProcess, RuntimeError> {
        let (bundle, runtime) = self.running_container(id, request.container.as_deref())?;
        exec::spawn(runtime, &bundle, request).await
    }

    /// The directory that is the container's `/`. Under runc: `/proc/<pid>/root` of its first
    /// process, opened and then checked to be the container's own rootfs mount (a pid recorded before
    /// a reboot, or reused after the container ended, could otherwise open a host process's root).
    /// Under gVisor the container's processes are not host processes: its rootfs mount is opened
    /// instead, which gVisor serves to the container as `/` (see `classes` for why it sees host-side
    /// changes), and the mounts that exist only inside gVisor's kernel are refused.
    async fn container_root(
        &self,
        id: &str,
        container: Option<&str>,
    ) -> Result<crate::files::ContainerRoot, RuntimeError> {
        let (bundle, runtime) = self.running_container(id, container)?;
        let max = self.config.data_plane.max_file_bytes;
        let message = format!("container {} is not running", bundle.id);
        let not_running = move || RuntimeError::NotRunning(message.clone());
        let class = runtime.class;
        let pid = exec::container_pid(&bundle.dir);
        tokio::task::spawn_blocking(move || match class {
            RuntimeClass::Runc => {
                let pid = pid.ok_or_else(&not_running)?;
                let root = crate::files::ContainerRoot::open(Path::new(&format!("/proc/{pid}/root")), max)
                    .map_err(|_| not_running())?;
                if !root.is_same_directory(&bundle.rootfs()) {
                    return Err(not_running());
                }
                Ok(root)
            }
            RuntimeClass::Gvisor => {
                if !container::is_mount_point(&bundle.rootfs()) {
                    return Err(not_running());
                }
                let root = crate::files::ContainerRoot::open(&bundle.rootfs(), max).map_err(|_| not_running())?;
                Ok(root.refusing(spec::GVISOR_INTERNAL_MOUNTS, "it exists only inside the sandbox's gVisor kernel"))
            }
        })
        .await
        .map_err(|e| RuntimeError::Failed(format!("opening the container's root: {e}")))?
    }

    async fn log_files(
        &self,
        id: &str,
        container: Option<&str>,
    ) -> Result<Option<Vec<(String, PathBuf)>>, RuntimeError> {
        let record = self.record(id).ok_or_else(|| RuntimeError::SandboxNotFound(id.to_string()))?;
        let names: Vec<&str> = record.request.containers.iter().map(|c| c.name.as_str()).collect();
        let chosen: Vec<&str> = match container {
            Some(name) if !names.contains(&name) => {
                return Err(RuntimeError::ContainerNotFound { sandbox: id.to_string(), container: name.to_string() })
            }
            Some(name) => vec![name],
            None => names,
        };
        Ok(Some(chosen.into_iter().map(|name| (name.to_string(), self.bundle(id, name).log_path())).collect()))
    }

    fn limits(&self) -> DataPlaneLimits {
        self.config.data_plane
    }

    async fn reconcile(&self) {
        self.monitor_once().await;
    }
}

/// Removes everything an agent with `config` made on this node: its containers (killed), their
/// mounts, the sandboxes' namespaces, veths and rules, the bridge, the cgroups and the state
/// directory's sandboxes, leaving its images. For decommissioning a node, and for tests, which must
/// leave nothing behind even when they fail. The agent must not be running.
pub async fn purge(config: &RuncConfig) {
    let runtimes = Runtimes::unprobed(&config.classes, &config.state_dir);
    let sandboxes = config.state_dir.join("sandboxes");
    let network =
        Network { bridge: config.bridge.clone(), gateway: Ipv4Addr::UNSPECIFIED, prefix_len: 0, cidr: String::new() };
    let cgroups = Cgroups { version: cgroups::detect(), parent: config.cgroup_parent.clone() };
    for entry in std::fs::read_dir(&sandboxes).into_iter().flatten().flatten() {
        let id = entry.file_name().to_string_lossy().into_owned();
        let record: Option<Record> =
            std::fs::read(entry.path().join("record.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
        for container in std::fs::read_dir(entry.path().join("containers")).into_iter().flatten().flatten() {
            let name = container.file_name().to_string_lossy().into_owned();
            let bundle = Bundle::new(container_id(&id, &name), container.path());
            let runtime = match &record {
                Some(record) => runtimes.get(record.request.runtime_class),
                // No record (a crash mid-create): whichever runtime knows the container removes it.
                None => bundle.owner(&runtimes.all()).await,
            };
            bundle.remove(runtime).await;
        }
        let (netns, host_veth) = network.names_of(&id);
        let net = record.and_then(|r| r.net).unwrap_or(SandboxNet {
            netns,
            host_veth,
            ip: Ipv4Addr::UNSPECIFIED,
            egress: false,
        });
        network.tear_down(&id, &net).await;
        cgroups.remove_sandbox(&id);
    }
    network.remove_bridge().await;
    cgroups.remove_parent();
    let _ = std::fs::remove_dir_all(&sandboxes);
    for runtime in runtimes.all() {
        let _ = std::fs::remove_dir_all(&runtime.root);
    }
}

/// A serving real agent. Stopping it leaves the sandboxes running; the next start re-adopts them.
pub struct RuncAgent {
    addr: SocketAddr,
    runtime: Arc<RuncRuntime>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl RuncAgent {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn runtime(&self) -> &Arc<RuncRuntime> {
        &self.runtime
    }

    /// Stops serving (bounded) and monitoring.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(2), &mut server).await.is_err() {
            server.abort();
        }
    }
}

/// Opens the runtime (re-adopting earlier sandboxes) and serves the agent API on `config.listen`.
pub async fn start(config: RuncConfig) -> Result<RuncAgent, RuntimeError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| RuntimeError::Failed(format!("binding {}: {e}", config.listen)))?;
    let addr = listener.local_addr().map_err(|e| RuntimeError::Failed(e.to_string()))?;
    let config_token = config.token.clone();
    let runtime = RuncRuntime::open(RuncConfig { listen: addr, ..config }).await?;
    let stop = CancellationToken::new();
    runtime.spawn_monitor(stop.clone());
    let token = crate::auth::AgentToken::new(config_token.as_deref());
    // A real agent is its process: it serves the process's series too.
    let app = crate::server::router(Arc::new(runtime.clone()), crate::metrics::AgentMetrics::new(true))
        .layer(axum::middleware::from_fn_with_state(token, crate::auth::require_token));
    let shutdown = stop.clone().cancelled_owned();
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!(%addr, error = %e, "agent server stopped");
        }
    });
    Ok(RuncAgent { addr, runtime, stop, server })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(started: bool, failure: Option<&str>) -> Record {
        Record {
            request: serde_json::from_value(serde_json::json!({"id": "s", "containers": []})).unwrap(),
            ip: Ipv4Addr::new(10, 88, 0, 2),
            net: None,
            created_at: String::new(),
            images: vec![],
            started,
            failure: failure.map(String::from),
        }
    }

    fn container(exit_code: Option<i32>, reason: Option<&str>) -> AgentContainer {
        AgentContainer {
            name: "web".into(),
            state: if exit_code.is_some() { "exited" } else { "running" }.into(),
            restart_count: 0,
            exit_code,
            reason: reason.map(String::from),
        }
    }

    #[test]
    fn the_sandbox_phase_follows_its_containers() {
        assert_eq!(sandbox_phase(&record(false, None), &[]).0, AgentPhase::Creating);
        assert_eq!(sandbox_phase(&record(true, None), &[container(None, None)]).0, AgentPhase::Running);
        let (phase, message) = sandbox_phase(&record(true, None), &[container(Some(137), Some("OOMKilled"))]);
        assert_eq!((phase, message.as_str()), (AgentPhase::Failed, "container web: OOMKilled (exit code 137)"));
        assert_eq!(sandbox_phase(&record(true, None), &[container(Some(0), Some("Completed"))]).0, AgentPhase::Exited);
        let (phase, message) = sandbox_phase(&record(false, Some("pulling x: 404")), &[]);
        assert_eq!((phase, message.as_str()), (AgentPhase::Failed, "pulling x: 404"));
    }
}
