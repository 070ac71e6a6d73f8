//! `kill -9` at several points of a build, then the same command again: the build resumes
//! without re-extracting finished images and ends with an index equivalent to an
//! uninterrupted build (same images, same descriptors, same search results).

use imageindex_e2e::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn build_cmd(dataset: &Path, out: &Path, port: Option<u16>) -> Command {
    let mut c = build_command(dataset, out, "small");
    c.args(["--threads", "1", "--json"]);
    if let Some(p) = port {
        c.args(["--metrics-addr", &format!("127.0.0.1:{p}")]);
    }
    c.stdout(Stdio::piped()).stderr(Stdio::null());
    c
}

/// Starts a build and SIGKILLs it once `ready(metrics)` holds; returns whether it was killed
/// (false when the build finished first).
fn kill_when(dataset: &Path, out: &Path, ready: impl Fn(&str) -> bool) -> bool {
    kill_when_with(dataset, out, &[], &[], ready)
}

/// [`kill_when`] with extra build arguments and environment variables.
fn kill_when_with(
    dataset: &Path,
    out: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
    ready: impl Fn(&str) -> bool,
) -> bool {
    let port = free_port();
    let mut child: Child = build_cmd(dataset, out, Some(port))
        .args(extra)
        .envs(env.iter().copied())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                status.success(),
                "build failed before the kill point: {status:?}"
            );
            return false;
        }
        if let Some(text) = http_get(port, "/metrics") {
            if ready(&text) {
                child.kill().unwrap(); // SIGKILL
                let status = child.wait().unwrap();
                assert!(!status.success());
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(15));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("kill point never reached");
}

fn search(out: &Path, queries: &[std::path::PathBuf]) -> serde_json::Value {
    let mut args = vec![
        "search".to_string(),
        out.display().to_string(),
        "--json".into(),
        "-k".into(),
        "5".into(),
    ];
    args.extend(queries.iter().map(|q| q.display().to_string()));
    let o = Command::new(bin("indexer")).args(&args).output().unwrap();
    let mut v = json_of(&o);
    // Timings differ run to run; everything else must not.
    for item in v.as_array_mut().unwrap() {
        item.as_object_mut().unwrap().remove("timings");
        item.as_object_mut().unwrap().remove("query");
    }
    v
}

fn info(out: &Path) -> serde_json::Value {
    json_of(&run("indexer", &["info", out.to_str().unwrap(), "--json"]))
}

#[test]
fn killed_builds_resume_to_an_equivalent_index() {
    let tmp = tempfile::tempdir().unwrap();
    let dataset = tmp.path().join("photos");
    let photos = make_photos(&dataset, 36, 1600);
    let queries: Vec<_> = [&photos[3], &photos[20]]
        .iter()
        .flat_map(|p| attacked_copies(p, &tmp.path().join("q")))
        .collect();

    // Uninterrupted reference.
    let reference = tmp.path().join("ref");
    let o = build_cmd(&dataset, &reference, None).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));

    // Killed during extraction (twice), during the index phases, then finished.
    let out = tmp.path().join("idx");
    let phase = |t: &str, p: &str| {
        metric(t, &format!("imageindex_build_phase{{phase=\"{p}\"}}")) == Some(1.0)
    };
    let processed = |t: &str| metric(t, "imageindex_images_processed_total").unwrap_or(0.0);
    assert!(
        kill_when(&dataset, &out, |t| phase(t, "extract")
            && processed(t) >= 6.0),
        "first kill"
    );
    assert!(
        kill_when(&dataset, &out, |t| phase(t, "extract")
            && processed(t) >= 20.0),
        "second kill"
    );
    let killed_in_index = kill_when(&dataset, &out, |t| phase(t, "index"));
    let o = build_cmd(&dataset, &out, None).output().unwrap();
    assert!(o.status.success());
    let summary = json_of(&o);
    assert_eq!(summary["resumed"], true);
    if killed_in_index {
        assert_eq!(
            summary["extractedNow"], 0,
            "the index phase must not re-extract: {summary}"
        );
    }

    let (a, b) = (info(&reference), info(&out));
    for key in [
        "imagesIndexed",
        "imagesFailed",
        "imagesTotal",
        "descriptors",
        "fingerprint",
        "cells",
        "lists",
    ] {
        assert_eq!(a["meta"][key], b["meta"][key], "{key}");
    }
    assert!(a["meta"]["descriptors"].as_u64().unwrap() > 36 * 100);
    assert_eq!(search(&reference, &queries), search(&out, &queries));
    // Only one generation was published and no build directory is left behind.
    assert_eq!(b["generation"], 1);
    assert!(!out.join("build").exists());
}

