//! Bookkeeping of `status.attempts`: which attempts belong to the current build, numbering,
//! recording an attempt's start, peaks and end. Pure functions over status values.

use crate::types::{Attempt, AttemptOutcome, ScanSummary};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::time::Duration;

/// The number the next attempt gets: one past the highest recorded (numbering continues
/// across rebuilds so that pod names never repeat).
pub fn next_number(attempts: &[Attempt]) -> u32 {
    attempts.iter().map(|a| a.number).max().unwrap_or(0) + 1
}

/// The attempts of the current build: those numbered from the scan's first attempt on.
pub fn of_current_build<'a>(
    attempts: &'a [Attempt],
    scan: Option<&ScanSummary>,
) -> Vec<&'a Attempt> {
    let first = scan.and_then(|s| s.first_attempt).unwrap_or(1);
    attempts.iter().filter(|a| a.number >= first).collect()
}

/// The same, cloned, as [`crate::ladder::after_attempt`] wants them.
pub fn owned_current_build(attempts: &[Attempt], scan: Option<&ScanSummary>) -> Vec<Attempt> {
    of_current_build(attempts, scan)
        .into_iter()
        .cloned()
        .collect()
}

/// A running attempt as recorded when its pod is made (or adopted).
pub fn started(number: u32, preset: &str, pod: &str, start: Time) -> Attempt {
    Attempt {
        number,
        preset: preset.to_string(),
        pod: Some(pod.to_string()),
        start_time: Some(start),
        end_time: None,
        outcome: None,
        peak_rss: None,
        peak_working_set: None,
        exit_code: None,
        message: None,
    }
}

/// Raises the attempt's peaks with a new observation.
pub fn raise_peaks(attempt: &mut Attempt, rss: Option<u64>, working_set: Option<u64>) {
    if let Some(rss) = rss {
        attempt.peak_rss = Some(attempt.peak_rss.unwrap_or(0).max(rss));
    }
    if let Some(ws) = working_set {
        attempt.peak_working_set = Some(attempt.peak_working_set.unwrap_or(0).max(ws));
    }
}

/// Records how an attempt ended.
pub fn finish(
    attempt: &mut Attempt,
    outcome: AttemptOutcome,
    exit_code: Option<i32>,
    message: String,
    end: Time,
) {
    attempt.outcome = Some(outcome);
    attempt.exit_code = exit_code;
    attempt.message = Some(message);
    attempt.end_time = Some(end);
}

/// The attempts that gained an outcome between `before` and `now` (the same attempts, as a
/// step recorded their ends), by number, with the outcome.
pub fn ended_since(before: &[Attempt], now: &[Attempt]) -> Vec<(u32, AttemptOutcome)> {
    now.iter()
        .filter_map(|a| {
            let outcome = a.outcome?;
            let was_open = before
                .iter()
                .find(|b| b.number == a.number)
                .is_none_or(|b| b.outcome.is_none());
            was_open.then_some((a.number, outcome))
        })
        .collect()
}

/// How long to wait before starting the attempt that follows `ended` after `delay`
/// (`None`: start now).
pub fn wait_after(ended: &Attempt, delay: Duration, now: &Time) -> Option<Duration> {
    let end = ended.end_time.as_ref()?.0.as_millisecond();
    let due = end.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
    let left = due.saturating_sub(now.0.as_millisecond());
    (left > 0).then(|| Duration::from_millis(left.unsigned_abs()))
}

