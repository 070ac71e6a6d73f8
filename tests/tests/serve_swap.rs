//! Hot swap under load: clients search without pause while `POST /v1/index/rebuild` builds
//! and publishes the next generation in the same process. No request may fail, and the
//! answers must move to the new generation (the `generation` field) once it is published.

mod serve_common;

use imageindex_e2e::*;
use serve_common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[test]
fn rebuild_swaps_generations_without_failing_a_request() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    sample_subset(&ds, 25);
    let idx = tmp.path().join("idx");
    build_index(&ds, &idx, "full");
    let server = Server::start(&idx, &["--dataset", ds.to_str().unwrap()], tmp.path());
    let queries: Vec<(String, Vec<u8>)> = [
        "greek_coins.jpg",
        "grass_texture.jpg",
        "clock_motion_blur.jpg",
        "rocket_launch_pad.jpg",
    ]
    .iter()
    .map(|n| (n.to_string(), std::fs::read(ds.join(n)).unwrap()))
    .collect();

    let stop = Arc::new(AtomicBool::new(false));
    // (finished at, generation, status, top match) of every answer
    let answers = Arc::new(Mutex::new(Vec::<(Instant, u64, u16, String)>::new()));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let port = server.port;
    let clients: Vec<_> = (0..6)
        .map(|c| {
            let (stop, answers, failures, queries) = (
                stop.clone(),
                answers.clone(),
                failures.clone(),
                queries.clone(),
            );
            std::thread::spawn(move || {
                let mut i = c;
                while !stop.load(Ordering::Relaxed) {
                    let (name, bytes) = &queries[i % queries.len()];
                    i += 1;
                    match request(
                        port,
                        "POST",
                        "/v1/search?k=1",
                        &[("Content-Type", "image/jpeg")],
                        bytes,
                    ) {
                        Ok(r) if r.status == 200 => {
                            let j = r.json();
                            let top = j["matches"][0]["path"].as_str().unwrap_or("").to_string();
                            if top != *name {
                                failures.lock().unwrap().push(format!(
                                    "{name} answered {top} by generation {}",
                                    j["generation"]
                                ));
                            }
                            answers.lock().unwrap().push((
                                Instant::now(),
                                j["generation"].as_u64().unwrap(),
                                200,
                                top,
                            ));
                        }
                        Ok(r) => failures.lock().unwrap().push(format!(
                            "{name}: {} {}",
                            r.status,
                            r.text()
                        )),
                        Err(e) => failures.lock().unwrap().push(format!("{name}: {e}")),
                    }
                }
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(1500));
    let r = server.req(
        "POST",
        "/v1/index/rebuild",
        &[("Content-Type", "application/json")],
        br#"{"preset": "full"}"#,
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let location = r.header("location").unwrap().to_string();
    assert_eq!(r.json()["state"], "running");
    // One at a time.
    let second = server.req("POST", "/v1/index/rebuild", &[], b"");
    assert_eq!(second.status, 409, "{}", second.text());
    assert_eq!(second.json()["error"], "rebuild_running");

    assert!(
        wait_until(Duration::from_secs(120), || server.get(&location).json()
            ["state"]
            != "running"),
        "rebuild did not finish:\n{}",
        server.log_text()
    );
    let status = server.get(&location).json();
    assert_eq!(status["state"], "succeeded", "{status}");
    assert_eq!(status["generation"], 2);
    let published = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }

    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed requests, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let answers = answers.lock().unwrap();
    let on = |g: u64| answers.iter().filter(|a| a.1 == g).count();
    eprintln!(
        "{} answers: {} by generation 1, {} by generation 2",
        answers.len(),
        on(1),
        on(2)
    );
    assert!(on(1) > 0 && on(2) > 0, "answers did not span the swap");
    // Once published (and after the requests already running finished), answers come from 2.
    let late: Vec<_> = answers
        .iter()
        .filter(|a| a.0 > published + Duration::from_millis(500))
        .collect();
    assert!(!late.is_empty());
    assert!(
        late.iter().all(|a| a.1 == 2),
        "an answer from generation 1 after the swap"
    );
    assert_eq!(server.get("/v1/index").json()["generation"], 2);
    let metrics = server.get("/metrics").text();
    assert_eq!(metric(&metrics, "imageindex_index_generation"), Some(2.0));
    assert!(
        server.log_text().contains("generation released"),
        "the old generation was not released"
    );
}
