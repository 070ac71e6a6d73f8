//! `operator`: runs the ImageIndex controller (`operator run`), or the same policy on this
//! machine with local processes (`operator local`).

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use imageindex_crds::ImageIndex;
use kube::api::ListParams;
use kube::{Api, Client};
use operator::controller::{self, Context};
use operator::local::{self, display::LiveLine, LocalOptions};
use operator::metrics::Metrics;
use operator::server::{self, Health};
use operator::settings::{self, Settings};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tracing::{error, info};

/// The imageindex operator.
#[derive(Parser, Debug)]
#[command(name = "operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the Kubernetes controller for ImageIndex resources (in-cluster config, or the
    /// kubeconfig of $KUBECONFIG / ~/.kube/config).
    Run(RunArgs),
    /// Build (and serve) an ImageIndex on this machine, with the controller's policy.
    ///
    /// The manifest's builds run as local processes in cgroups limited to spec.memoryLimit,
    /// restarted with a poorer preset after an OOM kill or critical memory pressure, resuming
    /// from their checkpoint. Exit code: 0 Ready, 1 Failed, 2 invalid manifest, 3 environment
    /// (cgroups, indexer binary, state directory), 130 stopped (run again to resume).
    Local(LocalArgs),
}

#[derive(clap::Args, Debug)]
struct LocalArgs {
    /// The ImageIndex manifest (the YAML you would `kubectl apply`); spec.dataset.path is a
    /// local directory, resolved against the manifest's directory when relative.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Where the status, the index and the attempt logs are kept
    /// (default: $XDG_STATE_HOME/imageindex/<name> or ~/.local/state/imageindex/<name>).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Once Ready, serve the index on this address (e.g. 127.0.0.1:8080) until Ctrl-C.
    #[arg(long)]
    serve: Option<SocketAddr>,
    /// Also write the ImageIndex status here as JSON (replaced atomically on every change).
    #[arg(long)]
    status_out: Option<PathBuf>,
    /// The indexer binary (default: next to this binary, else on PATH).
    #[arg(long)]
    indexer_bin: Option<PathBuf>,
    /// How often a running build's /metrics is scraped.
    #[arg(long, default_value = "1s", value_parser = settings::parse_duration)]
    scrape_interval: Duration,
    /// How long a stopped build may take to write its checkpoint before it is killed.
    #[arg(long, default_value = "30s", value_parser = settings::parse_duration)]
    stop_grace: Duration,
    /// Where the cgroup hierarchies are mounted.
    #[arg(long, default_value = "/sys/fs/cgroup", hide = true)]
    cgroup_root: PathBuf,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Build and serve one shard (`I/N`) of the manifest's dataset (a sharded run starts one
    /// such run per shard).
    #[arg(long, hide = true)]
    shard: Option<String>,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080", env = "OPERATOR_METRICS_ADDR")]
    metrics_addr: SocketAddr,
    /// Image with the indexer binary, used when spec.indexerImage is not set.
    #[arg(long, default_value = settings::DEFAULT_INDEXER_IMAGE, env = "OPERATOR_INDEXER_IMAGE")]
    indexer_image: String,
    /// imagePullPolicy of the scan, build and query pods.
    #[arg(long, default_value = "IfNotPresent", value_parser = ["Always", "IfNotPresent", "Never"])]
    image_pull_policy: String,
    /// How often a running build's /metrics is scraped (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = settings::parse_duration)]
    scrape_interval: Duration,
    /// Port the build pods serve /metrics on.
    #[arg(long, default_value_t = settings::DEFAULT_BUILD_METRICS_PORT)]
    build_metrics_port: u16,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(args: RunArgs) -> Result<()> {
    init_tracing(&args.log_format);
    let settings = Settings {
        indexer_image: args.indexer_image,
        image_pull_policy: args.image_pull_policy,
        scrape_interval: args.scrape_interval,
        build_metrics_port: args.build_metrics_port,
        namespace: args.namespace,
    };
    let health = Health::default();
    let metrics = Metrics::new(&health.registry).context("registering metrics")?;

    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding {}", args.metrics_addr))?;
    info!(addr = %args.metrics_addr, "serving /metrics, /healthz and /readyz");
    let app = server::router(health.clone());
    let http = tokio::spawn(async move { axum::serve(listener, app).await });

    let client = Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster or kubeconfig)")?;
    let indexes: Api<ImageIndex> = match settings.namespace.as_deref() {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    indexes
        .list(&ListParams::default().limit(1))
        .await
        .context(
        "cannot list ImageIndex resources: is the CRD installed and may the operator list them?",
    )?;
    health.ready.store(true, Ordering::Relaxed);
    info!(?settings, "controller starting");

    let ctx = Context::new(client, settings, metrics);
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    controller::run(ctx, async {
        tokio::select! {
            _ = shutdown => {},
            _ = terminate => {},
        }
    })
    .await;
    info!("controller stopped");
    http.abort();
    Ok(())
}

/// `operator local`: logs go above the live status line; returns the exit code.
async fn local(args: LocalArgs) -> i32 {
    let live = LiveLine::default();
    let tty = std::io::stderr().is_terminal() && args.log_format == "text";
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(live.clone())
        .with_target(false);
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let opts = LocalOptions {
        manifest: args.file,
        state_dir: args.state_dir,
        serve: args.serve,
        status_out: args.status_out,
        indexer_bin: args.indexer_bin,
        scrape_interval: args.scrape_interval,
        stop_grace: args.stop_grace,
        cgroup_root: args.cgroup_root,
        shard: args.shard,
    };
    match local::run(opts, live, tty).await {
        Ok(ending) => ending.exit_code(),
        Err(e) => {
            let code = e.exit_code();
            eprintln!("error: {:#}", anyhow::Error::from(e));
            code
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args).await,
        Command::Local(args) => std::process::exit(local(args).await),
    }
}
