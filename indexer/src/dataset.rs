//! The dataset: which files are images to index, in a stable order, with a fingerprint and
//! the shape (largest image) the memory estimate needs. Problems found while listing
//! (symlink loops, broken links, non-UTF-8 names, unreadable directories, special files)
//! are recorded with their reason, never fatal.

use crate::error::{IndexError, Result};
use crate::imageguard::{self, Format};
use imageindex_crds::estimate::DatasetShape;
use imageindex_crds::scan::{keep_largest, LargeImage, LARGEST_KEPT};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// File extensions (lowercase) treated as images.
pub const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "jpe"];

/// One image file of the dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// Path relative to the dataset root, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Modification time (seconds since the epoch).
    pub mtime: i64,
}

/// A file that looks like an image by name but cannot be indexed, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// Path relative to the root (lossy for non-UTF-8 names).
    pub path: String,
    /// Why.
    pub reason: String,
}

/// The listing of a dataset.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// Image files, sorted by path.
    pub files: Vec<FileEntry>,
    /// Problems found while listing.
    pub skipped: Vec<Skipped>,
    /// Hex digest of the sorted (path, size, mtime) list.
    pub fingerprint: String,
}

impl Listing {
    /// Keeps only the images (and the problems) of `shard`, and marks the fingerprint with
    /// it, so that a shard's build never resumes another shard's checkpoint.
    pub fn keep_shard(&mut self, shard: crate::shard::Shard) {
        self.files.retain(|f| shard.holds(&f.path));
        self.skipped.retain(|s| shard.holds(&s.path));
        self.fingerprint = format!(
            "{}#shard-{}-of-{}",
            self.fingerprint, shard.index, shard.count
        );
    }
}

fn is_image_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    match lower.rsplit_once('.') {
        Some((stem, ext)) => !stem.is_empty() && IMAGE_EXTENSIONS.contains(&ext),
        None => false,
    }
}

/// Lists the image files under `root` (following symlinks, detecting loops).
pub fn list(root: &Path) -> Result<Listing> {
    let meta = std::fs::metadata(root).map_err(|e| IndexError::Dataset {
        path: root.to_path_buf(),
        source: e,
    })?;
    if !meta.is_dir() {
        return Err(IndexError::Dataset {
            path: root.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    let rel = |p: &Path| {
        p.strip_prefix(root)
            .unwrap_or(p)
            .to_string_lossy()
            .replace('\\', "/")
    };
    for entry in walkdir::WalkDir::new(root)
        .follow_links(true)
        .sort_by_file_name()
    {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let path = e.path().map(rel).unwrap_or_default();
                let reason = if e.loop_ancestor().is_some() {
                    "symlink loop".to_string()
                } else if let Some(io) = e.io_error() {
                    if io.kind() == std::io::ErrorKind::NotFound {
                        "broken symlink".to_string()
                    } else {
                        format!("unreadable: {io}")
                    }
                } else {
                    e.to_string()
                };
                // Only report entries that would have been images (or directories we lost).
                let name = path.rsplit('/').next().unwrap_or("");
                if is_image_name(name)
                    || e.loop_ancestor().is_some()
                    || e.depth() == 0
                    || !name.contains('.')
                {
                    skipped.push(Skipped { path, reason });
                }
                continue;
            }
        };
        if entry.file_type().is_dir() {
            continue;
        }
        let raw_name = entry.file_name();
        let lossy = raw_name.to_string_lossy();
        if lossy.starts_with('.') || !is_image_name(&lossy) {
            continue;
        }
        if raw_name.to_str().is_none() || entry.path().to_str().is_none() {
            skipped.push(Skipped {
                path: rel(entry.path()),
                reason: "file name is not valid UTF-8".into(),
            });
            continue;
        }
        let md = match entry.metadata() {
            Ok(m) => m,
            Err(e) => {
                skipped.push(Skipped {
                    path: rel(entry.path()),
                    reason: format!("unreadable: {e}"),
                });
                continue;
            }
        };
        if !md.is_file() {
            skipped.push(Skipped {
                path: rel(entry.path()),
                reason: "not a regular file".into(),
            });
            continue;
        }
        let mtime = md
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() as i64);
        files.push(FileEntry {
            path: rel(entry.path()),
            bytes: md.len(),
            mtime,
        });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    let mut h = blake3::Hasher::new();
    for f in &files {
        h.update(f.path.as_bytes());
        h.update(&[0]);
        h.update(&f.bytes.to_le_bytes());
        h.update(&f.mtime.to_le_bytes());
    }
    let fingerprint = h.finalize().to_hex()[..32].to_string();
    Ok(Listing {
        files,
        skipped,
        fingerprint,
    })
}

/// What reading a sample of headers learned ([`shape`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// The dataset's shape: counts, and the largest sampled image.
    pub shape: DatasetShape,
    /// Headers read.
    pub read: u64,
    /// The largest sampled images (at most [`imageindex_crds::scan::LARGEST_KEPT`], largest
    /// first), each with the key of its path, for the per-shard estimates.
    pub largest: Vec<LargeImage>,
}

