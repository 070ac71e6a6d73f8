//! Publishing: record the build's metadata, drop the working environment, and make the build
//! directory the new generation with one rename; then point `current` at it with another
//! rename and prune old generations. The environment never held the working descriptors, so
//! it is already what readers need and is renamed as it is — unless more than
//! `MAX_FREE_SHARE` (5%) of its pages are free, when a compacted copy is published instead.

use crate::dataset::Listing;
use crate::error::{IndexError, Result};
use crate::layout::{self, IndexDir};
use crate::store::{self, BuildMeta, ImageRecord, Store, WorkStore};
use std::path::PathBuf;

/// Largest share of free pages a build directory is published with as it is.
const MAX_FREE_SHARE: f64 = 0.05;

/// Share of the environment's pages that are free (not in any database).
fn free_share(store: &Store) -> Result<f64> {
    let info = store.env.info();
    let total = (info.last_page_number + 1) as f64;
    let rtxn = store.env.read_txn()?;
    let pages =
        |st: heed::DatabaseStat| (st.branch_pages + st.leaf_pages + st.overflow_pages) as f64;
    let used = pages(store.meta.stat(&rtxn)?)
        + pages(store.images.stat(&rtxn)?)
        + pages(store.cells.stat(&rtxn)?)
        + pages(store.lists.stat(&rtxn)?)
        + pages(store.globals.stat(&rtxn)?)
        + pages(store.arroy.stat(&rtxn)?)
        + 2.0;
    Ok(((total - used) / total).max(0.0))
}

/// Publishes the build in `store` as generation `meta.generation`; returns its directory.
pub(crate) fn run(
    dir: &IndexDir,
    store: &Store,
    work: WorkStore,
    meta: &BuildMeta,
    listing: &Listing,
) -> Result<PathBuf> {
    let n = meta.generation;
    {
        let mut wtxn = store.env.write_txn()?;
        // A publish resumed after a kill already recorded the skipped files.
        let recorded = store
            .get_json::<BuildMeta>(&wtxn, store::keys::BUILD)?
            .is_some();
        store.put_json(&mut wtxn, store::keys::BUILD, meta)?;
        // Files the listing skipped (symlink loops, bad names…) are recorded as failed images.
        let rtxn_len = store.images.len(&wtxn)? as u32;
        let skipped = if recorded {
            &[][..]
        } else {
            &listing.skipped[..]
        };
        for (i, s) in skipped.iter().enumerate() {
            let rec = ImageRecord {
                path: s.path.clone(),
                error: Some(s.reason.clone()),
                ..Default::default()
            };
            store.images.put(&mut wtxn, &(rtxn_len + i as u32), &rec)?;
        }
        wtxn.commit()?;
    }
    store.env.force_sync()?;
    let build_dir = dir.build_dir();
    // Pages freed during the build (index phases redone for another preset, arroy's
    // bookkeeping) stay in the file until a later write reuses them: with a large free share,
    // publish a compacted copy instead of the directory.
    let free = free_share(store)?;
    let compact = free > MAX_FREE_SHARE;
    tracing::info!(free_share = free, compact, "publishing");
    // The working descriptors and arroy's temporary files are not part of the index.
    work.close();
    for leftover in [super::WORK_DIR, "tmp"] {
        let p = build_dir.join(leftover);
        if p.exists() {
            std::fs::remove_dir_all(&p).map_err(|e| IndexError::io(&p, e))?;
        }
    }
    layout::sync_dir(&build_dir)?;
    let final_dir = dir.generation_dir(n);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| IndexError::io(&final_dir, e))?;
    }
    if compact {
        let tmp = dir.root().join(format!("gen-{n:06}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| IndexError::io(&tmp, e))?;
        let file = store
            .env
            .copy_to_path(tmp.join("data.mdb"), heed::CompactionOption::Enabled)
            .map_err(|e| match e {
                heed::Error::Io(io) => IndexError::io(&tmp, io),
                other => other.into(),
            })?;
        file.sync_all().map_err(|e| IndexError::io(&tmp, e))?;
        crate::memory::release_file_pages(None, Some(&file));
        drop(file);
        layout::sync_dir(&tmp)?;
        std::fs::rename(&tmp, &final_dir).map_err(|e| IndexError::io(&final_dir, e))?;
        std::fs::remove_dir_all(&build_dir).map_err(|e| IndexError::io(&build_dir, e))?;
    } else {
        std::fs::rename(&build_dir, &final_dir).map_err(|e| IndexError::io(&final_dir, e))?;
    }
    layout::sync_dir(dir.root())?;
    dir.switch_current(n)?;
    let removed = dir.prune()?;
    tracing::info!(generation = n, pruned = ?removed, "published");
    Ok(final_dir)
}
