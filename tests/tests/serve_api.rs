//! `indexer serve` end to end: HTTP answers equal `indexer search`, every bad input gets its
//! status and a JSON error (and the process stays healthy), the auth matrix, and a service
//! that starts without an index becomes ready when a build publishes one (`--watch`).

mod serve_common;

use imageindex_e2e::*;
use serde_json::Value;
use serve_common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The sample catalogue indexed with the `full` preset, plus attacked copies of a few images.
fn sample_index(tmp: &Path) -> (PathBuf, Vec<PathBuf>) {
    let idx = tmp.join("idx");
    build_index(&sample_catalogue(), &idx, "full");
    let mut queries = Vec::new();
    for name in [
        "astronaut_eileen_collins.jpg",
        "brick_wall_texture.jpg",
        "cameraman_foggy_low_contrast.jpg",
        "coffee_cup_product_on_white.jpg",
        "greek_coins.jpg",
        "rocket_launch_pad.jpg",
    ] {
        queries.extend(attacked_copies(
            &sample_catalogue().join(name),
            &tmp.join("queries"),
        ));
    }
    (idx, queries)
}

/// (id, path, score, inliers, verified) of one match.
type Essential = (u64, String, u64, Option<u64>, Option<bool>);

fn essentials(matches: &Value) -> Vec<Essential> {
    matches
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().unwrap(),
                m["path"].as_str().unwrap().to_string(),
                m["score"].as_u64().unwrap(),
                m["inliers"].as_u64(),
                m["verified"].as_bool(),
            )
        })
        .collect()
}

#[test]
fn http_answers_equal_indexer_search() {
    let tmp = tempfile::tempdir().unwrap();
    let (idx, queries) = sample_index(tmp.path());
    let server = Server::start(&idx, &[], tmp.path());
    let (mut correct, mut mirrored) = (0, 0);
    for (verify, flag) in [(true, None), (false, Some("--no-verify"))] {
        let mut args = vec!["search", idx.to_str().unwrap(), "--json", "-k", "5"];
        args.extend(flag);
        let paths: Vec<&str> = queries.iter().map(|q| q.to_str().unwrap()).collect();
        args.extend(&paths);
        let cli = json_of(&run("indexer", &args));
        for (i, (q, expected)) in queries.iter().zip(cli.as_array().unwrap()).enumerate() {
            let bytes = std::fs::read(q).unwrap();
            // Alternate the two upload forms.
            let r = if i % 2 == 0 {
                server.search_raw(&format!("?k=5&verify={verify}"), &bytes, "image/jpeg")
            } else {
                server.search_multipart(&format!("?k=5&verify={verify}"), &bytes)
            };
            assert_eq!(r.status, 200, "{}: {}", q.display(), r.text());
            let got = r.json();
            assert_eq!(got["generation"], expected["generation"]);
            assert_eq!(got["features"], expected["features"], "{}", q.display());
            assert_eq!(got["mirrored"], expected["mirrored"], "{}", q.display());
            if got["mirrored"] == true {
                mirrored += 1;
            }
            let mut want = essentials(&expected["matches"]);
            if !verify {
                for m in &mut want {
                    m.4 = None; // the API leaves `verified` out of unverified answers
                }
            }
            assert_eq!(essentials(&got["matches"]), want, "{}", q.display());
            for t in [
                "decode_ms",
                "extract_ms",
                "lookup_ms",
                "verify_ms",
                "queue_ms",
                "total_ms",
            ] {
                assert!(got["timings"][t].as_f64().is_some(), "timings.{t}");
            }
            if verify {
                let stem = q
                    .file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .split("__")
                    .next()
                    .unwrap()
                    .to_string();
                if got["matches"][0]["path"]
                    .as_str()
                    .unwrap()
                    .starts_with(&stem)
                {
                    correct += 1;
                }
            }
        }
    }
    let recall = correct as f64 / queries.len() as f64;
    eprintln!(
        "recall@1 over HTTP on {} attacked queries: {recall:.3}",
        queries.len()
    );
    assert!(recall >= 0.98, "recall@1 {recall}");
    // Mirrored copies are found through the mirrored search (only ever tried with verify).
    let mirror_queries = queries
        .iter()
        .filter(|q| q.to_string_lossy().contains("__mirror"))
        .count();
    assert!(
        mirrored >= mirror_queries / 2 && mirrored <= mirror_queries,
        "{mirrored} mirrored answers for {mirror_queries} mirrored queries"
    );
}

