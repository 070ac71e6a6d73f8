//! The operator's decisions as pure functions over (spec, observations): which preset, when
//! memory pressure is real, what to do after an attempt ends, how long to wait.
//! Shared by the Kubernetes controller and local mode; nothing here does I/O.

use crate::estimate::{self, DatasetShape};
use crate::preset::{Preset, PresetSelector};
use crate::quantity::format_mebibytes_ceil;
use crate::types::{Attempt, AttemptOutcome};
use std::time::Duration;

/// Exit codes of `indexer build` the policy understands.
pub mod exit_code {
    /// The index was published.
    pub const OK: i32 = 0;
    /// An unexpected error; retrying may help.
    pub const ERROR: i32 = 1;
    /// Bad command line or configuration; retrying cannot help.
    pub const USAGE: i32 = 2;
    /// The dataset is missing or unreadable; retrying cannot help until it is fixed.
    pub const DATASET: i32 = 3;
    /// The index volume is full.
    pub const NO_SPACE: i32 = 4;
    /// The preset cannot fit the memory limit by the build's own plan.
    pub const DOES_NOT_FIT: i32 = 5;
    /// Stopped by SIGTERM/SIGINT; the checkpoint is intact.
    pub const INTERRUPTED: i32 = 6;
    /// Killed by SIGKILL (the OOM killer's signal): 128 + 9.
    pub const KILLED: i32 = 137;
}

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

/// The richest preset whose estimate fits the memory limit (and the disk, when known).
pub fn auto_preset(shape: &DatasetShape, limit: u64, disk_limit: Option<u64>) -> Option<Preset> {
    Preset::ladder()
        .into_iter()
        .find(|p| fits(p, shape, limit, disk_limit))
}

fn fits(p: &Preset, shape: &DatasetShape, limit: u64, disk_limit: Option<u64>) -> bool {
    let memory_ok = estimate::min_memory(p, shape) <= limit;
    let disk_ok = disk_limit.is_none_or(|d| {
        estimate::disk_bytes(estimate::expected_descriptors(p, shape.images), shape.images)
            <= d / 10 * 9
    });
    memory_ok && disk_ok
}

/// The smallest memory limit the poorest preset needs by the estimate.
pub fn smallest_fitting_limit(shape: &DatasetShape) -> u64 {
    Preset::ladder()
        .iter()
        .map(|p| estimate::min_memory(p, shape))
        .min()
        .unwrap_or(0)
}

/// What the policy decided about the first preset.
#[derive(Clone, Debug, PartialEq)]
pub enum PresetChoice {
    /// Run this preset; it fits.
    Fits {
        /// The preset.
        preset: Preset,
        /// Why it was chosen (for an Event and the condition).
        message: String,
    },
    /// The user asked for a preset the estimate says cannot fit: it is tried (estimates are
    /// pessimistic) and the condition names the largest that would fit.
    ExplicitTooLarge {
        /// The preset asked for.
        preset: Preset,
        /// The largest preset that fits, if any.
        largest_fitting: Option<Preset>,
        /// Condition message.
        message: String,
    },
    /// Not even the poorest preset fits: fail without starting a build.
    NothingFits {
        /// Condition message naming the limit and the smallest that would fit.
        message: String,
    },
}

