//! Searching a published generation: each query descriptor probes the inverted lists of its
//! nearest centroids (or, as a baseline, the arroy shards), votes for the catalogue image of
//! its best unambiguous match, and the leading candidates are verified geometrically.
//!
//! - [`index`]: the generation opened for reading ([`Index`]) and what it holds;
//! - [`lookup`]: the nearest stored descriptors of each query descriptor (inverted lists or
//!   arroy);
//! - [`ranking`]: votes, geometric verification and the order of the matches;
//! - [`query`]: one query image from bytes or a file to an [`Answer`], mirrored when nothing
//!   verifies.

pub mod index;
pub mod lookup;
pub mod query;
pub mod ranking;

pub use index::Index;
pub use lookup::Candidates;
pub use query::{search_bytes, search_file, Answer, QueryError, QueryTimings};
pub use ranking::Match;

use crate::store::BuildMeta;
use serde::Serialize;

/// Which structure answers descriptor lookups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Inverted lists (default): coarse centroids + contiguous codes, fast.
    #[default]
    Ivf,
    /// arroy trees over every descriptor (the preset's `search_k`): the slower baseline.
    Arroy,
}

/// Search settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct SearchParams {
    /// Matches to return.
    pub k: usize,
    /// Verify candidates with a RANSAC homography.
    pub verify: bool,
    /// Inverted lists probed per query descriptor.
    pub nprobe: usize,
    /// Largest Hamming distance that counts as a match.
    pub max_distance: u32,
    /// Lowe ratio: best distance must be below `ratio` × the best distance to another image.
    pub ratio: f32,
    /// Candidates verified (when `verify`).
    pub verify_candidates: usize,
    /// Lookup structure.
    pub engine: Engine,
    /// When no candidate verifies, also search the image mirrored left to right (needs
    /// `verify`: verification is what tells the two searches apart).
    pub mirror: bool,
}

impl SearchParams {
    /// The defaults for an index: inverted lists probed follow the preset's search effort
    /// (`search_k` / 6: full and small probe 16, xlarge 5).
    pub fn for_index(meta: &BuildMeta) -> Self {
        SearchParams {
            nprobe: (meta.preset.search_k as usize / 6).max(4),
            ..Default::default()
        }
    }
}

impl Default for SearchParams {
    fn default() -> Self {
        SearchParams {
            k: 5,
            verify: true,
            nprobe: 16,
            max_distance: 64,
            ratio: 0.8,
            verify_candidates: 10,
            engine: Engine::Ivf,
            mirror: true,
        }
    }
}
