//! Many watches of one kind over one stream (`POST /api/v1/watch`): one store watcher per stream,
//! its changes routed to each watch by object name, so an idle watch costs its id and a map entry,
//! not a connection.

use super::auth::Identity;
use super::error::{ApiError, ApiResult};
use super::extract::ApiJson;
use super::nodes::parse_revision;
use super::watch::{error_line, item_line, ndjson, slot_for};
use super::ApiState;
use crate::store::{Kind, Revision, Store, StoreError, Versioned, WatchItem, WatchLimits};
use axum::body::Bytes;
use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use futures::stream::{self, BoxStream, StreamExt};
use sandboxd_api::names::name_problem;
use sandboxd_api::watch::{
    watch_id_problem, EventType, WatchManyRequest, MAX_WATCHES_PER_OBJECT, MAX_WATCHES_PER_STREAM,
};
use std::collections::{HashMap, HashSet};
use std::future::ready;
use std::sync::Arc;

#[utoipa::path(post, path = "/api/v1/watch", request_body = WatchManyRequest,
    responses((status = 200, description = "NDJSON: each change as {watch, type, object}, once per watch it belongs to; BOOKMARK and ERROR lines carry no watch and speak for every watch of the stream"),
              (status = 400, description = "A bad kind, watch id, name or resource_version, no watches or more than 10,000, or an id used twice"),
              (status = 429, description = "max_watches or max_watches_per_identity reached")))]
/// Opens one stream for every watch of the request; it takes one slot of `max_watches`.
pub async fn watch_many(
    State(state): State<ApiState>,
    Extension(caller): Extension<Identity>,
    ApiJson(request): ApiJson<WatchManyRequest>,
) -> ApiResult<Response> {
    let (kind, asked) = parse(request)?;
    let slot = slot_for(&state, &caller)?;
    let lines = stream::once(open(state.store.clone(), kind, asked, state.watch_limits)).flatten();
    Ok(ndjson(&state, slot, lines))
}

/// One watch of a request, checked.
#[derive(Debug)]
struct Asked {
    id: Box<str>,
    name: Option<Box<str>>,
    /// `resource_version`; `None` asks for the current objects first.
    after: Option<Revision>,
}

fn parse(request: WatchManyRequest) -> ApiResult<(Kind, Vec<Asked>)> {
    let bad = ApiError::BadRequest;
    let kind = match request.kind.as_str() {
        "sandboxes" => Kind::Sandboxes,
        "nodes" => Kind::Nodes,
        "events" => Kind::Events,
        other => return Err(bad(format!("kind: {other:?} is not sandboxes, nodes or events"))),
    };
    let count = request.watches.len();
    if count == 0 || count > MAX_WATCHES_PER_STREAM {
        return Err(bad(format!("watches: {count} given, 1 to {MAX_WATCHES_PER_STREAM} allowed")));
    }
    let mut ids = HashSet::with_capacity(count);
    let mut asked = Vec::with_capacity(count);
    for (i, spec) in request.watches.into_iter().enumerate() {
        if let Some(problem) = watch_id_problem(&spec.id) {
            return Err(bad(format!("watches[{i}].id: {problem}")));
        }
        if !ids.insert(spec.id.clone()) {
            return Err(bad(format!("watches[{i}].id: {:?} is used twice", spec.id)));
        }
        if let Some(problem) = spec.name.as_deref().and_then(name_problem) {
            return Err(bad(format!("watches[{i}].name: {problem}")));
        }
        let after = spec
            .resource_version
            .as_deref()
            .filter(|rv| !rv.is_empty())
            .map(|rv| parse_revision(&format!("watches[{i}].resource_version"), rv))
            .transpose()?;
        asked.push(Asked { id: spec.id.into(), name: spec.name.map(Into::into), after });
    }
    check_copies_per_change(&asked)?;
    Ok((kind, asked))
}

