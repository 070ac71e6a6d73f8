//! `indexer bench`: measured speed, memory, disk and recall, printed as tables, with the old
//! system's setup (Python OpenCV ORB + Annoy) measured beside ours in the same run.

pub mod baseline;
pub mod child;
pub mod images;
pub mod stats;
pub mod synthetic;
