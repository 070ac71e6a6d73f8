//! End to end on a real one-node cluster, with the project's own container images (issues 7
//! and 12).
//!
//! The cluster is tests/node/up.sh's: the control plane of tests/controlplane (etcd,
//! kube-apiserver, kube-controller-manager v1.20.2), containerd + runc with CNI bridge
//! networking, and the kubelet, kube-proxy and kube-scheduler built from the same Debian source
//! package as the API server. The operator and indexer images are scripts/images.sh's, built
//! from the Dockerfiles and imported into containerd. The chart is installed with the `helm
//! install` of its README; the operator runs from the chart's Deployment as a container, as the
//! chart's ServiceAccount, reaching the API server through the `kubernetes` Service (kube-proxy).
//! Its scan, build and query pods are containers of the indexer image: non-root, read-only root
//! filesystems, memory limits enforced by the kernel in the kubelet's cgroups; an OOMKilled is
//! the kubelet's report of a kernel kill. A real Prometheus (Debian's) scrapes the build,
//! query and operator pods with the scrape configs the Prometheus Operator would make from the
//! chart's PodMonitor and ServiceMonitor, and loads the chart's PrometheusRule; its targets
//! come from the test API server through a stand-in for Kubernetes service discovery, which
//! Debian builds it without (imageindex_e2e::prometheus).
//!
//! Scenarios, in order, each ending in assertions on `kubectl get imgidx -o json`, the pods,
//! the kernel's cgroups and real queries (a scenario's failure prints the cluster's state and
//! the next scenario runs; the test fails at the end naming every failed scenario):
//! 1. serve: an ImageIndex over the sample catalogue with a generous limit becomes Ready and
//!    its `status.endpoint` finds the right image for attacked copies, through the Service's
//!    ClusterIP (kube-proxy) and its endpoint;
//! 2. oom: `preset: full` under 56Mi over small and large photos: the kernel OOM-kills the
//!    build (its log names the container's indexer process, uid 65532), the kubelet reports
//!    OOMKilled, the operator resumes with a poorer preset, Ready; the memory Prometheus
//!    recorded is written out for the README's picture (`IMAGEINDEX_E2E_OUT`,
//!    docs/oom-memory.py);
//! 3. floor: a limit below the poorest preset's floor: Failed/Degraded naming the limit and
//!    the smallest that fits, and no build pod ever;
//! 4. rebuild: `spec.rebuild` while queries run: a new generation is built and swapped in with
//!    no failed query; during that build, every query of the Grafana dashboard is evaluated
//!    through Prometheus' HTTP API and must return data, and the chart's alert rules evaluate
//!    without error;
//! 5. adopt: the operator's pod is deleted mid-build (the build is slowed by a CPU limit); the
//!    Deployment's replacement adopts the running build pod, which finishes;
//! 6. sharded: `shards: 3`, `preset: full` under 56Mi over small images and, in one shard
//!    only, 4000 px photos: three build pods at once; that shard's `full` is OOM-killed by the
//!    kernel and only it restarts, with a poorer preset; Ready with `shardsReady` 3/3; the
//!    operator sizes each shard by its own largest image (the scan lists the largest with
//!    their path keys); the router (the
//!    Service's endpoint and ClusterIP) answers attacked copies as an unsharded index built
//!    on the host does (agreement and recall@1 >= 0.98, coverage 3/3); a shard's query pod
//!    deleted: answers within the router's deadline with coverage 2/3 and a `partial`
//!    warning, Degraded/ShardUnavailable, then 3/3 and AllShardsServing; deleting it removes
//!    every object it owned;
//! 7. delete: deleting the ImageIndex removes every object it owned (garbage collection) and
//!    every container, cgroup and volume directory of its pods.
//!
//! Then the cluster is torn down and nothing may be left on the machine (processes, mounts,
//! cgroups, network namespaces, the bridge, iptables chains).
//!
//! Needs root, tests/controlplane/build.sh --node's binaries, scripts/setup.sh's packages
//! (containerd, runc, CNI plugins, prometheus, buildah, mmdebstrap) and tools, and the image
//! archives of scripts/images.sh (`IMAGEINDEX_IMAGES_DIR`; made here when unset).
//! IMAGEINDEX_SKIP_APISERVER=1 skips it.

use imageindex_e2e::chart::helm_bin;
use imageindex_e2e::cluster::{get_json, readme_commands, search, wait_for, TestCluster};
use imageindex_e2e::prometheus::{
    rule_file, scrape_configs, Discovery, KubernetesFileDiscovery, Prometheus,
};
use imageindex_e2e::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

const OPERATOR_NS: &str = "imageindex-system";
const RELEASE: &str = "imageindex-operator";
const INSTANCE: &str = "app.kubernetes.io/instance";
const COMPONENT: &str = "app.kubernetes.io/component";
/// How often Prometheus scrapes in this test (a build can go from fine to OOMKilled in
/// seconds).
const SCRAPE: &str = "1s";

/// The memory limit `preset: full` cannot fit on the 4000 px photos with one extraction
/// thread (measured in a cgroup: killed at 56Mi and 60Mi, fine at 64Mi) but `medium` can
/// (fine at 50Mi).
const OOM_LIMIT: &str = "56Mi";
const OOM_LIMIT_BYTES: u64 = 56 << 20;
/// Below the poorest preset's floor for the photos (~54Mi), above what a scan needs (~24Mi).
const FLOOR_LIMIT: &str = "40Mi";
/// The CPU limit of scenario 5's build (a tenth of a core, enforced by the kubelet's CFS
/// quota).
const ADOPT_CPU: &str = "100m";
/// The CPU limit of scenario 4's rebuild: long enough to evaluate the dashboard during it.
/// Since the list-based index format the catalogue's build needs ~0.35 s of CPU (extraction
/// most of it; at 200m it ended in ~3 s, before Prometheus had scraped it): ~17 s at 20m.
const REBUILD_CPU: &str = "20m";
/// The CPU of scan and build pods elsewhere (one extraction thread). The node has 2 CPUs
/// and the scheduler counts requests: the operator (50m), three query pods and one build
/// must fit together.
const BUILD_CPU: &str = "1";
/// The CPU of each query pod (the operator's default, 1, would not leave room).
const QUERY_CPU: &str = "250m";
/// The CPU of scenario 2's builds: slow enough that each attempt lives through several
/// Prometheus scrapes (a new pod is scraped 5–10 s after it starts: Prometheus passes target
/// changes on every 5 s).
const OOM_CPU: &str = "100m";
/// Small photos that come first in scenario 2's dataset (the first attempt builds them before
/// the first large photo gets it killed).
const SMALL_PHOTOS: usize = 10;
/// Scenario 6's shard that holds the large photos (`indexer::shard::shard_of` of their
/// names), and how many (of the fixture's 4000 px photos) it holds.
const LARGE_SHARD: u32 = 2;
const SHARDED_LARGE: usize = 3;
/// Which of the fixture's photos (`photo_<i>.jpg`) are in it: two textured squares (grass,
/// gravel: 4000 x 4000), on which `full` with one extraction thread needs more than
/// SHARD_LIMIT (it decodes them whole: 53 MiB working set in a pod, 64 MiB peak in a bare
/// cgroup; `large` peaks at 30 MiB). The third is a panorama of PANORAMA x the sample JPEG
/// number PANORAMA_SOURCE: the shard's largest image by pixels, decoded at a reduced scale
/// by every preset, so its floor (41.1Mi for the poorest preset) is what sizes the shard.
/// Their sources are left out of the catalogue copies, so a query of a large photo has one
/// right answer.
const SHARDED_LARGE_PHOTOS: [usize; SHARDED_LARGE - 1] = [7, 8];
const PANORAMA: (i32, i32) = (8200, 2400);
const PANORAMA_SOURCE: usize = 5;
/// Scenario 6's build CPU: three build pods must fit the node at once beside the other
/// scenarios' query pods (the shard query pods and the router take QUERY_CPU each, once the
/// builds are done), and live long enough to overlap.
const SHARD_BUILD_CPU: &str = "50m";
/// Scenario 6's memory limit: above the large photos' shard's floor, below what `full` needs
/// there (see SHARDED_LARGE_PHOTOS) and what `medium` is estimated to (45.9Mi), so the retry
/// gets `large`; the small images' shards build with `full` under it.
const SHARD_LIMIT: &str = "45Mi";
const SHARD_LIMIT_BYTES: u64 = 45 << 20;
/// Catalogue images whose attacked copies query scenario 6's router: none of the sources of
/// the large photos (a query of those has two near-equal answers in two shards, the copy and
/// its 4000 px upscale, and which ranks first is a coin toss: measured 24/25 agreement with
/// the astronaut's crop going either way).
const SHARDED_QUERIES: &[&str] = &[
    "greek_coins.jpg",
    "rocket_launch_pad.jpg",
    "coffee_cup_product_on_white.jpg",
    "hubble_deep_field_top.jpg",
];

struct Fixture {
    cluster: TestCluster,
    prometheus: Prometheus,
    discovery: KubernetesFileDiscovery,
    /// Dataset of scenarios 1, 4, 6: a claim directory with the sample catalogue in
    /// `catalogue/`.
    catalogue_claim: PathBuf,
    /// Dataset of scenarios 3 and 5: 12 photos of 4000 px.
    photos: PathBuf,
    /// Dataset of scenario 2: 10 photos of 1600 px that come first (by name) and the same 12
    /// of 4000 px: the first attempt builds for a while (several scrapes) before the first
    /// large photo gets it killed.
    oom_photos: PathBuf,
    /// Attacked copies of catalogue images and the file each must find.
    queries: Vec<(PathBuf, String)>,
    /// A downscaled copy of a large photo of scenario 2's dataset, and the files it may find:
    /// that photo, or a small photo made from the same sample image.
    photo_query: (PathBuf, Vec<String>),
    /// How long making the datasets and the images took.
    data_took: Duration,
    images_took: Duration,
    /// The logs of operator pods deleted during the test (pod name, log).
    operator_logs: Mutex<Vec<(String, String)>>,
    started: SystemTime,
    _data: tempfile::TempDir,
}

fn imageindex(name: &str, ns: &str, path: &str, preset: &str, limit: &str, cpu: &str) -> String {
    format!(
        "apiVersion: imagematch.dev/v1alpha1
kind: ImageIndex
metadata:
  name: {name}
  namespace: {ns}
spec:
  dataset:
    claimName: photos
    path: {path}
  preset: {preset}
  memoryLimit: {limit}
  cpu: \"{cpu}\"
  storage:
    size: 1Gi
  query:
    replicas: 1
    cpu: {QUERY_CPU}
  maxAttempts: 6
"
    )
}

