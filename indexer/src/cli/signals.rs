//! SIGTERM and SIGINT stop a build at its next checkpoint (exit 6, resumable).

use anyhow::Context;
use indexer::progress::BuildProgress;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::sync::Arc;

/// Cancels `progress` when SIGTERM or SIGINT arrives; a thread waits for them (it sleeps in
/// the kernel until a signal comes, it does not poll).
pub fn cancel_on_stop(progress: Arc<BuildProgress>) -> anyhow::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for _ in signals.forever() {
                if !progress.is_cancelled() {
                    tracing::warn!("stop requested: finishing the current checkpoint");
                    progress.cancel();
                }
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}
