//! The preset ladder: how many ORB features, arroy trees and search effort a build uses.
//!
//! The field's presets (small … xlarge) come from the system we replace; `full` is the
//! 1000-feature setting it could not afford. Below the poorest preset the ladder halves
//! `nfeatures` down to [`NFEATURES_FLOOR`].

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The named presets, richest first.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum PresetName {
    /// 1000 features per image: the quality the old system had to give up.
    Full,
    /// Field preset for < 10k images.
    Small,
    /// Field preset for 10k – 50k images.
    Medium,
    /// Field preset for 50k – 100k images.
    Large,
    /// Field preset for 100k+ images.
    Xlarge,
}

impl PresetName {
    /// All named presets, richest first: the downgrade ladder.
    pub const LADDER: [PresetName; 5] = [
        Self::Full,
        Self::Small,
        Self::Medium,
        Self::Large,
        Self::Xlarge,
    ];

    /// The lowercase name used in manifests, labels and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Small => "small",
            Self::Medium => "medium",
            Self::Large => "large",
            Self::Xlarge => "xlarge",
        }
    }

    /// The preset parameters of this named step.
    pub fn preset(self) -> Preset {
        // (nfeatures, n_trees, search_k, max_side)
        let (nfeatures, n_trees, search_k, max_side) = match self {
            Self::Full => (1000, 20, 100, 2048),
            Self::Small => (300, 20, 100, 1600),
            Self::Medium => (200, 15, 75, 1280),
            Self::Large => (150, 15, 50, 1024),
            Self::Xlarge => (100, 10, 30, 1024),
        };
        Preset {
            name: self,
            nfeatures,
            n_trees,
            search_k,
            max_side,
        }
    }
}

impl fmt::Display for PresetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a user asks for in `spec.preset`: a named preset or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum PresetSelector {
    /// Let the policy choose from the scan and the memory limit.
    #[default]
    Auto,
    /// 1000 features.
    Full,
    /// Field preset for < 10k images.
    Small,
    /// Field preset for 10k – 50k images.
    Medium,
    /// Field preset for 50k – 100k images.
    Large,
    /// Field preset for 100k+ images.
    Xlarge,
}

impl PresetSelector {
    /// The named preset asked for, or `None` for `auto`.
    pub fn named(self) -> Option<PresetName> {
        match self {
            Self::Auto => None,
            Self::Full => Some(PresetName::Full),
            Self::Small => Some(PresetName::Small),
            Self::Medium => Some(PresetName::Medium),
            Self::Large => Some(PresetName::Large),
            Self::Xlarge => Some(PresetName::Xlarge),
        }
    }

    /// Parses the CLI/manifest spelling (`auto`, `full`, `small`, …).
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(Self::Auto),
            "full" => Some(Self::Full),
            "small" => Some(Self::Small),
            "medium" => Some(Self::Medium),
            "large" => Some(Self::Large),
            "xlarge" => Some(Self::Xlarge),
            _ => None,
        }
    }
}

/// The smallest `nfeatures` the ladder goes down to before declaring failure.
pub const NFEATURES_FLOOR: u32 = 50;

/// One step of the ladder: the parameters a build runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Preset {
    /// The named preset this step derives from.
    pub name: PresetName,
    /// ORB features kept per image.
    pub nfeatures: u32,
    /// arroy trees per shard.
    pub n_trees: u32,
    /// Search effort (arroy `search_k` per wanted neighbour; IVF probes derive from it).
    pub search_k: u32,
    /// Longest image side ORB works at; larger images are decoded reduced and resized.
    pub max_side: u32,
}

impl Preset {
    /// The label of this step: the preset name, with `-nfN` when `nfeatures` was halved.
    pub fn label(&self) -> String {
        if self.nfeatures == self.name.preset().nfeatures {
            self.name.as_str().to_string()
        } else {
            format!("{}-nf{}", self.name, self.nfeatures)
        }
    }

    /// Reads a label made by [`Preset::label`] (`full`, `xlarge-nf50`).
    pub fn from_label(label: &str) -> Option<Preset> {
        let (name, nf) = match label.split_once("-nf") {
            Some((name, nf)) => (name, Some(nf.parse::<u32>().ok()?)),
            None => (label, None),
        };
        let named = PresetSelector::parse(name)?.named()?;
        let mut preset = named.preset();
        if let Some(nf) = nf {
            if nf == 0 || nf > preset.nfeatures {
                return None;
            }
            preset.nfeatures = nf;
        }
        Some(preset)
    }

    /// The full ladder from richest to poorest, including the halved steps down to the floor.
    pub fn ladder() -> Vec<Preset> {
        let mut steps: Vec<Preset> = PresetName::LADDER.iter().map(|n| n.preset()).collect();
        let mut last = *steps.last().expect("ladder is not empty");
        while last.nfeatures / 2 >= NFEATURES_FLOOR {
            last.nfeatures /= 2;
            steps.push(last);
        }
        steps
    }

    /// The next poorer step of the ladder, or `None` at the floor.
    pub fn poorer(&self) -> Option<Preset> {
        let ladder = Self::ladder();
        let pos = ladder.iter().position(|p| p == self)?;
        ladder.get(pos + 1).copied()
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_table_is_kept() {
        let table: Vec<(&str, u32, u32, u32)> = PresetName::LADDER
            .iter()
            .map(|n| {
                let p = n.preset();
                (n.as_str(), p.nfeatures, p.n_trees, p.search_k)
            })
            .collect();
        assert_eq!(
            table,
            vec![
                ("full", 1000, 20, 100),
                ("small", 300, 20, 100),
                ("medium", 200, 15, 75),
                ("large", 150, 15, 50),
                ("xlarge", 100, 10, 30),
            ]
        );
    }

    #[test]
    fn ladder_halves_below_xlarge_down_to_the_floor() {
        let labels: Vec<String> = Preset::ladder().iter().map(Preset::label).collect();
        assert_eq!(
            labels,
            ["full", "small", "medium", "large", "xlarge", "xlarge-nf50"]
        );
        let floor = *Preset::ladder().last().unwrap();
        assert_eq!(floor.nfeatures, NFEATURES_FLOOR);
        assert_eq!(floor.poorer(), None);
        assert_eq!(
            PresetName::Full.preset().poorer().unwrap().name,
            PresetName::Small
        );
    }

    #[test]
    fn labels_round_trip_and_reject_garbage() {
        for p in Preset::ladder() {
            assert_eq!(Preset::from_label(&p.label()), Some(p));
        }
        assert_eq!(Preset::from_label("huge"), None);
        assert_eq!(Preset::from_label("xlarge-nf0"), None);
        assert_eq!(Preset::from_label("small-nf5000"), None);
        assert_eq!(Preset::from_label("auto"), None);
    }

    #[test]
    fn presets_get_poorer_down_the_ladder() {
        let ladder = Preset::ladder();
        for pair in ladder.windows(2) {
            assert!(pair[1].nfeatures <= pair[0].nfeatures);
            assert!(pair[1].max_side <= pair[0].max_side);
            assert!(pair[1].n_trees <= pair[0].n_trees);
        }
    }
}
