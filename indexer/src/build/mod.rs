//! `indexer build`: list the dataset, extract ORB features under a memory budget, build the
//! vocabulary, inverted lists and global-descriptor index, and publish a generation
//! atomically — resumable at
//! every step from the checkpoint in `IDX/build/`.

mod extract;
mod governor;
mod index;
pub(crate) mod publish;

pub use governor::MemoryGovernor;

use crate::dataset;
use crate::error::{IndexError, Result};
use crate::layout::IndexDir;
use crate::memory::MemorySource;
use crate::progress::{BuildPhase, BuildProgress};
use crate::store::{self, BuildMeta, Checkpoint, ImageRecord, Store, Timings, WorkStore};
use imageindex_crds::estimate::{self, BuildPlan};
use imageindex_crds::policy;
use imageindex_crds::preset::{Preset, PresetSelector};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The dataset directory.
    pub dataset: PathBuf,
    /// The index directory.
    pub out: PathBuf,
    /// `auto` or a preset label.
    pub preset: PresetRequest,
    /// Extraction threads.
    pub threads: usize,
    /// Refuse to start when the preset's estimate exceeds the budget (instead of trying).
    pub strict_memory: bool,
    /// Headers sampled to learn the largest image.
    pub sample: usize,
    /// Bytes of one in-memory part of a cell's lists instead of the plan's (tests: cells
    /// split into many parts from a small catalogue).
    pub list_part_bytes: Option<u64>,
    /// Build only this shard's images (absent: the whole dataset).
    pub shard: Option<crate::shard::Shard>,
}

/// The preset asked for: auto, or a label of the ladder (`full`, `xlarge-nf50`, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresetRequest {
    /// Let the policy choose from the dataset and the budget.
    Auto,
    /// This step of the ladder.
    Exact(Preset),
}

impl PresetRequest {
    /// Parses `auto` or a preset label.
    pub fn parse(text: &str) -> Option<PresetRequest> {
        if PresetSelector::parse(text) == Some(PresetSelector::Auto) {
            return Some(PresetRequest::Auto);
        }
        Preset::from_label(text.trim()).map(PresetRequest::Exact)
    }
}

/// What a finished build reports.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildSummary {
    /// The published generation.
    pub generation: u64,
    /// Its directory.
    pub path: PathBuf,
    /// The metadata stored in it.
    pub meta: BuildMeta,
    /// Whether the build resumed from a checkpoint.
    pub resumed: bool,
    /// Images extracted by this run (not taken from the checkpoint).
    pub extracted_now: u64,
    /// Memory peaks of this run.
    pub memory: BuildMemory,
}

/// Memory peaks of a build run, as sampled by its governor and read from `/proc`.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildMemory {
    /// Highest cgroup working set (or RSS outside a cgroup).
    pub peak_working_set: u64,
    /// VmHWM: the process's peak resident set.
    pub peak_rss: u64,
    /// Highest anonymous resident memory sampled.
    pub peak_rss_anon: u64,
    /// Times LMDB's clean pages were handed back to the kernel.
    pub reclaims: u64,
}

/// Shared services of a build: progress, memory, cancellation.
#[derive(Clone)]
pub struct BuildContext {
    /// The one source of progress.
    pub progress: Arc<BuildProgress>,
    /// Memory readings and the budget.
    pub memory: Arc<MemorySource>,
}

/// Images a build adds after its dataset's, before the index phases (the benchmarks pad a
/// real catalogue with generated descriptors to measure queries inside a large index).
pub trait ExtraImages {
    /// Appended to the dataset's fingerprint, so that a build with other extras is not
    /// resumed as this one.
    fn fingerprint_suffix(&self) -> String;
    /// Writes the extra images' records and descriptors under ids from `first` on, resuming
    /// where an earlier run stopped.
    fn ingest(
        &self,
        store: &Store,
        work: &WorkStore,
        first: u32,
        preset: &Preset,
        plan: &BuildPlan,
        ctx: &BuildContext,
    ) -> Result<()>;
}

