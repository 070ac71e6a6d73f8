//! The imageindex operator: a kube-rs controller that turns an `ImageIndex` into a finished,
//! served index without being OOM-killed twice.
//!
//! The decisions — and what the status becomes — are `imageindex_crds`'s (pure); this crate
//! observes and carries them out. `controller` is the reconcile pipeline (fetch → validate →
//! observe → decide → apply → write status); `resources` builds the objects it makes (pure);
//! `pods` reads pod status into observations; `scrape` reads a build's Prometheus metrics;
//! `history` keeps recent memory samples. `local` runs the same decisions on one machine,
//! with processes in cgroups instead of pods.
#![warn(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod controller;
pub mod error;
pub mod history;
pub mod local;
pub mod metrics;
pub mod pods;
pub mod rbac;
pub mod resources;
pub mod scrape;
pub mod server;
pub mod settings;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod same_decisions;
#[cfg(test)]
mod scenarios;
#[cfg(test)]
mod shard_scenarios;

pub use controller::{error_policy, reconcile, Context};
pub use error::Error;
pub use settings::Settings;
