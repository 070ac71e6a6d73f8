//! ORB features of one image: decode under a size guard, bring the image to its working
//! size, and run ORB with an adaptive detector so that low-texture images (plain
//! backgrounds, skies, gradients, dark or foggy photos) still yield features. What had to
//! be adapted is recorded per image, and queries go through the same ladder, so a copy of a
//! low-texture image is processed the same way as its original.

use crate::imageguard::{self, Format, Header, Refusal};
use imageindex_crds::estimate;
use imageindex_crds::preset::Preset;
use opencv::core::{self, Mat, Ptr, Size, Vector};
use opencv::features2d::{ORB_ScoreType, ORB};
use opencv::imgcodecs;
use opencv::imgproc;
use opencv::prelude::*;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Bytes of one ORB descriptor (256 bits).
pub const DESCRIPTOR_BYTES: usize = 32;
/// One ORB descriptor.
pub type Descriptor = [u8; DESCRIPTOR_BYTES];
/// Keypoints (quarter pixels), descriptors and the adaptation of one working image.
pub type WorkFeatures = (Vec<[u16; 2]>, Vec<Descriptor>, Adaptation);
/// Images whose working image is smaller than this (long side) are upscaled to it, so that
/// small thumbnails and scaled-down copies still have room for ORB's 31-pixel patches.
pub const MIN_SIDE: u32 = 480;
/// Largest upscale factor applied to small images.
pub const MAX_UPSCALE: f64 = 4.0;
/// Keypoint coordinates are stored in quarter pixels of the working image.
pub const KEYPOINT_SUBPIXELS: f32 = 4.0;

/// Extraction settings derived from a preset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtractParams {
    /// Features kept per image.
    pub nfeatures: u32,
    /// Longest side of the working image.
    pub max_side: u32,
    /// Features below which the detector is adapted further (the same for catalogue images
    /// and queries, so both take the same ladder step).
    pub enough: u32,
}

impl From<&Preset> for ExtractParams {
    fn from(p: &Preset) -> Self {
        ExtractParams {
            nfeatures: p.nfeatures,
            max_side: p.max_side,
            enough: enough_for(p.nfeatures),
        }
    }
}

/// Query images keep this many times the catalogue's features. One: voting needs only a
/// fraction of a query's features to find their matches, and every extra feature costs
/// extraction and lookup time (measured on 5,000 photos: twice the features, the same
/// recall@1, 1.6× the latency).
pub const QUERY_FEATURE_FACTOR: u32 = 1;

fn enough_for(nfeatures: u32) -> u32 {
    ((nfeatures * 3) / 10).max(16).min(nfeatures)
}

impl ExtractParams {
    /// Settings for query images of an index built with `p`.
    pub fn for_query(p: &Preset) -> Self {
        ExtractParams {
            nfeatures: p.nfeatures * QUERY_FEATURE_FACTOR,
            max_side: p.max_side,
            enough: enough_for(p.nfeatures),
        }
    }

    /// Features below which the detector is adapted further.
    pub fn enough(&self) -> usize {
        self.enough as usize
    }
}

/// ORB is asked for this many times the features kept, and the keepers are chosen spread
/// over a grid: clutter (noise, texture) cannot take every slot from the image's content.
pub const OVERSAMPLE: u32 = 3;
/// Grid cells per side for spreading features.
pub const GRID: usize = 4;

/// Stretches a low-contrast image so its 0.5–99.5 percentile range spans 0–255 (a monotonic
/// map: ORB's pixel comparisons keep their meaning). Returns the gain applied (1 = none).
pub fn stretch_contrast(img: &Mat) -> Result<(Mat, f32), opencv::Error> {
    let bytes = img.data_bytes()?;
    let mut hist = [0u64; 256];
    for &b in bytes {
        hist[b as usize] += 1;
    }
    let total = bytes.len() as u64;
    let cut = total / 200;
    let (mut lo, mut acc) = (0usize, 0u64);
    while lo < 255 && acc + hist[lo] <= cut {
        acc += hist[lo];
        lo += 1;
    }
    let (mut hi, mut acc) = (255usize, 0u64);
    while hi > lo && acc + hist[hi] <= cut {
        acc += hist[hi];
        hi -= 1;
    }
    let range = (hi - lo).max(1);
    if range >= 160 {
        return Ok((img.clone(), 1.0));
    }
    let gain = 255.0 / range as f32;
    let lut: Vec<u8> = (0..256)
        .map(|v| (((v as f32 - lo as f32) * gain).round().clamp(0.0, 255.0)) as u8)
        .collect();
    let lut = Mat::from_slice(&lut)?;
    let mut out = Mat::default();
    core::lut(img, &lut, &mut out)?;
    Ok((out, gain))
}

