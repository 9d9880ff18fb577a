//! Lease routes: leader leases for controller replicas, every write a compare-and-swap.

use super::auth::Identity;
use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, ApiQuery};
use super::nodes::{list_kind, parse_expected, ListQuery};
use super::{respond, ApiState};
use crate::store::Kind;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
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
    for (field, value) in [("acquired_at", &lease.acquired_at), ("renewed_at", &lease.renewed_at)] {
        check_lease_time(field, value.as_deref())?;
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

/// How far ahead of the server's clock a lease timestamp may be: a renewal stamped in the future
/// would keep a dead holder's lease from ever expiring.
const MAX_CLOCK_SKEW_SECONDS: i64 = 60;

fn check_lease_time(field: &str, value: Option<&str>) -> ApiResult<()> {
    // Empty is absent, as the elector writes it before a lease is first held.
    let Some(value) = value.filter(|v| !v.is_empty()) else { return Ok(()) };
    sandboxd_api::time::parse_rfc3339(value)
        .ok_or_else(|| ApiError::BadRequest(format!("{field}: {value:?} is not an RFC 3339 time")))?;
    Ok(())
}

/// A non-admin's lease times may not lie ahead of the server's clock by more than the skew.
fn check_not_ahead(field: &str, value: Option<&str>) -> ApiResult<()> {
    let Some(at) = value.and_then(sandboxd_api::time::parse_rfc3339) else { return Ok(()) };
    if at > sandboxd_api::time::unix_now() + MAX_CLOCK_SKEW_SECONDS {
        let value = value.unwrap_or_default();
        return Err(ApiError::BadRequest(format!(
            "{field}: {value} is more than {MAX_CLOCK_SKEW_SECONDS}s ahead of the server's clock"
        )));
    }
    Ok(())
}

/// Whether `holder` names `caller`: its identity, or `<identity>/<replica>` for replicas sharing one.
fn owns(caller: &Identity, holder: &str) -> bool {
    holder == caller.name || holder.strip_prefix(caller.name.as_str()).is_some_and(|rest| rest.starts_with('/'))
}

/// Whether a stored lease has run out by the server's clock (a lease with no time has).
fn lapsed(lease: &Lease) -> bool {
    let last = lease.renewed_at.as_deref().or(lease.acquired_at.as_deref()).and_then(sandboxd_api::time::parse_rfc3339);
    last.is_none_or(|at| at.saturating_add(lease.lease_duration_seconds as i64) < sandboxd_api::time::unix_now())
}

/// What a non-admin caller may write: leases it holds, and leases another holder let lapse.
fn check_caller(caller: &Identity, new: Option<&Lease>, stored: Option<&Lease>) -> ApiResult<()> {
    if caller.role == sandboxd_api::auth::Role::Admin {
        return Ok(());
    }
    if let Some(new) = new {
        check_not_ahead("acquired_at", new.acquired_at.as_deref())?;
        check_not_ahead("renewed_at", new.renewed_at.as_deref())?;
    }
    if let Some(holder) = new.map(|l| l.holder.as_str()).filter(|h| !h.is_empty()) {
        if !owns(caller, holder) {
            return Err(ApiError::Forbidden(format!(
                "holder: {holder:?} is not {0:?} or {0:?}/<replica>, the caller's identity",
                caller.name
            )));
        }
    }
    if let Some(stored) = stored.filter(|l| !l.holder.is_empty() && !owns(caller, &l.holder)) {
        if !lapsed(stored) {
            return Err(ApiError::Conflict(format!(
                "lease {:?} is held by {:?} and has not expired",
                stored.name, stored.holder
            )));
        }
    }
    Ok(())
}

/// The stored lease and its revision: writes that were checked against it are made conditional on
/// that revision, so a takeover between the check and the write fails (409) instead of being undone.
async fn stored_lease(state: &ApiState, name: &str) -> ApiResult<Option<(Lease, u64)>> {
    match state.store.get(Kind::Leases, name).await? {
        Some(stored) => {
            let lease = stored.decode().map_err(|e| ApiError::Internal(e.to_string()))?;
            Ok(Some((lease, stored.revision)))
        }
        None => Ok(None),
    }
}

/// The precondition of a checked write: the caller's, which must be the revision checked.
fn checked_revision(expect: Option<u64>, checked: Option<u64>, name: &str) -> ApiResult<Option<u64>> {
    match (expect, checked) {
        (Some(expect), Some(checked)) if expect != checked => {
            Err(ApiError::Conflict(format!("conflict: lease {name:?} is at resource_version {checked}, not {expect}")))
        }
        (expect, checked) => Ok(expect.or(checked)),
    }
}

#[utoipa::path(post, path = "/api/v1/leases", request_body = Lease,
    responses((status = 201, description = "Lease created"), (status = 409, description = "Lease exists")))]
pub async fn create(
    State(state): State<ApiState>,
    Extension(caller): Extension<Identity>,
    ApiJson(lease): ApiJson<Lease>,
) -> ApiResult<Response> {
    check_lease(&lease)?;
    check_caller(&caller, Some(&lease), None)?;
    let stored = state.store.create(Kind::Leases, &lease.name, lease.to_stored_json()).await?;
    Ok(respond::envelope(StatusCode::CREATED, "lease", &stored))
}

