//! One global descriptor per image: the low frequencies of its grey thumbnail.
//!
//! Local features find a photo's copies when they are cropped, rotated or framed, but an image
//! with little texture (a sky, a gradient, a product on a plain background) yields few or no
//! keypoints. Its overall layout of light and dark still survives re-encoding, rescaling,
//! blurring and changes of brightness or contrast: the image is shrunk to 32×32, its 2-D DCT
//! taken, and the 8×8 lowest frequencies but the mean (63 numbers) kept, scaled to unit
//! length. Mirroring and quarter turns only permute and negate those coefficients, so a query
//! can be compared in all eight orientations without decoding it again. The catalogue's
//! global descriptors are searched with arroy (cosine distance).

use opencv::core::{self, Mat, Size};
use opencv::imgproc;
use opencv::prelude::*;

/// Thumbnail side.
const THUMB: i32 = 32;
/// Low frequencies kept per axis.
const FREQ: usize = 8;
/// Dimensions of a global descriptor (the 8×8 block without the mean).
pub const DIMS: usize = FREQ * FREQ - 1;
/// RMS deviation from the mean (grey levels) of the low-passed thumbnail below which an
/// image counts as flat: a blank
/// page or a plain colour has no layout to recognise it by.
pub const FLAT_ENERGY: f32 = 1.0;

/// A global descriptor: unit length, [`DIMS`] coefficients.
pub type GlobalDescriptor = [f32; DIMS];

/// The global descriptor of an 8-bit grey image, or `None` when it is flat.
pub fn describe(gray: &Mat) -> Result<Option<GlobalDescriptor>, opencv::Error> {
    if gray.empty() {
        return Ok(None);
    }
    let mut thumb = Mat::default();
    imgproc::resize(
        gray,
        &mut thumb,
        Size::new(THUMB, THUMB),
        0.0,
        0.0,
        imgproc::INTER_AREA,
    )?;
    let mut f = Mat::default();
    thumb.convert_to(&mut f, core::CV_32F, 1.0, 0.0)?;
    let mut dct = Mat::default();
    core::dct(&f, &mut dct, 0)?;
    let mut out = [0f32; DIMS];
    for u in 0..FREQ {
        for v in 0..FREQ {
            if u == 0 && v == 0 {
                continue;
            }
            out[u * FREQ + v - 1] = *dct.at_2d::<f32>(u as i32, v as i32)?;
        }
    }
    Ok(normalise(out))
}

/// Scales to unit length; `None` when the coefficients' RMS (in grey levels) is below
/// [`FLAT_ENERGY`].
fn normalise(mut g: GlobalDescriptor) -> Option<GlobalDescriptor> {
    let norm = g.iter().map(|x| x * x).sum::<f32>().sqrt();
    // The DCT is orthonormal: the coefficients' energy is the pixels' (Parseval), so this is
    // the RMS deviation of the low-passed thumbnail from its mean, in grey levels.
    let rms = norm / THUMB as f32;
    if rms < FLAT_ENERGY || !norm.is_finite() {
        return None;
    }
    g.iter_mut().for_each(|x| *x /= norm);
    Some(g)
}

/// Encodes a descriptor as little-endian f32s.
pub fn to_bytes(g: &GlobalDescriptor) -> Vec<u8> {
    g.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Decodes [`to_bytes`]' output (`None` when the length is wrong).
pub fn from_bytes(b: &[u8]) -> Option<GlobalDescriptor> {
    if b.len() != DIMS * 4 {
        return None;
    }
    Some(std::array::from_fn(|i| {
        f32::from_le_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]])
    }))
}

/// Cosine distance (0 = same layout, 1 = unrelated, 2 = inverted).
pub fn distance(a: &GlobalDescriptor, b: &[f32]) -> f32 {
    1.0 - a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>()
}

fn coefficient(g: &GlobalDescriptor, u: usize, v: usize) -> f32 {
    if u == 0 && v == 0 {
        0.0
    } else {
        g[u * FREQ + v - 1]
    }
}

