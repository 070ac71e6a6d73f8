//! The synthetic benchmark: ORB-like clustered binary descriptors at sizes no sample dataset
//! reaches (1M … 16M+), built inside a real cgroup memory limit, then looked up through the
//! inverted lists and through arroy.

use super::child;
use super::stats::{mean, mib, percentile};
use crate::features::{Descriptor, Features};
use crate::lists::{Hit, Probe};
use crate::search::{Index, SearchParams};
use rand::{RngExt, SeedableRng};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Descriptors per synthetic image.
pub const PER_IMAGE: u32 = 1000;
/// Cluster centres the descriptors are drawn around.
pub const CLUSTERS: u32 = 4096;
/// Probability a member's bit differs from its centre (ORB descriptors of different
/// keypoints that look alike sit ~60–70 bits apart).
pub const MEMBER_FLIP: f64 = 0.13;
/// Probability a query's bit differs from the stored descriptor it copies (a true match
/// under viewpoint/JPEG changes sits ~20–30 bits away).
pub const QUERY_FLIP: f64 = 0.10;

/// A deterministic generator of ORB-like descriptors.
pub struct Generator {
    centres: Vec<Descriptor>,
    seed: u64,
}

impl Generator {
    /// A generator with its cluster centres.
    pub fn new(seed: u64) -> Self {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let centres = (0..CLUSTERS)
            .map(|_| std::array::from_fn(|_| rng.random()))
            .collect();
        Generator { centres, seed }
    }

    /// The descriptors of synthetic image `image`.
    pub fn image(&self, image: u32) -> Vec<Descriptor> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            self.seed ^ (image as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        (0..PER_IMAGE)
            .map(|_| {
                let c = self.centres[rng.random_range(0..self.centres.len())];
                flip(c, MEMBER_FLIP, &mut rng)
            })
            .collect()
    }
}

fn flip(mut d: Descriptor, p: f64, rng: &mut rand_chacha::ChaCha8Rng) -> Descriptor {
    for bit in 0..256 {
        if rng.random_bool(p) {
            d[bit / 8] ^= 1 << (bit % 8);
        }
    }
    d
}

/// One row of the synthetic table.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SyntheticRow {
    /// Descriptors indexed.
    pub descriptors: u64,
    /// Exit code of the build (137 = killed).
    pub exit_code: i32,
    /// Build seconds (wall).
    pub build_s: f64,
    /// Peak working set (bytes).
    pub peak_working_set: u64,
    /// Peak anonymous RSS (bytes).
    pub peak_rss_anon: u64,
    /// VmHWM (bytes).
    pub peak_rss: u64,
    /// OOM kills in the build's cgroup.
    pub oom_kills: u64,
    /// Disk bytes per descriptor.
    pub disk_per_descriptor: f64,
    /// Single-descriptor lookups per second, inverted lists.
    pub ivf_lookups_per_s: f64,
    /// Recall@1 of single-descriptor lookups, inverted lists.
    pub ivf_recall: f64,
    /// Single-descriptor lookups per second, arroy.
    pub arroy_lookups_per_s: f64,
    /// Recall@1 of single-descriptor lookups, arroy.
    pub arroy_recall: f64,
    /// 1000-descriptor query images: p50 / p95 ms (inverted lists, no verification).
    pub image_query_ms: (f64, f64),
    /// Image-level recall@1 of those queries.
    pub image_recall: f64,
}

