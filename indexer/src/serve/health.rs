//! `/healthz` (the process answers), `/readyz` (an index is loaded) and `/metrics`.

use super::api::{Health, Readiness};
use super::errors::RETRY_AFTER_SECS;
use super::App;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::Arc;

/// Liveness: the process serves HTTP.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "Alive", body = Health))
)]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Readiness: 200 once an index is loaded, 503 (with Retry-After) before.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "An index is loaded", body = Readiness),
        (status = 503, description = "No index loaded yet", body = Readiness),
    )
)]
pub async fn readyz(State(app): State<Arc<App>>) -> Response {
    match app.index.generation() {
        Some(g) => Json(Readiness {
            ready: true,
            generation: Some(g),
            reason: None,
        })
        .into_response(),
        None => {
            let mut r = (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(Readiness {
                    ready: false,
                    generation: None,
                    reason: Some(format!(
                        "no index published in {} yet",
                        app.index.dir().root().display()
                    )),
                }),
            )
                .into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            r
        }
    }
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"))
)]
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    let m = &app.metrics;
    m.generation
        .set(app.index.generation().map_or(0, |g| g as i64));
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
