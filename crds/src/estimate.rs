//! Memory and disk estimates, and the build plan that splits a memory budget.
//!
//! The build never holds the dataset in memory: its peak is a fixed base plus the largest
//! of its phases (images in flight during extraction, one flush of the partition buffers,
//! one part of one cell's inverted lists, the arroy index of one small vector per image). So
//! the estimate depends on the preset and on the largest image, barely on how many images
//! there are; disk grows with the dataset.
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
/// Largest bytes one write transaction holds before it commits (extraction, the lists step):
/// LMDB keeps a transaction's dirty pages in memory until it commits. 8 MiB commits a few
/// times a second at the build's write rate; more saves little time and costs heap.
pub const MAX_WRITE_BATCH_BYTES: u64 = 8 * MIB;
/// Bytes of one inverted-list entry: code, image id, keypoint.
pub const ENTRY_BYTES: u64 = 40;
/// Smallest part of a cell's lists sorted in memory (bounds the smallest plan).
pub const MIN_LIST_PART_BYTES: u64 = 4 * MIB;
/// Largest part of a cell's lists sorted in memory.
pub const MAX_LIST_PART_BYTES: u64 = 256 * MIB;
/// Descriptors per inverted list the vocabulary aims at.
pub const LEAF_LEN: u32 = 160;
/// Most entries' bytes the partition step buffers before one flush: more only saves a few
/// flush transactions, and the buffers are the step's (and the index phases') largest heap.
pub const MAX_PARTITION_FLUSH_BYTES: u64 = 16 * MIB;
/// Most file-backed memory (LMDB's mapped and cached pages) a build keeps before handing it
/// back: fixed, not a share of the limit, so that the working set of a 116M-descriptor build
/// stays near a 4M one's (an eighth of a 2 GiB limit, 256 MiB, let it grow to 442 MiB).
pub const MAX_FILE_PAGES_ALLOWANCE: u64 = 32 * MIB;
/// Bytes one descriptor costs on disk: its list entry and LMDB's page slack.
pub const DISK_BYTES_PER_DESCRIPTOR: u64 = 42;
/// Bytes one image costs on disk: its record, global descriptor and arroy nodes.
pub const DISK_BYTES_PER_IMAGE: u64 = 1024;
/// Build memory per image of the arroy index of global descriptors: the vectors are added in
/// batched transactions, the trees' nodes are written in one.
pub const GLOBAL_BYTES_PER_IMAGE: u64 = 256;
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

/// Build memory of the arroy index of global descriptors for `images` images.
pub fn global_bytes(images: u64) -> u64 {
    images * GLOBAL_BYTES_PER_IMAGE
}

/// Expected descriptors for a dataset at a preset.
pub fn expected_descriptors(preset: &Preset, images: u64) -> u64 {
    images * preset.nfeatures as u64 * FEATURE_YIELD_PERCENT / 100
}

/// Expected index size on disk.
pub fn disk_bytes(descriptors: u64, images: u64) -> u64 {
    descriptors * DISK_BYTES_PER_DESCRIPTOR + images * DISK_BYTES_PER_IMAGE + 4 * MIB
}

/// The memory and disk a build of one preset needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Estimate {
    /// The preset label (`full`, `small`, …, `xlarge-nf50`).
    pub preset: String,
    /// Smallest memory limit the build can run under (one image in flight, the smallest
    /// list part, the global index).
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
    let index = MIN_LIST_PART_BYTES.max(global_bytes(shape.images));
    with_headroom(BASE_BYTES + extract.max(index))
}

fn with_headroom(bytes: u64) -> u64 {
    bytes * 100 / (100 - HEADROOM_PERCENT)
}

/// Estimates one preset for a dataset built with `threads` extraction threads.
pub fn estimate(preset: &Preset, shape: &DatasetShape, threads: u32) -> Estimate {
    let descriptors = expected_descriptors(preset, shape.images);
    let one_image = image_bytes(preset, shape.max_width, shape.max_height, shape.max_is_jpeg);
    let extract = one_image * (threads.max(1) as u64 + 1) + MAX_WRITE_BATCH_BYTES;
    // The lists run at full speed when a typical cell fits one part.
    let cell = (descriptors / 256).max(1) * (2 * ENTRY_BYTES + 4);
    let index = cell
        .clamp(MIN_LIST_PART_BYTES, MAX_LIST_PART_BYTES)
        .max(global_bytes(shape.images));
    Estimate {
        preset: preset.label(),
        min_memory: min_memory(preset, shape),
        recommended_memory: with_headroom(BASE_BYTES + extract.max(index)),
        descriptors,
        disk: disk_bytes(descriptors, shape.images),
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
    /// Descriptors per inverted list the vocabulary aims at.
    pub leaf_len: u32,
    /// Most descriptors sampled to train the vocabulary's top level.
    pub train_samples: u64,
    /// Bytes of partitioned entries buffered before one flush transaction.
    pub partition_flush_bytes: u64,
    /// Bytes of one part of a cell's lists sorted in memory (larger cells are split).
    pub list_part_bytes: u64,
    /// The `available_memory` hint given to arroy for the global-descriptor index.
    pub global_memory: u64,
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
/// and the smallest list part do not fit.
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
    Ok(BuildPlan {
        budget,
        image_bytes,
        write_batch_bytes,
        leaf_len: LEAF_LEN,
        train_samples: (usable / 4 / 32).clamp(4096, 4_000_000),
        partition_flush_bytes: (usable / 16).clamp(MIB, MAX_PARTITION_FLUSH_BYTES),
        list_part_bytes: (usable / 3).clamp(MIN_LIST_PART_BYTES, MAX_LIST_PART_BYTES),
        global_memory: (usable / 4).max(8 * MIB),
        reclaim_at: budget * 60 / 100,
        file_pages_allowance: (budget / 8).clamp(8 * MIB, MAX_FILE_PAGES_ALLOWANCE),
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
        assert!(BASE_BYTES + ok.image_bytes.max(ok.list_part_bytes) <= ok.budget);
        let big = plan(&p, &shape, 4 << 30).unwrap();
        assert!(big.list_part_bytes > ok.list_part_bytes);
        assert!(big.image_bytes > ok.image_bytes);
        assert!(big.write_batch_bytes <= MAX_WRITE_BATCH_BYTES);
        // What stays fixed however large the limit: the file pages kept and the partition
        // buffer, so a large catalogue's working set does not grow with the limit either.
        let huge = plan(&p, &shape, 64 << 30).unwrap();
        assert_eq!(huge.file_pages_allowance, MAX_FILE_PAGES_ALLOWANCE);
        assert_eq!(huge.partition_flush_bytes, MAX_PARTITION_FLUSH_BYTES);
        assert!(ok.file_pages_allowance < ok.budget / 4);
    }

    #[test]
    fn full_features_fit_half_a_gibibyte_for_large_photos() {
        let p = PresetName::Full.preset();
        let e = estimate(&p, &photos(116_000, 6000, 4000), 2);
        assert!(e.min_memory < 512 * MIB, "{}", e.min_memory);
    }
}
