//! `indexer`: scan a dataset, build a memory-bounded ORB index, search it, serve it.

use anyhow::Context;
use clap::{Parser, Subcommand};
use imageindex_crds::{quantity, ScanReport};
use indexer::build::{self, BuildContext, BuildOptions, PresetChoice};
use indexer::features::{self, Detector, ExtractParams};
use indexer::memory::MemorySource;
use indexer::metrics::{self, BuildMetrics};
use indexer::progress::{BuildProgress, ProgressDisplay};
use indexer::search::{Index, SearchParams};
use indexer::{dataset, IndexError};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "indexer",
    version,
    about = "Memory-bounded ORB image index: scan, build, search, serve"
)]
struct Cli {
    /// Log format: text (default on a terminal) or json.
    #[arg(long, global = true, default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Count a dataset's images and estimate each preset's memory and disk.
    Scan {
        /// Dataset directory.
        dir: PathBuf,
        /// Print the JSON report (the operator's contract) instead of a table.
        #[arg(long)]
        json: bool,
        /// Also write the JSON report to this file (e.g. /dev/termination-log).
        #[arg(long)]
        json_out: Option<PathBuf>,
        /// Memory limit to choose the `auto` preset for (e.g. 512Mi).
        #[arg(long)]
        memory_limit: Option<String>,
        /// Extraction threads to assume (default: available cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Image headers to read for dimensions.
        #[arg(long, default_value_t = 512)]
        sample: usize,
    },
    /// Build (or resume building) an index and publish it atomically.
    Build {
        /// Dataset directory.
        dir: PathBuf,
        /// Index directory.
        #[arg(long)]
        out: PathBuf,
        /// auto, full, small, medium, large, xlarge (or a ladder label like xlarge-nf50).
        #[arg(long, default_value = "auto")]
        preset: String,
        /// Memory limit (default: the cgroup limit, else the machine's memory).
        #[arg(long)]
        memory_limit: Option<String>,
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
        /// Benchmarks: add this many synthetic descriptors after the dataset's.
        #[arg(long, hide = true, default_value_t = 0)]
        pad_synthetic: u64,
    },
    /// Search an index with query images.
    Search {
        /// Index directory.
        index: PathBuf,
        /// Query images.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Matches per query.
        #[arg(short, long, default_value_t = 5)]
        k: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Skip RANSAC verification.
        #[arg(long)]
        no_verify: bool,
        /// Do not search the mirrored image when nothing verifies.
        #[arg(long)]
        no_mirror: bool,
        /// Inverted lists probed per descriptor.
        #[arg(long)]
        nprobe: Option<usize>,
        /// Vocabulary cells whose lists a descriptor considers.
        #[arg(long)]
        cells: Option<usize>,
    },
    /// Show what a published index holds: generation, preset, counts, timings, failures.
    Info {
        /// Index directory.
        index: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Failed images to list.
        #[arg(long, default_value_t = 100)]
        failures: usize,
    },
    /// Serve an index over HTTP: search by image, catalogue, rebuild, metrics, OpenAPI docs.
    Serve {
        /// Index directory (its `current` generation is served; it may not exist yet).
        index: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:8080")]
        addr: SocketAddr,
        /// Dataset directory, for POST /v1/index/rebuild.
        #[arg(long)]
        dataset: Option<PathBuf>,
        /// Memory limit (default: the cgroup limit, else the machine's memory).
        #[arg(long)]
        memory_limit: Option<String>,
        /// Bearer tokens, one `<token> <role>` per line (role: read or admin).
        #[arg(long)]
        auth_file: Option<PathBuf>,
        /// Follow the index directory and serve every generation published into it.
        #[arg(long)]
        watch: bool,
        /// How often to check the index directory.
        #[arg(long, default_value = "2s")]
        watch_interval: humantime::Duration,
        /// Largest request body (e.g. 20MB, 8Mi).
        #[arg(long, default_value = "20MB")]
        max_body: String,
        /// Queries decoding at once (default: cores, fewer if memory is short).
        #[arg(long)]
        slots: Option<usize>,
        /// Requests that may wait for a slot before new ones get 503.
        #[arg(long)]
        queue: Option<usize>,
        /// Extraction threads of a rebuild (default: cores - 1, at least 1).
        #[arg(long)]
        rebuild_threads: Option<usize>,
    },
    /// Benchmarks printed as tables (speed, memory, disk, recall; the old system beside ours).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Run a command inside a fresh cgroup with a real memory limit (used by local mode).
    ExecLimited {
        /// Memory limit of the cgroup (e.g. 512Mi).
        #[arg(long)]
        memory_limit: String,
        /// Name of the cgroup (created under imageindex/).
        #[arg(long)]
        name: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Build an index of generated ORB-like descriptors (benchmarks).
    #[command(hide = true)]
    BuildSynthetic {
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
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Real images: build under a limit, attack every image, recall and latency per engine,
    /// plus the old Python + Annoy setup on the same files.
    Images {
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
        #[arg(long)]
        memory_limit: Option<String>,
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
        /// Vocabulary cells whose lists a descriptor considers.
        #[arg(long)]
        cells: Option<usize>,
        /// Add this many synthetic ORB-like descriptors to the index (e.g. 1M, 10M), so the
        /// real queries run inside an index of that size.
        #[arg(long, default_value = "0")]
        pad: String,
        /// Reuse indexes a previous run built with the same preset and padding.
        #[arg(long)]
        reuse: bool,
        /// Also print the rows as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Load a running query service: concurrent clients searching for a while; prints the
    /// status counts, latency percentiles and the server's peak memory.
    Load {
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
    },
    /// Synthetic ORB-like descriptors at the given sizes, built inside a real cgroup limit.
    Synthetic {
        /// Sizes, comma-separated (e.g. 1M,2M,16M).
        #[arg(long, default_value = "1M", value_delimiter = ',')]
        sizes: Vec<String>,
        /// Real cgroup memory limit for the builds.
        #[arg(long)]
        memory_limit: Option<String>,
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
    },
}

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

fn parse_count(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1_000.0),
        Some('m' | 'M') => (&t[..t.len() - 1], 1_000_000.0),
        Some('g' | 'G') => (&t[..t.len() - 1], 1_000_000_000.0),
        _ => (t, 1.0),
    };
    let v: f64 = num.parse().with_context(|| format!("size {text:?}"))?;
    Ok((v * mult) as u64)
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,arroy=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn parse_limit(text: Option<&str>) -> anyhow::Result<Option<u64>> {
    text.map(|t| quantity::parse_bytes(t).with_context(|| format!("--memory-limit {t:?}")))
        .transpose()
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn main() {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    features::quiet_opencv();
    let code = match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            let code = e
                .downcast_ref::<IndexError>()
                .map_or(1, IndexError::exit_code);
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            code
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Scan {
            dir,
            json,
            json_out,
            memory_limit,
            threads,
            sample,
        } => {
            let limit = parse_limit(memory_limit.as_deref())?;
            let threads = threads.unwrap_or_else(default_threads);
            let listing = dataset::list(&dir)?;
            let (shape, sampled) = dataset::shape(&dir, &listing, sample);
            let report = ScanReport::new(
                shape,
                listing.skipped.len() as u64,
                sampled,
                listing.fingerprint.clone(),
                limit,
                threads as u32,
            );
            let text = serde_json::to_string(&report)?;
            if let Some(path) = json_out {
                std::fs::write(&path, &text)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if json {
                println!("{text}");
            } else {
                print_scan(&report);
            }
            Ok(())
        }
        Command::Build {
            dir,
            out,
            preset,
            memory_limit,
            threads,
            metrics_addr,
            strict_memory,
            json,
            pad_synthetic,
        } => {
            let preset = PresetChoice::parse(&preset).ok_or_else(|| {
                IndexError::Usage(format!(
                    "unknown preset {preset:?} (auto, full, small, medium, large, xlarge)"
                ))
            })?;
            let limit = parse_limit(memory_limit.as_deref())?;
            let threads = threads.unwrap_or_else(default_threads).max(1);
            let _ = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build_global();
            let memory = Arc::new(MemorySource::detect(limit));
            let progress = BuildProgress::new();
            install_signal_handlers(progress.clone())?;
            let build_metrics = BuildMetrics::new();
            if let PresetChoice::Exact(p) = preset {
                build_metrics.set_info(&p);
            }
            if let Some(addr) = metrics_addr {
                let bound = metrics::serve_build_metrics(
                    addr,
                    build_metrics.clone(),
                    progress.clone(),
                    memory.clone(),
                )
                .with_context(|| format!("binding metrics on {addr}"))?;
                tracing::info!(%bound, "metrics at http://{bound}/metrics");
            }
            let display = {
                let memory = memory.clone();
                ProgressDisplay::start(progress.clone(), move || {
                    let s = memory.snapshot();
                    (s.working_set, s.limit)
                })
            };
            let opts = BuildOptions {
                dataset: dir,
                out,
                preset,
                threads,
                strict_memory,
                sample: 512,
                pad_descriptors: pad_synthetic,
            };
            let ctx = BuildContext {
                progress: progress.clone(),
                memory: memory.clone(),
            };
            let summary = build::run(&opts, &ctx);
            drop(display);
            let summary = summary?;
            build_metrics.set_info(&summary.meta.preset);
            build_metrics.observe(&progress, &memory.snapshot());
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                let m = &summary.meta;
                println!(
                    "published generation {} at {}\n  preset {} ({} features, {} trees)\n  images {} indexed, {} failed, {} descriptors\n  extract {:.1}s ({:.1} images/s on {} threads), train {:.1}s, lists {:.1}s, layouts {:.1}s\n  peak working set {} MiB of {} MiB",
                    summary.generation,
                    summary.path.display(),
                    m.preset,
                    m.preset.nfeatures,
                    m.preset.n_trees,
                    m.images_indexed,
                    m.images_failed,
                    m.descriptors,
                    m.timings.extract,
                    (m.images_indexed + m.images_failed) as f64 / m.timings.extract.max(1e-9),
                    threads,
                    m.timings.train,
                    m.timings.assign,
                    m.timings.global,
                    m.peak_working_set >> 20,
                    m.memory_budget >> 20
                );
            }
            Ok(())
        }
        Command::Search {
            index,
            images,
            k,
            json,
            no_verify,
            no_mirror,
            nprobe,
            cells,
        } => {
            let idx = Index::open(&index)?;
            let mut params = SearchParams {
                k,
                verify: !no_verify,
                mirror: !no_mirror,
                ..SearchParams::for_index(&idx.meta)
            };
            if let Some(n) = nprobe {
                params.probe.lists = n.max(1);
            }
            if let Some(c) = cells {
                params.probe.cells = c.max(1);
            }
            let mut detector = Detector::for_queries(ExtractParams::for_query(&idx.meta.preset))?;
            let mut results = Vec::new();
            for image in &images {
                let r = indexer::search::search_file(&idx, &mut detector, image, &params);
                results.push((image, r));
            }
            if json {
                let items: Vec<serde_json::Value> = results
                    .iter()
                    .map(|(path, r)| match r {
                        Ok(a) => serde_json::json!({"query": path, "generation": idx.generation, "matches": a.matches, "features": a.features, "adaptation": a.adaptation, "mirrored": a.mirrored, "timings": a.timings}),
                        Err(e) => serde_json::json!({"query": path, "error": e.to_string()}),
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&items)?);
            } else {
                for (path, r) in &results {
                    println!("{}", path.display());
                    match r {
                        Ok(a) if a.matches.is_empty() => {
                            println!("  no match ({} query features)", a.features)
                        }
                        Ok(a) => {
                            if a.mirrored {
                                println!("  (matched as a mirrored copy)");
                            }
                            for (rank, m) in a.matches.iter().enumerate() {
                                println!(
                                    "  {}. {}  votes {}{}",
                                    rank + 1,
                                    m.path,
                                    m.score,
                                    m.inliers.map_or(String::new(), |n| format!(
                                        ", inliers {n}{}",
                                        if m.verified { "" } else { " (unverified)" }
                                    ))
                                );
                            }
                        }
                        Err(e) => println!("  error: {e}"),
                    }
                }
            }
            Ok(())
        }
        Command::Bench { what } => bench(what),
        Command::Serve {
            index,
            addr,
            dataset,
            memory_limit,
            auth_file,
            watch,
            watch_interval,
            max_body,
            slots,
            queue,
            rebuild_threads,
        } => {
            let max_body = indexer::serve::limits::parse_size(&max_body)
                .with_context(|| format!("--max-body {max_body:?}"))?;
            indexer::serve::run(indexer::serve::ServeOptions {
                index_dir: index,
                addr,
                dataset,
                memory_limit: parse_limit(memory_limit.as_deref())?,
                auth_file,
                watch,
                watch_interval: watch_interval.into(),
                max_body,
                slots,
                queue,
                rebuild_threads,
            })?;
            Ok(())
        }
        Command::Info {
            index,
            json,
            failures,
        } => {
            let idx = Index::open(&index)?;
            let failed: Vec<serde_json::Value> = idx
                .failed_images(failures)?
                .into_iter()
                .map(|(path, reason)| serde_json::json!({"path": path, "reason": reason}))
                .collect();
            if json {
                let dbs: serde_json::Map<String, serde_json::Value> = idx
                    .database_bytes()?
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.into()))
                    .collect();
                let v = serde_json::json!({
                    "generation": idx.generation,
                    "path": idx.dir,
                    "diskBytes": idx.disk_bytes(),
                    "databaseBytes": dbs,
                    "meta": idx.meta,
                    "failed": failed,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let m = &idx.meta;
                println!(
                    "generation {} at {} ({} MiB)",
                    idx.generation,
                    idx.dir.display(),
                    idx.disk_bytes() >> 20
                );
                println!(
                    "preset {} ({} features, {} trees); built {} → {}",
                    m.preset, m.preset.nfeatures, m.preset.n_trees, m.started_at, m.finished_at
                );
                println!(
                    "images {} indexed, {} failed of {}; {} descriptors; fingerprint {}",
                    m.images_indexed, m.images_failed, m.images_total, m.descriptors, m.fingerprint
                );
                let per = |b: u64| b as f64 / m.descriptors.max(1) as f64;
                let parts: Vec<String> = idx
                    .database_bytes()?
                    .iter()
                    .map(|(k, b)| format!("{k} {:.1}", per(*b)))
                    .collect();
                println!(
                    "bytes per descriptor: {:.1} on disk ({})",
                    per(idx.disk_bytes()),
                    parts.join(", ")
                );
                for f in &failed {
                    println!(
                        "  failed: {}: {}",
                        f["path"].as_str().unwrap_or(""),
                        f["reason"].as_str().unwrap_or("")
                    );
                }
            }
            Ok(())
        }
        Command::ExecLimited {
            memory_limit,
            name,
            command,
        } => {
            let limit = quantity::parse_bytes(&memory_limit)
                .with_context(|| format!("--memory-limit {memory_limit:?}"))?;
            let group = indexer::cgroup::LimitedGroup::create(&name, limit)?;
            group.add(std::process::id())?;
            use std::os::unix::process::CommandExt;
            let err = std::process::Command::new(&command[0])
                .args(&command[1..])
                .exec();
            Err(anyhow::anyhow!("cannot run {:?}: {err}", command[0]))
        }
        Command::BuildSynthetic {
            out,
            descriptors,
            preset,
            json,
        } => {
            let preset = imageindex_crds::Preset::from_label(&preset)
                .ok_or_else(|| IndexError::Usage(format!("unknown preset {preset:?}")))?;
            let memory = Arc::new(MemorySource::detect(None));
            let progress = BuildProgress::new();
            install_signal_handlers(progress.clone())?;
            let generator = indexer::bench::synthetic::Generator::new(1);
            let per = indexer::bench::synthetic::PER_IMAGE;
            let generate = move |i: u32| generator.image(i);
            let source = build::SyntheticSource {
                images: descriptors.div_ceil(per as u64) as u32,
                per_image: per,
                generate: &generate,
                fingerprint: format!("synthetic-{descriptors}-seed1"),
            };
            let ctx = BuildContext {
                progress: progress.clone(),
                memory: memory.clone(),
            };
            let display = {
                let memory = memory.clone();
                ProgressDisplay::start(progress.clone(), move || {
                    let s = memory.snapshot();
                    (s.working_set, s.limit)
                })
            };
            let summary = build::run_synthetic(&out, &source, &preset, &ctx);
            drop(display);
            let summary = summary?;
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                println!(
                    "published {} descriptors at {}",
                    summary.meta.descriptors,
                    summary.path.display()
                );
            }
            Ok(())
        }
    }
}

fn bench(what: BenchCommand) -> anyhow::Result<()> {
    use indexer::bench::{images, synthetic};
    match what {
        BenchCommand::Images {
            catalogue,
            queries,
            distractors,
            work,
            presets,
            memory_limit,
            baseline,
            no_baseline,
            python,
            nprobe,
            cells,
            pad,
            reuse,
            json,
        } => {
            let b = images::ImagesBench {
                catalogue,
                queries,
                distractors,
                work,
                presets,
                memory_limit: parse_limit(memory_limit.as_deref())?,
                baseline_features: if no_baseline { Vec::new() } else { baseline },
                python: python.unwrap_or_else(default_python),
                nprobe,
                cells,
                pad: parse_count(&pad)?,
                reuse,
            };
            let rows = images::run(&b)?;
            images::print(&rows);
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            }
        }
        BenchCommand::Load {
            addr,
            clients,
            seconds,
            images,
            k,
            token,
            json,
        } => {
            let mut files = Vec::new();
            for p in images {
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
            let report = indexer::serve::load::run(&indexer::serve::load::LoadOptions {
                addr,
                clients,
                duration: std::time::Duration::from_secs_f64(seconds.max(0.1)),
                images: files,
                k,
                token,
            })?;
            indexer::serve::load::print(&report);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
        }
        BenchCommand::Synthetic {
            sizes,
            memory_limit,
            work,
            preset,
            queries,
            reuse,
            nprobe,
            json,
        } => {
            let limit = parse_limit(memory_limit.as_deref())?;
            std::fs::create_dir_all(&work)?;
            let mut rows = Vec::new();
            for s in &sizes {
                let n = parse_count(s)?;
                let row = synthetic::run_size(&work, n, limit, &preset, queries, nprobe, reuse)?;
                synthetic::print(std::slice::from_ref(&row), limit);
                rows.push(row);
            }
            println!();
            synthetic::print(&rows, limit);
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            }
        }
    }
    Ok(())
}

