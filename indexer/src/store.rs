//! The LMDB environment of one build generation and what it holds.
//!
//! Databases (all in one heed environment):
//! - `meta`: build metadata, checkpoint, the vocabulary's top level and shape;
//! - `images`: image id → [`ImageRecord`] (path, size, dimensions, what the detector did,
//!   failure reason);
//! - `cells`: cell → [`crate::postings::CellRecord`] (its leaf centroids and where each
//!   leaf's list starts);
//! - `lists`: (cell, part) → inverted-list entries ([`crate::postings`]: code, image,
//!   keypoint), leaf after leaf;
//! - `globals`: image id → global descriptor ([`crate::global`]);
//! - `arroy`: the arroy index (cosine) over the global descriptors.
//!
//! A build keeps each image's descriptors (strongest first) and keypoints in a second,
//! working environment ([`WorkStore`], `IDX/build/work/`), with the per-cell buckets the
//! partition step fills: the index phases read them, the inverted lists hold them afterwards,
//! and publishing deletes it — so the published environment never carried them.

use crate::error::{IndexError, Result};
use crate::features::Adaptation;
use arroy::distances::Cosine;
use heed::types::{Bytes, SerdeJson, Str, U32, U64};
use heed::{
    byteorder::BigEndian, CommitOrAbort, Database, Env, EnvFlags, EnvOpenOptions, RoTxn, RwTxn,
    WithoutTls,
};
use imageindex_crds::preset::Preset;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::path::Path;

/// Version of the on-disk format; readers refuse other versions.
pub const FORMAT_VERSION: u32 = 3;
/// Virtual size of the LMDB map (sparse; only written pages use disk).
pub const MAP_SIZE: usize = 1 << 40;

/// One catalogue image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImageRecord {
    /// Path relative to the dataset root.
    pub path: String,
    /// File size in bytes.
    pub bytes: u64,
    /// Modification time (seconds since the epoch).
    pub mtime: i64,
    /// Original width (0 until extracted).
    pub width: u32,
    /// Original height.
    pub height: u32,
    /// Working-image width (the keypoints' frame).
    pub work_width: u32,
    /// Working-image height.
    pub work_height: u32,
    /// Descriptors stored (before the index phase keeps at most the preset's nfeatures).
    pub count: u32,
    /// `nfeatures` the image was extracted with (0 = not yet).
    pub extracted_with: u32,
    /// What the detector had to adapt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptation: Option<Adaptation>,
    /// Whether the image has a global descriptor (it can be found by its layout, even with
    /// no local features).
    #[serde(default)]
    pub global: bool,
    /// Why the image could not be indexed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Seconds spent per phase.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Timings {
    /// Listing the dataset.
    pub scan: f64,
    /// Decoding and ORB (all attempts that contributed).
    pub extract: f64,
    /// Training the vocabulary's top level.
    pub train: f64,
    /// Partitioning descriptors into cells, training leaves and writing the lists.
    pub assign: f64,
    /// Building the arroy index of global descriptors.
    #[serde(default)]
    pub global: f64,
    /// Compacting and publishing.
    pub publish: f64,
}

/// What a build made, stored in every generation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildMeta {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Generation number (1, 2, …), set at publish.
    pub generation: u64,
    /// The preset the index was built with.
    pub preset: Preset,
    /// The dataset directory as given to `indexer build`.
    pub dataset: String,
    /// The shard of the dataset this index holds (absent: the whole dataset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<crate::shard::Shard>,
    /// Dataset fingerprint (sorted path, size, mtime).
    pub fingerprint: String,
    /// Image files in the dataset.
    pub images_total: u64,
    /// Images that can be found: with local features or a global descriptor.
    pub images_indexed: u64,
    /// Images skipped (their records carry the reason).
    pub images_failed: u64,
    /// Descriptors indexed.
    pub descriptors: u64,
    /// Top-level cells of the vocabulary.
    pub cells: u32,
    /// Inverted lists (the vocabulary's leaves).
    pub lists: u64,
    /// Images with a global descriptor (in the arroy index).
    pub globals: u64,
    /// The memory budget the build planned for (bytes).
    pub memory_budget: u64,
    /// Highest working set seen during the build (bytes, this process's attempts).
    pub peak_working_set: u64,
    /// When the build started (RFC 3339).
    pub started_at: String,
    /// When it was published (RFC 3339).
    pub finished_at: String,
    /// Seconds per phase.
    pub timings: Timings,
    /// Version of the indexer that built it.
    pub indexer_version: String,
}

