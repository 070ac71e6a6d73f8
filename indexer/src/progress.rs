//! One source of build progress, read by the terminal progress bar, the structured logs and
//! the Prometheus metrics alike.

use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Build phases, as in the `imageindex_build_phase{phase=...}` metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildPhase {
    /// Listing the dataset.
    Scan = 0,
    /// Decoding and ORB.
    Extract = 1,
    /// Coarse quantizer, inverted lists and arroy shards.
    Index = 2,
    /// Compacting and switching `current`.
    Publish = 3,
    /// Finished.
    Done = 4,
}

impl BuildPhase {
    /// All phases in order.
    pub const ALL: [BuildPhase; 5] = [
        BuildPhase::Scan,
        BuildPhase::Extract,
        BuildPhase::Index,
        BuildPhase::Publish,
        BuildPhase::Done,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildPhase::Scan => "scan",
            BuildPhase::Extract => "extract",
            BuildPhase::Index => "index",
            BuildPhase::Publish => "publish",
            BuildPhase::Done => "done",
        }
    }

    fn from_u8(v: u8) -> BuildPhase {
        BuildPhase::ALL
            .get(v as usize)
            .copied()
            .unwrap_or(BuildPhase::Done)
    }
}

/// Steps of the index phase, as in the `imageindex_build_step{step=...}` metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IndexStep {
    /// Not in the index phase.
    None = 0,
    /// Training the top level of the vocabulary.
    Train = 1,
    /// Sorting descriptors into cell buckets.
    Partition = 2,
    /// Training each cell's leaves and writing its inverted lists.
    Lists = 3,
    /// The arroy index over the images' layout descriptors.
    Global = 4,
}

impl IndexStep {
    /// The steps with a metric label, in order.
    pub const ALL: [IndexStep; 4] = [
        IndexStep::Train,
        IndexStep::Partition,
        IndexStep::Lists,
        IndexStep::Global,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            IndexStep::None => "none",
            IndexStep::Train => "train",
            IndexStep::Partition => "partition",
            IndexStep::Lists => "lists",
            IndexStep::Global => "global",
        }
    }

    fn from_u8(v: u8) -> IndexStep {
        match v {
            1 => IndexStep::Train,
            2 => IndexStep::Partition,
            3 => IndexStep::Lists,
            4 => IndexStep::Global,
            _ => IndexStep::None,
        }
    }
}

/// Counters of a running build, shared between threads.
#[derive(Debug, Default)]
pub struct BuildProgress {
    phase: AtomicU8,
    images_total: AtomicU64,
    images_processed: AtomicU64,
    images_failed: AtomicU64,
    descriptors: AtomicU64,
    step: AtomicU8,
    step_done: AtomicU64,
    step_total: AtomicU64,
    cancelled: AtomicBool,
    preset: std::sync::Mutex<Option<imageindex_crds::Preset>>,
}

/// A consistent-enough copy of the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ProgressSnapshot {
    /// Current phase.
    pub phase: BuildPhase,
    /// Image files in the dataset.
    pub images_total: u64,
    /// Images extracted or skipped.
    pub images_processed: u64,
    /// Images skipped.
    pub images_failed: u64,
    /// Descriptors stored.
    pub descriptors: u64,
    /// The current index step.
    pub step: IndexStep,
    /// Units done in the current index step (descriptors assigned or added).
    pub step_done: u64,
    /// Units in the current index step.
    pub step_total: u64,
}

impl BuildProgress {
    /// A fresh progress record.
    pub fn new() -> Arc<Self> {
        Arc::new(BuildProgress::default())
    }

    /// Enters a phase (leaving the index phase ends its steps).
    pub fn set_phase(&self, p: BuildPhase) {
        self.phase.store(p as u8, Ordering::Relaxed);
        if p != BuildPhase::Index {
            self.step.store(IndexStep::None as u8, Ordering::Relaxed);
        }
    }

    /// Records the preset the build runs with (for `imageindex_build_info`).
    pub fn set_preset(&self, p: imageindex_crds::Preset) {
        if let Ok(mut g) = self.preset.lock() {
            *g = Some(p);
        }
    }

    /// The preset the build runs with, once chosen.
    pub fn preset(&self) -> Option<imageindex_crds::Preset> {
        self.preset.lock().ok().and_then(|g| *g)
    }

    /// Sets the dataset size.
    pub fn set_total(&self, n: u64) {
        self.images_total.store(n, Ordering::Relaxed);
    }

    /// Sets counters when resuming from a checkpoint.
    pub fn resume_at(&self, processed: u64, failed: u64, descriptors: u64) {
        self.images_processed.store(processed, Ordering::Relaxed);
        self.images_failed.store(failed, Ordering::Relaxed);
        self.descriptors.store(descriptors, Ordering::Relaxed);
    }

