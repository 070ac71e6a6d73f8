//! Decide: the cluster's steps over the decisions of `imageindex_crds`, without I/O.
//!
//! From the status, the pods and the scrape, [`decide`] writes what the status becomes into the
//! draft and returns the [`Plan`] of what to make or remove. Pod status becomes an observation
//! through [`pods`] (the controller's adapter: [`pods::attempt_end`]); what a build's end means
//! and what follows it are `imageindex_crds`'s (`outcome::classify`, `ladder::next_action`,
//! `rebuild::build_start`). Status that depends on an effect having happened is a [`Step`] of
//! the plan, recorded once [`super::apply`] got that far.
//!
//! A sharded index (`status.shards`, from `spec.shards` once the scan is in) runs the same
//! ladder per shard with the shard selected in the draft ([`StatusDraft::select`]); the whole
//! gives up when a shard does, and is served once every shard has published.

use super::observe::{Observed, Scrape};
use super::plan::{Effect, Plan, Step};
use super::{REQUEUE_IDLE, REQUEUE_SHORT, REQUEUE_WATCH};
use crate::pods::{self, PodState};
use crate::resources::{self, Instance};
use imageindex_crds::attempts;
use imageindex_crds::conditions::PROGRESSING;
use imageindex_crds::labels::{self, Component};
use imageindex_crds::ladder::{Limits, UnitAction};
use imageindex_crds::outcome::exit_code;
use imageindex_crds::pressure::PressureLevel;
use imageindex_crds::rebuild::{self, BuildStart, Seen};
use imageindex_crds::shards::{self, ShardCount};
use imageindex_crds::transitions::StatusDraft;
use imageindex_crds::types::{Attempt, AttemptOutcome, IndexPhase, ScanSummary};
use imageindex_crds::{ImageIndexSpec, ImageIndexStatus, Preset, ScanReport};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;
use std::time::Duration;

/// The running build the controller should scrape: attempt, pod IP and metrics port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrapeTarget {
    /// The running attempt.
    pub attempt: u32,
    /// Its pod's IP.
    pub ip: String,
    /// Its pod's metrics port.
    pub port: u16,
}

/// The running build whose metrics [`decide`] will read: the current build's running attempt
/// while the phase is Building and its pod runs with an address.
pub fn scrape_target(
    inst: &Instance<'_>,
    status: &ImageIndexStatus,
    pods: &[Pod],
) -> Option<ScrapeTarget> {
    if status.unit.phase != Some(IndexPhase::Building) || status.scan.is_none() {
        return None;
    }
    let current = attempts::of_current_build(&status.unit.attempts, status.scan.as_ref());
    let running = current.last().filter(|a| a.outcome.is_none())?;
    let pod = find(pods, &build_pod_of(inst, running))?;
    match pods::observe(pod) {
        PodState::Running { ip } => Some(ScrapeTarget {
            attempt: running.number,
            ip,
            port: pods::metrics_port(pod).unwrap_or(inst.settings.build_metrics_port),
        }),
        _ => None,
    }
}

/// The running shard builds [`decide`] will read, by shard: each shard's running attempt
/// while the phase is Building and its pod runs with an address.
pub fn shard_scrape_targets(
    inst: &Instance<'_>,
    status: &ImageIndexStatus,
    pods: &[Pod],
) -> Vec<(u32, ScrapeTarget)> {
    if status.unit.phase != Some(IndexPhase::Building) || status.scan.is_none() {
        return Vec::new();
    }
    status
        .shards
        .iter()
        .filter_map(|s| {
            let current = attempts::of_current_build(&s.unit.attempts, status.scan.as_ref());
            let running = current.last().filter(|a| a.outcome.is_none())?;
            let name = running.pod.clone().unwrap_or_else(|| {
                resources::shard_build_pod_name(inst.name, s.shard, running.number)
            });
            let pod = find(pods, &name)?;
            match pods::observe(pod) {
                PodState::Running { ip } => Some((
                    s.shard,
                    ScrapeTarget {
                        attempt: running.number,
                        ip,
                        port: pods::metrics_port(pod).unwrap_or(inst.settings.build_metrics_port),
                    },
                )),
                _ => None,
            }
        })
        .collect()
}

