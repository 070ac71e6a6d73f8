//! The index directory: published generations, the `current` pointer, the in-progress build.
//!
//! ```text
//! IDX/
//!   current -> gen-000003     symlink, replaced by one rename(2): readers never see a half-built index
//!   gen-000002/data.mdb       the previous generation, kept for readers still on it
//!   gen-000003/data.mdb
//!   build/                    the in-progress build environment with its checkpoint
//!   build.lock                held (flock) by the one running build
//! ```

use crate::error::{IndexError, Result};
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Name of the pointer to the served generation.
pub const CURRENT: &str = "current";
/// Directory of the in-progress build.
pub const BUILD_DIR: &str = "build";
/// Lock file held by a running build.
pub const LOCK_FILE: &str = "build.lock";
const GEN_PREFIX: &str = "gen-";

/// Paths inside one index directory.
#[derive(Clone, Debug)]
pub struct IndexDir {
    root: PathBuf,
}

/// An exclusive lock on an index directory, released on drop.
pub struct BuildLock {
    _file: File,
}

impl IndexDir {
    /// The layout under `root` (not created yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        IndexDir { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The in-progress build directory.
    pub fn build_dir(&self) -> PathBuf {
        self.root.join(BUILD_DIR)
    }

    /// Directory of generation `n`.
    pub fn generation_dir(&self, n: u64) -> PathBuf {
        self.root.join(format!("{GEN_PREFIX}{n:06}"))
    }

    /// Creates the root and takes the build lock (fails if another build holds it).
    pub fn lock(&self) -> Result<BuildLock> {
        fs::create_dir_all(&self.root).map_err(|e| IndexError::io(&self.root, e))?;
        let path = self.root.join(LOCK_FILE);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| IndexError::io(&path, e))?;
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(IndexError::Locked(self.root.clone()));
        }
        Ok(BuildLock { _file: file })
    }

    /// Published generations, oldest first.
    pub fn generations(&self) -> Result<Vec<u64>> {
        let mut gens = Vec::new();
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(gens),
            Err(e) => return Err(IndexError::io(&self.root, e)),
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if let Some(n) = name
                .to_str()
                .and_then(|s| s.strip_prefix(GEN_PREFIX))
                .and_then(|s| s.parse::<u64>().ok())
            {
                if entry.path().join("data.mdb").is_file() {
                    gens.push(n);
                }
            }
        }
        gens.sort_unstable();
        Ok(gens)
    }

    /// The generation `current` points to, if any.
    pub fn current(&self) -> Option<(u64, PathBuf)> {
        let target = fs::read_link(self.root.join(CURRENT)).ok()?;
        let name = target.file_name()?.to_str()?.to_string();
        let n = name.strip_prefix(GEN_PREFIX)?.parse::<u64>().ok()?;
        let dir = self.root.join(&name);
        dir.join("data.mdb").is_file().then_some((n, dir))
    }

    /// The number the next published generation gets.
    pub fn next_generation(&self) -> Result<u64> {
        let last = self.generations()?.last().copied().unwrap_or(0);
        Ok(last.max(self.current().map_or(0, |(n, _)| n)) + 1)
    }

    /// Points `current` at generation `n` with one atomic rename, then syncs the directory.
    pub fn switch_current(&self, n: u64) -> Result<()> {
        let tmp = self.root.join(format!("{CURRENT}.tmp"));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("{GEN_PREFIX}{n:06}"), &tmp)
            .map_err(|e| IndexError::io(&tmp, e))?;
        fs::rename(&tmp, self.root.join(CURRENT)).map_err(|e| IndexError::io(&self.root, e))?;
        sync_dir(&self.root)
    }

    /// Removes generations older than the current one's predecessor.
    pub fn prune(&self) -> Result<Vec<u64>> {
        let Some((current, _)) = self.current() else {
            return Ok(Vec::new());
        };
        let gens = self.generations()?;
        let keep_previous = gens.iter().rev().find(|g| **g < current).copied();
        let mut removed = Vec::new();
        for g in gens {
            if g != current && Some(g) != keep_previous {
                let dir = self.generation_dir(g);
                fs::remove_dir_all(&dir).map_err(|e| IndexError::io(&dir, e))?;
                removed.push(g);
            }
        }
        // Leftovers of a publish that was killed half-way.
        if let Ok(entries) = fs::read_dir(&self.root) {
            for e in entries.flatten() {
                let name = e.file_name();
                if name
                    .to_str()
                    .is_some_and(|s| s.starts_with(GEN_PREFIX) && s.ends_with(".tmp"))
                {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(removed)
    }
}

/// fsyncs a directory so renames in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| IndexError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_generation(d: &IndexDir, n: u64) {
        let g = d.generation_dir(n);
        fs::create_dir_all(&g).unwrap();
        fs::write(g.join("data.mdb"), b"x").unwrap();
    }

    #[test]
    fn current_switches_atomically_and_prune_keeps_previous() {
        let tmp = tempfile::tempdir().unwrap();
        let d = IndexDir::new(tmp.path().join("idx"));
        let _lock = d.lock().unwrap();
        assert_eq!(d.current(), None);
        assert_eq!(d.next_generation().unwrap(), 1);
        for n in 1..=3 {
            fake_generation(&d, n);
            d.switch_current(n).unwrap();
        }
        assert_eq!(d.current().unwrap().0, 3);
        assert_eq!(d.prune().unwrap(), vec![1]);
        assert_eq!(d.generations().unwrap(), vec![2, 3]);
        assert_eq!(d.next_generation().unwrap(), 4);
    }

    #[test]
    fn a_second_build_cannot_take_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let d = IndexDir::new(tmp.path());
        let held = d.lock().unwrap();
        assert!(matches!(d.lock(), Err(IndexError::Locked(_))));
        drop(held);
        assert!(d.lock().is_ok());
    }
}
