//! What each step of a build writes into an ImageIndex's status — phase, conditions,
//! attempts, memory, progress — and the notes (Events) of the decisions taken.
//!
//! Pure code over [`ImageIndexStatus`], shared by the Kubernetes controller and local mode so
//! that both report a build the same way: the runtimes say what they observed (a scan report,
//! a scrape, an [`AttemptEnd`]), the steps here record it and ask the decisions
//! ([`crate::first_preset`], [`crate::pressure`], [`crate::outcome`], [`crate::ladder`]) what
//! follows, and the runtimes carry that out (pods or processes).

use crate::aggregate;
use crate::attempts;
use crate::conditions::{self, DEGRADED, MEMORY_PRESSURE, PRESET_FITS, PROGRESSING, READY};
use crate::first_preset::{self, PresetFit};
use crate::ladder::{self, Limits, UnitAction};
use crate::observation::{AttemptEnd, ScrapedMetrics};
use crate::outcome;
use crate::preset::{Preset, PresetSelector};
use crate::pressure::{self, MemorySample, Pressure, PressureLevel};
use crate::quantity::format_mebibytes_ceil;
use crate::rebuild;
use crate::shards;
use crate::types::{
    Attempt, AttemptOutcome, ImageIndexStatus, IndexPhase, MemoryStatus, Progress, ScanSummary,
    ShardStatus, UnitStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::time::Duration;

/// Progressing reason after the operator gave up on a build.
pub const BUILD_FAILED: &str = rebuild::BUILD_FAILED;
/// Degraded reason of an invalid spec.
pub const INVALID_SPEC: &str = "InvalidSpec";

/// A decision worth telling the user about: an Event in a cluster, a log line locally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// A warning (something went wrong) rather than normal progress.
    pub warning: bool,
    /// Machine-readable reason, e.g. `OOMKilled`.
    pub reason: String,
    /// The step that took the decision, e.g. `Build`.
    pub action: &'static str,
    /// What happened, in words.
    pub message: String,
    /// The shard the decision was about (`None`: the whole index).
    pub shard: Option<u32>,
}

/// The status being decided, stamped with the generation it describes and the time of the
/// step, plus the notes of the decisions taken so far.
///
/// The steps work on one build unit: `status.unit` itself (unsharded), or the shard chosen
/// with [`Self::select`] (`status.shards[i]`), whose notes and condition messages then start
/// with `shard i: `. With shards, `status.unit` is their [`aggregate::whole`], recomputed after
/// every step, and steps of the whole build (begin, scan, give up, ready) move every shard.
#[derive(Clone, Debug)]
pub struct StatusDraft {
    /// The status as decided so far.
    pub status: ImageIndexStatus,
    /// `metadata.generation` of the ImageIndex (conditions' `observedGeneration`).
    pub generation: Option<i64>,
    /// The time of this step (conditions' `lastTransitionTime`, attempt start and end).
    pub now: Time,
    notes: Vec<Note>,
    /// Index into `status.shards` of the selected shard (`None`: the whole).
    selected: Option<usize>,
}

impl StatusDraft {
    /// A draft starting from `status`.
    pub fn new(status: ImageIndexStatus, generation: Option<i64>, now: Time) -> Self {
        StatusDraft {
            status,
            generation,
            now,
            notes: Vec::new(),
            selected: None,
        }
    }

    /// Whether the status holds shards (`status.shards` not empty).
    pub fn sharded(&self) -> bool {
        !self.status.shards.is_empty()
    }

    /// The scan is done and the build goes on as `n` shards: `status.shards` holds shards
    /// `0..n`, each in phase Building until its own ladder says otherwise (`n` ≤ 1: no shards,
    /// unsharded). Shards already recorded are kept (with their attempts and generations) when
    /// their numbers still match; otherwise they start afresh.
    pub fn set_shards(&mut self, n: u32) {
        self.selected = None;
        let same = self.status.shards.len() == n as usize
            && self
                .status
                .shards
                .iter()
                .zip(0..)
                .all(|(s, i)| s.shard == i);
        if n <= 1 {
            self.status.shards.clear();
            self.status.shards_ready = None;
        } else {
            if !same {
                self.status.shards = (0..n)
                    .map(|shard| ShardStatus {
                        shard,
                        unit: UnitStatus::default(),
                    })
                    .collect();
            }
            for s in &mut self.status.shards {
                s.unit.phase = Some(IndexPhase::Building);
            }
        }
        self.rollup();
    }

    /// Selects the unit the next steps work on: shard `shard` (`None`, or a shard not in
    /// status: the whole). Returns whether that shard is recorded.
    pub fn select(&mut self, shard: Option<u32>) -> bool {
        self.selected = shard.and_then(|n| self.status.shards.iter().position(|s| s.shard == n));
        shard.is_none() || self.selected.is_some()
    }

