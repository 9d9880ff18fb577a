//! Event routes: controllers record batches; anyone who may read sandboxes lists or watches them,
//! all or one object's (`?object=sandbox/ID` or `node/NAME`).

use super::auth::Identity;
use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, ApiQuery};
use super::nodes::{list_kind, page_limit, query_bool, query_number, ListQuery};
use super::{respond, watch, ApiState};
use crate::store::Kind;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use sandboxd_api::event::{Event, EventBatch, ObjectReference};

/// Query of `GET /api/v1/events`: a list query plus the involved-object filter.
#[derive(Debug, Default, serde::Deserialize)]
pub struct EventsQuery {
    pub object: Option<String>,
    pub watch: Option<String>,
    pub resource_version: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/events", request_body = EventBatch,
    responses((status = 200, description = "Recorded, each merged into the event of the same name"),
              (status = 400, description = "A record is invalid (nothing is written)")))]
pub async fn record(State(state): State<ApiState>, ApiJson(batch): ApiJson<EventBatch>) -> ApiResult<Response> {
    state.registry.record_events(&batch.events).await?;
    Ok((StatusCode::OK, axum::Json(serde_json::json!({ "recorded": batch.events.len() }))).into_response())
}

#[utoipa::path(get, path = "/api/v1/events",
    params(("object" = Option<String>, Query, description = "Only this object's events: sandbox/ID or node/NAME"),
           ("watch" = Option<bool>, Query, description = "Stream changes as NDJSON"),
           ("resource_version" = Option<String>, Query, description = "Watch changes after this revision"),
           ("limit" = Option<usize>, Query, description = "Page size"),
           ("cursor" = Option<String>, Query, description = "The name the last page ended at")),
    responses((status = 200, description = "Events, or a watch stream"), (status = 400, description = "Bad filter")))]
pub async fn list(
    State(state): State<ApiState>,
    Extension(caller): Extension<Identity>,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> ApiResult<Response> {
    let rest = ListQuery {
        watch: query.watch,
        resource_version: query.resource_version,
        limit: query.limit,
        cursor: query.cursor,
    };
    let Some(object) = query.object else { return list_kind(&state, Kind::Events, rest, &caller).await };
    let object = ObjectReference::parse(&object).map_err(|e| ApiError::BadRequest(format!("object: {e}")))?;
    // The encoding of the reference, as it appears in every event of that object.
    let needle = format!("\"involved_object\":{}", serde_json::to_string(&object).expect("references serialize"));
    // The same forms as every other list: a revision, and a cursor that is an (event) name.
    let from = super::nodes::parse_expected(rest.resource_version.as_deref())?;
    if let Some(problem) = rest.cursor.as_deref().filter(|c| !c.is_empty()).and_then(sandboxd_api::names::name_problem)
    {
        return Err(ApiError::BadRequest(format!("cursor: {problem}")));
    }
    if query_bool("watch", rest.watch.as_deref())? {
        return watch::stream_matching(&state, Kind::Events, from, &caller, Some(needle.into_bytes()));
    }
    let limit = query_number("limit", rest.limit.as_deref())?.map(|l| page_limit(Some(l))).transpose()?;
    let after = match rest.cursor.as_deref().filter(|c| !c.is_empty()) {
        Some(cursor) => position_of(&state, cursor).await?,
        None => None,
    };
    let (items, revision) = state.store.list(Kind::Events).await?;
    let mut matching = Vec::new();
    // Only the events whose encoding names the object are decoded (`describe` asks this often).
    for stored in items.into_iter().filter(|stored| watch::contains(&stored.data, needle.as_bytes())) {
        let event: Event = stored.decode()?;
        if event.involved_object == object {
            let position =
                (sandboxd_api::time::parse_rfc3339_micros(&event.first_seen).unwrap_or_default(), event.name);
            if after.as_ref().is_none_or(|after| position > *after) {
                matching.push((position, stored));
            }
        }
    }
    matching.sort_by(|a, b| a.0.cmp(&b.0));
    let next_cursor = match limit {
        Some(limit) if matching.len() > limit => {
            matching.truncate(limit);
            Some(matching.last().map(|(position, _)| position.1.clone()).unwrap_or_default())
        }
        Some(_) => Some(String::new()),
        None => None,
    };
    let items = matching.into_iter().map(|(_, stored)| stored).collect();
    Ok(respond::list(items, revision, next_cursor.as_deref()))
}

/// Where a page that ended at event `cursor` continues: after its (first seen, name). A cursor
/// whose event has been swept meanwhile starts the list again.
async fn position_of(state: &ApiState, cursor: &str) -> ApiResult<Option<(i64, String)>> {
    let Some(stored) = state.store.get(Kind::Events, cursor).await? else { return Ok(None) };
    let event: Event = stored.decode()?;
    Ok(Some((sandboxd_api::time::parse_rfc3339_micros(&event.first_seen).unwrap_or_default(), event.name)))
}
