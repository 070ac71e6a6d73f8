//! Memory and disk estimates, and the build plan that splits a memory budget.
//!
//! The build never holds the dataset in memory: its peak is a fixed base plus the largest
//! of its phases (images in flight during extraction, one arroy shard during indexing, one
//! flush of the inverted lists). So the estimate depends on the preset and on the largest
//! image, not on how many images there are; only disk grows with the dataset.
//!
//! The constants below were measured with `indexer bench` on the machines CI runs on
//! (see the README's "Memory model" section); the estimate is deliberately a little
//! pessimistic so that `auto` never picks a preset that cannot fit.

use crate::preset::Preset;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

const MIB: u64 = 1 << 20;

/// Resident memory of an idle indexer process: runtime, OpenCV, LMDB handles, metrics
/// (measured: ~21 MB anonymous; rounded up).
pub const BASE_BYTES: u64 = 28 * MIB;
/// Working memory of ORB per pixel of the working image: pyramid and its blurred copy for
/// 3× oversampled features, contrast-stretched and CLAHE copies, keypoint candidates
/// (measured: ~18 bytes; rounded up).
pub const ORB_BYTES_PER_WORK_PIXEL: u64 = 20;
/// Per wanted feature: keypoint candidates before retention, descriptors, the result rows.
pub const BYTES_PER_FEATURE: u64 = 400;
/// Fraction of the budget left for LMDB pages the kernel has not reclaimed yet and for
/// allocator fragmentation.
pub const HEADROOM_PERCENT: u64 = 12;
/// Smallest descriptor bytes one extraction write transaction may hold.
pub const MIN_WRITE_BATCH_BYTES: u64 = 2 * MIB;
/// Largest descriptor bytes one extraction write transaction holds (bounds LMDB dirty pages).
pub const MAX_WRITE_BATCH_BYTES: u64 = 32 * MIB;
/// arroy build memory per item of a shard, excluding the tree part below.
pub const ARROY_BYTES_PER_ITEM: u64 = 24;
/// arroy build memory per item and per tree (dirty tree pages of the shard's write transaction).
pub const ARROY_BYTES_PER_ITEM_TREE: u64 = 6;
/// Smallest arroy shard: below this the per-shard overhead dominates.
pub const MIN_SHARD_ITEMS: u64 = 25_000;
/// Largest arroy shard: keeps one shard's build time and write transaction moderate.
pub const MAX_SHARD_ITEMS: u64 = 2_000_000;
/// Bytes one descriptor costs on disk: arroy item and tree nodes, inverted-list entry,
/// keypoint, LMDB page overhead; plus a per-tree part.
pub const DISK_BYTES_PER_DESCRIPTOR: u64 = 100;
/// Disk bytes per descriptor and arroy tree.
pub const DISK_BYTES_PER_DESCRIPTOR_TREE: u64 = 4;
/// Fraction (percent) of `nfeatures` an average image yields (textured photos reach it,
/// plain ones fall short even after adaptation).
pub const FEATURE_YIELD_PERCENT: u64 = 90;

/// What the scan learned about a dataset, as far as memory and disk are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct DatasetShape {
    /// Image files found.
    pub images: u64,
    /// Their total size in bytes.
    pub bytes: u64,
    /// Width of the largest sampled image (pixels).
    pub max_width: u32,
    /// Height of the largest sampled image (pixels).
    pub max_height: u32,
    /// Whether the largest sampled image is a JPEG (decodable at reduced size).
    pub max_is_jpeg: bool,
}

/// Pixels of the image a decoder allocates: JPEGs are decoded at 1/2, 1/4 or 1/8 scale
/// when that still leaves the longest side at least `max_side`.
pub fn decode_scale(width: u32, height: u32, max_side: u32, jpeg: bool) -> u32 {
    let long = width.max(height);
    if !jpeg || max_side == 0 {
        return 1;
    }
    let mut scale = 1;
    for s in [2u32, 4, 8] {
        if long / s >= max_side {
            scale = s;
        }
    }
    scale
}

/// Size of the working image ORB runs on: the decoded image resized so its long side is at
/// most `max_side`.
pub fn work_size(width: u32, height: u32, max_side: u32) -> (u32, u32) {
    let long = width.max(height).max(1);
    if max_side == 0 || long <= max_side {
        return (width, height);
    }
    let f = max_side as f64 / long as f64;
    (
        ((width as f64 * f).round() as u32).max(1),
        ((height as f64 * f).round() as u32).max(1),
    )
}

