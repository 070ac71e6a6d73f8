//! `indexer exec-limited`: run a command inside a fresh cgroup with a real memory limit.

use imageindex_cgroup::{Hierarchy, Limits, DEFAULT_ROOT, PARENT};
use imageindex_crds::quantity;
use std::os::unix::process::CommandExt;
use std::path::Path;

/// The flags of `indexer exec-limited`.
#[derive(clap::Args)]
pub struct ExecLimitedArgs {
    /// Memory limit of the cgroup (e.g. 512Mi).
    #[arg(long, value_parser = quantity::parse_bytes)]
    memory_limit: u64,
    /// Name of the cgroup (created under imageindex/).
    #[arg(long)]
    name: String,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

impl ExecLimitedArgs {
    /// Creates the group `imageindex/<name>` (swap limited too, so the limit is a real
    /// ceiling), moves this process into it and replaces it with the command (returns only
    /// when that fails).
    pub fn run(self) -> anyhow::Result<()> {
        let group = Hierarchy::require(Path::new(DEFAULT_ROOT))?.create(
            &Path::new(PARENT).join(&self.name),
            Limits::memory(self.memory_limit),
        )?;
        group.add(std::process::id())?;
        let err = std::process::Command::new(&self.command[0])
            .args(&self.command[1..])
            .exec();
        Err(anyhow::anyhow!("cannot run {:?}: {err}", self.command[0]))
    }
}
