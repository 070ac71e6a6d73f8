//! The operator's own Prometheus metrics (`imageindex_operator_*`).

use crate::error::Error;
use imageindex_crds::metrics as names;
use imageindex_crds::types::AttemptOutcome;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};
use std::time::Instant;

/// Every attempt outcome, in the order of [`AttemptOutcome`].
const OUTCOMES: [AttemptOutcome; 6] = [
    AttemptOutcome::Succeeded,
    AttemptOutcome::OomKilled,
    AttemptOutcome::MemoryPressureRestart,
    AttemptOutcome::Failed,
    AttemptOutcome::Killed,
    AttemptOutcome::Interrupted,
];

/// Counters and timings of the controller.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// `imageindex_operator_reconciles_total`.
    pub reconciles: IntCounter,
    /// `imageindex_operator_reconcile_errors_total{step}`.
    pub reconcile_errors: IntCounterVec,
    /// `imageindex_operator_attempts_total{outcome}`: build attempts by how they ended.
    pub attempts: IntCounterVec,
    /// `imageindex_operator_reconcile_duration_seconds`.
    pub reconcile_duration: Histogram,
    /// `imageindex_operator_scrape_errors_total`: failed scrapes of build pods.
    pub scrape_errors: IntCounter,
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let reconciles = IntCounter::new(names::OPERATOR_RECONCILES_TOTAL, "Reconciles started.")?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                names::OPERATOR_RECONCILE_ERRORS_TOTAL,
                "Reconciles that failed, by the step that failed.",
            ),
            &["step"],
        )?;
        let attempts = IntCounterVec::new(
            Opts::new(
                names::OPERATOR_ATTEMPTS_TOTAL,
                "Build attempts that ended, by outcome.",
            ),
            &["outcome"],
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                names::OPERATOR_RECONCILE_DURATION_SECONDS,
                "Time one reconcile took.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )?;
        let scrape_errors = IntCounter::new(
            names::OPERATOR_SCRAPE_ERRORS_TOTAL,
            "Scrapes of a build pod's /metrics that failed.",
        )?;
        // Every label value starts at 0, so a dashboard or alert sees the series (and a rate
        // of 0) before the first error or the first attempt with that outcome.
        for step in Error::STEPS {
            reconcile_errors.with_label_values(&[step]);
        }
        for outcome in OUTCOMES {
            attempts.with_label_values(&[outcome.as_str()]);
        }
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(attempts.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(scrape_errors.clone()))?;
        Ok(Metrics {
            reconciles,
            reconcile_errors,
            attempts,
            reconcile_duration,
            scrape_errors,
        })
    }

    /// Counts a reconcile and returns a guard that observes its duration when dropped.
    pub fn reconcile_started(&self) -> ReconcileTimer {
        self.reconciles.inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.reconcile_duration.clone(),
        }
    }
}

/// Observes a reconcile's duration when dropped.
#[derive(Debug)]
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

/// Renders a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    let encoder = TextEncoder::new();
    if encoder.encode(&registry.gather(), &mut buf).is_err() {
        return String::new();
    }
    String::from_utf8(buf).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_and_outcome_is_exported_from_the_start() {
        let registry = Registry::new();
        let _m = Metrics::new(&registry).unwrap();
        let text = render(&registry);
        for step in Error::STEPS {
            let line = format!("imageindex_operator_reconcile_errors_total{{step=\"{step}\"}} 0");
            assert!(text.contains(&line), "{line} in {text}");
        }
        for outcome in OUTCOMES {
            // Fails to compile when AttemptOutcome gains a variant OUTCOMES lacks.
            match outcome {
                AttemptOutcome::Succeeded
                | AttemptOutcome::OomKilled
                | AttemptOutcome::MemoryPressureRestart
                | AttemptOutcome::Failed
                | AttemptOutcome::Killed
                | AttemptOutcome::Interrupted => {}
            }
            let line = format!(
                "imageindex_operator_attempts_total{{outcome=\"{}\"}} 0",
                outcome.as_str()
            );
            assert!(text.contains(&line), "{line} in {text}");
        }
    }

    #[test]
    fn names_follow_the_prefix_and_render() {
        let registry = Registry::new();
        let m = Metrics::new(&registry).unwrap();
        drop(m.reconcile_started());
        m.reconcile_errors
            .with_label_values(&["apply_build_pod"])
            .inc();
        m.attempts.with_label_values(&["OOMKilled"]).inc();
        let text = render(&registry);
        assert!(
            text.contains("imageindex_operator_reconciles_total 1"),
            "{text}"
        );
        assert!(
            text.contains("imageindex_operator_reconcile_errors_total{step=\"apply_build_pod\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("imageindex_operator_attempts_total{outcome=\"OOMKilled\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("imageindex_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
        // Registering twice fails instead of silently double-counting.
        assert!(Metrics::new(&registry).is_err());
        // Our own scrape parser reads what we render.
        assert!(crate::scrape::parse(&text).is_ok());
    }
}
