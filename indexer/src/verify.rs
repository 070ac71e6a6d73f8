//! Geometric verification: RANSAC homography (OpenCV calib3d) between the query's keypoints
//! and a candidate's stored keypoints; the inlier count says whether the candidate really
//! shows the same scene.

use opencv::calib3d;
use opencv::core::{Mat, Point2f, Vector};
use opencv::prelude::*;

/// Reprojection error (pixels of the candidate's working image) below which a pair is an inlier.
pub const REPROJECTION_THRESHOLD: f64 = 8.0;
/// Fewest inliers for a candidate to count as verified.
pub const MIN_INLIERS: u32 = 8;

/// Inliers of the best homography mapping `query` points onto `candidate` points
/// (pairs at equal indices). Fewer than 4 pairs give 0.
pub fn inliers(query: &[(f32, f32)], candidate: &[(f32, f32)]) -> Result<u32, opencv::Error> {
    let n = query.len().min(candidate.len());
    if n < 4 {
        return Ok(0);
    }
    let src: Vector<Point2f> = query[..n].iter().map(|&(x, y)| Point2f::new(x, y)).collect();
    let dst: Vector<Point2f> = candidate[..n].iter().map(|&(x, y)| Point2f::new(x, y)).collect();
    let mut mask = Mat::default();
    let h = calib3d::find_homography_ext(&src, &dst, calib3d::RANSAC, REPROJECTION_THRESHOLD, &mut mask, 2000, 0.995)?;
    if h.empty() || mask.empty() {
        return Ok(0);
    }
    let count = opencv::core::count_non_zero(&mask)?;
    Ok(count.max(0) as u32)
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
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
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
        assert!(inliers(&noise, &noise2).unwrap() < MIN_INLIERS);
        assert_eq!(inliers(&q[..3], &c[..3]).unwrap(), 0);
    }
}
