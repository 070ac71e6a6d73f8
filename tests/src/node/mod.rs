//! The test node agent: a kubelet (and scheduler, and local-path provisioner) for a real
//! kube-apiserver without containers, so that the end-to-end tests run the operator's pods as
//! real processes under real limits. Test-only code, not shipped.
//!
//! It registers a Node and keeps it Ready (status + Lease heartbeats), binds every pending pod
//! to it (there is no scheduler), provisions a hostPath volume for claims that name neither a
//! volume nor a storage class, and runs each pod bound to it:
//! - the image maps to a locally built binary ([`ImageBinary`]: `imageindex/indexer:*` →
//!   `indexer`, `imageindex/operator:*` → `operator`), mounted at `/opt/imageindex/bin`;
//! - the container runs in its own mount namespace with a container-like root ([`sandbox`]):
//!   the pod's volumes (a claim → the directory of its PersistentVolume), the termination
//!   message file, the service-account token, `readOnlyRootFilesystem`, `runAsUser`;
//! - in its own cgroup ([`cgroup`]) limited to `resources.limits` (memory and CPU): the kernel's
//!   OOM killer is what makes a container `OOMKilled`;
//! - with its own address ([`network`]) reported as `podIP`; env, `$(VAR)` expansion
//!   ([`expand`]) and the downward API as the kubelet does them; service-account tokens from
//!   the TokenRequest API (bound to the pod) with `KUBERNETES_SERVICE_HOST/PORT` pointing at
//!   the API server, so an in-cluster client authenticates as the pod's ServiceAccount and RBAC
//!   decides what it may do;
//! - status written as a kubelet writes it ([`status`]): Pending → Running with readiness from
//!   the readiness probe ([`probe`]), termination with exit code, reason (`OOMKilled`,
//!   `Error`, `Completed`) and termination message, phase Succeeded/Failed, restarts with
//!   back-off and `lastState` for `restartPolicy: Always`;
//! - a deleted pod's process gets SIGTERM, SIGKILL after the grace period, and the pod object
//!   is then removed with a grace-period-0 delete.
//!
//! It runs in the test process, on its own thread and tokio runtime ([`NodeAgent::start`]),
//! so a test can ask it which processes it ran ([`NodeAgent::runs`]) and read their logs, and
//! everything it started is killed when the test ends (also on panic, through `Drop`).

pub mod cgroup;
pub mod expand;
pub mod network;
mod pod;
pub mod probe;
pub mod registration;
pub mod sandbox;
pub mod status;
pub mod volumes;

use anyhow::{anyhow, Context as _};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Config, ResourceExt};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, watch};

/// An image the agent can run: its repository (the image reference without registry, tag or
/// digest must end with it) and the local binary that stands for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageBinary {
    /// e.g. `imageindex/indexer` (matches `registry.example.com/imageindex/indexer:0.1.0`).
    pub repository: String,
    /// The binary, mounted at `/opt/imageindex/bin/<file name>` in the container.
    pub binary: PathBuf,
}

/// The repository of an image reference: without tag or digest.
pub fn image_repository(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    match no_digest.rfind(':') {
        Some(colon) if !no_digest[colon..].contains('/') => &no_digest[..colon],
        _ => no_digest,
    }
}

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The Node's name.
    pub node_name: String,
    /// A kubeconfig with the rights of a kubelet and a scheduler (the tests use the admin's).
    pub kubeconfig: PathBuf,
    /// Where pod directories, volumes and logs are kept.
    pub state_dir: PathBuf,
    /// The images it can run.
    pub images: Vec<ImageBinary>,
    /// The API server's address as pods reach it (`KUBERNETES_SERVICE_HOST`).
    pub apiserver_host: String,
    /// Its port (`KUBERNETES_SERVICE_PORT`).
    pub apiserver_port: u16,
    /// The cluster CA (the pods' `ca.crt`).
    pub ca_cert: PathBuf,
    /// First back-off before restarting a container (doubling, up to `max_restart_backoff`).
    /// The kubelet uses 10 s and 5 min; tests want it shorter.
    pub restart_backoff: Duration,
    /// Longest back-off.
    pub max_restart_backoff: Duration,
}

impl AgentConfig {
    /// The local binary for `image`, if the agent maps it.
    pub fn binary_for(&self, image: &str) -> Option<&Path> {
        let repo = image_repository(image);
        self.images
            .iter()
            .find(|i| repo == i.repository || repo.ends_with(&format!("/{}", i.repository)))
            .map(|i| i.binary.as_path())
    }
}