    /// The selected shard's number (`None`: the whole is selected).
    pub fn selected(&self) -> Option<u32> {
        self.selected
            .and_then(|i| self.status.shards.get(i))
            .map(|s| s.shard)
    }

    /// The selected unit.
    pub fn unit(&self) -> &UnitStatus {
        match self.selected.filter(|i| *i < self.status.shards.len()) {
            Some(i) => &self.status.shards[i].unit,
            None => &self.status.unit,
        }
    }

    fn unit_mut(&mut self) -> &mut UnitStatus {
        match self.selected.filter(|i| *i < self.status.shards.len()) {
            Some(i) => &mut self.status.shards[i].unit,
            None => &mut self.status.unit,
        }
    }

    /// Applies `f` to the selected unit, or with the whole selected, to every unit.
    fn each_unit(&mut self, f: impl Fn(&mut UnitStatus)) {
        if self.selected().is_some() {
            f(self.unit_mut());
        } else {
            f(&mut self.status.unit);
            self.status.shards.iter_mut().for_each(|s| f(&mut s.unit));
        }
        self.rollup();
    }

    fn set_phase(&mut self, phase: IndexPhase) {
        self.each_unit(|u| u.phase = Some(phase));
    }

    /// With shards: the whole (`status.unit`, `status.shardsReady`) from the shards.
    fn rollup(&mut self) {
        if self.status.shards.is_empty() {
            return;
        }
        let units: Vec<UnitStatus> = self.status.shards.iter().map(|s| s.unit.clone()).collect();
        self.status.unit = aggregate::whole(&units);
        let ready = units
            .iter()
            .filter(|u| u.phase == Some(IndexPhase::Ready))
            .count();
        self.status.shards_ready = Some(format!("{ready}/{}", units.len()));
    }

    /// The scan as the selected unit sees it: with shards, the selected shard's share and
    /// largest image ([`shards::shard_scan`]; the whole's largest when none is selected).
    pub fn unit_scan(&self) -> Option<ScanSummary> {
        let scan = self.status.scan.as_ref()?;
        let n = self.status.shards.len() as u32;
        Some(if n > 1 {
            shards::shard_scan(scan, n, self.selected())
        } else {
            scan.clone()
        })
    }

    /// `message` as the selected unit says it (`shard i: ` first when a shard is selected).
    fn say(&self, message: &str) -> String {
        match self.selected() {
            Some(shard) => format!("shard {shard}: {message}"),
            None => message.to_string(),
        }
    }

    /// Sets a condition (see [`conditions::set`]); returns whether anything changed.
    pub fn set_condition(
        &mut self,
        type_: &str,
        status: bool,
        reason: &str,
        message: &str,
    ) -> bool {
        let message = self.say(message);
        conditions::set(
            &mut self.status.conditions,
            type_,
            status,
            reason,
            &message,
            self.generation,
            &self.now,
        )
    }

    /// Records a decision for the user.
    pub fn note(&mut self, warning: bool, reason: &str, action: &'static str, message: String) {
        let message = self.say(&message);
        let shard = self.selected();
        self.notes.push(Note {
            warning,
            reason: reason.to_string(),
            action,
            message,
            shard,
        });
    }

    /// The notes recorded since the last call.
    pub fn take_notes(&mut self) -> Vec<Note> {
        std::mem::take(&mut self.notes)
    }

    /// Whether an index has been published (and so may be served while a rebuild runs).
    pub fn served(&self) -> bool {
        self.status.unit.index_generation.unwrap_or(0) > 0
    }

    /// Invalid spec: say so in `Degraded` and start nothing. A build already running is
    /// left alone.
    pub fn invalid_spec(&mut self, message: &str) {
        if self.set_condition(DEGRADED, true, INVALID_SPEC, message) {
            self.note(true, INVALID_SPEC, "Validate", message.to_string());
        }
        if matches!(
            self.status.unit.phase,
            None | Some(IndexPhase::Pending) | Some(IndexPhase::Failed)
        ) {
            self.set_phase(IndexPhase::Failed);
            self.set_condition(
                PROGRESSING,
                false,
                INVALID_SPEC,
                "nothing is built until the spec is fixed",
            );
            if !self.served() {
                self.set_condition(READY, false, INVALID_SPEC, message);
            }
        }
    }

    /// The spec is valid (again): clears an earlier `InvalidSpec`.
    pub fn spec_valid(&mut self) {
        if conditions::get(&self.status.conditions, DEGRADED)
            .is_some_and(|c| c.reason == INVALID_SPEC)
        {
            self.set_condition(DEGRADED, false, "SpecValid", "the spec is valid");
        }
    }

