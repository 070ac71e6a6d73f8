//! The Prometheus metric names of DESIGN.md, in one place: the indexer's build and the query
//! service export them, the operator scrapes the build's and exports its own, and the
//! Grafana dashboard queries them (the chart's test checks every query against [`ALL`]).
//! Names are a contract: renaming one breaks dashboards and running operators.

/// Resident set size of the process.
pub const MEMORY_RSS_BYTES: &str = "imageindex_memory_rss_bytes";
/// Peak resident set size of the process (VmHWM).
pub const MEMORY_PEAK_RSS_BYTES: &str = "imageindex_memory_peak_rss_bytes";
/// cgroup usage minus inactive file cache: what the OOM killer and the kubelet count.
pub const MEMORY_WORKING_SET_BYTES: &str = "imageindex_memory_working_set_bytes";
/// Memory limit minus working set (inside a cgroup), else the system's available memory.
pub const MEMORY_AVAILABLE_BYTES: &str = "imageindex_memory_available_bytes";
/// The effective memory limit (cgroup or flag).
pub const MEMORY_LIMIT_BYTES: &str = "imageindex_memory_limit_bytes";
/// Image files in the dataset.
pub const IMAGES_TOTAL: &str = "imageindex_images_total";
/// Images extracted or skipped so far.
pub const IMAGES_PROCESSED_TOTAL: &str = "imageindex_images_processed_total";
/// Images skipped (corrupt, not an image, too large, unreadable).
pub const IMAGES_FAILED_TOTAL: &str = "imageindex_images_failed_total";
/// Descriptors stored.
pub const DESCRIPTORS_TOTAL: &str = "imageindex_descriptors_total";
/// 1 for the build's current phase (label [`PHASE_LABEL`]: scan, extract, index, publish, done).
pub const BUILD_PHASE: &str = "imageindex_build_phase";
/// 1 for the index phase's current step (label [`STEP_LABEL`]: train, partition, lists, global).
pub const BUILD_STEP: &str = "imageindex_build_step";
/// Units (descriptors or images) done in the index phase's current step.
pub const BUILD_STEP_DONE: &str = "imageindex_build_step_done";
/// Units (descriptors or images) in the index phase's current step.
pub const BUILD_STEP_TOTAL: &str = "imageindex_build_step_total";
/// The build's parameters as labels (preset, nfeatures, n_trees, search_k, version), value 1.
pub const BUILD_INFO: &str = "imageindex_build_info";
/// The label of [`BUILD_PHASE`] naming the phase.
pub const PHASE_LABEL: &str = "phase";
/// The label of [`BUILD_STEP`] naming the step.
pub const STEP_LABEL: &str = "step";
/// The label of [`BUILD_INFO`] naming the preset.
pub const PRESET_LABEL: &str = "preset";

/// Query service: HTTP request latency by route and method (a histogram).
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "imageindex_http_request_duration_seconds";
/// Query service: HTTP requests by route, method and status.
pub const HTTP_REQUESTS_TOTAL: &str = "imageindex_http_requests_total";
/// Query service: time per query stage (a histogram by `stage`).
pub const QUERY_STAGE_SECONDS: &str = "imageindex_query_stage_seconds";
/// Query service: the index generation answering queries (0 = none).
pub const INDEX_GENERATION: &str = "imageindex_index_generation";
/// Query service: decode + extract slots in use.
pub const QUERY_SLOTS_BUSY: &str = "imageindex_query_slots_busy";
/// Query service: search requests waiting for a slot.
pub const QUERY_QUEUE_WAITING: &str = "imageindex_query_queue_waiting";
/// Query service: index generations swapped in.
pub const INDEX_SWAPS_TOTAL: &str = "imageindex_index_swaps_total";
/// Query service: rebuilds by outcome.
pub const REBUILDS_TOTAL: &str = "imageindex_rebuilds_total";

/// Operator: reconciles run.
pub const OPERATOR_RECONCILES_TOTAL: &str = "imageindex_operator_reconciles_total";
/// Operator: reconciles failed, by step.
pub const OPERATOR_RECONCILE_ERRORS_TOTAL: &str = "imageindex_operator_reconcile_errors_total";
/// Operator: build attempts by how they ended.
pub const OPERATOR_ATTEMPTS_TOTAL: &str = "imageindex_operator_attempts_total";
/// Operator: reconcile duration (a histogram).
pub const OPERATOR_RECONCILE_DURATION_SECONDS: &str =
    "imageindex_operator_reconcile_duration_seconds";
/// Operator: failed scrapes of build pods.
pub const OPERATOR_SCRAPE_ERRORS_TOTAL: &str = "imageindex_operator_scrape_errors_total";

/// Every metric name above.
pub const ALL: [&str; 27] = [
    MEMORY_RSS_BYTES,
    MEMORY_PEAK_RSS_BYTES,
    MEMORY_WORKING_SET_BYTES,
    MEMORY_AVAILABLE_BYTES,
    MEMORY_LIMIT_BYTES,
    IMAGES_TOTAL,
    IMAGES_PROCESSED_TOTAL,
    IMAGES_FAILED_TOTAL,
    DESCRIPTORS_TOTAL,
    BUILD_PHASE,
    BUILD_STEP,
    BUILD_STEP_DONE,
    BUILD_STEP_TOTAL,
    BUILD_INFO,
    HTTP_REQUEST_DURATION_SECONDS,
    HTTP_REQUESTS_TOTAL,
    QUERY_STAGE_SECONDS,
    INDEX_GENERATION,
    QUERY_SLOTS_BUSY,
    QUERY_QUEUE_WAITING,
    INDEX_SWAPS_TOTAL,
    REBUILDS_TOTAL,
    OPERATOR_RECONCILES_TOTAL,
    OPERATOR_RECONCILE_ERRORS_TOTAL,
    OPERATOR_ATTEMPTS_TOTAL,
    OPERATOR_RECONCILE_DURATION_SECONDS,
    OPERATOR_SCRAPE_ERRORS_TOTAL,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_prometheus_names_under_imageindex() {
        let mut seen = std::collections::BTreeSet::new();
        for name in ALL {
            assert!(name.starts_with("imageindex_"), "{name}");
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}"
            );
            assert!(seen.insert(name), "{name} twice");
        }
    }
}
