//! The HTTP API: routes for nodes, sandboxes and watches over the store.

pub mod audit;
pub mod auth;
mod dataplane;
mod error;
mod events;
mod extract;
mod leases;
mod multiwatch;
mod nodes;
mod openapi;
mod proxy;
mod respond;
mod sandboxes;
pub mod shedding;
mod tokens;
mod watch;

pub use error::{ApiError, ApiResult};
pub use extract::parse_json;

use crate::config::Config;
use crate::registry::Registry;
use crate::store::Store;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use sandboxd_api::validate::SandboxPolicy;
use sandboxd_controllers::node::NodeSettings;
use sandboxd_controllers::AgentClient;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What every handler shares: one allocation behind a reference count, because axum clones the
/// state for every extractor and middleware of every request (a struct of twenty handles cost 12 %
/// of the server's CPU in store-create).
#[derive(Clone)]
pub struct ApiState(Arc<ApiShared>);

impl std::ops::Deref for ApiState {
    type Target = ApiShared;

    fn deref(&self) -> &ApiShared {
        &self.0
    }
}

/// The fields of `ApiState`.
#[derive(Clone)]
pub struct ApiShared {
    /// Reads, lists and watches; every write goes through `registry`.
    pub store: Arc<dyn Store>,
    pub registry: Registry,
    pub policy: SandboxPolicy,
    pub default_max_alloc_percent: u32,
    /// Who callers are; open (everyone is the anonymous admin) unless `with_auth` sets one.
    pub auth: auth::Authenticator,
    /// One line per mutating request, when `audit_log` is set.
    pub audit: audit::AuditLog,
    /// Cancelled on shutdown so open watch streams end and let the server drain.
    pub shutdown: CancellationToken,
    /// Node agent client for the node proxy, heartbeats and the status call on node create; `None` makes no agent calls.
    pub agents: Option<Arc<dyn AgentClient>>,
    pub node_settings: NodeSettings,
    /// Agent client of the data plane (exec, files, logs); `None` answers those routes with 503.
    pub data_plane: Option<crate::agent_client::HttpAgentClient>,
    /// Largest upload through the data plane.
    pub max_file_bytes: u64,
    /// Requests in flight per priority class.
    pub shedder: shedding::Shedder,
    /// Open HTTP watches, bounded by `max_watches`.
    pub watch_slots: watch::WatchSlots,
    /// How far one HTTP watcher may fall behind, live and in replay.
    pub watch_limits: crate::store::WatchLimits,
}

impl ApiState {
    /// State for a store with the settings of `config`.
    pub fn new(store: Arc<dyn Store>, config: &Config) -> ApiState {
        ApiState(Arc::new(ApiShared {
            auth: auth::Authenticator::open(store.clone()),
            audit: audit::AuditLog::default(),
            registry: Registry::new(store.clone(), config),
            store,
            policy: config.sandbox_policy(),
            default_max_alloc_percent: config.max_alloc_percent,
            shutdown: CancellationToken::new(),
            agents: None,
            node_settings: node_settings(config),
            data_plane: None,
            max_file_bytes: config.max_file_bytes,
            shedder: shedding::Shedder::with_share(
                shedding::InflightLimits {
                    system: config.max_inflight_system,
                    workload: config.max_inflight_workload,
                    long_running: config.max_inflight_long_running,
                },
                config.max_inflight_share,
            ),
            watch_slots: watch::WatchSlots::new(config.max_watches, config.max_watches_per_identity),
            watch_limits: crate::store::WatchLimits {
                buffer: config.watch_buffer,
                max_replay: config.watch_max_replay,
            },
        }))
    }

    /// The fields, to set while the state is being built (a copy if it is already shared).
    fn building(&mut self) -> &mut ApiShared {
        Arc::make_mut(&mut self.0)
    }

    /// The same state, authenticating callers with `auth`.
    pub fn with_auth(mut self, auth: auth::Authenticator) -> ApiState {
        self.building().auth = auth;
        self
    }

    /// The same state, writing the audit log to `audit`.
    pub fn with_audit(mut self, audit: audit::AuditLog) -> ApiState {
        self.building().audit = audit;
        self
    }

    /// The same state, calling node agents through `agents`.
    pub fn with_agents(mut self, agents: Arc<dyn AgentClient>) -> ApiState {
        let shared = self.building();
        shared.registry = shared.registry.clone().with_agents(agents.clone());
        shared.agents = Some(agents);
        self
    }

    /// The same state, serving exec, files and logs through `client`.
    pub fn with_data_plane(mut self, client: crate::agent_client::HttpAgentClient) -> ApiState {
        self.building().data_plane = Some(client);
        self
    }

    /// The same state, reporting node state changes of on-demand heartbeats through `events`.
    pub fn with_node_events(mut self, events: sandboxd_controllers::events::Events) -> ApiState {
        self.building().node_settings.events = events;
        self
    }

    /// The same state, its registry stamping times from `clock` (tests).
    pub fn with_clock(mut self, clock: Arc<dyn sandboxd_contracts::clock::Clock>) -> ApiState {
        let shared = self.building();
        shared.registry = shared.registry.clone().with_clock(clock);
        self
    }
}

/// Node controller settings from configuration.
pub fn node_settings(config: &Config) -> NodeSettings {
    NodeSettings {
        heartbeat_interval: config.heartbeat_interval,
        heartbeat_timeout: config.heartbeat_timeout,
        ready_threshold: config.node_ready_threshold,
        failure_threshold: config.node_failure_threshold,
        default_max_alloc_percent: config.max_alloc_percent,
        node_lost_grace: config.node_lost_grace,
        ..NodeSettings::default()
    }
}