#[test]
fn a_resumed_extraction_does_not_redo_finished_images() {
    let tmp = tempfile::tempdir().unwrap();
    let dataset = tmp.path().join("photos");
    make_photos(&dataset, 30, 1600);
    let out = tmp.path().join("idx");
    let processed = |t: &str| metric(t, "imageindex_images_processed_total").unwrap_or(0.0);
    assert!(kill_when(&dataset, &out, |t| processed(t) >= 20.0));
    let o = build_cmd(&dataset, &out, None).output().unwrap();
    assert!(o.status.success());
    let s = json_of(&o);
    let now = s["extractedNow"].as_u64().unwrap();
    // Checkpoints commit every half second, so only the last uncommitted batch is redone.
    assert!(
        (10..30).contains(&now),
        "re-extracted {now} of 30 after a kill at 20"
    );
    assert_eq!(s["meta"]["imagesIndexed"], 30);
}

#[test]
fn a_publish_killed_before_switching_current_is_finished_not_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let dataset = tmp.path().join("photos");
    make_photos(&dataset, 8, 800);
    let out = tmp.path().join("idx");
    for _ in 0..2 {
        assert!(build_cmd(&dataset, &out, None)
            .output()
            .unwrap()
            .status
            .success());
    }
    // The state a kill between the generation's rename and the `current` switch leaves.
    let current = out.join("current");
    std::fs::remove_file(&current).unwrap();
    std::os::unix::fs::symlink("gen-000001", &current).unwrap();
    assert_eq!(info(&out)["generation"], 1);

    let o = build_cmd(&dataset, &out, None).output().unwrap();
    assert!(o.status.success());
    let s = json_of(&o);
    assert_eq!(s["generation"], 2, "{s}");
    assert_eq!(s["extractedNow"], 0, "{s}");
    assert_eq!(info(&out)["generation"], 2);
    assert!(!out.join("gen-000003").exists());

    // A different dataset is not mistaken for the interrupted build: it is built anew.
    std::fs::remove_file(&current).unwrap();
    std::os::unix::fs::symlink("gen-000001", &current).unwrap();
    make_photos(&tmp.path().join("more"), 1, 640)
        .iter()
        .for_each(|p| {
            std::fs::copy(p, dataset.join("extra.jpg")).unwrap();
        });
    let s = json_of(&build_cmd(&dataset, &out, None).output().unwrap());
    assert_eq!(s["generation"], 3, "{s}");
    assert_eq!(s["meta"]["imagesTotal"], 9, "{s}");
}

#[test]
fn kills_in_every_index_step_resume_to_the_same_lists_and_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let dataset = tmp.path().join("photos");
    let photos = make_photos(&dataset, 16, 1400);
    let queries: Vec<_> = [&photos[2], &photos[11]]
        .iter()
        .flat_map(|p| attacked_copies(p, &tmp.path().join("q")))
        .collect();
    // Small list parts: every cell's postings span several LMDB values and the lists step
    // commits many times, so a kill lands between parts.
    let parts = ["--list-part-bytes", "4096"];
    let reference = tmp.path().join("ref");
    let o = build_cmd(&dataset, &reference, None)
        .args(parts)
        .output()
        .unwrap();
    assert!(o.status.success());
    let a = info(&reference);
    assert!(a["lists"]["lists"].as_u64().unwrap() >= 8, "{a}");

    // One kill in each step of the index phase, each step held at its batch ends by a
    // fail point long enough for the poll to see it; every kill leaves a resumable checkpoint.
    let hold = [("FAILPOINTS", "index-step-batch=sleep(150)")];
    let out = tmp.path().join("idx");
    let step = |t: &str, s: &str| {
        metric(t, &format!("imageindex_build_step{{step=\"{s}\"}}")) == Some(1.0)
    };
    for s in ["partition", "lists", "global"] {
        assert!(
            kill_when_with(&dataset, &out, &parts, &hold, |t| step(t, s)),
            "the build finished before the kill in {s}"
        );
    }
    let o = build_cmd(&dataset, &out, None)
        .args(parts)
        .output()
        .unwrap();
    assert!(o.status.success());
    let summary = json_of(&o);
    assert_eq!(summary["resumed"], true, "{summary}");
    assert_eq!(summary["extractedNow"], 0, "{summary}");
    let b = info(&out);
    for key in ["descriptors", "cells", "lists", "globals", "imagesIndexed"] {
        assert_eq!(a["meta"][key], b["meta"][key], "{key}");
    }
    assert_eq!(a["lists"], b["lists"], "list sizes");
    assert_eq!(search(&reference, &queries), search(&out, &queries));
    let top1: Vec<String> = search(&out, &queries)
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["matches"][0]["path"].as_str().unwrap_or("").to_string())
        .collect();
    for (q, got) in queries.iter().zip(&top1) {
        let want = q
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .split("__")
            .next()
            .unwrap();
        assert!(got.contains(want), "{got} for {want}");
    }
}
