//! The extraction phase: images decoded and described in parallel, written in id order in
//! batched write transactions, each carrying the checkpoint. Memory is bounded by a
//! byte-weighted budget: an image in flight holds its file bytes plus the decode and ORB
//! memory its header predicts, and a worker waits until that fits.

use super::BuildContext;
use crate::error::{IndexError, Result};
use crate::features::{Detector, ExtractParams};
use crate::global;
use crate::store::{self, Checkpoint, ImageRecord, Store, WorkStore};
use imageindex_crds::estimate::{self, BuildPlan};
use imageindex_crds::preset::Preset;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Files larger than this are refused without being read.
pub const MAX_FILE_BYTES: u64 = 512 << 20;
/// Longest time between two checkpoint commits.
const COMMIT_INTERVAL: Duration = Duration::from_millis(500);
/// Most images one checkpoint commit covers (a kill loses at most this many).
const COMMIT_IMAGES: u32 = 8;

/// A counting semaphore over bytes.
struct ByteBudget {
    capacity: u64,
    available: Mutex<u64>,
    freed: Condvar,
}

impl ByteBudget {
    fn new(capacity: u64) -> Self {
        ByteBudget {
            capacity: capacity.max(1),
            available: Mutex::new(capacity.max(1)),
            freed: Condvar::new(),
        }
    }

    /// Takes `want` bytes (capped at the capacity, so one huge image runs alone).
    fn acquire(&self, want: u64) -> u64 {
        let want = want.clamp(1, self.capacity);
        let mut avail = self.available.lock().unwrap_or_else(|e| e.into_inner());
        while *avail < want {
            avail = self.freed.wait(avail).unwrap_or_else(|e| e.into_inner());
        }
        *avail -= want;
        want
    }

    fn release(&self, n: u64) {
        let mut avail = self.available.lock().unwrap_or_else(|e| e.into_inner());
        *avail += n;
        self.freed.notify_all();
    }
}

/// A counting semaphore over slots (bounds images between dispatch and commit).
struct Slots(Mutex<usize>, Condvar);

