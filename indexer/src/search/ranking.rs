//! Ranking: votes from the hits ([`crate::rank`]), RANSAC verification of the leading
//! candidates, verified matches first; when nothing verifies, a catalogue image whose global
//! layout is clearly the query's comes first.

use super::{Index, SearchParams};
use crate::error::Result;
use crate::features::{Features, KEYPOINT_SUBPIXELS};
use crate::rank::{self, VoteParams};
use crate::verify;
use serde::Serialize;
use std::time::Instant;

/// Cosine distance between global descriptors below which a layout is taken for the same
/// image (measured: re-encoded, rescaled, blurred or recoloured copies stay below 0.06;
/// different photos rarely come below 0.25).
pub const LAYOUT_MATCH: f32 = 0.12;
/// How much closer the best layout must be than the next image's.
pub const LAYOUT_MARGIN: f32 = 0.04;

/// What found a match.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, Default, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum MatchedBy {
    /// Local features: votes, and inliers when verified.
    #[default]
    Features,
    /// The global layout descriptor (an image with few or no local features in common).
    Layout,
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
    /// What found it.
    pub matched_by: MatchedBy,
    /// Cosine distance between the query's layout and this image's (when that found it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layout_distance: Option<f32>,
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
        let hits = if f.descriptors.is_empty() {
            Vec::new()
        } else {
            self.lookup(&f.descriptors, params)?
        };
        let votes = VoteParams {
            max_distance: params.max_distance,
            ratio: params.ratio,
        };
        let mut tallies = rank::tally(&hits, &votes, |i| self.kept(i) as u32, self.lists.entries());
        let lookup_ms = t.elapsed().as_secs_f64() * 1000.0;

        let t = Instant::now();
        let keep = if params.verify {
            params.verify_candidates.max(params.k)
        } else {
            params.k
        };
        tallies.truncate(keep);
        let rtxn = self.store.env.read_txn()?;
        let mut matches = Vec::with_capacity(tallies.len());
        let mut soft = Vec::with_capacity(tallies.len());
        for tally in &tallies {
            let rec = self
                .store
                .images
                .get(&rtxn, &tally.image)?
                .unwrap_or_default();
            let (inliers, verified) = if params.verify {
                let pairs = rank::pairs_with(&hits, tally.image, params.max_distance);
                let q: Vec<(f32, f32)> = pairs
                    .iter()
                    .map(|(qi, _)| {
                        let [x, y] = f.keypoints[*qi];
                        (x as f32 / KEYPOINT_SUBPIXELS, y as f32 / KEYPOINT_SUBPIXELS)
                    })
                    .collect();
                let c: Vec<(f32, f32)> = pairs
                    .iter()
                    .map(|(_, [x, y])| {
                        (
                            *x as f32 / KEYPOINT_SUBPIXELS,
                            *y as f32 / KEYPOINT_SUBPIXELS,
                        )
                    })
                    .collect();
                let inliers = verify::inliers(&q, &c)?;
                (Some(inliers), verify::is_verified(inliers, pairs.len()))
            } else {
                (None, false)
            };
            // Unverified candidates: the score, boosted by what geometric support they have
            // beyond the 4 pairs any homography fits (too little to verify, but not nothing).
            let support = inliers.unwrap_or(0).saturating_sub(verify::MIN_SAMPLE);
            soft.push((
                tally.image,
                tally.score as f64 * (1.0 + support as f64 / 4.0),
            ));
            matches.push(Match {
                id: tally.image,
                path: rec.path,
                score: tally.votes,
                verified,
                inliers,
                matched_by: MatchedBy::Features,
                layout_distance: None,
            });
        }
        let soft_of = |m: &Match| {
            soft.iter()
                .find(|(i, _)| *i == m.id)
                .map_or(0.0, |(_, s)| *s)
        };
        matches.sort_by(|a, b| {
            b.verified
                .cmp(&a.verified)
                .then_with(|| {
                    if a.verified {
                        b.inliers.cmp(&a.inliers).then(b.score.cmp(&a.score))
                    } else {
                        soft_of(b).total_cmp(&soft_of(a))
                    }
                })
                .then(a.id.cmp(&b.id))
        });
        let verified = matches.first().is_some_and(|m| m.verified);
        if params.global && !verified {
            if let Some(g) = &f.global {
                let near = self.nearest_layouts(g, 2)?;
                if let Some(&(d, id)) = near.first() {
                    let clear = near.get(1).is_none_or(|n| n.0 - d >= LAYOUT_MARGIN);
                    if d <= LAYOUT_MATCH && clear {
                        let existing = matches.iter().position(|m| m.id == id);
                        let mut m = match existing {
                            Some(i) => matches.remove(i),
                            None => Match {
                                id,
                                path: self.store.images.get(&rtxn, &id)?.unwrap_or_default().path,
                                score: 0,
                                inliers: None,
                                verified: false,
                                matched_by: MatchedBy::Layout,
                                layout_distance: None,
                            },
                        };
                        m.matched_by = MatchedBy::Layout;
                        m.layout_distance = Some(d);
                        matches.insert(0, m);
                    }
                }
            }
        }
        matches.truncate(params.k);
        Ok((matches, lookup_ms, t.elapsed().as_secs_f64() * 1000.0))
    }
}
