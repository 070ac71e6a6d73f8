//! When a new build begins: the first one, a rebuild on request, and when a Failed index is
//! built again. The same rule for the controller (at every reconcile) and local mode (at every
//! run); what differs is only what each can see.
//!
//! A Failed index is rebuilt only when something that could change the result changed: the
//! spec (`metadata.generation` moved past `status.observedGeneration`), the rebuild token, or
//! the dataset's fingerprint. Retrying an unchanged build would fail the same way (the policy
//! already retried what a retry can fix, up to `maxAttempts`), and a Failed resource that
//! rebuilds by itself is a crash loop. The controller sees the dataset only when a build scans
//! it, so in a cluster the spec and the token are what a user changes; local mode scans at
//! every run, so fixing the dataset is enough there.

use crate::conditions::{self, PROGRESSING};
use crate::types::{ImageIndexStatus, IndexPhase};

/// The Progressing reason of a build the policy gave up on.
pub const BUILD_FAILED: &str = "BuildFailed";

/// What a runtime sees now of an ImageIndex whose status it holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen<'a> {
    /// The spec changed since the status was written (`metadata.generation` is not
    /// `status.observedGeneration`).
    pub spec_changed: bool,
    /// `spec.rebuild` now.
    pub token: Option<&'a str>,
    /// The dataset's fingerprint, when the runtime has just scanned it (local mode scans at
    /// every run; the controller only when a build begins).
    pub fingerprint: Option<&'a str>,
    /// Whether the index directory holds a published generation, when the runtime can look.
    pub published: Option<bool>,
    /// A spec change starts a new build whatever the phase. Local mode: nothing of an earlier
    /// run is still running, so a changed manifest is built from its own scan. The controller
    /// keeps a running build (and a served index) through spec changes.
    pub spec_change_restarts: bool,
}

impl<'a> Seen<'a> {
    /// What the spec of a resource says against `before`: whether its generation moved and
    /// its rebuild token (the fingerprint and the published index unknown).
    pub fn of_spec(
        before: &ImageIndexStatus,
        generation: Option<i64>,
        token: Option<&'a str>,
    ) -> Self {
        Seen {
            spec_changed: before.observed_generation != generation,
            token,
            ..Seen::default()
        }
    }
}

/// What a runtime does with the build recorded in status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildStart {
    /// Begin a new build (scan, then the first preset), for this reason.
    Begin(&'static str),
    /// Go on with the recorded build (or keep serving its index).
    Continue,
    /// The build failed and nothing it depends on changed: stay Failed.
    StayFailed,
}

/// Whether the last build was given up on (Progressing `False`, reason [`BUILD_FAILED`]); a
/// Ready index whose rebuild was given up on keeps serving.
pub fn gave_up(status: &ImageIndexStatus) -> bool {
    conditions::get(&status.conditions, PROGRESSING)
        .is_some_and(|c| c.status == "False" && c.reason == BUILD_FAILED)
}

