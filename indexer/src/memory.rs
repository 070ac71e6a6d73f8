//! Memory as the kernel and the kubelet see it: the cgroup limit (v2 `memory.max`, v1
//! `memory.limit_in_bytes`), the working set (usage minus inactive file cache), the process
//! RSS, and a way to hand LMDB's clean mapped pages back to the kernel.

use serde::Serialize;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Above this a cgroup limit means "no limit".
const UNLIMITED: u64 = 1 << 60;

/// Which cgroup hierarchy the process's memory controller lives in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum CgroupVersion {
    /// Unified hierarchy (`memory.max`, `memory.current`).
    V2,
    /// Legacy memory controller (`memory.limit_in_bytes`, `memory.usage_in_bytes`).
    V1,
}

/// The memory cgroup of this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    /// Hierarchy version.
    pub version: CgroupVersion,
    /// Directory of the process's cgroup.
    pub dir: PathBuf,
    /// Root of the mounted hierarchy (limits are looked up from `dir` up to here).
    pub mount: PathBuf,
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn stat_value(path: &Path, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

impl Cgroup {
    /// Finds the memory cgroup of this process from `/proc/self/cgroup`.
    pub fn detect() -> Option<Cgroup> {
        let text = fs::read_to_string("/proc/self/cgroup").ok()?;
        Self::from_proc(&text, Path::new("/sys/fs/cgroup"))
    }

    /// Resolves the cgroup from `/proc/self/cgroup` contents and the cgroup mount root.
    pub fn from_proc(proc_cgroup: &str, sys: &Path) -> Option<Cgroup> {
        // v1 memory controller first (a v1 machine also lists a `0::` line).
        for line in proc_cgroup.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
            if ctrls.split(',').any(|c| c == "memory") {
                let mount = sys.join("memory");
                let dir = resolve(&mount, path);
                if dir.join("memory.limit_in_bytes").exists() {
                    return Some(Cgroup {
                        version: CgroupVersion::V1,
                        dir,
                        mount,
                    });
                }
            }
        }
        for line in proc_cgroup.lines() {
            if let Some(path) = line.strip_prefix("0::") {
                let mount = sys.to_path_buf();
                let dir = resolve(&mount, path);
                if dir.join("memory.current").exists() || dir.join("memory.max").exists() {
                    return Some(Cgroup {
                        version: CgroupVersion::V2,
                        dir,
                        mount,
                    });
                }
            }
        }
        None
    }

    /// The tightest memory limit from this cgroup up to the root, if any.
    pub fn limit(&self) -> Option<u64> {
        let file = match self.version {
            CgroupVersion::V1 => "memory.limit_in_bytes",
            CgroupVersion::V2 => "memory.max",
        };
        let mut dir = self.dir.clone();
        let mut best: Option<u64> = None;
        loop {
            if let Some(v) = read_u64(&dir.join(file)).filter(|v| *v < UNLIMITED) {
                best = Some(best.map_or(v, |b| b.min(v)));
            }
            if dir == self.mount || !dir.pop() || !dir.starts_with(&self.mount) {
                break;
            }
        }
        best
    }

    /// Usage minus inactive file cache: what the OOM killer and the kubelet count.
    pub fn working_set(&self) -> Option<u64> {
        let (usage, inactive) = match self.version {
            CgroupVersion::V1 => (
                read_u64(&self.dir.join("memory.usage_in_bytes"))?,
                stat_value(&self.dir.join("memory.stat"), "total_inactive_file").unwrap_or(0),
            ),
            CgroupVersion::V2 => (
                read_u64(&self.dir.join("memory.current"))?,
                stat_value(&self.dir.join("memory.stat"), "inactive_file").unwrap_or(0),
            ),
        };
        Some(usage.saturating_sub(inactive))
    }

    /// Times the OOM killer fired in this cgroup (v1 `memory.oom_control`, v2 `memory.events`).
    pub fn oom_kills(&self) -> Option<u64> {
        match self.version {
            CgroupVersion::V1 => stat_value(&self.dir.join("memory.oom_control"), "oom_kill"),
            CgroupVersion::V2 => stat_value(&self.dir.join("memory.events"), "oom_kill"),
        }
    }
}

fn resolve(mount: &Path, path: &str) -> PathBuf {
    let rel = path.trim_start_matches('/');
    let full = mount.join(rel);
    // Inside a container the path is often relative to a namespace root we cannot see.
    if full.exists() {
        full
    } else {
        mount.to_path_buf()
    }
}

