//! Token routes: issue, list and revoke API tokens, and `whoami`.

use super::auth::{new_token, sha256, to_hex, Identity};
use super::error::{ApiError, ApiResult};
use super::extract::ApiJson;
use super::{respond, ApiState};
use crate::store::Kind;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use sandboxd_api::auth::{IssuedToken, TokenInfo, TokenRequest, WhoAmI, MAX_TOKEN_DESCRIPTION, MAX_TOKEN_TTL_SECONDS};
use sandboxd_api::validate::validate_name;

fn check_request(request: &TokenRequest) -> ApiResult<()> {
    validate_name("identity", &request.identity).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if let Some(ttl) = request.ttl_seconds {
        if !(1..=MAX_TOKEN_TTL_SECONDS).contains(&ttl) {
            return Err(ApiError::BadRequest(format!("ttl_seconds: {ttl} is not in 1-{MAX_TOKEN_TTL_SECONDS}")));
        }
    }
    if request.description.chars().count() > MAX_TOKEN_DESCRIPTION {
        return Err(ApiError::BadRequest(format!("description: longer than {MAX_TOKEN_DESCRIPTION} characters")));
    }
    if request.description.chars().any(char::is_control) {
        return Err(ApiError::BadRequest("description: control characters are not allowed".into()));
    }
    Ok(())
}

#[utoipa::path(post, path = "/api/v1/tokens", request_body = TokenRequest,
    responses((status = 201, description = "Token issued; the token itself is in this answer only", body = IssuedToken),
              (status = 400, description = "Invalid request"), (status = 403, description = "Not an admin")))]
pub async fn issue(
    State(state): State<ApiState>,
    Extension(caller): Extension<Identity>,
    ApiJson(request): ApiJson<TokenRequest>,
) -> ApiResult<Response> {
    check_request(&request)?;
    let (token, id) = new_token();
    let now = sandboxd_api::time::unix_now();
    let info = TokenInfo {
        id: id.clone(),
        identity: request.identity,
        role: request.role,
        created_at: sandboxd_api::time::format_unix(now),
        expires_at: request.ttl_seconds.map(|ttl| sandboxd_api::time::format_unix(now.saturating_add(ttl as i64))),
        description: request.description,
        issued_by: caller.name,
        sha256: to_hex(&sha256(token.as_bytes())),
    };
    let value = serde_json::to_value(&info).map_err(|e| ApiError::Internal(e.to_string()))?;
    state.store.create(Kind::Tokens, &id, value).await?;
    tracing::info!(id = %info.id, identity = %info.identity, role = %info.role.as_wire(), issued_by = %info.issued_by, "token issued");
    Ok((StatusCode::CREATED, Json(IssuedToken { token, info })).into_response())
}

#[utoipa::path(get, path = "/api/v1/tokens",
    responses((status = 200, description = "Issued tokens, without their secrets"), (status = 403, description = "Not an admin")))]
pub async fn list(State(state): State<ApiState>) -> ApiResult<Response> {
    let (items, revision) = state.store.list(Kind::Tokens).await?;
    Ok(respond::list(items, revision, None))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", params(("id" = String, Path)),
    responses((status = 200, description = "Revoked"), (status = 404, description = "Unknown token"),
              (status = 403, description = "Not an admin")))]
pub async fn revoke(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<Response> {
    state.store.delete(Kind::Tokens, &id, None).await?;
    tracing::info!(id = %id, "token revoked");
    Ok(respond::deleted(&id))
}

#[utoipa::path(get, path = "/api/v1/whoami",
    responses((status = 200, description = "The caller's identity and role", body = WhoAmI)))]
pub async fn whoami(Extension(caller): Extension<Identity>) -> Json<WhoAmI> {
    Json(WhoAmI { identity: caller.name, role: caller.role, source: caller.source.to_string() })
}
