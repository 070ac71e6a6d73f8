//! Searching a published generation: each query descriptor probes the inverted lists of its
//! nearest centroids (or, as a baseline, the arroy shards), votes for the catalogue image of
//! its best unambiguous match, and the leading candidates are verified geometrically.

use crate::error::{IndexError, Result};
use crate::features::{Descriptor, Features};
use crate::hamming::{distance_words, to_arroy_vector, words, Words};
use crate::ivf::{self, Centroids};
use crate::layout::IndexDir;
use crate::store::{self, BuildMeta, ImageRecord, Store};
use crate::verify;
use arroy::distances::BinaryQuantizedManhattan;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The best four (Hamming distance, descriptor id) of one query descriptor, closest first.
pub type Candidates = [(u32, u32); 4];

const NONE: (u32, u32) = (u32::MAX, u32::MAX);

/// Which structure answers descriptor lookups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Inverted lists (default): coarse centroids + contiguous codes, fast.
    #[default]
    Ivf,
    /// arroy trees over every descriptor (the preset's `search_k`): the slower baseline.
    Arroy,
}

/// Search settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct SearchParams {
    /// Matches to return.
    pub k: usize,
    /// Verify candidates with a RANSAC homography.
    pub verify: bool,
    /// Inverted lists probed per query descriptor.
    pub nprobe: usize,
    /// Largest Hamming distance that counts as a match.
    pub max_distance: u32,
    /// Lowe ratio: best distance must be below `ratio` × the best distance to another image.
    pub ratio: f32,
    /// Candidates verified (when `verify`).
    pub verify_candidates: usize,
    /// Lookup structure.
    pub engine: Engine,
    /// When no candidate verifies, also search the image mirrored left to right (needs
    /// `verify`: verification is what tells the two searches apart).
    pub mirror: bool,
}

impl SearchParams {
    /// The defaults for an index: inverted lists probed follow the preset's search effort
    /// (`search_k` / 6: full and small probe 16, xlarge 5).
    pub fn for_index(meta: &BuildMeta) -> Self {
        SearchParams {
            nprobe: (meta.preset.search_k as usize / 6).max(4),
            ..Default::default()
        }
    }
}

impl Default for SearchParams {
    fn default() -> Self {
        SearchParams {
            k: 5,
            verify: true,
            nprobe: 16,
            max_distance: 64,
            ratio: 0.8,
            verify_candidates: 10,
            engine: Engine::Ivf,
            mirror: true,
        }
    }
}

/// One catalogue image found by a query.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Match {
    /// Catalogue image id.
    pub id: u32,
    /// Its path relative to the dataset root.
    pub path: String,
    /// Votes: query descriptors whose best unambiguous match is in this image.
    pub score: u32,
    /// RANSAC inliers (when verified).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inliers: Option<u32>,
    /// Whether verification found enough inliers ([`verify::is_verified`]).
    pub verified: bool,
}

/// Time spent per step of one query (milliseconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Timings {
    /// Decoding the upload.
    pub decode_ms: f64,
    /// ORB.
    pub extract_ms: f64,
    /// Descriptor lookups and voting.
    pub lookup_ms: f64,
    /// RANSAC.
    pub verify_ms: f64,
}

/// A published generation opened for reading.
pub struct Index {
    /// Generation directory.
    pub dir: PathBuf,
    /// Generation number.
    pub generation: u64,
    /// Build metadata.
    pub meta: BuildMeta,
    store: Store,
    centroids: Centroids,
    offsets: Vec<u64>,
}

impl Index {
    /// Opens the generation `current` points to under an index directory.
    pub fn open(root: &Path) -> Result<Index> {
        let (n, dir) = IndexDir::new(root)
            .current()
            .ok_or_else(|| IndexError::NoIndex(root.to_path_buf()))?;
        Self::open_generation(&dir, n)
    }

