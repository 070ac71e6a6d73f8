//! The checked-in CRD matches the types, applies to the oldest API server we support (v1.20),
//! and the example resources mean what their comments say.

use imageindex_crds::estimate::DatasetShape;
use imageindex_crds::first_preset::{choose_preset, PresetFit};
use imageindex_crds::shards::{self, ShardCount};
use imageindex_crds::validate::{validate, Mode};
use imageindex_crds::{ImageIndex, PresetSelector};
use kube::CustomResourceExt;

const CHECKED_IN: &str = include_str!("../imageindex.yaml");

#[test]
fn checked_in_crd_matches_the_types() {
    let generated = serde_yaml::to_string(&ImageIndex::crd()).unwrap();
    assert!(
        generated == CHECKED_IN,
        "crds/imageindex.yaml is out of date; regenerate it with\n  cargo run -p imageindex-crds --bin crdgen > crds/imageindex.yaml"
    );
}

#[test]
fn crd_avoids_what_kube_apiserver_1_20_rejects() {
    // An empty-string default is rejected as `null`; CEL rules do not exist before 1.25.
    assert!(
        !CHECKED_IN.contains("default: ''"),
        "empty-string default in the schema"
    );
    assert!(
        !CHECKED_IN.contains("x-kubernetes-validations"),
        "CEL rules in the schema"
    );
    for column in ["Phase", "Preset", "Progress", "Memory", "Shards", "Age"] {
        assert!(
            CHECKED_IN.contains(&format!("name: {column}")),
            "printer column {column}"
        );
    }
    assert!(CHECKED_IN.contains("- imgidx"));
}

fn example(name: &str) -> ImageIndex {
    let path = format!("{}/yaml/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// 116k photos of up to 6000x4000, as the catalogue this project was made for.
fn catalogue() -> DatasetShape {
    DatasetShape {
        images: 116_085,
        bytes: 250_000_000_000,
        max_width: 6000,
        max_height: 4000,
        max_is_jpeg: true,
    }
}

#[test]
fn good_example_is_valid_and_fits() {
    let ii = example("instance-good.yaml");
    let v = validate(&ii.spec, Mode::Cluster).unwrap();
    assert_eq!(v.memory_limit, 512 << 20);
    assert!(matches!(
        choose_preset(
            ii.spec.preset,
            &catalogue(),
            v.memory_limit,
            v.storage_bytes
        ),
        PresetFit::Fits { .. }
    ));
}

#[test]
fn invalid_example_names_every_bad_field() {
    let ii = example("instance-invalid.yaml");
    let errors = validate(&ii.spec, Mode::Cluster).unwrap_err();
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    for f in [
        "spec.memoryLimit",
        "spec.dataset.claimName",
        "spec.dataset.path",
        "spec.maxAttempts",
        "spec.cpu",
    ] {
        assert!(fields.contains(&f), "{f} not reported: {fields:?}");
    }
}

#[test]
fn too_small_example_is_valid_but_nothing_fits() {
    let ii = example("instance-too-small.yaml");
    let v = validate(&ii.spec, Mode::Cluster).unwrap();
    assert_eq!(ii.spec.preset, PresetSelector::Auto);
    match choose_preset(
        ii.spec.preset,
        &catalogue(),
        v.memory_limit,
        v.storage_bytes,
    ) {
        PresetFit::NothingFits { message } => {
            assert!(message.contains("32Mi"), "{message}");
            assert!(
                message.contains("smallest limit that would fit"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn sharded_example_is_valid_and_auto_shards_only_what_outgrows_a_pod() {
    let ii = example("instance-sharded.yaml");
    let v = validate(&ii.spec, Mode::Cluster).unwrap();
    assert_eq!(ii.spec.shards, Some(ShardCount::Auto));
    assert_eq!(ii.spec.max_parallel_builds, Some(2));
    // The seed catalogue fits one pod; ten times it does not.
    let (one, _) = shards::count(
        ii.spec.shards,
        &catalogue(),
        v.memory_limit,
        v.storage_bytes,
    );
    assert_eq!(one, 1);
    let bigger = DatasetShape {
        images: catalogue().images * 10,
        ..catalogue()
    };
    let (n, why) = shards::count(ii.spec.shards, &bigger, v.memory_limit, v.storage_bytes);
    assert!(n > 1, "{why:?}");
    let number: ImageIndex = serde_yaml::from_str(
        &std::fs::read_to_string(format!(
            "{}/yaml/instance-sharded.yaml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
        .replace("shards: auto", "shards: 3"),
    )
    .unwrap();
    assert_eq!(number.spec.shards, Some(ShardCount::Count(3)));
}
