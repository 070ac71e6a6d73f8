//! The coarse quantizer and inverted lists that make queries fast with bounded memory.
//!
//! Descriptors are grouped by their nearest of K binary centroids (trained with k-majority,
//! the binary analogue of k-means). A query descriptor only scans the lists of its `nprobe`
//! nearest centroids, comparing 32-byte codes stored contiguously in LMDB pages: the
//! approach of FAISS's binary IVF, but with the lists on disk (memory-mapped) instead of in
//! RAM. Centroids are small (K × 32 bytes) and stay in memory.

use crate::features::Descriptor;
use crate::hamming::{distance_words, words, Words};
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;

/// Bytes of one inverted-list entry: u32 descriptor id (little-endian) + 32-byte code.
pub const ENTRY_BYTES: usize = 4 + 32;
/// Training samples per centroid.
pub const SAMPLES_PER_LIST: u64 = 32;
/// k-majority iterations.
pub const TRAIN_ITERATIONS: u32 = 8;

/// Number of lists for `n` descriptors: about 2·√n, a power of two between 16 and 16384.
pub fn lists_for(n: u64) -> u32 {
    let target = ((n as f64).sqrt() * 2.0).max(16.0);
    (target as u64).next_power_of_two().clamp(16, 16384) as u32
}

/// The trained centroids.
#[derive(Clone, Debug, PartialEq)]
pub struct Centroids {
    words: Vec<Words>,
}

impl Centroids {
    /// Number of centroids (lists).
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Index of the nearest centroid.
    pub fn nearest(&self, q: &Words) -> u32 {
        let mut best = (u32::MAX, 0u32);
        for (i, c) in self.words.iter().enumerate() {
            let d = distance_words(q, c);
            if d < best.0 {
                best = (d, i as u32);
            }
        }
        best.1
    }

    /// The `n` nearest centroids, nearest first (ties by index).
    pub fn nearest_n(&self, q: &Words, n: usize, out: &mut Vec<(u32, u32)>) {
        out.clear();
        out.extend(
            self.words
                .iter()
                .enumerate()
                .map(|(i, c)| (distance_words(q, c), i as u32)),
        );
        let n = n.min(out.len());
        if n == 0 {
            out.clear();
            return;
        }
        if n < out.len() {
            out.select_nth_unstable(n - 1);
            out.truncate(n);
        }
        out.sort_unstable();
    }

    /// Serialises as 32 bytes per centroid.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.words
            .iter()
            .flat_map(|w| w.iter().flat_map(|x| x.to_le_bytes()))
            .collect()
    }

    /// Reads centroids written by [`Centroids::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Option<Centroids> {
        if !bytes.len().is_multiple_of(32) {
            return None;
        }
        let words = bytes
            .chunks_exact(32)
            .map(|c| {
                let mut d = [0u8; 32];
                d.copy_from_slice(c);
                words(&d)
            })
            .collect();
        Some(Centroids { words })
    }
}

