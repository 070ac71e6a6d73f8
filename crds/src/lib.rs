//! The ImageIndex API and the operator's decisions, as pure code.
//!
//! This crate holds everything the Kubernetes controller, local mode and the indexer must
//! agree on: the `ImageIndex` custom resource types, the preset ladder, the memory and disk
//! estimate, the JSON contract of `indexer scan --json`, and every decision of the policy (see
//! [`policy`] for where each is made) with [`transitions`], which writes them into status.
//! Nothing here does I/O: no kube client, no tokio, no clock — callers pass the current time
//! and what they observed in.
#![warn(missing_docs)]

pub mod aggregate;
pub mod attempts;
pub mod conditions;
pub mod duration;
pub mod estimate;
pub mod first_preset;
pub mod labels;
pub mod ladder;
pub mod metrics;
pub mod observation;
pub mod outcome;
pub mod policy;
pub mod preset;
pub mod pressure;
pub mod quantity;
pub mod rebuild;
pub mod scan;
pub mod shards;
pub mod transitions;
pub mod types;
pub mod validate;

#[cfg(test)]
mod fixtures;

pub use estimate::{BuildPlan, DatasetShape, Estimate};
pub use preset::{Preset, PresetName, PresetSelector};
pub use scan::ScanReport;
pub use types::{ImageIndex, ImageIndexSpec, ImageIndexStatus, ShardStatus, UnitStatus};
