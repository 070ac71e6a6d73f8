//! One group: its processes, what the kernel counts for it, and removing it.

use crate::{parse, CgroupError, Version};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A memory (v1) or unified (v2) group, with its v1 CPU twin when it has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    version: Version,
    dir: PathBuf,
    cpu_dir: Option<PathBuf>,
}

impl Group {
    /// The group in directory `dir` of a `version` hierarchy (and its v1 cpu group).
    pub fn new(version: Version, dir: PathBuf, cpu_dir: Option<PathBuf>) -> Group {
        Group {
            version,
            dir,
            cpu_dir,
        }
    }

    /// Its hierarchy's version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Its directory in the memory (v1) or unified (v2) hierarchy.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its directory in v1's cpu hierarchy, if it has one.
    pub fn cpu_dir(&self) -> Option<&Path> {
        self.cpu_dir.as_deref()
    }

    fn read(&self, file: &str) -> Option<String> {
        fs::read_to_string(self.dir.join(file)).ok()
    }

    /// The `cgroup.procs` files a process writes its pid (or `0`, itself) to, to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        std::iter::once(&self.dir)
            .chain(&self.cpu_dir)
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Moves a process into the group.
    pub fn add(&self, pid: u32) -> Result<(), CgroupError> {
        for file in self.procs_files() {
            fs::write(&file, pid.to_string()).map_err(CgroupError::io(file))?;
        }
        Ok(())
    }

    /// The processes in the group.
    pub fn pids(&self) -> Vec<i32> {
        parse::pids(&self.read("cgroup.procs").unwrap_or_default())
    }

    /// The group's own memory limit (`None`: unlimited or unreadable).
    pub fn limit(&self) -> Option<u64> {
        parse::limit(&self.read(self.version.limit_file())?)
    }

    /// Usage minus inactive file cache: what the OOM killer and the kubelet count.
    pub fn working_set(&self) -> Option<u64> {
        let usage = parse::number(&self.read(self.version.usage_file())?)?;
        let stat = self.read("memory.stat").unwrap_or_default();
        Some(parse::working_set(
            usage,
            &stat,
            self.version.inactive_file_key(),
        ))
    }

    /// The highest usage the kernel charged to the group (v1 `memory.max_usage_in_bytes`,
    /// v2 `memory.peak`), page cache included.
    pub fn peak(&self) -> Option<u64> {
        parse::number(&self.read(self.version.peak_file())?)
    }

    /// Resets the peak before the group is reused (v1 only; v2 peaks are per group).
    pub fn reset_peak(&self) {
        if self.version == Version::V1 {
            let _ = fs::write(self.dir.join(self.version.peak_file()), "0");
        }
    }

    /// Times the kernel's OOM killer fired in the group (v1 `memory.oom_control`, v2
    /// `memory.events`), if readable.
    pub fn oom_kills(&self) -> Option<u64> {
        parse::oom_kills(&self.read(self.version.oom_file())?)
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

    /// Removes the group (its processes have exited), retrying for up to `timeout` while
    /// the kernel finishes tearing exited tasks down. A group already gone is fine.
    pub fn remove(&self, timeout: Duration) -> Result<(), CgroupError> {
        self.remove_with(timeout, || {})
    }

    /// Kills every process in the group and removes it, retrying for up to `timeout`.
    pub fn destroy(&self, timeout: Duration) -> Result<(), CgroupError> {
        self.remove_with(timeout, || self.signal_all(libc::SIGKILL))
    }

    fn remove_with(&self, timeout: Duration, before_each: impl Fn()) -> Result<(), CgroupError> {
        let start = Instant::now();
        let dirs: Vec<&PathBuf> = std::iter::once(&self.dir).chain(&self.cpu_dir).collect();
        loop {
            before_each();
            let mut last = None;
            for dir in &dirs {
                match fs::remove_dir(dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => last = Some((dir.to_path_buf(), e)),
                }
            }
            match last {
                None => return Ok(()),
                Some((path, source)) if start.elapsed() >= timeout => {
                    return Err(CgroupError::Io { path, source })
                }
                Some(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}
