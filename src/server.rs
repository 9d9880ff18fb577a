//! Wiring of a running orchestrator: store, static nodes, API server and graceful shutdown.

use crate::agent_client::HttpAgentClient;
use crate::apiserver::{self, ApiState};
use crate::config::Config;
use crate::store::{self, Store, StoreError, StoreOptions};
use crate::tls;
use sandboxd_api::node::NodeSpec;
use sandboxd_controllers::node::NodeSettings;
use sandboxd_controllers::AgentClient;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    // Not `#[from]`: that would also make it the source, and `{:#}` would print the message twice.
    #[error("store: {0}")]
    Store(StoreError),
    #[error("config: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("listening on {addr}: {error} (is another sandboxd-o running? set --listen)")]
    Bind { addr: SocketAddr, error: std::io::Error },
    #[error("config node {id}: {message}")]
    StaticNode { id: String, message: String },
    #[error("leader election: {0}")]
    Lease(String),
    #[error("serving: {0}")]
    Serve(std::io::Error),
    #[error("audit log {}: {error}", path.display())]
    Audit { path: std::path::PathBuf, error: std::io::Error },
    #[error("credentials: {0}")]
    Credentials(#[from] crate::tls::TlsError),
}

impl From<StoreError> for ServeError {
    fn from(e: StoreError) -> Self {
        ServeError::Store(e)
    }
}

