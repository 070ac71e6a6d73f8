//! Indexes of generated descriptors, through the build's own phases, checkpoints and
//! publish: a whole index of them (`indexer build-synthetic`, for sizes no sample dataset
//! reaches) or [`Padding`] after a real catalogue's images (`indexer build --pad N
//! --pad-kind real|synthetic`, so that real queries run inside a large index).

use super::synthetic::{Generator, PER_IMAGE};
use crate::build::{self, BuildContext, BuildSummary, ExtraImages};
use crate::dataset;
use crate::error::{IndexError, Result};
use crate::features::{Descriptor, DESCRIPTOR_BYTES};
use crate::layout::IndexDir;
use crate::progress::BuildPhase;
use crate::store::{self, BuildMeta, ImageRecord, Store, Timings, WorkStore};
use imageindex_crds::estimate::{self, BuildPlan};
use imageindex_crds::preset::Preset;
use std::time::Instant;

/// Writes the records of synthetic images `first..first + source.images` (resuming from the
/// `synthetic_next` metadata key), in batched write transactions.
fn ingest(
    store: &Store,
    work: &WorkStore,
    first: u32,
    source: &SyntheticSource,
    preset: &Preset,
    plan: &BuildPlan,
    ctx: &BuildContext,
) -> Result<()> {
    let end = first + source.images;
    let next: u32 = {
        let rtxn = store.env.read_txn()?;
        store.get_json(&rtxn, "synthetic_next")?.unwrap_or(first)
    };
    let mut wtxn = store.env.write_txn()?;
    let mut work_txn = work.env.write_txn()?;
    let mut bytes = 0u64;
    for i in next.max(first)..end {
        if ctx.progress.is_cancelled() {
            store.put_json(&mut wtxn, "synthetic_next", &i)?;
            work_txn.commit()?;
            wtxn.commit()?;
            return Err(IndexError::Interrupted);
        }
        let descs = (source.generate)(i - first)?;
        let kps: Vec<[u16; 2]> = (0..descs.len())
            .map(|j| [(j % 640) as u16 * 4, (j / 640) as u16 * 4])
            .collect();
        let mut rec: ImageRecord = store.images.get(&wtxn, &i)?.unwrap_or_default();
        if rec.path.is_empty() {
            rec.path = format!("synthetic/{:08}", i - first);
        }
        rec.count = descs.len() as u32;
        rec.extracted_with = preset.nfeatures;
        (rec.width, rec.height, rec.work_width, rec.work_height) = (640, 480, 640, 480);
        store.images.put(&mut wtxn, &i, &rec)?;
        let d = store::descriptors_blob(&descs);
        bytes += d.len() as u64;
        work.descs.put(&mut work_txn, &i, &d)?;
        work.kps
            .put(&mut work_txn, &i, &store::keypoints_blob(&kps))?;
        ctx.progress.image_done(descs.len() as u64, false);
        if bytes >= plan.write_batch_bytes {
            store.put_json(&mut wtxn, "synthetic_next", &(i + 1))?;
            // Descriptors first: a crash between the two commits only redoes images.
            work_txn.commit()?;
            wtxn.commit()?;
            wtxn = store.env.write_txn()?;
            work_txn = work.env.write_txn()?;
            bytes = 0;
        }
    }
    store.put_json(&mut wtxn, "synthetic_next", &end)?;
    work_txn.commit()?;
    wtxn.commit()?;
    Ok(())
}

/// A build from generated descriptors instead of images (for benchmarks at sizes no sample
/// dataset reaches): `images` groups of `per_image` descriptors from `generate(image)`.
pub struct SyntheticSource<'a> {
    /// Number of synthetic images.
    pub images: u32,
    /// Descriptors per image.
    pub per_image: u32,
    /// Makes the descriptors of one image (deterministic).
    pub generate: &'a (dyn Fn(u32) -> Result<Vec<crate::features::Descriptor>> + Sync),
    /// Identifies the generated set (its fingerprint).
    pub fingerprint: String,
}