/// Contrast normalisation applied before detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Contrast {
    /// The image as decoded.
    #[default]
    None,
    /// Contrast-limited adaptive histogram equalisation (8×8 tiles).
    Clahe,
}

/// What the detector had to do for one image.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Adaptation {
    /// Ladder step used (0 = ORB defaults).
    pub step: u8,
    /// FAST threshold of that step.
    pub fast_threshold: u8,
    /// Contrast normalisation of that step.
    pub contrast: Contrast,
    /// Factor the image was resized by before ORB (<1 shrunk, >1 upscaled small images).
    pub resize: f32,
    /// Contrast gain of the percentile stretch (1 = the image already spanned the range).
    #[serde(default = "one")]
    pub stretch: f32,
    /// JPEG reduced-decode factor (1, 2, 4 or 8).
    pub decode_scale: u8,
}

impl Adaptation {
    /// Whether anything beyond resizing was needed.
    pub fn adapted(&self) -> bool {
        self.step > 0
    }
}

fn one() -> f32 {
    1.0
}

/// The ladder: (FAST threshold, contrast) tried in order until enough features are found.
pub const LADDER: [(u8, Contrast); 5] = [
    (20, Contrast::None),
    (10, Contrast::None),
    (10, Contrast::Clahe),
    (5, Contrast::Clahe),
    (2, Contrast::Clahe),
];

/// Features of one image, strongest first.
#[derive(Clone, Debug, PartialEq)]
pub struct Features {
    /// Original width.
    pub width: u32,
    /// Original height.
    pub height: u32,
    /// Working-image width (the keypoints' frame).
    pub work_width: u32,
    /// Working-image height.
    pub work_height: u32,
    /// What the detector had to do.
    pub adaptation: Adaptation,
    /// Keypoint positions in quarter pixels of the working image.
    pub keypoints: Vec<[u16; 2]>,
    /// Descriptors, same order as `keypoints`, strongest response first.
    pub descriptors: Vec<Descriptor>,
    /// The image's global descriptor (`None` for a flat image).
    pub global: Option<crate::global::GlobalDescriptor>,
    /// Container format.
    pub format: Format,
}