/// What a process runs besides the API.
#[derive(Debug, Clone)]
pub enum Mode {
    /// API, store and these controllers (`serve --controllers`; all of them by default).
    AllInOne(Vec<&'static str>),
    /// API, store, and the chosen controllers each behind its leader lease, so several servers can
    /// share one etcd: a server that loses a lease stops its controllers and stands by again.
    AllInOneElected(crate::controllers::Candidacy),
    /// API and store only.
    ApiOnly,
}

impl Mode {
    /// Only the process that heartbeats the nodes may judge their stored states stale.
    fn runs_node_controller(&self) -> bool {
        match self {
            Mode::AllInOne(only) => only.contains(&"node"),
            Mode::AllInOneElected(candidacy) => candidacy.only.iter().any(|c| c == "node"),
            Mode::ApiOnly => false,
        }
    }
}

/// A started server: its address and the handle to stop it.
pub struct Running {
    pub addr: SocketAddr,
    /// Where `system_listen` serves, when it is on.
    pub system_addr: Option<SocketAddr>,
    pub shutdown: CancellationToken,
    pub store: Arc<dyn Store>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl Running {
    /// Waits for the server to stop (after `shutdown` is cancelled) and the store to flush.
    pub async fn wait(self) -> Result<(), ServeError> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(ServeError::Serve(std::io::Error::other(e))),
        }
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(self) -> Result<(), ServeError> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// Binds the listener, opens the store, declares static nodes and serves until `shutdown`.
fn store_options(config: &Config) -> StoreOptions {
    let mut options = StoreOptions::default();
    options.history.max_bytes = config.watch_history_bytes;
    options.commit_delay = config.store_commit_delay;
    options
}

pub async fn start(config: Config, mode: Mode) -> Result<Running, ServeError> {
    // Bind first: a second server started by mistake must fail before it touches the store.
    let wanted = config.insecure_listen.unwrap_or(config.listen);
    let listener =
        tokio::net::TcpListener::bind(wanted).await.map_err(|error| ServeError::Bind { addr: wanted, error })?;
    let system_listener = config.system_listen.map(bind_system_listener).transpose()?;
    if let Mode::AllInOneElected(candidacy) = &mode {
        candidacy.lease.validate().map_err(ServeError::Lease)?;
    }
    let local = listener.local_addr().map_err(ServeError::Serve)?;
    let security = security(&config, local)?;
    let store = store::open(&config.store, store_options(&config)).await?;
    let auth = authenticator(&security, store.clone());
    let mut agent_client = HttpAgentClient::new(config.agent_timeout).with_policy(config.agent_policy.clone());
    if let Some(secret) = &security.agent_secret {
        agent_client = agent_client.with_agent_secret(secret);
    }
    let agents: Arc<dyn AgentClient> = Arc::new(agent_client.clone());
    let mut state =
        ApiState::new(store.clone(), &config).with_auth(auth).with_agents(agents.clone()).with_data_plane(agent_client);
    if let Some(path) = &config.audit_log {
        let audit = apiserver::audit::AuditLog::start(path.clone(), config.audit_log_max_bytes)
            .map_err(|error| ServeError::Audit { path: path.clone(), error })?;
        state = state.with_audit(audit);
    }
    // On-demand heartbeats (`POST /api/v1/nodes/{name}/heartbeat`) report state changes as events too.
    let recorder = sandboxd_controllers::events::Recorder::new(Arc::new(crate::objects::InProcessObjects::new(
        state.registry.clone(),
    )));
    state = state.with_node_events(sandboxd_controllers::events::Events::new(&recorder, "api-server"));
    declare_static_nodes(&state, &config).await?;
    if mode.runs_node_controller() {
        let keep_fresh_states = matches!(mode, Mode::AllInOneElected(_));
        forget_stale_node_states(&state, &config, keep_fresh_states).await?;
    }
    let addr = listener.local_addr().map_err(ServeError::Serve)?;
    let shutdown = state.shutdown.clone();
    let mut controllers = match mode {
        Mode::AllInOne(ref only) => {
            let objects = Arc::new(crate::objects::InProcessObjects::new(state.registry.clone()));
            crate::controllers::start(objects, &config, agents, only, shutdown.clone())
        }
        Mode::AllInOneElected(ref candidacy) => {
            let objects = Arc::new(crate::objects::InProcessObjects::new(state.registry.clone()));
            let mut tasks = tokio::task::JoinSet::new();
            let (config, candidacy) = (config.clone(), candidacy.clone());
            tasks.spawn(campaign_until_shutdown(objects, agents, config, candidacy, shutdown.clone()));
            tasks
        }
        Mode::ApiOnly => tokio::task::JoinSet::new(),
    };
    controllers.spawn(sweep_events(state.registry.clone(), config.event_ttl, config.event_max, shutdown.clone()));
    controllers.spawn(recorder.run(shutdown.clone()));
    let router = apiserver::router(state, config.max_body_bytes);
    tracing::info!(%addr, store = %config.store, ?mode, "sandboxd-o serving");
    let limits = crate::http_server::Limits {
        header_read_timeout: config.header_read_timeout,
        max_connections: crate::http_server::connection_budget(config.max_connections),
        tls: security.tls.clone(),
    };
    let system_addr =
        system_listener.as_ref().map(std::net::TcpListener::local_addr).transpose().map_err(ServeError::Serve)?;
    let system_thread = match system_listener {
        Some(listener) => {
            tracing::info!(addr = ?system_addr, "serving controllers, nodes, /metrics and /healthz on system_listen");
            let limits = crate::http_server::Limits {
                max_connections: crate::http_server::SYSTEM_MAX_CONNECTIONS,
                ..limits.clone()
            };
            let router = router.clone().layer(axum::Extension(apiserver::SystemListener));
            Some(spawn_system_listener(listener, router, limits, shutdown.clone())?)
        }
        None => None,
    };
    let serving = Serving { router, limits, system_thread };
    let task = tokio::spawn(serve(listener, serving, store.clone(), controllers, shutdown.clone()));
    Ok(Running { addr, system_addr, shutdown, store, task })
}

/// Binds `system_listen` before anything else starts, like the main listener.
fn bind_system_listener(addr: SocketAddr) -> Result<std::net::TcpListener, ServeError> {
    let listener = std::net::TcpListener::bind(addr).map_err(|error| ServeError::Bind { addr, error })?;
    listener.set_nonblocking(true).map_err(ServeError::Serve)?;
    Ok(listener)
}

/// Serves `router` on `listener` from a thread and runtime of its own until `shutdown`: its
/// requests never wait in the run queue of the main listener's tasks, however many a user flood
/// makes there, so controllers, nodes, scrapes and health checks keep being answered.
fn spawn_system_listener(
    listener: std::net::TcpListener,
    router: axum::Router,
    limits: crate::http_server::Limits,
    shutdown: CancellationToken,
) -> Result<std::thread::JoinHandle<()>, ServeError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ServeError::Serve)?;
    std::thread::Builder::new()
        .name("system-listener".into())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => crate::http_server::serve(listener, router, limits, shutdown).await,
                    Err(e) => tracing::error!(error = %e, "system_listen: cannot serve"),
                }
            })
        })
        .map_err(ServeError::Serve)
}

/// What the main task serves: the router on the main listener, and the system listener's thread.
struct Serving {
    router: axum::Router,
    limits: crate::http_server::Limits,
    system_thread: Option<std::thread::JoinHandle<()>>,
}

