//! Publishing: drop what readers do not need, copy the environment compacted into a new
//! generation directory, point `current` at it with one rename, prune old generations.

use crate::dataset::Listing;
use crate::error::{IndexError, Result};
use crate::layout::{self, IndexDir};
use crate::store::{self, BuildMeta, ImageRecord, Store};
use heed::CompactionOption;
use std::path::PathBuf;

/// Publishes the build in `store` as generation `meta.generation`; returns its directory.
pub(super) fn run(
    dir: &IndexDir,
    store: &Store,
    meta: &BuildMeta,
    listing: &Listing,
) -> Result<PathBuf> {
    let n = meta.generation;
    {
        let mut wtxn = store.env.write_txn()?;
        store.put_json(&mut wtxn, store::keys::BUILD, meta)?;
        // Files the listing skipped (symlink loops, bad names…) are recorded as failed images.
        let rtxn_len = store.images.len(&wtxn)? as u32;
        for (i, s) in listing.skipped.iter().enumerate() {
            let rec = ImageRecord {
                path: s.path.clone(),
                error: Some(s.reason.clone()),
                ..Default::default()
            };
            store.images.put(&mut wtxn, &(rtxn_len + i as u32), &rec)?;
        }
        // Readers use the inverted lists, keypoints and arroy; the per-image descriptor
        // blobs were only the build's working copy.
        store.descs.clear(&mut wtxn)?;
        wtxn.commit()?;
    }
    let tmp = dir.root().join(format!("gen-{n:06}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| IndexError::io(&tmp, e))?;
    let file = store
        .env
        .copy_to_path(tmp.join("data.mdb"), CompactionOption::Enabled)
        .map_err(|e| match e {
            heed::Error::Io(io) => IndexError::io(&tmp, io),
            other => other.into(),
        })?;
    file.sync_all().map_err(|e| IndexError::io(&tmp, e))?;
    drop(file);
    layout::sync_dir(&tmp)?;
    let final_dir = dir.generation_dir(n);
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(|e| IndexError::io(&final_dir, e))?;
    layout::sync_dir(dir.root())?;
    dir.switch_current(n)?;
    let removed = dir.prune()?;
    tracing::info!(generation = n, pruned = ?removed, "published");
    // The build is complete: its working environment is no longer needed.
    let build_dir = dir.build_dir();
    let env = store.env.clone();
    let closing = env.prepare_for_closing();
    drop(closing);
    let _ = std::fs::remove_dir_all(&build_dir);
    Ok(final_dir)
}
