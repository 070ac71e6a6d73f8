//! `node-agent STATE_DIR [--node NAME]`: the test node agent on its own, for trying the
//! operator on a real API server by hand. STATE_DIR is a control plane's from
//! tests/controlplane/up.sh; the workspace's `indexer` and `operator` binaries (next to this
//! one) stand for the images `*/imageindex/indexer:*` and `*/imageindex/operator:*`. Runs
//! until SIGINT or SIGTERM, then kills every pod process it started. Needs root.
//!
//! ```sh
//! tests/controlplane/up.sh /tmp/cp
//! target/debug/node-agent /tmp/cp &
//! export KUBECONFIG=/tmp/cp/admin.kubeconfig
//! helm install imageindex-operator ./charts/imageindex-operator \
//!   --namespace imageindex-system --create-namespace
//! kubectl get pods -A -o wide
//! ```

use imageindex_e2e::node::{AgentConfig, ImageBinary, NodeAgent};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn usage() -> ! {
    eprintln!(
        "usage: node-agent STATE_DIR [--node NAME]   (STATE_DIR from tests/controlplane/up.sh)"
    );
    std::process::exit(2);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut state: Option<PathBuf> = None;
    let mut node = "imageindex-node".to_string();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--node" => node = args.next().unwrap_or_else(|| usage()),
            "-h" | "--help" => usage(),
            _ if state.is_none() => state = Some(PathBuf::from(a)),
            _ => usage(),
        }
    }
    let state = state.unwrap_or_else(|| usage());
    let env = std::fs::read_to_string(state.join("env")).unwrap_or_else(|e| {
        eprintln!(
            "{}: {e} (start the control plane with tests/controlplane/up.sh)",
            state.join("env").display()
        );
        std::process::exit(2);
    });
    let value = |key: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(|v| v.trim_matches(['\'', '"']).to_string())
            .unwrap_or_else(|| {
                eprintln!("{key} is not in {}", state.join("env").display());
                std::process::exit(2);
            })
    };
    let exe = std::env::current_exe().unwrap_or_default();
    let bin_dir = exe.parent().unwrap_or(Path::new("."));
    let config = AgentConfig {
        node_name: node,
        kubeconfig: state.join("admin.kubeconfig"),
        state_dir: state.join("node-agent"),
        images: ["indexer", "operator"]
            .iter()
            .map(|name| ImageBinary {
                repository: format!("imageindex/{name}"),
                binary: bin_dir.join(name),
            })
            .collect(),
        apiserver_host: "127.0.0.1".into(),
        apiserver_port: value("APISERVER_PORT").parse().unwrap_or_else(|_| usage()),
        ca_cert: PathBuf::from(value("CA_CERT")),
        restart_backoff: Duration::from_secs(10),
        max_restart_backoff: Duration::from_secs(300),
    };
    // SIGINT and SIGTERM are waited for below; block them before any thread starts.
    // SAFETY: plain signal-mask calls on a local set.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let log = config.state_dir.join("agent.log");
    let agent = match NodeAgent::start(config) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("node-agent: {e:#}");
            std::process::exit(1);
        }
    };
    eprintln!(
        "node-agent: node {} is Ready; pods get addresses in {}; log {} (pod logs beside it); \
         Ctrl-C stops it",
        agent.node_name(),
        agent.pod_network(),
        log.display()
    );
    let mut signal = 0;
    // SAFETY: waits for one of the blocked signals.
    unsafe {
        libc::sigwait(&set, &mut signal);
    }
    eprintln!("node-agent: stopping (every pod process is killed)");
    agent.stop();
}