/// One run of a container: a process the agent started.
#[derive(Clone, Debug)]
pub struct ContainerRun {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's uid.
    pub uid: String,
    /// The pod's labels.
    pub labels: BTreeMap<String, String>,
    /// The container.
    pub container: String,
    /// Which run of the container (its restart count when it started).
    pub restart: i32,
    /// The process id.
    pub pid: u32,
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// Its memory cgroup.
    pub cgroup: PathBuf,
    /// Its stdout and stderr.
    pub log: PathBuf,
    /// When it started.
    pub started: SystemTime,
    /// How it ended, once it did.
    pub ended: Option<RunEnd>,
}

/// How a container run ended.
#[derive(Clone, Debug)]
pub struct RunEnd {
    /// When.
    pub at: SystemTime,
    /// Exit code (128 + signal).
    pub exit_code: i32,
    /// The reason reported (`OOMKilled`, `Error`, `Completed`).
    pub reason: String,
    /// The cgroup's peak memory usage during the run (the kernel's count, page cache
    /// included).
    pub peak_memory: Option<u64>,
}

/// A pod the agent accepted.
#[derive(Clone, Debug)]
pub struct PodRecord {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// uid.
    pub uid: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Its address, once allocated.
    pub ip: Option<Ipv4Addr>,
    /// Its cgroup directories, once made.
    pub cgroups: Vec<PathBuf>,
    /// Its directory (rootfs, logs, termination message).
    pub dir: PathBuf,
    /// Whether its sandbox is gone: processes killed, cgroup removed, address released.
    pub torn_down: bool,
}

/// What the agent recorded.
#[derive(Debug, Default)]
pub(crate) struct Records {
    pub runs: Vec<ContainerRun>,
    pub pods: BTreeMap<String, PodRecord>,
}

/// The agent's own log (`<state dir>/agent.log`).
pub(crate) struct AgentLog {
    file: Mutex<std::fs::File>,
    path: PathBuf,
    start: Instant,
}

impl AgentLog {
    pub fn line(&self, message: impl AsRef<str>) {
        let t = self.start.elapsed().as_secs_f64();
        if let Ok(mut f) = self.file.lock() {
            let _ = writeln!(f, "[{t:8.3}s] {}", message.as_ref());
        }
    }
}

/// State shared by the agent's thread and the test's handle.
pub(crate) struct AgentState {
    pub records: Mutex<Records>,
    pub network: Mutex<network::PodNetwork>,
    pub log: AgentLog,
    pub hierarchy: cgroup::Hierarchy,
    /// `imageindex/agent-<pid>`: parent of the containers' cgroups.
    pub cgroup_parent: PathBuf,
}

/// What every task of the agent uses.
pub(crate) struct Shared {
    pub client: Client,
    pub config: AgentConfig,
    pub state: Arc<AgentState>,
    pub recorder: Recorder,
    pub http: reqwest::Client,
}