/// Chooses the first preset from the selector, the scan and the limit.
pub fn choose_preset(
    selector: PresetSelector,
    shape: &DatasetShape,
    limit: u64,
    disk_limit: Option<u64>,
) -> PresetChoice {
    let lim = format_mebibytes_ceil(limit);
    let smallest = smallest_fitting_limit(shape);
    if smallest > limit {
        return PresetChoice::NothingFits {
            message: format!(
                "memory limit {lim} is below what even the poorest preset ({}) needs for these images (largest {}x{}); the smallest limit that would fit is {}",
                Preset::ladder().last().map(Preset::label).unwrap_or_default(),
                shape.max_width,
                shape.max_height,
                format_mebibytes_ceil(smallest)
            ),
        };
    }
    let largest = auto_preset(shape, limit, disk_limit);
    match selector.named() {
        None => match largest {
            Some(p) => PresetChoice::Fits {
                message: format!(
                    "auto chose {} ({} features, {} trees): the richest preset whose estimate ({}) fits {lim}",
                    p.label(),
                    p.nfeatures,
                    p.n_trees,
                    format_mebibytes_ceil(estimate::min_memory(&p, shape))
                ),
                preset: p,
            },
            None => PresetChoice::NothingFits {
                message: format!(
                    "no preset fits the index volume for {} images; give the index more storage",
                    shape.images
                ),
            },
        },
        Some(name) => {
            let p = name.preset();
            if fits(&p, shape, limit, disk_limit) {
                PresetChoice::Fits { message: format!("preset {} fits {lim}", p.label()), preset: p }
            } else {
                PresetChoice::ExplicitTooLarge {
                    message: format!(
                        "preset {} is estimated to need {} but the limit is {lim}; {}",
                        p.label(),
                        format_mebibytes_ceil(estimate::min_memory(&p, shape)),
                        match largest {
                            Some(l) => format!("the largest preset that fits is {}; trying {} anyway and downgrading if it runs out", l.label(), p.label()),
                            None => "no preset fits".to_string(),
                        }
                    ),
                    preset: p,
                    largest_fitting: largest,
                }
            }
        }
    }
}

/// What to do after an attempt ended.
#[derive(Clone, Debug, PartialEq)]
pub enum NextStep {
    /// Nothing: the index is published.
    Done,
    /// Start attempt `number` with `preset` after `delay`.
    Start {
        /// Preset of the next attempt.
        preset: Preset,
        /// Its 1-based number.
        number: u32,
        /// Wait this long first.
        delay: Duration,
        /// Condition/Event reason.
        reason: &'static str,
        /// Why, in words.
        message: String,
    },
    /// Give up: phase Failed.
    GiveUp {
        /// Condition/Event reason.
        reason: &'static str,
        /// Why, naming the limit and what would fit where that applies.
        message: String,
    },
}

/// Exponential back-off before retrying after a failure that was not memory: 5 s, 10 s, …, 5 min.
pub fn backoff(consecutive_failures: u32) -> Duration {
    let exp = consecutive_failures.saturating_sub(1).min(6);
    Duration::from_secs((5u64 << exp).min(300))
}

/// The limit to suggest when the poorest preset ran out of memory anyway.
pub fn suggested_limit(shape: &DatasetShape, limit: u64, attempts: &[Attempt]) -> u64 {
    let peak = attempts
        .iter()
        .filter_map(|a| a.peak_working_set)
        .max()
        .unwrap_or(0);
    let by_estimate = smallest_fitting_limit(shape);
    let by_observation = (peak.max(limit) as f64 * 1.25) as u64;
    by_estimate.max(by_observation).div_ceil(16 << 20) * (16 << 20)
}