/// What the controller sees of the build recorded in `status`: the spec (`generation`, the
/// rebuild token) against it. The dataset and the index volume are seen by pods only, when a
/// build runs; a running build and a served index are kept through other spec changes.
pub fn seen<'a>(
    status: &ImageIndexStatus,
    generation: Option<i64>,
    spec: &'a ImageIndexSpec,
) -> Seen<'a> {
    Seen::of_spec(status, generation, spec.rebuild.as_deref())
}

/// Decides one reconcile: writes status into `draft`, returns the effects.
pub fn decide(inst: &Instance<'_>, draft: &mut StatusDraft, observed: &Observed) -> Plan {
    let mut d = Decision {
        inst,
        draft,
        pods: &observed.pods,
        scrape: observed.scrape.as_ref(),
        observed,
        effects: Vec::new(),
    };
    let requeue = d.by_phase();
    Plan {
        effects: d.effects,
        requeue,
    }
}

fn find<'p>(pods: &'p [Pod], name: &str) -> Option<&'p Pod> {
    pods.iter()
        .find(|p| p.metadata.name.as_deref() == Some(name))
}

fn build_pod_of(inst: &Instance<'_>, attempt: &Attempt) -> String {
    attempt
        .pod
        .clone()
        .unwrap_or_else(|| resources::build_pod_name(inst.name, attempt.number))
}

/// One reconcile's decisions in the making.
struct Decision<'a, 'i> {
    inst: &'a Instance<'i>,
    draft: &'a mut StatusDraft,
    pods: &'a [Pod],
    scrape: Option<&'a Scrape>,
    observed: &'a Observed,
    effects: Vec<Effect>,
}

/// Where one shard's ladder stands in this reconcile.
enum ShardStep {
    /// Its attempt runs (or stops): look again after this long.
    Running(Duration),
    /// It waits (a back-off) this long before its next attempt.
    Waiting(Duration),
    /// It can start an attempt once a build slot is free.
    Start(ShardStart),
    /// Its build published.
    Published,
    /// Its ladder gave up (reason, message).
    GaveUp(String, String),
    /// No scan is recorded: the whole build starts over.
    Rescan,
}

/// A shard attempt ready to start.
struct ShardStart {
    shard: u32,
    number: u32,
    /// `None`: the first attempt of the build, whose preset is chosen when it starts.
    preset: Option<Preset>,
    why: Option<(&'static str, String)>,
}

impl Decision<'_, '_> {
    fn limits(&self) -> Limits {
        Limits {
            memory_limit: self.inst.valid.memory_limit,
            max_attempts: self.inst.valid.max_attempts,
        }
    }

    fn memory_limit(&self) -> String {
        self.inst.spec.memory_limit.clone()
    }

    fn delete(&mut self, pod: &Pod) {
        self.effects.push(Effect::DeletePod(pod.clone()));
    }

    fn record(&mut self, step: Step) {
        self.effects.push(Effect::Record(step));
    }

    /// The step the phase calls for; a settled index (Ready, Failed) begins a new build only
    /// as `rebuild::build_start` says.
    fn by_phase(&mut self) -> Duration {
        let status = &self.draft.status;
        let phase = status.unit.phase;
        let seen = seen(status, self.draft.generation, self.inst.spec);
        match phase {
            None | Some(IndexPhase::Pending) => self.begin_build(),
            Some(IndexPhase::Scanning) => self.scanning(),
            Some(IndexPhase::Building) if self.draft.sharded() => self.shards(),
            Some(IndexPhase::Building) => self.ladder(),
            Some(IndexPhase::Ready | IndexPhase::Failed) => {
                match rebuild::build_start(status, &seen) {
                    BuildStart::Begin(_) => self.begin_build(),
                    BuildStart::Continue if phase == Some(IndexPhase::Ready) => {
                        if self.draft.sharded() {
                            self.serving_shards()
                        } else {
                            self.serving()
                        }
                    }
                    BuildStart::Continue | BuildStart::StayFailed => REQUEUE_IDLE,
                }
            }
        }
    }

