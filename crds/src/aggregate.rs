//! The whole from its build units: an unsharded ImageIndex is one unit and its status is that
//! unit's; a sharded one (issue 11) is Ready only when every unit is. Pure, over
//! [`UnitStatus`] values.

use crate::types::{IndexPhase, MemoryStatus, Progress, UnitStatus};

/// The phase of a whole made of units with these phases: Failed if any failed, Ready when all
/// are (and there is at least one), else the earliest phase any unit is in (Pending before
/// Scanning before Building).
pub fn phase(units: &[Option<IndexPhase>]) -> Option<IndexPhase> {
    use IndexPhase::*;
    if units.is_empty() {
        return None;
    }
    if units.contains(&Some(Failed)) {
        return Some(Failed);
    }
    if units.iter().all(|p| *p == Some(Ready)) {
        return Some(Ready);
    }
    [None, Some(Pending), Some(Scanning), Some(Building)]
        .into_iter()
        .find(|p| units.contains(p))
        .flatten()
}

/// The whole of `units`: one unit is its own whole; several have the [`phase`] above, their
/// progress summed, the memory of the unit closest to its limit, their preset when they all
/// share one, and the lowest published generation (every unit has published at least that
/// many). Attempts stay with their units.
pub fn whole(units: &[UnitStatus]) -> UnitStatus {
    if let [one] = units {
        return one.clone();
    }
    let phases: Vec<Option<IndexPhase>> = units.iter().map(|u| u.phase).collect();
    let progress =
        units
            .iter()
            .filter_map(|u| u.progress.as_ref())
            .fold(None, |sum: Option<Progress>, p| {
                let s = sum.unwrap_or_default();
                Some(Progress::new(
                    s.processed + p.processed,
                    s.total + p.total,
                    s.failed + p.failed,
                    s.descriptors + p.descriptors,
                    None,
                ))
            });
    let memory = units
        .iter()
        .filter_map(|u| u.memory.as_ref())
        .max_by(|a, b| ratio(a).total_cmp(&ratio(b)))
        .cloned();
    let mut presets = units.iter().map(|u| u.preset.as_deref());
    let first = presets.next().flatten();
    let preset = presets
        .all(|p| p == first)
        .then(|| first.map(str::to_string))
        .flatten();
    UnitStatus {
        phase: phase(&phases),
        preset,
        attempts: Vec::new(),
        progress,
        memory,
        index_generation: units.iter().map(|u| u.index_generation).min().flatten(),
    }
}

fn ratio(m: &MemoryStatus) -> f64 {
    if m.limit == 0 {
        0.0
    } else {
        m.working_set as f64 / m.limit as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use IndexPhase::*;

    fn unit(phase: IndexPhase, preset: &str, done: u64, ws: u64, generation: u64) -> UnitStatus {
        UnitStatus {
            phase: Some(phase),
            preset: Some(preset.into()),
            attempts: Vec::new(),
            progress: Some(Progress::new(
                done,
                100,
                0,
                done * 10,
                Some("extract".into()),
            )),
            memory: Some(MemoryStatus::new(ws, ws, 100 - ws, 100, ws)),
            index_generation: Some(generation),
        }
    }

    #[test]
    fn one_unit_is_its_own_whole() {
        let mut u = unit(Building, "full", 40, 70, 0);
        u.attempts = vec![crate::attempts::started(
            1,
            "full",
            "cats-build-1",
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ),
        )];
        assert_eq!(whole(std::slice::from_ref(&u)), u);
    }

    #[test]
    fn phases_of_several_units() {
        let cases: &[(&[Option<IndexPhase>], Option<IndexPhase>)] = &[
            (&[], None),
            (&[Some(Ready), Some(Ready)], Some(Ready)),
            (&[Some(Ready), Some(Building)], Some(Building)),
            (&[Some(Building), Some(Scanning)], Some(Scanning)),
            (&[Some(Ready), Some(Failed), Some(Building)], Some(Failed)),
            (&[Some(Ready), None], None),
            (&[Some(Pending), Some(Building)], Some(Pending)),
        ];
        for (units, want) in cases {
            assert_eq!(phase(units), *want, "{units:?}");
        }
    }

    #[test]
    fn several_units_sum_progress_and_show_the_tightest_memory() {
        let w = whole(&[
            unit(Ready, "full", 100, 60, 2),
            unit(Building, "medium", 30, 90, 1),
            unit(Building, "full", 50, 20, 1),
        ]);
        assert_eq!(w.phase, Some(Building));
        assert_eq!(w.preset, None, "the units use different presets");
        assert_eq!(
            w.progress.as_ref().map(|p| p.summary.as_str()),
            Some("180/300 (60%)")
        );
        assert_eq!(w.memory.as_ref().map(|m| m.working_set), Some(90));
        assert_eq!(w.index_generation, Some(1));
        assert!(w.attempts.is_empty());
        let same = whole(&[
            unit(Ready, "small", 100, 10, 1),
            unit(Ready, "small", 100, 10, 1),
        ]);
        assert_eq!(same.preset.as_deref(), Some("small"));
    }
}