/// Why an image yielded no features record.
#[derive(Debug, Error)]
pub enum ExtractError {
    /// Refused before decoding.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The decoder could not read the data.
    #[error("corrupt {0:?} data (decoder failed)")]
    Corrupt(Format),
    /// OpenCV failed.
    #[error("OpenCV: {0}")]
    OpenCv(#[from] opencv::Error),
}

fn reduced_flag(scale: u32) -> i32 {
    match scale {
        2 => imgcodecs::IMREAD_REDUCED_GRAYSCALE_2,
        4 => imgcodecs::IMREAD_REDUCED_GRAYSCALE_4,
        8 => imgcodecs::IMREAD_REDUCED_GRAYSCALE_8,
        _ => imgcodecs::IMREAD_GRAYSCALE,
    }
}

/// Decodes to grayscale, at reduced size for large JPEGs. `header` must come from
/// [`imageguard::check`] (or [`imageguard::header`] for lenient decoding).
pub fn decode_gray(
    bytes: &[u8],
    header: &Header,
    max_side: u32,
) -> Result<(Mat, u32), ExtractError> {
    let scale = estimate::decode_scale(
        header.width,
        header.height,
        max_side,
        header.format == Format::Jpeg,
    );
    let buf = Vector::<u8>::from_slice(bytes);
    let mat = imgcodecs::imdecode(&buf, reduced_flag(scale))
        .map_err(|_| ExtractError::Corrupt(header.format))?;
    if mat.empty() || mat.rows() <= 0 || mat.cols() <= 0 {
        return Err(ExtractError::Corrupt(header.format));
    }
    Ok((mat, scale))
}

/// Resizes a decoded image to its working size; returns the factor applied.
pub fn to_work_size(gray: &Mat, max_side: u32) -> Result<(Mat, f64), opencv::Error> {
    let (w, h) = (gray.cols() as f64, gray.rows() as f64);
    let long = w.max(h);
    let factor = if max_side > 0 && long > max_side as f64 {
        max_side as f64 / long
    } else if long < MIN_SIDE as f64 {
        (MIN_SIDE as f64 / long).min(MAX_UPSCALE)
    } else {
        1.0
    };
    if (factor - 1.0).abs() < 1e-9 {
        return Ok((gray.clone(), 1.0));
    }
    let size = Size::new(
        ((w * factor).round() as i32).max(1),
        ((h * factor).round() as i32).max(1),
    );
    let mut out = Mat::default();
    let interp = if factor < 1.0 {
        imgproc::INTER_AREA
    } else {
        imgproc::INTER_LINEAR
    };
    imgproc::resize(gray, &mut out, size, 0.0, 0.0, interp)?;
    Ok((out, factor))
}

/// A reusable ORB detector (one per thread; not `Sync`).
pub struct Detector {
    orb: Ptr<ORB>,
    params: ExtractParams,
    union_variants: bool,
}

impl Detector {
    /// Makes a detector for these parameters.
    pub fn new(params: ExtractParams) -> Result<Self, opencv::Error> {
        let orb = ORB::create(
            (params.nfeatures * OVERSAMPLE) as i32,
            1.2,
            8,
            31,
            0,
            2,
            ORB_ScoreType::HARRIS_SCORE,
            31,
            20,
        )?;
        Ok(Detector {
            orb,
            params,
            union_variants: false,
        })
    }

    /// A detector for query images: keeps the features of every image variant the ladder
    /// visited (see [`Detector::features_of_work_image`]).
    pub fn for_queries(params: ExtractParams) -> Result<Self, opencv::Error> {
        let mut d = Self::new(params)?;
        d.union_variants = true;
        Ok(d)
    }

    /// The parameters.
    pub fn params(&self) -> ExtractParams {
        self.params
    }

    fn detect(
        &mut self,
        img: &Mat,
        fast: u8,
    ) -> Result<(Vector<core::KeyPoint>, Mat), opencv::Error> {
        self.orb.set_fast_threshold(fast as i32)?;
        let mut kps = Vector::<core::KeyPoint>::new();
        let mut desc = Mat::default();
        self.orb
            .detect_and_compute(img, &core::no_array(), &mut kps, &mut desc, false)?;
        Ok((kps, desc))
    }

    /// Runs the adaptive ladder on a working image.
    pub fn features_of_work_image(&mut self, work: &Mat) -> Result<WorkFeatures, opencv::Error> {
        let enough = self.params.enough();
        let (stretched, gain) = stretch_contrast(work)?;
        let (w, h) = (work.cols().max(1) as f32, work.rows().max(1) as f32);
        let keep = self.params.nfeatures as usize;
        // The last result of each image variant (plain, CLAHE) the ladder visited.
        let mut visited: [Option<(Vector<core::KeyPoint>, Mat, usize)>; 2] = [None, None];
        let mut clahe_img: Option<Mat> = None;
        let mut chosen = 0;
        for (step, (fast, contrast)) in LADDER.iter().enumerate() {
            let img = match contrast {
                Contrast::None => &stretched,
                Contrast::Clahe => {
                    if clahe_img.is_none() {
                        let mut c = imgproc::create_clahe(3.0, Size::new(8, 8))?;
                        let mut out = Mat::default();
                        c.apply(&stretched, &mut out)?;
                        clahe_img = Some(out);
                    }
                    clahe_img.as_ref().unwrap_or(&stretched)
                }
            };
            let (kps, desc) = self.detect(img, *fast)?;
            let n = kps.len();
            let slot = usize::from(*contrast == Contrast::Clahe);
            let best_n = visited
                .iter()
                .flatten()
                .map(|(k, _, _)| k.len())
                .max()
                .unwrap_or(0);
            if n > best_n || visited.iter().all(Option::is_none) {
                chosen = step;
            }
            let blind = blind_cells(&kps, w, h);
            visited[slot] = Some((kps, desc, step));
            // A query whose plain detector leaves parts of the image blind also takes the CLAHE
            // variant: a low-contrast original framed by texture (or noise) took CLAHE in the
            // catalogue but not here. A query textured all over does not pay for it.
            if n >= enough
                && (!self.union_variants || visited[1].is_some() || blind < BLIND_CELLS_FOR_CLAHE)
            {
                break;
            }
            if n >= enough && step < 2 {
                let (fast, _) = LADDER[2];
                let img = {
                    let mut c = imgproc::create_clahe(3.0, Size::new(8, 8))?;
                    let mut out = Mat::default();
                    c.apply(&stretched, &mut out)?;
                    out
                };
                let (kps, desc) = self.detect(&img, fast)?;
                visited[1] = Some((kps, desc, 2));
                break;
            }
        }
        let (fast, contrast) = LADDER[chosen];
        let adaptation = Adaptation {
            step: chosen as u8,
            fast_threshold: fast,
            contrast,
            resize: 1.0,
            stretch: gain,
            decode_scale: 1,
        };
        let mut keypoints = Vec::new();
        let mut descriptors = Vec::new();
        for (kps, desc, step) in visited.iter().flatten() {
            // Catalogue images keep the features of their chosen step only; queries keep every
            // variant the ladder visited, so they cover whichever step their original took.
            if self.union_variants || *step == chosen {
                let (k, d) = spread_by_response(kps, desc, keep, w, h)?;
                keypoints.extend(k);
                descriptors.extend(d);
            }
        }
        Ok((keypoints, descriptors, adaptation))
    }