    /// Starts a build (first one or a rebuild): clears what an earlier build left, makes the
    /// index claim and the scan pod.
    fn begin_build(&mut self) -> Duration {
        self.draft.begin_build(self.inst.spec.rebuild.clone());
        // Scan and build pods of an earlier build go first (they may hold the index volume).
        if !self.pods.is_empty() {
            for pod in self
                .pods
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
            {
                self.delete(pod);
            }
            return REQUEUE_SHORT;
        }
        // A sharded index's claims are made per shard when its builds start (`auto` knows
        // how many only after the scan).
        if self.inst.makes_index_claim() && self.unsharded_spec() {
            self.effects
                .push(Effect::EnsureIndexClaim(self.inst.index_claim()));
        }
        let n = self.next_number();
        let pod = self.inst.scan_pod(n);
        let message = format!("scan pod {} is counting the dataset", pod.name_any());
        self.effects.push(Effect::CreatePod {
            pod,
            component: Component::Scan,
        });
        self.record(Step::Scanning(message));
        REQUEUE_WATCH
    }

    /// The scan pod: made again if it vanished, read once it ended.
    fn scanning(&mut self) -> Duration {
        let n = self.next_number();
        let name = resources::scan_pod_name(self.inst.name, n);
        let Some(pod) = find(self.pods, &name) else {
            // Deleted from outside: make it again.
            self.effects.push(Effect::CreatePod {
                pod: self.inst.scan_pod(n),
                component: Component::Scan,
            });
            return REQUEUE_WATCH;
        };
        let ended = match pods::observe(pod) {
            PodState::Terminated(t) => t,
            PodState::Terminating => return REQUEUE_SHORT,
            PodState::Pending | PodState::Running { .. } => return REQUEUE_WATCH,
        };
        if ended.exit_code != Some(exit_code::OK) || ended.oom_killed {
            let reason = if ended.exit_code == Some(exit_code::DATASET) {
                "DatasetUnavailable"
            } else if ended.oom_killed {
                "ScanOOMKilled"
            } else {
                "ScanFailed"
            };
            return self.give_up(
                reason,
                format!("scan pod {name} {}", pods::describe(&ended)),
            );
        }
        let report = match pods::termination_message(pod).map(serde_json::from_str::<ScanReport>) {
            Some(Ok(report)) => report,
            Some(Err(e)) => {
                return self.give_up(
                    "ScanReportUnreadable",
                    format!(
                    "scan pod {name} ended but its termination message is not a scan report: {e}"
                ),
                )
            }
            None => {
                return self.give_up(
                    "ScanReportMissing",
                    format!("scan pod {name} ended without a termination message"),
                )
            }
        };
        let mut summary = ScanSummary::from_report(&report);
        summary.pod = Some(name);
        summary.first_attempt = Some(n);
        let shape = summary.shape();
        self.draft.scanned(summary);
        let disk = if self.inst.makes_index_claim() {
            self.inst.disk_limit()
        } else {
            None
        };
        let (shards, why) = shards::count(
            self.inst.spec.shards,
            &shape,
            self.inst.valid.memory_limit,
            disk,
        );
        if let Some(why) = why {
            self.draft.note(false, "ShardsChosen", "Shard", why);
        }
        if shards > 1 || self.draft.sharded() {
            self.draft.set_shards(shards);
        }
        if shards > 1 {
            return self.shards();
        }
        if self.inst.makes_index_claim() && !self.unsharded_spec() {
            self.effects
                .push(Effect::EnsureIndexClaim(self.inst.index_claim()));
        }
        self.choose_and_start(n)
    }

    /// Whether `spec.shards` asks for one unsharded index (absent or 1), known before the scan.
    fn unsharded_spec(&self) -> bool {
        matches!(self.inst.spec.shards, None | Some(ShardCount::Count(1)))
    }

    /// The number of the next build's first attempt (and its scan pod): one past every
    /// attempt recorded, the whole's or any shard's.
    fn next_number(&self) -> u32 {
        let status = &self.draft.status;
        status
            .shards
            .iter()
            .map(|s| attempts::next_number(&s.unit.attempts))
            .chain([attempts::next_number(&status.unit.attempts)])
            .max()
            .unwrap_or(1)
    }

    /// Chooses the first preset of a build and starts attempt `first` with it.
    fn choose_and_start(&mut self, first: u32) -> Duration {
        let valid = self.inst.valid;
        match self.draft.choose_preset(
            self.inst.spec.preset,
            valid.memory_limit,
            self.inst.disk_limit(),
        ) {
            Some(preset) => self.start_attempt(first, preset, None),
            None => REQUEUE_IDLE,
        }
    }