/// The descriptor of the image transformed by one of the eight symmetries of a rectangle
/// (`transpose`, then mirror left-right, then mirror top-bottom), computed from the
/// coefficients: a mirror negates the odd frequencies along its axis, a transpose swaps the
/// axes (a quarter turn is a transpose and a mirror).
pub fn oriented(
    g: &GlobalDescriptor,
    transpose: bool,
    mirror_x: bool,
    mirror_y: bool,
) -> GlobalDescriptor {
    let mut out = [0f32; DIMS];
    for u in 0..FREQ {
        for v in 0..FREQ {
            if u == 0 && v == 0 {
                continue;
            }
            let (su, sv) = if transpose { (v, u) } else { (u, v) };
            let mut c = coefficient(g, su, sv);
            // u is the vertical frequency, v the horizontal one.
            if mirror_x && v % 2 == 1 {
                c = -c;
            }
            if mirror_y && u % 2 == 1 {
                c = -c;
            }
            out[u * FREQ + v - 1] = c;
        }
    }
    out
}

/// The descriptor in all eight orientations (the first is `g` itself).
pub fn orientations(g: &GlobalDescriptor) -> [GlobalDescriptor; 8] {
    std::array::from_fn(|i| oriented(g, i & 4 != 0, i & 1 != 0, i & 2 != 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use opencv::core::{Scalar, CV_8U};

    /// A smooth, asymmetric grey image (gradients and a blob), `w`×`h`.
    fn layout(w: i32, h: i32) -> Mat {
        let mut m = Mat::new_rows_cols_with_default(h, w, CV_8U, Scalar::all(0.0)).unwrap();
        for y in 0..h {
            for x in 0..w {
                let fx = x as f32 / w as f32;
                let fy = y as f32 / h as f32;
                let blob = (-((fx - 0.7).powi(2) + (fy - 0.3).powi(2)) * 20.0).exp();
                let v = 40.0 + 120.0 * fx * fx + 50.0 * fy + 60.0 * blob;
                *m.at_2d_mut::<u8>(y, x).unwrap() = v.clamp(0.0, 255.0) as u8;
            }
        }
        m
    }

    fn flip(m: &Mat, code: i32) -> Mat {
        let mut out = Mat::default();
        core::flip(m, &mut out, code).unwrap();
        out
    }

    fn rotate90(m: &Mat) -> Mat {
        let mut out = Mat::default();
        core::rotate(m, &mut out, core::ROTATE_90_CLOCKWISE).unwrap();
        out
    }

    #[test]
    fn flat_images_have_no_descriptor() {
        let white = Mat::new_rows_cols_with_default(64, 48, CV_8U, Scalar::all(255.0)).unwrap();
        assert_eq!(describe(&white).unwrap(), None);
        assert_eq!(describe(&Mat::default()).unwrap(), None);
    }

    #[test]
    fn rescaled_copy_is_close_and_other_layout_is_far() {
        let a = describe(&layout(400, 300)).unwrap().unwrap();
        let small = describe(&layout(120, 90)).unwrap().unwrap();
        let other = describe(&flip(&layout(400, 300), -1)).unwrap().unwrap();
        assert!(distance(&a, &small) < 0.02, "{}", distance(&a, &small));
        assert!(distance(&a, &other) > 0.3, "{}", distance(&a, &other));
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4);
        assert_eq!(from_bytes(&to_bytes(&a)), Some(a));
        assert_eq!(from_bytes(&[0; 8]), None);
    }

    #[test]
    fn orientations_match_transformed_images() {
        let img = layout(320, 240);
        let g = describe(&img).unwrap().unwrap();
        let all = orientations(&g);
        for (transformed, what) in [
            (flip(&img, 1), "mirror left-right"),
            (flip(&img, 0), "mirror top-bottom"),
            (flip(&img, -1), "half turn"),
            (rotate90(&img), "quarter turn"),
        ] {
            let t = describe(&transformed).unwrap().unwrap();
            let best = all
                .iter()
                .map(|o| distance(o, &t))
                .fold(f32::INFINITY, f32::min);
            assert!(best < 0.01, "{what}: {best}");
            assert!(distance(&g, &t) > 0.05, "{what} should differ unoriented");
        }
        assert_eq!(all[0], g);
    }
}