    /// Opens one generation directory.
    pub fn open_generation(dir: &Path, generation: u64) -> Result<Index> {
        let store = Store::open_read_only(dir)?;
        let rtxn = store.env.read_txn()?;
        let bad = |reason: &str| IndexError::BadIndex {
            path: dir.to_path_buf(),
            reason: reason.to_string(),
        };
        let meta: BuildMeta = store
            .get_json(&rtxn, store::keys::BUILD)?
            .ok_or_else(|| bad("no build metadata"))?;
        if meta.format_version != store::FORMAT_VERSION {
            return Err(bad(&format!(
                "format version {} (this indexer reads {})",
                meta.format_version,
                store::FORMAT_VERSION
            )));
        }
        let centroids = Centroids::from_bytes(
            store
                .meta
                .get(&rtxn, store::keys::CENTROIDS)?
                .ok_or_else(|| bad("no centroids"))?,
        )
        .ok_or_else(|| bad("centroids"))?;
        let offsets = crate::build::read_offsets(
            store
                .meta
                .get(&rtxn, store::keys::OFFSETS)?
                .ok_or_else(|| bad("no offsets"))?,
        );
        drop(rtxn);
        Ok(Index {
            dir: dir.to_path_buf(),
            generation,
            meta,
            store,
            centroids,
            offsets,
        })
    }

    /// Images in the catalogue table (indexed and failed).
    pub fn image_count(&self) -> u64 {
        self.offsets.len().saturating_sub(1) as u64
    }

    /// The record of one image.
    pub fn image(&self, id: u32) -> Result<Option<ImageRecord>> {
        let rtxn = self.store.env.read_txn()?;
        Ok(self.store.images.get(&rtxn, &id)?)
    }

    /// Descriptors kept for an image.
    pub fn kept(&self, id: u32) -> u64 {
        let i = id as usize;
        if i + 1 < self.offsets.len() {
            self.offsets[i + 1] - self.offsets[i]
        } else {
            0
        }
    }

