//! `indexer route`: the query service of a sharded index. It takes the same
//! `POST /v1/search` as `indexer serve`, decodes and extracts the image once, sends the
//! features (not the image) to every shard's `POST /v1/shard/search` with a deadline per
//! shard, merges their candidates exactly as one index ranks its own, and says in the
//! answer which shards answered (`coverage`). A shard that is down or late lowers the
//! coverage; it does not fail the query.
//!
//! - [`wire`]: what router and shard send each other;
//! - [`merge`]: the pure merge of the shards' answers;
//! - [`shards`]: polling the shards, pinning their generations, the fan-out.

pub mod merge;
pub mod shards;
pub mod wire;

use crate::features::{Detector, ExtractParams};
use crate::imageguard;
use crate::memory::MemorySource;
use crate::search::ranking::leads_verified;
use crate::search::{Answer, QueryError, Timings};
use crate::serve::admission::Admission;
use crate::serve::api::{Coverage, Health, IndexInfo, Readiness};
use crate::serve::auth::{self, Requirement, Role, Tokens};
use crate::serve::errors::{ApiError, RETRY_AFTER_SECS};
use crate::serve::limits::ServeLimits;
use crate::serve::metrics::{self as serve_metrics, ServeMetrics};
use crate::serve::search::{self as serve_search, Upload};
use crate::serve::{openapi, ServeError};
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use imageindex_crds::Preset;
use merge::Merged;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use serde::{Deserialize, Serialize};
use shards::ShardSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use utoipa::{OpenApi, ToSchema};
use wire::WireFeatures;

/// How to run the router (the flags of `indexer route`).
#[derive(Clone, Debug)]
pub struct RouteOptions {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// Base URLs of the shards' query services, in shard order.
    pub shards: Vec<String>,
    /// How long to wait for each shard's answer.
    pub deadline: Duration,
    /// How often the shards' `/v1/index` is polled.
    pub poll_interval: Duration,
    /// Bearer tokens with roles; without it every route is open.
    pub auth_file: Option<PathBuf>,
    /// The token presented to the shards (default: the first of `auth_file`, if any).
    pub shard_token: Option<String>,
    /// Memory limit (default: the cgroup's, else the machine's).
    pub memory_limit: Option<u64>,
    /// Largest request body in bytes.
    pub max_body: u64,
    /// Decode + extract slots (default: the number of cores, fewer when memory is short).
    pub slots: Option<usize>,
    /// Requests allowed to wait for a slot.
    pub queue: Option<usize>,
}

/// The router's own metrics.
#[derive(Clone)]
struct RouterMetrics {
    /// `imageindex_router_shard_up{shard}`: 1 while the shard's last poll answered.
    up: IntGaugeVec,
    /// `imageindex_router_shard_replies_total{shard,outcome}`: answered, late, failed.
    replies: IntCounterVec,
}

/// Everything the router's handlers share.
pub struct RouterApp {
    /// The shards.
    pub shards: ShardSet,
    limits: ServeLimits,
    admission: Admission,
    metrics: ServeMetrics,
    router_metrics: RouterMetrics,
    deadline: Duration,
}

/// The shards' presets decide how queries are extracted: the richest one (most features,
/// then the largest working image), so that no shard gets a poorer query than it was built
/// for.
fn query_preset(infos: &[IndexInfo]) -> Option<Preset> {
    infos
        .iter()
        .filter_map(|i| {
            crate::build::PresetRequest::parse(&i.preset.name).and_then(|r| match r {
                crate::build::PresetRequest::Exact(p) => Some(p),
                crate::build::PresetRequest::Auto => None,
            })
        })
        .max_by_key(|p| (p.nfeatures, p.max_side))
}

impl RouterApp {
    /// The preset queries are extracted with, once any shard has been seen.
    pub fn query_preset(&self) -> Option<Preset> {
        let infos: Vec<IndexInfo> = self
            .shards
            .states()
            .into_iter()
            .filter_map(|s| s.info)
            .collect();
        query_preset(&infos)
    }

    fn count(&self, merged: &Merged) {
        for s in &merged.coverage.shards {
            let outcome = match (s.answered, s.reason.as_deref()) {
                (true, _) => "answered",
                (false, Some(r)) if r.contains("deadline") => "late",
                _ => "failed",
            };
            self.router_metrics
                .replies
                .with_label_values(&[&s.shard.to_string(), outcome])
                .inc();
        }
    }
}