/// The process's own memory from `/proc/self/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProcessMemory {
    /// Resident set size.
    pub rss: u64,
    /// Peak resident set size (VmHWM).
    pub peak_rss: u64,
    /// Anonymous resident memory (heap, stacks): what cannot be reclaimed without swap.
    pub rss_anon: u64,
}

/// Reads `/proc/self/status` (zeros where unavailable).
pub fn process_memory() -> ProcessMemory {
    let text = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |v| v * 1024)
    };
    ProcessMemory {
        rss: kb("VmRSS:"),
        peak_rss: kb("VmHWM:"),
        rss_anon: kb("RssAnon:"),
    }
}

/// One reading of everything memory-related the metrics and the build's decisions use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemorySnapshot {
    /// The process.
    pub process: ProcessMemory,
    /// cgroup working set (or the process RSS outside a cgroup).
    pub working_set: u64,
    /// The effective limit.
    pub limit: u64,
    /// Limit minus working set inside a cgroup, else the system's available memory.
    pub available: u64,
}

/// Where limits and usage come from for this process.
pub struct MemorySource {
    cgroup: Option<Cgroup>,
    limit: u64,
    limited_by_cgroup: bool,
    system: Option<Mutex<sysinfo::System>>,
}

impl MemorySource {
    /// Detects the cgroup; the effective limit is the tighter of the cgroup's and `flag`.
    /// Without either, the system's total memory is the limit.
    pub fn detect(flag: Option<u64>) -> MemorySource {
        let cgroup = Cgroup::detect();
        let cg_limit = cgroup.as_ref().and_then(Cgroup::limit);
        let mut system = sysinfo::System::new().ok();
        if let Some(s) = system.as_mut() {
            s.refresh_memory();
        }
        let total = system.as_ref().map_or(u64::MAX, |s| s.total_memory());
        let (limit, by_cgroup) = match (cg_limit, flag) {
            (Some(c), Some(f)) => (c.min(f), c <= f),
            (Some(c), None) => (c, true),
            (None, Some(f)) => (f, false),
            (None, None) => (total, false),
        };
        MemorySource {
            cgroup,
            limit,
            limited_by_cgroup: by_cgroup,
            system: system.map(Mutex::new),
        }
    }

    /// The effective memory limit (budget) in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Whether the cgroup (not the flag) sets the limit.
    pub fn limited_by_cgroup(&self) -> bool {
        self.limited_by_cgroup
    }

    /// The detected cgroup, if any.
    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    /// Takes a reading.
    pub fn snapshot(&self) -> MemorySnapshot {
        let process = process_memory();
        let cg_ws = self.cgroup.as_ref().and_then(Cgroup::working_set);
        let working_set = cg_ws.unwrap_or(process.rss);
        let available = if cg_ws.is_some() || !self.limited_by_cgroup {
            let by_limit = self.limit.saturating_sub(working_set);
            if cg_ws.is_some() {
                by_limit
            } else {
                let sys = self
                    .system
                    .as_ref()
                    .and_then(|m| m.lock().ok())
                    .map(|mut s| {
                        s.refresh_memory();
                        s.available_memory()
                    });
                by_limit.min(sys.unwrap_or(by_limit))
            }
        } else {
            self.limit.saturating_sub(working_set)
        };
        MemorySnapshot {
            process,
            working_set,
            limit: self.limit,
            available,
        }
    }
}

