//! The memory cgroup this process is in, and the tightest limit above it.

use crate::{parse, Group, Hierarchy, Version, DEFAULT_ROOT};
use std::fs;
use std::path::{Path, PathBuf};

/// The memory cgroup of a process, with the mount its limits are looked up to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessGroup {
    /// The group.
    pub group: Group,
    /// Root of the mounted hierarchy (limits are looked up from the group up to here).
    pub mount: PathBuf,
}

impl ProcessGroup {
    /// The group of this process, from `/proc/self/cgroup` under [`DEFAULT_ROOT`].
    pub fn detect() -> Option<ProcessGroup> {
        let text = fs::read_to_string("/proc/self/cgroup").ok()?;
        Self::from_proc(&text, Path::new(DEFAULT_ROOT))
    }

    /// The group a `/proc/<pid>/cgroup` text names, in the hierarchy under `root`; `None`
    /// when there is no memory hierarchy or the group has no memory files.
    pub fn from_proc(proc_cgroup: &str, root: &Path) -> Option<ProcessGroup> {
        let hierarchy = Hierarchy::find(root)?;
        let version = hierarchy.version();
        let path = match version {
            Version::V1 => parse::v1_memory_path(proc_cgroup)?,
            Version::V2 => parse::v2_path(proc_cgroup)?,
        };
        let mount = hierarchy.memory_root().to_path_buf();
        let dir = resolve(&mount, path);
        let has_memory =
            dir.join(version.limit_file()).exists() || dir.join(version.usage_file()).exists();
        has_memory.then(|| ProcessGroup {
            group: Group::new(version, dir, None),
            mount,
        })
    }

    /// The tightest memory limit from the group up to the mount, if any.
    pub fn limit(&self) -> Option<u64> {
        let file = self.group.version().limit_file();
        let mut dir = self.group.dir().to_path_buf();
        let mut best: Option<u64> = None;
        loop {
            if let Some(v) = fs::read_to_string(dir.join(file))
                .ok()
                .and_then(|t| parse::limit(&t))
            {
                best = Some(best.map_or(v, |b| b.min(v)));
            }
            if dir == self.mount || !dir.pop() || !dir.starts_with(&self.mount) {
                break;
            }
        }
        best
    }
}

/// The group's directory: the path under the mount, or the mount itself when that path is
/// not visible (inside a container the path is often relative to a namespace root).
fn resolve(mount: &Path, path: &str) -> PathBuf {
    let full = mount.join(path.trim_start_matches('/'));
    if full.exists() {
        full
    } else {
        mount.to_path_buf()
    }
}