    /// Records one image done (`descriptors` = 0 and `failed` for a skipped one).
    pub fn image_done(&self, descriptors: u64, failed: bool) {
        self.images_processed.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.images_failed.fetch_add(1, Ordering::Relaxed);
        }
        self.descriptors.fetch_add(descriptors, Ordering::Relaxed);
    }

    /// Overrides the descriptor count (the index phase keeps at most nfeatures per image).
    pub fn set_descriptors(&self, n: u64) {
        self.descriptors.store(n, Ordering::Relaxed);
    }

    /// Starts an index step of `total` units.
    pub fn start_step(&self, step: IndexStep, total: u64) {
        self.step.store(step as u8, Ordering::Relaxed);
        self.step_total.store(total, Ordering::Relaxed);
        self.step_done.store(0, Ordering::Relaxed);
    }

    /// Sets the units done in the current step.
    pub fn set_step_done(&self, done: u64) {
        self.step_done.store(done, Ordering::Relaxed);
    }

    /// Asks the build to stop at its next checkpoint.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Whether a stop was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Reads the counters.
    pub fn snapshot(&self) -> ProgressSnapshot {
        ProgressSnapshot {
            phase: BuildPhase::from_u8(self.phase.load(Ordering::Relaxed)),
            images_total: self.images_total.load(Ordering::Relaxed),
            images_processed: self.images_processed.load(Ordering::Relaxed),
            images_failed: self.images_failed.load(Ordering::Relaxed),
            descriptors: self.descriptors.load(Ordering::Relaxed),
            step: IndexStep::from_u8(self.step.load(Ordering::Relaxed)),
            step_done: self.step_done.load(Ordering::Relaxed),
            step_total: self.step_total.load(Ordering::Relaxed),
        }
    }
}

/// Shows progress until dropped: a progress bar on a terminal, a log line every few
/// seconds otherwise.
pub struct ProgressDisplay {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl ProgressDisplay {
    /// Starts the display thread. `memory` returns (working set, limit) for the log lines.
    pub fn start(
        progress: Arc<BuildProgress>,
        memory: impl Fn() -> (u64, u64) + Send + 'static,
    ) -> ProgressDisplay {
        use std::io::IsTerminal;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let tty = std::io::stderr().is_terminal();
        let handle = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                let bar = tty.then(|| {
                    let b = indicatif::ProgressBar::new(0);
                    b.set_style(
                        indicatif::ProgressStyle::with_template("{spinner} {prefix:>7} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})")
                            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                            .progress_chars("=> "),
                    );
                    b
                });
                let started = Instant::now();
                let mut last_log = Instant::now() - Duration::from_secs(60);
                while !stop2.load(Ordering::Relaxed) {
                    let s = progress.snapshot();
                    let (ws, limit) = memory();
                    let (pos, len) = match s.phase {
                        BuildPhase::Index => (s.step_done, s.step_total),
                        _ => (s.images_processed, s.images_total),
                    };
                    if let Some(b) = &bar {
                        b.set_prefix(s.phase.as_str());
                        b.set_length(len);
                        b.set_position(pos);
                        b.set_message(format!(
                            "{} descriptors, {} failed, mem {}/{} MiB",
                            s.descriptors,
                            s.images_failed,
                            ws >> 20,
                            limit >> 20
                        ));
                    } else if last_log.elapsed() >= Duration::from_secs(5) {
                        last_log = Instant::now();
                        tracing::info!(
                            phase = s.phase.as_str(),
                            processed = s.images_processed,
                            total = s.images_total,
                            failed = s.images_failed,
                            descriptors = s.descriptors,
                            step_done = s.step_done,
                            step_total = s.step_total,
                            working_set_mib = ws >> 20,
                            limit_mib = limit >> 20,
                            elapsed_s = started.elapsed().as_secs(),
                            "progress"
                        );
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
            })
            .ok();
        ProgressDisplay { stop, handle }
    }
}

impl Drop for ProgressDisplay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up() {
        let p = BuildProgress::new();
        p.set_total(10);
        p.resume_at(4, 1, 400);
        p.image_done(100, false);
        p.image_done(0, true);
        p.set_phase(BuildPhase::Index);
        let s = p.snapshot();
        assert_eq!(
            (s.images_processed, s.images_failed, s.descriptors),
            (6, 2, 500)
        );
        assert_eq!(s.phase, BuildPhase::Index);
        assert!(!p.is_cancelled());
        p.cancel();
        assert!(p.is_cancelled());
    }
}
