//! `indexer build`: build (or resume building) an index and publish it atomically.

use super::output::{self, BuildReport};
use super::signals;
use anyhow::Context;
use imageindex_crds::quantity;
use indexer::build::{self, BuildContext, BuildOptions, PresetRequest};
use indexer::memory::MemorySource;
use indexer::metrics::{self, BuildExporter};
use indexer::progress::{BuildProgress, ProgressDisplay};
use indexer::IndexError;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// The flags of `indexer build`.
#[derive(clap::Args)]
pub struct BuildArgs {
    /// Dataset directory.
    dir: PathBuf,
    /// Index directory.
    #[arg(long)]
    out: PathBuf,
    /// auto, full, small, medium, large, xlarge (or a ladder label like xlarge-nf50).
    #[arg(long, default_value = "auto", value_parser = preset_choice)]
    preset: PresetRequest,
    /// Memory limit (default: the cgroup limit, else the machine's memory).
    #[arg(long, value_parser = quantity::parse_bytes)]
    memory_limit: Option<u64>,
    /// Extraction threads (default: available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Serve Prometheus metrics on this address while building.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Refuse to start when the preset's estimate exceeds the memory limit.
    #[arg(long)]
    strict_memory: bool,
    /// Print the build summary as JSON.
    #[arg(long)]
    json: bool,
    /// Build one shard of the dataset: `I/N` (0-based I of N shards; images go to shards by
    /// a stable hash of their path).
    #[arg(long)]
    shard: Option<indexer::shard::Shard>,
    /// Benchmarks: add this many descriptors after the dataset's.
    #[cfg(feature = "bench")]
    #[arg(long, hide = true, default_value_t = 0)]
    pad: u64,
    /// Benchmarks: where the padding comes from.
    #[cfg(feature = "bench")]
    #[arg(long, hide = true, value_enum, default_value = "real")]
    pad_kind: indexer::bench::synthetic_index::PadKind,
    /// Tests: bytes of one in-memory part of a cell's lists instead of the plan's.
    #[arg(long, hide = true)]
    list_part_bytes: Option<u64>,
}

/// Parses `auto` or a preset label.
pub fn preset_choice(text: &str) -> Result<PresetRequest, IndexError> {
    PresetRequest::parse(text).ok_or_else(|| {
        IndexError::Usage(format!(
            "unknown preset {text:?} (auto, full, small, medium, large, xlarge)"
        ))
    })
}

impl BuildArgs {
    /// Runs the build with a progress display, metrics and stop-on-signal, then prints the
    /// summary.
    pub fn run(self) -> anyhow::Result<()> {
        let threads = self.threads.unwrap_or_else(super::default_threads).max(1);
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
        let memory = Arc::new(MemorySource::detect(self.memory_limit));
        let progress = BuildProgress::new();
        signals::cancel_on_stop(progress.clone())?;
        let build_metrics = BuildExporter::new();
        if let PresetRequest::Exact(p) = self.preset {
            build_metrics.set_info(&p);
        }
        if let Some(addr) = self.metrics_addr {
            let bound = metrics::serve_build_metrics(
                addr,
                build_metrics.clone(),
                progress.clone(),
                memory.clone(),
            )
            .with_context(|| format!("binding metrics on {addr}"))?;
            tracing::info!(%bound, "metrics at http://{bound}/metrics");
        }
        let display = start_display(&progress, &memory);
        let opts = BuildOptions {
            dataset: self.dir,
            out: self.out,
            preset: self.preset,
            threads,
            strict_memory: self.strict_memory,
            sample: 512,
            list_part_bytes: self.list_part_bytes,
            shard: self.shard,
        };
        let ctx = BuildContext {
            progress: progress.clone(),
            memory: memory.clone(),
        };
        #[cfg(feature = "bench")]
        let padding = (self.pad > 0)
            .then(|| indexer::bench::synthetic_index::Padding::new(self.pad, self.pad_kind));
        #[cfg(feature = "bench")]
        let summary = build::run_with_extra(
            &opts,
            &ctx,
            padding.as_ref().map(|p| p as &dyn build::ExtraImages),
        );
        #[cfg(not(feature = "bench"))]
        let summary = build::run(&opts, &ctx);
        drop(display);
        let summary = summary?;
        build_metrics.set_info(&summary.meta.preset);
        build_metrics.observe(&progress, &memory.snapshot());
        if self.json {
            output::print(serde_json::to_string_pretty(&summary)?)
        } else {
            output::print(BuildReport {
                summary: &summary,
                threads,
            })
        }
    }
}

/// The progress bar (or log lines) of a build, with the working set and limit beside it.
pub fn start_display(progress: &Arc<BuildProgress>, memory: &Arc<MemorySource>) -> ProgressDisplay {
    let memory = memory.clone();
    ProgressDisplay::start(progress.clone(), move || {
        let s = memory.snapshot();
        (s.working_set, s.limit)
    })
}
