//! Runs a build as a child process (optionally inside its own memory cgroup) and collects
//! its summary and memory peaks, so benchmarks measure the build alone.

use imageindex_cgroup::{Hierarchy, Limits, DEFAULT_ROOT, PARENT};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// What the child build reported plus what the cgroup saw.
#[derive(Clone, Debug, Default)]
pub struct ChildBuild {
    /// Wall time.
    pub seconds: f64,
    /// Exit code (137 when killed).
    pub exit_code: i32,
    /// The child's JSON summary, if it finished.
    pub summary: Option<serde_json::Value>,
    /// Peak working set the child's governor saw.
    pub peak_working_set: u64,
    /// Peak RSS (VmHWM) of the child.
    pub peak_rss: u64,
    /// Peak anonymous RSS of the child.
    pub peak_rss_anon: u64,
    /// The cgroup's own peak usage (includes page cache).
    pub cgroup_peak: Option<u64>,
    /// OOM kills in the cgroup.
    pub oom_kills: u64,
    /// Index size on disk.
    pub disk_bytes: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Mem {
    peak_working_set: u64,
    peak_rss: u64,
    peak_rss_anon: u64,
}

/// Runs `indexer <args…> --json` (a build), inside a fresh cgroup with `limit` when given;
/// its log goes to `<out_dir>.log`.
pub fn run_build(
    args: &[String],
    limit: Option<u64>,
    out_dir: &Path,
) -> std::io::Result<ChildBuild> {
    let exe: PathBuf = std::env::current_exe()?;
    let group = match limit {
        Some(l) => Some(
            Hierarchy::require(Path::new(DEFAULT_ROOT))
                .and_then(|h| {
                    let name = format!("bench-{}-{}", std::process::id(), rand_suffix());
                    h.create(&Path::new(PARENT).join(name), Limits::memory(l))
                })
                .map_err(std::io::Error::other)?,
        ),
        None => None,
    };
    let mut cmd = Command::new(&exe);
    cmd.args(args).arg("--json").arg("--log-format").arg("json");
    let t = Instant::now();
    let child = {
        use std::os::unix::process::CommandExt;
        if let Some(g) = &group {
            use std::os::unix::ffi::OsStrExt;
            let procs = std::ffi::CString::new(g.dir().join("cgroup.procs").as_os_str().as_bytes())
                .map_err(std::io::Error::other)?;
            // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                    libc::close(fd);
                    if ok {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let log = std::fs::File::create(out_dir.with_extension("log"))?;
        cmd.stderr(log).output()?
    };
    let seconds = t.elapsed().as_secs_f64();
    let summary: Option<serde_json::Value> = serde_json::from_slice(&child.stdout).ok();
    let mem: Option<Mem> = summary
        .as_ref()
        .and_then(|s| serde_json::from_value(s["memory"].clone()).ok());
    let mut r = ChildBuild {
        seconds,
        exit_code: child.status.code().unwrap_or(128 + 9),
        peak_working_set: mem.as_ref().map_or(0, |m| m.peak_working_set),
        peak_rss: mem.as_ref().map_or(0, |m| m.peak_rss),
        peak_rss_anon: mem.as_ref().map_or(0, |m| m.peak_rss_anon),
        summary,
        disk_bytes: dir_bytes(&out_dir.join("current")),
        ..Default::default()
    };
    if let Some(g) = group {
        r.cgroup_peak = g.peak();
        r.oom_kills = g.oom_kills().unwrap_or(0);
        let _ = g.remove(std::time::Duration::from_secs(1));
    }
    Ok(r)
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64)
}

/// Total bytes of the files in a directory (following a symlinked directory).
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
