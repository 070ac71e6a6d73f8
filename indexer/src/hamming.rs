//! Hamming distance between 256-bit ORB descriptors, and their arroy form.

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

/// The descriptor as arroy's vector: a set bit is +1, a clear bit −1, so arroy's
/// `BinaryQuantizedManhattan` distance is twice the Hamming distance.
pub fn to_arroy_vector(d: &Descriptor, out: &mut [f32; 256]) {
    for (i, v) in out.iter_mut().enumerate() {
        *v = if d[i / 8] >> (i % 8) & 1 == 1 {
            1.0
        } else {
            -1.0
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn arroy_vector_maps_bits_to_plus_minus_one() {
        let mut d = [0u8; 32];
        d[0] = 0b0000_0101;
        let mut v = [0f32; 256];
        to_arroy_vector(&d, &mut v);
        assert_eq!(&v[..4], &[1.0, -1.0, 1.0, -1.0]);
        assert!(v[8..].iter().all(|x| *x == -1.0));
    }
}