/// Refuses a stream in which one change would go to more than `MAX_WATCHES_PER_OBJECT` watches:
/// each gets a copy of the object, so 10,000 watches of one name would make every change of it
/// 10,000 copies held at once.
fn check_copies_per_change(asked: &[Asked]) -> ApiResult<()> {
    let mut per_name: HashMap<&str, usize> = HashMap::new();
    for name in asked.iter().filter_map(|a| a.name.as_deref()) {
        *per_name.entry(name).or_default() += 1;
    }
    let every = asked.iter().filter(|a| a.name.is_none()).count();
    let (busiest, named) = per_name.into_iter().max_by_key(|&(_, n)| n).unwrap_or(("any object", 0));
    if every + named > MAX_WATCHES_PER_OBJECT {
        return Err(ApiError::BadRequest(format!(
            "watches: {} of them would see {busiest:?} ({named} of that name, {every} of every object); \
             at most {MAX_WATCHES_PER_OBJECT} watches of one stream may see the same object",
            every + named
        )));
    }
    Ok(())
}

/// The lines of the stream: ADDED for the current objects to the watches that asked for them,
/// then every change after the earliest revision asked for, routed.
async fn open(store: Arc<dyn Store>, kind: Kind, asked: Vec<Asked>, limits: WatchLimits) -> BoxStream<'static, Bytes> {
    let (current, listed_at) = if asked.iter().any(|a| a.after.is_none()) {
        match store.list(kind).await {
            Ok(listed) => listed,
            Err(e) => return stream::iter([error_line(&e)]).boxed(),
        }
    } else {
        (Vec::new(), 0)
    };
    let routes = Arc::new(Routes::new(asked, listed_at));
    // Only the earliest revision opens the store watcher. A later one ahead of the store (taken
    // from another store, or from before a reset) must still get the 410 a single watch gets,
    // not wait in silence until the store passes it.
    if routes.latest > routes.earliest {
        if let Err(e @ StoreError::Ahead { .. }) = store.watch_limited(kind, routes.latest, limits).await {
            return stream::iter([error_line(&e)]).boxed();
        }
    }
    let first = {
        let routes = routes.clone();
        stream::iter(current).filter_map(move |object| ready(routes.current_lines(&object)))
    };
    match store.watch_limited(kind, routes.earliest, limits).await {
        Ok(live) => first.chain(live.filter_map(move |item| ready(routes.live_lines(item)))).boxed(),
        Err(e) => first.chain(stream::iter([error_line(&e)])).boxed(),
    }
}

/// Which watches of a stream a change goes to. Per watch: its id (4 B of index elsewhere), the
/// revision after which it takes changes, and one entry under its name or in `every`.
#[derive(Debug)]
struct Routes {
    ids: Vec<Box<str>>,
    after: Vec<Revision>,
    /// Asked for the current objects first.
    listed: Vec<bool>,
    by_name: HashMap<Box<str>, Vec<u32>>,
    /// Watches of every object of the kind.
    every: Vec<u32>,
    /// The revision the store watcher starts after: the earliest any watch asked for.
    earliest: Revision,
    /// The latest any watch asked for.
    latest: Revision,
}

impl Routes {
    /// Routes for `asked`; those without a revision start after `listed_at`, the revision of the
    /// list whose objects they get first.
    fn new(asked: Vec<Asked>, listed_at: Revision) -> Routes {
        let count = asked.len();
        let mut routes = Routes {
            ids: Vec::with_capacity(count),
            after: Vec::with_capacity(count),
            listed: Vec::with_capacity(count),
            by_name: HashMap::new(),
            every: Vec::new(),
            earliest: Revision::MAX,
            latest: 0,
        };
        for (index, watch) in asked.into_iter().enumerate() {
            let index = index as u32;
            match watch.name {
                Some(name) => routes.by_name.entry(name).or_default().push(index),
                None => routes.every.push(index),
            }
            let after = watch.after.unwrap_or(listed_at);
            routes.earliest = routes.earliest.min(after);
            routes.latest = routes.latest.max(after);
            routes.listed.push(watch.after.is_none());
            routes.after.push(after);
            routes.ids.push(watch.id);
        }
        routes
    }

