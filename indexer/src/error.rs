//! The indexer's error type: one variant per kind of failure a caller can act on.

use std::path::PathBuf;
use thiserror::Error;

/// Everything that can go wrong in the data path.
#[derive(Debug, Error)]
pub enum IndexError {
    /// The dataset directory is missing or unreadable (exit code 3).
    #[error("dataset {path}: {source}")]
    Dataset {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The index volume is full (exit code 4); the checkpoint is intact.
    #[error("out of disk space writing {path}; the checkpoint is intact, free space and rerun to resume")]
    NoSpace {
        /// Where it was writing.
        path: PathBuf,
    },
    /// Another file-system problem with the index directory.
    #[error("index directory {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// LMDB refused an operation.
    #[error("LMDB: {0}")]
    Lmdb(#[from] heed::Error),
    /// arroy refused an operation.
    #[error("arroy: {0}")]
    Arroy(#[from] arroy::Error),
    /// OpenCV failed on something that is not the image's fault.
    #[error("OpenCV: {0}")]
    OpenCv(#[from] opencv::Error),
    /// The preset cannot fit the memory budget (exit code 5).
    #[error(transparent)]
    DoesNotFit(#[from] imageindex_crds::estimate::DoesNotFit),
    /// No published index at this path.
    #[error("no published index in {0} (build one with `indexer build`)")]
    NoIndex(PathBuf),
    /// The index on disk is of a format this binary does not read.
    #[error("index {path} is unreadable: {reason}")]
    BadIndex {
        /// The generation directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Another build holds the lock on this index directory.
    #[error("another build is running on {0} (lock held)")]
    Locked(PathBuf),
    /// The build was cancelled (SIGTERM/SIGINT); the checkpoint is intact (exit code 6).
    #[error("build interrupted; the checkpoint is intact, rerun the same command to resume")]
    Interrupted,
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
}

impl IndexError {
    /// Wraps an I/O error on an index path, recognising a full disk.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            IndexError::NoSpace { path }
        } else {
            IndexError::Io { path, source }
        }
    }

    /// Reclassifies a write failure as [`IndexError::NoSpace`] when the index's file system
    /// is (nearly) full: LMDB reports a full disk as EIO or ENOSPC depending on where it fails.
    pub fn or_no_space(self, dir: &std::path::Path) -> Self {
        let io_like = matches!(
            self,
            IndexError::Io { .. } | IndexError::Lmdb(heed::Error::Io(_)) | IndexError::Arroy(_)
        );
        if io_like && free_bytes(dir).is_some_and(|free| free < 16 << 20) {
            IndexError::NoSpace {
                path: dir.to_path_buf(),
            }
        } else {
            self
        }
    }

    /// The process exit code for this error (see `imageindex_crds::policy::exit_code`).
    pub fn exit_code(&self) -> i32 {
        use imageindex_crds::policy::exit_code as code;
        match self {
            IndexError::Dataset { .. } => code::DATASET,
            IndexError::NoSpace { .. } => code::NO_SPACE,
            IndexError::Lmdb(heed::Error::Mdb(heed::MdbError::MapFull)) => code::NO_SPACE,
            IndexError::Lmdb(heed::Error::Io(e)) if e.raw_os_error() == Some(libc::ENOSPC) => {
                code::NO_SPACE
            }
            IndexError::DoesNotFit(_) => code::DOES_NOT_FIT,
            IndexError::Interrupted => code::INTERRUPTED,
            IndexError::Usage(_) | IndexError::Locked(_) => code::USAGE,
            _ => code::ERROR,
        }
    }
}

/// Bytes available to unprivileged writers on the file system holding `dir` (or its
/// nearest existing ancestor).
pub fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let mut d = dir;
    while !d.exists() {
        d = d.parent()?;
    }
    let c = std::ffi::CString::new(d.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs writes into the struct we own.
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0)
        .then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Result with [`IndexError`].
pub type Result<T, E = IndexError> = std::result::Result<T, E>;
