//! Wall-clock time as the API writes it: Unix seconds and RFC 3339 UTC with second precision.

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Now as `2026-05-15T04:30:00Z`.
pub fn rfc3339_now() -> String {
    sandboxd_api::time::format_unix(unix_now())
}