/// Builds the router's shared state.
pub fn app(opts: &RouteOptions, token: Option<String>) -> Result<Arc<RouterApp>, ServeError> {
    let memory = Arc::new(MemorySource::detect(opts.memory_limit));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let limits = ServeLimits::plan(memory.limit(), cores, opts.slots, opts.queue, opts.max_body);
    let metrics = ServeMetrics::new(memory)?;
    let up = IntGaugeVec::new(
        Opts::new(
            "imageindex_router_shard_up",
            "1 while the shard's last poll answered",
        ),
        &["shard"],
    )?;
    let replies = IntCounterVec::new(
        Opts::new(
            "imageindex_router_shard_replies_total",
            "Shard replies to queries by outcome (answered, late, failed)",
        ),
        &["shard", "outcome"],
    )?;
    metrics.registry().register(Box::new(up.clone()))?;
    metrics.registry().register(Box::new(replies.clone()))?;
    Ok(Arc::new(RouterApp {
        shards: ShardSet::new(&opts.shards, token),
        admission: Admission::new(&limits),
        limits,
        metrics,
        router_metrics: RouterMetrics { up, replies },
        deadline: opts.deadline,
    }))
}

/// `GET /v1/index` of the router: the whole (sums over the shards that answered) and each
/// shard's own `/v1/index`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RoutedIndexInfo {
    /// Shards in all.
    pub shards_total: u32,
    /// Shards whose last poll answered.
    pub shards_up: u32,
    /// The lowest generation any shard is asked for.
    pub generation: Option<u64>,
    /// Images in the dataset (summed over the shards that answered).
    pub images_total: u64,
    /// Images indexed.
    pub images_indexed: u64,
    /// Images that could not be indexed.
    pub images_failed: u64,
    /// Descriptors indexed.
    pub descriptors: u64,
    /// Milliseconds the router waits for each shard.
    pub deadline_ms: u64,
    /// Per shard.
    pub shards: Vec<ShardInfo>,
}

/// One shard as the router sees it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ShardInfo {
    /// The shard (0-based).
    pub shard: u32,
    /// Its query service.
    pub url: String,
    /// Whether its last poll answered.
    pub up: bool,
    /// The generation queries ask it for.
    pub pinned_generation: Option<u64>,
    /// When it was last polled.
    pub checked_at: Option<String>,
    /// Why the last poll failed.
    pub error: Option<String>,
    /// Its own `/v1/index` (last known).
    pub index: Option<IndexInfo>,
}

/// The sharded index: per-shard detail and totals.
#[utoipa::path(
    get,
    path = "/v1/index",
    tag = "catalogue",
    responses((status = 200, description = "Totals and each shard", body = RoutedIndexInfo)),
    security((), ("bearer" = []))
)]
async fn index(State(app): State<Arc<RouterApp>>) -> Json<RoutedIndexInfo> {
    let states = app.shards.states();
    let sum = |f: fn(&IndexInfo) -> u64| -> u64 {
        states.iter().filter_map(|s| s.info.as_ref()).map(f).sum()
    };
    Json(RoutedIndexInfo {
        shards_total: states.len() as u32,
        shards_up: states.iter().filter(|s| s.up).count() as u32,
        generation: states.iter().filter_map(|s| s.pinned).min(),
        images_total: sum(|i| i.images_total),
        images_indexed: sum(|i| i.images_indexed),
        images_failed: sum(|i| i.images_failed),
        descriptors: sum(|i| i.descriptors),
        deadline_ms: app.deadline.as_millis() as u64,
        shards: states
            .into_iter()
            .enumerate()
            .map(|(i, s)| ShardInfo {
                shard: i as u32,
                url: s.url,
                up: s.up,
                pinned_generation: s.pinned,
                checked_at: s.checked_at,
                error: s.error,
                index: s.info,
            })
            .collect(),
    })
}

/// Readiness: 200 once any shard has answered a poll (queries can be answered, perhaps
/// with partial coverage), 503 before.
async fn readyz(State(app): State<Arc<RouterApp>>) -> Response {
    let states = app.shards.states();
    let up = states.iter().filter(|s| s.up).count();
    if up > 0 {
        Json(Readiness {
            ready: true,
            generation: states.iter().filter_map(|s| s.pinned).min(),
            reason: (up < states.len())
                .then(|| format!("{} of {} shards answer", up, states.len())),
        })
        .into_response()
    } else {
        let mut r = (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Readiness {
                ready: false,
                generation: None,
                reason: Some(format!("none of the {} shards answers yet", states.len())),
            }),
        )
            .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        r
    }
}

async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

