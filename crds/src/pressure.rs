//! When memory pressure is real: a build's working set against its limit over recent samples
//! (one spike is a warning at most; only a sustained run above the critical ratio stops a
//! build).

use crate::quantity::format_mebibytes_ceil;
use std::time::Duration;

/// Working set over limit above which memory pressure is a warning.
pub const WARNING_RATIO: f64 = 0.80;
/// Working set over limit above which sustained pressure is critical.
pub const CRITICAL_RATIO: f64 = 0.90;
/// Samples that must all be critical before a build is stopped.
pub const CRITICAL_MIN_SAMPLES: usize = 3;
/// Time those samples must span (so one spike, or three quick scrapes, is not enough).
pub const CRITICAL_MIN_SPAN: Duration = Duration::from_secs(10);

/// One scrape of a build's memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemorySample {
    /// When it was taken, in milliseconds on any monotonic clock.
    pub at_ms: u64,
    /// The cgroup working set in bytes.
    pub working_set: u64,
    /// The memory limit in bytes.
    pub limit: u64,
}

/// How close a build is to its memory limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PressureLevel {
    /// Below the warning ratio.
    Normal,
    /// The latest sample is above the warning ratio.
    Warning,
    /// Samples above the critical ratio for long enough: stop and downgrade.
    Critical,
}

/// The pressure verdict with what a condition should say.
#[derive(Clone, Debug, PartialEq)]
pub struct Pressure {
    /// The level.
    pub level: PressureLevel,
    /// Latest working set / limit.
    pub ratio: f64,
    /// Condition reason.
    pub reason: &'static str,
    /// Condition message.
    pub message: String,
}

/// Classifies memory pressure from recent samples (oldest first).
pub fn classify_pressure(samples: &[MemorySample]) -> Pressure {
    let Some(last) = samples.last().filter(|s| s.limit > 0) else {
        return Pressure {
            level: PressureLevel::Normal,
            ratio: 0.0,
            reason: "NoSamples",
            message: "no memory samples yet".into(),
        };
    };
    let ratio = last.working_set as f64 / last.limit as f64;
    let over =
        |s: &MemorySample| s.limit > 0 && s.working_set as f64 / s.limit as f64 > CRITICAL_RATIO;
    let run: Vec<&MemorySample> = samples.iter().rev().take_while(|s| over(s)).collect();
    let span = run
        .first()
        .zip(run.last())
        .map(|(a, b)| a.at_ms.saturating_sub(b.at_ms))
        .unwrap_or(0);
    let pct = ratio * 100.0;
    let ws = format_mebibytes_ceil(last.working_set);
    let lim = format_mebibytes_ceil(last.limit);
    if run.len() >= CRITICAL_MIN_SAMPLES && span >= CRITICAL_MIN_SPAN.as_millis() as u64 {
        Pressure {
            level: PressureLevel::Critical,
            ratio,
            reason: "CriticalPressure",
            message: format!(
                "working set {ws} of {lim} ({pct:.0}%) above {:.0}% for {}s",
                CRITICAL_RATIO * 100.0,
                span / 1000
            ),
        }
    } else if ratio > WARNING_RATIO {
        Pressure {
            level: PressureLevel::Warning,
            ratio,
            reason: "HighWorkingSet",
            message: format!(
                "working set {ws} of {lim} ({pct:.0}%) above {:.0}%",
                WARNING_RATIO * 100.0
            ),
        }
    } else {
        Pressure {
            level: PressureLevel::Normal,
            ratio,
            reason: "WithinLimit",
            message: format!("working set {ws} of {lim} ({pct:.0}%)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn sample(at_s: u64, ws_mib: u64) -> MemorySample {
        MemorySample {
            at_ms: at_s * 1000,
            working_set: ws_mib * MIB,
            limit: 100 * MIB,
        }
    }

    #[test]
    fn pressure_table() {
        use PressureLevel::*;
        let cases: &[(&[MemorySample], PressureLevel)] = &[
            (&[], Normal),
            (&[sample(0, 50)], Normal),
            (&[sample(0, 80)], Normal),
            (&[sample(0, 81)], Warning),
            (&[sample(0, 95)], Warning),
            // one spike is not critical
            (&[sample(0, 50), sample(5, 99), sample(10, 60)], Normal),
            // three samples above 90% but within 4 s: not sustained yet
            (&[sample(0, 95), sample(2, 95), sample(4, 95)], Warning),
            // sustained for 10 s over 3 samples
            (&[sample(0, 95), sample(5, 96), sample(10, 97)], Critical),
            // the run must be the latest samples
            (
                &[sample(0, 95), sample(5, 96), sample(10, 97), sample(15, 70)],
                Normal,
            ),
            (
                &[sample(0, 50), sample(5, 92), sample(10, 92), sample(15, 92)],
                Critical,
            ),
            // exactly 90% is not above it
            (&[sample(0, 90), sample(5, 90), sample(10, 90)], Warning),
        ];
        for (samples, want) in cases {
            assert_eq!(classify_pressure(samples).level, *want, "{samples:?}");
        }
        assert!(
            classify_pressure(&[sample(0, 95), sample(5, 96), sample(10, 97)])
                .message
                .contains("97%")
        );
    }
}
