//! The shard benchmark: the same catalogue unsharded and in N shards on one machine. Each
//! layout's shards build at once, each in its own memory cgroup; then one `indexer serve`
//! per shard and, when sharded, `indexer route` in front; the same queries go through HTTP to
//! the unsharded service (direct) and to each router. Prints build wall time, per-shard peak
//! memory, latency, recall@1, agreement of the top answer with the unsharded index, and the
//! router's overhead (its total time minus the slowest shard's round trip and the decode and
//! extraction any service does).

use super::attacks;
use super::child::{self, ChildBuild};
use super::images::query_files;
use super::stats::{mean, mib, percentile};
use crate::serve::api::SearchResponse;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Settings of the shard benchmark.
#[derive(Clone, Debug)]
pub struct ShardsBench {
    /// Catalogue directory.
    pub catalogue: PathBuf,
    /// Query directory (names `<catalogue stem>__<attack>.<ext>`; others are distractors).
    pub queries: PathBuf,
    /// Scratch directory.
    pub work: PathBuf,
    /// Shard counts to compare (1 = unsharded, served directly).
    pub shards: Vec<u32>,
    /// The preset every shard builds with.
    pub preset: String,
    /// Memory limit of each shard's build (a real cgroup limit).
    pub memory_limit: Option<u64>,
    /// Extraction threads per shard build (default: cores / shards, at least 1).
    pub threads: Option<usize>,
    /// First TCP port used for the services.
    pub base_port: u16,
}

/// One row: one layout.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ShardsRow {
    /// Shards.
    pub shards: u32,
    /// Wall time of the (parallel) builds, seconds.
    pub build_s: f64,
    /// Each shard's build peak working set (bytes).
    pub peak_working_set: Vec<u64>,
    /// Each shard's images.
    pub images: Vec<u64>,
    /// Queries with an expected answer.
    pub queries: usize,
    /// Recall@1.
    pub recall1: f64,
    /// Attack queries whose top answer equals the unsharded index's (same path, or both
    /// empty).
    pub same_top1: f64,
    /// Of those that differ, how many this layout answered right and the unsharded wrong.
    pub better: usize,
    /// … and how many the unsharded answered right and this layout wrong.
    pub worse: usize,
    /// Client latency p50 / p95 (ms).
    pub p50_ms: f64,
    /// Client latency p95 (ms).
    pub p95_ms: f64,
    /// Mean of the router's own time: its total minus the slowest shard's round trip and
    /// the queue, decode and extraction an unsharded service spends too (ms).
    pub router_overhead_ms: f64,
    /// Queries whose answer lacked a shard.
    pub partial: usize,
}

/// A query's top answer (its path), if any.
type Top = Option<String>;

/// A process killed when dropped.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[String], log: &Path) -> std::io::Result<Service> {
    let exe = std::env::current_exe()?;
    let log = std::fs::File::create(log)?;
    Command::new(exe)
        .args(args)
        .args(["--log-format", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map(Service)
}

fn wait_ready(client: &reqwest::blocking::Client, base: &str) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(120);
    while Instant::now() < until {
        if client
            .get(format!("{base}/readyz"))
            .send()
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    anyhow::bail!("{base} did not become ready within 120 s")
}

/// Builds the `count` shards of the catalogue at once; returns the builds and the wall time.
fn build_all(b: &ShardsBench, count: u32) -> anyhow::Result<(Vec<(PathBuf, ChildBuild)>, f64)> {
    let t = Instant::now();
    let results: Vec<anyhow::Result<(PathBuf, ChildBuild)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..count)
            .map(|i| {
                s.spawn(move || {
                    let out = b.work.join(format!("n{count}-shard{i}"));
                    let _ = std::fs::remove_dir_all(&out);
                    let mut args: Vec<String> = vec![
                        "build".into(),
                        b.catalogue.display().to_string(),
                        "--out".into(),
                        out.display().to_string(),
                        "--preset".into(),
                        b.preset.clone(),
                        "--threads".into(),
                        b.threads
                            .unwrap_or_else(|| {
                                let cores =
                                    std::thread::available_parallelism().map_or(1, |n| n.get());
                                cores / count as usize
                            })
                            .max(1)
                            .to_string(),
                    ];
                    if count > 1 {
                        args.extend(["--shard".into(), format!("{i}/{count}")]);
                    }
                    let built = child::run_build(&args, b.memory_limit, &out)?;
                    if built.exit_code != 0 {
                        anyhow::bail!(
                            "shard {i}/{count} exited with {} (OOM kills: {})",
                            built.exit_code,
                            built.oom_kills
                        );
                    }
                    Ok((out, built))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("build thread panicked")))
            })
            .collect()
    });
    let built = results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    Ok((built, t.elapsed().as_secs_f64()))
}

fn stem_of(path: &str) -> &str {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.rsplit_once('.').map_or(name, |(s, _)| s)
}

