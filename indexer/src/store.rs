//! The LMDB environment of one build generation and what it holds.
//!
//! Databases (all in one heed environment):
//! - `meta`: build metadata, checkpoint, coarse centroids, descriptor offsets;
//! - `images`: image id → [`ImageRecord`] (path, size, dimensions, what the detector did,
//!   failure reason);
//! - `kps`: image id → keypoint positions (u16 x, y in quarter pixels), same order;
//! - `lists`: (list, chunk) → inverted-list entries (u32 descriptor id + 32-byte code);
//! - `arroy`: the arroy database, one arroy index per shard, `BinaryQuantizedManhattan`.
//!
//! A build keeps each image's descriptors (strongest first) in a second, working
//! environment ([`WorkStore`], `IDX/build/work/`): the index phases read them, the inverted
//! lists and arroy hold them afterwards, and publishing deletes it — so the published
//! environment never carried them and is published by renaming its directory, not copied.

use crate::error::{IndexError, Result};
use crate::features::Adaptation;
use arroy::distances::BinaryQuantizedManhattan;
use heed::types::{Bytes, SerdeJson, Str, U32, U64};
use heed::{
    byteorder::BigEndian, CommitOrAbort, Database, Env, EnvFlags, EnvOpenOptions, RoTxn, RwTxn,
    WithoutTls,
};
use imageindex_crds::preset::Preset;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::path::Path;

/// Version of the on-disk format; readers refuse other versions.
pub const FORMAT_VERSION: u32 = 2;
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
    /// Training the coarse quantizer.
    pub train: f64,
    /// Filling the inverted lists.
    pub assign: f64,
    /// Building arroy shards.
    pub arroy: f64,
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
    /// Dataset fingerprint (sorted path, size, mtime).
    pub fingerprint: String,
    /// Image files in the dataset.
    pub images_total: u64,
    /// Images with at least one descriptor.
    pub images_indexed: u64,
    /// Images skipped (their records carry the reason).
    pub images_failed: u64,
    /// Descriptors indexed.
    pub descriptors: u64,
    /// Inverted lists of the coarse quantizer.
    pub ivf_lists: u32,
    /// arroy shards (arroy index numbers 0..shards).
    pub arroy_shards: u32,
    /// Descriptors per arroy shard.
    pub shard_items: u64,
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
    /// Extraction done; the index phases run with this preset.
    Train {
        /// Preset label the index phases use.
        preset: String,
    },
    /// Images `0..next` are in the inverted lists; `chunk` is the next chunk number.
    Assign {
        /// Preset label.
        preset: String,
        /// First image not yet assigned.
        next: u32,
        /// Next chunk number.
        chunk: u32,
    },
    /// Lists `0..next` have their chunks merged into one value each.
    Merge {
        /// Preset label.
        preset: String,
        /// First list not yet merged.
        next: u32,
    },
    /// Shards `0..shard` are built; `added` items of shard `shard` are added.
    Arroy {
        /// Preset label.
        preset: String,
        /// Current shard.
        shard: u32,
        /// Items of it already added.
        added: u64,
    },
    /// Everything is built; publishing.
    Publish {
        /// Preset label.
        preset: String,
    },
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
    /// Keypoint blobs by image id.
    pub kps: Database<'static, U32<BigEndian>, Bytes>,
    /// Inverted-list chunks by (list << 32 | chunk).
    pub lists: Database<'static, U64<BigEndian>, Bytes>,
    /// The arroy database.
    pub arroy: arroy::Database<'static, BinaryQuantizedManhattan>,
}

/// Metadata keys.
pub mod keys {
    /// [`super::BuildMeta`] as JSON.
    pub const BUILD: &str = "build";
    /// [`super::Checkpoint`] as JSON.
    pub const CHECKPOINT: &str = "checkpoint";
    /// Coarse centroids, 32 bytes each.
    pub const CENTROIDS: &str = "centroids";
    /// Descriptor offsets: u64 little-endian per image plus one (prefix sums of kept counts).
    pub const OFFSETS: &str = "offsets";
    /// The dataset listing's fingerprint, set when the image table is written.
    pub const FINGERPRINT: &str = "fingerprint";
}

fn options() -> EnvOpenOptions<WithoutTls> {
    let mut o = EnvOpenOptions::new().read_txn_without_tls();
    o.map_size(MAP_SIZE).max_dbs(8).max_readers(1024);
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
        let (meta, images, kps, lists, arroy) = env
            .create_databases_and_commit(wtxn, |dbo, wtxn| -> Result<_> {
                Ok(CommitOrAbort::<_, ()>::Commit((
                    dbo.create_database(wtxn, Some("meta"))?,
                    dbo.create_database(wtxn, Some("images"))?,
                    dbo.create_database(wtxn, Some("kps"))?,
                    dbo.create_database(wtxn, Some("lists"))?,
                    dbo.create_database(wtxn, Some("arroy"))?,
                )))
            })?
            .unwrap_commit();
        Ok(Store {
            env,
            meta,
            images,
            kps,
            lists,
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
        let (meta, images, kps, lists, arroy) = env
            .open_databases_and_commit(rtxn, |dbo, rtxn| -> Result<_> {
                Ok(CommitOrAbort::<_, ()>::Commit((
                    dbo.open_database(rtxn, Some("meta"))?,
                    dbo.open_database(rtxn, Some("images"))?,
                    dbo.open_database(rtxn, Some("kps"))?,
                    dbo.open_database(rtxn, Some("lists"))?,
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
            kps: kps.ok_or_else(|| missing("kps"))?,
            lists: lists.ok_or_else(|| missing("lists"))?,
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

    /// The key of an inverted-list chunk.
    pub fn list_key(list: u32, chunk: u32) -> u64 {
        ((list as u64) << 32) | chunk as u64
    }
}

/// The build's working environment: each image's descriptors, strongest first.
#[derive(Clone)]
pub struct WorkStore {
    /// The environment (`IDX/build/work/`).
    pub env: Env<WithoutTls>,
    /// Descriptor blobs by image id.
    pub descs: Database<'static, U32<BigEndian>, Bytes>,
}

impl WorkStore {
    /// Opens (creating) the working environment in `dir`.
    pub fn create(dir: &Path) -> Result<WorkStore> {
        std::fs::create_dir_all(dir).map_err(|e| IndexError::io(dir, e))?;
        let mut o = options();
        unsafe { o.flags(EnvFlags::NO_META_SYNC) };
        let env = unsafe { o.open(dir) }?;
        let wtxn = env.write_txn()?;
        let descs = env
            .create_databases_and_commit(wtxn, |dbo, wtxn| -> Result<_> {
                Ok(CommitOrAbort::<_, ()>::Commit(
                    dbo.create_database(wtxn, Some("descs"))?,
                ))
            })?
            .unwrap_commit();
        Ok(WorkStore { env, descs })
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
    fn list_keys_sort_by_list_then_chunk() {
        assert!(Store::list_key(1, 9) < Store::list_key(2, 0));
        assert!(Store::list_key(1, 1) < Store::list_key(1, 2));
    }

    #[test]
    fn checkpoint_json_is_tagged() {
        let c = Checkpoint::Assign {
            preset: "full".into(),
            next: 3,
            chunk: 1,
        };
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(
            j,
            r#"{"phase":"assign","preset":"full","next":3,"chunk":1}"#
        );
    }
}
