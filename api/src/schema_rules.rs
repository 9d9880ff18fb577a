//! The validation rules in JSON Schema form: the patterns and bounds the OpenAPI document publishes,
//! kept beside the validators and tested against them so the two cannot drift apart.
//!
//! JSON Schema cannot say everything the validators check: names unique among containers, ports
//! unique per protocol, a probe on a tcp port of the spec, and the 256 KiB size of a whole spec.
//! Those stay 400s that a schema-valid request can still get; `hack/schemathesis/hooks.py` keeps
//! its generated requests inside them.

use crate::validate::{
    SandboxPolicy, MAX_ARGS, MAX_CONTAINERS, MAX_ENV, MAX_LABELS, MAX_PORTS, MAX_PRIORITY, MAX_TAINTS,
    MAX_TOLERATION_SECONDS,
};
use serde_json::{json, Value};

/// An object name (`names::name_problem`): a DNS-1123 label of 1–63 characters, dots allowed.
pub const NAME: &str = r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$";

/// A label key (`syntax::label_key_problem`): an optional DNS-subdomain prefix and `/`, then a name.
pub const LABEL_KEY: &str = r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*/)?[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$";

/// A label value (`syntax::label_value_problem`): empty, or a label key's name part.
pub const LABEL_VALUE: &str = r"^([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?$";

/// An environment variable name (`syntax::is_env_name`).
pub const ENV_NAME: &str = r"^[A-Za-z_][A-Za-z0-9_]*$";

/// Text without control characters but tab and newline (`syntax::is_printable(_, true)`).
pub const MULTILINE_TEXT: &str = r"^[^\u0000-\u0008\u000b-\u001f\u007f-\u009f]*$";

/// An absolute path without control characters, or nothing (`work_dir`).
pub const OPTIONAL_ABSOLUTE_PATH: &str = r"^(/[^\u0000-\u001f\u007f-\u009f]*)?$";

/// An image reference (`syntax::image_problem`): `[registry/]path[/path…][:tag][@algorithm:hex]`.
/// A first component with a `.` or `:`, or `localhost`, is a registry, so a path's first component
/// has neither when more components follow.
pub const IMAGE: &str = concat!(
    r"^(",
    // registry: host labels (or an IPv4 address) and an optional port, then more path components
    r"(([A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)+(:[0-9]{1,5})?",
    r"|[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?:[0-9]{1,5}|localhost)",
    r"(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)+",
    // no registry: one component (dots allowed), or several whose first has no dot
    r"|[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*",
    r"|[a-z0-9]+((_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)+",
    r")(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@[a-z0-9+._-]+:[0-9A-Fa-f]{32,})?$"
);

/// A CPU quantity (`quantity::parse_cpu_milli`): cores or millicores, more than zero.
/// (Leading zeros are bounded too: the parser refuses more than 30 digits before the point.)
pub const CPU: &str = r"^0{0,8}[1-9][0-9]{0,8}(\.[0-9]{1,9})?m?$|^0{0,8}\.(0{0,5}[1-9][0-9]{0,3})$";

/// A byte quantity (`quantity::parse_bytes`): a number and an optional suffix, more than zero.
/// (Six digits keep every suffix below 2^64 bytes: 999,999 Ti is about 1.1 × 10^18.)
pub const BYTES: &str = r"^0{0,8}[1-9][0-9]{0,5}(\.[0-9]{1,3})?(Ki|Mi|Gi|Ti|k|M|G|T)?$";

/// Constraints per component schema: `(schema, property, JSON Schema keywords to merge)`.
pub fn component_constraints(policy: &SandboxPolicy) -> Vec<(&'static str, &'static str, Value)> {
    let (port_low, port_high) = policy.host_port_range.unwrap_or((1, 65535));
    let labels = json!({
        "maxProperties": MAX_LABELS,
        "propertyNames": { "pattern": LABEL_KEY, "not": { "pattern": LONG_LABEL_PREFIX } },
        "additionalProperties": { "type": "string", "pattern": LABEL_VALUE },
    });
    let probe_bound = |min: i64| json!({ "minimum": min, "maximum": 86_400 });
    vec![
        ("SandboxCreateRequest", "id", json!({ "pattern": NAME })),
        ("SandboxSpec", "containers", json!({ "minItems": 1, "maxItems": MAX_CONTAINERS })),
        ("SandboxSpec", "ports", json!({ "maxItems": MAX_PORTS })),
        ("SandboxSpec", "ttl_seconds", json!({ "minimum": 0, "maximum": policy.max_ttl_seconds })),
        ("SandboxSpec", "priority", json!({ "minimum": -MAX_PRIORITY, "maximum": MAX_PRIORITY })),
        ("SandboxSpec", "tolerations", json!({ "maxItems": MAX_TAINTS })),
        ("DrainRequest", "grace_seconds", json!({ "minimum": 0, "maximum": crate::node::MAX_DRAIN_GRACE_SECONDS })),
        (
            "DrainRequest",
            "deadline_seconds",
            json!({ "minimum": 1, "maximum": crate::node::MAX_DRAIN_DEADLINE_SECONDS }),
        ),
        ("NodeSpec", "taints", json!({ "maxItems": MAX_TAINTS })),
        ("Toleration", "toleration_seconds", json!({ "minimum": 0, "maximum": MAX_TOLERATION_SECONDS })),
        ("Taint", "key", json!({ "pattern": LABEL_KEY, "not": { "pattern": LONG_LABEL_PREFIX } })),
        ("Taint", "value", json!({ "pattern": LABEL_VALUE })),
        (
            "Toleration",
            "key",
            json!({ "anyOf": [{ "maxLength": 0 }, { "pattern": LABEL_KEY, "not": { "pattern": LONG_LABEL_PREFIX } }] }),
        ),
        ("Toleration", "value", json!({ "pattern": LABEL_VALUE })),
        ("SandboxSpec", "labels", labels.clone()),
        ("SandboxSpec", "node_selector", labels.clone()),
        ("NodeSpec", "labels", labels.clone()),
        ("Affinity", "required", json!({ "maxItems": crate::affinity::MAX_EXPRESSIONS })),
        ("Affinity", "preferred", json!({ "maxItems": crate::affinity::MAX_EXPRESSIONS })),
        ("Preference", "weight", json!({ "minimum": 1, "maximum": 100 })),
        ("Expression", "key", json!({ "pattern": LABEL_KEY, "not": { "pattern": LONG_LABEL_PREFIX } })),
        (
            "Expression",
            "values",
            json!({ "maxItems": crate::affinity::MAX_VALUES, "items": { "type": "string", "pattern": LABEL_VALUE } }),
        ),
        ("Container", "name", json!({ "pattern": NAME })),
        ("Container", "image", json!({ "pattern": IMAGE, "maxLength": 512 })),
        (
            "Container",
            "args",
            json!({ "maxItems": MAX_ARGS, "items": { "type": "string", "pattern": MULTILINE_TEXT } }),
        ),
        ("Container", "env", json!({ "maxItems": MAX_ENV })),
        ("Container", "work_dir", json!({ "pattern": OPTIONAL_ABSOLUTE_PATH })),
        ("EnvVar", "name", json!({ "pattern": ENV_NAME })),
        ("EnvVar", "value", json!({ "pattern": MULTILINE_TEXT })),
        ("ContainerResource", "cpu", json!({ "pattern": CPU })),
        ("ContainerResource", "memory", json!({ "pattern": BYTES })),
        ("ContainerResource", "ephemeral_storage", json!({ "pattern": BYTES })),
        ("PortSpec", "container_port", json!({ "minimum": 1, "maximum": 65535 })),
        ("PortSpec", "host_port", json!({ "minimum": port_low, "maximum": port_high })),
        ("Probe", "initial_delay_seconds", probe_bound(0)),
        ("Probe", "period_seconds", probe_bound(1)),
        ("Probe", "timeout_seconds", probe_bound(1)),
        ("Probe", "success_threshold", probe_bound(1)),
        ("Probe", "failure_threshold", probe_bound(1)),
        ("Probe", "port", json!({ "minimum": 1, "maximum": 65535 })),
        ("Probe", "path", json!({ "pattern": r"^(/[^\u0000-\u0020\u007f-\u009f]*)?$" })),
        ("AgentCreateRequest", "id", json!({ "pattern": NAME })),
        ("AgentCreateRequest", "containers", json!({ "minItems": 1, "maxItems": MAX_CONTAINERS })),
        ("AgentCreateRequest", "ports", json!({ "maxItems": MAX_PORTS })),
        ("NodeCreateRequest", "id", json!({ "pattern": NAME })),
        ("NodeSpec", "port", json!({ "minimum": 1, "maximum": 65535 })),
        ("NodeSpec", "ip", node_address(false)),
        ("NodeSpec", "external", node_address(true)),
        ("AgentPort", "host_port", json!({ "minimum": 1, "maximum": 65535 })),
        ("AssignedPort", "host_port", json!({ "maximum": 65535 })),
        ("AssignedPort", "container_port", json!({ "maximum": 65535 })),
        ("AgentPort", "container_port", json!({ "minimum": 1, "maximum": 65535 })),
        ("ExecRequest", "tty", json!({ "enum": [false] })),
        ("NodeSpec", "max_alloc_percent", json!({ "minimum": 1, "maximum": 100 })),
        ("Lease", "name", json!({ "pattern": NAME })),
        ("AgentCreateRequest", "labels", labels),
        ("Lease", "transitions", json!({ "maximum": i64::MAX })),
        ("Lease", "acquired_at", json!({ "anyOf": [{ "maxLength": 0 }, { "format": "date-time" }] })),
        ("Lease", "renewed_at", json!({ "anyOf": [{ "maxLength": 0 }, { "format": "date-time" }] })),
        ("TokenRequest", "identity", json!({ "pattern": NAME })),
        ("TokenRequest", "role", json!({ "pattern": ROLE })),
        (
            "TokenRequest",
            "description",
            json!({ "pattern": SINGLE_LINE_TEXT, "maxLength": crate::auth::MAX_TOKEN_DESCRIPTION }),
        ),
        ("FinalizeRequest", "resource_version", json!({ "pattern": "^[0-9]{1,19}$" })),
        ("SandboxUpdateRequest", "resource_version", json!({ "pattern": "^[0-9]{0,19}$" })),
        (
            "ExecRequest",
            "command",
            json!({ "minItems": 1, "prefixItems": [{ "type": "string", "minLength": 1, "pattern": "^[^\\u0000]*$" }],
                    "items": { "type": "string", "pattern": "^[^\\u0000]*$" } }),
        ),
        ("ExecRequest", "container", json!({ "pattern": NAME })),
        ("ExecRequest", "work_dir", json!({ "pattern": "^/[^\\u0000]*$" })),
        (
            "ExecRequest",
            "timeout_seconds",
            json!({ "minimum": 1, "maximum": crate::dataplane::MAX_EXEC_TIMEOUT_SECONDS }),
        ),
        ("Lease", "lease_duration_seconds", json!({ "minimum": 1, "maximum": crate::lease::MAX_LEASE_SECONDS })),
        ("EventBatch", "events", json!({ "maxItems": crate::event::MAX_EVENTS_PER_BATCH })),
        ("ObjectReference", "kind", json!({ "enum": ["sandbox", "node"] })),
        ("ObjectReference", "name", json!({ "pattern": NAME })),
        ("EventRecord", "reason", json!({ "pattern": EVENT_WORD })),
        ("EventRecord", "source", json!({ "pattern": EVENT_WORD })),
        (
            "EventRecord",
            "message",
            json!({ "pattern": SINGLE_LINE_TEXT, "maxLength": crate::event::MAX_MESSAGE_CHARS }),
        ),
        ("EventRecord", "count", json!({ "minimum": 1, "maximum": crate::event::MAX_EVENT_COUNT })),
        ("EventRecord", "first_seen", json!({ "pattern": RFC3339 })),
        ("EventRecord", "last_seen", json!({ "pattern": RFC3339 })),
    ]
}

/// An event's reason or source (`EventRecord::problem`): 1–64 letters, digits and `-`.
pub const EVENT_WORD: &str = r"^[A-Za-z0-9-]{1,64}$";

/// An RFC 3339 time as `time::parse_rfc3339` takes it: a real month, day and time of day, optional
/// fraction, `Z` or an offset.
pub const RFC3339: &str = r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt ]([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$";

/// The `?object=` filter of events: `sandbox/ID` or `node/NAME`.
pub const EVENT_OBJECT: &str = r"^(sandbox|node)/[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$";

/// Text on one line: no control characters at all (`char::is_control`).
pub const SINGLE_LINE_TEXT: &str = r"^[^\u0000-\u001f\u007f-\u009f]*$";

/// A role: `admin`, `user`, `controller` or `node:<name>`.
pub const ROLE: &str = r"^(admin|user|controller|node:[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?)$";

/// Schemas whose types refuse unknown fields (`deny_unknown_fields`): `additionalProperties: false`.
pub const CLOSED: [&str; 16] = [
    "ExecRequest",
    "DrainRequest",
    "EventBatch",
    "EventRecord",
    "ObjectReference",
    "TokenRequest",
    "NodeSpec",
    "PortSpec",
    "Probe",
    "EnvVar",
    "ContainerResource",
    "Container",
    "SandboxSpec",
    "Affinity",
    "Preference",
    "Expression",
];

/// A DNS name (`validate::is_ip_or_dns_name`): dot-separated labels of 1–63 alphanumerics and
/// inner hyphens, at most 253 characters, and not all digits (that is a mistyped IP address).
pub const DNS_LABELS: &str =
    r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$";
/// What a DNS name must not be: digits and dots only.
pub const ALL_DIGITS: &str = r"^[0-9]+(\.[0-9]+)*$";
/// A label key whose prefix is longer than 253 characters (what `LABEL_KEY` must not also be).
pub const LONG_LABEL_PREFIX: &str = r"^[^/]{254,}/";

/// A node address: an IPv4 or IPv6 address, or a DNS name.
fn node_address(empty_allowed: bool) -> Value {
    let dns = json!({ "maxLength": 253, "allOf": [{ "pattern": DNS_LABELS }, { "not": { "pattern": ALL_DIGITS } }] });
    let mut forms = vec![json!({ "format": "ipv4" }), json!({ "format": "ipv6" }), dns];
    if empty_allowed {
        forms.insert(0, json!({ "maxLength": 0 }));
    }
    json!({ "anyOf": forms })
}

/// Create requests that take `name` as another spelling of `id`: exactly one of the two is required.
pub const ID_ALIASED: [&str; 2] = ["SandboxCreateRequest", "NodeCreateRequest"];

/// Keywords for a whole component schema: an expression's `values` are required and non-empty for
/// `In` and `NotIn`, and empty for `Exists`.
pub fn schema_keywords() -> Vec<(&'static str, Value)> {
    vec![(
        "Expression",
        json!({
            "if": { "properties": { "operator": { "const": "Exists" } } },
            "then": { "properties": { "values": { "maxItems": 0 } } },
            "else": { "required": ["values"], "properties": { "values": { "minItems": 1 } } }
        }),
    )]
}

/// Fields a request must carry although the type gives them a default, per component schema.
pub fn required_fields() -> [(&'static str, &'static [&'static str]); 10] {
    [
        ("SandboxCreateRequest", &["spec"]),
        ("SandboxUpdateRequest", &["spec"]),
        ("SandboxSpec", &["containers"]),
        ("Container", &["name", "image"]),
        ("AgentCreateRequest", &["id", "containers"]),
        ("NodeCreateRequest", &["spec"]),
        ("NodeSpec", &["ip", "port"]),
        ("Lease", &["name", "lease_duration_seconds"]),
        ("ExecRequest", &["command"]),
        ("TokenRequest", &["identity", "role"]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::name_problem;
    use crate::quantity::{parse_bytes, parse_cpu_milli};
    use crate::syntax::{image_problem, is_env_name, is_printable, label_key_problem, label_value_problem};

    fn agree(pattern: &str, accepts: impl Fn(&str) -> bool, cases: &[&str]) {
        let re = regex::Regex::new(pattern).expect("a valid pattern");
        for case in cases {
            assert_eq!(re.is_match(case), accepts(case), "pattern and validator disagree on {case:?}");
        }
    }

    #[test]
    fn event_fields_match_their_validators() {
        use crate::event::{EventRecord, ObjectReference};
        let times = [
            "2026-12-02T10:00:00Z",
            "2026-12-02T10:00:00.123456Z",
            "2026-12-02 10:00:00+01:00",
            "2026-13-02T10:00:00Z",
            "2026-12-02T24:00:00Z",
            "2026-12-02T10:00:00",
            "",
        ];
        agree(RFC3339, |s| crate::time::parse_rfc3339_micros(s).is_some(), &times);
        let record = |reason: &str| EventRecord {
            involved_object: ObjectReference::sandbox("s"),
            event_type: Default::default(),
            reason: reason.into(),
            message: String::new(),
            source: "t".into(),
            count: 1,
            first_seen: "2026-12-02T10:00:00Z".into(),
            last_seen: "2026-12-02T10:00:00Z".into(),
        };
        let words = ["Scheduled", "node-lost", "", "a b", "a_b", &"a".repeat(64), &"a".repeat(65)];
        agree(EVENT_WORD, |s| record(s).problem().is_none(), &words);
        let objects = ["sandbox/a", "node/n-1", "pod/a", "sandbox/", "sandbox/A", "a"];
        agree(EVENT_OBJECT, |s| ObjectReference::parse(s).is_ok(), &objects);
    }

    #[test]
    fn names_labels_and_env_names_match_their_validators() {
        let names = ["a", "a-b", "a.b", "-a", "a-", "A", "ab_c", "", &"a".repeat(63), &"a".repeat(64), "a\n"];
        agree(NAME, |s| name_problem(s).is_none(), &names);
        let roles = ["admin", "user", "controller", "node:n-1", "node:", "node:Bad", "Admin", "root", "node:a/b"];
        agree(ROLE, |s| crate::auth::Role::parse(s).is_ok(), &roles);
        let long_prefix = format!("{}a/x", format!("{}.", "a".repeat(63)).repeat(4));
        let keys = [
            "app",
            "example.com/app",
            "a/b/c",
            "/app",
            "App_1.x",
            "-x",
            "EXAMPLE.com/x",
            "a.b-c.d/e",
            "x.",
            &long_prefix,
        ];
        let (key, long) = (regex::Regex::new(LABEL_KEY).unwrap(), regex::Regex::new(LONG_LABEL_PREFIX).unwrap());
        for case in keys {
            let schema_valid = key.is_match(case) && !long.is_match(case);
            assert_eq!(schema_valid, label_key_problem(case).is_none(), "label key {case:?}");
        }
        let values = ["", "v", "v-1", "-v", "v_", &"v".repeat(63), &"v".repeat(64), "a b"];
        agree(LABEL_VALUE, |s| label_value_problem(s).is_none(), &values);
        agree(ENV_NAME, is_env_name, &["PATH", "_x", "1A", "A-B", "", "a1_"]);
        agree(MULTILINE_TEXT, |s| is_printable(s, true), &["a\tb\nc", "bell\u{7}", "esc\u{1b}[", "ok é", "\u{85}"]);
        let single = ["a\tb", "a\nb", "ok é", "\u{85}", "\u{7f}", "plain text"];
        agree(SINGLE_LINE_TEXT, |s| !s.chars().any(char::is_control), &single);
    }

    #[test]
    fn node_addresses_match_the_validator() {
        let (labels, digits) = (regex::Regex::new(DNS_LABELS).unwrap(), regex::Regex::new(ALL_DIGITS).unwrap());
        let long_label = "a".repeat(32);
        let named = format!("node-{}", "x".repeat(40));
        let too_long = format!("{}.com", "a.".repeat(126));
        let cases = [
            "localhost",
            "node-1.example.com",
            "1-a",
            "1-2",
            "a1",
            &long_label,
            &named,
            "1.2.3",
            "123",
            "-a",
            "a-",
            "a..b",
            &"a".repeat(64),
            &too_long,
            "a_b",
            "",
        ];
        for case in cases {
            let dns = case.len() <= 253 && labels.is_match(case) && !digits.is_match(case);
            let ip = case.parse::<std::net::IpAddr>().is_ok();
            assert_eq!(dns || ip, crate::validate::is_ip_or_dns_name(case), "address {case:?}");
        }
    }

    #[test]
    fn image_references_match_the_validator() {
        let cases = [
            "nginx",
            "nginx:latest",
            "library/nginx:1.25",
            "registry.example.com/team/app:v1",
            "localhost:5000/app",
            "localhost/app",
            "127.0.0.1:5000/busybox@sha256:0123456789abcdef0123456789abcdef",
            "a__b/c",
            "a___b",
            "a..b",
            "Nginx",
            "a.b",
            "a.b/c",
            "a__b.c/d",
            "host:99999/x",
            "host:123456/x",
            "x:-tag",
            "x:.tag",
            "x@sha256:short",
            "docker.io/library/busybox:1.36",
            "a-b--c/d",
            "a._b",
            "a-.b",
            "a_-b",
            "a.-b/c",
            "",
        ];
        agree(IMAGE, |s| image_problem(s).is_none(), &cases);
    }

    #[test]
    fn quantities_matching_the_patterns_parse_to_more_than_zero() {
        let cpu = [
            "100m",
            "1",
            "0.5",
            ".5",
            "2.25",
            "0",
            "0m",
            "1.5m",
            "007",
            "1.",
            "m",
            "1e3",
            "0.0001",
            "00.1",
            &format!("{}1", "0".repeat(40)),
        ];
        let cpu_ok = |s: &str| parse_cpu_milli(s).is_ok_and(|v| v > 0);
        let re = regex::Regex::new(CPU).unwrap();
        for case in cpu {
            if re.is_match(case) {
                assert!(cpu_ok(case), "the pattern admits {case:?}, which the validator refuses");
            }
        }
        assert!(cpu.iter().filter(|c| re.is_match(c)).count() >= 6, "the pattern is not empty");
        let bytes = [
            "128Mi",
            "1Gi",
            "1",
            "0",
            "1.5Gi",
            "1e3",
            "Mi",
            "1.Mi",
            "500k",
            "999999Ti",
            "00000000999999.999T",
            "000000000000000000000000000000001",
        ];
        let re = regex::Regex::new(BYTES).unwrap();
        for case in bytes {
            if re.is_match(case) {
                assert!(parse_bytes(case).is_ok_and(|v| v > 0), "the pattern admits {case:?}");
            }
        }
    }
}