/// A running agent; stopping it (or dropping it) kills every process it started.
pub struct NodeAgent {
    config: AgentConfig,
    state: Arc<AgentState>,
    shutdown: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

async fn client_for(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

impl NodeAgent {
    /// Starts the agent and waits until its Node is registered.
    pub fn start(config: AgentConfig) -> anyhow::Result<NodeAgent> {
        let hierarchy = cgroup::detect()?;
        let stale_groups = cgroup::remove_stale(&hierarchy);
        let stale_addresses = network::PodNetwork::remove_stale();
        let network = network::PodNetwork::choose(std::process::id())
            .map_err(|e| anyhow!("pod network: {e}"))?;
        for dir in ["pods", "volumes"] {
            std::fs::create_dir_all(config.state_dir.join(dir))?;
        }
        let log_path = config.state_dir.join("agent.log");
        let log = AgentLog {
            file: Mutex::new(std::fs::File::create(&log_path)?),
            path: log_path,
            start: Instant::now(),
        };
        let cgroup_parent = cgroup::agent_parent(std::process::id());
        log.line(format!(
            "node {}: pods get addresses in {} on lo; cgroups {:?} under {}",
            config.node_name,
            network.cidr(),
            hierarchy,
            cgroup_parent.display()
        ));
        if !stale_groups.is_empty() || !stale_addresses.is_empty() {
            log.line(format!(
                "removed what killed agents left: cgroups {stale_groups:?}, addresses {stale_addresses:?}"
            ));
        }
        let state = Arc::new(AgentState {
            records: Mutex::new(Records::default()),
            network: Mutex::new(network),
            log,
            hierarchy,
            cgroup_parent,
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread_state = state.clone();
        let thread_config = config.clone();
        let thread = std::thread::Builder::new()
            .name(format!("node-agent-{}", config.node_name))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("node-agent")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("tokio runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(run(thread_config, thread_state, shutdown_rx, ready_tx));
            })?;
        let agent = NodeAgent {
            config,
            state,
            shutdown,
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(())) => Ok(agent),
            Ok(Err(e)) => Err(anyhow!("the node agent did not start: {e}")),
            Err(e) => Err(anyhow!("the node agent did not start: {e}")),
        }
    }

    /// The Node's name.
    pub fn node_name(&self) -> &str {
        &self.config.node_name
    }

    /// The network pod addresses come from.
    pub fn pod_network(&self) -> String {
        self.state
            .network
            .lock()
            .map(|n| n.cidr())
            .unwrap_or_default()
    }

    /// Pod addresses currently on `lo`.
    pub fn addresses_in_use(&self) -> Vec<Ipv4Addr> {
        self.state
            .network
            .lock()
            .map(|n| n.in_use())
            .unwrap_or_default()
    }

    /// Every container run so far, oldest first.
    pub fn runs(&self) -> Vec<ContainerRun> {
        self.state
            .records
            .lock()
            .map(|r| r.runs.clone())
            .unwrap_or_default()
    }

    /// Every pod the agent accepted.
    pub fn pods(&self) -> Vec<PodRecord> {
        self.state
            .records
            .lock()
            .map(|r| r.pods.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the agent's own log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.state.log.path, lines)
    }

    /// The last `lines` lines of the latest run of pod `namespace/name`'s container.
    pub fn container_log_tail(&self, namespace: &str, name: &str, lines: usize) -> Option<String> {
        let runs = self.runs();
        let run = runs
            .iter()
            .rev()
            .find(|r| r.namespace == namespace && r.pod == name)?;
        Some(tail(&run.log, lines))
    }

    /// Stops the agent: kills every process it started, removes their cgroups and addresses
    /// and its Node.
    pub fn stop(mut self) {
        self.shutdown_now();
    }

    fn shutdown_now(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Ok(mut n) = self.state.network.lock() {
            n.release_all();
        }
        self.state.hierarchy.remove_tree(&self.state.cgroup_parent);
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        self.shutdown_now();
    }
}

/// The last `lines` lines of a file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The agent's thread: connect, register, then dispatch pod events until shutdown.
async fn run(
    config: AgentConfig,
    state: Arc<AgentState>,
    mut shutdown: watch::Receiver<bool>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let client = match client_for(&config.kubeconfig).await {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(format!("{e:#}")));
            return;
        }
    };
    let node = config.node_name.clone();
    if let Err(e) = registration::register(&client, &node).await {
        let _ = ready.send(Err(format!("registering node {node}: {e}")));
        return;
    }
    let http = match reqwest::Client::builder().no_proxy().build() {
        Ok(h) => h,
        Err(e) => {
            let _ = ready.send(Err(format!("HTTP client: {e}")));
            return;
        }
    };
    let shared = Arc::new(Shared {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "imageindex-test-node-agent".into(),
                instance: Some(node.clone()),
            },
        ),
        client,
        config,
        state,
        http,
    });
    shared.state.log.line(format!("node {node} registered"));
    let _ = ready.send(Ok(()));

    let background = [
        tokio::spawn(heartbeats(shared.clone())),
        tokio::spawn(provisioner(shared.clone())),
    ];
    let mut dispatcher = Dispatcher {
        shared: shared.clone(),
        tasks: HashMap::new(),
        finalizing: HashSet::new(),
        binding: HashSet::new(),
        shutdown: shutdown.clone(),
    };
    let pods: Api<Pod> = Api::all(shared.client.clone());
    let stream = watcher(pods, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            event = stream.next() => match event {
                Some(Ok(Event::Apply(pod) | Event::InitApply(pod))) => dispatcher.on_pod(pod),
                Some(Ok(Event::Delete(pod))) => dispatcher.on_delete(&pod),
                Some(Ok(_)) => {}
                Some(Err(e)) => shared.state.log.line(format!("pod watch: {e}")),
                None => break,
            },
        }
    }
    shared.state.log.line("stopping: killing every container");
    for task in background {
        task.abort();
    }
    let handles: Vec<_> = dispatcher.tasks.drain().map(|(_, t)| t.handle).collect();
    let _ = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(handles)).await;
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let _ = nodes.delete(&node, &DeleteParams::default()).await;
    shared.state.log.line("stopped");
}

async fn heartbeats(shared: Arc<Shared>) {
    let since = SystemTime::now();
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tick.tick().await;
        if let Err(e) =
            registration::heartbeat(&shared.client, &shared.config.node_name, since).await
        {
            shared.state.log.line(format!("heartbeat: {e}"));
        }
    }
}

async fn provisioner(shared: Arc<Shared>) {
    let dir = shared.config.state_dir.join("volumes");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        match volumes::provision(&shared.client, &dir).await {
            Ok(done) => done.iter().for_each(|d| shared.state.log.line(d)),
            Err(e) => shared.state.log.line(format!("provisioner: {e}")),
        }
    }
}

