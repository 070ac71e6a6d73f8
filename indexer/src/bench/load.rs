//! `indexer bench load`: concurrent clients searching a running service for a while, then
//! the status counts, latency percentiles and the server's own peak memory (from its
//! `/metrics`). Traffic goes only to the address given (a service you run).

use super::stats::{mean, percentile};
use imageindex_crds::metrics as names;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Base URL of the service (`http://127.0.0.1:8080`) or `host:port`.
    pub addr: String,
    /// Concurrent clients.
    pub clients: usize,
    /// How long they search.
    pub duration: Duration,
    /// Query images, used round-robin.
    pub images: Vec<PathBuf>,
    /// Matches per query.
    pub k: usize,
    /// Bearer token.
    pub token: Option<String>,
}

/// What the run measured.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    /// Clients.
    pub clients: usize,
    /// Seconds of load.
    pub seconds: f64,
    /// Requests answered (any status).
    pub requests: u64,
    /// Requests per second.
    pub rps: f64,
    /// Answers by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Answers with a 5xx status.
    pub server_errors: u64,
    /// Requests that got no HTTP answer (connection refused, reset, timeout).
    pub transport_errors: u64,
    /// Latency percentiles of answered requests, milliseconds.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
    /// Server-reported stage times of 200 answers (queue, decode, extract, lookup, verify,
    /// total), milliseconds.
    pub stages_ms: BTreeMap<String, StageStats>,
    /// The server's peak RSS after the run (`imageindex_memory_peak_rss_bytes`).
    pub server_peak_rss: Option<u64>,
    /// The server's working set after the run.
    pub server_working_set: Option<u64>,
}

/// Percentiles of one stage, milliseconds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct StageStats {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// Mean.
    pub mean: f64,
}

/// Why the load could not run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No query images.
    #[error("no query images")]
    NoImages,
    /// An image could not be read.
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// The HTTP client or runtime could not start.
    #[error("client: {0}")]
    Client(String),
}

fn base_url(addr: &str) -> String {
    let a = addr.trim_end_matches('/');
    if a.starts_with("http://") || a.starts_with("https://") {
        a.to_string()
    } else {
        format!("http://{a}")
    }
}

fn content_type(path: &std::path::Path) -> &'static str {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        _ => "application/octet-stream",
    }
}

#[derive(Default)]
struct ClientResult {
    latencies: Vec<f64>,
    statuses: BTreeMap<u16, u64>,
    transport_errors: u64,
    stages: BTreeMap<String, Vec<f64>>,
}