/// Peak bytes one image in flight costs: its decoded buffer plus ORB's working memory.
pub fn image_bytes(preset: &Preset, width: u32, height: u32, jpeg: bool) -> u64 {
    let s = decode_scale(width, height, preset.max_side, jpeg) as u64;
    let decoded = (width as u64).div_ceil(s) * (height as u64).div_ceil(s);
    let (ww, wh) = work_size(
        width.div_ceil(s as u32),
        height.div_ceil(s as u32),
        preset.max_side,
    );
    let work = ww as u64 * wh as u64;
    decoded + work * ORB_BYTES_PER_WORK_PIXEL + preset.nfeatures as u64 * BYTES_PER_FEATURE
}

/// arroy build memory for a shard of `items` with `n_trees` trees.
pub fn shard_bytes(items: u64, n_trees: u32) -> u64 {
    items * (ARROY_BYTES_PER_ITEM + ARROY_BYTES_PER_ITEM_TREE * n_trees as u64)
}

/// Expected descriptors for a dataset at a preset.
pub fn expected_descriptors(preset: &Preset, images: u64) -> u64 {
    images * preset.nfeatures as u64 * FEATURE_YIELD_PERCENT / 100
}

/// Expected index size on disk.
pub fn disk_bytes(preset: &Preset, descriptors: u64, images: u64) -> u64 {
    descriptors
        * (DISK_BYTES_PER_DESCRIPTOR + DISK_BYTES_PER_DESCRIPTOR_TREE * preset.n_trees as u64)
        + images * 512
        + 4 * MIB
}

/// The memory and disk a build of one preset needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Estimate {
    /// The preset label (`full`, `small`, …, `xlarge-nf50`).
    pub preset: String,
    /// Smallest memory limit the build can run under (one image in flight, smallest shard).
    pub min_memory: u64,
    /// Memory limit at which the build runs at full speed (every thread busy).
    pub recommended_memory: u64,
    /// Expected descriptors.
    pub descriptors: u64,
    /// Expected index size on disk.
    pub disk: u64,
}

/// The smallest memory limit under which a preset can be built for this dataset.
pub fn min_memory(preset: &Preset, shape: &DatasetShape) -> u64 {
    let one_image = image_bytes(preset, shape.max_width, shape.max_height, shape.max_is_jpeg);
    let extract = one_image + MIN_WRITE_BATCH_BYTES;
    let arroy = shard_bytes(MIN_SHARD_ITEMS, preset.n_trees);
    with_headroom(BASE_BYTES + extract.max(arroy))
}

fn with_headroom(bytes: u64) -> u64 {
    bytes * 100 / (100 - HEADROOM_PERCENT)
}

/// Estimates one preset for a dataset built with `threads` extraction threads.
pub fn estimate(preset: &Preset, shape: &DatasetShape, threads: u32) -> Estimate {
    let descriptors = expected_descriptors(preset, shape.images);
    let one_image = image_bytes(preset, shape.max_width, shape.max_height, shape.max_is_jpeg);
    let extract = one_image * (threads.max(1) as u64 + 1) + MAX_WRITE_BATCH_BYTES;
    let shard = descriptors.clamp(MIN_SHARD_ITEMS, MAX_SHARD_ITEMS);
    let arroy = shard_bytes(shard, preset.n_trees);
    Estimate {
        preset: preset.label(),
        min_memory: min_memory(preset, shape),
        recommended_memory: with_headroom(BASE_BYTES + extract.max(arroy)),
        descriptors,
        disk: disk_bytes(preset, descriptors, shape.images),
    }
}

/// How a build splits its memory budget between its phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildPlan {
    /// The whole budget (the memory limit).
    pub budget: u64,
    /// Bytes the images in flight may take together (decode + ORB), weighed per image.
    pub image_bytes: u64,
    /// Descriptor bytes per extraction write transaction.
    pub write_batch_bytes: u64,
    /// Items per arroy shard (each shard is built in its own write transaction).
    pub shard_items: u64,
    /// The `available_memory` hint given to arroy.
    pub arroy_memory: u64,
    /// Bytes of inverted-list entries buffered before one flush transaction.
    pub ivf_flush_bytes: u64,
    /// Descriptors sampled to train the coarse quantizer.
    pub ivf_train_samples: u64,
    /// Working set above which the indexer asks the kernel to drop LMDB's clean pages.
    pub reclaim_at: u64,
    /// File-backed part of the working set (mapped LMDB pages, page cache of the files the
    /// build writes) above which those pages are handed back: keeps the working set at the
    /// build's own memory plus a fixed allowance, whatever the dataset size.
    pub file_pages_allowance: u64,
}

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("preset {preset} needs at least {needed} bytes of memory; the budget is {budget} bytes")]
pub struct DoesNotFit {
    /// The preset label.
    pub preset: String,
    /// The smallest budget that would fit.
    pub needed: u64,
    /// The budget given.
    pub budget: u64,
}