/// Where an interrupted build resumes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "camelCase")]
pub enum Checkpoint {
    /// Images `0..next` are extracted.
    Extract {
        /// First image not yet extracted.
        next: u32,
    },
    /// Extraction done; the index phases run with this preset, starting with the
    /// vocabulary's top level.
    Train {
        /// Preset label the index phases use.
        preset: String,
    },
    /// Images `0..next` are partitioned into cell buckets; `chunk` is the next flush number.
    Partition {
        /// Preset label.
        preset: String,
        /// First image not yet partitioned.
        next: u32,
        /// Next flush number.
        chunk: u32,
    },
    /// Cells `0..next` have their leaves and lists written.
    Lists {
        /// Preset label.
        preset: String,
        /// First cell not yet written.
        next: u32,
    },
    /// The lists are done; the global-descriptor index is next.
    Global {
        /// Preset label.
        preset: String,
    },
    /// Everything is built; publishing.
    Publish {
        /// Preset label.
        preset: String,
    },
}

impl Checkpoint {
    /// The preset label of an index-phase checkpoint (`None` during extraction).
    pub fn preset(&self) -> Option<&str> {
        match self {
            Checkpoint::Extract { .. } => None,
            Checkpoint::Train { preset }
            | Checkpoint::Partition { preset, .. }
            | Checkpoint::Lists { preset, .. }
            | Checkpoint::Global { preset }
            | Checkpoint::Publish { preset } => Some(preset),
        }
    }
}

/// Typed handles on the databases of one environment.
#[derive(Clone)]
pub struct Store {
    /// The environment.
    pub env: Env<WithoutTls>,
    /// Metadata by key.
    pub meta: Database<'static, Str, Bytes>,
    /// Image records by id.
    pub images: Database<'static, U32<BigEndian>, SerdeJson<ImageRecord>>,
    /// Cell records ([`crate::postings::CellRecord`]) by cell.
    pub cells: Database<'static, U32<BigEndian>, Bytes>,
    /// Inverted-list parts by (cell << 32 | part).
    pub lists: Database<'static, U64<BigEndian>, Bytes>,
    /// Global descriptors by image id.
    pub globals: Database<'static, U32<BigEndian>, Bytes>,
    /// The arroy database (global descriptors, cosine).
    pub arroy: arroy::Database<'static, Cosine>,
}

/// Metadata keys.
pub mod keys {
    /// [`super::BuildMeta`] as JSON.
    pub const BUILD: &str = "build";
    /// [`super::Checkpoint`] as JSON.
    pub const CHECKPOINT: &str = "checkpoint";
    /// The vocabulary's top-level centroids, 32 bytes each.
    pub const VOCAB_TOP: &str = "vocab_top";
    /// The top level's balancing prices, u16 little-endian per cell.
    pub const VOCAB_TOP_PRICES: &str = "vocab_top_prices";
    /// The vocabulary's [`crate::vocab::VocabShape`] as JSON.
    pub const VOCAB_SHAPE: &str = "vocab_shape";
    /// The dataset listing's fingerprint, set when the image table is written.
    pub const FINGERPRINT: &str = "fingerprint";
}

fn options() -> EnvOpenOptions<WithoutTls> {
    let mut o = EnvOpenOptions::new().read_txn_without_tls();
    o.map_size(MAP_SIZE).max_dbs(10).max_readers(1024);
    o
}

impl Store {
    /// Opens (creating) a writable build environment in `dir`.
    pub fn create(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(|e| IndexError::io(dir, e))?;
        let mut o = options();
        // Commits survive a killed process without metadata fsyncs; publish syncs.
        unsafe { o.flags(EnvFlags::NO_META_SYNC) };
        let env = unsafe { o.open(dir) }?;
        let wtxn = env.write_txn()?;
        let (meta, images, cells, lists, globals, arroy) = env
            .create_databases_and_commit(wtxn, |dbo, wtxn| -> Result<_> {
                Ok(CommitOrAbort::<_, ()>::Commit((
                    dbo.create_database(wtxn, Some("meta"))?,
                    dbo.create_database(wtxn, Some("images"))?,
                    dbo.create_database(wtxn, Some("cells"))?,
                    dbo.create_database(wtxn, Some("lists"))?,
                    dbo.create_database(wtxn, Some("globals"))?,
                    dbo.create_database(wtxn, Some("arroy"))?,
                )))
            })?
            .unwrap_commit();
        Ok(Store {
            env,
            meta,
            images,
            cells,
            lists,
            globals,
            arroy,
        })
    }

    /// Closes the environment and waits until LMDB released it (and its dirty-page
    /// buffers); it can then be opened again.
    pub fn close(self) {
        self.env.prepare_for_closing().wait();
    }

