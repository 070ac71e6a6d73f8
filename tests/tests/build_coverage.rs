//! Nothing silently missing, lists that stay even: every image of a catalogue is indexed or
//! counted failed with its reason; an image without local features but with a layout is
//! indexed and found by it; the bundled sample's inverted lists stay near their mean length.

use imageindex_e2e::*;
use opencv::core::{Mat, Scalar, Vector, CV_8UC3};
use opencv::prelude::*;
use std::path::Path;

/// Writes a PNG of `w`×`h` whose pixels are `pixel(x, y)` (BGR).
fn write_png(path: &Path, w: i32, h: i32, pixel: impl Fn(i32, i32) -> [u8; 3]) {
    let mut m = Mat::new_rows_cols_with_default(h, w, CV_8UC3, Scalar::all(0.0)).unwrap();
    for y in 0..h {
        for x in 0..w {
            let p = pixel(x, y);
            *m.at_2d_mut::<opencv::core::Vec3b>(y, x).unwrap() = opencv::core::Vec3b::from(p);
        }
    }
    assert!(opencv::imgcodecs::imwrite(path.to_str().unwrap(), &m, &Vector::new()).unwrap());
}

/// A smooth two-way colour gradient: no corners for ORB, a clear layout.
fn gradient(w: i32, h: i32) -> impl Fn(i32, i32) -> [u8; 3] {
    move |x, y| {
        let (a, b) = ((x * 255 / w) as u8, (y * 255 / h) as u8);
        [a, b, 255 - a]
    }
}

#[test]
fn blank_images_are_counted_with_a_reason_and_featureless_ones_are_found_by_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    sample_subset(&ds, 6);
    write_png(&ds.join("blank.png"), 400, 300, |_, _| [255, 255, 255]);
    write_png(&ds.join("gradient.png"), 500, 400, gradient(500, 400));
    let out = tmp.path().join("idx");
    let o = build(&ds, &out, "small", &["--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = json_of(&o);
    // Every file is accounted for: indexed + failed = total.
    assert_eq!(s["meta"]["imagesTotal"], 8, "{s}");
    assert_eq!(s["meta"]["imagesIndexed"], 7, "{s}");
    assert_eq!(s["meta"]["imagesFailed"], 1, "{s}");
    let info = json_of(&run("indexer", &["info", out.to_str().unwrap(), "--json"]));
    let failed = info["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{info}");
    assert_eq!(failed[0]["path"], "blank.png");
    assert!(
        failed[0]["reason"]
            .as_str()
            .unwrap()
            .contains("no features"),
        "{info}"
    );

    // A resized, re-encoded copy of the gradient has no feature matches; its layout finds it.
    let q = tmp.path().join("q.jpg");
    write_png(&tmp.path().join("q.png"), 350, 280, gradient(350, 280));
    let img = opencv::imgcodecs::imread(
        tmp.path().join("q.png").to_str().unwrap(),
        opencv::imgcodecs::IMREAD_COLOR,
    )
    .unwrap();
    let params = Vector::<i32>::from_slice(&[opencv::imgcodecs::IMWRITE_JPEG_QUALITY, 80]);
    assert!(opencv::imgcodecs::imwrite(q.to_str().unwrap(), &img, &params).unwrap());
    let search = |extra: &[&str]| {
        let mut args = vec![
            "search",
            out.to_str().unwrap(),
            q.to_str().unwrap(),
            "--json",
        ];
        args.extend(extra);
        json_of(&run("indexer", &args))
    };
    let found = search(&[]);
    let top = &found[0]["matches"][0];
    assert_eq!(top["path"], "gradient.png", "{found}");
    assert_eq!(top["matched_by"], "layout", "{found}");
    assert!(top["layout_distance"].as_f64().unwrap() < 0.12, "{found}");
    // Without the layout fallback nothing claims to be it.
    let without = search(&["--no-layout"]);
    let matches = without[0]["matches"].as_array().unwrap();
    assert!(
        matches
            .iter()
            .all(|m| m["matched_by"] == "features" && m["verified"] != true),
        "{without}"
    );
}

#[test]
fn the_sample_catalogues_lists_stay_near_their_mean_length() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("idx");
    let o = build(&sample_catalogue(), &out, "full", &["--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let info = json_of(&run("indexer", &["info", out.to_str().unwrap(), "--json"]));
    let lists = &info["lists"];
    let (mean, max) = (
        lists["mean"].as_f64().unwrap(),
        lists["max"].as_f64().unwrap(),
    );
    assert!(lists["lists"].as_u64().unwrap() >= 16, "{lists}");
    assert_eq!(lists["entries"], info["meta"]["descriptors"], "{lists}");
    // Real ORB crowds some leaves; the balancing prices keep the largest list within a few
    // times the mean.
    assert!(max < 6.0 * mean, "{lists}");
}
