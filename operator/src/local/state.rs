//! The state directory of one local ImageIndex: the resource with its status as last written
//! (so a rerun continues the attempt history and resumes), the index the builds write (with
//! its checkpoint), and each attempt's log. Whether a rerun continues is decided by
//! `imageindex_crds::rebuild::build_start` over what this directory holds.
//!
//! ```text
//! STATE/
//!   imageindex.json       the ImageIndex (metadata, spec, status), replaced atomically
//!   index/                `indexer build --out`: published generations, `current`, `build/`
//!   attempts/<n>.log      attempt n's build log (JSON lines)
//!   attempts/<n>.json     attempt n's build summary, when it published
//!   lock                  held (flock) by the one `operator local` using this directory
//! ```

use imageindex_crds::rebuild::Seen;
use imageindex_crds::ImageIndex;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why the state directory cannot be used.
#[derive(Debug, Error)]
pub enum StateError {
    /// A file operation failed.
    #[error("state directory: {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another `operator local` holds the directory.
    #[error("{0} is in use by another `operator local` (only one may build an index at a time)")]
    Busy(PathBuf),
    /// The saved resource cannot be read back.
    #[error("{path} is not a saved ImageIndex ({message}); move it away to start over")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// serde's message.
        message: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` so that readers see the old or the new content, never a part:
/// a temporary file in the same directory, flushed, then renamed over the target.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The default state directory of ImageIndex `name`: `$XDG_STATE_HOME/imageindex/<name>`,
/// else `~/.local/state/imageindex/<name>`, else `.imageindex/<name>`.
pub fn default_dir(name: &str, xdg_state_home: Option<&str>, home: Option<&str>) -> PathBuf {
    match (
        xdg_state_home.filter(|s| !s.is_empty()),
        home.filter(|s| !s.is_empty()),
    ) {
        (Some(state), _) => Path::new(state).join("imageindex").join(name),
        (None, Some(home)) => Path::new(home).join(".local/state/imageindex").join(name),
        (None, None) => Path::new(".imageindex").join(name),
    }
}

/// An open state directory, locked for this process.
#[derive(Debug)]
pub struct StateDir {
    root: PathBuf,
    _lock: File,
}

impl StateDir {
    /// Creates (if needed) and locks the directory.
    pub fn open(root: &Path) -> Result<StateDir, StateError> {
        fs::create_dir_all(root.join("attempts")).map_err(io_err(root))?;
        let root = &fs::canonicalize(root).map_err(io_err(root))?;
        let lock_path = root.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        // SAFETY: flock on a file descriptor this function owns; no memory is shared.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(StateError::Busy(root.to_path_buf()));
        }
        Ok(StateDir {
            root: root.to_path_buf(),
            _lock: lock,
        })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The index directory the builds write and the query service reads.
    pub fn index_dir(&self) -> PathBuf {
        self.root.join("index")
    }

    /// Whether a generation has been published in the index directory.
    pub fn published(&self) -> bool {
        self.index_dir().join("current").exists()
    }

    /// Attempt `n`'s build log.
    pub fn attempt_log(&self, n: u32) -> PathBuf {
        self.root.join("attempts").join(format!("{n}.log"))
    }

    /// Attempt `n`'s build summary.
    pub fn attempt_summary(&self, n: u32) -> PathBuf {
        self.root.join("attempts").join(format!("{n}.json"))
    }

    fn record(&self) -> PathBuf {
        self.root.join("imageindex.json")
    }

    /// The ImageIndex as last saved, if any.
    pub fn load(&self) -> Result<Option<ImageIndex>, StateError> {
        let path = self.record();
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StateError::Corrupt {
                        path,
                        message: e.to_string(),
                    })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Saves the ImageIndex atomically.
    pub fn save(&self, index: &ImageIndex) -> Result<(), StateError> {
        let path = self.record();
        let bytes = serde_json::to_vec_pretty(index).map_err(|e| StateError::Io {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        write_atomically(&path, &bytes).map_err(io_err(&path))
    }
}

/// The ImageIndex this run works on: the manifest's metadata and spec with the saved status.
/// `metadata.generation` counts spec changes across runs as the API server counts them (it is
/// what `status.observedGeneration` and conditions refer to), so a changed spec shows as in a
/// cluster: a generation the status has not observed.
pub fn record_for_run(saved: Option<ImageIndex>, manifest: &ImageIndex, now: Time) -> ImageIndex {
    let mut record = manifest.clone();
    let (generation, created, status) = match saved {
        None => (1, now, None),
        Some(saved) => {
            let before = saved.metadata.generation.unwrap_or(1);
            let changed = saved.spec != manifest.spec;
            (
                if changed { before + 1 } else { before },
                saved.metadata.creation_timestamp.unwrap_or(now),
                saved.status,
            )
        }
    };
    record.metadata.generation = Some(generation);
    record.metadata.creation_timestamp = Some(created);
    record.status = status;
    record
}

/// What a run sees of the build recorded in `record` (from [`record_for_run`]): the spec
/// against the saved status, as a cluster would show it, and — once the run has scanned — the
/// dataset's fingerprint and whether the index directory holds a published generation. Nothing
/// of an earlier run is still running, so a changed spec starts over.
pub fn seen<'a>(
    record: &'a ImageIndex,
    fingerprint: Option<&'a str>,
    published: Option<bool>,
) -> Seen<'a> {
    let before = record.status.clone().unwrap_or_default();
    Seen {
        fingerprint,
        published,
        spec_change_restarts: true,
        ..Seen::of_spec(
            &before,
            record.metadata.generation,
            record.spec.rebuild.as_deref(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imageindex_crds::types::IndexPhase;
    use imageindex_crds::ImageIndexStatus;

    fn building() -> ImageIndexStatus {
        let mut s = ImageIndexStatus {
            observed_generation: Some(1),
            ..ImageIndexStatus::default()
        };
        s.unit.phase = Some(IndexPhase::Building);
        s
    }

    #[test]
    fn generations_count_spec_changes_across_runs() {
        let spec = |limit: &str| -> imageindex_crds::ImageIndexSpec {
            serde_yaml::from_str(&format!("dataset: {{path: x}}\nmemoryLimit: {limit}\n")).unwrap()
        };
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(10).unwrap());
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(20).unwrap());
        let manifest = ImageIndex::new("cats", spec("1Gi"));
        let first = record_for_run(None, &manifest, t0.clone());
        assert_eq!(first.metadata.generation, Some(1));
        let mut saved = first.clone();
        saved.status = Some(building());
        let again = record_for_run(Some(saved.clone()), &manifest, t1.clone());
        assert_eq!(again.metadata.generation, Some(1));
        assert_eq!(again.status, saved.status);
        assert_eq!(again.metadata.creation_timestamp, Some(t0));
        let bigger = ImageIndex::new("cats", spec("2Gi"));
        let next = record_for_run(Some(saved), &bigger, t1);
        assert_eq!(next.metadata.generation, Some(2));
        // The status observed generation 1: the spec changed, as a cluster would show it.
        assert_ne!(
            next.status.as_ref().and_then(|s| s.observed_generation),
            next.metadata.generation
        );
    }

    #[test]
    fn default_dirs() {
        assert_eq!(
            default_dir("cats", Some("/s"), Some("/h")),
            Path::new("/s/imageindex/cats")
        );
        assert_eq!(
            default_dir("cats", Some(""), Some("/h")),
            Path::new("/h/.local/state/imageindex/cats")
        );
        assert_eq!(
            default_dir("cats", None, None),
            Path::new(".imageindex/cats")
        );
    }

    #[test]
    fn saves_atomically_loads_back_and_locks() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert!(state.load().unwrap().is_none());
        assert!(matches!(
            StateDir::open(dir.path()),
            Err(StateError::Busy(_))
        ));
        let ii = ImageIndex::new(
            "cats",
            serde_yaml::from_str("dataset: {path: x}\nmemoryLimit: 1Gi\n").unwrap(),
        );
        state.save(&ii).unwrap();
        assert_eq!(state.load().unwrap(), Some(ii));
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        assert!(!state.published());
        let root = fs::canonicalize(dir.path()).unwrap();
        assert_eq!(state.attempt_log(2), root.join("attempts/2.log"));
        fs::write(dir.path().join("imageindex.json"), "{").unwrap();
        assert!(matches!(state.load(), Err(StateError::Corrupt { .. })));
        drop(state);
        assert!(StateDir::open(dir.path()).is_ok());
    }
}
