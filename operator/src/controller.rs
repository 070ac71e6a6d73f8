//! The ImageIndex controller: `reconcile`, `error_policy` and the shared [`Context`].
//!
//! One reconcile reads top to bottom as a pipeline: fetch the ImageIndex (fresh from the API
//! server, so decisions never rest on a stale cache) → validate → list its scan and build pods
//! → act on the phase (start a build, read the scan, start/watch/end attempts, publish the
//! query service) → write the status with server-side apply → publish the Events of the
//! decisions taken. The decisions themselves are `imageindex_crds::policy`'s.
//!
//! Everything the controller needs to pick up after a restart is in the status and in the
//! labelled pods: pod names are deterministic (`<name>-scan-<n>`, `<name>-build-<attempt>`), an
//! existing pod of the attempt being started is adopted, never duplicated, and two builds
//! never run at once on one index volume.

use crate::attempts;
use crate::error::Error;
use crate::history::{BuildKey, MemoryHistory};
use crate::metrics::Metrics;
use crate::pods::{self, PodState};
use crate::resources::{self, Instance};
use crate::scrape;
use crate::settings::Settings;
use crate::transitions::StatusDraft;
use futures::StreamExt;
use imageindex_crds::conditions::{self, PROGRESSING, READY};
use imageindex_crds::labels::{self, Component};
use imageindex_crds::policy::{self, NextStep, PressureLevel};
use imageindex_crds::types::{AttemptOutcome, Phase, ScanSummary};
use imageindex_crds::validate::{self, Mode, ValidSpec};
use imageindex_crds::{ImageIndex, ImageIndexStatus, Preset, ScanReport};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// The field manager of everything the operator applies, and its Events' reporter.
pub const MANAGER: &str = labels::MANAGER;
/// Requeue while waiting for a pod to go away or a short step to settle.
pub const REQUEUE_SHORT: Duration = Duration::from_secs(2);
/// Requeue while waiting for a pod to progress (pod events usually come first).
pub const REQUEUE_WATCH: Duration = Duration::from_secs(30);
/// Requeue of a settled ImageIndex (Ready or Failed), as a resync.
pub const REQUEUE_IDLE: Duration = Duration::from_secs(300);
/// Requeue after a failed reconcile.
pub const REQUEUE_ERROR: Duration = Duration::from_secs(10);
/// Timeout of one scrape of a build's metrics.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);

/// What every reconcile shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Publishes Events.
    pub recorder: Recorder,
    /// The operator's metrics.
    pub metrics: Metrics,
    /// The operator's settings.
    pub settings: Settings,
    /// Recent memory samples of running builds.
    pub history: MemoryHistory,
    /// HTTP client for scraping build pods.
    pub http: reqwest::Client,
}

impl Context {
    /// A context for `client` (the Events reporter instance is `$POD_NAME` when set).
    pub fn new(client: Client, settings: Settings, metrics: Metrics) -> Arc<Self> {
        let reporter = Reporter {
            controller: MANAGER.to_string(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            settings,
            history: MemoryHistory::default(),
            http: scrape::http_client(SCRAPE_TIMEOUT),
        })
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let (indexes, pods, deployments): (Api<ImageIndex>, Api<Pod>, Api<Deployment>) =
        match ctx.settings.namespace.as_deref() {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client, ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client),
            ),
        };
    let ours = format!("{}={}", labels::MANAGED_BY, labels::MANAGER);
    // Only scan and build pods are owned by an ImageIndex (query pods belong to a ReplicaSet).
    let our_pods = format!(
        "{ours},{} in ({},{})",
        labels::COMPONENT,
        Component::Scan.as_str(),
        Component::Build.as_str()
    );
    Controller::new(indexes, watcher::Config::default())
        .owns(pods, watcher::Config::default().labels(&our_pods))
        .owns(deployments, watcher::Config::default().labels(&ours))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            match result {
                Ok((obj, _)) => debug!(object = %obj, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile failed"),
            }
            std::future::ready(())
        })
        .await;
}

