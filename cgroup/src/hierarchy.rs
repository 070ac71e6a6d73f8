//! Where the memory controller is mounted under a root, and making, listing and removing
//! groups in it.

use crate::{parse, CgroupError, Group, Version, PARENT};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The CFS period CPU quotas are written for.
const CFS_PERIOD_US: u64 = 100_000;

/// What a new group is limited to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Memory in bytes (`None`: unlimited). Swap is capped too, so this is a real ceiling.
    pub memory: Option<u64>,
    /// CPU in millicores (`None`: unlimited); applied only by a hierarchy
    /// [`with_cpu`](Hierarchy::with_cpu).
    pub cpu_millis: Option<u64>,
}

impl Limits {
    /// A memory limit and nothing else.
    pub fn memory(bytes: u64) -> Limits {
        Limits {
            memory: Some(bytes),
            cpu_millis: None,
        }
    }
}

/// The memory hierarchy under a root (and, [`with_cpu`](Hierarchy::with_cpu), the CPU
/// controller): v1's `memory/` mount when there is one, else v2's unified hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hierarchy {
    root: PathBuf,
    version: Version,
    memory: PathBuf,
    cpu: Cpu,
}

/// Whether and where groups get the CPU controller.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Cpu {
    /// Memory only.
    Off,
    /// v1: the `cpu` mount, if any; v2: enabled in the unified groups.
    On(Option<PathBuf>),
}

impl Hierarchy {
    /// The memory hierarchy under `root` (normally [`DEFAULT_ROOT`](crate::DEFAULT_ROOT)), if
    /// there is one.
    pub fn find(root: &Path) -> Option<Hierarchy> {
        let v1 = root.join("memory");
        let version =
            if v1.join("cgroup.procs").exists() || v1.join("memory.limit_in_bytes").exists() {
                Version::V1
            } else if root.join("cgroup.controllers").exists() {
                Version::V2
            } else {
                return None;
            };
        Some(Hierarchy {
            root: root.to_path_buf(),
            memory: if version == Version::V1 {
                v1
            } else {
                root.to_path_buf()
            },
            version,
            cpu: Cpu::Off,
        })
    }

    /// [`find`](Hierarchy::find), or an error saying there is none.
    pub fn require(root: &Path) -> Result<Hierarchy, CgroupError> {
        Hierarchy::find(root).ok_or_else(|| CgroupError::Unavailable {
            root: root.to_path_buf(),
            reason: "neither v1 memory nor v2 unified hierarchy found".into(),
        })
    }

    /// The same hierarchy with CPU limits too: v1's `cpu` (or `cpu,cpuacct`) mount when
    /// there is one, v2's `cpu` controller enabled alongside `memory`.
    pub fn with_cpu(mut self) -> Hierarchy {
        let cpu = match self.version {
            Version::V1 => ["cpu", "cpu,cpuacct"]
                .iter()
                .map(|d| self.root.join(d))
                .find(|d| d.join("cpu.cfs_quota_us").exists()),
            Version::V2 => None,
        };
        self.cpu = Cpu::On(cpu);
        self
    }

    /// The hierarchy's version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The memory hierarchy's mount (v1 `<root>/memory`, v2 `<root>`).
    pub fn memory_root(&self) -> &Path {
        &self.memory
    }

    /// The mounts groups are made in: the memory one, and v1's cpu one when in use.
    pub fn mounts(&self) -> Vec<&Path> {
        let mut mounts = vec![self.memory.as_path()];
        if let Cpu::On(Some(cpu)) = &self.cpu {
            mounts.push(cpu);
        }
        mounts
    }

    /// The group at `relative` (e.g. `imageindex/cats-build-1`), whether it exists or not.
    pub fn group(&self, relative: &Path) -> Group {
        let cpu_dir = match &self.cpu {
            Cpu::On(Some(cpu)) => Some(cpu.join(relative)),
            _ => None,
        };
        Group::new(self.version, self.memory.join(relative), cpu_dir)
    }

    /// Creates (or reuses) the group at `relative` and its parents, with `limits`. On v2 the
    /// controllers are enabled in every ancestor's `cgroup.subtree_control` on the way.
    pub fn create(&self, relative: &Path, limits: Limits) -> Result<Group, CgroupError> {
        let controllers: &[&str] = match (self.version, &self.cpu) {
            (Version::V1, _) => &[],
            (Version::V2, Cpu::Off) => &["+memory"],
            (Version::V2, Cpu::On(_)) => &["+memory", "+cpu"],
        };
        for mount in self.mounts() {
            self.create_dirs(mount, relative, controllers)?;
        }
        let group = self.group(relative);
        self.set_limits(&group, limits)?;
        Ok(group)
    }

