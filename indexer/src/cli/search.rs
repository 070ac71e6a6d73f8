//! `indexer search`: search an index with query images.

use super::output::{self, SearchReport};
use indexer::features::{Detector, ExtractParams};
use indexer::search::{self, Index, SearchParams};
use std::path::PathBuf;

/// The flags of `indexer search`.
#[derive(clap::Args)]
pub struct SearchArgs {
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
    /// Inverted lists probed per query descriptor (default: from the index's preset).
    #[arg(long)]
    nprobe: Option<usize>,
    /// Vocabulary cells whose lists a query descriptor considers.
    #[arg(long)]
    cells: Option<usize>,
    /// Do not fall back to the global layout when nothing verifies.
    #[arg(long)]
    no_layout: bool,
}

impl SearchArgs {
    /// Searches every query image and prints the matches (a query that fails is reported in
    /// its place; the others still run).
    pub fn run(self) -> anyhow::Result<()> {
        let idx = Index::open(&self.index)?;
        let mut params = SearchParams {
            k: self.k,
            verify: !self.no_verify,
            mirror: !self.no_mirror,
            global: !self.no_layout,
            ..SearchParams::for_index(&idx.meta)
        };
        if let Some(n) = self.nprobe {
            params.probe.lists = n.max(1);
        }
        if let Some(c) = self.cells {
            params.probe.cells = c.max(1);
        }
        let mut detector = Detector::for_queries(ExtractParams::for_query(&idx.meta.preset))?;
        let results: Vec<_> = self
            .images
            .iter()
            .map(|image| {
                let answer = search::search_file(&idx, &mut detector, image, &params);
                (image.as_path(), answer)
            })
            .collect();
        let report = SearchReport {
            generation: idx.generation,
            results: &results,
        };
        if self.json {
            output::print(serde_json::to_string_pretty(&report.to_json())?)
        } else {
            output::print(report)
        }
    }
}