/// Reconciles one ImageIndex.
pub async fn reconcile(obj: Arc<ImageIndex>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started();
    let name = obj.name_any();
    let ns = obj.namespace().ok_or_else(|| Error::MissingField {
        instance: name.clone(),
        field: "metadata.namespace",
    })?;
    // Fetch: the cache may not hold our last status write yet.
    let api: Api<ImageIndex> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(ii) = api.get_opt(&name).await.map_err(|source| Error::Fetch {
        instance: name.clone(),
        source,
    })?
    else {
        return Ok(Action::await_change());
    };
    if ii.metadata.deletion_timestamp.is_some() {
        // Garbage collection removes what it owns.
        return Ok(Action::await_change());
    }
    let mut r = Reconciliation::new(&ii, &ctx, ns)?;
    let decided = r.drive().await;
    // Write what was decided even when a later step failed (an ended attempt stays ended).
    let written = r.write_status(&api).await;
    r.publish_events().await;
    written?;
    decided
}

/// What to do when a reconcile failed: count it by step and retry soon.
pub fn error_policy(obj: Arc<ImageIndex>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(imageindex = %obj.name_any(), step = error.step(), %error, "reconcile failed");
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[error.step()])
        .inc();
    Action::requeue(REQUEUE_ERROR)
}

/// The state of one reconcile: the object, and the status and Events being decided.
struct Reconciliation<'a> {
    ctx: &'a Context,
    ii: &'a ImageIndex,
    name: String,
    ns: String,
    owner: OwnerReference,
    before: ImageIndexStatus,
    draft: StatusDraft,
}

fn event(type_: EventType, reason: &str, action: &str, note: String) -> Event {
    // The Events API limits notes to 1 kB.
    let note: String = note.chars().take(1000).collect();
    Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: action.to_string(),
        secondary: None,
    }
}

fn find<'p>(pods: &'p [Pod], name: &str) -> Option<&'p Pod> {
    pods.iter()
        .find(|p| p.metadata.name.as_deref() == Some(name))
}

fn already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_already_exists())
}

fn gone(e: &kube::Error) -> bool {
    // 404: already deleted; 409: the uid precondition failed, so our pod is gone.
    matches!(e, kube::Error::Api(s) if s.is_not_found() || s.code == 409)
}

impl<'a> Reconciliation<'a> {
    fn new(ii: &'a ImageIndex, ctx: &'a Context, ns: String) -> Result<Self, Error> {
        let name = ii.name_any();
        let owner = ii
            .controller_owner_ref(&())
            .ok_or_else(|| Error::MissingField {
                instance: name.clone(),
                field: "metadata.uid",
            })?;
        let before = ii.status.clone().unwrap_or_default();
        Ok(Reconciliation {
            ctx,
            ii,
            name,
            ns,
            owner,
            draft: StatusDraft::new(
                before.clone(),
                ii.metadata.generation,
                Time(Timestamp::now()),
            ),
            before,
        })
    }

    fn uid(&self) -> &str {
        &self.owner.uid
    }

    fn set_condition(&mut self, type_: &str, status: bool, reason: &str, message: &str) -> bool {
        self.draft.set_condition(type_, status, reason, message)
    }

    fn served(&self) -> bool {
        self.draft.served()
    }

