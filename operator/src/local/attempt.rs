//! One build attempt: `indexer exec-limited -- indexer build` in a fresh cgroup, its metrics
//! scraped into status while it runs, stopped on critical pressure or on request, and its
//! ending (exit, OOM kills, the build's own summary) recorded.

use super::*;
use imageindex_crds::types::Progress;

/// A free loopback port for a build's metrics.
/// A free loopback TCP port.
pub(super) fn free_port() -> Result<u16, LocalError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| {
            LocalError::Process(ProcessError::Spawn {
                program: "a metrics port".into(),
                source,
            })
        })
}

/// What is known when an attempt's process has ended.
struct ProcessEnd {
    number: u32,
    process: String,
    exit: ExitInfo,
    oom_kills: u64,
    stop: Option<Stop>,
    pressure: String,
    cgroup_peak: Option<u64>,
    outcome: AttemptOutcome,
}

impl Runner {
    fn ensure_cgroups(&mut self) -> Result<(), LocalError> {
        if self.cgroups_checked {
            return Ok(());
        }
        if let Err(reason) = cgroup::check_writable(&self.opts.cgroup_root) {
            self.tick();
            self.draft
                .give_up("CgroupsUnavailable", format!("{reason}; {}", cgroup::FIX));
            self.save()?;
            return Err(LocalError::Cgroups { reason });
        }
        let stale = cgroup::remove_stale(&self.opts.cgroup_root, &self.manifest.name);
        if stale > 0 {
            info!("removed {stale} cgroup(s) left by an earlier run");
        }
        self.cgroups_checked = true;
        Ok(())
    }

