//! Lease routes: leader leases for controller replicas, every write a compare-and-swap.

use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, ApiQuery};
use super::nodes::{list_kind, parse_expected, ListQuery};
use super::{respond, ApiState};
use crate::store::Kind;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use sandboxd_api::validate::validate_name;
use sandboxd_api::Lease;

/// Query of `DELETE /api/v1/leases/{name}`: an optional `resource_version` precondition.
#[derive(Debug, Default, serde::Deserialize)]
pub struct DeleteQuery {
    resource_version: Option<String>,
}

fn check_lease(lease: &Lease) -> ApiResult<()> {
    validate_name("name", &lease.name).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if lease.transitions > i64::MAX as u64 {
        return Err(ApiError::BadRequest(format!("transitions: {} is more than {}", lease.transitions, i64::MAX)));
    }
    let max = sandboxd_api::lease::MAX_LEASE_SECONDS;
    if !(1..=max).contains(&lease.lease_duration_seconds) {
        return Err(ApiError::BadRequest(format!(
            "lease_duration_seconds: {} is not in 1-{max}",
            lease.lease_duration_seconds
        )));
    }
    Ok(())
}

#[utoipa::path(post, path = "/api/v1/leases", request_body = Lease,
    responses((status = 201, description = "Lease created"), (status = 409, description = "Lease exists")))]
pub async fn create(State(state): State<ApiState>, ApiJson(lease): ApiJson<Lease>) -> ApiResult<Response> {
    check_lease(&lease)?;
    let stored = state.store.create(Kind::Leases, &lease.name, lease.to_stored_json()).await?;
    Ok(respond::envelope(StatusCode::CREATED, "lease", &stored))
}

#[utoipa::path(get, path = "/api/v1/leases", responses((status = 200, description = "Leases, or a watch stream")))]
pub async fn list(State(state): State<ApiState>, ApiQuery(query): ApiQuery<ListQuery>) -> ApiResult<Response> {
    list_kind(&state, Kind::Leases, query).await
}

#[utoipa::path(get, path = "/api/v1/leases/{name}", params(("name" = String, Path)),
    responses((status = 200, description = "The lease"), (status = 404, description = "Unknown lease")))]
pub async fn get_one(State(state): State<ApiState>, Path(name): Path<String>) -> ApiResult<Response> {
    let stored = state
        .store
        .get(Kind::Leases, &name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("lease {name:?} not found")))?;
    Ok(respond::envelope(StatusCode::OK, "lease", &stored))
}

#[utoipa::path(put, path = "/api/v1/leases/{name}", params(("name" = String, Path)), request_body = Lease,
    responses((status = 200, description = "Lease written"), (status = 400, description = "No resource_version"),
              (status = 404, description = "Unknown lease"), (status = 409, description = "resource_version is stale")))]
pub async fn update(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    ApiJson(mut lease): ApiJson<Lease>,
) -> ApiResult<Response> {
    lease.name = name.clone();
    check_lease(&lease)?;
    // A lease write without a precondition could depose a leader unseen: CAS is mandatory here.
    let expect = parse_expected(Some(&lease.resource_version))?
        .ok_or_else(|| ApiError::BadRequest("resource_version: required for lease updates".into()))?;
    let stored = state.store.update(Kind::Leases, &name, lease.to_stored_json(), Some(expect)).await?;
    Ok(respond::envelope(StatusCode::OK, "lease", &stored))
}

#[utoipa::path(delete, path = "/api/v1/leases/{name}", params(("name" = String, Path),
    ("resource_version" = Option<String>, Query)),
    responses((status = 200, description = "Deleted"), (status = 404, description = "Unknown lease"),
              (status = 409, description = "resource_version is stale")))]
pub async fn delete(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    ApiQuery(query): ApiQuery<DeleteQuery>,
) -> ApiResult<Response> {
    let expect = parse_expected(query.resource_version.as_deref())?;
    state.store.delete(Kind::Leases, &name, expect).await?;
    Ok(respond::deleted(&name))
}
