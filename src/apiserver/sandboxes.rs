//! Sandbox routes: create (idempotent), list, get, spec update, delete, and status writes by controllers.

use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, ApiQuery};
use super::nodes::{list_kind, parse_expected, ListQuery};
use super::{now, respond, unix_now, ApiState};
use crate::store::{Kind, StoreError, Versioned};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use sandboxd_api::sandbox::{SandboxCreateRequest, SandboxStatusUpdate, SandboxUpdateRequest};
use sandboxd_api::time::{format_unix, parse_rfc3339};
use sandboxd_api::validate::{validate_name, validate_sandbox_spec};
use sandboxd_api::{Phase, Sandbox, SandboxSpec, SandboxStatus};

#[utoipa::path(post, path = "/api/v1/sandboxes", request_body = SandboxCreateRequest,
    responses((status = 201, description = "Created in phase Pending"),
              (status = 200, description = "Already exists with an identical spec"),
              (status = 400, description = "Invalid spec"), (status = 409, description = "Exists with a different spec")))]
pub async fn create(
    State(state): State<ApiState>,
    ApiJson(request): ApiJson<SandboxCreateRequest>,
) -> ApiResult<Response> {
    check_spec(&state, Some(&request.id), &request.spec)?;
    let sandbox = new_sandbox(&request.id, request.spec);
    let json = serde_json::to_vec(&sandbox).map_err(|e| ApiError::Internal(e.to_string()))?;
    match state.store.create_encoded(Kind::Sandboxes, &request.id, json).await {
        Ok(stored) => Ok(respond::envelope(StatusCode::CREATED, "sandbox", &stored)),
        Err(StoreError::AlreadyExists { .. }) => existing_if_identical(&state, &sandbox).await,
        Err(e) => Err(e.into()),
    }
}

fn check_spec(state: &ApiState, id: Option<&str>, spec: &SandboxSpec) -> ApiResult<()> {
    let mut problems = Vec::new();
    if let Some(Err(e)) = id.map(|id| validate_name("id", id)) {
        problems.push(e.to_string());
    }
    if let Err(e) = validate_sandbox_spec(spec, &state.policy) {
        problems.push(e.to_string());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ApiError::BadRequest(problems.join("; ")))
    }
}

/// A new sandbox in phase Pending, with `expire_at` from its TTL.
fn new_sandbox(id: &str, spec: SandboxSpec) -> Sandbox {
    let created = unix_now();
    let at = format_unix(created);
    Sandbox {
        id: id.to_string(),
        status: SandboxStatus {
            phase: Phase::Pending,
            expire_at: expire_at(created, spec.ttl_seconds),
            last_transition_at: Some(at.clone()),
            ..SandboxStatus::default()
        },
        spec,
        created_at: at.clone(),
        updated_at: at,
        resource_version: String::new(),
    }
}

fn expire_at(created_unix: i64, ttl_seconds: Option<i64>) -> Option<String> {
    ttl_seconds.filter(|t| *t > 0).map(|t| format_unix(created_unix + t))
}

/// Posting an existing id is idempotent when the spec is identical, a conflict otherwise.
async fn existing_if_identical(state: &ApiState, wanted: &Sandbox) -> ApiResult<Response> {
    let Some(stored) = state.store.get(Kind::Sandboxes, &wanted.id).await? else {
        return Err(ApiError::Conflict(format!("sandbox {:?} was deleted concurrently; retry", wanted.id)));
    };
    let existing: Sandbox = stored.decode()?;
    if existing.spec == wanted.spec {
        Ok(respond::envelope(StatusCode::OK, "sandbox", &stored))
    } else {
        Err(ApiError::Conflict(format!("sandbox {:?} already exists with a different spec", wanted.id)))
    }
}

#[utoipa::path(get, path = "/api/v1/sandboxes",
    params(("watch" = Option<bool>, Query, description = "Stream changes as NDJSON"),
           ("resource_version" = Option<String>, Query, description = "Watch changes after this revision"),
           ("limit" = Option<usize>, Query, description = "Page size"),
           ("cursor" = Option<String>, Query, description = "Exclusive start id")),
    responses((status = 200, description = "Sandboxes, or a watch stream")))]
pub async fn list(State(state): State<ApiState>, ApiQuery(query): ApiQuery<ListQuery>) -> ApiResult<Response> {
    list_kind(&state, Kind::Sandboxes, query).await
}

#[utoipa::path(get, path = "/api/v1/sandboxes/{id}", params(("id" = String, Path)),
    responses((status = 200, description = "The sandbox"), (status = 404, description = "Unknown sandbox")))]
