//! Watch streams over HTTP: newline-delimited JSON events from a revision, with bookmarks and 410 on a stale revision.

use super::auth::Identity;
use super::error::{ApiError, ApiResult};
use super::ApiState;
use crate::store::{Kind, Revision, Store, StoreError, Versioned, WatchItem, WatchLimits};
use axum::body::{Body, Bytes};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::Response;
use futures::stream::{self, BoxStream, StreamExt};
use sandboxd_api::watch::EventType;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The bounds on open watches, server-wide and per identity: a slot is taken when a watch opens
/// and given back when its stream is dropped, however it ends.
#[derive(Clone)]
pub struct WatchSlots {
    open: Arc<AtomicUsize>,
    max: usize,
    per_identity: usize,
    /// Watches open per identity; an entry goes when its count returns to zero.
    by_identity: Counts,
}

/// Watches open per identity.
type Counts = Arc<dashmap::DashMap<Arc<str>, usize>>;

/// One open watch's slot.
struct WatchSlot {
    open: Arc<AtomicUsize>,
    identity: Option<(Counts, Arc<str>)>,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        if let Some((by_identity, name)) = &self.identity {
            by_identity.remove_if_mut(name, |_, count| {
                *count -= 1;
                *count == 0
            });
        }
    }
}

impl WatchSlots {
    pub fn new(max: usize, per_identity: usize) -> WatchSlots {
        WatchSlots { open: Arc::new(AtomicUsize::new(0)), max, per_identity, by_identity: Arc::default() }
    }

    /// Watches open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Identities with a watch open now.
    pub fn identities(&self) -> usize {
        self.by_identity.len()
    }

    /// A slot for a watch of `identity` (`None`: bounded by the server-wide cap alone).
    fn take(&self, identity: Option<&str>) -> ApiResult<WatchSlot> {
        let taken = self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1));
        if taken.is_err() {
            return Err(ApiError::TooManyRequests(format!(
                "{} watches are open, the most this server allows (max_watches); retry later",
                self.max
            )));
        }
        // Dropped on the identity's refusal below, which gives the server-wide slot back.
        let mut slot = WatchSlot { open: self.open.clone(), identity: None };
        if let Some(name) = identity {
            slot.identity = Some(self.take_for(name)?);
        }
        Ok(slot)
    }

    fn take_for(&self, name: &str) -> ApiResult<(Counts, Arc<str>)> {
        let key: Arc<str> = Arc::from(name);
        let mut count = self.by_identity.entry(key.clone()).or_insert(0);
        if *count >= self.per_identity {
            return Err(ApiError::TooManyRequests(format!(
                "{name} has {} watches open, the most one identity may (max_watches_per_identity); retry later",
                self.per_identity
            )));
        }
        *count += 1;
        Ok((self.by_identity.clone(), key))
    }
}

/// Streams changes of `kind` after `from`; without `from`, ADDED for every current object first.
///
/// A full server is an HTTP 429 before the stream; a revision the store cannot serve is one ERROR
/// event in the stream, as Kubernetes answers it.
pub fn stream(state: &ApiState, kind: Kind, from: Option<Revision>, caller: &Identity) -> ApiResult<Response> {
    stream_matching(state, kind, from, caller, None)
}

/// Like `stream`, keeping of the object lines only those that contain `needle` (bookmarks and
/// errors always pass): the events of one involved object, matched on their encoding.
pub fn stream_matching(
    state: &ApiState,
    kind: Kind,
    from: Option<Revision>,
    caller: &Identity,
    needle: Option<Vec<u8>>,
) -> ApiResult<Response> {
    let slot = slot_for(state, caller)?;
    let lines = stream::once(open(state.store.clone(), kind, from, state.watch_limits)).flatten().filter(move |line| {
        let keep = match &needle {
            None => true,
            Some(needle) => !is_object_line(line) || contains(line, needle),
        };
        std::future::ready(keep)
    });
    Ok(ndjson(state, slot, lines))
}

/// A slot of `max_watches` (and of the caller's `max_watches_per_identity`), or a 429.
pub(super) fn slot_for(state: &ApiState, caller: &Identity) -> ApiResult<impl Send + Sync + 'static> {
    // The anonymous caller of a server without authentication is everyone: only the server cap.
    state.watch_slots.take((caller.source != "anonymous").then_some(caller.name.as_str()))
}

