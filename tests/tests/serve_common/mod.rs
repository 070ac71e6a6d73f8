//! Support for the `serve_*` end-to-end tests: a running `indexer serve` (stopped on drop), a
//! small blocking HTTP/1.1 client over loopback TCP, multipart bodies and test images.
#![allow(dead_code)]

use imageindex_e2e::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `indexer serve`, killed when dropped.
pub struct Server {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Child,
    /// Its log (stderr).
    pub log: PathBuf,
}

impl Server {
    /// Starts `indexer serve IDX --addr 127.0.0.1:PORT <extra>` and waits for /healthz.
    pub fn start(index: &Path, extra: &[&str], log_dir: &Path) -> Server {
        let port = free_port();
        let log = log_dir.join(format!("serve-{port}.log"));
        let addr = format!("127.0.0.1:{port}");
        let mut args = vec!["serve", index.to_str().unwrap(), "--addr", addr.as_str()];
        args.extend_from_slice(extra);
        let child = Command::new(bin("indexer"))
            .args(&args)
            .env("RUST_LOG", "info,arroy=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start indexer serve");
        let mut s = Server { port, child, log };
        // With a published generation the service must also have loaded it before the
        // tests start asking; without one, being up is all there is to wait for.
        let probe = if index.join("current").exists() {
            "/readyz"
        } else {
            "/healthz"
        };
        let t = Instant::now();
        loop {
            if let Ok(r) = request(port, "GET", probe, &[], b"") {
                if r.status == 200 {
                    break;
                }
            }
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("indexer serve exited with {status}:\n{}", s.log_text());
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "serve did not start:\n{}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A request to it.
    pub fn req(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        request(self.port, method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log_text()))
    }

    /// GET.
    pub fn get(&self, path: &str) -> Resp {
        self.req("GET", path, &[], b"")
    }

    /// POST a raw image to /v1/search with a query string.
    pub fn search_raw(&self, query: &str, bytes: &[u8], content_type: &str) -> Resp {
        self.req(
            "POST",
            &format!("/v1/search{query}"),
            &[("Content-Type", content_type)],
            bytes,
        )
    }

    /// POST an image as the multipart field `image`.
    pub fn search_multipart(&self, query: &str, bytes: &[u8]) -> Resp {
        let (ct, body) = multipart("image", "query.jpg", bytes);
        self.req(
            "POST",
            &format!("/v1/search{query}"),
            &[("Content-Type", ct.as_str())],
            &body,
        )
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Headers (names lowercased).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl Resp {
    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on a fresh loopback connection (`Connection: close`).
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    let has_length = headers.iter().any(|(k, _)| {
        k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding")
    });
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_length {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    // The server may answer (and stop reading) before the whole body is sent.
    let _ = s.write_all(body);
    read_response(&mut s)
}

/// Reads one HTTP/1.1 response: up to its `Content-Length` (or last chunk), else to the end
/// of the connection. (A server that answered early may keep reading the refused body.)
pub fn read_response(s: &mut TcpStream) -> std::io::Result<Resp> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
            let body = raw.len() - split - 4;
            if head.starts_with("http/1.1 100") {
                // interim answer: the final one follows
            } else if let Some(n) = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
            {
                if body >= n {
                    break;
                }
            } else if head.contains("transfer-encoding: chunked") && raw.ends_with(b"0\r\n\r\n") {
                break;
            }
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> std::io::Result<Resp> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("no status line"))?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(status_line))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let eol = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("chunk size"))?;
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&rest[..eol])
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim(),
                16,
            )
            .map_err(|_| bad("chunk size"))?;
            rest = &rest[eol + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[..size.min(rest.len())]);
            rest = &rest[(size + 2).min(rest.len())..];
        }
        body = out;
    }
    // A 100 Continue may precede the final answer.
    if status == 100 {
        return parse_response(&raw[split + 4..]);
    }
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// A multipart/form-data body with one file field; returns (content type, body).
pub fn multipart(field: &str, filename: &str, bytes: &[u8]) -> (String, Vec<u8>) {
    let boundary = "imageindex-test-boundary-7d1f";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Builds an index of `dataset` into `out` with a preset; panics with stderr on failure.
pub fn build_index(dataset: &Path, out: &Path, preset: &str) -> serde_json::Value {
    let o = run(
        "indexer",
        &[
            "build",
            dataset.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--preset",
            preset,
            "--json",
        ],
    );
    assert!(
        o.status.success(),
        "build failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    json_of(&o)
}

/// A white PNG: no texture, so no ORB features at all.
pub fn blank_png(w: i32, h: i32) -> Vec<u8> {
    use opencv::core::{Mat, Scalar, Vector, CV_8UC1};
    use opencv::prelude::*;
    let m = Mat::new_rows_cols_with_default(h, w, CV_8UC1, Scalar::all(255.0)).unwrap();
    let mut buf = Vector::<u8>::new();
    opencv::imgcodecs::imencode(".png", &m, &mut buf, &Vector::new()).unwrap();
    buf.to_vec()
}

/// A PNG whose header claims 50,000 × 50,000 pixels (a decompression bomb).
pub fn bomb_png() -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    png.extend_from_slice(&50_000u32.to_be_bytes());
    png.extend_from_slice(&50_000u32.to_be_bytes());
    png.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
    png.extend_from_slice(b"\0\0\0\0IEND\xaeB`\x82");
    png
}

/// Polls until `f` is true or `timeout` passes; returns whether it became true.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}
