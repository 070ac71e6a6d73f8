//! The cgroups of the containers the agent runs: a real memory limit (its OOM killer decides
//! the `OOMKilled` reason), a CPU quota, and the list of processes to signal — through
//! `imageindex-cgroup`, like the indexer and local mode.
//!
//! cgroup v1 (this machine: separate `memory` and `cpu` hierarchies) and v2 (one unified
//! group) are both handled. Groups live under `<hierarchy>/imageindex/agent-<pid>/`, beside
//! the `imageindex/<name>` groups of `indexer exec-limited`; those of an agent that was killed
//! are removed by the next one.

use std::io;
use std::path::{Path, PathBuf};

pub use imageindex_cgroup::{Group as ContainerGroup, Hierarchy, Limits, PARENT};

/// Where the cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = imageindex_cgroup::DEFAULT_ROOT;

/// This machine's hierarchy, with the CPU controller: what containers are limited in.
pub fn detect() -> io::Result<Hierarchy> {
    Hierarchy::find(Path::new(CGROUP_ROOT))
        .map(Hierarchy::with_cpu)
        .ok_or_else(|| {
            io::Error::other(format!(
                "no cgroup memory controller under {CGROUP_ROOT} (neither v1 memory/ nor v2)"
            ))
        })
}

/// The parent group of an agent's containers: `imageindex/agent-<pid>`.
pub fn agent_parent(pid: u32) -> PathBuf {
    PathBuf::from(PARENT).join(format!("agent-{pid}"))
}

/// Removes the (empty) groups of agents whose process is gone (killed before they could
/// clean up); returns them.
pub fn remove_stale(hierarchy: &Hierarchy) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for name in hierarchy.children(Path::new(PARENT)) {
        let Some(pid) = name
            .strip_prefix("agent-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let relative = PathBuf::from(PARENT).join(&name);
        if hierarchy.remove_tree(&relative) {
            removed.extend(hierarchy.mounts().iter().map(|m| m.join(&relative)));
        }
    }
    removed
}

/// A CPU quantity (`250m`, `2`, `0.5`) in millicores.
pub fn parse_cpu_millis(text: &str) -> Option<u64> {
    let s = text.trim();
    if let Some(m) = s.strip_suffix('m') {
        return m.parse().ok();
    }
    let v: f64 = s.parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| (v * 1000.0).ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantities_in_millicores() {
        assert_eq!(parse_cpu_millis("250m"), Some(250));
        assert_eq!(parse_cpu_millis("2"), Some(2000));
        assert_eq!(parse_cpu_millis("0.5"), Some(500));
        assert_eq!(parse_cpu_millis("x"), None);
    }
}