/// Reads the headers of up to `sample` files (the largest files first, then evenly spread):
/// the dataset shape, how many headers were read and the largest of them.
pub fn shape(root: &Path, listing: &Listing, sample: usize) -> Sample {
    let mut shape = DatasetShape {
        images: listing.files.len() as u64,
        bytes: listing.files.iter().map(|f| f.bytes).sum(),
        ..Default::default()
    };
    let n = listing.files.len();
    if n == 0 || sample == 0 {
        return Sample {
            shape,
            read: 0,
            largest: Vec::new(),
        };
    }
    let mut picks: Vec<usize> = (0..n).collect();
    picks.sort_by_key(|&i| std::cmp::Reverse(listing.files[i].bytes));
    let mut chosen: Vec<usize> = picks.iter().take(sample / 4 + 1).copied().collect();
    let spread = sample.saturating_sub(chosen.len()).max(1);
    chosen.extend((0..spread).map(|k| k * n / spread));
    chosen.sort_unstable();
    chosen.dedup();
    let mut read = 0;
    let mut max_pixels = 0u64;
    let mut largest = Vec::new();
    for i in chosen {
        let path = root.join(&listing.files[i].path);
        let Some((format, w, h)) = header_of_file(&path) else {
            continue;
        };
        read += 1;
        let px = w as u64 * h as u64;
        let jpeg = format == Format::Jpeg;
        if px > max_pixels {
            max_pixels = px;
            shape.max_width = w;
            shape.max_height = h;
            shape.max_is_jpeg = jpeg;
        }
        largest.push(LargeImage::new(&listing.files[i].path, w, h, jpeg));
        if largest.len() >= 4 * LARGEST_KEPT {
            largest = keep_largest(largest);
        }
    }
    Sample {
        shape,
        read,
        largest: keep_largest(largest),
    }
}

/// The format and size from a file's header, refusing oversized ones.
pub fn header_of_file(path: &Path) -> Option<(Format, u32, u32)> {
    use std::io::Read;
    let mut head = Vec::with_capacity(64 * 1024);
    std::fs::File::open(path)
        .ok()?
        .take(256 * 1024)
        .read_to_end(&mut head)
        .ok()?;
    let format = imageguard::sniff(&head)?;
    let size = imagesize::size(path).ok()?;
    let (w, h) = (size.width as u64, size.height as u64);
    if w == 0 || h == 0 || w * h > imageguard::MAX_PIXELS {
        return None;
    }
    Some((format, w as u32, h as u32))
}

