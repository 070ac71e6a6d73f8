//! `indexer serve`: the HTTP query service over a published index.
//!
//! - [`search`]: `POST /v1/search` — upload a photo, get the catalogue images it shows.
//! - [`catalogue`]: `GET /v1/images/{id}`, `GET /v1/index`.
//! - [`rebuild`]: `POST /v1/index/rebuild` — a background build, then a hot swap.
//! - [`shard`]: `POST /v1/shard/search` — a router's query (features, not an image) to one
//!   shard of a sharded index (see [`crate::route`]).
//! - [`health`]: `/healthz`, `/readyz`, `/metrics`; [`openapi`]: `/openapi.json`, `/docs`.
//! - [`state`] holds the served generation (swapped without dropping requests), [`watch`]
//!   follows the directory's `current` pointer, [`limits`] and [`admission`] bound memory
//!   and concurrency, [`auth`] checks bearer tokens, [`errors`] maps failures to statuses.

pub mod admission;
pub mod api;
pub mod auth;
pub mod body;
pub mod catalogue;
pub mod errors;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod rebuild;
pub mod search;
pub mod shard;
pub mod state;
pub mod watch;

use crate::layout::IndexDir;
use crate::memory::MemorySource;
use admission::Admission;
use auth::{AuthFileError, Requirement, Role, Tokens};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use errors::ApiError;
use limits::ServeLimits;
use metrics::ServeMetrics;
use rebuild::Rebuilds;
use state::ServedIndex;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use utoipa::OpenApi;

/// How to run the service (the flags of `indexer serve`).
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The index directory (its `current` generation is served).
    pub index_dir: PathBuf,
    /// Address to listen on.
    pub addr: SocketAddr,
    /// Dataset to rebuild from (`POST /v1/index/rebuild` needs it).
    pub dataset: Option<PathBuf>,
    /// Memory limit (default: the cgroup's, else the machine's).
    pub memory_limit: Option<u64>,
    /// Bearer tokens with roles; without it every route is open.
    pub auth_file: Option<PathBuf>,
    /// Keep following `current` (query pods: pick up what build pods publish).
    pub watch: bool,
    /// How often `current` is checked.
    pub watch_interval: Duration,
    /// Largest request body in bytes.
    pub max_body: u64,
    /// Decode + extract slots (default: the number of cores, fewer when memory is short).
    pub slots: Option<usize>,
    /// Requests allowed to wait for a slot (default [`limits::DEFAULT_QUEUE`]).
    pub queue: Option<usize>,
    /// Extraction threads of a rebuild (default: cores − 1, at least 1).
    pub rebuild_threads: Option<usize>,
}

/// Why the service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The auth file is unusable.
    #[error(transparent)]
    Auth(#[from] AuthFileError),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The async runtime or the server failed.
    #[error("server: {0}")]
    Server(std::io::Error),
    /// A metric could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Everything the handlers share.
pub struct App {
    /// The generation being served.
    pub index: ServedIndex,
    /// The memory plan.
    pub limits: ServeLimits,
    /// Queue, upload budget and slots.
    pub admission: Admission,
    /// Metrics.
    pub metrics: ServeMetrics,
    /// Background rebuilds.
    pub rebuilds: Rebuilds,
}

impl App {
    /// Records that a new generation is being served.
    pub fn note_swap(&self) {
        self.metrics.swaps.inc();
        self.metrics
            .generation
            .set(self.index.generation().map_or(0, |g| g as i64));
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Builds the shared state for `opts` (no I/O beyond reading the memory limit).
pub fn app(opts: &ServeOptions) -> Result<Arc<App>, ServeError> {
    let memory = Arc::new(MemorySource::detect(opts.memory_limit));
    let limits = ServeLimits::plan(
        memory.limit(),
        cores(),
        opts.slots,
        opts.queue,
        opts.max_body,
    );
    let threads = opts
        .rebuild_threads
        .unwrap_or_else(|| cores().saturating_sub(1))
        .max(1);
    Ok(Arc::new(App {
        index: ServedIndex::new(IndexDir::new(&opts.index_dir)),
        admission: Admission::new(&limits),
        metrics: ServeMetrics::new(memory)?,
        rebuilds: Rebuilds::new(opts.dataset.clone(), threads, limits.rebuild_budget),
        limits,
    }))
}

/// The routes: open operations routes, read routes and admin routes.
pub fn router(app: Arc<App>, tokens: Option<Arc<Tokens>>) -> Router {
    let need = |role| Requirement {
        tokens: tokens.clone(),
        role,
        drain_cap: app.limits.max_body,
    };
    let read = Router::new()
        .route("/v1/search", post(search::search))
        .route("/v1/shard/search", post(shard::search))
        .route("/v1/images/{id}", get(catalogue::image))
        .route("/v1/index", get(catalogue::index))
        .route("/v1/index/rebuild/{id}", get(rebuild::status))
        .route_layer(axum::middleware::from_fn_with_state(
            need(Role::Read),
            auth::require,
        ));
    let admin = Router::new()
        .route("/v1/index/rebuild", post(rebuild::start))
        .route_layer(axum::middleware::from_fn_with_state(
            need(Role::Admin),
            auth::require,
        ));
    let open = Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .merge(
            utoipa_swagger_ui::SwaggerUi::new("/docs")
                .url("/openapi.json", openapi::ApiDoc::openapi()),
        );
    let max_body = usize::try_from(app.limits.max_body).unwrap_or(usize::MAX);
    open.merge(read)
        .merge(admin)
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn_with_state(
            app.metrics.clone(),
            metrics::track,
        ))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(app)
}

/// Runs the service until SIGTERM or SIGINT (blocking; starts its own runtime).
pub fn run(opts: ServeOptions) -> Result<(), ServeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores().max(2))
        .thread_name("serve")
        .enable_all()
        .build()
        .map_err(ServeError::Server)?;
    runtime.block_on(serve(opts))
}

/// Runs the service on the current runtime until SIGTERM or SIGINT.
pub async fn serve(opts: ServeOptions) -> Result<(), ServeError> {
    let tokens = match &opts.auth_file {
        Some(path) => Some(Arc::new(Tokens::load(path)?)),
        None => None,
    };
    let app = app(&opts)?;
    let l = &app.limits;
    tracing::info!(
        limit_mib = l.limit >> 20,
        slots = l.slots,
        slot_mib = l.slot_bytes >> 20,
        body_buffer_mib = l.body_buffer >> 20,
        queue = l.queue,
        max_body = l.max_body,
        rebuild_budget_mib = l.rebuild_budget >> 20,
        auth = tokens.as_ref().map_or(0, |t| t.len()),
        "memory plan"
    );
    let listener = tokio::net::TcpListener::bind(opts.addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: opts.addr,
            source,
        })?;
    let bound = listener.local_addr().map_err(ServeError::Server)?;
    let watcher = tokio::spawn(watch::run(app.clone(), opts.watch_interval, opts.watch));
    tracing::info!(%bound, dir = %opts.index_dir.display(), watch = opts.watch, "serving on http://{bound}");
    let result = axum::serve(listener, router(app.clone(), tokens))
        .with_graceful_shutdown(shutdown_signal())
        .await;
    watcher.abort();
    app.rebuilds.cancel_running();
    tracing::info!("stopped");
    result.map_err(ServeError::Server)
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested: finishing in-flight requests");
}
