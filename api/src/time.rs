//! RFC 3339 UTC timestamps with second precision (microseconds for events), and the wall clock they are read from.

/// Seconds since the Unix epoch, by the wall clock.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Now as `2026-05-15T04:30:00Z`: the one clock every timestamp the API writes comes from.
pub fn rfc3339_now() -> String {
    format_unix(unix_now())
}

/// Now as `2026-05-15T04:30:00.123456Z`: for records ordered within a millisecond (events, as
/// Kubernetes' MicroTime orders them).
pub fn rfc3339_micros_now() -> String {
    let us =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
    format_unix_micros(us)
}

/// Formats microseconds since the Unix epoch as `2026-05-15T04:30:00.123456Z`.
pub fn format_unix_micros(us: i64) -> String {
    let seconds = format_unix(us.div_euclid(1_000_000));
    format!("{}.{:06}Z", &seconds[..seconds.len() - 1], us.rem_euclid(1_000_000))
}

/// Parses an RFC 3339 time (as `parse_rfc3339` does) into Unix microseconds, keeping up to six
/// fractional digits.
pub fn parse_rfc3339_micros(s: &str) -> Option<i64> {
    let seconds = parse_rfc3339(s)?;
    let fraction = s.get(19..).and_then(|rest| rest.strip_prefix('.')).unwrap_or("");
    let digits: String = fraction.chars().take_while(char::is_ascii_digit).take(6).collect();
    let micros = if digits.is_empty() { 0 } else { format!("{digits:0<6}").parse::<i64>().ok()? };
    seconds.checked_mul(1_000_000)?.checked_add(micros)
}

/// Formats seconds since the Unix epoch as `2026-05-15T04:30:00Z`.
pub fn format_unix(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, (rem % 3600) / 60, rem % 60)
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` (fractional seconds and `+00:00` accepted) into Unix seconds.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[13] != b':' || b[16] != b':' || !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    if h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" | "+00:00" | "-00:00" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            if rest.len() != 6 || rest.as_bytes()[3] != b':' {
                return None;
            }
            sign * (oh * 3600 + om * 60)
        }
    };
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se - offset)
}

// Howard Hinnant's civil calendar algorithms.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microsecond_times_parse_whatever_their_precision_and_offset() {
        assert_eq!(parse_rfc3339_micros("1970-01-01T00:16:40.000007Z"), Some(1_000_000_007));
        assert_eq!(parse_rfc3339_micros("1970-01-01T00:16:40.5Z"), Some(1_000_500_000));
        assert_eq!(parse_rfc3339_micros("1970-01-01T00:16:40Z"), Some(1_000_000_000));
        assert_eq!(parse_rfc3339_micros("1970-01-01T01:16:40.25+01:00"), Some(1_000_250_000));
        assert_eq!(parse_rfc3339_micros("soon"), None);
    }

    #[test]
    fn formats_microseconds_that_parse_back_to_their_second() {
        assert_eq!(format_unix_micros(1_000_000_007), "1970-01-01T00:16:40.000007Z");
        assert_eq!(parse_rfc3339(&format_unix_micros(1_000_000_007)), Some(1_000));
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_unix(1_778_819_400), "2026-05-15T04:30:00Z");
        assert_eq!(format_unix(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn parse_round_trips_and_accepts_offsets() {
        for t in [0, 1_778_819_400, 951_782_400, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&format_unix(t)), Some(t));
        }
        assert_eq!(parse_rfc3339("2026-05-15T06:30:00+02:00"), Some(1_778_819_400));
        assert_eq!(parse_rfc3339("2026-05-15T04:30:00.123Z"), Some(1_778_819_400));
        for bad in ["", "2026-05-15", "2026-13-01T00:00:00Z", "2026-05-15T04:30:00", "x026-05-15T04:30:00Z"] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }
}
