//! The two-level vocabulary that routes a descriptor to its inverted list.
//!
//! A flat coarse quantizer compares every descriptor with every centroid, so its cost grows
//! with the number of lists, and the number of lists must grow with the catalogue to keep
//! lists short. Here the lists are the leaves of a two-level tree of binary centroids
//! (k-majority, the binary analogue of k-means): `cells` top centroids, and under each cell
//! as many leaf centroids as that cell has descriptors / `leaf_len`. A descriptor is routed by
//! comparing it with the top centroids, then with the leaves of its nearest few cells, so a
//! million lists cost a few thousand comparisons instead of a million. Because each cell's
//! leaf count follows the descriptors it really holds, the uneven way real ORB descriptors
//! fill space (a few dense regions, a long sparse tail) gives lists of even length.

use crate::hamming::{distances_into, Words};
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;

/// k-majority iterations for the top level.
pub const TOP_ITERATIONS: u32 = 8;
/// k-majority iterations for the leaves of one cell.
pub const LEAF_ITERATIONS: u32 = 4;
/// Training samples per centroid of the top level.
pub const SAMPLES_PER_CENTROID: u64 = 40;
/// Training samples per leaf. Training a cell's leaves costs (iterations + 1) × samples ×
/// leaves distance computations: with 24 samples and 4 iterations that is 0.75 comparisons
/// per leaf per descriptor of the cell, less than routing every descriptor to its leaf.
pub const LEAF_SAMPLES_PER_CENTROID: u64 = 24;
/// Descriptors per inverted list the vocabulary is sized for.
pub const DEFAULT_LEAF_LEN: u32 = 160;
/// Fewest and most top-level cells.
pub const MIN_CELLS: u32 = 8;
/// Most top-level cells.
pub const MAX_CELLS: u32 = 4096;

/// How big a vocabulary to build for a catalogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VocabShape {
    /// Top-level cells.
    pub cells: u32,
    /// Descriptors per leaf list aimed at.
    pub leaf_len: u32,
}

impl VocabShape {
    /// The shape for `n` descriptors: about `n / leaf_len` leaves, under a power-of-two
    /// number of cells near the square root of that (the split that makes routing cheapest:
    /// a descriptor meets every cell centroid and the leaves of a few cells).
    pub fn for_descriptors(n: u64, leaf_len: u32) -> VocabShape {
        let leaf_len = leaf_len.max(1);
        let leaves = (n / leaf_len as u64).max(1) as f64;
        let cells = (leaves.sqrt() * 1.4).max(1.0);
        // Nearest power of two on a log scale.
        let cells = 2f64.powf(cells.log2().round()) as u64;
        VocabShape {
            cells: cells.clamp(MIN_CELLS as u64, MAX_CELLS as u64) as u32,
            leaf_len,
        }
    }

    /// Leaves for a cell holding `n` descriptors.
    pub fn leaves_for_cell(&self, n: u64) -> u32 {
        let l = self.leaf_len.max(1) as u64;
        ((n + l / 2) / l).clamp(1, u32::MAX as u64 / 2) as u32
    }
}