/// Decides the next step after the last attempt in `attempts` ended with `outcome`.
pub fn after_attempt(
    current: &Preset,
    outcome: AttemptOutcome,
    exit_code: Option<i32>,
    attempts: &[Attempt],
    max_attempts: u32,
    limit: u64,
    shape: &DatasetShape,
) -> NextStep {
    let counted = attempts
        .iter()
        .filter(|a| a.outcome != Some(AttemptOutcome::Interrupted))
        .count() as u32;
    let number = attempts.iter().map(|a| a.number).max().unwrap_or(0) + 1;
    let lim = format_mebibytes_ceil(limit);
    let out_of_attempts = || NextStep::GiveUp {
        reason: "MaxAttemptsReached",
        message: format!(
            "{counted} attempts made (maxAttempts {max_attempts}); last ended {}",
            outcome.as_str()
        ),
    };
    match outcome {
        AttemptOutcome::Succeeded => NextStep::Done,
        AttemptOutcome::Interrupted => NextStep::Start {
            preset: *current,
            number,
            delay: Duration::ZERO,
            reason: "Resuming",
            message: format!(
                "attempt with {} was interrupted; resuming from its checkpoint",
                current.label()
            ),
        },
        AttemptOutcome::OomKilled | AttemptOutcome::MemoryPressureRestart => {
            let what = if outcome == AttemptOutcome::OomKilled {
                "was OOM-killed"
            } else {
                "was stopped under critical memory pressure"
            };
            let cur_need = estimate::min_memory(current, shape);
            let next = Preset::ladder()
                .into_iter()
                .skip_while(|p| p != current)
                .skip(1)
                .find(|p| {
                    let need = estimate::min_memory(p, shape);
                    need <= limit && need < cur_need
                });
            match next {
                None => NextStep::GiveUp {
                    reason: "NoPresetFits",
                    message: format!(
                        "build with {} {what} under the memory limit {lim} and no poorer preset is left; the smallest limit that would fit is about {}",
                        current.label(),
                        format_mebibytes_ceil(suggested_limit(shape, limit, attempts))
                    ),
                },
                Some(_) if counted >= max_attempts => out_of_attempts(),
                Some(p) => NextStep::Start {
                    preset: p,
                    number,
                    delay: Duration::ZERO,
                    reason: if outcome == AttemptOutcome::OomKilled { "DowngradeAfterOOMKill" } else { "DowngradeAfterPressure" },
                    message: format!("build with {} {what} under {lim}; resuming with {} ({} features)", current.label(), p.label(), p.nfeatures),
                },
            }
        }
        AttemptOutcome::Failed => {
            let permanent = match exit_code {
                Some(exit_code::USAGE) => Some((
                    "InvalidConfiguration",
                    "the indexer rejected its configuration",
                )),
                Some(exit_code::DATASET) => {
                    Some(("DatasetUnavailable", "the dataset is missing or unreadable"))
                }
                Some(exit_code::NO_SPACE) => Some((
                    "OutOfDisk",
                    "the index volume is full; give it more storage",
                )),
                _ => None,
            };
            if let Some((reason, text)) = permanent {
                return NextStep::GiveUp {
                    reason,
                    message: format!("build with {} failed: {text}", current.label()),
                };
            }
            if exit_code == Some(exit_code::DOES_NOT_FIT) {
                // The build's own plan refused: same as running out, without the kill.
                return after_attempt(
                    current,
                    AttemptOutcome::OomKilled,
                    None,
                    attempts,
                    max_attempts,
                    limit,
                    shape,
                );
            }
            if counted >= max_attempts {
                return out_of_attempts();
            }
            let consecutive = attempts
                .iter()
                .rev()
                .take_while(|a| a.outcome == Some(AttemptOutcome::Failed))
                .count() as u32;
            NextStep::Start {
                preset: *current,
                number,
                delay: backoff(consecutive.max(1)),
                reason: "RetryAfterFailure",
                message: format!(
                    "build with {} failed (exit code {}); retrying",
                    current.label(),
                    exit_code.map_or("?".into(), |c| c.to_string())
                ),
            }
        }
    }
}