/// Trains `k` centroids on `samples` with k-majority. Deterministic for a given seed and
/// sample order (parallel assignment, order-independent integer sums).
pub fn train(samples: &[Descriptor], k: u32, iterations: u32, seed: u64) -> Centroids {
    let samples: Vec<Words> = samples.iter().map(words).collect();
    let k = (k as usize).min(samples.len()).max(1);
    if samples.is_empty() {
        return Centroids {
            words: vec![[0; 4]],
        };
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // Distinct initial centroids where possible.
    let mut order: Vec<usize> = (0..samples.len()).collect();
    for i in 0..k.min(order.len()) {
        let j = rng.random_range(i..order.len());
        order.swap(i, j);
    }
    let mut centroids: Vec<Words> = order[..k].iter().map(|&i| samples[i]).collect();
    for _ in 0..iterations {
        let cs = Centroids {
            words: centroids.clone(),
        };
        let assign: Vec<u32> = samples.par_iter().map(|s| cs.nearest(s)).collect();
        let mut counts = vec![[0u32; 256]; k];
        let mut sizes = vec![0u32; k];
        for (s, &c) in samples.iter().zip(&assign) {
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
    Centroids { words: centroids }
}

/// Appends one entry to a list buffer.
pub fn push_entry(buf: &mut Vec<u8>, id: u32, d: &Descriptor) {
    buf.extend_from_slice(&id.to_le_bytes());
    buf.extend_from_slice(d);
}

/// Iterates the (id, code) entries of a list chunk.
pub fn entries(chunk: &[u8]) -> impl Iterator<Item = (u32, Words)> + '_ {
    chunk.chunks_exact(ENTRY_BYTES).map(|e| {
        let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        let mut w = [0u64; 4];
        for (i, x) in w.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&e[4 + i * 8..12 + i * 8]);
            *x = u64::from_le_bytes(b);
        }
        (id, w)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clustered(
        n_clusters: usize,
        per: usize,
        flip: f64,
        seed: u64,
    ) -> (Vec<Descriptor>, Vec<usize>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let centers: Vec<Descriptor> = (0..n_clusters)
            .map(|_| std::array::from_fn(|_| rng.random()))
            .collect();
        let mut out = Vec::new();
        let mut label = Vec::new();
        for (ci, c) in centers.iter().enumerate() {
            for _ in 0..per {
                let mut d = *c;
                for bit in 0..256 {
                    if rng.random_bool(flip) {
                        d[bit / 8] ^= 1 << (bit % 8);
                    }
                }
                out.push(d);
                label.push(ci);
            }
        }
        (out, label)
    }

    #[test]
    fn list_count_grows_with_sqrt_n() {
        assert_eq!(lists_for(0), 16);
        assert_eq!(lists_for(24_000), 512);
        assert_eq!(lists_for(1_000_000), 2048);
        assert_eq!(lists_for(116_000_000), 16384);
    }

    #[test]
    fn k_majority_recovers_clusters() {
        let (data, label) = clustered(8, 200, 0.05, 1);
        let c = train(&data, 8, TRAIN_ITERATIONS, 7);
        // every cluster's members map to one centroid, and clusters map to distinct ones
        let mut map = std::collections::HashMap::new();
        let mut agree = 0;
        for (d, l) in data.iter().zip(&label) {
            let n = c.nearest(&words(d));
            let e = map.entry(*l).or_insert(n);
            if *e == n {
                agree += 1;
            }
        }
        assert!(agree as f64 / data.len() as f64 > 0.97, "{agree}");
        let distinct: std::collections::HashSet<_> = map.values().collect();
        assert!(distinct.len() >= 7, "{distinct:?}");
    }

    #[test]
    fn training_is_deterministic_and_round_trips() {
        let (data, _) = clustered(4, 50, 0.1, 2);
        let a = train(&data, 16, 4, 3);
        assert_eq!(a, train(&data, 16, 4, 3));
        assert_eq!(Centroids::from_bytes(&a.to_bytes()), Some(a.clone()));
        assert_eq!(Centroids::from_bytes(&[0; 31]), None);
    }

    #[test]
    fn nearest_n_is_sorted_and_bounded() {
        let (data, _) = clustered(4, 30, 0.1, 4);
        let c = train(&data, 16, 3, 5);
        let mut out = Vec::new();
        c.nearest_n(&words(&data[0]), 5, &mut out);
        assert_eq!(out.len(), 5);
        assert!(out.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(out[0].1, c.nearest(&words(&data[0])));
        c.nearest_n(&words(&data[0]), 100, &mut out);
        assert_eq!(out.len(), c.len());
    }

    #[test]
    fn entries_round_trip() {
        let mut buf = Vec::new();
        push_entry(&mut buf, 7, &[3; 32]);
        push_entry(&mut buf, 9, &[255; 32]);
        let e: Vec<(u32, Words)> = entries(&buf).collect();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].0, 7);
        assert_eq!(e[1].1, [u64::MAX; 4]);
    }
}
