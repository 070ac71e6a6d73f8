//! Descriptor lookups: the best few stored descriptors of each query descriptor, from the
//! inverted lists (list-major, in parallel) or from the arroy shards.

use super::{Engine, Index, SearchParams};
use crate::error::Result;
use crate::features::Descriptor;
use crate::hamming::{distance_words, to_arroy_vector, words, Words};
use crate::ivf;
use crate::store::Store;
use arroy::distances::BinaryQuantizedManhattan;
use rayon::prelude::*;
use std::collections::HashMap;
use std::num::NonZeroUsize;

/// The best four (Hamming distance, descriptor id) of one query descriptor, closest first.
pub type Candidates = [(u32, u32); 4];

const NONE: (u32, u32) = (u32::MAX, u32::MAX);

impl Index {
    /// Best few (distance, descriptor id) for each query descriptor.
    pub(crate) fn lookup(
        &self,
        descriptors: &[Descriptor],
        params: &SearchParams,
    ) -> Result<Vec<Candidates>> {
        match params.engine {
            Engine::Ivf => self.lookup_ivf(descriptors, params.nprobe),
            Engine::Arroy => self.lookup_arroy(descriptors),
        }
    }

    /// Inverted-list lookup, list-major: every query descriptor picks its `nprobe` nearest
    /// centroids, then each probed list is read once and compared with all the query
    /// descriptors that probe it (the lists' codes are contiguous, the queries stay in cache).
    fn lookup_ivf(&self, descriptors: &[Descriptor], nprobe: usize) -> Result<Vec<Candidates>> {
        let queries: Vec<Words> = descriptors.iter().map(words).collect();
        let probes: Vec<Vec<u32>> = queries
            .par_chunks(64)
            .flat_map_iter(|chunk| {
                let mut tmp = Vec::new();
                chunk
                    .iter()
                    .map(|q| {
                        self.centroids.nearest_n(q, nprobe, &mut tmp);
                        tmp.iter().map(|&(_, l)| l).collect::<Vec<u32>>()
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut by_list: HashMap<u32, Vec<u32>> = HashMap::new();
        for (qi, lists) in probes.iter().enumerate() {
            for &l in lists {
                by_list.entry(l).or_default().push(qi as u32);
            }
        }
        let mut work: Vec<(u32, Vec<u32>)> = by_list.into_iter().collect();
        work.sort_unstable_by_key(|(l, _)| *l);
        let partial: Vec<Result<Vec<(u32, Candidates)>>> = work
            .par_chunks(8)
            .map(|lists| {
                let rtxn = self.store.env.read_txn()?;
                let mut out = Vec::new();
                for (list, qis) in lists {
                    let mut best: Vec<Candidates> = vec![[NONE; 4]; qis.len()];
                    let lo = Store::list_key(*list, 0);
                    let hi = Store::list_key(*list, u32::MAX);
                    for r in self.store.lists.range(&rtxn, &(lo..=hi))? {
                        let (_, bytes) = r?;
                        for (id, code) in ivf::entries(bytes) {
                            for (b, &qi) in best.iter_mut().zip(qis.iter()) {
                                let dist = distance_words(&queries[qi as usize], &code);
                                if dist < b[3].0 || (dist == b[3].0 && id < b[3].1) {
                                    insert_best(b, (dist, id));
                                }
                            }
                        }
                    }
                    out.extend(qis.iter().copied().zip(best));
                }
                Ok(out)
            })
            .collect();
        let mut all = vec![[NONE; 4]; descriptors.len()];
        for r in partial {
            for (qi, cands) in r? {
                let b = &mut all[qi as usize];
                for c in cands.into_iter().filter(|c| c.0 != u32::MAX) {
                    insert_best(b, c);
                }
            }
        }
        Ok(all)
    }

    /// arroy lookup: every shard's trees, the preset's `search_k` per tree.
    fn lookup_arroy(&self, descriptors: &[Descriptor]) -> Result<Vec<Candidates>> {
        let results: Vec<Result<Vec<Candidates>>> = descriptors
            .par_chunks(32)
            .map(|chunk| {
                let rtxn = self.store.env.read_txn()?;
                let mut out = Vec::with_capacity(chunk.len());
                let mut vector = [0f32; 256];
                let readers: Vec<arroy::Reader<BinaryQuantizedManhattan>> =
                    (0..self.meta.arroy_shards)
                        .filter_map(|s| arroy::Reader::open(&rtxn, s as u16, self.store.arroy).ok())
                        .collect();
                let per_tree =
                    self.meta.preset.search_k as usize * self.meta.preset.n_trees as usize;
                let search_k = NonZeroUsize::new(per_tree.max(4)).unwrap_or(NonZeroUsize::MIN);
                for d in chunk.iter() {
                    to_arroy_vector(d, &mut vector);
                    let mut best = [NONE; 4];
                    for r in &readers {
                        let mut qb = r.nns(4);
                        qb.search_k(search_k);
                        for (id, dist) in qb.by_vector(&rtxn, &vector)? {
                            insert_best(&mut best, (arroy_hamming(dist), id));
                        }
                    }
                    out.push(best);
                }
                Ok(out)
            })
            .collect();
        let mut all = Vec::with_capacity(descriptors.len());
        for r in results {
            all.extend(r?);
        }
        Ok(all)
    }
}

fn insert_best(best: &mut [(u32, u32); 4], cand: (u32, u32)) {
    if best.contains(&cand) {
        return;
    }
    let mut i = best.len();
    while i > 0 && (cand < best[i - 1]) {
        i -= 1;
    }
    if i < best.len() {
        for j in (i + 1..best.len()).rev() {
            best[j] = best[j - 1];
        }
        best[i] = cand;
    }
}

/// Hamming distance from arroy's `BinaryQuantizedManhattan` distance, which is normalized:
/// Manhattan distance over ±1 vectors (twice the Hamming distance) divided by the 256
/// dimensions.
fn arroy_hamming(normalized: f32) -> u32 {
    (normalized * (crate::features::DESCRIPTOR_BYTES * 8) as f32 / 2.0).round() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arroy_distances_convert_to_hamming() {
        // 2 differing bits: Manhattan 4 over 256 dimensions.
        assert_eq!(super::arroy_hamming(4.0 / 256.0), 2);
        assert_eq!(super::arroy_hamming(0.0), 0);
        assert_eq!(super::arroy_hamming(2.0), 256);
    }

    #[test]
    fn best_list_stays_sorted_and_unique() {
        let mut b = [(u32::MAX, u32::MAX); 4];
        for c in [(5, 1), (3, 2), (9, 3), (3, 1), (1, 7), (3, 2), (2, 0)] {
            insert_best(&mut b, c);
        }
        assert_eq!(b, [(1, 7), (2, 0), (3, 1), (3, 2)]);
    }
}
