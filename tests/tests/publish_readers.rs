//! Readers never see a half-built index: while builds publish new generations, the
//! `current` pointer always resolves to a complete generation, and every reader process
//! opens and searches a consistent index.

use imageindex_e2e::*;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

#[test]
fn readers_during_publish_only_see_complete_generations() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    let images = sample_subset(&ds, 10);
    let query = attacked_copies(&images[2], &tmp.path().join("q")).remove(0);
    let out = tmp.path().join("idx");
    let build = || {
        let o = build(&ds, &out, "small", &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    build();

    let stop = Arc::new(AtomicBool::new(false));
    let pointer_checks = Arc::new(AtomicUsize::new(0));
    let reader_runs = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    // A tight loop on the pointer itself.
    {
        let (stop, checks, out) = (stop.clone(), pointer_checks.clone(), out.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let target =
                    std::fs::read_link(out.join("current")).expect("current must always exist");
                let gen = out.join(&target);
                assert!(
                    gen.join("data.mdb").is_file(),
                    "current points at {} which is incomplete",
                    gen.display()
                );
                checks.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Reader processes opening and searching whatever is current.
    for _ in 0..2 {
        let (stop, runs, out, query) = (
            stop.clone(),
            reader_runs.clone(),
            out.clone(),
            query.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut last_gen = 0;
            while !stop.load(Ordering::Relaxed) {
                let o = run(
                    "indexer",
                    &[
                        "search",
                        out.to_str().unwrap(),
                        query.to_str().unwrap(),
                        "--json",
                    ],
                );
                assert!(
                    o.status.success(),
                    "reader failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                let v = json_of(&o);
                let gen = v[0]["generation"].as_u64().unwrap();
                assert!(
                    gen >= last_gen,
                    "generation went back from {last_gen} to {gen}"
                );
                last_gen = gen;
                assert!(
                    v[0]["matches"][0]["path"]
                        .as_str()
                        .unwrap()
                        .contains(images_stem(&query)),
                    "{v}"
                );
                runs.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for _ in 0..3 {
        build();
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert!(pointer_checks.load(Ordering::Relaxed) > 1000);
    assert!(reader_runs.load(Ordering::Relaxed) >= 4);
    let info = json_of(&run("indexer", &["info", out.to_str().unwrap(), "--json"]));
    assert_eq!(info["generation"], 4);
    // Only the current and the previous generation are kept.
    let mut gens: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    gens.sort();
    assert_eq!(gens, ["gen-000003", "gen-000004"]);
}

fn images_stem(query: &Path) -> &str {
    query
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .split("__")
        .next()
        .unwrap()
}
