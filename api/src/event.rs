//! The Event object: what happened to a sandbox or a node and why, as controllers report it, with
//! repeats merged into one event with a count (Kubernetes' core/v1 Event, trimmed).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Whether an event is routine or a problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum EventType {
    #[default]
    Normal,
    Warning,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// The object an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ObjectReference {
    /// `sandbox` or `node`.
    pub kind: String,
    pub name: String,
}

impl ObjectReference {
    pub fn sandbox(id: &str) -> ObjectReference {
        ObjectReference { kind: "sandbox".into(), name: id.into() }
    }

    pub fn node(name: &str) -> ObjectReference {
        ObjectReference { kind: "node".into(), name: name.into() }
    }

    /// Parses `sandbox/ID` or `node/NAME` (the `?object=` filter).
    pub fn parse(text: &str) -> Result<ObjectReference, String> {
        let (kind, name) = text.split_once('/').ok_or_else(|| format!("{text:?} is not sandbox/ID or node/NAME"))?;
        if !matches!(kind, "sandbox" | "node") {
            return Err(format!("{text:?}: the kind is sandbox or node, not {kind:?}"));
        }
        if let Some(problem) = crate::names::name_problem(name) {
            return Err(format!("{text:?}: {problem}"));
        }
        Ok(ObjectReference { kind: kind.into(), name: name.into() })
    }
}

impl std::fmt::Display for ObjectReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// An event as stored and listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Event {
    /// Derived from the object, type, reason, source and message, so a repeat lands on the same event.
    pub name: String,
    pub involved_object: ObjectReference,
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// A CamelCase word: `Scheduled`, `FailedScheduling`, `Started`, `NodeLost`, …
    pub reason: String,
    pub message: String,
    /// The controller that reported it: `scheduler`, `sandbox-controller`, `node-controller`, …
    pub source: String,
    /// How many times it happened between `first_seen` and `last_seen`.
    pub count: u64,
    pub first_seen: String,
    pub last_seen: String,
    #[serde(default)]
    pub resource_version: String,
}

/// One event (or `count` repeats of it) as a controller reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EventRecord {
    pub involved_object: ObjectReference,
    #[serde(rename = "type", default)]
    pub event_type: EventType,
    pub reason: String,
    pub message: String,
    pub source: String,
    /// Repeats merged by the reporter before it sent them (at least 1).
    #[serde(default = "one")]
    pub count: u64,
    /// When it first and last happened, by the reporter's clock (RFC 3339, microseconds).
    pub first_seen: String,
    pub last_seen: String,
}

fn one() -> u64 {
    1
}

/// Body of `POST /api/v1/events`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EventBatch {
    pub events: Vec<EventRecord>,
}

/// The most events one `POST /api/v1/events` may carry.
pub const MAX_EVENTS_PER_BATCH: usize = 1000;
/// The longest reason, in characters.
pub const MAX_REASON_CHARS: usize = 64;
/// The longest message, in characters (longer ones are cut by the reporter).
pub const MAX_MESSAGE_CHARS: usize = 1024;
/// The largest `count` one record may carry.
pub const MAX_EVENT_COUNT: u64 = u32::MAX as u64;

impl EventRecord {
    /// The stored event's name: the same for every repeat (same object, type, reason, source and message).
    pub fn event_name(&self) -> String {
        let mut hash = Sha256::new();
        for part in [
            self.involved_object.kind.as_str(),
            self.involved_object.name.as_str(),
            self.event_type.as_str(),
            self.reason.as_str(),
            self.source.as_str(),
            self.message.as_str(),
        ] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        let digest = hash.finalize();
        let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
        format!("ev-{hex}")
    }

    /// Why the record is refused, if it is.
    pub fn problem(&self) -> Option<String> {
        let at = &self.involved_object;
        if let Err(e) = ObjectReference::parse(&at.to_string()) {
            return Some(format!("involved_object: {e}"));
        }
        let word = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !word(&self.reason) || self.reason.chars().count() > MAX_REASON_CHARS {
            return Some(format!("reason: {:?} is not a word of 1-{MAX_REASON_CHARS} letters and digits", self.reason));
        }
        if !word(&self.source) || self.source.chars().count() > MAX_REASON_CHARS {
            return Some(format!(
                "source: {:?} is not a word of 1-{MAX_REASON_CHARS} letters, digits and -",
                self.source
            ));
        }
        if self.message.chars().count() > MAX_MESSAGE_CHARS || !crate::syntax::is_printable(&self.message, false) {
            return Some(format!("message: printable text of at most {MAX_MESSAGE_CHARS} characters"));
        }
        if !(1..=MAX_EVENT_COUNT).contains(&self.count) {
            return Some(format!("count: {} is outside 1..{MAX_EVENT_COUNT}", self.count));
        }
        for (field, at) in [("first_seen", &self.first_seen), ("last_seen", &self.last_seen)] {
            if crate::time::parse_rfc3339_micros(at).is_none() {
                return Some(format!("{field}: {at:?} is not an RFC 3339 time"));
            }
        }
        None
    }

