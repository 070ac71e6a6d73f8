//! A sharded index end to end, with the real binaries: the sample catalogue built unsharded
//! and as 3 shards (`indexer build --shard I/3`), one `indexer serve` per shard and
//! `indexer route` in front. The router's answers to attacked copies equal the unsharded
//! index's; every image lands in exactly one shard; a shard that is stopped lowers the
//! coverage (2/3, a `partial` warning, within the deadline) instead of failing the query, and
//! the router follows it back, and a shard that comes up between two polls is asked by the
//! next query; bad uploads get the same JSON errors as `indexer serve`.
//!
//! Build the binaries first: `cargo build -p indexer`.

mod serve_common;

use imageindex_e2e::*;
use serde_json::Value;
use serve_common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `indexer route`, killed when dropped.
struct Router {
    port: u16,
    child: Child,
    log: PathBuf,
}

impl Router {
    fn start(shards: &[String], extra: &[&str], log_dir: &Path) -> Router {
        let port = free_port();
        let log = log_dir.join(format!("route-{port}.log"));
        let addr = format!("127.0.0.1:{port}");
        let mut args = vec!["route".to_string(), "--addr".into(), addr];
        for s in shards {
            args.extend(["--shard".into(), s.clone()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(bin("indexer"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start indexer route");
        let mut r = Router { port, child, log };
        let t = Instant::now();
        loop {
            if let Ok(resp) = request(port, "GET", "/readyz", &[], b"") {
                if resp.status == 200 {
                    break;
                }
            }
            if let Ok(Some(status)) = r.child.try_wait() {
                panic!("indexer route exited with {status}:\n{}", r.log_text());
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "route did not start:\n{}",
                r.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn search(&self, bytes: &[u8]) -> Resp {
        request(
            self.port,
            "POST",
            "/v1/search",
            &[("Content-Type", "image/jpeg")],
            bytes,
        )
        .unwrap_or_else(|e| panic!("search: {e}\n{}", self.log_text()))
    }

    fn index(&self) -> Value {
        request(self.port, "GET", "/v1/index", &[], b"")
            .unwrap()
            .json()
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn top_path(v: &Value) -> Option<String> {
    v["matches"][0]["path"].as_str().map(str::to_string)
}

#[test]
fn three_shards_answer_as_one_index() {
    let tmp = tempfile::tempdir().unwrap();
    let catalogue = sample_catalogue();
    let whole = tmp.path().join("whole");
    build_index(&catalogue, &whole, "full");
    let mut shard_images = 0;
    let mut shard_dirs = Vec::new();
    for i in 0..3 {
        let out = tmp.path().join(format!("shard-{i}"));
        let o = build(
            &catalogue,
            &out,
            "full",
            &["--shard", &format!("{i}/3"), "--json"],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let summary = json_of(&o);
        let n = summary["meta"]["imagesTotal"].as_u64().unwrap();
        assert!(n > 0, "shard {i} is empty: {summary:#}");
        assert_eq!(summary["meta"]["shard"]["index"], i);
        shard_images += n;
        shard_dirs.push(out);
    }
    let files = std::fs::read_dir(&catalogue).unwrap().count() as u64;
    assert_eq!(shard_images, files, "every image in exactly one shard");
    // The same shard twice is the same images (a stable assignment).
    let again = tmp.path().join("shard-1-again");
    let o = build(&catalogue, &again, "full", &["--shard", "1/3"]);
    let paths = |dir: &Path| {
        let out = run("indexer", &["info", dir.to_str().unwrap(), "--json"]);
        json_of(&out)["meta"]["fingerprint"].clone()
    };
    assert!(o.status.success());
    assert_eq!(paths(&shard_dirs[1]), paths(&again));

    let logs = tmp.path();
    let unsharded = Server::start(&whole, &[], logs);
    let mut shards: Vec<Option<Server>> = shard_dirs
        .iter()
        .map(|d| Some(Server::start(d, &[], logs)))
        .collect();
    let urls: Vec<String> = shards
        .iter()
        .map(|s| format!("http://127.0.0.1:{}", s.as_ref().unwrap().port))
        .collect();
    let router = Router::start(
        &urls,
        &["--deadline", "3s", "--poll-interval", "300ms"],
        logs,
    );
    let index = router.index();
    assert_eq!(index["shards_total"], 3, "{index:#}");
    assert_eq!(index["images_total"].as_u64(), Some(files), "{index:#}");

    // Attacked copies of every sample: the router's top answer equals the unsharded one's.
    let queries = tmp.path().join("queries");
    let mut all = Vec::new();
    for f in std::fs::read_dir(&catalogue).unwrap().flatten() {
        all.extend(attacked_copies(&f.path(), &queries));
    }
    let (mut same, mut found, mut total) = (0, 0, 0);
    for q in &all {
        let bytes = std::fs::read(q).unwrap();
        let a = unsharded.search_raw("", &bytes, "image/jpeg");
        let b = router.search(&bytes);
        assert_eq!(b.status, 200, "{}", b.text());
        let (a, b) = (a.json(), b.json());
        assert_eq!(b["coverage"]["answered"], 3, "{b:#}");
        assert!(b["matches"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["shard"].is_u64()));
        total += 1;
        same += usize::from(top_path(&a) == top_path(&b));
        let stem = original_stem(q);
        found += usize::from(top_path(&b).is_some_and(|p| p.starts_with(&stem)));
    }
    let agreement = same as f64 / total as f64;
    let recall = found as f64 / total as f64;
    eprintln!("router vs unsharded: {same}/{total} same top-1 ({agreement:.3}); router recall@1 {recall:.3}");
    assert!(agreement >= 0.95, "only {same}/{total} top answers agree");
    assert!(recall >= 0.85, "router recall@1 {recall:.3}");

    // Bad input: the same JSON errors as `indexer serve`.
    let r = router.search(b"this is not an image");
    assert_eq!(r.status, 415, "{}", r.text());
    assert_eq!(r.json()["error"], "not_an_image");
    let r = request(
        router.port,
        "POST",
        "/v1/search?k=0",
        &[("Content-Type", "image/jpeg")],
        b"x",
    )
    .unwrap();
    assert_eq!(r.status, 400);
    // A malformed shard query is a 400 with a reason, not a 5xx.
    let shard0 = shards[0].as_ref().unwrap();
    let r = shard0.req("POST", "/v1/shard/search", &[("Content-Type", "application/json")], br#"{"k":5,"verify":true,"global":true,"features":{"keypoints":"AAAA","descriptors":"!!"}}"#);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("base64"), "{}", r.text());

    // One shard stops: answers keep coming within the deadline, with coverage 2/3.
    let probe = std::fs::read(&all[0]).unwrap();
    let stopped_port = shards[1].as_ref().unwrap().port;
    shards[1] = None;
    let t = Instant::now();
    let r = router.search(&probe);
    let ms = t.elapsed().as_millis();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (
            v["coverage"]["asked"].as_u64(),
            v["coverage"]["answered"].as_u64()
        ),
        (Some(3), Some(2)),
        "{v:#}"
    );
    assert!(
        v["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["code"] == "partial"),
        "{v:#}"
    );
    assert!(ms < 3_000, "answered in {ms} ms, past the 3 s deadline");
    assert!(wait_until(Duration::from_secs(10), || router.index()
        ["shards_up"]
        == 2));
    // It comes back on the same address: the router follows it.
    let serve_shard_1 = |log: &str| {
        Command::new(bin("indexer"))
            .args([
                "serve",
                shard_dirs[1].to_str().unwrap(),
                "--addr",
                &format!("127.0.0.1:{stopped_port}"),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(logs.join(log)).unwrap())
            .spawn()
            .unwrap()
    };
    let mut restarted = serve_shard_1("restarted.log");
    assert!(
        wait_until(Duration::from_secs(20), || router.index()["shards_up"] == 3),
        "the router did not see shard 1 back:\n{}",
        router.log_text()
    );
    let v = router.search(&probe).json();
    assert_eq!(v["coverage"]["answered"], 3, "{v:#}");
    let metrics = request(router.port, "GET", "/metrics", &[], b"")
        .unwrap()
        .text();
    assert!(
        metrics.contains("imageindex_router_shard_replies_total{outcome=\"failed\",shard=\"1\"}"),
        "{metrics}"
    );
    let _ = restarted.kill();
    let _ = restarted.wait();

    // A shard that comes up after the router's last poll (a query pod starting late) is
    // asked by the very next query, not one poll interval later: a router polling once a
    // minute, started while shard 1 is down, answers with 3/3 as soon as shard 1 serves.
    let slow = Router::start(&urls, &["--deadline", "3s", "--poll-interval", "60s"], logs);
    assert_eq!(slow.index()["shards_up"], 2, "{:#}", slow.index());
    let mut late = serve_shard_1("late.log");
    assert!(
        wait_until(Duration::from_secs(20), || request(
            stopped_port,
            "GET",
            "/readyz",
            &[],
            b""
        )
        .is_ok_and(|r| r.status == 200)),
        "shard 1 did not start again"
    );
    let v = slow.search(&probe).json();
    assert_eq!(v["coverage"]["answered"], 3, "{v:#}");
    assert_eq!(top_path(&v), top_path(&router.search(&probe).json()));
    // ...and its view catches up at once (woken by that answer), long before the next poll.
    assert!(
        wait_until(Duration::from_secs(5), || slow.index()["shards_up"] == 3),
        "{:#}",
        slow.index()
    );
    let _ = late.kill();
    let _ = late.wait();
}
