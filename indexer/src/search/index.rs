//! A published generation opened for reading: its metadata, image table, vocabulary and
//! list layout, and the arroy index of global descriptors.

use crate::error::{IndexError, Result};
use crate::layout::IndexDir;
use crate::lists::ListIndex;
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
    pub(super) lists: ListIndex,
    /// Descriptors each image has in the lists (by image id).
    pub(super) kept: Vec<u32>,
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
                "format version {} (this indexer reads {}); rebuild the index",
                meta.format_version,
                store::FORMAT_VERSION
            )));
        }
        let lists = ListIndex::open(&store, &rtxn)?;
        let nfeatures = meta.preset.nfeatures;
        let mut kept = Vec::new();
        for r in store.images.iter(&rtxn)? {
            let (_, rec) = r?;
            kept.push(if rec.error.is_some() {
                0
            } else {
                rec.count.min(nfeatures)
            });
        }
        drop(rtxn);
        Ok(Index {
            dir: dir.to_path_buf(),
            generation,
            meta,
            store,
            lists,
            kept,
        })
    }

    /// Images in the catalogue table (indexed and failed).
    pub fn image_count(&self) -> u64 {
        self.kept.len() as u64
    }

    /// The record of one image.
    pub fn image(&self, id: u32) -> Result<Option<ImageRecord>> {
        let rtxn = self.store.env.read_txn()?;
        Ok(self.store.images.get(&rtxn, &id)?)
    }

    /// Descriptors kept for an image.
    pub fn kept(&self, id: u32) -> u64 {
        self.kept.get(id as usize).copied().unwrap_or(0) as u64
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
            ("cells", pages(self.store.cells.stat(&rtxn)?)),
            ("lists", pages(self.store.lists.stat(&rtxn)?)),
            ("globals", pages(self.store.globals.stat(&rtxn)?)),
            ("arroy", pages(self.store.arroy.stat(&rtxn)?)),
        ])
    }

    /// Read access to the store (for tests and tools).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The vocabulary and list layout.
    pub fn lists(&self) -> &ListIndex {
        &self.lists
    }
}
