//! One build unit's attempt ladder: from the scan and the attempts so far, what the unit does
//! next ([`next_action`]: scan, choose the first preset, watch the running attempt, publish, or
//! the ladder's next step), and after an attempt ended, which step that is
//! ([`after_attempt`]: resume, downgrade to a poorer preset, retry after a back-off, or give up
//! naming the limit that would fit).
//!
//! An unsharded ImageIndex is one unit; a sharded one runs one ladder per shard.

use crate::attempts;
use crate::estimate::{self, DatasetShape};
use crate::first_preset::smallest_fitting_limit;
use crate::outcome::exit_code;
use crate::preset::Preset;
use crate::quantity::format_mebibytes_ceil;
use crate::types::{Attempt, AttemptOutcome, ScanSummary, UnitStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::time::Duration;

/// The spec's bounds on one unit's ladder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The memory limit of every attempt, in bytes.
    pub memory_limit: u64,
    /// Attempts (interrupted ones not counted) before the unit gives up.
    pub max_attempts: u32,
}

/// What one build unit does next.
#[derive(Clone, Debug, PartialEq)]
pub enum UnitAction {
    /// No scan result is recorded: the build starts over with a scan.
    Scan,
    /// The build has no attempt yet: choose the first preset and start attempt `number`.
    Choose {
        /// The first attempt's number.
        number: u32,
    },
    /// Attempt `number` is running: watch its memory and its end.
    Watch {
        /// The running attempt.
        number: u32,
    },
    /// The last attempt published an index: serve it.
    Publish,
    /// The last attempt ended otherwise: start the next one.
    Start(NextAttempt),
    /// The last attempt ended otherwise and the ladder is at its end: give up.
    GiveUp {
        /// Condition/Event reason.
        reason: &'static str,
        /// Why, naming the limit and what would fit where that applies.
        message: String,
    },
}

/// The attempt the ladder starts after one ended.
#[derive(Clone, Debug, PartialEq)]
pub struct NextAttempt {
    /// Its preset.
    pub preset: Preset,
    /// Its number.
    pub number: u32,
    /// How long to wait before it starts (a back-off not yet over), `None`: start now.
    pub wait: Option<Duration>,
    /// Condition/Event reason of the decision.
    pub reason: &'static str,
    /// The decision in words.
    pub message: String,
    /// How the attempt it follows ended.
    pub after: AttemptOutcome,
}