/// How often expired and surplus events are deleted: often enough that a busy server (hundreds of
/// new events a second) holds little more than `event_max` (a sweep of 20,000 events decodes them
/// in tens of milliseconds).
const EVENT_SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Deletes events past `event_ttl` and beyond `event_max`, every 10 s until `shutdown`. Each API
/// server sweeps; two sweeping at once delete the same events, which is harmless.
async fn sweep_events(registry: crate::registry::Registry, ttl: Duration, max: usize, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(EVENT_SWEEP_EVERY) => {}
        }
        match registry.sweep_events(ttl.as_secs() as i64, max).await {
            Ok(swept) if swept.expired + swept.over_max > 0 => {
                tracing::info!(expired = swept.expired, over_max = swept.over_max, "events swept");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "event sweep failed; retrying soon"),
        }
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    serving: Serving,
    store: Arc<dyn Store>,
    mut controllers: tokio::task::JoinSet<()>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let Serving { router, limits, system_thread } = serving;
    let served = tokio::spawn(crate::http_server::serve(listener, router, limits, shutdown.clone()));
    shutdown.cancelled().await;
    // In-flight requests get a bounded time to finish; watches end at once with the token.
    let system_served = tokio::task::spawn_blocking(move || system_thread.map(|thread| thread.join()));
    if tokio::time::timeout(Duration::from_secs(10), async { (served.await, system_served.await) }).await.is_err() {
        tracing::warn!("requests still open after 10s; stopping anyway");
    }
    // Controllers finish their current reconcile and stop; their writes land before the store closes.
    if tokio::time::timeout(Duration::from_secs(5), async { while controllers.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tracing::warn!("controllers still busy after 5s; stopping anyway");
        controllers.abort_all();
    }
    store.close().await;
    tracing::info!("sandboxd-o stopped; store flushed");
    Ok(())
}

/// Runs the elected controllers; after losing a lease, stands by again instead of taking the API down.
async fn campaign_until_shutdown(
    objects: Arc<crate::objects::InProcessObjects>,
    agents: Arc<dyn AgentClient>,
    config: Config,
    candidacy: crate::controllers::Candidacy,
    shutdown: CancellationToken,
) {
    loop {
        let result = crate::controllers::run_elected(
            objects.clone(),
            objects.clone(),
            agents.clone(),
            &config,
            &candidacy,
            shutdown.clone(),
        )
        .await;
        match result {
            Ok(()) => return,
            Err(e) => tracing::error!(error = %e, "controllers stopped; standing by for the leases again"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(candidacy.lease.retry) => {}
        }
    }
}

/// Tokens required when there is an admin token; none only under `insecure_listen` without one.
fn authenticator(security: &Security, store: Arc<dyn Store>) -> apiserver::auth::Authenticator {
    use apiserver::auth::{Authenticator, Identity};
    match &security.admin_token {
        Some(token) => Authenticator::required(store, vec![(token.clone(), Identity::bootstrap_admin())]),
        None => Authenticator::open(store),
    }
}

/// How the server is reached and how it reaches agents.
pub struct Security {
    /// `None`: plain HTTP (`insecure_listen`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The bootstrap admin's token; `None`: no authentication.
    pub admin_token: Option<String>,
    /// What each node's agent token is derived from (`tls::agent_token`).
    pub agent_secret: Option<String>,
}

/// Secure by default: HTTPS and tokens, made under `data_dir` on first start, with a client config
/// for `sbxctl`. `insecure_listen` opts out (loopback only), keeping token files that are named.
pub fn security(config: &Config, local: SocketAddr) -> Result<Security, ServeError> {
    let agent_secret = agent_secret(config)?;
    if config.insecure_listen.is_some() {
        tracing::warn!(addr = %local, "insecure_listen: plain HTTP, and no authentication unless auth_token_file is set; for local development only");
        return Ok(Security { tls: None, admin_token: config.auth_token()?, agent_secret });
    }
    let dir = &config.data_dir;
    tls::private_dir(dir)?;
    for path in generated_files(config) {
        tls::tighten(&path)?;
    }
    for path in [&config.auth_token_file, &config.agent_secret_file, &config.tls_key_file].into_iter().flatten() {
        tls::warn_if_loose(path);
    }
    let admin_token = match config.auth_token()? {
        Some(token) => token,
        None => tls::read_or_create(&dir.join(tls::ADMIN_TOKEN), || format!("sbx_admin_{}", tls::random_secret()))?
            .trim()
            .to_string(),
    };
    let (cert, key, ca_pem) = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone(), None),
        _ => {
            let ca = tls::ensure_pki(dir, &tls::serving_names(local, &config.tls_san))?;
            (dir.join(tls::SERVER_CERT), dir.join(tls::SERVER_KEY), Some(ca))
        }
    };
    let server_tls = tls::server_config(&cert, &key)?;
    let client = sandboxd_client::ClientConfig {
        server: tls::client_url(local, true),
        ca_pem,
        token: Some(admin_token.clone()),
    };
    let client_path = dir.join(tls::CLIENT_CONFIG);
    tls::write_client_config(&client_path, &client)?;
    tracing::info!(url = %client.server, client_config = %client_path.display(), "serving HTTPS; sbxctl reads the client config");
    Ok(Security { tls: Some(server_tls), admin_token: Some(admin_token), agent_secret })
}

