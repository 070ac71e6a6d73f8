//! Geometric verification: RANSAC homography (OpenCV calib3d) between the query's keypoints
//! and a candidate's stored keypoints; the inlier count says whether the candidate really
//! shows the same scene.

use opencv::calib3d;
use opencv::core::{Mat, Point2f, Vector};
use opencv::prelude::*;

/// Reprojection error (pixels of the candidate's working image) below which a pair is an inlier.
pub const REPROJECTION_THRESHOLD: f64 = 8.0;
/// Fewest inliers for a candidate to count as verified.
pub const MIN_INLIERS: u32 = 12;
/// Random pairs also produce a few inliers, more when there are more pairs: at least this
/// fraction of the pairs must be inliers too.
pub const MIN_INLIER_FRACTION: f32 = 0.05;

/// Pairs a homography is fitted to: any fit has at least this many inliers.
pub const MIN_SAMPLE: u32 = 4;

/// Whether `inliers` out of `pairs` tested is evidence of the same scene.
pub fn is_verified(inliers: u32, pairs: usize) -> bool {
    inliers >= MIN_INLIERS && inliers as f32 >= MIN_INLIER_FRACTION * pairs as f32
}

/// Inliers of the best homography mapping `query` points onto `candidate` points
/// (pairs at equal indices, most similar first: PROSAC samples them first). Fewer than 4
/// pairs give 0.
pub fn inliers(query: &[(f32, f32)], candidate: &[(f32, f32)]) -> Result<u32, opencv::Error> {
    let n = query.len().min(candidate.len());
    if n < 4 {
        return Ok(0);
    }
    let src: Vector<Point2f> = query[..n]
        .iter()
        .map(|&(x, y)| Point2f::new(x, y))
        .collect();
    let dst: Vector<Point2f> = candidate[..n]
        .iter()
        .map(|&(x, y)| Point2f::new(x, y))
        .collect();
    let mut mask = Mat::default();
    let h = calib3d::find_homography_ext(
        &src,
        &dst,
        calib3d::USAC_PROSAC,
        REPROJECTION_THRESHOLD,
        &mut mask,
        10_000,
        0.999,
    )?;
    if h.empty() || mask.empty() || !plausible(&h)? {
        return Ok(0);
    }
    // Count distinct positions on both sides: a cluster of pairs on one spot (or many query
    // points on one catalogue point) is not evidence of the same scene.
    let mut q_seen = std::collections::HashSet::new();
    let mut c_seen = std::collections::HashSet::new();
    let mut q_in = Vec::new();
    let mut c_in = Vec::new();
    for i in 0..n {
        if *mask.at::<u8>(i as i32)? == 0 {
            continue;
        }
        let qk = ((query[i].0 / 3.0) as i32, (query[i].1 / 3.0) as i32);
        let ck = ((candidate[i].0 / 3.0) as i32, (candidate[i].1 / 3.0) as i32);
        if q_seen.insert(qk) & c_seen.insert(ck) {
            q_in.push(query[i]);
            c_in.push(candidate[i]);
        }
    }
    // Inliers along one line (an edge, a horizon) fit many homographies: demand 2-D spread.
    if minor_spread(&q_in) < MIN_SPREAD || minor_spread(&c_in) < MIN_SPREAD {
        return Ok(0);
    }
    Ok(q_in.len() as u32)
}

/// Smallest standard deviation (pixels) inlier points may have across their main direction.
pub const MIN_SPREAD: f32 = 6.0;

/// Standard deviation of points along their minor principal axis.
fn minor_spread(points: &[(f32, f32)]) -> f32 {
    if points.len() < 3 {
        return 0.0;
    }
    let n = points.len() as f32;
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (mx / n, my / n);
    let (mut sxx, mut syy, mut sxy) = (0.0f32, 0.0f32, 0.0f32);
    for (x, y) in points {
        let (dx, dy) = (x - mx, y - my);
        sxx += dx * dx;
        syy += dy * dy;
        sxy += dx * dy;
    }
    let (sxx, syy, sxy) = (sxx / n, syy / n, sxy / n);
    let tr = sxx + syy;
    let det = sxx * syy - sxy * sxy;
    let minor = tr / 2.0 - ((tr * tr / 4.0 - det).max(0.0)).sqrt();
    minor.max(0.0).sqrt()
}

/// Rejects degenerate homographies: collapsing or exploding areas, mirror images, extreme
/// perspective.
fn plausible(h: &Mat) -> Result<bool, opencv::Error> {
    let g = |r: i32, c: i32| h.at_2d::<f64>(r, c).copied();
    let det = g(0, 0)? * g(1, 1)? - g(0, 1)? * g(1, 0)?;
    let persp = g(2, 0)?.abs().max(g(2, 1)?.abs());
    Ok(det.is_finite() && (1.0 / 64.0..=64.0).contains(&det) && persp < 0.005)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_true_homography_keeps_its_inliers_and_noise_does_not() {
        // 40 points moved by a similarity transform, plus 20 random outliers.
        let mut q = Vec::new();
        let mut c = Vec::new();
        let mut seed = 12345u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) % 1000) as f32
        };
        for _ in 0..40 {
            let (x, y) = (rnd(), rnd());
            q.push((x, y));
            let (cs, sn) = (0.8f32.cos() * 0.5, 0.8f32.sin() * 0.5);
            c.push((cs * x - sn * y + 300.0, sn * x + cs * y + 100.0));
        }
        for _ in 0..20 {
            q.push((rnd(), rnd()));
            c.push((rnd(), rnd()));
        }
        let n = inliers(&q, &c).unwrap();
        assert!((38..=44).contains(&n), "{n}");
        let noise: Vec<(f32, f32)> = (0..40).map(|_| (rnd(), rnd())).collect();
        let noise2: Vec<(f32, f32)> = (0..40).map(|_| (rnd(), rnd())).collect();
        assert!(!is_verified(inliers(&noise, &noise2).unwrap(), noise.len()));
        assert!(is_verified(n, q.len()));
        assert!(!is_verified(20, 1000));
        assert_eq!(inliers(&q[..3], &c[..3]).unwrap(), 0);
    }

    #[test]
    fn points_on_a_line_are_not_evidence() {
        let q: Vec<(f32, f32)> = (0..30)
            .map(|i| (i as f32 * 10.0, 100.0 + (i % 2) as f32))
            .collect();
        let c: Vec<(f32, f32)> = q.iter().map(|(x, y)| (x * 0.5 + 20.0, y * 0.5)).collect();
        assert_eq!(inliers(&q, &c).unwrap(), 0);
        assert!(minor_spread(&q) < 1.0);
        assert!(minor_spread(&[(0.0, 0.0), (100.0, 0.0), (0.0, 100.0), (100.0, 100.0)]) > 40.0);
    }
}
