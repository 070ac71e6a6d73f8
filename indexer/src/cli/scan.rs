//! `indexer scan`: count a dataset's images and estimate each preset's memory and disk.

use super::output::{self, ScanTable};
use anyhow::Context;
use imageindex_crds::quantity;
use imageindex_crds::ScanReport;
use indexer::dataset;
use std::path::PathBuf;

/// The flags of `indexer scan`.
#[derive(clap::Args)]
pub struct ScanArgs {
    /// Dataset directory.
    dir: PathBuf,
    /// Print the JSON report (the operator's contract) instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file (e.g. /dev/termination-log).
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Memory limit to choose the `auto` preset for (e.g. 512Mi).
    #[arg(long, value_parser = quantity::parse_bytes)]
    memory_limit: Option<u64>,
    /// Extraction threads to assume (default: available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Image headers to read for dimensions.
    #[arg(long, default_value_t = 512)]
    sample: usize,
    /// Scan one shard of the dataset: `I/N` (the images `indexer build --shard I/N` builds).
    #[arg(long)]
    shard: Option<indexer::shard::Shard>,
}

impl ScanArgs {
    /// Lists the dataset, samples headers and prints (or writes) the report.
    pub fn run(self) -> anyhow::Result<()> {
        let threads = self.threads.unwrap_or_else(super::default_threads);
        let mut listing = dataset::list(&self.dir)?;
        if let Some(shard) = self.shard {
            listing.keep_shard(shard);
        }
        let sample = dataset::shape(&self.dir, &listing, self.sample);
        let report = ScanReport::new(
            sample.shape,
            listing.skipped.len() as u64,
            sample.read,
            listing.fingerprint.clone(),
            self.memory_limit,
            threads as u32,
        )
        .with_largest(sample.largest);
        let text = serde_json::to_string(&report)?;
        if let Some(path) = &self.json_out {
            std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
        }
        if self.json {
            output::print(text)
        } else {
            output::print(ScanTable(&report))
        }
    }
}
