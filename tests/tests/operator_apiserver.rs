//! The operator against a real kube-apiserver (v1.20.2 with etcd and kube-controller-manager,
//! tests/controlplane), one scenario per test over one control plane that the whole test binary
//! shares ([`shared`]: started once, the CRD applied, the operator's user bound to exactly the
//! ClusterRole of `operator::rbac::RULES`, so a missing permission fails a scenario).
//!
//! Each scenario has its own namespace and runs its own operator binary watching only that
//! namespace, so that an operator restart or a build's metrics never reach another scenario.
//! There is no kubelet and no scheduler: the test plays the kubelet by patching pod status
//! (Running with a podIP, Succeeded with a termination message carrying a real ScanReport,
//! Failed with OOMKilled) and serves a build's `/metrics` itself on 127.0.0.1.
//!
//! Needs tests/controlplane/build.sh's binaries and `cargo build --workspace --bins`.
//! IMAGEINDEX_SKIP_APISERVER=1 skips (a missing control plane is otherwise a failure).

use imageindex_crds::conditions::{self, DEGRADED, MEMORY_PRESSURE, READY};
use imageindex_crds::labels;
use imageindex_crds::types::{AttemptOutcome, IndexPhase};
use imageindex_crds::{DatasetShape, ImageIndex, ImageIndexStatus, Preset, ScanReport};
use imageindex_e2e::controlplane::{self, ControlPlane, Options};
use imageindex_e2e::{bin, free_port, repo};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use std::future::Future;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const OPERATOR_USER: &str = "imageindex-operator";
const LIMIT: u64 = 512 << 20;

/// The control plane every scenario of this binary uses, and the operator's kubeconfig.
struct Shared {
    cp: ControlPlane,
    operator_kubeconfig: PathBuf,
}

/// Starts the shared control plane on first use: the CRD applied and served, the operator's
/// user bound to the ClusterRole of `operator::rbac`.
fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let t0 = Instant::now();
        let token = format!("op-{:x}-{}", std::process::id(), t0.elapsed().as_nanos());
        let cp = ControlPlane::start_shared(&Options {
            prefix: "imageindex-apiserver-",
            users: vec![(OPERATOR_USER.into(), token.clone())],
            ..Options::default()
        });
        let crd = repo().join("crds/imageindex.yaml");
        cp.kubectl(&["apply", "-f", crd.to_str().unwrap()]);
        let served = Instant::now();
        while !cp.kubectl_output(&["get", "imgidx", "-A"]).status.success() {
            assert!(
                served.elapsed() < Duration::from_secs(30),
                "the CRD never became served"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let role = cp.dir().join("operator-role.yaml");
        let yaml = serde_yaml::to_string(&operator::rbac::cluster_role(OPERATOR_USER)).unwrap();
        std::fs::write(&role, yaml).unwrap();
        cp.kubectl(&["apply", "-f", role.to_str().unwrap()]);
        cp.kubectl(&[
            "create",
            "clusterrolebinding",
            OPERATOR_USER,
            &format!("--clusterrole={OPERATOR_USER}"),
            &format!("--user={OPERATOR_USER}"),
        ]);
        eprintln!("shared control plane up in {:.1?}", t0.elapsed());
        Shared {
            operator_kubeconfig: cp.kubeconfig_for(OPERATOR_USER, &token),
            cp,
        }
    })
}

/// The operator binary as the operator's user, watching one namespace; killed when dropped
/// (and when the test's thread ends).
struct Operator {
    child: Child,
    log: PathBuf,
    metrics_addr: String,
}

