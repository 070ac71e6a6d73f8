//! Attacked copies of catalogue images, for recall measurements: crops, rotations, rescales,
//! heavy JPEG, perspective, framing in noise, grayscale + blur, a mirrored crop, and
//! combinations. Files are
//! named `<catalogue stem>__<attack>.jpg` so the expected answer is in the name.

use opencv::core::{self, Mat, Point2f, Rect, Scalar, Size, Vector};
use opencv::imgcodecs;
use opencv::imgproc;
use opencv::prelude::*;
use std::path::{Path, PathBuf};

/// The attacks, by name.
pub const ATTACKS: [&str; 11] = [
    "crop40",
    "rotate25",
    "rotate90",
    "scale030",
    "jpeg15",
    "perspective",
    "noiseframe",
    "grayblur",
    "crop_rotate_jpeg",
    "scale_blur_jpeg",
    "mirror_crop",
];

fn encode(img: &Mat, quality: i32) -> opencv::Result<Vec<u8>> {
    let mut buf = Vector::<u8>::new();
    let params = Vector::<i32>::from_slice(&[imgcodecs::IMWRITE_JPEG_QUALITY, quality]);
    imgcodecs::imencode(".jpg", img, &mut buf, &params)?;
    Ok(buf.to_vec())
}

fn crop(img: &Mat, keep: f64, fx: f64, fy: f64) -> opencv::Result<Mat> {
    let (w, h) = (img.cols() as f64, img.rows() as f64);
    let (cw, ch) = ((w * keep).max(8.0), (h * keep).max(8.0));
    let r = Rect::new(
        ((w - cw) * fx) as i32,
        ((h - ch) * fy) as i32,
        cw as i32,
        ch as i32,
    );
    Mat::roi(img, r)?.try_clone()
}

fn rotate(img: &Mat, degrees: f64) -> opencv::Result<Mat> {
    let (w, h) = (img.cols() as f32, img.rows() as f32);
    let m = imgproc::get_rotation_matrix_2d(Point2f::new(w / 2.0, h / 2.0), degrees, 1.0)?;
    let rad = degrees.to_radians();
    let (c, s) = (rad.cos().abs() as f32, rad.sin().abs() as f32);
    let (nw, nh) = (w * c + h * s, w * s + h * c);
    let mut m = m;
    *m.at_2d_mut::<f64>(0, 2)? += ((nw - w) / 2.0) as f64;
    *m.at_2d_mut::<f64>(1, 2)? += ((nh - h) / 2.0) as f64;
    let mut out = Mat::default();
    imgproc::warp_affine(
        img,
        &mut out,
        &m,
        Size::new(nw as i32, nh as i32),
        imgproc::INTER_LINEAR,
        core::BORDER_CONSTANT,
        Scalar::all(0.0),
    )?;
    Ok(out)
}

fn scale(img: &Mat, f: f64) -> opencv::Result<Mat> {
    let mut out = Mat::default();
    let size = Size::new(
        ((img.cols() as f64 * f) as i32).max(8),
        ((img.rows() as f64 * f) as i32).max(8),
    );
    imgproc::resize(img, &mut out, size, 0.0, 0.0, imgproc::INTER_AREA)?;
    Ok(out)
}

fn blur(img: &Mat, sigma: f64) -> opencv::Result<Mat> {
    let mut out = Mat::default();
    imgproc::gaussian_blur_def(img, &mut out, Size::new(0, 0), sigma)?;
    Ok(out)
}

fn perspective(img: &Mat) -> opencv::Result<Mat> {
    let (w, h) = (img.cols() as f32, img.rows() as f32);
    let src = Vector::<Point2f>::from_slice(&[
        Point2f::new(0.0, 0.0),
        Point2f::new(w, 0.0),
        Point2f::new(w, h),
        Point2f::new(0.0, h),
    ]);
    let dst = Vector::<Point2f>::from_slice(&[
        Point2f::new(w * 0.12, h * 0.05),
        Point2f::new(w * 0.92, 0.0),
        Point2f::new(w, h * 0.9),
        Point2f::new(0.0, h * 0.97),
    ]);
    let m = imgproc::get_perspective_transform(&src, &dst, core::DECOMP_LU)?;
    let mut out = Mat::default();
    imgproc::warp_perspective(
        img,
        &mut out,
        &m,
        Size::new(w as i32, h as i32),
        imgproc::INTER_LINEAR,
        core::BORDER_CONSTANT,
        Scalar::all(0.0),
    )?;
    Ok(out)
}

