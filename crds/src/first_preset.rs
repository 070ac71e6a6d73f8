//! Which preset a build starts with: the richest whose memory (and disk) estimate fits, or
//! the one the spec names (tried even when the estimate says it will not fit), or none when not
//! even the poorest fits.

use crate::estimate::{self, DatasetShape};
use crate::preset::{Preset, PresetSelector};
use crate::quantity::format_mebibytes_ceil;

/// The richest preset whose estimate fits the memory limit (and the disk, when known).
pub fn auto_preset(shape: &DatasetShape, limit: u64, disk_limit: Option<u64>) -> Option<Preset> {
    Preset::ladder()
        .into_iter()
        .find(|p| fits(p, shape, limit, disk_limit))
}

fn fits(p: &Preset, shape: &DatasetShape, limit: u64, disk_limit: Option<u64>) -> bool {
    let memory_ok = estimate::min_memory(p, shape) <= limit;
    let disk_ok = disk_limit.is_none_or(|d| {
        estimate::disk_bytes(
            estimate::expected_descriptors(p, shape.images),
            shape.images,
        ) <= d / 10 * 9
    });
    memory_ok && disk_ok
}

/// The smallest memory limit the poorest preset needs by the estimate.
pub fn smallest_fitting_limit(shape: &DatasetShape) -> u64 {
    Preset::ladder()
        .iter()
        .map(|p| estimate::min_memory(p, shape))
        .min()
        .unwrap_or(0)
}

/// What the policy decided about the first preset.
#[derive(Clone, Debug, PartialEq)]
pub enum PresetFit {
    /// Run this preset; it fits.
    Fits {
        /// The preset.
        preset: Preset,
        /// Why it was chosen (for an Event and the condition).
        message: String,
    },
    /// The user asked for a preset the estimate says cannot fit: it is tried (estimates are
    /// pessimistic) and the condition names the largest that would fit.
    ExplicitTooLarge {
        /// The preset asked for.
        preset: Preset,
        /// The largest preset that fits, if any.
        largest_fitting: Option<Preset>,
        /// Condition message.
        message: String,
    },
    /// Not even the poorest preset fits: fail without starting a build.
    NothingFits {
        /// Condition message naming the limit and the smallest that would fit.
        message: String,
    },
}

/// Chooses the first preset from the selector, the scan and the limit.
pub fn choose_preset(
    selector: PresetSelector,
    shape: &DatasetShape,
    limit: u64,
    disk_limit: Option<u64>,
) -> PresetFit {
    let lim = format_mebibytes_ceil(limit);
    let smallest = smallest_fitting_limit(shape);
    if smallest > limit {
        return PresetFit::NothingFits {
            message: format!(
                "memory limit {lim} is below what even the poorest preset ({}) needs for these images (largest {}x{}); the smallest limit that would fit is {}",
                Preset::ladder().last().map(Preset::label).unwrap_or_default(),
                shape.max_width,
                shape.max_height,
                format_mebibytes_ceil(smallest)
            ),
        };
    }
    let largest = auto_preset(shape, limit, disk_limit);
    match selector.named() {
        None => match largest {
            Some(p) => PresetFit::Fits {
                message: format!(
                    "auto chose {} ({} features, {} trees): the richest preset whose estimate ({}) fits {lim}",
                    p.label(),
                    p.nfeatures,
                    p.n_trees,
                    format_mebibytes_ceil(estimate::min_memory(&p, shape))
                ),
                preset: p,
            },
            None => PresetFit::NothingFits {
                message: format!(
                    "no preset fits the index volume for {} images; give the index more storage",
                    shape.images
                ),
            },
        },
        Some(name) => {
            let p = name.preset();
            if fits(&p, shape, limit, disk_limit) {
                PresetFit::Fits { message: format!("preset {} fits {lim}", p.label()), preset: p }
            } else {
                PresetFit::ExplicitTooLarge {
                    message: format!(
                        "preset {} is estimated to need {} but the limit is {lim}; {}",
                        p.label(),
                        format_mebibytes_ceil(estimate::min_memory(&p, shape)),
                        match largest {
                            Some(l) => format!("the largest preset that fits is {}; trying {} anyway and downgrading if it runs out", l.label(), p.label()),
                            None => "no preset fits".to_string(),
                        }
                    ),
                    preset: p,
                    largest_fitting: largest,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{shape, MIB};
    use crate::preset::PresetName;

    #[test]
    fn auto_takes_full_when_memory_allows_and_steps_down_when_not() {
        let s = shape(6000, 4000);
        assert_eq!(
            auto_preset(&s, 512 * MIB, None).unwrap().name,
            PresetName::Full
        );
        let full_need = estimate::min_memory(&PresetName::Full.preset(), &s);
        let below = auto_preset(&s, full_need - 1, None).unwrap();
        assert_ne!(below.name, PresetName::Full);
        assert!(estimate::min_memory(&below, &s) < full_need);
        assert_eq!(auto_preset(&s, MIB, None), None);
    }

    #[test]
    fn auto_respects_the_index_volume() {
        let mut s = shape(2000, 1500);
        s.images = 116_000;
        let tight_disk = estimate::disk_bytes(
            estimate::expected_descriptors(&PresetName::Full.preset(), s.images),
            s.images,
        );
        let p = auto_preset(&s, 4 << 30, Some(tight_disk)).unwrap();
        assert_ne!(p.name, PresetName::Full);
    }

    #[test]
    fn explicit_preset_that_cannot_fit_is_tried_with_a_warning() {
        let s = shape(6000, 4000);
        let full_need = estimate::min_memory(&PresetName::Full.preset(), &s);
        match choose_preset(PresetSelector::Full, &s, full_need - MIB, None) {
            PresetFit::ExplicitTooLarge {
                preset,
                largest_fitting,
                message,
            } => {
                assert_eq!(preset.name, PresetName::Full);
                let l = largest_fitting.unwrap();
                assert_ne!(l.name, PresetName::Full);
                assert!(message.contains(&l.label()), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            choose_preset(PresetSelector::Full, &s, 1 << 30, None),
            PresetFit::Fits { .. }
        ));
    }

    #[test]
    fn below_the_floor_names_the_limit_and_the_smallest_that_fits() {
        let s = shape(4000, 3000);
        match choose_preset(PresetSelector::Auto, &s, 20 * MIB, None) {
            PresetFit::NothingFits { message } => {
                assert!(message.contains("20Mi"), "{message}");
                assert!(
                    message.contains(&format_mebibytes_ceil(smallest_fitting_limit(&s))),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
