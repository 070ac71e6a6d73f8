//! Memory cgroups, v1 and v2, as every imageindex runtime uses them: the indexer (its own
//! limit and working set; `indexer exec-limited`), local mode (each build attempt's group) and
//! the tests' real node (the peak, limit and OOM kills of the kubelet's pod and container
//! groups).
//!
//! - [`Hierarchy`]: where the memory controller is mounted under a root (normally
//!   [`DEFAULT_ROOT`]; local mode's `--cgroup-root` overrides it), creating groups with
//!   [`Limits`], listing and removing them;
//! - [`Group`]: one group: add a process, its limit, peak, OOM-kill count and working set
//!   (usage − inactive file cache), removal with retry;
//! - [`ProcessGroup`]: the group this process is in (from `/proc/self/cgroup`) and the
//!   tightest limit above it;
//! - [`parse`]: the kernel's file formats, pure functions.
#![warn(missing_docs)]

mod group;
mod hierarchy;
pub mod parse;
mod process;

pub use group::Group;
pub use hierarchy::{Hierarchy, Limits};
pub use process::ProcessGroup;

use std::path::PathBuf;

/// Where the cgroup hierarchies are mounted.
pub const DEFAULT_ROOT: &str = "/sys/fs/cgroup";

/// The parent group (under the hierarchy's root) of every group imageindex makes.
pub const PARENT: &str = "imageindex";

/// Which cgroup hierarchy holds the memory controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// cgroup v1: the `memory` controller's own hierarchy (`memory.limit_in_bytes`).
    V1,
    /// cgroup v2: the unified hierarchy (`memory.max`).
    V2,
}

impl Version {
    /// The file holding a group's memory limit.
    pub fn limit_file(self) -> &'static str {
        match self {
            Version::V1 => "memory.limit_in_bytes",
            Version::V2 => "memory.max",
        }
    }

    /// The file holding a group's memory usage.
    pub fn usage_file(self) -> &'static str {
        match self {
            Version::V1 => "memory.usage_in_bytes",
            Version::V2 => "memory.current",
        }
    }

    /// The file holding a group's peak memory usage.
    pub fn peak_file(self) -> &'static str {
        match self {
            Version::V1 => "memory.max_usage_in_bytes",
            Version::V2 => "memory.peak",
        }
    }

    /// The file with the group's `oom_kill` counter.
    pub fn oom_file(self) -> &'static str {
        match self {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        }
    }

    /// The `memory.stat` key of the inactive file cache (v1 counts the group's subtree).
    pub fn inactive_file_key(self) -> &'static str {
        match self {
            Version::V1 => "total_inactive_file",
            Version::V2 => "inactive_file",
        }
    }
}

/// Why a cgroup could not be found, made, changed or removed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No (writable) memory controller under the root.
    #[error("no writable cgroup memory controller at {root} ({reason}); run as root (or with a delegated cgroup) on a Linux host with cgroup v1 or v2 memory accounting")]
    Unavailable {
        /// The root looked under.
        root: PathBuf,
        /// What was missing or refused.
        reason: String,
    },
    /// A file operation on a group failed.
    #[error("cgroup {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl CgroupError {
    fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CgroupError {
        let path = path.into();
        move |source| CgroupError::Io { path, source }
    }
}