/// Decides whether a new build begins, from the status as it was and what the runtime sees.
pub fn build_start(before: &ImageIndexStatus, seen: &Seen) -> BuildStart {
    let token_changed = before.rebuild.as_deref() != seen.token;
    let dataset_changed = seen
        .fingerprint
        .is_some_and(|f| before.scan.as_ref().map(|s| s.fingerprint.as_str()) != Some(f));
    let Some(phase) = before.unit.phase else {
        return BuildStart::Begin("no build is recorded");
    };
    if phase == IndexPhase::Failed {
        return if token_changed {
            BuildStart::Begin("the rebuild token changed")
        } else if seen.spec_changed {
            BuildStart::Begin("the spec changed")
        } else if dataset_changed {
            BuildStart::Begin("the dataset changed")
        } else {
            BuildStart::StayFailed
        };
    }
    let ready = phase == IndexPhase::Ready;
    if ready && token_changed {
        BuildStart::Begin("the rebuild token changed")
    } else if seen.spec_change_restarts && seen.spec_changed {
        BuildStart::Begin("the spec changed")
    } else if ready && seen.spec_changed && gave_up(before) {
        BuildStart::Begin("the spec changed after the last rebuild gave up")
    } else if dataset_changed {
        BuildStart::Begin("the dataset changed")
    } else if ready && seen.published == Some(false) {
        BuildStart::Begin("the published index is gone")
    } else {
        BuildStart::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ScanSummary;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn status(
        phase: Option<IndexPhase>,
        token: Option<&str>,
        fingerprint: &str,
    ) -> ImageIndexStatus {
        let mut s = ImageIndexStatus {
            observed_generation: Some(1),
            rebuild: token.map(str::to_string),
            scan: Some(ScanSummary {
                fingerprint: fingerprint.into(),
                ..ScanSummary::default()
            }),
            ..ImageIndexStatus::default()
        };
        s.unit.phase = phase;
        s
    }

    fn cluster(generation: i64, token: Option<&str>) -> Seen<'_> {
        Seen::of_spec(&status(None, None, ""), Some(generation), token)
    }

    fn local<'a>(
        generation: i64,
        token: Option<&'a str>,
        fingerprint: &'a str,
        published: bool,
    ) -> Seen<'a> {
        Seen {
            fingerprint: Some(fingerprint),
            published: Some(published),
            spec_change_restarts: true,
            ..cluster(generation, token)
        }
    }

    #[test]
    fn a_failed_index_is_rebuilt_only_when_its_inputs_change() {
        use BuildStart::*;
        let failed = status(Some(IndexPhase::Failed), Some("t1"), "f1");
        let cases: &[(Seen, BuildStart)] = &[
            (cluster(1, Some("t1")), StayFailed),
            (cluster(2, Some("t1")), Begin("the spec changed")),
            (cluster(1, Some("t2")), Begin("the rebuild token changed")),
            (cluster(1, None), Begin("the rebuild token changed")),
            (local(1, Some("t1"), "f1", false), StayFailed),
            (local(1, Some("t1"), "f1", true), StayFailed),
            (local(2, Some("t1"), "f1", false), Begin("the spec changed")),
            (
                local(1, Some("t2"), "f1", false),
                Begin("the rebuild token changed"),
            ),
            (
                local(1, Some("t1"), "f2", false),
                Begin("the dataset changed"),
            ),
        ];
        for (seen, want) in cases {
            assert_eq!(build_start(&failed, seen), *want, "{seen:?}");
        }
        // A scan that never succeeded recorded no fingerprint: any dataset that scans is new.
        let mut failed_scan = failed.clone();
        failed_scan.scan = None;
        assert_eq!(
            build_start(&failed_scan, &local(1, Some("t1"), "f1", false)),
            Begin("the dataset changed")
        );
        assert_eq!(
            build_start(&failed_scan, &cluster(1, Some("t1"))),
            StayFailed
        );
    }

    #[test]
    fn ready_rebuilds_on_the_token_and_after_a_given_up_rebuild() {
        use BuildStart::*;
        let ready = status(Some(IndexPhase::Ready), Some("t1"), "f1");
        assert_eq!(build_start(&ready, &cluster(1, Some("t1"))), Continue);
        assert_eq!(build_start(&ready, &cluster(2, Some("t1"))), Continue);
        assert_eq!(
            build_start(&ready, &cluster(2, Some("t2"))),
            Begin("the rebuild token changed")
        );
        let mut given_up = ready.clone();
        conditions::set(
            &mut given_up.conditions,
            PROGRESSING,
            false,
            BUILD_FAILED,
            "m",
            Some(1),
            &Time(Timestamp::UNIX_EPOCH),
        );
        assert!(gave_up(&given_up) && !gave_up(&ready));
        assert_eq!(build_start(&given_up, &cluster(1, Some("t1"))), Continue);
        assert_eq!(
            build_start(&given_up, &cluster(2, Some("t1"))),
            Begin("the spec changed after the last rebuild gave up")
        );
        // What only local mode sees or does.
        assert_eq!(
            build_start(&ready, &local(1, Some("t1"), "f1", true)),
            Continue
        );
        assert_eq!(
            build_start(&ready, &local(1, Some("t1"), "f1", false)),
            Begin("the published index is gone")
        );
        assert_eq!(
            build_start(&ready, &local(1, Some("t1"), "f2", true)),
            Begin("the dataset changed")
        );
        assert_eq!(
            build_start(&ready, &local(2, Some("t1"), "f1", true)),
            Begin("the spec changed")
        );
        assert_eq!(
            build_start(&ready, &local(2, Some("t2"), "f1", true)),
            Begin("the rebuild token changed")
        );
    }

    #[test]
    fn builds_in_progress_continue_and_nothing_recorded_begins() {
        use BuildStart::*;
        for phase in [
            IndexPhase::Pending,
            IndexPhase::Scanning,
            IndexPhase::Building,
        ] {
            let s = status(Some(phase), None, "f1");
            assert_eq!(
                build_start(&s, &cluster(2, Some("t9"))),
                Continue,
                "{phase:?}"
            );
            assert_eq!(build_start(&s, &local(1, None, "f1", false)), Continue);
            assert_eq!(
                build_start(&s, &local(2, None, "f1", false)),
                Begin("the spec changed")
            );
            assert_eq!(
                build_start(&s, &local(1, None, "f2", false)),
                Begin("the dataset changed")
            );
        }
        assert_eq!(
            build_start(&ImageIndexStatus::default(), &cluster(1, None)),
            Begin("no build is recorded")
        );
    }
}
