//! The index phases, after extraction: keep at most `nfeatures` descriptors per image
//! (strongest first), train the vocabulary's top level, partition every kept descriptor into
//! its cell, then cell by cell train the cell's leaves and write its inverted lists, and last
//! build the arroy index of the images' global descriptors. Memory is bounded by the plan at
//! every step (one flush of partition buffers, one part of one cell, one arroy index over
//! one small vector per image), and every step commits its checkpoint.

use super::BuildContext;
use crate::error::{IndexError, Result};
use crate::features::DESCRIPTOR_BYTES;
use crate::global;
use crate::hamming::Words;
use crate::postings::{self, CellRecord, ENTRY_BYTES};
use crate::progress::IndexStep;
use crate::store::{self, Checkpoint, Store, Timings, WorkStore};
use crate::vocab::{self, VocabShape};
use arroy::distances::Cosine;
use imageindex_crds::estimate::BuildPlan;
use imageindex_crds::preset::Preset;
use rand::SeedableRng;
use rayon::prelude::*;
use std::time::Instant;

/// Images read per partition batch.
const PARTITION_BATCH_IMAGES: u32 = 256;
/// Seed of the vocabulary's training (fixed: equal inputs give equal indexes).
const TRAIN_SEED: u64 = 0x1D_1DE0;
/// Seed of the global-descriptor arroy index.
const GLOBAL_SEED: u64 = 0x61_0BA1;

/// What the index phases produced.
pub(crate) struct IndexStats {
    /// Descriptors in the inverted lists.
    pub descriptors: u64,
    /// Top-level cells of the vocabulary.
    pub cells: u32,
    /// Inverted lists (leaves).
    pub lists: u64,
    /// Images with a global descriptor.
    pub globals: u64,
}

fn checkpoint(store: &Store) -> Result<Checkpoint> {
    let rtxn = store.env.read_txn()?;
    Ok(store
        .get_json(&rtxn, store::keys::CHECKPOINT)?
        .unwrap_or(Checkpoint::Extract { next: 0 }))
}

fn commit_checkpoint(store: &Store, cp: &Checkpoint) -> Result<()> {
    let mut wtxn = store.env.write_txn()?;
    store.set_checkpoint(&mut wtxn, cp)?;
    wtxn.commit()?;
    Ok(())
}

/// Prefix sums of kept descriptor counts (one entry per image plus one).
fn offsets(store: &Store, preset: &Preset) -> Result<Vec<u64>> {
    let rtxn = store.env.read_txn()?;
    let mut out = vec![0u64];
    for r in store.images.iter(&rtxn)? {
        let (_, rec) = r?;
        let kept = if rec.error.is_some() {
            0
        } else {
            rec.count.min(preset.nfeatures)
        };
        out.push(out.last().copied().unwrap_or(0) + kept as u64);
    }
    Ok(out)
}

/// Calls `f(image, kept descriptors, their keypoints)` for the images `from..to` that kept any.
fn for_each_image(
    work: &WorkStore,
    offsets: &[u64],
    from: u32,
    to: u32,
    mut f: impl FnMut(u32, &[u8], &[u8]) -> Result<()>,
) -> Result<()> {
    let rtxn = work.env.read_txn()?;
    for id in from..to {
        if let Some((descs, kps)) = kept_of(work, &rtxn, offsets, id)? {
            f(id, descs, kps)?;
        }
    }
    Ok(())
}

/// The kept descriptors and keypoints of image `id` as stored (read through the memory map:
/// nothing is copied), or `None` when it kept none.
fn kept_of<'t>(
    work: &WorkStore,
    rtxn: &'t heed::RoTxn,
    offsets: &[u64],
    id: u32,
) -> Result<Option<(&'t [u8], &'t [u8])>> {
    let kept = (offsets[id as usize + 1] - offsets[id as usize]) as usize;
    if kept == 0 {
        return Ok(None);
    }
    let descs = work.descs.get(rtxn, &id)?.unwrap_or_default();
    let kps = work.kps.get(rtxn, &id)?.unwrap_or_default();
    let n = kept.min(descs.len() / DESCRIPTOR_BYTES).min(kps.len() / 4);
    Ok(Some((&descs[..n * DESCRIPTOR_BYTES], &kps[..n * 4])))
}

