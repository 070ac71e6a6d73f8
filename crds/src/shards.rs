//! Sharding (issue 11): `spec.shards` (a number or `auto`), how many shards a build gets, and
//! what one shard of a scanned dataset looks like to the per-shard decisions.
//!
//! Images go to shards by a stable hash of their path (the indexer's `--shard I/N`), so each
//! shard holds about `images / N`. The per-shard decisions (first preset, ladder, memory and
//! disk estimates) see the dataset as [`shard_scan`] describes it: the whole's images and bytes
//! over `N`, plus [`IMBALANCE_PERCENT`] for the hash's imbalance, and the shard's own largest
//! image, from the scan's list of its largest images and their path keys ([`shard_largest`]).
//!
//! # Per-pod limits (what `auto` sizes a shard to)
//!
//! `auto` picks the smallest `N` (1 for small catalogues) such that each shard, as
//! [`shard_shape`] sizes it:
//! - builds under `spec.memoryLimit` with the richest preset the auto policy would choose by
//!   memory (the build streams, so memory depends mostly on the largest image and the preset,
//!   not on the number of images);
//! - fits its disk with that preset: the estimated index stays within 90% of the shard's
//!   claim (`spec.storage.size` per shard) — shards are added rather than features cut;
//! - holds at most [`MAX_DESCRIPTORS_PER_SHARD`] descriptors (150M): at the seed catalogue's
//!   116M descriptors one node builds in ~23 min and answers at p50 112 ms, so a shard of at
//!   most 150M keeps build time under ~30 min and query latency near that.
//!
//! When even [`MAX_SHARDS`] shards do not fit by memory, sharding cannot help (the largest
//! image decides the memory): `auto` then says 1 and the first-preset decision reports what
//! would fit.

use crate::estimate::{self, DatasetShape};
use crate::first_preset::auto_preset;
use crate::scan::{LargeImage, LARGEST_KEPT};
use crate::types::ScanSummary;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Cow;
use std::fmt;

/// Most shards an ImageIndex may have.
pub const MAX_SHARDS: u32 = 64;
/// Most descriptors `auto` puts in one shard (see the module's per-pod limits).
pub const MAX_DESCRIPTORS_PER_SHARD: u64 = 150_000_000;
/// How much larger than `1/N` of the dataset a shard is sized (the path hash's imbalance).
pub const IMBALANCE_PERCENT: u64 = 10;

/// `spec.shards`: a number of shards, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardCount {
    /// Exactly this many shards (1: unsharded).
    Count(u32),
    /// As many as the scan says each pod needs ([`auto_count`]).
    Auto,
}

impl Default for ShardCount {
    fn default() -> Self {
        ShardCount::Count(1)
    }
}

impl fmt::Display for ShardCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShardCount::Count(n) => write!(f, "{n}"),
            ShardCount::Auto => f.write_str("auto"),
        }
    }
}