/// The absolute path of an entry.
pub fn full_path(root: &Path, entry_path: &str) -> PathBuf {
    root.join(entry_path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn lists_images_in_order_and_reports_problems() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir_all(root.join("b/sub")).unwrap();
        fs::write(root.join("b/sub/z.JPG"), b"x").unwrap();
        fs::write(root.join("a.png"), b"xy").unwrap();
        fs::write(root.join("notes.txt"), b"not an image name").unwrap();
        fs::write(root.join(".hidden.jpg"), b"x").unwrap();
        std::os::unix::fs::symlink(root, root.join("b/loop")).unwrap();
        std::os::unix::fs::symlink(root.join("missing.jpg"), root.join("dangling.jpg")).unwrap();
        let bad = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"bad\xff.jpg");
        fs::write(root.join(bad), b"x").unwrap();
        let l = list(root).unwrap();
        let paths: Vec<&str> = l.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["a.png", "b/sub/z.JPG"]);
        let reasons: Vec<(&str, &str)> = l
            .skipped
            .iter()
            .map(|s| (s.path.as_str(), s.reason.as_str()))
            .collect();
        assert!(reasons.contains(&("b/loop", "symlink loop")), "{reasons:?}");
        assert!(
            reasons.contains(&("dangling.jpg", "broken symlink")),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|(_, r)| *r == "file name is not valid UTF-8"),
            "{reasons:?}"
        );
        assert_eq!(l.fingerprint.len(), 32);
    }

    #[test]
    fn fingerprint_changes_with_the_dataset() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("a.jpg"), b"x").unwrap();
        let a = list(tmp.path()).unwrap().fingerprint;
        assert_eq!(a, list(tmp.path()).unwrap().fingerprint);
        fs::write(tmp.path().join("b.jpg"), b"y").unwrap();
        assert_ne!(a, list(tmp.path()).unwrap().fingerprint);
    }

    #[test]
    fn missing_root_is_a_dataset_error() {
        assert!(matches!(
            list(Path::new("/nonexistent/dataset")),
            Err(IndexError::Dataset { .. })
        ));
    }

    /// The scan's list of largest images tells each shard its own largest image: what
    /// `crds::shards::shard_scan` makes of the whole's scan equals a scan of the shard alone.
    #[test]
    fn the_whole_scan_tells_each_shard_its_largest_image() {
        use imageindex_crds::shards::shard_scan;
        use opencv::core::{Mat, Scalar, CV_8UC1};
        let tmp = tempfile::tempdir().unwrap();
        let mut per_shard = [0; 3];
        for i in 0..12u32 {
            let name = format!("img_{i:02}.png");
            per_shard[crate::shard::shard_of(&name, 3) as usize] += 1;
            let m =
                Mat::new_rows_cols_with_default(20 + 7 * i as i32, 30, CV_8UC1, Scalar::all(9.0))
                    .unwrap();
            opencv::imgcodecs::imwrite(
                tmp.path().join(&name).to_str().unwrap(),
                &m,
                &opencv::core::Vector::new(),
            )
            .unwrap();
        }
        assert!(per_shard.iter().all(|n| *n > 0), "{per_shard:?}");
        let whole = list(tmp.path()).unwrap();
        let sample = shape(tmp.path(), &whole, 64);
        assert_eq!(sample.read, 12);
        assert_eq!(
            (sample.shape.max_width, sample.shape.max_height),
            (30, 20 + 7 * 11)
        );
        assert_eq!(sample.largest.len(), 12);
        let report = imageindex_crds::ScanReport::new(
            sample.shape,
            0,
            12,
            whole.fingerprint.clone(),
            None,
            1,
        )
        .with_largest(sample.largest);
        let summary = imageindex_crds::types::ScanSummary::from_report(&report);
        for s in 0..3 {
            let mut part = whole.clone();
            part.keep_shard(crate::shard::Shard { index: s, count: 3 });
            let alone = shape(tmp.path(), &part, 64).shape;
            let told = shard_scan(&summary, 3, Some(s));
            assert_eq!(
                (told.max_width, told.max_height, told.max_is_jpeg),
                (alone.max_width, alone.max_height, alone.max_is_jpeg),
                "shard {s}"
            );
        }
    }
}
