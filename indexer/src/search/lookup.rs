//! Lookups: the closest stored descriptors of each query descriptor (through the
//! vocabulary and the inverted lists), and the closest catalogue layouts of a global
//! descriptor (through arroy, in all eight orientations).

use super::{Index, SearchParams};
use crate::error::Result;
use crate::features::Descriptor;
use crate::global::{self, GlobalDescriptor};
use crate::hamming::{words, Words};
use crate::lists::Hits;
use arroy::distances::Cosine;

/// Layout candidates asked of arroy per orientation.
const LAYOUT_CANDIDATES: usize = 4;

impl Index {
    /// The closest hits of each query descriptor.
    pub(crate) fn lookup(
        &self,
        descriptors: &[Descriptor],
        params: &SearchParams,
    ) -> Result<Vec<Hits>> {
        let queries: Vec<Words> = descriptors.iter().map(words).collect();
        self.lists.lookup(&self.store, &queries, params.probe)
    }

    /// The catalogue images whose layout is closest to `g` in any of its eight orientations,
    /// as (cosine distance, image), closest first, each image once.
    pub fn nearest_layouts(&self, g: &GlobalDescriptor, n: usize) -> Result<Vec<(f32, u32)>> {
        let rtxn = self.store.env.read_txn()?;
        let reader = match arroy::Reader::<Cosine>::open(&rtxn, 0, self.store.arroy) {
            Ok(r) => r,
            // An index whose images all lack a layout has no arroy tree at all.
            Err(arroy::Error::MissingMetadata(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut best: Vec<(f32, u32)> = Vec::new();
        for o in global::orientations(g) {
            for (id, _) in reader.nns(LAYOUT_CANDIDATES.max(n)).by_vector(&rtxn, &o)? {
                // arroy's cosine distance is scaled differently: recompute ours from the
                // stored vector.
                let Some(v) = self
                    .store
                    .globals
                    .get(&rtxn, &id)?
                    .and_then(global::from_bytes)
                else {
                    continue;
                };
                best.push((global::distance(&o, &v), id));
            }
        }
        best.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut seen = std::collections::HashSet::new();
        best.retain(|(_, id)| seen.insert(*id));
        best.truncate(n);
        Ok(best)
    }
}