    /// Watches of the object named `name`, in the order they were asked for within each group.
    fn of(&self, name: &str) -> impl Iterator<Item = usize> + '_ {
        self.every.iter().chain(self.by_name.get(name).into_iter().flatten()).map(|&i| i as usize)
    }

    /// ADDED lines of a listed object for the watches that asked for the current objects.
    fn current_lines(&self, object: &Versioned) -> Option<Bytes> {
        let watches = self.of(&object.name).filter(|&i| self.listed[i]);
        tagged_lines(watches.map(|i| &*self.ids[i]), EventType::Added, &object.data)
    }

    /// A change's lines for the watches that have not seen its revision; bookmarks and the
    /// closing error as they are (they speak for every watch).
    fn live_lines(&self, item: WatchItem) -> Option<Bytes> {
        match item {
            WatchItem::Event(event) => {
                let object = &event.object;
                let watches = self.of(&object.name).filter(|&i| object.revision > self.after[i]);
                tagged_lines(watches.map(|i| &*self.ids[i]), event.event_type.into(), &object.data)
            }
            other => Some(item_line(other)),
        }
    }
}

/// `{"watch":ID,"type":TYPE,"object":OBJECT}` once per id, in one chunk; `None` for no ids.
/// Ids need no escaping: `watch_id_problem` allows none of the characters JSON escapes.
fn tagged_lines<'a>(ids: impl Iterator<Item = &'a str>, event_type: EventType, object: &[u8]) -> Option<Bytes> {
    let mut out = Vec::new();
    for id in ids {
        out.reserve(object.len() + id.len() + 40);
        out.extend_from_slice(b"{\"watch\":\"");
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\",\"type\":\"");
        out.extend_from_slice(event_type.as_str().as_bytes());
        out.extend_from_slice(b"\",\"object\":");
        out.extend_from_slice(object);
        out.extend_from_slice(b"}\n");
    }
    (!out.is_empty()).then(|| Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ChangeType, Event};
    use sandboxd_api::watch::{TaggedWatchEvent, WatchSpec};

    fn spec(id: &str, name: Option<&str>, resource_version: Option<&str>) -> WatchSpec {
        WatchSpec { id: id.into(), name: name.map(Into::into), resource_version: resource_version.map(Into::into) }
    }

    fn request(kind: &str, watches: Vec<WatchSpec>) -> WatchManyRequest {
        WatchManyRequest { kind: kind.into(), watches }
    }

    fn object(name: &str, revision: Revision) -> Versioned {
        let data = format!(r#"{{"id":"{name}","resource_version":"{revision}"}}"#);
        Versioned { name: name.into(), revision, data: Bytes::from(data) }
    }

    fn change(name: &str, revision: Revision) -> WatchItem {
        let object = object(name, revision);
        WatchItem::Event(Event { kind: Kind::Sandboxes, event_type: ChangeType::Modified, object })
    }

    /// (watch, type, object id) of each line.
    fn lines(bytes: Option<Bytes>) -> Vec<(Option<String>, EventType, String)> {
        let Some(bytes) = bytes else { return Vec::new() };
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.ends_with('\n'), "{text:?}");
        text.lines()
            .map(|line| {
                let e: TaggedWatchEvent<serde_json::Value> = serde_json::from_str(line).unwrap();
                (e.watch, e.event_type, e.object["id"].as_str().unwrap_or_default().to_string())
            })
            .collect()
    }

    fn tagged(watch: &str, event_type: EventType, id: &str) -> (Option<String>, EventType, String) {
        (Some(watch.into()), event_type, id.into())
    }

    fn routes(watches: Vec<WatchSpec>, listed_at: Revision) -> Routes {
        let (_, asked) = parse(request("sandboxes", watches)).unwrap();
        Routes::new(asked, listed_at)
    }

    #[test]
    fn a_change_goes_to_the_watches_of_its_name_and_of_the_kind_once_each() {
        let routes = routes(
            vec![spec("all", None, Some("0")), spec("b1", Some("b"), Some("0")), spec("b2", Some("b"), Some("0"))],
            0,
        );
        assert_eq!(
            lines(routes.live_lines(change("b", 5))),
            [
                tagged("all", EventType::Modified, "b"),
                tagged("b1", EventType::Modified, "b"),
                tagged("b2", EventType::Modified, "b")
            ]
        );
        assert_eq!(lines(routes.live_lines(change("a", 6))), [tagged("all", EventType::Modified, "a")]);
        let only_named = self::routes(vec![spec("b1", Some("b"), Some("0"))], 0);
        assert_eq!(only_named.live_lines(change("a", 6)), None, "no line at all for a change no watch wants");
    }

    #[test]
    fn each_watch_takes_changes_only_after_its_own_revision() {
        let routes = routes(vec![spec("old", None, Some("3")), spec("new", None, Some("7"))], 0);
        assert_eq!((routes.earliest, routes.latest), (3, 7), "the store watcher starts at the earliest");
        assert_eq!(lines(routes.live_lines(change("a", 5))), [tagged("old", EventType::Modified, "a")]);
        assert_eq!(lines(routes.live_lines(change("a", 7))), [tagged("old", EventType::Modified, "a")]);
        assert_eq!(lines(routes.live_lines(change("a", 8))).len(), 2);
    }

    #[test]
    fn the_current_objects_go_only_to_watches_without_a_revision() {
        let routes =
            routes(vec![spec("listed", None, None), spec("b", Some("b"), None), spec("resumed", None, Some("2"))], 10);
        assert_eq!(routes.earliest, 2);
        assert_eq!(
            lines(routes.current_lines(&object("b", 4))),
            [tagged("listed", EventType::Added, "b"), tagged("b", EventType::Added, "b")]
        );
        assert_eq!(lines(routes.current_lines(&object("a", 4))), [tagged("listed", EventType::Added, "a")]);
        assert_eq!(
            lines(routes.live_lines(change("a", 9))),
            [tagged("resumed", EventType::Modified, "a")],
            "a listed watch starts after its list"
        );
        assert_eq!(lines(routes.live_lines(change("a", 11))).len(), 2);
    }

    #[test]
    fn bookmarks_and_the_closing_error_speak_for_every_watch() {
        let routes = routes(vec![spec("a", Some("a"), Some("1"))], 0);
        let bookmark = lines(routes.live_lines(WatchItem::Bookmark(9)));
        assert_eq!(bookmark, [(None, EventType::Bookmark, String::new())]);
        let lagged = lines(routes.live_lines(WatchItem::Lagged { buffer: 4 }));
        assert_eq!(lagged, [(None, EventType::Error, String::new())]);
    }

    #[test]
    fn bad_requests_are_refused_naming_the_field() {
        let cases = [
            (request("leases", vec![spec("a", None, None)]), "kind"),
            (request("sandboxes", vec![]), "watches: 0 given"),
            (request("sandboxes", vec![spec("a b", None, None)]), "watches[0].id"),
            (
                request("sandboxes", vec![spec("a", None, None), spec("a", None, None)]),
                "watches[1].id: \"a\" is used twice",
            ),
            (request("sandboxes", vec![spec("a", Some("Not_A_Name"), None)]), "watches[0].name"),
            (request("sandboxes", vec![spec("a", None, Some("x1"))]), "watches[0].resource_version"),
        ];
        for (request, expected) in cases {
            let error = parse(request).unwrap_err().to_string();
            assert!(error.contains(expected), "{error:?} should name {expected:?}");
        }
        let too_many = (0..=MAX_WATCHES_PER_STREAM).map(|i| spec(&format!("w{i}"), None, None)).collect();
        assert!(parse(request("nodes", too_many)).unwrap_err().to_string().contains("10000 allowed"));
    }

    #[test]
    fn one_change_goes_to_at_most_sixteen_watches_of_a_stream() {
        let named =
            |n: usize, name: &str| (0..n).map(|i| spec(&format!("{name}-{i}"), Some(name), None)).collect::<Vec<_>>();
        let every = |n: usize| (0..n).map(|i| spec(&format!("every-{i}"), None, None)).collect::<Vec<_>>();
        let distinct: Vec<_> =
            (0..MAX_WATCHES_PER_STREAM).map(|i| spec(&format!("w{i}"), Some(&format!("s{i}")), None)).collect();
        assert!(parse(request("sandboxes", distinct)).is_ok(), "10,000 watches of 10,000 objects");
        assert!(parse(request("sandboxes", [named(15, "a"), every(1)].concat())).is_ok());
        let error =
            parse(request("sandboxes", [named(16, "a"), every(1), named(3, "b")].concat())).unwrap_err().to_string();
        assert!(error.contains("17 of them would see \"a\""), "{error}");
        let error = parse(request("sandboxes", every(17))).unwrap_err().to_string();
        assert!(error.contains("17 of them would see \"any object\""), "{error}");
    }
}
