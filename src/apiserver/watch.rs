//! Watch streams over HTTP: newline-delimited JSON events from a revision, with bookmarks and 410 on a stale revision.

use super::ApiState;
use crate::store::{Kind, Revision, Store, StoreError, WatchItem};
use axum::body::{Body, Bytes};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::Response;
use futures::stream::{self, BoxStream, StreamExt};
use sandboxd_api::watch::EventType;
use std::convert::Infallible;
use std::sync::Arc;

/// Streams changes of `kind` after `from`; without `from`, ADDED for every current object first.
pub fn stream(state: &ApiState, kind: Kind, from: Option<Revision>) -> Response {
    let store = state.store.clone();
    let lines = stream::once(open(store, kind, from))
        .flatten()
        .take_until(state.shutdown.clone().cancelled_owned())
        .map(Ok::<Bytes, Infallible>);
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(lines))
        .expect("static headers are valid")
}

async fn open(store: Arc<dyn Store>, kind: Kind, from: Option<Revision>) -> BoxStream<'static, Bytes> {
    let (initial, from) = match from {
        Some(from) => (Vec::new(), from),
        None => match store.list(kind).await {
            Ok((items, revision)) => {
                let added = items.iter().map(|v| event_line(EventType::Added, &v.data)).collect();
                (added, revision)
            }
            Err(e) => return stream::iter([error_line(&e)]).boxed(),
        },
    };
    match store.watch(kind, from).await {
        Ok(live) => stream::iter(initial).chain(live.map(item_line)).boxed(),
        Err(e) => stream::iter(initial).chain(stream::iter([error_line(&e)])).boxed(),
    }
}

fn item_line(item: WatchItem) -> Bytes {
    match item {
        WatchItem::Event(e) => event_line(e.event_type.into(), &e.object.data),
        WatchItem::Bookmark(revision) => {
            let object = format!("{{\"resource_version\":\"{revision}\"}}");
            event_line(EventType::Bookmark, object.as_bytes())
        }
    }
}

fn event_line(event_type: EventType, object: &[u8]) -> Bytes {
    let mut line = Vec::with_capacity(object.len() + 32);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(event_type.as_str().as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    line.extend_from_slice(object);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

fn error_line(e: &StoreError) -> Bytes {
    let code = match e {
        StoreError::Gone { .. } | StoreError::Ahead { .. } => 410,
        StoreError::Unavailable(_) => 503,
        _ => 500,
    };
    let object = serde_json::json!({ "code": code, "error": e.to_string() });
    event_line(EventType::Error, object.to_string().as_bytes())
}
