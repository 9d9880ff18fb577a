//! Node proxy routes: pass-through to a node's agent, the on-demand heartbeat and agent reconcile.

use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, ApiQuery};
use super::nodes::{page_limit, query_number};
use super::ApiState;
use crate::objects::InProcessObjects;
use crate::store::Kind;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use sandboxd_api::agent::AgentCreateRequest;
use sandboxd_api::Node;
use sandboxd_contracts::agent::{AgentAddr, AgentClient, AgentError};
use sandboxd_controllers::node::heartbeat_once;
use sandboxd_controllers::ObjectError;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// `cursor`/`limit` of the agent list.
#[derive(Debug, Deserialize)]
pub struct PageQuery {
    #[serde(default)]
    cursor: String,
    limit: Option<String>,
}

/// `tail`/`container` of the logs routes.
#[derive(Debug, Deserialize)]
pub struct LogsQuery {
    tail: Option<String>,
    container: Option<String>,
}

/// Ids that go into agent URLs must be plain names: no `/`, `..` or query characters.
fn check_names(names: &[(&str, &str)]) -> ApiResult<()> {
    for (field, value) in names {
        if let Some(problem) = sandboxd_api::names::name_problem(value) {
            return Err(ApiError::BadRequest(format!("{field}: {problem}")));
        }
    }
    Ok(())
}

/// The node (404 if unknown) and the agent client (503 if this server makes no agent calls).
async fn node_and_agent(state: &ApiState, name: &str) -> ApiResult<(Node, Arc<dyn AgentClient>)> {
    let node: Node = state
        .store
        .get(Kind::Nodes, name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("node {name:?} not found")))?
        .decode()?;
    let agents = state
        .agents
        .clone()
        .ok_or_else(|| ApiError::Unavailable("this server is not configured to call node agents".into()))?;
    Ok((node, agents))
}

/// Agent 4xx passes through with its status and message; anything else is a 502 naming the node.
fn upstream(node: &str, error: AgentError) -> ApiError {
    match error {
        AgentError::Status { status, message } if (400..500).contains(&status) => {
            ApiError::Upstream { status, message }
        }
        other => ApiError::BadGateway(format!("node {node}: {other}")),
    }
}

fn with_external(mut answer: Value, node: &Node) -> Json<Value> {
    answer["external"] = Value::String(node.effective_external().to_string());
    Json(answer)
}

#[utoipa::path(get, path = "/api/v1/nodes/{name}/sandboxes", params(("name" = String, Path),
    ("cursor" = Option<String>, Query), ("limit" = Option<usize>, Query)),
    responses((status = 200, description = "The agent's sandboxes, with the node's external"),
              (status = 404, description = "Unknown node"), (status = 502, description = "Agent failed")))]
pub async fn list_sandboxes(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> ApiResult<Json<Value>> {
    let limit = page_limit(query_number("limit", query.limit.as_deref())?)?;
    if !query.cursor.is_empty() {
        check_names(&[("cursor", &query.cursor)])?;
    }
    let (node, agents) = node_and_agent(&state, &name).await?;
    let page =
        agents.list_sandboxes(AgentAddr::of(&node), &query.cursor, limit).await.map_err(|e| upstream(&name, e))?;
    Ok(with_external(json!({ "items": page.items, "next_cursor": page.next_cursor }), &node))
}

#[utoipa::path(get, path = "/api/v1/nodes/{name}/sandboxes/{id}", params(("name" = String, Path), ("id" = String, Path)),
    responses((status = 200, description = "The agent's sandbox"), (status = 404, description = "Unknown node or sandbox"),
              (status = 502, description = "Agent failed")))]
pub async fn get_sandbox(
    State(state): State<ApiState>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    check_names(&[("id", &id)])?;
    let (node, agents) = node_and_agent(&state, &name).await?;
    let sandbox = agents.get_sandbox(AgentAddr::of(&node), &id).await.map_err(|e| upstream(&name, e))?;
    Ok(with_external(json!({ "sandbox": sandbox }), &node))
}

#[utoipa::path(post, path = "/api/v1/nodes/{name}/sandboxes", params(("name" = String, Path)),
    request_body = sandboxd_api::agent::AgentCreateRequest,
    responses((status = 201, description = "Created on the agent"), (status = 404, description = "Unknown node"),
              (status = 409, description = "Port clash, no capacity, or a runtime class the node does not offer"),
              (status = 502, description = "Agent failed")))]
