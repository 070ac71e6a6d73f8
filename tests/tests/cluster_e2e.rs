//! End to end on a real control plane, with pods as real processes under real memory limits
//! (issue 7).
//!
//! One control plane (tests/controlplane: etcd, kube-apiserver and kube-controller-manager
//! v1.20.2), the test node agent (imageindex_e2e::node) as its only node, and the chart
//! installed with the `helm install` of its README: the operator runs from the chart's
//! Deployment as a process the agent started, in-cluster, as the chart's ServiceAccount (a
//! TokenRequest token bound to its pod), so the chart's RBAC is what authorises it. Its scan,
//! build and query pods run as `indexer` processes, each in a cgroup limited to the pod's
//! `resources.limits`, on its own address.
//!
//! Scenarios, in order, each ending in assertions on `kubectl get imgidx -o json` and on real
//! queries (a scenario's failure prints the cluster's state and the scenario goes on to the
//! next; the test fails at the end naming every failed scenario):
//! 1. serve: an ImageIndex over the sample catalogue with a generous limit becomes Ready and
//!    its `status.endpoint`, resolved through the Service's Endpoints as kube-proxy would,
//!    finds the right image for attacked copies;
//! 2. oom: `preset: full` under 80Mi over 24 large photos: the kernel OOM-kills the build, the
//!    pod reads OOMKilled, the operator resumes with a poorer preset, Ready, attempts show
//!    OOMKilled then Succeeded, with a Warning Event;
//! 3. floor: a limit below the poorest preset's floor: Failed/Degraded naming the limit and
//!    the smallest that fits, and no build pod ever;
//! 4. rebuild: `spec.rebuild` while queries run: a new generation is built and swapped in with
//!    no failed query;
//! 5. adopt: the operator's pod is deleted mid-build (the build is slowed by a CPU limit); the
//!    Deployment's replacement adopts the running build pod, which finishes;
//! 6. delete: deleting the ImageIndex removes every object it owned (garbage collection) and
//!    every process, cgroup and address the agent had for it.
//!
//! Needs root (cgroups, mount namespaces, addresses on lo), tests/controlplane/build.sh's
//! binaries, scripts/setup.sh's helm and kubectl and the built binaries (`cargo build
//! --workspace --bins`). IMAGEINDEX_SKIP_APISERVER=1 skips it.

use imageindex_e2e::cluster::{get_json, readme_commands, search, wait_for, TestCluster};
use imageindex_e2e::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

const OPERATOR_NS: &str = "imageindex-system";
const RELEASE: &str = "imageindex-operator";
const INSTANCE: &str = "app.kubernetes.io/instance";
const COMPONENT: &str = "app.kubernetes.io/component";

/// The memory limit `preset: full` cannot fit on the photos (measured: OOM-killed at 90Mi,
/// fine at 100Mi) but poorer presets can (medium and smaller pass at 50–70Mi).
const OOM_LIMIT: &str = "80Mi";
const OOM_LIMIT_BYTES: u64 = 80 << 20;
/// Below the poorest preset's floor for the photos (~54Mi), above what a scan needs (~24Mi).
const FLOOR_LIMIT: &str = "40Mi";
/// The CPU limit of scenario 5's build (one extraction thread, a tenth of a core).
const ADOPT_CPU: &str = "100m";

struct Fixture {
    cluster: TestCluster,
    /// Dataset of scenarios 1, 4, 6: a claim directory with the sample catalogue in
    /// `catalogue/`.
    catalogue_claim: PathBuf,
    /// Dataset of scenarios 3 and 5: 12 photos of 4000 px.
    photos: PathBuf,
    /// Dataset of scenario 2: the same 12 and 12 more, so that its attempts last longer than
    /// a scrape interval and `status.attempts` gets their peak working set.
    photos_24: PathBuf,
    /// Attacked copies of catalogue images and the file each must find.
    queries: Vec<(PathBuf, String)>,
    /// A downscaled copy of a photo and its file name (one whose sample image no other photo
    /// of the 24 was made from).
    photo_query: (PathBuf, String),
    /// How long making the datasets took.
    data_took: Duration,
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
  maxAttempts: 6
"
    )
}

