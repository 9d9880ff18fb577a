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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_type_is_upper_case_on_the_wire() {
        let e = WatchEvent { event_type: EventType::Added, object: 1 };
        assert_eq!(serde_json::to_string(&e).unwrap(), r#"{"type":"ADDED","object":1}"#);
    }

    #[test]
    fn as_str_is_the_serde_name() {
        use EventType::*;
        for t in [Added, Modified, Deleted, Bookmark, Error] {
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
    }
}
