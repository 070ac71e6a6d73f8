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
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Match {
    /// Catalogue image id (within its shard, when the index is sharded).
    pub id: u32,
    /// Its path relative to the dataset root.
    pub path: String,
    /// Votes: query descriptors whose best unambiguous match is in this image.
    pub score: u32,
    /// RANSAC inliers (when verified).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inliers: Option<u32>,
    /// Whether verification found enough inliers ([`verify::is_verified`]).
    pub verified: bool,
    /// What found it.
    #[serde(default)]
    pub matched_by: MatchedBy,
    /// Cosine distance between the query's layout and this image's (when that found it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout_distance: Option<f32>,
    /// The rank key of an unverified candidate: its idf-weighted score boosted by the
    /// geometric support it has beyond the 4 pairs any homography fits.
    #[serde(default)]
    pub soft: f64,
    /// The shard holding the image (sharded indexes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<u32>,
}

/// A catalogue image whose global layout is near the query's: distance, id, path (and its
/// shard, when sharded).
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct NearLayout {
    /// Cosine distance between the layouts.
    pub distance: f32,
    /// Catalogue image id.
    pub id: u32,
    /// Its path.
    pub path: String,
    /// Its shard (sharded indexes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<u32>,
}

/// Sorts candidates into answer order: verified first (by inliers, then votes), then the
/// unverified by their soft score; ties by shard, then id. Pure, so a router ranks the
/// union of its shards' candidates exactly as one index ranks its own.
pub fn order(matches: &mut [Match]) {
    matches.sort_by(|a, b| {
        b.verified
            .cmp(&a.verified)
            .then_with(|| {
                if a.verified {
                    b.inliers.cmp(&a.inliers).then(b.score.cmp(&a.score))
                } else {
                    b.soft.total_cmp(&a.soft)
                }
            })
            .then(a.shard.cmp(&b.shard))
            .then(a.id.cmp(&b.id))
    });
}

/// Whether the leading match is verified (the answer needs no fallback).
pub fn leads_verified(matches: &[Match]) -> bool {
    matches.first().is_some_and(|m| m.verified)
}

/// When the leading match is not verified, puts first the catalogue image whose layout is
/// clearly the query's: `near` holds the nearest layouts (closest first, at least the two
/// closest of the whole catalogue); the closest must be within [`LAYOUT_MATCH`] and
/// [`LAYOUT_MARGIN`] closer than the next. Pure (see [`order`]).
pub fn layout_first(matches: &mut Vec<Match>, near: &[NearLayout]) {
    if leads_verified(matches) {
        return;
    }
    let Some(best) = near.first() else {
        return;
    };
    let clear = near
        .get(1)
        .is_none_or(|n| n.distance - best.distance >= LAYOUT_MARGIN);
    if best.distance > LAYOUT_MATCH || !clear {
        return;
    }
    let existing = matches
        .iter()
        .position(|m| m.id == best.id && m.shard == best.shard);
    let mut m = match existing {
        Some(i) => matches.remove(i),
        None => Match {
            id: best.id,
            path: best.path.clone(),
            score: 0,
            inliers: None,
            verified: false,
            matched_by: MatchedBy::Layout,
            layout_distance: None,
            soft: 0.0,
            shard: best.shard,
        },
    };
    m.matched_by = MatchedBy::Layout;
    m.layout_distance = Some(best.distance);
    matches.insert(0, m);
}

/// Merges the nearest layouts of several shards: the closest `n`, closest first.
pub fn merge_layouts(mut near: Vec<NearLayout>, n: usize) -> Vec<NearLayout> {
    near.sort_by(|a, b| {
        a.distance
            .total_cmp(&b.distance)
            .then(a.shard.cmp(&b.shard))
            .then(a.id.cmp(&b.id))
    });
    near.truncate(n);
    near
}

impl Index {
    /// Searches with already-extracted query features. Returns matches and the lookup and
    /// verification times.
    pub fn search_features(
        &self,
        f: &Features,
        params: &SearchParams,
    ) -> Result<(Vec<Match>, f64, f64)> {
        let (mut matches, lookup_ms, verify_ms) = self.candidates(f, params)?;
        order(&mut matches);
        if params.global && !leads_verified(&matches) {
            if let Some(g) = &f.global {
                let near = self.near_layouts(g, 2)?;
                layout_first(&mut matches, &near);
            }
        }
        matches.truncate(params.k);
        Ok((matches, lookup_ms, verify_ms))
    }

    /// The `n` catalogue images whose layouts are nearest to the global descriptor `g`.
    pub fn near_layouts(
        &self,
        g: &crate::global::GlobalDescriptor,
        n: usize,
    ) -> Result<Vec<NearLayout>> {
        let near = self.nearest_layouts(g, n)?;
        let rtxn = self.store.env.read_txn()?;
        near.into_iter()
            .map(|(distance, id)| {
                let path = self.store.images.get(&rtxn, &id)?.unwrap_or_default().path;
                Ok(NearLayout {
                    distance,
                    id,
                    path,
                    shard: None,
                })
            })
            .collect()
    }

    /// The candidates of a query, unordered: the leading tallies by votes (as many as are
    /// verified, or `k`), each verified when `params.verify`. Returns them with the lookup
    /// and verification times.
    pub fn candidates(
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
            matches.push(Match {
                id: tally.image,
                path: rec.path,
                score: tally.votes,
                verified,
                inliers,
                matched_by: MatchedBy::Features,
                layout_distance: None,
                soft: tally.score as f64 * (1.0 + support as f64 / 4.0),
                shard: None,
            });
        }
        Ok((matches, lookup_ms, t.elapsed().as_secs_f64() * 1000.0))
    }
}
