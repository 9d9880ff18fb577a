//! The agent's HTTP API over any backend, the sim's `/sim/*` admin endpoints, and the single mapping
//! of errors to status codes.

use crate::agent::Agent;
use crate::backend::{Backend, Created};
use crate::error::RuntimeError;
use crate::faults::Faults;
use crate::metrics::AgentMetrics;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use sandboxd_api::agent::{
    AgentDeleted, AgentPhase, AgentSandboxEnvelope, AgentSandboxList, AgentStatus, ErrorBody, Health,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::sync::{Arc, OnceLock};

type AgentState = State<Arc<Agent>>;
type BackendState = State<Arc<dyn Backend>>;

/// The agent API over any backend, sharing the process-wide route table.
pub(crate) fn router(backend: Arc<dyn Backend>, metrics: Arc<AgentMetrics>) -> Router {
    static ROUTES: OnceLock<Router<Arc<dyn Backend>>> = OnceLock::new();
    ROUTES
        .get_or_init(routes)
        .clone()
        .with_state(backend.clone())
        .merge(crate::dataplane::routes(backend))
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(Extension(metrics))
}

/// The agent API of the simulated runtime, plus its `/sim` admin routes (faults, restart, fail).
pub(crate) fn sim_router(agent: Arc<Agent>, metrics: Arc<AgentMetrics>) -> Router {
    static SIM_ROUTES: OnceLock<Router<Arc<Agent>>> = OnceLock::new();
    let admin = SIM_ROUTES.get_or_init(sim_routes).clone().with_state(agent.clone());
    router(agent, metrics).merge(admin)
}

fn routes() -> Router<Arc<dyn Backend>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/v1/status", get(status))
        .route("/api/v1/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route("/api/v1/sandboxes/{id}", get(get_sandbox).delete(delete_sandbox))
        .route("/api/v1/reconcile", post(reconcile))
        .route("/metrics", get(metrics))
}

fn sim_routes() -> Router<Arc<Agent>> {
    Router::new()
        .route("/sim/faults", get(current_faults).put(replace_faults))
        .route("/sim/restart", post(restart))
        .route("/sim/sandboxes/{id}/fail", post(fail_sandbox))
}

// === agent API ===

async fn healthz() -> Json<Health> {
    Json(Health { ok: true })
}

async fn status(State(agent): BackendState) -> Json<AgentStatus> {
    let mut status = agent.status().await;
    if status.hostname.is_empty() {
        status.hostname = machine_hostname();
    }
    status.arch = std::env::consts::ARCH.to_string();
    Json(status)
}

/// The kernel's host name, or empty where it cannot be read.
fn machine_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

async fn create_sandbox(
    State(agent): BackendState,
    Extension(metrics): Extension<Arc<AgentMetrics>>,
    ApiJson(request): ApiJson<sandboxd_api::agent::AgentCreateRequest>,
) -> Result<(StatusCode, Json<AgentSandboxEnvelope>), ApiError> {
    let (code, sandbox) = match metrics.timed("create", agent.create(request)).await? {
        Created::New(s) => (StatusCode::CREATED, s),
        Created::Existing(s) => (StatusCode::OK, s),
    };
    Ok((code, Json(AgentSandboxEnvelope { sandbox })))
}

#[derive(Debug, Deserialize)]
struct PageParams {
    #[serde(default)]
    cursor: String,
    limit: Option<usize>,
}

async fn list_sandboxes(
    State(agent): BackendState,
    ApiQuery(params): ApiQuery<PageParams>,
) -> Result<Json<AgentSandboxList>, ApiError> {
    let limit = page_limit(params.limit)?;
    Ok(Json(agent.list(&params.cursor, limit).await))
}

fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    sandboxd_api::validate::page_limit(limit).map_err(ApiError::BadRequest)
}

