//! `indexer bench` (real images, load, synthetic scale) and the hidden `build-synthetic` it
//! runs its scale builds through.

use super::build::start_display;
use super::output;
use super::signals;
use anyhow::Context;
use imageindex_crds::quantity;
use indexer::bench::{images, load, shards, synthetic, synthetic_index};
use indexer::build::BuildContext;
use indexer::memory::MemorySource;
use indexer::progress::BuildProgress;
use indexer::search::SearchParams;
use indexer::IndexError;
use std::path::PathBuf;
use std::sync::Arc;

/// The flags of `indexer bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Which benchmark.
    #[command(subcommand)]
    what: BenchCommand,
}

/// The benchmarks.
#[derive(clap::Subcommand)]
enum BenchCommand {
    /// Real images: build under a limit, attack every image, recall and latency per engine,
    /// plus the old Python + Annoy setup on the same files.
    Images(ImagesArgs),
    /// Load a running query service: concurrent clients searching for a while; prints the
    /// status counts, latency percentiles and the server's peak memory.
    Load(LoadArgs),
    /// Synthetic ORB-like descriptors at the given sizes, built inside a real cgroup limit.
    Synthetic(SyntheticArgs),
    /// The same catalogue unsharded and in N shards: parallel builds, per-shard memory,
    /// latency through the router against the unsharded service, agreement of the answers.
    Shards(ShardsArgs),
}

/// The flags of `indexer bench shards`.
#[derive(clap::Args)]
struct ShardsArgs {
    /// Catalogue directory.
    #[arg(long, default_value = "samples/catalogue")]
    catalogue: PathBuf,
    /// Query directory (`<catalogue stem>__<attack>.<ext>`; other names are distractors).
    #[arg(long)]
    queries: PathBuf,
    /// Scratch directory.
    #[arg(long, default_value = "/tmp/imageindex-bench-shards")]
    work: PathBuf,
    /// Shard counts, comma-separated; the first is the reference (use 1).
    #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
    shards: Vec<u32>,
    /// Preset of every shard.
    #[arg(long, default_value = "full")]
    preset: String,
    /// Real cgroup memory limit of each shard's build.
    #[arg(long, value_parser = quantity::parse_bytes)]
    memory_limit: Option<u64>,
    /// Extraction threads of each shard's build (default: cores / shards, at least 1).
    #[arg(long)]
    threads: Option<usize>,
    /// First port of the services started.
    #[arg(long, default_value_t = 18300)]
    base_port: u16,
    /// Also print the rows as JSON.
    #[arg(long)]
    json: bool,
}

/// The flags of `indexer bench images`.
#[derive(clap::Args)]
struct ImagesArgs {
    /// Catalogue directory.
    #[arg(long, default_value = "samples/catalogue")]
    catalogue: PathBuf,
    /// Query directory (default: attacks generated from the catalogue).
    #[arg(long)]
    queries: Option<PathBuf>,
    /// Images that must not match anything, added to the queries.
    #[arg(long)]
    distractors: Option<PathBuf>,
    /// Scratch directory.
    #[arg(long, default_value = "/tmp/imageindex-bench")]
    work: PathBuf,
    /// Presets to build, comma-separated.
    #[arg(long, default_value = "full", value_delimiter = ',')]
    presets: Vec<String>,
    /// Real cgroup memory limit for the builds.
    #[arg(long, value_parser = quantity::parse_bytes)]
    memory_limit: Option<u64>,
    /// Old-system feature counts to run (comma-separated).
    #[arg(long, default_value = "150,1000", value_delimiter = ',')]
    baseline: Vec<u32>,
    /// Skip the old system's setup.
    #[arg(long)]
    no_baseline: bool,
    /// Python interpreter for the baseline (default: the tools venv scripts/setup.sh makes,
    /// else python3).
    #[arg(long)]
    python: Option<String>,
    /// Inverted lists probed per descriptor (default: from the index's preset).
    #[arg(long)]
    nprobe: Option<usize>,
    /// Vocabulary cells whose lists a descriptor considers (default: 3).
    #[arg(long)]
    cells: Option<usize>,
    /// Add this many descriptors to the index (a quantity: 1M, 10M), so the real queries
    /// run inside an index of that size.
    #[arg(long, default_value = "0", value_parser = quantity::parse_bytes)]
    pad: u64,
    /// Where the padding comes from: the catalogue's own descriptors moved by a few dozen
    /// bits (real), or clustered random ones (synthetic).
    #[arg(long, value_enum, default_value = "real")]
    pad_kind: synthetic_index::PadKind,
    /// Reuse indexes a previous run built with the same preset and padding.
    #[arg(long)]
    reuse: bool,
    /// Also print the rows as JSON.
    #[arg(long)]
    json: bool,
}