/// The running attempt of the current build, if its last attempt has not ended.
pub fn running<'a>(
    attempts: &'a mut [Attempt],
    scan: Option<&ScanSummary>,
) -> Option<&'a mut Attempt> {
    let first = scan.and_then(|s| s.first_attempt).unwrap_or(1);
    attempts
        .iter_mut()
        .filter(|a| a.number >= first)
        .max_by_key(|a| a.number)
        .filter(|a| a.outcome.is_none())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::at;

    fn ended(number: u32, outcome: AttemptOutcome) -> Attempt {
        let mut a = started(number, "full", &format!("x-build-{number}"), at(0));
        finish(&mut a, outcome, Some(137), "m".into(), at(10));
        a
    }

    fn scan(first: Option<u32>) -> ScanSummary {
        ScanSummary {
            first_attempt: first,
            ..ScanSummary::default()
        }
    }

    #[test]
    fn numbering_continues_and_builds_are_told_apart() {
        assert_eq!(next_number(&[]), 1);
        let attempts = vec![
            ended(1, AttemptOutcome::OomKilled),
            ended(2, AttemptOutcome::Succeeded),
            ended(3, AttemptOutcome::Failed),
        ];
        assert_eq!(next_number(&attempts), 4);
        let current: Vec<u32> = of_current_build(&attempts, Some(&scan(Some(3))))
            .iter()
            .map(|a| a.number)
            .collect();
        assert_eq!(current, [3]);
        // Without a recorded first attempt every attempt counts.
        assert_eq!(of_current_build(&attempts, Some(&scan(None))).len(), 3);
        assert_eq!(owned_current_build(&attempts, None).len(), 3);
    }

    #[test]
    fn running_is_the_last_attempt_of_the_current_build_without_outcome() {
        let mut attempts = vec![
            ended(1, AttemptOutcome::Succeeded),
            started(2, "small", "x-build-2", at(20)),
        ];
        assert_eq!(
            running(&mut attempts, Some(&scan(Some(2)))).map(|a| a.number),
            Some(2)
        );
        assert!(running(&mut attempts, Some(&scan(Some(3)))).is_none());
        let mut done = vec![ended(1, AttemptOutcome::Succeeded)];
        assert!(running(&mut done, Some(&scan(Some(1)))).is_none());
    }

    #[test]
    fn ended_since_lists_the_attempts_that_gained_an_outcome() {
        let before = vec![
            ended(1, AttemptOutcome::OomKilled),
            started(2, "small", "x-build-2", at(20)),
        ];
        let mut now = before.clone();
        finish(
            &mut now[1],
            AttemptOutcome::Succeeded,
            Some(0),
            "ok".into(),
            at(30),
        );
        assert_eq!(ended_since(&before, &now), [(2, AttemptOutcome::Succeeded)]);
        assert!(ended_since(&now, &now).is_empty());
        now.push(ended(3, AttemptOutcome::Failed));
        assert_eq!(ended_since(&before, &now).len(), 2);
    }

    #[test]
    fn peaks_only_rise() {
        let mut a = started(1, "full", "p", at(0));
        raise_peaks(&mut a, Some(100), None);
        raise_peaks(&mut a, Some(50), Some(70));
        raise_peaks(&mut a, None, Some(60));
        assert_eq!((a.peak_rss, a.peak_working_set), (Some(100), Some(70)));
    }

    #[test]
    fn waiting_counts_from_the_end_of_the_attempt() {
        let a = ended(1, AttemptOutcome::Failed);
        assert_eq!(
            wait_after(&a, Duration::from_secs(5), &at(12)),
            Some(Duration::from_secs(3))
        );
        assert_eq!(wait_after(&a, Duration::from_secs(5), &at(15)), None);
        assert_eq!(wait_after(&a, Duration::ZERO, &at(10)), None);
        let no_end = started(2, "full", "p", at(0));
        assert_eq!(wait_after(&no_end, Duration::from_secs(5), &at(0)), None);
    }

    #[test]
    fn finish_records_everything() {
        let a = ended(4, AttemptOutcome::OomKilled);
        assert_eq!(a.outcome, Some(AttemptOutcome::OomKilled));
        assert_eq!(
            (a.exit_code, a.message.as_deref(), a.end_time),
            (Some(137), Some("m"), Some(at(10)))
        );
    }
}
