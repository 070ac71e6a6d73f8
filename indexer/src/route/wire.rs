//! What a router and a shard send each other (`POST /v1/shard/search`): the query's features
//! (keypoints and descriptors as base64 of their little-endian bytes, the global descriptor
//! as numbers), and the shard's candidates with their rank keys and its nearest layouts.

use crate::features::{Descriptor, Features, DESCRIPTOR_BYTES};
use crate::global::{GlobalDescriptor, DIMS};
use crate::search::{Match, NearLayout};
use crate::shard::Shard;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};

/// Why a shard query could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// A field is not valid base64.
    #[error("{0} is not valid base64")]
    Base64(&'static str),
    /// A field's length does not fit its element size or the other fields.
    #[error("{0}")]
    Shape(String),
}

/// A query's features as sent to a shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireFeatures {
    /// Keypoints: x, y as little-endian u16 quarter pixels, base64.
    pub keypoints: String,
    /// Descriptors: 32 bytes each, same order as the keypoints, base64.
    pub descriptors: String,
    /// The global descriptor, absent for a flat image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global: Option<Vec<f32>>,
}

impl WireFeatures {
    /// Encodes the parts of `f` a shard searches with.
    pub fn encode(f: &Features) -> WireFeatures {
        let mut kp = Vec::with_capacity(f.keypoints.len() * 4);
        for [x, y] in &f.keypoints {
            kp.extend_from_slice(&x.to_le_bytes());
            kp.extend_from_slice(&y.to_le_bytes());
        }
        WireFeatures {
            keypoints: STANDARD.encode(&kp),
            descriptors: STANDARD.encode(f.descriptors.as_flattened()),
            global: f.global.map(|g| g.to_vec()),
        }
    }

    /// Decodes into [`Features`] (the image's sizes and format are not sent: a shard does not
    /// need them).
    pub fn decode(&self) -> Result<Features, WireError> {
        let kp = STANDARD
            .decode(&self.keypoints)
            .map_err(|_| WireError::Base64("keypoints"))?;
        let desc = STANDARD
            .decode(&self.descriptors)
            .map_err(|_| WireError::Base64("descriptors"))?;
        if kp.len() % 4 != 0 || desc.len() % DESCRIPTOR_BYTES != 0 {
            return Err(WireError::Shape(format!(
                "keypoints ({} bytes) must be 4 bytes each and descriptors ({} bytes) {DESCRIPTOR_BYTES}",
                kp.len(),
                desc.len()
            )));
        }
        if kp.len() / 4 != desc.len() / DESCRIPTOR_BYTES {
            return Err(WireError::Shape(format!(
                "{} keypoints but {} descriptors",
                kp.len() / 4,
                desc.len() / DESCRIPTOR_BYTES
            )));
        }
        let global = match &self.global {
            None => None,
            Some(g) => Some(GlobalDescriptor::try_from(g.as_slice()).map_err(|_| {
                WireError::Shape(format!(
                    "the global descriptor has {} numbers, not {DIMS}",
                    g.len()
                ))
            })?),
        };
        let keypoints = kp
            .chunks_exact(4)
            .map(|c| {
                [
                    u16::from_le_bytes([c[0], c[1]]),
                    u16::from_le_bytes([c[2], c[3]]),
                ]
            })
            .collect();
        let descriptors = desc
            .chunks_exact(DESCRIPTOR_BYTES)
            .map(|c| {
                let mut d: Descriptor = [0; DESCRIPTOR_BYTES];
                d.copy_from_slice(c);
                d
            })
            .collect();
        Ok(Features {
            width: 0,
            height: 0,
            work_width: 0,
            work_height: 0,
            adaptation: Default::default(),
            keypoints,
            descriptors,
            global,
            format: crate::imageguard::Format::Jpeg,
        })
    }
}

/// The body of `POST /v1/shard/search`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardQuery {
    /// Answer from this generation (the router's pinned one); absent: the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Matches the router will return.
    pub k: usize,
    /// Verify candidates.
    pub verify: bool,
    /// Also return the shard's nearest layouts (for the router's layout fallback).
    pub global: bool,
    /// The query's features.
    pub features: WireFeatures,
}

/// A shard's answer to [`ShardQuery`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardAnswer {
    /// The generation that answered.
    pub generation: u64,
    /// The shard it holds, as recorded at build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<Shard>,
    /// Candidates with their rank keys, unordered (the router orders the union).
    pub candidates: Vec<Match>,
    /// The shard's two nearest layouts (when asked for).
    #[serde(default)]
    pub layouts: Vec<NearLayout>,
    /// Lookup time in the shard (ms).
    pub lookup_ms: f64,
    /// Verification time in the shard (ms).
    pub verify_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(n: usize) -> Features {
        let mut f = WireFeatures {
            keypoints: String::new(),
            descriptors: String::new(),
            global: None,
        }
        .decode()
        .unwrap();
        f.keypoints = (0..n as u16).map(|i| [i, 65535 - i]).collect();
        f.descriptors = (0..n).map(|i| [i as u8; DESCRIPTOR_BYTES]).collect();
        f.global = Some([0.25; DIMS]);
        f
    }

    #[test]
    fn features_survive_the_wire() {
        let f = features(300);
        let back = WireFeatures::encode(&f).decode().unwrap();
        assert_eq!(back.keypoints, f.keypoints);
        assert_eq!(back.descriptors, f.descriptors);
        assert_eq!(back.global, f.global);
        let json = serde_json::to_string(&WireFeatures::encode(&f)).unwrap();
        // base64 of 36 bytes per feature, not a JSON array of numbers.
        assert!(json.len() < 300 * 50 + 2 * DIMS * 8, "{} bytes", json.len());
    }

    #[test]
    fn malformed_features_are_refused_with_a_reason() {
        let good = WireFeatures::encode(&features(3));
        let mut w = good.clone();
        w.descriptors = "!!".into();
        assert_eq!(w.decode().unwrap_err(), WireError::Base64("descriptors"));
        let mut w = good.clone();
        w.keypoints = STANDARD.encode([1u8, 2, 3, 4]);
        assert!(w
            .decode()
            .unwrap_err()
            .to_string()
            .contains("1 keypoints but 3"));
        let mut w = good.clone();
        w.global = Some(vec![0.0; 3]);
        assert!(w.decode().unwrap_err().to_string().contains("3 numbers"));
        let mut w = good;
        w.keypoints = STANDARD.encode([1u8, 2, 3]);
        assert!(matches!(w.decode(), Err(WireError::Shape(_))));
    }
}