/// The flags of `indexer bench load`.
#[derive(clap::Args)]
struct LoadArgs {
    /// The service's address (host:port or URL).
    #[arg(long)]
    addr: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Query images (files or directories).
    #[arg(long, default_value = "samples/catalogue", value_delimiter = ',')]
    images: Vec<PathBuf>,
    /// Matches per query.
    #[arg(short, long, default_value_t = 5)]
    k: usize,
    /// Bearer token.
    #[arg(long, env = "IMAGEINDEX_TOKEN")]
    token: Option<String>,
    /// Also print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The flags of `indexer bench synthetic`.
#[derive(clap::Args)]
struct SyntheticArgs {
    /// Sizes, comma-separated quantities (1M = 1,000,000; e.g. 1M,2M,16M).
    #[arg(long, default_value = "1M", value_delimiter = ',', value_parser = quantity::parse_bytes)]
    sizes: Vec<u64>,
    /// Real cgroup memory limit for the builds.
    #[arg(long, value_parser = quantity::parse_bytes)]
    memory_limit: Option<u64>,
    /// Scratch directory.
    #[arg(long, default_value = "/tmp/imageindex-bench")]
    work: PathBuf,
    /// Preset (trees, search effort).
    #[arg(long, default_value = "full")]
    preset: String,
    /// Single-descriptor queries per size.
    #[arg(long, default_value_t = 2000)]
    queries: usize,
    /// Reuse an index a previous run built at the same size (measure queries only).
    #[arg(long)]
    reuse: bool,
    /// Inverted lists probed per descriptor.
    #[arg(long, default_value_t = SearchParams::default().probe.lists)]
    nprobe: usize,
    /// Also print the rows as JSON.
    #[arg(long)]
    json: bool,
}

/// The flags of the hidden `indexer build-synthetic`.
#[derive(clap::Args)]
pub struct BuildSyntheticArgs {
    /// Index directory.
    #[arg(long)]
    out: PathBuf,
    /// Descriptors to generate (rounded to whole synthetic images of 1000).
    #[arg(long)]
    descriptors: u64,
    /// Preset (its trees and search settings; 1000 descriptors per image).
    #[arg(long, default_value = "full")]
    preset: String,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// The Python of the tools venv `scripts/setup.sh` makes, else `python3`.
fn default_python() -> String {
    let tools =
        std::env::var("IMAGEINDEX_TOOLS").unwrap_or_else(|_| "/var/cache/imageindex/tools".into());
    let venv = std::path::Path::new(&tools).join("venv/bin/python");
    if venv.is_file() {
        venv.display().to_string()
    } else {
        "python3".into()
    }
}

impl BenchArgs {
    /// Runs the chosen benchmark and prints its table (and JSON with `--json`).
    pub fn run(self) -> anyhow::Result<()> {
        match self.what {
            BenchCommand::Images(a) => a.run(),
            BenchCommand::Load(a) => a.run(),
            BenchCommand::Synthetic(a) => a.run(),
            BenchCommand::Shards(a) => a.run(),
        }
    }
}

impl ShardsArgs {
    fn run(self) -> anyhow::Result<()> {
        let b = shards::ShardsBench {
            catalogue: self.catalogue,
            queries: self.queries,
            work: self.work,
            shards: self.shards,
            preset: self.preset,
            memory_limit: self.memory_limit,
            threads: self.threads,
            base_port: self.base_port,
        };
        let rows = shards::run(&b)?;
        output::print(shards::ShardsTable(&rows))?;
        if self.json {
            output::print(serde_json::to_string_pretty(&rows)?)?;
        }
        Ok(())
    }
}

impl ImagesArgs {
    fn run(self) -> anyhow::Result<()> {
        let b = images::ImagesBench {
            catalogue: self.catalogue,
            queries: self.queries,
            distractors: self.distractors,
            work: self.work,
            presets: self.presets,
            memory_limit: self.memory_limit,
            baseline_features: if self.no_baseline {
                Vec::new()
            } else {
                self.baseline
            },
            python: self.python.unwrap_or_else(default_python),
            nprobe: self.nprobe,
            cells: self.cells,
            pad: self.pad,
            pad_kind: self.pad_kind,
            reuse: self.reuse,
        };
        let rows = images::run(&b)?;
        output::print(images::ImagesTable(&rows))?;
        if self.json {
            output::print(serde_json::to_string_pretty(&rows)?)?;
        }
        Ok(())
    }
}

impl LoadArgs {
    fn run(self) -> anyhow::Result<()> {
        let mut files = Vec::new();
        for p in self.images {
            if p.is_dir() {
                let mut inside: Vec<PathBuf> = std::fs::read_dir(&p)
                    .with_context(|| format!("reading {}", p.display()))?
                    .flatten()
                    .map(|e| e.path())
                    .filter(|f| f.is_file())
                    .collect();
                inside.sort();
                files.extend(inside);
            } else {
                files.push(p);
            }
        }
        let report = load::run(&load::LoadOptions {
            addr: self.addr,
            clients: self.clients,
            duration: std::time::Duration::from_secs_f64(self.seconds.max(0.1)),
            images: files,
            k: self.k,
            token: self.token,
        })?;
        output::print(&report)?;
        if self.json {
            output::print(serde_json::to_string_pretty(&report)?)?;
        }
        Ok(())
    }
}

impl SyntheticArgs {
    fn run(self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.work)?;
        let limit = self.memory_limit;
        let mut rows = Vec::new();
        for &n in &self.sizes {
            let row = synthetic::run_size(
                &self.work,
                n,
                limit,
                &self.preset,
                self.queries,
                self.nprobe,
                self.reuse,
            )?;
            output::print(synthetic::SyntheticTable {
                rows: std::slice::from_ref(&row),
                limit,
            })?;
            rows.push(row);
        }
        output::print("")?;
        output::print(synthetic::SyntheticTable { rows: &rows, limit })?;
        if self.json {
            output::print(serde_json::to_string_pretty(&rows)?)?;
        }
        Ok(())
    }
}

impl BuildSyntheticArgs {
    /// Builds and publishes an index of generated descriptors, stoppable like a build.
    pub fn run(self) -> anyhow::Result<()> {
        let preset = imageindex_crds::Preset::from_label(&self.preset)
            .ok_or_else(|| IndexError::Usage(format!("unknown preset {:?}", self.preset)))?;
        let memory = Arc::new(MemorySource::detect(None));
        let progress = BuildProgress::new();
        signals::cancel_on_stop(progress.clone())?;
        let generator = synthetic::Generator::new(1);
        let per = synthetic::PER_IMAGE;
        let generate = move |i: u32| Ok(generator.image(i));
        let source = synthetic_index::SyntheticSource {
            images: self.descriptors.div_ceil(per as u64) as u32,
            per_image: per,
            generate: &generate,
            fingerprint: format!("synthetic-{}-seed1", self.descriptors),
        };
        let ctx = BuildContext {
            progress: progress.clone(),
            memory: memory.clone(),
        };
        let display = start_display(&progress, &memory);
        let summary = synthetic_index::run_synthetic(&self.out, &source, &preset, &ctx);
        drop(display);
        let summary = summary?;
        if self.json {
            output::print(serde_json::to_string(&summary)?)
        } else {
            output::print(format_args!(
                "published {} descriptors at {}",
                summary.meta.descriptors,
                summary.path.display()
            ))
        }
    }
}
