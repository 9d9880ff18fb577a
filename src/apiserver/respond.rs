//! Responses assembled from stored JSON bytes without decoding them again.

use crate::store::{Revision, Versioned};
use axum::body::Body;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::Response;

/// `{"<key>": <object>}` with the given status.
pub fn envelope(status: StatusCode, key: &str, object: &Versioned) -> Response {
    let mut body = Vec::with_capacity(object.data.len() + key.len() + 8);
    body.extend_from_slice(b"{\"");
    body.extend_from_slice(key.as_bytes());
    body.extend_from_slice(b"\":");
    body.extend_from_slice(&object.data);
    body.push(b'}');
    json_bytes(status, body)
}

/// `{"items": [...], "resource_version": "N"}`, plus `next_cursor` when paging.
pub fn list(items: &[Versioned], revision: Revision, next_cursor: Option<&str>) -> Response {
    let size: usize = items.iter().map(|i| i.data.len() + 1).sum();
    let mut body = Vec::with_capacity(size + 64);
    body.extend_from_slice(b"{\"items\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&item.data);
    }
    body.extend_from_slice(b"],\"resource_version\":\"");
    body.extend_from_slice(revision.to_string().as_bytes());
    body.push(b'"');
    if let Some(cursor) = next_cursor {
        body.extend_from_slice(b",\"next_cursor\":");
        body.extend_from_slice(serde_json::to_string(cursor).unwrap_or_default().as_bytes());
    }
    body.push(b'}');
    json_bytes(StatusCode::OK, body)
}

/// A JSON response from already-serialized bytes.
pub fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .expect("static headers are valid")
}

/// `{"deleted": "<name>"}`.
pub fn deleted(name: &str) -> Response {
    let body = serde_json::to_vec(&serde_json::json!({ "deleted": name })).unwrap_or_default();
    json_bytes(StatusCode::OK, body)
}
