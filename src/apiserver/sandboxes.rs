//! Sandbox routes: create (idempotent), list, get, spec update, delete, status writes and finalize.
//! The rules live in `registry`; these handlers parse, call it, and answer.

use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, ApiQuery};
use super::nodes::{list_kind, parse_expected, ListQuery};
use super::{respond, ApiState};
use crate::registry::Created;
use crate::store::Kind;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use sandboxd_api::sandbox::{SandboxCreateRequest, SandboxStatusUpdate, SandboxUpdateRequest};

#[utoipa::path(post, path = "/api/v1/sandboxes", request_body = SandboxCreateRequest,
    responses((status = 201, description = "Created in phase Pending"),
              (status = 200, description = "Already exists with an identical spec"),
              (status = 400, description = "Invalid spec"), (status = 409, description = "Exists with a different spec")))]
pub async fn create(
    State(state): State<ApiState>,
    ApiJson(request): ApiJson<SandboxCreateRequest>,
) -> ApiResult<Response> {
    Ok(match state.registry.create_sandbox(&request.id, request.spec).await? {
        Created::New(stored) => respond::envelope(StatusCode::CREATED, "sandbox", &stored),
        Created::Existing(stored) => respond::envelope(StatusCode::OK, "sandbox", &stored),
    })
}

#[utoipa::path(get, path = "/api/v1/sandboxes",
    params(("watch" = Option<bool>, Query, description = "Stream changes as NDJSON"),
           ("resource_version" = Option<String>, Query, description = "Watch changes after this revision"),
           ("limit" = Option<usize>, Query, description = "Page size"),
           ("cursor" = Option<String>, Query, description = "Exclusive start id")),
    responses((status = 200, description = "Sandboxes, or a watch stream")))]
pub async fn list(
    State(state): State<ApiState>,
    Extension(caller): Extension<super::auth::Identity>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<Response> {
    list_kind(&state, Kind::Sandboxes, query, &caller).await
}

#[utoipa::path(get, path = "/api/v1/sandboxes/{id}", params(("id" = String, Path)),
    responses((status = 200, description = "The sandbox"), (status = 404, description = "Unknown sandbox")))]
pub async fn get_one(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<Response> {
    let stored = state.registry.get_sandbox(&id).await?;
    Ok(respond::envelope(StatusCode::OK, "sandbox", &stored))
}

#[utoipa::path(put, path = "/api/v1/sandboxes/{id}", params(("id" = String, Path)), request_body = SandboxUpdateRequest,
    responses((status = 200, description = "Spec updated"), (status = 400, description = "Invalid or immutable field changed"),
              (status = 404, description = "Unknown sandbox"), (status = 409, description = "resource_version is stale")))]
pub async fn update_spec(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<SandboxUpdateRequest>,
) -> ApiResult<Response> {
    let expect = parse_expected(request.resource_version.as_deref())?;
    let stored = state.registry.update_sandbox_spec(&id, &request.spec, expect).await?;
    Ok(respond::envelope(StatusCode::OK, "sandbox", &stored))
}

#[utoipa::path(delete, path = "/api/v1/sandboxes/{id}", params(("id" = String, Path)),
    responses((status = 200, description = "Deletion accepted: removed, or Terminating until its node confirms"),
              (status = 404, description = "Unknown sandbox")))]
pub async fn delete(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<Response> {
    state.registry.delete_sandbox(&id).await?;
    Ok(respond::deleted(&id))
}

#[utoipa::path(put, path = "/api/v1/sandboxes/{id}/status", params(("id" = String, Path)), request_body = SandboxStatusUpdate,
    responses((status = 200, description = "Status written"), (status = 400, description = "Illegal transition"),
              (status = 404, description = "Unknown sandbox"), (status = 409, description = "resource_version is stale")))]
pub async fn put_status(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    ApiJson(update): ApiJson<SandboxStatusUpdate>,
) -> ApiResult<Response> {
    let expect = parse_expected(update.resource_version.as_deref())?;
    let (stored, _) = state.registry.write_sandbox_status(&id, &update.status, expect).await?;
    Ok(respond::envelope(StatusCode::OK, "sandbox", &stored))
}

/// Body of `POST /api/v1/sandboxes/{id}/finalize`.
#[derive(Debug, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
pub struct FinalizeRequest {
    pub resource_version: String,
}

#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/finalize", params(("id" = String, Path)), request_body = FinalizeRequest,
    responses((status = 200, description = "Removed from the store"), (status = 404, description = "Unknown sandbox"),
              (status = 409, description = "Stale resource_version, or the sandbox is neither Terminating nor unbound")))]
/// Removes a sandbox once its agent confirmed it gone: the sandbox controller's last step, over HTTP.
pub async fn finalize(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<FinalizeRequest>,
) -> ApiResult<Response> {
    let expect = parse_expected(Some(&request.resource_version))?
        .ok_or_else(|| ApiError::BadRequest("resource_version: required".into()))?;
    state.registry.finalize_sandbox(&id, expect).await?;
    Ok(respond::deleted(&id))
}
