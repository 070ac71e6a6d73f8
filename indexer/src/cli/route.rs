//! `indexer route`: the query service of a sharded index, in front of its shards.

use imageindex_crds::{duration, quantity};
use indexer::route::{self, RouteOptions};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The flags of `indexer route`.
#[derive(clap::Args)]
pub struct RouteArgs {
    /// A shard's query service (`indexer serve`), e.g. http://10.0.0.7:8080; repeat in shard
    /// order (0, 1, …).
    #[arg(long = "shard", required = true)]
    shards: Vec<String>,
    /// Address to listen on.
    #[arg(long, visible_alias = "listen", default_value = "0.0.0.0:8080")]
    addr: SocketAddr,
    /// How long to wait for each shard's answer (a late shard lowers the coverage).
    #[arg(long, default_value = "2s", value_parser = duration::parse)]
    deadline: std::time::Duration,
    /// How often the shards' /v1/index is polled (up or down, generations, presets).
    #[arg(long, default_value = "1s", value_parser = duration::parse)]
    poll_interval: std::time::Duration,
    /// Bearer tokens, one `<token> <role>` per line (role: read or admin).
    #[arg(long)]
    auth_file: Option<PathBuf>,
    /// The token sent to the shards (default: the first token of --auth-file).
    #[arg(long, env = "IMAGEINDEX_SHARD_TOKEN", hide_env_values = true)]
    shard_token: Option<String>,
    /// Memory limit (default: the cgroup limit, else the machine's memory).
    #[arg(long, value_parser = quantity::parse_bytes)]
    memory_limit: Option<u64>,
    /// Largest request body (e.g. 20MB, 8Mi).
    #[arg(long, default_value = "20MB", value_parser = quantity::parse_size)]
    max_body: u64,
    /// Queries decoding at once (default: cores, fewer if memory is short).
    #[arg(long)]
    slots: Option<usize>,
    /// Requests that may wait for a slot before new ones get 503.
    #[arg(long)]
    queue: Option<usize>,
}

impl RouteArgs {
    /// Routes until SIGTERM or SIGINT.
    pub fn run(self) -> anyhow::Result<()> {
        for url in &self.shards {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                anyhow::bail!("--shard {url:?}: expected an http:// URL");
            }
        }
        route::run(RouteOptions {
            addr: self.addr,
            shards: self.shards,
            deadline: self.deadline,
            poll_interval: self.poll_interval,
            auth_file: self.auth_file,
            shard_token: self.shard_token,
            memory_limit: self.memory_limit,
            max_body: self.max_body,
            slots: self.slots,
            queue: self.queue,
        })?;
        Ok(())
    }
}
