//! Node routes: register or update, list, get, delete, and status writes by the node controller.

use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, ApiQuery};
use super::{now, respond, watch, ApiState};
use crate::store::{Kind, StoreError, Versioned};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use sandboxd_api::node::{NodeCreateRequest, NodeSpec, NodeStatus, NodeStatusUpdate};
use sandboxd_api::validate::{validate_name, validate_node_spec};
use sandboxd_api::{Node, NodeResources, NodeSource};
use sandboxd_controllers::node::derive_resources;

const INITIAL_STATUS_BOUND: std::time::Duration = std::time::Duration::from_secs(1);

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
    register_node(&state, &request.id, &request.spec, NodeSource::Api).await
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

/// Creates the node (201) or updates its spec (200); a config node keeps `source: config`.
pub async fn register_node(state: &ApiState, id: &str, spec: &NodeSpec, source: NodeSource) -> ApiResult<Response> {
    loop {
        let result = match state.store.get(Kind::Nodes, id).await? {
            Some(current) => update_node_spec(state, current, spec, source).await.map(|v| (StatusCode::OK, v)),
            None => create_node(state, id, spec, source).await.map(|v| (StatusCode::CREATED, v)),
        };
        match result {
            Ok((status, stored)) => return Ok(respond::envelope(status, "node", &stored)),
            // Someone else wrote the node between our read and write: read again.
            Err(StoreError::Conflict { .. } | StoreError::AlreadyExists { .. } | StoreError::NotFound { .. }) => {
                continue
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn create_node(state: &ApiState, id: &str, spec: &NodeSpec, source: NodeSource) -> Result<Versioned, StoreError> {
    let mut node = new_node(id, spec, source, state.default_max_alloc_percent);
    if let Some(agents) = &state.agents {
        // Best effort and bounded, so the create answer already carries resources; not a heartbeat.
        let bound = INITIAL_STATUS_BOUND.min(state.node_settings.heartbeat_timeout);
        if let Ok(report) = agents.status(&node.sbxlet_base_url, bound).await {
            node.status.resources = derive_resources(&node, &report, state.default_max_alloc_percent, &now());
        }
    }
    state.store.create(Kind::Nodes, id, to_value(&node)).await
}

async fn update_node_spec(
    state: &ApiState,
    current: Versioned,
    spec: &NodeSpec,
    source: NodeSource,
) -> Result<Versioned, StoreError> {
    let mut node: Node = current.decode()?;
    // A node the config file declares stays a config node, whoever posts it later.
    if source == NodeSource::Config {
        node.source = NodeSource::Config;
    }
    let port = spec.port as u16;
    if node.ip != spec.ip || node.port != port {
        // Heartbeats of the old address say nothing about the new one.
        node.status = NodeStatus { resources: node.status.resources.clone(), ..NodeStatus::default() };
        node.status.last_transition_at = Some(now());
    }
    node.ip = spec.ip.clone();
    node.port = port;
    node.sbxlet_base_url = Node::base_url(&node.ip, node.port);
    node.external = spec.external.clone().filter(|e| !e.is_empty());
    node.max_alloc_percent = spec.max_alloc_percent.map(|p| p as u32);
    let percent = node.max_alloc_percent.unwrap_or(state.default_max_alloc_percent);
    let r = &node.status.resources;
    let mut resources = NodeResources::derive(
        r.capacity_cpu_milli,
        r.capacity_memory_bytes,
        r.used_cpu_milli,
        r.used_memory_bytes,
        percent,
    );
    resources.updated_at = r.updated_at.clone();
    resources.external = r.external.clone();
    node.status.resources = resources;
    if let Some(external) = &node.external {
        node.status.resources.external = external.clone();
    }
    node.updated_at = now();
    state.store.update(Kind::Nodes, &current.name, to_value(&node), Some(current.revision)).await
}

/// A freshly registered node: state Unknown, streaks zero, resources empty until the agent reports.
pub fn new_node(id: &str, spec: &NodeSpec, source: NodeSource, default_max_alloc_percent: u32) -> Node {
    let at = now();
    let port = spec.port as u16;
    let max_alloc_percent = spec.max_alloc_percent.map(|p| p as u32);
    let mut resources = NodeResources {
        max_alloc_percent: max_alloc_percent.unwrap_or(default_max_alloc_percent),
        ..NodeResources::default()
    };
    if let Some(external) = spec.external.as_ref().filter(|e| !e.is_empty()) {
        resources.external = external.clone();
    }
    Node {
        id: id.to_string(),
        name: id.to_string(),
        ip: spec.ip.clone(),
        port,
        external: spec.external.clone().filter(|e| !e.is_empty()),
        max_alloc_percent,
        source,
        status: NodeStatus { resources, ..NodeStatus::default() },
        created_at: at.clone(),
        updated_at: at,
        sbxlet_base_url: Node::base_url(&spec.ip, port),
        resource_version: String::new(),
    }
}

fn to_value<T: serde::Serialize>(object: &T) -> serde_json::Value {
    serde_json::to_value(object).expect("API objects serialize")
}

#[utoipa::path(get, path = "/api/v1/nodes",
    params(("watch" = Option<bool>, Query, description = "Stream changes as NDJSON"),
           ("resource_version" = Option<String>, Query, description = "Watch changes after this revision"),
           ("limit" = Option<usize>, Query, description = "Page size"),
           ("cursor" = Option<String>, Query, description = "Exclusive start name")),
    responses((status = 200, description = "Nodes, or a watch stream")))]
pub async fn list(State(state): State<ApiState>, ApiQuery(query): ApiQuery<ListQuery>) -> ApiResult<Response> {
    list_kind(&state, Kind::Nodes, query).await
}

/// Lists or watches a kind, as the query asks.
pub async fn list_kind(state: &ApiState, kind: Kind, query: ListQuery) -> ApiResult<Response> {
    let from = query
        .resource_version
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u64>().map_err(|_| ApiError::BadRequest(format!("resource_version: {s:?} is not a revision")))
        })
        .transpose()?;
    if query_bool("watch", query.watch.as_deref())? {
        return Ok(watch::stream(state, kind, from));
    }
    match query_number("limit", query.limit.as_deref())? {
        None if query.cursor.is_none() => {
            let (items, revision) = state.store.list(kind).await?;
            Ok(respond::list(&items, revision, None))
        }
        limit => {
            let limit = limit.unwrap_or(100);
            if !(1..=1000).contains(&limit) {
                return Err(ApiError::BadRequest(format!("limit: {limit} is not in 1-1000")));
            }
            let page = state.store.list_page(kind, query.cursor.as_deref().unwrap_or(""), limit).await?;
            Ok(respond::list(&page.items, page.revision, Some(&page.next_cursor)))
        }
    }
}

