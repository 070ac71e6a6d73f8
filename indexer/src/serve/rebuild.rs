//! `POST /v1/index/rebuild`: a background build of `--dataset` into the served index
//! directory, under the memory the query side leaves (see `serve::limits`), on its own
//! threads. The service keeps answering from the current generation and swaps to the new
//! one when it is published. One rebuild at a time: a second request gets 409.

use super::api::{RebuildProgressOut, RebuildRequest, RebuildStatus};
use super::catalogue::rfc3339;
use super::errors::ApiError;
use super::App;
use crate::build::{self, BuildContext, BuildOptions, PresetRequest};
use crate::memory::MemorySource;
use crate::progress::BuildProgress;
use crate::IndexError;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Finished rebuilds remembered for polling.
const KEPT: usize = 16;

#[derive(Clone)]
struct Job {
    status: RebuildStatus,
    progress: Arc<BuildProgress>,
}

/// The service's rebuilds: at most one running, the last few remembered.
pub struct Rebuilds {
    dataset: Option<PathBuf>,
    threads: usize,
    budget: u64,
    jobs: Mutex<BTreeMap<u64, Job>>,
}

impl Rebuilds {
    /// Rebuilds of `dataset` (none without one) with `threads` extraction threads under
    /// `budget` bytes.
    pub fn new(dataset: Option<PathBuf>, threads: usize, budget: u64) -> Rebuilds {
        Rebuilds {
            dataset,
            threads: threads.max(1),
            budget,
            jobs: Mutex::new(BTreeMap::new()),
        }
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Job>> {
        match self.jobs.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The status of a rebuild, with its live progress.
    pub fn status(&self, id: u64) -> Option<RebuildStatus> {
        self.jobs()
            .get(&id)
            .map(|j| with_progress(&j.status, &j.progress))
    }

    /// The running rebuild's id, if any.
    pub fn running(&self) -> Option<u64> {
        self.jobs()
            .values()
            .find(|j| j.status.state == "running")
            .map(|j| j.status.id)
    }

    /// Asks a running rebuild to stop at its next checkpoint (shutdown).
    pub fn cancel_running(&self) {
        for j in self.jobs().values() {
            if j.status.state == "running" {
                j.progress.cancel();
            }
        }
    }

    fn finish(&self, id: u64, result: Result<u64, String>) {
        let mut jobs = self.jobs();
        if let Some(j) = jobs.get_mut(&id) {
            j.status.finished_at = Some(rfc3339(SystemTime::now()));
            match result {
                Ok(generation) => {
                    j.status.state = "succeeded".into();
                    j.status.generation = Some(generation);
                }
                Err(e) => {
                    j.status.state = "failed".into();
                    j.status.error = Some(e);
                }
            }
        }
        while jobs.len() > KEPT {
            let Some(oldest) = jobs.keys().next().copied() else {
                break;
            };
            jobs.remove(&oldest);
        }
    }
}

fn with_progress(status: &RebuildStatus, progress: &BuildProgress) -> RebuildStatus {
    let s = progress.snapshot();
    let mut out = status.clone();
    out.progress = RebuildProgressOut {
        phase: s.phase.as_str().to_string(),
        images_total: s.images_total,
        images_processed: s.images_processed,
        images_failed: s.images_failed,
        descriptors: s.descriptors,
    };
    out
}

/// Start a rebuild of the dataset; poll the returned location.
#[utoipa::path(
    post,
    path = "/v1/index/rebuild",
    tag = "index",
    request_body(content = Option<RebuildRequest>, description = "Optional: the preset (default: the served index's, else auto)", content_type = "application/json"),
    responses(
        (status = 202, description = "Started; poll the Location header", body = RebuildStatus,
            headers(("Location" = String, description = "/v1/index/rebuild/{id}"))),
        (status = 400, description = "Bad preset or body", body = super::errors::ErrorBody),
        (status = 401, description = "No valid token", body = super::errors::ErrorBody),
        (status = 403, description = "The token is not an admin token", body = super::errors::ErrorBody),
        (status = 409, description = "A rebuild (or another build) is running, or the service has no --dataset", body = super::errors::ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn start(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, ApiError> {
    let req: RebuildRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RebuildRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(
                "bad_body",
                format!("the body is not a rebuild request: {e}"),
            )
        })?
    };
    let status = begin(&app, &req)?;
    let location = format!("/v1/index/rebuild/{}", status.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(status),
    )
        .into_response())
}

/// A rebuild's state and progress.
#[utoipa::path(
    get,
    path = "/v1/index/rebuild/{id}",
    tag = "index",
    params(("id" = u64, Path, description = "Rebuild id from the Location header")),
    responses(
        (status = 200, description = "State and progress", body = RebuildStatus),
        (status = 404, description = "No such rebuild", body = super::errors::ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn status(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<RebuildStatus>, ApiError> {
    let id: u64 = id.parse().map_err(|_| {
        ApiError::bad_request(
            "bad_parameter",
            format!("rebuild id {id:?} is not a number"),
        )
    })?;
    app.rebuilds
        .status(id)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no rebuild {id}")))
}

fn begin(app: &Arc<App>, req: &RebuildRequest) -> Result<RebuildStatus, ApiError> {
    let rebuilds = &app.rebuilds;
    let Some(dataset) = rebuilds.dataset.clone() else {
        return Err(ApiError::Conflict {
            code: "no_dataset",
            message: "this service was started without --dataset, so it cannot rebuild; \
                      restart it with --dataset DIR or build with `indexer build`"
                .into(),
        });
    };
    let label = match &req.preset {
        Some(p) => p.clone(),
        None => app
            .index
            .get()
            .map_or_else(|| "auto".to_string(), |l| l.index.meta.preset.label()),
    };
    let preset = PresetRequest::parse(&label).ok_or_else(|| {
        ApiError::bad_request(
            "bad_preset",
            format!("unknown preset {label:?} (auto, full, small, medium, large, xlarge)"),
        )
    })?;
    let mut jobs = rebuilds.jobs();
    if let Some(j) = jobs.values().find(|j| j.status.state == "running") {
        return Err(ApiError::Conflict {
            code: "rebuild_running",
            message: format!(
                "rebuild {} is running; poll /v1/index/rebuild/{}",
                j.status.id, j.status.id
            ),
        });
    }
    // Another process (a build pod, `indexer build`) may hold the directory's build lock.
    match app.index.dir().lock() {
        Ok(lock) => drop(lock),
        Err(IndexError::Locked(_)) => {
            return Err(ApiError::Conflict {
                code: "build_running",
                message: "another build is running on this index directory".into(),
            })
        }
        Err(e) => return Err(ApiError::Internal(format!("index directory: {e}"))),
    }
    let id = jobs.keys().next_back().map_or(1, |n| n + 1);
    let progress = BuildProgress::new();
    let status = RebuildStatus {
        id,
        state: "running".into(),
        preset: label.clone(),
        started_at: rfc3339(SystemTime::now()),
        finished_at: None,
        generation: None,
        error: None,
        progress: RebuildProgressOut {
            phase: "scan".into(),
            images_total: 0,
            images_processed: 0,
            images_failed: 0,
            descriptors: 0,
        },
    };
    let opts = BuildOptions {
        dataset,
        out: app.index.dir().root().to_path_buf(),
        preset,
        threads: rebuilds.threads,
        strict_memory: false,
        sample: 512,
        list_part_bytes: None,
        // A shard's service rebuilds its own shard.
        shard: app.index.get().and_then(|l| l.index.meta.shard),
    };
    let ctx = BuildContext {
        progress: progress.clone(),
        memory: Arc::new(MemorySource::detect(Some(rebuilds.budget))),
    };
    let worker = app.clone();
    std::thread::Builder::new()
        .name(format!("rebuild-{id}"))
        .spawn(move || run(worker, id, opts, ctx))
        .map_err(|e| ApiError::Internal(format!("cannot start the rebuild thread: {e}")))?;
    tracing::info!(id, preset = %label, "rebuild started");
    jobs.insert(
        id,
        Job {
            status: status.clone(),
            progress,
        },
    );
    Ok(status)
}

fn run(app: Arc<App>, id: u64, opts: BuildOptions, ctx: BuildContext) {
    // Its own rayon pool: the build's parallel steps must not queue the queries' lookups.
    let result = match rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .thread_name(move |i| format!("rebuild-{id}-{i}"))
        .build()
    {
        Ok(pool) => pool.install(|| build::run(&opts, &ctx)),
        Err(e) => Err(IndexError::Usage(format!("rebuild thread pool: {e}"))),
    };
    let outcome = match result {
        Ok(summary) => {
            tracing::info!(id, generation = summary.generation, "rebuild published");
            match app.index.refresh() {
                Ok(_) => {
                    app.note_swap();
                    Ok(summary.generation)
                }
                Err(e) => Err(format!(
                    "published generation {} but cannot load it: {e}",
                    summary.generation
                )),
            }
        }
        Err(e) => {
            tracing::error!(id, error = %e, "rebuild failed");
            Err(e.to_string())
        }
    };
    app.metrics
        .rebuilds
        .with_label_values(&[if outcome.is_ok() {
            "succeeded"
        } else {
            "failed"
        }])
        .inc();
    app.rebuilds.finish(id, outcome);
}