async fn get_sandbox(
    State(agent): BackendState,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<AgentSandboxEnvelope>, ApiError> {
    Ok(Json(AgentSandboxEnvelope { sandbox: agent.get(&id).await? }))
}

/// The longest stop a delete may ask for (a drain's `grace_seconds` is bounded the same way).
const MAX_GRACE_SECONDS: u64 = 3_600;

#[derive(Debug, Deserialize)]
struct DeleteParams {
    /// Seconds the containers get between SIGTERM and SIGKILL; absent or 0 kills at once.
    grace_seconds: Option<u64>,
}

async fn delete_sandbox(
    State(agent): BackendState,
    Extension(metrics): Extension<Arc<AgentMetrics>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(params): ApiQuery<DeleteParams>,
) -> Result<Json<AgentDeleted>, ApiError> {
    let grace = params.grace_seconds.unwrap_or(0);
    if grace > MAX_GRACE_SECONDS {
        return Err(ApiError::BadRequest(format!("grace_seconds: {grace} is more than {MAX_GRACE_SECONDS}")));
    }
    metrics.timed("delete", agent.delete(&id, std::time::Duration::from_secs(grace))).await?;
    Ok(Json(AgentDeleted { id, phase: AgentPhase::Deleted }))
}

/// Prometheus text: runtime operations, image pulls, this agent's sandboxes by state, the process.
async fn metrics(State(agent): BackendState, Extension(metrics): Extension<Arc<AgentMetrics>>) -> Response {
    let text = metrics.render(agent.as_ref()).await;
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn reconcile(State(agent): BackendState, Extension(metrics): Extension<Arc<AgentMetrics>>) -> Json<Health> {
    let started = std::time::Instant::now();
    agent.reconcile().await;
    metrics.observe_operation("reconcile", true, started.elapsed());
    Json(Health { ok: true })
}

// === /sim admin endpoints ===

async fn current_faults(State(agent): AgentState) -> Json<Faults> {
    Json(agent.faults.current())
}

async fn replace_faults(State(agent): AgentState, ApiJson(faults): ApiJson<Faults>) -> Result<Json<Faults>, ApiError> {
    if let Some(problem) = faults.problem() {
        return Err(ApiError::BadRequest(problem));
    }
    agent.faults.replace(faults.clone());
    Ok(Json(faults))
}

async fn restart(State(agent): AgentState) -> Json<Health> {
    agent.forget_all().await;
    Json(Health { ok: true })
}

#[derive(Debug, Deserialize)]
struct FailRequest {
    #[serde(default)]
    message: String,
}

async fn fail_sandbox(
    State(agent): AgentState,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<FailRequest>,
) -> Result<Json<AgentSandboxEnvelope>, ApiError> {
    if !agent.fail_sandbox(&id, &request.message) {
        return Err(RuntimeError::SandboxNotFound(id).into());
    }
    Ok(Json(AgentSandboxEnvelope { sandbox: agent.sandbox(&id)? }))
}

// === errors and extractors ===

/// Everything an agent endpoint can answer with instead of success.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{0}")]
    BadRequest(String),
    #[error("no such route")]
    NoRoute,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    TooMany(String),
}

impl ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Runtime(RuntimeError::Invalid(_) | RuntimeError::BadPath(_)) | ApiError::BadRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Runtime(
                RuntimeError::SandboxNotFound(_) | RuntimeError::ContainerNotFound { .. } | RuntimeError::NoSuchPath(_),
            )
            | ApiError::NoRoute => StatusCode::NOT_FOUND,
            ApiError::Runtime(
                RuntimeError::SpecConflict(_)
                | RuntimeError::Deleting(_)
                | RuntimeError::PortTaken { .. }
                | RuntimeError::PortUnavailable(_)
                | RuntimeError::InsufficientCpu { .. }
                | RuntimeError::InsufficientMemory { .. }
                | RuntimeError::PoolExhausted
                | RuntimeError::NotRunning(_),
            ) => StatusCode::CONFLICT,
            ApiError::Runtime(RuntimeError::TooLarge(_)) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Runtime(RuntimeError::Unsupported(_)) => StatusCode::NOT_IMPLEMENTED,
            ApiError::Runtime(RuntimeError::Failed(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status_code(), Json(ErrorBody { error: self.to_string() })).into_response()
    }
}

/// A JSON body parsed whatever its content type, answering 400 `{"error"}` when malformed.
pub(crate) struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let body = Bytes::from_request(request, state).await.map_err(|e| ApiError::BadRequest(e.body_text()))?;
        serde_json::from_slice(&body)
            .map(ApiJson)
            .map_err(|e| ApiError::BadRequest(format!("malformed request body: {e}")))
    }
}

/// Query parameters answering 400 `{"error"}` when malformed.
pub(crate) struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(value) =
            Query::from_request_parts(parts, state).await.map_err(|e| ApiError::BadRequest(e.body_text()))?;
        Ok(ApiQuery(value))
    }
}

/// Path parameters answering 400 `{"error"}` when malformed.
pub(crate) struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(value) =
            Path::from_request_parts(parts, state).await.map_err(|e| ApiError::BadRequest(e.body_text()))?;
        Ok(ApiPath(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_limit_defaults_and_bounds() {
        assert_eq!(page_limit(None).unwrap(), 100);
        assert_eq!(page_limit(Some(1)).unwrap(), 1);
        assert_eq!(page_limit(Some(1000)).unwrap(), 1000);
        assert!(page_limit(Some(0)).is_err());
        assert!(page_limit(Some(1001)).is_err());
    }

    #[test]
    fn conflicts_map_to_409_and_absence_to_404() {
        let capacity = ApiError::Runtime(RuntimeError::InsufficientMemory { requested: 2, available: 1, capacity: 1 });
        assert_eq!(capacity.status_code(), StatusCode::CONFLICT);
        assert_eq!(ApiError::Runtime(RuntimeError::SandboxNotFound("a".into())).status_code(), StatusCode::NOT_FOUND);
        assert_eq!(ApiError::Runtime(RuntimeError::Invalid("x".into())).status_code(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn data_plane_errors_have_one_status_each() {
        let status = |e: RuntimeError| ApiError::Runtime(e).status_code();
        assert_eq!(status(RuntimeError::NotRunning("x".into())), StatusCode::CONFLICT);
        assert_eq!(status(RuntimeError::NoSuchPath("x".into())), StatusCode::NOT_FOUND);
        assert_eq!(status(RuntimeError::BadPath("x".into())), StatusCode::BAD_REQUEST);
        assert_eq!(status(RuntimeError::TooLarge("x".into())), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(status(RuntimeError::Unsupported("x".into())), StatusCode::NOT_IMPLEMENTED);
        assert_eq!(ApiError::TooMany("x".into()).status_code(), StatusCode::TOO_MANY_REQUESTS);
    }
}
