//! Merging the shards' answers into one: every shard's candidates tagged with their shard,
//! ordered by the same [`ranking::order`] an unsharded index uses, the layout fallback over
//! the union of the shards' nearest layouts, and the coverage (shards asked / answered).
//! Pure: the fan-out that gathers the answers is in [`super::fanout`].

use super::wire::ShardAnswer;
use crate::search::ranking::{self, Match, NearLayout};
use crate::serve::api::{Coverage, ShardCoverage};

/// What one shard did with a query.
#[derive(Clone, Debug, PartialEq)]
pub enum ShardOutcome {
    /// It answered in time.
    Answered(ShardAnswer),
    /// It did not answer in time (the per-shard deadline passed).
    Late,
    /// It could not be asked or refused (down, restarting, another generation, …).
    Failed(String),
}

/// One shard's outcome and how long the router waited for it.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardReply {
    /// The shard (0-based).
    pub shard: u32,
    /// What happened.
    pub outcome: ShardOutcome,
    /// Milliseconds from sending to the answer (or to giving up).
    pub ms: f64,
}

/// The merged answer: matches in rank order (at most `k`), the coverage, and the shards'
/// summed lookup and verification times.
#[derive(Clone, Debug, PartialEq)]
pub struct Merged {
    /// Matches in rank order.
    pub matches: Vec<Match>,
    /// Shards asked and answered.
    pub coverage: Coverage,
    /// The slowest answering shard's lookup time (ms).
    pub lookup_ms: f64,
    /// The slowest answering shard's verification time (ms).
    pub verify_ms: f64,
}