#[test]
fn bad_input_gets_a_json_error_and_the_service_stays_healthy() {
    let tmp = tempfile::tempdir().unwrap();
    let (idx, _) = sample_index(tmp.path());
    let server = Server::start(&idx, &["--max-body", "2MB"], tmp.path());
    let good = std::fs::read(sample_catalogue().join("greek_coins.jpg")).unwrap();
    let png = std::fs::read(sample_catalogue().join("checkerboard_pattern.png")).unwrap();
    // Corrupt Huffman tables: the header reads, the decoder gives up.
    let mut corrupt = good.clone();
    let dht = corrupt.windows(2).position(|w| w == [0xFF, 0xC4]).unwrap();
    for b in corrupt.iter_mut().skip(dht + 5).take(150) {
        *b ^= 0x5A;
    }
    let (other_ct, other_body) = multipart("photo", "a.jpg", &good);
    let cases: Vec<(&str, Resp, u16, &str)> = vec![
        (
            "text named jpeg",
            server.search_raw("", b"hello, I am not a photo", "image/jpeg"),
            415,
            "not_an_image",
        ),
        (
            "a JSON body",
            server.search_raw("", b"{\"image\": \"x.jpg\"}", "application/json"),
            415,
            "not_an_image",
        ),
        (
            "empty body",
            server.search_raw("", b"", "image/jpeg"),
            400,
            "empty_image",
        ),
        (
            "corrupt jpeg",
            server.search_raw("", &corrupt, "image/jpeg"),
            422,
            "corrupt_image",
        ),
        (
            "truncated png",
            server.search_raw("", &png[..png.len() / 2], "image/png"),
            422,
            "truncated_image",
        ),
        (
            "50,000 x 50,000 header",
            server.search_raw("", &bomb_png(), "image/png"),
            422,
            "image_too_large",
        ),
        (
            "missing multipart field",
            server.req(
                "POST",
                "/v1/search",
                &[("Content-Type", other_ct.as_str())],
                &other_body,
            ),
            400,
            "missing_field",
        ),
        (
            "k=0",
            server.search_raw("?k=0", &good, "image/jpeg"),
            400,
            "bad_parameter",
        ),
        (
            "k=abc",
            server.search_raw("?k=abc", &good, "image/jpeg"),
            400,
            "bad_parameter",
        ),
        (
            "k=101",
            server.search_raw("?k=101", &good, "image/jpeg"),
            400,
            "bad_parameter",
        ),
        (
            "verify=maybe",
            server.search_raw("?verify=maybe", &good, "image/jpeg"),
            400,
            "bad_parameter",
        ),
        (
            "unknown parameter",
            server.search_raw("?top=3", &good, "image/jpeg"),
            400,
            "bad_parameter",
        ),
        (
            "body over --max-body",
            server.search_raw("", &vec![0xFFu8; 3_000_000], "image/jpeg"),
            413,
            "body_too_large",
        ),
        (
            "image id not a number",
            server.get("/v1/images/abc"),
            400,
            "bad_parameter",
        ),
        (
            "no such image",
            server.get("/v1/images/99999"),
            404,
            "not_found",
        ),
        ("no such route", server.get("/v2/search"), 404, "not_found"),
        (
            "wrong method",
            server.get("/v1/search"),
            405,
            "method_not_allowed",
        ),
        (
            "rebuild without --dataset",
            server.req("POST", "/v1/index/rebuild", &[], b""),
            409,
            "no_dataset",
        ),
    ];
    for (what, r, status, code) in &cases {
        assert_eq!(r.status, *status, "{what}: {}", r.text());
        let j = r.json();
        assert_eq!(j["error"], *code, "{what}: {j}");
        assert_eq!(j["status"], *status, "{what}");
        assert!(!j["message"].as_str().unwrap().is_empty(), "{what}");
    }

    // 413 is answered from the declared length before the body is sent at all.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000000\r\n\r\n").unwrap();
        let r = read_response(&mut s).expect("an answer without sending the body");
        assert_eq!(r.status, 413);
        assert_eq!(r.json()["error"], "body_too_large");
    }
    // A streamed (chunked) body is cut off at the limit.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").unwrap();
        let chunk = vec![0xFFu8; 256 * 1024];
        for _ in 0..12 {
            if write!(s, "{:x}\r\n", chunk.len()).is_err()
                || s.write_all(&chunk).is_err()
                || s.write_all(b"\r\n").is_err()
            {
                break;
            }
        }
        let _ = s.write_all(b"0\r\n\r\n");
        let r = read_response(&mut s).unwrap();
        assert_eq!(r.status, 413, "{}", r.text());
    }

    // Truncated JPEG: what decodes is searched, and the answer says so.
    let r = server.search_raw("", &good[..good.len() * 2 / 3], "image/jpeg");
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert!(
        j["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["code"] == "truncated"),
        "{j}"
    );
    // No features: 200, no matches, a reason.
    let r = server.search_raw("", &blank_png(640, 480), "image/png");
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["features"], 0);
    assert!(j["matches"].as_array().unwrap().is_empty());
    assert!(
        j["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["code"] == "no_features"),
        "{j}"
    );

    // Still healthy, still answering, and nothing was a 5xx.
    assert_eq!(server.get("/healthz").status, 200);
    let r = server.search_raw("?k=1", &good, "image/jpeg");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["matches"][0]["path"], "greek_coins.jpg");
    let metrics = server.get("/metrics").text();
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("imageindex_http_requests_total") && l.contains("status=\"5")),
        "{metrics}"
    );
    assert!(server.log_text().lines().all(|l| !l.contains("panicked")));
}