    /// The build unit's next step (`imageindex_crds::ladder`), carried out.
    fn ladder(&mut self) -> Duration {
        let limits = self.limits();
        match self.draft.next(limits) {
            UnitAction::Scan => self.begin_build(),
            UnitAction::Choose { number } => self.choose_and_start(number),
            UnitAction::Watch { number } => self.watch_attempt(number),
            UnitAction::Publish => self.publish(),
            UnitAction::GiveUp { .. } => REQUEUE_IDLE,
            UnitAction::Start(next) => {
                if let Some(wait) = next.wait {
                    self.draft
                        .waiting_to_retry(&next.message, next.number, wait);
                    return wait;
                }
                self.start_attempt(next.number, next.preset, Some((next.reason, next.message)))
            }
        }
    }

    /// Starts (or adopts) build attempt `number` with `preset`; `why` is the decision that led
    /// to it (reason, message) when it follows an earlier attempt.
    fn start_attempt(
        &mut self,
        number: u32,
        preset: Preset,
        why: Option<(&'static str, String)>,
    ) -> Duration {
        let name = resources::build_pod_name(self.inst.name, number);
        // Never two builds on one index volume: wait until every other pod has stopped.
        let busy: Vec<&Pod> = self
            .pods
            .iter()
            .filter(|p| {
                p.metadata.name.as_deref() != Some(name.as_str()) && pods::observe(p).is_active()
            })
            .collect();
        if !busy.is_empty() {
            for pod in busy
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
            {
                self.delete(pod);
            }
            let names: Vec<String> = busy.iter().map(|p| p.name_any()).collect();
            self.record(Step::Condition {
                type_: PROGRESSING,
                status: true,
                reason: "WaitingForPreviousPod",
                message: format!("attempt {number} waits for {} to stop", names.join(", ")),
            });
            return REQUEUE_SHORT;
        }
        let (label, start, found) = match find(self.pods, &name) {
            Some(pod) => (
                pods::label(pod, labels::PRESET).map_or_else(|| preset.label(), str::to_string),
                pod.metadata
                    .creation_timestamp
                    .clone()
                    .unwrap_or_else(|| self.draft.now.clone()),
                true,
            ),
            None => {
                self.effects.push(Effect::CreatePod {
                    pod: self.inst.build_pod(number, &preset),
                    component: Component::Build,
                });
                (preset.label(), self.draft.now.clone(), false)
            }
        };
        let attempt = attempts::started(number, &label, &name, start);
        let memory_limit = self.memory_limit();
        self.record(Step::AttemptStarted {
            attempt,
            memory_limit,
            found,
            why,
            shard: None,
        });
        self.inst.settings.scrape_interval
    }

    /// Watches the running attempt: its pod's end, or its memory while it runs.
    fn watch_attempt(&mut self, number: u32) -> Duration {
        let Some(running) = self
            .draft
            .status
            .unit
            .attempts
            .iter()
            .find(|a| a.number == number)
        else {
            return REQUEUE_SHORT;
        };
        let pod_name = build_pod_of(self.inst, running);
        let memory_limit = self.memory_limit();
        let Some(pod) = find(self.pods, &pod_name) else {
            self.draft.end_attempt(
                number,
                AttemptOutcome::Interrupted,
                None,
                format!("build pod {pod_name} disappeared"),
                None,
                &memory_limit,
            );
            return self.ladder();
        };
        match pods::observe(pod) {
            PodState::Pending => self.inst.settings.scrape_interval,
            PodState::Terminating => REQUEUE_SHORT,
            PodState::Running { .. } => self.watch_memory(pod, number, self.scrape, None),
            PodState::Terminated(t) => {
                let message = format!("build pod {pod_name} {}", pods::describe(&t));
                let outcome = self.draft.attempt_ended(
                    number,
                    &pods::attempt_end(&t),
                    message,
                    t.finished_at.clone(),
                    &memory_limit,
                );
                if t.still_running {
                    // The container was restarted after it ended: stop it before the next attempt.
                    self.delete(pod);
                    return REQUEUE_SHORT;
                }
                if outcome == Some(AttemptOutcome::Succeeded) {
                    self.publish()
                } else {
                    self.ladder()
                }
            }
        }
    }

    /// Puts the scrape of the running build into status and stops it on critical pressure.
    fn watch_memory(
        &mut self,
        pod: &Pod,
        number: u32,
        scrape: Option<&Scrape>,
        shard: Option<u32>,
    ) -> Duration {
        let interval = self.inst.settings.scrape_interval;
        let (metrics, samples) = match scrape {
            Some(Scrape::Read { metrics, samples }) => (metrics, samples),
            Some(Scrape::NotDue(wait)) => return *wait,
            Some(Scrape::Failed) | None => return interval,
        };
        let Some(pressure) = self.draft.observe(number, metrics, samples) else {
            return interval;
        };
        if pressure.level == PressureLevel::Critical {
            self.delete(pod);
            let memory_limit = self.memory_limit();
            self.record(Step::StoppedForPressure {
                number,
                message: format!("stopped build pod {}: {}", pod.name_any(), pressure.message),
                memory_limit,
                shard,
            });
            // The next attempt starts once this pod has stopped (it writes its checkpoint).
            return REQUEUE_SHORT;
        }
        interval
    }

    /// The build published an index: serve it and become Ready.
    fn publish(&mut self) -> Duration {
        self.apply_query();
        self.record(Step::Published {
            query: resources::query_name(self.inst.name),
            endpoint: resources::endpoint(self.inst.name, self.inst.namespace),
        });
        REQUEUE_WATCH
    }

    /// Ready and nothing to build: keep the query objects as the spec says.
    fn serving(&mut self) -> Duration {
        if !self.draft.served() {
            // Ready without a published index cannot happen; say so and stay Failed until the
            // spec or the rebuild token changes.
            return self.give_up(
                "NoIndex",
                "phase was Ready but no index generation is recorded".into(),
            );
        }
        self.apply_query();
        self.record(Step::Served {
            query: resources::query_name(self.inst.name),
            endpoint: resources::endpoint(self.inst.name, self.inst.namespace),
        });
        REQUEUE_IDLE
    }

    fn apply_query(&mut self) {
        self.effects.push(Effect::ApplyQuery {
            deployment: Box::new(self.inst.query_deployment()),
            service: Box::new(self.inst.query_service()),
            replicas: self.inst.valid.query_replicas,
        });
    }

    /// A sharded build: each shard's ladder in turn (watch, restart alone, publish), new
    /// attempts started while fewer than `spec.maxParallelBuilds` run; once every shard has
    /// published, the shards' query Deployments and the router are rolled to it.
    fn shards(&mut self) -> Duration {
        let n = self.draft.status.shards.len() as u32;
        let cap = shards::parallel_builds(self.inst.spec.max_parallel_builds, n);
        let mut requeue = REQUEUE_IDLE;
        let (mut running, mut published) = (0u32, 0u32);
        let mut ready = Vec::new();
        for shard in self
            .draft
            .status
            .shards
            .iter()
            .map(|s| s.shard)
            .collect::<Vec<_>>()
        {
            self.draft.select(Some(shard));
            let step = self.shard_step(shard);
            self.draft.select(None);
            match step {
                ShardStep::Running(wait) => {
                    running += 1;
                    requeue = requeue.min(wait);
                }
                ShardStep::Waiting(wait) => requeue = requeue.min(wait),
                ShardStep::Start(start) => ready.push(start),
                ShardStep::Published => published += 1,
                ShardStep::GaveUp(reason, message) => {
                    return self.shards_give_up(shard, &reason, &message)
                }
                ShardStep::Rescan => return self.begin_build(),
            }
        }
        if published == n {
            return self.publish_shards();
        }
        for start in ready {
            if running >= cap {
                requeue = requeue.min(REQUEUE_WATCH);
                continue;
            }
            let shard = start.shard;
            self.draft.select(Some(shard));
            let started = self.start_shard_attempt(start, n);
            self.draft.select(None);
            match started {
                Ok(wait) => {
                    running += 1;
                    requeue = requeue.min(wait);
                }
                Err((reason, message)) => return self.shards_give_up(shard, &reason, &message),
            }
        }
        requeue
    }

    /// One shard's ladder (the shard selected in the draft); an attempt that ended in this
    /// reconcile is followed by the ladder's next step at once.
    fn shard_step(&mut self, shard: u32) -> ShardStep {
        for _ in 0..2 {
            match self.draft.next(self.limits()) {
                UnitAction::Scan => return ShardStep::Rescan,
                UnitAction::Choose { number } => {
                    return ShardStep::Start(ShardStart {
                        shard,
                        number,
                        preset: None,
                        why: None,
                    })
                }
                UnitAction::Watch { number } => {
                    if let Some(step) = self.watch_shard(shard, number) {
                        return step;
                    }
                }
                UnitAction::Publish => return ShardStep::Published,
                UnitAction::GiveUp { reason, message } => {
                    return ShardStep::GaveUp(reason.to_string(), message)
                }
                UnitAction::Start(next) => {
                    if let Some(wait) = next.wait {
                        self.draft
                            .waiting_to_retry(&next.message, next.number, wait);
                        return ShardStep::Waiting(wait);
                    }
                    return ShardStep::Start(ShardStart {
                        shard,
                        number: next.number,
                        preset: Some(next.preset),
                        why: Some((next.reason, next.message)),
                    });
                }
            }
        }
        ShardStep::Running(REQUEUE_SHORT)
    }

    /// Watches shard `shard`'s running attempt `number`; `None` once it ended (recorded).
    fn watch_shard(&mut self, shard: u32, number: u32) -> Option<ShardStep> {
        let running = self
            .draft
            .unit()
            .attempts
            .iter()
            .find(|a| a.number == number)?;
        let pod_name = running
            .pod
            .clone()
            .unwrap_or_else(|| resources::shard_build_pod_name(self.inst.name, shard, number));
        let memory_limit = self.memory_limit();
        let Some(pod) = find(self.pods, &pod_name) else {
            self.draft.end_attempt(
                number,
                AttemptOutcome::Interrupted,
                None,
                format!("build pod {pod_name} disappeared"),
                None,
                &memory_limit,
            );
            return None;
        };
        match pods::observe(pod) {
            PodState::Pending => Some(ShardStep::Running(self.inst.settings.scrape_interval)),
            PodState::Terminating => Some(ShardStep::Running(REQUEUE_SHORT)),
            PodState::Running { .. } => {
                let scrape = self.observed.shard_scrapes.get(&shard);
                Some(ShardStep::Running(self.watch_memory(
                    pod,
                    number,
                    scrape,
                    Some(shard),
                )))
            }
            PodState::Terminated(t) => {
                let message = format!("build pod {pod_name} {}", pods::describe(&t));
                self.draft.attempt_ended(
                    number,
                    &pods::attempt_end(&t),
                    message,
                    t.finished_at.clone(),
                    &memory_limit,
                );
                if t.still_running {
                    self.delete(pod);
                    return Some(ShardStep::Running(REQUEUE_SHORT));
                }
                None
            }
        }
    }

    /// Starts (or adopts) a shard's attempt (the shard selected in the draft), choosing the
    /// build's first preset for the shard's share of the dataset; `Err`: nothing fits.
    fn start_shard_attempt(
        &mut self,
        start: ShardStart,
        n: u32,
    ) -> Result<Duration, (String, String)> {
        let ShardStart {
            shard,
            number,
            preset,
            why,
        } = start;
        let name = resources::shard_build_pod_name(self.inst.name, shard, number);
        let shard_label = shard.to_string();
        // The shard's earlier pod (stopped under pressure) must be gone first.
        let busy: Vec<Pod> = self
            .pods
            .iter()
            .filter(|p| {
                p.metadata.name.as_deref() != Some(name.as_str())
                    && pods::label(p, labels::SHARD) == Some(shard_label.as_str())
                    && pods::observe(p).is_active()
            })
            .cloned()
            .collect();
        if !busy.is_empty() {
            for pod in busy
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
            {
                self.delete(pod);
            }
            return Ok(REQUEUE_SHORT);
        }
        let preset = match preset {
            Some(p) => p,
            None => {
                let chosen = self.draft.choose_preset(
                    self.inst.spec.preset,
                    self.inst.valid.memory_limit,
                    self.inst.shard_disk_limit(n),
                );
                match chosen {
                    Some(p) => p,
                    None => {
                        return Err((
                            "NothingFits".into(),
                            "no preset fits the shard's share of the dataset".into(),
                        ))
                    }
                }
            }
        };
        if self.inst.makes_index_claim() {
            self.effects.push(Effect::EnsureIndexClaim(
                self.inst.index_claim_of(Some(shard)),
            ));
        }
        let (label, start_time, found) = match find(self.pods, &name) {
            Some(pod) => (
                pods::label(pod, labels::PRESET).map_or_else(|| preset.label(), str::to_string),
                pod.metadata
                    .creation_timestamp
                    .clone()
                    .unwrap_or_else(|| self.draft.now.clone()),
                true,
            ),
            None => {
                self.effects.push(Effect::CreatePod {
                    pod: self.inst.build_pod_of(Some((shard, n)), number, &preset),
                    component: Component::Build,
                });
                (preset.label(), self.draft.now.clone(), false)
            }
        };
        let attempt = attempts::started(number, &label, &name, start_time);
        let memory_limit = self.memory_limit();
        self.record(Step::AttemptStarted {
            attempt,
            memory_limit,
            found,
            why,
            shard: Some(shard),
        });
        Ok(self.inst.settings.scrape_interval)
    }

    /// A shard gave up: the whole build stops (its other build pods are stopped) and gives up,
    /// still serving an earlier generation if there is one.
    fn shards_give_up(&mut self, shard: u32, reason: &str, message: &str) -> Duration {
        for pod in self
            .pods
            .iter()
            .filter(|p| {
                pods::label(p, labels::COMPONENT) == Some(Component::Build.as_str())
                    && p.metadata.deletion_timestamp.is_none()
                    && pods::observe(p).is_active()
            })
            .cloned()
            .collect::<Vec<_>>()
        {
            self.delete(&pod);
        }
        self.give_up(
            "ShardFailed",
            format!("shard {shard} gave up ({reason}: {message}); the build stops"),
        )
    }

    /// Every shard published: roll the shards' query Deployments and the router to it.
    fn publish_shards(&mut self) -> Duration {
        self.apply_shards();
        self.record(Step::Published {
            query: resources::query_name(self.inst.name),
            endpoint: resources::endpoint(self.inst.name, self.inst.namespace),
        });
        REQUEUE_WATCH
    }

    /// A sharded index Ready and nothing to build: keep its serving objects, watch its shards.
    fn serving_shards(&mut self) -> Duration {
        if !self.draft.served() {
            return self.give_up(
                "NoIndex",
                "phase was Ready but no index generation is recorded".into(),
            );
        }
        self.apply_shards();
        self.record(Step::Served {
            query: resources::query_name(self.inst.name),
            endpoint: resources::endpoint(self.inst.name, self.inst.namespace),
        });
        REQUEUE_WATCH
    }

    /// The shards' query Deployments (at the generation every shard has published) and
    /// Services, and the router once every shard Service has a ClusterIP.
    fn apply_shards(&mut self) {
        let generation = self.draft.status.unit.index_generation.unwrap_or(0);
        let numbers: Vec<u32> = self.draft.status.shards.iter().map(|s| s.shard).collect();
        let objects = numbers
            .iter()
            .map(|i| {
                (
                    self.inst.shard_deployment(*i, generation),
                    self.inst.shard_service(*i),
                )
            })
            .collect();
        let ips: Option<Vec<String>> = numbers
            .iter()
            .map(|i| {
                cluster_ip(
                    &self.observed.shard_services,
                    &resources::shard_name(self.inst.name, *i),
                )
            })
            .collect();
        let router =
            ips.map(|ips| Box::new((self.inst.router_deployment(&ips), self.inst.query_service())));
        self.effects.push(Effect::ApplyShards {
            shards: objects,
            router,
            replicas: self.inst.valid.query_replicas,
        });
    }

    /// Gives up on the current build: `Degraded` with the reason; phase Failed unless an
    /// earlier index is still served.
    fn give_up(&mut self, reason: &str, message: String) -> Duration {
        self.draft.give_up(reason, message);
        REQUEUE_IDLE
    }
}

/// The ClusterIP of the Service `name` among `services`, once it has one.
fn cluster_ip(services: &[Service], name: &str) -> Option<String> {
    services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.cluster_ip.clone())
        .filter(|ip| !ip.is_empty() && ip != "None")
}