fn words_of(d: &[u8]) -> Words {
    std::array::from_fn(|i| u64::from_le_bytes(d[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8])))
}

fn bad(store: &Store, reason: &str) -> IndexError {
    IndexError::BadIndex {
        path: store.env.path().to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The fail point at the end of each batch of the partition, lists and global steps (the
/// resume tests hold a step there with `FAILPOINTS=index-step-batch=sleep(200)`).
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
pub const STEP_BATCH_FAIL_POINT: &str = "index-step-batch";

/// Runs (or resumes) the index phases. `release` hands LMDB's clean pages back to the
/// kernel; it is called between steps, when the pages the previous step read are no longer
/// needed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    store: &Store,
    work: &WorkStore,
    preset: &Preset,
    plan: &BuildPlan,
    ctx: &BuildContext,
    timings: &mut Timings,
    release: &dyn Fn(),
    step_done: &dyn Fn(&str),
) -> Result<IndexStats> {
    let label = preset.label();
    let mut cp = checkpoint(store)?;
    // A checkpoint from another preset's index phases: redo them (extraction is kept).
    if cp.preset().is_some_and(|p| p != label) {
        tracing::info!(from = ?cp, to = %label, "preset changed: rebuilding the index phases from the extracted features");
        cp = Checkpoint::Train {
            preset: label.clone(),
        };
        commit_checkpoint(store, &cp)?;
    }
    // A build resumed by a newer indexer whose working buckets had the older layout.
    let partitioned = matches!(cp, Checkpoint::Partition { .. } | Checkpoint::Lists { .. });
    if work.had_old_buckets && partitioned {
        tracing::info!(from = ?cp, "working buckets in the older layout: partitioning again");
        cp = Checkpoint::Train {
            preset: label.clone(),
        };
        commit_checkpoint(store, &cp)?;
    }
    let offsets = offsets(store, preset)?;
    let n_images = (offsets.len() - 1) as u32;
    let total = offsets.last().copied().unwrap_or(0);
    ctx.progress.set_descriptors(total);

    if matches!(cp, Checkpoint::Train { .. }) {
        let t = Instant::now();
        ctx.progress.start_step(IndexStep::Train, total);
        cp = train_top(store, work, &offsets, total, plan, &label)?;
        timings.train += t.elapsed().as_secs_f64();
        step_done("train");
    }
    let shape: VocabShape = {
        let rtxn = store.env.read_txn()?;
        store
            .get_json(&rtxn, store::keys::VOCAB_SHAPE)?
            .ok_or_else(|| bad(store, "no vocabulary shape"))?
    };
    if let Checkpoint::Partition { next, chunk, .. } = cp {
        let t = Instant::now();
        cp = partition(
            store, work, &offsets, n_images, total, next, chunk, plan, ctx, &label, release,
        )?;
        timings.assign += t.elapsed().as_secs_f64();
        step_done("partition");
        release();
    }
    if let Checkpoint::Lists { next, .. } = cp {
        let t = Instant::now();
        cp = lists(store, work, &shape, next, total, plan, ctx, &label, release)?;
        timings.assign += t.elapsed().as_secs_f64();
        step_done("lists");
        release();
    }
    if matches!(cp, Checkpoint::Global { .. }) {
        let t = Instant::now();
        global_index(store, preset, plan, ctx, &label)?;
        timings.global += t.elapsed().as_secs_f64();
        step_done("global");
    }
    let rtxn = store.env.read_txn()?;
    let mut leaves = 0u64;
    for r in store.cells.iter(&rtxn)? {
        let (_, bytes) = r?;
        leaves += CellRecord::from_bytes(bytes)
            .ok_or_else(|| bad(store, "cell record"))?
            .starts
            .len() as u64
            - 1;
    }
    Ok(IndexStats {
        descriptors: total,
        cells: shape.cells,
        lists: leaves,
        globals: store.globals.len(&rtxn)?,
    })
}

/// Trains the top level on a uniform sample of the kept descriptors.
fn train_top(
    store: &Store,
    work: &WorkStore,
    offsets: &[u64],
    total: u64,
    plan: &BuildPlan,
    label: &str,
) -> Result<Checkpoint> {
    let shape = VocabShape::for_descriptors(total, plan.leaf_len);
    let target = total
        .min(shape.cells as u64 * vocab::SAMPLES_PER_CENTROID)
        .min(plan.train_samples)
        .max(1);
    let mut samples: Vec<Words> = Vec::with_capacity(target as usize);
    let (mut next_pick, mut picked) = (0u64, 0u64);
    let n_images = (offsets.len() - 1) as u32;
    for_each_image(work, offsets, 0, n_images, |id, descs, _| {
        let first = offsets[id as usize];
        let count = (descs.len() / DESCRIPTOR_BYTES) as u64;
        while picked < target && next_pick < first + count {
            if next_pick >= first {
                let i = (next_pick - first) as usize * DESCRIPTOR_BYTES;
                samples.push(words_of(&descs[i..i + DESCRIPTOR_BYTES]));
            }
            picked += 1;
            next_pick = picked * total / target;
        }
        crate::memory::cool(descs);
        Ok(())
    })?;
    let top = vocab::train(
        &samples,
        shape.cells as usize,
        vocab::TOP_ITERATIONS,
        TRAIN_SEED,
    );
    // Real ORB crowds some cells as it crowds some leaves: prices keep every cell near the
    // mean, which bounds each cell's work in the lists step and each query's leaf scan.
    let top_prices = vocab::balance(&samples, &top, vocab::BALANCE_FACTOR, vocab::BALANCE_ROUNDS);
    drop(samples);
    let shape = VocabShape {
        cells: top.len() as u32,
        ..shape
    };
    // Buckets of an earlier attempt are stale: clear them before the checkpoint moves on.
    let mut work_txn = work.env.write_txn()?;
    work.buckets.clear(&mut work_txn)?;
    work_txn.commit()?;
    let mut wtxn = store.env.write_txn()?;
    store.meta.put(
        &mut wtxn,
        store::keys::VOCAB_TOP,
        &vocab::centroids_to_bytes(&top),
    )?;
    store.meta.put(
        &mut wtxn,
        store::keys::VOCAB_TOP_PRICES,
        &vocab::prices_to_bytes(&top_prices),
    )?;
    store.put_json(&mut wtxn, store::keys::VOCAB_SHAPE, &shape)?;
    store.lists.clear(&mut wtxn)?;
    store.cells.clear(&mut wtxn)?;
    let cp = Checkpoint::Partition {
        preset: label.to_string(),
        next: 0,
        chunk: 0,
    };
    store.set_checkpoint(&mut wtxn, &cp)?;
    wtxn.commit()?;
    tracing::info!(
        cells = shape.cells,
        leaf_len = shape.leaf_len,
        "vocabulary top level trained"
    );
    Ok(cp)
}

/// Routes every kept descriptor to its cell, appending entries to per-cell buckets in the
/// working environment in bounded flushes (key: flush number << 32 | cell).
#[allow(clippy::too_many_arguments)]
fn partition(
    store: &Store,
    work: &WorkStore,
    offsets: &[u64],
    n_images: u32,
    total: u64,
    next: u32,
    chunk: u32,
    plan: &BuildPlan,
    ctx: &BuildContext,
    label: &str,
    release: &dyn Fn(),
) -> Result<Checkpoint> {
    let (top, top_prices) = store.vocab_top(&*store.env.read_txn()?)?;
    ctx.progress.start_step(IndexStep::Partition, total);
    ctx.progress.set_step_done(offsets[next as usize]);
    let mut buffers: Vec<Vec<u8>> = vec![Vec::new(); top.len()];
    let (mut image, mut chunk) = (next, chunk);
    let mut cp = Checkpoint::Partition {
        preset: label.to_string(),
        next,
        chunk,
    };
    while image < n_images {
        if ctx.progress.is_cancelled() {
            return Err(IndexError::Interrupted);
        }
        let end = (image + PARTITION_BATCH_IMAGES).min(n_images);
        // The batch borrows the descriptors from the memory map: nothing is copied.
        let rtxn = work.env.read_txn()?;
        let mut batch: Vec<(u32, &[u8], [u16; 2])> = Vec::new();
        let mut read: Vec<&[u8]> = Vec::new();
        for id in image..end {
            let Some((d, k)) = kept_of(work, &rtxn, offsets, id)? else {
                continue;
            };
            read.extend([d, k]);
            for (desc, kp) in d.chunks_exact(DESCRIPTOR_BYTES).zip(k.chunks_exact(4)) {
                let kp = [
                    u16::from_le_bytes([kp[0], kp[1]]),
                    u16::from_le_bytes([kp[2], kp[3]]),
                ];
                batch.push((id, desc, kp));
            }
        }
        let cells: Vec<u32> = batch
            .par_iter()
            .map(|(_, d, _)| vocab::nearest_priced(&top, &top_prices, &words_of(d)).1)
            .collect();
        for ((id, d, kp), c) in batch.iter().zip(cells) {
            let mut code = [0u8; DESCRIPTOR_BYTES];
            code.copy_from_slice(d);
            postings::push(&mut buffers[c as usize], &code, *id, *kp);
        }
        // The batch's descriptors are read: out of the working set with them.
        read.iter().for_each(|b| crate::memory::cool(b));
        drop(batch);
        drop(rtxn);
        image = end;
        ctx.progress.set_step_done(offsets[image as usize]);
        fail::fail_point!(STEP_BATCH_FAIL_POINT);
        let buffered: u64 = buffers.iter().map(|b| b.capacity() as u64).sum();
        if buffered >= plan.partition_flush_bytes || image == n_images {
            // Buckets first: a kill before the checkpoint redoes the same flush, which writes
            // the same keys with the same bytes.
            let mut work_txn = work.env.write_txn()?;
            for (c, buf) in buffers.iter_mut().enumerate() {
                if !buf.is_empty() {
                    work.buckets
                        .put(&mut work_txn, &postings::bucket_key(chunk, c as u32), buf)?;
                    buf.clear();
                    buf.shrink_to(0);
                }
            }
            work_txn.commit()?;
            // The flush is on disk: its pages leave the working set now, not when the
            // governor next samples (at 116M descriptors they filled its allowance).
            release();
            chunk += 1;
            cp = if image == n_images {
                Checkpoint::Lists {
                    preset: label.to_string(),
                    next: 0,
                }
            } else {
                Checkpoint::Partition {
                    preset: label.to_string(),
                    next: image,
                    chunk,
                }
            };
            commit_checkpoint(store, &cp)?;
        }
    }
    if n_images == 0 || !matches!(cp, Checkpoint::Lists { .. }) {
        cp = Checkpoint::Lists {
            preset: label.to_string(),
            next: 0,
        };
        commit_checkpoint(store, &cp)?;
    }
    tracing::info!(flushes = chunk, "descriptors partitioned into cells");
    Ok(cp)
}

/// The leaf of every entry of `bytes` (whole entries), routed as queries are.
fn leaves_of(leaves: &[Words], prices: &[u16], bytes: &[u8]) -> Vec<u32> {
    let route = |e: &[u8]| vocab::nearest_priced(leaves, prices, &postings::code_of(e)).1;
    if bytes.len() / ENTRY_BYTES * leaves.len() >= 1 << 15 {
        bytes.par_chunks_exact(ENTRY_BYTES).map(route).collect()
    } else {
        bytes.chunks_exact(ENTRY_BYTES).map(route).collect()
    }
}

/// A uniform sample of about `want` entry codes from a cell's bucket chunks.
fn sample_codes(chunks: &[&[u8]], n: u64, want: u64) -> Vec<Words> {
    let want = want.clamp(1, n.max(1));
    let mut out = Vec::with_capacity(want as usize);
    let (mut i, mut picked, mut next_pick) = (0u64, 0u64, 0u64);
    for c in chunks {
        for e in c.chunks_exact(ENTRY_BYTES) {
            if i == next_pick && picked < want {
                out.push(postings::code_of(e));
                picked += 1;
                next_pick = picked * n / want;
            }
            i += 1;
        }
    }
    out
}

/// Splits leaves (by entry count) into parts of at most `max_entries` entries each (a leaf
/// larger than that is a part of its own). Returns the first leaf of each part.
pub(crate) fn split_parts(counts: &[u32], max_entries: u64) -> Vec<u32> {
    let mut parts = vec![0u32];
    let mut in_part = 0u64;
    for (leaf, &c) in counts.iter().enumerate() {
        if in_part > 0 && in_part + c as u64 > max_entries {
            parts.push(leaf as u32);
            in_part = 0;
        }
        in_part += c as u64;
    }
    parts
}

/// The buckets of cell `c`, one per partition flush that routed anything to it.
fn cell_buckets<'t>(
    work: &WorkStore,
    rtxn: &'t heed::RoTxn,
    flushes: u32,
    c: u32,
) -> Result<Vec<&'t [u8]>> {
    let mut chunks = Vec::new();
    for flush in 0..flushes {
        if let Some(b) = work.buckets.get(rtxn, &postings::bucket_key(flush, c))? {
            chunks.push(b);
        }
    }
    Ok(chunks)
}

