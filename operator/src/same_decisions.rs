//! Both runtimes decide alike: the same observation sequences, fed through the controller's
//! adapters (a pod's status → [`pods::attempt_end`], a pod it deleted → [`pods::deleted_end`],
//! the resource → [`decide::seen`]) and local mode's (a process's exit and its cgroup's
//! `oom_kill` counter → [`process::attempt_end`], the saved run → [`state::record_for_run`] and
//! [`state::seen`]), give the same decisions and the same status.
//!
//! Compared: every decision (each attempt's outcome, the pressure level of each scrape, the
//! ladder's next action, whether a build begins) and the status — phase, preset, attempts
//! (number, preset, outcome, exit code, peaks, times), progress, memory, index generation,
//! conditions (with their messages, except Progressing's, which names the pod or the process)
//! — and the reasons of the notes (Events). Not compared: the words that name where a build ran
//! (attempt messages), and the exit code of an attempt the operator stopped itself: the
//! controller deletes the pod without waiting for its exit, local mode waits for its process.

use crate::controller::decide;
use crate::history::{BuildKey, MemoryHistory};
use crate::local::process::{self, ExitInfo, Stop};
use crate::local::state;
use crate::pods::{self, PodState};
use crate::scrape;
use imageindex_crds::attempts;
use imageindex_crds::ladder::{Limits, UnitAction};
use imageindex_crds::observation::AttemptEnd;
use imageindex_crds::pressure::PressureLevel;
use imageindex_crds::rebuild::{self, BuildStart};
use imageindex_crds::transitions::StatusDraft;
use imageindex_crds::types::{IndexPhase, ScanSummary};
use imageindex_crds::{ImageIndex, ImageIndexSpec, ImageIndexStatus, PresetSelector};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const LIMIT: u64 = 80 * MIB;
const LIMIT_TEXT: &str = "80Mi";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Runtime {
    Cluster,
    Local,
}

/// One thing a runtime observes of the running build.
#[derive(Clone, Copy, Debug)]
enum Obs {
    /// A scrape `at_s` seconds into the attempt with this working set (MiB of 80).
    Scrape { at_s: u64, mib: u64 },
    /// The build ended so.
    End(Ending),
}

/// How a build ended, in words both runtimes can be told.
#[derive(Clone, Copy, Debug)]
enum Ending {
    /// SIGKILL by the kernel's OOM killer, reported (kubelet `OOMKilled`; cgroup `oom_kill 1`).
    KernelOom,
    /// SIGKILL nobody explained (kubelet `Error`, exit 137; cgroup `oom_kill 0`).
    Sigkill,
    /// Exited with this code.
    Exit(i32),
}

fn at(secs: i64) -> Time {
    Time(Timestamp::from_second(1_700_000_000 + secs).unwrap())
}

fn photos() -> ScanSummary {
    ScanSummary {
        images: 31,
        bytes: 40_000_000,
        max_width: 4000,
        max_height: 4800,
        max_is_jpeg: true,
        fingerprint: "f1".into(),
        pod: Some("cats-scan-1".into()),
        first_attempt: Some(1),
        ..ScanSummary::default()
    }
}

/// The build pod's status as a kubelet writes it for `ending`.
fn pod_status(ending: Ending) -> Pod {
    let (phase, code, reason) = match ending {
        Ending::KernelOom => ("Failed", 137, "OOMKilled"),
        Ending::Sigkill => ("Failed", 137, "Error"),
        Ending::Exit(0) => ("Succeeded", 0, "Completed"),
        Ending::Exit(c) => ("Failed", c, "Error"),
    };
    serde_json::from_value(json!({
        "metadata": {"name": "cats-build"},
        "status": {"phase": phase, "containerStatuses": [{"name": "build", "image": "i",
            "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": code, "reason": reason}}}]}
    }))
    .unwrap()
}

/// The build process's exit and its cgroup's `oom_kill` counter for `ending`.
fn process_exit(ending: Ending) -> (ExitInfo, u64) {
    let killed = ExitInfo {
        code: None,
        signal: Some(9),
    };
    match ending {
        Ending::KernelOom => (killed, 1),
        Ending::Sigkill => (killed, 0),
        Ending::Exit(c) => (
            ExitInfo {
                code: Some(c),
                signal: None,
            },
            0,
        ),
    }
}

