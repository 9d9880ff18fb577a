//! Kubernetes-style quantities: CPU in millicores and memory in bytes.

use std::fmt;

/// Why a quantity string was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuantityError {
    Empty,
    Invalid(String),
    Overflow(String),
}

impl fmt::Display for QuantityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuantityError::Empty => write!(f, "empty quantity"),
            QuantityError::Invalid(s) => write!(f, "invalid quantity {s:?}"),
            QuantityError::Overflow(s) => write!(f, "quantity {s:?} is too large"),
        }
    }
}

impl std::error::Error for QuantityError {}

/// Parses a CPU quantity (`200m`, `1`, `0.5`, `2.25`) into millicores, rounding fractions of a millicore up.
pub fn parse_cpu_milli(s: &str) -> Result<u64, QuantityError> {
    let (number, scale_milli) = match s.strip_suffix('m') {
        Some(n) => (n, 1u128),
        None => (s, 1000u128),
    };
    scaled(s, number, scale_milli)
}

/// Parses a byte quantity (`256Mi`, `1Gi`, `500M`, `1048576`, `1.5Gi`) into bytes, rounding up.
pub fn parse_bytes(s: &str) -> Result<u64, QuantityError> {
    const SUFFIXES: [(&str, u128); 12] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("Ei", 1 << 60),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("E", 1_000_000_000_000_000_000),
    ];
    let (number, multiplier) =
        SUFFIXES.iter().find_map(|(suffix, m)| s.strip_suffix(suffix).map(|n| (n, *m))).unwrap_or((s, 1));
    scaled(s, number, multiplier)
}

/// Multiplies a plain non-negative decimal by `multiplier`, rounding any fraction up.
fn scaled(original: &str, number: &str, multiplier: u128) -> Result<u64, QuantityError> {
    if original.is_empty() {
        return Err(QuantityError::Empty);
    }
    let invalid = || QuantityError::Invalid(original.to_string());
    let overflow = || QuantityError::Overflow(original.to_string());
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if (int_part.is_empty() && frac_part.is_empty())
        || !all_digits(int_part)
        || !all_digits(frac_part)
        || (number.contains('.') && frac_part.is_empty())
    {
        return Err(invalid());
    }
    if int_part.len() > 30 || frac_part.len() > 30 {
        return Err(overflow());
    }
    let int: u128 = if int_part.is_empty() { 0 } else { int_part.parse().map_err(|_| overflow())? };
    let mut total = int.checked_mul(multiplier).ok_or_else(overflow)?;
    if !frac_part.is_empty() {
        let frac: u128 = frac_part.parse().map_err(|_| overflow())?;
        let denominator = 10u128.pow(frac_part.len() as u32);
        let scaled_frac = frac.checked_mul(multiplier).ok_or_else(overflow)?;
        total = total.checked_add(scaled_frac.div_ceil(denominator)).ok_or_else(overflow)?;
    }
    u64::try_from(total).map_err(|_| overflow())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantities_parse_to_millicores() {
        let cases = [
            ("200m", 200),
            ("1", 1000),
            ("0.5", 500),
            ("2.25", 2250),
            (".5", 500),
            ("0", 0),
            ("1500m", 1500),
            ("0.0001", 1),
            ("4000m", 4000),
            ("64", 64_000),
        ];
        for (input, want) in cases {
            assert_eq!(parse_cpu_milli(input), Ok(want), "input {input:?}");
        }
    }

    #[test]
    fn cpu_quantities_reject_garbage() {
        let cases = ["", "2x", "-1", "1.5.5", "m", "1.", "1 ", " 1", "1e3", "+1", "1Mi", "0.5mm", ".."];
        for input in cases {
            assert!(parse_cpu_milli(input).is_err(), "input {input:?} should fail");
        }
    }

    #[test]
    fn cpu_quantity_overflow_is_rejected() {
        assert!(matches!(parse_cpu_milli("99999999999999999999"), Err(QuantityError::Overflow(_))));
        assert!(matches!(parse_cpu_milli("1234567890123456789012345678901234567890"), Err(QuantityError::Overflow(_))));
    }

    #[test]
    fn byte_quantities_parse_to_bytes() {
        let cases = [
            ("256Mi", 256 << 20),
            ("1Gi", 1 << 30),
            ("500M", 500_000_000),
            ("1048576", 1_048_576),
            ("1Ki", 1024),
            ("1k", 1000),
            ("1.5Gi", 3 << 29),
            ("96Mi", 96 << 20),
            ("2Ti", 2u64 << 40),
            ("1E", 1_000_000_000_000_000_000),
            ("0.5Ki", 512),
            ("0", 0),
        ];
        for (input, want) in cases {
            assert_eq!(parse_bytes(input), Ok(want), "input {input:?}");
        }
    }

    #[test]
    fn byte_quantities_reject_garbage() {
        let cases = ["", "2x", "-1", "1.5.5", "Mi", "1MiB", "1mi", "1 Gi", "1.Gi", "0x10", "1e6"];
        for input in cases {
            assert!(parse_bytes(input).is_err(), "input {input:?} should fail");
        }
    }

    #[test]
    fn byte_quantity_overflow_is_rejected() {
        assert!(matches!(parse_bytes("16Ei"), Err(QuantityError::Overflow(_))));
        assert!(matches!(parse_bytes("18446744073709551616"), Err(QuantityError::Overflow(_))));
        assert_eq!(parse_bytes("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn error_messages_quote_the_input() {
        assert_eq!(parse_cpu_milli("2x").unwrap_err().to_string(), "invalid quantity \"2x\"");
        assert_eq!(parse_bytes("").unwrap_err().to_string(), "empty quantity");
    }
}
