//! What a person watching `operator local` sees: one live summary line (phase, preset,
//! attempt, progress, working set / limit) redrawn in place on a terminal, or printed as a
//! plain log line now and then when the output is a file or a pipe. Log lines and notes
//! are printed above the live line without tearing it.

use imageindex_crds::types::IndexPhase;
use imageindex_crds::ImageIndexStatus;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing_subscriber::fmt::MakeWriter;

/// Plain (non-terminal) summary lines are printed at most this often unless the phase,
/// preset or attempt changed.
pub const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// The one-line summary of a status.
pub fn summary_line(status: &ImageIndexStatus) -> String {
    let unit = &status.unit;
    let phase = unit.phase.unwrap_or(IndexPhase::Pending);
    let mut parts = vec![format!("{phase:?}")];
    if let Some(preset) = &unit.preset {
        parts.push(format!("preset {preset}"));
    }
    if phase == IndexPhase::Building {
        if let Some(a) = unit.attempts.last() {
            parts.push(format!("attempt {}", a.number));
        }
    }
    if let Some(p) = &unit.progress {
        let step = p.build_phase.as_deref().unwrap_or("images");
        parts.push(format!("{step} {}", p.summary));
    }
    if let Some(m) = &unit.memory {
        let pct = if m.limit > 0 {
            m.working_set as f64 * 100.0 / m.limit as f64
        } else {
            0.0
        };
        parts.push(format!("working set {} ({pct:.0}%)", m.summary));
    }
    if let Some(e) = &status.endpoint {
        parts.push(e.clone());
    }
    parts.join("  ")
}

/// What makes a plain line worth printing at once: phase, preset and attempts.
type LineKey = (Option<IndexPhase>, Option<String>, usize);

fn key(status: &ImageIndexStatus) -> LineKey {
    let unit = &status.unit;
    (unit.phase, unit.preset.clone(), unit.attempts.len())
}

/// The live line on a terminal, shared with the log writer so logs print above it.
#[derive(Clone, Debug, Default)]
pub struct LiveLine(Arc<Mutex<Option<ProgressBar>>>);

impl LiveLine {
    fn get(&self) -> Option<ProgressBar> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, bar: Option<ProgressBar>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = bar;
    }
}

/// Writes one log event to stderr, above the live line if there is one.
pub struct LineWriter {
    live: LiveLine,
    buf: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let write = || {
            let _ = std::io::stderr().write_all(&buf);
        };
        match self.live.get() {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
    }
}

impl<'a> MakeWriter<'a> for LiveLine {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            live: self.clone(),
            buf: Vec::new(),
        }
    }
}

/// The summary display.
#[derive(Debug)]
pub struct Console {
    live: LiveLine,
    tty: bool,
    last_plain: Option<(Instant, String, LineKey)>,
}

impl Console {
    /// A display that redraws in place when `tty`, else prints plain lines.
    pub fn new(live: LiveLine, tty: bool) -> Self {
        if tty {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}") {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(250));
            live.set(Some(bar));
        }
        Console {
            live,
            tty,
            last_plain: None,
        }
    }

    /// Shows the status.
    pub fn update(&mut self, status: &ImageIndexStatus) {
        let line = summary_line(status);
        if self.tty {
            if let Some(bar) = self.live.get() {
                bar.set_message(line);
            }
            return;
        }
        let k = key(status);
        let due = match &self.last_plain {
            None => true,
            Some((at, last, last_key)) => {
                *last_key != k || (*last != line && at.elapsed() >= PLAIN_EVERY)
            }
        };
        if due {
            tracing::info!(target: "imageindex::status", "{line}");
            self.last_plain = Some((Instant::now(), line, k));
        }
    }

    /// Prints a line to stdout (above the live line).
    pub fn println(&self, text: &str) {
        let write = || println!("{text}");
        match self.live.get() {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
    }

    /// Removes the live line.
    pub fn finish(&mut self) {
        if let Some(bar) = self.live.get() {
            bar.finish_and_clear();
        }
        self.live.set(None);
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The example query printed once the service is up.
pub fn example_curl(url: &str, image: &std::path::Path) -> String {
    format!(
        "curl -s -F 'image=@{}' '{url}/v1/search?k=3'",
        image.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use imageindex_crds::types::{MemoryStatus, Progress, UnitStatus};

    #[test]
    fn the_summary_line_says_what_matters() {
        let mut s = ImageIndexStatus {
            unit: UnitStatus {
                phase: Some(IndexPhase::Building),
                preset: Some("medium".into()),
                progress: Some(Progress::new(12, 31, 0, 900, Some("extract".into()))),
                memory: Some(MemoryStatus::new(
                    50 << 20,
                    45 << 20,
                    35 << 20,
                    80 << 20,
                    60 << 20,
                )),
                ..UnitStatus::default()
            },
            ..ImageIndexStatus::default()
        };
        let start = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(0).unwrap(),
        );
        s.unit
            .attempts
            .push(imageindex_crds::attempts::started(2, "medium", "p", start));
        assert_eq!(
            summary_line(&s),
            "Building  preset medium  attempt 2  extract 12/31 (39%)  working set 45Mi/80Mi (56%)"
        );
        assert_eq!(summary_line(&ImageIndexStatus::default()), "Pending");
        s.unit.phase = Some(IndexPhase::Ready);
        s.unit.memory = None;
        s.endpoint = Some("http://127.0.0.1:8080".into());
        assert_eq!(
            summary_line(&s),
            "Ready  preset medium  extract 12/31 (39%)  http://127.0.0.1:8080"
        );
    }

    #[test]
    fn example_query() {
        assert_eq!(
            example_curl("http://127.0.0.1:8080", std::path::Path::new("/s/cat.jpg")),
            "curl -s -F 'image=@/s/cat.jpg' 'http://127.0.0.1:8080/v1/search?k=3'"
        );
    }
}
