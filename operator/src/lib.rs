//! The imageindex operator: a kube-rs controller that turns an `ImageIndex` into a finished,
//! served index without being OOM-killed twice.
//!
//! `controller` is the reconcile pipeline; `resources` builds the objects it makes (pure);
//! `pods` reads pod status; `scrape` reads a build's Prometheus metrics; `attempts` and
//! `history` keep the attempt bookkeeping and recent memory samples; `transitions` writes
//! each step into status; the decisions are `imageindex_crds::policy`'s. `local` runs the
//! same policy and transitions on one machine, with processes in cgroups instead of pods.
#![warn(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod attempts;
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
pub mod transitions;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod scenarios;

pub use controller::{error_policy, reconcile, Context};
pub use error::Error;
pub use settings::Settings;