/// Classifies how a build process or container ended.
pub fn outcome_of_exit(
    exit_code: Option<i32>,
    oom_killed: bool,
    stopped_for_pressure: bool,
) -> AttemptOutcome {
    if stopped_for_pressure {
        AttemptOutcome::MemoryPressureRestart
    } else if oom_killed {
        AttemptOutcome::OomKilled
    } else {
        match exit_code {
            Some(exit_code::OK) => AttemptOutcome::Succeeded,
            Some(exit_code::INTERRUPTED) | Some(143) => AttemptOutcome::Interrupted,
            _ => AttemptOutcome::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preset::PresetName;

    const MIB: u64 = 1 << 20;

    fn shape(w: u32, h: u32) -> DatasetShape {
        DatasetShape {
            images: 5_000,
            bytes: 10_000_000_000,
            max_width: w,
            max_height: h,
            max_is_jpeg: true,
        }
    }

    fn sample(at_s: u64, ws_mib: u64) -> MemorySample {
        MemorySample {
            at_ms: at_s * 1000,
            working_set: ws_mib * MIB,
            limit: 100 * MIB,
        }
    }

    fn attempt(n: u32, preset: &str, outcome: AttemptOutcome) -> Attempt {
        Attempt {
            number: n,
            preset: preset.into(),
            pod: None,
            start_time: None,
            end_time: None,
            outcome: Some(outcome),
            peak_rss: None,
            peak_working_set: Some(90 * MIB),
            exit_code: None,
            message: None,
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

    #[test]
    fn auto_takes_full_when_memory_allows_and_steps_down_when_not() {
        let s = shape(6000, 4000);
        assert_eq!(
            auto_preset(&s, 512 * MIB, None).unwrap().name,
            PresetName::Full
        );
        let full_need = estimate::min_memory(&PresetName::Full.preset(), &s);
        let below = auto_preset(&s, full_need - 1, None).unwrap();
        assert_ne!(below.name, PresetName::Full);
        assert!(estimate::min_memory(&below, &s) < full_need);
        assert_eq!(auto_preset(&s, MIB, None), None);
    }

    #[test]
    fn auto_respects_the_index_volume() {
        let mut s = shape(2000, 1500);
        s.images = 116_000;
        let tight_disk = estimate::disk_bytes(
            &PresetName::Full.preset(),
            estimate::expected_descriptors(&PresetName::Full.preset(), s.images),
            s.images,
        );
        let p = auto_preset(&s, 4 << 30, Some(tight_disk)).unwrap();
        assert_ne!(p.name, PresetName::Full);
    }

    #[test]
    fn explicit_preset_that_cannot_fit_is_tried_with_a_warning() {
        let s = shape(6000, 4000);
        let full_need = estimate::min_memory(&PresetName::Full.preset(), &s);
        match choose_preset(PresetSelector::Full, &s, full_need - MIB, None) {
            PresetChoice::ExplicitTooLarge {
                preset,
                largest_fitting,
                message,
            } => {
                assert_eq!(preset.name, PresetName::Full);
                let l = largest_fitting.unwrap();
                assert_ne!(l.name, PresetName::Full);
                assert!(message.contains(&l.label()), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            choose_preset(PresetSelector::Full, &s, 1 << 30, None),
            PresetChoice::Fits { .. }
        ));
    }

    #[test]
    fn below_the_floor_names_the_limit_and_the_smallest_that_fits() {
        let s = shape(4000, 3000);
        match choose_preset(PresetSelector::Auto, &s, 20 * MIB, None) {
            PresetChoice::NothingFits { message } => {
                assert!(message.contains("20Mi"), "{message}");
                assert!(
                    message.contains(&format_mebibytes_ceil(smallest_fitting_limit(&s))),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn oom_kill_downgrades_to_a_preset_that_needs_less() {
        let s = shape(6000, 4000);
        let full = PresetName::Full.preset();
        let limit = estimate::min_memory(&full, &s) - MIB;
        let attempts = [attempt(1, "full", AttemptOutcome::OomKilled)];
        match after_attempt(
            &full,
            AttemptOutcome::OomKilled,
            Some(137),
            &attempts,
            6,
            limit,
            &s,
        ) {
            NextStep::Start {
                preset,
                number,
                delay,
                reason,
                ..
            } => {
                assert_ne!(preset.name, PresetName::Full);
                assert!(estimate::min_memory(&preset, &s) <= limit);
                assert_eq!(number, 2);
                assert_eq!(delay, Duration::ZERO);
                assert_eq!(reason, "DowngradeAfterOOMKill");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pressure_stop_downgrades_like_an_oom_kill() {
        let s = shape(1000, 800);
        let small = PresetName::Small.preset();
        let attempts = [attempt(1, "small", AttemptOutcome::MemoryPressureRestart)];
        match after_attempt(
            &small,
            AttemptOutcome::MemoryPressureRestart,
            None,
            &attempts,
            6,
            1 << 30,
            &s,
        ) {
            NextStep::Start { preset, reason, .. } => {
                assert_eq!(preset.name, PresetName::Medium);
                assert_eq!(reason, "DowngradeAfterPressure");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn oom_at_the_floor_gives_up_naming_limits() {
        let s = shape(1000, 800);
        let floor = *Preset::ladder().last().unwrap();
        let attempts = [attempt(1, &floor.label(), AttemptOutcome::OomKilled)];
        match after_attempt(
            &floor,
            AttemptOutcome::OomKilled,
            Some(137),
            &attempts,
            6,
            100 * MIB,
            &s,
        ) {
            NextStep::GiveUp { reason, message } => {
                assert_eq!(reason, "NoPresetFits");
                assert!(message.contains("100Mi"), "{message}");
                assert!(message.contains("128Mi"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failures_retry_with_backoff_until_max_attempts() {
        let s = shape(1000, 800);
        let p = PresetName::Small.preset();
        let a1 = [attempt(1, "small", AttemptOutcome::Failed)];
        match after_attempt(&p, AttemptOutcome::Failed, Some(1), &a1, 3, 1 << 30, &s) {
            NextStep::Start {
                preset,
                delay,
                number,
                ..
            } => {
                assert_eq!(preset, p);
                assert_eq!(delay, Duration::from_secs(5));
                assert_eq!(number, 2);
            }
            other => panic!("{other:?}"),
        }
        let a2 = [
            attempt(1, "small", AttemptOutcome::Failed),
            attempt(2, "small", AttemptOutcome::Failed),
        ];
        assert!(
            matches!(after_attempt(&p, AttemptOutcome::Failed, Some(1), &a2, 3, 1 << 30, &s), NextStep::Start { delay, .. } if delay == Duration::from_secs(10))
        );
        let a3 = [
            a2[0].clone(),
            a2[1].clone(),
            attempt(3, "small", AttemptOutcome::Failed),
        ];
        assert!(matches!(
            after_attempt(&p, AttemptOutcome::Failed, Some(1), &a3, 3, 1 << 30, &s),
            NextStep::GiveUp {
                reason: "MaxAttemptsReached",
                ..
            }
        ));
    }

    #[test]
    fn permanent_failures_do_not_crash_loop() {
        let s = shape(1000, 800);
        let p = PresetName::Small.preset();
        let a = [attempt(1, "small", AttemptOutcome::Failed)];
        for (code, reason) in [
            (2, "InvalidConfiguration"),
            (3, "DatasetUnavailable"),
            (4, "OutOfDisk"),
        ] {
            assert!(
                matches!(after_attempt(&p, AttemptOutcome::Failed, Some(code), &a, 6, 1 << 30, &s), NextStep::GiveUp { reason: r, .. } if r == reason)
            );
        }
    }

    #[test]
    fn interrupted_attempts_resume_and_do_not_count() {
        let s = shape(1000, 800);
        let p = PresetName::Full.preset();
        let a = [attempt(1, "full", AttemptOutcome::Interrupted)];
        assert!(
            matches!(after_attempt(&p, AttemptOutcome::Interrupted, Some(6), &a, 1, 1 << 30, &s), NextStep::Start { preset, number: 2, .. } if preset == p)
        );
    }

    #[test]
    fn exit_classification() {
        assert_eq!(
            outcome_of_exit(Some(0), false, false),
            AttemptOutcome::Succeeded
        );
        assert_eq!(
            outcome_of_exit(Some(137), true, false),
            AttemptOutcome::OomKilled
        );
        assert_eq!(
            outcome_of_exit(Some(137), false, true),
            AttemptOutcome::MemoryPressureRestart
        );
        assert_eq!(
            outcome_of_exit(Some(6), false, false),
            AttemptOutcome::Interrupted
        );
        assert_eq!(
            outcome_of_exit(Some(1), false, false),
            AttemptOutcome::Failed
        );
        assert_eq!(outcome_of_exit(None, false, false), AttemptOutcome::Failed);
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(20), Duration::from_secs(300));
    }
}
