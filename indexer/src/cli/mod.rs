//! The `indexer` command line: one module per command, each an `Args` struct with a `run`
//! method; [`output`] holds what the commands print, [`signals`] turns SIGTERM/SIGINT into a
//! build's cancellation.

#[cfg(feature = "bench")]
mod bench;
mod build;
mod exec_limited;
mod info;
mod output;
mod route;
mod scan;
mod search;
mod serve;
mod signals;

use clap::{Parser, Subcommand, ValueEnum};
use indexer::IndexError;

/// The `indexer` command line.
#[derive(Parser)]
#[command(
    name = "indexer",
    version,
    about = "Memory-bounded ORB image index: scan, build, search, serve"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Subcommand)]
pub enum Command {
    /// Count a dataset's images and estimate each preset's memory and disk.
    Scan(scan::ScanArgs),
    /// Build (or resume building) an index and publish it atomically.
    Build(build::BuildArgs),
    /// Search an index with query images.
    Search(search::SearchArgs),
    /// Show what a published index holds: generation, preset, counts, timings, failures.
    Info(info::InfoArgs),
    /// Serve an index over HTTP: search by image, catalogue, rebuild, metrics, OpenAPI docs.
    Serve(serve::ServeArgs),
    /// Serve a sharded index: one search API in front of the shards' query services.
    Route(route::RouteArgs),
    /// Benchmarks printed as tables (speed, memory, disk, recall; the old system beside ours).
    #[cfg(feature = "bench")]
    Bench(bench::BenchArgs),
    /// Run a command inside a fresh cgroup with a real memory limit (used by local mode).
    ExecLimited(exec_limited::ExecLimitedArgs),
    /// Build an index of generated ORB-like descriptors (benchmarks).
    #[cfg(feature = "bench")]
    #[command(hide = true)]
    BuildSynthetic(bench::BuildSyntheticArgs),
}

/// How log lines are written (to stderr).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Sets up tracing on stderr (`RUST_LOG` overrides the default filter).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,arroy=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// The process's exit code for a command's outcome, reporting an error on stderr. Standard
/// output closed by its reader (`indexer search … | head`) is not an error: exit 0, quietly.
pub fn exit_code(outcome: anyhow::Result<()>) -> i32 {
    let Err(e) = outcome else {
        return 0;
    };
    if output::is_closed_pipe(&e) {
        return 0;
    }
    let code = e
        .downcast_ref::<IndexError>()
        .map_or(1, IndexError::exit_code);
    tracing::error!("{e:#}");
    eprintln!("error: {e:#}");
    code
}

/// The number of cores this process may use.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
