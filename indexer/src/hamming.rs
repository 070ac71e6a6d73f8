//! Hamming distance between 256-bit ORB descriptors.

use crate::features::Descriptor;

/// Bits that differ between two descriptors (0..=256).
#[inline]
pub fn distance(a: &Descriptor, b: &Descriptor) -> u32 {
    let mut d = 0;
    for i in 0..4 {
        let x = u64::from_le_bytes(a[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        let y = u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        d += (x ^ y).count_ones();
    }
    d
}

/// A descriptor as four words, for tight loops.
pub type Words = [u64; 4];

/// Converts a descriptor to words.
#[inline]
pub fn words(d: &Descriptor) -> Words {
    let mut w = [0u64; 4];
    for (i, chunk) in d.chunks_exact(8).enumerate() {
        w[i] = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
    }
    w
}

/// Hamming distance between word forms.
#[inline]
pub fn distance_words(a: &Words, b: &Words) -> u32 {
    (a[0] ^ b[0]).count_ones()
        + (a[1] ^ b[1]).count_ones()
        + (a[2] ^ b[2]).count_ones()
        + (a[3] ^ b[3]).count_ones()
}

/// Distances from `q` to every centroid, into `out` (cleared first). On x86-64 CPUs with
/// AVX-512 VPOPCNTDQ, eight centroids take one pass of vector instructions; elsewhere, four
/// POPCNTs per centroid. The vocabulary's build and every query spend most of their time here.
pub fn distances_into(q: &Words, centroids: &[Words], out: &mut Vec<u32>) {
    out.clear();
    out.resize(centroids.len(), 0);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vpopcntdq")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            let done = unsafe { avx512::distances(q, centroids, out) };
            scalar_distances(q, &centroids[done..], &mut out[done..]);
            return;
        }
    }
    scalar_distances(q, centroids, out);
}

fn scalar_distances(q: &Words, centroids: &[Words], out: &mut [u32]) {
    for (o, c) in out.iter_mut().zip(centroids) {
        *o = distance_words(q, c);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Words;
    use std::arch::x86_64::*;

    /// Distances to the centroids in whole groups of eight; returns how many were done.
    ///
    /// One 512-bit register holds two centroids (4 words each): XOR with the query twice
    /// over, count bits per word, sum each half's four words by two swaps and adds, then
    /// blend four registers' sums into one and narrow to u32 in centroid order.
    #[target_feature(enable = "avx512f,avx512vpopcntdq,avx2")]
    pub(super) unsafe fn distances(q: &Words, centroids: &[Words], out: &mut [u32]) -> usize {
        let qq = _mm512_set_epi64(
            q[3] as i64,
            q[2] as i64,
            q[1] as i64,
            q[0] as i64,
            q[3] as i64,
            q[2] as i64,
            q[1] as i64,
            q[0] as i64,
        );
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let groups = centroids.len() / 8;
        let base = centroids.as_ptr() as *const u8;
        let sums = |k: usize| {
            // SAFETY: k < groups * 4, so the 64 bytes at k * 64 are inside `centroids`.
            let v = unsafe { _mm512_loadu_si512(base.add(k * 64) as *const _) };
            let x = _mm512_popcnt_epi64(_mm512_xor_si512(v, qq));
            let s = _mm512_add_epi64(x, _mm512_permutex_epi64::<0b10_11_00_01>(x));
            _mm512_add_epi64(s, _mm512_permutex_epi64::<0b01_00_11_10>(s))
        };
        for g in 0..groups {
            let (p0, p1, p2, p3) = (
                sums(g * 4),
                sums(g * 4 + 1),
                sums(g * 4 + 2),
                sums(g * 4 + 3),
            );
            let mut r = _mm512_mask_blend_epi64(0b0010_0010, p0, p1);
            r = _mm512_mask_blend_epi64(0b0100_0100, r, p2);
            r = _mm512_mask_blend_epi64(0b1000_1000, r, p3);
            let d = _mm256_permutevar8x32_epi32(_mm512_cvtepi64_epi32(r), order);
            // SAFETY: out has centroids.len() ≥ (g + 1) * 8 elements.
            unsafe { _mm256_storeu_si256(out.as_mut_ptr().add(g * 8) as *mut __m256i, d) };
        }
        groups * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_distances_equal_scalar_ones_at_every_length() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut out = Vec::new();
        for n in 0..70 {
            let c: Vec<Words> = (0..n)
                .map(|_| std::array::from_fn(|_| rng.random()))
                .collect();
            let q: Words = std::array::from_fn(|_| rng.random());
            distances_into(&q, &c, &mut out);
            let want: Vec<u32> = c.iter().map(|x| distance_words(&q, x)).collect();
            assert_eq!(out, want, "{n} centroids");
        }
    }

    #[test]
    fn distance_counts_differing_bits() {
        let a = [0u8; 32];
        let mut b = [0u8; 32];
        assert_eq!(distance(&a, &b), 0);
        b[0] = 0b1011;
        b[31] = 0xFF;
        assert_eq!(distance(&a, &b), 11);
        assert_eq!(distance_words(&words(&a), &words(&b)), 11);
        assert_eq!(distance(&[0xFF; 32], &a), 256);
    }
}