/// Bytes of lists written between two hand-backs of pages in the lists step (each one unmaps
/// the maps and drops the files' clean cached pages, which the next cells then read back in
/// part).
const LIST_RELEASE_BYTES: u64 = 32 << 20;

/// Trains each cell's leaves and writes its inverted lists, cells `next..`.
#[allow(clippy::too_many_arguments)]
fn lists(
    store: &Store,
    work: &WorkStore,
    shape: &VocabShape,
    next: u32,
    total: u64,
    plan: &BuildPlan,
    ctx: &BuildContext,
    label: &str,
    release: &dyn Fn(),
) -> Result<Checkpoint> {
    let (top, _) = store.vocab_top(&*store.env.read_txn()?)?;
    let cells = top.len() as u32;
    ctx.progress.start_step(IndexStep::Lists, total);
    let done_before: u64 = {
        let rtxn = store.env.read_txn()?;
        let mut n = 0;
        for c in 0..next {
            if let Some(b) = store.cells.get(&rtxn, &c)? {
                n += CellRecord::from_bytes(b).map_or(0, |r| r.entries());
            }
        }
        n
    };
    let mut done = done_before;
    ctx.progress.set_step_done(done);
    // Entries one part may hold: the sorted copy and LMDB's dirty pages of it, plus a leaf
    // number per entry of the cell (the bucket itself is read through the memory map).
    let part_entries = (plan.list_part_bytes / (2 * ENTRY_BYTES as u64 + 4)).max(1);
    // Flushes of the partition step: the last bucket's key holds the last one.
    let flushes = match work.buckets.last(&*work.env.read_txn()?)? {
        Some((key, _)) => (key >> 32) as u32 + 1,
        None => 0,
    };
    // Buckets are read by exact prefetch (below), not by read-around on faults.
    let _random = crate::memory::RandomAccess::of(&work.env.path().join("data.mdb"));
    let mut wtxn = store.env.write_txn()?;
    let mut pending_bytes = 0u64;
    let mut unreleased_bytes = 0u64;
    for c in next..cells {
        if ctx.progress.is_cancelled() {
            return Err(IndexError::Interrupted);
        }
        let rtxn = work.env.read_txn()?;
        let chunks = cell_buckets(work, &rtxn, flushes, c)?;
        // One bucket per flush, scattered over the working file: ask for all of this cell's
        // and the next one's at once (read while this cell is trained) instead of faulting
        // them in one by one, each with a read-around that mostly reads other cells' buckets.
        chunks.iter().for_each(|b| crate::memory::will_need(b));
        if c + 1 < cells {
            for b in cell_buckets(work, &rtxn, flushes, c + 1)? {
                crate::memory::will_need(b);
            }
        }
        let n: u64 = chunks.iter().map(|b| (b.len() / ENTRY_BYTES) as u64).sum();
        let k = shape.leaves_for_cell(n) as u64;
        let (leaves, prices) = if n == 0 {
            (vec![top[c as usize]], vec![0])
        } else {
            let sample = sample_codes(
                &chunks,
                n,
                (k * vocab::LEAF_SAMPLES_PER_CENTROID).min(plan.train_samples),
            );
            let leaves = vocab::train(
                &sample,
                k as usize,
                vocab::LEAF_ITERATIONS,
                TRAIN_SEED ^ (c as u64 + 1),
            );
            let prices = vocab::balance(
                &sample,
                &leaves,
                vocab::BALANCE_FACTOR,
                vocab::BALANCE_ROUNDS,
            );
            (leaves, prices)
        };
        // Every entry's leaf, then entries per leaf.
        let routed: Vec<Vec<u32>> = chunks
            .iter()
            .map(|b| leaves_of(&leaves, &prices, b))
            .collect();
        let mut counts = vec![0u32; leaves.len()];
        for l in routed.iter().flatten() {
            counts[*l as usize] += 1;
        }
        let mut starts = Vec::with_capacity(leaves.len() + 1);
        starts.push(0u32);
        for &cnt in &counts {
            starts.push(starts.last().copied().unwrap_or(0) + cnt);
        }
        let parts = split_parts(&counts, part_entries);
        for (p, &first) in parts.iter().enumerate() {
            let last = parts.get(p + 1).copied().unwrap_or(leaves.len() as u32);
            let base = starts[first as usize];
            let len = (starts[last as usize] - base) as usize;
            let mut pos: Vec<u32> = starts[first as usize..last as usize]
                .iter()
                .map(|s| s - base)
                .collect();
            let mut out = vec![0u8; len * ENTRY_BYTES];
            for (bucket, routes) in chunks.iter().zip(&routed) {
                for (e, &l) in bucket.chunks_exact(ENTRY_BYTES).zip(routes) {
                    if l < first || l >= last {
                        continue;
                    }
                    let at = &mut pos[(l - first) as usize];
                    let o = *at as usize * ENTRY_BYTES;
                    out[o..o + ENTRY_BYTES].copy_from_slice(e);
                    *at += 1;
                }
            }
            store
                .lists
                .put(&mut wtxn, &postings::part_key(c, p as u32), &out)?;
            pending_bytes += out.len() as u64;
            if parts.len() > 1 {
                // A cell too large for one part commits part by part: LMDB holds a write
                // transaction's dirty pages in memory until it commits.
                drop(out);
                wtxn.commit()?;
                wtxn = store.env.write_txn()?;
                pending_bytes = 0;
            }
        }
        let rec = CellRecord {
            leaves: vocab::centroids_to_bytes(&leaves),
            prices,
            starts,
            parts,
        };
        store.cells.put(&mut wtxn, &c, &rec.to_bytes())?;
        // The cell's buckets are read: out of the working set with them.
        chunks.iter().for_each(|b| crate::memory::cool(b));
        drop(rtxn);
        done += n;
        ctx.progress.set_step_done(done);
        fail::fail_point!(STEP_BATCH_FAIL_POINT);
        let last = c + 1 == cells;
        let cp = if last {
            Checkpoint::Global {
                preset: label.to_string(),
            }
        } else {
            Checkpoint::Lists {
                preset: label.to_string(),
                next: c + 1,
            }
        };
        store.set_checkpoint(&mut wtxn, &cp)?;
        pending_bytes += rec.leaves.len() as u64;
        if pending_bytes >= plan.write_batch_bytes || last {
            wtxn.commit()?;
            wtxn = store.env.write_txn()?;
            unreleased_bytes += pending_bytes;
            pending_bytes = 0;
            if unreleased_bytes >= LIST_RELEASE_BYTES {
                release();
                unreleased_bytes = 0;
            }
        }
    }
    let cp = Checkpoint::Global {
        preset: label.to_string(),
    };
    store.set_checkpoint(&mut wtxn, &cp)?;
    wtxn.commit()?;
    tracing::info!(cells, "inverted lists written");
    Ok(cp)
}

