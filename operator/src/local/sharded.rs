//! `operator local` for a sharded ImageIndex (`spec.shards` > 1): one child run per shard —
//! `operator local --shard I/N` on a manifest of its own, in its own state directory, so each
//! shard scans, builds (in its own cgroup under `spec.memoryLimit`), walks its own attempt
//! ladder and serves exactly as an unsharded run does — at most `spec.maxParallelBuilds`
//! building at once; then `indexer route` in front of the shards' query services. The
//! parent's status is the shards' statuses composed ([`compose`]): `status.shards[]`, their
//! whole, and conditions that name the shards they come from.

use super::*;
use imageindex_crds::aggregate;
use imageindex_crds::conditions::{self, DEGRADED, MEMORY_PRESSURE, PRESET_FITS, PROGRESSING};
use imageindex_crds::shards;
use imageindex_crds::types::{ShardStatus, UnitStatus};
use process::BuildProcess;
use std::ffi::OsString;

/// One shard's child run.
struct ShardRun {
    shard: u32,
    dir: PathBuf,
    manifest: PathBuf,
    status: PathBuf,
    port: Option<u16>,
    process: Option<BuildProcess>,
    exit: Option<i32>,
    restarts: u32,
}

impl ShardRun {
    fn read_status(&self) -> Option<ImageIndexStatus> {
        serde_json::from_slice(&std::fs::read(&self.status).ok()?).ok()
    }

    fn url(&self) -> Option<String> {
        self.port.map(|p| format!("http://127.0.0.1:{p}"))
    }
}

fn phase_of(s: &Option<ImageIndexStatus>) -> Option<IndexPhase> {
    s.as_ref().and_then(|s| s.unit.phase)
}

/// The parent's status from its shards' (`children[i]`: shard i's status, if it wrote one
/// yet), over `previous` (so that conditions keep their transition times): `status.shards`,
/// their [`aggregate::whole`], the scans summed, `shardsReady`, and each condition from the
/// shards' (Ready when all are; Progressing, MemoryPressure, Degraded when any is, PresetFits
/// unless one does not fit), its message naming the shards. Pure.
pub fn compose(
    previous: &ImageIndexStatus,
    children: &[Option<ImageIndexStatus>],
    generation: Option<i64>,
    now: &Time,
) -> ImageIndexStatus {
    let n = children.len();
    let mut status = previous.clone();
    status.shards = children
        .iter()
        .enumerate()
        .map(|(i, c)| ShardStatus {
            shard: i as u32,
            unit: c.as_ref().map(|c| c.unit.clone()).unwrap_or(UnitStatus {
                phase: Some(IndexPhase::Pending),
                ..UnitStatus::default()
            }),
        })
        .collect();
    let units: Vec<UnitStatus> = status.shards.iter().map(|s| s.unit.clone()).collect();
    status.unit = aggregate::whole(&units);
    let ready = children
        .iter()
        .filter(|c| phase_of(c) == Some(IndexPhase::Ready))
        .count();
    status.shards_ready = Some(format!("{ready}/{n}"));
    let scans: Vec<&ScanSummary> = children
        .iter()
        .filter_map(|c| c.as_ref()?.scan.as_ref())
        .collect();
    status.scan = (scans.len() == n).then(|| {
        scans
            .iter()
            .fold(ScanSummary::default(), |a, s| ScanSummary {
                images: a.images + s.images,
                bytes: a.bytes + s.bytes,
                skipped: a.skipped + s.skipped,
                max_width: a.max_width.max(s.max_width),
                max_height: a.max_height.max(s.max_height),
                max_is_jpeg: a.max_is_jpeg || s.max_is_jpeg,
                largest: imageindex_crds::scan::keep_largest(
                    a.largest.iter().chain(&s.largest).cloned().collect(),
                ),
                ..(*s).clone()
            })
    });
    let of = |type_: &str| -> Vec<(usize, Option<&Condition>)> {
        children
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (
                    i,
                    c.as_ref()
                        .and_then(|c| conditions::get(&c.conditions, type_)),
                )
            })
            .collect()
    };
    let listed = |items: &[(usize, Option<&Condition>)]| {
        items
            .iter()
            .filter_map(|(i, c)| c.map(|c| format!("shard {i}: {}", c.message)))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let is_true = |c: &Option<&Condition>| c.is_some_and(|c| c.status == "True");
    let set =
        |status: &mut ImageIndexStatus, type_: &str, on: bool, reason: &str, message: &str| {
            conditions::set(
                &mut status.conditions,
                type_,
                on,
                reason,
                message,
                generation,
                now,
            );
        };
    // Ready: every shard.
    let readies = of(READY);
    if readies.iter().all(|(_, c)| is_true(c)) {
        set(
            &mut status,
            READY,
            true,
            "AllShardsReady",
            &format!("all {n} shards are ready"),
        );
    } else {
        let not: Vec<_> = readies
            .iter()
            .filter(|(_, c)| !is_true(c))
            .cloned()
            .collect();
        let message = format!("{ready} of {n} shards ready; {}", listed(&not));
        set(
            &mut status,
            READY,
            false,
            "ShardsNotReady",
            message.trim_end_matches("; "),
        );
    }
    // Any shard: Progressing, MemoryPressure, Degraded.
    for (type_, on_reason, off_reason, off_message) in [
        (
            PROGRESSING,
            "ShardsBuilding",
            "NoShardBuilding",
            "no shard is building",
        ),
        (
            MEMORY_PRESSURE,
            "ShardUnderPressure",
            "NoPressure",
            "no shard is under memory pressure",
        ),
        (
            DEGRADED,
            "ShardDegraded",
            "AllShardsHealthy",
            "no shard is degraded",
        ),
    ] {
        let on: Vec<_> = of(type_).into_iter().filter(|(_, c)| is_true(c)).collect();
        if on.is_empty() {
            set(&mut status, type_, false, off_reason, off_message);
        } else {
            let reason = on[0].1.map_or(on_reason, |c| c.reason.as_str()).to_string();
            set(&mut status, type_, true, &reason, &listed(&on));
        }
    }
    let fits = of(PRESET_FITS);
    let misfits: Vec<_> = fits
        .iter()
        .filter(|(_, c)| c.is_some_and(|c| c.status == "False"))
        .cloned()
        .collect();
    if !misfits.is_empty() {
        let reason = misfits[0]
            .1
            .map_or("ShardMisfit", |c| c.reason.as_str())
            .to_string();
        set(&mut status, PRESET_FITS, false, &reason, &listed(&misfits));
    } else if fits.iter().all(|(_, c)| c.is_some()) {
        set(&mut status, PRESET_FITS, true, "Fits", &listed(&fits));
    }
    status.observed_generation = generation;
    status
}