/// Decides what one unit does next from the scan (`None`: none recorded) and its attempts,
/// at `now` (a back-off counts from the end of the attempt it follows).
pub fn next_action(
    unit: &UnitStatus,
    scan: Option<&ScanSummary>,
    limits: Limits,
    now: &Time,
) -> UnitAction {
    let Some(scan) = scan else {
        return UnitAction::Scan;
    };
    let current = attempts::owned_current_build(&unit.attempts, Some(scan));
    let Some(last) = current.last() else {
        let number = scan
            .first_attempt
            .unwrap_or_else(|| attempts::next_number(&unit.attempts));
        return UnitAction::Choose { number };
    };
    let Some(outcome) = last.outcome else {
        return UnitAction::Watch {
            number: last.number,
        };
    };
    if outcome == AttemptOutcome::Succeeded {
        return UnitAction::Publish;
    }
    let Some(preset) = Preset::from_label(&last.preset) else {
        return UnitAction::GiveUp {
            reason: "UnknownPreset",
            message: format!(
                "attempt {} has an unknown preset {:?}",
                last.number, last.preset
            ),
        };
    };
    let step = after_attempt(
        &preset,
        outcome,
        last.exit_code,
        &current,
        limits.max_attempts,
        limits.memory_limit,
        &scan.shape(),
    );
    match step {
        NextStep::Done => UnitAction::Publish,
        NextStep::GiveUp { reason, message } => UnitAction::GiveUp { reason, message },
        NextStep::Start {
            preset,
            number,
            delay,
            reason,
            message,
        } => UnitAction::Start(NextAttempt {
            preset,
            number,
            wait: attempts::wait_after(last, delay, now),
            reason,
            message,
            after: outcome,
        }),
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
        AttemptOutcome::Failed | AttemptOutcome::Killed => {
            let permanent = match exit_code.filter(|_| outcome == AttemptOutcome::Failed) {
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
            if outcome == AttemptOutcome::Failed && exit_code == Some(exit_code::DOES_NOT_FIT) {
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
                .take_while(|a| {
                    matches!(
                        a.outcome,
                        Some(AttemptOutcome::Failed | AttemptOutcome::Killed)
                    )
                })
                .count() as u32;
            let code = exit_code.map_or("?".into(), |c| c.to_string());
            let (reason, message) = if outcome == AttemptOutcome::Killed {
                (
                    "RetryAfterKill",
                    format!(
                        "build with {} was killed (exit code {code}) with no sign of the OOM killer; retrying with the same preset",
                        current.label()
                    ),
                )
            } else {
                (
                    "RetryAfterFailure",
                    format!(
                        "build with {} failed (exit code {code}); retrying",
                        current.label()
                    ),
                )
            };
            NextStep::Start {
                preset: *current,
                number,
                delay: backoff(consecutive.max(1)),
                reason,
                message,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{at, shape, MIB};
    use crate::preset::PresetName;

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
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(20), Duration::from_secs(300));
    }

    fn ended(n: u32, preset: &str, outcome: Option<AttemptOutcome>) -> Attempt {
        Attempt {
            outcome,
            ..attempt(n, preset, AttemptOutcome::Failed)
        }
    }

    #[test]
    fn one_unit_goes_scan_choose_watch_then_publish_or_the_next_rung() {
        let limits = Limits {
            memory_limit: 1 << 30,
            max_attempts: 6,
        };
        let scan = ScanSummary {
            images: 5_000,
            bytes: 10_000_000_000,
            max_width: 6000,
            max_height: 4000,
            max_is_jpeg: true,
            first_attempt: Some(3),
            ..ScanSummary::default()
        };
        let now = at(100);
        let mut unit = UnitStatus::default();
        assert_eq!(next_action(&unit, None, limits, &now), UnitAction::Scan);
        // Attempts 1 and 2 belong to an earlier build: this one starts at 3.
        unit.attempts = vec![
            ended(1, "full", Some(AttemptOutcome::OomKilled)),
            ended(2, "small", Some(AttemptOutcome::Succeeded)),
        ];
        let next = |unit: &UnitStatus| next_action(unit, Some(&scan), limits, &now);
        assert_eq!(next(&unit), UnitAction::Choose { number: 3 });
        unit.attempts.push(ended(3, "full", None));
        assert_eq!(next(&unit), UnitAction::Watch { number: 3 });
        unit.attempts[2].outcome = Some(AttemptOutcome::Succeeded);
        assert_eq!(next(&unit), UnitAction::Publish);
        unit.attempts[2].outcome = Some(AttemptOutcome::OomKilled);
        match next(&unit) {
            UnitAction::Start(a) => {
                assert_ne!(a.preset.name, PresetName::Full);
                assert_eq!((a.number, a.wait), (4, None));
                assert_eq!(a.after, AttemptOutcome::OomKilled);
            }
            other => panic!("{other:?}"),
        }
        // A failure waits out its back-off from the end of the attempt.
        unit.attempts[2].outcome = Some(AttemptOutcome::Failed);
        unit.attempts[2].end_time = Some(at(98));
        match next(&unit) {
            UnitAction::Start(a) => {
                assert_eq!(a.preset.name, PresetName::Full);
                assert_eq!(a.wait, Some(Duration::from_secs(3)));
            }
            other => panic!("{other:?}"),
        }
        unit.attempts[2].preset = "huge".into();
        assert!(matches!(
            next(&unit),
            UnitAction::GiveUp {
                reason: "UnknownPreset",
                ..
            }
        ));
    }

    #[test]
    fn a_killed_build_retries_its_preset_and_counts_toward_max_attempts() {
        let s = shape(1000, 800);
        let p = PresetName::Small.preset();
        let a = [attempt(1, "small", AttemptOutcome::Killed)];
        match after_attempt(&p, AttemptOutcome::Killed, Some(137), &a, 6, 1 << 30, &s) {
            NextStep::Start {
                preset,
                number,
                delay,
                reason,
                ..
            } => {
                assert_eq!(preset, p);
                assert_eq!((number, delay), (2, Duration::from_secs(5)));
                assert_eq!(reason, "RetryAfterKill");
            }
            other => panic!("{other:?}"),
        }
        // Kills and failures in a row share one back-off.
        let two = [
            attempt(1, "small", AttemptOutcome::Failed),
            attempt(2, "small", AttemptOutcome::Killed),
        ];
        assert!(matches!(
            after_attempt(&p, AttemptOutcome::Killed, Some(137), &two, 6, 1 << 30, &s),
            NextStep::Start { delay, .. } if delay == Duration::from_secs(10)
        ));
        assert!(matches!(
            after_attempt(&p, AttemptOutcome::Killed, Some(137), &two, 2, 1 << 30, &s),
            NextStep::GiveUp {
                reason: "MaxAttemptsReached",
                ..
            }
        ));
    }
}
