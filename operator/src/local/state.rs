//! The state directory of one local ImageIndex: the resource with its status as last written
//! (so a rerun continues the attempt history and resumes), the index the builds write (with
//! its checkpoint), and each attempt's log.
//!
//! ```text
//! STATE/
//!   imageindex.json       the ImageIndex (metadata, spec, status), replaced atomically
//!   index/                `indexer build --out`: published generations, `current`, `build/`
//!   attempts/<n>.log      attempt n's build log (JSON lines)
//!   attempts/<n>.json     attempt n's build summary, when it published
//!   lock                  held (flock) by the one `operator local` using this directory
//! ```

use imageindex_crds::types::Phase;
use imageindex_crds::{ImageIndex, ImageIndexStatus};
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
/// `metadata.generation` counts spec changes across runs (it is what conditions'
/// `observedGeneration` refer to); returns whether the spec changed since the saved run.
pub fn record_for_run(
    saved: Option<ImageIndex>,
    manifest: &ImageIndex,
    now: Time,
) -> (ImageIndex, bool) {
    let mut record = manifest.clone();
    let (generation, changed, created, status) = match saved {
        None => (1, false, now, None),
        Some(saved) => {
            let before = saved.metadata.generation.unwrap_or(1);
            let changed = saved.spec != manifest.spec;
            (
                if changed { before + 1 } else { before },
                changed,
                saved.metadata.creation_timestamp.unwrap_or(now),
                saved.status,
            )
        }
    };
    record.metadata.generation = Some(generation);
    record.metadata.creation_timestamp = Some(created);
    record.status = status;
    (record, changed)
}

/// Why a run starts a new build instead of continuing the recorded one, judged before the
/// scan; `None`: the recorded build may continue if the dataset is unchanged.
pub fn new_build_reason(
    saved: Option<&ImageIndexStatus>,
    spec_changed: bool,
) -> Option<&'static str> {
    let Some(saved) = saved else {
        return Some("first run");
    };
    if spec_changed {
        return Some("the spec changed");
    }
    match saved.phase {
        None => Some("no build recorded"),
        Some(Phase::Failed) => Some("the last build failed"),
        Some(_) if saved.scan.is_none() => Some("no scan recorded"),
        Some(_) => None,
    }
}

/// How a run goes on from a recorded build whose spec is unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Continuation {
    /// Build anew, for this reason.
    NewBuild(&'static str),
    /// Its index is published and current: nothing to build.
    Published,
    /// It was stopped before it published: resume it from the checkpoint.
    Resume,
}

/// Decides how to go on from `saved` now that the dataset's `fingerprint` is known and
/// whether the index directory holds a published generation.
pub fn continuation(saved: &ImageIndexStatus, fingerprint: &str, published: bool) -> Continuation {
    if saved.scan.as_ref().map(|s| s.fingerprint.as_str()) != Some(fingerprint) {
        Continuation::NewBuild("the dataset changed")
    } else if saved.phase == Some(Phase::Ready) {
        if published {
            Continuation::Published
        } else {
            Continuation::NewBuild("the published index is gone")
        }
    } else {
        Continuation::Resume
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imageindex_crds::types::ScanSummary;

    fn status(phase: Phase, fingerprint: &str) -> ImageIndexStatus {
        ImageIndexStatus {
            phase: Some(phase),
            scan: Some(ScanSummary {
                fingerprint: fingerprint.into(),
                ..ScanSummary::default()
            }),
            ..ImageIndexStatus::default()
        }
    }

    #[test]
    fn reruns_continue_unless_something_changed() {
        assert_eq!(new_build_reason(None, false), Some("first run"));
        let building = status(Phase::Building, "f1");
        assert_eq!(new_build_reason(Some(&building), false), None);
        assert_eq!(
            new_build_reason(Some(&building), true),
            Some("the spec changed")
        );
        assert_eq!(
            new_build_reason(Some(&status(Phase::Failed, "f1")), false),
            Some("the last build failed")
        );
        assert_eq!(
            new_build_reason(Some(&ImageIndexStatus::default()), false),
            Some("no build recorded")
        );
        assert_eq!(continuation(&building, "f1", false), Continuation::Resume);
        assert_eq!(
            continuation(&building, "f2", false),
            Continuation::NewBuild("the dataset changed")
        );
        let ready = status(Phase::Ready, "f1");
        assert_eq!(continuation(&ready, "f1", true), Continuation::Published);
        assert_eq!(
            continuation(&ready, "f1", false),
            Continuation::NewBuild("the published index is gone")
        );
    }

    #[test]
    fn generations_count_spec_changes_across_runs() {
        let spec = |limit: &str| -> imageindex_crds::ImageIndexSpec {
            serde_yaml::from_str(&format!("dataset: {{path: x}}\nmemoryLimit: {limit}\n")).unwrap()
        };
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(10).unwrap());
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(20).unwrap());
        let manifest = ImageIndex::new("cats", spec("1Gi"));
        let (first, changed) = record_for_run(None, &manifest, t0.clone());
        assert_eq!((first.metadata.generation, changed), (Some(1), false));
        let mut saved = first.clone();
        saved.status = Some(status(Phase::Building, "f"));
        let (again, changed) = record_for_run(Some(saved.clone()), &manifest, t1.clone());
        assert_eq!((again.metadata.generation, changed), (Some(1), false));
        assert_eq!(again.status, saved.status);
        assert_eq!(again.metadata.creation_timestamp, Some(t0));
        let bigger = ImageIndex::new("cats", spec("2Gi"));
        let (next, changed) = record_for_run(Some(saved), &bigger, t1);
        assert_eq!((next.metadata.generation, changed), (Some(2), true));
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
