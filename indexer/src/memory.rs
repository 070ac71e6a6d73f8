//! Memory as the kernel and the kubelet see it: the cgroup limit (v2 `memory.max`, v1
//! `memory.limit_in_bytes`) and working set (usage minus inactive file cache) through
//! `imageindex-cgroup`, the process RSS, and a way to hand LMDB's clean mapped pages back to
//! the kernel.

use imageindex_cgroup::ProcessGroup;
use serde::Serialize;
use std::fs;
use std::sync::Mutex;

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

/// Bytes this process has read from and written to storage so far (`/proc/self/io`'s
/// `read_bytes`, `write_bytes`; zero where unreadable): what a build step costs in I/O.
pub fn process_io() -> (u64, u64) {
    let text = fs::read_to_string("/proc/self/io").unwrap_or_default();
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("read_bytes:"), field("write_bytes:"))
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
    cgroup: Option<ProcessGroup>,
    limit: u64,
    limited_by_cgroup: bool,
    cgroup_has_limit: bool,
    system: Option<Mutex<sysinfo::System>>,
}

impl MemorySource {
    /// Detects the cgroup; the effective limit is the tighter of the cgroup's and `flag`.
    /// Without either, the system's total memory is the limit.
    pub fn detect(flag: Option<u64>) -> MemorySource {
        let cgroup = ProcessGroup::detect();
        let cg_limit = cgroup.as_ref().and_then(ProcessGroup::limit);
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
            cgroup_has_limit: cg_limit.is_some(),
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
    pub fn cgroup(&self) -> Option<&ProcessGroup> {
        self.cgroup.as_ref()
    }

    /// Takes a reading.
    pub fn snapshot(&self) -> MemorySnapshot {
        let process = process_memory();
        // A group without a limit of its own (a login session, the root) holds other
        // processes too: its working set is not this build's, the process's RSS is.
        let cg_ws = self
            .cgroup
            .as_ref()
            .filter(|_| self.cgroup_has_limit)
            .and_then(|c| c.group.working_set());
        let working_set = cg_ws.unwrap_or(process.rss);
        let by_limit = self.limit.saturating_sub(working_set);
        let available = if cg_ws.is_some() {
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
        };
        MemorySnapshot {
            process,
            working_set,
            limit: self.limit,
            available,
        }
    }
}

/// Takes a read-only shared file mapping's pages (LMDB's map) and a file's cached pages out
/// of the working set without leaving anything that brings them back into it. The mapping's
/// pages are unmapped from this process (`MADV_DONTNEED`: on a shared file mapping that only
/// drops page-table entries; the next read faults the page in again from the cache or the
/// file, unchanged), then the file's clean unmapped pages are dropped (`POSIX_FADV_DONTNEED`).
/// Not paged out (`MADV_PAGEOUT`): a page the kernel reclaims leaves a shadow entry, and when
/// it is read again soon (the next batch's tree pages, readahead) the kernel counts it as a
/// refault and makes it active at once, back in the working set; shadow entries also keep the
/// file's page-cache tree nodes (kernel memory charged to the group) alive in proportion to
/// the file's size. Nor only deactivated (`MADV_COLD`): the group's usage then sits at its
/// limit and every new page costs a reclaim (the 116M build's partition step took 300 s
/// against 284 with page-out, measured in the same session).
pub fn release_file_pages(map: Option<(*mut libc::c_void, usize)>, file: Option<&std::fs::File>) {
    if let Some((addr, len)) = map {
        if !addr.is_null() && len > 0 {
            // SAFETY: advisory call on a read-only MAP_SHARED file mapping LMDB (or arroy)
            // owns: MADV_DONTNEED there only zaps page-table entries; concurrent readers fault
            // the same bytes back in from the page cache or the file.
            unsafe {
                libc::madvise(addr, len, libc::MADV_DONTNEED);
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

/// Allocations at least this large get pages of their own (glibc `M_MMAP_THRESHOLD`).
pub const OWN_PAGES_FROM: usize = 1 << 20;

/// Makes the allocator hand large buffers back to the kernel as soon as they are freed: each
/// allocation of [`OWN_PAGES_FROM`] bytes or more is mapped on its own. glibc otherwise raises
/// that threshold after the first large free (up to 32 MiB), and a build's per-cell buffers
/// and LMDB's dirty pages then stay in the heap as anonymous memory after they are freed.
pub fn bound_heap() {
    // SAFETY: mallopt only changes allocator tuning parameters.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, OWN_PAGES_FROM as libc::c_int);
    }
}

/// Tells the kernel the pages of `data` (read through a file mapping, e.g. an LMDB value)
/// will not be needed again soon: they move to the inactive list, which the working set does
/// not count and which the kernel reclaims first. Called by the build right after it has read
/// a batch, so the mapped pages it streams through never pile up in its working set.
pub fn cool(data: &[u8]) {
    advise_pages(data, libc::MADV_COLD);
}

/// Asks the kernel to read the pages of `data` (a value in a file mapping, e.g. an LMDB value)
/// in the background now: exactly those pages, all requests in flight at once, where touching
/// them would fault them in one at a time, each with its read-around.
pub fn will_need(data: &[u8]) {
    advise_pages(data, libc::MADV_WILLNEED);
}

/// Gives `advice` for the whole pages that hold `data` (part of a file mapping).
fn advise_pages(data: &[u8], advice: libc::c_int) {
    if data.is_empty() {
        return;
    }
    let page = 4096usize;
    let start = data.as_ptr() as usize & !(page - 1);
    let end = data.as_ptr() as usize + data.len();
    advise(&[(start, end)], advice);
}

/// Turns off read-around on this process's mappings of one file while it lives (back on when
/// dropped): a fault then reads the page it needs, not the device's whole readahead window
/// around it (8 MiB on some disks), for reads that jump around the file and ask for what they
/// need ahead with [`will_need`].
pub struct RandomAccess(Vec<(usize, usize)>);

impl RandomAccess {
    /// Read-around off for the mappings of `file`.
    pub fn of(file: &std::path::Path) -> RandomAccess {
        let file = fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
        let want = file.to_string_lossy().to_string();
        let ranges = mapped_ranges(|p| p == want);
        advise(&ranges, libc::MADV_RANDOM);
        RandomAccess(ranges)
    }
}

impl Drop for RandomAccess {
    fn drop(&mut self) {
        advise(&self.0, libc::MADV_NORMAL);
    }
}

fn advise(ranges: &[(usize, usize)], advice: libc::c_int) {
    for &(start, end) in ranges {
        // SAFETY: advisory call on pages of a live file mapping; the advices used here (COLD,
        // WILLNEED, RANDOM, NORMAL) never change contents.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, advice);
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

/// Unmaps this process's pages of the files `wanted(path)` selects (they stay cached; see
/// [`release_file_pages`]).
pub fn unmap_mapped(wanted: impl Fn(&str) -> bool) {
    for (start, end) in mapped_ranges(wanted) {
        release_file_pages(Some((start as *mut libc::c_void, end - start)), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_its_own_file_mappings_and_unmaps_them_without_evicting() {
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
        // Read every page, then unmap them: they stay cached (not evicted, so nothing is
        // read from disk again) and read back the same.
        let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, 1 << 16) };
        assert!(bytes.iter().step_by(4096).all(|b| *b == 7));
        unmap_mapped(|p| p == want);
        let mut resident = vec![0u8; (1 << 16) / 4096];
        assert_eq!(
            unsafe { libc::mincore(addr, 1 << 16, resident.as_mut_ptr()) },
            0
        );
        assert!(
            resident.iter().all(|r| r & 1 == 1),
            "unmapped pages were evicted: {resident:?}"
        );
        assert!(bytes.iter().step_by(4096).all(|b| *b == 7));
        unsafe { libc::munmap(addr, 1 << 16) };
    }

    #[test]
    fn process_io_counts_written_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, before) = process_io();
        let path = tmp.path().join("written.bin");
        fs::write(&path, vec![1u8; 1 << 20]).unwrap();
        fs::File::open(&path).unwrap().sync_all().unwrap();
        let (_, after) = process_io();
        assert!(after >= before + (1 << 20), "{before} -> {after}");
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
