//! The inverted lists at query time: the vocabulary and every cell's layout loaded once, and
//! a lookup that routes each query descriptor to its nearest leaves and scans them.
//!
//! Lookups are list-major: the query descriptors are routed first, then each probed leaf is
//! read once (one contiguous slice of a memory-mapped LMDB value) and compared with every
//! query descriptor that probes it, so a list shared by many query descriptors costs one
//! read, and the codes stream through the cache.

use crate::error::{IndexError, Result};
use crate::hamming::{distance_words, Words};
use crate::postings::{self, CellRecord, ENTRY_BYTES};
use crate::store::{self, Store};
use crate::vocab::{self, ProbeScratch, VocabShape, Vocabulary};
use heed::RoTxn;
use rayon::prelude::*;

/// One stored descriptor close to a query descriptor. Orders by distance, then image, then
/// keypoint (deterministic ties).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hit {
    /// Hamming distance to the query descriptor.
    pub dist: u32,
    /// Catalogue image.
    pub image: u32,
    /// The stored keypoint (quarter pixels of the image's working frame).
    pub kp: [u16; 2],
}

/// No hit (sorts after every real one).
pub const NO_HIT: Hit = Hit {
    dist: u32::MAX,
    image: u32::MAX,
    kp: [u16::MAX; 2],
};

/// Hits kept per query descriptor.
pub const HITS: usize = 4;

/// The closest [`HITS`] hits of one query descriptor, closest first.
pub type Hits = [Hit; HITS];

/// Inserts a hit into a sorted list, keeping the best [`HITS`].
#[inline]
pub fn insert_hit(best: &mut Hits, h: Hit) {
    if h >= best[HITS - 1] || best.contains(&h) {
        return;
    }
    let mut i = HITS - 1;
    while i > 0 && h < best[i - 1] {
        best[i] = best[i - 1];
        i -= 1;
    }
    best[i] = h;
}

/// Where one cell's leaves are.
#[derive(Clone, Debug)]
struct CellLayout {
    starts: Vec<u32>,
    parts: Vec<u32>,
}

/// How hard a lookup searches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Probe {
    /// Cells whose leaves are considered per query descriptor.
    pub cells: usize,
    /// Leaves (lists) scanned per query descriptor.
    pub lists: usize,
}

/// How evenly the entries fill the lists.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListStats {
    /// Top-level cells.
    pub cells: u32,
    /// Lists (leaves).
    pub lists: u64,
    /// Entries in all lists.
    pub entries: u64,
    /// Mean entries per list.
    pub mean: f64,
    /// Median list length.
    pub p50: u32,
    /// 99th percentile of list length.
    pub p99: u32,
    /// Longest list.
    pub max: u32,
    /// Mean length of the list an entry is in (what a lookup scans per probed list when
    /// queries fall where the data is): above the mean when lists are uneven.
    pub entry_weighted_mean: f64,
}

/// The vocabulary and list layout of a published generation.
pub struct ListIndex {
    vocab: Vocabulary,
    layout: Vec<CellLayout>,
    shape: VocabShape,
    entries: u64,
}

impl ListIndex {
    /// Loads the vocabulary and every cell's layout.
    pub fn open(store: &Store, rtxn: &RoTxn) -> Result<ListIndex> {
        let bad = |reason: &str| IndexError::BadIndex {
            path: store.env.path().to_path_buf(),
            reason: reason.to_string(),
        };
        let (top, top_prices) = store.vocab_top(rtxn)?;
        let shape: VocabShape = store
            .get_json(rtxn, store::keys::VOCAB_SHAPE)?
            .ok_or_else(|| bad("no vocabulary shape"))?;
        let mut cell_leaves = Vec::with_capacity(top.len());
        let mut layout = Vec::with_capacity(top.len());
        let mut entries = 0;
        for c in 0..top.len() as u32 {
            let rec = store
                .cells
                .get(rtxn, &c)?
                .and_then(CellRecord::from_bytes)
                .ok_or_else(|| bad(&format!("cell {c} missing or damaged")))?;
            entries += rec.entries();
            cell_leaves.push((
                vocab::centroids_from_bytes(&rec.leaves).ok_or_else(|| bad("leaf centroids"))?,
                rec.prices,
            ));
            layout.push(CellLayout {
                starts: rec.starts,
                parts: rec.parts,
            });
        }
        Ok(ListIndex {
            vocab: Vocabulary::new(top, top_prices, cell_leaves),
            layout,
            shape,
            entries,
        })
    }

    /// The vocabulary.
    pub fn vocabulary(&self) -> &Vocabulary {
        &self.vocab
    }

    /// The vocabulary's shape.
    pub fn shape(&self) -> VocabShape {
        self.shape
    }

    /// Entries in all lists.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Entries in one leaf's list.
    pub fn list_len(&self, leaf: u32) -> u32 {
        let c = self.vocab.cell_of(leaf);
        let local = (leaf - self.vocab.cell_leaves(c).start) as usize;
        let s = &self.layout[c as usize].starts;
        s[local + 1] - s[local]
    }

    /// How evenly the entries fill the lists.
    pub fn stats(&self) -> ListStats {
        let mut lens: Vec<u32> = self
            .layout
            .iter()
            .flat_map(|l| l.starts.windows(2).map(|w| w[1] - w[0]))
            .collect();
        lens.sort_unstable();
        let n = lens.len().max(1);
        let at = |q: f64| {
            lens.get(((n - 1) as f64 * q) as usize)
                .copied()
                .unwrap_or(0)
        };
        let squares: f64 = lens.iter().map(|&l| l as f64 * l as f64).sum();
        ListStats {
            cells: self.vocab.cells() as u32,
            lists: lens.len() as u64,
            entries: self.entries,
            mean: self.entries as f64 / n as f64,
            p50: at(0.5),
            p99: at(0.99),
            max: lens.last().copied().unwrap_or(0),
            entry_weighted_mean: squares / self.entries.max(1) as f64,
        }
    }

