//! `operator local`: the operator on one machine. The same ImageIndex manifest and the same
//! decisions as the cluster controller (`imageindex_crds`, written into status by
//! `imageindex_crds::transitions`), with local processes instead of pods:
//!
//! manifest → validate → scan (`indexer scan`) → choose the preset → attempts, each
//! `indexer exec-limited -- indexer build` in a fresh cgroup limited to `spec.memoryLimit`,
//! its `/metrics` scraped into status → after each attempt its end is observed
//! ([`process::attempt_end`]: exit and the cgroup's OOM counter) and the ladder decides (resume,
//! downgrade, retry, give up) → publish → serve (`indexer serve`) or exit.
//!
//! The status goes to `--status-out` and to the state directory ([`state`]) after every
//! change, so a rerun of the same manifest continues the attempt history and resumes the
//! build from its checkpoint; whether a rerun begins a new build is
//! `imageindex_crds::rebuild::build_start`'s call, as in the cluster.

mod attempt;
pub mod cgroup;
pub mod display;
pub mod manifest;
pub mod process;
mod serve;
pub mod sharded;
pub mod state;

use crate::history::{BuildKey, MemoryHistory};
use crate::resources;
use crate::scrape;
use display::{Console, LiveLine};
use imageindex_crds::attempts;
use imageindex_crds::conditions::READY;
use imageindex_crds::ladder::{Limits, UnitAction};
use imageindex_crds::pressure::{Pressure, PressureLevel};
use imageindex_crds::quantity::format_mebibytes_ceil;
use imageindex_crds::rebuild::{self, BuildStart};
use imageindex_crds::transitions::StatusDraft;
use imageindex_crds::types::{AttemptOutcome, IndexPhase, ScanSummary};
use imageindex_crds::validate;
use imageindex_crds::{ImageIndex, ImageIndexStatus, Preset, ScanReport};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use manifest::{Manifest, ManifestError};
use process::{BuildCommand, ExitInfo, ProcessError, Stop};
use state::{StateDir, StateError};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::watch;
use tracing::{info, warn};

pub use serve::base_url;

/// How long the query service may take to answer `/readyz`.
pub const SERVE_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout of one scrape of a build's metrics.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// What `operator local` was asked to do.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// The ImageIndex manifest.
    pub manifest: PathBuf,
    /// The state directory (default: [`state::default_dir`]).
    pub state_dir: Option<PathBuf>,
    /// Serve the published index on this address until stopped.
    pub serve: Option<SocketAddr>,
    /// Also write the status here (JSON, replaced atomically).
    pub status_out: Option<PathBuf>,
    /// The indexer binary (default: next to this one, else on PATH).
    pub indexer_bin: Option<PathBuf>,
    /// How often a running build's metrics are scraped.
    pub scrape_interval: Duration,
    /// How long a stopped build may take to write its checkpoint before SIGKILL.
    pub stop_grace: Duration,
    /// Where the cgroup hierarchies are mounted.
    pub cgroup_root: PathBuf,
    /// Scan, build and serve only this shard (`I/N`) of the dataset.
    pub shard: Option<String>,
}

