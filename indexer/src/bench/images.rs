//! The real-image benchmark: build a catalogue under a memory limit, attack every image
//! (crop, rotation, rescale, JPEG, perspective, noise frame, grayscale + blur, combinations),
//! and measure recall@1/@5 and per-query latency for each lookup engine — and the old
//! system's setup on the same files in the same run.

use super::attacks;
use super::baseline::{self, BaselineReport};
use super::child::{self, ChildBuild};
use super::stats::{mean, mib, percentile};
use crate::features::{Detector, ExtractParams};
use crate::lists::Probe;
use crate::search::{self, Index, SearchParams};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Settings of the image benchmark.
#[derive(Clone, Debug)]
pub struct ImagesBench {
    /// Catalogue directory.
    pub catalogue: PathBuf,
    /// Query directory (generated from the catalogue when absent).
    pub queries: Option<PathBuf>,
    /// Extra distractor images (named `distractor__*`), copied into the query set.
    pub distractors: Option<PathBuf>,
    /// Scratch directory.
    pub work: PathBuf,
    /// Presets to build.
    pub presets: Vec<String>,
    /// Memory limit for the builds (a real cgroup limit).
    pub memory_limit: Option<u64>,
    /// Run the Python + Annoy baseline with these feature counts (empty = skip).
    pub baseline_features: Vec<u32>,
    /// Python interpreter for the baseline.
    pub python: String,
    /// Inverted lists probed per descriptor (`None`: the index's preset decides).
    pub nprobe: Option<usize>,
    /// Cells considered per descriptor (`None`: the default).
    pub cells: Option<usize>,
    /// Synthetic descriptors added to the catalogue's (queries then run inside an index of
    /// that size).
    pub pad: u64,
    /// Where the padding comes from.
    pub pad_kind: super::synthetic_index::PadKind,
    /// Reuse an index a previous run built with the same preset and padding.
    pub reuse: bool,
}

/// One row of the recall/latency table.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EngineRow {
    /// What was measured.
    pub system: String,
    /// Queries with an expected answer.
    pub queries: usize,
    /// Recall@1.
    pub recall1: f64,
    /// Recall@5.
    pub recall5: f64,
    /// Recall@1 per attack.
    pub per_attack: BTreeMap<String, f64>,
    /// Distractors whose top answer was verified (false positives).
    pub false_positives: usize,
    /// Distractors.
    pub distractors: usize,
    /// Latency p50 (ms).
    pub p50_ms: f64,
    /// Latency p95 (ms).
    pub p95_ms: f64,
    /// Mean split: decode, extract, lookup, verify (ms).
    pub split_ms: [f64; 4],
    /// Build seconds.
    pub build_s: f64,
    /// Descriptors indexed.
    pub descriptors: u64,
    /// Peak working set / anonymous RSS of the build (bytes).
    pub build_peak: (u64, u64),
    /// Index bytes on disk.
    pub disk_bytes: u64,
}

fn stem_of(path: &str) -> &str {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.rsplit_once('.').map_or(name, |(s, _)| s)
}

fn attack_of(query: &Path) -> String {
    query
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.split_once("__"))
        .map_or("unknown".into(), |(_, a)| a.to_string())
}

/// Lists query files (sorted).
pub fn query_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    Ok(v)
}

/// Prepares the query set: attacks of the catalogue plus distractors.
pub fn prepare_queries(b: &ImagesBench) -> std::io::Result<PathBuf> {
    if let Some(q) = &b.queries {
        return Ok(q.clone());
    }
    let dir = b.work.join("queries");
    let _ = std::fs::remove_dir_all(&dir);
    attacks::write_attack_set(&b.catalogue, &dir, &attacks::ATTACKS)?;
    if let Some(d) = &b.distractors {
        for (i, p) in query_files(d)?.iter().enumerate() {
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("jpg");
            std::fs::copy(p, dir.join(format!("distractor__{i:03}.{ext}")))?;
        }
    }
    Ok(dir)
}

/// Measures one engine on an index.
pub fn measure(
    index: &Index,
    queries: &[PathBuf],
    nprobe: Option<usize>,
    cells: Option<usize>,
) -> crate::error::Result<EngineRow> {
    let defaults = SearchParams::for_index(&index.meta);
    let params = SearchParams {
        k: 5,
        verify: true,
        probe: Probe {
            cells: cells.unwrap_or(defaults.probe.cells),
            lists: nprobe.unwrap_or(defaults.probe.lists),
        },
        ..defaults
    };
    let mut detector = Detector::for_queries(ExtractParams::for_query(&index.meta.preset))?;
    let mut row = EngineRow {
        system: format!(
            "{} c{} l{}",
            index.meta.preset, params.probe.cells, params.probe.lists
        ),
        ..Default::default()
    };
    let (mut hit1, mut hit5, mut n) = (0usize, 0usize, 0usize);
    let mut per: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut lat = Vec::new();
    let mut split = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for q in queries {
        let expected = attacks::expected_stem(q);
        let started = std::time::Instant::now();
        let answer = search::search_file(index, &mut detector, q, &params);
        lat.push(started.elapsed().as_secs_f64() * 1000.0);
        let Ok(a) = answer else { continue };
        split[0].push(a.timings.decode_ms);
        split[1].push(a.timings.extract_ms);
        split[2].push(a.timings.lookup_ms);
        split[3].push(a.timings.verify_ms);
        match expected {
            Some(stem) => {
                n += 1;
                let top1 = a.matches.first().is_some_and(|m| stem_of(&m.path) == stem);
                let top5 = a.matches.iter().any(|m| stem_of(&m.path) == stem);
                hit1 += usize::from(top1);
                hit5 += usize::from(top5);
                let e = per.entry(attack_of(q)).or_default();
                e.0 += usize::from(top1);
                e.1 += 1;
            }
            None => {
                row.distractors += 1;
                row.false_positives += usize::from(a.matches.first().is_some_and(|m| m.verified));
            }
        }
    }
    row.queries = n;
    row.recall1 = hit1 as f64 / n.max(1) as f64;
    row.recall5 = hit5 as f64 / n.max(1) as f64;
    row.per_attack = per
        .into_iter()
        .map(|(k, (h, t))| (k, h as f64 / t.max(1) as f64))
        .collect();
    row.p50_ms = percentile(&lat, 50.0);
    row.p95_ms = percentile(&lat, 95.0);
    row.split_ms = [
        mean(&split[0]),
        mean(&split[1]),
        mean(&split[2]),
        mean(&split[3]),
    ];
    row.descriptors = index.meta.descriptors;
    row.disk_bytes = index.disk_bytes();
    Ok(row)
}

