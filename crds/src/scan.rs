//! The result of `indexer scan --json`: the contract a scan pod writes to its termination
//! message and the operator reads. Kept small (well under the 4 KiB termination-message limit).

use crate::estimate::{self, DatasetShape, Estimate};
use crate::first_preset;
use crate::preset::Preset;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Version of the scan JSON; bumped when a field changes meaning.
pub const SCAN_REPORT_VERSION: u32 = 1;

/// Most of the largest sampled images a scan lists ([`ScanReport::largest`]).
pub const LARGEST_KEPT: usize = 12;

/// One of the largest sampled images: its size and which shard holds it for any shard count
/// (the key of its path), so that each shard's estimates use the shard's own largest image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LargeImage {
    /// [`crate::shards::shard_key`] of its path, 16 hex digits (a string: API servers read
    /// JSON numbers as at most 63 bits).
    pub key: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Whether it is a JPEG.
    pub jpeg: bool,
}

impl LargeImage {
    /// The entry for the image at `path` (inside the dataset).
    pub fn new(path: &str, width: u32, height: u32, jpeg: bool) -> Self {
        LargeImage {
            key: format!("{:016x}", crate::shards::shard_key(path)),
            width,
            height,
            jpeg,
        }
    }

    /// The key as a number (`None` when it is not 16 hex digits).
    pub fn shard_key(&self) -> Option<u64> {
        (self.key.len() == 16)
            .then(|| u64::from_str_radix(&self.key, 16).ok())
            .flatten()
    }

    /// Its pixels.
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

/// What `indexer scan` found and what it estimates, per preset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScanReport {
    /// Version of this format ([`SCAN_REPORT_VERSION`]).
    pub version: u32,
    /// Image files found (by content, not by name).
    pub images: u64,
    /// Their total size in bytes.
    pub bytes: u64,
    /// Files that look like images by name but cannot be indexed (not an image, unreadable,
    /// bad name, oversized header); the build records each with its reason.
    pub skipped: u64,
    /// How many image headers were read to learn dimensions.
    pub sampled: u64,
    /// Largest sampled image and whether it is a JPEG.
    pub shape: DatasetShape,
    /// Hex digest of the sorted (path, size, mtime) list: changes when the dataset changes.
    pub fingerprint: String,
    /// The memory limit the estimate was made for, if any (bytes).
    pub memory_limit: Option<u64>,
    /// Extraction threads the estimate assumes.
    pub threads: u32,
    /// The preset `auto` picks for `memory_limit` (absent when nothing fits).
    pub auto: Option<String>,
    /// Memory and disk per preset of the ladder.
    pub estimates: Vec<Estimate>,
    /// The largest sampled images, largest first, at most [`LARGEST_KEPT`] (for the
    /// per-shard estimates; absent from reports of older indexers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub largest: Vec<LargeImage>,
}

impl ScanReport {
    /// Builds a report from what a scan counted, estimating every preset of the ladder.
    pub fn new(
        shape: DatasetShape,
        skipped: u64,
        sampled: u64,
        fingerprint: String,
        memory_limit: Option<u64>,
        threads: u32,
    ) -> Self {
        let estimates = Preset::ladder()
            .iter()
            .map(|p| estimate::estimate(p, &shape, threads))
            .collect();
        let auto = memory_limit
            .and_then(|limit| first_preset::auto_preset(&shape, limit, None).map(|p| p.label()));
        ScanReport {
            version: SCAN_REPORT_VERSION,
            images: shape.images,
            bytes: shape.bytes,
            skipped,
            sampled,
            shape,
            fingerprint,
            memory_limit,
            threads,
            auto,
            estimates,
            largest: Vec::new(),
        }
    }

    /// The report with the scan's largest sampled images (any order, any number: the
    /// [`LARGEST_KEPT`] largest are kept, largest first).
    pub fn with_largest(mut self, largest: Vec<LargeImage>) -> Self {
        self.largest = keep_largest(largest);
        self
    }
}

/// The [`LARGEST_KEPT`] largest of `images`, largest first (ties by key, so any order of
/// the same images gives the same list).
pub fn keep_largest(mut images: Vec<LargeImage>) -> Vec<LargeImage> {
    images.sort_by(|a, b| b.pixels().cmp(&a.pixels()).then_with(|| a.key.cmp(&b.key)));
    images.dedup();
    images.truncate(LARGEST_KEPT);
    images
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_is_small_enough_for_a_termination_message() {
        let shape = DatasetShape {
            images: 116_085,
            bytes: 250_000_000_000,
            max_width: 8000,
            max_height: 6000,
            max_is_jpeg: true,
        };
        let many = (0..100)
            .map(|i| LargeImage::new(&format!("photos/{i:06}.jpg"), 99_999, 99_999 - i, true))
            .collect();
        let r = ScanReport::new(shape, 12, 4096, "ab".repeat(16), Some(512 << 20), 64)
            .with_largest(many);
        assert_eq!(r.largest.len(), LARGEST_KEPT);
        assert!(r.largest.windows(2).all(|w| w[0].pixels() >= w[1].pixels()));
        let json = serde_json::to_string(&r).unwrap();
        // The kubelet keeps 4 KiB of a termination message.
        assert!(json.len() < 3 * 1024, "{} bytes", json.len());
        assert_eq!(r.auto.as_deref(), Some("full"));
        let back: ScanReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn no_auto_without_a_limit_or_when_nothing_fits() {
        let shape = DatasetShape {
            images: 10,
            bytes: 1,
            max_width: 640,
            max_height: 480,
            max_is_jpeg: true,
        };
        assert_eq!(
            ScanReport::new(shape, 0, 10, String::new(), None, 2).auto,
            None
        );
        assert_eq!(
            ScanReport::new(shape, 0, 10, String::new(), Some(1 << 20), 2).auto,
            None
        );
    }
}
