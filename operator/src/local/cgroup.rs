//! The cgroup a local build attempt runs in: where `indexer exec-limited --name NAME` makes it
//! (v1 `/sys/fs/cgroup/memory/imageindex/NAME`, v2 `/sys/fs/cgroup/imageindex/NAME`), its
//! OOM-kill counter, and removing it once the attempt's process has exited.
//!
//! `exec-limited` creates the group and moves the build into it; this side only checks up
//! front that groups can be made (so a missing privilege is one clear error, not a failed
//! attempt) and reads the kernel's verdict afterwards. Both go through `imageindex-cgroup`.

use imageindex_cgroup::{CgroupError, Group, Hierarchy};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use imageindex_cgroup::{Version, PARENT};

/// How to get real memory limits when this process may not make cgroups.
pub const FIX: &str = "local mode puts each build in a cgroup with a real memory limit: run it as root (e.g. `sudo operator local ...`), or delegate a cgroup v2 subtree to your user (e.g. `systemd-run --user --scope -p Delegate=yes operator local ...`) on a host with memory accounting enabled";

/// How long removing a group waits for the kernel to let go of an exited attempt.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(2);

/// One attempt's group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptGroup {
    /// Its directory.
    pub dir: PathBuf,
    /// Its hierarchy.
    pub version: Version,
    group: Group,
}

impl AttemptGroup {
    /// The group `indexer exec-limited --name name` makes under `root`; `None` without a
    /// memory hierarchy.
    pub fn at(root: &Path, name: &str) -> Option<Self> {
        let group = Hierarchy::find(root)?.group(&Path::new(PARENT).join(name));
        Some(AttemptGroup {
            dir: group.dir().to_path_buf(),
            version: group.version(),
            group,
        })
    }

    /// Times the kernel's OOM killer fired in the group (0 when unreadable).
    pub fn oom_kills(&self) -> u64 {
        self.group.oom_kills().unwrap_or(0)
    }

    /// Highest memory usage the kernel charged to the group (v1 `memory.max_usage_in_bytes`,
    /// v2 `memory.peak`), page cache included.
    pub fn peak_usage(&self) -> Option<u64> {
        self.group.peak()
    }

    /// Removes the group (its process has exited); retries while the kernel tears the exited
    /// task down. A group that is already gone is fine.
    pub fn remove(&self) -> io::Result<()> {
        self.group.remove(REMOVE_TIMEOUT).map_err(|e| match e {
            CgroupError::Io { source, .. } => source,
            other => io::Error::other(other),
        })
    }
}

/// Removes the groups of earlier attempts of `instance` left behind by an operator that died
/// (only empty groups can be removed; a group still holding a process stays). Returns how
/// many were removed.
pub fn remove_stale(root: &Path, instance: &str) -> usize {
    let Some(hierarchy) = Hierarchy::find(root) else {
        return 0;
    };
    let prefix = format!("{instance}-build-");
    hierarchy
        .children(Path::new(PARENT))
        .into_iter()
        .filter(|name| name.starts_with(&prefix))
        .filter(|name| {
            let group = hierarchy.group(&Path::new(PARENT).join(name));
            std::fs::remove_dir(group.dir()).is_ok()
        })
        .count()
}

/// Checks that groups can be made under `root`'s `imageindex/` (by making and removing a
/// probe group); the error says why not.
pub fn check_writable(root: &Path) -> Result<Version, String> {
    let hierarchy = Hierarchy::find(root).ok_or_else(|| {
        format!(
            "no cgroup memory controller under {} (neither v1 memory/ nor v2 cgroup.controllers)",
            root.display()
        )
    })?;
    match hierarchy.check_writable() {
        Ok(()) => Ok(hierarchy.version()),
        Err(CgroupError::Unavailable { reason, .. }) => Err(reason),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn groups_are_found_in_either_hierarchy() {
        let v1 = tempfile::tempdir().unwrap();
        fs::create_dir_all(v1.path().join("memory")).unwrap();
        fs::write(v1.path().join("memory/cgroup.procs"), "").unwrap();
        let g = AttemptGroup::at(v1.path(), "cats-1").unwrap();
        assert_eq!(g.version, Version::V1);
        assert_eq!(g.dir, v1.path().join("memory/imageindex/cats-1"));
        fs::create_dir_all(&g.dir).unwrap();
        fs::write(g.dir.join("memory.oom_control"), "oom_kill 3\n").unwrap();
        assert_eq!(g.oom_kills(), 3);
        fs::write(g.dir.join("memory.max_usage_in_bytes"), "83886080\n").unwrap();
        assert_eq!(g.peak_usage(), Some(80 << 20));

        let v2 = tempfile::tempdir().unwrap();
        fs::write(v2.path().join("cgroup.controllers"), "cpu memory\n").unwrap();
        let g = AttemptGroup::at(v2.path(), "cats-1").unwrap();
        assert_eq!(g.version, Version::V2);
        assert_eq!(g.dir, v2.path().join("imageindex/cats-1"));
        assert_eq!(g.oom_kills(), 0, "unreadable counts as none");
        fs::create_dir_all(&g.dir).unwrap();
        g.remove().unwrap();
        assert!(!g.dir.exists());
        g.remove().unwrap();

        fs::create_dir_all(v2.path().join("imageindex/cats-build-3-99")).unwrap();
        fs::create_dir_all(v2.path().join("imageindex/dogs-build-1-99")).unwrap();
        assert_eq!(remove_stale(v2.path(), "cats"), 1);
        assert!(v2.path().join("imageindex/dogs-build-1-99").exists());

        let none = tempfile::tempdir().unwrap();
        assert!(AttemptGroup::at(none.path(), "x").is_none());
        assert!(check_writable(none.path()).is_err());
    }
}