/// Builds `n` descriptors under `limit` in a child process and measures the index.
pub fn run_size(
    work: &Path,
    n: u64,
    limit: Option<u64>,
    preset: &str,
    queries: usize,
    nprobe: usize,
    reuse: bool,
) -> anyhow::Result<SyntheticRow> {
    let out: PathBuf = work.join(format!("syn-{n}"));
    if reuse && Index::open(&out).is_ok() {
        // Measure queries on the index a previous run built (its build figures are not
        // re-measured).
        return measure(
            &out,
            n,
            SyntheticRow {
                descriptors: n,
                ..Default::default()
            },
            queries,
            nprobe,
        );
    }
    let _ = std::fs::remove_dir_all(&out);
    let args = vec![
        "build-synthetic".to_string(),
        "--out".into(),
        out.display().to_string(),
        "--descriptors".into(),
        n.to_string(),
        "--preset".into(),
        preset.to_string(),
    ];
    let built = child::run_build(&args, limit, &out)?;
    let row = SyntheticRow {
        descriptors: n,
        exit_code: built.exit_code,
        build_s: built.seconds,
        peak_working_set: built.peak_working_set,
        peak_rss_anon: built.peak_rss_anon,
        peak_rss: built.peak_rss,
        oom_kills: built.oom_kills,
        ..Default::default()
    };
    if built.exit_code != 0 {
        return Ok(row);
    }
    measure(&out, n, row, queries, nprobe)
}

fn measure(
    out: &Path,
    n: u64,
    mut row: SyntheticRow,
    queries: usize,
    nprobe: usize,
) -> anyhow::Result<SyntheticRow> {
    let index = Index::open(out)?;
    row.descriptors = index.meta.descriptors;
    row.disk_per_descriptor = index.disk_bytes() as f64 / index.meta.descriptors.max(1) as f64;
    let generator = Generator::new(1);
    let images = (n / PER_IMAGE as u64) as u32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
    // Single-descriptor lookups: a stored descriptor with bits flipped must find itself.
    let mut singles: Vec<(u32, Descriptor)> = Vec::with_capacity(queries);
    for _ in 0..queries {
        let img = rng.random_range(0..images.max(1));
        let j = rng.random_range(0..PER_IMAGE);
        let d = generator.image(img)[j as usize];
        singles.push((img * PER_IMAGE + j, flip(d, QUERY_FLIP, &mut rng)));
    }
    // Steady state, not a cold page cache: touch every list and shard once first.
    warm_up(&index)?;
    let (ivf_rate, ivf_recall) = single_lookups(&index, &singles, nprobe)?;
    row.ivf_lookups_per_s = ivf_rate;
    row.ivf_recall = ivf_recall;
    // Query images: 60% of an image's descriptors perturbed + 40% unrelated ones.
    let mut lat = Vec::new();
    let mut hits = 0;
    let image_queries = 30.min(images as usize);
    for _ in 0..image_queries {
        let img = rng.random_range(0..images.max(1));
        let src = generator.image(img);
        let mut descriptors: Vec<Descriptor> = src
            .iter()
            .take(600)
            .map(|d| flip(*d, QUERY_FLIP, &mut rng))
            .collect();
        descriptors.extend((0..400).map(|_| std::array::from_fn(|_| rng.random())));
        let f = Features {
            width: 640,
            height: 480,
            work_width: 640,
            work_height: 480,
            adaptation: Default::default(),
            keypoints: vec![[0, 0]; descriptors.len()],
            descriptors,
            global: None,
            format: crate::imageguard::Format::Jpeg,
        };
        let t = Instant::now();
        let (matches, _, _) = index.search_features(
            &f,
            &SearchParams {
                k: 5,
                verify: false,
                probe: probe(nprobe),
                ..Default::default()
            },
        )?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        hits += usize::from(matches.first().is_some_and(|m| m.id == img));
    }
    row.image_query_ms = (percentile(&lat, 50.0), percentile(&lat, 95.0));
    row.image_recall = hits as f64 / image_queries.max(1) as f64;
    let _ = mean(&lat);
    Ok(row)
}

/// Reads the index file once so that lookups are measured with the pages in memory (the
/// build handed them back to the kernel).
fn warm_up(index: &Index) -> std::io::Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(index.dir.join("data.mdb"))?;
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

