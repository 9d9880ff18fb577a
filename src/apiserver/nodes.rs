//! Node routes: register or update, list, get, delete, and status writes by the node controller.
//! The rules live in `registry`; these handlers parse, call it, and answer (lists and watches read the store).

use super::auth::Identity;
use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, ApiQuery};
use super::{respond, watch, ApiState};
use crate::store::Kind;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use sandboxd_api::auth::Role;
use sandboxd_api::node::NodeStatus;
use sandboxd_api::node::{DrainRequest, DrainResponse, NodeCreateRequest, NodeStatusUpdate};
use sandboxd_api::validate::{validate_name, validate_node_spec};
use sandboxd_api::NodeSource;

/// Query of list routes: paging and watch.
#[derive(Debug, Default, serde::Deserialize)]
pub struct ListQuery {
    pub watch: Option<String>,
    pub resource_version: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

/// Parses a boolean query parameter, naming it on error.
pub fn query_bool(name: &str, raw: Option<&str>) -> ApiResult<bool> {
    match raw {
        None | Some("false") | Some("0") => Ok(false),
        Some("") | Some("true") | Some("1") => Ok(true),
        Some(other) => Err(ApiError::BadRequest(format!("{name}: {other:?} is not true or false"))),
    }
}

/// Parses a revision to watch from, naming `field` on error.
pub fn parse_revision(field: &str, raw: &str) -> ApiResult<u64> {
    raw.parse::<u64>().map_err(|_| ApiError::BadRequest(format!("{field}: {raw:?} is not a revision")))
}

/// Parses a numeric query parameter, naming it on error.
pub fn query_number(name: &str, raw: Option<&str>) -> ApiResult<Option<usize>> {
    raw.map(|s| s.parse::<usize>().map_err(|_| ApiError::BadRequest(format!("{name}: {s:?} is not a number"))))
        .transpose()
}

#[utoipa::path(post, path = "/api/v1/nodes", request_body = NodeCreateRequest,
    responses((status = 201, description = "Node registered"), (status = 200, description = "Node updated"),
              (status = 400, description = "Invalid node")))]
pub async fn create_or_update(
    State(state): State<ApiState>,
    ApiJson(request): ApiJson<NodeCreateRequest>,
) -> ApiResult<Response> {
    check_node_request(&request)?;
    let (created, stored) = state.registry.register_node(&request.id, &request.spec, NodeSource::Api).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok(respond::envelope(status, "node", &stored))
}

fn check_node_request(request: &NodeCreateRequest) -> ApiResult<()> {
    let mut problems = Vec::new();
    if let Err(e) = validate_name("id", &request.id) {
        problems.push(e.to_string());
    }
    if let Err(e) = validate_node_spec(&request.spec) {
        problems.push(e.to_string());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ApiError::BadRequest(problems.join("; ")))
    }
}

#[utoipa::path(get, path = "/api/v1/nodes",
    params(("watch" = Option<bool>, Query, description = "Stream changes as NDJSON"),
           ("resource_version" = Option<String>, Query, description = "Watch changes after this revision"),
           ("limit" = Option<usize>, Query, description = "Page size"),
           ("cursor" = Option<String>, Query, description = "Exclusive start name")),
    responses((status = 200, description = "Nodes, or a watch stream")))]
pub async fn list(
    State(state): State<ApiState>,
    Extension(caller): Extension<Identity>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<Response> {
    list_kind(&state, Kind::Nodes, query, &caller).await
}

/// Lists or watches a kind, as the query asks.
pub async fn list_kind(state: &ApiState, kind: Kind, query: ListQuery, caller: &Identity) -> ApiResult<Response> {
    let from = query
        .resource_version
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| parse_revision("resource_version", s))
        .transpose()?;
    // A cursor is the name a page ended at, so it is a name (or empty, the first page).
    if let Some(problem) = query.cursor.as_deref().filter(|c| !c.is_empty()).and_then(sandboxd_api::names::name_problem)
    {
        return Err(ApiError::BadRequest(format!("cursor: {problem}")));
    }
    if query_bool("watch", query.watch.as_deref())? {
        return watch::stream(state, kind, from, caller);
    }
    match query_number("limit", query.limit.as_deref())? {
        None if query.cursor.is_none() => {
            let (items, revision) = state.store.list(kind).await?;
            Ok(respond::list(items, revision, None))
        }
        limit => {
            let limit = page_limit(limit)?;
            let page = state.store.list_page(kind, query.cursor.as_deref().unwrap_or(""), limit).await?;
            Ok(respond::list(page.items, page.revision, Some(&page.next_cursor)))
        }
    }
}