    /// A new build begins (first one or a rebuild for `rebuild`): phase Pending, the
    /// previous build's memory and progress cleared.
    pub fn begin_build(&mut self, rebuild: Option<String>) {
        if self.status.unit.phase == Some(IndexPhase::Pending) {
            return;
        }
        self.status.rebuild = rebuild;
        self.each_unit(|u| {
            u.phase = Some(IndexPhase::Pending);
            u.memory = None;
            u.progress = None;
        });
        self.set_condition(PROGRESSING, true, "Starting", "starting a build");
        self.set_condition(DEGRADED, false, "NewBuild", "a new build started");
        self.set_condition(MEMORY_PRESSURE, false, "NoBuild", "no build is running");
        if conditions::get(&self.status.conditions, READY).is_none() {
            self.set_condition(READY, false, "NotBuilt", "no index has been published yet");
        }
    }

    /// The scan started (`message` says where it runs).
    pub fn scanning(&mut self, message: String) {
        self.set_phase(IndexPhase::Scanning);
        self.set_condition(PROGRESSING, true, "Scanning", &message);
        self.note(false, "ScanStarted", "Scan", message);
    }

    /// The scan ended with `summary`.
    pub fn scanned(&mut self, summary: ScanSummary) {
        self.note(
            false,
            "ScanComplete",
            "Scan",
            format!(
                "{} images ({} bytes, {} skipped), largest {}x{}",
                summary.images,
                summary.bytes,
                summary.skipped,
                summary.max_width,
                summary.max_height
            ),
        );
        self.status.scan = Some(summary);
    }

    /// Chooses the first preset of a build with the policy and records why in `PresetFits`.
    /// `None`: nothing can be built (the draft has given up, phase Failed).
    pub fn choose_preset(
        &mut self,
        selector: PresetSelector,
        limit: u64,
        disk_limit: Option<u64>,
    ) -> Option<Preset> {
        let Some(shape) = self.unit_scan().as_ref().map(ScanSummary::shape) else {
            self.give_up("ScanReportMissing", "no scan result in status".into());
            return None;
        };
        match first_preset::choose_preset(selector, &shape, limit, disk_limit) {
            PresetFit::NothingFits { message } => {
                self.set_condition(PRESET_FITS, false, "NothingFits", &message);
                self.give_up("NothingFits", message);
                None
            }
            PresetFit::ExplicitTooLarge {
                preset, message, ..
            } => {
                self.set_condition(PRESET_FITS, false, "ExplicitTooLarge", &message);
                self.note(true, "PresetTooLarge", "ChoosePreset", message);
                Some(preset)
            }
            PresetFit::Fits { preset, message } => {
                self.set_condition(PRESET_FITS, true, "Fits", &message);
                self.note(false, "PresetChosen", "ChoosePreset", message);
                Some(preset)
            }
        }
    }