    /// Runs attempt `number` with `preset` to its end and records it.
    pub(super) async fn attempt(
        &mut self,
        number: u32,
        preset: Preset,
        why: Option<(&'static str, String)>,
    ) -> Result<AttemptEnd, LocalError> {
        self.ensure_cgroups()?;
        let name = resources::build_pod_name(&self.manifest.name, number);
        let group_name = format!("{name}-{}", std::process::id());
        let group = cgroup::AttemptGroup::at(&self.opts.cgroup_root, &group_name);
        let cmd = BuildCommand {
            indexer: self.indexer.clone(),
            dataset: self.manifest.dataset.clone(),
            index: self.state.index_dir(),
            preset: preset.label(),
            memory_limit: self.manifest.valid.memory_limit,
            threads: self.threads,
            metrics_port: free_port()?,
            cgroup: group_name.clone(),
            shard: self.opts.shard.clone(),
        };
        let log = self.state.attempt_log(number);
        let summary_path = self.state.attempt_summary(number);
        let mut child = cmd.spawn(&log, &summary_path)?;
        let process = format!("process {name} (pid {})", child.pid);
        self.tick();
        let started = attempts::started(number, &cmd.preset, &name, self.draft.now.clone());
        let limit = self.limit_text();
        let place = format!("{process} in cgroup {}/{group_name}", cgroup::PARENT);
        self.draft.attempt_started(started, &limit, &place, why);
        self.save()?;

        let url = format!("http://127.0.0.1:{}/metrics", cmd.metrics_port);
        let key = BuildKey {
            uid: self.manifest.name.clone(),
            attempt: number,
        };
        let mut stops = self.stops.clone();
        let mut stops_open = true;
        let mut ticker = tokio::time::interval(self.opts.scrape_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop: Option<(Stop, Instant)> = None;
        let mut pressure_message = String::new();
        let exit = loop {
            tokio::select! {
                exit = child.wait() => break exit.map_err(|source| ProcessError::Spawn { program: process.clone(), source })?,
                _ = ticker.tick() => match stop {
                    Some((_, deadline)) if Instant::now() >= deadline => {
                        warn!("{process} did not stop within {:?}: killing it", self.opts.stop_grace);
                        child.kill();
                    }
                    Some(_) => {}
                    None => {
                        if let Some(p) = self.scrape(&key, &url, number).await? {
                            if p.level == PressureLevel::Critical {
                                warn!("{process}: {}; stopping it", p.message);
                                child.terminate();
                                stop = Some((Stop::Pressure, Instant::now() + self.opts.stop_grace));
                                pressure_message = p.message;
                            }
                        }
                    }
                },
                changed = stops.changed(), if stops_open => {
                    if changed.is_err() {
                        stops_open = false;
                        continue;
                    }
                    match stop {
                        Some((Stop::Interrupt, _)) => {
                            warn!("stop requested again: killing {process}");
                            child.kill();
                        }
                        _ => {
                            info!("asking {process} to stop at its next checkpoint");
                            child.terminate();
                            stop = Some((Stop::Interrupt, Instant::now() + self.opts.stop_grace));
                        }
                    }
                }
            }
        };
        let stop = stop.map(|(kind, _)| kind);
        self.history.forget(&key);
        let (oom_kills, cgroup_peak) = group
            .as_ref()
            .map_or((0, None), |g| (g.oom_kills(), g.peak_usage()));
        if let Some(g) = &group {
            if let Err(error) = g.remove() {
                warn!(cgroup = %g.dir.display(), %error, "cannot remove the attempt's cgroup");
            }
        }
        let end = process::attempt_end(&exit, oom_kills, stop);
        let outcome = self.draft.outcome_of(&end);
        let ending = ProcessEnd {
            number,
            process,
            exit,
            oom_kills,
            stop,
            pressure: pressure_message,
            cgroup_peak,
            outcome,
        };
        let message = self.end_message(&ending);
        self.tick();
        self.draft
            .end_attempt(number, outcome, end.exit_code, message, None, &limit);
        self.save()?;
        Ok(match (outcome, stop) {
            (AttemptOutcome::Succeeded, _) => AttemptEnd::Succeeded,
            (AttemptOutcome::Interrupted, Some(Stop::Interrupt)) => AttemptEnd::Interrupted,
            _ => AttemptEnd::Ended,
        })
    }

    /// The attempt's ending in words, with what its summary or log adds; also raises its
    /// peaks with the build's own (finer-grained) measurements.
    fn end_message(&mut self, e: &ProcessEnd) -> String {
        let ProcessEnd {
            number,
            ref process,
            ref exit,
            oom_kills,
            stop,
            ref pressure,
            cgroup_peak,
            outcome,
        } = *e;
        let mut text = process::describe_end(process, exit, oom_kills, stop);
        if stop == Some(Stop::Pressure) {
            text.push_str(&format!(" ({pressure})"));
        }
        if let Some(peak) = cgroup_peak {
            text.push_str(&format!(
                "; cgroup peak usage {}",
                format_mebibytes_ceil(peak)
            ));
        }
        match outcome {
            AttemptOutcome::OomKilled => {
                // The kernel kills only when it cannot reclaim below the limit: the working set
                // reached the group's peak charge, whatever the last scrape saw.
                self.draft.raise_peaks(number, None, cgroup_peak);
            }
            AttemptOutcome::Succeeded => {
                let summary = std::fs::read(self.state.attempt_summary(number))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
                if let Some(s) = summary {
                    let n = |p: &str| s.pointer(p).and_then(serde_json::Value::as_u64);
                    self.draft.raise_peaks(
                        number,
                        n("/memory/peakRss"),
                        n("/memory/peakWorkingSet"),
                    );
                    if let (Some(total), Some(failed), Some(descriptors)) = (
                        n("/meta/imagesTotal"),
                        n("/meta/imagesFailed"),
                        n("/meta/descriptors"),
                    ) {
                        self.draft.status.unit.progress = Some(Progress::new(
                            total,
                            total,
                            failed,
                            descriptors,
                            Some("done".into()),
                        ));
                    }
                    let resumed =
                        s.get("resumed").and_then(serde_json::Value::as_bool) == Some(true);
                    text.push_str(&format!(
                        "; published generation {} with {} of {} images extracted in this attempt{}",
                        n("/generation").unwrap_or(0),
                        n("/extractedNow").unwrap_or(0),
                        n("/meta/imagesTotal").unwrap_or(0),
                        if resumed { " (resumed from the checkpoint)" } else { "" }
                    ));
                }
            }
            AttemptOutcome::Failed => {
                let log =
                    std::fs::read_to_string(self.state.attempt_log(number)).unwrap_or_default();
                if let Some(e) = process::last_error(&log) {
                    text.push_str(&format!(": {e}"));
                }
            }
            _ => {}
        }
        text
    }

    /// One scrape of the build's metrics into status; `None` while they are not up.
    async fn scrape(
        &mut self,
        key: &BuildKey,
        url: &str,
        number: u32,
    ) -> Result<Option<Pressure>, LocalError> {
        let m = match scrape::scrape(&self.http, url).await {
            Ok(m) => m,
            Err(error) => {
                tracing::debug!(%error, "build metrics not available (yet)");
                return Ok(None);
            }
        };
        let (working_set, limit) = m.working_set_and_limit(self.manifest.valid.memory_limit);
        let samples = self.history.record(key, Instant::now(), working_set, limit);
        self.tick();
        let pressure = self.draft.observe(number, &m, &samples);
        self.save()?;
        Ok(pressure)
    }
}
