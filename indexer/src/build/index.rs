//! The index phases: keep at most `nfeatures` descriptors per image (strongest first),
//! train the coarse quantizer, fill the inverted lists in bounded flushes, and build the
//! arroy shards one write transaction each. Every step commits its checkpoint.

use super::BuildContext;
use crate::error::{IndexError, Result};
use crate::features::{Descriptor, DESCRIPTOR_BYTES};
use crate::hamming::{self, words};
use crate::ivf::{self, Centroids};
use crate::store::{self, Checkpoint, Store, Timings, WorkStore};
use arroy::distances::BinaryQuantizedManhattan;
use imageindex_crds::estimate::BuildPlan;
use imageindex_crds::preset::Preset;
use rand::SeedableRng;
use rayon::prelude::*;
use std::time::Instant;

/// Most items an arroy leaf ("descendants") node holds. arroy's default (the dimension,
/// 256) costs ~87 bytes per item at 20 trees; 1024 costs ~63 and builds faster, keeping the
/// whole index under 192 bytes per descriptor.
const ARROY_SPLIT_AFTER: usize = 1024;
/// Items added to arroy per write transaction.
const ARROY_ADD_BATCH: u64 = 50_000;
/// Images handed to one parallel assignment batch.
const ASSIGN_BATCH_IMAGES: usize = 256;
/// Seed of the coarse quantizer's training (fixed: equal inputs give equal indexes).
const TRAIN_SEED: u64 = 0x1D_1DE0;

/// What the index phases produced.
pub(crate) struct IndexStats {
    pub descriptors: u64,
    pub lists: u32,
    pub shards: u32,
    pub shard_items: u64,
}