    /// Full extraction from encoded bytes: check, decode, resize, adaptive ORB.
    pub fn extract(&mut self, bytes: &[u8]) -> Result<Features, ExtractError> {
        let header = imageguard::check(bytes)?;
        self.extract_checked(bytes, &header)
    }

    /// Extraction after the caller checked the header (queries may accept truncated data).
    pub fn extract_checked(
        &mut self,
        bytes: &[u8],
        header: &Header,
    ) -> Result<Features, ExtractError> {
        self.extract_timed(bytes, header).map(|(f, _, _)| f)
    }

    /// Like [`Detector::extract_checked`], also returning the decode and the extraction
    /// times in milliseconds.
    pub fn extract_timed(
        &mut self,
        bytes: &[u8],
        header: &Header,
    ) -> Result<(Features, f64, f64), ExtractError> {
        self.extract_keeping_work(bytes, header)
            .map(|(f, _, decode_ms, extract_ms)| (f, decode_ms, extract_ms))
    }

    /// Like [`Detector::extract_timed`], also returning the working image (for
    /// [`Detector::mirrored`]).
    pub fn extract_keeping_work(
        &mut self,
        bytes: &[u8],
        header: &Header,
    ) -> Result<(Features, Mat, f64, f64), ExtractError> {
        let t = std::time::Instant::now();
        let (gray, scale) = decode_gray(bytes, header, self.params.max_side)?;
        let decode_ms = t.elapsed().as_secs_f64() * 1000.0;
        let t = std::time::Instant::now();
        let (work, factor) = to_work_size(&gray, self.params.max_side)?;
        drop(gray);
        let global = crate::global::describe(&work)?;
        let (keypoints, descriptors, mut adaptation) = self.features_of_work_image(&work)?;
        adaptation.resize = factor as f32;
        adaptation.decode_scale = scale as u8;
        let f = Features {
            width: header.width,
            height: header.height,
            work_width: work.cols() as u32,
            work_height: work.rows() as u32,
            adaptation,
            keypoints,
            descriptors,
            global,
            format: header.format,
        };
        Ok((f, work, decode_ms, t.elapsed().as_secs_f64() * 1000.0))
    }