/// A namespace with the claim `photos` bound to a hostPath volume at `dir`. The volume goes
/// first: a claim that names a volume the PV controller has not seen yet waits for its 15 s
/// resync.
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
    let available = t.elapsed();
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
        "    {ns}: volume Available after {:.1} s, claim Bound after {:.1} s",
        available.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
}

fn downscaled(src: &Path, to: &Path, width: i32) {
    use opencv::core::{Size, Vector};
    use opencv::prelude::*;
    use opencv::{imgcodecs, imgproc};
    let img = imgcodecs::imread(src.to_str().unwrap(), imgcodecs::IMREAD_COLOR).unwrap();
    let height = width * img.rows() / img.cols().max(1);
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

impl Fixture {
    fn start() -> Fixture {
        let t = Instant::now();
        let data = tempfile::Builder::new()
            .prefix("imageindex-cluster-data-")
            .tempdir()
            .unwrap();
        let catalogue_claim = data.path().join("catalogue-claim");
        sample_subset(&catalogue_claim.join("catalogue"), 25);
        let photos_24 = data.path().join("photos-24-claim");
        make_photos(&photos_24, 24, 4000);
        let photos = data.path().join("photos-claim");
        std::fs::create_dir(&photos).unwrap();
        for i in 0..12 {
            let name = format!("photo_{i:03}.jpg");
            std::fs::hard_link(photos_24.join(&name), photos.join(&name)).unwrap();
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
        let data_took = t.elapsed();

        let mut cluster = TestCluster::start();
        cluster.start_agent();
        // The chart README's install, as written, plus a faster scrape and debug logs.
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
            "{} --set operator.scrapeInterval=500ms --set 'operator.logLevel=info\\,operator=debug'",
            find("helm install imageindex-operator")
        ));
        let rollout = find("kubectl --namespace imageindex-system rollout status");
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cluster.shell(&format!("{rollout} --timeout=120s"))
        }));
        if out.is_err() {
            panic!(
                "the operator did not roll out{}",
                cluster.diagnostics(&[OPERATOR_NS])
            );
        }
        let f = Fixture {
            cluster,
            catalogue_claim,
            photos,
            photos_24,
            queries,
            photo_query: (photo_query, "photo_010.jpg".into()),
            data_took,
            _data: data,
        };
        // The operator runs as the chart's non-root user, from the chart's Deployment.
        let op = f.operator_pod().expect("the operator's pod");
        let run = f
            .cluster
            .agent()
            .runs()
            .into_iter()
            .rev()
            .find(|r| r.pod == op.0)
            .expect("the agent ran the operator's pod");
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", run.pid)).unwrap_or_default();
        let uid = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .unwrap_or_default()
            .to_string();
        assert!(
            uid.contains("65532"),
            "the operator runs as {uid:?}, not the chart's runAsUser 65532"
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

    /// The build processes the agent ran in namespace `ns`.
    fn build_runs(&self, ns: &str) -> Vec<imageindex_e2e::node::ContainerRun> {
        self.cluster
            .agent()
            .runs()
            .into_iter()
            .filter(|r| {
                r.namespace == ns && r.labels.get(COMPONENT).map(String::as_str) == Some("build")
            })
            .collect()
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

    /// The query service's address behind `status.endpoint`.
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
}

fn top_path(answer: &Value) -> String {
    answer["matches"][0]["path"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn mib(v: &Value) -> String {
    v.as_u64()
        .map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
}

fn seconds_between(a: &Value, b: &Value) -> Option<f64> {
    let t = |v: &Value| v.as_str()?.parse::<k8s_openapi::jiff::Timestamp>().ok();
    (t(b)? - t(a)?).total(k8s_openapi::jiff::Unit::Second).ok()
}

// ------------------------------------------------------------------------------ scenarios

/// Scenario 1: scan, build and serve the sample catalogue; attacked copies find their
/// originals.
fn serve(f: &Fixture) -> Vec<String> {
    let (ns, name) = ("e2e-serve", "catalogue");
    dataset_namespace(&f.cluster, ns, &f.catalogue_claim);
    let t = Instant::now();
    f.cluster
        .apply(&imageindex(name, ns, "/catalogue", "auto", "512Mi", "2"));
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
    // Every pod was a process the agent ran, and the scan and build ended as kubelets report.
    let scan = f.pods(ns, name, "scan");
    assert_eq!(scan.len(), 1);
    assert_eq!(scan[0]["status"]["phase"], "Succeeded");
    let term = &scan[0]["status"]["containerStatuses"][0]["state"]["terminated"];
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
    let runs = f.cluster.agent().runs();
    for component in ["scan", "build", "query"] {
        assert!(
            runs.iter().any(|r| r.namespace == ns
                && r.labels.get(COMPONENT).map(String::as_str) == Some(component)),
            "the agent ran no {component} process"
        );
    }
    // The query service, reached through the Service's Endpoints.
    let addr = f.query_address(ns, name);
    let index = get_json(addr, "/v1/index").unwrap();
    assert_eq!(index["generation"], 1, "{index}");
    let queried = Instant::now();
    for (q, want) in &f.queries {
        let (status, answer) = search(addr, &std::fs::read(q).unwrap()).unwrap();
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
         through {addr} (Endpoints of {name}-query) in {:.1} s",
        ready_after.as_secs_f64(),
        st["preset"],
        f.queries.len(),
        queried.elapsed().as_secs_f64()
    )]
}

/// Scenario 2: the kernel OOM-kills `preset: full` under 80Mi; the next attempt resumes with
/// a poorer preset and succeeds.
fn oom(f: &Fixture) -> Vec<String> {
    let (ns, name) = ("e2e-oom", "oom");
    // Calibration: the policy must think full does not fit, something poorer does.
    let scan = json_of(&run(
        "indexer",
        &[
            "scan",
            f.photos_24.to_str().unwrap(),
            "--json",
            "--memory-limit",
            OOM_LIMIT,
            "--threads",
            "2",
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
    dataset_namespace(&f.cluster, ns, &f.photos_24);
    let t = Instant::now();
    f.cluster
        .apply(&imageindex(name, ns, "/", "full", OOM_LIMIT, "2"));
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
    // The first build pod's status says what the kubelet would: OOMKilled, 137.
    let first_pod = attempts[0]["pod"].as_str().unwrap();
    let pod = f.cluster.kubectl_json(&["get", "pod", first_pod, "-n", ns]);
    let term = &pod["status"]["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(
        (term["reason"].as_str(), term["exitCode"].as_i64()),
        (Some("OOMKilled"), Some(137)),
        "{pod:#}"
    );
    assert_eq!(pod["status"]["phase"], "Failed");
    // The kernel did it: the cgroup's OOM killer fired for that run, under the limit.
    let runs = f.build_runs(ns);
    assert_eq!(
        runs.len(),
        attempts.len(),
        "one process per attempt: {runs:#?}"
    );
    let first_run = runs
        .iter()
        .find(|r| r.pod == first_pod)
        .expect("the first attempt's run");
    let end = first_run.ended.as_ref().expect("ended");
    assert_eq!(end.reason, "OOMKilled");
    // The kernel charges in per-CPU batches, so the recorded peak may pass the limit by a
    // few pages before the OOM killer acts.
    let peak = end.peak_memory.unwrap_or(0);
    assert!(
        peak <= OOM_LIMIT_BYTES + (1 << 20),
        "the cgroup's peak {peak} is over the {OOM_LIMIT} limit: was the limit enforced? {end:?}"
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
    assert!(top_path(&answer).ends_with(&f.photo_query.1), "{answer}");

    let mut notes = vec![format!(
        "Ready {:.1} s after kubectl apply; Warning Events: {}",
        ready_after.as_secs_f64(),
        warnings
            .iter()
            .map(|w| w.split(':').next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(", ")
    )];
    for a in &attempts {
        let run = runs
            .iter()
            .find(|r| Some(r.pod.as_str()) == a["pod"].as_str());
        notes.push(format!(
            "attempt {} preset {:<7} {:<10} {:>5.1} s  peak working set (status.attempts) {:>9}, cgroup peak (kernel) {:>9}",
            a["number"],
            a["preset"].as_str().unwrap_or(""),
            a["outcome"].as_str().unwrap_or(""),
            seconds_between(&a["startTime"], &a["endTime"]).unwrap_or(f64::NAN),
            mib(&a["peakWorkingSet"]),
            run.and_then(|r| r.ended.as_ref()).and_then(|e| e.peak_memory).map_or("-".into(), |p| format!("{:.1} MiB", p as f64 / 1048576.0)),
        ));
    }
    notes
}

/// Scenario 3: below the floor, Failed and Degraded with the limit and the smallest that
/// fits; no build pod, no crash loop.
fn floor(f: &Fixture) -> Vec<String> {
    let (ns, name) = ("e2e-floor", "too-small");
    dataset_namespace(&f.cluster, ns, &f.photos);
    f.cluster
        .apply(&imageindex(name, ns, "/", "auto", FLOOR_LIMIT, "2"));
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
    let builds = f.build_runs(ns).len();
    assert_eq!(builds, 0);
    vec![format!(
        "Failed: {message} (smallest that fits: {smallest})"
    )]
}

/// Scenario 4: a rebuild while queries run; the new generation is swapped in without a failed
/// query.
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
        r#"{"spec":{"rebuild":"r2"}}"#,
    ]);
    let next = generation + 1;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(
            "the rebuilt generation to be Ready and served",
            Duration::from_secs(240),
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
        swapped
    }));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let swapped = match result {
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
    notes
}

/// Scenario 5: the operator's pod is deleted mid-build; its replacement adopts the running
/// build.
fn adopt(f: &Fixture) -> Vec<String> {
    let (ns, name) = ("e2e-adopt", "adopt");
    dataset_namespace(&f.cluster, ns, &f.photos);
    // A CPU limit of 100m (enforced by the agent's cpu cgroup) makes the full build of the
    // photos last long enough (~20 s) to replace the operator in the middle of it.
    f.cluster
        .apply(&imageindex(name, ns, "/", "full", "512Mi", ADOPT_CPU));
    let (build_pod, build_uid, processed_at_delete, total) = wait_for(
        "the build to be running and making progress",
        Duration::from_secs(180),
        || {
            let st = f.imgidx(ns, name)["status"].clone();
            let processed = st["progress"]["processed"].as_u64().unwrap_or(0);
            let total = st["progress"]["total"].as_u64().unwrap_or(0);
            let pods = f.pods(ns, name, "build");
            let pod = pods.first()?;
            let running = !pod["status"]["containerStatuses"][0]["state"]["running"].is_null();
            (st["phase"] == "Building" && processed >= 1 && processed < total && running).then(
                || {
                    (
                        pod["metadata"]["name"].as_str().unwrap().to_string(),
                        pod["metadata"]["uid"].as_str().unwrap().to_string(),
                        processed,
                        total,
                    )
                },
            )
        },
        || format!("{:#}", f.imgidx(ns, name)["status"]),
    );
    let (old_op, old_uid, _) = f.operator_pod().expect("the operator's pod");
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
        !pods[0]["status"]["containerStatuses"][0]["state"]["running"].is_null(),
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
    let runs = f.build_runs(ns);
    assert_eq!(
        runs.len(),
        1,
        "the build process was started again: {runs:#?}"
    );
    let old_gone = f
        .cluster
        .kubectl_output(&["get", "pod", &old_op, "-n", OPERATOR_NS]);
    assert!(
        !old_gone.status.success(),
        "the old operator pod is still there"
    );
    let agent = f.cluster.agent();
    let old_run = agent
        .runs()
        .into_iter()
        .find(|r| r.pod == old_op)
        .expect("the old operator's run");
    assert!(
        old_run.ended.is_some(),
        "the old operator's process still runs"
    );
    let log = agent
        .container_log_tail(OPERATOR_NS, &new_op.0, 2000)
        .unwrap_or_default();
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the operator was refused something:\n{log}"
    );
    let build_secs =
        seconds_between(&attempts[0]["startTime"], &attempts[0]["endTime"]).unwrap_or(f64::NAN);
    vec![format!(
        "operator {old_op} deleted at {processed_at_delete}/{total} images built; replacement {} \
         Ready {:.1} s later (status then said {processed_at_takeover}/{total}, build pod still running) \
         and adopted {build_pod} (same uid, one process); the build took {build_secs:.1} s under cpu {ADOPT_CPU}",
        new_op.0,
        replaced_after.as_secs_f64()
    )]
}

/// Scenario 6: deleting the ImageIndex removes every object it owned and every process the
/// agent ran for it.
fn delete(f: &Fixture) -> Vec<String> {
    let (ns, name) = ("e2e-serve", "catalogue");
    let agent = f.cluster.agent();
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
    let ours = |labels: &std::collections::BTreeMap<String, String>| {
        labels.get(INSTANCE).map(String::as_str) == Some(name)
    };
    let pods_before: Vec<_> = agent
        .pods()
        .into_iter()
        .filter(|p| p.namespace == ns && ours(&p.labels))
        .collect();
    assert!(
        pods_before.len() >= 5,
        "scan, build, query pods of scenarios 1 and 4: {pods_before:#?}"
    );
    let t = Instant::now();
    f.cluster
        .kubectl(&["delete", "imgidx", name, "-n", ns, "--wait=false"]);
    let selector = format!("{INSTANCE}={name}");
    wait_for(
        "every object the ImageIndex owned to be gone",
        Duration::from_secs(120),
        || {
            let left = f.cluster.kubectl(&[
                "get",
                "imgidx,pods,deployments,replicasets,services,endpoints,pvc",
                "-n",
                ns,
                "-l",
                &selector,
                "-o",
                "name",
            ]);
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
    wait_for(
        "the agent to tear down every pod of the ImageIndex",
        Duration::from_secs(60),
        || {
            agent
                .pods()
                .into_iter()
                .filter(|p| p.namespace == ns && ours(&p.labels))
                .all(|p| p.torn_down)
                .then_some(())
        },
        || format!("{:#?}", agent.pods()),
    );
    let runs: Vec<_> = agent
        .runs()
        .into_iter()
        .filter(|r| r.namespace == ns && ours(&r.labels))
        .collect();
    for r in &runs {
        assert!(
            r.ended.is_some(),
            "{}'s process {} did not end",
            r.pod,
            r.pid
        );
        let cgroup_of_pid =
            std::fs::read_to_string(format!("/proc/{}/cgroup", r.pid)).unwrap_or_default();
        let group = r
            .cgroup
            .strip_prefix("/sys/fs/cgroup/memory")
            .unwrap_or(&r.cgroup)
            .to_string_lossy()
            .into_owned();
        assert!(
            !cgroup_of_pid.contains(&group),
            "process {} of {} still lives in {group}",
            r.pid,
            r.pod
        );
        assert!(!r.cgroup.exists(), "{} still exists", r.cgroup.display());
    }
    let all_pods = agent.pods();
    let addresses = agent.addresses_in_use();
    for p in all_pods
        .iter()
        .filter(|p| p.namespace == ns && ours(&p.labels))
    {
        // Addresses are reused: one still on lo must belong to a live pod of someone else.
        if let Some(ip) = p.ip.filter(|ip| addresses.contains(ip)) {
            let holder = all_pods.iter().find(|q| q.ip == Some(ip) && !q.torn_down);
            assert!(
                holder.is_some_and(|q| !(q.namespace == ns && ours(&q.labels))),
                "{}'s address {ip} is still on lo, held by {holder:?}",
                p.name
            );
        }
        assert!(
            !p.dir.join("rootfs").exists(),
            "{}'s root is still there",
            p.name
        );
        for g in &p.cgroups {
            assert!(!g.exists(), "{} still exists", g.display());
        }
    }
    assert!(
        !volume_dir.exists(),
        "the index volume's directory {} is still there",
        volume_dir.display()
    );
    f.cluster.kubectl(&["get", "pvc", "photos", "-n", ns]);
    vec![format!(
        "all owned objects (pods, Deployment, ReplicaSet, Service, Endpoints, claim, volume) gone {:.1} s after kubectl delete; {} processes of {} pods ended, their cgroups, addresses and roots removed",
        gone_after.as_secs_f64(),
        runs.len(),
        pods_before.len()
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
fn scenarios_on_a_real_control_plane_with_pods_as_processes() {
    if std::env::var("IMAGEINDEX_SKIP_APISERVER").as_deref() == Ok("1") {
        eprintln!("IMAGEINDEX_SKIP_APISERVER=1: skipped");
        return;
    }
    assert!(
        cgroups_writable(),
        "the cluster test needs root: the node agent makes cgroups, mount namespaces and addresses on lo"
    );
    let t0 = Instant::now();
    let started = SystemTime::now();
    let f = Fixture::start();
    let setup = t0.elapsed();
    type Scenario = fn(&Fixture) -> Vec<String>;
    let scenarios: [(&'static str, &[&str], Scenario); 6] = [
        ("1 serve", &["e2e-serve"], serve),
        ("2 oom", &["e2e-oom"], oom),
        ("3 floor", &["e2e-floor"], floor),
        ("4 rebuild", &["e2e-serve"], rebuild),
        ("5 adopt", &["e2e-adopt", OPERATOR_NS], adopt),
        ("6 delete", &["e2e-serve"], delete),
    ];
    let mut outcomes = Vec::new();
    for (name, namespaces, scenario) in scenarios {
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
                    "--- scenario {name} FAILED: {message}\n{}",
                    f.cluster.diagnostics(namespaces)
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
    // The chart's RBAC sufficed: no operator process was refused anything, ever.
    let refused: Vec<String> = f
        .cluster
        .agent()
        .runs()
        .iter()
        .filter(|r| r.container == "operator")
        .flat_map(|r| {
            let log = std::fs::read_to_string(&r.log).unwrap_or_default();
            log.lines()
                .filter(|l| l.to_lowercase().contains("forbidden"))
                .map(|l| format!("{}: {l}", r.pod))
                .collect::<Vec<_>>()
        })
        .collect();
    outcomes.push(Outcome {
        name: "rbac",
        took: Duration::ZERO,
        notes: vec![format!(
            "operator processes run as the chart's ServiceAccount: {}",
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
        "cluster e2e on kube-apiserver v1.20.2 + test node agent (started {}): setup {:.1} s \
         (datasets {:.1} s, then control plane, agent, helm install, operator rolled out)\n",
        imageindex_e2e::node::status::rfc3339(started),
        setup.as_secs_f64(),
        f.data_took.as_secs_f64()
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
    summary.push_str(&format!("total {:.1} s\n", t0.elapsed().as_secs_f64()));
    eprintln!("{summary}");
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.failure.as_ref().map(|m| format!("{}: {m}", o.name)))
        .collect();
    assert!(
        failed.is_empty(),
        "failed scenarios:\n{}",
        failed.join("\n")
    );
}
