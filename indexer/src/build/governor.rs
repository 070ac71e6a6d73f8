//! Watches the working set while a build runs: records its peak and, above the plan's
//! threshold, takes LMDB's file pages out of it (reclaimable, but counted in the working set
//! while active): unmapped, then the clean ones dropped from the page cache.

use crate::memory::{release_file_pages, MemorySource};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn release_env_pages(env: Option<&Path>, file: Option<&std::fs::File>) {
    let Some(dir) = env.map(|e| std::fs::canonicalize(e).unwrap_or_else(|_| e.to_path_buf()))
    else {
        release_file_pages(None, file);
        return;
    };
    // LMDB's maps of data.mdb (the index's and the working descriptors' below it) and arroy's
    // mapped temporary files, wherever they are: pages unmapped first (mapped pages stay in
    // the page cache), then the files' clean cached pages dropped.
    let dir = dir.to_string_lossy().to_string();
    crate::memory::unmap_mapped(|p| p.starts_with(&dir));
    release_file_pages(None, file);
    let work = std::path::Path::new(&dir)
        .join(super::WORK_DIR)
        .join("data.mdb");
    if let Ok(f) = std::fs::File::open(work) {
        release_file_pages(None, Some(&f));
    }
    // arroy's temporary node files (already unlinked) live beside the environment: reach
    // their page cache through this process's open file descriptors.
    let tmp = std::path::Path::new(&dir).join("tmp");
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        for fd in fds.flatten() {
            let points_into_tmp =
                std::fs::read_link(fd.path()).is_ok_and(|target| target.starts_with(&tmp));
            if points_into_tmp {
                if let Ok(f) = std::fs::File::open(fd.path()) {
                    release_file_pages(None, Some(&f));
                }
            }
        }
    }
}

/// Shortest time between two releases of file pages: a build writes and maps its files at
/// up to ~100 MB/s, so this bounds how far they pass the allowance between two releases.
const RELEASE_INTERVAL: Duration = Duration::from_millis(250);

/// How often the working set is sampled.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// A background thread sampling memory every [`SAMPLE_INTERVAL`].
pub struct MemoryGovernor {
    env: Option<PathBuf>,
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    peak_anon: Arc<AtomicU64>,
    /// Peak working set and anonymous memory since the last [`MemoryGovernor::step_done`].
    step_peaks: Arc<[AtomicU64; 2]>,
    /// Bytes read and written by the process when the current step started.
    step_io: std::sync::Mutex<(u64, u64)>,
    reclaims: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl MemoryGovernor {
    /// Starts watching; `env` is the directory of the LMDB environment whose pages may be
    /// released (a path, not a handle: the build closes and reopens the environment).
    pub fn start(
        memory: Arc<MemorySource>,
        plan: &imageindex_crds::BuildPlan,
        env: Option<PathBuf>,
    ) -> MemoryGovernor {
        let own_env = env.clone();
        let (reclaim_at, allowance) = (plan.reclaim_at, plan.file_pages_allowance);
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let peak_anon = Arc::new(AtomicU64::new(0));
        let reclaims = Arc::new(AtomicU64::new(0));
        let step_peaks = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let (stop2, peak2, anon2, reclaims2, steps2) = (
            stop.clone(),
            peak.clone(),
            peak_anon.clone(),
            reclaims.clone(),
            step_peaks.clone(),
        );
        let data_file = env
            .as_ref()
            .and_then(|e| std::fs::File::open(e.join("data.mdb")).ok());
        let handle = std::thread::Builder::new()
            .name("memory".into())
            .spawn(move || {
                let mut last_release = std::time::Instant::now() - Duration::from_secs(10);
                while !stop2.load(Ordering::Relaxed) {
                    let s = memory.snapshot();
                    peak2.fetch_max(s.working_set, Ordering::Relaxed);
                    anon2.fetch_max(s.process.rss_anon, Ordering::Relaxed);
                    steps2[0].fetch_max(s.working_set, Ordering::Relaxed);
                    steps2[1].fetch_max(s.process.rss_anon, Ordering::Relaxed);
                    let file_pages = s.working_set.saturating_sub(s.process.rss_anon);
                    if (s.working_set > reclaim_at || file_pages > allowance)
                        && last_release.elapsed() >= RELEASE_INTERVAL
                    {
                        release_env_pages(env.as_deref(), data_file.as_ref());
                        reclaims2.fetch_add(1, Ordering::Relaxed);
                        last_release = std::time::Instant::now();
                    }
                    std::thread::sleep(SAMPLE_INTERVAL);
                }
            })
            .ok();
        MemoryGovernor {
            env: own_env,
            stop,
            peak,
            peak_anon,
            step_peaks,
            step_io: std::sync::Mutex::new(crate::memory::process_io()),
            reclaims,
            handle,
        }
    }

    /// Logs the peak working set and anonymous memory of the step that just ended (since the
    /// previous call), and what it read from and wrote to storage, and starts measuring the
    /// next: which step decides a build's peak, and what its page-cache traffic costs.
    pub fn step_done(&self, step: &str) {
        let [ws, anon] = &*self.step_peaks;
        let mib = |v: &AtomicU64| v.swap(0, Ordering::Relaxed) >> 20;
        let now = crate::memory::process_io();
        let (read, written) = match self.step_io.lock() {
            Ok(mut start) => {
                let d = (now.0.saturating_sub(start.0), now.1.saturating_sub(start.1));
                *start = now;
                d
            }
            Err(_) => (0, 0),
        };
        tracing::info!(
            step,
            peak_working_set_mib = mib(ws),
            peak_anon_mib = mib(anon),
            read_mib = read >> 20,
            written_mib = written >> 20,
            "step memory"
        );
    }

    /// Takes LMDB's file pages out of the working set now (between build steps).
    pub fn release_now(&self) {
        // The step that just ended freed its buffers: return the heap's free pages too
        // (glibc keeps them otherwise, and they count as anonymous memory).
        // SAFETY: malloc_trim only releases free memory of the allocator.
        #[cfg(target_env = "gnu")]
        unsafe {
            libc::malloc_trim(0);
        }
        let file = self
            .env
            .as_ref()
            .and_then(|e| std::fs::File::open(e.join("data.mdb")).ok());
        release_env_pages(self.env.as_deref(), file.as_ref());
        self.reclaims.fetch_add(1, Ordering::Relaxed);
    }

    /// Highest working set seen.
    pub fn peak_working_set(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// The peaks so far (VmHWM read now).
    pub fn memory(&self) -> super::BuildMemory {
        let now = crate::memory::process_memory();
        super::BuildMemory {
            peak_working_set: self.peak_working_set(),
            peak_rss: now.peak_rss,
            peak_rss_anon: self.peak_anon.load(Ordering::Relaxed).max(now.rss_anon),
            reclaims: self.reclaims(),
        }
    }

    /// Times file pages were released.
    pub fn reclaims(&self) -> u64 {
        self.reclaims.load(Ordering::Relaxed)
    }
}

impl Drop for MemoryGovernor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