/// Why `operator local` could not do its job (as opposed to a build that failed).
#[derive(Debug, Error)]
pub enum LocalError {
    /// The manifest is unreadable or invalid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The state directory cannot be used.
    #[error(transparent)]
    State(#[from] StateError),
    /// A process could not be run.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// Builds cannot be given a real memory limit.
    #[error("cannot make cgroups: {reason}. Fix: {}", cgroup::FIX)]
    Cgroups {
        /// What failed.
        reason: String,
    },
    /// The status file cannot be written.
    #[error("cannot write the status to {path}: {source}")]
    StatusOut {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The query service did not start or stopped on its own.
    #[error("query service: {0}")]
    Serve(String),
}

impl LocalError {
    /// The process exit code: 2 for a bad manifest, 3 for the environment.
    pub fn exit_code(&self) -> i32 {
        match self {
            LocalError::Manifest(_) => 2,
            _ => 3,
        }
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The index is published (and was served until stopped, with `--serve`).
    Ready,
    /// The build was given up on; the status says why.
    Failed,
    /// Stopped by a signal; rerunning resumes.
    Interrupted,
}

impl Ending {
    /// The process exit code: 0, 1, or 130 for an interrupted (resumable) run.
    pub fn exit_code(self) -> i32 {
        match self {
            Ending::Ready => 0,
            Ending::Failed => 1,
            Ending::Interrupted => 130,
        }
    }
}

/// The step after the current one.
#[derive(Debug)]
enum Plan {
    /// Start an attempt (after `wait`); `why` is the decision that led to it.
    Attempt {
        preset: Preset,
        number: u32,
        wait: Duration,
        why: Option<(&'static str, String)>,
    },
    /// The build published: become Ready.
    Publish,
    /// Begin a new build (scan first), for this reason.
    Rescan(&'static str),
    /// Stop with this ending.
    Stop(Ending),
}

/// How one attempt ended, for the loop.
enum AttemptEnd {
    Succeeded,
    Interrupted,
    Ended,
}

/// Counts stop requests (SIGINT, SIGTERM, SIGHUP) as they arrive.
fn listen_for_stop_signals() -> watch::Receiver<u32> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = watch::channel(0u32);
    for (kind, name) in [
        (SignalKind::interrupt(), "SIGINT"),
        (SignalKind::terminate(), "SIGTERM"),
        (SignalKind::hangup(), "SIGHUP"),
    ] {
        match signal(kind) {
            Ok(mut stream) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while stream.recv().await.is_some() {
                        warn!("{name} received: stopping (a running build writes its checkpoint; run the same command again to resume)");
                        tx.send_modify(|n| *n += 1);
                    }
                });
            }
            Err(error) => warn!(%error, "cannot listen for {name}"),
        }
    }
    // Keep the channel open even if no signal could be registered: closed means "no stop".
    tokio::spawn(async move {
        let _open = tx;
        std::future::pending::<()>().await
    });
    rx
}

fn write_status_file(path: &Path, status: &ImageIndexStatus) -> Result<(), LocalError> {
    let err = |source| LocalError::StatusOut {
        path: path.to_path_buf(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(status).map_err(|e| err(std::io::Error::other(e)))?;
    state::write_atomically(path, &bytes).map_err(err)
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// Runs `operator local` to its end. `live` is the terminal's live line (when `tty`).
pub async fn run(opts: LocalOptions, live: LiveLine, tty: bool) -> Result<Ending, LocalError> {
    let manifest = match manifest::load(&opts.manifest) {
        Ok(m) => m,
        Err(e) => {
            if let (ManifestError::Invalid { errors, .. }, Some(out)) = (&e, &opts.status_out) {
                let mut draft = StatusDraft::new(ImageIndexStatus::default(), Some(1), now());
                draft.invalid_spec(&validate::describe(errors));
                write_status_file(out, &draft.status)?;
            }
            return Err(e.into());
        }
    };
    let root = opts.state_dir.clone().unwrap_or_else(|| {
        state::default_dir(
            &manifest.name,
            std::env::var("XDG_STATE_HOME").ok().as_deref(),
            std::env::var("HOME").ok().as_deref(),
        )
    });
    let state = StateDir::open(&root)?;
    let exe = std::env::current_exe().ok();
    let indexer = process::locate_indexer(
        opts.indexer_bin.as_deref(),
        exe.as_deref(),
        std::env::var("PATH").ok().as_deref(),
    )?;
    let record = state::record_for_run(state.load()?, &manifest.index, now());
    let draft = StatusDraft::new(
        record.status.clone().unwrap_or_default(),
        record.metadata.generation,
        now(),
    );
    info!(
        imageindex = %manifest.name,
        dataset = %manifest.dataset.display(),
        state = %state.root().display(),
        indexer = %indexer.display(),
        "operator local starting"
    );
    let threads = manifest.valid.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
    });
    let mut runner = Runner {
        console: Console::new(live, tty),
        stops: listen_for_stop_signals(),
        history: MemoryHistory::default(),
        http: scrape::http_client(SCRAPE_TIMEOUT),
        cgroups_checked: false,
        written: None,
        started: Instant::now(),
        opts,
        manifest,
        state,
        indexer,
        record,
        draft,
        threads,
    };
    let ending = runner.drive().await;
    runner.console.finish();
    let degraded = imageindex_crds::conditions::get(
        &runner.draft.status.conditions,
        imageindex_crds::conditions::DEGRADED,
    )
    .map(|c| c.message.clone())
    .unwrap_or_default();
    match ending {
        Ok(Ending::Failed) => eprintln!("{} Failed: {degraded}", runner.manifest.name),
        Ok(Ending::Interrupted) => eprintln!(
            "{} stopped; its state is in {}: run the same command again to resume",
            runner.manifest.name,
            runner.state.root().display()
        ),
        _ => {}
    }
    ending
}

/// One run's state.
struct Runner {
    opts: LocalOptions,
    manifest: Manifest,
    state: StateDir,
    indexer: PathBuf,
    record: ImageIndex,
    draft: StatusDraft,
    threads: u32,
    console: Console,
    stops: watch::Receiver<u32>,
    history: MemoryHistory,
    http: reqwest::Client,
    cgroups_checked: bool,
    written: Option<ImageIndexStatus>,
    started: Instant,
}

impl Runner {
    fn tick(&mut self) {
        self.draft.now = now();
    }

    fn stopping(&self) -> bool {
        *self.stops.borrow() > 0
    }

    fn limit_text(&self) -> String {
        self.manifest.index.spec.memory_limit.clone()
    }

    /// Logs the notes, shows the status, and writes it where it changed.
    fn save(&mut self) -> Result<(), LocalError> {
        for note in self.draft.take_notes() {
            if note.warning {
                warn!(reason = %note.reason, "{}", note.message);
            } else {
                info!(reason = %note.reason, "{}", note.message);
            }
        }
        self.draft.status.observed_generation = self.draft.generation;
        self.console.update(&self.draft.status);
        if self.written.as_ref() == Some(&self.draft.status) {
            return Ok(());
        }
        self.record.status = Some(self.draft.status.clone());
        self.state.save(&self.record)?;
        if let Some(path) = &self.opts.status_out {
            write_status_file(path, &self.draft.status)?;
        }
        self.written = Some(self.draft.status.clone());
        Ok(())
    }

    /// Whether this run begins a new build, continues the recorded one (resume, or serve
    /// what is published) or stays Failed: `rebuild::build_start` before the scan, and again
    /// with the dataset's fingerprint once the scan ran.
    async fn drive(&mut self) -> Result<Ending, LocalError> {
        if let Some(count) = self.shard_count().await? {
            return sharded::run(self, count).await;
        }
        let before = self.record.status.clone().unwrap_or_default();
        let plan = match rebuild::build_start(&before, &state::seen(&self.record, None, None)) {
            BuildStart::Begin(reason) => self.new_build(reason, None).await?,
            BuildStart::Continue | BuildStart::StayFailed => {
                let report = match self.scan().await? {
                    Ok(report) => report,
                    Err(ending) => return Ok(ending),
                };
                let published = Some(self.state.published());
                let seen = state::seen(&self.record, Some(&report.fingerprint), published);
                match rebuild::build_start(&before, &seen) {
                    BuildStart::Begin(reason) => self.new_build(reason, Some(report)).await?,
                    BuildStart::StayFailed => return self.stay_failed(),
                    BuildStart::Continue if before.scan.is_none() => {
                        self.new_build("no scan is recorded", Some(report)).await?
                    }
                    BuildStart::Continue if before.unit.phase == Some(IndexPhase::Ready) => {
                        info!("the index is already built for this spec and dataset");
                        Plan::Publish
                    }
                    BuildStart::Continue => self.resume()?,
                }
            }
        };
        self.build(plan).await
    }

    /// The shards of a sharded ImageIndex (`None`: unsharded, or this run is one shard of
    /// one). `auto` decides from a scan of the whole dataset, as in the cluster.
    async fn shard_count(&mut self) -> Result<Option<u32>, LocalError> {
        use imageindex_crds::shards::{self, ShardCount};
        if self.opts.shard.is_some() {
            return Ok(None);
        }
        let spec = self.manifest.index.spec.shards;
        let count = match spec {
            None | Some(ShardCount::Count(0 | 1)) => return Ok(None),
            Some(ShardCount::Count(n)) => n,
            Some(ShardCount::Auto) => {
                let report = match self.scan().await? {
                    Ok(r) => r,
                    Err(_) => return Ok(None),
                };
                let (n, why) = shards::count(
                    spec,
                    &report.shape,
                    self.manifest.valid.memory_limit,
                    self.manifest.valid.storage_bytes,
                );
                if let Some(why) = why {
                    info!("{why}");
                }
                n
            }
        };
        Ok((count > 1).then_some(count))
    }

    /// The last build failed and neither the spec, the rebuild token nor the dataset changed:
    /// it would fail the same way, so nothing is built.
    fn stay_failed(&mut self) -> Result<Ending, LocalError> {
        warn!("the last build failed and neither the spec, its rebuild token nor the dataset changed since: change one of them to build again");
        self.save()?;
        Ok(Ending::Failed)
    }

    /// Runs the scan; `Err(ending)` when it was interrupted or failed (recorded in status).
    async fn scan(&mut self) -> Result<Result<ScanReport, Ending>, LocalError> {
        if self.stopping() {
            return self.interrupted("before the scan").map(Err);
        }
        let mut stops = self.stops.clone();
        let scanned = tokio::select! {
            r = process::scan(&self.indexer, &self.manifest.dataset, self.manifest.valid.memory_limit, self.threads, self.opts.shard.as_deref()) => r,
            _ = stops.changed() => return self.interrupted("during the scan").map(Err),
        };
        match scanned {
            Ok(report) => Ok(Ok(report)),
            Err(ProcessError::Scan { code, message, .. }) => {
                self.tick();
                let reason = if code == Some(imageindex_crds::outcome::exit_code::DATASET) {
                    "DatasetUnavailable"
                } else {
                    "ScanFailed"
                };
                self.draft
                    .give_up(reason, format!("the scan failed: {message}"));
                self.save()?;
                Ok(Err(Ending::Failed))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Begins a new build: scan (unless `report` is fresh), then choose the first preset.
    async fn new_build(
        &mut self,
        reason: &str,
        report: Option<ScanReport>,
    ) -> Result<Plan, LocalError> {
        self.tick();
        self.draft.begin_build(self.record.spec.rebuild.clone());
        let first = attempts::next_number(&self.draft.status.unit.attempts);
        let scan_name = resources::scan_pod_name(&self.manifest.name, first);
        self.draft.scanning(format!(
            "{scan_name} is counting {} ({reason})",
            self.manifest.dataset.display()
        ));
        self.save()?;
        let report = match report {
            Some(r) => r,
            None => match self.scan().await? {
                Ok(r) => r,
                Err(ending) => return Ok(Plan::Stop(ending)),
            },
        };
        self.tick();
        let mut summary = ScanSummary::from_report(&report);
        summary.pod = Some(scan_name);
        summary.first_attempt = Some(first);
        self.draft.scanned(summary);
        self.choose(first)
    }

    /// Chooses the first preset of the build with the policy.
    fn choose(&mut self, first: u32) -> Result<Plan, LocalError> {
        let preset = self.draft.choose_preset(
            self.record.spec.preset,
            self.manifest.valid.memory_limit,
            self.manifest.valid.storage_bytes,
        );
        self.save()?;
        Ok(match preset {
            Some(preset) => Plan::Attempt {
                preset,
                number: first,
                wait: Duration::ZERO,
                why: None,
            },
            None => Plan::Stop(Ending::Failed),
        })
    }

    /// Continues a recorded build: an attempt that was running when the operator died is
    /// recorded as interrupted, then the policy decides as after any attempt.
    fn resume(&mut self) -> Result<Plan, LocalError> {
        self.tick();
        let scan = self.draft.status.scan.clone();
        if let Some(n) =
            attempts::running(&mut self.draft.status.unit.attempts, scan.as_ref()).map(|a| a.number)
        {
            let limit = self.limit_text();
            self.draft.end_attempt(
                n,
                AttemptOutcome::Interrupted,
                None,
                "operator local stopped while it ran (no exit was recorded)".into(),
                None,
                &limit,
            );
        }
        info!("continuing the recorded build");
        self.after_attempt()
    }

    /// The ladder's decision after the last attempt of the current build.
    fn after_attempt(&mut self) -> Result<Plan, LocalError> {
        let valid = &self.manifest.valid;
        let limits = Limits {
            memory_limit: valid.memory_limit,
            max_attempts: valid.max_attempts,
        };
        let plan = match self.draft.next(limits) {
            UnitAction::Scan => Plan::Rescan("no scan is recorded"),
            // Nothing runs between runs: an attempt still open was ended by `resume`.
            UnitAction::Watch { .. } => Plan::Rescan("a recorded attempt is still open"),
            UnitAction::Choose { number } => return self.choose(number),
            UnitAction::Publish => Plan::Publish,
            UnitAction::GiveUp { .. } => Plan::Stop(Ending::Failed),
            UnitAction::Start(next) => Plan::Attempt {
                preset: next.preset,
                number: next.number,
                wait: next.wait.unwrap_or_default(),
                why: Some((next.reason, next.message)),
            },
        };
        self.save()?;
        Ok(plan)
    }

    async fn build(&mut self, mut plan: Plan) -> Result<Ending, LocalError> {
        loop {
            plan = match plan {
                Plan::Stop(ending) => return Ok(ending),
                Plan::Publish => return self.publish().await,
                Plan::Rescan(reason) => self.new_build(reason, None).await?,
                Plan::Attempt {
                    preset,
                    number,
                    wait,
                    why,
                } => {
                    if !wait.is_zero() {
                        if let Some((_, message)) = &why {
                            self.tick();
                            self.draft.waiting_to_retry(message, number, wait);
                            self.save()?;
                        }
                        let mut stops = self.stops.clone();
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = stops.changed() => {}
                        }
                    }
                    if self.stopping() {
                        return self.interrupted("before an attempt started");
                    }
                    match self.attempt(number, preset, why).await? {
                        AttemptEnd::Succeeded => Plan::Publish,
                        AttemptEnd::Interrupted => {
                            return self.interrupted("while a build was running")
                        }
                        AttemptEnd::Ended => self.after_attempt()?,
                    }
                }
            };
        }
    }

    /// Stopped by a signal: phase Pending, resumable.
    fn interrupted(&mut self, during: &str) -> Result<Ending, LocalError> {
        self.tick();
        self.draft.interrupted(format!("operator local was stopped {during}; run the same command again to resume from the checkpoint"));
        self.save()?;
        Ok(Ending::Interrupted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(Ending::Ready.exit_code(), 0);
        assert_eq!(Ending::Failed.exit_code(), 1);
        assert_eq!(Ending::Interrupted.exit_code(), 130);
        let e = LocalError::Cgroups {
            reason: "cannot create /sys/fs/cgroup/memory/imageindex".into(),
        };
        assert_eq!(e.exit_code(), 3);
        assert!(e.to_string().contains("run it as root"), "{e}");
    }
}