/// The manifest of shard `i`: the parent's resource named `<name>-s<i>`, unsharded, over the
/// resolved dataset directory (the child scans and builds its shard of it with `--shard`).
fn child_manifest(manifest: &Manifest, i: u32) -> ImageIndex {
    let mut index = manifest.index.clone();
    index.metadata.name = Some(format!("{}-s{i}", manifest.name));
    index.spec.shards = None;
    index.spec.max_parallel_builds = None;
    index.spec.dataset.path = manifest.dataset.display().to_string();
    index.status = None;
    index
}

/// Runs a sharded ImageIndex to its end: see the module.
pub(super) async fn run(runner: &mut Runner, count: u32) -> Result<Ending, LocalError> {
    let parallel = shards::parallel_builds(runner.manifest.index.spec.max_parallel_builds, count);
    let exe = std::env::current_exe().map_err(|source| ProcessError::Spawn {
        program: "operator (its own path)".into(),
        source,
    })?;
    let mut runs = Vec::new();
    for i in 0..count {
        let dir = runner.state.root().join(format!("shard-{i}"));
        std::fs::create_dir_all(&dir).map_err(|source| ProcessError::File {
            path: dir.clone(),
            source,
        })?;
        let manifest = dir.join("manifest.yaml");
        let yaml = serde_yaml::to_string(&child_manifest(&runner.manifest, i)).map_err(|e| {
            ProcessError::File {
                path: manifest.clone(),
                source: std::io::Error::other(e),
            }
        })?;
        state::write_atomically(&manifest, yaml.as_bytes()).map_err(|source| {
            ProcessError::File {
                path: manifest.clone(),
                source,
            }
        })?;
        runs.push(ShardRun {
            shard: i,
            status: dir.join("status.json"),
            dir,
            manifest,
            port: None,
            process: None,
            exit: None,
            restarts: 0,
        });
    }
    info!(shards = count, parallel, "sharded: one child run per shard");
    let mut router: Option<BuildProcess> = None;
    let mut stops = runner.stops.clone();
    loop {
        // Start shards while fewer than `parallel` are still building.
        let statuses: Vec<Option<ImageIndexStatus>> =
            runs.iter().map(ShardRun::read_status).collect();
        let building = runs
            .iter()
            .zip(&statuses)
            .filter(|(r, s)| {
                r.process.is_some()
                    && r.exit.is_none()
                    && !matches!(
                        phase_of(s),
                        Some(IndexPhase::Ready) | Some(IndexPhase::Failed)
                    )
            })
            .count();
        let mut room = (parallel as usize).saturating_sub(building);
        for r in runs
            .iter_mut()
            .filter(|r| r.process.is_none() && r.exit.is_none())
        {
            if room == 0 || runner.stopping() {
                break;
            }
            start_shard(runner, &exe, r, count)?;
            room -= 1;
        }
        // Ended children: a Failed shard fails the whole; a serving shard that stopped is
        // started again (its run finds the index built and serves it).
        for r in runs.iter_mut() {
            if let Some(p) = r.process.as_mut() {
                if let Some(exit) = p.try_wait() {
                    let code = exit.exit_code();
                    r.process = None;
                    let serving = runner.opts.serve.is_some() && router.is_some();
                    if serving && !runner.stopping() && code != Some(1) {
                        warn!(
                            shard = r.shard,
                            ?code,
                            "a shard's run stopped while serving: starting it again"
                        );
                        r.restarts += 1;
                        start_shard(runner, &exe, r, count)?;
                    } else {
                        r.exit = Some(code.unwrap_or(-1));
                    }
                }
            }
        }
        let statuses: Vec<Option<ImageIndexStatus>> =
            runs.iter().map(ShardRun::read_status).collect();
        runner.tick();
        let mut status = compose(
            &runner.draft.status,
            &statuses,
            runner.draft.generation,
            &runner.draft.now,
        );
        // The serving shards: a shard whose query service is down degrades the whole.
        if router.is_some() {
            let down: Vec<String> = runs
                .iter()
                .filter(|r| r.process.is_none())
                .map(|r| format!("shard {}", r.shard))
                .collect();
            if !down.is_empty() {
                conditions::set(
                    &mut status.conditions,
                    DEGRADED,
                    true,
                    "ShardUnavailable",
                    &format!(
                        "{} not serving: answers have partial coverage",
                        down.join(", ")
                    ),
                    runner.draft.generation,
                    &runner.draft.now,
                );
            }
        }
        runner.draft.status = status;
        runner.save()?;
        let phases: Vec<Option<IndexPhase>> = statuses.iter().map(phase_of).collect();
        if runs.iter().any(|r| r.exit == Some(1)) || phases.contains(&Some(IndexPhase::Failed)) {
            stop_all(runner, &mut runs, &mut router).await;
            return Ok(Ending::Failed);
        }
        if runner.stopping() {
            let served = router.is_some();
            stop_all(runner, &mut runs, &mut router).await;
            if served {
                // Built and served until stopped: Ready, as an unsharded run ends.
                runner.tick();
                runner.draft.status.endpoint = None;
                runner.save()?;
                return Ok(Ending::Ready);
            }
            return runner.interrupted("while shards were running");
        }
        let all_ready = phases.iter().all(|p| *p == Some(IndexPhase::Ready));
        match runner.opts.serve {
            None if runs.iter().all(|r| r.exit == Some(0)) && all_ready => {
                runner.console.finish();
                runner.console.println(&format!(
                    "{} is Ready: {count} shards built in {:.1}s (each shard's index is under {}/shard-<i>/index)",
                    runner.manifest.name,
                    runner.started.elapsed().as_secs_f64(),
                    runner.state.root().display()
                ));
                return Ok(Ending::Ready);
            }
            Some(addr)
                if router.is_none() && all_ready && runs.iter().all(|r| r.process.is_some()) =>
            {
                let urls: Vec<String> = runs.iter().filter_map(ShardRun::url).collect();
                let mut args: Vec<OsString> = ["--log-format", "json", "route", "--addr"]
                    .iter()
                    .map(OsString::from)
                    .collect();
                args.push(addr.to_string().into());
                for u in &urls {
                    args.push("--shard".into());
                    args.push(u.into());
                }
                let log = runner.state.root().join("route.log");
                router = Some(process::spawn_logged(&runner.indexer, &args, &log)?);
                let url = base_url(addr);
                wait_router(runner, &url).await?;
                runner.tick();
                runner.draft.status.endpoint = Some(url.clone());
                runner.draft.note(
                    false,
                    "Ready",
                    "Serve",
                    format!("{count} shards served behind the router at {url}"),
                );
                runner.save()?;
                runner.console.finish();
                runner.console.println(&format!(
                    "{} is Ready after {:.1}s: {count} shards behind the router at {url}  (API docs: {url}/docs)",
                    runner.manifest.name,
                    runner.started.elapsed().as_secs_f64()
                ));
                runner.console.println("Serving until Ctrl-C.");
            }
            _ => {}
        }
        if let Some(r) = router.as_mut() {
            if let Some(exit) = r.try_wait() {
                stop_all(runner, &mut runs, &mut None).await;
                return Err(LocalError::Serve(format!(
                    "indexer route stopped on its own ({:?}); its log: {}",
                    exit.exit_code(),
                    runner.state.root().join("route.log").display()
                )));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stops.changed() => {}
        }
    }
}

/// Starts shard `r`'s child run (serving on a free loopback port when the parent serves).
fn start_shard(
    runner: &Runner,
    exe: &Path,
    r: &mut ShardRun,
    count: u32,
) -> Result<(), LocalError> {
    let o = &runner.opts;
    let mut args: Vec<OsString> = vec!["local".into(), "-f".into(), r.manifest.clone().into()];
    for (flag, value) in [
        ("--state-dir", r.dir.display().to_string()),
        ("--status-out", r.status.display().to_string()),
        ("--indexer-bin", runner.indexer.display().to_string()),
        ("--shard", format!("{}/{count}", r.shard)),
        ("--log-format", "json".into()),
        (
            "--scrape-interval",
            format!("{}ms", o.scrape_interval.as_millis()),
        ),
        ("--stop-grace", format!("{}ms", o.stop_grace.as_millis())),
        ("--cgroup-root", o.cgroup_root.display().to_string()),
    ] {
        args.push(flag.into());
        args.push(value.into());
    }
    if o.serve.is_some() {
        let port = match r.port {
            Some(p) => p,
            None => attempt::free_port()?,
        };
        r.port = Some(port);
        args.push("--serve".into());
        args.push(format!("127.0.0.1:{port}").into());
    }
    let log = r.dir.join("operator.log");
    r.process = Some(process::spawn_logged(exe, &args, &log)?);
    info!(shard = r.shard, log = %log.display(), "shard run started");
    Ok(())
}

async fn wait_router(runner: &Runner, url: &str) -> Result<(), LocalError> {
    let deadline = Instant::now() + SERVE_READY_TIMEOUT;
    while Instant::now() < deadline {
        let ready = runner
            .http
            .get(format!("{url}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(LocalError::Serve(format!(
        "indexer route did not answer {url}/readyz within {}s",
        SERVE_READY_TIMEOUT.as_secs()
    )))
}

/// Stops the router and every shard's run (SIGTERM, then SIGKILL after the grace).
async fn stop_all(runner: &Runner, runs: &mut [ShardRun], router: &mut Option<BuildProcess>) {
    let grace = runner.opts.stop_grace + Duration::from_secs(5);
    if let Some(r) = router.as_mut() {
        r.terminate();
        if tokio::time::timeout(grace, r.wait()).await.is_err() {
            r.kill();
        }
    }
    for r in runs.iter().filter_map(|r| r.process.as_ref()) {
        r.terminate();
    }
    for r in runs.iter_mut() {
        if let Some(p) = r.process.as_mut() {
            if tokio::time::timeout(grace, p.wait()).await.is_err() {
                p.kill();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Time {
        Time(Timestamp::from_second(1_700_000_000 + s).unwrap())
    }

    fn child(
        phase: IndexPhase,
        ready: bool,
        degraded: Option<(&str, &str)>,
        images: u64,
    ) -> ImageIndexStatus {
        let mut s = ImageIndexStatus::default();
        s.unit.phase = Some(phase);
        s.unit.preset = Some("full".into());
        s.unit.index_generation = ready.then_some(1);
        s.scan = Some(ScanSummary {
            images,
            bytes: images * 10,
            max_width: 100 + images as u32,
            max_height: 50,
            ..ScanSummary::default()
        });
        let now = at(0);
        conditions::set(
            &mut s.conditions,
            READY,
            ready,
            if ready { "IndexServed" } else { "NotBuilt" },
            "x",
            None,
            &now,
        );
        if let Some((reason, message)) = degraded {
            conditions::set(
                &mut s.conditions,
                DEGRADED,
                true,
                reason,
                message,
                None,
                &now,
            );
        }
        s
    }

    fn cond<'a>(s: &'a ImageIndexStatus, t: &str) -> (&'a str, &'a str, &'a str) {
        let c = conditions::get(&s.conditions, t).unwrap();
        (c.status.as_str(), c.reason.as_str(), c.message.as_str())
    }

    #[test]
    fn the_whole_is_ready_when_every_shard_is() {
        let kids = vec![
            Some(child(IndexPhase::Ready, true, None, 10)),
            Some(child(
                IndexPhase::Building,
                false,
                Some(("DowngradeAfterOOMKill", "attempt 2 builds with medium")),
                12,
            )),
            None,
        ];
        let s = compose(&ImageIndexStatus::default(), &kids, Some(4), &at(5));
        assert_eq!(s.shards.len(), 3);
        assert_eq!(s.shards[2].unit.phase, Some(IndexPhase::Pending));
        assert_eq!(s.shards_ready.as_deref(), Some("1/3"));
        assert_eq!(s.unit.phase, Some(IndexPhase::Pending));
        assert_eq!(cond(&s, READY).0, "False");
        assert!(
            cond(&s, READY).2.contains("1 of 3 shards ready"),
            "{:?}",
            cond(&s, READY)
        );
        let (on, reason, message) = cond(&s, DEGRADED);
        assert_eq!((on, reason), ("True", "DowngradeAfterOOMKill"));
        assert_eq!(message, "shard 1: attempt 2 builds with medium");
        // Not every shard scanned yet: no whole scan.
        assert!(s.scan.is_none());

        let kids = vec![
            Some(child(IndexPhase::Ready, true, None, 10)),
            Some(child(IndexPhase::Ready, true, None, 12)),
            Some(child(IndexPhase::Ready, true, None, 9)),
        ];
        let s2 = compose(&s, &kids, Some(4), &at(9));
        assert_eq!(s2.unit.phase, Some(IndexPhase::Ready));
        assert_eq!(s2.shards_ready.as_deref(), Some("3/3"));
        assert_eq!(cond(&s2, READY).0, "True");
        assert_eq!(cond(&s2, DEGRADED).0, "False");
        let scan = s2.scan.unwrap();
        assert_eq!((scan.images, scan.bytes, scan.max_width), (31, 310, 112));
        assert_eq!(s2.unit.index_generation, Some(1));
        assert_eq!(s2.observed_generation, Some(4));
    }

    #[test]
    fn a_failed_shard_fails_the_whole() {
        let kids = vec![
            Some(child(IndexPhase::Ready, true, None, 10)),
            Some(child(
                IndexPhase::Failed,
                false,
                Some(("NothingFits", "no preset fits")),
                12,
            )),
        ];
        let s = compose(&ImageIndexStatus::default(), &kids, None, &at(1));
        assert_eq!(s.unit.phase, Some(IndexPhase::Failed));
        assert_eq!(cond(&s, DEGRADED).1, "NothingFits");
    }

    #[test]
    fn a_child_manifest_is_one_unsharded_shard_of_the_same_spec() {
        let text = "apiVersion: imagematch.dev/v1alpha1\nkind: ImageIndex\nmetadata:\n  name: cats\nspec:\n  dataset:\n    path: /data/cats\n  preset: full\n  memoryLimit: 300Mi\n  shards: 3\n  maxParallelBuilds: 2\n";
        let m = manifest::parse(text, Path::new("/m/cats.yaml")).unwrap();
        let c = child_manifest(&m, 2);
        assert_eq!(c.metadata.name.as_deref(), Some("cats-s2"));
        assert_eq!(c.spec.shards, None);
        assert_eq!(c.spec.max_parallel_builds, None);
        assert_eq!(c.spec.dataset.path, "/data/cats");
        assert_eq!(c.spec.memory_limit, "300Mi");
    }
}
