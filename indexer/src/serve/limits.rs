//! How much memory queries may use, and so how many decode at once.
//!
//! The memory of the query service is a fixed base plus what the queries in flight hold.
//! A query holds, while it decodes and extracts (its *slot*), the decoded image, ORB's working
//! memory, its upload and OpenCV's copy of the upload. [`estimate::image_bytes`] gives the
//! first two for a header's size; the largest image the header check admits
//! ([`imageguard::MAX_PIXELS`], 100 MP, at most [`imageguard::MAX_SIDE`] a side) at the richest
//! preset's working size, with the query features, is the worst case of one slot:
//!
//! ```text
//! slot = decoded (100 MP × 1 B, gray) + work (2048² px × ORB_BYTES_PER_WORK_PIXEL)
//!        + 1000 features × BYTES_PER_FEATURE + 2 × max_body
//!      = 100,000,000 + 4,194,304 × 20 + 1000 × 400 + 2 × 20,000,000
//!      = 224,286,080 B (≈ 214 MiB) with today's calibrated constants
//! ```
//!
//! WebP and TIFF are decoded by OpenCV through a colour buffer first: they cost
//! [`COLOUR_BUFFER_BYTES_PER_PIXEL`] more per pixel (a 100 MP WebP ≈ 625 MB). Slots are sized
//! for those too when the limit has room for one per core; otherwise for the gray worst case
//! above, and a larger colour-buffered image is refused (422 `too_large_for_memory`) rather
//! than risking the limit. Under a limit too small for even one gray worst case, the one slot
//! gets what there is and every image is admitted by its own estimate.
//!
//! Uploads waiting for a slot are buffered within a byte budget (a request reserves its
//! `Content-Length`, or `max_body` when it streams, before its body is read), and what the
//! base, the slots and that budget leave is the budget of an in-process rebuild:
//!
//! ```text
//! limit = base + slots × slot + body buffer + rebuild budget
//! slot  = any-format worst case if (--slots or cores) of them fit, else the gray worst case
//! slots = min(--slots or cores, (limit − base − max_body) / slot), at least 1
//! body buffer = clamp((limit − base − slots × slot) / 2, max_body, 256 MiB)
//! ```

use crate::features::QUERY_FEATURE_FACTOR;
use crate::imageguard::{self, Format, Header};
use imageindex_crds::estimate;
use imageindex_crds::preset::Preset;
use serde::Serialize;

const MIB: u64 = 1 << 20;
/// Resident memory of an idle query service with an index open: the indexer's base
/// ([`estimate::BASE_BYTES`]), the tokio and rayon threads, the index's centroids and offsets,
/// metrics (measured about 60 MiB on the sample index; kept generous).
pub const SERVE_BASE_BYTES: u64 = estimate::BASE_BYTES + 40 * MIB;
/// Upper bound of the buffer for uploads waiting for a slot.
pub const MAX_BODY_BUFFER_BYTES: u64 = 256 * MIB;
/// Extra bytes per pixel for formats OpenCV decodes through a 4-channel buffer.
pub const COLOUR_BUFFER_BYTES_PER_PIXEL: u64 = 4;
/// Requests allowed to wait for a slot (beyond it: 503 with Retry-After).
pub const DEFAULT_QUEUE: usize = 256;

/// The preset queries of an index built with `p` are extracted with (more features, see
/// [`QUERY_FEATURE_FACTOR`]).
pub fn query_preset(p: &Preset) -> Preset {
    Preset {
        nfeatures: p.nfeatures * QUERY_FEATURE_FACTOR,
        ..*p
    }
}

/// Peak bytes one query holds while in its slot: decoded image, ORB's working memory, the
/// upload and OpenCV's copy of it.
pub fn query_bytes(preset: &Preset, header: &Header, upload: u64) -> u64 {
    let q = query_preset(preset);
    let jpeg = header.format == Format::Jpeg;
    let mut bytes = estimate::image_bytes(&q, header.width, header.height, jpeg) + 2 * upload;
    if matches!(header.format, Format::Webp | Format::Tiff) {
        bytes += header.width as u64 * header.height as u64 * COLOUR_BUFFER_BYTES_PER_PIXEL;
    }
    bytes
}

/// The worst case of one slot: the largest admitted gray-decoded image at the richest preset
/// of the ladder, with the largest upload.
pub fn worst_query_bytes(max_body: u64) -> u64 {
    worst_slot_bytes(Format::Png, max_body)
}

/// The worst case of one slot over every admitted format: the largest admitted image
/// decoded through a colour buffer.
pub fn worst_any_format_bytes(max_body: u64) -> u64 {
    worst_slot_bytes(Format::Webp, max_body)
}

/// One slot holding the largest admitted image of `format` at the richest preset of the
/// ladder, with the largest upload.
fn worst_slot_bytes(format: Format, max_body: u64) -> u64 {
    let side = (imageguard::MAX_PIXELS as f64).sqrt() as u32;
    let header = Header {
        format,
        width: side,
        height: side,
    };
    Preset::ladder()
        .iter()
        .map(|p| query_bytes(p, &header, max_body))
        .max()
        .unwrap_or(0)
}