#[utoipa::path(get, path = "/api/v1/leases", responses((status = 200, description = "Leases, or a watch stream")))]
pub async fn list(
    State(state): State<ApiState>,
    Extension(caller): Extension<Identity>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<Response> {
    list_kind(&state, Kind::Leases, query, &caller).await
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
    Extension(caller): Extension<Identity>,
    Path(name): Path<String>,
    ApiJson(mut lease): ApiJson<Lease>,
) -> ApiResult<Response> {
    lease.name = name.clone();
    check_lease(&lease)?;
    // A lease write without a precondition could depose a leader unseen: CAS is mandatory here.
    let expect = parse_expected(Some(&lease.resource_version))?
        .ok_or_else(|| ApiError::BadRequest("resource_version: required for lease updates".into()))?;
    let stored = stored_lease(&state, &name).await?;
    check_caller(&caller, Some(&lease), stored.as_ref().map(|(l, _)| l))?;
    let expect = checked_revision(Some(expect), stored.map(|(_, r)| r), &name)?.unwrap_or(expect);
    let stored = state.store.update(Kind::Leases, &name, lease.to_stored_json(), Some(expect)).await?;
    Ok(respond::envelope(StatusCode::OK, "lease", &stored))
}

#[utoipa::path(delete, path = "/api/v1/leases/{name}", params(("name" = String, Path),
    ("resource_version" = Option<String>, Query)),
    responses((status = 200, description = "Deleted"), (status = 404, description = "Unknown lease"),
              (status = 409, description = "resource_version is stale")))]
pub async fn delete(
    State(state): State<ApiState>,
    Extension(caller): Extension<Identity>,
    Path(name): Path<String>,
    ApiQuery(query): ApiQuery<DeleteQuery>,
) -> ApiResult<Response> {
    let expect = parse_expected(query.resource_version.as_deref())?;
    let stored = stored_lease(&state, &name).await?;
    check_caller(&caller, None, stored.as_ref().map(|(l, _)| l))?;
    let expect = checked_revision(expect, stored.map(|(_, r)| r), &name)?;
    state.store.delete(Kind::Leases, &name, expect).await?;
    Ok(respond::deleted(&name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandboxd_api::auth::Role;

    fn controller(name: &str) -> Identity {
        Identity { name: name.into(), role: Role::Controller, source: "token" }
    }

    fn held_by(holder: &str, renewed_secs_ago: i64) -> Lease {
        Lease {
            name: "scheduler".into(),
            holder: holder.into(),
            lease_duration_seconds: 15,
            renewed_at: Some(sandboxd_api::time::format_unix(sandboxd_api::time::unix_now() - renewed_secs_ago)),
            ..Lease::default()
        }
    }

    fn new_lease(holder: &str) -> Lease {
        held_by(holder, 0)
    }

    #[test]
    fn a_controller_holds_leases_only_in_its_own_name() {
        let me = controller("ctrl");
        assert!(check_caller(&me, Some(&new_lease("ctrl")), None).is_ok());
        assert!(check_caller(&me, Some(&new_lease("ctrl/host-7")), None).is_ok());
        assert!(matches!(check_caller(&me, Some(&new_lease("ctrl2")), None), Err(ApiError::Forbidden(_))));
        assert!(matches!(check_caller(&me, Some(&new_lease("other")), None), Err(ApiError::Forbidden(_))));
    }

    #[test]
    fn a_live_lease_of_another_holder_cannot_be_taken_or_released() {
        let me = controller("ctrl");
        let live = held_by("other", 1);
        let take = new_lease("ctrl");
        let release = new_lease("");
        assert!(matches!(check_caller(&me, Some(&take), Some(&live)), Err(ApiError::Conflict(_))));
        assert!(matches!(check_caller(&me, Some(&release), Some(&live)), Err(ApiError::Conflict(_))));
        assert!(matches!(check_caller(&me, None, Some(&live)), Err(ApiError::Conflict(_))), "delete");
        assert!(check_caller(&me, Some(&take), Some(&held_by("other", 60))).is_ok(), "lapsed");
        assert!(check_caller(&me, Some(&release), Some(&held_by("ctrl/a", 1))).is_ok(), "its own release");
        let admin = Identity::bootstrap_admin();
        assert!(check_caller(&admin, Some(&new_lease("anyone")), Some(&live)).is_ok());
    }

    #[test]
    fn a_checked_write_is_conditional_on_the_revision_checked() {
        assert_eq!(checked_revision(None, Some(7), "l").unwrap(), Some(7), "a delete without one gets it");
        assert_eq!(checked_revision(Some(7), Some(7), "l").unwrap(), Some(7));
        assert!(matches!(checked_revision(Some(6), Some(7), "l"), Err(ApiError::Conflict(_))));
        assert_eq!(checked_revision(Some(3), None, "l").unwrap(), Some(3), "no stored lease: the store answers");
    }

    #[test]
    fn lease_times_must_parse_and_not_lie_ahead() {
        assert!(check_lease_time("renewed_at", Some("yesterday")).is_err());
        let far = sandboxd_api::time::format_unix(sandboxd_api::time::unix_now() + 3600);
        assert!(check_lease_time("renewed_at", Some(&far)).is_ok(), "parses");
        let pinned = Lease { renewed_at: Some(far), ..new_lease("ctrl") };
        assert!(check_caller(&controller("ctrl"), Some(&pinned), None).is_err(), "but may not lie ahead");
        assert!(check_lease_time("renewed_at", Some(&sandboxd_api::time::rfc3339_now())).is_ok());
        assert!(check_lease_time("renewed_at", None).is_ok());
    }
}