fn checkpoint(store: &Store) -> Result<Checkpoint> {
    let rtxn = store.env.read_txn()?;
    Ok(store
        .get_json(&rtxn, store::keys::CHECKPOINT)?
        .unwrap_or(Checkpoint::Extract { next: 0 }))
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

fn offsets_blob(o: &[u64]) -> Vec<u8> {
    o.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Reads the offsets table of an index.
pub fn read_offsets(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

/// Calls `f(image, first_descriptor_id, kept descriptors)` for images `from..to`.
fn for_each_image(
    work: &WorkStore,
    offsets: &[u64],
    from: u32,
    to: u32,
    mut f: impl FnMut(u32, u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let rtxn = work.env.read_txn()?;
    for id in from..to {
        let kept = (offsets[id as usize + 1] - offsets[id as usize]) as usize;
        if kept == 0 {
            continue;
        }
        let blob = work.descs.get(&rtxn, &id)?.unwrap_or_default();
        let kept_bytes = (kept * DESCRIPTOR_BYTES).min(blob.len());
        f(id, offsets[id as usize], &blob[..kept_bytes])?;
    }
    Ok(())
}

fn descriptor(chunk: &[u8]) -> Descriptor {
    let mut d = [0u8; DESCRIPTOR_BYTES];
    d.copy_from_slice(&chunk[..DESCRIPTOR_BYTES]);
    d
}

/// Runs (or resumes) the index phases; returns `None` after each arroy shard but the last,
/// so that the caller can reopen the environment (LMDB keeps a write transaction's dirty-page
/// buffers allocated for reuse until it is closed) and call again to resume with the next.
/// `release` hands LMDB's clean pages back to the kernel; it is called between steps, when
/// the pages the previous step read are no longer needed.
pub(super) fn run(
    store: &Store,
    work: &WorkStore,
    preset: &Preset,
    plan: &BuildPlan,
    ctx: &BuildContext,
    timings: &mut Timings,
    release: &dyn Fn(),
) -> Result<Option<IndexStats>> {
    let label = preset.label();
    let mut cp = checkpoint(store)?;
    // A checkpoint from another preset's index phases: redo them (extraction is kept).
    let other_preset = match &cp {
        Checkpoint::Train { preset }
        | Checkpoint::Assign { preset, .. }
        | Checkpoint::Merge { preset, .. }
        | Checkpoint::Arroy { preset, .. }
        | Checkpoint::Publish { preset } => *preset != label,
        Checkpoint::Extract { .. } => false,
    };
    if other_preset {
        tracing::info!(from = ?cp, to = %label, "preset changed: rebuilding the index phases from the extracted features");
        let mut wtxn = store.env.write_txn()?;
        store.lists.clear(&mut wtxn)?;
        store.arroy.clear(&mut wtxn)?;
        cp = Checkpoint::Train {
            preset: label.clone(),
        };
        store.set_checkpoint(&mut wtxn, &cp)?;
        wtxn.commit()?;
    }
    let offsets = offsets(store, preset)?;
    let n_images = (offsets.len() - 1) as u32;
    let total = offsets.last().copied().unwrap_or(0);
    ctx.progress.set_descriptors(total);
    let n_lists = ivf::lists_for(total);

    // Train.
    if matches!(cp, Checkpoint::Train { .. }) {
        let t = Instant::now();
        ctx.progress.start_step(total);
        let target = total
            .min(n_lists as u64 * ivf::SAMPLES_PER_LIST)
            .min(plan.ivf_train_samples)
            .max(1);
        let mut samples: Vec<Descriptor> = Vec::with_capacity(target as usize);
        let mut next_pick = 0u64;
        let mut picked = 0u64;
        for_each_image(work, &offsets, 0, n_images, |_, first, blob| {
            let count = (blob.len() / DESCRIPTOR_BYTES) as u64;
            while picked < target && next_pick < first + count {
                if next_pick >= first {
                    let i = (next_pick - first) as usize;
                    samples.push(descriptor(&blob[i * DESCRIPTOR_BYTES..]));
                }
                picked += 1;
                next_pick = picked * total / target;
            }
            Ok(())
        })?;
        let centroids = ivf::train(&samples, n_lists, ivf::TRAIN_ITERATIONS, TRAIN_SEED);
        drop(samples);
        let mut wtxn = store.env.write_txn()?;
        store
            .meta
            .put(&mut wtxn, store::keys::CENTROIDS, &centroids.to_bytes())?;
        store
            .meta
            .put(&mut wtxn, store::keys::OFFSETS, &offsets_blob(&offsets))?;
        store.lists.clear(&mut wtxn)?;
        cp = Checkpoint::Assign {
            preset: label.clone(),
            next: 0,
            chunk: 0,
        };
        store.set_checkpoint(&mut wtxn, &cp)?;
        wtxn.commit()?;
        timings.train += t.elapsed().as_secs_f64();
        tracing::info!(
            lists = centroids.len(),
            secs = t.elapsed().as_secs_f64(),
            "coarse quantizer trained"
        );
    }

    // Assign.
    if let Checkpoint::Assign { next, chunk, .. } = cp.clone() {
        let t = Instant::now();
        let centroids = {
            let rtxn = store.env.read_txn()?;
            let bytes = store
                .meta
                .get(&rtxn, store::keys::CENTROIDS)?
                .unwrap_or_default();
            Centroids::from_bytes(bytes).ok_or_else(|| IndexError::BadIndex {
                path: store.env.path().to_path_buf(),
                reason: "centroids".into(),
            })?
        };
        ctx.progress.start_step(total);
        ctx.progress.set_step_done(offsets[next as usize]);
        let k = centroids.len();
        let mut buffers: Vec<Vec<u8>> = vec![Vec::new(); k];
        let mut chunk = chunk;
        let mut image = next;
        while image < n_images {
            if ctx.progress.is_cancelled() {
                return Err(IndexError::Interrupted);
            }
            let end = (image + ASSIGN_BATCH_IMAGES as u32).min(n_images);
            let mut batch: Vec<(u32, Descriptor)> = Vec::new();
            for_each_image(work, &offsets, image, end, |_, first, blob| {
                for (i, d) in blob.chunks_exact(DESCRIPTOR_BYTES).enumerate() {
                    batch.push(((first + i as u64) as u32, descriptor(d)));
                }
                Ok(())
            })?;
            let lists: Vec<u32> = batch
                .par_iter()
                .map(|(_, d)| centroids.nearest(&words(d)))
                .collect();
            for ((id, d), l) in batch.iter().zip(lists) {
                ivf::push_entry(&mut buffers[l as usize], *id, d);
            }
            // What the buffers hold in memory, growth slack included.
            let buffered: u64 = buffers.iter().map(|b| b.capacity() as u64).sum();
            image = end;
            ctx.progress.set_step_done(offsets[image as usize]);
            if buffered >= plan.ivf_flush_bytes || image == n_images {
                let mut wtxn = store.env.write_txn()?;
                for (l, buf) in buffers.iter_mut().enumerate() {
                    if !buf.is_empty() {
                        store
                            .lists
                            .put(&mut wtxn, &Store::list_key(l as u32, chunk), buf)?;
                        buf.clear();
                        buf.shrink_to(0);
                    }
                }
                chunk += 1;
                cp = if image == n_images {
                    Checkpoint::Merge {
                        preset: label.clone(),
                        next: 0,
                    }
                } else {
                    Checkpoint::Assign {
                        preset: label.clone(),
                        next: image,
                        chunk,
                    }
                };
                store.set_checkpoint(&mut wtxn, &cp)?;
                wtxn.commit()?;
            }
        }
        if n_images == 0 || matches!(cp, Checkpoint::Assign { .. }) {
            let mut wtxn = store.env.write_txn()?;
            cp = Checkpoint::Merge {
                preset: label.clone(),
                next: 0,
            };
            store.set_checkpoint(&mut wtxn, &cp)?;
            wtxn.commit()?;
        }
        timings.assign += t.elapsed().as_secs_f64();
        tracing::info!(secs = t.elapsed().as_secs_f64(), "inverted lists filled");
        release();
    }

    // Merge each list's chunks (one per flush) into one value: lookups read one contiguous
    // value per list, and disk loses no page-rounding slack per chunk.
    if let Checkpoint::Merge { next, .. } = cp.clone() {
        let t = Instant::now();
        let mut list = next;
        while list < n_lists {
            if ctx.progress.is_cancelled() {
                return Err(IndexError::Interrupted);
            }
            // Read lists until the batch holds about a flush's worth of entries.
            let mut merged: Vec<(u32, Vec<u8>, u32)> = Vec::new();
            let mut bytes = 0u64;
            {
                let rtxn = store.env.read_txn()?;
                while list < n_lists && (bytes < plan.ivf_flush_bytes || merged.is_empty()) {
                    let range = Store::list_key(list, 0)..=Store::list_key(list, u32::MAX);
                    let mut value = Vec::new();
                    let mut chunks = 0u32;
                    for r in store.lists.range(&rtxn, &range)? {
                        let (_, v) = r?;
                        value.extend_from_slice(v);
                        chunks += 1;
                    }
                    bytes += value.len() as u64;
                    merged.push((list, value, chunks));
                    list += 1;
                }
            }
            let mut wtxn = store.env.write_txn()?;
            for (l, value, chunks) in &merged {
                if *chunks > 1 {
                    store.lists.delete_range(
                        &mut wtxn,
                        &(Store::list_key(*l, 0)..=Store::list_key(*l, u32::MAX)),
                    )?;
                    store.lists.put(&mut wtxn, &Store::list_key(*l, 0), value)?;
                }
            }
            cp = if list >= n_lists {
                Checkpoint::Arroy {
                    preset: label.clone(),
                    shard: 0,
                    added: 0,
                }
            } else {
                Checkpoint::Merge {
                    preset: label.clone(),
                    next: list,
                }
            };
            store.set_checkpoint(&mut wtxn, &cp)?;
            wtxn.commit()?;
        }
        if n_lists == 0 {
            let mut wtxn = store.env.write_txn()?;
            cp = Checkpoint::Arroy {
                preset: label.clone(),
                shard: 0,
                added: 0,
            };
            store.set_checkpoint(&mut wtxn, &cp)?;
            wtxn.commit()?;
        }
        timings.assign += t.elapsed().as_secs_f64();
        tracing::info!(secs = t.elapsed().as_secs_f64(), "inverted lists merged");
        release();
    }

    // arroy shards. The shard size is fixed at the first shard and kept in metadata so a
    // resumed build (even under another budget) keeps the same layout.
    let shard_items = {
        let rtxn = store.env.read_txn()?;
        store.get_json::<u64>(&rtxn, "shard_items")?
    };
    let shard_items = match shard_items {
        Some(s) => s,
        None => {
            let s = plan.shard_items.max(1);
            let mut wtxn = store.env.write_txn()?;
            store.put_json(&mut wtxn, "shard_items", &s)?;
            wtxn.commit()?;
            s
        }
    };
    let shards = total.div_ceil(shard_items) as u32;
    if let Checkpoint::Arroy { shard, added, .. } = cp.clone() {
        let t = Instant::now();
        ctx.progress.start_step(total);
        ctx.progress
            .set_step_done((shard as u64 * shard_items + added).min(total));
        let tmp = store.env.path().join("tmp");
        // arroy's temporary node files of a killed run are useless: start clean.
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| IndexError::io(&tmp, e))?;
        let mut added = added;
        for s in shard..shards {
            let lo = s as u64 * shard_items;
            let hi = (lo + shard_items).min(total);
            while lo + added < hi {
                if ctx.progress.is_cancelled() {
                    return Err(IndexError::Interrupted);
                }
                let from = lo + added;
                let to = (from + ARROY_ADD_BATCH).min(hi);
                let mut wtxn = store.env.write_txn()?;
                let writer =
                    arroy::Writer::<BinaryQuantizedManhattan>::new(store.arroy, s as u16, 256);
                add_range(work, &offsets, &writer, &mut wtxn, from, to)?;
                added = to - lo;
                store.set_checkpoint(
                    &mut wtxn,
                    &Checkpoint::Arroy {
                        preset: label.clone(),
                        shard: s,
                        added,
                    },
                )?;
                wtxn.commit()?;
                ctx.progress.set_step_done(to);
            }
            let mut wtxn = store.env.write_txn()?;
            let mut writer =
                arroy::Writer::<BinaryQuantizedManhattan>::new(store.arroy, s as u16, 256);
            writer.set_tmpdir(&tmp);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0xA770 + s as u64);
            let cancel = ctx.progress.clone();
            let built = writer
                .builder(&mut rng)
                .n_trees(preset.n_trees as usize)
                .split_after(ARROY_SPLIT_AFTER)
                .available_memory(plan.arroy_memory as usize)
                .cancel(move || cancel.is_cancelled())
                .build(&mut wtxn);
            match built {
                Ok(()) => {}
                Err(arroy::Error::BuildCancelled) => return Err(IndexError::Interrupted),
                Err(e) => return Err(e.into()),
            }
            added = 0;
            let next = if s + 1 == shards {
                Checkpoint::Publish {
                    preset: label.clone(),
                }
            } else {
                Checkpoint::Arroy {
                    preset: label.clone(),
                    shard: s + 1,
                    added: 0,
                }
            };
            store.set_checkpoint(&mut wtxn, &next)?;
            wtxn.commit()?;
            ctx.progress.set_step_done(hi);
            tracing::info!(shard = s, shards, items = hi - lo, "arroy shard built");
            release();
            if s + 1 < shards {
                timings.arroy += t.elapsed().as_secs_f64();
                return Ok(None);
            }
        }
        if shards == 0 {
            let mut wtxn = store.env.write_txn()?;
            store.set_checkpoint(
                &mut wtxn,
                &Checkpoint::Publish {
                    preset: label.clone(),
                },
            )?;
            wtxn.commit()?;
        }
        timings.arroy += t.elapsed().as_secs_f64();
    }
    Ok(Some(IndexStats {
        descriptors: total,
        lists: n_lists,
        shards,
        shard_items,
    }))
}

/// Adds descriptors `from..to` (global ids) to an arroy shard.
fn add_range(
    work: &WorkStore,
    offsets: &[u64],
    writer: &arroy::Writer<BinaryQuantizedManhattan>,
    wtxn: &mut heed::RwTxn,
    from: u64,
    to: u64,
) -> Result<()> {
    // First image containing `from`.
    let first_image = offsets.partition_point(|&o| o <= from).saturating_sub(1) as u32;
    let n_images = (offsets.len() - 1) as u32;
    let mut vector = [0f32; 256];
    let mut image = first_image;
    let rtxn = work.env.read_txn()?;
    let mut pending: Vec<(u32, Descriptor)> = Vec::new();
    while image < n_images && offsets[image as usize] < to {
        let first = offsets[image as usize];
        let kept = (offsets[image as usize + 1] - first) as usize;
        if kept > 0 {
            let blob = work.descriptors(&rtxn, image)?;
            for i in 0..kept.min(blob.len() / DESCRIPTOR_BYTES) {
                let id = first + i as u64;
                if id >= from && id < to {
                    pending.push((id as u32, descriptor(&blob[i * DESCRIPTOR_BYTES..])));
                }
            }
        }
        image += 1;
    }
    for (id, d) in pending {
        hamming::to_arroy_vector(&d, &mut vector);
        writer.add_item(wtxn, id, &vector)?;
    }
    Ok(())
}
