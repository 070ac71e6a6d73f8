//! One query image: decode, extract, look up and rank — and, when nothing verifies, the same
//! once more mirrored left to right.

use super::{Index, Match, SearchParams};
use crate::error::IndexError;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Time spent per step of one query (milliseconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Timings {
    /// Decoding the upload.
    pub decode_ms: f64,
    /// ORB.
    pub extract_ms: f64,
    /// Descriptor lookups and voting.
    pub lookup_ms: f64,
    /// RANSAC.
    pub verify_ms: f64,
}

/// The answer to one query image.
#[derive(Clone, Debug, Serialize)]
pub struct Answer {
    /// Matches in rank order.
    pub matches: Vec<Match>,
    /// Query descriptors extracted.
    pub features: usize,
    /// What the detector adapted for the query.
    pub adaptation: crate::features::Adaptation,
    /// Per-step times (of both searches when the mirror was searched too).
    pub timings: Timings,
    /// Whether the matches come from the query mirrored left to right.
    pub mirrored: bool,
}

/// Why a query image could not be searched.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The image was refused or could not be decoded.
    #[error(transparent)]
    Image(#[from] crate::features::ExtractError),
    /// The index could not be read.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The file could not be read.
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
}

/// Searches encoded image bytes.
pub fn search_bytes(
    index: &Index,
    detector: &mut crate::features::Detector,
    bytes: &[u8],
    params: &SearchParams,
) -> Result<Answer, QueryError> {
    let header = crate::imageguard::header(bytes).map_err(crate::features::ExtractError::from)?;
    let (f, work, decode_ms, extract_ms) = detector.extract_keeping_work(bytes, &header)?;
    let (matches, lookup_ms, verify_ms) = index.search_features(&f, params)?;
    let mut answer = Answer {
        matches,
        features: f.descriptors.len(),
        adaptation: f.adaptation,
        timings: Timings {
            decode_ms,
            extract_ms,
            lookup_ms,
            verify_ms,
        },
        mirrored: false,
    };
    let verified = |m: &[Match]| m.first().is_some_and(|m| m.verified);
    if params.mirror && params.verify && !f.descriptors.is_empty() && !verified(&answer.matches) {
        let t = Instant::now();
        let mf = detector.mirrored(&work, &f)?;
        answer.timings.extract_ms += t.elapsed().as_secs_f64() * 1000.0;
        drop(work);
        // The layouts were compared in every orientation already.
        let mirror_params = SearchParams {
            global: false,
            ..*params
        };
        let (matches, lookup_ms, verify_ms) = index.search_features(&mf, &mirror_params)?;
        answer.timings.lookup_ms += lookup_ms;
        answer.timings.verify_ms += verify_ms;
        if verified(&matches) {
            answer.matches = matches;
            answer.features = mf.descriptors.len();
            answer.adaptation = mf.adaptation;
            answer.mirrored = true;
        }
    }
    Ok(answer)
}

/// Searches an image file.
pub fn search_file(
    index: &Index,
    detector: &mut crate::features::Detector,
    path: &Path,
    params: &SearchParams,
) -> Result<Answer, QueryError> {
    let bytes = std::fs::read(path).map_err(|e| QueryError::Read(path.to_path_buf(), e))?;
    search_bytes(index, detector, &bytes, params)
}
