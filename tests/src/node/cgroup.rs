//! The cgroups of the containers the agent runs: a real memory limit (its OOM killer decides
//! the `OOMKilled` reason), a CPU quota, and the list of processes to signal.
//!
//! cgroup v1 (this machine: separate `memory` and `cpu` hierarchies) and v2 (one unified
//! group) are both handled. Groups live under `<hierarchy>/imageindex/agent-<pid>/`, beside
//! the `imageindex/<name>` groups of `indexer exec-limited`; those of an agent that was killed
//! are removed by the next one.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Which cgroup version the machine uses for memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// v1: one mount per controller.
    V1 {
        /// The `memory` hierarchy.
        memory: PathBuf,
        /// The `cpu` hierarchy, if mounted.
        cpu: Option<PathBuf>,
    },
    /// v2: the unified hierarchy.
    V2 {
        /// Its mount point.
        root: PathBuf,
    },
}

impl Hierarchy {
    /// The hierarchy of this machine.
    pub fn detect() -> io::Result<Hierarchy> {
        let root = Path::new(CGROUP_ROOT);
        let memory = root.join("memory");
        if memory.join("cgroup.procs").exists() {
            let cpu = ["cpu", "cpu,cpuacct"]
                .iter()
                .map(|d| root.join(d))
                .find(|d| d.join("cpu.cfs_quota_us").exists());
            return Ok(Hierarchy::V1 { memory, cpu });
        }
        if root.join("cgroup.controllers").exists() {
            return Ok(Hierarchy::V2 {
                root: root.to_path_buf(),
            });
        }
        Err(io::Error::other(format!(
            "no cgroup memory controller under {CGROUP_ROOT} (neither v1 memory/ nor v2)"
        )))
    }
}

/// The limits of one container.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// `resources.limits.memory` in bytes.
    pub memory: Option<u64>,
    /// `resources.limits.cpu` in millicores.
    pub cpu_millis: Option<u64>,
}

/// The cgroup(s) of one container: every process of the container lives in them.
#[derive(Clone, Debug)]
pub struct ContainerGroup {
    hierarchy: Hierarchy,
    /// The memory group (v1) or the unified group (v2).
    memory_dir: PathBuf,
    /// The v1 cpu group, if the cpu hierarchy is mounted.
    cpu_dir: Option<PathBuf>,
}

const CFS_PERIOD_US: u64 = 100_000;

fn write(path: &Path, text: &str) -> io::Result<()> {
    fs::write(path, text).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn create_dirs(root: &Path, relative: &Path, v2: bool) -> io::Result<PathBuf> {
    let mut dir = root.to_path_buf();
    for part in relative.components() {
        if v2 {
            // Controllers must be enabled in every ancestor's subtree_control (one at a time:
            // a missing cpu controller must not keep memory from being enabled).
            for controller in ["+memory", "+cpu"] {
                let _ = fs::write(dir.join("cgroup.subtree_control"), controller);
            }
        }
        dir.push(part);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
        }
    }
    Ok(dir)
}

impl ContainerGroup {
    /// Creates (or reuses) the group `relative` (e.g. `imageindex/agent-42/<pod uid>_build`) with
    /// `limits`.
    pub fn create(hierarchy: &Hierarchy, relative: &Path, limits: Limits) -> io::Result<Self> {
        let group = match hierarchy {
            Hierarchy::V1 { memory, cpu } => ContainerGroup {
                hierarchy: hierarchy.clone(),
                memory_dir: create_dirs(memory, relative, false)?,
                cpu_dir: match cpu {
                    Some(cpu) => Some(create_dirs(cpu, relative, false)?),
                    None => None,
                },
            },
            Hierarchy::V2 { root } => ContainerGroup {
                hierarchy: hierarchy.clone(),
                memory_dir: create_dirs(root, relative, true)?,
                cpu_dir: None,
            },
        };
        group.set_limits(limits)?;
        Ok(group)
    }