/// Asks the kernel to drop the clean pages of a read-only shared file mapping (LMDB's map)
/// and of a file's page cache. Both are reclaimable, but until reclaimed they count in the
/// working set; dropping them keeps the working set honest under a tight limit.
pub fn release_file_pages(map: Option<(*mut libc::c_void, usize)>, file: Option<&std::fs::File>) {
    if let Some((addr, len)) = map {
        if !addr.is_null() && len > 0 {
            // SAFETY: advisory call on a mapping LMDB owns; MADV_PAGEOUT/COLD never changes
            // the contents of a shared file mapping, it only evicts clean pages.
            unsafe {
                if libc::madvise(addr, len, libc::MADV_PAGEOUT) != 0 {
                    libc::madvise(addr, len, libc::MADV_COLD);
                }
            }
        }
    }
    if let Some(f) = file {
        use std::os::fd::AsRawFd;
        // SAFETY: advisory call on an open file descriptor.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}

/// The address ranges of this process's mappings of files for which `wanted(path)` holds
/// (from `/proc/self/maps`; unlinked files keep their path with a ` (deleted)` suffix).
pub fn mapped_ranges(wanted: impl Fn(&str) -> bool) -> Vec<(usize, usize)> {
    let text = fs::read_to_string("/proc/self/maps").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            // start-end perms offset dev inode path
            let mut parts = line.splitn(6, ' ');
            let range = parts.next()?;
            let path = parts.nth(4)?.trim_start();
            let path = path.strip_suffix(" (deleted)").unwrap_or(path);
            if path.is_empty() || !wanted(path) {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect()
}

/// Asks the kernel to drop the clean pages of the mapped files `wanted(path)` selects.
pub fn page_out_mapped(wanted: impl Fn(&str) -> bool) {
    for (start, end) in mapped_ranges(wanted) {
        release_file_pages(Some((start as *mut libc::c_void, end - start)), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_v1_and_v2_cgroups_from_a_fake_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let sys = tmp.path();
        // v1: limit on the parent is tighter than on the child
        let v1 = sys.join("memory/kubepods/pod1");
        fs::create_dir_all(&v1).unwrap();
        fs::write(
            sys.join("memory/memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        fs::write(
            sys.join("memory/kubepods/memory.limit_in_bytes"),
            "536870912\n",
        )
        .unwrap();
        fs::write(v1.join("memory.limit_in_bytes"), "1073741824\n").unwrap();
        fs::write(v1.join("memory.usage_in_bytes"), "300000000\n").unwrap();
        fs::write(
            v1.join("memory.stat"),
            "cache 10\ntotal_inactive_file 100000000\n",
        )
        .unwrap();
        fs::write(
            v1.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        let cg = Cgroup::from_proc("4:memory:/kubepods/pod1\n0::/\n", sys).unwrap();
        assert_eq!(cg.version, CgroupVersion::V1);
        assert_eq!(cg.limit(), Some(536_870_912));
        assert_eq!(cg.working_set(), Some(200_000_000));
        assert_eq!(cg.oom_kills(), Some(2));

        let tmp2 = tempfile::tempdir().unwrap();
        let sys2 = tmp2.path();
        let v2 = sys2.join("pod2");
        fs::create_dir_all(&v2).unwrap();
        fs::write(v2.join("memory.max"), "max\n").unwrap();
        fs::write(sys2.join("memory.max"), "268435456\n").unwrap();
        fs::write(v2.join("memory.current"), "150000000\n").unwrap();
        fs::write(v2.join("memory.stat"), "anon 1\ninactive_file 50000000\n").unwrap();
        fs::write(
            v2.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        let cg = Cgroup::from_proc("0::/pod2\n", sys2).unwrap();
        assert_eq!(cg.version, CgroupVersion::V2);
        assert_eq!(cg.limit(), Some(268_435_456));
        assert_eq!(cg.working_set(), Some(100_000_000));
        assert_eq!(cg.oom_kills(), Some(1));
    }

    #[test]
    fn unlimited_cgroup_has_no_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("memory");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        let cg = Cgroup::from_proc("4:memory:/\n", tmp.path()).unwrap();
        assert_eq!(cg.limit(), None);
    }

    #[test]
    fn finds_its_own_file_mappings() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("mapped.bin");
        fs::write(&path, vec![7u8; 1 << 16]).unwrap();
        let file = fs::File::open(&path).unwrap();
        // SAFETY: a private read-only mapping of a file we just wrote.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                1 << 16,
                libc::PROT_READ,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let want = path.to_str().unwrap().to_string();
        let ranges = mapped_ranges(|p| p == want);
        assert_eq!(ranges, vec![(addr as usize, addr as usize + (1 << 16))]);
        page_out_mapped(|p| p == want);
        unsafe { libc::munmap(addr, 1 << 16) };
    }

    #[test]
    fn process_memory_is_read() {
        let m = process_memory();
        assert!(m.rss > 0 && m.peak_rss >= m.rss && m.rss_anon > 0);
    }

    #[test]
    fn flag_limit_applies_outside_a_cgroup_limit() {
        let src = MemorySource::detect(Some(123 << 20));
        assert!(src.limit() <= 123 << 20);
        let s = src.snapshot();
        assert_eq!(s.limit, src.limit());
        assert!(s.working_set > 0);
    }
}
