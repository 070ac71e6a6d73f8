//! Load: 64 concurrent clients search the service through `indexer bench load` (the same
//! command the full 60 s benchmark uses) and no request may get a 5xx or go unanswered.
//! CI runs it for 10 s; set IMAGEINDEX_LOAD_SECONDS=60 for the full run.

mod serve_common;

use imageindex_e2e::*;
use serve_common::*;

#[test]
fn sixty_four_clients_get_no_5xx() {
    let tmp = tempfile::tempdir().unwrap();
    let idx = tmp.path().join("idx");
    build_index(&sample_catalogue(), &idx, "full");
    let queries = tmp.path().join("queries");
    for name in [
        "astronaut_eileen_collins.jpg",
        "greek_coins.jpg",
        "gravel_texture.jpg",
        "coffee_cup_product_on_white.jpg",
    ] {
        attacked_copies(&sample_catalogue().join(name), &queries);
    }
    let mut server = Server::start(&idx, &["--memory-limit", "1Gi"], tmp.path());
    let seconds = std::env::var("IMAGEINDEX_LOAD_SECONDS").unwrap_or_else(|_| "10".into());
    let addr = format!("127.0.0.1:{}", server.port);
    let out = run(
        "indexer",
        &[
            "bench",
            "load",
            "--addr",
            &addr,
            "--clients",
            "64",
            "--seconds",
            &seconds,
            "--images",
            queries.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{text}");
    let json_start = text.find("\n{").map(|i| i + 1).expect("JSON report");
    let report: serde_json::Value = serde_json::from_str(&text[json_start..]).unwrap();
    assert!(report["requests"].as_u64().unwrap() > 64, "{report}");
    assert_eq!(report["server_errors"], 0, "{report}");
    assert_eq!(report["transport_errors"], 0, "{report}");
    let statuses = report["statuses"].as_object().unwrap();
    assert_eq!(statuses.keys().collect::<Vec<_>>(), ["200"], "{report}");
    // Decode memory is bounded by the slots: the server stays far below its 1 GiB limit.
    let peak = report["server_peak_rss"].as_u64().unwrap();
    assert!(peak < 1 << 30, "peak RSS {peak}");
    assert!(server.alive());
    assert_eq!(server.get("/healthz").status, 200);
}
