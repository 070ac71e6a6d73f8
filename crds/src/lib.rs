//! The ImageIndex API and the operator's decisions, as pure code.
//!
//! This crate holds everything the Kubernetes controller, local mode and the indexer must
//! agree on: the `ImageIndex` custom resource types, the preset ladder, the memory and disk
//! estimate, the JSON contract of `indexer scan --json`, and the policy (which preset, when
//! memory pressure is real, what to do after an OOM kill). Nothing here does I/O: no kube
//! client, no tokio, no clock — callers pass the current time in.
#![warn(missing_docs)]

pub mod conditions;
pub mod duration;
pub mod estimate;
pub mod labels;
pub mod metrics;
pub mod policy;
pub mod preset;
pub mod quantity;
pub mod scan;
pub mod types;
pub mod validate;

pub use estimate::{BuildPlan, DatasetShape, Estimate};
pub use preset::{Preset, PresetName, PresetSelector};
pub use scan::ScanReport;
pub use types::{ImageIndex, ImageIndexSpec, ImageIndexStatus};