    /// The record with both times in the one format events are compared in (UTC, microseconds),
    /// `last_seen` no earlier than `first_seen`, and neither later than `now_micros` (a reporter's
    /// clock running ahead cannot make an event outlive the sweep). Call after `problem`.
    pub fn canonical(&self, now_micros: i64) -> EventRecord {
        let parse = |at: &str| crate::time::parse_rfc3339_micros(at).unwrap_or(now_micros).min(now_micros);
        let first = parse(&self.first_seen);
        let last = parse(&self.last_seen).max(first);
        EventRecord {
            first_seen: crate::time::format_unix_micros(first),
            last_seen: crate::time::format_unix_micros(last),
            ..self.clone()
        }
    }
}

impl Event {
    /// A new event from its first record.
    pub fn from_record(record: &EventRecord) -> Event {
        Event {
            name: record.event_name(),
            involved_object: record.involved_object.clone(),
            event_type: record.event_type,
            reason: record.reason.clone(),
            message: record.message.clone(),
            source: record.source.clone(),
            count: record.count,
            first_seen: record.first_seen.clone(),
            last_seen: record.last_seen.clone(),
            resource_version: String::new(),
        }
    }

    /// Merges a repeat: the count adds up, the seen times widen.
    pub fn merge(&mut self, record: &EventRecord) {
        self.count = self.count.saturating_add(record.count);
        if record.first_seen < self.first_seen {
            self.first_seen = record.first_seen.clone();
        }
        if record.last_seen > self.last_seen {
            self.last_seen = record.last_seen.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(reason: &str, message: &str) -> EventRecord {
        EventRecord {
            involved_object: ObjectReference::sandbox("s1"),
            event_type: EventType::Normal,
            reason: reason.into(),
            message: message.into(),
            source: "scheduler".into(),
            count: 1,
            first_seen: "2026-12-02T10:00:00.000000Z".into(),
            last_seen: "2026-12-02T10:00:00.000000Z".into(),
        }
    }

    #[test]
    fn repeats_share_a_name_and_merge_into_one_count() {
        let first = record("Scheduled", "placed on node a");
        let again = EventRecord { last_seen: "2026-12-02T10:00:05.000000Z".into(), count: 2, ..first.clone() };
        assert_eq!(first.event_name(), again.event_name());
        assert_ne!(first.event_name(), record("Scheduled", "placed on node b").event_name());
        let mut event = Event::from_record(&first);
        event.merge(&again);
        assert_eq!((event.count, event.last_seen.as_str()), (3, "2026-12-02T10:00:05.000000Z"));
        assert_eq!(event.first_seen, "2026-12-02T10:00:00.000000Z");
    }

    #[test]
    fn times_are_made_canonical_and_never_later_than_now() {
        let now = crate::time::parse_rfc3339_micros("2026-12-02T10:00:10.000000Z").unwrap();
        let odd = EventRecord {
            first_seen: "2026-12-02T11:00:00.5+01:00".into(),
            last_seen: "2026-12-02T09:59:59Z".into(),
            ..record("A", "b")
        };
        let fixed = odd.canonical(now);
        assert_eq!(
            (fixed.first_seen.as_str(), fixed.last_seen.as_str()),
            ("2026-12-02T10:00:00.500000Z", "2026-12-02T10:00:00.500000Z")
        );
        let future = EventRecord {
            first_seen: "2027-01-01T00:00:00Z".into(),
            last_seen: "2027-01-01T00:00:00Z".into(),
            ..record("A", "b")
        };
        assert_eq!(future.canonical(now).last_seen, "2026-12-02T10:00:10.000000Z");
    }

    #[test]
    fn records_are_checked() {
        assert_eq!(record("Scheduled", "ok").problem(), None);
        assert!(record("", "ok").problem().unwrap().starts_with("reason"));
        assert!(record("Bad reason", "ok").problem().unwrap().starts_with("reason"));
        assert!(record("Scheduled", "\u{1b}[2J").problem().unwrap().starts_with("message"));
        let elsewhere = EventRecord {
            involved_object: ObjectReference { kind: "pod".into(), name: "x".into() },
            ..record("A", "b")
        };
        assert!(elsewhere.problem().unwrap().starts_with("involved_object"));
        assert_eq!(ObjectReference::parse("node/n1"), Ok(ObjectReference::node("n1")));
        assert!(ObjectReference::parse("n1").is_err());
    }
}