async fn metrics(State(app): State<Arc<RouterApp>>) -> Response {
    for (i, s) in app.shards.states().iter().enumerate() {
        app.router_metrics
            .up
            .with_label_values(&[&i.to_string()])
            .set(i64::from(s.up));
    }
    let m = &app.metrics;
    m.queue_waiting.set(app.admission.waiting() as i64);
    m.slots_busy.set(app.admission.busy_slots() as i64);
    let text = tokio::task::spawn_blocking({
        let m = m.clone();
        move || m.render()
    })
    .await
    .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// One query through the shards: extraction here, lookups and verification in the shards,
/// the merge here; mirrored once more when nothing verifies (as `indexer serve` does).
fn route_query(
    app: &RouterApp,
    preset: &Preset,
    image: &[u8],
    header: &imageguard::Header,
    q: &serve_search::SearchQuery,
) -> Result<(Answer, Coverage), QueryError> {
    let handle = tokio::runtime::Handle::current();
    let mut detector = Detector::for_queries(ExtractParams::for_query(preset))
        .map_err(|e| QueryError::Image(e.into()))?;
    let (f, work, decode_ms, extract_ms) = detector.extract_keeping_work(image, header)?;
    let ask = |features: &crate::features::Features, global: bool| {
        let wire = WireFeatures::encode(features);
        let replies =
            handle.block_on(
                app.shards
                    .ask_all(&wire, q.k, q.verify, global, app.deadline),
            );
        let merged = merge::merge(&replies, q.k, global);
        app.count(&merged);
        merged
    };
    let merged = ask(&f, true);
    let mut answer = Answer {
        matches: merged.matches,
        features: f.descriptors.len(),
        adaptation: f.adaptation,
        timings: Timings {
            decode_ms,
            extract_ms,
            lookup_ms: merged.lookup_ms,
            verify_ms: merged.verify_ms,
        },
        mirrored: false,
    };
    let mut coverage = merged.coverage;
    if q.mirror && q.verify && !f.descriptors.is_empty() && !leads_verified(&answer.matches) {
        let t = Instant::now();
        let mf = detector.mirrored(&work, &f)?;
        answer.timings.extract_ms += t.elapsed().as_secs_f64() * 1000.0;
        let mirrored = ask(&mf, false);
        answer.timings.lookup_ms += mirrored.lookup_ms;
        answer.timings.verify_ms += mirrored.verify_ms;
        if leads_verified(&mirrored.matches) {
            answer.matches = mirrored.matches;
            answer.features = mf.descriptors.len();
            answer.adaptation = mf.adaptation;
            answer.mirrored = true;
            coverage = mirrored.coverage;
        }
    }
    Ok((answer, coverage))
}

/// Search the sharded catalogue with an image (the same API as an unsharded index, plus
/// `coverage` and each match's `shard`).
#[utoipa::path(
    post,
    path = "/v1/search",
    tag = "search",
    params(crate::serve::api::SearchQueryDoc),
    request_body(
        description = "The query image: a multipart form with the field `image`, or the raw image as the body",
        content(
            (crate::serve::api::SearchUpload = "multipart/form-data"),
            ("image/jpeg"),
            ("image/png"),
            ("application/octet-stream")
        )
    ),
    responses(
        (status = 200, description = "Matches in rank order with the shards' coverage", body = crate::serve::api::SearchResponse),
        (status = 400, description = "Bad parameter, missing field or empty image", body = crate::serve::errors::ErrorBody),
        (status = 413, description = "Body over --max-body", body = crate::serve::errors::ErrorBody),
        (status = 415, description = "Not an image", body = crate::serve::errors::ErrorBody),
        (status = 422, description = "Corrupt or too large", body = crate::serve::errors::ErrorBody),
        (status = 503, description = "No shard reached yet, none answered, or the queue is full (Retry-After)", body = crate::serve::errors::ErrorBody),
    ),
    security((), ("bearer" = []))
)]
async fn search(
    State(app): State<Arc<RouterApp>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    request: Request,
) -> Result<Json<crate::serve::api::SearchResponse>, ApiError> {
    let started = Instant::now();
    let (upload, preset) = serve_search::receive(
        &app.limits,
        &app.admission,
        query,
        request,
        || app.query_preset().ok_or(ApiError::NoIndex),
        |p| *p,
    )
    .await?;
    let Upload {
        q,
        image,
        header,
        slot,
        queue_ms,
    } = upload;
    let worker = app.clone();
    let worker_image = image.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let complete = imageguard::looks_complete(header.format, &worker_image);
        route_query(&worker, &preset, &worker_image, &header, &q)
            .map(|a| (a, complete))
            .map_err(|e| ApiError::from_query(e, complete))
    })
    .await;
    let ((answer, coverage), complete) =
        outcome.map_err(|e| ApiError::Internal(format!("search task: {e}")))??;
    if coverage.answered == 0 && answer.features > 0 {
        let why: Vec<String> = coverage
            .shards
            .iter()
            .map(|s| format!("shard {}: {}", s.shard, s.reason.as_deref().unwrap_or("?")))
            .collect();
        return Err(ApiError::NoShard(format!(
            "no shard answered within {} ms ({})",
            app.deadline.as_millis(),
            why.join("; ")
        )));
    }
    let generation = coverage
        .shards
        .iter()
        .filter_map(|s| s.generation)
        .min()
        .unwrap_or(0);
    let mut response = serve_search::respond(
        generation,
        &q,
        &answer,
        &header,
        image.len() as u64,
        complete,
        queue_ms,
        started,
        preset.nfeatures,
    );
    if coverage.answered < coverage.asked {
        response.warnings.push(crate::serve::api::Warning {
            code: "partial".into(),
            message: format!(
                "{} of {} shards answered: images of the others could not be found",
                coverage.answered, coverage.asked
            ),
        });
    }
    response.coverage = Some(coverage);
    let t = &answer.timings;
    app.metrics.observe_stages(&[
        ("queue", queue_ms),
        ("decode", t.decode_ms),
        ("extract", t.extract_ms),
        ("lookup", t.lookup_ms),
        ("verify", t.verify_ms),
    ]);
    Ok(Json(response))
}