    /// Where one leaf's list is: its cell, the part of the cell holding it, and its byte
    /// range inside that part's value.
    fn locate(&self, leaf: u32) -> (u32, u32, std::ops::Range<usize>) {
        let c = self.vocab.cell_of(leaf);
        let local = leaf - self.vocab.cell_leaves(c).start;
        let l = &self.layout[c as usize];
        let part = l.parts.partition_point(|&p| p <= local).saturating_sub(1);
        let base = l.starts[l.parts[part] as usize] as usize;
        let from = (l.starts[local as usize] as usize - base) * ENTRY_BYTES;
        let to = (l.starts[local as usize + 1] as usize - base) * ENTRY_BYTES;
        (c, part as u32, from..to)
    }

    /// The leaves each query descriptor probes, nearest first.
    pub fn route(&self, queries: &[Words], probe: Probe) -> Vec<Vec<u32>> {
        queries
            .par_chunks(64)
            .flat_map_iter(|chunk| {
                let mut scratch = ProbeScratch::default();
                chunk
                    .iter()
                    .map(|q| {
                        self.vocab
                            .probe(q, probe.cells, probe.lists, &mut scratch)
                            .iter()
                            .map(|&(_, l)| l)
                            .collect::<Vec<u32>>()
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The closest hits of every query descriptor among the lists it probes.
    pub fn lookup(&self, store: &Store, queries: &[Words], probe: Probe) -> Result<Vec<Hits>> {
        let routes = self.route(queries, probe);
        // (leaf, query) pairs, grouped by leaf.
        let mut pairs: Vec<(u32, u32)> = routes
            .iter()
            .enumerate()
            .flat_map(|(qi, leaves)| leaves.iter().map(move |&l| (l, qi as u32)))
            .collect();
        pairs.sort_unstable();
        let mut groups: Vec<&[(u32, u32)]> = Vec::new();
        let mut start = 0;
        for i in 1..=pairs.len() {
            if i == pairs.len() || pairs[i].0 != pairs[start].0 {
                groups.push(&pairs[start..i]);
                start = i;
            }
        }
        // Contiguous runs of groups per task: leaves are numbered cell by cell, so a task
        // reads each (cell, part) value once.
        let tasks = (rayon::current_num_threads() * 4).max(1);
        let per_task = groups.len().div_ceil(tasks).max(1);
        let partial: Vec<Result<Vec<(u32, Hits)>>> = groups
            .par_chunks(per_task)
            .map(|groups| {
                let rtxn = store.env.read_txn()?;
                let mut out = Vec::new();
                let mut current: Option<((u32, u32), &[u8])> = None;
                for g in groups {
                    let (cell, part, range) = self.locate(g[0].0);
                    if range.is_empty() {
                        continue;
                    }
                    let value = match current {
                        Some((key, v)) if key == (cell, part) => v,
                        _ => {
                            let v = store
                                .lists
                                .get(&rtxn, &postings::part_key(cell, part))?
                                .ok_or_else(|| IndexError::BadIndex {
                                    path: store.env.path().to_path_buf(),
                                    reason: format!("list part {cell}/{part} missing"),
                                })?;
                            current = Some(((cell, part), v));
                            v
                        }
                    };
                    let list = value.get(range).ok_or_else(|| IndexError::BadIndex {
                        path: store.env.path().to_path_buf(),
                        reason: format!("a list of cell {cell} lies outside its part"),
                    })?;
                    let mut best: Vec<Hits> = vec![[NO_HIT; HITS]; g.len()];
                    for e in list.chunks_exact(ENTRY_BYTES) {
                        let code = postings::code_of(e);
                        for (b, &(_, qi)) in best.iter_mut().zip(g.iter()) {
                            let dist = distance_words(&queries[qi as usize], &code);
                            if dist <= b[HITS - 1].dist {
                                let p = postings::decode(e);
                                insert_hit(
                                    b,
                                    Hit {
                                        dist,
                                        image: p.image,
                                        kp: p.kp,
                                    },
                                );
                            }
                        }
                    }
                    out.extend(g.iter().map(|&(_, qi)| qi).zip(best));
                }
                Ok(out)
            })
            .collect();
        let mut all = vec![[NO_HIT; HITS]; queries.len()];
        for r in partial {
            for (qi, hits) in r? {
                let b = &mut all[qi as usize];
                for h in hits.into_iter().filter(|h| h.dist != u32::MAX) {
                    insert_hit(b, h);
                }
            }
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(dist: u32, image: u32) -> Hit {
        Hit {
            dist,
            image,
            kp: [0, 0],
        }
    }

    #[test]
    fn hits_stay_sorted_unique_and_bounded() {
        let mut b = [NO_HIT; HITS];
        for h in [
            hit(5, 1),
            hit(3, 2),
            hit(9, 3),
            hit(3, 1),
            hit(1, 7),
            hit(3, 2),
            hit(2, 0),
        ] {
            insert_hit(&mut b, h);
        }
        assert_eq!(b, [hit(1, 7), hit(2, 0), hit(3, 1), hit(3, 2)]);
        insert_hit(&mut b, hit(3, 9));
        assert_eq!(
            b[3],
            hit(3, 2),
            "an equal-distance hit of a later image stays out"
        );
    }
}