/// Builds the arroy index over the images' global descriptors: vectors added in batched
/// transactions, then the trees written in one.
fn global_index(
    store: &Store,
    preset: &Preset,
    plan: &BuildPlan,
    ctx: &BuildContext,
    label: &str,
) -> Result<()> {
    let writer = arroy::Writer::<Cosine>::new(store.arroy, 0, global::DIMS);
    let mut wtxn = store.env.write_txn()?;
    store.arroy.clear(&mut wtxn)?;
    wtxn.commit()?;
    let ids: Vec<u32> = {
        let rtxn = store.env.read_txn()?;
        let mut ids = Vec::new();
        for r in store.globals.iter(&rtxn)? {
            ids.push(r?.0);
        }
        ids
    };
    ctx.progress.start_step(IndexStep::Global, ids.len() as u64);
    let per_txn = (plan.write_batch_bytes / (global::DIMS as u64 * 4 * 2)).max(1) as usize;
    for batch in ids.chunks(per_txn) {
        if ctx.progress.is_cancelled() {
            return Err(IndexError::Interrupted);
        }
        let mut wtxn = store.env.write_txn()?;
        for id in batch {
            let v = store.globals.get(&wtxn, id)?.and_then(global::from_bytes);
            if let Some(v) = v {
                writer.add_item(&mut wtxn, *id, &v)?;
            }
        }
        wtxn.commit()?;
        fail::fail_point!(STEP_BATCH_FAIL_POINT);
    }
    let mut wtxn = store.env.write_txn()?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(GLOBAL_SEED);
    let cancel = ctx.progress.clone();
    let built = writer
        .builder(&mut rng)
        .n_trees(preset.n_trees.max(1) as usize)
        .available_memory(plan.global_memory as usize)
        .cancel(move || cancel.is_cancelled())
        .build(&mut wtxn);
    match built {
        Ok(()) => {}
        Err(arroy::Error::BuildCancelled) => return Err(IndexError::Interrupted),
        Err(e) => return Err(e.into()),
    }
    store.set_checkpoint(
        &mut wtxn,
        &Checkpoint::Publish {
            preset: label.to_string(),
        },
    )?;
    wtxn.commit()?;
    ctx.progress.set_step_done(ids.len() as u64);
    tracing::info!(images = ids.len(), "global-descriptor index built");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_hold_whole_leaves_within_the_bound() {
        assert_eq!(split_parts(&[3, 0, 5, 2], 100), vec![0]);
        assert_eq!(split_parts(&[3, 0, 5, 2], 8), vec![0, 3]);
        assert_eq!(split_parts(&[3, 0, 5, 2], 7), vec![0, 2]);
        assert_eq!(split_parts(&[3, 0, 5, 2], 5), vec![0, 2, 3]);
        // A leaf above the bound stands alone.
        assert_eq!(split_parts(&[1, 9, 1], 4), vec![0, 1, 2]);
        assert_eq!(split_parts(&[], 4), vec![0]);
    }

    #[test]
    fn samples_are_spread_over_all_chunks() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for i in 0..10u8 {
            postings::push(&mut a, &[i; 32], 0, [0, 0]);
            postings::push(&mut b, &[100 + i; 32], 0, [0, 0]);
        }
        let s = sample_codes(&[&a, &b], 20, 4);
        assert_eq!(s.len(), 4);
        let firsts: Vec<u8> = s.iter().map(|w| w[0] as u8).collect();
        assert_eq!(firsts, vec![0, 5, 100, 105]);
        assert_eq!(sample_codes(&[&a], 10, 100).len(), 10);
    }
}