pub async fn get_one(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<Response> {
    let stored = get_sandbox(&state, &id).await?;
    Ok(respond::envelope(StatusCode::OK, "sandbox", &stored))
}

async fn get_sandbox(state: &ApiState, id: &str) -> ApiResult<Versioned> {
    state.store.get(Kind::Sandboxes, id).await?.ok_or_else(|| ApiError::NotFound(format!("sandbox {id:?} not found")))
}

#[utoipa::path(put, path = "/api/v1/sandboxes/{id}", params(("id" = String, Path)), request_body = SandboxUpdateRequest,
    responses((status = 200, description = "Spec updated"), (status = 400, description = "Invalid or immutable field changed"),
              (status = 404, description = "Unknown sandbox"), (status = 409, description = "resource_version is stale")))]
pub async fn update_spec(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<SandboxUpdateRequest>,
) -> ApiResult<Response> {
    check_spec(&state, None, &request.spec)?;
    let expect = parse_expected(request.resource_version.as_deref())?;
    loop {
        let current = get_sandbox(&state, &id).await?;
        let mut sandbox: Sandbox = current.decode()?;
        check_immutable(&sandbox.spec, &request.spec)?;
        sandbox.spec.ttl_seconds = request.spec.ttl_seconds;
        sandbox.spec.labels = request.spec.labels.clone();
        let created = parse_rfc3339(&sandbox.created_at).unwrap_or_else(unix_now);
        sandbox.status.expire_at = expire_at(created, sandbox.spec.ttl_seconds);
        sandbox.updated_at = now();
        match write(&state, &id, &sandbox, expect.or(Some(current.revision))).await {
            Err(StoreError::Conflict { .. }) if expect.is_none() => continue,
            result => return Ok(respond::envelope(StatusCode::OK, "sandbox", &result?)),
        }
    }
}

/// Only `ttl_seconds` and `labels` may change after create.
fn check_immutable(current: &SandboxSpec, wanted: &SandboxSpec) -> ApiResult<()> {
    let mut changed = Vec::new();
    if current.containers != wanted.containers {
        changed.push("spec.containers");
    }
    if current.ports != wanted.ports {
        changed.push("spec.ports");
    }
    if current.readiness_probe != wanted.readiness_probe {
        changed.push("spec.readiness_probe");
    }
    if current.egress != wanted.egress {
        changed.push("spec.egress");
    }
    if changed.is_empty() {
        return Ok(());
    }
    let problems: Vec<String> = changed
        .iter()
        .map(|field| {
            format!("{field}: is immutable (only ttl_seconds and labels may change; delete and re-create instead)")
        })
        .collect();
    Err(ApiError::BadRequest(problems.join("; ")))
}

async fn write(state: &ApiState, id: &str, sandbox: &Sandbox, expect: Option<u64>) -> Result<Versioned, StoreError> {
    let json = serde_json::to_vec(sandbox).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    state.store.update_encoded(Kind::Sandboxes, id, json, expect).await
}

#[utoipa::path(delete, path = "/api/v1/sandboxes/{id}", params(("id" = String, Path)),
    responses((status = 200, description = "Deletion accepted: removed, or Terminating until its node confirms"),
              (status = 404, description = "Unknown sandbox")))]
