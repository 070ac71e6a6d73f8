//! Inverted-list entries and how a cell's lists are laid out in LMDB.
//!
//! An entry is what a query needs from a stored descriptor: its 256-bit code (to measure
//! the Hamming distance), the image it belongs to (to vote) and its keypoint (to verify),
//! 40 bytes in all. A cell's leaves are stored leaf after leaf in one LMDB value per "part"
//! (key: cell << 32 | part); a part holds whole leaves, and a cell is split into several parts
//! only when it is too large to sort in the build's memory budget. The [`CellRecord`] says
//! where each leaf starts.

use crate::features::{Descriptor, DESCRIPTOR_BYTES};
use crate::hamming::Words;

/// Bytes of one entry: 32-byte code, u32 image id, u16 x and y (quarter pixels).
pub const ENTRY_BYTES: usize = DESCRIPTOR_BYTES + 8;

/// One stored descriptor as a query sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The descriptor as words.
    pub code: Words,
    /// Catalogue image id.
    pub image: u32,
    /// Keypoint position in quarter pixels of the image's working frame.
    pub kp: [u16; 2],
}

/// Appends one entry to a buffer.
pub fn push(buf: &mut Vec<u8>, code: &Descriptor, image: u32, kp: [u16; 2]) {
    buf.extend_from_slice(code);
    buf.extend_from_slice(&image.to_le_bytes());
    buf.extend_from_slice(&kp[0].to_le_bytes());
    buf.extend_from_slice(&kp[1].to_le_bytes());
}

/// The code of an encoded entry, as words.
#[inline]
pub fn code_of(e: &[u8]) -> Words {
    std::array::from_fn(|i| u64::from_le_bytes(e[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8])))
}

/// Decodes one entry (`e` must hold at least [`ENTRY_BYTES`]).
#[inline]
pub fn decode(e: &[u8]) -> Entry {
    let at = DESCRIPTOR_BYTES;
    Entry {
        code: code_of(e),
        image: u32::from_le_bytes([e[at], e[at + 1], e[at + 2], e[at + 3]]),
        kp: [
            u16::from_le_bytes([e[at + 4], e[at + 5]]),
            u16::from_le_bytes([e[at + 6], e[at + 7]]),
        ],
    }
}

/// Iterates the entries of a buffer.
pub fn entries(buf: &[u8]) -> impl Iterator<Item = Entry> + '_ {
    buf.chunks_exact(ENTRY_BYTES).map(decode)
}

/// The key of cell `cell`'s bucket of partition flush `flush` in the working environment:
/// flush-major, so each flush appends at the end of the tree instead of touching one leaf
/// page per cell (at 116M descriptors, 1,024 pages a flush, all of them kept hot).
pub fn bucket_key(flush: u32, cell: u32) -> u64 {
    ((flush as u64) << 32) | cell as u64
}

/// The key of part `part` of cell `cell` in the lists database.
pub fn part_key(cell: u32, part: u32) -> u64 {
    ((cell as u64) << 32) | part as u64
}

/// Where a cell's leaves are: its leaf centroids and their prices, and for each leaf the
/// index of its first entry (counted from the cell's first entry), plus the first leaf of
/// every part.
#[derive(Clone, Debug, PartialEq)]
pub struct CellRecord {
    /// The leaf centroids, 32 bytes each.
    pub leaves: Vec<u8>,
    /// Each leaf's price ([`crate::vocab::balance`]).
    pub prices: Vec<u16>,
    /// Entry index where each leaf starts, plus the cell's entry count at the end.
    pub starts: Vec<u32>,
    /// First leaf (local index) of each part; `parts[0] == 0`.
    pub parts: Vec<u32>,
}

impl CellRecord {
    /// Entries in the cell.
    pub fn entries(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0) as u64
    }

    /// The part holding local leaf `leaf`, and the byte range of the leaf inside that part.
    pub fn locate(&self, leaf: u32) -> Option<(u32, std::ops::Range<usize>)> {
        let l = leaf as usize;
        if l + 1 >= self.starts.len() {
            return None;
        }
        let part = self.parts.partition_point(|&p| p <= leaf).checked_sub(1)?;
        let base = self.starts[*self.parts.get(part)? as usize] as usize;
        let from = (self.starts[l] as usize - base) * ENTRY_BYTES;
        let to = (self.starts[l + 1] as usize - base) * ENTRY_BYTES;
        Some((part as u32, from..to))
    }
}