/// Runs every layout and returns one row each (the first layout is the reference for
/// `same_top1`; put 1 first).
pub fn run(b: &ShardsBench) -> anyhow::Result<Vec<ShardsRow>> {
    std::fs::create_dir_all(&b.work)?;
    let queries = query_files(&b.queries)?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let mut rows = Vec::new();
    let mut reference: Option<(Vec<Top>, Vec<Option<bool>>)> = None;
    let mut port = b.base_port;
    for &count in &b.shards {
        let (built, build_s) = build_all(b, count)?;
        let mut services = Vec::new();
        let mut shard_urls = Vec::new();
        for (i, (out, _)) in built.iter().enumerate() {
            let addr = format!("127.0.0.1:{port}");
            port += 1;
            services.push(spawn(
                &[
                    "serve".into(),
                    out.display().to_string(),
                    "--addr".into(),
                    addr.clone(),
                ],
                &b.work.join(format!("n{count}-serve{i}.log")),
            )?);
            shard_urls.push(format!("http://{addr}"));
        }
        for u in &shard_urls {
            wait_ready(&client, u)?;
        }
        let base = if count == 1 {
            shard_urls[0].clone()
        } else {
            let addr = format!("127.0.0.1:{port}");
            port += 1;
            let mut args = vec!["route".to_string(), "--addr".into(), addr.clone()];
            for u in &shard_urls {
                args.extend(["--shard".into(), u.clone()]);
            }
            services.push(spawn(&args, &b.work.join(format!("n{count}-route.log")))?);
            let base = format!("http://{addr}");
            wait_ready(&client, &base)?;
            // Every shard seen by the router's poll before the first query.
            std::thread::sleep(Duration::from_millis(1500));
            base
        };
        let mut row = ShardsRow {
            shards: count,
            build_s,
            peak_working_set: built.iter().map(|(_, c)| c.peak_working_set).collect(),
            images: built
                .iter()
                .map(|(_, c)| {
                    c.summary
                        .as_ref()
                        .and_then(|s| s["meta"]["imagesTotal"].as_u64())
                        .unwrap_or(0)
                })
                .collect(),
            ..Default::default()
        };
        let (mut lat, mut overhead, mut tops) = (Vec::new(), Vec::new(), Vec::new());
        let mut right = Vec::new();
        let (mut hits, mut n) = (0usize, 0usize);
        for q in &queries {
            let bytes = std::fs::read(q)?;
            let t = Instant::now();
            let resp = client
                .post(format!("{base}/v1/search"))
                .header("content-type", "application/octet-stream")
                .body(bytes)
                .send()?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if !resp.status().is_success() {
                tops.push(None);
                right.push(None);
                continue;
            }
            let r: SearchResponse = resp.json()?;
            lat.push(ms);
            if let Some(c) = &r.coverage {
                if c.answered < c.asked {
                    row.partial += 1;
                }
                let slowest = c.shards.iter().map(|s| s.ms).fold(0.0, f64::max);
                let t = &r.timings;
                overhead.push(t.total_ms - slowest - t.queue_ms - t.decode_ms - t.extract_ms);
            }
            let top = r.matches.first().map(|m| m.path.clone());
            match attacks::expected_stem(q) {
                Some(stem) => {
                    n += 1;
                    let hit = top.as_deref().is_some_and(|p| stem_of(p) == stem);
                    hits += usize::from(hit);
                    right.push(Some(hit));
                }
                None => right.push(None),
            }
            tops.push(top);
        }
        drop(services);
        row.queries = n;
        row.recall1 = hits as f64 / n.max(1) as f64;
        row.p50_ms = percentile(&lat, 50.0);
        row.p95_ms = percentile(&lat, 95.0);
        row.router_overhead_ms = mean(&overhead);
        if let Some((ref_tops, ref_right)) = &reference {
            let labelled: Vec<usize> = (0..tops.len()).filter(|&i| right[i].is_some()).collect();
            let same = labelled.iter().filter(|&&i| ref_tops[i] == tops[i]).count();
            row.same_top1 = same as f64 / labelled.len().max(1) as f64;
            for &i in &labelled {
                if ref_tops[i] != tops[i] {
                    match (ref_right[i], right[i]) {
                        (Some(false), Some(true)) => row.better += 1,
                        (Some(true), Some(false)) => row.worse += 1,
                        _ => {}
                    }
                }
            }
        } else {
            row.same_top1 = 1.0;
            reference = Some((tops, right));
        }
        rows.push(row);
    }
    Ok(rows)
}

/// The rows as a table.
pub struct ShardsTable<'a>(pub &'a [ShardsRow]);

impl std::fmt::Display for ShardsTable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        writeln!(
            f,
            "{:>6} {:>9} {:>22} {:>16} {:>8} {:>15} {:>8} {:>8} {:>10} {:>7}",
            "shards",
            "build s",
            "peak WS per shard MiB",
            "images per shard",
            "recall@1",
            "same top1 (+/-)",
            "p50 ms",
            "p95 ms",
            "router ms",
            "partial"
        )?;
        for r in self.0 {
            let peaks: Vec<String> = r.peak_working_set.iter().map(|p| mib(*p)).collect();
            let images: Vec<String> = r.images.iter().map(u64::to_string).collect();
            writeln!(
                f,
                "{:>6} {:>9.1} {:>22} {:>16} {:>8.3} {:>15} {:>8.1} {:>8.1} {:>10} {:>7}",
                r.shards,
                r.build_s,
                peaks.join("/"),
                images.join("/"),
                r.recall1,
                format!("{:.3} (+{}/-{})", r.same_top1, r.better, r.worse),
                r.p50_ms,
                r.p95_ms,
                if r.shards > 1 {
                    format!("{:.1}", r.router_overhead_ms)
                } else {
                    "direct".into()
                },
                r.partial
            )?;
        }
        Ok(())
    }
}
