//! A published generation opened for reading: its metadata, image table, descriptor offsets
//! and coarse centroids.

use crate::error::{IndexError, Result};
use crate::ivf::Centroids;
use crate::layout::IndexDir;
use crate::store::{self, BuildMeta, ImageRecord, Store};
use std::path::{Path, PathBuf};

/// A published generation opened for reading.
pub struct Index {
    /// Generation directory.
    pub dir: PathBuf,
    /// Generation number.
    pub generation: u64,
    /// Build metadata.
    pub meta: BuildMeta,
    pub(super) store: Store,
    pub(super) centroids: Centroids,
    pub(super) offsets: Vec<u64>,
}

impl Index {
    /// Opens the generation `current` points to under an index directory.
    pub fn open(root: &Path) -> Result<Index> {
        let (n, dir) = IndexDir::new(root)
            .current()
            .ok_or_else(|| IndexError::NoIndex(root.to_path_buf()))?;
        Self::open_generation(&dir, n)
    }

    /// Opens one generation directory.
    pub fn open_generation(dir: &Path, generation: u64) -> Result<Index> {
        let store = Store::open_read_only(dir)?;
        let rtxn = store.env.read_txn()?;
        let bad = |reason: &str| IndexError::BadIndex {
            path: dir.to_path_buf(),
            reason: reason.to_string(),
        };
        let meta: BuildMeta = store
            .get_json(&rtxn, store::keys::BUILD)?
            .ok_or_else(|| bad("no build metadata"))?;
        if meta.format_version != store::FORMAT_VERSION {
            return Err(bad(&format!(
                "format version {} (this indexer reads {})",
                meta.format_version,
                store::FORMAT_VERSION
            )));
        }
        let centroids = Centroids::from_bytes(
            store
                .meta
                .get(&rtxn, store::keys::CENTROIDS)?
                .ok_or_else(|| bad("no centroids"))?,
        )
        .ok_or_else(|| bad("centroids"))?;
        let offsets = crate::build::read_offsets(
            store
                .meta
                .get(&rtxn, store::keys::OFFSETS)?
                .ok_or_else(|| bad("no offsets"))?,
        );
        drop(rtxn);
        Ok(Index {
            dir: dir.to_path_buf(),
            generation,
            meta,
            store,
            centroids,
            offsets,
        })
    }

    /// Images in the catalogue table (indexed and failed).
    pub fn image_count(&self) -> u64 {
        self.offsets.len().saturating_sub(1) as u64
    }

    /// The record of one image.
    pub fn image(&self, id: u32) -> Result<Option<ImageRecord>> {
        let rtxn = self.store.env.read_txn()?;
        Ok(self.store.images.get(&rtxn, &id)?)
    }

    /// Descriptors kept for an image.
    pub fn kept(&self, id: u32) -> u64 {
        let i = id as usize;
        if i + 1 < self.offsets.len() {
            self.offsets[i + 1] - self.offsets[i]
        } else {
            0
        }
    }

    /// Images that could not be indexed, with their reasons (at most `limit`).
    pub fn failed_images(&self, limit: usize) -> Result<Vec<(String, String)>> {
        let rtxn = self.store.env.read_txn()?;
        let mut out = Vec::new();
        for r in self.store.images.iter(&rtxn)? {
            let (_, rec) = r?;
            if let Some(reason) = rec.error {
                out.push((rec.path, reason));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The image holding a descriptor id.
    pub fn image_of(&self, desc: u32) -> u32 {
        (self
            .offsets
            .partition_point(|&o| o <= desc as u64)
            .saturating_sub(1)) as u32
    }

    /// Total bytes of the generation on disk.
    pub fn disk_bytes(&self) -> u64 {
        std::fs::metadata(self.dir.join("data.mdb")).map_or(0, |m| m.len())
    }

    /// Bytes per database (pages × page size), for `indexer info`.
    pub fn database_bytes(&self) -> Result<Vec<(&'static str, u64)>> {
        let rtxn = self.store.env.read_txn()?;
        let page = 4096u64;
        let pages = |st: heed::DatabaseStat| {
            (st.branch_pages + st.leaf_pages + st.overflow_pages) as u64 * page
        };
        Ok(vec![
            ("meta", pages(self.store.meta.stat(&rtxn)?)),
            ("images", pages(self.store.images.stat(&rtxn)?)),
            ("keypoints", pages(self.store.kps.stat(&rtxn)?)),
            ("lists", pages(self.store.lists.stat(&rtxn)?)),
            ("arroy", pages(self.store.arroy.stat(&rtxn)?)),
        ])
    }

    /// Read access to the store (for tests and tools).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The coarse centroids.
    pub fn centroids(&self) -> &Centroids {
        &self.centroids
    }
}