/// Builds and publishes an index of synthetic descriptors through the same index phases,
/// checkpoints and publish step as an image build.
pub fn run_synthetic(
    out: &std::path::Path,
    source: &SyntheticSource,
    preset: &Preset,
    ctx: &BuildContext,
) -> Result<BuildSummary> {
    let started_at = build::now_rfc3339();
    let dir = IndexDir::new(out);
    let _lock = dir.lock()?;
    let budget = ctx.memory.limit();
    let shape = estimate::DatasetShape {
        images: source.images as u64,
        bytes: 0,
        max_width: 640,
        max_height: 480,
        max_is_jpeg: true,
    };
    let plan = build::plan_for(preset, &shape, budget, false)?;
    let listing = dataset::Listing {
        files: (0..source.images)
            .map(|i| dataset::FileEntry {
                path: format!("synthetic/{i:08}"),
                bytes: 0,
                mtime: 0,
            })
            .collect(),
        skipped: Vec::new(),
        fingerprint: source.fingerprint.clone(),
    };
    let (store, work, resumed) = build::open_or_reset(&dir.build_dir(), &listing, preset)?;
    drop(listing);
    let governor = build::MemoryGovernor::start(
        ctx.memory.clone(),
        &plan,
        Some(store.env.path().to_path_buf()),
    );
    ctx.progress.set_total(source.images as u64);
    ctx.progress.set_phase(BuildPhase::Extract);
    let mut timings = Timings::default();
    let t = Instant::now();
    ingest(&store, &work, 0, source, preset, &plan, ctx)?;
    build::enter_training(&store, preset)?;
    timings.extract = t.elapsed().as_secs_f64();
    ctx.progress.set_phase(BuildPhase::Index);
    let (stats, store) =
        build::index_phases(store, &work, preset, &plan, ctx, &mut timings, &governor)?;
    ctx.progress.set_phase(BuildPhase::Publish);
    let generation = dir.next_generation()?;
    let meta = BuildMeta {
        format_version: store::FORMAT_VERSION,
        generation,
        preset: *preset,
        dataset: "synthetic".into(),
        shard: None,
        fingerprint: source.fingerprint.clone(),
        images_total: source.images as u64,
        images_indexed: source.images as u64,
        images_failed: 0,
        descriptors: stats.descriptors,
        cells: stats.cells,
        lists: stats.lists,
        globals: stats.globals,
        memory_budget: budget,
        peak_working_set: governor.peak_working_set(),
        started_at,
        finished_at: build::now_rfc3339(),
        timings,
        indexer_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let path = build::publish::run(&dir, &store, work, &meta, &dataset::Listing::default())?;
    ctx.progress.set_phase(BuildPhase::Done);
    let memory = governor.memory();
    Ok(BuildSummary {
        generation,
        path,
        meta,
        resumed,
        extracted_now: 0,
        memory,
    })
}

/// Where padding descriptors come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PadKind {
    /// The catalogue's own extracted descriptors, each moved by 40 to 56 random bits: the
    /// padding fills the vocabulary's cells as unevenly as real ORB does.
    Real,
    /// Clustered random descriptors: evenly spread, kinder to the lists.
    Synthetic,
}

/// Bits flipped in each real descriptor copied into padding (uniform in this range): far
/// enough from the original that it is another photo's descriptor, not a near-duplicate (a
/// true match under attack sits ~20–40 bits away), close enough to stay in its cell.
pub const REAL_PAD_FLIPS: std::ops::RangeInclusive<u32> = 40..=56;

/// Filler images after a catalogue's: `descriptors` descriptors in images of
/// [`PER_IMAGE`], real-derived or synthetic (seed 7, so every padded build pads alike).
pub struct Padding {
    descriptors: u64,
    kind: PadKind,
    generator: Generator,
}

impl Padding {
    /// Padding of `descriptors` descriptors (rounded up to whole images).
    pub fn new(descriptors: u64, kind: PadKind) -> Padding {
        Padding {
            descriptors,
            kind,
            generator: Generator::new(7),
        }
    }
}

/// The descriptors of real-derived padding image `i`: [`PER_IMAGE`] descriptors taken from
/// catalogue images in turn (from a pseudo-random start), each moved by a few dozen random
/// bits.
fn real_pad_image(work: &WorkStore, real_images: u32, i: u32) -> Result<Vec<Descriptor>> {
    use rand::{RngExt, SeedableRng};
    let mut out: Vec<Descriptor> = Vec::with_capacity(PER_IMAGE as usize);
    if real_images == 0 {
        return Ok(out);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7 ^ (i as u64) << 20);
    let rtxn = work.env.read_txn()?;
    let start = (i as u64).wrapping_mul(0x9E37_79B9) % real_images as u64;
    for step in 0..real_images as u64 {
        let src = ((start + step) % real_images as u64) as u32;
        let Some(blob) = work.descs.get(&rtxn, &src)? else {
            continue;
        };
        for c in blob.chunks_exact(DESCRIPTOR_BYTES) {
            if out.len() == PER_IMAGE as usize {
                return Ok(out);
            }
            let mut d: Descriptor = [0; DESCRIPTOR_BYTES];
            d.copy_from_slice(c);
            let flips = rng.random_range(REAL_PAD_FLIPS);
            let mut flipped = 0;
            while flipped < flips {
                let bit = rng.random_range(0..256usize);
                let mask = 1u8 << (bit % 8);
                // Each bit at most once, so the distance is exactly `flips`.
                if (d[bit / 8] ^ c[bit / 8]) & mask == 0 {
                    d[bit / 8] ^= mask;
                    flipped += 1;
                }
            }
            out.push(d);
        }
    }
    Ok(out)
}

impl ExtraImages for Padding {
    fn fingerprint_suffix(&self) -> String {
        match self.kind {
            PadKind::Synthetic => format!("+pad{}", self.descriptors),
            PadKind::Real => format!("+realpad{}", self.descriptors),
        }
    }

    fn ingest(
        &self,
        store: &Store,
        work: &WorkStore,
        first: u32,
        preset: &Preset,
        plan: &BuildPlan,
        ctx: &BuildContext,
    ) -> Result<()> {
        let synthetic = |i: u32| Ok(self.generator.image(i));
        let real = |i: u32| real_pad_image(work, first, i);
        let generate: &(dyn Fn(u32) -> Result<Vec<Descriptor>> + Sync) = match self.kind {
            PadKind::Synthetic => &synthetic,
            PadKind::Real => &real,
        };
        let source = SyntheticSource {
            images: self.descriptors.div_ceil(PER_IMAGE as u64) as u32,
            per_image: PER_IMAGE,
            generate,
            fingerprint: String::new(),
        };
        ingest(store, work, first, &source, preset, plan, ctx)
    }
}