impl Operator {
    fn start(kubeconfig: &Path, namespace: &str, build_metrics_port: u16, log: PathBuf) -> Self {
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(bin("operator"));
        cmd.args([
            "run",
            "--namespace",
            namespace,
            "--metrics-addr",
            &metrics_addr,
            "--scrape-interval",
            "1s",
            "--build-metrics-port",
            &build_metrics_port.to_string(),
            "--indexer-image",
            "imageindex/indexer:test",
        ])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info,operator=debug")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file);
        // SAFETY: prctl is async-signal-safe; the operator dies with the thread that ran it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("cannot start the operator binary");
        Operator {
            child,
            log,
            metrics_addr,
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    async fn get(&self, path: &str) -> Option<reqwest::Response> {
        reqwest::get(format!("http://{}{path}", self.metrics_addr))
            .await
            .ok()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A build pod's `/metrics`, served by the test on 127.0.0.1 with a text it can change.
struct FakeBuildMetrics {
    text: Arc<Mutex<String>>,
    port: u16,
    stop: Arc<AtomicBool>,
}

impl FakeBuildMetrics {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let text = Arc::new(Mutex::new(String::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (body, stopped) = (text.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut request = [0u8; 2048];
                let _ = conn.read(&mut request);
                let body = body.lock().unwrap().clone();
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        FakeBuildMetrics { text, port, stop }
    }

    fn set(&self, working_set: u64, processed: u64) {
        *self.text.lock().unwrap() = format!(
            "# TYPE imageindex_memory_working_set_bytes gauge\n\
             imageindex_memory_rss_bytes {working_set}\nimageindex_memory_peak_rss_bytes {working_set}\n\
             imageindex_memory_working_set_bytes {working_set}\nimageindex_memory_available_bytes {avail}\n\
             imageindex_memory_limit_bytes {LIMIT}\nimageindex_images_total 2000\n\
             imageindex_images_processed_total {processed}\nimageindex_images_failed_total 0\n\
             imageindex_descriptors_total {desc}\nimageindex_build_phase{{phase=\"extract\"}} 1\n\
             imageindex_build_phase{{phase=\"index\"}} 0\n",
            avail = LIMIT.saturating_sub(working_set),
            desc = processed * 900
        );
    }
}

impl Drop for FakeBuildMetrics {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The fixture dataset's scan: 2000 photos of up to 3000x2000.
fn scan_report() -> ScanReport {
    let shape = DatasetShape {
        images: 2000,
        bytes: 1_000_000_000,
        max_width: 3000,
        max_height: 2000,
        max_is_jpeg: true,
    };
    ScanReport::new(shape, 1, 2000, "0123456789abcdef".into(), Some(LIMIT), 1)
}

fn container_status(
    name: &str,
    state: serde_json::Value,
    last_state: serde_json::Value,
) -> serde_json::Value {
    json!({"name": name, "image": "imageindex/indexer:test", "imageID": "", "ready": false,
           "restartCount": 0, "state": state, "lastState": last_state})
}

fn terminated(code: i32, reason: &str, message: &str) -> serde_json::Value {
    json!({"terminated": {"exitCode": code, "reason": reason, "message": message,
           "startedAt": "2024-01-01T00:00:00Z", "finishedAt": "2024-01-01T00:01:00Z"}})
}

/// Plays the kubelet for the pods of one namespace.
struct Kubelet {
    pods: Api<Pod>,
}

impl Kubelet {
    async fn patch(&self, name: &str, status: serde_json::Value) {
        self.pods
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .unwrap_or_else(|e| panic!("patching the status of pod {name}: {e}"));
    }

    async fn run(&self, name: &str) {
        self.patch(name, json!({"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "containerStatuses": [container_status("build", json!({"running": {"startedAt": "2024-01-01T00:00:00Z"}}), json!({}))]}))
            .await;
    }

    async fn finish_scan(&self, name: &str, report: &ScanReport) {
        let message = serde_json::to_string(report).unwrap();
        self.patch(name, json!({"phase": "Succeeded",
            "containerStatuses": [container_status("scan", terminated(0, "Completed", &message), json!({}))]}))
            .await;
    }

    async fn exit(
        &self,
        name: &str,
        phase: &str,
        state: serde_json::Value,
        last_state: serde_json::Value,
    ) {
        self.patch(name, json!({"phase": phase, "containerStatuses": [container_status("build", state, last_state)]}))
            .await;
    }

    async fn get(&self, name: &str) -> Option<Pod> {
        self.pods.get_opt(name).await.unwrap()
    }

    /// Marks every query pod Running and Ready, as a kubelet whose readiness probe passes.
    async fn ready_query_pods(&self, instance: &str) -> usize {
        self.ready_pods(instance, "query").await
    }

    /// Marks every pod of `component` (query, or shard for a sharded index's shard query
    /// pods) Running and Ready.
    async fn ready_pods(&self, instance: &str, component: &str) -> usize {
        let selector = format!(
            "{},{}={component}",
            labels::instance_selector(instance),
            labels::COMPONENT
        );
        let list = self
            .pods
            .list(&ListParams::default().labels(&selector))
            .await
            .unwrap();
        for p in &list.items {
            self.patch(&p.name_any(), json!({"phase": "Running", "podIP": "127.0.0.2", "podIPs": [{"ip": "127.0.0.2"}],
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2024-01-01T00:00:00Z"},
                               {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2024-01-01T00:00:00Z"}],
                "containerStatuses": [{"name": "query", "image": "imageindex/indexer:test", "imageID": "", "ready": true,
                    "restartCount": 0, "started": true, "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}}}]}))
                .await;
        }
        list.items.len()
    }

    /// The build pods of `instance`.
    async fn build_pods(&self, instance: &str) -> Vec<Pod> {
        let selector = format!(
            "{},{}=build",
            labels::instance_selector(instance),
            labels::COMPONENT
        );
        self.pods
            .list(&ListParams::default().labels(&selector))
            .await
            .unwrap()
            .items
    }
}

fn imageindex(name: &str, extra: serde_json::Value) -> ImageIndex {
    let mut spec =
        json!({"dataset": {"claimName": "photos", "path": "/catalogue"}, "memoryLimit": "512Mi"});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(
        json!({"apiVersion": "imagematch.dev/v1alpha1", "kind": "ImageIndex",
        "metadata": {"name": name}, "spec": spec}),
    )
    .unwrap()
}

fn preset_of(pod: &Pod) -> Preset {
    Preset::from_label(&pod.labels()[labels::PRESET]).unwrap()
}

fn status_of(ii: &ImageIndex) -> ImageIndexStatus {
    ii.status.clone().unwrap_or_default()
}

fn cond(ii: &ImageIndex, type_: &str) -> Option<(String, String)> {
    conditions::get(&status_of(ii).conditions, type_).map(|c| (c.status.clone(), c.reason.clone()))
}

fn has(events: &[(String, String)], type_: &str, reason: &str) -> bool {
    events.iter().any(|(t, r)| t == type_ && r == reason)
}

async fn namespace(admin: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(admin.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    api.create(&PostParams::default(), &ns).await.unwrap();
}

/// One scenario: its namespace, the test's kubelet and build metrics there, its operator.
struct Scenario {
    ns: &'static str,
    admin: Client,
    indexes: Api<ImageIndex>,
    kubelet: Kubelet,
    build_metrics: FakeBuildMetrics,
    op: Operator,
}

impl Scenario {
    /// The namespace `ns` with an operator watching it, ready; the build's metrics report half
    /// the limit and 500 images processed. `None` when the control-plane tests are skipped.
    async fn start(ns: &'static str) -> Option<Scenario> {
        if controlplane::skipped(ns) {
            return None;
        }
        let shared = shared();
        let admin = shared.cp.client(&shared.cp.admin_kubeconfig()).await;
        namespace(&admin, ns).await;
        let build_metrics = FakeBuildMetrics::start();
        build_metrics.set(LIMIT / 2, 500);
        let log = shared.cp.dir().join(format!("operator-{ns}.log"));
        let op = Operator::start(&shared.operator_kubeconfig, ns, build_metrics.port, log);
        let s = Scenario {
            ns,
            indexes: Api::namespaced(admin.clone(), ns),
            kubelet: Kubelet {
                pods: Api::namespaced(admin.clone(), ns),
            },
            admin,
            build_metrics,
            op,
        };
        s.wait_until_ready().await;
        Some(s)
    }

    async fn wait_until_ready(&self) {
        self.wait_for(
            "the operator's /readyz",
            Duration::from_secs(30),
            || async {
                let r = self.op.get("/readyz").await?;
                r.status().is_success().then_some(())
            },
        )
        .await;
    }

    /// Restarts the operator (same log), and waits until it is ready.
    async fn restart_operator(&mut self) {
        self.op.stop();
        let shared = shared();
        let log = self.op.log.clone();
        self.op = Operator::start(
            &shared.operator_kubeconfig,
            self.ns,
            self.build_metrics.port,
            log,
        );
        self.wait_until_ready().await;
    }

    /// Polls `f` every 50 ms until it yields a value, or fails after `timeout` with the
    /// operator's log.
    async fn wait_for<T, F, Fut>(&self, what: &str, timeout: Duration, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f().await {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: timed out after {timeout:?} waiting for {what}\n--- operator log ---\n{}",
                    self.ns,
                    self.op.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for pod `name`.
    async fn pod(&self, name: &str) -> Pod {
        self.wait_for(&format!("pod {name}"), Duration::from_secs(30), || {
            self.kubelet.get(name)
        })
        .await
    }

    /// The ImageIndex `cats` once `f` holds for it.
    async fn index_when(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&ImageIndex) -> bool,
    ) -> ImageIndex {
        self.wait_for(what, timeout, || async {
            let ii = self.indexes.get("cats").await.ok()?;
            f(&ii).then_some(ii)
        })
        .await
    }

    async fn create(&self, extra: serde_json::Value) {
        self.indexes
            .create(&PostParams::default(), &imageindex("cats", extra))
            .await
            .unwrap();
    }

    /// An ImageIndex `cats` whose scan pod the test's kubelet has finished: the next thing
    /// the operator does is the first build pod.
    async fn scanned(&self, extra: serde_json::Value) {
        self.create(extra).await;
        self.pod("cats-scan-1").await;
        self.kubelet
            .finish_scan("cats-scan-1", &scan_report())
            .await;
    }

    /// Build 1 succeeds and the query pods become ready: waits for phase Ready.
    async fn succeed_and_serve(&self) -> ImageIndex {
        self.kubelet
            .exit(
                "cats-build-1",
                "Succeeded",
                terminated(0, "Completed", ""),
                json!({}),
            )
            .await;
        self.wait_for(
            "query pods from the ReplicaSet",
            Duration::from_secs(30),
            || async { (self.kubelet.ready_query_pods("cats").await > 0).then_some(()) },
        )
        .await;
        self.index_when("phase Ready", Duration::from_secs(60), |ii| {
            status_of(ii).unit.phase == Some(IndexPhase::Ready)
        })
        .await
    }

    /// Checks attempt 2's pod (`build2`) has a poorer preset than `first`; returns that preset
    /// and the ImageIndex once its status records attempt 2.
    async fn poorer_second_attempt(&self, first: Preset, build2: &Pod) -> (Preset, ImageIndex) {
        let second = preset_of(build2);
        assert_eq!(build2.labels()[labels::ATTEMPT], "2");
        assert!(second.nfeatures < first.nfeatures, "{first} → {second}");
        let ii = self
            .index_when("attempt 2 recorded", Duration::from_secs(30), |ii| {
                status_of(ii).unit.attempts.len() == 2
            })
            .await;
        (second, ii)
    }

    /// The Events of ImageIndex `name`, oldest first: (type, reason), once all of `expected`
    /// are among them or after 10 s. A reconcile publishes its Events after it wrote the
    /// status, so the status a test waited for can be there before them.
    async fn event_reasons(&self, name: &str, expected: &[(&str, &str)]) -> Vec<(String, String)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let events = self.events_now(name).await;
            if expected.iter().all(|(t, r)| has(&events, t, r)) || Instant::now() > deadline {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The Events of ImageIndex `name` now, oldest first: (type, reason).
    async fn events_now(&self, name: &str) -> Vec<(String, String)> {
        let api: Api<Event> = Api::namespaced(self.admin.clone(), self.ns);
        let mut events: Vec<Event> = api
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect();
        events.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
        events
            .into_iter()
            .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default()))
            .collect()
    }

    fn kubectl(&self, args: &[&str]) -> String {
        shared().cp.kubectl(args)
    }

    /// Ends the scenario: the operator never met an RBAC denial.
    fn finish(mut self) {
        self.op.stop();
        let log = std::fs::read_to_string(&self.op.log).unwrap_or_default();
        assert!(
            !log.contains("forbidden"),
            "{}: the operator hit an RBAC denial:\n{}",
            self.ns,
            self.op.log_tail()
        );
    }
}

#[test]
fn the_crd_applies_and_kubectl_shows_its_columns() {
    if controlplane::skipped("the_crd_applies_and_kubectl_shows_its_columns") {
        return;
    }
    let cp = &shared().cp;
    let header = cp.kubectl(&["get", "imgidx", "--all-namespaces"]);
    assert!(
        header.is_empty() || header.starts_with("NAMESPACE"),
        "{header}"
    );
    for example in [
        "instance-good.yaml",
        "instance-sharded.yaml",
        "instance-invalid.yaml",
        "instance-too-small.yaml",
    ] {
        let path = repo().join("crds/yaml").join(example);
        cp.kubectl(&[
            "apply",
            "--dry-run=server",
            "-n",
            "default",
            "-f",
            path.to_str().unwrap(),
        ]);
    }
    // No operator watches this namespace: the columns are there, still empty.
    cp.kubectl(&["create", "namespace", "columns"]);
    let manifest = cp.dir().join("columns.yaml");
    std::fs::write(
        &manifest,
        serde_yaml::to_string(&imageindex("cats", json!({}))).unwrap(),
    )
    .unwrap();
    cp.kubectl(&["apply", "-n", "columns", "-f", manifest.to_str().unwrap()]);
    let columns = cp.kubectl(&["get", "imgidx", "-n", "columns"]);
    let header: Vec<&str> = columns
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "PHASE", "PRESET", "PROGRESS", "MEMORY", "SHARDS", "AGE"],
        "{columns}"
    );
    assert!(columns.contains("cats"), "{columns}");
    let short = cp.kubectl(&["get", "imagematch", "-n", "columns", "-o", "name"]);
    assert!(short.contains("imageindex.imagematch.dev/cats"), "{short}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_then_build_then_ready() {
    let t = Instant::now();
    let Some(s) = Scenario::start("happy").await else {
        return;
    };
    let ns = s.ns;
    let created = Instant::now();
    s.create(json!({})).await;
    s.pod("cats-scan-1").await;
    let to_scan_pod = created.elapsed();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(s.admin.clone(), ns);
    let claim = claims.get("cats-index").await.expect("index claim made");
    assert_eq!(claim.owner_references()[0].kind, "ImageIndex");
    let scan_done = Instant::now();
    s.kubelet.finish_scan("cats-scan-1", &scan_report()).await;
    let build = s.pod("cats-build-1").await;
    let (scan_to_build, create_to_build) = (scan_done.elapsed(), created.elapsed());
    let first_preset = build.labels()[labels::PRESET].clone();
    assert_eq!(build.labels()[labels::ATTEMPT], "1");
    assert_eq!(build.labels()[labels::COMPONENT], "build");
    let limits = build.spec.as_ref().unwrap().containers[0]
        .resources
        .as_ref()
        .unwrap()
        .limits
        .clone()
        .unwrap();
    assert_eq!(limits["memory"].0, "512Mi");
    assert_eq!(build.owner_references()[0].controller, Some(true));

    // Running: the operator scrapes /metrics into status.memory and status.progress.
    s.kubelet.run("cats-build-1").await;
    let ii = s
        .index_when(
            "status.memory from the scrape",
            Duration::from_secs(30),
            |ii| {
                status_of(ii)
                    .unit
                    .progress
                    .is_some_and(|p| p.processed == 500)
            },
        )
        .await;
    let st = status_of(&ii);
    assert_eq!(st.unit.phase, Some(IndexPhase::Building));
    assert_eq!(st.unit.memory.as_ref().unwrap().summary, "256Mi/512Mi");
    assert_eq!(st.unit.progress.as_ref().unwrap().summary, "500/2000 (25%)");
    assert_eq!(cond(&ii, MEMORY_PRESSURE).unwrap().0, "False");
    let columns = s.kubectl(&["get", "imgidx", "-n", ns]);
    assert!(
        columns.starts_with("NAME")
            && columns.contains("PHASE")
            && columns.contains("PRESET")
            && columns.contains("PROGRESS")
            && columns.contains("MEMORY")
            && columns.contains("AGE"),
        "{columns}"
    );
    assert!(
        columns.contains("Building")
            && columns.contains("500/2000 (25%)")
            && columns.contains("256Mi/512Mi"),
        "{columns}"
    );

    // Succeeded: query Deployment + Service, Ready once a query pod is ready.
    let ii = s.succeed_and_serve().await;
    let deployments: Api<Deployment> = Api::namespaced(s.admin.clone(), ns);
    assert!(deployments.get_opt("cats-query").await.unwrap().is_some());
    let services: Api<Service> = Api::namespaced(s.admin.clone(), ns);
    let svc = services.get("cats-query").await.unwrap();
    assert_eq!(
        svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0]
            .name
            .as_deref(),
        Some("http")
    );
    let st = status_of(&ii);
    assert_eq!(
        st.endpoint.as_deref(),
        Some("http://cats-query.happy.svc:8080")
    );
    assert_eq!(st.unit.index_generation, Some(1));
    assert_eq!(st.unit.attempts.len(), 1);
    assert_eq!(st.unit.attempts[0].outcome, Some(AttemptOutcome::Succeeded));
    assert_eq!(st.unit.attempts[0].peak_working_set, Some(LIMIT / 2));
    assert_eq!(st.observed_generation, Some(1));
    assert_eq!(cond(&ii, READY).unwrap().0, "True");
    let reasons = [
        "ScanStarted",
        "ScanComplete",
        "PresetChosen",
        "BuildStarted",
        "BuildSucceeded",
        "Ready",
    ];
    let expected: Vec<(&str, &str)> = reasons.iter().map(|r| ("Normal", *r)).collect();
    let events = s.event_reasons("cats", &expected).await;
    for reason in reasons {
        assert!(
            has(&events, "Normal", reason),
            "no {reason} event in {events:?}"
        );
    }
    let row = s.kubectl(&["get", "imgidx", "-n", ns]);
    assert!(
        row.contains("Ready") && row.contains(&first_preset),
        "{row}"
    );

    // The operator's own metrics count the attempt.
    let text = s.op.get("/metrics").await.unwrap().text().await.unwrap();
    assert!(
        text.contains("imageindex_operator_reconciles_total"),
        "{text}"
    );
    assert!(
        text.contains("imageindex_operator_attempts_total{outcome=\"Succeeded\"} 1"),
        "{text}"
    );
    eprintln!(
        "happy path: {:.1?}; ImageIndex created → scan pod {to_scan_pod:.2?}; scan Succeeded → build pod {scan_to_build:.2?}; \
         created → build pod {create_to_build:.2?} (includes the test's kubelet play)",
        t.elapsed()
    );
    s.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_killed_build_restarts_with_a_smaller_preset() {
    let t = Instant::now();
    let Some(s) = Scenario::start("oom").await else {
        return;
    };
    s.scanned(json!({})).await;
    let build = s.pod("cats-build-1").await;
    let preset1 = preset_of(&build);
    // The container was OOM-killed and restarted once before failing: OOMKilled is in lastState.
    s.kubelet
        .exit(
            "cats-build-1",
            "Failed",
            terminated(1, "Error", ""),
            terminated(137, "OOMKilled", ""),
        )
        .await;
    let build2 = s.pod("cats-build-2").await;
    let (preset2, ii) = s.poorer_second_attempt(preset1, &build2).await;
    let st = status_of(&ii);
    assert_eq!(st.unit.attempts[0].outcome, Some(AttemptOutcome::OomKilled));
    assert_eq!(st.unit.attempts[0].exit_code, Some(137));
    assert_eq!(st.unit.attempts[1].preset, preset2.label());
    assert_eq!(st.unit.preset.as_deref(), Some(preset2.label().as_str()));
    assert_eq!(
        cond(&ii, DEGRADED).unwrap(),
        ("True".into(), "DowngradeAfterOOMKill".into())
    );
    let events = s
        .event_reasons(
            "cats",
            &[
                ("Warning", "OOMKilled"),
                ("Normal", "DowngradeAfterOOMKill"),
            ],
        )
        .await;
    assert!(has(&events, "Warning", "OOMKilled"), "{events:?}");
    assert!(
        has(&events, "Normal", "DowngradeAfterOOMKill"),
        "{events:?}"
    );
    eprintln!("OOMKilled: {preset1} → {preset2} in {:.1?}", t.elapsed());
    s.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_pressure_restarts_the_build_before_the_kernel_does() {
    let t = Instant::now();
    let Some(s) = Scenario::start("pressure").await else {
        return;
    };
    s.build_metrics.set(LIMIT / 100 * 95, 800);
    s.scanned(json!({})).await;
    let build = s.pod("cats-build-1").await;
    let preset1 = preset_of(&build);
    s.kubelet.run("cats-build-1").await;
    let ii = s
        .index_when("MemoryPressure warning", Duration::from_secs(30), |ii| {
            cond(ii, MEMORY_PRESSURE).is_some_and(|c| c.0 == "True")
        })
        .await;
    assert_eq!(
        status_of(&ii).unit.memory.as_ref().unwrap().summary,
        "487Mi/512Mi"
    );
    let pressure_seen = Instant::now();
    // Sustained above 90% for 10 s → the operator deletes the pod and starts a poorer one.
    let build2 = s
        .wait_for(
            "build pod 2 after the pressure restart",
            Duration::from_secs(60),
            || s.kubelet.get("cats-build-2"),
        )
        .await;
    let to_restart = pressure_seen.elapsed();
    assert!(
        s.kubelet.get("cats-build-1").await.is_none(),
        "the pressured pod was deleted"
    );
    let (preset2, ii) = s.poorer_second_attempt(preset1, &build2).await;
    let st = status_of(&ii);
    assert_eq!(
        st.unit.attempts[0].outcome,
        Some(AttemptOutcome::MemoryPressureRestart)
    );
    assert_eq!(st.unit.attempts[0].peak_working_set, Some(LIMIT / 100 * 95));
    assert!(
        st.unit.attempts[0]
            .message
            .as_deref()
            .unwrap_or("")
            .contains("above 90%"),
        "{:?}",
        st.unit.attempts[0].message
    );
    let events = s
        .event_reasons("cats", &[("Warning", "MemoryPressureRestart")])
        .await;
    assert!(
        has(&events, "Warning", "MemoryPressureRestart"),
        "{events:?}"
    );
    eprintln!("pressure: {preset1} → {preset2}, restart {to_restart:.1?} after the first warning; scenario {:.1?}", t.elapsed());
    s.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_spec_is_reported_and_nothing_is_made() {
    let Some(s) = Scenario::start("invalid").await else {
        return;
    };
    let invalid = repo().join("crds/yaml/instance-invalid.yaml");
    s.kubectl(&["apply", "-n", s.ns, "-f", invalid.to_str().unwrap()]);
    let ii = s
        .wait_for("Degraded InvalidSpec", Duration::from_secs(30), || async {
            let ii = s.indexes.get("invalid").await.ok()?;
            (cond(&ii, DEGRADED)? == ("True".to_string(), "InvalidSpec".to_string())).then_some(ii)
        })
        .await;
    let message = conditions::get(&status_of(&ii).conditions, DEGRADED)
        .unwrap()
        .message
        .clone();
    assert!(
        message.contains("spec.memoryLimit") && message.contains("spec.dataset.claimName"),
        "{message}"
    );
    assert_eq!(status_of(&ii).unit.phase, Some(IndexPhase::Failed));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        s.kubelet
            .pods
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "no pods for an invalid spec"
    );
    assert!(has(
        &s.event_reasons("invalid", &[("Warning", "InvalidSpec")])
            .await,
        "Warning",
        "InvalidSpec"
    ));
    s.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_index_garbage_collects_what_it_owns() {
    let Some(s) = Scenario::start("delete").await else {
        return;
    };
    s.scanned(json!({})).await;
    s.pod("cats-build-1").await;
    s.succeed_and_serve().await;
    let t = Instant::now();
    s.indexes
        .delete("cats", &DeleteParams::default())
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(s.admin.clone(), s.ns);
    let deployments: Api<Deployment> = Api::namespaced(s.admin.clone(), s.ns);
    let services: Api<Service> = Api::namespaced(s.admin.clone(), s.ns);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(s.admin.clone(), s.ns);
    let lp = ListParams::default();
    assert!(
        !deployments.list(&lp).await.unwrap().items.is_empty(),
        "Ready made a query Deployment to collect"
    );
    s.wait_for(
        "owned objects garbage-collected",
        Duration::from_secs(90),
        || async {
            let left = pods.list(&lp).await.ok()?.items.len()
                + deployments.list(&lp).await.ok()?.items.len()
                + services.list(&lp).await.ok()?.items.len()
                + claims.list(&lp).await.ok()?.items.len();
            (left == 0).then_some(())
        },
    )
    .await;
    eprintln!("delete → owned objects gone in {:.1?}", t.elapsed());
    s.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_operator_adopts_the_running_build() {
    let t = Instant::now();
    let Some(mut s) = Scenario::start("restart").await else {
        return;
    };
    s.scanned(json!({})).await;
    s.pod("cats-build-1").await;
    s.kubelet.run("cats-build-1").await;
    s.restart_operator().await;
    // It picks the running build up (scrapes it again) ...
    s.index_when(
        "a scrape by the restarted operator",
        Duration::from_secs(30),
        |ii| {
            status_of(ii)
                .unit
                .progress
                .is_some_and(|p| p.processed == 500)
        },
    )
    .await;
    // ... without a second build pod, then finishes it.
    assert_eq!(
        s.kubelet.build_pods("cats").await.len(),
        1,
        "one build pod after the restart"
    );
    let ii = s.succeed_and_serve().await;
    assert_eq!(
        status_of(&ii).unit.attempts.len(),
        1,
        "the restart did not add an attempt"
    );
    assert!(s.kubelet.get("cats-build-2").await.is_none());
    let text = s.op.get("/metrics").await.unwrap().text().await.unwrap();
    assert!(
        text.contains("imageindex_operator_attempts_total{outcome=\"Succeeded\"} 1"),
        "{text}"
    );
    eprintln!("operator restart mid-build: {:.1?}", t.elapsed());
    s.finish();
}

/// A sharded ImageIndex (`shards: 3`): three build pods at once, each with its shard label and
/// `--shard i/3`; one OOM-killed shard restarts alone with a poorer preset; once all succeed,
/// one query Deployment and Service per shard and the router `cats-query` over the shard
/// Services' ClusterIPs, `status.shards` with three entries, Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_shards_build_at_once_restart_alone_and_serve_through_the_router() {
    let t = Instant::now();
    let Some(s) = Scenario::start("shards").await else {
        return;
    };
    let ns = s.ns;
    s.scanned(json!({"shards": 3})).await;
    let mut firsts = Vec::new();
    for shard in 0..3u32 {
        let pod = s.pod(&format!("cats-s{shard}-build-1")).await;
        assert_eq!(pod.labels()[labels::SHARD], shard.to_string());
        assert_eq!(pod.labels()[labels::COMPONENT], "build");
        assert_eq!(pod.labels()[labels::ATTEMPT], "1");
        let args = pod.spec.as_ref().unwrap().containers[0]
            .args
            .clone()
            .unwrap()
            .join(" ");
        assert!(args.ends_with(&format!("--shard {shard}/3")), "{args}");
        firsts.push(pod);
    }
    // All three exist at once, none has ended.
    let builds = s.kubelet.build_pods("cats").await;
    assert_eq!(builds.len(), 3, "three build pods at once");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(s.admin.clone(), ns);
    for shard in 0..3 {
        let claim = claims
            .get(&format!("cats-index-{shard}"))
            .await
            .expect("a claim per shard");
        assert_eq!(claim.owner_references()[0].kind, "ImageIndex");
    }
    assert!(claims.get_opt("cats-index").await.unwrap().is_none());

    // Shard 1 is OOM-killed: only it gets attempt 2, with a poorer preset.
    s.kubelet
        .exit(
            "cats-s1-build-1",
            "Failed",
            terminated(137, "OOMKilled", ""),
            json!({}),
        )
        .await;
    let second = s.pod("cats-s1-build-2").await;
    assert_eq!(second.labels()[labels::SHARD], "1");
    assert!(preset_of(&second).nfeatures < preset_of(&firsts[1]).nfeatures);
    let ii = s
        .index_when(
            "shard 1's attempt 2 recorded",
            Duration::from_secs(30),
            |ii| {
                status_of(ii)
                    .shards
                    .get(1)
                    .is_some_and(|sh| sh.unit.attempts.len() == 2)
            },
        )
        .await;
    let st = status_of(&ii);
    assert_eq!(st.shards.len(), 3);
    assert_eq!(
        st.shards[1].unit.attempts[0].outcome,
        Some(AttemptOutcome::OomKilled)
    );
    for other in [0, 2] {
        assert_eq!(st.shards[other].unit.attempts.len(), 1, "shard {other}");
        assert!(s
            .kubelet
            .get(&format!("cats-s{other}-build-2"))
            .await
            .is_none());
    }

    // Every shard succeeds: shard query objects, then the router; Ready once all serve.
    for name in ["cats-s0-build-1", "cats-s1-build-2", "cats-s2-build-1"] {
        s.kubelet
            .exit(name, "Succeeded", terminated(0, "Completed", ""), json!({}))
            .await;
    }
    s.wait_for(
        "ready shard query pods and router pods",
        Duration::from_secs(60),
        || async {
            let shards = s.kubelet.ready_pods("cats", "shard").await;
            let routers = s.kubelet.ready_pods("cats", "query").await;
            (shards >= 3 && routers >= 1).then_some(())
        },
    )
    .await;
    let ii = s
        .index_when("phase Ready", Duration::from_secs(60), |ii| {
            status_of(ii).unit.phase == Some(IndexPhase::Ready)
        })
        .await;
    let st = status_of(&ii);
    assert_eq!(st.shards.len(), 3);
    assert_eq!(st.shards_ready.as_deref(), Some("3/3"));
    assert_eq!(
        st.endpoint.as_deref(),
        Some("http://cats-query.shards.svc:8080")
    );
    assert_eq!(cond(&ii, READY).unwrap().0, "True");
    let deployments: Api<Deployment> = Api::namespaced(s.admin.clone(), ns);
    let services: Api<Service> = Api::namespaced(s.admin.clone(), ns);
    let mut urls = Vec::new();
    for shard in 0..3 {
        let name = format!("cats-shard-{shard}");
        let d = deployments.get(&name).await.unwrap();
        assert_eq!(d.labels()[labels::COMPONENT], "shard");
        assert_eq!(d.labels()[labels::SHARD], shard.to_string());
        let svc = services.get(&name).await.unwrap();
        let ip = svc.spec.unwrap().cluster_ip.unwrap();
        urls.push(format!("--shard http://{ip}:8080"));
    }
    let router = deployments.get("cats-query").await.unwrap();
    assert_eq!(router.labels()[labels::COMPONENT], "query");
    let args = router.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap()
        .join(" ");
    assert_eq!(
        args,
        format!(
            "route --listen 0.0.0.0:8080 {} --deadline 2s",
            urls.join(" ")
        )
    );
    let events = s
        .event_reasons("cats", &[("Warning", "OOMKilled"), ("Normal", "Ready")])
        .await;
    assert!(has(&events, "Warning", "OOMKilled"), "{events:?}");
    let row = s.kubectl(&["get", "imgidx", "-n", ns]);
    assert!(row.contains("3/3"), "{row}");
    let ready_in = t.elapsed();

    // Delete: every shard's pods, claims, Deployments and Services go with the router.
    s.indexes
        .delete("cats", &DeleteParams::default())
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(s.admin.clone(), ns);
    let lp = ListParams::default();
    s.wait_for(
        "owned objects garbage-collected",
        Duration::from_secs(90),
        || async {
            let left = pods.list(&lp).await.ok()?.items.len()
                + deployments.list(&lp).await.ok()?.items.len()
                + services.list(&lp).await.ok()?.items.len()
                + claims.list(&lp).await.ok()?.items.len();
            (left == 0).then_some(())
        },
    )
    .await;
    eprintln!(
        "three shards: built, one restarted alone, Ready in {ready_in:.1?}; all gone after delete at {:.1?}",
        t.elapsed()
    );
    s.finish();
}