/// Merges the shards' replies into the top `k`; with `global`, the layout fallback runs
/// over every answering shard's nearest layouts.
pub fn merge(replies: &[ShardReply], k: usize, global: bool) -> Merged {
    let mut matches = Vec::new();
    let mut near: Vec<NearLayout> = Vec::new();
    let (mut lookup_ms, mut verify_ms) = (0.0f64, 0.0f64);
    let mut shards = Vec::with_capacity(replies.len());
    for r in replies {
        let (answered, generation, reason) = match &r.outcome {
            ShardOutcome::Answered(a) => {
                matches.extend(a.candidates.iter().cloned().map(|mut m| {
                    m.shard = Some(r.shard);
                    m
                }));
                near.extend(a.layouts.iter().cloned().map(|mut l| {
                    l.shard = Some(r.shard);
                    l
                }));
                lookup_ms = lookup_ms.max(a.lookup_ms);
                verify_ms = verify_ms.max(a.verify_ms);
                (true, Some(a.generation), None)
            }
            ShardOutcome::Late => (false, None, Some("no answer within the deadline".into())),
            ShardOutcome::Failed(why) => (false, None, Some(why.clone())),
        };
        shards.push(ShardCoverage {
            shard: r.shard,
            answered,
            generation,
            ms: r.ms,
            reason,
        });
    }
    shards.sort_by_key(|s| s.shard);
    ranking::order(&mut matches);
    if global {
        let near = ranking::merge_layouts(near, 2);
        ranking::layout_first(&mut matches, &near);
    }
    matches.truncate(k);
    Merged {
        matches,
        coverage: Coverage {
            asked: shards.len() as u32,
            answered: shards.iter().filter(|s| s.answered).count() as u32,
            shards,
        },
        lookup_ms,
        verify_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::MatchedBy;

    fn m(id: u32, verified: bool, inliers: u32, score: u32, soft: f64) -> Match {
        Match {
            id,
            path: format!("img{id}.jpg"),
            score,
            inliers: Some(inliers),
            verified,
            matched_by: MatchedBy::Features,
            layout_distance: None,
            soft,
            shard: None,
        }
    }

    fn answered(shard: u32, candidates: Vec<Match>, layouts: Vec<NearLayout>) -> ShardReply {
        ShardReply {
            shard,
            outcome: ShardOutcome::Answered(ShardAnswer {
                generation: 1,
                shard: None,
                candidates,
                layouts,
                lookup_ms: 1.0 + shard as f64,
                verify_ms: 2.0,
            }),
            ms: 5.0,
        }
    }

    fn layout(id: u32, distance: f32) -> NearLayout {
        NearLayout {
            distance,
            id,
            path: format!("img{id}.jpg"),
            shard: None,
        }
    }

    fn ranked(merged: &Merged) -> Vec<(u32, u32)> {
        merged
            .matches
            .iter()
            .map(|m| (m.shard.unwrap(), m.id))
            .collect()
    }

    #[test]
    fn merge_orders_the_union_as_one_index_would() {
        let replies = [
            answered(
                0,
                vec![m(1, false, 5, 30, 40.0), m(2, true, 20, 25, 25.0)],
                vec![],
            ),
            answered(
                1,
                vec![m(1, true, 35, 40, 40.0), m(3, false, 4, 50, 50.0)],
                vec![],
            ),
            answered(2, vec![], vec![]),
        ];
        let merged = merge(&replies, 3, true);
        // Verified first by inliers (shard 1's image 1, then shard 0's image 2), then the
        // unverified by soft score (shard 1's 50 before shard 0's 40).
        assert_eq!(ranked(&merged), [(1, 1), (0, 2), (1, 3)]);
        assert_eq!(merged.coverage.asked, 3);
        assert_eq!(merged.coverage.answered, 3);
        assert_eq!(merged.lookup_ms, 3.0);
    }

    #[test]
    fn ties_break_by_shard_then_id_whatever_the_reply_order() {
        let a = answered(
            2,
            vec![m(7, true, 30, 40, 1.0), m(3, true, 30, 40, 1.0)],
            vec![],
        );
        let b = answered(0, vec![m(9, true, 30, 40, 1.0)], vec![]);
        let one = merge(&[a.clone(), b.clone()], 5, false);
        let other = merge(&[b, a], 5, false);
        assert_eq!(ranked(&one), [(0, 9), (2, 3), (2, 7)]);
        assert_eq!(one.matches, other.matches);
        assert_eq!(
            one.coverage
                .shards
                .iter()
                .map(|s| s.shard)
                .collect::<Vec<_>>(),
            [0, 2]
        );
    }

    #[test]
    fn a_shard_with_no_candidates_changes_nothing() {
        let with = merge(
            &[
                answered(0, vec![m(1, true, 30, 40, 1.0)], vec![]),
                answered(1, vec![], vec![]),
            ],
            5,
            true,
        );
        let without = merge(
            &[answered(0, vec![m(1, true, 30, 40, 1.0)], vec![])],
            5,
            true,
        );
        assert_eq!(with.matches, without.matches);
        assert_eq!((with.coverage.asked, with.coverage.answered), (2, 2));
    }

    #[test]
    fn a_late_or_failed_shard_lowers_the_coverage_not_the_answer() {
        let replies = [
            answered(0, vec![m(1, false, 4, 10, 12.0)], vec![]),
            ShardReply {
                shard: 1,
                outcome: ShardOutcome::Late,
                ms: 2000.0,
            },
            ShardReply {
                shard: 2,
                outcome: ShardOutcome::Failed("connection refused".into()),
                ms: 0.5,
            },
        ];
        let merged = merge(&replies, 5, true);
        assert_eq!(ranked(&merged), [(0, 1)]);
        assert_eq!((merged.coverage.asked, merged.coverage.answered), (3, 1));
        let late = &merged.coverage.shards[1];
        assert!(!late.answered && late.reason.as_deref().unwrap().contains("deadline"));
        assert_eq!(
            merged.coverage.shards[2].reason.as_deref(),
            Some("connection refused")
        );
        let none = merge(
            &[ShardReply {
                shard: 0,
                outcome: ShardOutcome::Late,
                ms: 1.0,
            }],
            5,
            true,
        );
        assert!(none.matches.is_empty());
        assert_eq!(none.coverage.answered, 0);
    }

    #[test]
    fn the_layout_fallback_compares_layouts_across_shards() {
        // Shard 0's layout alone is clear, but shard 1 holds one nearly as close: not clear.
        let replies = [
            answered(
                0,
                vec![m(1, false, 4, 10, 12.0)],
                vec![layout(5, 0.05), layout(6, 0.3)],
            ),
            answered(1, vec![], vec![layout(8, 0.07), layout(9, 0.4)]),
        ];
        let merged = merge(&replies, 5, true);
        assert_eq!(ranked(&merged), [(0, 1)]);
        // Without the close rival the layout match leads, tagged with its shard.
        let replies = [
            answered(
                0,
                vec![m(1, false, 4, 10, 12.0)],
                vec![layout(5, 0.05), layout(6, 0.3)],
            ),
            answered(1, vec![], vec![layout(8, 0.2), layout(9, 0.4)]),
        ];
        let merged = merge(&replies, 5, true);
        assert_eq!(ranked(&merged), [(0, 5), (0, 1)]);
        assert_eq!(merged.matches[0].matched_by, MatchedBy::Layout);
        assert_eq!(merged.matches[0].layout_distance, Some(0.05));
        // A verified leader needs no fallback; `global` off skips it.
        let merged = merge(&replies, 5, false);
        assert_eq!(ranked(&merged), [(0, 1)]);
    }

    #[test]
    fn k_bounds_the_answer() {
        let many: Vec<Match> = (0..20).map(|i| m(i, false, 0, i, i as f64)).collect();
        let merged = merge(&[answered(0, many, vec![])], 4, false);
        assert_eq!(ranked(&merged), [(0, 19), (0, 18), (0, 17), (0, 16)]);
    }
}