impl Slots {
    fn acquire(&self) {
        let mut n = self.0.lock().unwrap_or_else(|e| e.into_inner());
        while *n == 0 {
            n = self.1.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n -= 1;
    }
    fn release(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.1.notify_one();
    }
}

enum Outcome {
    Done(Box<crate::features::Features>),
    Skipped(String),
    Fatal(IndexError),
}

struct Job {
    id: u32,
    path: String,
}

/// Why an extracted image cannot be found by any query, if it cannot: no local features
/// and no layout (a blank or single-colour image).
pub fn unfindable(f: &crate::features::Features) -> Option<String> {
    (f.descriptors.is_empty() && f.global.is_none()).then(|| {
        "no features even with an adapted detector, and no layout to match (a blank or \
         single-colour image)"
            .to_string()
    })
}

/// Extracts one image under the byte budget.
fn process(
    root: &Path,
    job: &Job,
    detector: &mut Detector,
    budget: &ByteBudget,
    preset: &Preset,
) -> Outcome {
    let full: PathBuf = root.join(&job.path);
    let md = match std::fs::metadata(&full) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !root.is_dir() {
                return Outcome::Fatal(IndexError::Dataset {
                    path: root.to_path_buf(),
                    source: e,
                });
            }
            return Outcome::Skipped("file disappeared during the build".into());
        }
        Err(e) => return Outcome::Skipped(format!("unreadable: {e}")),
    };
    if md.len() > MAX_FILE_BYTES {
        return Outcome::Skipped(format!(
            "file is {} MiB, above the {} MiB limit",
            md.len() >> 20,
            MAX_FILE_BYTES >> 20
        ));
    }
    let predicted = crate::dataset::header_of_file(&full)
        .map(|(format, w, h)| {
            estimate::image_bytes(preset, w, h, format == crate::imageguard::Format::Jpeg)
        })
        .unwrap_or(0);
    let held = budget.acquire(md.len() + predicted);
    let outcome = match std::fs::read(&full) {
        Ok(bytes) => match detector.extract(&bytes) {
            Ok(f) => Outcome::Done(Box::new(f)),
            Err(e) => Outcome::Skipped(e.to_string()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !root.is_dir() => {
            Outcome::Fatal(IndexError::Dataset {
                path: root.to_path_buf(),
                source: e,
            })
        }
        Err(e) => Outcome::Skipped(format!("unreadable: {e}")),
    };
    budget.release(held);
    outcome
}

/// Runs (or resumes) extraction. Returns how many images this call extracted. `skipped`
/// files were refused while listing (symlink loops, bad names): they count as processed and
/// failed.
pub(super) fn run(
    store: &Store,
    work: &WorkStore,
    opts: &super::BuildOptions,
    preset: &Preset,
    plan: &BuildPlan,
    skipped: u64,
    ctx: &BuildContext,
) -> Result<u64> {
    let (root, threads) = (opts.dataset.as_path(), opts.threads);
    let rtxn = store.env.read_txn()?;
    let checkpoint: Checkpoint = store
        .get_json(&rtxn, store::keys::CHECKPOINT)?
        .unwrap_or(Checkpoint::Extract { next: 0 });
    let mut jobs = Vec::new();
    let (mut processed, mut failed, mut descriptors) = (0u64, 0u64, 0u64);
    let next = match checkpoint {
        Checkpoint::Extract { next } => next,
        _ => u32::MAX,
    };
    for r in store.images.iter(&rtxn)? {
        let (id, rec) = r?;
        if id < next {
            processed += 1;
            failed += u64::from(rec.error.is_some());
            descriptors += u64::from(rec.count.min(preset.nfeatures));
        } else {
            jobs.push(Job { id, path: rec.path });
        }
    }
    drop(rtxn);
    ctx.progress
        .resume_at(processed + skipped, failed + skipped, descriptors);
    if jobs.is_empty() {
        if matches!(checkpoint, Checkpoint::Extract { .. }) {
            super::enter_training(store, preset)?;
        }
        return Ok(0);
    }
    ctx.progress.set_phase(crate::progress::BuildPhase::Extract);
    let total_jobs = jobs.len();
    let first = jobs[0].id;
    let threads = threads.max(1);
    let budget = ByteBudget::new(plan.image_bytes);
    let window = Slots(Mutex::new(threads * 4 + 8), Condvar::new());
    let params = ExtractParams::from(preset);
    let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(threads * 2);
    let (res_tx, res_rx) = crossbeam_channel::unbounded::<(u32, Outcome)>();
    let cancelled = || ctx.progress.is_cancelled();
    let stop = AtomicBool::new(false);

    let result: Result<u64> = std::thread::scope(|s| {
        for t in 0..threads {
            let (job_rx, res_tx, budget) = (job_rx.clone(), res_tx.clone(), &budget);
            std::thread::Builder::new()
                .name(format!("extract-{t}"))
                .spawn_scoped(s, move || {
                    let mut detector = match Detector::new(params) {
                        Ok(d) => d,
                        Err(e) => {
                            let _ = res_tx.send((u32::MAX, Outcome::Fatal(e.into())));
                            return;
                        }
                    };
                    for job in job_rx.iter() {
                        let out = process(root, &job, &mut detector, budget, preset);
                        if res_tx.send((job.id, out)).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| IndexError::io("extract thread", e))?;
        }
        drop(res_tx);
        drop(job_rx);
        let window = &window;
        let stop = &stop;
        let feeder = s.spawn(move || {
            for job in jobs {
                window.acquire();
                if stop.load(Ordering::Relaxed) || cancelled() || job_tx.send(job).is_err() {
                    break;
                }
            }
        });

        let mut pending: BTreeMap<u32, Outcome> = BTreeMap::new();
        let mut next_id = first;
        let mut done_now = 0u64;
        let mut wtxn = store.env.write_txn()?;
        let mut work_txn = work.env.write_txn()?;
        let mut batch_bytes = 0u64;
        let mut last_commit = Instant::now();
        let mut committed_id = first;
        let mut fatal: Option<IndexError> = None;
        let mut written = 0usize;
        // Descriptors first: a crash between the two commits only redoes images.
        let commit =
            |wtxn: heed::RwTxn<'_>, work_txn: heed::RwTxn<'_>, next_id: u32| -> Result<()> {
                work_txn.commit()?;
                let mut wtxn = wtxn;
                let cp = if next_id as usize >= first as usize + total_jobs {
                    Checkpoint::Train {
                        preset: preset.label(),
                    }
                } else {
                    Checkpoint::Extract { next: next_id }
                };
                store.set_checkpoint(&mut wtxn, &cp)?;
                wtxn.commit()?;
                Ok(())
            };
        'recv: for (id, out) in res_rx.iter() {
            if id == u32::MAX {
                if let Outcome::Fatal(e) = out {
                    fatal = Some(e);
                }
                break;
            }
            pending.insert(id, out);
            while let Some(out) = pending.remove(&next_id) {
                let mut rec: ImageRecord = store.images.get(&wtxn, &next_id)?.unwrap_or_default();
                match out {
                    Outcome::Fatal(e) => {
                        fatal = Some(e);
                        break 'recv;
                    }
                    Outcome::Skipped(reason) => {
                        tracing::warn!(path = %rec.path, %reason, "image skipped");
                        rec.error = Some(reason);
                        rec.count = 0;
                        rec.extracted_with = preset.nfeatures;
                        ctx.progress.image_done(0, true);
                    }
                    Outcome::Done(f) => {
                        rec.width = f.width;
                        rec.height = f.height;
                        rec.work_width = f.work_width;
                        rec.work_height = f.work_height;
                        rec.count = f.descriptors.len() as u32;
                        rec.extracted_with = preset.nfeatures;
                        rec.adaptation = Some(f.adaptation);
                        rec.global = f.global.is_some();
                        rec.error = unfindable(&f);
                        let d = store::descriptors_blob(&f.descriptors);
                        let k = store::keypoints_blob(&f.keypoints);
                        batch_bytes += (d.len() + k.len()) as u64;
                        work.descs.put(&mut work_txn, &next_id, &d)?;
                        work.kps.put(&mut work_txn, &next_id, &k)?;
                        match &f.global {
                            Some(g) => {
                                store
                                    .globals
                                    .put(&mut wtxn, &next_id, &global::to_bytes(g))?
                            }
                            None => {
                                store.globals.delete(&mut wtxn, &next_id)?;
                            }
                        }
                        if let Some(reason) = &rec.error {
                            tracing::warn!(path = %rec.path, %reason, "image cannot be indexed");
                        }
                        ctx.progress
                            .image_done(f.descriptors.len() as u64, rec.error.is_some());
                    }
                }
                store.images.put(&mut wtxn, &next_id, &rec)?;
                next_id += 1;
                done_now += 1;
                written += 1;
                window.release();
                if batch_bytes >= plan.write_batch_bytes
                    || last_commit.elapsed() >= COMMIT_INTERVAL
                    || next_id - committed_id >= COMMIT_IMAGES
                {
                    committed_id = next_id;
                    commit(wtxn, work_txn, next_id)?;
                    wtxn = store.env.write_txn()?;
                    work_txn = work.env.write_txn()?;
                    batch_bytes = 0;
                    last_commit = Instant::now();
                }
            }
            if written >= total_jobs || cancelled() {
                break;
            }
        }
        // Stop the feeder and the workers: free every slot, close the channels.
        stop.store(true, Ordering::Relaxed);
        for _ in 0..total_jobs {
            window.release();
        }
        drop(res_rx);
        commit(wtxn, work_txn, next_id)?;
        let _ = feeder.join();
        if let Some(e) = fatal {
            return Err(e);
        }
        if written < total_jobs {
            return Err(IndexError::Interrupted);
        }
        Ok(done_now)
    });
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_budget_caps_oversized_requests_and_blocks_until_freed() {
        let b = std::sync::Arc::new(ByteBudget::new(100));
        assert_eq!(b.acquire(1000), 100);
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.acquire(10));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished());
        b.release(100);
        assert_eq!(t.join().unwrap(), 10);
    }
}
