//! Durations as the command lines take them: humantime's forms (`5s`, `500ms`, `2m`, `1h`,
//! `1.5s`, `1h 30m`), and a bare number as seconds.

use std::time::Duration;

/// Why a duration could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{text:?} is not a duration such as 5s, 500ms or 2m ({reason})")]
pub struct DurationError {
    /// What was given.
    pub text: String,
    /// What humantime said.
    pub reason: String,
}

/// Parses a duration such as `5s`, `500ms`, `2m`, `1h` or `1.5` (seconds).
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let t = text.trim();
    if let Ok(seconds) = t.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).map_err(|e| DurationError {
            text: text.to_string(),
            reason: e.to_string(),
        });
    }
    humantime::parse_duration(t).map_err(|e| DurationError {
        text: text.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_fractions_and_bare_seconds() {
        assert_eq!(parse("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse(" 1.5 "), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        assert!(parse("-1").is_err());
        assert!(parse("5 parsecs").is_err());
        assert!(parse("soon").is_err());
        assert!(parse("").is_err());
    }
}