pub async fn create_sandbox(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<AgentCreateRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    check_names(&[("id", &request.id)])?;
    let (node, agents) = node_and_agent(&state, &name).await?;
    // An agent older than runtime classes would ignore the field and run the sandbox under runc.
    // A valid request the node cannot take now (it may offer the class later): 409, like a port clash.
    if !node.status.node_info.runtime_classes().contains(request.runtime_class) {
        return Err(ApiError::Conflict(format!(
            "runtime_class: node {name} does not offer {} (it offers: {})",
            request.runtime_class,
            node.status.node_info.runtime_classes().names().join(", ")
        )));
    }
    let sandbox = agents.create_sandbox(AgentAddr::of(&node), &request).await.map_err(|e| upstream(&name, e))?;
    Ok((StatusCode::CREATED, Json(json!({ "sandbox": sandbox }))))
}

#[utoipa::path(delete, path = "/api/v1/nodes/{name}/sandboxes/{id}", params(("name" = String, Path), ("id" = String, Path)),
    responses((status = 200, description = "Deleted on the agent"), (status = 404, description = "Unknown node or sandbox"),
              (status = 502, description = "Agent failed")))]
pub async fn delete_sandbox(
    State(state): State<ApiState>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    check_names(&[("id", &id)])?;
    let (node, agents) = node_and_agent(&state, &name).await?;
    agents.delete_sandbox(AgentAddr::of(&node), &id).await.map_err(|e| upstream(&name, e))?;
    Ok(Json(json!({ "id": id, "phase": "deleted" })))
}

#[utoipa::path(get, path = "/api/v1/nodes/{name}/sandboxes/{id}/logs", params(("name" = String, Path), ("id" = String, Path),
    ("tail" = Option<usize>, Query), ("container" = Option<String>, Query)),
    responses((status = 200, description = "Log lines of every container"), (status = 404, description = "Unknown node or sandbox"),
              (status = 502, description = "Agent failed")))]
pub async fn logs(
    State(state): State<ApiState>,
    Path((name, id)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<LogsQuery>,
) -> ApiResult<Json<Value>> {
    check_names(&[("id", &id), ("container", query.container.as_deref().unwrap_or("x"))])?;
    let (node, agents) = node_and_agent(&state, &name).await?;
    let container = query.container.as_deref();
    let tail = query_number("tail", query.tail.as_deref())?;
    let answer = agents.logs(AgentAddr::of(&node), &id, container, tail).await.map_err(|e| upstream(&name, e))?;
    Ok(Json(json!({ "sandbox_id": answer.sandbox_id, "logs": answer.logs })))
}

#[utoipa::path(get, path = "/api/v1/nodes/{name}/sandboxes/{id}/containers/{container}/logs",
    params(("name" = String, Path), ("id" = String, Path), ("container" = String, Path), ("tail" = Option<usize>, Query)),
    responses((status = 200, description = "Log lines of one container"), (status = 404, description = "Unknown node, sandbox or container"),
              (status = 502, description = "Agent failed")))]
pub async fn container_logs(
    State(state): State<ApiState>,
    Path((name, id, container)): Path<(String, String, String)>,
    ApiQuery(query): ApiQuery<LogsQuery>,
) -> ApiResult<Json<Value>> {
    check_names(&[("id", &id), ("container", &container)])?;
    let tail = query_number("tail", query.tail.as_deref())?;
    let (node, agents) = node_and_agent(&state, &name).await?;
    let answer =
        agents.logs(AgentAddr::of(&node), &id, Some(&container), tail).await.map_err(|e| upstream(&name, e))?;
    Ok(Json(serde_json::to_value(answer).map_err(|e| ApiError::Internal(e.to_string()))?))
}

#[utoipa::path(post, path = "/api/v1/nodes/{name}/reconcile", params(("name" = String, Path)),
    responses((status = 200, description = "The agent reconciled"), (status = 404, description = "Unknown node"),
              (status = 502, description = "Agent failed")))]
pub async fn reconcile(State(state): State<ApiState>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let (node, agents) = node_and_agent(&state, &name).await?;
    agents.reconcile(AgentAddr::of(&node)).await.map_err(|e| upstream(&name, e))?;
    Ok(Json(json!({ "ok": true })))
}

#[utoipa::path(post, path = "/api/v1/nodes/{name}/heartbeat", params(("name" = String, Path)),
    responses((status = 200, description = "Heartbeat ran; the outcome is in the body"), (status = 404, description = "Unknown node")))]
pub async fn heartbeat(State(state): State<ApiState>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let (_, agents) = node_and_agent(&state, &name).await?;
    let objects = InProcessObjects::new(state.registry.clone());
    let report = heartbeat_once(&objects, agents.as_ref(), &state.node_settings, &name).await.map_err(|e| match e {
        ObjectError::NotFound(_) => ApiError::NotFound(format!("node {name:?} not found")),
        other => ApiError::Unavailable(other.to_string()),
    })?;
    Ok(Json(json!({
        "node": report.node,
        "heartbeat": report.verdict.as_str(),
        "resources": report.node.status.resources,
        "heartbeat_error": report.heartbeat_error,
        "status_error": report.status_error,
    })))
}