    /// Attempt `number` with preset `label` started at `start` under `memory_limit`, running
    /// in `place` (e.g. `pod cats-build-2`); `why` is the decision that led to it, if it
    /// follows an earlier attempt.
    pub fn attempt_started(
        &mut self,
        started: Attempt,
        memory_limit: &str,
        place: &str,
        why: Option<(&'static str, String)>,
    ) {
        if let Some((reason, message)) = why {
            self.note(false, reason, "StartAttempt", message);
        }
        let (number, label) = (started.number, started.preset.clone());
        self.unit_mut().attempts.push(started);
        let unit = self.unit_mut();
        unit.preset = Some(label.clone());
        unit.phase = Some(IndexPhase::Building);
        unit.memory = None;
        unit.progress = None;
        self.rollup();
        let message =
            format!("attempt {number} builds with preset {label} under {memory_limit} in {place}");
        self.set_condition(PROGRESSING, true, "Building", &message);
        self.set_memory_pressure(
            false,
            "NoSamples",
            &format!("no memory samples of attempt {number} yet"),
        );
        self.note(false, "BuildStarted", "Build", message);
    }

    /// One scrape of attempt `number`'s metrics: raises its peaks, fills `memory` and
    /// `progress`, and classifies pressure over the recent `samples` (oldest first, this
    /// scrape's last) into `MemoryPressure`. `None` when the attempt is not recorded or there
    /// is no sample.
    pub fn observe(
        &mut self,
        number: u32,
        m: &ScrapedMetrics,
        samples: &[MemorySample],
    ) -> Option<Pressure> {
        let images = self.unit_scan().map_or(0, |s| s.images);
        let &MemorySample {
            working_set, limit, ..
        } = samples.last()?;
        let attempt = self
            .unit_mut()
            .attempts
            .iter_mut()
            .find(|a| a.number == number)?;
        attempts::raise_peaks(attempt, m.peak_rss.max(m.rss), Some(working_set));
        let peak = attempt.peak_working_set.unwrap_or(working_set);
        let unit = self.unit_mut();
        unit.memory = Some(MemoryStatus::new(
            m.rss.unwrap_or(0),
            working_set,
            m.available
                .unwrap_or_else(|| limit.saturating_sub(working_set)),
            limit,
            peak,
        ));
        unit.progress = Some(Progress::new(
            m.images_processed.unwrap_or(0),
            m.images_total.unwrap_or(images),
            m.images_failed.unwrap_or(0),
            m.descriptors.unwrap_or(0),
            m.phase.clone(),
        ));
        self.rollup();
        let pressure = pressure::classify_pressure(samples);
        self.set_memory_pressure(
            pressure.level >= PressureLevel::Warning,
            pressure.reason,
            &pressure.message,
        );
        Some(pressure)
    }

    /// Sets `MemoryPressure` for the selected unit: a shard raises it, but clears only its
    /// own (one shard's calm does not hide another's pressure).
    fn set_memory_pressure(&mut self, on: bool, reason: &str, message: &str) {
        if let (Some(shard), false) = (self.selected(), on) {
            let other_shard = conditions::get(&self.status.conditions, MEMORY_PRESSURE)
                .is_some_and(|c| {
                    c.status == "True" && !c.message.starts_with(&format!("shard {shard}: "))
                });
            if other_shard {
                return;
            }
        }
        self.set_condition(MEMORY_PRESSURE, on, reason, message);
    }

    /// Raises attempt `number`'s recorded peaks with measurements taken outside the scrapes
    /// (the build's own summary, the cgroup's charge).
    pub fn raise_peaks(&mut self, number: u32, rss: Option<u64>, working_set: Option<u64>) {
        if let Some(a) = self
            .unit_mut()
            .attempts
            .iter_mut()
            .find(|a| a.number == number)
        {
            attempts::raise_peaks(a, rss, working_set);
        }
        self.rollup();
    }

    /// Records how attempt `number` ended (at `end`, default now) and notes it; the build
    /// ran under `memory_limit`. Returns whether the attempt was found.
    pub fn end_attempt(
        &mut self,
        number: u32,
        outcome: AttemptOutcome,
        exit_code: Option<i32>,
        message: String,
        end: Option<Time>,
        memory_limit: &str,
    ) -> bool {
        let end = end.unwrap_or_else(|| self.now.clone());
        let Some(attempt) = self
            .unit_mut()
            .attempts
            .iter_mut()
            .find(|a| a.number == number)
        else {
            return false;
        };
        attempts::finish(attempt, outcome, exit_code, message.clone(), end);
        if outcome == AttemptOutcome::OomKilled {
            // The kernel kills at the limit: the last scrape may predate the spike, so an
            // OOM-killed attempt's peak is at least its limit.
            let limit = crate::quantity::parse_bytes(memory_limit).ok();
            attempts::raise_peaks(attempt, None, limit);
        }
        let preset = attempt.preset.clone();
        let peak = attempt
            .peak_working_set
            .map_or_else(|| "unknown".to_string(), format_mebibytes_ceil);
        let text = format!("attempt {number} with preset {preset} under {memory_limit} (peak working set {peak}): {message}");
        let (warning, reason) = match outcome {
            AttemptOutcome::Succeeded => {
                let unit = self.unit_mut();
                unit.index_generation = Some(unit.index_generation.unwrap_or(0) + 1);
                (false, "BuildSucceeded")
            }
            AttemptOutcome::OomKilled => (true, "OOMKilled"),
            AttemptOutcome::MemoryPressureRestart => (true, "MemoryPressureRestart"),
            AttemptOutcome::Failed => (true, "BuildFailed"),
            AttemptOutcome::Killed => (true, "BuildKilled"),
            AttemptOutcome::Interrupted => (false, "BuildInterrupted"),
        };
        self.rollup();
        self.note(warning, reason, "Build", text);
        true
    }

    /// The outcome of the running attempt that ended so, by the one rule of
    /// [`outcome::classify`]; its last memory sample is its last scrape, which status keeps
    /// (`memory`, cleared when an attempt starts).
    pub fn outcome_of(&self, end: &AttemptEnd) -> AttemptOutcome {
        let last = self.unit().memory.as_ref().map(|m| MemorySample {
            at_ms: 0,
            working_set: m.working_set,
            limit: m.limit,
        });
        outcome::classify(end, last.as_ref())
    }

    /// How attempt `number` ended, as its runtime observed it: names the outcome
    /// ([`Self::outcome_of`]) and records it like [`Self::end_attempt`]. `None` when the
    /// attempt is not recorded.
    pub fn attempt_ended(
        &mut self,
        number: u32,
        end: &AttemptEnd,
        message: String,
        at: Option<Time>,
        memory_limit: &str,
    ) -> Option<AttemptOutcome> {
        let outcome = self.outcome_of(end);
        self.end_attempt(number, outcome, end.exit_code, message, at, memory_limit)
            .then_some(outcome)
    }

    /// What the build unit does next ([`ladder::next_action`], at `now`). After an attempt ended
    /// without success the decision is applied here already: a give-up gives up, a downgrade
    /// or retry is in `Degraded` (a resume after an interruption is not).
    pub fn next(&mut self, limits: Limits) -> UnitAction {
        let action = ladder::next_action(self.unit(), self.unit_scan().as_ref(), limits, &self.now);
        match &action {
            UnitAction::GiveUp { reason, message } => self.give_up(reason, message.clone()),
            UnitAction::Start(next) if next.after != AttemptOutcome::Interrupted => {
                self.set_condition(DEGRADED, true, next.reason, &next.message);
            }
            _ => {}
        }
        action
    }

    /// The next attempt waits `wait` before it starts (back-off after a failure).
    pub fn waiting_to_retry(&mut self, message: &str, number: u32, wait: Duration) {
        self.set_condition(
            PROGRESSING,
            true,
            "WaitingToRetry",
            &format!(
                "{message}; attempt {number} starts in {}s",
                wait.as_secs().max(1)
            ),
        );
    }

    /// Gives up on the current build: `Degraded` with the reason; phase Failed unless an
    /// earlier index is still served.
    pub fn give_up(&mut self, reason: &str, message: String) {
        self.set_condition(DEGRADED, true, reason, &message);
        self.set_condition(PROGRESSING, false, BUILD_FAILED, &message);
        if self.served() {
            self.set_phase(IndexPhase::Ready);
        } else {
            self.set_phase(IndexPhase::Failed);
            self.set_condition(READY, false, BUILD_FAILED, &message);
        }
        self.note(true, reason, "GiveUp", message);
    }

    /// Whether the last build was given up on.
    pub fn build_gave_up(&self) -> bool {
        rebuild::gave_up(&self.status)
    }

    /// The runtime itself was stopped (local mode: a signal) `message`: phase Pending, no build
    /// running; the recorded build resumes on the next run.
    pub fn interrupted(&mut self, message: String) {
        self.set_phase(IndexPhase::Pending);
        self.set_condition(PROGRESSING, false, "Interrupted", &message);
        self.set_condition(MEMORY_PRESSURE, false, "NoBuild", "no build is running");
        self.note(false, "Interrupted", "Stop", message);
    }

    /// The presets the current build of `unit` started and ended with.
    fn first_and_last_preset_of(&self, unit: &UnitStatus) -> (String, String) {
        let current = attempts::of_current_build(&unit.attempts, self.status.scan.as_ref());
        let first = current
            .first()
            .map(|a| a.preset.clone())
            .unwrap_or_default();
        let last = current.last().map(|a| a.preset.clone()).unwrap_or_default();
        (first, last)
    }

    /// The presets the current build started and ended with (the selected unit's).
    fn first_and_last_preset(&self) -> (String, String) {
        self.first_and_last_preset_of(self.unit())
    }

    /// With shards and the whole selected: each shard's (number, first, last preset).
    fn shard_presets(&self) -> Option<Vec<(u32, String, String)>> {
        if self.selected().is_some() || !self.sharded() {
            return None;
        }
        Some(
            self.status
                .shards
                .iter()
                .map(|s| {
                    let (first, last) = self.first_and_last_preset_of(&s.unit);
                    (s.shard, first, last)
                })
                .collect(),
        )
    }

    /// `preset X`, or with shards of different presets `presets X (shard 0), Y (shard 1)`.
    fn published_presets(&self) -> String {
        match self.shard_presets() {
            Some(shards) if shards.iter().any(|(_, _, last)| *last != shards[0].2) => {
                let each: Vec<String> = shards
                    .iter()
                    .map(|(n, _, last)| format!("{last} (shard {n})"))
                    .collect();
                format!("presets {}", each.join(", "))
            }
            Some(shards) => format!(
                "preset {}",
                shards.first().map(|s| s.2.as_str()).unwrap_or_default()
            ),
            None => format!("preset {}", self.first_and_last_preset().1),
        }
    }

    /// The build published an index: `Degraded` says whether it had to downgrade.
    pub fn published(&mut self) {
        if let Some(shards) = self.shard_presets() {
            let downgraded: Vec<String> = shards
                .iter()
                .filter(|(_, first, last)| first != last)
                .map(|(n, first, last)| format!("shard {n} from {first} to {last}"))
                .collect();
            let with = self.published_presets();
            if downgraded.is_empty() {
                self.set_condition(
                    DEGRADED,
                    false,
                    "Published",
                    &format!("published with {with}"),
                );
            } else {
                let message = format!(
                    "published with {with} after downgrading {}",
                    downgraded.join(", ")
                );
                self.set_condition(DEGRADED, true, "Downgraded", &message);
            }
            return;
        }
        let (first, last) = self.first_and_last_preset();
        if first == last {
            self.set_condition(
                DEGRADED,
                false,
                "Published",
                &format!("published with preset {last}"),
            );
        } else {
            let message = format!("published with preset {last} after downgrading from {first}");
            self.set_condition(DEGRADED, true, "Downgraded", &message);
        }
    }

    /// The published index is available (`reason`, `message` say how): phase Ready.
    pub fn ready(&mut self, reason: &str, message: String, action: &'static str) {
        let with = self.published_presets();
        self.set_phase(IndexPhase::Ready);
        self.set_condition(READY, true, reason, &message);
        self.set_condition(
            PROGRESSING,
            false,
            "Published",
            &format!("published with {with}"),
        );
        self.set_condition(MEMORY_PRESSURE, false, "NoBuild", "no build is running");
        self.note(false, "Ready", action, message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{at, MIB};

    fn photos() -> ScanSummary {
        ScanSummary {
            images: 31,
            bytes: 40_000_000,
            max_width: 4000,
            max_height: 4800,
            max_is_jpeg: true,
            first_attempt: Some(1),
            ..ScanSummary::default()
        }
    }

    fn draft() -> StatusDraft {
        let mut d = StatusDraft::new(ImageIndexStatus::default(), Some(3), at(100));
        d.begin_build(None);
        d.scanned(photos());
        d
    }

    fn limits(memory_limit: u64) -> Limits {
        Limits {
            memory_limit,
            max_attempts: 6,
        }
    }

    fn cond(d: &StatusDraft, type_: &str) -> (String, String) {
        let c = conditions::get(&d.status.conditions, type_).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    fn start(d: &mut StatusDraft, n: u32, p: &Preset) {
        let a = attempts::started(n, &p.label(), &format!("x-build-{n}"), d.now.clone());
        d.attempt_started(a, "80Mi", &format!("process x-build-{n}"), None);
    }

    #[test]
    fn oom_kill_then_downgrade_then_ready_tells_the_whole_story() {
        let mut d = draft();
        let full = d
            .choose_preset(PresetSelector::Full, 80 * MIB, None)
            .unwrap();
        assert_eq!(
            cond(&d, PRESET_FITS),
            ("False".into(), "ExplicitTooLarge".into())
        );
        start(&mut d, 1, &full);
        assert_eq!(d.status.unit.phase, Some(IndexPhase::Building));
        let m = ScrapedMetrics {
            rss: Some(70 * MIB),
            working_set: Some(75 * MIB),
            images_processed: Some(5),
            ..ScrapedMetrics::default()
        };
        let s = MemorySample {
            at_ms: 0,
            working_set: 75 * MIB,
            limit: 80 * MIB,
        };
        let p = d.observe(1, &m, &[s]).unwrap();
        assert_eq!(p.level, PressureLevel::Warning);
        assert_eq!(cond(&d, MEMORY_PRESSURE).0, "True");
        assert_eq!(
            d.status.unit.progress.as_ref().unwrap().summary,
            "5/31 (16%)"
        );
        assert!(d.end_attempt(
            1,
            AttemptOutcome::OomKilled,
            Some(137),
            "killed".into(),
            None,
            "80Mi"
        ));
        let UnitAction::Start(next) = d.next(limits(80 * MIB)) else {
            panic!("no next attempt")
        };
        // the last scrape saw 75Mi; the kernel killed it at the 80Mi limit
        assert_eq!(d.status.unit.attempts[0].peak_working_set, Some(80 * MIB));
        let (preset, number) = (next.preset, next.number);
        assert_eq!((preset.label().as_str(), number), ("medium", 2));
        assert_eq!(
            cond(&d, DEGRADED),
            ("True".into(), "DowngradeAfterOOMKill".into())
        );
        start(&mut d, 2, &preset);
        d.end_attempt(
            2,
            AttemptOutcome::Succeeded,
            Some(0),
            "ok".into(),
            None,
            "80Mi",
        );
        assert_eq!(d.status.unit.index_generation, Some(1));
        d.published();
        d.ready("IndexPublished", "served".into(), "Publish");
        assert_eq!(d.status.unit.phase, Some(IndexPhase::Ready));
        assert_eq!(cond(&d, DEGRADED), ("True".into(), "Downgraded".into()));
        assert_eq!(cond(&d, READY), ("True".into(), "IndexPublished".into()));
        let notes: Vec<String> = d.take_notes().into_iter().map(|n| n.reason).collect();
        assert_eq!(
            notes,
            [
                "ScanComplete",
                "PresetTooLarge",
                "BuildStarted",
                "OOMKilled",
                "BuildStarted",
                "BuildSucceeded",
                "Ready"
            ]
        );
        assert!(d.take_notes().is_empty());
        assert!(d
            .status
            .conditions
            .iter()
            .all(|c| c.observed_generation == Some(3)));
    }

    #[test]
    fn nothing_fits_gives_up_without_an_attempt() {
        let mut d = draft();
        assert!(d
            .choose_preset(PresetSelector::Auto, 20 * MIB, None)
            .is_none());
        assert_eq!(d.status.unit.phase, Some(IndexPhase::Failed));
        assert!(d.status.unit.attempts.is_empty());
        assert_eq!(cond(&d, DEGRADED), ("True".into(), "NothingFits".into()));
        assert!(d.build_gave_up());
    }

    #[test]
    fn interrupted_attempts_resume_without_degrading() {
        let mut d = draft();
        let small = d
            .choose_preset(PresetSelector::Small, 1 << 30, None)
            .unwrap();
        start(&mut d, 1, &small);
        d.end_attempt(
            1,
            AttemptOutcome::Interrupted,
            Some(6),
            "stopped".into(),
            None,
            "1Gi",
        );
        let UnitAction::Start(next) = d.next(limits(1 << 30)) else {
            panic!("no next attempt")
        };
        assert_eq!((next.preset, next.number), (small, 2));
        assert_eq!(cond(&d, DEGRADED), ("False".into(), "NewBuild".into()));
    }

    #[test]
    fn unknown_preset_gives_up_and_no_scan_starts_over() {
        let mut d = draft();
        let mut a = attempts::started(1, "huge", "x-build-1", at(0));
        attempts::finish(&mut a, AttemptOutcome::Failed, Some(1), "m".into(), at(1));
        d.status.unit.attempts.push(a);
        assert!(matches!(
            d.next(limits(1 << 30)),
            UnitAction::GiveUp {
                reason: "UnknownPreset",
                ..
            }
        ));
        assert_eq!(d.status.unit.phase, Some(IndexPhase::Failed));
        d.status.scan = None;
        assert_eq!(d.next(limits(1 << 30)), UnitAction::Scan);
    }

    #[test]
    fn invalid_spec_fails_an_idle_index_and_clears_when_fixed() {
        let mut d = StatusDraft::new(ImageIndexStatus::default(), Some(1), at(0));
        d.invalid_spec("spec.memoryLimit: bad");
        assert_eq!(d.status.unit.phase, Some(IndexPhase::Failed));
        assert_eq!(cond(&d, DEGRADED), ("True".into(), INVALID_SPEC.into()));
        d.spec_valid();
        assert_eq!(cond(&d, DEGRADED), ("False".into(), "SpecValid".into()));
    }

    #[test]
    fn an_ended_attempt_is_named_by_the_one_rule_with_its_last_scrape() {
        let mut d = draft();
        let full = d
            .choose_preset(PresetSelector::Full, 80 * MIB, None)
            .unwrap();
        start(&mut d, 1, &full);
        let kill = AttemptEnd {
            exit_code: Some(137),
            ..AttemptEnd::default()
        };
        // No scrape: a bare SIGKILL is not the OOM killer's.
        let mut quiet = d.clone();
        assert_eq!(
            quiet.attempt_ended(1, &kill, "killed".into(), None, "80Mi"),
            Some(AttemptOutcome::Killed)
        );
        let UnitAction::Start(next) = quiet.next(limits(80 * MIB)) else {
            panic!("no next attempt")
        };
        assert!(
            (next.preset, next.number, next.reason) == (full, 2, "RetryAfterKill"),
            "{next:?}"
        );
        assert_eq!(cond(&quiet, DEGRADED).1, "RetryAfterKill");
        // The last scrape saw 70 of 80Mi: the same SIGKILL is an OOM kill.
        let m = ScrapedMetrics {
            working_set: Some(70 * MIB),
            ..ScrapedMetrics::default()
        };
        let s = MemorySample {
            at_ms: 0,
            working_set: 70 * MIB,
            limit: 80 * MIB,
        };
        d.observe(1, &m, &[s]);
        assert_eq!(
            d.attempt_ended(1, &kill, "killed".into(), None, "80Mi"),
            Some(AttemptOutcome::OomKilled)
        );
        assert_eq!(
            d.status.unit.attempts[0].peak_working_set,
            Some(80 * MIB),
            "an OOM kill happens at the limit"
        );
        assert_eq!(d.attempt_ended(9, &kill, "x".into(), None, "80Mi"), None);
    }

    #[test]
    fn an_interrupted_run_is_pending_and_resumes() {
        let mut d = draft();
        let small = d
            .choose_preset(PresetSelector::Small, 1 << 30, None)
            .unwrap();
        start(&mut d, 1, &small);
        assert_eq!(d.next(limits(1 << 30)), UnitAction::Watch { number: 1 });
        d.interrupted("stopped by SIGTERM".into());
        assert_eq!(d.status.unit.phase, Some(IndexPhase::Pending));
        assert_eq!(
            cond(&d, PROGRESSING),
            ("False".into(), "Interrupted".into())
        );
        assert_eq!(
            cond(&d, MEMORY_PRESSURE),
            ("False".into(), "NoBuild".into())
        );
    }

    #[test]
    fn shards_step_alone_and_the_whole_follows() {
        let mut d = draft();
        d.set_shards(3);
        assert_eq!(d.status.shards.len(), 3);
        assert_eq!(d.status.shards_ready.as_deref(), Some("0/3"));
        let mut presets = Vec::new();
        for shard in 0..3 {
            assert!(d.select(Some(shard)));
            let p = d
                .choose_preset(PresetSelector::Full, 80 * MIB, None)
                .unwrap();
            start(&mut d, 1, &p);
            presets.push(p);
        }
        assert_eq!(d.status.unit.phase, Some(IndexPhase::Building));
        assert!(
            d.status.unit.attempts.is_empty(),
            "attempts stay with shards"
        );
        d.take_notes();
        // Shard 1 is OOM-killed: only it downgrades.
        d.select(Some(1));
        d.end_attempt(
            1,
            AttemptOutcome::OomKilled,
            Some(137),
            "killed".into(),
            None,
            "80Mi",
        );
        let UnitAction::Start(next) = d.next(limits(80 * MIB)) else {
            panic!("no next attempt")
        };
        assert_eq!((next.preset.label().as_str(), next.number), ("medium", 2));
        start(&mut d, 2, &next.preset);
        let notes = d.take_notes();
        assert!(
            notes.iter().all(|n| n.message.starts_with("shard 1: ")),
            "{notes:?}"
        );
        assert!(cond_message(&d, DEGRADED).starts_with("shard 1: "));
        assert_eq!(d.status.shards[0].unit.attempts.len(), 1);
        assert_eq!(d.status.shards[1].unit.attempts.len(), 2);
        assert_eq!(d.status.shards[2].unit.attempts.len(), 1);
        // Every shard succeeds; the whole publishes once all have.
        for (shard, number) in [(0, 1), (1, 2), (2, 1)] {
            d.select(Some(shard));
            d.end_attempt(
                number,
                AttemptOutcome::Succeeded,
                Some(0),
                "ok".into(),
                None,
                "80Mi",
            );
            assert_eq!(d.next(limits(80 * MIB)), UnitAction::Publish);
        }
        assert_eq!(d.status.unit.index_generation, Some(1));
        d.select(None);
        d.published();
        d.ready("IndexServed", "served".into(), "Publish");
        assert_eq!(d.status.unit.phase, Some(IndexPhase::Ready));
        assert!(d
            .status
            .shards
            .iter()
            .all(|s| s.unit.phase == Some(IndexPhase::Ready)));
        assert_eq!(d.status.shards_ready.as_deref(), Some("3/3"));
        assert_eq!(cond(&d, DEGRADED), ("True".into(), "Downgraded".into()));
        let m = cond_message(&d, DEGRADED);
        assert!(m.contains("shard 1 from full to medium"), "{m}");
        assert!(m.contains("medium (shard 1)"), "{m}");
        let json = serde_json::to_value(&d.status).unwrap();
        assert_eq!(json["shards"][1]["shard"], 1);
        assert_eq!(json["shards"][1]["preset"], "medium");
        assert_eq!(json["shardsReady"], "3/3");
    }

    #[test]
    fn a_shard_sees_its_share_of_the_scan() {
        let mut d = draft();
        assert_eq!(d.unit_scan().unwrap().images, 31);
        d.set_shards(2);
        d.select(Some(0));
        assert_eq!(
            d.unit_scan().unwrap().images,
            18,
            "31 * 1.1 / 2, rounded up"
        );
        assert!(!d.select(Some(7)), "no shard 7");
        assert_eq!(d.selected(), None);
        d.set_shards(1);
        assert!(!d.sharded());
        assert_eq!(d.status.shards_ready, None);
    }

    fn cond_message(d: &StatusDraft, type_: &str) -> String {
        conditions::get(&d.status.conditions, type_)
            .unwrap()
            .message
            .clone()
    }

    #[test]
    fn one_shards_calm_does_not_clear_anothers_memory_pressure() {
        let mut d = draft();
        d.set_shards(2);
        for shard in 0..2 {
            d.select(Some(shard));
            let p = d
                .choose_preset(PresetSelector::Small, 80 * MIB, None)
                .unwrap();
            start(&mut d, 1, &p);
        }
        let sample = |ws: u64| MemorySample {
            at_ms: 0,
            working_set: ws * MIB,
            limit: 80 * MIB,
        };
        let m = ScrapedMetrics::default();
        d.select(Some(0));
        d.observe(1, &m, &[sample(75)]);
        assert_eq!(cond(&d, MEMORY_PRESSURE).0, "True");
        d.select(Some(1));
        d.observe(1, &m, &[sample(10)]);
        assert_eq!(cond(&d, MEMORY_PRESSURE).0, "True", "shard 0 still presses");
        assert!(cond_message(&d, MEMORY_PRESSURE).starts_with("shard 0: "));
        d.select(Some(0));
        d.observe(1, &m, &[sample(10)]);
        assert_eq!(
            cond(&d, MEMORY_PRESSURE).0,
            "False",
            "shard 0 clears its own"
        );
    }
}