struct PodTask {
    events: mpsc::UnboundedSender<pod::PodEvent>,
    handle: tokio::task::JoinHandle<()>,
}

/// Routes pod events: binds pending pods, starts a supervisor per pod of this node, forwards
/// updates and deletions to it, and finalizes deleted pods nobody runs.
struct Dispatcher {
    shared: Arc<Shared>,
    tasks: HashMap<String, PodTask>,
    finalizing: HashSet<String>,
    binding: HashSet<String>,
    shutdown: watch::Receiver<bool>,
}

fn terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

impl Dispatcher {
    fn on_pod(&mut self, pod: Pod) {
        let uid = pod.uid().unwrap_or_default();
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let deleting = pod.metadata.deletion_timestamp.is_some();
        if node.is_empty() {
            let scheduler = pod
                .spec
                .as_ref()
                .and_then(|s| s.scheduler_name.as_deref())
                .unwrap_or("default-scheduler");
            if !deleting
                && !terminal(&pod)
                && scheduler == "default-scheduler"
                && self.binding.insert(uid)
            {
                tokio::spawn(bind(self.shared.clone(), pod));
            }
            return;
        }
        if node != self.shared.config.node_name {
            return;
        }
        if let Some(task) = self.tasks.get(&uid) {
            if task
                .events
                .send(pod::PodEvent::Updated(Box::new(pod.clone())))
                .is_err()
                && deleting
            {
                self.finalize(pod);
            }
            return;
        }
        if terminal(&pod) || deleting {
            if deleting {
                self.finalize(pod);
            }
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = tokio::spawn(pod::supervise(
            self.shared.clone(),
            pod,
            rx,
            self.shutdown.clone(),
        ));
        self.tasks.insert(uid, PodTask { events: tx, handle });
    }

    fn on_delete(&mut self, pod: &Pod) {
        if let Some(task) = self.tasks.get(&pod.uid().unwrap_or_default()) {
            let _ = task.events.send(pod::PodEvent::Deleted);
        }
    }

    /// Removes a deleted pod that runs nothing (a grace-period-0 delete, as the kubelet does).
    fn finalize(&mut self, pod: Pod) {
        if self.finalizing.insert(pod.uid().unwrap_or_default()) {
            let shared = self.shared.clone();
            tokio::spawn(async move { pod::delete_now(&shared, &pod).await });
        }
    }
}

/// Binds a pending pod to this node (a Binding, as the scheduler makes).
async fn bind(shared: Arc<Shared>, pod: Pod) {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let node = &shared.config.node_name;
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    let binding = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name, "uid": pod.uid()},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    match api
        .create_subresource::<_, serde_json::Value>(
            "binding",
            &name,
            &PostParams::default(),
            &binding,
        )
        .await
    {
        Ok(_) => {
            shared
                .state
                .log
                .line(format!("bound {ns}/{name} to {node}"));
            pod::event(
                &shared,
                &pod,
                false,
                "Scheduled",
                "Binding",
                format!("Successfully assigned {ns}/{name} to {node}"),
            )
            .await;
        }
        Err(e) => shared.state.log.line(format!("binding {ns}/{name}: {e}")),
    }
}

/// A grace-period-0 delete of the pod `uid` names (and of no later pod of the same name).
pub(crate) fn delete_params_now(uid: Option<String>) -> DeleteParams {
    DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid,
            resource_version: None,
        }),
        ..DeleteParams::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_map_to_binaries_whatever_the_registry_and_tag() {
        assert_eq!(
            image_repository("imageindex/indexer:0.1.0"),
            "imageindex/indexer"
        );
        assert_eq!(
            image_repository("registry.example.com:5000/imageindex/operator@sha256:abc"),
            "registry.example.com:5000/imageindex/operator"
        );
        assert_eq!(image_repository("localhost:5000/x"), "localhost:5000/x");
        let config = AgentConfig {
            node_name: "n".into(),
            kubeconfig: PathBuf::new(),
            state_dir: PathBuf::new(),
            images: vec![ImageBinary {
                repository: "imageindex/indexer".into(),
                binary: PathBuf::from("/bin/indexer"),
            }],
            apiserver_host: "127.0.0.1".into(),
            apiserver_port: 6443,
            ca_cert: PathBuf::new(),
            restart_backoff: Duration::from_secs(1),
            max_restart_backoff: Duration::from_secs(10),
        };
        assert_eq!(
            config.binary_for("registry.example.com/imageindex/indexer:0.1.0"),
            Some(Path::new("/bin/indexer"))
        );
        assert_eq!(
            config.binary_for("imageindex/indexer"),
            Some(Path::new("/bin/indexer"))
        );
        assert_eq!(
            config.binary_for("example.com/notimageindex/indexer:1"),
            None
        );
        assert_eq!(config.binary_for("imageindex/operator:1"), None);
    }
}
