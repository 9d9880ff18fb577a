//! One running agent: its shared state, how it starts, and the handle that controls and stops it.

use crate::config::SimConfig;
use crate::faults::{inject_faults, FaultSwitch, Faults};
use crate::ports::HostPorts;
use crate::server;
use crate::sim::ip_pool::IpPool;
use crate::sim::{tcp_host_ports, Created, Runtime, RuntimeError, RuntimeLimits};
use axum::ServiceExt;
use parking_lot::Mutex;
use sandboxd_api::agent::{AgentCreateRequest, AgentLogs, AgentSandbox, AgentSandboxList, AgentStatus};
use sandboxd_api::time::rfc3339_now;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::{CancellationToken, DropGuard};
use tower::Layer;

/// How long a graceful shutdown may wait for open connections before the server is aborted.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(2);

/// The state one agent's API and admin endpoints share.
#[derive(Debug)]
pub(crate) struct Agent {
    pub(crate) faults: Arc<FaultSwitch>,
    runtime: Mutex<Runtime>,
    ports: HostPorts,
    external: String,
    /// How many times each id was admitted as a new sandbox, so tests can tell a double create;
    /// `None` unless `SimConfig::record_admissions`, since it never forgets an id.
    admissions: Option<Mutex<std::collections::BTreeMap<String, u32>>>,
}

// === impl Agent ===

impl Agent {
    /// Admits a sandbox, publishing its tcp host ports on the agent's IP.
    pub(crate) async fn create_sandbox(&self, request: AgentCreateRequest) -> Result<Created, RuntimeError> {
        // A restart releases listeners without waiting; a port coming back must wait for its old socket.
        self.ports.wait_released(&tcp_host_ports(&request)).await;
        let now = Instant::now();
        let id = request.id.clone();
        let created = self.runtime.lock().create(request, now, rfc3339_now(), |ports| self.ports.publish(ports))?;
        if let (Created::New(_), Some(admissions)) = (&created, &self.admissions) {
            *admissions.lock().entry(id).or_default() += 1;
        }
        Ok(created)
    }

    /// Forgets a sandbox and waits until its host ports are closed.
    pub(crate) async fn delete_sandbox(&self, id: &str) -> Result<(), RuntimeError> {
        let listeners = self.runtime.lock().remove(id)?;
        self.ports.release(listeners).await;
        Ok(())
    }

    pub(crate) fn sandbox(&self, id: &str) -> Result<AgentSandbox, RuntimeError> {
        self.runtime.lock().get(id, Instant::now())
    }

    pub(crate) fn sandbox_page(&self, cursor: &str, limit: usize) -> AgentSandboxList {
        self.runtime.lock().list(cursor, limit, Instant::now())
    }

    pub(crate) fn logs(
        &self,
        id: &str,
        container: Option<&str>,
        tail: Option<usize>,
    ) -> Result<AgentLogs, RuntimeError> {
        self.runtime.lock().logs(id, container, tail, Instant::now())
    }

    pub(crate) fn status(&self) -> AgentStatus {
        self.runtime.lock().status(&self.external)
    }

    pub(crate) fn reconcile(&self) {
        let failed = self.runtime.lock().reconcile();
        if failed > 0 {
            tracing::info!(failed, "reconcile marked sandboxes failed");
        }
    }

    pub(crate) fn fail_sandbox(&self, id: &str, message: &str) -> bool {
        self.runtime.lock().fail(id, message)
    }

    /// Forgets every sandbox like a crashed agent; host ports close in the background.
    pub(crate) fn forget_all_soon(&self) {
        let listeners = self.runtime.lock().forget_all();
        self.ports.release_later(listeners);
    }

    /// Forgets every sandbox like a crashed agent and waits until every host port is closed.
    pub(crate) async fn forget_all(&self) {
        let listeners = self.runtime.lock().forget_all();
        self.ports.release(listeners).await;
        self.ports.wait_all_released().await;
    }
}

#[async_trait::async_trait]
impl crate::backend::Backend for Agent {
    async fn create(&self, request: AgentCreateRequest) -> Result<Created, RuntimeError> {
        self.create_sandbox(request).await
    }
    /// The simulator runs no processes, so there is nothing to stop gracefully: the grace is unused.
    async fn delete(&self, id: &str, _grace: std::time::Duration) -> Result<(), RuntimeError> {
        self.delete_sandbox(id).await
    }
    async fn get(&self, id: &str) -> Result<AgentSandbox, RuntimeError> {
        self.sandbox(id)
    }
    async fn list(&self, cursor: &str, limit: usize) -> AgentSandboxList {
        self.sandbox_page(cursor, limit)
    }
    async fn logs(&self, id: &str, container: Option<&str>, tail: Option<usize>) -> Result<AgentLogs, RuntimeError> {
        Agent::logs(self, id, container, tail)
    }
    async fn status(&self) -> AgentStatus {
        Agent::status(self)
    }
    async fn reconcile(&self) {
        Agent::reconcile(self)
    }
    /// The simulator's built-in commands (`crate::exec::builtin`); nothing runs on the host.
    async fn exec(
        &self,
        id: &str,
        request: &sandboxd_api::dataplane::ExecRequest,
    ) -> Result<crate::exec::ExecProcess, RuntimeError> {
        let sandbox = self.sandbox(id)?;
        if sandbox.phase != sandboxd_api::agent::AgentPhase::Running {
            return Err(RuntimeError::NotRunning(format!("sandbox {id:?} is {}, not running", sandbox.phase.as_str())));
        }
        if let Some(name) = &request.container {
            if !sandbox.containers.iter().any(|c| &c.name == name) {
                return Err(RuntimeError::ContainerNotFound { sandbox: id.to_string(), container: name.clone() });
            }
        }
        Ok(crate::exec::builtin(&request.command))
    }
}