/// A 200 streaming `lines` as NDJSON until they end or the server shuts down, holding `slot` until
/// the stream is dropped, however it ends.
pub(super) fn ndjson(
    state: &ApiState,
    slot: impl Send + Sync + 'static,
    lines: impl futures::Stream<Item = Bytes> + Send + 'static,
) -> Response {
    let lines = lines.take_until(state.shutdown.clone().cancelled_owned()).map(move |line| {
        let _held = &slot;
        Ok::<Bytes, Infallible>(line)
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(lines))
        .expect("static headers are valid")
}

fn is_object_line(line: &[u8]) -> bool {
    [&b"{\"type\":\"ADDED\""[..], b"{\"type\":\"MODIFIED\"", b"{\"type\":\"DELETED\""]
        .iter()
        .any(|p| line.starts_with(p))
}

/// Whether `needle` occurs in `haystack` (matching events of one object by their encoding).
pub(super) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The encoded lines of a watch: ADDED for `initial` (encoded as the client reads, not all at
/// once), then the live stream.
async fn open(
    store: Arc<dyn Store>,
    kind: Kind,
    from: Option<Revision>,
    limits: WatchLimits,
) -> BoxStream<'static, Bytes> {
    let (initial, from) = match from {
        Some(from) => (Vec::new(), from),
        None => match store.list(kind).await {
            Ok(listed) => listed,
            Err(e) => return stream::iter([error_line(&e)]).boxed(),
        },
    };
    let added = stream::iter(initial).map(|v: Versioned| event_line(EventType::Added, &v.data));
    match store.watch_limited(kind, from, limits).await {
        Ok(live) => added.chain(live.map(item_line)).boxed(),
        Err(e) => added.chain(stream::iter([error_line(&e)])).boxed(),
    }
}

pub(super) fn item_line(item: WatchItem) -> Bytes {
    match item {
        WatchItem::Event(e) => event_line(e.event_type.into(), &e.object.data),
        WatchItem::Bookmark(revision) => {
            let object = format!("{{\"resource_version\":\"{revision}\"}}");
            event_line(EventType::Bookmark, object.as_bytes())
        }
        WatchItem::Lagged { buffer } => {
            let message = format!(
                "this watch fell more than {buffer} events behind and was closed (watch_buffer); \
                 every event sent before stands: watch again from the last resource_version you saw"
            );
            let object = serde_json::json!({ "code": 429, "reason": "TooSlow", "error": message });
            event_line(EventType::Error, object.to_string().as_bytes())
        }
    }
}

pub(super) fn event_line(event_type: EventType, object: &[u8]) -> Bytes {
    let mut line = Vec::with_capacity(object.len() + 32);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(event_type.as_str().as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    line.extend_from_slice(object);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

pub(super) fn error_line(e: &StoreError) -> Bytes {
    let code = match e {
        StoreError::Gone { .. } | StoreError::Ahead { .. } => 410,
        StoreError::Unavailable(_) => 503,
        _ => 500,
    };
    let object = serde_json::json!({ "code": code, "error": e.to_string() });
    event_line(EventType::Error, object.to_string().as_bytes())
}

#[cfg(test)]
mod slot_tests {
    use super::*;

    #[test]
    fn watches_are_capped_per_identity_and_every_slot_comes_back() {
        let slots = WatchSlots::new(3, 2);
        let a1 = slots.take(Some("alice")).unwrap();
        let a2 = slots.take(Some("alice")).unwrap();
        let refused = slots.take(Some("alice")).err().unwrap();
        assert!(refused.to_string().contains("max_watches_per_identity"), "{refused}");
        assert_eq!(slots.open(), 2, "a refused identity gives the server-wide slot back");
        let b1 = slots.take(Some("bob")).unwrap();
        assert!(slots.take(None).is_err(), "the server-wide cap still holds");
        drop((a1, a2, b1));
        assert_eq!((slots.open(), slots.identities()), (0, 0), "no entry outlives its watches");
    }
}
