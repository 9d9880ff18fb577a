//! Object names: DNS-1123 label style, 1–63 characters of `[a-z0-9-.]`.

/// Returns why `name` is not a valid object name, or `None` when it is.
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".into());
    }
    if name.len() > 63 {
        return Some(format!("{name:?} is longer than 63 characters"));
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if !name.chars().all(allowed) {
        return Some(format!("{name:?} may contain only lowercase letters, digits, '-' and '.'"));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !alnum(name.chars().next()) || !alnum(name.chars().last()) {
        return Some(format!("{name:?} must start and end with a letter or digit"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dns_label_rules() {
        for ok in ["a", "node-a", "sbx-demo-1", "a.b", "0abc9", &"a".repeat(63)] {
            assert_eq!(name_problem(ok), None, "{ok:?}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a b", ".a", "a.", &"a".repeat(64), "ä"] {
            assert!(name_problem(bad).is_some(), "{bad:?}");
        }
    }
}