/// Splits `budget` for a build of `preset` over `shape`. Fails when even one image in flight
/// and the smallest arroy shard do not fit.
pub fn plan(preset: &Preset, shape: &DatasetShape, budget: u64) -> Result<BuildPlan, DoesNotFit> {
    let needed = min_memory(preset, shape);
    let usable = (budget * (100 - HEADROOM_PERCENT) / 100).saturating_sub(BASE_BYTES);
    let one_image = image_bytes(preset, shape.max_width, shape.max_height, shape.max_is_jpeg);
    if budget < needed {
        return Err(DoesNotFit {
            preset: preset.label(),
            needed,
            budget,
        });
    }
    let write_batch_bytes = (usable / 8).clamp(MIN_WRITE_BATCH_BYTES, MAX_WRITE_BATCH_BYTES);
    let image_bytes = usable.saturating_sub(write_batch_bytes).max(one_image);
    let per_item = shard_bytes(1, preset.n_trees);
    // arroy's own hint gets a quarter of what the shard may use; the rest is its trees.
    let shard_items = (usable * 3 / 4 / per_item).clamp(MIN_SHARD_ITEMS, MAX_SHARD_ITEMS);
    let arroy_memory = (usable / 4).max(8 * MIB);
    let ivf_flush_bytes = (usable / 16).clamp(MIB, 32 * MIB);
    let ivf_train_samples = (usable / 4 / 32).clamp(4096, 4_000_000);
    Ok(BuildPlan {
        budget,
        image_bytes,
        write_batch_bytes,
        shard_items,
        arroy_memory,
        ivf_flush_bytes,
        ivf_train_samples,
        reclaim_at: budget * 60 / 100,
        file_pages_allowance: (budget / 8).clamp(32 * MIB, 256 * MIB),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preset::{Preset, PresetName};

    fn photos(images: u64, w: u32, h: u32) -> DatasetShape {
        DatasetShape {
            images,
            bytes: images * 2_000_000,
            max_width: w,
            max_height: h,
            max_is_jpeg: true,
        }
    }

    #[test]
    fn jpeg_decodes_reduced_only_while_the_long_side_stays_large_enough() {
        assert_eq!(decode_scale(8000, 6000, 2048, true), 2);
        assert_eq!(decode_scale(8000, 6000, 1024, true), 4);
        assert_eq!(decode_scale(8000, 6000, 800, true), 8);
        assert_eq!(decode_scale(8000, 6000, 800, false), 1);
        assert_eq!(decode_scale(1000, 800, 1024, true), 1);
    }

    #[test]
    fn work_size_keeps_aspect_and_never_upscales() {
        assert_eq!(work_size(4000, 3000, 2000), (2000, 1500));
        assert_eq!(work_size(3000, 4000, 2000), (1500, 2000));
        assert_eq!(work_size(640, 480, 2000), (640, 480));
    }

    #[test]
    fn memory_does_not_grow_with_the_number_of_images() {
        let p = PresetName::Full.preset();
        let a = estimate(&p, &photos(1_000, 2560, 1600), 2);
        let b = estimate(&p, &photos(116_000, 2560, 1600), 2);
        assert_eq!(a.min_memory, b.min_memory);
        assert!(b.recommended_memory <= a.recommended_memory * 2);
        assert!(b.disk > a.disk * 100, "disk does grow");
    }

    #[test]
    fn poorer_presets_never_need_more_memory() {
        let shape = photos(50_000, 6000, 4000);
        let ladder = Preset::ladder();
        for pair in ladder.windows(2) {
            assert!(
                min_memory(&pair[1], &shape) <= min_memory(&pair[0], &shape),
                "{} vs {}",
                pair[0],
                pair[1]
            );
        }
        assert!(
            min_memory(&ladder[0], &shape) > min_memory(ladder.last().unwrap(), &shape) + 20 * MIB
        );
    }

    #[test]
    fn plan_fits_the_budget_or_says_what_it_needs() {
        let p = PresetName::Full.preset();
        let shape = photos(10_000, 4000, 3000);
        let need = min_memory(&p, &shape);
        let err = plan(&p, &shape, need - 1).unwrap_err();
        assert_eq!(err.needed, need);
        let ok = plan(&p, &shape, need).unwrap();
        assert!(
            BASE_BYTES + ok.image_bytes.max(shard_bytes(ok.shard_items, p.n_trees)) <= ok.budget
        );
        let big = plan(&p, &shape, 4 << 30).unwrap();
        assert!(big.shard_items > ok.shard_items);
        assert!(big.image_bytes > ok.image_bytes);
        assert!(big.write_batch_bytes <= MAX_WRITE_BATCH_BYTES);
    }

    #[test]
    fn full_features_fit_half_a_gibibyte_for_large_photos() {
        let p = PresetName::Full.preset();
        let e = estimate(&p, &photos(116_000, 6000, 4000), 2);
        assert!(e.min_memory < 512 * MIB, "{}", e.min_memory);
    }
}