/// Marks a request that came in on `system_listen`, which answers only controllers, nodes and
/// system-class routes (`shedding::serves_on_system_listener`).
#[derive(Debug, Clone, Copy)]
pub struct SystemListener;

/// The whole API as an axum router.
pub fn router(state: ApiState, max_body_bytes: usize) -> Router {
    let api = Router::new()
        .route("/api/v1/nodes", post(nodes::create_or_update).get(nodes::list))
        .route("/api/v1/nodes/{name}", get(nodes::get_one).delete(nodes::delete))
        .route("/api/v1/nodes/{name}/status", put(nodes::put_status))
        .route("/api/v1/nodes/{name}/drain", post(nodes::drain))
        .route("/api/v1/nodes/{name}/heartbeat", post(proxy::heartbeat))
        .route("/api/v1/nodes/{name}/reconcile", post(proxy::reconcile))
        .route("/api/v1/nodes/{name}/sandboxes", get(proxy::list_sandboxes).post(proxy::create_sandbox))
        .route("/api/v1/nodes/{name}/sandboxes/{id}", get(proxy::get_sandbox).delete(proxy::delete_sandbox))
        .route("/api/v1/nodes/{name}/sandboxes/{id}/logs", get(proxy::logs))
        .route("/api/v1/nodes/{name}/sandboxes/{id}/containers/{container}/logs", get(proxy::container_logs))
        .route("/api/v1/sandboxes", post(sandboxes::create).get(sandboxes::list))
        .route("/api/v1/sandboxes/{id}", get(sandboxes::get_one).put(sandboxes::update_spec).delete(sandboxes::delete))
        .route("/api/v1/sandboxes/{id}/status", put(sandboxes::put_status))
        .route("/api/v1/sandboxes/{id}/finalize", post(sandboxes::finalize))
        .route("/api/v1/sandboxes/{id}/exec", post(dataplane::exec))
        .route("/api/v1/sandboxes/{id}/exec/stream", get(dataplane::exec_stream))
        .route(
            "/api/v1/sandboxes/{id}/files",
            get(dataplane::read_file).put(dataplane::write_file).delete(dataplane::delete_file),
        )
        .route("/api/v1/sandboxes/{id}/files/archive", get(dataplane::read_archive).put(dataplane::write_archive))
        .route("/api/v1/sandboxes/{id}/logs", get(dataplane::logs))
        .route("/api/v1/events", post(events::record).get(events::list))
        .route("/api/v1/watch", post(multiwatch::watch_many))
        .route("/api/v1/leases", post(leases::create).get(leases::list))
        .route("/api/v1/leases/{name}", get(leases::get_one).put(leases::update).delete(leases::delete))
        .route("/api/v1/tokens", post(tokens::issue).get(tokens::list))
        .route("/api/v1/tokens/{id}", axum::routing::delete(tokens::revoke))
        .route("/api/v1/whoami", get(tokens::whoami))
        .route("/openapi.json", get(openapi::document))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::guard));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn(reject_long_uri))
        .layer(axum::middleware::from_fn(errors_as_json))
        .layer(axum::middleware::from_fn(crate::metrics::time_request))
        .with_state(state)
}

/// Longest request target (path and query) the API reads. Longer ones get a JSON 414 here; beyond
/// 64 KiB hyper answers 414 itself, with an empty body, before any of this code runs.
pub const MAX_URI_BYTES: usize = 16 * 1024;

async fn reject_long_uri(request: Request, next: Next) -> Response {
    let length = request.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if length > MAX_URI_BYTES {
        return ApiError::UriTooLong(format!("request target is {length} bytes, more than {MAX_URI_BYTES}"))
            .into_response();
    }
    next.run(request).await
}

/// Largest error text kept from a rejection that is not already JSON.
const MAX_REJECTION_TEXT: usize = 1024;

/// Every error is `{"error": ...}`: rejections that axum answers itself in plain text (a path that
/// is not UTF-8, a malformed header) are rewritten, so clients parse one shape.
async fn errors_as_json(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let body = axum::body::to_bytes(response.into_body(), MAX_REJECTION_TEXT * 4).await.unwrap_or_default();
    let text: String = String::from_utf8_lossy(&body).chars().take(MAX_REJECTION_TEXT).collect();
    let text = if text.trim().is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { text };
    (status, Json(serde_json::json!({ "error": text.trim() }))).into_response()
}

#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The server is up")))]
async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "ok": true }))
}

/// The Prometheus text exposition of every family of the process, with this server's gauges read now.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format 0.0.4: work queues, reconciles, API requests, store commits, agent calls, heartbeat lag, sandbox startup, nodes by state, sandboxes by phase, leader status, process", content_type = "text/plain")))]
async fn metrics(State(state): State<ApiState>) -> Response {
    use sandboxd_controllers::runtime::metrics::saturating_i64;
    let server = &*crate::metrics::SERVER;
    server.watches_open.set(saturating_i64(state.watch_slots.open()));
    server.watch_identities.set(saturating_i64(state.watch_slots.identities()));
    server.inflight_identity_shares.set(saturating_i64(state.shedder.identities_holding()));
    for class in shedding::Class::ALL {
        server.inflight.with_label_values(&[class.as_str()]).set(saturating_i64(state.shedder.in_flight(class)));
    }
    crate::metrics::exposition()
}

async fn not_found(request: Request) -> ApiError {
    ApiError::NotFound(format!("no route for {} {}", request.method(), request.uri().path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

pub use sandboxd_contracts::clock::{rfc3339_now as now, unix_now};

/// Registers (or refreshes) a node declared in the configuration file, with `source: config`.
pub async fn register_static_node(state: &ApiState, id: &str, spec: &sandboxd_api::node::NodeSpec) -> ApiResult<()> {
    state.registry.register_node(id, spec, sandboxd_api::NodeSource::Config).await?;
    Ok(())
}
