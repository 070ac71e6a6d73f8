//! The ImageIndex controller: `reconcile`, `error_policy` and the shared [`Context`].
//!
//! One reconcile is a pipeline, read top to bottom in [`reconcile`]:
//!
//! 1. fetch the ImageIndex fresh from the API server (decisions never rest on a stale cache);
//! 2. validate its spec (pure; an invalid spec is reported and nothing else happens);
//! 3. [`observe`]: list its scan and build pods, and scrape the running build's metrics when a
//!    scrape is due;
//! 4. [`decide`]: from the status and those observations, the decisions of `imageindex_crds`
//!    (pure) — what the status becomes and a [`plan::Plan`] of effects;
//! 5. [`apply`]: create and delete pods, make the index claim, apply the query service;
//! 6. [`status`]: write the status with server-side apply (even when a step failed: an ended
//!    attempt stays ended) and publish the Events of the decisions taken.
//!
//! Everything the controller needs to pick up after a restart is in the status and in the
//! labelled pods: pod names are deterministic (`<name>-scan-<n>`, `<name>-build-<attempt>`, and
//! with shards `<name>-s<i>-build-<attempt>`), an existing pod of the attempt being started is
//! adopted, never duplicated, and two builds never run at once on one index volume (with
//! shards: one per shard, each on its own claim or directory).

pub mod apply;
pub mod decide;
pub mod observe;
pub mod plan;
pub mod status;

use crate::error::Error;
use crate::history::MemoryHistory;
use crate::metrics::Metrics;
use crate::resources::{self, Instance};
use crate::scrape;
use crate::settings::Settings;
use futures::StreamExt;
use imageindex_crds::attempts;
use imageindex_crds::labels::{self, Component};
use imageindex_crds::transitions::StatusDraft;
use imageindex_crds::validate::{self, Mode, ValidSpec};
use imageindex_crds::ImageIndex;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, warn};

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

/// Reconciles one ImageIndex: fetch → validate → observe → decide → apply → write status.
pub async fn reconcile(obj: Arc<ImageIndex>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started();
    let Some(ii) = fetch(&ctx, &obj).await? else {
        // Deleted, or being deleted: garbage collection removes what it owns.
        return Ok(Action::await_change());
    };
    let name = ii.name_any();
    let ns = ii.namespace().ok_or_else(|| Error::MissingField {
        instance: name.clone(),
        field: "metadata.namespace",
    })?;
    let owner = ii
        .controller_owner_ref(&())
        .ok_or_else(|| Error::MissingField {
            instance: name.clone(),
            field: "metadata.uid",
        })?;
    let before = ii.status.clone().unwrap_or_default();
    let mut draft = StatusDraft::new(
        before.clone(),
        ii.metadata.generation,
        Time(Timestamp::now()),
    );
    let decided = match validate_spec(&ii) {
        Err(message) => {
            // Nothing is started until the spec is fixed; a running build is left alone and
            // watched again once it is.
            draft.invalid_spec(&message);
            Ok(Action::requeue(REQUEUE_IDLE))
        }
        Ok(valid) => {
            draft.spec_valid();
            let inst = Instance {
                name: &name,
                namespace: &ns,
                owner,
                spec: &ii.spec,
                valid: &valid,
                settings: &ctx.settings,
            };
            drive(&ctx, &inst, &mut draft).await
        }
    };
    count_ended_attempts(&ctx, &ii, &before, &draft);
    // Write what was decided even when a later step failed (an ended attempt stays ended).
    let written = status::write(&ctx, &ii, &before, &mut draft).await;
    status::publish_events(&ctx, &ii, &mut draft).await;
    written?;
    decided
}

/// Observe, decide, apply: the part of a reconcile that needs a valid spec.
async fn drive(
    ctx: &Context,
    inst: &Instance<'_>,
    draft: &mut StatusDraft,
) -> Result<Action, Error> {
    let observed = observe::observe(ctx, inst, &draft.status).await?;
    let plan = decide::decide(inst, draft, &observed);
    apply::apply(ctx, inst.namespace, draft, plan).await
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

/// Fetch: the ImageIndex as the API server has it now (the cache may not hold our last status
/// write yet); `None` when it is gone or being deleted.
async fn fetch(ctx: &Context, obj: &ImageIndex) -> Result<Option<ImageIndex>, Error> {
    let name = obj.name_any();
    let ns = obj.namespace().ok_or_else(|| Error::MissingField {
        instance: name.clone(),
        field: "metadata.namespace",
    })?;
    let api: Api<ImageIndex> = Api::namespaced(ctx.client.clone(), &ns);
    let ii = api.get_opt(&name).await.map_err(|source| Error::Fetch {
        instance: name.clone(),
        source,
    })?;
    Ok(ii.filter(|ii| ii.metadata.deletion_timestamp.is_none()))
}

/// Validate: the name and the spec, or the message naming every invalid field.
fn validate_spec(ii: &ImageIndex) -> Result<ValidSpec, String> {
    let sharded = !matches!(
        ii.spec.shards,
        None | Some(imageindex_crds::shards::ShardCount::Count(1))
    );
    match (
        resources::check_name_for(&ii.name_any(), sharded),
        validate::validate(&ii.spec, Mode::Cluster),
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

/// Counts the attempts this reconcile ended by outcome (the whole's and each shard's) and
/// drops their memory samples.
fn count_ended_attempts(
    ctx: &Context,
    ii: &ImageIndex,
    before: &imageindex_crds::ImageIndexStatus,
    draft: &StatusDraft,
) {
    let uid = ii.uid().unwrap_or_default();
    let no_attempts = Vec::new();
    let shard_before = |shard: u32| {
        before
            .shards
            .iter()
            .find(|s| s.shard == shard)
            .map_or(&no_attempts, |s| &s.unit.attempts)
    };
    let units = std::iter::once((None, &before.unit.attempts, &draft.status.unit.attempts)).chain(
        draft
            .status
            .shards
            .iter()
            .map(|s| (Some(s.shard), shard_before(s.shard), &s.unit.attempts)),
    );
    for (shard, was, now) in units {
        for (number, outcome) in attempts::ended_since(was, now) {
            ctx.metrics
                .attempts
                .with_label_values(&[outcome.as_str()])
                .inc();
            ctx.history.forget(&observe::build_key(&uid, shard, number));
        }
    }
}