/// Trains `k` binary centroids on `samples` with k-majority (each bit of a centroid is the
/// majority bit of its members). Deterministic for a given seed and sample order.
///
/// k-majority can collapse: inside one dense, shapeless blob of descriptors every member's
/// majority is the blob's centre, so the centroids converge on it and one of them takes
/// nearly every member. The largest cluster is watched on every pass, and when training made
/// it larger than it was with the initial centroids (distinct samples, which split such a
/// blob evenly), the initial centroids are kept: lists stay short where it matters most.
pub fn train(samples: &[Words], k: usize, iterations: u32, seed: u64) -> Vec<Words> {
    if samples.is_empty() {
        return vec![[0; 4]];
    }
    let k = k.clamp(1, samples.len());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // Distinct initial centroids where possible: the first k of a partial shuffle.
    let mut order: Vec<usize> = (0..samples.len()).collect();
    for i in 0..k {
        let j = rng.random_range(i..order.len());
        order.swap(i, j);
    }
    let seeds: Vec<Words> = order[..k].iter().map(|&i| samples[i]).collect();
    if k == 1 || iterations == 0 {
        return seeds;
    }
    let parallel = samples.len() * k >= 1 << 16;
    let assign = |centroids: &[Words]| -> Vec<u32> {
        if parallel {
            samples
                .par_iter()
                .map(|s| nearest(centroids, s).1)
                .collect()
        } else {
            samples.iter().map(|s| nearest(centroids, s).1).collect()
        }
    };
    let largest = |assignment: &[u32]| -> u32 {
        let mut sizes = vec![0u32; k];
        for &c in assignment {
            sizes[c as usize] += 1;
        }
        sizes.into_iter().max().unwrap_or(0)
    };
    let mut centroids = seeds.clone();
    let mut seeds_largest = 0;
    for it in 0..iterations {
        let assignment = assign(&centroids);
        if it == 0 {
            seeds_largest = largest(&assignment);
        }
        let mut counts = vec![[0u32; 256]; k];
        let mut sizes = vec![0u32; k];
        for (s, &c) in samples.iter().zip(&assignment) {
            let c = c as usize;
            sizes[c] += 1;
            for (wi, w) in s.iter().enumerate() {
                let mut bits = *w;
                while bits != 0 {
                    let b = bits.trailing_zeros() as usize;
                    counts[c][wi * 64 + b] += 1;
                    bits &= bits - 1;
                }
            }
        }
        for c in 0..k {
            if sizes[c] == 0 {
                // Re-seed an empty cluster with a random sample.
                centroids[c] = samples[rng.random_range(0..samples.len())];
                continue;
            }
            let mut w = [0u64; 4];
            for bit in 0..256 {
                if counts[c][bit] * 2 > sizes[c] {
                    w[bit / 64] |= 1 << (bit % 64);
                }
            }
            centroids[c] = w;
        }
    }
    // Trained centroids win unless they made the largest cluster markedly larger.
    if largest(&assign(&centroids)) as u64 * 2 > seeds_largest as u64 * 3 {
        return seeds;
    }
    centroids
}