impl CellRecord {
    /// Encodes the record: three little-endian u32 counts, then the leaves, their prices
    /// (u16), starts and parts (u32).
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = self.leaves.len() / 32;
        let mut out = Vec::with_capacity(12 + n * 34 + 4 * (self.starts.len() + self.parts.len()));
        out.extend_from_slice(&(n as u32).to_le_bytes());
        out.extend_from_slice(&(self.starts.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.parts.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.leaves);
        for i in 0..n {
            let p = self.prices.get(i).copied().unwrap_or(0);
            out.extend_from_slice(&p.to_le_bytes());
        }
        for v in self.starts.iter().chain(&self.parts) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Decodes a record written by [`CellRecord::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Option<CellRecord> {
        let u32_at = |i: usize| -> Option<u32> {
            Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?))
        };
        let n_leaves = u32_at(0)? as usize;
        let n_starts = u32_at(4)? as usize;
        let n_parts = u32_at(8)? as usize;
        let leaves_end = 12usize.checked_add(n_leaves.checked_mul(32)?)?;
        let prices_end = leaves_end.checked_add(n_leaves.checked_mul(2)?)?;
        let end = prices_end.checked_add((n_starts + n_parts).checked_mul(4)?)?;
        if b.len() != end || n_starts != n_leaves + 1 || n_parts == 0 {
            return None;
        }
        let leaves = b[12..leaves_end].to_vec();
        let prices = b[leaves_end..prices_end]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        let ints: Vec<u32> = (0..n_starts + n_parts)
            .map(|i| u32_at(prices_end + i * 4))
            .collect::<Option<_>>()?;
        let (starts, parts) = ints.split_at(n_starts);
        let rec = CellRecord {
            leaves,
            prices,
            starts: starts.to_vec(),
            parts: parts.to_vec(),
        };
        let monotonic = rec.starts.windows(2).all(|w| w[0] <= w[1])
            && rec.parts.windows(2).all(|w| w[0] < w[1])
            && rec.parts[0] == 0
            && rec
                .parts
                .last()
                .is_some_and(|&p| (p as usize) < n_leaves.max(1));
        monotonic.then_some(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let mut buf = Vec::new();
        push(&mut buf, &[3; 32], 7, [1, 65535]);
        push(&mut buf, &[255; 32], 9, [4, 8]);
        assert_eq!(buf.len(), 2 * ENTRY_BYTES);
        let e: Vec<Entry> = entries(&buf).collect();
        assert_eq!(e[0].image, 7);
        assert_eq!(e[0].kp, [1, 65535]);
        assert_eq!(e[1].code, [u64::MAX; 4]);
        assert_eq!(e[0].code, [0x0303_0303_0303_0303; 4]);
    }

    #[test]
    fn bucket_keys_sort_by_flush_then_cell() {
        assert!(bucket_key(0, 4095) < bucket_key(1, 0));
        assert!(bucket_key(7, 1) < bucket_key(7, 2));
        assert_eq!(bucket_key(2, 5) >> 32, 2);
    }

    #[test]
    fn part_keys_sort_by_cell_then_part() {
        assert!(part_key(1, 9) < part_key(2, 0));
        assert!(part_key(1, 1) < part_key(1, 2));
    }

    #[test]
    fn cell_record_locates_leaves_across_parts() {
        // 4 leaves with 3, 0, 5, 2 entries; parts start at leaves 0 and 2.
        let rec = CellRecord {
            leaves: vec![0; 4 * 32],
            prices: vec![0, 3, 0, 1],
            starts: vec![0, 3, 3, 8, 10],
            parts: vec![0, 2],
        };
        assert_eq!(rec.entries(), 10);
        assert_eq!(rec.locate(0), Some((0, 0..3 * ENTRY_BYTES)));
        assert_eq!(rec.locate(1), Some((0, 3 * ENTRY_BYTES..3 * ENTRY_BYTES)));
        assert_eq!(rec.locate(2), Some((1, 0..5 * ENTRY_BYTES)));
        assert_eq!(rec.locate(3), Some((1, 5 * ENTRY_BYTES..7 * ENTRY_BYTES)));
        assert_eq!(rec.locate(4), None);
        let bytes = rec.to_bytes();
        assert_eq!(CellRecord::from_bytes(&bytes), Some(rec.clone()));
        assert_eq!(CellRecord::from_bytes(&bytes[..bytes.len() - 1]), None);
        let mut bad = bytes.clone();
        bad[8] = 0; // no parts
        assert_eq!(CellRecord::from_bytes(&bad[..bad.len() - 8]), None);
        let mut unordered = rec.clone();
        unordered.starts = vec![0, 3, 2, 8, 10];
        assert_eq!(CellRecord::from_bytes(&unordered.to_bytes()), None);
    }
}
