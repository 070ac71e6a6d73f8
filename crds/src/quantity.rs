//! Kubernetes resource quantities ("512Mi", "1G", "1.5Gi") as byte counts.

use thiserror::Error;

/// Why a quantity string could not be read as a byte count.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum QuantityError {
    /// The string is empty.
    #[error("quantity is empty")]
    Empty,
    /// The number part is not a non-negative decimal number.
    #[error("quantity {0:?} does not start with a non-negative number")]
    BadNumber(String),
    /// The suffix is not one Kubernetes accepts for memory.
    #[error("quantity {0:?} has an unknown suffix (use Ki, Mi, Gi, Ti, k, M, G, T or none)")]
    BadSuffix(String),
    /// The value does not fit in 64 bits.
    #[error("quantity {0:?} is too large")]
    Overflow(String),
}

/// Parses a Kubernetes quantity into bytes, rounding fractions up like the kubelet does.
pub fn parse_bytes(text: &str) -> Result<u64, QuantityError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(QuantityError::Empty);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() || number.matches('.').count() > 1 || number == "." {
        return Err(QuantityError::BadNumber(text.to_string()));
    }
    let (multiplier, exp10): (u128, i32) = match suffix {
        "" => (1, 0),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        "m" => (1, -3),
        s if s.starts_with(['e', 'E']) => match s[1..].parse::<i32>() {
            Ok(e) if (-18..=18).contains(&e) => (1, e),
            _ => return Err(QuantityError::BadSuffix(text.to_string())),
        },
        _ => return Err(QuantityError::BadSuffix(text.to_string())),
    };
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    let digits = format!("{int_part}{frac_part}");
    let mantissa: u128 = digits
        .trim_start_matches('0')
        .parse::<u128>()
        .or_else(|e| {
            if digits.trim_start_matches('0').is_empty() {
                Ok(0)
            } else {
                Err(e)
            }
        })
        .map_err(|_| QuantityError::Overflow(text.to_string()))?;
    let scale = exp10 - frac_part.len() as i32;
    let overflow = || QuantityError::Overflow(text.to_string());
    let value = mantissa.checked_mul(multiplier).ok_or_else(overflow)?;
    let bytes = if scale >= 0 {
        value
            .checked_mul(10u128.checked_pow(scale as u32).ok_or_else(overflow)?)
            .ok_or_else(overflow)?
    } else {
        let div = 10u128.checked_pow((-scale) as u32).ok_or_else(overflow)?;
        value.div_ceil(div)
    };
    u64::try_from(bytes).map_err(|_| overflow())
}

/// Parses a byte size as the command lines take it: Kubernetes quantities (`20M`, `20Mi`) and
/// the common `20MB` / `20MiB`.
pub fn parse_size(text: &str) -> Result<u64, QuantityError> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .map(|s| format!("{s}i"))
        .or_else(|| t.strip_suffix('B').map(str::to_string))
        .unwrap_or_else(|| t.to_string());
    parse_bytes(&t)
}

/// Formats bytes as the largest exact-ish binary unit, e.g. `512Mi` or `1.5Gi`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    for (name, size) in UNITS {
        if bytes >= size {
            let v = bytes as f64 / size as f64;
            return if (v - v.round()).abs() < 0.05 {
                format!("{}{name}", v.round() as u64)
            } else {
                format!("{v:.1}{name}")
            };
        }
    }
    format!("{bytes}")
}

/// Rounds bytes up to a whole number of mebibytes and formats it (`"337Mi"`), for suggestions.
pub fn format_mebibytes_ceil(bytes: u64) -> String {
    format!("{}Mi", bytes.div_ceil(1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_kubectl_accepts() {
        let cases: &[(&str, u64)] = &[
            ("512Mi", 512 << 20),
            ("1Gi", 1 << 30),
            ("1.5Gi", 3 << 29),
            ("128974848", 128_974_848),
            ("129M", 129_000_000),
            ("1e3", 1000),
            ("100k", 100_000),
            ("0", 0),
            ("1500m", 2),
            (" 2Ki ", 2048),
        ];
        for (text, want) in cases {
            assert_eq!(parse_bytes(text), Ok(*want), "{text}");
        }
    }

    #[test]
    fn rejects_what_kubectl_rejects() {
        assert_eq!(parse_bytes(""), Err(QuantityError::Empty));
        assert!(matches!(
            parse_bytes("Mi"),
            Err(QuantityError::BadNumber(_))
        ));
        assert!(matches!(
            parse_bytes("-1Gi"),
            Err(QuantityError::BadNumber(_))
        ));
        assert!(matches!(
            parse_bytes("1.2.3"),
            Err(QuantityError::BadNumber(_))
        ));
        assert!(matches!(
            parse_bytes("12MB"),
            Err(QuantityError::BadSuffix(_))
        ));
        assert!(matches!(
            parse_bytes("99999999Ei"),
            Err(QuantityError::Overflow(_))
        ));
    }

    #[test]
    fn sizes_accept_quantities_and_megabytes() {
        assert_eq!(parse_size("20MB").unwrap(), 20_000_000);
        assert_eq!(parse_size("20MiB").unwrap(), 20 << 20);
        assert_eq!(parse_size("20Mi").unwrap(), 20 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn formats_round_trip_for_whole_units() {
        for text in ["512Mi", "1Gi", "3Ki", "1.5Gi"] {
            assert_eq!(format_bytes(parse_bytes(text).unwrap()), text);
        }
        assert_eq!(format_mebibytes_ceil((300 << 20) + 1), "301Mi");
    }
}
