//! What the commands print: tables and summaries as `Display` types, and [`print`], which
//! writes to standard output and reports a reader that went away as an error [`main`] exits
//! quietly on (`indexer search … | head`).
//!
//! [`main`]: crate

use imageindex_crds::{quantity, ScanReport};
use indexer::build::BuildSummary;
use indexer::search::{Answer, Index, QueryError};
use std::fmt::{self, Display, Formatter};
use std::io::{self, Write};
use std::path::Path;

/// Writes `what` and a newline to standard output.
pub fn print(what: impl Display) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{what}")?;
    out.flush()?;
    Ok(())
}

/// Whether an error is standard output's reader having gone away (EPIPE).
pub fn is_closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// `indexer scan`'s table: counts, then per preset the memory it needs and what it writes.
pub struct ScanTable<'a>(pub &'a ScanReport);

impl Display for ScanTable<'_> {
    fn fmt(&self, f: &mut Formatter) -> fmt::Result {
        let r = self.0;
        writeln!(
            f,
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
        )?;
        writeln!(
            f,
            "{:<12} {:>12} {:>16} {:>14} {:>12}",
            "preset", "min memory", "full-speed memory", "descriptors", "disk"
        )?;
        for e in &r.estimates {
            writeln!(
                f,
                "{:<12} {:>12} {:>16} {:>14} {:>12}",
                e.preset,
                quantity::format_mebibytes_ceil(e.min_memory),
                quantity::format_mebibytes_ceil(e.recommended_memory),
                e.descriptors,
                quantity::format_bytes(e.disk)
            )?;
        }
        match (&r.auto, r.memory_limit) {
            (Some(p), Some(l)) => write!(
                f,
                "auto picks {p} for a {} limit",
                quantity::format_bytes(l)
            ),
            (None, Some(l)) => write!(f, "no preset fits a {} limit", quantity::format_bytes(l)),
            _ => write!(f, "pass --memory-limit to see what auto picks"),
        }
    }
}

/// `indexer build`'s summary of a published generation.
pub struct BuildReport<'a> {
    /// What the build reported.
    pub summary: &'a BuildSummary,
    /// Extraction threads it ran with.
    pub threads: usize,
}

impl Display for BuildReport<'_> {
    fn fmt(&self, f: &mut Formatter) -> fmt::Result {
        let s = self.summary;
        let m = &s.meta;
        write!(
            f,
            "published generation {} at {}\n  preset {} ({} features, {} trees)\n  images {} indexed, {} failed, {} descriptors\n  extract {:.1}s ({:.1} images/s on {} threads), train {:.1}s, lists {:.1}s, layouts {:.1}s\n  peak working set {} MiB of {} MiB",
            s.generation,
            s.path.display(),
            m.preset,
            m.preset.nfeatures,
            m.preset.n_trees,
            m.images_indexed,
            m.images_failed,
            m.descriptors,
            m.timings.extract,
            (m.images_indexed + m.images_failed) as f64 / m.timings.extract.max(1e-9),
            self.threads,
            m.timings.train,
            m.timings.assign,
            m.timings.global,
            m.peak_working_set >> 20,
            m.memory_budget >> 20
        )
    }
}

/// `indexer search`'s answers, one block per query image.
pub struct SearchReport<'a> {
    /// The generation that answered.
    pub generation: u64,
    /// Each query image with its answer.
    pub results: &'a [(&'a Path, Result<Answer, QueryError>)],
}

impl SearchReport<'_> {
    /// The answers as JSON (`--json`).
    pub fn to_json(&self) -> serde_json::Value {
        self.results
            .iter()
            .map(|(path, r)| match r {
                Ok(a) => serde_json::json!({"query": path, "generation": self.generation, "matches": a.matches, "features": a.features, "adaptation": a.adaptation, "mirrored": a.mirrored, "timings": a.timings}),
                Err(e) => serde_json::json!({"query": path, "error": e.to_string()}),
            })
            .collect()
    }
}

impl Display for SearchReport<'_> {
    fn fmt(&self, f: &mut Formatter) -> fmt::Result {
        for (i, (path, r)) in self.results.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", path.display())?;
            match r {
                Ok(a) if a.matches.is_empty() => {
                    write!(f, "\n  no match ({} query features)", a.features)?
                }
                Ok(a) => {
                    if a.mirrored {
                        write!(f, "\n  (matched as a mirrored copy)")?;
                    }
                    for (rank, m) in a.matches.iter().enumerate() {
                        write!(f, "\n  {}. {}  votes {}", rank + 1, m.path, m.score)?;
                        if let Some(n) = m.inliers {
                            let unverified = if m.verified { "" } else { " (unverified)" };
                            write!(f, ", inliers {n}{unverified}")?;
                        }
                    }
                }
                Err(e) => write!(f, "\n  error: {e}")?,
            }
        }
        Ok(())
    }
}

/// `indexer info`: a generation's metadata, its size by database and its failed images.
pub struct InfoReport<'a> {
    /// The opened generation.
    pub index: &'a Index,
    /// Failed images with their reasons.
    pub failed: Vec<(String, String)>,
    /// Bytes per database.
    pub database_bytes: Vec<(&'static str, u64)>,
}

impl InfoReport<'_> {
    /// The same as JSON (`--json`).
    pub fn to_json(&self) -> serde_json::Value {
        let idx = self.index;
        let dbs: serde_json::Map<String, serde_json::Value> = self
            .database_bytes
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
        let failed: Vec<serde_json::Value> = self
            .failed
            .iter()
            .map(|(path, reason)| serde_json::json!({"path": path, "reason": reason}))
            .collect();
        serde_json::json!({
            "generation": idx.generation,
            "path": idx.dir,
            "diskBytes": idx.disk_bytes(),
            "databaseBytes": dbs,
            "lists": idx.lists().stats(),
            "meta": idx.meta,
            "failed": failed,
        })
    }
}

impl Display for InfoReport<'_> {
    fn fmt(&self, f: &mut Formatter) -> fmt::Result {
        let idx = self.index;
        let m = &idx.meta;
        writeln!(
            f,
            "generation {} at {} ({} MiB)",
            idx.generation,
            idx.dir.display(),
            idx.disk_bytes() >> 20
        )?;
        writeln!(
            f,
            "preset {} ({} features, {} trees); built {} → {}",
            m.preset, m.preset.nfeatures, m.preset.n_trees, m.started_at, m.finished_at
        )?;
        writeln!(
            f,
            "images {} indexed, {} failed of {}; {} descriptors; fingerprint {}",
            m.images_indexed, m.images_failed, m.images_total, m.descriptors, m.fingerprint
        )?;
        let per = |b: u64| b as f64 / m.descriptors.max(1) as f64;
        let parts: Vec<String> = self
            .database_bytes
            .iter()
            .map(|(k, b)| format!("{k} {:.1}", per(*b)))
            .collect();
        writeln!(
            f,
            "bytes per descriptor: {:.1} on disk ({})",
            per(idx.disk_bytes()),
            parts.join(", ")
        )?;
        let l = idx.lists().stats();
        write!(
            f,
            "lists: {} in {} cells; entries per list mean {:.0}, median {}, p99 {}, max {}; an entry's list holds {:.0} on average",
            l.lists, l.cells, l.mean, l.p50, l.p99, l.max, l.entry_weighted_mean
        )?;
        for (path, reason) in &self.failed {
            write!(f, "\n  failed: {path}: {reason}")?;
        }
        Ok(())
    }
}