/// Runs a build to completion (or to an error with the checkpoint intact).
pub fn run(opts: &BuildOptions, ctx: &BuildContext) -> Result<BuildSummary> {
    run_with_extra(opts, ctx, None)
}

/// [`run`], adding `extra`'s images after the dataset's.
pub fn run_with_extra(
    opts: &BuildOptions,
    ctx: &BuildContext,
    extra: Option<&dyn ExtraImages>,
) -> Result<BuildSummary> {
    run_inner(opts, ctx, extra).map_err(|e| e.or_no_space(&opts.out))
}

fn run_inner(
    opts: &BuildOptions,
    ctx: &BuildContext,
    extra: Option<&dyn ExtraImages>,
) -> Result<BuildSummary> {
    let started = Instant::now();
    let started_at = now_rfc3339();
    let dir = IndexDir::new(&opts.out);
    let _lock = dir.lock()?;
    ctx.progress.set_phase(BuildPhase::Scan);
    let mut listing = dataset::list(&opts.dataset)?;
    if let Some(shard) = opts.shard {
        listing.keep_shard(shard);
    }
    if let Some(extra) = extra {
        listing.fingerprint.push_str(&extra.fingerprint_suffix());
    }
    let shape = dataset::shape(&opts.dataset, &listing, opts.sample).shape;
    let budget = ctx.memory.limit();
    let preset = match opts.preset {
        PresetRequest::Exact(p) => p,
        PresetRequest::Auto => policy::auto_preset(&shape, budget, None).unwrap_or_else(|| {
            *Preset::ladder()
                .last()
                .unwrap_or(&imageindex_crds::PresetName::Xlarge.preset())
        }),
    };
    let mut plan = plan_for(&preset, &shape, budget, opts.strict_memory)?;
    if let Some(bytes) = opts.list_part_bytes {
        plan.list_part_bytes = bytes.max(1);
    }
    ctx.progress.set_preset(preset);
    tracing::info!(
        preset = %preset,
        images = listing.files.len(),
        skipped = listing.skipped.len(),
        budget_mib = budget >> 20,
        image_mib = plan.image_bytes >> 20,
        list_part_mib = plan.list_part_bytes >> 20,
        "build planned"
    );
    let scan_secs = started.elapsed().as_secs_f64();

    let build_dir = dir.build_dir();
    if let Some(summary) = adopt_unswitched(&dir, &listing, &preset)? {
        return Ok(summary);
    }
    let (store, work, resumed) = open_or_reset(&build_dir, &listing, &preset)?;
    let governor = MemoryGovernor::start(
        ctx.memory.clone(),
        &plan,
        Some(store.env.path().to_path_buf()),
    );
    let mut timings = {
        let rtxn = store.env.read_txn()?;
        store
            .get_json::<Timings>(&rtxn, "timings")?
            .unwrap_or_default()
    };
    timings.scan += scan_secs;

    ctx.progress
        .set_total((listing.files.len() + listing.skipped.len()) as u64);
    let t = Instant::now();
    let extracted_now = extract::run(
        &store,
        &work,
        opts,
        &preset,
        &plan,
        listing.skipped.len() as u64,
        ctx,
    )?;
    timings.extract += t.elapsed().as_secs_f64();
    governor.step_done("extract");
    if let Some(extra) = extra {
        extra.ingest(
            &store,
            &work,
            listing.files.len() as u32,
            &preset,
            &plan,
            ctx,
        )?;
        governor.step_done("ingest");
    }
    // Extraction's buffers and pages are done with: the index phases start from a clean slate.
    governor.release_now();
    save_timings(&store, &timings)?;

    ctx.progress.set_phase(BuildPhase::Index);
    let (index_stats, store) =
        index_phases(store, &work, &preset, &plan, ctx, &mut timings, &governor)?;
    save_timings(&store, &timings)?;

    ctx.progress.set_phase(BuildPhase::Publish);
    let t = Instant::now();
    let generation = dir.next_generation()?;
    let (images_indexed, images_failed) = count_images(&store)?;
    let meta = BuildMeta {
        format_version: store::FORMAT_VERSION,
        generation,
        preset,
        dataset: opts.dataset.display().to_string(),
        shard: opts.shard,
        fingerprint: listing.fingerprint.clone(),
        images_total: listing.files.len() as u64 + listing.skipped.len() as u64,
        images_indexed,
        images_failed: images_failed + listing.skipped.len() as u64,
        descriptors: index_stats.descriptors,
        cells: index_stats.cells,
        lists: index_stats.lists,
        globals: index_stats.globals,
        memory_budget: budget,
        peak_working_set: governor.peak_working_set(),
        started_at,
        finished_at: now_rfc3339(),
        timings: Timings {
            publish: 0.0,
            ..timings.clone()
        },
        indexer_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let path = publish::run(&dir, &store, work, &meta, &listing)?;
    let mut meta = meta;
    meta.timings.publish = t.elapsed().as_secs_f64();
    ctx.progress.set_phase(BuildPhase::Done);
    let memory = governor.memory();
    drop(governor);
    Ok(BuildSummary {
        generation,
        path,
        meta,
        resumed,
        extracted_now,
        memory,
    })
}

/// Plans the budget; with `strict`, a preset that does not fit is an error, otherwise the
/// build tries with the smallest plan (the operator downgrades if the kernel disagrees).
pub fn plan_for(
    preset: &Preset,
    shape: &estimate::DatasetShape,
    budget: u64,
    strict: bool,
) -> Result<BuildPlan> {
    match estimate::plan(preset, shape, budget) {
        Ok(p) => Ok(p),
        Err(e) if strict => Err(e.into()),
        Err(e) => {
            tracing::warn!(preset = %preset, needed_mib = e.needed >> 20, budget_mib = budget >> 20,
                "the preset is estimated not to fit the memory budget; trying with one image in flight");
            Ok(estimate::plan(preset, shape, e.needed).map(|mut p| {
                p.budget = budget;
                p.reclaim_at = budget * 60 / 100;
                p
            })?)
        }
    }
}

/// Finishes a publish that was killed between renaming the build into its generation directory
/// and switching `current`: a generation newer than `current`, with no build in progress, built
/// from the same dataset with the same preset, is switched to instead of built again.
fn adopt_unswitched(
    dir: &IndexDir,
    listing: &dataset::Listing,
    preset: &Preset,
) -> Result<Option<BuildSummary>> {
    if dir.build_dir().join("data.mdb").exists() {
        return Ok(None);
    }
    let Some(&last) = dir.generations()?.last() else {
        return Ok(None);
    };
    if dir.current().is_some_and(|(n, _)| n >= last) {
        return Ok(None);
    }
    let path = dir.generation_dir(last);
    let meta: Option<BuildMeta> = {
        let store = Store::open_read_only(&path)?;
        let meta = {
            let rtxn = store.env.read_txn()?;
            store.get_json(&rtxn, store::keys::BUILD)?
        };
        store.close();
        meta
    };
    let Some(meta) = meta.filter(|m| {
        m.fingerprint == listing.fingerprint && m.preset == *preset && m.generation == last
    }) else {
        return Ok(None);
    };
    tracing::info!(
        generation = last,
        "switching to a generation whose publish was interrupted"
    );
    dir.switch_current(last)?;
    dir.prune()?;
    Ok(Some(BuildSummary {
        generation: last,
        path,
        meta,
        resumed: true,
        extracted_now: 0,
        memory: BuildMemory::default(),
    }))
}

/// Opens the in-progress build, discarding it when the dataset changed or when it was
/// extracted with fewer features than this preset wants.
pub(crate) fn open_or_reset(
    build_dir: &std::path::Path,
    listing: &dataset::Listing,
    preset: &Preset,
) -> Result<(Store, WorkStore, bool)> {
    let work_dir = build_dir.join(WORK_DIR);
    if build_dir.join("data.mdb").exists() {
        let store = Store::create(build_dir)?;
        let work = WorkStore::create(&work_dir)?;
        let rtxn = store.env.read_txn()?;
        let fingerprint: Option<String> = store.get_json(&rtxn, store::keys::FINGERPRINT)?;
        let checkpoint: Option<Checkpoint> = store.get_json(&rtxn, store::keys::CHECKPOINT)?;
        let poorer_extraction = store
            .images
            .iter(&rtxn)?
            .filter_map(|r| r.ok())
            .any(|(_, rec)| {
                rec.extracted_with != 0
                    && rec.extracted_with < preset.nfeatures
                    && rec.count >= rec.extracted_with
            });
        drop(rtxn);
        if fingerprint.as_deref() == Some(listing.fingerprint.as_str())
            && checkpoint.is_some()
            && !poorer_extraction
        {
            tracing::info!(checkpoint = ?checkpoint, "resuming the build from its checkpoint");
            return Ok((store, work, true));
        }
        tracing::warn!(
            dataset_changed = fingerprint.as_deref() != Some(listing.fingerprint.as_str()),
            poorer_extraction,
            "discarding the previous in-progress build"
        );
        store.close();
        work.close();
        std::fs::remove_dir_all(build_dir).map_err(|e| IndexError::io(build_dir, e))?;
    }
    let store = Store::create(build_dir)?;
    let work = WorkStore::create(&work_dir)?;
    let mut wtxn = store.env.write_txn()?;
    for (i, f) in listing.files.iter().enumerate() {
        let rec = ImageRecord {
            path: f.path.clone(),
            bytes: f.bytes,
            mtime: f.mtime,
            ..Default::default()
        };
        store.images.put(&mut wtxn, &(i as u32), &rec)?;
    }
    store.put_json(&mut wtxn, store::keys::FINGERPRINT, &listing.fingerprint)?;
    store.set_checkpoint(&mut wtxn, &Checkpoint::Extract { next: 0 })?;
    wtxn.commit()?;
    Ok((store, work, false))
}

/// Runs the index phases to the end.
pub(crate) fn index_phases(
    store: Store,
    work: &WorkStore,
    preset: &Preset,
    plan: &BuildPlan,
    ctx: &BuildContext,
    timings: &mut Timings,
    governor: &MemoryGovernor,
) -> Result<(index::IndexStats, Store)> {
    // The index phases allocate large short-lived buffers (cells' lists, LMDB's dirty pages):
    // from here on they go back to the kernel when freed. Extraction keeps glibc's default,
    // which the presets' memory estimates were measured with.
    crate::memory::bound_heap();
    let stats = index::run(
        &store,
        work,
        preset,
        plan,
        ctx,
        timings,
        &|| governor.release_now(),
        &|step| governor.step_done(step),
    )?;
    Ok((stats, store))
}

/// The working environment's directory inside the build directory.
pub const WORK_DIR: &str = "work";

/// Moves the checkpoint from extraction to the index phases.
pub(crate) fn enter_training(store: &Store, preset: &Preset) -> Result<()> {
    let mut wtxn = store.env.write_txn()?;
    store.set_checkpoint(
        &mut wtxn,
        &Checkpoint::Train {
            preset: preset.label(),
        },
    )?;
    wtxn.commit()?;
    Ok(())
}

fn save_timings(store: &Store, t: &Timings) -> Result<()> {
    let mut wtxn = store.env.write_txn()?;
    store.put_json(&mut wtxn, "timings", t)?;
    wtxn.commit()?;
    Ok(())
}

fn count_images(store: &Store) -> Result<(u64, u64)> {
    let rtxn = store.env.read_txn()?;
    let (mut ok, mut failed) = (0, 0);
    for r in store.images.iter(&rtxn)? {
        let (_, rec) = r?;
        if rec.error.is_some() {
            failed += 1;
        } else if rec.count > 0 || rec.global {
            ok += 1;
        }
    }
    Ok((ok, failed))
}

/// The current time as RFC 3339.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
