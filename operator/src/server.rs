//! The operator's HTTP endpoints: `/metrics`, `/healthz` and `/readyz`.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::Registry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What the endpoints read.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// The metrics to render.
    pub registry: Registry,
    /// Set once the controller runs (the API server answered and the CRD is installed).
    pub ready: Arc<AtomicBool>,
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&h.registry),
    )
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(h): State<Health>) -> (StatusCode, &'static str) {
    if h.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

/// The router of the operator's HTTP endpoints.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get_text(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    #[tokio::test]
    async fn endpoints_answer() {
        let health = Health::default();
        let m = crate::metrics::Metrics::new(&health.registry).unwrap();
        m.reconciles.inc();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(health.clone());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        assert_eq!(get_text(addr, "/healthz").await, (200, "ok".into()));
        assert_eq!(get_text(addr, "/readyz").await.0, 503);
        health.ready.store(true, Ordering::Relaxed);
        assert_eq!(get_text(addr, "/readyz").await.0, 200);
        let (code, text) = get_text(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(
            text.contains("imageindex_operator_reconciles_total 1"),
            "{text}"
        );
        server.abort();
    }
}
