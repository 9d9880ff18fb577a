//! The agent's HTTP API and `/sim/*` admin endpoints, with the single mapping of errors to status codes.

use crate::agent::Agent;
use crate::faults::Faults;
use crate::sim::{Created, SimError};
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sandboxd_api::agent::{
    AgentDeleted, AgentLogs, AgentPhase, AgentSandboxEnvelope, AgentSandboxList, AgentStatus, ErrorBody, Health,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::sync::{Arc, OnceLock};

type AgentState = State<Arc<Agent>>;

/// The routes of one agent, sharing the process-wide route table.
pub(crate) fn router(agent: Arc<Agent>) -> Router {
    static ROUTES: OnceLock<Router<Arc<Agent>>> = OnceLock::new();
    ROUTES.get_or_init(routes).clone().with_state(agent)
}

fn routes() -> Router<Arc<Agent>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/v1/status", get(status))
        .route("/api/v1/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route("/api/v1/sandboxes/{id}", get(get_sandbox).delete(delete_sandbox))
        .route("/api/v1/sandboxes/{id}/logs", get(sandbox_logs))
        .route("/api/v1/sandboxes/{id}/containers/{container}/logs", get(container_logs))
        .route("/api/v1/reconcile", post(reconcile))
        .route("/sim/faults", get(current_faults).put(replace_faults))
        .route("/sim/restart", post(restart))
        .route("/sim/sandboxes/{id}/fail", post(fail_sandbox))
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
}

// === agent API ===

async fn healthz() -> Json<Health> {
    Json(Health { ok: true })
}

async fn status(State(agent): AgentState) -> Json<AgentStatus> {
    Json(agent.status())
}

async fn create_sandbox(
    State(agent): AgentState,
    ApiJson(request): ApiJson<sandboxd_api::agent::AgentCreateRequest>,
) -> Result<(StatusCode, Json<AgentSandboxEnvelope>), ApiError> {
    let (code, sandbox) = match agent.create_sandbox(request).await? {
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
    State(agent): AgentState,
    ApiQuery(params): ApiQuery<PageParams>,
) -> Result<Json<AgentSandboxList>, ApiError> {
    let limit = page_limit(params.limit)?;
    Ok(Json(agent.sandbox_page(&params.cursor, limit)))
}

fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    sandboxd_api::validate::page_limit(limit).map_err(ApiError::BadRequest)
}

async fn get_sandbox(
    State(agent): AgentState,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<AgentSandboxEnvelope>, ApiError> {
    Ok(Json(AgentSandboxEnvelope { sandbox: agent.sandbox(&id)? }))
}

async fn delete_sandbox(
    State(agent): AgentState,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<AgentDeleted>, ApiError> {
    agent.delete_sandbox(&id).await?;
    Ok(Json(AgentDeleted { id, phase: AgentPhase::Deleted }))
}

#[derive(Debug, Deserialize)]
struct TailParams {
    tail: Option<usize>,
}

async fn sandbox_logs(
    State(agent): AgentState,
    ApiPath(id): ApiPath<String>,
    ApiQuery(params): ApiQuery<TailParams>,
) -> Result<Json<AgentLogs>, ApiError> {
    Ok(Json(agent.logs(&id, None, params.tail)?))
}

async fn container_logs(
    State(agent): AgentState,
    ApiPath((id, container)): ApiPath<(String, String)>,
    ApiQuery(params): ApiQuery<TailParams>,
) -> Result<Json<AgentLogs>, ApiError> {
    Ok(Json(agent.logs(&id, Some(&container), params.tail)?))
}

async fn reconcile(State(agent): AgentState) -> Json<Health> {
    agent.reconcile();
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
        return Err(SimError::SandboxNotFound(id).into());
    }
    Ok(Json(AgentSandboxEnvelope { sandbox: agent.sandbox(&id)? }))
}

// === errors and extractors ===

/// Everything an agent endpoint can answer with instead of success.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error(transparent)]
    Sim(#[from] SimError),
    #[error("{0}")]
    BadRequest(String),
    #[error("no such route")]
    NoRoute,
    #[error("method not allowed")]
    MethodNotAllowed,
}

impl ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Sim(SimError::Invalid(_)) | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Sim(SimError::SandboxNotFound(_) | SimError::ContainerNotFound { .. }) | ApiError::NoRoute => {
                StatusCode::NOT_FOUND
            }
            ApiError::Sim(
                SimError::SpecConflict(_)
                | SimError::PortTaken { .. }
                | SimError::PortUnavailable(_)
                | SimError::InsufficientCpu { .. }
                | SimError::InsufficientMemory { .. }
                | SimError::PoolExhausted,
            ) => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status_code(), Json(ErrorBody { error: self.to_string() })).into_response()
    }
}

/// A JSON body parsed whatever its content type, answering 400 `{"error"}` when malformed.
struct ApiJson<T>(T);

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
struct ApiQuery<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(value) =
            Query::from_request_parts(parts, state).await.map_err(|e| ApiError::BadRequest(e.body_text()))?;
        Ok(ApiQuery(value))
    }
}

/// Path parameters answering 400 `{"error"}` when malformed.
struct ApiPath<T>(T);

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
        let capacity = ApiError::Sim(SimError::InsufficientMemory { requested: 2, available: 1, capacity: 1 });
        assert_eq!(capacity.status_code(), StatusCode::CONFLICT);
        assert_eq!(ApiError::Sim(SimError::SandboxNotFound("a".into())).status_code(), StatusCode::NOT_FOUND);
        assert_eq!(ApiError::Sim(SimError::Invalid("x".into())).status_code(), StatusCode::BAD_REQUEST);
    }
}
