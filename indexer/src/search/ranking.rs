//! Ranking: one vote per query descriptor for the image of its best unambiguous match
//! (Lowe's ratio across images), RANSAC verification of the leading candidates, verified
//! matches first.

use super::{Index, SearchParams};
use crate::error::Result;
use crate::features::Features;
use crate::store;
use crate::verify;
use serde::Serialize;
use std::collections::HashMap;
use std::time::Instant;

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

impl Index {
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
}
