//! `indexer search`: search an index with query images.

use super::output::{self, SearchReport};
use clap::ValueEnum;
use indexer::features::{Detector, ExtractParams};
use indexer::search::{self, Engine, Index, SearchParams};
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
    /// Lookup structure.
    #[arg(long, value_enum, default_value_t = EngineArg::Ivf)]
    engine: EngineArg,
    /// Inverted lists probed per descriptor.
    #[arg(long)]
    nprobe: Option<usize>,
}

/// The lookup structure, as a flag value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EngineArg {
    /// Inverted lists (fast, default).
    Ivf,
    /// The arroy forest (the slower baseline).
    Arroy,
}

impl From<EngineArg> for Engine {
    fn from(e: EngineArg) -> Engine {
        match e {
            EngineArg::Ivf => Engine::Ivf,
            EngineArg::Arroy => Engine::Arroy,
        }
    }
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
            engine: self.engine.into(),
            ..SearchParams::for_index(&idx.meta)
        };
        if let Some(n) = self.nprobe {
            params.nprobe = n.max(1);
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
