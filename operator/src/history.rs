//! Recent memory samples of each running build, kept in the operator's memory.
//!
//! Pressure is classified over a series of samples (one spike is not critical), so the
//! operator keeps the last few per build attempt. The history is bounded per build and in
//! the number of builds, and it is fine that it starts empty after an operator restart: the
//! policy then simply waits for a few new samples before calling pressure critical.

use imageindex_crds::pressure::MemorySample;
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Samples kept per build attempt.
pub const MAX_SAMPLES: usize = 64;
/// Build attempts tracked at once (the least recently scraped is dropped beyond this).
pub const MAX_BUILDS: usize = 1024;

/// Identifies one build attempt: the ImageIndex uid and the attempt number.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BuildKey {
    /// `metadata.uid` of the ImageIndex.
    pub uid: String,
    /// The attempt number.
    pub attempt: u32,
}

#[derive(Debug)]
struct Track {
    samples: VecDeque<MemorySample>,
    last_scrape: Instant,
}

/// Per-build memory samples and scrape times.
#[derive(Debug)]
pub struct MemoryHistory {
    start: Instant,
    builds: Mutex<HashMap<BuildKey, Track>>,
}

impl Default for MemoryHistory {
    fn default() -> Self {
        Self::since(Instant::now())
    }
}

impl MemoryHistory {
    /// A history whose sample times count from `start` (samples must not predate it).
    pub fn since(start: Instant) -> Self {
        MemoryHistory {
            start,
            builds: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<BuildKey, Track>> {
        // A panic while holding the lock cannot leave the map inconsistent: keep going.
        self.builds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long until this build's next scrape is due (`None`: due now).
    pub fn wait_before_scrape(
        &self,
        key: &BuildKey,
        interval: Duration,
        now: Instant,
    ) -> Option<Duration> {
        let builds = self.lock();
        let last = builds.get(key)?.last_scrape;
        let due = last + interval;
        (due > now).then(|| due - now)
    }

    /// Notes a scrape (successful or not) so that reconciles triggered in between do not
    /// scrape again before the interval.
    pub fn mark_scraped(&self, key: &BuildKey, now: Instant) {
        let mut builds = self.lock();
        if !builds.contains_key(key) && builds.len() >= MAX_BUILDS {
            if let Some(oldest) = builds
                .iter()
                .min_by_key(|(_, t)| t.last_scrape)
                .map(|(k, _)| k.clone())
            {
                builds.remove(&oldest);
            }
        }
        builds
            .entry(key.clone())
            .or_insert_with(|| Track {
                samples: VecDeque::new(),
                last_scrape: now,
            })
            .last_scrape = now;
    }

    /// Adds a sample and returns the build's recent samples, oldest first.
    pub fn record(
        &self,
        key: &BuildKey,
        now: Instant,
        working_set: u64,
        limit: u64,
    ) -> Vec<MemorySample> {
        self.mark_scraped(key, now);
        let at_ms = u64::try_from(now.saturating_duration_since(self.start).as_millis())
            .unwrap_or(u64::MAX);
        let mut builds = self.lock();
        let Some(track) = builds.get_mut(key) else {
            return Vec::new();
        };
        track.samples.push_back(MemorySample {
            at_ms,
            working_set,
            limit,
        });
        while track.samples.len() > MAX_SAMPLES {
            track.samples.pop_front();
        }
        track.samples.iter().copied().collect()
    }

    /// Drops a build's samples (its attempt ended).
    pub fn forget(&self, key: &BuildKey) {
        self.lock().remove(key);
    }

    /// Builds tracked (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no build is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imageindex_crds::pressure::{classify_pressure, PressureLevel};

    fn key(attempt: u32) -> BuildKey {
        BuildKey {
            uid: "u".into(),
            attempt,
        }
    }

    #[test]
    fn scrapes_are_spaced_by_the_interval() {
        let h = MemoryHistory::default();
        let t0 = Instant::now();
        let every = Duration::from_secs(5);
        assert_eq!(h.wait_before_scrape(&key(1), every, t0), None);
        h.mark_scraped(&key(1), t0);
        assert_eq!(
            h.wait_before_scrape(&key(1), every, t0 + Duration::from_secs(2)),
            Some(Duration::from_secs(3))
        );
        assert_eq!(h.wait_before_scrape(&key(1), every, t0 + every), None);
        assert_eq!(h.wait_before_scrape(&key(2), every, t0), None);
    }

    #[test]
    fn sustained_samples_become_critical_and_forgetting_resets() {
        let h = MemoryHistory::default();
        let t0 = Instant::now();
        let mut level = PressureLevel::Normal;
        for s in 0..4u64 {
            let samples = h.record(&key(1), t0 + Duration::from_secs(5 * s), 95, 100);
            assert_eq!(samples.len() as u64, s + 1);
            level = classify_pressure(&samples).level;
        }
        assert_eq!(level, PressureLevel::Critical);
        h.forget(&key(1));
        let samples = h.record(&key(1), t0 + Duration::from_secs(30), 95, 100);
        assert_eq!(samples.len(), 1);
        assert_ne!(classify_pressure(&samples).level, PressureLevel::Critical);
    }

    #[test]
    fn bounded_per_build_and_in_builds() {
        let h = MemoryHistory::default();
        let t0 = Instant::now();
        for i in 0..(MAX_SAMPLES as u64 + 10) {
            h.record(&key(1), t0 + Duration::from_millis(i), i, 100);
        }
        let samples = h.record(&key(1), t0 + Duration::from_secs(1), 0, 100);
        assert_eq!(samples.len(), MAX_SAMPLES);
        assert!(samples[0].at_ms <= samples[MAX_SAMPLES - 1].at_ms);
        for a in 0..(MAX_BUILDS as u32 + 5) {
            h.mark_scraped(&key(a + 2), t0 + Duration::from_millis(u64::from(a) + 100));
        }
        assert_eq!(h.len(), MAX_BUILDS);
    }
}
