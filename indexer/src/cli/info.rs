//! `indexer info`: what a published index holds.

use super::output::{self, InfoReport};
use indexer::search::Index;
use std::path::PathBuf;

/// The flags of `indexer info`.
#[derive(clap::Args)]
pub struct InfoArgs {
    /// Index directory.
    index: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Failed images to list.
    #[arg(long, default_value_t = 100)]
    failures: usize,
}

impl InfoArgs {
    /// Opens the current generation and prints its metadata, sizes and failed images.
    pub fn run(self) -> anyhow::Result<()> {
        let idx = Index::open(&self.index)?;
        let info = InfoReport {
            failed: idx.failed_images(self.failures)?,
            database_bytes: idx.database_bytes()?,
            index: &idx,
        };
        if self.json {
            output::print(serde_json::to_string_pretty(&info.to_json())?)
        } else {
            output::print(info)
        }
    }
}