    fn set_limits(&self, limits: Limits) -> io::Result<()> {
        let dir = &self.memory_dir;
        match &self.hierarchy {
            Hierarchy::V1 { .. } => {
                let bytes = limits.memory.map_or("-1".to_string(), |b| b.to_string());
                // memsw (memory + swap) must stay >= the memory limit: lift it first, then cap
                // it at the limit too so that swap cannot stretch the limit.
                let memsw = dir.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, "-1")?;
                }
                write(&dir.join("memory.limit_in_bytes"), &bytes)?;
                if memsw.exists() {
                    write(&memsw, &bytes)?;
                }
                if let Some(cpu) = &self.cpu_dir {
                    write(&cpu.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                    let quota = limits.cpu_millis.map_or("-1".to_string(), |m| {
                        (m * CFS_PERIOD_US / 1000).max(1000).to_string()
                    });
                    write(&cpu.join("cpu.cfs_quota_us"), &quota)?;
                }
            }
            Hierarchy::V2 { .. } => {
                let bytes = limits.memory.map_or("max".to_string(), |b| b.to_string());
                write(&dir.join("memory.max"), &bytes)?;
                let _ = fs::write(dir.join("memory.swap.max"), "0");
                let quota = limits.cpu_millis.map_or("max".to_string(), |m| {
                    (m * CFS_PERIOD_US / 1000).max(1000).to_string()
                });
                let _ = fs::write(dir.join("cpu.max"), format!("{quota} {CFS_PERIOD_US}"));
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files a new process writes `0` to, to join the group.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.memory_dir.join("cgroup.procs")];
        if let Some(cpu) = &self.cpu_dir {
            files.push(cpu.join("cgroup.procs"));
        }
        files
    }

    /// The memory (or unified) group's directory.
    pub fn dir(&self) -> &Path {
        &self.memory_dir
    }

    /// How often the kernel's OOM killer fired in the group.
    pub fn oom_kills(&self) -> u64 {
        let file = match self.hierarchy {
            Hierarchy::V1 { .. } => "memory.oom_control",
            Hierarchy::V2 { .. } => "memory.events",
        };
        fs::read_to_string(self.memory_dir.join(file))
            .ok()
            .and_then(|text| {
                text.lines().find_map(|l| {
                    l.strip_prefix("oom_kill ")
                        .and_then(|n| n.trim().parse().ok())
                })
            })
            .unwrap_or(0)
    }

    /// The group's peak memory usage (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`).
    pub fn peak(&self) -> Option<u64> {
        let file = match self.hierarchy {
            Hierarchy::V1 { .. } => "memory.max_usage_in_bytes",
            Hierarchy::V2 { .. } => "memory.peak",
        };
        fs::read_to_string(self.memory_dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Resets the peak before a restarted container runs (v1 only; v2 peaks are per group).
    pub fn reset_peak(&self) {
        if let Hierarchy::V1 { .. } = self.hierarchy {
            let _ = fs::write(self.memory_dir.join("memory.max_usage_in_bytes"), "0");
        }
    }

    /// The processes in the group.
    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.memory_dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Sends `signal` to every process in the group.
    pub fn signal_all(&self, signal: i32) {
        for pid in self.pids() {
            // SAFETY: kill(2) has no memory effects; a vanished pid gives ESRCH.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// Kills every process in the group and removes it, waiting up to `timeout` for the
    /// kernel to let go of exiting tasks.
    pub fn destroy(&self, timeout: Duration) -> io::Result<()> {
        let start = Instant::now();
        let mut dirs = vec![self.memory_dir.clone()];
        dirs.extend(self.cpu_dir.clone());
        loop {
            self.signal_all(libc::SIGKILL);
            let mut last_error = None;
            for dir in &dirs {
                match fs::remove_dir(dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        last_error =
                            Some(io::Error::new(e.kind(), format!("{}: {e}", dir.display())))
                    }
                }
            }
            match last_error {
                None => return Ok(()),
                Some(e) if start.elapsed() > timeout => return Err(e),
                Some(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

fn roots(hierarchy: &Hierarchy) -> Vec<PathBuf> {
    match hierarchy {
        Hierarchy::V1 { memory, cpu } => {
            std::iter::once(memory.clone()).chain(cpu.clone()).collect()
        }
        Hierarchy::V2 { root } => vec![root.clone()],
    }
}

/// Removes the group `relative` and the (empty) groups in it; groups that still hold
/// processes stay.
pub fn remove_tree(hierarchy: &Hierarchy, relative: &Path) {
    for root in roots(hierarchy) {
        let dir = root.join(relative);
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = fs::remove_dir(e.path());
                }
            }
        }
        let _ = fs::remove_dir(&dir);
    }
}

/// The parent group of an agent's containers: `imageindex/agent-<pid>`.
pub fn agent_parent(pid: u32) -> PathBuf {
    PathBuf::from(PARENT).join(format!("agent-{pid}"))
}

/// Where the agents' groups live (beside those of `indexer exec-limited`).
pub const PARENT: &str = "imageindex";

/// Removes the (empty) groups of agents whose process is gone (killed before they could
/// clean up); returns them.
pub fn remove_stale(hierarchy: &Hierarchy) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for root in roots(hierarchy) {
        let Ok(entries) = fs::read_dir(root.join(PARENT)) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
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
            remove_tree(hierarchy, &relative);
            if !root.join(&relative).exists() {
                removed.push(root.join(relative));
            }
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
