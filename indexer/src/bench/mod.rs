//! `indexer bench`: measured speed, memory, disk and recall, printed as tables, with the old
//! system's setup (Python OpenCV ORB + Annoy) measured beside ours in the same run.
//!
//! Compiled only with the `bench` feature (on by default; the container image builds
//! without it): none of this serves users, and [`load`] is the only reason the indexer
//! would link an HTTP client.

pub mod attacks;
pub mod baseline;
pub mod child;
pub mod images;
pub mod load;
pub mod shards;
pub mod stats;
pub mod synthetic;
pub mod synthetic_index;
