//! The published index: Ready, then served by `indexer serve` until stopped (with `--serve`),
//! or the run ends with where the index is and how to serve it.

use super::*;

/// The URL a person can open for `addr` (an unspecified address means this machine).
pub fn base_url(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => format!("http://127.0.0.1:{}", a.port()),
        SocketAddr::V6(a) if a.ip().is_unspecified() => format!("http://[::1]:{}", a.port()),
        SocketAddr::V4(a) => format!("http://{a}"),
        SocketAddr::V6(a) => format!("http://[{}]:{}", a.ip(), a.port()),
    }
}

/// The first image of the dataset (by name), for the example query.
fn example_image(dataset: &Path) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dataset)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| ["jpg", "jpeg", "png"].contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    files.into_iter().next()
}

impl Runner {
    fn ready_line(&self) -> String {
        let s = &self.draft.status;
        let current = attempts::of_current_build(&s.unit.attempts, s.scan.as_ref());
        let peak = current
            .last()
            .and_then(|a| a.peak_working_set)
            .map_or_else(|| "unknown".into(), format_mebibytes_ceil);
        format!(
            "{} is Ready after {:.1}s: preset {}, {} images, {} attempt(s) in this build, peak working set {peak} under {}",
            self.manifest.name,
            self.started.elapsed().as_secs_f64(),
            s.unit.preset.as_deref().unwrap_or("?"),
            s.scan.as_ref().map_or(0, |s| s.images),
            current.len(),
            self.limit_text()
        )
    }

    /// The build published: Ready, then serve (with `--serve`) or exit.
    pub(super) async fn publish(&mut self) -> Result<Ending, LocalError> {
        self.tick();
        self.draft.published();
        let generation = self.draft.status.unit.index_generation.unwrap_or(0);
        let index = self.state.index_dir();
        let Some(addr) = self.opts.serve else {
            self.draft.status.endpoint = None;
            self.draft.ready(
                "IndexPublished",
                format!(
                    "index generation {generation} is published in {}",
                    index.display()
                ),
                "Publish",
            );
            self.save()?;
            self.console.finish();
            self.console.println(&self.ready_line());
            self.console.println(&format!(
                "  index:  {}\n  serve it: {} serve {} --addr 127.0.0.1:8080   (or run again with --serve 127.0.0.1:8080)",
                index.display(),
                self.indexer.display(),
                index.display()
            ));
            return Ok(Ending::Ready);
        };
        self.serve(addr, generation, &index).await
    }

    /// Serves the index until stopped.
    async fn serve(
        &mut self,
        addr: SocketAddr,
        generation: u64,
        index: &Path,
    ) -> Result<Ending, LocalError> {
        // Another service on the address would answer /readyz in our stead.
        if let Err(e) = std::net::TcpListener::bind(addr) {
            return self.serve_failed(format!("cannot listen on {addr}: {e}"));
        }
        let log = self.state.root().join("serve.log");
        let mut child = process::serve(&self.indexer, index, &self.manifest.dataset, addr, &log)?;
        let url = base_url(addr);
        let deadline = Instant::now() + SERVE_READY_TIMEOUT;
        let failed = |why: String| {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            match process::last_error(&text) {
                Some(e) => format!("{why}: {e}"),
                None => why,
            }
        };
        loop {
            if let Some(exit) = child.try_wait() {
                let why = failed(format!(
                    "indexer serve exited ({:?}) before it was ready (log: {})",
                    exit.exit_code(),
                    log.display()
                ));
                return self.serve_failed(why);
            }
            let ready = self
                .http
                .get(format!("{url}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready && child.try_wait().is_none() {
                break;
            }
            if self.stopping() || Instant::now() >= deadline {
                child.terminate();
                let _ = tokio::time::timeout(self.opts.stop_grace, child.wait()).await;
                child.kill();
                if self.stopping() {
                    return Ok(Ending::Ready);
                }
                let why = failed(format!(
                    "indexer serve did not answer {url}/readyz within {}s (log: {})",
                    SERVE_READY_TIMEOUT.as_secs(),
                    log.display()
                ));
                return self.serve_failed(why);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.tick();
        self.draft.status.endpoint = Some(url.clone());
        self.draft.ready(
            "IndexServed",
            format!("index generation {generation} is served at {url}"),
            "Serve",
        );
        self.save()?;
        self.console.finish();
        self.console.println(&self.ready_line());
        self.console
            .println(&format!("Query service: {url}  (API docs: {url}/docs)"));
        if let Some(image) = example_image(&self.manifest.dataset) {
            self.console.println(&format!(
                "Example query:\n  {}",
                display::example_curl(&url, &image)
            ));
        }
        self.console.println("Serving until Ctrl-C.");
        let mut stops = self.stops.clone();
        let exit = tokio::select! {
            exit = child.wait() => Some(exit),
            _ = stops.changed() => None,
        };
        if let Some(exit) = exit {
            let why = failed(format!(
                "indexer serve stopped on its own ({:?})",
                exit.ok().and_then(|e| e.exit_code())
            ));
            return self.serve_failed(why);
        }
        child.terminate();
        if tokio::time::timeout(self.opts.stop_grace, child.wait())
            .await
            .is_err()
        {
            child.kill();
        }
        self.tick();
        self.draft.status.endpoint = None;
        self.draft.set_condition(
            READY,
            true,
            "IndexPublished",
            &format!(
                "index generation {generation} is published in {} (no longer served: operator local stopped)",
                index.display()
            ),
        );
        self.save()?;
        Ok(Ending::Ready)
    }

    fn serve_failed(&mut self, why: String) -> Result<Ending, LocalError> {
        self.tick();
        self.draft.status.endpoint = None;
        self.draft
            .set_condition(READY, false, "QueryServiceFailed", &why);
        self.draft
            .note(true, "QueryServiceFailed", "Serve", why.clone());
        self.save()?;
        Err(LocalError::Serve(why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_for_people() {
        assert_eq!(
            base_url("0.0.0.0:8080".parse().unwrap()),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            base_url("127.0.0.1:9000".parse().unwrap()),
            "http://127.0.0.1:9000"
        );
        assert_eq!(base_url("[::]:80".parse().unwrap()), "http://[::1]:80");
        assert_eq!(
            base_url("[fd00::1]:80".parse().unwrap()),
            "http://[fd00::1]:80"
        );
    }

    #[test]
    fn the_example_image_is_the_first_picture() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["b.png", "a.txt", "c.JPG"] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        assert_eq!(example_image(dir.path()), Some(dir.path().join("b.png")));
        assert_eq!(example_image(&dir.path().join("none")), None);
    }
}
