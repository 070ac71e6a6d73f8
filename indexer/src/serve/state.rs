//! The index the service answers from. Each request takes its own reference to the loaded
//! generation for its whole life; a swap installs the next one for new requests, and the
//! previous generation is closed when its last request finishes (hot swap).

use crate::layout::IndexDir;
use crate::search::Index;
use crate::IndexError;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

/// A generation opened for serving.
pub struct Loaded {
    /// The open generation.
    pub index: Index,
    /// When this service loaded it.
    pub loaded_at: SystemTime,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        tracing::info!(
            generation = self.index.generation,
            "generation released (its last reader finished)"
        );
    }
}

/// The current generation of one index directory, swappable while requests run.
pub struct ServedIndex {
    dir: IndexDir,
    current: RwLock<Option<Arc<Loaded>>>,
    /// A shard's previous generation, kept open after a swap so that a router can go on
    /// asking for it until every shard has published (no answer mixes generations).
    previous: RwLock<Option<Arc<Loaded>>>,
    /// Serialises opening generations (the watcher and a finished rebuild may race).
    loading: Mutex<Option<u64>>,
}

/// What a refresh did.
#[derive(Debug, PartialEq, Eq)]
pub enum Refresh {
    /// Nothing is published yet.
    NothingPublished,
    /// The published generation is the one being served.
    Unchanged(u64),
    /// A generation was loaded (the previous one, if any, is released after its readers).
    Swapped {
        /// The generation served before, if any.
        from: Option<u64>,
        /// The generation served now.
        to: u64,
    },
}

impl ServedIndex {
    /// A served index for a directory, with nothing loaded yet.
    pub fn new(dir: IndexDir) -> ServedIndex {
        ServedIndex {
            dir,
            current: RwLock::new(None),
            previous: RwLock::new(None),
            loading: Mutex::new(None),
        }
    }

    /// The index directory.
    pub fn dir(&self) -> &IndexDir {
        &self.dir
    }

    /// The generation serving now, shared with the caller until it drops it.
    pub fn get(&self) -> Option<Arc<Loaded>> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Generation `n` if it is the one serving now or (on a shard) the one before it.
    pub fn get_generation(&self, n: u64) -> Option<Arc<Loaded>> {
        let read = |l: &RwLock<Option<Arc<Loaded>>>| match l.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        [read(&self.current), read(&self.previous)]
            .into_iter()
            .flatten()
            .find(|l| l.index.generation == n)
    }

    /// The generations this service can answer from: the current one, then (on a shard)
    /// the one before it.
    pub fn generations(&self) -> Vec<u64> {
        let mut all: Vec<u64> = self.generation().into_iter().collect();
        let previous = match self.previous.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        all.extend(previous.map(|l| l.index.generation));
        all
    }

    /// The generation number serving now.
    pub fn generation(&self) -> Option<u64> {
        self.get().map(|l| l.index.generation)
    }

    /// Loads the generation `current` points to if it is not the one being served.
    pub fn refresh(&self) -> Result<Refresh, IndexError> {
        let mut last_failed = match self.loading.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let Some((n, path)) = self.dir.current() else {
            return Ok(Refresh::NothingPublished);
        };
        let from = self.generation();
        if from == Some(n) {
            return Ok(Refresh::Unchanged(n));
        }
        let index = match Index::open_generation(&path, n) {
            Ok(i) => i,
            Err(e) => {
                if *last_failed != Some(n) {
                    tracing::error!(generation = n, error = %e, "cannot load the published generation; still serving the previous one");
                }
                *last_failed = Some(n);
                return Err(e);
            }
        };
        *last_failed = None;
        tracing::info!(
            generation = n,
            previous = ?from,
            descriptors = index.meta.descriptors,
            preset = %index.meta.preset,
            "serving generation"
        );
        let loaded = Arc::new(Loaded {
            index,
            loaded_at: SystemTime::now(),
        });
        let previous = {
            let mut w = match self.current.write() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            w.replace(loaded)
        };
        // A shard keeps its previous generation for routers still pinned to it; otherwise
        // the previous generation closes when the last request holding it drops it.
        if previous
            .as_ref()
            .is_some_and(|p| p.index.meta.shard.is_some())
        {
            let mut w = match self.previous.write() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            *w = previous;
        } else {
            drop(previous);
        }
        Ok(Refresh::Swapped { from, to: n })
    }
}
