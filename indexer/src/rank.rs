//! From hits to ranked candidates: each query descriptor votes for the image of its closest
//! unambiguous hit, weighted by how close it is; a catalogue keypoint counts once however
//! many query descriptors chose it (repetitive structure in the query cannot inflate a
//! score); and an image's score is compared with what chance alone would give an image with
//! as many descriptors (large, busy images collect stray votes — "hubs").

use crate::lists::{Hits, HITS};
use std::collections::{HashMap, HashSet};

/// How votes are counted.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct VoteParams {
    /// Largest Hamming distance that counts as a match.
    pub max_distance: u32,
    /// Lowe ratio: the closest hit must be below `ratio` × the closest hit in another image.
    pub ratio: f32,
}

impl Default for VoteParams {
    fn default() -> Self {
        VoteParams {
            max_distance: 64,
            ratio: 0.8,
        }
    }
}

/// One catalogue image's tally.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tally {
    /// The image.
    pub image: u32,
    /// Query descriptors that voted for it.
    pub votes: u32,
    /// Their summed weights.
    pub weight: f32,
    /// Weight above what chance gives an image of its size (the ranking key).
    pub score: f32,
}

/// Weight of a vote at Hamming distance `d`: 1 for an exact match, falling to 0 at
/// `max_distance` (close matches are rarer by chance and worth more).
pub fn weight(d: u32, max_distance: u32) -> f32 {
    let x = d as f32 / (max_distance as f32 + 1.0);
    (1.0 - x * x).max(0.0)
}

/// Counts the votes. `descriptors_of(image)` is the number of descriptors an image has in
/// the index and `total` the index's total: an image holding a share `s` of the descriptors
/// is expected to collect `s` of the votes by chance.
pub fn tally(
    hits: &[Hits],
    params: &VoteParams,
    descriptors_of: impl Fn(u32) -> u32,
    total: u64,
) -> Vec<Tally> {
    let mut by_image: HashMap<u32, (u32, f32)> = HashMap::new();
    let mut seen: HashSet<(u32, [u16; 2])> = HashSet::new();
    let mut cast = 0f32;
    for h in hits {
        let best = h[0];
        if best.dist == u32::MAX || best.dist > params.max_distance {
            continue;
        }
        let second = (1..HITS)
            .find(|&i| h[i].dist != u32::MAX && h[i].image != best.image)
            .map_or(u32::MAX, |i| h[i].dist);
        if second != u32::MAX && best.dist as f32 >= params.ratio * second as f32 {
            continue;
        }
        if !seen.insert((best.image, best.kp)) {
            continue;
        }
        let w = weight(best.dist, params.max_distance);
        cast += w;
        let e = by_image.entry(best.image).or_default();
        e.0 += 1;
        e.1 += w;
    }
    let total = total.max(1) as f32;
    let mut out: Vec<Tally> = by_image
        .into_iter()
        .map(|(image, (votes, w))| {
            let expected = cast * descriptors_of(image) as f32 / total;
            Tally {
                image,
                votes,
                weight: w,
                score: w - expected,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.votes.cmp(&a.votes))
            .then(a.image.cmp(&b.image))
    });
    out
}

/// The (query keypoint index, catalogue keypoint, distance) pairs linking the query to one
/// image: for every query descriptor, its closest hit in that image within `max_distance`;
/// closest pairs first (PROSAC samples them first).
pub fn pairs_with(hits: &[Hits], image: u32, max_distance: u32) -> Vec<(usize, [u16; 2])> {
    let mut pairs: Vec<(u32, usize, [u16; 2])> = hits
        .iter()
        .enumerate()
        .filter_map(|(qi, h)| {
            h.iter()
                .find(|x| x.image == image && x.dist <= max_distance)
                .map(|x| (x.dist, qi, x.kp))
        })
        .collect();
    pairs.sort_unstable();
    pairs.into_iter().map(|(_, qi, kp)| (qi, kp)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lists::{Hit, NO_HIT};

    fn hits(list: &[(u32, u32, u16)]) -> Hits {
        let mut h = [NO_HIT; HITS];
        for (i, &(dist, image, kp)) in list.iter().enumerate() {
            h[i] = Hit {
                dist,
                image,
                kp: [kp, kp],
            };
        }
        h
    }

    #[test]
    fn ambiguous_and_distant_matches_do_not_vote() {
        let p = VoteParams::default();
        let t = tally(
            &[
                hits(&[(10, 1, 1), (40, 2, 1)]), // clear: votes for 1
                hits(&[(30, 1, 2), (32, 2, 2)]), // ambiguous: no vote
                hits(&[(70, 3, 1)]),             // too far: no vote
                hits(&[(20, 2, 3), (21, 2, 4)]), // same image twice: votes for 2
            ],
            &p,
            |_| 100,
            10_000,
        );
        let images: Vec<(u32, u32)> = t.iter().map(|t| (t.image, t.votes)).collect();
        assert_eq!(images, vec![(1, 1), (2, 1)], "closer vote weighs more");
        assert!(t[0].weight > t[1].weight);
    }

    #[test]
    fn a_catalogue_keypoint_counts_once() {
        let p = VoteParams::default();
        let repeated: Vec<Hits> = (0..5).map(|_| hits(&[(5, 1, 7)])).collect();
        let t = tally(&repeated, &p, |_| 100, 10_000);
        assert_eq!(t[0].votes, 1);
    }

    #[test]
    fn big_images_need_more_than_their_share_of_chance() {
        let p = VoteParams::default();
        // Image 1 holds half the index and gets 6 votes; image 2 holds 1% and gets 4.
        let mut h: Vec<Hits> = (0..6).map(|i| hits(&[(20, 1, i)])).collect();
        h.extend((0..4).map(|i| hits(&[(20, 2, i)])));
        let t = tally(&h, &p, |i| if i == 1 { 5_000 } else { 100 }, 10_000);
        assert_eq!(t[0].image, 2, "{t:?}");
    }

    #[test]
    fn pairs_take_each_query_descriptors_closest_hit_in_the_image() {
        let h = vec![
            hits(&[(10, 1, 1), (12, 2, 5), (30, 2, 6)]),
            hits(&[(50, 3, 1), (60, 2, 9)]),
            hits(&[(70, 2, 4)]),
        ];
        assert_eq!(
            pairs_with(&h, 2, 64),
            vec![(0, [5, 5]), (1, [9, 9])],
            "closest first, the far one left out"
        );
        assert!(pairs_with(&h, 4, 64).is_empty());
    }

    #[test]
    fn weights_fall_with_distance() {
        assert_eq!(weight(0, 64), 1.0);
        assert!(weight(32, 64) > weight(60, 64));
        assert!(weight(64, 64) > 0.0);
        assert_eq!(weight(200, 64), 0.0);
    }
}