    fn create_dirs(
        &self,
        mount: &Path,
        relative: &Path,
        controllers: &[&str],
    ) -> Result<(), CgroupError> {
        let mut dir = mount.to_path_buf();
        for part in relative.components() {
            // One controller at a time: a missing cpu controller must not keep memory from
            // being enabled.
            for c in controllers {
                let _ = fs::write(dir.join("cgroup.subtree_control"), c);
            }
            dir.push(part);
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(CgroupError::Unavailable {
                        root: self.root.clone(),
                        reason: format!("{}: {e}", dir.display()),
                    })
                }
            }
        }
        Ok(())
    }

    fn set_limits(&self, group: &Group, limits: Limits) -> Result<(), CgroupError> {
        let dir = group.dir();
        let write =
            |file: PathBuf, text: &str| fs::write(&file, text).map_err(CgroupError::io(file));
        match self.version {
            Version::V1 => {
                let bytes = limits.memory.map_or("-1".to_string(), |b| b.to_string());
                // memsw (memory + swap) must stay >= the memory limit: lift it first, then cap
                // it at the limit too so that swap cannot stretch the limit.
                let memsw = dir.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    let _ = fs::write(&memsw, "-1");
                }
                write(dir.join(Version::V1.limit_file()), &bytes)?;
                if memsw.exists() {
                    let _ = fs::write(&memsw, &bytes);
                }
                if let Some(cpu) = group.cpu_dir() {
                    write(cpu.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                    let quota = limits.cpu_millis.map_or("-1".to_string(), |m| {
                        parse::cpu_quota_us(m, CFS_PERIOD_US).to_string()
                    });
                    write(cpu.join("cpu.cfs_quota_us"), &quota)?;
                }
            }
            Version::V2 => {
                let bytes = limits.memory.map_or("max".to_string(), |b| b.to_string());
                write(dir.join(Version::V2.limit_file()), &bytes)?;
                let _ = fs::write(dir.join("memory.swap.max"), "0");
                if let Cpu::On(_) = self.cpu {
                    let quota = limits.cpu_millis.map_or("max".to_string(), |m| {
                        parse::cpu_quota_us(m, CFS_PERIOD_US).to_string()
                    });
                    let _ = fs::write(dir.join("cpu.max"), format!("{quota} {CFS_PERIOD_US}"));
                }
            }
        }
        Ok(())
    }

    /// The names of the groups directly inside `relative` (in the memory hierarchy).
    pub fn children(&self, relative: &Path) -> Vec<String> {
        fs::read_dir(self.memory.join(relative))
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Removes the group at `relative` and the empty groups in it, in every mount; groups
    /// that still hold processes stay. Returns whether the group is gone.
    pub fn remove_tree(&self, relative: &Path) -> bool {
        for mount in self.mounts() {
            let dir = mount.join(relative);
            if let Ok(entries) = fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        let _ = fs::remove_dir(e.path());
                    }
                }
            }
            let _ = fs::remove_dir(&dir);
        }
        !self.memory.join(relative).exists()
    }

    /// Checks that groups can be made under [`PARENT`] by making and removing a probe
    /// group; the error says why not.
    pub fn check_writable(&self) -> Result<(), CgroupError> {
        let unavailable = |reason: String| CgroupError::Unavailable {
            root: self.root.clone(),
            reason,
        };
        let parent = self.memory.join(PARENT);
        if self.version == Version::V2 {
            // The memory controller must be enabled for children of every ancestor.
            let _ = fs::write(self.memory.join("cgroup.subtree_control"), "+memory");
        }
        fs::create_dir_all(&parent)
            .map_err(|e| unavailable(format!("cannot create {}: {e}", parent.display())))?;
        if self.version == Version::V2 {
            let _ = fs::write(parent.join("cgroup.subtree_control"), "+memory");
        }
        let probe = parent.join(format!("probe-{}", std::process::id()));
        fs::create_dir(&probe)
            .map_err(|e| unavailable(format!("cannot create {}: {e}", probe.display())))?;
        let limit_file = self.version.limit_file();
        let has_limit = probe.join(limit_file).exists();
        let _ = fs::remove_dir(&probe);
        if has_limit {
            Ok(())
        } else {
            Err(unavailable(format!(
                "{} has no {limit_file}: the memory controller is not enabled there",
                probe.display()
            )))
        }
    }
}
