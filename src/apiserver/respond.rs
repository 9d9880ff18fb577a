//! Responses assembled from stored JSON bytes without decoding them again.

use crate::store::{Revision, Versioned};
use axum::body::{Body, Bytes};
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

/// Bytes of encoded items gathered before a list hands a chunk to the connection.
const LIST_CHUNK_BYTES: usize = 64 << 10;

/// `{"items": [...], "resource_version": "N"}`, plus `next_cursor` when paging.
///
/// The body is streamed in chunks of about 64 KiB, encoded as the connection takes them: an
/// unpaginated list of every sandbox holds references to the stored objects, never a second copy
/// of all of them, so many large lists at once cannot multiply the server's memory.
pub fn list(items: Vec<Versioned>, revision: Revision, next_cursor: Option<&str>) -> Response {
    let mut tail = Vec::with_capacity(64);
    tail.extend_from_slice(b"],\"resource_version\":\"");
    tail.extend_from_slice(revision.to_string().as_bytes());
    tail.push(b'"');
    if let Some(cursor) = next_cursor {
        tail.extend_from_slice(b",\"next_cursor\":");
        tail.extend_from_slice(serde_json::to_string(cursor).unwrap_or_default().as_bytes());
    }
    tail.push(b'}');
    let chunks = ListChunks { items: items.into_iter(), first: true, tail: Some(tail) };
    let body = Body::from_stream(futures::stream::iter(chunks.map(Ok::<_, std::convert::Infallible>)));
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .expect("static headers are valid")
}

/// The chunks of a list body: the opening, items joined by commas, then the tail.
struct ListChunks {
    items: std::vec::IntoIter<Versioned>,
    first: bool,
    tail: Option<Vec<u8>>,
}

impl Iterator for ListChunks {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        let mut chunk = Vec::new();
        if self.first {
            chunk.extend_from_slice(b"{\"items\":[");
        }
        for item in self.items.by_ref() {
            if !self.first {
                chunk.push(b',');
            }
            self.first = false;
            chunk.extend_from_slice(&item.data);
            if chunk.len() >= LIST_CHUNK_BYTES {
                return Some(Bytes::from(chunk));
            }
        }
        // An empty list still wrote its opening above; `first` is cleared so it is written once.
        self.first = false;
        let tail = self.tail.take()?;
        chunk.extend_from_slice(&tail);
        Some(Bytes::from(chunk))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn item(name: &str, data: String) -> Versioned {
        Versioned { name: Arc::from(name), revision: 1, data: Bytes::from(data) }
    }

    fn chunks(items: Vec<Versioned>, cursor: Option<&str>) -> Vec<Bytes> {
        let mut tail = b"],\"resource_version\":\"7\"".to_vec();
        if let Some(c) = cursor {
            tail.extend_from_slice(format!(",\"next_cursor\":\"{c}\"").as_bytes());
        }
        tail.push(b'}');
        ListChunks { items: items.into_iter(), first: true, tail: Some(tail) }.collect()
    }

    #[test]
    fn a_large_list_streams_in_bounded_chunks_that_join_into_one_document() {
        let big = format!("{{\"id\":\"{}\"}}", "x".repeat(20_000));
        let items: Vec<Versioned> = (0..20).map(|i| item(&format!("s{i}"), big.clone())).collect();
        let parts = chunks(items, Some("s19"));
        assert!(parts.len() >= 5, "about 400 KB in 64 KiB chunks: {}", parts.len());
        assert!(parts.iter().all(|c| c.len() < LIST_CHUNK_BYTES + big.len() + 2));
        let joined: Vec<u8> = parts.concat();
        let doc: serde_json::Value = serde_json::from_slice(&joined).expect("valid JSON");
        assert_eq!(doc["items"].as_array().unwrap().len(), 20);
        assert_eq!(doc["resource_version"], "7");
        assert_eq!(doc["next_cursor"], "s19");
    }

    #[test]
    fn empty_and_single_lists_are_valid_documents() {
        let empty: Vec<u8> = chunks(vec![], None).concat();
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&empty).unwrap()["items"], serde_json::json!([]));
        let one: Vec<u8> = chunks(vec![item("a", "{\"id\":\"a\"}".into())], None).concat();
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&one).unwrap()["items"][0]["id"], "a");
    }
}