/// The closest stored descriptor to one query descriptor.
fn nearest(
    index: &Index,
    d: &Descriptor,
    params: &SearchParams,
) -> crate::error::Result<Option<Hit>> {
    let best = index.lookup(std::slice::from_ref(d), params)?;
    Ok(best.first().map(|b| b[0]).filter(|h| h.dist != u32::MAX))
}

fn probe(lists: usize) -> Probe {
    Probe {
        cells: crate::search::DEFAULT_CELLS.min(lists.max(1)),
        lists: lists.max(1),
    }
}

fn single_lookups(
    index: &Index,
    singles: &[(u32, Descriptor)],
    nprobe: usize,
) -> anyhow::Result<(f64, f64)> {
    let params = SearchParams {
        k: 1,
        verify: false,
        probe: probe(nprobe),
        ..Default::default()
    };
    let t = Instant::now();
    let mut hits = 0;
    for (id, d) in singles {
        let best = nearest(index, d, &params)?;
        // Synthetic image i's descriptor j is stored at keypoint (j % 640, j / 640) × 4.
        let (image, j) = (id / PER_IMAGE, id % PER_IMAGE);
        let kp = [(j % 640) as u16 * 4, (j / 640) as u16 * 4];
        hits += usize::from(best.is_some_and(|h| h.image == image && h.kp == kp));
    }
    let secs = t.elapsed().as_secs_f64();
    Ok((
        singles.len() as f64 / secs.max(1e-9),
        hits as f64 / singles.len().max(1) as f64,
    ))
}

/// The rows as a table under the build limit they ran with, and how the peak working set
/// grew from the first size to the last.
pub struct SyntheticTable<'a> {
    /// Measured sizes.
    pub rows: &'a [SyntheticRow],
    /// The builds' memory limit.
    pub limit: Option<u64>,
}

impl std::fmt::Display for SyntheticTable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let rows = self.rows;
        writeln!(
            f,
            "synthetic ORB-like descriptors, build limit {}",
            self.limit.map_or("none".to_string(), |l| format!(
                "{} MiB (real cgroup)",
                l >> 20
            ))
        )?;
        write!(
            f,
            "{:>12} {:>5} {:>9} {:>10} {:>10} {:>9} {:>4} {:>9} {:>12} {:>8} {:>12} {:>8} {:>15} {:>8}",
            "descriptors",
            "exit",
            "build s",
            "peak WS",
            "RssAnon",
            "VmHWM",
            "OOM",
            "B/desc",
            "ivf lookup/s",
            "ivf r@1",
            "arroy look/s",
            "arroy r@1",
            "img p50/p95 ms",
            "img r@1"
        )?;
        for r in rows {
            writeln!(f)?;
            write!(
                f,
                "{:>12} {:>5} {:>9.1} {:>10} {:>10} {:>9} {:>4} {:>9.1} {:>12.0} {:>8.3} {:>12.0} {:>8.3} {:>15} {:>8.3}",
                r.descriptors,
                r.exit_code,
                r.build_s,
                mib(r.peak_working_set),
                mib(r.peak_rss_anon),
                mib(r.peak_rss),
                r.oom_kills,
                r.disk_per_descriptor,
                r.ivf_lookups_per_s,
                r.ivf_recall,
                r.arroy_lookups_per_s,
                r.arroy_recall,
                format!("{:.1}/{:.1}", r.image_query_ms.0, r.image_query_ms.1),
                r.image_recall
            )?;
        }
        if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
            if first.peak_working_set > 0 && rows.len() > 1 {
                writeln!(f)?;
                write!(
                    f,
                    "peak working set {}x from {} to {} descriptors (ivf is {:.0}x arroy's lookup rate at {})",
                    format_args!("{:.2}", last.peak_working_set as f64 / first.peak_working_set as f64),
                    first.descriptors,
                    last.descriptors,
                    last.ivf_lookups_per_s / last.arroy_lookups_per_s.max(1e-9),
                    last.descriptors
                )?;
            }
        }
        Ok(())
    }
}
