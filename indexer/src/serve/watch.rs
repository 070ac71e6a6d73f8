//! Watching the index directory's `current` pointer. Query pods run with `--watch` and pick
//! up every generation a build pod publishes; without it the service still waits for the
//! first generation (it starts without an index and becomes ready once one appears) and
//! then only swaps after its own rebuilds.

use super::state::Refresh;
use super::App;
use std::sync::Arc;
use std::time::Duration;

/// Polls `current` every `interval` until shutdown; after the first generation is loaded it
/// keeps polling only when `keep_watching`.
pub async fn run(app: Arc<App>, interval: Duration, keep_watching: bool) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut announced_wait = false;
    loop {
        ticker.tick().await;
        let worker = app.clone();
        let outcome = tokio::task::spawn_blocking(move || worker.index.refresh()).await;
        match outcome {
            Ok(Ok(Refresh::Swapped { from, to })) => {
                app.note_swap();
                tracing::info!(?from, to, "watch: now serving the published generation");
            }
            Ok(Ok(Refresh::NothingPublished)) if !announced_wait => {
                announced_wait = true;
                tracing::info!(
                    dir = %app.index.dir().root().display(),
                    "no index published yet: not ready until one is"
                );
            }
            Ok(Ok(_)) => {}
            // `refresh` logged the failure once per generation; retry next tick.
            Ok(Err(_)) => {}
            Err(e) => tracing::error!(error = %e, "watch task failed"),
        }
        if !keep_watching && app.index.get().is_some() {
            return;
        }
    }
}