#[utoipa::path(get, path = "/api/v1/nodes/{name}", params(("name" = String, Path)),
    responses((status = 200, description = "The node"), (status = 404, description = "Unknown node")))]
pub async fn get_one(State(state): State<ApiState>, Path(name): Path<String>) -> ApiResult<Response> {
    let node = state
        .store
        .get(Kind::Nodes, &name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("node {name:?} not found")))?;
    Ok(respond::envelope(StatusCode::OK, "node", &node))
}

#[utoipa::path(delete, path = "/api/v1/nodes/{name}", params(("name" = String, Path)),
    responses((status = 200, description = "Deleted"), (status = 404, description = "Unknown node")))]
pub async fn delete(State(state): State<ApiState>, Path(name): Path<String>) -> ApiResult<Response> {
    state.store.delete(Kind::Nodes, &name, None).await?;
    Ok(respond::deleted(&name))
}

#[utoipa::path(put, path = "/api/v1/nodes/{name}/status", params(("name" = String, Path)), request_body = NodeStatusUpdate,
    responses((status = 200, description = "Status written"), (status = 404, description = "Unknown node"),
              (status = 409, description = "resource_version is stale")))]
pub async fn put_status(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    ApiJson(update): ApiJson<NodeStatusUpdate>,
) -> ApiResult<Response> {
    let expect = parse_expected(update.resource_version.as_deref())?;
    let (stored, _) = write_status(&state, &name, &update.status, expect).await?;
    Ok(respond::envelope(StatusCode::OK, "node", &stored))
}

/// Writes a node's status (CAS when `expect` is set); a deleted node is never re-created.
pub async fn write_status(
    state: &ApiState,
    name: &str,
    status: &NodeStatus,
    expect: Option<u64>,
) -> ApiResult<(Versioned, Node)> {
    loop {
        let current = state
            .store
            .get(Kind::Nodes, name)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("node {name:?} not found")))?;
        let mut node: Node = current.decode()?;
        node.status = status.clone();
        node.updated_at = now();
        let guard = expect.or(Some(current.revision));
        let json = serde_json::to_vec(&node).map_err(|e| ApiError::Internal(e.to_string()))?;
        match state.store.update_encoded(Kind::Nodes, name, json, guard).await {
            Err(StoreError::Conflict { .. }) if expect.is_none() => continue,
            // The typed copy saves in-process callers decoding what was just encoded.
            result => {
                let stored = result?;
                node.resource_version = stored.revision.to_string();
                return Ok((stored, node));
            }
        }
    }
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