/// A namespace with the claim `photos` bound to a read-only hostPath volume at `dir`. The
/// volume goes first: a claim that names a volume the PV controller has not seen yet waits
/// for its resync.
fn dataset_namespace(cluster: &TestCluster, ns: &str, dir: &Path) {
    let t = Instant::now();
    cluster.kubectl(&["create", "namespace", ns]);
    let volume = format!("{ns}-photos");
    cluster.apply(&format!(
        "apiVersion: v1
kind: PersistentVolume
metadata:
  name: {volume}
spec:
  capacity: {{storage: 1Gi}}
  accessModes: [ReadOnlyMany]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: \"\"
  hostPath: {{path: {dir}, type: Directory}}
  claimRef: {{namespace: {ns}, name: photos}}
",
        dir = dir.display()
    ));
    let phase = |kind: &str, name: &str, ns: Option<&str>| {
        let mut args = vec!["get", kind, name];
        args.extend(ns.map(|n| ["-n", n]).into_iter().flatten());
        cluster.kubectl_json(&args)["status"]["phase"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    wait_for(
        &format!("persistentvolume {volume} to be Available"),
        Duration::from_secs(30),
        || (phase("pv", &volume, None) == "Available").then_some(()),
        String::new,
    );
    cluster.apply(&format!(
        "apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: photos
  namespace: {ns}
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: \"\"
  volumeName: {volume}
  resources: {{requests: {{storage: 1Gi}}}}
"
    ));
    wait_for(
        &format!("claim {ns}/photos to be Bound"),
        Duration::from_secs(30),
        || (phase("pvc", "photos", Some(ns)) == "Bound").then_some(()),
        String::new,
    );
    eprintln!(
        "    {ns}: dataset claim Bound after {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

fn downscaled(src: &Path, to: &Path, width: i32) {
    resized(src, to, width, None);
}

/// `src` resized to `width` x `height` (`None`: the height that keeps its aspect), as a JPEG.
fn resized(src: &Path, to: &Path, width: i32, height: Option<i32>) {
    use opencv::core::{Size, Vector};
    use opencv::prelude::*;
    use opencv::{imgcodecs, imgproc};
    let img = imgcodecs::imread(src.to_str().unwrap(), imgcodecs::IMREAD_COLOR).unwrap();
    let height = height.unwrap_or(width * img.rows() / img.cols().max(1));
    let mut small = Mat::default();
    imgproc::resize(
        &img,
        &mut small,
        Size::new(width, height),
        0.0,
        0.0,
        imgproc::INTER_AREA,
    )
    .unwrap();
    let params = Vector::<i32>::from_slice(&[imgcodecs::IMWRITE_JPEG_QUALITY, 85]);
    imgcodecs::imwrite(to.to_str().unwrap(), &small, &params).unwrap();
}

/// The chart's monitoring objects as the Prometheus Operator would see them: the PodMonitor,
/// ServiceMonitor and PrometheusRule of a `helm template` with the install's release name and
/// namespace.
fn chart_monitoring() -> Vec<Value> {
    let out = std::process::Command::new(helm_bin())
        .args(["template", RELEASE])
        .arg(repo().join("charts/imageindex-operator"))
        .args(["--namespace", OPERATOR_NS])
        .args(["--set", "monitoring.podMonitor.enabled=true"])
        .args(["--set", "monitoring.serviceMonitor.enabled=true"])
        .args(["--set", "monitoring.prometheusRule.enabled=true"])
        .output()
        .expect("helm template");
    let text = stdout_of_success(&out, "helm template");
    imageindex_e2e::chart::parse_documents(&text)
}

impl Fixture {
    fn start() -> Fixture {
        let t = Instant::now();
        let started = SystemTime::now();
        let data = tempfile::Builder::new()
            .prefix("imageindex-cluster-data-")
            .tempdir()
            .unwrap();
        let catalogue_claim = data.path().join("catalogue-claim");
        sample_subset(&catalogue_claim.join("catalogue"), 25);
        let photos = data.path().join("photos-claim");
        make_photos(&photos, 12, 4000);
        let oom_photos = data.path().join("oom-claim");
        let small = data.path().join("small");
        for p in make_photos(&small, SMALL_PHOTOS, 1600) {
            let name = p
                .file_name()
                .unwrap()
                .to_string_lossy()
                .replace("photo_", "a_small_");
            std::fs::create_dir_all(&oom_photos).unwrap();
            std::fs::rename(&p, oom_photos.join(name)).unwrap();
        }
        for i in 0..12 {
            let name = format!("photo_{i:03}.jpg");
            std::fs::hard_link(photos.join(&name), oom_photos.join(&name)).unwrap();
        }
        let qdir = data.path().join("queries");
        let mut queries = Vec::new();
        for name in ["astronaut_eileen_collins.jpg", "greek_coins.jpg"] {
            for q in attacked_copies(&sample_catalogue().join(name), &qdir) {
                queries.push((q, name.to_string()));
            }
        }
        let photo_query = qdir.join("photo_010_small.jpg");
        downscaled(&photos.join("photo_010.jpg"), &photo_query, 1200);
        // make_photos draws photo i from the sample's JPEGs in turn: the small photos made from
        // photo_010's sample image show the same scene.
        let jpegs = std::fs::read_dir(sample_catalogue())
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "jpg"))
            .count();
        let mut photo_query_answers = vec!["photo_010.jpg".to_string()];
        photo_query_answers.extend(
            (0..SMALL_PHOTOS)
                .filter(|i| i % jpegs == 10 % jpegs)
                .map(|i| format!("a_small_{i:03}.jpg")),
        );
        let data_took = t.elapsed();

        let t = Instant::now();
        let images = image_archives(&data.path().join("images"));
        let images_took = t.elapsed();
        let cluster = TestCluster::start_with_node(&images);
        let docs = chart_monitoring();
        // Debian's Prometheus has no Kubernetes service discovery: the test discovers pods
        // and endpoints for it (same __meta_kubernetes_* labels, see imageindex_e2e::prometheus).
        let sd_dir = cluster.dir().join("prometheus/sd");
        let discovery = KubernetesFileDiscovery::start(&cluster.admin_kubeconfig(), &sd_dir)
            .unwrap_or_else(|e| panic!("{e}"));
        let prometheus = Prometheus::start(
            &cluster.dir().join("prometheus"),
            &scrape_configs(&docs, Discovery::Files(&sd_dir), SCRAPE),
            Some(&rule_file(&docs)),
            SCRAPE,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        // The chart README's install, as written, with the images the node has (imported,
        // never pulled), a faster scrape and debug logs.
        let readme = repo().join("charts/imageindex-operator/README.md");
        let commands = readme_commands(&readme, "Install on Kubernetes");
        let find = |prefix: &str| {
            commands
                .iter()
                .find(|c| c.starts_with(prefix))
                .unwrap_or_else(|| panic!("no `{prefix}` command in {}", readme.display()))
                .clone()
        };
        cluster.shell(&format!(
            "{} --set image.repository=imageindex/operator --set indexer.image.repository=imageindex/indexer \
             --set operator.scrapeInterval=500ms --set 'operator.logLevel=info\\,operator=debug'",
            find("helm install imageindex-operator")
        ));
        let rollout = find("kubectl --namespace imageindex-system rollout status");
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cluster.shell(&format!("{rollout} --timeout=180s"))
        }));
        if out.is_err() {
            panic!(
                "the operator did not roll out{}",
                cluster.diagnostics(&[OPERATOR_NS])
            );
        }
        let f = Fixture {
            cluster,
            prometheus,
            discovery,
            catalogue_claim,
            photos,
            oom_photos,
            queries,
            photo_query: (photo_query, photo_query_answers),
            data_took,
            images_took,
            operator_logs: Mutex::new(Vec::new()),
            started,
            _data: data,
        };
        // The operator's container runs as the chart's non-root user, from the image.
        let (op, _, _) = f.operator_pod().expect("the operator's pod");
        let pod = f
            .cluster
            .kubectl_json(&["get", "pod", &op, "-n", OPERATOR_NS]);
        let cs = &pod["status"]["containerStatuses"][0];
        assert!(
            cs["image"]
                .as_str()
                .unwrap_or("")
                .contains("imageindex/operator:"),
            "{cs}"
        );
        let uids = f
            .cluster
            .node()
            .process_uids(cs["containerID"].as_str().unwrap_or(""));
        assert!(
            !uids.is_empty() && uids.iter().all(|u| *u == (65532, 65532)),
            "the operator's processes run as {uids:?}, not the chart's runAsUser 65532"
        );
        f
    }

    fn imgidx(&self, ns: &str, name: &str) -> Value {
        self.cluster
            .kubectl_json(&["get", "imgidx", name, "-n", ns])
    }

    /// Waits until the ImageIndex is Ready (panics at once if it Failed).
    fn wait_ready(&self, ns: &str, name: &str, timeout: Duration) -> Value {
        wait_for(
            &format!("imgidx {ns}/{name} to be Ready"),
            timeout,
            || {
                let ii = self.imgidx(ns, name);
                match ii["status"]["phase"].as_str() {
                    Some("Ready") => Some(ii),
                    Some("Failed") => panic!("imgidx {ns}/{name} Failed: {:#}", ii["status"]),
                    _ => None,
                }
            },
            || format!("last status: {:#}", self.imgidx(ns, name)["status"]),
        )
    }

    /// The pods of ImageIndex `name` with `component`.
    fn pods(&self, ns: &str, name: &str, component: &str) -> Vec<Value> {
        let selector = format!("{INSTANCE}={name},{COMPONENT}={component}");
        self.cluster
            .kubectl_json(&["get", "pods", "-n", ns, "-l", &selector])["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The operator's current pod (name, uid, ready), the one not being deleted.
    fn operator_pod(&self) -> Option<(String, String, bool)> {
        let pods = self.cluster.kubectl_json(&[
            "get",
            "pods",
            "-n",
            OPERATOR_NS,
            "-l",
            &format!("{INSTANCE}={RELEASE}"),
        ]);
        pods["items"].as_array()?.iter().find_map(|p| {
            if !p["metadata"]["deletionTimestamp"].is_null() {
                return None;
            }
            let ready = p["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
            Some((
                p["metadata"]["name"].as_str()?.to_string(),
                p["metadata"]["uid"].as_str()?.to_string(),
                ready,
            ))
        })
    }

    /// The query service's address behind `status.endpoint`: the ready endpoint of its
    /// Service (a pod address, reachable over the node's bridge).
    fn query_address(&self, ns: &str, name: &str) -> std::net::SocketAddr {
        let endpoint = self.imgidx(ns, name)["status"]["endpoint"]
            .as_str()
            .expect("status.endpoint once Ready")
            .to_string();
        wait_for(
            &format!("a ready endpoint behind {endpoint}"),
            Duration::from_secs(60),
            || self.cluster.service_address(&endpoint),
            String::new,
        )
    }

    /// The logs of every operator pod: those deleted during the test and the current ones.
    fn all_operator_logs(&self) -> Vec<(String, String)> {
        let mut logs = self.operator_logs.lock().unwrap().clone();
        if let Some((pod, _, _)) = self.operator_pod() {
            let out = self
                .cluster
                .kubectl_output(&["logs", &pod, "-n", OPERATOR_NS]);
            logs.push((pod, String::from_utf8_lossy(&out.stdout).into_owned()));
        }
        logs
    }
}

/// The project's image archives: `IMAGEINDEX_IMAGES_DIR` (scripts/test.sh builds them once),
/// else scripts/images.sh writes them into `dir` now (cached by its inputs outside the clone;
/// many minutes the first time).
fn image_archives(dir: &Path) -> PathBuf {
    if let Some(d) = std::env::var_os("IMAGEINDEX_IMAGES_DIR") {
        return PathBuf::from(d);
    }
    eprintln!(
        "IMAGEINDEX_IMAGES_DIR is not set: building the images with scripts/images.sh {}",
        dir.display()
    );
    let status = std::process::Command::new("bash")
        .arg(repo().join("scripts/images.sh"))
        .arg(dir)
        .status()
        .expect("scripts/images.sh");
    assert!(status.success(), "scripts/images.sh failed");
    dir.to_path_buf()
}

fn top_path(answer: &Value) -> String {
    answer["matches"][0]["path"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// The objects labelled `selector` in `ns` that an ImageIndex may own and that still exist
/// (`kubectl get -o name`; empty once garbage collection is done).
fn owned_left(f: &Fixture, ns: &str, selector: &str) -> String {
    f.cluster.kubectl(&[
        "get",
        "imgidx,pods,deployments,replicasets,services,endpoints,pvc",
        "-n",
        ns,
        "-l",
        selector,
        "-o",
        "name",
    ])
}

fn mib(v: &Value) -> String {
    v.as_u64()
        .map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
}

fn mib_of(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

fn seconds_between(a: &Value, b: &Value) -> Option<f64> {
    let t = |v: &Value| v.as_str()?.parse::<k8s_openapi::jiff::Timestamp>().ok();
    (t(b)? - t(a)?).total(k8s_openapi::jiff::Unit::Second).ok()
}

fn container_status(pod: &Value) -> &Value {
    &pod["status"]["containerStatuses"][0]
}

/// Where the test writes what it measured for docs/oom-memory.py (`IMAGEINDEX_E2E_OUT`).
fn out_dir() -> PathBuf {
    std::env::var_os("IMAGEINDEX_E2E_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("imageindex-e2e"))
}

// ------------------------------------------------------------------------------ scenarios

/// Scenario 1: scan, build and serve the sample catalogue; attacked copies find their
/// originals.
fn serve(f: &Fixture) -> Vec<String> {
    let (ns, name) = ("e2e-serve", "catalogue");
    dataset_namespace(&f.cluster, ns, &f.catalogue_claim);
    let t = Instant::now();
    f.cluster.apply(&imageindex(
        name,
        ns,
        "/catalogue",
        "auto",
        "512Mi",
        BUILD_CPU,
    ));
    let ii = f.wait_ready(ns, name, Duration::from_secs(240));
    let ready_after = t.elapsed();
    let st = &ii["status"];
    assert_eq!(
        st["endpoint"],
        format!("http://{name}-query.{ns}.svc:8080"),
        "{st:#}"
    );
    let ready = st["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert_eq!(ready["status"], "True", "{st:#}");
    let attempts = st["attempts"].as_array().unwrap();
    assert_eq!(attempts.last().unwrap()["outcome"], "Succeeded", "{st:#}");
    assert_eq!(st["scan"]["images"], 25, "{st:#}");
    // The scan and build ended as the kubelet reports them, the scan's report in its
    // termination message.
    let scan = f.pods(ns, name, "scan");
    assert_eq!(scan.len(), 1);
    assert_eq!(scan[0]["status"]["phase"], "Succeeded");
    let term = &container_status(&scan[0])["state"]["terminated"];
    assert_eq!(
        (term["exitCode"].as_i64(), term["reason"].as_str()),
        (Some(0), Some("Completed"))
    );
    assert!(
        term["message"]
            .as_str()
            .unwrap_or("")
            .contains("\"images\":25"),
        "{term}"
    );
    let build = f.pods(ns, name, "build");
    assert_eq!(build.len(), 1);
    assert_eq!(build[0]["status"]["phase"], "Succeeded");
    // Every pod was a container of the indexer image in containerd, with the image's
    // hardening: non-root, read-only root filesystem.
    let containers = f.cluster.node().ctr(&["containers", "ls", "-q"]).unwrap();
    let query = f.pods(ns, name, "query");
    assert_eq!(query.len(), 1, "{query:#?}");
    for pod in scan.iter().chain(&build).chain(&query) {
        let cs = container_status(pod);
        let id = cs["containerID"].as_str().unwrap_or("");
        assert!(
            cs["image"]
                .as_str()
                .unwrap_or("")
                .contains("imageindex/indexer:"),
            "{cs}"
        );
        assert!(
            id.strip_prefix("containerd://")
                .is_some_and(|id| containers.contains(id)),
            "{id} is not one of containerd's containers"
        );
        let sc = &pod["spec"]["containers"][0]["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{sc}");
    }
    let query_uids = f.cluster.node().process_uids(
        container_status(&query[0])["containerID"]
            .as_str()
            .unwrap_or(""),
    );
    assert!(
        !query_uids.is_empty() && query_uids.iter().all(|u| *u == (65532, 65532)),
        "the query service runs as {query_uids:?}"
    );
    // The query service, reached through the Service's endpoint and its ClusterIP.
    let addr = f.query_address(ns, name);
    let index = get_json(addr, "/v1/index").unwrap();
    assert_eq!(index["generation"], 1, "{index}");
    let svc = f
        .cluster
        .kubectl_json(&["get", "service", &format!("{name}-query"), "-n", ns]);
    let cluster_ip: std::net::IpAddr = svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
    let via_proxy = std::net::SocketAddr::new(cluster_ip, 8080);
    let index_via_proxy = wait_for(
        &format!("the query Service's ClusterIP {via_proxy} (kube-proxy)"),
        Duration::from_secs(30),
        || get_json(via_proxy, "/v1/index").ok(),
        || f.cluster.node().log_tail("kube-proxy", 20),
    );
    assert_eq!(index_via_proxy["generation"], 1);
    let queried = Instant::now();
    for (i, (q, want)) in f.queries.iter().enumerate() {
        let to = if i % 2 == 0 { addr } else { via_proxy };
        let (status, answer) = search(to, &std::fs::read(q).unwrap()).unwrap();
        assert_eq!(status, 200, "{}: {answer}", q.display());
        assert!(
            top_path(&answer).ends_with(want.as_str()),
            "{} found {:?}, not {want}: {answer}",
            q.display(),
            top_path(&answer)
        );
    }
    vec![format!(
        "Ready {:.1} s after kubectl apply; preset {}; {} attacked copies found their original \
         through {addr} (endpoint) and {via_proxy} (ClusterIP, kube-proxy) in {:.1} s; scan, \
         build and query ran as containers of {}",
        ready_after.as_secs_f64(),
        st["preset"],
        f.queries.len(),
        queried.elapsed().as_secs_f64(),
        container_status(&build[0])["image"].as_str().unwrap_or("")
    )]
}

/// Scenario 2: the kernel OOM-kills `preset: full` under 56Mi; the next attempt resumes with
/// a poorer preset and succeeds.
fn oom(f: &Fixture) -> Vec<String> {
    let (ns, name) = ("e2e-oom", "oom");
    // Calibration: the policy must think full does not fit, something poorer does.
    let scan = json_of(&run(
        "indexer",
        &[
            "scan",
            f.oom_photos.to_str().unwrap(),
            "--json",
            "--memory-limit",
            OOM_LIMIT,
            "--threads",
            BUILD_CPU,
        ],
    ));
    let est = |preset: &str| {
        scan["estimates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["preset"] == preset)
            .and_then(|e| e["minMemory"].as_u64())
            .unwrap_or(0)
    };
    assert!(
        est("full") > OOM_LIMIT_BYTES
            && scan["estimates"].as_array().unwrap().iter().any(|e| e["minMemory"].as_u64() <= Some(OOM_LIMIT_BYTES)),
        "calibration: the memory estimates no longer put {OOM_LIMIT} between full and a poorer preset: {:#}",
        scan["estimates"]
    );
    dataset_namespace(&f.cluster, ns, &f.oom_photos);
    let t = Instant::now();
    let applied = SystemTime::now();
    f.cluster
        .apply(&imageindex(name, ns, "/", "full", OOM_LIMIT, OOM_CPU));
    let ii = f.wait_ready(ns, name, Duration::from_secs(300));
    let ready_after = t.elapsed();
    let st = &ii["status"];
    let attempts = st["attempts"].as_array().unwrap().clone();
    assert!(attempts.len() >= 2, "{st:#}");
    assert_eq!(attempts[0]["preset"], "full", "{st:#}");
    assert_eq!(attempts[0]["outcome"], "OOMKilled", "{st:#}");
    let last = attempts.last().unwrap();
    assert_eq!(last["outcome"], "Succeeded", "{st:#}");
    assert_ne!(last["preset"], "full", "{st:#}");
    // The first build pod's status is the kubelet's: OOMKilled, 137, never restarted.
    let first_pod = attempts[0]["pod"].as_str().unwrap();
    let pod = f.cluster.kubectl_json(&["get", "pod", first_pod, "-n", ns]);
    let cs = container_status(&pod);
    let term = &cs["state"]["terminated"];
    assert_eq!(
        (term["reason"].as_str(), term["exitCode"].as_i64()),
        (Some("OOMKilled"), Some(137)),
        "{pod:#}"
    );
    assert_eq!(pod["status"]["phase"], "Failed");
    assert_eq!(cs["restartCount"], 0);
    // The kernel did it: the OOM killer fired in that pod's cgroups, at the limit.
    let node = f.cluster.node();
    let container = node
        .container_memory(cs["containerID"].as_str().unwrap_or(""))
        .unwrap_or_else(|| panic!("the first attempt's container cgroup was never seen: {cs}"));
    let pod_cgroup = node
        .pod_memory(pod["metadata"]["uid"].as_str().unwrap_or(""))
        .expect("the first attempt's pod cgroup");
    let kills = node.oom_kills_of(cs["containerID"].as_str().unwrap_or(""));
    assert!(
        kills.iter().any(|k| k.task == "indexer" && k.uid == 65532),
        "the kernel logged no OOM kill of the first attempt's indexer (uid 65532): {kills:?} \
         (cgroups: {container:?} {pod_cgroup:?})"
    );
    assert_eq!(container.limit_bytes, OOM_LIMIT_BYTES, "{container:?}");
    // The kernel charges in per-CPU batches, so the recorded peak may pass the limit by a
    // few pages before the OOM killer acts.
    assert!(
        pod_cgroup.peak_bytes <= OOM_LIMIT_BYTES + (1 << 20),
        "the pod cgroup's peak {} is over the {OOM_LIMIT} limit: was the limit enforced? {pod_cgroup:?}",
        pod_cgroup.peak_bytes
    );
    // A Warning Event on the ImageIndex.
    let events = f.cluster.kubectl_json(&["get", "events", "-n", ns]);
    let warnings: Vec<String> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["involvedObject"]["kind"] == "ImageIndex" && e["type"] == "Warning")
        .map(|e| {
            format!(
                "{}: {}",
                e["reason"].as_str().unwrap_or(""),
                e["message"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert!(
        !warnings.is_empty(),
        "no Warning Event on the ImageIndex: {events:#}"
    );
    // The index it finally built serves.
    let addr = f.query_address(ns, name);
    let (status, answer) = search(addr, &std::fs::read(&f.photo_query.0).unwrap()).unwrap();
    assert_eq!(status, 200, "{answer}");
    let top = top_path(&answer);
    assert!(
        f.photo_query.1.iter().any(|a| top.ends_with(a.as_str())),
        "found {top}, not one of {:?}: {answer}",
        f.photo_query.1
    );

    let mut notes = vec![format!(
        "Ready {:.1} s after kubectl apply; Warning Events: {}",
        ready_after.as_secs_f64(),
        warnings
            .iter()
            .map(|w| w.split(':').next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(", ")
    )];
    let mut attempts_out = Vec::new();
    for a in &attempts {
        let pod_name = a["pod"].as_str().unwrap_or("");
        let pod = f
            .cluster
            .kubectl_json_opt(&["get", "pod", pod_name, "-n", ns])
            .unwrap_or_default();
        let cs = container_status(&pod);
        let term = &cs["state"]["terminated"];
        let container = node.container_memory(cs["containerID"].as_str().unwrap_or(""));
        let pod_cgroup = node.pod_memory(pod["metadata"]["uid"].as_str().unwrap_or(""));
        let kills = node.oom_kills_of(cs["containerID"].as_str().unwrap_or(""));
        notes.push(format!(
            "attempt {} preset {:<7} {:<10} {:>5.1} s  kubelet: {} exit {}; peak working set (status.attempts) {:>9}; kernel peak: container cgroup {:>9}, pod cgroup {:>9}; kernel OOM kills {}",
            a["number"],
            a["preset"].as_str().unwrap_or(""),
            a["outcome"].as_str().unwrap_or(""),
            seconds_between(&a["startTime"], &a["endTime"]).unwrap_or(f64::NAN),
            term["reason"].as_str().unwrap_or("-"),
            term["exitCode"],
            mib(&a["peakWorkingSet"]),
            container.as_ref().map_or("-".into(), |c| mib_of(c.peak_bytes)),
            pod_cgroup.as_ref().map_or("-".into(), |c| mib_of(c.peak_bytes)),
            if kills.is_empty() {
                "none".to_string()
            } else {
                kills
                    .iter()
                    .map(|k| format!(
                        "{} pid {} uid {} (anon-rss {}, out of memory in {})",
                        k.task,
                        k.pid,
                        k.uid,
                        k.anon_rss_bytes.map_or("-".into(), mib_of),
                        k.oom_memcg.rsplit('/').next().unwrap_or("")
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            },
        ));
        attempts_out.push(json!({
            "number": a["number"], "preset": a["preset"], "outcome": a["outcome"], "pod": pod_name,
            "startTime": a["startTime"], "endTime": a["endTime"], "peakWorkingSet": a["peakWorkingSet"],
            "kubelet": {"reason": term["reason"], "exitCode": term["exitCode"],
                "startedAt": term["startedAt"], "finishedAt": term["finishedAt"]},
            "kernel": {"containerPeakBytes": container.as_ref().map(|c| c.peak_bytes),
                "podPeakBytes": pod_cgroup.as_ref().map(|c| c.peak_bytes),
                "oomKills": kills.len()},
        }));
    }
    // What Prometheus recorded, as the dashboard's memory panel queries it, for the README's
    // picture (docs/oom-memory.py).
    let range = |expr: &str| {
        f.prometheus
            .query_range(expr, applied, SystemTime::now(), Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let working_set = range(&format!(
        "max by (pod) (imageindex_memory_working_set_bytes{{namespace=\"{ns}\", imageindex=\"{name}\"}})"
    ));
    let limit = range(&format!(
        "max by (pod) (imageindex_memory_limit_bytes{{namespace=\"{ns}\", imageindex=\"{name}\"}})"
    ));
    for a in &attempts {
        let pod = a["pod"].as_str().unwrap_or("");
        assert!(
            working_set
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["metric"]["pod"] == pod)),
            "Prometheus has no working set of {pod}: {working_set}"
        );
    }
    let out = out_dir();
    std::fs::create_dir_all(&out).unwrap();
    let path = out.join("oom-memory.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({
            "namespace": ns, "imageindex": name, "limit": OOM_LIMIT, "limitBytes": OOM_LIMIT_BYTES,
            "appliedAt": rfc3339(applied),
            "attempts": attempts_out,
            "workingSet": working_set, "limitSeries": limit,
        }))
        .unwrap(),
    )
    .unwrap();
    notes.push(format!(
        "Prometheus' working set and limit series written to {}",
        path.display()
    ));
    notes
}

/// Scenario 3: below the floor, Failed and Degraded with the limit and the smallest that
/// fits; no build pod, no crash loop.
fn floor(f: &Fixture) -> Vec<String> {
    let (ns, name) = ("e2e-floor", "too-small");
    dataset_namespace(&f.cluster, ns, &f.photos);
    f.cluster
        .apply(&imageindex(name, ns, "/", "auto", FLOOR_LIMIT, BUILD_CPU));
    let ii = wait_for(
        "the ImageIndex below the floor to fail",
        Duration::from_secs(120),
        || {
            let ii = f.imgidx(ns, name);
            (ii["status"]["phase"] == "Failed").then_some(ii)
        },
        || format!("{:#}", f.imgidx(ns, name)["status"]),
    );
    let st = &ii["status"];
    let degraded = st["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .cloned()
        .unwrap_or_default();
    assert_eq!(degraded["status"], "True", "{st:#}");
    let message = degraded["message"].as_str().unwrap_or("");
    assert!(
        message.contains(FLOOR_LIMIT),
        "the message does not name the limit: {message}"
    );
    let smallest = message
        .split("smallest limit that would fit is ")
        .nth(1)
        .map(|s| s.trim_end_matches('.').to_string())
        .unwrap_or_else(|| {
            panic!("the message does not name the smallest limit that fits: {message}")
        });
    assert!(
        st["attempts"].as_array().is_none_or(Vec::is_empty),
        "{st:#}"
    );
    // No crash loop: over a while, no build pod appears and the one scan pod stays alone.
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(15) {
        assert!(
            f.pods(ns, name, "build").is_empty(),
            "a build pod was made below the floor"
        );
        assert_eq!(
            f.pods(ns, name, "scan").len(),
            1,
            "scan pods were made again"
        );
        assert_eq!(f.imgidx(ns, name)["status"]["phase"], "Failed");
        std::thread::sleep(Duration::from_millis(500));
    }
    vec![format!(
        "Failed: {message} (smallest that fits: {smallest})"
    )]
}

/// A dashboard query with its Grafana variables filled in: (panel, legend, PromQL).
fn dashboard_queries(ns: &str, name: &str, range: Duration) -> Vec<(String, String, String)> {
    let path = repo().join("charts/imageindex-operator/dashboards/imageindex.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let fill = |expr: &str| {
        expr.replace("${namespace}", ns)
            .replace("$namespace", ns)
            .replace("${imageindex}", name)
            .replace("$imageindex", name)
            // Grafana's $__rate_interval: at least four scrape intervals; 20 s of 1 s scrapes.
            .replace("$__rate_interval", "20s")
            .replace("$__interval", "5s")
            .replace("$__range", &format!("{}s", range.as_secs().max(60)))
    };
    let mut out = Vec::new();
    // The template variables: label_values(METRIC, LABEL) lists LABEL's values of METRIC.
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let q = v["query"]["query"].as_str().or(v["query"].as_str());
        if let Some(inner) = q.and_then(|q| q.strip_prefix("label_values(")) {
            let inner = inner.trim_end_matches(')');
            if let Some((metric, label)) = inner.rsplit_once(',') {
                out.push((
                    format!("variable {}", v["name"].as_str().unwrap_or("")),
                    label.trim().to_string(),
                    fill(&format!("group by ({}) ({metric})", label.trim())),
                ));
            }
        }
    }
    fn panels(list: &Value, out: &mut Vec<Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p.clone());
            panels(&p["panels"], out);
        }
    }
    let mut all = Vec::new();
    panels(&dashboard["panels"], &mut all);
    for p in all {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push((
                    p["title"].as_str().unwrap_or("").to_string(),
                    t["legendFormat"].as_str().unwrap_or("").to_string(),
                    fill(expr),
                ));
            }
        }
    }
    out
}

/// Evaluates every dashboard query for ImageIndex `ns/name` until each returns data (or
/// `timeout`); one line per query with what it returned, and the queries that returned
/// nothing.
fn evaluate_dashboard(
    f: &Fixture,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> (Vec<String>, Vec<String>) {
    let range = f.started.elapsed().unwrap_or_default();
    // The per-shard memory panel selects shard build pods (`shard!=""`): an unsharded
    // index (the one evaluated here) has none, so it is left out.
    let queries: Vec<(String, String, String)> = dashboard_queries(ns, name, range)
        .into_iter()
        .filter(|(_, _, expr)| !expr.contains("shard!=\"\""))
        .collect();
    assert!(queries.len() >= 20, "{queries:#?}");
    let start = Instant::now();
    let mut answered: BTreeMap<usize, String> = BTreeMap::new();
    loop {
        for (i, (panel, legend, expr)) in queries.iter().enumerate() {
            if answered.contains_key(&i) {
                continue;
            }
            let result = f
                .prometheus
                .query(expr)
                .unwrap_or_else(|e| panic!("{panel}: {e}"));
            let series = result.as_array().cloned().unwrap_or_default();
            let mut wanted = !series.is_empty();
            if panel.starts_with("variable ") {
                // Our namespace or ImageIndex must be among the variable's values.
                wanted = series.iter().any(|s| {
                    s["metric"][legend.as_str()] == ns || s["metric"][legend.as_str()] == name
                });
            }
            if wanted {
                let shown: Vec<String> = series
                    .iter()
                    .take(4)
                    .map(|s| {
                        let labels: Vec<String> = s["metric"]
                            .as_object()
                            .into_iter()
                            .flatten()
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                            .collect();
                        let value: f64 = s["value"][1]
                            .as_str()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(f64::NAN);
                        format!("{{{}}} {}", labels.join(","), format_value(value))
                    })
                    .collect();
                answered.insert(
                    i,
                    format!(
                        "{panel} [{legend}]: {} series: {}{}",
                        series.len(),
                        shown.join("; "),
                        if series.len() > 4 { "; ..." } else { "" }
                    ),
                );
            }
        }
        if answered.len() == queries.len() || start.elapsed() > timeout {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let empty = queries
        .iter()
        .enumerate()
        .filter(|(i, _)| !answered.contains_key(i))
        .map(|(_, (panel, legend, expr))| format!("{panel} [{legend}]: {expr}"))
        .collect();
    (answered.into_values().collect(), empty)
}

fn format_value(v: f64) -> String {
    if v.abs() >= 1048576.0 {
        format!("{:.1} MiB", v / 1048576.0)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

/// Scenario 4: a rebuild while queries run; the new generation is swapped in without a failed
/// query. During the rebuild's build, every dashboard query returns data and the alert rules
/// evaluate.
fn rebuild(f: &Fixture) -> Vec<String> {
    let (ns, name) = ("e2e-serve", "catalogue");
    let before = f.imgidx(ns, name);
    assert_eq!(
        before["status"]["phase"], "Ready",
        "needs scenario 1's ImageIndex"
    );
    let addr = f.query_address(ns, name);
    let generation = get_json(addr, "/v1/index").unwrap()["generation"]
        .as_u64()
        .unwrap();
    // (when, generation, top match right) or the error of every query.
    type Answers = Vec<(Instant, Result<(u64, bool), String>)>;
    let answers: Arc<Mutex<Vec<Answers>>> = Arc::new(Mutex::new(vec![Vec::new(), Vec::new()]));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..2)
        .map(|i| {
            let (answers, stop) = (answers.clone(), stop.clone());
            let queries: Vec<(Vec<u8>, String)> = f
                .queries
                .iter()
                .map(|(q, w)| (std::fs::read(q).unwrap(), w.clone()))
                .collect();
            std::thread::spawn(move || {
                let mut n = i;
                while !stop.load(Ordering::Relaxed) {
                    let (bytes, want) = &queries[n % queries.len()];
                    n += 1;
                    let result = match search(addr, bytes) {
                        Ok((200, a)) => Ok((
                            a["generation"].as_u64().unwrap_or(0),
                            top_path(&a).ends_with(want.as_str()),
                        )),
                        Ok((status, a)) => Err(format!("status {status}: {a}")),
                        Err(e) => Err(e),
                    };
                    answers.lock().unwrap()[i].push((Instant::now(), result));
                }
            })
        })
        .collect();
    let count = |gen: u64| -> usize {
        answers
            .lock()
            .unwrap()
            .iter()
            .map(|a| {
                a.iter()
                    .filter(|(_, r)| matches!(r, Ok((g, _)) if *g == gen))
                    .count()
            })
            .min()
            .unwrap_or(0)
    };
    wait_for(
        "answers before the rebuild",
        Duration::from_secs(60),
        || (count(generation) >= 2).then_some(()),
        String::new,
    );
    let t = Instant::now();
    f.cluster.kubectl(&[
        "patch",
        "imgidx",
        name,
        "-n",
        ns,
        "--type",
        "merge",
        "-p",
        &format!(r#"{{"spec":{{"rebuild":"r2","cpu":"{REBUILD_CPU}"}}}}"#),
    ]);
    let next = generation + 1;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // The dashboard, while the rebuild's build runs and the clients query.
        wait_for(
            "the rebuild's build pod to run and report progress",
            Duration::from_secs(120),
            || {
                let running = f.pods(ns, name, "build").iter().any(|p| {
                    p["metadata"]["labels"]["imagematch.dev/attempt"] != "1"
                        && !container_status(p)["state"]["running"].is_null()
                });
                let scraped = f
                    .prometheus
                    .query(&format!(
                        "imageindex_images_processed_total{{namespace=\"{ns}\", imageindex=\"{name}\", component=\"build\", attempt!=\"1\"}} > 0"
                    ))
                    .ok()
                    .and_then(|r| r.as_array().map(|a| !a.is_empty()))
                    .unwrap_or(false);
                (running && scraped).then_some(())
            },
            || format!("{:#}", f.imgidx(ns, name)["status"]),
        );
        let (dashboard, empty) = evaluate_dashboard(f, ns, name, Duration::from_secs(20));
        let rules = f.prometheus.rules().unwrap_or_else(|e| panic!("{e}"));
        wait_for(
            "the rebuilt generation to be Ready and served",
            Duration::from_secs(300),
            || {
                let st = f.imgidx(ns, name)["status"].clone();
                let served = get_json(addr, "/v1/index").ok()?["generation"].as_u64();
                (st["phase"] == "Ready"
                    && st["rebuild"] == "r2"
                    && st["indexGeneration"].as_u64() == Some(next)
                    && served == Some(next))
                .then_some(())
            },
            || format!("{:#}", f.imgidx(ns, name)["status"]),
        );
        let swapped = t.elapsed();
        wait_for(
            "answers from the new generation",
            Duration::from_secs(60),
            || (count(next) >= 3).then_some(()),
            String::new,
        );
        (swapped, dashboard, empty, rules)
    }));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let (swapped, dashboard, empty, rules) = match result {
        Ok(s) => s,
        Err(e) => std::panic::resume_unwind(e),
    };
    let answers = answers.lock().unwrap();
    let mut notes = Vec::new();
    for (i, client) in answers.iter().enumerate() {
        let errors: Vec<&String> = client
            .iter()
            .filter_map(|(_, r)| r.as_ref().err())
            .collect();
        assert!(
            errors.is_empty(),
            "client {i}: {} failed queries during the rebuild: {errors:?}",
            errors.len()
        );
        let gens: Vec<u64> = client
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok().map(|(g, _)| *g))
            .collect();
        assert!(
            gens.windows(2).all(|w| w[0] <= w[1]),
            "client {i} saw generations go back: {gens:?}"
        );
        assert!(
            client.iter().all(|(_, r)| matches!(r, Ok((_, true)))),
            "client {i} got a wrong top match"
        );
        let old = gens.iter().filter(|g| **g == generation).count();
        notes.push(format!(
            "client {i}: {} queries, {old} answered by generation {generation}, {} by {next}, none failed",
            gens.len(),
            gens.len() - old
        ));
    }
    assert_eq!(
        f.cluster
            .service_address(&format!("http://{name}-query.{ns}.svc:8080")),
        Some(addr),
        "the query pod was replaced"
    );
    notes.insert(
        0,
        format!(
            "generation {next} served {:.1} s after the rebuild trigger, by the same query pod",
            swapped.as_secs_f64()
        ),
    );
    // Every dashboard query returned data during the build.
    assert!(
        empty.is_empty(),
        "dashboard queries without data during a build:\n{}\n(answered: {dashboard:#?})",
        empty.join("\n")
    );
    notes.push(format!(
        "all {} dashboard queries returned data during the rebuild:",
        dashboard.len()
    ));
    notes.extend(dashboard.iter().map(|d| format!("  {d}")));
    // The chart's alert rules are loaded and evaluate without error.
    let loaded: Vec<&Value> = rules
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    assert_eq!(loaded.len(), 3, "{rules:#?}");
    for r in &loaded {
        assert_eq!(
            r["health"], "ok",
            "rule {} does not evaluate: {r:#}",
            r["name"]
        );
    }
    notes.push(format!(
        "alert rules loaded and evaluating: {}",
        loaded
            .iter()
            .map(|r| format!(
                "{} ({})",
                r["name"].as_str().unwrap_or(""),
                r["state"].as_str().unwrap_or("")
            ))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    notes
}

/// Scenario 5: the operator's pod is deleted mid-build; its replacement adopts the running
/// build.
fn adopt(f: &Fixture) -> Vec<String> {
    let (ns, name) = ("e2e-adopt", "adopt");
    dataset_namespace(&f.cluster, ns, &f.photos);
    // A CPU limit of 100m (the kubelet's CFS quota) makes the full build of the photos last
    // long enough to replace the operator in the middle of it.
    f.cluster
        .apply(&imageindex(name, ns, "/", "full", "512Mi", ADOPT_CPU));
    let (build_pod, build_uid, container_id, processed_at_delete, total) = wait_for(
        "the build to be running and making progress",
        Duration::from_secs(180),
        || {
            let st = f.imgidx(ns, name)["status"].clone();
            let processed = st["progress"]["processed"].as_u64().unwrap_or(0);
            let total = st["progress"]["total"].as_u64().unwrap_or(0);
            let pods = f.pods(ns, name, "build");
            let pod = pods.first()?;
            let running = !container_status(pod)["state"]["running"].is_null();
            (st["phase"] == "Building" && processed >= 1 && processed < total && running).then(
                || {
                    (
                        pod["metadata"]["name"].as_str().unwrap().to_string(),
                        pod["metadata"]["uid"].as_str().unwrap().to_string(),
                        container_status(pod)["containerID"]
                            .as_str()
                            .unwrap_or("")
                            .to_string(),
                        processed,
                        total,
                    )
                },
            )
        },
        || format!("{:#}", f.imgidx(ns, name)["status"]),
    );
    let (old_op, old_uid, _) = f.operator_pod().expect("the operator's pod");
    // Its log, for the RBAC check at the end (the pod and its log go with the deletion).
    let log = f
        .cluster
        .kubectl_output(&["logs", &old_op, "-n", OPERATOR_NS]);
    f.operator_logs.lock().unwrap().push((
        old_op.clone(),
        String::from_utf8_lossy(&log.stdout).into_owned(),
    ));
    let t = Instant::now();
    f.cluster
        .kubectl(&["delete", "pod", &old_op, "-n", OPERATOR_NS, "--wait=false"]);
    let new_op = wait_for(
        "the replacement operator pod to be Ready",
        Duration::from_secs(120),
        || {
            f.operator_pod()
                .filter(|(_, uid, ready)| *uid != old_uid && *ready)
        },
        String::new,
    );
    let replaced_after = t.elapsed();
    // The build is still the same pod, still running, when the replacement takes over.
    let pods = f.pods(ns, name, "build");
    assert_eq!(pods.len(), 1, "{pods:#?}");
    assert_eq!(pods[0]["metadata"]["uid"], build_uid.as_str());
    assert!(
        !container_status(&pods[0])["state"]["running"].is_null(),
        "the build ended before the replacement operator was ready: slow it down further \
         (CPU limit) so that adoption of a running build is tested: {:#}",
        pods[0]["status"]
    );
    let processed_at_takeover = f.imgidx(ns, name)["status"]["progress"]["processed"]
        .as_u64()
        .unwrap_or(0);
    let ii = f.wait_ready(ns, name, Duration::from_secs(400));
    let st = &ii["status"];
    let attempts = st["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{st:#}");
    assert_eq!(attempts[0]["outcome"], "Succeeded", "{st:#}");
    assert_eq!(attempts[0]["pod"], build_pod.as_str(), "{st:#}");
    let pods = f.pods(ns, name, "build");
    assert_eq!(pods.len(), 1, "a duplicate build pod: {pods:#?}");
    assert_eq!(pods[0]["metadata"]["uid"], build_uid.as_str());
    // One container ran the build from start to end: never restarted, never replaced.
    let cs = container_status(&pods[0]);
    assert_eq!(cs["restartCount"], 0, "{cs}");
    assert_eq!(cs["containerID"], container_id.as_str(), "{cs}");
    // The old pod goes once the kubelet has reclaimed its resources (its housekeeping, seconds
    // after the container stopped: on a loaded machine later than the build's end).
    wait_for(
        "the old operator pod to be gone",
        Duration::from_secs(60),
        || {
            (!f.cluster
                .kubectl_output(&["get", "pod", &old_op, "-n", OPERATOR_NS])
                .status
                .success())
            .then_some(())
        },
        || format!("the old operator pod {old_op} is still there"),
    );
    let log = f
        .cluster
        .kubectl_output(&["logs", &new_op.0, "-n", OPERATOR_NS]);
    let log = String::from_utf8_lossy(&log.stdout);
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the operator was refused something:\n{log}"
    );
    let build_secs =
        seconds_between(&attempts[0]["startTime"], &attempts[0]["endTime"]).unwrap_or(f64::NAN);
    vec![format!(
        "operator {old_op} deleted at {processed_at_delete}/{total} images built; replacement {} \
         Ready {:.1} s later (status then said {processed_at_takeover}/{total}, build pod still running) \
         and adopted {build_pod} (same uid, same container, never restarted); the build took {build_secs:.1} s under cpu {ADOPT_CPU}",
        new_op.0,
        replaced_after.as_secs_f64()
    )]
}

/// Scenario 6: a sharded ImageIndex (`shards: 3`, `preset: full`) through the chart's
/// operator: three build pods at once, the shard holding the large photos OOM-killed by the
/// kernel and retried alone with a poorer preset, the router answering as an unsharded index,
/// a shard's query pod lost and replaced (coverage 2/3, Degraded/ShardUnavailable, then 3/3
/// and AllShardsServing), and everything owned gone with the ImageIndex.
fn sharded(f: &Fixture) -> Vec<String> {
    use indexer::shard::shard_of;
    let (ns, name) = ("e2e-sharded", "sharded");
    // The dataset: SHARDED_LARGE 4000 px photos named so that they all land in shard
    // LARGE_SHARD, and a copy of every catalogue image named so that it lands in another.
    let dir = f._data.path().join("sharded-claim");
    std::fs::create_dir_all(&dir).unwrap();
    let mut sources: Vec<PathBuf> = std::fs::read_dir(sample_catalogue())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    sources.sort();
    // make_photos draws photo i from the sorted sample JPEGs in turn: the large photos'
    // sources stay out of the dataset (a query of either would have two right answers).
    let jpegs: Vec<String> = sources
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let mut large_sources: Vec<&String> = SHARDED_LARGE_PHOTOS
        .iter()
        .map(|i| &jpegs[i % jpegs.len()])
        .collect();
    large_sources.push(&jpegs[PANORAMA_SOURCE]);
    // (file in the dataset, what it is made of)
    let mut large = Vec::new();
    for k in 0.. {
        if large.len() == SHARDED_LARGE {
            break;
        }
        let n = format!("large_{k:03}.jpg");
        if shard_of(&n, 3) != LARGE_SHARD {
            continue;
        }
        if let Some(i) = SHARDED_LARGE_PHOTOS.get(large.len()) {
            let photo = format!("photo_{i:03}.jpg");
            std::fs::hard_link(f.photos.join(&photo), dir.join(&n)).unwrap();
            large.push((n, photo));
        } else {
            let src = &jpegs[PANORAMA_SOURCE];
            resized(
                &sample_catalogue().join(src),
                &dir.join(&n),
                PANORAMA.0,
                Some(PANORAMA.1),
            );
            large.push((
                n,
                format!("a {}x{} panorama of {src}", PANORAMA.0, PANORAMA.1),
            ));
        }
    }
    assert!(
        SHARDED_QUERIES
            .iter()
            .all(|q| !large_sources.iter().any(|s| s == q)),
        "{large_sources:?}"
    );
    // catalogue file name -> its copy in the dataset
    let mut copies = BTreeMap::new();
    let mut per_shard = [0usize; 3];
    for src in &sources {
        let file = src.file_name().unwrap().to_string_lossy().into_owned();
        if large_sources.contains(&&file) {
            continue;
        }
        let (stem, ext) = file.rsplit_once('.').unwrap();
        let copy = (0..)
            .map(|j| format!("{stem}_c{j}.{ext}"))
            .find(|c| shard_of(c, 3) != LARGE_SHARD)
            .unwrap();
        per_shard[shard_of(&copy, 3) as usize] += 1;
        std::fs::copy(src, dir.join(&copy)).unwrap();
        copies.insert(file, copy);
    }
    per_shard[LARGE_SHARD as usize] = large.len();
    assert!(per_shard.iter().all(|n| *n > 0), "{per_shard:?}");
    // Queries: attacked copies of catalogue images, and a downscaled large photo; each with
    // the dataset file that is the right answer.
    let qdir = f._data.path().join("sharded-queries");
    let mut queries: Vec<(PathBuf, String)> = Vec::new();
    for src in SHARDED_QUERIES {
        for q in attacked_copies(&sample_catalogue().join(src), &qdir) {
            queries.push((q, copies[*src].clone()));
        }
    }
    let (big_name, big_photo) = &large[1];
    let big_query = qdir.join("large_downscaled.jpg");
    downscaled(&f.photos.join(big_photo), &big_query, 1200);
    queries.push((big_query, big_name.clone()));

    // Each shard is sized by its own largest image: the scan lists the largest with their
    // path keys, and only the large photos' shard gets their floor.
    let scan = json_of(&run(
        "indexer",
        &["scan", dir.to_str().unwrap(), "--json", "--threads", "1"],
    ));
    let report: imageindex_crds::ScanReport = serde_json::from_value(scan).unwrap();
    let summary = imageindex_crds::types::ScanSummary::from_report(&report);
    let poorest = imageindex_crds::Preset::ladder().last().copied().unwrap();
    let full = imageindex_crds::PresetName::Full.preset();
    let floors: Vec<(u64, u64)> = (0..3)
        .map(|i| {
            let shape = imageindex_crds::shards::shard_scan(&summary, 3, Some(i)).shape();
            (
                imageindex_crds::estimate::min_memory(&poorest, &shape),
                imageindex_crds::estimate::min_memory(&full, &shape),
            )
        })
        .collect();
    let (large_floor, large_full) = floors[LARGE_SHARD as usize];
    assert_eq!(
        (summary.max_width, summary.max_height),
        (PANORAMA.0 as u32, PANORAMA.1 as u32),
        "the panorama is the largest image by pixels"
    );
    assert!(
        large_floor <= SHARD_LIMIT_BYTES && large_full > SHARD_LIMIT_BYTES,
        "calibration: the large photos' shard no longer has {SHARD_LIMIT} between its floor and full: {floors:?}"
    );
    // The small images' shards: `full` fits them by the estimate (by the whole's largest image
    // it would need as much as the large photos' shard).
    for (i, (_, full)) in floors.iter().enumerate() {
        if i as u32 != LARGE_SHARD {
            assert!(
                *full <= SHARD_LIMIT_BYTES,
                "shard {i} is sized by another shard's photos: {floors:?}"
            );
        }
    }
    let floor_note = format!(
        "each shard's floor (poorest preset) / full estimate from its own largest image: {}",
        floors
            .iter()
            .enumerate()
            .map(|(i, (a, b))| format!("shard {i} {} / {}", mib_of(*a), mib_of(*b)))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // The unsharded index of the same dataset, built on the host (no limit).
    let local = f._data.path().join("sharded-local-index");
    let t = Instant::now();
    stdout_of_success(
        &run(
            "indexer",
            &[
                "build",
                dir.to_str().unwrap(),
                "--out",
                local.to_str().unwrap(),
                "--preset",
                "full",
            ],
        ),
        "indexer build (unsharded, local)",
    );
    let local_build = t.elapsed();
    let mut args = vec!["search", local.to_str().unwrap(), "--json", "-k", "5"];
    let paths: Vec<&str> = queries.iter().map(|(q, _)| q.to_str().unwrap()).collect();
    args.extend(&paths);
    let unsharded = json_of(&run("indexer", &args));
    let unsharded = unsharded.as_array().unwrap().clone();
    assert_eq!(unsharded.len(), queries.len());

    dataset_namespace(&f.cluster, ns, &dir);
    let t = Instant::now();
    f.cluster.apply(&format!(
        "apiVersion: imagematch.dev/v1alpha1
kind: ImageIndex
metadata:
  name: {name}
  namespace: {ns}
spec:
  dataset:
    claimName: photos
    path: /
  shards: 3
  preset: full
  memoryLimit: {SHARD_LIMIT}
  cpu: \"{SHARD_BUILD_CPU}\"
  storage:
    size: 1Gi
  query:
    replicas: 1
    cpu: {QUERY_CPU}
  maxAttempts: 6
"
    ));
    let ii = f.wait_ready(ns, name, Duration::from_secs(300));
    let ready_after = t.elapsed();
    let st = &ii["status"];
    assert_eq!(st["shardsReady"], "3/3", "{st:#}");
    let shards = st["shards"].as_array().cloned().unwrap_or_default();
    assert_eq!(shards.len(), 3, "{st:#}");
    let mut notes = vec![format!(
        "dataset: {} small images in shards {}/{} ({} and {}), {} large photos in shard {LARGE_SHARD} ({:?}); \
         Ready {:.1} s after kubectl apply, shardsReady {}",
        copies.len(),
        (LARGE_SHARD + 1) % 3,
        (LARGE_SHARD + 2) % 3,
        per_shard[((LARGE_SHARD + 1) % 3) as usize],
        per_shard[((LARGE_SHARD + 2) % 3) as usize],
        large.len(),
        large,
        ready_after.as_secs_f64(),
        st["shardsReady"]
    )];
    notes.push(floor_note);
    // Each shard's attempts: the large one OOMKilled with full then a poorer preset, the
    // others one full build.
    let mut first_pods = Vec::new();
    for s in &shards {
        let i = s["shard"].as_u64().unwrap() as u32;
        let attempts = s["attempts"].as_array().cloned().unwrap_or_default();
        assert!(!attempts.is_empty(), "{s:#}");
        assert_eq!(attempts[0]["preset"], "full", "shard {i}: {s:#}");
        let last = attempts.last().unwrap();
        assert_eq!(last["outcome"], "Succeeded", "shard {i}: {s:#}");
        if i == LARGE_SHARD {
            assert_eq!(attempts[0]["outcome"], "OOMKilled", "shard {i}: {s:#}");
            assert!(attempts.len() >= 2, "shard {i}: {s:#}");
            assert_ne!(last["preset"], "full", "shard {i}: {s:#}");
            assert_eq!(
                s["preset"], last["preset"],
                "the status says which preset: {s:#}"
            );
        } else {
            assert_eq!(attempts.len(), 1, "shard {i} restarted: {s:#}");
            assert_eq!(s["preset"], "full", "shard {i}: {s:#}");
        }
        for a in &attempts {
            let pod_name = a["pod"].as_str().unwrap_or("");
            assert!(
                pod_name.starts_with(&format!("{name}-s{i}-build-")),
                "{pod_name}"
            );
            let pod = f
                .cluster
                .kubectl_json_opt(&["get", "pod", pod_name, "-n", ns])
                .unwrap_or_default();
            let term = container_status(&pod)["state"]["terminated"].clone();
            notes.push(format!(
                "shard {i} attempt {} preset {:<7} {:<10} pod {pod_name}: container {} .. {} ({:.1} s status.attempts) {} exit {}; peak working set {}",
                a["number"],
                a["preset"].as_str().unwrap_or(""),
                a["outcome"].as_str().unwrap_or(""),
                term["startedAt"].as_str().unwrap_or("-"),
                term["finishedAt"].as_str().unwrap_or("-"),
                seconds_between(&a["startTime"], &a["endTime"]).unwrap_or(f64::NAN),
                term["reason"].as_str().unwrap_or("-"),
                term["exitCode"],
                mib(&a["peakWorkingSet"]),
            ));
            if a == &attempts[0] {
                assert_eq!(
                    pod["metadata"]["labels"]["imagematch.dev/shard"],
                    i.to_string(),
                    "{pod:#}"
                );
                if i == LARGE_SHARD {
                    assert_eq!(
                        (term["reason"].as_str(), term["exitCode"].as_i64()),
                        (Some("OOMKilled"), Some(137)),
                        "{pod:#}"
                    );
                    // The kernel did it, in that pod's container.
                    let kills = f
                        .cluster
                        .node()
                        .oom_kills_of(container_status(&pod)["containerID"].as_str().unwrap_or(""));
                    assert!(
                        kills.iter().any(|k| k.task == "indexer"),
                        "the kernel logged no OOM kill of shard {i}'s first build: {kills:?}"
                    );
                    notes.push(format!(
                        "shard {i}: the kernel's OOM kill of its first build: {kills:?}"
                    ));
                } else {
                    assert_eq!(
                        (term["reason"].as_str(), term["exitCode"].as_i64()),
                        (Some("Completed"), Some(0)),
                        "{pod:#}"
                    );
                }
                first_pods.push((i, term));
            }
        }
    }
    // The three first build pods ran at the same time: each started before any ended (the
    // kubelet's container times, whole seconds).
    let latest_start = first_pods
        .iter()
        .filter_map(|(_, t)| t["startedAt"].as_str())
        .max()
        .unwrap_or("")
        .to_string();
    let earliest_end = first_pods
        .iter()
        .filter_map(|(_, t)| t["finishedAt"].as_str())
        .min()
        .unwrap_or("")
        .to_string();
    assert!(
        first_pods.len() == 3 && !latest_start.is_empty() && latest_start <= earliest_end,
        "the three first build pods did not run at once: {first_pods:#?}"
    );
    notes.push(format!(
        "the three first build pods ran at once: the last started {latest_start}, the first ended {earliest_end}"
    ));
    // Queries through the router: the Service's endpoint and its ClusterIP.
    let addr = f.query_address(ns, name);
    let svc = f
        .cluster
        .kubectl_json(&["get", "service", &format!("{name}-query"), "-n", ns]);
    let cluster_ip: std::net::IpAddr = svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
    let via_proxy = std::net::SocketAddr::new(cluster_ip, 8080);
    // Ready can come before the router's next poll of a shard whose query pod started after
    // its last one: wait (at most a few poll intervals) until it has seen all three up.
    let polled = Instant::now();
    wait_for(
        &format!("the router's ClusterIP {via_proxy} (kube-proxy) with every shard up"),
        Duration::from_secs(30),
        || {
            get_json(via_proxy, "/v1/index")
                .ok()
                .filter(|j| j["shards_total"] == 3 && j["shards_up"] == 3)
        },
        || f.cluster.node().log_tail("kube-proxy", 20),
    );
    notes.push(format!(
        "the router saw all 3 shards up {:.1} s after Ready",
        polled.elapsed().as_secs_f64()
    ));
    let file_of = |p: &str| p.rsplit('/').next().unwrap_or("").to_string();
    let (mut agree, mut correct) = (0, 0);
    let mut disagreements = Vec::new();
    let queried = Instant::now();
    for (i, ((q, want), local)) in queries.iter().zip(&unsharded).enumerate() {
        let to = if i % 2 == 0 { addr } else { via_proxy };
        let (status, answer) = search(to, &std::fs::read(q).unwrap()).unwrap();
        assert_eq!(status, 200, "{}: {answer}", q.display());
        assert_eq!(
            (
                answer["coverage"]["asked"].as_u64(),
                answer["coverage"]["answered"].as_u64()
            ),
            (Some(3), Some(3)),
            "{}: {answer}",
            q.display()
        );
        let top = file_of(&top_path(&answer));
        let local_top = file_of(&top_path(local));
        if top == local_top {
            agree += 1;
        } else {
            disagreements.push(format!(
                "{}: router {top}, unsharded {local_top}",
                q.display()
            ));
        }
        if top == *want {
            correct += 1;
        }
    }
    let n = queries.len() as f64;
    let (agreement, recall) = (agree as f64 / n, correct as f64 / n);
    notes.push(format!(
        "{} queries ({} attacked copies, 1 downscaled large photo) through the router ({addr} endpoint, \
         {via_proxy} ClusterIP) in {:.1} s, coverage 3/3 each: top-1 agreement with the unsharded \
         index built on the host ({:.1} s) {agree}/{} = {agreement:.3}, recall@1 {correct}/{} = {recall:.3}{}",
        queries.len(),
        queries.len() - 1,
        queried.elapsed().as_secs_f64(),
        local_build.as_secs_f64(),
        queries.len(),
        queries.len(),
        if disagreements.is_empty() {
            String::new()
        } else {
            format!("; disagreements: {}", disagreements.join("; "))
        }
    ));
    assert!(
        agreement >= 0.98,
        "agreement {agreement}: {disagreements:?}"
    );
    assert!(recall >= 0.98, "recall@1 {recall}");

    // A shard's query pod is lost: the router answers without it (2/3, partial) within its
    // deadline, the ImageIndex is Degraded/ShardUnavailable until the replacement is ready.
    let degraded = |ii: &Value| -> (String, String) {
        let c = ii["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Degraded").cloned())
            .unwrap_or_default();
        (
            c["status"].as_str().unwrap_or("").to_string(),
            c["reason"].as_str().unwrap_or("").to_string(),
        )
    };
    let probe = std::fs::read(&queries[0].0).unwrap();
    let down_shard = (LARGE_SHARD + 1) % 3;
    let selector = format!("imagematch.dev/shard={down_shard},{COMPONENT}=shard,{INSTANCE}={name}");
    let old_pod = f
        .cluster
        .kubectl_json(&["get", "pods", "-n", ns, "-l", &selector])["items"][0]["metadata"]["uid"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let t = Instant::now();
    f.cluster
        .kubectl(&["delete", "pod", "-n", ns, "-l", &selector, "--wait=false"]);
    // Poll queries and the status until coverage is back to 3/3 and Degraded cleared.
    let mut partial_at: Option<(f64, u128)> = None;
    let mut slowest_partial_ms = 0u128;
    let mut partial_answers = 0;
    let mut degraded_at: Option<f64> = None;
    let mut held = false;
    let mut hold_used = false;
    let back_at = loop {
        let elapsed = t.elapsed().as_secs_f64();
        assert!(
            elapsed < 180.0,
            "coverage and Degraded did not recover within 180 s: {:#}",
            f.imgidx(ns, name)["status"]
        );
        let sent = Instant::now();
        let (status, answer) = search(addr, &probe).unwrap();
        let ms = sent.elapsed().as_millis();
        assert_eq!(status, 200, "{answer}");
        assert!(
            ms < 3000,
            "answered in {ms} ms, past the router's 2 s deadline: {answer}"
        );
        let answered = answer["coverage"]["answered"].as_u64().unwrap_or(0);
        if answered == 2 {
            assert!(
                answer["warnings"]
                    .as_array()
                    .is_some_and(|w| w.iter().any(|w| w["code"] == "partial")),
                "{answer}"
            );
            partial_answers += 1;
            slowest_partial_ms = slowest_partial_ms.max(ms);
            partial_at.get_or_insert((elapsed, ms));
        } else {
            assert_eq!(answered, 3, "{answer}");
        }
        let ii = f.imgidx(ns, name);
        let (d, reason) = degraded(&ii);
        if d == "True" && reason == "ShardUnavailable" {
            degraded_at.get_or_insert(elapsed);
        }
        if (degraded_at.is_none() || partial_at.is_none()) && elapsed > 20.0 && !hold_used {
            // The replacement came up before both were seen: hold the shard down with a
            // node selector nothing matches (the operator's server-side apply leaves a field
            // it does not set alone; the Deployment is Recreate, so its pod goes and its
            // replacement stays Pending).
            held = true;
            hold_used = true;
            f.cluster.kubectl(&[
                "patch", "deployment", &format!("{name}-shard-{down_shard}"), "-n", ns,
                "--type", "merge", "-p",
                r#"{"spec":{"template":{"spec":{"nodeSelector":{"e2e.imagematch.dev/hold":"down"}}}}}"#,
            ]);
        }
        if held && degraded_at.is_some() && partial_at.is_some() {
            held = false;
            f.cluster.kubectl(&[
                "patch", "deployment", &format!("{name}-shard-{down_shard}"), "-n", ns,
                "--type", "json", "-p",
                r#"[{"op":"remove","path":"/spec/template/spec/nodeSelector/e2e.imagematch.dev~1hold"}]"#,
            ]);
        }
        if !held && degraded_at.is_some() && partial_at.is_some() && answered == 3 && d == "False" {
            assert_eq!(reason, "AllShardsServing", "{:#}", ii["status"]);
            assert_eq!(ii["status"]["shardsReady"], "3/3", "{:#}", ii["status"]);
            break elapsed;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let pods = f
        .cluster
        .kubectl_json(&["get", "pods", "-n", ns, "-l", &selector])["items"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        pods.iter().any(|p| p["metadata"]["uid"] != old_pod.as_str()
            && p["metadata"]["deletionTimestamp"].is_null()),
        "no replacement shard pod: {pods:#?}"
    );
    let events = f.cluster.kubectl_json(&["get", "events", "-n", ns]);
    let shard_events: Vec<String> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["involvedObject"]["kind"] == "ImageIndex")
        .filter_map(|e| e["reason"].as_str())
        .filter(|r| *r == "ShardUnavailable" || *r == "AllShardsServing")
        .map(String::from)
        .collect();
    let (partial_after, first_ms) = partial_at.unwrap();
    notes.push(format!(
        "shard {down_shard}'s query pod deleted{}: first 2/3 answer (partial warning) {partial_after:.1} s later in {first_ms} ms, \
         {partial_answers} partial answers, slowest {slowest_partial_ms} ms (router deadline 2 s); Degraded/ShardUnavailable seen \
         after {:.1} s; coverage 3/3 and Degraded False/AllShardsServing after {:.1} s; events: {}",
        if hold_used {
            " (its replacement held Pending by a node selector until both were seen)"
        } else {
            ""
        },
        degraded_at.unwrap(),
        back_at,
        shard_events.join(", ")
    ));

    // Deleting the ImageIndex removes every object it owned.
    let owned = format!("{INSTANCE}={name}");
    let t = Instant::now();
    f.cluster
        .kubectl(&["delete", "imgidx", name, "-n", ns, "--wait=false"]);
    wait_for(
        "every object the sharded ImageIndex owned to be gone",
        Duration::from_secs(120),
        || {
            let left = owned_left(f, ns, &owned);
            let claims = f.cluster.kubectl(&["get", "pvc", "-n", ns, "-o", "name"]);
            (left.trim().is_empty() && claims.trim() == "persistentvolumeclaim/photos")
                .then_some(())
        },
        || f.cluster.kubectl(&["get", "all,pvc", "-n", ns]),
    );
    notes.push(format!(
        "all owned objects (build pods, 3 shard Deployments and Services, the router, 3 claims) gone {:.1} s after kubectl delete",
        t.elapsed().as_secs_f64()
    ));
    notes
}

/// Scenario 7: deleting the ImageIndex removes every object it owned, and the kubelet every
/// container and cgroup of its pods.
fn delete(f: &Fixture) -> Vec<String> {
    let (ns, name) = ("e2e-serve", "catalogue");
    let node = f.cluster.node();
    let claim = f
        .cluster
        .kubectl_json(&["get", "pvc", &format!("{name}-index"), "-n", ns]);
    let volume = claim["spec"]["volumeName"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let pv = f.cluster.kubectl_json(&["get", "pv", &volume]);
    let volume_dir = PathBuf::from(pv["spec"]["hostPath"]["path"].as_str().unwrap_or(""));
    assert!(
        volume_dir.is_dir(),
        "the index volume's directory {}",
        volume_dir.display()
    );
    let selector = format!("{INSTANCE}={name}");
    let pods_before = f
        .cluster
        .kubectl_json(&["get", "pods", "-n", ns, "-l", &selector])["items"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let uids: Vec<String> = pods_before
        .iter()
        .filter_map(|p| p["metadata"]["uid"].as_str().map(String::from))
        .collect();
    assert!(
        uids.len() >= 3,
        "the scan, build and query pods of scenarios 1 and 4: {pods_before:#?}"
    );
    // The containers containerd has for those pods (sandboxes included).
    let containers_of = |uid: &str| -> Vec<String> {
        node.ctr(&[
            "containers",
            "ls",
            "-q",
            &format!("labels.\"io.kubernetes.pod.uid\"=={uid}"),
        ])
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
    };
    let containers: Vec<String> = uids.iter().flat_map(|u| containers_of(u)).collect();
    assert!(
        !containers.is_empty(),
        "containerd has no container of {uids:?}"
    );
    let t = Instant::now();
    f.cluster
        .kubectl(&["delete", "imgidx", name, "-n", ns, "--wait=false"]);
    wait_for(
        "every object the ImageIndex owned to be gone",
        Duration::from_secs(120),
        || {
            let left = owned_left(f, ns, &selector);
            let named = f.cluster.kubectl_output(&[
                "get",
                "endpoints,pvc",
                &format!("{name}-query"),
                &format!("{name}-index"),
                "-n",
                ns,
            ]);
            let pv_left = f
                .cluster
                .kubectl_output(&["get", "pv", &volume])
                .status
                .success();
            (left.trim().is_empty() && !named.status.success() && !pv_left).then_some(())
        },
        || f.cluster.kubectl(&["get", "all,pvc,pv", "-n", ns]),
    );
    let gone_after = t.elapsed();
    // The kubelet stopped every container and removed the pods' cgroups; no task (process)
    // of theirs runs in containerd.
    wait_for(
        "the kubelet to remove every cgroup and stop every task of the ImageIndex's pods",
        Duration::from_secs(90),
        || {
            let cgroups = node.live_cgroups();
            let cgroup_left = cgroups.iter().any(|c| {
                let s = c.to_string_lossy();
                uids.iter().any(|u| s.contains(&format!("pod{u}")))
            });
            let tasks = node.ctr(&["tasks", "ls", "-q"]).unwrap_or_default();
            let task_left = containers.iter().any(|c| tasks.lines().any(|t| t == c));
            (!cgroup_left && !task_left).then_some(())
        },
        || {
            format!(
                "cgroups: {:?}\ntasks: {}",
                node.live_cgroups(),
                node.ctr(&["tasks", "ls"]).unwrap_or_default()
            )
        },
    );
    let cleaned_after = t.elapsed();
    assert!(
        !volume_dir.exists(),
        "the index volume's directory {} is still there",
        volume_dir.display()
    );
    f.cluster.kubectl(&["get", "pvc", "photos", "-n", ns]);
    vec![format!(
        "all owned objects (pods, Deployment, ReplicaSet, Service, Endpoints, claim, volume) gone {:.1} s after kubectl delete; \
         the {} pods' cgroups and {} containerd tasks gone after {:.1} s, the volume's directory removed",
        gone_after.as_secs_f64(),
        uids.len(),
        containers.len(),
        cleaned_after.as_secs_f64()
    )]
}

// ------------------------------------------------------------------------------ the test

struct Outcome {
    name: &'static str,
    took: Duration,
    notes: Vec<String>,
    failure: Option<String>,
}

#[test]
fn scenarios_on_a_real_node_with_the_projects_images() {
    if std::env::var("IMAGEINDEX_SKIP_APISERVER").as_deref() == Ok("1") {
        eprintln!("IMAGEINDEX_SKIP_APISERVER=1: skipped");
        return;
    }
    assert!(
        cgroups_writable(),
        "the cluster test needs root: a kubelet and containerd make cgroups, mounts and network namespaces"
    );
    let t0 = Instant::now();
    let started = SystemTime::now();
    let f = Fixture::start();
    let setup = t0.elapsed();
    type Scenario = fn(&Fixture) -> Vec<String>;
    let scenarios: [(&'static str, &[&str], Scenario); 7] = [
        ("1 serve", &["e2e-serve"], serve),
        ("2 oom", &["e2e-oom"], oom),
        ("3 floor", &["e2e-floor"], floor),
        ("4 rebuild", &["e2e-serve"], rebuild),
        ("5 adopt", &["e2e-adopt", OPERATOR_NS], adopt),
        ("6 sharded", &["e2e-sharded"], sharded),
        ("7 delete", &["e2e-serve"], delete),
    ];
    // IMAGEINDEX_E2E_ONLY=WORD runs only the scenarios whose name contains WORD (to iterate
    // on one; CI runs them all).
    let only = std::env::var("IMAGEINDEX_E2E_ONLY").ok();
    let mut outcomes = Vec::new();
    for (name, namespaces, scenario) in scenarios {
        if only.as_ref().is_some_and(|w| !name.contains(w.as_str())) {
            eprintln!("--- scenario {name}: skipped (IMAGEINDEX_E2E_ONLY)");
            continue;
        }
        eprintln!("--- scenario {name}");
        let t = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scenario(&f)));
        let took = t.elapsed();
        let (notes, failure) = match result {
            Ok(notes) => (notes, None),
            Err(e) => {
                let message = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                eprintln!(
                    "--- scenario {name} FAILED: {message}\n{}\n===== Prometheus =====\n{}\nservice discovery errors: {:?}",
                    f.cluster.diagnostics(namespaces),
                    f.prometheus.log_tail(10),
                    f.discovery.errors().last()
                );
                (Vec::new(), Some(message))
            }
        };
        outcomes.push(Outcome {
            name,
            took,
            notes,
            failure,
        });
    }
    // The chart's RBAC sufficed: no operator was refused anything, ever.
    let refused: Vec<String> = f
        .all_operator_logs()
        .iter()
        .flat_map(|(pod, log)| {
            log.lines()
                .filter(|l| l.to_lowercase().contains("forbidden"))
                .map(|l| format!("{pod}: {l}"))
                .collect::<Vec<_>>()
        })
        .collect();
    outcomes.push(Outcome {
        name: "rbac",
        took: Duration::ZERO,
        notes: vec![format!(
            "operator containers run as the chart's ServiceAccount: {}",
            if refused.is_empty() {
                "never refused"
            } else {
                "REFUSED"
            }
        )],
        failure: (!refused.is_empty())
            .then(|| format!("the operator was refused:\n{}", refused.join("\n"))),
    });
    let mut summary = format!(
        "cluster e2e on a real node (kubelet, containerd, kube-proxy v1.20.2; started {}): setup {:.1} s \
         (datasets {:.1} s, images {:.1} s, then control plane, node, Prometheus, helm install, operator rolled out)\n",
        rfc3339(started),
        setup.as_secs_f64(),
        f.data_took.as_secs_f64(),
        f.images_took.as_secs_f64()
    );
    for o in &outcomes {
        summary.push_str(&format!(
            "scenario {:<10} {:>6.1} s  {}\n",
            o.name,
            o.took.as_secs_f64(),
            if o.failure.is_some() { "FAILED" } else { "ok" }
        ));
        for n in &o.notes {
            summary.push_str(&format!("    {n}\n"));
        }
    }
    // Teardown: nothing may be left on the machine.
    let Fixture {
        cluster,
        prometheus,
        discovery,
        ..
    } = f;
    let t = Instant::now();
    drop(prometheus);
    let discovery_errors = discovery.errors();
    drop(discovery);
    summary.push_str(&format!(
        "Prometheus and its discovery stopped in {:.1} s; discovery errors: {}\n",
        t.elapsed().as_secs_f64(),
        discovery_errors.last().map_or("none", String::as_str)
    ));
    let t = Instant::now();
    let teardown = cluster.stop();
    summary.push_str(&format!(
        "teardown {:.1} s: {}\n",
        t.elapsed().as_secs_f64(),
        match &teardown {
            Ok(()) => "nothing left behind".to_string(),
            Err(e) => e.clone(),
        }
    ));
    summary.push_str(&format!("total {:.1} s\n", t0.elapsed().as_secs_f64()));
    eprintln!("{summary}");
    let mut failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.failure.as_ref().map(|m| format!("{}: {m}", o.name)))
        .collect();
    if let Err(e) = teardown {
        failed.push(format!("teardown: {e}"));
    }
    assert!(
        failed.is_empty(),
        "failed scenarios:\n{}",
        failed.join("\n")
    );
}