fn noise_frame(img: &Mat, seed: u64) -> opencv::Result<Mat> {
    let inner = scale(img, 0.7)?;
    let (w, h) = (img.cols(), img.rows());
    let mut canvas = Mat::new_rows_cols_with_default(h, w, img.typ(), Scalar::all(0.0))?;
    let mut rng = core::RNG::new(seed)?;
    rng.fill(
        &mut canvas,
        core::RNG_UNIFORM,
        &Scalar::all(0.0),
        &Scalar::all(255.0),
        false,
    )?;
    let (x, y) = ((w - inner.cols()) / 3, (h - inner.rows()) / 2);
    let mut roi = Mat::roi_mut(&mut canvas, Rect::new(x, y, inner.cols(), inner.rows()))?;
    inner.copy_to(&mut roi)?;
    Ok(canvas)
}

fn mirror(img: &Mat) -> opencv::Result<Mat> {
    let mut out = Mat::default();
    core::flip(img, &mut out, 1)?;
    Ok(out)
}

fn gray(img: &Mat) -> opencv::Result<Mat> {
    if img.channels() == 1 {
        return img.try_clone();
    }
    let mut out = Mat::default();
    imgproc::cvt_color_def(img, &mut out, imgproc::COLOR_BGR2GRAY)?;
    Ok(out)
}

/// Applies one named attack and returns the encoded JPEG.
pub fn apply(img: &Mat, attack: &str, seed: u64) -> opencv::Result<Option<Vec<u8>>> {
    let q = 90;
    let out = match attack {
        "crop40" => encode(&crop(img, 0.6, 0.8, 0.3)?, q)?,
        "rotate25" => encode(&rotate(img, 25.0)?, q)?,
        "rotate90" => encode(&rotate(img, 90.0)?, q)?,
        "scale030" => encode(&scale(img, 0.3)?, q)?,
        "jpeg15" => encode(img, 15)?,
        "perspective" => encode(&perspective(img)?, q)?,
        "noiseframe" => encode(&noise_frame(img, seed)?, q)?,
        "grayblur" => encode(&blur(&gray(img)?, 1.5)?, q)?,
        "crop_rotate_jpeg" => encode(&rotate(&crop(img, 0.7, 0.2, 0.7)?, -12.0)?, 30)?,
        "scale_blur_jpeg" => encode(&blur(&scale(img, 0.5)?, 1.0)?, 40)?,
        "mirror_crop" => encode(&mirror(&crop(img, 0.8, 0.5, 0.5)?)?, 70)?,
        _ => return Ok(None),
    };
    Ok(Some(out))
}

/// Writes every attack of every image in `catalogue` (top level) to `out`; returns the
/// written query paths.
pub fn write_attack_set(
    catalogue: &Path,
    out: &Path,
    attacks: &[&str],
) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out)?;
    let mut names: Vec<PathBuf> = std::fs::read_dir(catalogue)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    let mut written = Vec::new();
    for (i, path) in names.iter().enumerate() {
        let Some(p) = path.to_str() else { continue };
        let img = match imgcodecs::imread(p, imgcodecs::IMREAD_COLOR) {
            Ok(m) if !m.empty() => m,
            _ => continue,
        };
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
        for a in attacks {
            if let Ok(Some(bytes)) = apply(&img, a, i as u64 + 1) {
                let q = out.join(format!("{stem}__{a}.jpg"));
                std::fs::write(&q, bytes)?;
                written.push(q);
            }
        }
    }
    Ok(written)
}

/// The catalogue stem a query file name expects (`x__crop40.jpg` → `x`), or `None` for a
/// distractor (`distractor__…`).
pub fn expected_stem(query: &Path) -> Option<String> {
    let name = query.file_name()?.to_str()?;
    let (stem, _) = name.split_once("__")?;
    (stem != "distractor").then(|| stem.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_attack_produces_a_decodable_image() {
        let img = Mat::new_rows_cols_with_default(
            120,
            160,
            core::CV_8UC3,
            Scalar::new(10.0, 200.0, 90.0, 0.0),
        )
        .unwrap();
        for a in ATTACKS {
            let bytes = apply(&img, a, 1).unwrap().unwrap();
            let m = imgcodecs::imdecode(&Vector::<u8>::from_slice(&bytes), imgcodecs::IMREAD_COLOR)
                .unwrap();
            assert!(!m.empty(), "{a}");
        }
        assert!(apply(&img, "nope", 1).unwrap().is_none());
    }

    #[test]
    fn expected_stem_reads_the_name() {
        assert_eq!(
            expected_stem(Path::new("/q/cat_photo__crop40.jpg")).as_deref(),
            Some("cat_photo")
        );
        assert_eq!(expected_stem(Path::new("/q/distractor__blank.jpg")), None);
        assert_eq!(expected_stem(Path::new("/q/plain.jpg")), None);
    }
}