/// One runtime's run of a sequence over the shared core.
struct Run {
    runtime: Runtime,
    draft: StatusDraft,
    history: MemoryHistory,
    t0: Instant,
    limits: Limits,
    running: Option<u32>,
    decisions: Vec<String>,
}

impl Run {
    /// Scanned, first preset chosen (`full`, explicitly, under 80Mi), attempt 1 started.
    fn new(runtime: Runtime, max_attempts: u32) -> Self {
        let t0 = Instant::now();
        let mut run = Run {
            runtime,
            draft: StatusDraft::new(ImageIndexStatus::default(), Some(1), at(0)),
            history: MemoryHistory::since(t0),
            t0,
            limits: Limits {
                memory_limit: LIMIT,
                max_attempts,
            },
            running: None,
            decisions: Vec::new(),
        };
        run.draft.begin_build(None);
        run.draft.scanning("counting".into());
        run.draft.scanned(photos());
        match run.draft.choose_preset(PresetSelector::Full, LIMIT, None) {
            Some(preset) => run.start(1, &preset.label(), None),
            None => run.decisions.push("nothing fits".into()),
        }
        run
    }

    fn start(&mut self, number: u32, preset: &str, why: Option<(&'static str, String)>) {
        let name = format!("cats-build-{number}");
        let place = match self.runtime {
            Runtime::Cluster => format!("pod {name}"),
            Runtime::Local => format!("process {name} (pid 7) in cgroup imageindex/{name}-7"),
        };
        let attempt = attempts::started(number, preset, &name, self.draft.now.clone());
        self.draft.attempt_started(attempt, LIMIT_TEXT, &place, why);
        self.running = Some(number);
    }

    fn feed(&mut self, obs: Obs) {
        let Some(number) = self.running else {
            self.decisions.push(format!("nothing runs to see {obs:?}"));
            return;
        };
        match obs {
            Obs::Scrape { at_s, mib } => {
                // Both runtimes read the build's /metrics with the same parser and history.
                let text = format!(
                    "imageindex_memory_rss_bytes {ws}\nimageindex_memory_working_set_bytes {ws}\n\
                     imageindex_memory_limit_bytes {LIMIT}\nimageindex_images_total 31\n\
                     imageindex_images_processed_total {at_s}\n",
                    ws = mib * MIB
                );
                let m = scrape::parse_metrics(&text).unwrap();
                let (ws, limit) = m.working_set_and_limit(LIMIT);
                let key = BuildKey {
                    uid: "cats".into(),
                    attempt: number,
                };
                let now = self.t0 + Duration::from_secs(at_s);
                let samples = self.history.record(&key, now, ws, limit);
                let Some(pressure) = self.draft.observe(number, &m, &samples) else {
                    self.decisions.push("scrape not recorded".into());
                    return;
                };
                self.decisions
                    .push(format!("pressure {:?}", pressure.level));
                if pressure.level == PressureLevel::Critical {
                    let (end, message) = match self.runtime {
                        Runtime::Cluster => (
                            pods::deleted_end(Stop::Pressure),
                            format!("stopped build pod cats-build-{number}"),
                        ),
                        Runtime::Local => {
                            // SIGTERM: the build writes its checkpoint and exits 6.
                            let exit = ExitInfo {
                                code: Some(6),
                                signal: None,
                            };
                            let stop = Some(Stop::Pressure);
                            let message = process::describe_end("process", &exit, 0, stop);
                            (process::attempt_end(&exit, 0, stop), message)
                        }
                    };
                    self.ended(number, &end, message);
                }
            }
            Obs::End(ending) => {
                let (end, message) = match self.runtime {
                    Runtime::Cluster => {
                        let PodState::Terminated(t) = pods::observe(&pod_status(ending)) else {
                            panic!("{ending:?}: the pod has not terminated");
                        };
                        (pods::attempt_end(&t), pods::describe(&t))
                    }
                    Runtime::Local => {
                        let (exit, ooms) = process_exit(ending);
                        let message = process::describe_end("process", &exit, ooms, None);
                        (process::attempt_end(&exit, ooms, None), message)
                    }
                };
                self.ended(number, &end, message);
            }
        }
    }

    /// Records the end and carries out what the ladder decides next.
    fn ended(&mut self, number: u32, end: &AttemptEnd, message: String) {
        self.running = None;
        let outcome = self
            .draft
            .attempt_ended(number, end, message, None, LIMIT_TEXT);
        self.decisions.push(format!("attempt {number} {outcome:?}"));
        match self.draft.next(self.limits) {
            UnitAction::Start(next) => {
                self.decisions.push(format!(
                    "start {} with {} after {:?} ({})",
                    next.number,
                    next.preset.label(),
                    next.wait.unwrap_or_default(),
                    next.reason
                ));
                let why = Some((next.reason, next.message));
                self.start(next.number, &next.preset.label(), why);
            }
            UnitAction::GiveUp { reason, .. } => self.decisions.push(format!("give up ({reason})")),
            UnitAction::Publish => {
                self.decisions.push("publish".into());
                self.draft.published();
                self.draft
                    .ready("IndexPublished", "published".into(), "Publish");
            }
            other => self.decisions.push(format!("{other:?}")),
        }
    }

    /// The status as written (stamped with the generation it describes).
    fn status(&self) -> ImageIndexStatus {
        let mut s = self.draft.status.clone();
        s.observed_generation = self.draft.generation;
        s
    }

    /// The status and notes, without what names the place or only one runtime observes.
    fn view(&mut self) -> (Value, Vec<String>) {
        let mut v = serde_json::to_value(self.status()).unwrap();
        for a in v["attempts"].as_array_mut().into_iter().flatten() {
            let stopped = a["outcome"] == "MemoryPressureRestart";
            if let Some(a) = a.as_object_mut() {
                a.remove("message");
                if stopped {
                    a.remove("exitCode");
                }
            }
        }
        for c in v["conditions"].as_array_mut().into_iter().flatten() {
            if c["type"] == "Progressing" {
                if let Some(c) = c.as_object_mut() {
                    c.remove("message");
                }
            }
        }
        let notes = self
            .draft
            .take_notes()
            .into_iter()
            .map(|n| n.reason)
            .collect();
        (v, notes)
    }
}

/// Runs `sequence` through both runtimes; asserts they agree and returns the decisions and
/// the (cluster's) status.
fn both(sequence: &[Obs], max_attempts: u32) -> (Vec<String>, ImageIndexStatus) {
    let mut cluster = Run::new(Runtime::Cluster, max_attempts);
    let mut local = Run::new(Runtime::Local, max_attempts);
    for obs in sequence {
        cluster.feed(*obs);
        local.feed(*obs);
    }
    assert_eq!(cluster.decisions, local.decisions, "{sequence:?}");
    assert_eq!(cluster.view(), local.view(), "{sequence:?}");
    (cluster.decisions.clone(), cluster.status())
}

fn scrapes(mib: &[(u64, u64)]) -> Vec<Obs> {
    mib.iter()
        .map(|&(at_s, mib)| Obs::Scrape { at_s, mib })
        .collect()
}

fn with_end(mut obs: Vec<Obs>, ending: Ending) -> Vec<Obs> {
    obs.push(Obs::End(ending));
    obs
}

#[test]
fn the_same_observations_give_the_same_decisions_and_status() {
    use Ending::*;
    let table: Vec<(&str, Vec<Obs>, &[&str])> = vec![
        (
            "OOM kill the kernel reported",
            with_end(scrapes(&[(0, 40)]), KernelOom),
            &[
                "pressure Normal",
                "attempt 1 Some(OomKilled)",
                "start 2 with medium after 0ns (DowngradeAfterOOMKill)",
            ],
        ),
        (
            "SIGKILL at the limit, no report: still the OOM killer's",
            with_end(scrapes(&[(0, 72)]), Sigkill),
            &[
                "pressure Warning",
                "attempt 1 Some(OomKilled)",
                "start 2 with medium after 0ns (DowngradeAfterOOMKill)",
            ],
        ),
        (
            "SIGKILL well below the limit, no report: killed, same preset again",
            with_end(scrapes(&[(0, 30)]), Sigkill),
            &[
                "pressure Normal",
                "attempt 1 Some(Killed)",
                "start 2 with full after 5s (RetryAfterKill)",
            ],
        ),
        (
            "sustained critical pressure: stopped, poorer preset",
            scrapes(&[(0, 75), (5, 76), (10, 77)]),
            &[
                "pressure Warning",
                "pressure Warning",
                "pressure Critical",
                "attempt 1 Some(MemoryPressureRestart)",
                "start 2 with medium after 0ns (DowngradeAfterPressure)",
            ],
        ),
        (
            "a single spike: the build goes on and publishes",
            with_end(scrapes(&[(0, 40), (5, 79), (10, 50)]), Exit(0)),
            &[
                "pressure Normal",
                "pressure Warning",
                "pressure Normal",
                "attempt 1 Some(Succeeded)",
                "publish",
            ],
        ),
        (
            "failures until maxAttempts",
            vec![Obs::End(Exit(1)), Obs::End(Exit(1))],
            &[
                "attempt 1 Some(Failed)",
                "start 2 with full after 5s (RetryAfterFailure)",
                "attempt 2 Some(Failed)",
                "give up (MaxAttemptsReached)",
            ],
        ),
    ];
    for (what, sequence, want) in table {
        let (decisions, status) = both(&sequence, 2);
        assert_eq!(decisions, want, "{what}");
        let last = status.unit.attempts.last().unwrap();
        match last.outcome {
            None => assert_eq!(status.unit.phase, Some(IndexPhase::Building), "{what}"),
            Some(_) => assert!(
                matches!(
                    status.unit.phase,
                    Some(IndexPhase::Ready | IndexPhase::Failed)
                ),
                "{what}"
            ),
        }
    }
}

fn spec(limit: &str, rebuild: Option<&str>) -> ImageIndexSpec {
    let mut yaml =
        format!("dataset: {{claimName: photos, path: /catalogue}}\nmemoryLimit: {limit}\n");
    if let Some(token) = rebuild {
        yaml.push_str(&format!("rebuild: {token}\n"));
    }
    serde_yaml::from_str(&yaml).unwrap()
}

/// Whether each runtime begins a new build over `status` (written for generation 1 of `was`)
/// when the resource becomes `now`: the controller sees the API server's generation, local
/// mode its saved run against the manifest (after scanning the same dataset, with the index it
/// published, if any, still in place).
fn starts(status: &ImageIndexStatus, was: &ImageIndexSpec, now: &ImageIndexSpec) -> BuildStart {
    let generation = if was == now { 1 } else { 2 };
    let in_cluster = rebuild::build_start(status, &decide::seen(status, Some(generation), now));
    let mut saved = ImageIndex::new("cats", was.clone());
    saved.metadata.generation = Some(1);
    saved.status = Some(status.clone());
    let record = state::record_for_run(Some(saved), &ImageIndex::new("cats", now.clone()), at(9));
    let fingerprint = status.scan.as_ref().map(|s| s.fingerprint.as_str());
    let published = Some(status.unit.index_generation.unwrap_or(0) > 0);
    let locally = rebuild::build_start(status, &state::seen(&record, fingerprint, published));
    assert_eq!(in_cluster, locally, "{was:?} → {now:?}");
    in_cluster
}

#[test]
fn a_failed_index_is_rebuilt_alike_when_its_spec_changes_and_not_before() {
    let (_, failed) = both(&[Obs::End(Ending::Exit(1)), Obs::End(Ending::Exit(1))], 2);
    assert_eq!(failed.unit.phase, Some(IndexPhase::Failed));
    let was = spec("80Mi", None);
    assert_eq!(starts(&failed, &was, &was), BuildStart::StayFailed);
    assert_eq!(
        starts(&failed, &was, &spec("160Mi", None)),
        BuildStart::Begin("the spec changed")
    );
    assert_eq!(
        starts(&failed, &was, &spec("80Mi", Some("again"))),
        BuildStart::Begin("the rebuild token changed")
    );
}

#[test]
fn a_new_rebuild_token_rebuilds_a_ready_index_alike() {
    let (_, ready) = both(&[Obs::End(Ending::Exit(0))], 6);
    assert_eq!(ready.unit.phase, Some(IndexPhase::Ready));
    let was = spec("80Mi", None);
    assert_eq!(starts(&ready, &was, &was), BuildStart::Continue);
    assert_eq!(
        starts(&ready, &was, &spec("80Mi", Some("r2"))),
        BuildStart::Begin("the rebuild token changed")
    );
    // Any other change of a Ready index's spec leaves the served index alone in the cluster;
    // local mode starts over (nothing of an earlier run is running): `rebuild::Seen`.
    let bigger = spec("160Mi", None);
    let in_cluster = rebuild::build_start(&ready, &decide::seen(&ready, Some(2), &bigger));
    assert_eq!(in_cluster, BuildStart::Continue);
}