    /// Features of the working image mirrored left to right (ORB is not mirror-invariant: a
    /// flipped copy shares almost no descriptors with its original). `of` is the unmirrored
    /// extraction of the same image.
    pub fn mirrored(&mut self, work: &Mat, of: &Features) -> Result<Features, ExtractError> {
        let mut flipped = Mat::default();
        core::flip(work, &mut flipped, 1)?;
        let (keypoints, descriptors, mut adaptation) = self.features_of_work_image(&flipped)?;
        adaptation.resize = of.adaptation.resize;
        adaptation.decode_scale = of.adaptation.decode_scale;
        Ok(Features {
            adaptation,
            keypoints,
            descriptors,
            global: of
                .global
                .map(|g| crate::global::oriented(&g, false, true, false)),
            ..of.clone()
        })
    }
}

/// Grid cells (of [`GRID`]²) with almost no keypoints above which a query also takes the
/// CLAHE variant.
pub const BLIND_CELLS_FOR_CLAHE: usize = 3;

/// Grid cells holding less than a tenth of an even share of the keypoints: regions the
/// detector does not see (flat, or too low in contrast at this threshold).
fn blind_cells(kps: &Vector<core::KeyPoint>, w: f32, h: f32) -> usize {
    let mut per_cell = [0usize; GRID * GRID];
    for kp in kps.iter() {
        let pt = kp.pt();
        let cx = ((pt.x / w * GRID as f32) as usize).min(GRID - 1);
        let cy = ((pt.y / h * GRID as f32) as usize).min(GRID - 1);
        per_cell[cy * GRID + cx] += 1;
    }
    let few = (kps.len() / (GRID * GRID) / 10).max(2);
    per_cell.iter().filter(|&&n| n < few).count()
}

/// Keeps `keep` keypoints: first the strongest of each grid cell up to an equal share, then
/// the strongest of the rest; returned strongest first (ties by ORB's order: deterministic).
fn spread_by_response(
    kps: &Vector<core::KeyPoint>,
    desc: &Mat,
    keep: usize,
    w: f32,
    h: f32,
) -> Result<(Vec<[u16; 2]>, Vec<Descriptor>), opencv::Error> {
    let n = kps.len().min(desc.rows().max(0) as usize);
    let mut order: Vec<(f32, usize, usize)> = Vec::with_capacity(n);
    for i in 0..n {
        let kp = kps.get(i)?;
        let pt = kp.pt();
        let cx = ((pt.x / w * GRID as f32) as usize).min(GRID - 1);
        let cy = ((pt.y / h * GRID as f32) as usize).min(GRID - 1);
        order.push((kp.response(), i, cy * GRID + cx));
    }
    order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let share = keep.div_ceil(GRID * GRID);
    let mut per_cell = [0usize; GRID * GRID];
    let mut chosen = vec![false; order.len()];
    let mut picked = Vec::with_capacity(keep.min(n));
    for (j, &(_, i, cell)) in order.iter().enumerate() {
        if picked.len() >= keep {
            break;
        }
        if per_cell[cell] < share {
            per_cell[cell] += 1;
            chosen[j] = true;
            picked.push((j, i));
        }
    }
    for (j, &(_, i, _)) in order.iter().enumerate() {
        if picked.len() >= keep {
            break;
        }
        if !chosen[j] {
            picked.push((j, i));
        }
    }
    picked.sort_unstable();
    let mut keypoints = Vec::with_capacity(picked.len());
    let mut descriptors = Vec::with_capacity(picked.len());
    for (_, i) in picked {
        let kp = kps.get(i)?;
        let pt = kp.pt();
        let q = |v: f32| (v * KEYPOINT_SUBPIXELS).round().clamp(0.0, u16::MAX as f32) as u16;
        keypoints.push([q(pt.x), q(pt.y)]);
        let row = desc.at_row::<u8>(i as i32)?;
        let mut d = [0u8; DESCRIPTOR_BYTES];
        d.copy_from_slice(&row[..DESCRIPTOR_BYTES]);
        descriptors.push(d);
    }
    Ok((keypoints, descriptors))
}

/// Silences OpenCV's own logging (libjpeg warnings about corrupt data are reported by us).
pub fn quiet_opencv() {
    let _ = core::set_log_level(core::LogLevel::LOG_LEVEL_SILENT);
    // Extraction threads are ours; OpenCV's internal pool would oversubscribe the cores.
    let _ = core::set_num_threads(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(img: &Mat, ext: &str) -> Vec<u8> {
        let mut buf = Vector::<u8>::new();
        imgcodecs::imencode(ext, img, &mut buf, &Vector::new()).unwrap();
        buf.to_vec()
    }

    fn noise_image(w: i32, h: i32, seed: u64) -> Mat {
        let mut m =
            Mat::new_rows_cols_with_default(h, w, core::CV_8UC1, core::Scalar::all(0.0)).unwrap();
        let mut rng = core::RNG::new(seed).unwrap();
        rng.fill(
            &mut m,
            core::RNG_UNIFORM,
            &core::Scalar::all(0.0),
            &core::Scalar::all(255.0),
            false,
        )
        .unwrap();
        let mut blurred = Mat::default();
        imgproc::gaussian_blur_def(&m, &mut blurred, Size::new(5, 5), 1.5).unwrap();
        blurred
    }

    fn gradient(w: i32, h: i32) -> Mat {
        let mut m =
            Mat::new_rows_cols_with_default(h, w, core::CV_8UC1, core::Scalar::all(0.0)).unwrap();
        for y in 0..h {
            for x in 0..w {
                *m.at_2d_mut::<u8>(y, x).unwrap() = (100 + (x * 40 / w) + (y * 10 / h)) as u8;
            }
        }
        // a faint, low-contrast shape: the only structure in the image
        imgproc::circle(
            &mut m,
            core::Point::new(w / 3, h / 2),
            h / 6,
            core::Scalar::all(118.0),
            -1,
            imgproc::LINE_8,
            0,
        )
        .unwrap();
        imgproc::rectangle(
            &mut m,
            core::Rect::new(w / 2, h / 4, w / 5, h / 3),
            core::Scalar::all(104.0),
            -1,
            imgproc::LINE_8,
            0,
        )
        .unwrap();
        m
    }

    #[test]
    fn textured_image_reaches_nfeatures_without_adaptation() {
        let bytes = encode(&noise_image(800, 600, 1), ".png");
        let mut d = Detector::new(ExtractParams {
            nfeatures: 500,
            max_side: 1024,
            enough: 500 * 3 / 10,
        })
        .unwrap();
        let f = d.extract(&bytes).unwrap();
        assert!(f.descriptors.len() >= 450, "{}", f.descriptors.len());
        assert_eq!(f.adaptation.step, 0);
        assert_eq!(f.keypoints.len(), f.descriptors.len());
        assert_eq!((f.work_width, f.work_height), (800, 600));
    }

    #[test]
    fn low_texture_image_gets_an_adapted_detector() {
        let bytes = encode(&gradient(640, 480), ".png");
        let mut d = Detector::new(ExtractParams {
            nfeatures: 1000,
            max_side: 1024,
            enough: 1000 * 3 / 10,
        })
        .unwrap();
        let f = d.extract(&bytes).unwrap();
        assert!(f.adaptation.step > 0, "{:?}", f.adaptation);
        assert!(!f.descriptors.is_empty());
    }

    #[test]
    fn large_images_are_worked_at_max_side_and_small_ones_upscaled() {
        let mut d = Detector::new(ExtractParams {
            nfeatures: 300,
            max_side: 1000,
            enough: 300 * 3 / 10,
        })
        .unwrap();
        let big = d
            .extract(&encode(&noise_image(2000, 1000, 2), ".jpg"))
            .unwrap();
        assert_eq!(big.work_width, 1000);
        assert_eq!(big.adaptation.decode_scale, 2);
        let small = d
            .extract(&encode(&noise_image(200, 100, 3), ".png"))
            .unwrap();
        assert_eq!(small.work_width, MIN_SIDE);
        assert!(small.adaptation.resize > 2.0);
    }

    #[test]
    fn extraction_is_deterministic() {
        let bytes = encode(&noise_image(640, 480, 4), ".jpg");
        let mut d = Detector::new(ExtractParams {
            nfeatures: 400,
            max_side: 1024,
            enough: 400 * 3 / 10,
        })
        .unwrap();
        assert_eq!(d.extract(&bytes).unwrap(), d.extract(&bytes).unwrap());
    }

    #[test]
    fn corrupt_data_is_an_error_not_a_panic() {
        let mut bytes = encode(&noise_image(64, 64, 5), ".png");
        for b in bytes.iter_mut().skip(60).take(200) {
            *b ^= 0x5A;
        }
        let mut d = Detector::new(ExtractParams {
            nfeatures: 100,
            max_side: 1024,
            enough: 100 * 3 / 10,
        })
        .unwrap();
        assert!(d.extract(&bytes).is_err());
    }
}