/// Controls a running agent; dropping it stops the agent.
#[derive(Debug)]
pub struct AgentHandle {
    addr: SocketAddr,
    agent: Arc<Agent>,
    stop: CancellationToken,
    server: JoinHandle<()>,
    _stop_on_drop: DropGuard,
}

/// Binds `config.listen` (port 0 picks one) and serves the agent API in the background.
pub async fn start(config: SimConfig) -> io::Result<AgentHandle> {
    let listener = TcpListener::bind(config.listen).await?;
    serve_agent(listener, config)
}

/// Serves an agent on an already bound listener.
pub(crate) fn serve_agent(listener: TcpListener, config: SimConfig) -> io::Result<AgentHandle> {
    let addr = listener.local_addr()?;
    let pool = IpPool::parse(&config.ip_pool).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if let Some(problem) = config.faults.problem() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, problem));
    }
    let stop = CancellationToken::new();
    let faults = Arc::new(FaultSwitch::new(config.faults));
    let limits = RuntimeLimits {
        capacity_cpu_milli: config.capacity_cpu_milli,
        capacity_memory_bytes: config.capacity_memory_bytes,
        create_delay: config.create_delay,
        classes: config.runtime_classes,
    };
    let agent = Arc::new(Agent {
        faults: faults.clone(),
        runtime: Mutex::new(Runtime::new(limits, pool)),
        ports: HostPorts::new(addr.ip(), faults.clone(), stop.clone()),
        external: config.external,
        admissions: config.record_admissions.then(Mutex::default),
    });
    let metrics = crate::metrics::AgentMetrics::new(config.process_metrics);
    let routes = if config.fault_injection {
        server::sim_router(agent.clone(), metrics)
    } else {
        server::router(agent.clone(), metrics)
    };
    let app = axum::middleware::from_fn_with_state(faults, inject_faults).layer(routes.layer(
        axum::middleware::from_fn_with_state(
            crate::auth::AgentToken::new(config.token.as_deref()),
            crate::auth::require_token,
        ),
    ));
    let shutdown = stop.clone().cancelled_owned();
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app.into_make_service()).with_graceful_shutdown(shutdown).await {
            tracing::error!(%addr, error = %e, "agent server stopped");
        }
    });
    tracing::debug!(%addr, "agent listening");
    Ok(AgentHandle { addr, agent, stop: stop.clone(), server, _stop_on_drop: stop.drop_guard() })
}

// === impl AgentHandle ===

impl AgentHandle {
    /// The address the agent API listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the faults in force.
    pub fn set_faults(&self, faults: Faults) {
        self.agent.faults.replace(faults);
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        self.agent.faults.current()
    }

    /// Forgets every sandbox like a crashed agent; host ports close moments later.
    pub fn restart(&self) {
        self.agent.forget_all_soon();
    }

    /// Marks a held sandbox failed with `message`; false when the agent does not hold it.
    pub fn fail_sandbox(&self, id: &str, message: &str) -> bool {
        self.agent.fail_sandbox(id, message)
    }

    /// Ids of every sandbox the agent holds, in order.
    pub fn sandbox_ids(&self) -> Vec<String> {
        self.agent.runtime.lock().ids()
    }

    /// How many times each sandbox id was admitted as new since the agent started (restarts included).
    /// Empty unless the agent was started with `SimConfig::record_admissions`.
    pub fn admissions(&self) -> std::collections::BTreeMap<String, u32> {
        self.agent.admissions.as_ref().map(|a| a.lock().clone()).unwrap_or_default()
    }

    /// Requests answered on the agent's published ports (readiness probes among them) since it started.
    pub fn port_requests_answered(&self) -> u64 {
        self.agent.ports.answered()
    }

    /// How many sandboxes the agent holds now.
    pub fn sandbox_count(&self) -> usize {
        self.agent.sandbox_page("", usize::MAX).items.len()
    }

    /// Tells the agent to stop, without waiting.
    pub(crate) fn begin_shutdown(&self) {
        self.stop.cancel();
    }

    /// Stops the agent, waiting (boundedly) for open connections and until every host port is closed.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let mut server = self.server;
        if timeout(SHUTDOWN_DEADLINE, &mut server).await.is_err() {
            server.abort();
        }
        self.agent.forget_all().await;
    }
}