#[test]
fn auth_tokens_and_roles() {
    let tmp = tempfile::tempdir().unwrap();
    let (idx, _) = sample_index(tmp.path());
    let auth = tmp.path().join("tokens");
    std::fs::write(
        &auth,
        "# test tokens\nreader-0123456789 read\nadmin-0123456789 admin\n",
    )
    .unwrap();
    // A small dataset so that the admin's rebuild is quick.
    let ds = tmp.path().join("ds");
    sample_subset(&ds, 4);
    let server = Server::start(
        &idx,
        &[
            "--auth-file",
            auth.to_str().unwrap(),
            "--dataset",
            ds.to_str().unwrap(),
        ],
        tmp.path(),
    );
    let image = std::fs::read(sample_catalogue().join("grass_texture.jpg")).unwrap();
    let bearer = |t: &str| format!("Bearer {t}");
    let (read, admin, unknown) = (
        bearer("reader-0123456789"),
        bearer("admin-0123456789"),
        bearer("nobody-0123456789"),
    );
    let search = |token: Option<&str>| {
        let mut h = vec![("Content-Type", "image/jpeg")];
        if let Some(t) = token {
            h.push(("Authorization", t));
        }
        server.req("POST", "/v1/search?k=1", &h, &image)
    };
    let get = |path: &str, token: Option<&str>| {
        let h: Vec<(&str, &str)> = token.map(|t| ("Authorization", t)).into_iter().collect();
        server.req("GET", path, &h, b"")
    };
    // search and catalogue: read or admin
    assert_eq!(search(None).status, 401);
    assert_eq!(
        search(None).header("www-authenticate"),
        Some("Bearer realm=\"imageindex\"")
    );
    assert_eq!(search(Some(&unknown)).status, 401);
    assert_eq!(search(Some("Basic cmVhZGVyOng=")).status, 401);
    assert_eq!(search(Some(&read)).status, 200);
    assert_eq!(search(Some(&admin)).status, 200);
    for path in ["/v1/index", "/v1/images/0"] {
        assert_eq!(get(path, None).status, 401, "{path}");
        assert_eq!(get(path, Some(&unknown)).status, 401, "{path}");
        assert_eq!(get(path, Some(&read)).status, 200, "{path}");
        assert_eq!(get(path, Some(&admin)).status, 200, "{path}");
    }
    // rebuild: admin only
    let rebuild = |token: Option<&str>| {
        let h: Vec<(&str, &str)> = token.map(|t| ("Authorization", t)).into_iter().collect();
        server.req("POST", "/v1/index/rebuild", &h, b"")
    };
    assert_eq!(rebuild(None).status, 401);
    assert_eq!(rebuild(Some(&unknown)).status, 401);
    let r = rebuild(Some(&read));
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "forbidden");
    let r = rebuild(Some(&admin));
    assert_eq!(r.status, 202, "{}", r.text());
    let location = r.header("location").unwrap().to_string();
    assert!(wait_until(Duration::from_secs(60), || {
        get(&location, Some(&read)).json()["state"] != "running"
    }));
    assert_eq!(get(&location, Some(&read)).json()["state"], "succeeded");
    // health, readiness, metrics and the docs stay open
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs/"] {
        assert_eq!(get(path, None).status, 200, "{path}");
    }
}

#[test]
fn starts_without_an_index_and_serves_what_a_build_publishes() {
    let tmp = tempfile::tempdir().unwrap();
    let idx = tmp.path().join("idx");
    let server = Server::start(&idx, &["--watch", "--watch-interval", "200ms"], tmp.path());
    let image = std::fs::read(sample_catalogue().join("rocket_launch_pad.jpg")).unwrap();
    let r = server.get("/readyz");
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["ready"], false);
    assert!(r.header("retry-after").is_some());
    let r = server.search_raw("", &image, "image/jpeg");
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"], "no_index");
    assert!(r.header("retry-after").is_some());
    assert_eq!(server.get("/v1/index").status, 503);
    assert_eq!(server.get("/healthz").status, 200);

    // A build (as a build pod would) publishes generation 1 into the directory.
    let ds = tmp.path().join("ds");
    sample_subset(&ds, 25);
    build_index(&ds, &idx, "small");
    assert!(
        wait_until(Duration::from_secs(10), || server.get("/readyz").status
            == 200),
        "{}",
        server.log_text()
    );
    let r = server.search_raw("?k=1", &image, "image/jpeg");
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["generation"], 1);
    assert_eq!(j["matches"][0]["path"], "rocket_launch_pad.jpg");
    assert_eq!(server.get("/v1/index").json()["preset"]["name"], "small");

    // The next generation is picked up too.
    build_index(&ds, &idx, "full");
    assert!(wait_until(Duration::from_secs(10), || server
        .get("/readyz")
        .json()["generation"]
        == 2));
    let j = server.search_raw("?k=1", &image, "image/jpeg").json();
    assert_eq!(j["generation"], 2);
    assert_eq!(j["matches"][0]["path"], "rocket_launch_pad.jpg");
    assert_eq!(server.get("/v1/index").json()["preset"]["name"], "full");
    let metrics = server.get("/metrics").text();
    assert_eq!(metric(&metrics, "imageindex_index_generation"), Some(2.0));
}