/// Runs the whole image benchmark and returns its rows (ours, then the baseline's).
pub fn run(b: &ImagesBench) -> anyhow::Result<Vec<EngineRow>> {
    std::fs::create_dir_all(&b.work)?;
    let queries_dir = prepare_queries(b)?;
    let queries = query_files(&queries_dir)?;
    let mut rows = Vec::new();
    for preset in &b.presets {
        // The flag's own spelling, for the directory name and the build's --pad-kind.
        let kind = clap::ValueEnum::to_possible_value(&b.pad_kind)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default();
        let out = b.work.join(format!("idx-{preset}-pad{}{kind}", b.pad));
        let built: ChildBuild = if b.reuse && Index::open(&out).is_ok() {
            ChildBuild::default()
        } else {
            let _ = std::fs::remove_dir_all(&out);
            let args: Vec<String> = vec![
                "build".into(),
                b.catalogue.display().to_string(),
                "--out".into(),
                out.display().to_string(),
                "--preset".into(),
                preset.clone(),
                "--pad".into(),
                b.pad.to_string(),
                "--pad-kind".into(),
                kind.clone(),
            ];
            child::run_build(&args, b.memory_limit, &out)?
        };
        if built.exit_code != 0 {
            anyhow::bail!(
                "build of preset {preset} exited with {} (OOM kills: {})",
                built.exit_code,
                built.oom_kills
            );
        }
        let index = Index::open(&out)?;
        let mut row = measure(&index, &queries, b.nprobe, b.cells)?;
        row.build_s = built.seconds;
        row.build_peak = (built.peak_working_set, built.peak_rss_anon);
        rows.push(row);
    }
    for nf in &b.baseline_features {
        let (trees, search_k) = baseline::settings(*nf);
        let r: BaselineReport =
            baseline::run(&b.python, &b.catalogue, &queries_dir, *nf, trees, search_k)?;
        rows.push(r.into_row(*nf));
    }
    Ok(rows)
}

/// The rows as a table: recall, latency, build and disk per system, then recall@1 per attack.
pub struct ImagesTable<'a>(pub &'a [EngineRow]);

impl std::fmt::Display for ImagesTable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let rows = self.0;
        writeln!(
            f,
            "{:<28} {:>7} {:>8} {:>8} {:>6} {:>8} {:>8}  {:>28} {:>8} {:>10} {:>16} {:>9}",
            "system",
            "queries",
            "recall@1",
            "recall@5",
            "FP",
            "p50 ms",
            "p95 ms",
            "decode/extract/lookup/verify",
            "build s",
            "descr.",
            "build WS/anon MiB",
            "disk MiB"
        )?;
        for r in rows {
            writeln!(
                f,
                "{:<28} {:>7} {:>8.3} {:>8.3} {:>6} {:>8.1} {:>8.1}  {:>28} {:>8.1} {:>10} {:>16} {:>9}",
                r.system,
                r.queries,
                r.recall1,
                r.recall5,
                format!("{}/{}", r.false_positives, r.distractors),
                r.p50_ms,
                r.p95_ms,
                format!("{:.1}/{:.1}/{:.1}/{:.1}", r.split_ms[0], r.split_ms[1], r.split_ms[2], r.split_ms[3]),
                r.build_s,
                r.descriptors,
                format!("{}/{}", mib(r.build_peak.0), mib(r.build_peak.1)),
                mib(r.disk_bytes)
            )?;
        }
        let attacks: Vec<&String> = rows
            .iter()
            .flat_map(|r| r.per_attack.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        writeln!(f)?;
        write!(f, "{:<28}", "recall@1 per attack")?;
        for a in &attacks {
            write!(f, " {:>9}", &a[..a.len().min(9)])?;
        }
        for r in rows {
            writeln!(f)?;
            write!(f, "{:<28}", r.system)?;
            for a in &attacks {
                write!(
                    f,
                    " {:>9}",
                    r.per_attack
                        .get(*a)
                        .map_or("-".into(), |v| format!("{v:.2}"))
                )?;
            }
        }
        Ok(())
    }
}