/// Runs the load (blocking; starts its own runtime).
pub fn run(opts: &LoadOptions) -> Result<LoadReport, LoadError> {
    if opts.images.is_empty() {
        return Err(LoadError::NoImages);
    }
    let mut images = Vec::new();
    for p in &opts.images {
        let bytes = std::fs::read(p).map_err(|e| LoadError::Read(p.clone(), e))?;
        images.push((axum::body::Bytes::from(bytes), content_type(p)));
    }
    let images = Arc::new(images);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| LoadError::Client(e.to_string()))?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(opts.clients)
        .build()
        .map_err(|e| LoadError::Client(e.to_string()))?;
    let base = base_url(&opts.addr);
    let url = format!("{base}/v1/search?k={}", opts.k);
    let started = Instant::now();
    let deadline = started + opts.duration;
    let results: Vec<ClientResult> = runtime.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..opts.clients.max(1) {
            let (client, url, images, token) = (
                client.clone(),
                url.clone(),
                images.clone(),
                opts.token.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut r = ClientResult::default();
                let mut i = c;
                while Instant::now() < deadline {
                    let (bytes, ct) = &images[i % images.len()];
                    i += 1;
                    let mut req = client
                        .post(&url)
                        .header(reqwest::header::CONTENT_TYPE, *ct)
                        .body(bytes.clone());
                    if let Some(t) = &token {
                        req = req.bearer_auth(t);
                    }
                    let t = Instant::now();
                    match req.send().await {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            let body = resp.bytes().await;
                            r.latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                            *r.statuses.entry(status).or_default() += 1;
                            if status == 200 {
                                record_stages(&mut r, body.ok().as_deref());
                            }
                        }
                        Err(_) => {
                            r.transport_errors += 1;
                            // A refused or reset connection fails at once: do not spin.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                r
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            if let Ok(r) = t.await {
                out.push(r);
            }
        }
        out
    });
    let seconds = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    let mut transport_errors = 0;
    let mut stages: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in results {
        latencies.extend(r.latencies);
        for (s, n) in r.statuses {
            *statuses.entry(s).or_default() += n;
        }
        transport_errors += r.transport_errors;
        for (k, v) in r.stages {
            stages.entry(k).or_default().extend(v);
        }
    }
    let requests = latencies.len() as u64;
    let metrics = runtime.block_on(async {
        let text = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        Some(text)
    });
    let sample = |name: &str| {
        metrics.as_deref().and_then(|t| {
            t.lines()
                .find_map(|l| {
                    l.strip_prefix(name)?
                        .strip_prefix(' ')?
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .map(|v| v as u64)
        })
    };
    Ok(LoadReport {
        clients: opts.clients,
        seconds,
        requests,
        rps: requests as f64 / seconds.max(1e-9),
        server_errors: statuses
            .iter()
            .filter(|(s, _)| **s >= 500)
            .map(|(_, n)| n)
            .sum(),
        statuses,
        transport_errors,
        p50_ms: percentile(&latencies, 50.0),
        p95_ms: percentile(&latencies, 95.0),
        p99_ms: percentile(&latencies, 99.0),
        max_ms: percentile(&latencies, 100.0),
        stages_ms: stages
            .into_iter()
            .map(|(k, v)| {
                let s = StageStats {
                    p50: percentile(&v, 50.0),
                    p95: percentile(&v, 95.0),
                    mean: mean(&v),
                };
                (k, s)
            })
            .collect(),
        server_peak_rss: sample(names::MEMORY_PEAK_RSS_BYTES),
        server_working_set: sample(names::MEMORY_WORKING_SET_BYTES),
    })
}

fn record_stages(r: &mut ClientResult, body: Option<&[u8]>) {
    let Some(v) = body.and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok()) else {
        return;
    };
    for stage in [
        "queue_ms",
        "decode_ms",
        "extract_ms",
        "lookup_ms",
        "verify_ms",
        "total_ms",
    ] {
        if let Some(ms) = v["timings"][stage].as_f64() {
            r.stages
                .entry(stage.trim_end_matches("_ms").to_string())
                .or_default()
                .push(ms);
        }
    }
}

impl std::fmt::Display for LoadReport {
    /// A short table: requests and statuses, latency percentiles, server stages and memory.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let r = self;
        let statuses: Vec<String> = r
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect();
        writeln!(
            f,
            "{} clients, {:.1} s: {} requests ({:.1}/s); statuses {{{}}}; 5xx {}; transport errors {}",
            r.clients,
            r.seconds,
            r.requests,
            r.rps,
            statuses.join(", "),
            r.server_errors,
            r.transport_errors
        )?;
        writeln!(
            f,
            "latency ms: p50 {:.1}  p95 {:.1}  p99 {:.1}  max {:.1}",
            r.p50_ms, r.p95_ms, r.p99_ms, r.max_ms
        )?;
        writeln!(f, "server stages, ms:   p50     p95    mean")?;
        for (k, v) in &r.stages_ms {
            writeln!(f, "  {k:<12} {:>7.1} {:>7.1} {:>7.1}", v.p50, v.p95, v.mean)?;
        }
        let mib = |b: Option<u64>| {
            b.map_or("?".to_string(), |b| {
                format!("{:.1} MiB", b as f64 / 1048576.0)
            })
        };
        write!(
            f,
            "server memory: peak RSS {}, working set {}",
            mib(r.server_peak_rss),
            mib(r.server_working_set)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_types() {
        assert_eq!(base_url("127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(base_url("http://localhost:1/"), "http://localhost:1");
        assert_eq!(content_type(std::path::Path::new("a/b.JPG")), "image/jpeg");
        assert_eq!(
            content_type(std::path::Path::new("b.tif")),
            "application/octet-stream"
        );
    }
}