    async fn drive(&mut self) -> Result<Action, Error> {
        let ii = self.ii;
        let valid = match self.validate() {
            Ok(valid) => valid,
            Err(message) => return Ok(self.invalid_spec(message)),
        };
        self.draft.spec_valid();
        let settings = &self.ctx.settings;
        let (name, ns) = (self.name.clone(), self.ns.clone());
        let inst = Instance {
            name: &name,
            namespace: &ns,
            owner: self.owner.clone(),
            spec: &ii.spec,
            valid: &valid,
            settings,
        };
        let pods = self.list_pods().await?;
        let spec_changed = self.before.observed_generation != ii.metadata.generation;
        let token_changed = self.before.rebuild != ii.spec.rebuild;
        match self.draft.status.phase {
            None | Some(Phase::Pending) => self.begin_build(&inst, &pods).await,
            Some(Phase::Scanning) => self.scanning(&inst, &pods).await,
            Some(Phase::Building) => self.building(&inst, &pods).await,
            Some(Phase::Ready) if token_changed || (self.build_gave_up() && spec_changed) => {
                self.begin_build(&inst, &pods).await
            }
            Some(Phase::Ready) => self.serving(&inst).await,
            Some(Phase::Failed) if token_changed || spec_changed => {
                self.begin_build(&inst, &pods).await
            }
            Some(Phase::Failed) => Ok(Action::requeue(REQUEUE_IDLE)),
        }
    }

    // ---------------------------------------------------------------- validate

    fn validate(&self) -> Result<ValidSpec, String> {
        match (
            resources::check_name(&self.name),
            validate::validate(&self.ii.spec, Mode::Cluster),
        ) {
            (Ok(()), Ok(valid)) => Ok(valid),
            (name, spec) => {
                let errors: Vec<_> = name
                    .err()
                    .into_iter()
                    .chain(spec.err().unwrap_or_default())
                    .collect();
                Err(validate::describe(&errors))
            }
        }
    }

    /// Invalid spec: say so in `Degraded` and start nothing. A build already running is
    /// left alone and watched again once the spec is fixed.
    fn invalid_spec(&mut self, message: String) -> Action {
        self.draft.invalid_spec(&message);
        Action::requeue(REQUEUE_IDLE)
    }

    // ---------------------------------------------------------------- pods

