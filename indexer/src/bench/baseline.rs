//! The old system's setup, run beside ours: `indexer/bench/annoy_baseline.py` (Python,
//! OpenCV ORB, Annoy), on the same catalogue and queries.

use super::images::EngineRow;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Where the baseline script lives, relative to the repository (or `IMAGEINDEX_BASELINE`).
pub const SCRIPT: &str = "indexer/bench/annoy_baseline.py";

/// The baseline's JSON report (the fields we table).
#[derive(Clone, Debug, Deserialize, Default)]
pub struct BaselineReport {
    /// Descriptors indexed.
    #[serde(default, rename = "descriptors_indexed")]
    pub descriptors: u64,
    /// Seconds extracting.
    #[serde(default)]
    pub extract_seconds: f64,
    /// Seconds building Annoy.
    #[serde(default, rename = "annoy_build_seconds")]
    pub build_seconds: f64,
    /// Peak RSS.
    #[serde(default)]
    pub peak_rss_bytes: u64,
    /// Annoy file size.
    #[serde(default, rename = "annoy_index_bytes")]
    pub index_bytes: u64,
    /// Recall@1.
    #[serde(default)]
    pub recall_at_1: f64,
    /// Recall@5.
    #[serde(default)]
    pub recall_at_5: f64,
    /// Recall per attack.
    #[serde(default)]
    pub per_attack: BTreeMap<String, AttackRecall>,
    /// p50 latency (ms).
    #[serde(default, rename = "latency_ms_p50")]
    pub latency_p50_ms: f64,
    /// p95 latency (ms).
    #[serde(default, rename = "latency_ms_p95")]
    pub latency_p95_ms: f64,
    /// Queries with an expected answer.
    #[serde(default, rename = "n_labelled")]
    pub n_queries: usize,
    /// Distractor false positives.
    #[serde(default)]
    pub distractor_false_positives: usize,
    /// Distractors.
    #[serde(default)]
    pub n_distractors: usize,
}

/// Recall of one attack.
#[derive(Clone, Debug, Deserialize, Default)]
pub struct AttackRecall {
    /// Recall@1.
    #[serde(default)]
    pub recall_at_1: f64,
}

impl BaselineReport {
    /// As a table row.
    pub fn into_row(self, nfeatures: u32) -> EngineRow {
        EngineRow {
            system: format!("old: python+annoy nf{nfeatures}"),
            queries: self.n_queries,
            recall1: self.recall_at_1,
            recall5: self.recall_at_5,
            per_attack: self
                .per_attack
                .into_iter()
                .map(|(k, v)| (k, v.recall_at_1))
                .collect(),
            false_positives: self.distractor_false_positives,
            distractors: self.n_distractors,
            p50_ms: self.latency_p50_ms,
            p95_ms: self.latency_p95_ms,
            split_ms: [0.0; 4],
            build_s: self.extract_seconds + self.build_seconds,
            descriptors: self.descriptors,
            build_peak: (self.peak_rss_bytes, 0),
            disk_bytes: self.index_bytes,
        }
    }
}

/// Finds the baseline script.
pub fn script_path() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("IMAGEINDEX_BASELINE") {
        return p.into();
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/annoy_baseline.py");
    if here.exists() {
        return here;
    }
    SCRIPT.into()
}

/// The old system's Annoy settings for a feature count, as it ran them: 50 trees (search_k
/// 100) at 1000 features, 15 trees (search_k 50) at its 150-feature fallback.
pub fn settings(nfeatures: u32) -> (u32, u32) {
    if nfeatures >= 1000 {
        (50, 100)
    } else {
        (15, 50)
    }
}

/// Runs the old system's script over a catalogue and queries and reads its report.
pub fn run(
    python: &str,
    catalogue: &Path,
    queries: &Path,
    nfeatures: u32,
    n_trees: u32,
    search_k: u32,
) -> anyhow::Result<BaselineReport> {
    let out = std::process::Command::new(python)
        .arg(script_path())
        .args([
            "--catalogue",
            &catalogue.display().to_string(),
            "--queries",
            &queries.display().to_string(),
        ])
        .args([
            "--nfeatures",
            &nfeatures.to_string(),
            "--n-trees",
            &n_trees.to_string(),
            "--search-k",
            &search_k.to_string(),
            "--json",
        ])
        .output()?;
    if !out.status.success() {
        anyhow::bail!("baseline failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}
