//! The imageindex data path: scan a dataset, extract ORB features under a memory budget,
//! build an on-disk index (LMDB via heed: image table, keypoints, inverted lists, arroy
//! shards), publish it atomically, and search it.
#![warn(missing_docs)]

#[cfg(feature = "bench")]
pub mod bench;
pub mod build;
pub mod dataset;
pub mod error;
pub mod features;
pub mod hamming;
pub mod imageguard;
pub mod ivf;
pub mod layout;
pub mod memory;
pub mod metrics;
pub mod progress;
pub mod search;
pub mod serve;
pub mod store;
pub mod verify;

pub use error::IndexError;
