//! The query service's Prometheus metrics: request latency by route, requests by route and
//! status, the generation served, query stage times, slots and queue, and the memory gauges
//! of DESIGN.md (refreshed on every scrape).

use crate::memory::MemorySource;
use crate::metrics::MemoryMetrics;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use imageindex_crds::metrics as names;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use std::sync::Arc;
use std::time::Instant;

/// Latency buckets in seconds (5 ms … 20 s).
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
];

/// Every metric of the query service.
#[derive(Clone)]
pub struct ServeMetrics {
    registry: Registry,
    memory: MemoryMetrics,
    source: Arc<MemorySource>,
    latency: HistogramVec,
    requests: IntCounterVec,
    stages: HistogramVec,
    /// `imageindex_index_generation`: the generation answering queries (0 = none).
    pub generation: IntGauge,
    /// Decode slots in use.
    pub slots_busy: IntGauge,
    /// Requests waiting for a slot.
    pub queue_waiting: IntGauge,
    /// Generations swapped in.
    pub swaps: IntCounter,
    /// Rebuilds by outcome.
    pub rebuilds: IntCounterVec,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, m: T) -> T {
    let _ = registry.register(Box::new(m.clone()));
    m
}

impl ServeMetrics {
    /// The registry (for metrics a caller adds, such as the router's).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Registers every metric in a fresh registry.
    pub fn new(source: Arc<MemorySource>) -> Result<ServeMetrics, prometheus::Error> {
        let registry = Registry::new();
        let memory = MemoryMetrics::register(&registry);
        let buckets = BUCKETS.to_vec();
        Ok(ServeMetrics {
            latency: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        names::HTTP_REQUEST_DURATION_SECONDS,
                        "HTTP request latency by route",
                    )
                    .buckets(buckets.clone()),
                    &["route", "method"],
                )?,
            ),
            requests: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        names::HTTP_REQUESTS_TOTAL,
                        "HTTP requests by route and status code",
                    ),
                    &["route", "method", "status"],
                )?,
            ),
            stages: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        names::QUERY_STAGE_SECONDS,
                        "Time per query stage (queue, decode, extract, lookup, verify)",
                    )
                    .buckets(buckets),
                    &["stage"],
                )?,
            ),
            generation: register(
                &registry,
                IntGauge::new(
                    names::INDEX_GENERATION,
                    "Index generation answering queries (0 = none loaded)",
                )?,
            ),
            slots_busy: register(
                &registry,
                IntGauge::new(names::QUERY_SLOTS_BUSY, "Decode + extract slots in use")?,
            ),
            queue_waiting: register(
                &registry,
                IntGauge::new(
                    names::QUERY_QUEUE_WAITING,
                    "Search requests waiting for a decode slot",
                )?,
            ),
            swaps: register(
                &registry,
                IntCounter::new(names::INDEX_SWAPS_TOTAL, "Index generations swapped in")?,
            ),
            rebuilds: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(names::REBUILDS_TOTAL, "Rebuilds by outcome"),
                    &["outcome"],
                )?,
            ),
            memory,
            source,
            registry,
        })
    }

    /// Records one query's stage times (milliseconds).
    pub fn observe_stages(&self, stages: &[(&str, f64)]) {
        for (stage, ms) in stages {
            self.stages.with_label_values(&[stage]).observe(ms / 1000.0);
        }
    }

    /// Refreshes the memory gauges and renders every metric.
    pub fn render(&self) -> String {
        self.memory.observe(&self.source.snapshot());
        crate::metrics::render(&self.registry)
    }
}

/// Middleware: times every request and counts it by route and status.
pub async fn track(State(m): State<ServeMetrics>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = request.method().as_str().to_string();
    let t = Instant::now();
    let response = next.run(request).await;
    m.latency
        .with_label_values(&[&route, &method])
        .observe(t.elapsed().as_secs_f64());
    m.requests
        .with_label_values(&[&route, &method, response.status().as_str()])
        .inc();
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_the_contract_names() {
        let m = ServeMetrics::new(Arc::new(MemorySource::detect(Some(1 << 30)))).unwrap();
        m.generation.set(3);
        m.requests
            .with_label_values(&["/v1/search", "POST", "200"])
            .inc();
        m.latency
            .with_label_values(&["/v1/search", "POST"])
            .observe(0.1);
        let text = m.render();
        for name in [
            "imageindex_index_generation 3",
            "imageindex_http_requests_total{method=\"POST\",route=\"/v1/search\",status=\"200\"} 1",
            "imageindex_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/search\",le=\"0.1\"} 1",
            "imageindex_memory_rss_bytes",
            "imageindex_memory_peak_rss_bytes",
            "imageindex_memory_working_set_bytes",
            "imageindex_memory_available_bytes",
            "imageindex_memory_limit_bytes",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
