//! `indexer`: scan a dataset, build a memory-bounded ORB index, search it, serve it.
//!
//! The commands live in [`cli`], one module each; `main` parses, dispatches and turns the
//! outcome into an exit code.

mod cli;

use clap::Parser;
use cli::{Cli, Command};

fn main() {
    let args = Cli::parse();
    cli::init_logging(args.log_format);
    indexer::features::quiet_opencv();
    // Fail points from FAILPOINTS (tests only; without the variable they do nothing).
    let _failpoints = fail::FailScenario::setup();
    let outcome = match args.command {
        Command::Scan(a) => a.run(),
        Command::Build(a) => a.run(),
        Command::Search(a) => a.run(),
        Command::Info(a) => a.run(),
        Command::Serve(a) => a.run(),
        Command::Route(a) => a.run(),
        Command::ExecLimited(a) => a.run(),
        #[cfg(feature = "bench")]
        Command::Bench(a) => a.run(),
        #[cfg(feature = "bench")]
        Command::BuildSynthetic(a) => a.run(),
    };
    std::process::exit(cli::exit_code(outcome));
}