/// The router's API description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "imageindex router",
        description = "Search a sharded catalogue by photo: the same search API as one index, answered by every shard. \
                       Each answer says which shards answered (`coverage`) and each match its `shard`."
    ),
    paths(search, index),
    components(schemas(
        RoutedIndexInfo,
        ShardInfo,
        crate::serve::api::SearchResponse,
        crate::serve::api::MatchOut,
        crate::serve::api::Coverage,
        crate::serve::api::ShardCoverage,
        crate::serve::api::IndexInfo,
        crate::serve::errors::ErrorBody,
    ))
)]
pub struct RouterDoc;

/// The router's routes.
pub fn router(app: Arc<RouterApp>, tokens: Option<Arc<Tokens>>) -> Router {
    let read = Router::new()
        .route("/v1/search", post(search))
        .route("/v1/index", get(index))
        .route_layer(axum::middleware::from_fn_with_state(
            Requirement {
                tokens,
                role: Role::Read,
                drain_cap: app.limits.max_body,
            },
            auth::require,
        ));
    let mut doc = RouterDoc::openapi();
    doc.merge(openapi::ApiDoc::openapi().components.map_or_else(
        utoipa::openapi::OpenApi::default,
        |c| {
            let mut o = utoipa::openapi::OpenApi::default();
            o.components = Some(c);
            o
        },
    ));
    let open = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(utoipa_swagger_ui::SwaggerUi::new("/docs").url("/openapi.json", doc));
    let max_body = usize::try_from(app.limits.max_body).unwrap_or(usize::MAX);
    open.merge(read)
        .fallback(|| async {
            ApiError::NotFound(
                "no such route on a sharded index's router (image ids are per shard: ask the shard)"
                    .into(),
            )
        })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn_with_state(
            app.metrics.clone(),
            serve_metrics::track,
        ))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(app)
}

/// Runs the router until SIGTERM or SIGINT (blocking; starts its own runtime).
pub fn run(opts: RouteOptions) -> Result<(), ServeError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores.max(2))
        .thread_name("route")
        .enable_all()
        .build()
        .map_err(ServeError::Server)?;
    runtime.block_on(serve(opts))
}

/// Runs the router on the current runtime until SIGTERM or SIGINT.
pub async fn serve(opts: RouteOptions) -> Result<(), ServeError> {
    let tokens = match &opts.auth_file {
        Some(path) => Some(Arc::new(Tokens::load(path)?)),
        None => None,
    };
    let token = opts
        .shard_token
        .clone()
        .or_else(|| tokens.as_ref().and_then(|t| t.reader().map(str::to_string)));
    let app = app(&opts, token)?;
    let listener = tokio::net::TcpListener::bind(opts.addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: opts.addr,
            source,
        })?;
    let bound = listener.local_addr().map_err(ServeError::Server)?;
    let poller = tokio::spawn({
        let app = app.clone();
        let every = opts.poll_interval;
        async move {
            loop {
                app.shards.poll(every.max(Duration::from_millis(200))).await;
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = app.shards.repoll_wanted() => {}
                }
            }
        }
    });
    tracing::info!(%bound, shards = opts.shards.len(), deadline_ms = opts.deadline.as_millis() as u64,
        "routing on http://{bound}");
    let result = axum::serve(listener, router(app, tokens))
        .with_graceful_shutdown(crate::serve::shutdown_signal())
        .await;
    poller.abort();
    tracing::info!("stopped");
    result.map_err(ServeError::Server)
}
