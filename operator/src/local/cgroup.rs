//! The cgroup a local build attempt runs in: where `indexer exec-limited --name NAME` makes it
//! (v1 `/sys/fs/cgroup/memory/imageindex/NAME`, v2 `/sys/fs/cgroup/imageindex/NAME`), its
//! OOM-kill counter, and removing it once the attempt's process has exited.
//!
//! `exec-limited` creates the group and moves the build into it; this side only checks up
//! front that groups can be made (so a missing privilege is one clear error, not a failed
//! attempt) and reads the kernel's verdict afterwards.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Parent group of the groups `indexer exec-limited` makes.
pub const PARENT: &str = "imageindex";

/// Which cgroup hierarchy holds the memory controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// cgroup v1: the `memory` controller's own hierarchy.
    V1,
    /// cgroup v2: the unified hierarchy.
    V2,
}

/// The memory hierarchy under `root` (normally `/sys/fs/cgroup`), if there is one.
pub fn hierarchy(root: &Path) -> Option<(PathBuf, Version)> {
    let v1 = root.join("memory");
    if v1.join("cgroup.procs").exists() {
        return Some((v1, Version::V1));
    }
    root.join("cgroup.controllers")
        .exists()
        .then(|| (root.to_path_buf(), Version::V2))
}

/// How to get real memory limits when this process may not make cgroups.
pub const FIX: &str = "local mode puts each build in a cgroup with a real memory limit: run it as root (e.g. `sudo operator local ...`), or delegate a cgroup v2 subtree to your user (e.g. `systemd-run --user --scope -p Delegate=yes operator local ...`) on a host with memory accounting enabled";

/// One attempt's group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptGroup {
    /// Its directory.
    pub dir: PathBuf,
    /// Its hierarchy.
    pub version: Version,
}

impl AttemptGroup {
    /// The group `indexer exec-limited --name name` makes under `root`; `None` without a
    /// memory hierarchy.
    pub fn at(root: &Path, name: &str) -> Option<Self> {
        let (mount, version) = hierarchy(root)?;
        Some(AttemptGroup {
            dir: mount.join(PARENT).join(name),
            version,
        })
    }

    /// Times the kernel's OOM killer fired in the group (0 when unreadable).
    pub fn oom_kills(&self) -> u64 {
        let file = match self.version {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        };
        fs::read_to_string(self.dir.join(file))
            .map(|text| oom_kill_count(&text))
            .unwrap_or(0)
    }

    /// Highest memory usage the kernel charged to the group (v1 `memory.max_usage_in_bytes`,
    /// v2 `memory.peak`), page cache included.
    pub fn peak_usage(&self) -> Option<u64> {
        let file = match self.version {
            Version::V1 => "memory.max_usage_in_bytes",
            Version::V2 => "memory.peak",
        };
        fs::read_to_string(self.dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Removes the group (its process has exited); retries while the kernel tears the exited
    /// task down. A group that is already gone is fine.
    pub fn remove(&self) -> io::Result<()> {
        let mut last = None;
        for _ in 0..100 {
            match fs::remove_dir(&self.dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(last.unwrap_or_else(|| io::Error::other("cgroup busy")))
    }
}

/// Removes the groups of earlier attempts of `instance` left behind by an operator that died
/// (only empty groups can be removed; a group still holding a process stays). Returns how
/// many were removed.
pub fn remove_stale(root: &Path, instance: &str) -> usize {
    let Some((mount, _)) = hierarchy(root) else {
        return 0;
    };
    let prefix = format!("{instance}-build-");
    fs::read_dir(mount.join(PARENT))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .filter(|e| fs::remove_dir(e.path()).is_ok())
                .count()
        })
        .unwrap_or(0)
}

/// The `oom_kill N` line of v1 `memory.oom_control` or v2 `memory.events`.
pub fn oom_kill_count(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Checks that groups can be made under `root`'s `imageindex/` (by making and removing a
/// probe group); the error says why not.
pub fn check_writable(root: &Path) -> Result<Version, String> {
    let (mount, version) = hierarchy(root).ok_or_else(|| {
        format!(
            "no cgroup memory controller under {} (neither v1 memory/ nor v2 cgroup.controllers)",
            root.display()
        )
    })?;
    let parent = mount.join(PARENT);
    if version == Version::V2 {
        // The memory controller must be enabled for children of every ancestor.
        let _ = fs::write(mount.join("cgroup.subtree_control"), "+memory");
    }
    fs::create_dir_all(&parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    if version == Version::V2 {
        let _ = fs::write(parent.join("cgroup.subtree_control"), "+memory");
    }
    let probe = parent.join(format!("probe-{}", std::process::id()));
    fs::create_dir(&probe).map_err(|e| format!("cannot create {}: {e}", probe.display()))?;
    let limit_file = match version {
        Version::V1 => "memory.limit_in_bytes",
        Version::V2 => "memory.max",
    };
    let has_limit = probe.join(limit_file).exists();
    let _ = fs::remove_dir(&probe);
    if has_limit {
        Ok(version)
    } else {
        Err(format!(
            "{} has no {limit_file}: the memory controller is not enabled there",
            probe.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kill_lines_of_both_versions() {
        assert_eq!(
            oom_kill_count("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"),
            2
        );
        assert_eq!(
            oom_kill_count("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n"),
            1
        );
        assert_eq!(oom_kill_count("oom_kill_disable 0\n"), 0);
        assert_eq!(oom_kill_count(""), 0);
    }

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