    /// Opens a published generation read-only (no lock file: generations never change).
    pub fn open_read_only(dir: &Path) -> Result<Store> {
        let mut o = options();
        unsafe { o.flags(EnvFlags::READ_ONLY | EnvFlags::NO_LOCK | EnvFlags::NO_READ_AHEAD) };
        let env = unsafe { o.open(dir) }?;
        let rtxn = env.read_txn()?;
        let (meta, images, cells, lists, globals, arroy) = env
            .open_databases_and_commit(rtxn, |dbo, rtxn| -> Result<_> {
                Ok(CommitOrAbort::<_, ()>::Commit((
                    dbo.open_database(rtxn, Some("meta"))?,
                    dbo.open_database(rtxn, Some("images"))?,
                    dbo.open_database(rtxn, Some("cells"))?,
                    dbo.open_database(rtxn, Some("lists"))?,
                    dbo.open_database(rtxn, Some("globals"))?,
                    dbo.open_database(rtxn, Some("arroy"))?,
                )))
            })?
            .unwrap_commit();
        let missing = |name: &str| IndexError::BadIndex {
            path: dir.to_path_buf(),
            reason: format!("database {name} missing"),
        };
        Ok(Store {
            meta: meta.ok_or_else(|| missing("meta"))?,
            images: images.ok_or_else(|| missing("images"))?,
            cells: cells.ok_or_else(|| missing("cells"))?,
            lists: lists.ok_or_else(|| missing("lists"))?,
            globals: globals.ok_or_else(|| missing("globals"))?,
            arroy: arroy.ok_or_else(|| missing("arroy"))?,
            env,
        })
    }

    /// Reads a JSON metadata value.
    pub fn get_json<T: DeserializeOwned>(&self, rtxn: &RoTxn, key: &str) -> Result<Option<T>> {
        match self.meta.get(rtxn, key)? {
            Some(bytes) => {
                serde_json::from_slice(bytes)
                    .map(Some)
                    .map_err(|e| IndexError::BadIndex {
                        path: self.env.path().to_path_buf(),
                        reason: format!("metadata {key}: {e}"),
                    })
            }
            None => Ok(None),
        }
    }

    /// Reads the vocabulary's top level: its centroids and their prices (0 where none were
    /// stored).
    pub fn vocab_top(&self, rtxn: &RoTxn) -> Result<(Vec<crate::hamming::Words>, Vec<u16>)> {
        let bad = |reason: &str| IndexError::BadIndex {
            path: self.env.path().to_path_buf(),
            reason: reason.to_string(),
        };
        let top = self
            .meta
            .get(rtxn, keys::VOCAB_TOP)?
            .ok_or_else(|| bad("no vocabulary"))?;
        let top = crate::vocab::centroids_from_bytes(top).ok_or_else(|| bad("vocabulary"))?;
        let prices = match self.meta.get(rtxn, keys::VOCAB_TOP_PRICES)? {
            Some(b) => crate::vocab::prices_from_bytes(b).ok_or_else(|| bad("top prices"))?,
            None => vec![0; top.len()],
        };
        Ok((top, prices))
    }

    /// Writes a JSON metadata value.
    pub fn put_json<T: Serialize>(&self, wtxn: &mut RwTxn, key: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| IndexError::Usage(format!("cannot encode {key}: {e}")))?;
        self.meta.put(wtxn, key, &bytes)?;
        Ok(())
    }

    /// Writes the build's checkpoint (committed with the transaction's other writes).
    pub fn set_checkpoint(&self, wtxn: &mut RwTxn, cp: &Checkpoint) -> Result<()> {
        self.put_json(wtxn, keys::CHECKPOINT, cp)
    }
}

/// The build's working environment: each image's descriptors (strongest first) and
/// keypoints, and the per-cell buckets of the partition step.
#[derive(Clone)]
pub struct WorkStore {
    /// The environment (`IDX/build/work/`).
    pub env: Env<WithoutTls>,
    /// Descriptor blobs by image id.
    pub descs: Database<'static, U32<BigEndian>, Bytes>,
    /// Keypoint blobs by image id (u16 x, y in quarter pixels, same order).
    pub kps: Database<'static, U32<BigEndian>, Bytes>,
    /// Partitioned entries by (flush << 32 | cell) ([`crate::postings::bucket_key`]).
    pub buckets: Database<'static, U64<BigEndian>, Bytes>,
    /// The environment held buckets in the older cell-major layout (database `buckets`):
    /// they were cleared, so the index phases must partition again.
    pub had_old_buckets: bool,
}