thread_local! {
    /// Distances of one descriptor to a set of centroids, reused across calls.
    static DISTANCES: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// (distance + price, index) of one sample's nearest centroids, for [`balance`].
    static PRICED: std::cell::RefCell<Vec<(u32, u32)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// (distance, index) of the smallest `distance + price` (ties: lowest index).
#[inline]
fn argmin(distances: &[u32], prices: Option<&[u16]>) -> (u32, u32) {
    let mut best = (u32::MAX, 0u32);
    match prices {
        None => {
            for (i, &d) in distances.iter().enumerate() {
                if d < best.0 {
                    best = (d, i as u32);
                }
            }
        }
        Some(p) => {
            for (i, (&d, &p)) in distances.iter().zip(p).enumerate() {
                let d = d + p as u32;
                if d < best.0 {
                    best = (d, i as u32);
                }
            }
        }
    }
    best
}

/// (distance, index) of the centroid nearest to `q` (ties: lowest index).
#[inline]
pub fn nearest(centroids: &[Words], q: &Words) -> (u32, u32) {
    DISTANCES.with(|d| {
        let mut d = d.borrow_mut();
        distances_into(q, centroids, &mut d);
        argmin(&d, None)
    })
}

/// (distance + price, index) of the centroid nearest to `q` once each centroid's price is
/// added to its distance (ties: lowest index).
#[inline]
pub fn nearest_priced(centroids: &[Words], prices: &[u16], q: &Words) -> (u32, u32) {
    DISTANCES.with(|d| {
        let mut d = d.borrow_mut();
        distances_into(q, centroids, &mut d);
        argmin(&d, Some(prices))
    })
}

/// Appends (distance + price, `offset` + index) of the `n` centroids nearest to `q` once
/// each one's price is added, nearest first (ties: lowest index); `distances` is scratch.
fn push_nearest_priced(
    q: &Words,
    centroids: &[Words],
    prices: &[u16],
    n: usize,
    offset: u32,
    distances: &mut Vec<u32>,
    out: &mut Vec<(u32, u32)>,
) {
    let start = out.len();
    distances_into(q, centroids, distances);
    out.extend(
        distances
            .iter()
            .zip(prices)
            .enumerate()
            .map(|(i, (d, p))| (d + *p as u32, offset + i as u32)),
    );
    keep_nearest(out, start, n);
}

/// Keeps the `n` smallest pairs of `pairs[start..]` (all when `n` is 0), sorted.
fn keep_nearest(pairs: &mut Vec<(u32, u32)>, start: usize, n: usize) {
    let len = pairs.len() - start;
    if n > 0 && n < len {
        pairs[start..].select_nth_unstable(n - 1);
        pairs.truncate(start + n);
    }
    pairs[start..].sort_unstable();
}

/// Largest list, as a multiple of the mean, that [`balance`] accepts.
pub const BALANCE_FACTOR: f64 = 2.5;
/// Most exact price rounds [`balance`] runs.
pub const BALANCE_ROUNDS: u32 = 40;

/// Leaves each sample may move to while [`balance`] raises prices: its nearest ones.
pub const BALANCE_CANDIDATES: usize = 8;
/// Rounds among the candidates between two exact rounds of [`balance`].
pub const BALANCE_FAST_ROUNDS: u32 = 16;

/// Prices (extra Hamming distance) that keep any centroid from taking more than
/// `max_factor` × its share of `samples`.
///
/// In a region where many groups of descriptors sit at about the same distance from each
/// other, one centroid near the region's middle is the nearest of nearly every descriptor
/// (a "hub" — nearest-neighbour hubness in high dimensions), and its list would hold the
/// whole region. Raising an over-full centroid's price moves the boundary of its catchment
/// inwards until its share is reasonable; queries route with the same prices, so they look
/// where the descriptors were put. Each sample's [`BALANCE_CANDIDATES`] nearest centroids
/// at the current prices are found in one exact pass; the rounds after it reassign among
/// those (a raised price moves a sample to a near neighbour, not across the cell), so a
/// round costs a few comparisons per sample, not one per centroid; when they look balanced
/// an exact pass checks it. Where lists are already even (most real data) nothing changes.
pub fn balance(samples: &[Words], centroids: &[Words], max_factor: f64, rounds: u32) -> Vec<u16> {
    let k = centroids.len();
    let mut prices = vec![0u16; k];
    if k <= 1 || samples.is_empty() {
        return prices;
    }
    let m = BALANCE_CANDIDATES.min(k);
    let cap = ((samples.len() as f64 / k as f64) * max_factor)
        .ceil()
        .max(1.0);
    // Raises the price of every centroid holding more than the cap; false when none does.
    let raise = |prices: &mut [u16], sizes: &[u32]| {
        let mut over = false;
        for (p, &n) in prices.iter_mut().zip(sizes) {
            if n as f64 > cap {
                over = true;
                let step = (2.0 * (n as f64 / cap).log2()).ceil().max(1.0) as u16;
                *p = p.saturating_add(step);
            }
        }
        over
    };
    let mut round = 0;
    while round < rounds {
        // Exact step: each sample's m nearest centroids at today's prices (raw distance,
        // index); the first is its exact priced assignment.
        let prices_now = prices.clone();
        // Flat: m (raw distance, index) pairs per sample, one allocation for the cell.
        let fill = |s: &Words, out: &mut [(u32, u32)]| {
            PRICED.with(|all| {
                DISTANCES.with(|d| {
                    let (mut all, mut d) = (all.borrow_mut(), d.borrow_mut());
                    all.clear();
                    push_nearest_priced(s, centroids, &prices_now, m, 0, &mut d, &mut all);
                    for (o, &(priced, i)) in out.iter_mut().zip(all.iter()) {
                        *o = (priced - prices_now[i as usize] as u32, i);
                    }
                })
            })
        };
        let mut candidates = vec![(0u32, 0u32); samples.len() * m];
        if samples.len() * k >= 1 << 16 {
            candidates
                .par_chunks_mut(m)
                .zip(samples.par_iter())
                .for_each(|(out, s)| fill(s, out));
        } else {
            for (out, s) in candidates.chunks_mut(m).zip(samples) {
                fill(s, out);
            }
        }
        let candidates: Vec<&[(u32, u32)]> = candidates.chunks(m).collect();
        let mut sizes = vec![0u32; k];
        for c in &candidates {
            sizes[c[0].1 as usize] += 1;
        }
        if !raise(&mut prices, &sizes) {
            break;
        }
        round += 1;
        // Fast rounds: reassign among the candidates until they look balanced, then check
        // exactly again.
        for _ in 0..BALANCE_FAST_ROUNDS {
            sizes.iter_mut().for_each(|n| *n = 0);
            for &cands in &candidates {
                let mut best = (u32::MAX, 0u32);
                for &(d, c) in cands {
                    let d = d + prices[c as usize] as u32;
                    if d < best.0 {
                        best = (d, c);
                    }
                }
                sizes[best.1 as usize] += 1;
            }
            if !raise(&mut prices, &sizes) {
                break;
            }
        }
    }
    prices
}

/// The trained vocabulary: top centroids, and the leaves of every cell.
#[derive(Clone, Debug, PartialEq)]
pub struct Vocabulary {
    top: Vec<Words>,
    /// Each cell's price ([`balance`] at the top level).
    top_prices: Vec<u16>,
    /// Cell `c`'s leaves are `first_leaf[c]..first_leaf[c + 1]`.
    first_leaf: Vec<u32>,
    leaves: Vec<Words>,
    /// Each leaf's price ([`balance`]).
    prices: Vec<u16>,
}

/// Scratch space for [`Vocabulary::probe`], reused across descriptors.
#[derive(Default)]
pub struct ProbeScratch {
    cells: Vec<(u32, u32)>,
    leaves: Vec<(u32, u32)>,
    distances: Vec<u32>,
}

impl Vocabulary {
    /// Assembles a vocabulary from its top centroids and each cell's leaves and their
    /// prices (in cell order).
    pub fn new(
        top: Vec<Words>,
        top_prices: Vec<u16>,
        cell_leaves: Vec<(Vec<Words>, Vec<u16>)>,
    ) -> Vocabulary {
        let mut first_leaf = Vec::with_capacity(top.len() + 1);
        let mut leaves = Vec::new();
        let mut prices = Vec::new();
        first_leaf.push(0);
        for (l, p) in cell_leaves {
            prices.extend(p.iter().copied().chain(std::iter::repeat(0)).take(l.len()));
            leaves.extend(l);
            first_leaf.push(leaves.len() as u32);
        }
        while first_leaf.len() < top.len() + 1 {
            first_leaf.push(leaves.len() as u32);
        }
        let top_prices = top_prices
            .into_iter()
            .chain(std::iter::repeat(0))
            .take(top.len())
            .collect();
        Vocabulary {
            top,
            top_prices,
            first_leaf,
            leaves,
            prices,
        }
    }

    /// Top-level cells.
    pub fn cells(&self) -> usize {
        self.top.len()
    }

    /// Leaves (inverted lists).
    pub fn leaves(&self) -> usize {
        self.leaves.len()
    }

    /// The leaves of cell `c`, as a range of leaf ids.
    pub fn cell_leaves(&self, c: u32) -> std::ops::Range<u32> {
        let c = c as usize;
        self.first_leaf[c]..self.first_leaf[c + 1]
    }

    /// The cell a leaf belongs to.
    pub fn cell_of(&self, leaf: u32) -> u32 {
        (self.first_leaf.partition_point(|&f| f <= leaf) - 1) as u32
    }

    /// The cell nearest to a descriptor.
    pub fn nearest_cell(&self, q: &Words) -> u32 {
        nearest_priced(&self.top, &self.top_prices, q).1
    }

    /// The leaf a descriptor of cell `c` is stored in.
    pub fn nearest_leaf_in(&self, c: u32, q: &Words) -> u32 {
        let r = self.cell_leaves(c);
        let (a, b) = (r.start as usize, r.end as usize);
        r.start + nearest_priced(&self.leaves[a..b], &self.prices[a..b], q).1
    }

    /// The `nprobe` leaves nearest to `q` among the leaves of its `cells` nearest cells,
    /// nearest first, as (distance to the leaf centroid plus its price, leaf id).
    pub fn probe<'s>(
        &self,
        q: &Words,
        cells: usize,
        nprobe: usize,
        scratch: &'s mut ProbeScratch,
    ) -> &'s [(u32, u32)] {
        scratch.cells.clear();
        push_nearest_priced(
            q,
            &self.top,
            &self.top_prices,
            cells.max(1),
            0,
            &mut scratch.distances,
            &mut scratch.cells,
        );
        scratch.leaves.clear();
        for &(_, c) in &scratch.cells {
            let r = self.cell_leaves(c);
            let (a, b) = (r.start as usize, r.end as usize);
            // At most nprobe from each cell before the final selection.
            push_nearest_priced(
                q,
                &self.leaves[a..b],
                &self.prices[a..b],
                nprobe,
                r.start,
                &mut scratch.distances,
                &mut scratch.leaves,
            );
        }
        keep_nearest(&mut scratch.leaves, 0, nprobe);
        &scratch.leaves
    }
}

