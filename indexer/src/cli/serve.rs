//! `indexer serve`: the HTTP query service over an index directory.

use imageindex_crds::{duration, quantity};
use indexer::serve::{self, ServeOptions};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The flags of `indexer serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Index directory (its `current` generation is served; it may not exist yet).
    index: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8080")]
    addr: SocketAddr,
    /// Dataset directory, for POST /v1/index/rebuild.
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Memory limit (default: the cgroup limit, else the machine's memory).
    #[arg(long, value_parser = quantity::parse_bytes)]
    memory_limit: Option<u64>,
    /// Bearer tokens, one `<token> <role>` per line (role: read or admin).
    #[arg(long)]
    auth_file: Option<PathBuf>,
    /// Follow the index directory and serve every generation published into it.
    #[arg(long)]
    watch: bool,
    /// How often to check the index directory.
    #[arg(long, default_value = "2s", value_parser = duration::parse)]
    watch_interval: std::time::Duration,
    /// Largest request body (e.g. 20MB, 8Mi).
    #[arg(long, default_value = "20MB", value_parser = quantity::parse_size)]
    max_body: u64,
    /// Queries decoding at once (default: cores, fewer if memory is short).
    #[arg(long)]
    slots: Option<usize>,
    /// Requests that may wait for a slot before new ones get 503.
    #[arg(long)]
    queue: Option<usize>,
    /// Extraction threads of a rebuild (default: cores - 1, at least 1).
    #[arg(long)]
    rebuild_threads: Option<usize>,
}

impl ServeArgs {
    /// Serves until SIGTERM or SIGINT.
    pub fn run(self) -> anyhow::Result<()> {
        serve::run(ServeOptions {
            index_dir: self.index,
            addr: self.addr,
            dataset: self.dataset,
            memory_limit: self.memory_limit,
            auth_file: self.auth_file,
            watch: self.watch,
            watch_interval: self.watch_interval,
            max_body: self.max_body,
            slots: self.slots,
            queue: self.queue,
            rebuild_threads: self.rebuild_threads,
        })?;
        Ok(())
    }
}
