//! The watch event streamed as newline-delimited JSON.

use serde::{Deserialize, Serialize};

/// What happened to the object in a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "UPPERCASE")]
pub enum EventType {
    Added,
    Modified,
    Deleted,
    Bookmark,
    Error,
}

impl EventType {
    /// The name on the wire, as serde writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
            EventType::Bookmark => "BOOKMARK",
            EventType::Error => "ERROR",
        }
    }
}

/// One line of a watch stream: `{"type": "ADDED", "object": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WatchEvent<T> {
    #[serde(rename = "type")]
    pub event_type: EventType,
    pub object: T,
}

/// Object of an ERROR event (`code` 410 means: list again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchError {
    pub code: u16,
    pub error: String,
}

/// Object of a BOOKMARK event: the stream has seen every change up to this revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bookmark {
    pub resource_version: String,
}

/// Most watches one `POST /api/v1/watch` stream carries.
pub const MAX_WATCHES_PER_STREAM: usize = 10_000;

/// Most watches of one stream that may see the same object (its name's, plus those of every
/// object): each gets its own copy of every change, so this bounds what one change costs.
pub const MAX_WATCHES_PER_OBJECT: usize = 16;

/// Body of `POST /api/v1/watch`: many watches of one kind over one stream. Each is routed by the
/// server, so a client holding thousands of watches (one per object it waits on) holds one
/// connection, as etcd's clients multiplex watches over one gRPC stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WatchManyRequest {
    /// `sandboxes`, `nodes` or `events`.
    pub kind: String,
    /// 1 to 10,000 watches, each with an id unique in the request.
    pub watches: Vec<WatchSpec>,
}

/// One watch of a `WatchManyRequest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WatchSpec {
    /// Chosen by the client: 1–64 characters of `[A-Za-z0-9._:-]`. Every event line of the watch
    /// carries it as `watch`.
    pub id: String,
    /// Only the object of this name (a sandbox id, a node or event name); every object of the kind
    /// without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Changes after this revision; without it, ADDED for the current objects first, as `?watch=true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
}

/// One line of a `POST /api/v1/watch` stream: a watch event with the id of the watch it belongs
/// to. BOOKMARK and ERROR lines have no `watch`: they speak for every watch of the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaggedWatchEvent<T> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<String>,
    #[serde(rename = "type")]
    pub event_type: EventType,
    pub object: T,
}

/// Why `id` cannot name a watch, or `None` when it can.
pub fn watch_id_problem(id: &str) -> Option<String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
    if id.is_empty() || id.len() > 64 || !id.chars().all(allowed) {
        return Some(format!("{id:?} must be 1-64 characters of letters, digits, '.', '_', ':' and '-'"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_type_is_upper_case_on_the_wire() {
        let e = WatchEvent { event_type: EventType::Added, object: 1 };
        assert_eq!(serde_json::to_string(&e).unwrap(), r#"{"type":"ADDED","object":1}"#);
    }

    #[test]
    fn a_tagged_line_reads_with_or_without_its_watch() {
        let line = r#"{"watch":"w-1","type":"ADDED","object":{"id":"a"}}"#;
        let e: TaggedWatchEvent<serde_json::Value> = serde_json::from_str(line).unwrap();
        assert_eq!((e.watch.as_deref(), e.event_type), (Some("w-1"), EventType::Added));
        let bookmark = r#"{"type":"BOOKMARK","object":{"resource_version":"7"}}"#;
        let e: TaggedWatchEvent<Bookmark> = serde_json::from_str(bookmark).unwrap();
        assert_eq!((e.watch, e.object.resource_version.as_str()), (None, "7"));
    }

    #[test]
    fn watch_ids_need_no_escaping_in_json() {
        for ok in ["a", "W.1_x:y-z", &"a".repeat(64)] {
            assert_eq!(watch_id_problem(ok), None, "{ok:?}");
        }
        for bad in ["", "a b", "a\"b", "a\\", "ä", &"a".repeat(65)] {
            assert!(watch_id_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn as_str_is_the_serde_name() {
        use EventType::*;
        for t in [Added, Modified, Deleted, Bookmark, Error] {
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
    }
}