    async fn list_pods(&self) -> Result<Vec<Pod>, Error> {
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let selector = format!(
            "{},{} in ({},{})",
            labels::instance_selector(&self.name),
            labels::COMPONENT,
            Component::Scan.as_str(),
            Component::Build.as_str()
        );
        let list = api
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|source| Error::ListPods {
                instance: self.name.clone(),
                source,
            })?;
        Ok(list.items)
    }

    /// Creates a pod; `Ok(false)` when it already exists (it is adopted).
    async fn create_pod(&self, pod: &Pod, component: Component) -> Result<bool, Error> {
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        match api.create(&PostParams::default(), pod).await {
            Ok(_) => Ok(true),
            Err(e) if already_exists(&e) => Ok(false),
            Err(source) => {
                let pod = pod.name_any();
                Err(match component {
                    Component::Scan => Error::CreateScanPod { pod, source },
                    _ => Error::CreateBuildPod { pod, source },
                })
            }
        }
    }

    async fn delete_pod(&self, pod: &Pod) -> Result<(), Error> {
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: pod.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&pod.name_any(), &params).await {
            Ok(_) => Ok(()),
            Err(e) if gone(&e) => Ok(()),
            Err(source) => Err(Error::DeletePod {
                pod: pod.name_any(),
                source,
            }),
        }
    }

    async fn ensure_index_claim(&self, inst: &Instance<'_>) -> Result<(), Error> {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let claim = inst.index_claim();
        let name = claim.name_any();
        let err = |source| Error::EnsureIndexClaim {
            claim: name.clone(),
            source,
        };
        if api.get_opt(&name).await.map_err(err)?.is_some() {
            return Ok(());
        }
        match api.create(&PostParams::default(), &claim).await {
            Ok(_) => Ok(()),
            Err(e) if already_exists(&e) => Ok(()),
            Err(source) => Err(err(source)),
        }
    }

    // ---------------------------------------------------------------- begin a build

    /// Starts a build (first one or a rebuild): clears what an earlier build left, makes
    /// the index claim and the scan pod.
    async fn begin_build(&mut self, inst: &Instance<'_>, pods: &[Pod]) -> Result<Action, Error> {
        self.draft.begin_build(self.ii.spec.rebuild.clone());
        // Scan and build pods of an earlier build go first (they may hold the index volume).
        if !pods.is_empty() {
            for pod in pods
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
            {
                self.delete_pod(pod).await?;
            }
            return Ok(Action::requeue(REQUEUE_SHORT));
        }
        if inst.makes_index_claim() {
            self.ensure_index_claim(inst).await?;
        }
        let n = attempts::next_number(&self.draft.status.attempts);
        let pod = inst.scan_pod(n);
        let pod_name = pod.name_any();
        self.create_pod(&pod, Component::Scan).await?;
        self.draft
            .scanning(format!("scan pod {pod_name} is counting the dataset"));
        Ok(Action::requeue(REQUEUE_WATCH))
    }

    // ---------------------------------------------------------------- scan

    async fn scanning(&mut self, inst: &Instance<'_>, pods: &[Pod]) -> Result<Action, Error> {
        let n = attempts::next_number(&self.draft.status.attempts);
        let name = resources::scan_pod_name(&self.name, n);
        let Some(pod) = find(pods, &name) else {
            // Deleted from outside: make it again.
            self.create_pod(&inst.scan_pod(n), Component::Scan).await?;
            return Ok(Action::requeue(REQUEUE_WATCH));
        };
        let ended = match pods::observe(pod) {
            PodState::Terminated(t) => t,
            PodState::Terminating => return Ok(Action::requeue(REQUEUE_SHORT)),
            PodState::Pending | PodState::Running { .. } => {
                return Ok(Action::requeue(REQUEUE_WATCH))
            }
        };
        if ended.exit_code != Some(policy::exit_code::OK) || ended.oom_killed {
            let reason = if ended.exit_code == Some(policy::exit_code::DATASET) {
                "DatasetUnavailable"
            } else if ended.oom_killed {
                "ScanOOMKilled"
            } else {
                "ScanFailed"
            };
            return Ok(self.give_up(
                reason,
                format!("scan pod {name} {}", pods::describe(&ended)),
            ));
        }
        let report = match pods::termination_message(pod).map(serde_json::from_str::<ScanReport>) {
            Some(Ok(report)) => report,
            Some(Err(e)) => {
                return Ok(self.give_up(
                    "ScanReportUnreadable",
                    format!(
                    "scan pod {name} ended but its termination message is not a scan report: {e}"
                ),
                ))
            }
            None => {
                return Ok(self.give_up(
                    "ScanReportMissing",
                    format!("scan pod {name} ended without a termination message"),
                ))
            }
        };
        let mut summary = ScanSummary::from_report(&report);
        summary.pod = Some(name);
        summary.first_attempt = Some(n);
        self.draft.scanned(summary);
        self.choose_and_start(inst, pods, n).await
    }

    /// Chooses the first preset of a build and starts attempt `first` with it.
    async fn choose_and_start(
        &mut self,
        inst: &Instance<'_>,
        pods: &[Pod],
        first: u32,
    ) -> Result<Action, Error> {
        let Some(preset) = self.draft.choose_preset(
            self.ii.spec.preset,
            inst.valid.memory_limit,
            inst.disk_limit(),
        ) else {
            return Ok(Action::requeue(REQUEUE_IDLE));
        };
        self.start_attempt(inst, pods, first, preset, None).await
    }

    // ---------------------------------------------------------------- attempts

    /// Starts (or adopts) build attempt `number` with `preset`; `why` is the decision that led
    /// to it (reason, message) when it follows an earlier attempt.
    async fn start_attempt(
        &mut self,
        inst: &Instance<'_>,
        pods: &[Pod],
        number: u32,
        preset: Preset,
        why: Option<(&'static str, String)>,
    ) -> Result<Action, Error> {
        let name = resources::build_pod_name(&self.name, number);
        // Never two builds on one index volume: wait until every other pod has stopped.
        let busy: Vec<&Pod> = pods
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
                self.delete_pod(pod).await?;
            }
            let names: Vec<String> = busy.iter().map(|p| p.name_any()).collect();
            self.set_condition(
                PROGRESSING,
                true,
                "WaitingForPreviousPod",
                &format!("attempt {number} waits for {} to stop", names.join(", ")),
            );
            return Ok(Action::requeue(REQUEUE_SHORT));
        }
        let (label, start, adopted) = match find(pods, &name) {
            Some(pod) => (
                pods::label(pod, labels::PRESET).map_or_else(|| preset.label(), str::to_string),
                pod.metadata
                    .creation_timestamp
                    .clone()
                    .unwrap_or_else(|| self.draft.now.clone()),
                true,
            ),
            None => {
                let created = self
                    .create_pod(&inst.build_pod(number, &preset), Component::Build)
                    .await?;
                (preset.label(), self.draft.now.clone(), !created)
            }
        };
        let place = format!("pod {name}{}", if adopted { " (adopted)" } else { "" });
        self.draft.attempt_started(
            attempts::started(number, &label, &name, start),
            &inst.spec.memory_limit,
            &place,
            why,
        );
        Ok(Action::requeue(self.ctx.settings.scrape_interval))
    }

    async fn building(&mut self, inst: &Instance<'_>, pods: &[Pod]) -> Result<Action, Error> {
        let Some(scan) = self.draft.status.scan.clone() else {
            // Building without a scan result: start over.
            return self.begin_build(inst, pods).await;
        };
        let current = attempts::of_current_build(&self.draft.status.attempts, Some(&scan));
        match current.last().map(|a| a.outcome) {
            None => {
                let first = scan
                    .first_attempt
                    .unwrap_or_else(|| attempts::next_number(&self.draft.status.attempts));
                self.choose_and_start(inst, pods, first).await
            }
            Some(None) => self.watch_attempt(inst, pods).await,
            Some(Some(AttemptOutcome::Succeeded)) => self.publish(inst).await,
            Some(Some(_)) => self.next_attempt(inst, pods).await,
        }
    }

    /// Watches the running attempt: its pod's end, or its memory while it runs.
    async fn watch_attempt(&mut self, inst: &Instance<'_>, pods: &[Pod]) -> Result<Action, Error> {
        let scan = self.draft.status.scan.clone();
        let Some(running) = attempts::running(&mut self.draft.status.attempts, scan.as_ref())
        else {
            return Ok(Action::requeue(REQUEUE_SHORT));
        };
        let number = running.number;
        let pod_name = running
            .pod
            .clone()
            .unwrap_or_else(|| resources::build_pod_name(&self.name, number));
        let Some(pod) = find(pods, &pod_name) else {
            self.end_attempt(
                number,
                AttemptOutcome::Interrupted,
                None,
                format!("build pod {pod_name} disappeared"),
                None,
            );
            return self.next_attempt(inst, pods).await;
        };
        match pods::observe(pod) {
            PodState::Pending => Ok(Action::requeue(self.ctx.settings.scrape_interval)),
            PodState::Terminating => Ok(Action::requeue(REQUEUE_SHORT)),
            PodState::Running { ip } => self.watch_memory(inst, pod, &ip, number).await,
            PodState::Terminated(t) => {
                let outcome = policy::outcome_of_exit(t.exit_code, t.oom_killed, false);
                let message = format!("build pod {pod_name} {}", pods::describe(&t));
                self.end_attempt(number, outcome, t.exit_code, message, t.finished_at.clone());
                if t.still_running {
                    // The container was restarted after it ended: stop it before the next attempt.
                    self.delete_pod(pod).await?;
                    return Ok(Action::requeue(REQUEUE_SHORT));
                }
                if outcome == AttemptOutcome::Succeeded {
                    self.publish(inst).await
                } else {
                    self.next_attempt(inst, pods).await
                }
            }
        }
    }

    /// Scrapes the running build's metrics into status and stops it on critical pressure.
    async fn watch_memory(
        &mut self,
        inst: &Instance<'_>,
        pod: &Pod,
        ip: &str,
        number: u32,
    ) -> Result<Action, Error> {
        let interval = self.ctx.settings.scrape_interval;
        let key = BuildKey {
            uid: self.uid().to_string(),
            attempt: number,
        };
        let now = Instant::now();
        if let Some(wait) = self.ctx.history.wait_before_scrape(&key, interval, now) {
            return Ok(Action::requeue(wait));
        }
        let port = pods::metrics_port(pod).unwrap_or(self.ctx.settings.build_metrics_port);
        let url = scrape::metrics_url(ip, port);
        let m = match scrape::scrape(&self.ctx.http, &url).await {
            Ok(m) => m,
            Err(error) => {
                self.ctx.history.mark_scraped(&key, now);
                self.ctx.metrics.scrape_errors.inc();
                warn!(imageindex = %self.name, %error, "cannot scrape the build's metrics");
                return Ok(Action::requeue(interval));
            }
        };
        let (working_set, limit) = m.working_set_and_limit(inst.valid.memory_limit);
        let samples = self.ctx.history.record(&key, now, working_set, limit);
        let Some(pressure) = self.draft.observe(number, &m, &samples) else {
            return Ok(Action::requeue(interval));
        };
        if pressure.level == PressureLevel::Critical {
            self.delete_pod(pod).await?;
            self.end_attempt(
                number,
                AttemptOutcome::MemoryPressureRestart,
                None,
                format!("stopped build pod {}: {}", pod.name_any(), pressure.message),
                None,
            );
            // The next attempt starts once this pod has stopped (it writes its checkpoint).
            return Ok(Action::requeue(REQUEUE_SHORT));
        }
        Ok(Action::requeue(interval))
    }

    /// Records how attempt `number` ended.
    fn end_attempt(
        &mut self,
        number: u32,
        outcome: AttemptOutcome,
        exit_code: Option<i32>,
        message: String,
        end: Option<Time>,
    ) {
        let limit = &self.ii.spec.memory_limit;
        if !self
            .draft
            .end_attempt(number, outcome, exit_code, message, end, limit)
        {
            return;
        }
        self.ctx
            .metrics
            .attempts
            .with_label_values(&[outcome.as_str()])
            .inc();
        self.ctx.history.forget(&BuildKey {
            uid: self.uid().to_string(),
            attempt: number,
        });
    }

    /// After an attempt ended (not successfully): the policy decides the next one.
    async fn next_attempt(&mut self, inst: &Instance<'_>, pods: &[Pod]) -> Result<Action, Error> {
        let Some((step, last)) = self
            .draft
            .decide_next(inst.valid.max_attempts, inst.valid.memory_limit)
        else {
            return self.begin_build(inst, pods).await;
        };
        match step {
            NextStep::Done => self.publish(inst).await,
            NextStep::GiveUp { .. } => Ok(Action::requeue(REQUEUE_IDLE)),
            NextStep::Start {
                preset,
                number,
                delay,
                reason,
                message,
            } => {
                if let Some(wait) = attempts::wait_after(&last, delay, &self.draft.now) {
                    self.draft.waiting_to_retry(&message, number, wait);
                    return Ok(Action::requeue(wait));
                }
                self.start_attempt(inst, pods, number, preset, Some((reason, message)))
                    .await
            }
        }
    }

    /// Gives up on the current build: `Degraded` with the reason; phase Failed unless an
    /// earlier index is still served.
    fn give_up(&mut self, reason: &str, message: String) -> Action {
        self.draft.give_up(reason, message);
        Action::requeue(REQUEUE_IDLE)
    }

    fn build_gave_up(&self) -> bool {
        self.draft.build_gave_up()
    }

    // ---------------------------------------------------------------- publish and serve

    /// Applies the query Deployment and Service; returns whether the service is available.
    async fn apply_query(&mut self, inst: &Instance<'_>) -> Result<bool, Error> {
        let params = PatchParams::apply(MANAGER).force();
        let deployment = inst.query_deployment();
        let name = resources::query_name(&self.name);
        let deployments: Api<Deployment> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let applied = deployments
            .patch(&name, &params, &Patch::Apply(&deployment))
            .await
            .map_err(|source| Error::ApplyDeployment {
                name: name.clone(),
                source,
            })?;
        let services: Api<Service> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        services
            .patch(&name, &params, &Patch::Apply(&inst.query_service()))
            .await
            .map_err(|source| Error::ApplyService {
                name: name.clone(),
                source,
            })?;
        self.draft.status.endpoint = Some(resources::endpoint(&self.name, &self.ns));
        let available = applied
            .status
            .as_ref()
            .and_then(|s| s.available_replicas)
            .unwrap_or(0);
        Ok(inst.valid.query_replicas == 0 || available > 0)
    }

    fn served_message(&self) -> String {
        format!(
            "index generation {} is served at {}",
            self.draft.status.index_generation.unwrap_or(0),
            self.draft.status.endpoint.clone().unwrap_or_default()
        )
    }

    /// The build published an index: serve it and become Ready.
    async fn publish(&mut self, inst: &Instance<'_>) -> Result<Action, Error> {
        let available = self.apply_query(inst).await?;
        self.draft.published();
        if available || conditions::is_true(&self.draft.status.conditions, READY) {
            let message = self.served_message();
            self.draft.ready("IndexServed", message, "Publish");
            Ok(Action::requeue(REQUEUE_IDLE))
        } else {
            let message = format!(
                "index generation {} published; waiting for an available replica of {}",
                self.draft.status.index_generation.unwrap_or(0),
                resources::query_name(&self.name)
            );
            self.set_condition(READY, false, "WaitingForQueryService", &message);
            self.set_condition(PROGRESSING, true, "WaitingForQueryService", &message);
            Ok(Action::requeue(REQUEUE_WATCH))
        }
    }

    /// Ready and nothing to build: keep the query objects as the spec says.
    async fn serving(&mut self, inst: &Instance<'_>) -> Result<Action, Error> {
        if !self.served() {
            // Ready without a published index cannot happen; rebuild rather than guess.
            return Ok(self.give_up(
                "NoIndex",
                "phase was Ready but no index generation is recorded".into(),
            ));
        }
        let available = self.apply_query(inst).await?;
        if available {
            let message = self.served_message();
            if self.set_condition(READY, true, "IndexServed", &message) {
                self.draft.note(false, "Ready", "Serve", message);
            }
        } else {
            let message = format!(
                "{} has no available replica",
                resources::query_name(&self.name)
            );
            if self.set_condition(READY, false, "QueryServiceUnavailable", &message) {
                self.draft
                    .note(true, "QueryServiceUnavailable", "Serve", message);
            }
        }
        Ok(Action::requeue(REQUEUE_IDLE))
    }

    // ---------------------------------------------------------------- status and events

    async fn write_status(&mut self, api: &Api<ImageIndex>) -> Result<(), Error> {
        self.draft.status.observed_generation = self.ii.metadata.generation;
        if self.draft.status == self.before {
            return Ok(());
        }
        let patch = json!({
            "apiVersion": ImageIndex::api_version(&()),
            "kind": ImageIndex::kind(&()),
            "status": self.draft.status,
        });
        api.patch_status(
            &self.name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::WriteStatus {
            instance: self.name.clone(),
            source,
        })?;
        Ok(())
    }

    async fn publish_events(&mut self) {
        let reference = self.ii.object_ref(&());
        for note in self.draft.take_notes() {
            info!(imageindex = %self.name, namespace = %self.ns, reason = %note.reason, "{}", note.message);
            let type_ = if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            };
            let ev = event(type_, &note.reason, note.action, note.message);
            if let Err(error) = self.ctx.recorder.publish(&ev, &reference).await {
                warn!(imageindex = %self.name, reason = %ev.reason, %error, "cannot publish event");
            }
        }
    }
}