impl Serialize for ShardCount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ShardCount::Count(n) => s.serialize_u32(*n),
            ShardCount::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for ShardCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl de::Visitor<'_> for Visit {
            type Value = ShardCount;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of shards or \"auto\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ShardCount, E> {
                // Out-of-range numbers are kept (saturated) for validation to report.
                Ok(ShardCount::Count(u32::try_from(v).unwrap_or(u32::MAX)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ShardCount, E> {
                Ok(ShardCount::Count(
                    u32::try_from(v.max(0)).unwrap_or(u32::MAX),
                ))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ShardCount, E> {
                let t = v.trim();
                if t.eq_ignore_ascii_case("auto") {
                    return Ok(ShardCount::Auto);
                }
                t.parse::<u32>()
                    .map(ShardCount::Count)
                    .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(Visit)
    }
}

impl JsonSchema for ShardCount {
    fn schema_name() -> Cow<'static, str> {
        "ShardCount".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // The form the v1.20 API server accepts for "a number or a string" (as IntOrString).
        json_schema!({
            "x-kubernetes-int-or-string": true,
        })
    }
}

/// The dataset one of `n` shards holds, for the per-shard estimates: images and bytes over
/// `n` plus [`IMBALANCE_PERCENT`] (the whole itself when `n` ≤ 1), the whole's largest image.
pub fn shard_shape(shape: &DatasetShape, n: u32) -> DatasetShape {
    if n <= 1 {
        return *shape;
    }
    let part = |v: u64| {
        let with_slack = u128::from(v) * u128::from(100 + IMBALANCE_PERCENT);
        let share = with_slack.div_ceil(100 * u128::from(n));
        u64::try_from(share).unwrap_or(u64::MAX).min(v)
    };
    DatasetShape {
        images: part(shape.images),
        bytes: part(shape.bytes),
        ..*shape
    }
}

/// The scan as shard `shard` of `n` sees it: [`shard_shape`]'s share of images and bytes,
/// and the shard's own largest image when the scan's list tells it ([`shard_largest`]), so
/// that one large image decides only its own shard's preset and floor (any shard: the
/// whole's largest; fingerprint and numbering kept).
pub fn shard_scan(scan: &ScanSummary, n: u32, shard: Option<u32>) -> ScanSummary {
    let shape = shard_shape(&scan.shape(), n);
    let mut part = ScanSummary {
        images: shape.images,
        bytes: shape.bytes,
        ..scan.clone()
    };
    if let Some(shard) = shard.filter(|_| n > 1) {
        if let Some(l) = shard_largest(&scan.largest, n, shard) {
            part.max_width = l.width;
            part.max_height = l.height;
            part.max_is_jpeg = l.jpeg;
        }
    }
    part
}

/// The 64-bit key of an image's path inside the dataset (`/`-separated): the first 8 bytes
/// of its blake3 digest. The shard of an image is [`shard_of_key`] of this key.
pub fn shard_key(path: &str) -> u64 {
    let digest = blake3::hash(path.as_bytes());
    let mut key = [0u8; 8];
    key.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_le_bytes(key)
}

/// The shard (0-based, below `count`) of the image at `path` relative to the dataset root.
pub fn shard_of(path: &str, count: u32) -> u32 {
    shard_of_key(shard_key(path), count)
}

/// The shard (0-based, below `count`) of a path's [`shard_key`].
pub fn shard_of_key(key: u64, count: u32) -> u32 {
    jump(key, count.max(1))
}

/// Jump consistent hash (Lamping & Veach, 2014): a bucket in `0..buckets` for `key`, such
/// that going from n to n + 1 buckets moves only the keys that land in the new bucket.
fn jump(mut key: u64, buckets: u32) -> u32 {
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2862933555777941757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// The largest image one shard of `n` holds, as far as the scan's `largest` list (largest
/// first, [`LARGEST_KEPT`] at most) tells: the first listed image of the shard; when none is
/// and the list was cut, the smallest listed (every image it left out is smaller); when the
/// list holds every sampled image and none is the shard's, nothing (the shard's images
/// were not sampled: the caller keeps the whole's largest).
pub fn shard_largest(largest: &[LargeImage], n: u32, shard: u32) -> Option<&LargeImage> {
    let in_shard = largest.iter().find(|l| {
        // An unreadable key could be any shard's: count it in.
        l.shard_key().is_none_or(|k| shard_of_key(k, n) == shard)
    });
    match in_shard {
        Some(l) => Some(l),
        None if largest.len() >= LARGEST_KEPT => largest.last(),
        None => None,
    }
}

/// What `auto` decided, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AutoShards {
    /// The number of shards.
    pub shards: u32,
    /// Why, for an Event.
    pub message: String,
}

/// The smallest number of shards each of which fits one pod (see the module's per-pod
/// limits): `limit` is `spec.memoryLimit`, `disk_per_shard` each shard's claim (unknown:
/// disk is not checked).
pub fn auto_count(shape: &DatasetShape, limit: u64, disk_per_shard: Option<u64>) -> AutoShards {
    for n in 1..=MAX_SHARDS {
        let part = shard_shape(shape, n);
        // The richest preset by memory: shards are added rather than features cut.
        let Some(preset) = auto_preset(&part, limit, None) else {
            continue;
        };
        let descriptors = estimate::expected_descriptors(&preset, part.images);
        let disk = estimate::disk_bytes(descriptors, part.images);
        let disk_ok = disk_per_shard.is_none_or(|d| disk <= d / 10 * 9);
        if disk_ok && descriptors <= MAX_DESCRIPTORS_PER_SHARD {
            return AutoShards {
                shards: n,
                message: format!(
                    "auto chose {n} shard(s): each holds about {} images, ~{}M descriptors with preset {} within the memory limit, its disk and the cap of {}M descriptors per shard",
                    part.images,
                    descriptors / 1_000_000,
                    preset.label(),
                    MAX_DESCRIPTORS_PER_SHARD / 1_000_000
                ),
            };
        }
    }
    let widest = shard_shape(shape, MAX_SHARDS);
    if auto_preset(&widest, limit, None).is_none() {
        return AutoShards {
            shards: 1,
            message: format!(
                "auto chose 1 shard: no preset fits the memory limit even over {MAX_SHARDS} shards, so sharding does not help"
            ),
        };
    }
    AutoShards {
        shards: MAX_SHARDS,
        message: format!(
            "auto chose the most shards, {MAX_SHARDS}: each still exceeds its disk or {}M descriptors",
            MAX_DESCRIPTORS_PER_SHARD / 1_000_000
        ),
    }
}

/// The number of shards a build gets from `spec.shards` (absent: 1), deciding `auto` with
/// [`auto_count`]; the message says why when `auto` decided.
pub fn count(
    spec: Option<ShardCount>,
    shape: &DatasetShape,
    limit: u64,
    disk_per_shard: Option<u64>,
) -> (u32, Option<String>) {
    match spec.unwrap_or_default() {
        ShardCount::Count(n) => (n.clamp(1, MAX_SHARDS), None),
        ShardCount::Auto => {
            let a = auto_count(shape, limit, disk_per_shard);
            (a.shards, Some(a.message))
        }
    }
}

/// Shard build pods that may run at once: `spec.maxParallelBuilds`, default all `shards`.
pub fn parallel_builds(max_parallel: Option<u32>, shards: u32) -> u32 {
    max_parallel.unwrap_or(shards).clamp(1, shards.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::MIB;

    fn catalogue(images: u64) -> DatasetShape {
        DatasetShape {
            images,
            bytes: images * 2_000_000,
            max_width: 4000,
            max_height: 3000,
            max_is_jpeg: true,
        }
    }

    #[test]
    fn spec_shards_reads_numbers_and_auto() {
        let n: ShardCount = serde_json::from_str("3").unwrap();
        assert_eq!(n, ShardCount::Count(3));
        let a: ShardCount = serde_json::from_str("\"auto\"").unwrap();
        assert_eq!(a, ShardCount::Auto);
        let s: ShardCount = serde_json::from_str("\"4\"").unwrap();
        assert_eq!(s, ShardCount::Count(4));
        assert!(serde_json::from_str::<ShardCount>("\"many\"").is_err());
        assert_eq!(
            serde_json::from_str::<ShardCount>("-2").unwrap(),
            ShardCount::Count(0)
        );
        assert_eq!(serde_json::to_string(&ShardCount::Count(3)).unwrap(), "3");
        assert_eq!(
            serde_json::to_string(&ShardCount::Auto).unwrap(),
            "\"auto\""
        );
        assert_eq!(ShardCount::default(), ShardCount::Count(1));
    }

    #[test]
    fn a_shard_is_its_share_plus_the_imbalance() {
        let whole = catalogue(1000);
        assert_eq!(shard_shape(&whole, 1), whole);
        let third = shard_shape(&whole, 3);
        assert_eq!(third.images, 367, "1000 * 1.1 / 3, rounded up");
        assert_eq!(third.bytes, 733_333_334);
        assert_eq!(
            (third.max_width, third.max_height),
            (whole.max_width, whole.max_height)
        );
        let tiny = catalogue(1);
        assert_eq!(shard_shape(&tiny, 8).images, 1);
        let scan = ScanSummary {
            images: 1000,
            bytes: 2_000_000_000,
            first_attempt: Some(4),
            fingerprint: "f".into(),
            ..ScanSummary::default()
        };
        let s = shard_scan(&scan, 2, Some(1));
        assert_eq!((s.images, s.first_attempt), (550, Some(4)));
        assert_eq!(s.fingerprint, "f");
    }

    /// `n` paths that land in `shard` of `count`.
    fn paths_in(shard: u32, count: u32, n: usize) -> Vec<String> {
        (0..)
            .map(|i| format!("photos/p{i}.jpg"))
            .filter(|p| shard_of(p, count) == shard)
            .take(n)
            .collect()
    }

    #[test]
    fn keys_in_the_scan_give_the_shard_of_the_path() {
        for i in 0..200 {
            let path = format!("a/b/{i}.jpg");
            let l = LargeImage::new(&path, 10, 10, true);
            assert_eq!(l.key.len(), 16);
            for n in [2, 3, 7, 64] {
                assert_eq!(shard_of_key(l.shard_key().unwrap(), n), shard_of(&path, n));
            }
        }
        let bad = LargeImage {
            key: "xyz".into(),
            ..LargeImage::new("a", 1, 1, false)
        };
        assert_eq!(bad.shard_key(), None);
    }

    #[test]
    fn each_shard_is_sized_by_its_own_largest_image() {
        let big = &paths_in(2, 3, 1)[0];
        let mids = paths_in(1, 3, 2);
        let larges = crate::scan::keep_largest(vec![
            LargeImage::new(&mids[0], 1600, 1200, true),
            LargeImage::new(big, 4000, 4800, true),
            LargeImage::new(&mids[1], 1200, 900, false),
        ]);
        assert_eq!(larges[0].width, 4000, "largest first");
        let scan = ScanSummary {
            images: 30,
            bytes: 90_000_000,
            max_width: 4000,
            max_height: 4800,
            max_is_jpeg: true,
            largest: larges.clone(),
            ..ScanSummary::default()
        };
        let size = |s: ScanSummary| (s.max_width, s.max_height, s.max_is_jpeg);
        assert_eq!(size(shard_scan(&scan, 3, Some(2))), (4000, 4800, true));
        assert_eq!(size(shard_scan(&scan, 3, Some(1))), (1600, 1200, true));
        // Shard 0's images were not among those sampled: the whole's largest, to be safe.
        assert_eq!(size(shard_scan(&scan, 3, Some(0))), (4000, 4800, true));
        // No shard selected, or no list (an older indexer's scan): the whole's largest.
        assert_eq!(size(shard_scan(&scan, 3, None)), (4000, 4800, true));
        let old = ScanSummary {
            largest: Vec::new(),
            ..scan.clone()
        };
        assert_eq!(size(shard_scan(&old, 3, Some(1))), (4000, 4800, true));
        // Unsharded: the whole.
        assert_eq!(shard_scan(&scan, 1, Some(0)), scan);
        // A cut list (LARGEST_KEPT entries, none in shard 0): every image it left out is at
        // most its smallest.
        let mut cut: Vec<LargeImage> = paths_in(1, 3, LARGEST_KEPT)
            .iter()
            .enumerate()
            .map(|(i, p)| LargeImage::new(p, 3000 - i as u32 * 100, 2000, true))
            .collect();
        cut = crate::scan::keep_largest(cut);
        let smallest = cut.last().unwrap().width;
        let scan = ScanSummary {
            largest: cut,
            ..scan
        };
        assert_eq!(size(shard_scan(&scan, 3, Some(0))), (smallest, 2000, true));
        assert_eq!(size(shard_scan(&scan, 3, Some(1))), (3000, 2000, true));
    }

    #[test]
    fn auto_keeps_small_catalogues_whole() {
        let a = auto_count(&catalogue(5_000), 512 * MIB, Some(10 << 30));
        assert_eq!(a.shards, 1, "{}", a.message);
        // The seed's 116k photos: ~104M descriptors with the full preset, one shard.
        let seed = auto_count(&catalogue(116_085), 512 * MIB, None);
        assert_eq!(seed.shards, 1, "{}", seed.message);
    }

    #[test]
    fn auto_splits_by_descriptors_and_by_disk() {
        // 1M photos at 1000 features: ~900M descriptors, 150M a shard → 7 with the slack.
        let big = auto_count(&catalogue(1_000_000), 512 * MIB, None);
        assert_eq!(big.shards, 7, "{}", big.message);
        let part = shard_shape(&catalogue(1_000_000), big.shards);
        assert!(part.images * 900 <= MAX_DESCRIPTORS_PER_SHARD);
        // A small claim per shard forces more shards than the descriptors do.
        let tight = auto_count(&catalogue(116_085), 512 * MIB, Some(2 << 30));
        assert!(tight.shards > 1, "{}", tight.message);
        let part = shard_shape(&catalogue(116_085), tight.shards);
        let p = auto_preset(&part, 512 * MIB, None).unwrap();
        assert_eq!(p.label(), "full", "the shards keep the richest preset");
        assert!(
            estimate::disk_bytes(estimate::expected_descriptors(&p, part.images), part.images)
                <= (2u64 << 30) / 10 * 9
        );
    }

    #[test]
    fn auto_does_not_shard_what_memory_cannot_hold() {
        let a = auto_count(&catalogue(116_085), 16 * MIB, None);
        assert_eq!(a.shards, 1);
        assert!(a.message.contains("does not help"), "{}", a.message);
    }

    #[test]
    fn counts_and_parallel_builds() {
        let shape = catalogue(100);
        assert_eq!(count(None, &shape, 512 * MIB, None), (1, None));
        assert_eq!(
            count(Some(ShardCount::Count(3)), &shape, 512 * MIB, None).0,
            3
        );
        let (n, why) = count(Some(ShardCount::Auto), &shape, 512 * MIB, None);
        assert_eq!(n, 1);
        assert!(why.is_some());
        assert_eq!(parallel_builds(None, 3), 3);
        assert_eq!(parallel_builds(Some(2), 3), 2);
        assert_eq!(parallel_builds(Some(9), 3), 3);
        assert_eq!(parallel_builds(Some(0), 3), 1);
    }
}
