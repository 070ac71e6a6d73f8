//! The imageindex data path: scan a dataset, extract ORB features under a memory budget,
//! build an on-disk index (LMDB via heed: image table, a two-level vocabulary, inverted
//! lists with keypoints, an arroy index of global descriptors), publish it atomically, and
//! search it.
#![warn(missing_docs)]

#[cfg(feature = "bench")]
pub mod bench;
pub mod build;
pub mod dataset;
pub mod error;
pub mod features;
pub mod global;
pub mod hamming;
pub mod imageguard;
pub mod layout;
pub mod lists;
pub mod memory;
pub mod metrics;
pub mod postings;
pub mod progress;
pub mod rank;
pub mod route;
pub mod search;
pub mod serve;
pub mod shard;
pub mod store;
pub mod verify;
pub mod vocab;

pub use error::IndexError;