impl WorkStore {
    /// Opens (creating) the working environment in `dir`.
    pub fn create(dir: &Path) -> Result<WorkStore> {
        std::fs::create_dir_all(dir).map_err(|e| IndexError::io(dir, e))?;
        let mut o = options();
        unsafe { o.flags(EnvFlags::NO_META_SYNC) };
        let env = unsafe { o.open(dir) }?;
        let wtxn = env.write_txn()?;
        let (descs, kps, buckets, had_old_buckets) = env
            .create_databases_and_commit(wtxn, |dbo, wtxn| -> Result<_> {
                let old: Option<Database<U64<BigEndian>, Bytes>> =
                    dbo.open_database(wtxn, Some("buckets"))?;
                // `Some(())` when it held buckets (a commit-safe stand-in for `true`).
                let had_old = match old {
                    Some(db) if !db.is_empty(wtxn)? => {
                        db.clear(wtxn)?;
                        Some(())
                    }
                    _ => None,
                };
                Ok(CommitOrAbort::<_, ()>::Commit((
                    dbo.create_database(wtxn, Some("descs"))?,
                    dbo.create_database(wtxn, Some("kps"))?,
                    dbo.create_database(wtxn, Some("flush_buckets"))?,
                    had_old,
                )))
            })?
            .unwrap_commit();
        Ok(WorkStore {
            env,
            descs,
            kps,
            buckets,
            had_old_buckets: had_old_buckets.is_some(),
        })
    }

    /// Closes the environment and waits until LMDB released it.
    pub fn close(self) {
        self.env.prepare_for_closing().wait();
    }

    /// The descriptor blob of an image (empty when absent).
    pub fn descriptors(&self, rtxn: &RoTxn, image: u32) -> Result<Vec<u8>> {
        Ok(self
            .descs
            .get(rtxn, &image)?
            .map(<[u8]>::to_vec)
            .unwrap_or_default())
    }
}

/// Encodes descriptors as one blob.
pub fn descriptors_blob(descs: &[crate::features::Descriptor]) -> Vec<u8> {
    descs.iter().flat_map(|d| d.iter().copied()).collect()
}

/// Encodes keypoints as one blob (u16 little-endian x, y).
pub fn keypoints_blob(kps: &[[u16; 2]]) -> Vec<u8> {
    kps.iter()
        .flat_map(|[x, y]| x.to_le_bytes().into_iter().chain(y.to_le_bytes()))
        .collect()
}

/// Reads keypoint `i` of a keypoint blob, in working-image pixels.
pub fn keypoint_at(blob: &[u8], i: usize) -> Option<(f32, f32)> {
    let b = blob.get(i * 4..i * 4 + 4)?;
    let x = u16::from_le_bytes([b[0], b[1]]) as f32 / crate::features::KEYPOINT_SUBPIXELS;
    let y = u16::from_le_bytes([b[2], b[3]]) as f32 / crate::features::KEYPOINT_SUBPIXELS;
    Some((x, y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_round_trip() {
        let kps = [[4u16, 8], [65535, 0]];
        let blob = keypoints_blob(&kps);
        assert_eq!(keypoint_at(&blob, 0), Some((1.0, 2.0)));
        assert_eq!(keypoint_at(&blob, 1), Some((16383.75, 0.0)));
        assert_eq!(keypoint_at(&blob, 2), None);
        assert_eq!(descriptors_blob(&[[1; 32], [2; 32]]).len(), 64);
    }

    #[test]
    fn checkpoint_json_is_tagged() {
        let c = Checkpoint::Partition {
            preset: "full".into(),
            next: 3,
            chunk: 1,
        };
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(
            j,
            r#"{"phase":"partition","preset":"full","next":3,"chunk":1}"#
        );
        assert_eq!(c.preset(), Some("full"));
        assert_eq!(Checkpoint::Extract { next: 0 }.preset(), None);
    }

    #[test]
    fn buckets_in_the_older_layout_are_cleared_and_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = WorkStore::create(tmp.path()).unwrap();
        assert!(!fresh.had_old_buckets);
        // An environment written by an indexer that keyed buckets by cell first.
        let wtxn = fresh.env.write_txn().unwrap();
        fresh
            .env
            .create_databases_and_commit(wtxn, |dbo, wtxn| -> Result<_> {
                let old: Database<U64<BigEndian>, Bytes> =
                    dbo.create_database(wtxn, Some("buckets"))?;
                old.put(wtxn, &crate::postings::part_key(3, 0), b"entries")?;
                Ok(CommitOrAbort::<(), ()>::Commit(()))
            })
            .unwrap();
        fresh.close();
        let reopened = WorkStore::create(tmp.path()).unwrap();
        assert!(reopened.had_old_buckets);
        reopened.close();
        // Cleared: a third open finds nothing left of them.
        assert!(!WorkStore::create(tmp.path()).unwrap().had_old_buckets);
    }
}