fn install_signal_handlers(progress: Arc<BuildProgress>) -> anyhow::Result<()> {
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, flag.clone()).context("installing signal handlers")?;
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            if flag.load(std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!("stop requested: finishing the current checkpoint");
                progress.cancel();
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        })?;
    Ok(())
}

fn print_scan(r: &ScanReport) {
    println!(
        "{} images, {} MiB, {} skipped; largest {}x{} ({}); fingerprint {}",
        r.images,
        r.bytes >> 20,
        r.skipped,
        r.shape.max_width,
        r.shape.max_height,
        if r.shape.max_is_jpeg {
            "jpeg"
        } else {
            "not jpeg"
        },
        r.fingerprint
    );
    println!(
        "{:<12} {:>12} {:>16} {:>14} {:>12}",
        "preset", "min memory", "full-speed memory", "descriptors", "disk"
    );
    for e in &r.estimates {
        println!(
            "{:<12} {:>12} {:>16} {:>14} {:>12}",
            e.preset,
            quantity::format_mebibytes_ceil(e.min_memory),
            quantity::format_mebibytes_ceil(e.recommended_memory),
            e.descriptors,
            quantity::format_bytes(e.disk)
        );
    }
    match (&r.auto, r.memory_limit) {
        (Some(p), Some(l)) => println!("auto picks {p} for a {} limit", quantity::format_bytes(l)),
        (None, Some(l)) => println!("no preset fits a {} limit", quantity::format_bytes(l)),
        _ => println!("pass --memory-limit to see what auto picks"),
    }
}
