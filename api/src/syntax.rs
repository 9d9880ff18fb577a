//! The syntax of free-form strings in specs: label keys and values (Kubernetes' rules), image
//! references (the OCI distribution grammar), environment variable names, and printable text.

/// Why `key` is not a valid label key, if it is not: an optional DNS-subdomain prefix and `/`, then
/// a name of at most 63 characters (alphanumerics with `-`, `_`, `.` inside).
pub fn label_key_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() || prefix.len() > 253 || !is_dns_subdomain(prefix) {
            return Some(format!("key {}: the prefix must be a DNS subdomain of at most 253 characters", shown(key)));
        }
    }
    if name.is_empty() || name.len() > 63 || !is_label_word(name) {
        return Some(format!(
            "key {}: the name must be 1-63 characters, alphanumerics with '-', '_' or '.' inside",
            shown(key)
        ));
    }
    None
}

/// Why `value` is not a valid label value: empty, or at most 63 characters with the key's name rules.
pub fn label_value_problem(value: &str) -> Option<String> {
    if value.is_empty() || (value.len() <= 63 && is_label_word(value)) {
        None
    } else {
        Some(format!(
            "value {}: must be at most 63 characters, alphanumerics with '-', '_' or '.' inside",
            shown(value)
        ))
    }
}

fn is_label_word(s: &str) -> bool {
    let bytes = s.as_bytes();
    let edge = |b: &u8| b.is_ascii_alphanumeric();
    bytes.first().is_some_and(edge)
        && bytes.last().is_some_and(edge)
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn is_dns_subdomain(s: &str) -> bool {
    s.split('.').all(|label| {
        let b = label.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    })
}

/// Why `image` is not an image reference, if it is not:
/// `[host[:port]/]path[/path…][:tag][@algorithm:hex]`, path components lower case.
pub fn image_problem(image: &str) -> Option<String> {
    let bad = |why: &str| Some(format!("{}: {why}", shown(image)));
    if image.trim().is_empty() {
        return Some("required".into());
    }
    if image.len() > 512 {
        return bad("longer than 512 characters");
    }
    let (rest, digest) = match image.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (image, None),
    };
    if let Some(digest) = digest {
        let Some((algorithm, hex)) = digest.split_once(':') else { return bad("a digest is algorithm:hex") };
        let algorithm_ok = !algorithm.is_empty()
            && algorithm
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'+' | b'.' | b'_' | b'-'));
        if !algorithm_ok || hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bad("a digest is algorithm:hex (at least 32 hex digits)");
        }
    }
    // A tag follows the last ':' that comes after the last '/' (a ':' before it is a registry port).
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag {
        let tag_ok = !tag.is_empty()
            && tag.len() <= 128
            && tag.as_bytes()[0] != b'.'
            && tag.as_bytes()[0] != b'-'
            && tag.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !tag_ok {
            return bad("a tag is 1-128 of letters, digits, '_', '.' and '-', not starting with '.' or '-'");
        }
    }
    let mut components: Vec<&str> = name.split('/').collect();
    if components.len() > 1 && looks_like_registry(components[0]) {
        let host = components.remove(0);
        if !is_registry(host) {
            return bad("the registry must be host or host:port");
        }
    }
    if components.iter().any(|c| !is_path_component(c)) {
        return bad("path components are lower-case letters and digits, separated by '.', '_', '__' or '-'");
    }
    None
}

/// Docker's rule: a first component with a '.' or ':', or `localhost`, names a registry.
fn looks_like_registry(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

fn is_registry(host: &str) -> bool {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    let name_ok = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    port_ok && (name_ok || name.parse::<std::net::Ipv4Addr>().is_ok())
}

fn is_path_component(component: &str) -> bool {
    let b = component.as_bytes();
    if b.is_empty() || !b[0].is_ascii_lowercase() && !b[0].is_ascii_digit() {
        return false;
    }
    if !(b[b.len() - 1].is_ascii_lowercase() || b[b.len() - 1].is_ascii_digit()) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            i += 1;
            continue;
        }
        // Separators: '.', '_', '__', or any run of '-'.
        let run = b[i..].iter().take_while(|x| **x == c).count();
        let allowed = match c {
            b'.' => run == 1,
            b'_' => run <= 2,
            b'-' => true,
            _ => false,
        };
        i += run;
        // A separator is followed by a letter or digit, never by another kind of separator (`a._b`).
        if !allowed || !b.get(i).is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) {
            return false;
        }
    }
    true
}

/// Whether `name` is a C identifier, the portable shape of an environment variable name.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether `text` has no control characters (tab and newline are allowed where `multiline`).
pub fn is_printable(text: &str, multiline: bool) -> bool {
    text.chars().all(|c| !c.is_control() || (multiline && matches!(c, '\n' | '\t')))
}

/// A string for an error message: quoted, control characters escaped, and cut to 80 characters.
pub fn shown(text: &str) -> String {
    let cut: String = text.chars().take(80).collect();
    let more = if cut.len() < text.len() { "…" } else { "" };
    format!("{:?}{more}", cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys_and_values_follow_kubernetes() {
        for good in ["app", "sandboxd.io/managed", "a-b_c.d", "example.com/Tier", "x"] {
            assert_eq!(label_key_problem(good), None, "{good}");
        }
        let long_name = "a".repeat(64);
        for bad in ["", "-app", "app-", "a b", "/app", "Example.com/x", "x/", "a\u{1b}[31m", long_name.as_str()] {
            assert!(label_key_problem(bad).is_some(), "{bad:?} accepted");
        }
        assert_eq!(label_value_problem(""), None);
        assert_eq!(label_value_problem("v1.2_rc-3"), None);
        assert!(label_value_problem(&"v".repeat(64)).is_some());
        assert!(label_value_problem("two words").is_some());
        assert!(label_value_problem("tail\n").is_some());
    }

    #[test]
    fn image_references_follow_the_oci_grammar() {
        for good in [
            "busybox",
            "busybox:1.36",
            "library/busybox:latest",
            "127.0.0.1:5000/busybox:e2e",
            "localhost/app",
            "registry.example.com:443/team/app_one__two-three:v1.0",
            "ghcr.io/org/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "example.test/busybox:dataplane",
        ] {
            assert_eq!(image_problem(good), None, "{good}");
        }
        for bad in [
            "",
            "BusyBox",
            "busybox:",
            "busybox:-x",
            "bad image",
            "busy\u{1b}box",
            "app@sha256:xyz",
            "a//b",
            "a/.b",
            "host:99x/app",
            "busybox:1.36\n",
        ] {
            assert!(image_problem(bad).is_some(), "{bad:?} accepted");
        }
    }

    #[test]
    fn env_names_are_c_identifiers_and_text_is_printable() {
        assert!(is_env_name("PATH") && is_env_name("_x1"));
        assert!(!is_env_name("1X") && !is_env_name("A-B") && !is_env_name("") && !is_env_name("A=B"));
        assert!(is_printable("a\tb\nc", true));
        assert!(!is_printable("a\nb", false));
        assert!(!is_printable("\u{1b}[2J", true));
        assert_eq!(shown("a\u{1b}b"), "\"a\\u{1b}b\"");
    }
}