pub async fn delete(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<Response> {
    loop {
        let current = get_sandbox(&state, &id).await?;
        let mut sandbox: Sandbox = current.decode()?;
        let sandbox_phase_before = sandbox.status.phase.as_str();
        let result = match removal_for(&state, &sandbox).await? {
            Removal::AlreadyTerminating => return Ok(respond::deleted(&id)),
            Removal::Now => state.store.delete(Kind::Sandboxes, &id, Some(current.revision)).await,
            Removal::AfterNodeConfirms => {
                mark_terminating(&mut sandbox, "Deleted", "deletion requested");
                write(&state, &id, &sandbox, Some(current.revision)).await
            }
        };
        match result {
            Ok(_) => {
                let node = sandbox.status.node_name.as_deref().unwrap_or("");
                tracing::info!(sandbox = %id, node, from = %sandbox_phase_before, reason = "Deleted", "sandbox deletion requested");
                return Ok(respond::deleted(&id));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(StoreError::NotFound { .. }) => return Ok(respond::deleted(&id)),
            Err(e) => return Err(e.into()),
        }
    }
}

enum Removal {
    AlreadyTerminating,
    /// Never bound, or its node is gone: nothing to clean up on an agent.
    Now,
    AfterNodeConfirms,
}

async fn removal_for(state: &ApiState, sandbox: &Sandbox) -> ApiResult<Removal> {
    let Some(node) = sandbox.status.node_name.as_deref() else {
        return Ok(Removal::Now);
    };
    // With its node gone nothing will ever confirm the removal, even if it was already Terminating.
    if state.store.get(Kind::Nodes, node).await?.is_none() {
        return Ok(Removal::Now);
    }
    if sandbox.status.phase == Phase::Terminating {
        return Ok(Removal::AlreadyTerminating);
    }
    Ok(Removal::AfterNodeConfirms)
}

/// Moves a sandbox to Terminating with a reason, stamping the transition.
pub fn mark_terminating(sandbox: &mut Sandbox, reason: &str, message: &str) {
    let at = now();
    sandbox.status.phase = Phase::Terminating;
    sandbox.status.ready = false;
    sandbox.status.reason = Some(reason.to_string());
    sandbox.status.message = Some(message.to_string());
    sandbox.status.last_transition_at = Some(at.clone());
    sandbox.updated_at = at;
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
    let (stored, _) = write_status(&state, &id, &update.status, expect).await?;
    Ok(respond::envelope(StatusCode::OK, "sandbox", &stored))
}

/// Writes a sandbox's status (CAS when `expect` is set), refusing illegal transitions.
pub async fn write_status(
    state: &ApiState,
    id: &str,
    status: &SandboxStatus,
    expect: Option<u64>,
) -> ApiResult<(Versioned, Sandbox)> {
    loop {
        let current = get_sandbox(state, id).await?;
        if let Some(expected) = expect {
            if expected != current.revision {
                return Err(StoreError::Conflict {
                    kind: Kind::Sandboxes,
                    name: id.to_string(),
                    expected,
                    actual: current.revision,
                }
                .into());
            }
        }
        let mut sandbox: Sandbox = current.decode()?;
        check_status_transition(&sandbox.status, status)?;
        let previous = std::mem::replace(&mut sandbox.status, status.clone());
        // expire_at follows the spec and last_transition_at the phase: the server owns both.
        sandbox.status.expire_at = previous.expire_at;
        sandbox.status.last_transition_at =
            if previous.phase != status.phase { Some(now()) } else { previous.last_transition_at };
        sandbox.updated_at = now();
        match write(state, id, &sandbox, Some(current.revision)).await {
            Err(StoreError::Conflict { .. }) if expect.is_none() => continue,
            // The typed copy saves in-process callers decoding what was just encoded.
            result => {
                let stored = result?;
                sandbox.resource_version = stored.revision.to_string();
                return Ok((stored, sandbox));
            }
        }
    }
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
    let current = get_sandbox(&state, &id).await?;
    let sandbox: Sandbox = current.decode()?;
    if sandbox.status.phase != Phase::Terminating && sandbox.status.node_name.is_some() {
        return Err(ApiError::Conflict(format!(
            "sandbox {id:?} is {} on a node: only Terminating or unbound sandboxes are finalized",
            sandbox.status.phase.as_str()
        )));
    }
    state.store.delete(Kind::Sandboxes, &id, Some(expect)).await?;
    Ok(respond::deleted(&id))
}

/// Phases never move backwards, and a bound sandbox never moves to another node.
pub fn check_status_transition(current: &SandboxStatus, next: &SandboxStatus) -> ApiResult<()> {
    if next.phase.rank() < current.phase.rank() {
        return Err(ApiError::BadRequest(format!(
            "status.phase: cannot move from {} back to {}",
            current.phase.as_str(),
            next.phase.as_str()
        )));
    }
    if let (Some(bound), Some(wanted)) = (&current.node_name, &next.node_name) {
        if bound != wanted {
            return Err(ApiError::BadRequest(format!(
                "status.node_name: already bound to {bound:?}, cannot move to {wanted:?}"
            )));
        }
    }
    if current.node_name.is_some() && next.node_name.is_none() && next.phase != Phase::Terminating {
        return Err(ApiError::BadRequest("status.node_name: cannot unbind a scheduled sandbox".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(phase: Phase, node: Option<&str>) -> SandboxStatus {
        SandboxStatus { phase, node_name: node.map(String::from), ..SandboxStatus::default() }
    }

    #[test]
    fn phase_transitions_only_move_forward() {
        use Phase::*;
        let allowed = [
            (Pending, Scheduled),
            (Scheduled, Creating),
            (Creating, Running),
            (Running, Failed),
            (Failed, Terminating),
            (Pending, Terminating),
            (Running, Running),
            (Scheduled, Failed),
        ];
        for (from, to) in allowed {
            assert!(
                check_status_transition(&status(from, Some("n")), &status(to, Some("n"))).is_ok(),
                "{from:?}->{to:?}"
            );
        }
        let refused = [
            (Running, Creating),
            (Scheduled, Pending),
            (Terminating, Failed),
            (Terminating, Running),
            (Failed, Running),
        ];
        for (from, to) in refused {
            assert!(
                check_status_transition(&status(from, Some("n")), &status(to, Some("n"))).is_err(),
                "{from:?}->{to:?}"
            );
        }
    }

    #[test]
    fn a_bound_sandbox_never_changes_node() {
        let err = check_status_transition(&status(Phase::Scheduled, Some("a")), &status(Phase::Creating, Some("b")));
        assert!(err.unwrap_err().to_string().starts_with("status.node_name"));
    }
}