/// The files the server makes under `data_dir`, and a SQLite store inside it: tightened to 0600
/// at start. Files the operator names elsewhere are only warned about: they may be shared on
/// purpose (a group-readable key) or on a read-only mount.
fn generated_files(config: &Config) -> Vec<std::path::PathBuf> {
    let dir = &config.data_dir;
    let mut files: Vec<std::path::PathBuf> =
        [tls::CA_KEY, tls::SERVER_KEY, tls::ADMIN_TOKEN, tls::AGENT_SECRET, tls::CLIENT_CONFIG]
            .iter()
            .map(|f| dir.join(f))
            .collect();
    if let Some(db) = config.store.strip_prefix("sqlite://").filter(|db| std::path::Path::new(db).starts_with(dir)) {
        files.extend(["", "-wal", "-shm"].iter().map(|suffix| std::path::PathBuf::from(format!("{db}{suffix}"))));
    }
    files
}

/// The agent secret when there is one already, made by nobody: `agent_secret_file`'s, else
/// `<data_dir>/agent.secret` if it exists (for `agent-token` and remote controllers, which must
/// use the orchestrator's secret and never make one of their own).
pub fn existing_agent_secret(config: &Config) -> Result<Option<String>, ServeError> {
    if let Some(path) = &config.agent_secret_file {
        return Ok(Some(Config::read_token("agent_secret_file", path)?));
    }
    let path = config.data_dir.join(tls::AGENT_SECRET);
    match path.exists() {
        true => Ok(Some(Config::read_token("data_dir", &path)?)),
        false => Ok(None),
    }
}

/// The secret every node's agent token is derived from: `agent_secret_file`'s, else (unless
/// `insecure_listen`) `<data_dir>/agent.secret`, made on first start.
pub fn agent_secret(config: &Config) -> Result<Option<String>, ServeError> {
    if let Some(path) = &config.agent_secret_file {
        return Ok(Some(Config::read_token("agent_secret_file", path)?));
    }
    if config.insecure_listen.is_some() {
        return Ok(None);
    }
    tls::private_dir(&config.data_dir)?;
    let secret = tls::read_or_create(&config.data_dir.join(tls::AGENT_SECRET), tls::random_secret)?;
    Ok(Some(secret.trim().to_string()))
}

/// Node states from before this start say nothing now: they are reset before the first request is
/// answered, so no client reads a Ready that no heartbeat of this run has confirmed.
async fn forget_stale_node_states(
    state: &ApiState,
    config: &Config,
    keep_fresh_states: bool,
) -> Result<(), ServeError> {
    let (stored, _) = state.store.list(crate::store::Kind::Nodes).await?;
    let nodes: Vec<sandboxd_api::Node> = stored.iter().map(|v| v.decode()).collect::<Result<_, _>>()?;
    let settings = NodeSettings { keep_fresh_states, ..apiserver::node_settings(config) };
    let objects = crate::objects::InProcessObjects::new(state.registry.clone());
    sandboxd_controllers::node::forget_stale_states(&objects, nodes.iter(), &settings).await;
    Ok(())
}

async fn declare_static_nodes(state: &ApiState, config: &Config) -> Result<(), ServeError> {
    for node in &config.nodes {
        let spec = NodeSpec {
            ip: node.ip.clone(),
            port: i64::from(node.port),
            external: node.external.clone(),
            max_alloc_percent: node.max_alloc_percent.map(i64::from),
            // A restart declares config nodes again; it must not uncordon them.
            unschedulable: None,
            labels: node.labels.clone(),
            taints: node.taints.clone(),
        };
        apiserver::register_static_node(state, &node.id, &spec)
            .await
            .map_err(|e| ServeError::StaticNode { id: node.id.clone(), message: e.to_string() })?;
    }
    Ok(())
}
