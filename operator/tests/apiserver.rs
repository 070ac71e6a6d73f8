//! The operator against a real kube-apiserver (v1.20.2 with etcd and kube-controller-manager,
//! started by tests/controlplane/up.sh). There is no kubelet and no scheduler: the test plays
//! the kubelet by patching pod status (Running with a podIP, Succeeded with a termination
//! message carrying a real ScanReport, Failed with OOMKilled), and serves a build's `/metrics`
//! itself on 127.0.0.1. The operator runs as its real binary, authenticated as a user bound to
//! exactly the ClusterRole of `operator::rbac::RULES`, so a missing permission fails the test.
//!
//! Needs the binaries of tests/controlplane/build.sh. Set IMAGEINDEX_SKIP_APISERVER=1 to skip
//! (a missing control plane is otherwise a failure).

use imageindex_crds::conditions::{self, DEGRADED, MEMORY_PRESSURE, READY};
use imageindex_crds::labels;
use imageindex_crds::types::{AttemptOutcome, IndexPhase};
use imageindex_crds::{DatasetShape, ImageIndex, Preset, ScanReport};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};
use serde_json::json;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const OPERATOR_USER: &str = "imageindex-operator";
const LIMIT: u64 = 512 << 20;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A control plane from tests/controlplane/up.sh, stopped with down.sh when dropped.
struct ControlPlane {
    dir: tempfile::TempDir,
    operator_token: String,
}

impl ControlPlane {
    fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("imageindex-apiserver-")
            .tempdir()
            .unwrap();
        let operator_token = format!(
            "op-{:x}",
            std::process::id() as u64 * 7919 + Instant::now().elapsed().as_nanos() as u64
        );
        let tokens = dir.path().join("extra-tokens.csv");
        std::fs::write(
            &tokens,
            format!("{operator_token},{OPERATOR_USER},{OPERATOR_USER},\"imageindex\"\n"),
        )
        .unwrap();
        let state = dir.path().join("state");
        let out = std::process::Command::new("bash")
            .arg(repo_root().join("tests/controlplane/up.sh"))
            .arg(&state)
            .env("EXTRA_TOKENS_FILE", &tokens)
            .stdin(Stdio::null())
            .output()
            .expect("cannot run tests/controlplane/up.sh");
        assert!(
            out.status.success(),
            "tests/controlplane/up.sh failed (build the control plane with tests/controlplane/build.sh, \
             or set IMAGEINDEX_SKIP_APISERVER=1 to skip):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ControlPlane {
            dir,
            operator_token,
        }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn admin_kubeconfig(&self) -> PathBuf {
        self.state().join("admin.kubeconfig")
    }

    /// A kubeconfig for the operator's user (same server, its own token).
    fn operator_kubeconfig(&self) -> PathBuf {
        let admin = std::fs::read_to_string(self.admin_kubeconfig()).unwrap();
        let env = std::fs::read_to_string(self.state().join("env")).unwrap();
        let admin_token = env
            .lines()
            .find_map(|l| l.strip_prefix("ADMIN_TOKEN="))
            .expect("ADMIN_TOKEN in env")
            .trim_matches(['\'', '"']);
        let text = admin
            .replace(admin_token, &self.operator_token)
            .replace("name: admin", &format!("name: {OPERATOR_USER}"))
            .replace("user: admin", &format!("user: {OPERATOR_USER}"));
        let path = self.dir.path().join("operator.kubeconfig");
        std::fs::write(&path, text).unwrap();
        path
    }