    /// Images that could not be indexed, with their reasons (at most `limit`).
    pub fn failed_images(&self, limit: usize) -> Result<Vec<(String, String)>> {
        let rtxn = self.store.env.read_txn()?;
        let mut out = Vec::new();
        for r in self.store.images.iter(&rtxn)? {
            let (_, rec) = r?;
            if let Some(reason) = rec.error {
                out.push((rec.path, reason));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The image holding a descriptor id.
    pub fn image_of(&self, desc: u32) -> u32 {
        (self
            .offsets
            .partition_point(|&o| o <= desc as u64)
            .saturating_sub(1)) as u32
    }

    /// Total bytes of the generation on disk.
    pub fn disk_bytes(&self) -> u64 {
        std::fs::metadata(self.dir.join("data.mdb")).map_or(0, |m| m.len())
    }

    /// Best few (distance, descriptor id) for each query descriptor.
    fn lookup(&self, descriptors: &[Descriptor], params: &SearchParams) -> Result<Vec<Candidates>> {
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

    /// Searches with already-extracted query features. Returns matches and the lookup and
    /// verification times.
    pub fn search_features(
        &self,
        f: &Features,
        params: &SearchParams,
    ) -> Result<(Vec<Match>, f64, f64)> {
        let t = Instant::now();
        let best = self.lookup(&f.descriptors, params)?;
        // Resolve the image of every candidate once.
        let images: Vec<[u32; 4]> = best
            .iter()
            .map(|c| {
                std::array::from_fn(|i| {
                    if c[i].0 == u32::MAX {
                        u32::MAX
                    } else {
                        self.image_of(c[i].1)
                    }
                })
            })
            .collect();
        // One vote per query descriptor, for the image of its best match when that match is
        // close and clearly better than the best match in any other image (Lowe's ratio).
        let mut votes: HashMap<u32, u32> = HashMap::new();
        for (qi, cands) in best.iter().enumerate() {
            let (d1, _) = cands[0];
            if d1 == u32::MAX || d1 > params.max_distance {
                continue;
            }
            let img1 = images[qi][0];
            let d2 = (1..4)
                .find(|&i| cands[i].0 != u32::MAX && images[qi][i] != img1)
                .map_or(u32::MAX, |i| cands[i].0);
            if d2 != u32::MAX && (d1 as f32) >= params.ratio * d2 as f32 {
                continue;
            }
            *votes.entry(img1).or_default() += 1;
        }
        let mut ranked: Vec<(u32, u32)> = votes.into_iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let lookup_ms = t.elapsed().as_secs_f64() * 1000.0;

        let t = Instant::now();
        let keep = if params.verify {
            params.verify_candidates.max(params.k)
        } else {
            params.k
        };
        ranked.truncate(keep);
        let rtxn = self.store.env.read_txn()?;
        let mut matches = Vec::with_capacity(ranked.len());
        for &(image, score) in &ranked {
            let rec = self.store.images.get(&rtxn, &image)?.unwrap_or_default();
            let (inliers, verified) = if params.verify {
                let (inliers, pairs) =
                    self.verify_image(&rtxn, f, &best, &images, image, params)?;
                (Some(inliers), verify::is_verified(inliers, pairs))
            } else {
                (None, false)
            };
            matches.push(Match {
                id: image,
                path: rec.path,
                score,
                verified,
                inliers,
            });
        }
        if params.verify {
            // Verified candidates first, by inliers; then the rest by votes, boosted by what
            // geometric support they have beyond the 4 pairs any homography fits (too little
            // to verify, but not nothing).
            let soft = |m: &Match| {
                let support = m.inliers.unwrap_or(0).saturating_sub(verify::MIN_SAMPLE);
                m.score as f64 * (1.0 + support as f64 / 4.0)
            };
            matches.sort_by(|a, b| {
                b.verified.cmp(&a.verified).then_with(|| {
                    if a.verified {
                        b.inliers.cmp(&a.inliers).then(b.score.cmp(&a.score))
                    } else {
                        soft(b).total_cmp(&soft(a))
                    }
                    .then(a.id.cmp(&b.id))
                })
            });
        }
        matches.truncate(params.k);
        Ok((matches, lookup_ms, t.elapsed().as_secs_f64() * 1000.0))
    }

    /// RANSAC inliers between the query and one catalogue image. Every close candidate of a
    /// query descriptor in that image is a hypothesis (repetitive structure makes the single
    /// best one unreliable); RANSAC keeps the consistent ones.
    fn verify_image(
        &self,
        rtxn: &heed::RoTxn,
        f: &Features,
        best: &[[(u32, u32); 4]],
        images: &[[u32; 4]],
        image: u32,
        params: &SearchParams,
    ) -> Result<(u32, usize)> {
        let kps = self.store.kps.get(rtxn, &image)?.unwrap_or_default();
        let first = self.offsets[image as usize];
        // The closest candidate of each query descriptor inside the image, best pairs first
        // (PROSAC samples the most similar pairs first).
        let mut pairs: Vec<(u32, usize, u32)> = Vec::new();
        for (qi, cands) in best.iter().enumerate() {
            let Some(i) = (0..4).find(|&i| images[qi][i] == image) else {
                continue;
            };
            let (d, id) = cands[i];
            if d <= params.max_distance {
                pairs.push((d, qi, id));
            }
        }
        pairs.sort_unstable();
        let mut q = Vec::with_capacity(pairs.len());
        let mut c = Vec::with_capacity(pairs.len());
        for (_, qi, id) in pairs {
            if let Some(p) = store::keypoint_at(kps, (id as u64 - first) as usize) {
                let [x, y] = f.keypoints[qi];
                q.push((
                    x as f32 / crate::features::KEYPOINT_SUBPIXELS,
                    y as f32 / crate::features::KEYPOINT_SUBPIXELS,
                ));
                c.push(p);
            }
        }
        Ok((verify::inliers(&q, &c)?, q.len()))
    }

    /// Bytes per database (pages × page size), for `indexer info`.
    pub fn database_bytes(&self) -> Result<Vec<(&'static str, u64)>> {
        let rtxn = self.store.env.read_txn()?;
        let page = 4096u64;
        let pages = |st: heed::DatabaseStat| {
            (st.branch_pages + st.leaf_pages + st.overflow_pages) as u64 * page
        };
        Ok(vec![
            ("meta", pages(self.store.meta.stat(&rtxn)?)),
            ("images", pages(self.store.images.stat(&rtxn)?)),
            ("keypoints", pages(self.store.kps.stat(&rtxn)?)),
            ("lists", pages(self.store.lists.stat(&rtxn)?)),
            ("arroy", pages(self.store.arroy.stat(&rtxn)?)),
        ])
    }

    /// Read access to the store (for tests and tools).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The coarse centroids.
    pub fn centroids(&self) -> &Centroids {
        &self.centroids
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

/// The answer to one query image.
#[derive(Clone, Debug, Serialize)]
pub struct Answer {
    /// Matches in rank order.
    pub matches: Vec<Match>,
    /// Query descriptors extracted.
    pub features: usize,
    /// What the detector adapted for the query.
    pub adaptation: crate::features::Adaptation,
    /// Per-step times (of both searches when the mirror was searched too).
    pub timings: Timings,
    /// Whether the matches come from the query mirrored left to right.
    pub mirrored: bool,
}

/// Why a query image could not be searched.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The image was refused or could not be decoded.
    #[error(transparent)]
    Image(#[from] crate::features::ExtractError),
    /// The index could not be read.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The file could not be read.
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
}

/// Searches encoded image bytes.
pub fn search_bytes(
    index: &Index,
    detector: &mut crate::features::Detector,
    bytes: &[u8],
    params: &SearchParams,
) -> Result<Answer, QueryError> {
    let header = crate::imageguard::header(bytes).map_err(crate::features::ExtractError::from)?;
    let (f, work, decode_ms, extract_ms) = detector.extract_keeping_work(bytes, &header)?;
    let (matches, lookup_ms, verify_ms) = index.search_features(&f, params)?;
    let mut answer = Answer {
        matches,
        features: f.descriptors.len(),
        adaptation: f.adaptation,
        timings: Timings {
            decode_ms,
            extract_ms,
            lookup_ms,
            verify_ms,
        },
        mirrored: false,
    };
    let verified = |m: &[Match]| m.first().is_some_and(|m| m.verified);
    if params.mirror && params.verify && !f.descriptors.is_empty() && !verified(&answer.matches) {
        let t = Instant::now();
        let mf = detector.mirrored(&work, &f)?;
        answer.timings.extract_ms += t.elapsed().as_secs_f64() * 1000.0;
        drop(work);
        let (matches, lookup_ms, verify_ms) = index.search_features(&mf, params)?;
        answer.timings.lookup_ms += lookup_ms;
        answer.timings.verify_ms += verify_ms;
        if verified(&matches) {
            answer.matches = matches;
            answer.features = mf.descriptors.len();
            answer.adaptation = mf.adaptation;
            answer.mirrored = true;
        }
    }
    Ok(answer)
}

/// Searches an image file.
pub fn search_file(
    index: &Index,
    detector: &mut crate::features::Detector,
    path: &Path,
    params: &SearchParams,
) -> Result<Answer, QueryError> {
    let bytes = std::fs::read(path).map_err(|e| QueryError::Read(path.to_path_buf(), e))?;
    search_bytes(index, detector, &bytes, params)
}

/// Hamming distance from arroy's `BinaryQuantizedManhattan` distance, which is normalized:
/// Manhattan distance over ±1 vectors (twice the Hamming distance) divided by the 256
/// dimensions.
fn arroy_hamming(normalized: f32) -> u32 {
    (normalized * (crate::features::DESCRIPTOR_BYTES * 8) as f32 / 2.0).round() as u32
}

impl Index {
    /// The nearest stored descriptor to one query descriptor (for lookup benchmarks).
    pub fn nearest(&self, d: &Descriptor, params: &SearchParams) -> Result<Option<u32>> {
        let best = self.lookup(std::slice::from_ref(d), params)?;
        Ok(best
            .first()
            .map(|b| b[0])
            .filter(|(dist, _)| *dist != u32::MAX)
            .map(|(_, id)| id))
    }
}
