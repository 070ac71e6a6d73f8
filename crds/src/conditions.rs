//! Kubernetes-style status conditions, merged by type.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// `Ready`: an index is published and the query service answers.
pub const READY: &str = "Ready";
/// `Progressing`: a scan or build is running (or about to).
pub const PROGRESSING: &str = "Progressing";
/// `MemoryPressure`: the build's working set is close to its limit.
pub const MEMORY_PRESSURE: &str = "MemoryPressure";
/// `Degraded`: the spec is invalid, an attempt failed, or the operator gave up.
pub const DEGRADED: &str = "Degraded";
/// `PresetFits`: whether the chosen preset fits the memory limit by the estimate.
pub const PRESET_FITS: &str = "PresetFits";

/// Sets a condition, keeping `lastTransitionTime` when the status did not change.
/// Returns whether anything changed.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: &Time,
) -> bool {
    let status_str = if status { "True" } else { "False" };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let changed_status = c.status != status_str;
            let changed = changed_status
                || c.reason != reason
                || c.message != message
                || c.observed_generation != observed_generation;
            if changed_status {
                c.last_transition_time = now.clone();
            }
            c.status = status_str.to_string();
            c.reason = reason.to_string();
            c.message = message.to_string();
            c.observed_generation = observed_generation;
            changed
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_string(),
                status: status_str.to_string(),
                reason: reason.to_string(),
                message: message.to_string(),
                observed_generation,
                last_transition_time: now.clone(),
            });
            true
        }
    }
}

/// The condition of a type, if set.
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of a type is set and `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    get(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::at;

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut c = Vec::new();
        assert!(set(
            &mut c,
            READY,
            false,
            "Building",
            "building",
            Some(1),
            &at(10)
        ));
        assert!(set(
            &mut c,
            READY,
            false,
            "Building",
            "50%",
            Some(1),
            &at(20)
        ));
        assert_eq!(c[0].last_transition_time, at(10));
        assert!(!set(
            &mut c,
            READY,
            false,
            "Building",
            "50%",
            Some(1),
            &at(25)
        ));
        assert!(set(
            &mut c,
            READY,
            true,
            "Published",
            "ok",
            Some(1),
            &at(30)
        ));
        assert_eq!(c[0].last_transition_time, at(30));
        assert_eq!(c.len(), 1);
        assert!(is_true(&c, READY));
        assert!(!is_true(&c, DEGRADED));
    }

    #[test]
    fn types_are_kept_apart() {
        let mut c = Vec::new();
        set(&mut c, READY, false, "A", "", None, &at(1));
        set(&mut c, DEGRADED, true, "B", "", None, &at(1));
        assert_eq!(c.len(), 2);
        assert_eq!(get(&c, DEGRADED).unwrap().reason, "B");
    }
}