    async fn client(&self, kubeconfig: &Path) -> Client {
        let kc = Kubeconfig::read_from(kubeconfig).unwrap();
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap();
        Client::try_from(config).unwrap()
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", self.admin_kubeconfig())
            .output()
            .expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(repo_root().join("tests/controlplane/down.sh"))
            .arg(self.state())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The operator binary, run as the operator's user.
struct Operator {
    child: tokio::process::Child,
    log: PathBuf,
    metrics_addr: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Operator {
    fn start(kubeconfig: &Path, build_metrics_port: u16, log: PathBuf) -> Self {
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_operator"))
            .args([
                "run",
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
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("cannot start the operator binary");
        Operator {
            child,
            log,
            metrics_addr,
        }
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.metrics_addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// A build pod's `/metrics`, served by the test on 127.0.0.1 with a text it can change.
#[derive(Clone)]
struct FakeBuildMetrics {
    text: Arc<Mutex<String>>,
    port: u16,
}

impl FakeBuildMetrics {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let text = Arc::new(Mutex::new(String::new()));
        let shared = text.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let body = shared.lock().unwrap().clone();
                std::future::ready(body)
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeBuildMetrics { text, port }
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

/// Polls `f` every 50 ms until it yields a value, or fails after `timeout` with the
/// operator's log.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, op: &Operator, mut f: F) -> T
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
                "timed out after {timeout:?} waiting for {what}\n--- operator log ---\n{}",
                op.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
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
        let selector = format!(
            "{},{}=query",
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
}

/// A namespace with an ImageIndex `cats` (spec extras `extra`) whose scan pod the test's
/// kubelet has finished: the next thing the operator does is the first build pod.
async fn scanned(
    admin: &Client,
    op: &Operator,
    ns: &str,
    extra: serde_json::Value,
) -> (Api<ImageIndex>, Kubelet) {
    namespace(admin, ns).await;
    let indexes: Api<ImageIndex> = Api::namespaced(admin.clone(), ns);
    let kubelet = Kubelet {
        pods: Api::namespaced(admin.clone(), ns),
    };
    indexes
        .create(&PostParams::default(), &imageindex("cats", extra))
        .await
        .unwrap();
    wait_for("scan pod", Duration::from_secs(30), op, || {
        kubelet.get("cats-scan-1")
    })
    .await;
    kubelet.finish_scan("cats-scan-1", &scan_report()).await;
    (indexes, kubelet)
}

async fn namespace(admin: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(admin.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    api.create(&PostParams::default(), &ns).await.unwrap();
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

fn status_of(ii: &ImageIndex) -> imageindex_crds::ImageIndexStatus {
    ii.status.clone().unwrap_or_default()
}

fn cond(ii: &ImageIndex, type_: &str) -> Option<(String, String)> {
    conditions::get(&status_of(ii).conditions, type_).map(|c| (c.status.clone(), c.reason.clone()))
}

async fn event_reasons(admin: &Client, ns: &str, name: &str) -> Vec<(String, String)> {
    let api: Api<Event> = Api::namespaced(admin.clone(), ns);
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

fn has(events: &[(String, String)], type_: &str, reason: &str) -> bool {
    events.iter().any(|(t, r)| t == type_ && r == reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_against_a_real_api_server() {
    if std::env::var("IMAGEINDEX_SKIP_APISERVER").as_deref() == Ok("1") {
        eprintln!(
            "SKIPPED: IMAGEINDEX_SKIP_APISERVER=1 — the real kube-apiserver scenarios did not run"
        );
        return;
    }
    let started = Instant::now();
    let cp = ControlPlane::start();
    let up = started.elapsed();
    let admin = cp.client(&cp.admin_kubeconfig()).await;

    // The CRD applies and `kubectl get imgidx` shows its printer columns.
    cp.kubectl(&[
        "apply",
        "-f",
        repo_root().join("crds/imageindex.yaml").to_str().unwrap(),
    ]);
    let crd_ready = Instant::now();
    let indexes_all: Api<ImageIndex> = Api::all(admin.clone());
    while indexes_all.list(&ListParams::default()).await.is_err() {
        assert!(
            crd_ready.elapsed() < Duration::from_secs(30),
            "the CRD never became served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let header = cp.kubectl(&["get", "imgidx", "--all-namespaces"]);
    assert!(
        header.is_empty() || header.starts_with("NAMESPACE"),
        "{header}"
    );
    for example in [
        "instance-good.yaml",
        "instance-invalid.yaml",
        "instance-too-small.yaml",
    ] {
        let path = repo_root().join("crds/yaml").join(example);
        cp.kubectl(&[
            "apply",
            "--dry-run=server",
            "-n",
            "default",
            "-f",
            path.to_str().unwrap(),
        ]);
    }

    // The operator's user gets exactly the ClusterRole of rbac::RULES.
    let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(admin.clone());
    roles
        .create(
            &PostParams::default(),
            &operator::rbac::cluster_role(OPERATOR_USER),
        )
        .await
        .unwrap();
    let bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
    let binding = ClusterRoleBinding {
        metadata: kube::api::ObjectMeta {
            name: Some(OPERATOR_USER.into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: OPERATOR_USER.into(),
        },
        subjects: Some(vec![Subject {
            kind: "User".into(),
            name: OPERATOR_USER.into(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            namespace: None,
        }]),
    };
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();

    let build_metrics = FakeBuildMetrics::start().await;
    build_metrics.set(LIMIT / 2, 500);
    let operator_kubeconfig = cp.operator_kubeconfig();
    let log = cp.dir.path().join("operator.log");
    let mut op = Operator::start(&operator_kubeconfig, build_metrics.port, log.clone());
    wait_for(
        "the operator's /readyz",
        Duration::from_secs(30),
        &op,
        || async {
            let r = reqwest::get(format!("http://{}/readyz", op.metrics_addr))
                .await
                .ok()?;
            r.status().is_success().then_some(())
        },
    )
    .await;
    eprintln!(
        "control plane up in {up:.1?}; operator ready after {:.1?}",
        started.elapsed()
    );

    // ------------------------------------------------------------------ happy path
    let t = Instant::now();
    let ns = "happy";
    namespace(&admin, ns).await;
    let indexes: Api<ImageIndex> = Api::namespaced(admin.clone(), ns);
    let kubelet = Kubelet {
        pods: Api::namespaced(admin.clone(), ns),
    };
    let created = Instant::now();
    indexes
        .create(&PostParams::default(), &imageindex("cats", json!({})))
        .await
        .unwrap();
    wait_for("scan pod cats-scan-1", Duration::from_secs(30), &op, || {
        kubelet.get("cats-scan-1")
    })
    .await;
    let to_scan_pod = created.elapsed();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), ns);
    let claim = claims.get("cats-index").await.expect("index claim made");
    assert_eq!(claim.owner_references()[0].kind, "ImageIndex");
    let scan_done = Instant::now();
    kubelet.finish_scan("cats-scan-1", &scan_report()).await;
    let build = wait_for(
        "build pod cats-build-1",
        Duration::from_secs(30),
        &op,
        || kubelet.get("cats-build-1"),
    )
    .await;
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
    kubelet.run("cats-build-1").await;
    let ii = wait_for(
        "status.memory from the scrape",
        Duration::from_secs(30),
        &op,
        || async {
            let ii = indexes.get("cats").await.ok()?;
            (status_of(&ii).unit.progress.as_ref()?.processed == 500).then_some(ii)
        },
    )
    .await;
    let s = status_of(&ii);
    assert_eq!(s.unit.phase, Some(IndexPhase::Building));
    assert_eq!(s.unit.memory.as_ref().unwrap().summary, "256Mi/512Mi");
    assert_eq!(s.unit.progress.as_ref().unwrap().summary, "500/2000 (25%)");
    assert_eq!(cond(&ii, MEMORY_PRESSURE).unwrap().0, "False");
    let columns = cp.kubectl(&["get", "imgidx", "-n", ns]);
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
    kubelet
        .exit(
            "cats-build-1",
            "Succeeded",
            terminated(0, "Completed", ""),
            json!({}),
        )
        .await;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), ns);
    wait_for("query Deployment", Duration::from_secs(30), &op, || async {
        deployments.get_opt("cats-query").await.unwrap()
    })
    .await;
    let services: Api<Service> = Api::namespaced(admin.clone(), ns);
    let svc = services.get("cats-query").await.unwrap();
    assert_eq!(
        svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0]
            .name
            .as_deref(),
        Some("http")
    );
    wait_for(
        "query pods from the ReplicaSet",
        Duration::from_secs(30),
        &op,
        || async { (kubelet.ready_query_pods("cats").await > 0).then_some(()) },
    )
    .await;
    let ii = wait_for("phase Ready", Duration::from_secs(60), &op, || async {
        let ii = indexes.get("cats").await.ok()?;
        (status_of(&ii).unit.phase == Some(IndexPhase::Ready)).then_some(ii)
    })
    .await;
    let s = status_of(&ii);
    assert_eq!(
        s.endpoint.as_deref(),
        Some("http://cats-query.happy.svc:8080")
    );
    assert_eq!(s.unit.index_generation, Some(1));
    assert_eq!(s.unit.attempts.len(), 1);
    assert_eq!(s.unit.attempts[0].outcome, Some(AttemptOutcome::Succeeded));
    assert_eq!(s.unit.attempts[0].peak_working_set, Some(LIMIT / 2));
    assert_eq!(s.observed_generation, Some(1));
    assert_eq!(cond(&ii, READY).unwrap().0, "True");
    let events = event_reasons(&admin, ns, "cats").await;
    for reason in [
        "ScanStarted",
        "ScanComplete",
        "PresetChosen",
        "BuildStarted",
        "BuildSucceeded",
        "Ready",
    ] {
        assert!(
            has(&events, "Normal", reason),
            "no {reason} event in {events:?}"
        );
    }
    let row = cp.kubectl(&["get", "imgidx", "-n", ns]);
    assert!(
        row.contains("Ready") && row.contains(&first_preset),
        "{row}"
    );
    eprintln!(
        "happy path: {:.1?}; ImageIndex created → scan pod {to_scan_pod:.2?}; scan Succeeded → build pod {scan_to_build:.2?}; \
         created → build pod {create_to_build:.2?} (includes the test's kubelet play)",
        t.elapsed()
    );

    // ------------------------------------------------------------------ OOMKilled → smaller preset
    let t = Instant::now();
    let ns = "oom";
    let (indexes, kubelet) = scanned(&admin, &op, ns, json!({})).await;
    let build = wait_for("build pod 1", Duration::from_secs(30), &op, || {
        kubelet.get("cats-build-1")
    })
    .await;
    let preset1 = Preset::from_label(&build.labels()[labels::PRESET]).unwrap();
    // The container was OOM-killed and restarted once before failing: OOMKilled is in lastState.
    kubelet
        .exit(
            "cats-build-1",
            "Failed",
            terminated(1, "Error", ""),
            terminated(137, "OOMKilled", ""),
        )
        .await;
    let build2 = wait_for("build pod 2", Duration::from_secs(30), &op, || {
        kubelet.get("cats-build-2")
    })
    .await;
    let preset2 = Preset::from_label(&build2.labels()[labels::PRESET]).unwrap();
    assert_eq!(build2.labels()[labels::ATTEMPT], "2");
    assert!(
        preset2.nfeatures < preset1.nfeatures,
        "{preset1} → {preset2}"
    );
    let ii = wait_for(
        "attempt 2 recorded",
        Duration::from_secs(30),
        &op,
        || async {
            let ii = indexes.get("cats").await.ok()?;
            (status_of(&ii).unit.attempts.len() == 2).then_some(ii)
        },
    )
    .await;
    let s = status_of(&ii);
    assert_eq!(s.unit.attempts[0].outcome, Some(AttemptOutcome::OomKilled));
    assert_eq!(s.unit.attempts[0].exit_code, Some(137));
    assert_eq!(s.unit.attempts[1].preset, preset2.label());
    assert_eq!(s.unit.preset.as_deref(), Some(preset2.label().as_str()));
    assert_eq!(
        cond(&ii, DEGRADED).unwrap(),
        ("True".into(), "DowngradeAfterOOMKill".into())
    );
    let events = event_reasons(&admin, ns, "cats").await;
    assert!(has(&events, "Warning", "OOMKilled"), "{events:?}");
    assert!(
        has(&events, "Normal", "DowngradeAfterOOMKill"),
        "{events:?}"
    );
    eprintln!("OOMKilled: {preset1} → {preset2} in {:.1?}", t.elapsed());

    // ------------------------------------------------------------------ critical pressure → proactive restart
    let t = Instant::now();
    let ns = "pressure";
    namespace(&admin, ns).await;
    let indexes: Api<ImageIndex> = Api::namespaced(admin.clone(), ns);
    let kubelet = Kubelet {
        pods: Api::namespaced(admin.clone(), ns),
    };
    build_metrics.set(LIMIT / 100 * 95, 800);
    indexes
        .create(&PostParams::default(), &imageindex("cats", json!({})))
        .await
        .unwrap();
    wait_for("scan pod", Duration::from_secs(30), &op, || {
        kubelet.get("cats-scan-1")
    })
    .await;
    kubelet.finish_scan("cats-scan-1", &scan_report()).await;
    let build = wait_for("build pod 1", Duration::from_secs(30), &op, || {
        kubelet.get("cats-build-1")
    })
    .await;
    let preset1 = Preset::from_label(&build.labels()[labels::PRESET]).unwrap();
    kubelet.run("cats-build-1").await;
    let ii = wait_for(
        "MemoryPressure warning",
        Duration::from_secs(30),
        &op,
        || async {
            let ii = indexes.get("cats").await.ok()?;
            (cond(&ii, MEMORY_PRESSURE)?.0 == "True").then_some(ii)
        },
    )
    .await;
    assert_eq!(
        status_of(&ii).unit.memory.as_ref().unwrap().summary,
        "487Mi/512Mi"
    );
    let pressure_seen = Instant::now();
    // Sustained above 90% for 10 s → the operator deletes the pod and starts a poorer one.
    let build2 = wait_for(
        "build pod 2 after the pressure restart",
        Duration::from_secs(60),
        &op,
        || kubelet.get("cats-build-2"),
    )
    .await;
    let to_restart = pressure_seen.elapsed();
    assert!(
        kubelet.get("cats-build-1").await.is_none(),
        "the pressured pod was deleted"
    );
    let preset2 = Preset::from_label(&build2.labels()[labels::PRESET]).unwrap();
    assert!(
        preset2.nfeatures < preset1.nfeatures,
        "{preset1} → {preset2}"
    );
    let ii = wait_for(
        "attempt 2 recorded",
        Duration::from_secs(30),
        &op,
        || async {
            let ii = indexes.get("cats").await.ok()?;
            (status_of(&ii).unit.attempts.len() == 2).then_some(ii)
        },
    )
    .await;
    let s = status_of(&ii);
    assert_eq!(
        s.unit.attempts[0].outcome,
        Some(AttemptOutcome::MemoryPressureRestart)
    );
    assert_eq!(s.unit.attempts[0].peak_working_set, Some(LIMIT / 100 * 95));
    assert!(
        s.unit.attempts[0]
            .message
            .as_deref()
            .unwrap_or("")
            .contains("above 90%"),
        "{:?}",
        s.unit.attempts[0].message
    );
    let events = event_reasons(&admin, ns, "cats").await;
    assert!(
        has(&events, "Warning", "MemoryPressureRestart"),
        "{events:?}"
    );
    build_metrics.set(LIMIT / 2, 500);
    eprintln!("pressure: {preset1} → {preset2}, restart {to_restart:.1?} after the first warning; scenario {:.1?}", t.elapsed());

    // ------------------------------------------------------------------ invalid spec
    let ns = "invalid";
    namespace(&admin, ns).await;
    cp.kubectl(&[
        "apply",
        "-n",
        ns,
        "-f",
        repo_root()
            .join("crds/yaml/instance-invalid.yaml")
            .to_str()
            .unwrap(),
    ]);
    let indexes: Api<ImageIndex> = Api::namespaced(admin.clone(), ns);
    let ii = wait_for(
        "Degraded InvalidSpec",
        Duration::from_secs(30),
        &op,
        || async {
            let ii = indexes.get("invalid").await.ok()?;
            (cond(&ii, DEGRADED)? == ("True".to_string(), "InvalidSpec".to_string())).then_some(ii)
        },
    )
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
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    assert!(
        pods.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "no pods for an invalid spec"
    );
    assert!(has(
        &event_reasons(&admin, ns, "invalid").await,
        "Warning",
        "InvalidSpec"
    ));

    // ------------------------------------------------------------------ operator restart mid-build
    let t = Instant::now();
    let ns = "restart";
    let (indexes, kubelet) = scanned(&admin, &op, ns, json!({})).await;
    wait_for("build pod 1", Duration::from_secs(30), &op, || {
        kubelet.get("cats-build-1")
    })
    .await;
    kubelet.run("cats-build-1").await;
    op.stop().await;
    op = Operator::start(&operator_kubeconfig, build_metrics.port, log.clone());
    wait_for(
        "the restarted operator's /readyz",
        Duration::from_secs(30),
        &op,
        || async {
            let r = reqwest::get(format!("http://{}/readyz", op.metrics_addr))
                .await
                .ok()?;
            r.status().is_success().then_some(())
        },
    )
    .await;
    // It picks the running build up (scrapes it again) ...
    wait_for(
        "a scrape by the restarted operator",
        Duration::from_secs(30),
        &op,
        || async {
            let ii = indexes.get("cats").await.ok()?;
            (status_of(&ii).unit.progress.as_ref()?.processed == 500).then_some(())
        },
    )
    .await;
    // ... without a second build pod, then finishes it.
    let selector = format!(
        "{},{}=build",
        labels::instance_selector("cats"),
        labels::COMPONENT
    );
    let builds = kubelet
        .pods
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap();
    assert_eq!(builds.items.len(), 1, "one build pod after the restart");
    kubelet
        .exit(
            "cats-build-1",
            "Succeeded",
            terminated(0, "Completed", ""),
            json!({}),
        )
        .await;
    wait_for("query pods", Duration::from_secs(30), &op, || async {
        (kubelet.ready_query_pods("cats").await > 0).then_some(())
    })
    .await;
    let ii = wait_for(
        "Ready after the restart",
        Duration::from_secs(60),
        &op,
        || async {
            let ii = indexes.get("cats").await.ok()?;
            (status_of(&ii).unit.phase == Some(IndexPhase::Ready)).then_some(ii)
        },
    )
    .await;
    assert_eq!(
        status_of(&ii).unit.attempts.len(),
        1,
        "the restart did not add an attempt"
    );
    assert!(kubelet.get("cats-build-2").await.is_none());
    eprintln!("operator restart mid-build: {:.1?}", t.elapsed());

    // ------------------------------------------------------------------ the operator's own metrics
    let text = op.metrics().await;
    assert!(
        text.contains("imageindex_operator_reconciles_total"),
        "{text}"
    );
    assert!(
        text.contains("imageindex_operator_attempts_total{outcome=\"Succeeded\"} 1"),
        "{text}"
    );

    // ------------------------------------------------------------------ delete → owned objects gone
    let t = Instant::now();
    let ns = "happy";
    let indexes: Api<ImageIndex> = Api::namespaced(admin.clone(), ns);
    indexes
        .delete("cats", &DeleteParams::default())
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), ns);
    let services: Api<Service> = Api::namespaced(admin.clone(), ns);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), ns);
    wait_for(
        "owned objects garbage-collected",
        Duration::from_secs(90),
        &op,
        || async {
            let left = pods.list(&ListParams::default()).await.ok()?.items.len()
                + deployments
                    .list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .len()
                + services
                    .list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .len()
                + claims.list(&ListParams::default()).await.ok()?.items.len();
            (left == 0).then_some(())
        },
    )
    .await;
    eprintln!("delete → owned objects gone in {:.1?}", t.elapsed());

    let errors = text
        .lines()
        .filter(|l| l.starts_with("imageindex_operator_reconcile_errors_total"))
        .collect::<Vec<_>>();
    eprintln!("operator reconcile errors: {errors:?}");
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !log_text.contains("forbidden"),
        "the operator hit an RBAC denial:\n{}",
        op.log_tail()
    );
    op.stop().await;
    eprintln!(
        "all API-server scenarios passed in {:.1?}",
        started.elapsed()
    );
}