/// Encodes centroids as 32 little-endian bytes each.
pub fn centroids_to_bytes(c: &[Words]) -> Vec<u8> {
    c.iter()
        .flat_map(|w| w.iter().flat_map(|x| x.to_le_bytes()))
        .collect()
}

/// Encodes prices as u16 little-endian each.
pub fn prices_to_bytes(p: &[u16]) -> Vec<u8> {
    p.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Decodes prices written by [`prices_to_bytes`] (`None` on an odd length).
pub fn prices_from_bytes(bytes: &[u8]) -> Option<Vec<u16>> {
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect(),
    )
}

/// Decodes centroids written by [`centroids_to_bytes`] (`None` when the length is not a
/// multiple of 32).
pub fn centroids_from_bytes(bytes: &[u8]) -> Option<Vec<Words>> {
    if !bytes.len().is_multiple_of(32) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(32)
            .map(|c| {
                std::array::from_fn(|i| {
                    u64::from_le_bytes(c[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]))
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngExt;

    /// `n_clusters` random centres with `per` members each, every bit flipped with
    /// probability `flip`; cluster sizes can be skewed by `skew` (member count of cluster i
    /// is `per * (1 + skew * i)`).
    fn clustered(n_clusters: usize, per: usize, flip: f64, skew: usize, seed: u64) -> Vec<Words> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::new();
        for i in 0..n_clusters {
            let c: Words = std::array::from_fn(|_| rng.random());
            for _ in 0..per * (1 + skew * i) {
                let mut d = c;
                for bit in 0..256 {
                    if rng.random_bool(flip) {
                        d[bit / 64] ^= 1 << (bit % 64);
                    }
                }
                out.push(d);
            }
        }
        out
    }

    #[test]
    fn shape_grows_leaves_with_n_and_cells_with_its_root() {
        let s = VocabShape::for_descriptors(116_000_000, 160);
        assert_eq!(s.cells, 1024);
        assert_eq!(VocabShape::for_descriptors(4_000_000, 160).cells, 256);
        assert_eq!(VocabShape::for_descriptors(0, 160).cells, MIN_CELLS);
        assert_eq!(
            VocabShape::for_descriptors(u64::MAX / 2, 1).cells,
            MAX_CELLS
        );
        assert_eq!(s.leaves_for_cell(0), 1);
        assert_eq!(s.leaves_for_cell(160 * 7 + 10), 7);
        assert_eq!(s.leaves_for_cell(160 * 7 + 90), 8);
    }

    #[test]
    fn k_majority_recovers_clusters() {
        let data = clustered(8, 200, 0.05, 0, 1);
        let c = train(&data, 8, 8, 7);
        let mut agree = 0;
        for (chunk_i, chunk) in data.chunks(200).enumerate() {
            let first = nearest(&c, &chunk[0]).1;
            agree += chunk.iter().filter(|d| nearest(&c, d).1 == first).count();
            let _ = chunk_i;
        }
        assert!(agree as f64 / data.len() as f64 > 0.97, "{agree}");
        let distinct: std::collections::HashSet<u32> =
            data.chunks(200).map(|ch| nearest(&c, &ch[0]).1).collect();
        assert!(distinct.len() >= 7, "{distinct:?}");
    }

    #[test]
    fn training_is_deterministic() {
        let data = clustered(4, 50, 0.1, 0, 2);
        assert_eq!(train(&data, 16, 4, 3), train(&data, 16, 4, 3));
        assert_eq!(train(&[], 4, 4, 3).len(), 1);
        assert_eq!(train(&data[..3], 16, 4, 3).len(), 3);
    }

    #[test]
    fn centroids_round_trip() {
        assert_eq!(
            prices_from_bytes(&prices_to_bytes(&[0, 7, 65535])),
            Some(vec![0, 7, 65535])
        );
        assert_eq!(prices_from_bytes(&[0; 3]), None);
        let c = clustered(2, 3, 0.1, 0, 9);
        assert_eq!(centroids_from_bytes(&centroids_to_bytes(&c)), Some(c));
        assert_eq!(centroids_from_bytes(&[0; 31]), None);
    }

    fn two_level(data: &[Words], shape: VocabShape) -> Vocabulary {
        let top = train(data, shape.cells as usize, TOP_ITERATIONS, 1);
        let top_prices = balance(data, &top, BALANCE_FACTOR, BALANCE_ROUNDS);
        let mut members: Vec<Vec<Words>> = vec![Vec::new(); top.len()];
        for d in data {
            members[nearest_priced(&top, &top_prices, d).1 as usize].push(*d);
        }
        let leaves = members
            .iter()
            .enumerate()
            .map(|(c, m)| {
                let l = train(
                    m,
                    shape.leaves_for_cell(m.len() as u64) as usize,
                    LEAF_ITERATIONS,
                    c as u64,
                );
                let p = balance(m, &l, BALANCE_FACTOR, BALANCE_ROUNDS);
                (l, p)
            })
            .collect();
        Vocabulary::new(top, top_prices, leaves)
    }

    /// Like real ORB descriptors: dense regions made of smaller groups (a corner type, seen
    /// at many scales and in many images), of very different sizes: region i holds
    /// `groups * (1 + 3 * i)` groups of `per` members.
    pub(super) fn regions(n_regions: usize, groups: usize, per: usize, seed: u64) -> Vec<Words> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let flip = |w: &Words, p: f64, rng: &mut rand_chacha::ChaCha8Rng| -> Words {
            let mut d = *w;
            for bit in 0..256 {
                if rng.random_bool(p) {
                    d[bit / 64] ^= 1 << (bit % 64);
                }
            }
            d
        };
        let mut out = Vec::new();
        for i in 0..n_regions {
            let centre: Words = std::array::from_fn(|_| rng.random());
            for _ in 0..groups * (1 + 3 * i) {
                let group = flip(&centre, 0.12, &mut rng);
                for _ in 0..per {
                    out.push(flip(&group, 0.03, &mut rng));
                }
            }
        }
        out
    }

    #[test]
    fn skewed_data_gets_lists_of_even_length() {
        // Regions from 200 to 4,000 descriptors: a flat quantizer's lists follow that skew.
        let data = regions(8, 10, 20, 4);
        let shape = VocabShape {
            cells: 8,
            leaf_len: 100,
        };
        let v = two_level(&data, shape);
        let mut sizes = vec![0u32; v.leaves()];
        for d in &data {
            let c = v.nearest_cell(d);
            sizes[v.nearest_leaf_in(c, d) as usize] += 1;
        }
        let mean = data.len() as f64 / v.leaves() as f64;
        let max = *sizes.iter().max().unwrap_or(&0) as f64;
        assert!(
            (v.leaves() as f64) > data.len() as f64 / 100.0 * 0.7,
            "{} leaves",
            v.leaves()
        );
        assert!(max < mean * 4.0, "largest list {max} vs mean {mean:.0}");
    }

    #[test]
    fn prices_break_up_a_hub() {
        // Equidistant groups around one centre: the centroid nearest the centre is the
        // nearest of almost everything until it is priced.
        let data = regions(1, 60, 20, 8);
        let leaves = train(&data, 12, 0, 1);
        let count = |prices: &[u16]| {
            let mut sizes = vec![0u32; leaves.len()];
            for d in &data {
                sizes[nearest_priced(&leaves, prices, d).1 as usize] += 1;
            }
            *sizes.iter().max().unwrap_or(&0) as f64
        };
        let mean = data.len() as f64 / leaves.len() as f64;
        let unpriced = count(&vec![0; leaves.len()]);
        let prices = balance(&data, &leaves, BALANCE_FACTOR, BALANCE_ROUNDS);
        assert!(
            unpriced > 3.0 * mean,
            "the data should have a hub: {unpriced} vs {mean}"
        );
        assert!(
            count(&prices) <= BALANCE_FACTOR * mean + 1.0,
            "{} vs {mean}",
            count(&prices)
        );
        let even = clustered(12, 100, 0.05, 0, 9);
        let seeds = train(&even, 12, TOP_ITERATIONS, 2);
        assert!(balance(&even, &seeds, BALANCE_FACTOR, BALANCE_ROUNDS)
            .iter()
            .all(|&p| p == 0));
    }

    #[test]
    fn a_shapeless_blob_keeps_its_seed_centroids() {
        // Members scattered evenly around one centre: k-majority pulls every centroid onto
        // the centre; the guard keeps the sampled seeds instead.
        let blob = clustered(1, 2_000, 0.1, 0, 6);
        let trained = train(&blob, 20, LEAF_ITERATIONS, 3);
        let seeds = train(&blob, 20, 0, 3);
        assert_eq!(trained, seeds);
        let structured = regions(4, 10, 20, 7);
        assert_ne!(
            train(&structured, 20, LEAF_ITERATIONS, 3),
            train(&structured, 20, 0, 3)
        );
    }

    #[test]
    fn probe_finds_the_home_leaf_and_sorts() {
        let data = clustered(32, 60, 0.06, 1, 5);
        let v = two_level(
            &data,
            VocabShape {
                cells: 8,
                leaf_len: 40,
            },
        );
        let mut scratch = ProbeScratch::default();
        let mut found = 0;
        for d in &data {
            let home = v.nearest_leaf_in(v.nearest_cell(d), d);
            let probed = v.probe(d, 2, 4, &mut scratch);
            assert!(probed.len() <= 4);
            assert!(probed.windows(2).all(|w| w[0] <= w[1]));
            if probed.iter().any(|&(_, l)| l == home) {
                found += 1;
            }
        }
        // The home leaf is the nearest of its cell, so only closer leaves of the other cell
        // can push it out: rarely.
        assert!(found * 100 >= data.len() * 99, "{found} of {}", data.len());
        assert_eq!(v.cell_of(v.cell_leaves(3).start), 3);
        let last = v.leaves() as u32 - 1;
        assert_eq!(v.cell_of(last), v.cells() as u32 - 1);
    }
}