/// The service's memory plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ServeLimits {
    /// The memory limit planned for (cgroup, `--memory-limit`, or the machine).
    pub limit: u64,
    /// The idle service.
    pub base: u64,
    /// Queries decoding and extracting at once.
    pub slots: usize,
    /// Bytes each slot may use; a query whose estimate exceeds it is refused (422).
    pub slot_bytes: u64,
    /// Bytes of uploads buffered at once (waiting for a slot).
    pub body_buffer: u64,
    /// Largest request body.
    pub max_body: u64,
    /// Requests waiting for a slot before new ones get 503.
    pub queue: usize,
    /// What is left for an in-process rebuild.
    pub rebuild_budget: u64,
}

impl ServeLimits {
    /// Plans the slots and buffers for a memory limit (see the module documentation).
    pub fn plan(
        limit: u64,
        cores: usize,
        slots: Option<usize>,
        queue: Option<usize>,
        max_body: u64,
    ) -> ServeLimits {
        let base = SERVE_BASE_BYTES;
        let any = worst_any_format_bytes(max_body);
        let gray = worst_query_bytes(max_body);
        let avail = limit.saturating_sub(base);
        let for_slots = avail.saturating_sub(max_body);
        let wanted = slots.unwrap_or(cores).max(1);
        let fit = |per: u64| (for_slots / per.max(1)) as usize;
        let (slots, slot_bytes) = if fit(any) >= wanted {
            (wanted, any)
        } else if fit(gray) >= 1 {
            (wanted.min(fit(gray)), gray)
        } else {
            // Not even one gray worst case fits: one slot gets what there is, and larger
            // images are refused by their estimate.
            (1, for_slots)
        };
        let left = avail.saturating_sub(slot_bytes * slots as u64);
        let body_buffer = (left / 2).clamp(max_body, MAX_BODY_BUFFER_BYTES.max(max_body));
        ServeLimits {
            limit,
            base,
            slots,
            slot_bytes,
            body_buffer,
            max_body,
            queue: queue.unwrap_or(DEFAULT_QUEUE).max(1),
            rebuild_budget: left.saturating_sub(body_buffer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_worst_slot_is_a_100_megapixel_gray_image_at_full() {
        let work = 2048 * 2048 * estimate::ORB_BYTES_PER_WORK_PIXEL;
        let features = 1000 * estimate::BYTES_PER_FEATURE;
        assert_eq!(
            worst_query_bytes(20_000_000),
            100_000_000 + work + features + 40_000_000
        );
    }

    #[test]
    fn a_roomy_limit_gets_one_slot_per_core() {
        let l = ServeLimits::plan(24 * GIB, 2, None, None, 20_000_000);
        assert_eq!(l.slots, 2);
        assert_eq!(l.slot_bytes, worst_any_format_bytes(20_000_000));
        assert_eq!(l.body_buffer, MAX_BODY_BUFFER_BYTES);
        assert_eq!(
            l.base + 2 * l.slot_bytes + l.body_buffer + l.rebuild_budget,
            24 * GIB
        );
    }

    #[test]
    fn a_tight_limit_gets_fewer_slots_and_refuses_huge_images() {
        let worst = worst_query_bytes(20_000_000);
        let l = ServeLimits::plan(GIB, 8, None, None, 20_000_000);
        assert_eq!(
            l.slots as u64,
            (GIB - SERVE_BASE_BYTES - 20_000_000) / worst
        );
        assert!(l.base + l.slots as u64 * l.slot_bytes + l.body_buffer <= GIB);
        let l = ServeLimits::plan(256 * MIB, 8, Some(4), None, 20_000_000);
        assert_eq!(l.slots, 1);
        assert!(l.slot_bytes < worst);
        assert!(l.base + l.slot_bytes + l.body_buffer <= 256 * MIB);
        let big = Header {
            format: Format::Png,
            width: 10_000,
            height: 10_000,
        };
        let p = imageindex_crds::PresetName::Full.preset();
        assert!(query_bytes(&p, &big, 1 << 20) > l.slot_bytes);
        let photo = Header {
            format: Format::Jpeg,
            width: 4000,
            height: 3000,
        };
        assert!(query_bytes(&p, &photo, 4 << 20) < l.slot_bytes);
    }

    #[test]
    fn slots_take_colour_buffers_only_when_there_is_room() {
        // 2 GiB: two any-format slots (≈ 625 MB each) fit
        let l = ServeLimits::plan(2 * GIB, 2, None, None, 20_000_000);
        assert_eq!(
            (l.slots, l.slot_bytes),
            (2, worst_any_format_bytes(20_000_000))
        );
        // 1 GiB with 2 cores: only gray worst cases
        let l = ServeLimits::plan(GIB, 2, None, None, 20_000_000);
        assert_eq!((l.slots, l.slot_bytes), (2, worst_query_bytes(20_000_000)));
    }

    #[test]
    fn colour_buffered_formats_cost_more() {
        let p = imageindex_crds::PresetName::Small.preset();
        let h = |format| Header {
            format,
            width: 4000,
            height: 4000,
        };
        assert_eq!(
            query_bytes(&p, &h(Format::Webp), 0) - query_bytes(&p, &h(Format::Png), 0),
            16_000_000 * COLOUR_BUFFER_BYTES_PER_PIXEL
        );
    }
}
