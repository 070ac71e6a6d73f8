//! Prometheus metrics with the names of DESIGN.md (a contract: the operator and the Grafana
//! dashboard read them), and a small HTTP exporter for builds.

use crate::memory::{MemorySnapshot, MemorySource};
use crate::progress::{BuildPhase, BuildProgress, IndexStep};
use imageindex_crds::metrics as names;
use imageindex_crds::preset::Preset;
use prometheus::{Encoder, IntCounter, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Memory gauges shared by builds and the query service.
#[derive(Clone)]
pub struct MemoryMetrics {
    rss: IntGauge,
    peak_rss: IntGauge,
    working_set: IntGauge,
    available: IntGauge,
    limit: IntGauge,
    peak_working_set: Arc<AtomicU64>,
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|_| unreachable_metric(name));
    let _ = registry.register(Box::new(g.clone()));
    g
}

fn unreachable_metric(name: &str) -> IntGauge {
    // Metric names are constants checked by tests; this only guards against a typo.
    IntGauge::new("imageindex_invalid_metric", name).unwrap_or_else(|_| std::process::abort())
}

impl MemoryMetrics {
    /// Registers the memory gauges.
    pub fn register(registry: &Registry) -> Self {
        MemoryMetrics {
            rss: gauge(
                registry,
                names::MEMORY_RSS_BYTES,
                "Resident set size of the process",
            ),
            peak_rss: gauge(
                registry,
                names::MEMORY_PEAK_RSS_BYTES,
                "Peak resident set size of the process (VmHWM)",
            ),
            working_set: gauge(
                registry,
                names::MEMORY_WORKING_SET_BYTES,
                "cgroup usage minus inactive file cache (what the OOM killer and kubelet count)",
            ),
            available: gauge(
                registry,
                names::MEMORY_AVAILABLE_BYTES,
                "Memory limit minus working set",
            ),
            limit: gauge(
                registry,
                names::MEMORY_LIMIT_BYTES,
                "Effective memory limit (cgroup or flag)",
            ),
            peak_working_set: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Updates the gauges from a snapshot; returns the peak working set so far.
    pub fn observe(&self, s: &MemorySnapshot) -> u64 {
        self.rss.set(s.process.rss as i64);
        self.peak_rss.set(s.process.peak_rss as i64);
        self.working_set.set(s.working_set as i64);
        self.available.set(s.available as i64);
        self.limit.set(s.limit as i64);
        self.peak_working_set
            .fetch_max(s.working_set, Ordering::Relaxed)
            .max(s.working_set)
    }

    /// Highest working set observed.
    pub fn peak_working_set(&self) -> u64 {
        self.peak_working_set.load(Ordering::Relaxed)
    }
}

/// The build's Prometheus registry and metrics (memory, progress, phase, build info), served
/// on `indexer build --metrics-addr`.
#[derive(Clone)]
pub struct BuildExporter {
    /// The registry to export.
    pub registry: Registry,
    /// Memory gauges.
    pub memory: MemoryMetrics,
    images_total: IntGauge,
    images_processed: IntCounter,
    images_failed: IntCounter,
    descriptors: IntGauge,
    phase: IntGaugeVec,
    step: IntGaugeVec,
    step_done: IntGauge,
    step_total: IntGauge,
    info: IntGaugeVec,
}

impl BuildExporter {
    /// Registers every build metric in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let memory = MemoryMetrics::register(&registry);
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).unwrap_or_else(|_| std::process::abort());
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        let vec = |name: &str, help: &str, labels: &[&str]| {
            let v = IntGaugeVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|_| std::process::abort());
            let _ = registry.register(Box::new(v.clone()));
            v
        };
        BuildExporter {
            images_total: gauge(&registry, names::IMAGES_TOTAL, "Image files in the dataset"),
            images_processed: counter(names::IMAGES_PROCESSED_TOTAL, "Images extracted or skipped"),
            images_failed: counter(
                names::IMAGES_FAILED_TOTAL,
                "Images skipped (corrupt, not an image, too large, unreadable)",
            ),
            descriptors: gauge(&registry, names::DESCRIPTORS_TOTAL, "Descriptors stored"),
            phase: vec(
                names::BUILD_PHASE,
                "1 for the build's current phase",
                &[names::PHASE_LABEL],
            ),
            step: vec(
                names::BUILD_STEP,
                "1 for the index phase's current step",
                &[names::STEP_LABEL],
            ),
            step_done: gauge(
                &registry,
                names::BUILD_STEP_DONE,
                "Units done in the index phase's current step",
            ),
            step_total: gauge(
                &registry,
                names::BUILD_STEP_TOTAL,
                "Units in the index phase's current step",
            ),
            info: vec(
                names::BUILD_INFO,
                "Build parameters",
                &[
                    names::PRESET_LABEL,
                    "nfeatures",
                    "n_trees",
                    "search_k",
                    "version",
                ],
            ),
            memory,
            registry,
        }
    }

    /// Sets `imageindex_build_info`.
    pub fn set_info(&self, preset: &Preset) {
        self.info.reset();
        self.info
            .with_label_values(&[
                preset.label().as_str(),
                preset.nfeatures.to_string().as_str(),
                preset.n_trees.to_string().as_str(),
                preset.search_k.to_string().as_str(),
                env!("CARGO_PKG_VERSION"),
            ])
            .set(1);
    }

    /// Copies progress and memory into the gauges.
    pub fn observe(&self, progress: &BuildProgress, memory: &MemorySnapshot) {
        if let Some(p) = progress.preset() {
            self.set_info(&p);
        }
        let s = progress.snapshot();
        self.images_total.set(s.images_total as i64);
        let bump = |c: &IntCounter, v: u64| {
            let cur = c.get();
            if v > cur {
                c.inc_by(v - cur);
            }
        };
        bump(&self.images_processed, s.images_processed);
        bump(&self.images_failed, s.images_failed);
        self.descriptors.set(s.descriptors as i64);
        for p in BuildPhase::ALL {
            self.phase
                .with_label_values(&[p.as_str()])
                .set(i64::from(p == s.phase));
        }
        for step in IndexStep::ALL {
            self.step
                .with_label_values(&[step.as_str()])
                .set(i64::from(step == s.step));
        }
        self.step_done.set(s.step_done as i64);
        self.step_total.set(s.step_total as i64);
        self.memory.observe(memory);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

impl Default for BuildExporter {
    fn default() -> Self {
        Self::new()
    }
}

/// Renders a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

/// Serves `/metrics` (and `/healthz`) for a build on a background thread, refreshing the
/// gauges on every scrape. Returns the bound address.
pub fn serve_build_metrics(
    addr: SocketAddr,
    metrics: BuildExporter,
    progress: Arc<BuildProgress>,
    memory: Arc<MemorySource>,
) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the metrics runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let app = axum::Router::new()
                    .route(
                        "/metrics",
                        axum::routing::get(move || {
                            let (m, p, mem) = (metrics.clone(), progress.clone(), memory.clone());
                            async move {
                                m.observe(&p, &mem.snapshot());
                                (
                                    [(
                                        axum::http::header::CONTENT_TYPE,
                                        "text/plain; version=0.0.4",
                                    )],
                                    m.render(),
                                )
                            }
                        }),
                    )
                    .route("/healthz", axum::routing::get(|| async { "ok" }));
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "metrics server stopped");
                }
            });
        })?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_metric_is_exported() {
        let m = BuildExporter::new();
        m.set_info(&imageindex_crds::PresetName::Full.preset());
        let p = BuildProgress::new();
        p.set_total(5);
        p.image_done(10, false);
        p.set_phase(BuildPhase::Extract);
        m.observe(
            &p,
            &MemorySnapshot {
                working_set: 7,
                limit: 9,
                available: 2,
                ..Default::default()
            },
        );
        let text = m.render();
        for name in [
            "imageindex_memory_rss_bytes",
            "imageindex_memory_peak_rss_bytes",
            "imageindex_memory_working_set_bytes 7",
            "imageindex_memory_available_bytes 2",
            "imageindex_memory_limit_bytes 9",
            "imageindex_images_total 5",
            "imageindex_images_processed_total 1",
            "imageindex_images_failed_total 0",
            "imageindex_descriptors_total 10",
            "imageindex_build_phase{phase=\"extract\"} 1",
            "imageindex_build_phase{phase=\"scan\"} 0",
            "imageindex_build_info{n_trees=\"20\",nfeatures=\"1000\",preset=\"full\",search_k=\"100\",version=",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn counters_follow_progress_without_going_back() {
        let m = BuildExporter::new();
        let p = BuildProgress::new();
        p.resume_at(40, 2, 0);
        m.observe(&p, &MemorySnapshot::default());
        m.observe(&p, &MemorySnapshot::default());
        assert!(m.render().contains("imageindex_images_processed_total 40"));
    }
}
