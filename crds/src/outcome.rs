//! What counts as an OOM kill, and how every other ending of a build attempt is named: the one
//! rule both runtimes apply to an [`AttemptEnd`].
//!
//! An attempt was OOM-killed when the kernel or the kubelet says so (the container's
//! `OOMKilled` reason, the cgroup's `oom_kill` counter), or when it was killed by SIGKILL
//! (exit 137) while its last memory sample was near the limit ([`NEAR_LIMIT_RATIO`]): the
//! kernel's verdict can be missing (an agent that lost the event, a counter read too early) but
//! a kill at the limit is the OOM killer's. A SIGKILL with neither sign — memory well below the
//! limit — is someone else's (an eviction, a person, a node going away): the attempt is
//! `Killed`, retried with the same preset and counted toward `maxAttempts`, not downgraded.

use crate::observation::{AttemptEnd, Stop};
use crate::pressure::{MemorySample, WARNING_RATIO};
use crate::types::AttemptOutcome;

/// Exit codes of `indexer build` (and of a killed process) the policy understands.
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
    /// Killed by SIGTERM before it could handle it: 128 + 15.
    pub const TERMINATED: i32 = 143;
}

/// Working set over limit, in the last sample before a SIGKILL, above which the kill is taken
/// for the OOM killer's even without the kernel's word (the warning ratio of
/// [`crate::pressure`]).
pub const NEAR_LIMIT_RATIO: f64 = WARNING_RATIO;

/// Whether a sample's working set is near its limit ([`NEAR_LIMIT_RATIO`]).
pub fn near_limit(sample: &MemorySample) -> bool {
    sample.limit > 0 && sample.working_set as f64 / sample.limit as f64 > NEAR_LIMIT_RATIO
}

/// Whether an attempt that ended so was OOM-killed (see the module's rule); `last` is its last
/// memory sample.
pub fn is_oom_kill(end: &AttemptEnd, last: Option<&MemorySample>) -> bool {
    end.oom_kill_reported
        || (end.exit_code == Some(exit_code::KILLED) && last.is_some_and(near_limit))
}

/// Names how an attempt ended. A build that exited 0 published its index, whatever else
/// happened; one the operator stopped ended for the operator's reason; then the OOM rule; then
/// the exit code.
pub fn classify(end: &AttemptEnd, last: Option<&MemorySample>) -> AttemptOutcome {
    if end.exit_code == Some(exit_code::OK) {
        return AttemptOutcome::Succeeded;
    }
    match end.stopped {
        Some(Stop::Interrupt) => return AttemptOutcome::Interrupted,
        Some(Stop::Pressure) => return AttemptOutcome::MemoryPressureRestart,
        None => {}
    }
    if is_oom_kill(end, last) {
        return AttemptOutcome::OomKilled;
    }
    match end.exit_code {
        Some(exit_code::KILLED) => AttemptOutcome::Killed,
        Some(exit_code::INTERRUPTED | exit_code::TERMINATED) => AttemptOutcome::Interrupted,
        _ => AttemptOutcome::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn end(code: Option<i32>, reported: bool, stopped: Option<Stop>) -> AttemptEnd {
        AttemptEnd {
            exit_code: code,
            oom_kill_reported: reported,
            stopped,
        }
    }

    fn at(ws_mib: u64) -> MemorySample {
        MemorySample {
            at_ms: 0,
            working_set: ws_mib * MIB,
            limit: 100 * MIB,
        }
    }

    #[test]
    fn endings_table() {
        use AttemptOutcome::*;
        let near = Some(at(85));
        let low = Some(at(40));
        let cases: &[(AttemptEnd, Option<MemorySample>, AttemptOutcome)] = &[
            (end(Some(0), false, None), None, Succeeded),
            // Published anyway: a stop or an OOM report after the index was written.
            (end(Some(0), true, None), near, Succeeded),
            (end(Some(0), false, Some(Stop::Pressure)), near, Succeeded),
            (end(Some(0), false, Some(Stop::Interrupt)), None, Succeeded),
            // The kernel's or the kubelet's word, whatever the exit code and the samples.
            (end(Some(137), true, None), None, OomKilled),
            (end(Some(137), true, None), low, OomKilled),
            (end(Some(1), true, None), None, OomKilled),
            (end(None, true, None), None, OomKilled),
            // A SIGKILL at the limit without the kernel's word is still the OOM killer's ...
            (end(Some(137), false, None), near, OomKilled),
            // ... and without a sign of the limit it is someone else's.
            (end(Some(137), false, None), low, Killed),
            (end(Some(137), false, None), None, Killed),
            // The operator's own stops.
            (
                end(Some(137), false, Some(Stop::Pressure)),
                near,
                MemoryPressureRestart,
            ),
            (
                end(None, false, Some(Stop::Pressure)),
                None,
                MemoryPressureRestart,
            ),
            (
                end(Some(6), false, Some(Stop::Pressure)),
                None,
                MemoryPressureRestart,
            ),
            (
                end(Some(137), true, Some(Stop::Interrupt)),
                None,
                Interrupted,
            ),
            (
                end(Some(6), false, Some(Stop::Interrupt)),
                None,
                Interrupted,
            ),
            // Stopped from outside with SIGTERM, or exited after one.
            (end(Some(6), false, None), None, Interrupted),
            (end(Some(143), false, None), None, Interrupted),
            // Errors.
            (end(Some(1), false, None), near, Failed),
            (end(Some(3), false, None), None, Failed),
            (end(None, false, None), None, Failed),
        ];
        for (e, last, want) in cases {
            assert_eq!(classify(e, last.as_ref()), *want, "{e:?} last {last:?}");
        }
    }

    #[test]
    fn near_means_above_the_warning_ratio() {
        assert!(!near_limit(&at(80)));
        assert!(near_limit(&at(81)));
        assert!(!near_limit(&MemorySample {
            at_ms: 0,
            working_set: 5,
            limit: 0
        }));
    }
}
