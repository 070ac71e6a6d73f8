//! What the runtimes observe of a build, as plain data: one scrape of its metrics, and how an
//! attempt ended. The Kubernetes controller reads these from pods (`operator::pods`), local
//! mode from processes and their cgroups (`operator::local::process`); the decisions in this
//! crate take them as they are.

/// One scrape of a build's Prometheus `/metrics` (absent where the build does not export a
/// series). The names are the contract of DESIGN.md ("Metrics the indexer exposes").
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScrapedMetrics {
    /// `imageindex_memory_rss_bytes`.
    pub rss: Option<u64>,
    /// `imageindex_memory_peak_rss_bytes`.
    pub peak_rss: Option<u64>,
    /// `imageindex_memory_working_set_bytes`.
    pub working_set: Option<u64>,
    /// `imageindex_memory_available_bytes`.
    pub available: Option<u64>,
    /// `imageindex_memory_limit_bytes`.
    pub limit: Option<u64>,
    /// `imageindex_images_total`.
    pub images_total: Option<u64>,
    /// `imageindex_images_processed_total`.
    pub images_processed: Option<u64>,
    /// `imageindex_images_failed_total`.
    pub images_failed: Option<u64>,
    /// `imageindex_descriptors_total`.
    pub descriptors: Option<u64>,
    /// The `phase` label of the `imageindex_build_phase` series whose value is 1.
    pub phase: Option<String>,
    /// The `preset` label of `imageindex_build_info`.
    pub preset: Option<String>,
}

impl ScrapedMetrics {
    /// The working set, or the RSS when the build runs outside a cgroup.
    pub fn working_set_or_rss(&self) -> Option<u64> {
        self.working_set.or(self.rss)
    }

    /// The working set (0 when unknown) and the limit the build reports, else `fallback_limit`
    /// (the spec's): what pressure is classified over.
    pub fn working_set_and_limit(&self, fallback_limit: u64) -> (u64, u64) {
        let limit = self.limit.filter(|l| *l > 0).unwrap_or(fallback_limit);
        (self.working_set_or_rss().unwrap_or(0), limit)
    }
}

/// Why the operator stopped a build itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Sustained critical memory pressure (see [`crate::pressure`]).
    Pressure,
    /// The operator itself was asked to stop (local mode: Ctrl-C, SIGTERM).
    Interrupt,
}

/// How a build attempt ended, as its runtime saw it: a pod's container status, or a process's
/// exit with its cgroup's counters. [`crate::outcome::classify`] turns it into an
/// [`AttemptOutcome`](crate::types::AttemptOutcome), together with the attempt's last memory
/// sample, which status keeps (`status.memory`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttemptEnd {
    /// The exit code as a shell or the kubelet reports it (128 + the signal when a signal
    /// killed it), if known.
    pub exit_code: Option<i32>,
    /// The kernel or the kubelet reported an OOM kill: the container's `OOMKilled` reason (in
    /// `state` or `lastState`), or the `oom_kill` counter of the attempt's cgroup.
    pub oom_kill_reported: bool,
    /// The operator had asked the build to stop, and why.
    pub stopped: Option<Stop>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_stands_in_for_the_working_set_and_the_spec_for_the_limit() {
        let m = ScrapedMetrics {
            rss: Some(100),
            ..ScrapedMetrics::default()
        };
        assert_eq!(m.working_set_or_rss(), Some(100));
        assert_eq!(m.working_set_and_limit(512), (100, 512));
        let m = ScrapedMetrics {
            rss: Some(100),
            working_set: Some(80),
            limit: Some(0),
            ..ScrapedMetrics::default()
        };
        assert_eq!(m.working_set_and_limit(512), (80, 512));
        let m = ScrapedMetrics {
            limit: Some(256),
            ..ScrapedMetrics::default()
        };
        assert_eq!(m.working_set_and_limit(512), (0, 256));
    }
}