#[utoipa::path(get, path = "/api/v1/nodes/{name}", params(("name" = String, Path)),
    responses((status = 200, description = "The node"), (status = 404, description = "Unknown node")))]
pub async fn get_one(State(state): State<ApiState>, Path(name): Path<String>) -> ApiResult<Response> {
    let node = state.registry.get_node(&name).await?;
    Ok(respond::envelope(StatusCode::OK, "node", &node))
}

#[utoipa::path(delete, path = "/api/v1/nodes/{name}", params(("name" = String, Path)),
    responses((status = 200, description = "Deleted"), (status = 404, description = "Unknown node")))]
pub async fn delete(State(state): State<ApiState>, Path(name): Path<String>) -> ApiResult<Response> {
    state.registry.delete_node(&name).await?;
    Ok(respond::deleted(&name))
}

#[utoipa::path(post, path = "/api/v1/nodes/{name}/drain", params(("name" = String, Path)), request_body = DrainRequest,
    responses((status = 200, description = "Cordoned; the listed sandboxes are being evicted", body = DrainResponse),
              (status = 400, description = "grace_seconds or deadline_seconds out of range"),
              (status = 404, description = "Unknown node")))]
pub async fn drain(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<DrainRequest>,
) -> ApiResult<Response> {
    let drained = state.registry.drain_node(&name, &request).await?;
    Ok((StatusCode::OK, axum::Json(drained)).into_response())
}

#[utoipa::path(put, path = "/api/v1/nodes/{name}/status", params(("name" = String, Path)), request_body = NodeStatusUpdate,
    responses((status = 200, description = "Status written"), (status = 404, description = "Unknown node"),
              (status = 409, description = "resource_version is stale")))]
pub async fn put_status(
    State(state): State<ApiState>,
    Extension(caller): Extension<Identity>,
    Path(name): Path<String>,
    ApiJson(update): ApiJson<NodeStatusUpdate>,
) -> ApiResult<Response> {
    let expect = parse_expected(update.resource_version.as_deref())?;
    if let Role::Node(_) = caller.role {
        return write_reported_status(&state, &name, update.status).await;
    }
    let status = update.status;
    let (stored, _) = state.registry.write_node_status(&name, &status, expect).await?;
    Ok(respond::envelope(StatusCode::OK, "node", &stored))
}

/// What a node identity may set in its own status: the facts of its machine (hostname, arch,
/// runtime). State, streaks, capacity and allocations stay the controllers', which take capacity
/// from heartbeats: a node that could write its capacity could draw every sandbox to itself.
fn agent_reportable(mut current: NodeStatus, reported: NodeStatus) -> NodeStatus {
    current.node_info = reported.node_info;
    current
}

/// A node's write of its own status: merged into the stored status and written with
/// compare-and-swap on the revision merged into, so it never rolls back a controller's write.
async fn write_reported_status(state: &ApiState, name: &str, reported: NodeStatus) -> ApiResult<Response> {
    const ATTEMPTS: usize = 5;
    for attempt in 1..=ATTEMPTS {
        let stored = state.registry.get_node(name).await?;
        let current: sandboxd_api::Node = stored.decode().map_err(|e| ApiError::Internal(e.to_string()))?;
        let status = agent_reportable(current.status, reported.clone());
        match state.registry.write_node_status(name, &status, Some(stored.revision)).await {
            Ok((written, _)) => return Ok(respond::envelope(StatusCode::OK, "node", &written)),
            Err(crate::registry::RegistryError::Conflict(_)) if attempt < ATTEMPTS => continue,
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("the last attempt returns")
}

/// The page size a list asks for, by the one rule of `sandboxd_api::validate::page_limit`.
pub fn page_limit(limit: Option<usize>) -> ApiResult<usize> {
    sandboxd_api::validate::page_limit(limit).map_err(ApiError::BadRequest)
}

/// Parses an optional `resource_version` precondition.
pub fn parse_expected(rv: Option<&str>) -> ApiResult<Option<u64>> {
    match rv.filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => s
            .parse::<u64>()
            .map(Some)
            .map_err(|_| ApiError::BadRequest(format!("resource_version: {s:?} is not a revision"))),
    }
}
