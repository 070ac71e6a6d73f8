//! A real Prometheus (Debian's `prometheus` package) for the end-to-end tests, with the
//! scrape configs the Prometheus Operator would generate from the chart's PodMonitor and
//! ServiceMonitor ([`scrape_configs`]) and the chart's alert rules. Queries go through its
//! HTTP API. Test-only code, not shipped.
//!
//! Debian builds Prometheus without Kubernetes service discovery (only dns, file and http:
//! the Kubernetes client libraries are not packaged), so [`KubernetesFileDiscovery`] stands
//! in for it: every second it lists pods, Services and Endpoints from the test API server
//! and writes them as file_sd targets carrying the `__meta_kubernetes_*` labels Kubernetes
//! SD would give them ([`pod_targets`], [`endpoints_targets`]). The Operator's relabelings
//! then run unchanged, and [`Discovery::Kubernetes`] writes the real `kubernetes_sd_configs`
//! for a Prometheus that has it.

use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use kube::api::ListParams;
use kube::{Api, Client};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where Debian's `prometheus` package installs the server.
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";
/// And its rule checker.
pub const PROMTOOL_BIN: &str = "/usr/bin/promtool";

/// A label name as Kubernetes service discovery spells it in `__meta_kubernetes_*_label_<name>`
/// (every character that is not a letter, digit or `_` becomes `_`).
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The Prometheus Operator's `relabelings` (camelCase) as Prometheus `relabel_configs`.
fn relabel(r: &Value) -> Value {
    let mut out = serde_json::Map::new();
    let keys = [
        ("sourceLabels", "source_labels"),
        ("separator", "separator"),
        ("targetLabel", "target_label"),
        ("regex", "regex"),
        ("modulus", "modulus"),
        ("replacement", "replacement"),
        ("action", "action"),
    ];
    for (from, to) in keys {
        if let Some(v) = r.get(from) {
            let v = if from == "action" {
                Value::from(v.as_str().unwrap_or("replace").to_lowercase())
            } else {
                v.clone()
            };
            out.insert(to.into(), v);
        }
    }
    Value::Object(out)
}

/// `keep` rules for a label selector over `__meta_kubernetes_<role>_label_*` (matchLabels and
/// matchExpressions with In, NotIn, Exists, DoesNotExist), as the Prometheus Operator writes
/// them.
fn selector_rules(selector: &Value, role: &str) -> Vec<Value> {
    let mut rules = Vec::new();
    let label = |k: &str| format!("__meta_kubernetes_{role}_label_{}", sanitize(k));
    let present = |k: &str| format!("__meta_kubernetes_{role}_labelpresent_{}", sanitize(k));
    if let Some(m) = selector["matchLabels"].as_object() {
        for (k, v) in m {
            rules.push(
                json!({"action": "keep", "source_labels": [label(k), present(k)],
                "regex": format!("({});true", v.as_str().unwrap_or(""))}),
            );
        }
    }
    for e in selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let k = e["key"].as_str().unwrap_or("");
        let values: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let alternatives = values.join("|");
        match e["operator"].as_str().unwrap_or("") {
            "In" => rules.push(
                json!({"action": "keep", "source_labels": [label(k), present(k)],
                "regex": format!("({alternatives});true")}),
            ),
            "NotIn" => rules.push(
                json!({"action": "drop", "source_labels": [label(k), present(k)],
                "regex": format!("({alternatives});true")}),
            ),
            "Exists" => rules
                .push(json!({"action": "keep", "source_labels": [present(k)], "regex": "true"})),
            "DoesNotExist" => rules
                .push(json!({"action": "drop", "source_labels": [present(k)], "regex": "true"})),
            _ => {}
        }
    }
    rules
}

/// The namespaces a monitor's `namespaceSelector` names (`None`: all, `any: true` or unset
/// means its own namespace only unless `any`).
fn sd_namespaces(monitor: &Value) -> Option<Vec<String>> {
    let sel = &monitor["spec"]["namespaceSelector"];
    if sel["any"] == true {
        return None;
    }
    let names: Vec<String> = sel["matchNames"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    if names.is_empty() {
        Some(vec![monitor["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string()])
    } else {
        Some(names)
    }
}

/// How the scrape configs find their targets.
#[derive(Clone, Copy, Debug)]
pub enum Discovery<'a> {
    /// `kubernetes_sd_configs` through this kubeconfig (a Prometheus built with it).
    Kubernetes(&'a Path),
    /// `file_sd_configs` reading `<dir>/<role>.json`, written by [`KubernetesFileDiscovery`].
    Files(&'a Path),
}

/// The service discovery of one job, and relabel rules that must come first (file
/// discovery lists every namespace: the namespace filter becomes a `keep`).
fn sd_config(
    role: &str,
    namespaces: Option<Vec<String>>,
    discovery: Discovery,
) -> (&'static str, Value, Vec<Value>) {
    match discovery {
        Discovery::Kubernetes(kubeconfig) => {
            let mut sd = json!({"role": role, "kubeconfig_file": kubeconfig.to_string_lossy()});
            if let Some(names) = namespaces {
                sd["namespaces"] = json!({"names": names});
            }
            ("kubernetes_sd_configs", sd, Vec::new())
        }
        Discovery::Files(dir) => {
            let sd = json!({"files": [dir.join(format!("{role}.json")).to_string_lossy()],
                "refresh_interval": "1s"});
            let keep = namespaces
                .map(|names| {
                    vec![
                        json!({"action": "keep", "source_labels": ["__meta_kubernetes_namespace"],
                        "regex": format!("({})", names.join("|"))}),
                    ]
                })
                .unwrap_or_default();
            ("file_sd_configs", sd, keep)
        }
    }
}

/// The scrape configs the Prometheus Operator generates for the PodMonitors and
/// ServiceMonitors among `docs` (rendered chart manifests), with `discovery` and every
/// interval replaced by `interval` (tests want fast scrapes).
pub fn scrape_configs(docs: &[Value], discovery: Discovery, interval: &str) -> Vec<Value> {
    let mut jobs = Vec::new();
    for m in docs {
        let (ns, name) = (
            m["metadata"]["namespace"].as_str().unwrap_or("default"),
            m["metadata"]["name"].as_str().unwrap_or(""),
        );
        let (role, endpoints_key, kind) = match m["kind"].as_str() {
            Some("PodMonitor") => ("pod", "podMetricsEndpoints", "podMonitor"),
            Some("ServiceMonitor") => ("endpoints", "endpoints", "serviceMonitor"),
            _ => continue,
        };
        let endpoints = m["spec"][endpoints_key]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for (i, ep) in endpoints.iter().enumerate() {
            let port = ep["port"].as_str().unwrap_or("");
            let (sd_key, sd, mut rules) = sd_config(role, sd_namespaces(m), discovery);
            rules.push(
                json!({"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"}),
            );
            if role == "pod" {
                rules.push(
                    json!({"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"],
                    "regex": "(Failed|Succeeded)"}),
                );
                rules.extend(selector_rules(&m["spec"]["selector"], "pod"));
                rules.push(json!({"action": "keep",
                    "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": port}));
                rules.push(json!({"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"}));
                rules.push(json!({"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"}));
                rules.push(
                    json!({"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"}),
                );
                rules.push(json!({"target_label": "job", "replacement": format!("{ns}/{name}")}));
            } else {
                rules.extend(selector_rules(&m["spec"]["selector"], "service"));
                rules.push(json!({"action": "keep",
                    "source_labels": ["__meta_kubernetes_endpoint_port_name"], "regex": port}));
                rules.push(
                    json!({"source_labels": ["__meta_kubernetes_endpoint_address_target_kind",
                    "__meta_kubernetes_endpoint_address_target_name"], "separator": ";",
                    "regex": "Pod;(.*)", "replacement": "${1}", "target_label": "pod"}),
                );
                rules.push(json!({"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"}));
                rules.push(json!({"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"}));
                rules.push(json!({"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"}));
                rules.push(json!({"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job",
                    "replacement": "${1}"}));
            }
            rules.push(json!({"target_label": "endpoint", "replacement": port}));
            rules.extend(
                ep["relabelings"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(relabel),
            );
            let mut job = json!({
                "job_name": format!("{kind}/{ns}/{name}/{i}"),
                "honor_labels": false,
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "metrics_path": ep["path"].as_str().unwrap_or("/metrics"),
                "relabel_configs": rules,
            });
            job[sd_key] = json!([sd]);
            jobs.push(job);
        }
    }
    jobs
}

/// The `__meta_kubernetes_pod_*` labels of a pod (without container or port).
fn pod_meta(pod: &Value) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    l.insert(
        "__meta_kubernetes_namespace".into(),
        s(&pod["metadata"]["namespace"]),
    );
    l.insert(
        "__meta_kubernetes_pod_name".into(),
        s(&pod["metadata"]["name"]),
    );
    l.insert(
        "__meta_kubernetes_pod_uid".into(),
        s(&pod["metadata"]["uid"]),
    );
    l.insert(
        "__meta_kubernetes_pod_ip".into(),
        s(&pod["status"]["podIP"]),
    );
    l.insert(
        "__meta_kubernetes_pod_host_ip".into(),
        s(&pod["status"]["hostIP"]),
    );
    l.insert(
        "__meta_kubernetes_pod_node_name".into(),
        s(&pod["spec"]["nodeName"]),
    );
    l.insert(
        "__meta_kubernetes_pod_phase".into(),
        s(&pod["status"]["phase"]),
    );
    let ready = pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    l.insert("__meta_kubernetes_pod_ready".into(), ready.to_string());
    for (kind, key) in [("label", "labels"), ("annotation", "annotations")] {
        for (k, v) in pod["metadata"][key].as_object().into_iter().flatten() {
            let k = sanitize(k);
            l.insert(format!("__meta_kubernetes_pod_{kind}_{k}"), s(v));
            l.insert(
                format!("__meta_kubernetes_pod_{kind}present_{k}"),
                "true".into(),
            );
        }
    }
    if let Some(owner) = pod["metadata"]["ownerReferences"]
        .as_array()
        .and_then(|o| o.iter().find(|o| o["controller"] == true))
    {
        l.insert(
            "__meta_kubernetes_pod_controller_kind".into(),
            s(&owner["kind"]),
        );
        l.insert(
            "__meta_kubernetes_pod_controller_name".into(),
            s(&owner["name"]),
        );
    }
    l
}

fn container_port_meta(l: &mut BTreeMap<String, String>, container: &Value, port: &Value) {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    l.insert(
        "__meta_kubernetes_pod_container_name".into(),
        s(&container["name"]),
    );
    l.insert(
        "__meta_kubernetes_pod_container_image".into(),
        s(&container["image"]),
    );
    l.insert(
        "__meta_kubernetes_pod_container_port_name".into(),
        s(&port["name"]),
    );
    l.insert(
        "__meta_kubernetes_pod_container_port_number".into(),
        port["containerPort"].to_string(),
    );
    l.insert(
        "__meta_kubernetes_pod_container_port_protocol".into(),
        port["protocol"].as_str().unwrap_or("TCP").to_string(),
    );
}

/// A pod's targets as Kubernetes SD's `pod` role makes them: one per declared container
/// port, at the pod's IP (none before it has one).
pub fn pod_targets(pod: &Value) -> Vec<Value> {
    let Some(ip) = pod["status"]["podIP"].as_str().filter(|ip| !ip.is_empty()) else {
        return Vec::new();
    };
    let meta = pod_meta(pod);
    let mut out = Vec::new();
    for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
        for p in c["ports"].as_array().into_iter().flatten() {
            let mut l = meta.clone();
            container_port_meta(&mut l, c, p);
            out.push(json!({"targets": [format!("{ip}:{}", p["containerPort"])], "labels": l}));
        }
    }
    out
}

/// An Endpoints object's targets as Kubernetes SD's `endpoints` role makes them: one per
/// address and port, with the Service's labels and, for a pod address, the pod's.
pub fn endpoints_targets(endpoints: &Value, service: Option<&Value>, pods: &[Value]) -> Vec<Value> {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let mut base = BTreeMap::new();
    base.insert(
        "__meta_kubernetes_namespace".to_string(),
        s(&endpoints["metadata"]["namespace"]),
    );
    base.insert(
        "__meta_kubernetes_endpoints_name".to_string(),
        s(&endpoints["metadata"]["name"]),
    );
    if let Some(svc) = service {
        base.insert(
            "__meta_kubernetes_service_name".into(),
            s(&svc["metadata"]["name"]),
        );
        for (k, v) in svc["metadata"]["labels"].as_object().into_iter().flatten() {
            let k = sanitize(k);
            base.insert(format!("__meta_kubernetes_service_label_{k}"), s(v));
            base.insert(
                format!("__meta_kubernetes_service_labelpresent_{k}"),
                "true".into(),
            );
        }
    }
    let mut out = Vec::new();
    for subset in endpoints["subsets"].as_array().into_iter().flatten() {
        let addresses = [("addresses", true), ("notReadyAddresses", false)];
        for (key, ready) in addresses {
            for a in subset[key].as_array().into_iter().flatten() {
                for port in subset["ports"].as_array().into_iter().flatten() {
                    let mut l = base.clone();
                    l.insert(
                        "__meta_kubernetes_endpoint_port_name".into(),
                        s(&port["name"]),
                    );
                    l.insert(
                        "__meta_kubernetes_endpoint_port_protocol".into(),
                        port["protocol"].as_str().unwrap_or("TCP").to_string(),
                    );
                    l.insert("__meta_kubernetes_endpoint_ready".into(), ready.to_string());
                    let target = &a["targetRef"];
                    if !target.is_null() {
                        l.insert(
                            "__meta_kubernetes_endpoint_address_target_kind".into(),
                            s(&target["kind"]),
                        );
                        l.insert(
                            "__meta_kubernetes_endpoint_address_target_name".into(),
                            s(&target["name"]),
                        );
                    }
                    let pod = pods.iter().find(|p| {
                        target["kind"] == "Pod"
                            && p["metadata"]["name"] == target["name"]
                            && p["metadata"]["namespace"] == endpoints["metadata"]["namespace"]
                    });
                    if let Some(pod) = pod {
                        l.extend(pod_meta(pod));
                        let container_port = pod["spec"]["containers"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .find_map(|c| {
                                c["ports"]
                                    .as_array()
                                    .into_iter()
                                    .flatten()
                                    .find(|p| p["containerPort"] == port["port"])
                                    .map(|p| (c, p))
                            });
                        if let Some((c, p)) = container_port {
                            container_port_meta(&mut l, c, p);
                        }
                    }
                    out.push(json!({"targets": [format!("{}:{}", s(&a["ip"]), port["port"])], "labels": l}));
                }
            }
        }
    }
    out
}

/// Kubernetes service discovery for a Prometheus without it: writes `<dir>/pod.json` and
/// `<dir>/endpoints.json` (file_sd) from the API server every second; stops when dropped.
pub struct KubernetesFileDiscovery {
    stop: Arc<AtomicBool>,
    errors: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn write_atomically(path: &Path, value: &Value) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)?;
    std::fs::rename(&tmp, path)
}

async fn discover_once(client: &Client, dir: &Path) -> Result<(), String> {
    let lp = ListParams::default();
    let to_values = |items: Vec<serde_json::Value>| items;
    let pods: Vec<Value> = to_values(
        Api::<Pod>::all(client.clone())
            .list(&lp)
            .await
            .map_err(|e| format!("listing pods: {e}"))?
            .items
            .iter()
            .filter_map(|p| serde_json::to_value(p).ok())
            .collect(),
    );
    let services: Vec<Value> = Api::<Service>::all(client.clone())
        .list(&lp)
        .await
        .map_err(|e| format!("listing services: {e}"))?
        .items
        .iter()
        .filter_map(|s| serde_json::to_value(s).ok())
        .collect();
    let endpoints: Vec<Value> = Api::<Endpoints>::all(client.clone())
        .list(&lp)
        .await
        .map_err(|e| format!("listing endpoints: {e}"))?
        .items
        .iter()
        .filter_map(|e| serde_json::to_value(e).ok())
        .collect();
    let pod_groups: Vec<Value> = pods.iter().flat_map(pod_targets).collect();
    let endpoint_groups: Vec<Value> = endpoints
        .iter()
        .flat_map(|e| {
            let svc = services.iter().find(|s| {
                s["metadata"]["name"] == e["metadata"]["name"]
                    && s["metadata"]["namespace"] == e["metadata"]["namespace"]
            });
            endpoints_targets(e, svc, &pods)
        })
        .collect();
    write_atomically(&dir.join("pod.json"), &Value::from(pod_groups))
        .and_then(|()| write_atomically(&dir.join("endpoints.json"), &Value::from(endpoint_groups)))
        .map_err(|e| format!("writing targets in {}: {e}", dir.display()))
}

impl KubernetesFileDiscovery {
    /// Starts discovering through `kubeconfig` into `dir`; returns after the first pass.
    pub fn start(kubeconfig: &Path, dir: &Path) -> Result<KubernetesFileDiscovery, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for role in ["pod", "endpoints"] {
            write_atomically(&dir.join(format!("{role}.json")), &json!([]))
                .map_err(|e| e.to_string())?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (kubeconfig, dir) = (kubeconfig.to_path_buf(), dir.to_path_buf());
        let (st, errs) = (stop.clone(), errors.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name("kubernetes-file-sd".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("no runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let client = match crate::provisioner::client_for(&kubeconfig).await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(discover_once(&client, &dir).await);
                    while !st.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        if let Err(e) = discover_once(&client, &dir).await {
                            if let Ok(mut errs) = errs.lock() {
                                errs.push(e);
                            }
                        }
                    }
                });
            })
            .map_err(|e| format!("cannot start the discovery thread: {e}"))?;
        let first = ready_rx
            .recv()
            .map_err(|_| "the discovery thread ended".to_string())?;
        let d = KubernetesFileDiscovery {
            stop,
            errors,
            thread: Some(thread),
        };
        first.map(|()| d)
    }

    /// The errors of the passes so far.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

impl Drop for KubernetesFileDiscovery {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The rule groups of the PrometheusRules among `docs`, as a Prometheus rule file.
pub fn rule_file(docs: &[Value]) -> Value {
    let groups: Vec<Value> = docs
        .iter()
        .filter(|d| d["kind"] == "PrometheusRule")
        .flat_map(|d| d["spec"]["groups"].as_array().cloned().unwrap_or_default())
        .collect();
    json!({ "groups": groups })
}

/// A running Prometheus server, stopped when dropped.
pub struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
    http: reqwest::blocking::Client,
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Prometheus {
    /// Starts Prometheus in `dir` with these scrape configs and rule files (written as YAML),
    /// evaluating rules every `interval`; waits until it is ready.
    pub fn start(
        dir: &Path,
        scrape_configs: &[Value],
        rules: Option<&Value>,
        interval: &str,
    ) -> Result<Prometheus, String> {
        if !Path::new(PROMETHEUS_BIN).is_file() {
            return Err(format!(
                "{PROMETHEUS_BIN} not found: apt-get install prometheus (scripts/setup.sh does)"
            ));
        }
        std::fs::create_dir_all(dir.join("data")).map_err(|e| e.to_string())?;
        let mut config = json!({
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": scrape_configs,
        });
        if let Some(rules) = rules {
            let path = dir.join("rules.yaml");
            std::fs::write(
                &path,
                serde_yaml::to_string(rules).map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?;
            config["rule_files"] = json!([path.to_string_lossy()]);
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(
            &config_path,
            serde_yaml::to_string(&config).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        let port = crate::free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).map_err(|e| e.to_string())?;
        let child = Command::new(PROMETHEUS_BIN)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1d")
            .arg("--log.level=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {PROMETHEUS_BIN}: {e}"))?;
        let http = reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(20))
            .build()
            .map_err(|e| e.to_string())?;
        let mut p = Prometheus {
            child,
            port,
            dir: dir.to_path_buf(),
            http,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                return Err(format!("prometheus exited ({status}):\n{}", p.log_tail(30)));
            }
            let ready = p
                .http
                .get(format!("http://127.0.0.1:{port}/-/ready"))
                .send()
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(p);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "prometheus not ready after 60 s:\n{}",
                    p.log_tail(30)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Its HTTP address.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn api(&self, path: &str, params: &[(&str, String)]) -> Result<Value, String> {
        let resp = self
            .http
            .get(format!("{}{path}", self.url()))
            .query(params)
            .send()
            .map_err(|e| format!("GET {path}: {e}"))?;
        let body: Value = resp.json().map_err(|e| format!("GET {path}: {e}"))?;
        if body["status"] != "success" {
            return Err(format!("GET {path} {params:?}: {body}"));
        }
        Ok(body["data"].clone())
    }

    /// An instant query (`/api/v1/query`): the result's series (vector) or value (scalar).
    pub fn query(&self, expr: &str) -> Result<Value, String> {
        Ok(self.api("/api/v1/query", &[("query", expr.to_string())])?["result"].clone())
    }

    /// A range query (`/api/v1/query_range`): a matrix of series.
    pub fn query_range(
        &self,
        expr: &str,
        start: SystemTime,
        end: SystemTime,
        step: Duration,
    ) -> Result<Value, String> {
        Ok(self.api(
            "/api/v1/query_range",
            &[
                ("query", expr.to_string()),
                ("start", format!("{:.3}", unix_seconds(start))),
                ("end", format!("{:.3}", unix_seconds(end))),
                ("step", format!("{}", step.as_secs_f64())),
            ],
        )?["result"]
            .clone())
    }

    /// The active scrape targets (`/api/v1/targets`).
    pub fn targets(&self) -> Result<Vec<Value>, String> {
        Ok(self.api("/api/v1/targets", &[])?["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The loaded rule groups with each rule's health and last error (`/api/v1/rules`).
    pub fn rules(&self) -> Result<Vec<Value>, String> {
        Ok(self.api("/api/v1/rules", &[])?["groups"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SIGTERM (a clean TSDB shutdown), SIGKILL if it does not go within 10 s.
        let pid = self.child.id() as i32;
        // SAFETY: signalling the child this struct started and still owns.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_monitor_becomes_the_operators_scrape_config() {
        let pm: Value = serde_yaml::from_str(
            "kind: PodMonitor
metadata: {name: idx, namespace: mon}
spec:
  selector:
    matchLabels: {app.kubernetes.io/name: imageindex}
    matchExpressions: [{key: app.kubernetes.io/component, operator: In, values: [build, query]}]
  namespaceSelector: {any: true}
  podMetricsEndpoints:
  - port: metrics
    path: /metrics
    relabelings:
    - sourceLabels: [__meta_kubernetes_pod_label_imagematch_dev_attempt]
      targetLabel: attempt
",
        )
        .unwrap();
        let jobs = scrape_configs(&[pm], Discovery::Kubernetes(Path::new("/k.conf")), "1s");
        assert_eq!(jobs.len(), 1);
        let j = &jobs[0];
        assert_eq!(j["job_name"], "podMonitor/mon/idx/0");
        assert_eq!(j["kubernetes_sd_configs"][0]["role"], "pod");
        assert!(j["kubernetes_sd_configs"][0].get("namespaces").is_none());
        let rules = j["relabel_configs"].as_array().unwrap();
        assert!(rules.contains(&json!({"action": "keep",
            "source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name",
                "__meta_kubernetes_pod_labelpresent_app_kubernetes_io_name"],
            "regex": "(imageindex);true"})));
        assert!(rules.contains(&json!({"action": "keep",
            "source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component",
                "__meta_kubernetes_pod_labelpresent_app_kubernetes_io_component"],
            "regex": "(build|query);true"})));
        assert!(rules.contains(&json!({"action": "keep",
            "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "metrics"})));
        // The monitor's own relabelings come last, in Prometheus' spelling.
        assert_eq!(
            rules.last().unwrap(),
            &json!({"source_labels": ["__meta_kubernetes_pod_label_imagematch_dev_attempt"],
                "target_label": "attempt"})
        );
    }

    #[test]
    fn a_service_monitor_scrapes_endpoints_of_its_namespace() {
        let sm: Value = serde_yaml::from_str(
            "kind: ServiceMonitor
metadata: {name: op, namespace: sys}
spec:
  selector: {matchLabels: {app.kubernetes.io/instance: op}}
  namespaceSelector: {matchNames: [sys]}
  endpoints: [{port: metrics}]
",
        )
        .unwrap();
        let jobs = scrape_configs(&[sm], Discovery::Kubernetes(Path::new("/k.conf")), "2s");
        let j = &jobs[0];
        assert_eq!(j["kubernetes_sd_configs"][0]["role"], "endpoints");
        assert_eq!(
            j["kubernetes_sd_configs"][0]["namespaces"]["names"],
            json!(["sys"])
        );
        assert_eq!(j["scrape_interval"], "2s");
        let rules = j["relabel_configs"].as_array().unwrap();
        assert!(rules.contains(&json!({"action": "keep",
            "source_labels": ["__meta_kubernetes_endpoint_port_name"], "regex": "metrics"})));
        // With file discovery the namespace filter becomes the first rule.
        let jobs = scrape_configs(
            std::slice::from_ref(&jobs_source()),
            Discovery::Files(Path::new("/sd")),
            "2s",
        );
        assert_eq!(
            jobs[0]["file_sd_configs"][0]["files"],
            json!(["/sd/endpoints.json"])
        );
        assert_eq!(
            jobs[0]["relabel_configs"][0],
            json!({"action": "keep", "source_labels": ["__meta_kubernetes_namespace"], "regex": "(sys)"})
        );
    }

    fn jobs_source() -> Value {
        serde_yaml::from_str(
            "kind: ServiceMonitor
metadata: {name: op, namespace: sys}
spec:
  selector: {matchLabels: {app.kubernetes.io/instance: op}}
  endpoints: [{port: metrics}]
",
        )
        .unwrap()
    }

    #[test]
    fn pods_and_endpoints_become_targets_with_kubernetes_sd_labels() {
        let pod = json!({
            "metadata": {"name": "cats-build-1", "namespace": "team", "uid": "u1",
                "labels": {"app.kubernetes.io/component": "build", "imagematch.dev/attempt": "1"}},
            "spec": {"nodeName": "n", "containers": [{"name": "build", "image": "i",
                "ports": [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "podIP": "10.1.0.5", "hostIP": "10.1.0.1",
                "conditions": [{"type": "Ready", "status": "True"}]},
        });
        let t = pod_targets(&pod);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0]["targets"], json!(["10.1.0.5:9090"]));
        let l = &t[0]["labels"];
        assert_eq!(l["__meta_kubernetes_pod_label_imagematch_dev_attempt"], "1");
        assert_eq!(
            l["__meta_kubernetes_pod_labelpresent_app_kubernetes_io_component"],
            "true"
        );
        assert_eq!(l["__meta_kubernetes_pod_container_port_name"], "metrics");
        assert_eq!(l["__meta_kubernetes_pod_phase"], "Running");
        assert_eq!(l["__meta_kubernetes_pod_ready"], "true");
        // No address yet: no target.
        let mut pending = pod.clone();
        pending["status"] = json!({"phase": "Pending"});
        assert!(pod_targets(&pending).is_empty());

        let ep = json!({"metadata": {"name": "op-metrics", "namespace": "team"},
            "subsets": [{"addresses": [{"ip": "10.1.0.5", "targetRef": {"kind": "Pod", "name": "cats-build-1"}}],
                "ports": [{"name": "metrics", "port": 9090, "protocol": "TCP"}]}]});
        let svc = json!({"metadata": {"name": "op-metrics", "namespace": "team", "labels": {"app.kubernetes.io/instance": "op"}}});
        let t = endpoints_targets(&ep, Some(&svc), std::slice::from_ref(&pod));
        assert_eq!(t.len(), 1);
        let l = &t[0]["labels"];
        assert_eq!(t[0]["targets"], json!(["10.1.0.5:9090"]));
        assert_eq!(
            l["__meta_kubernetes_service_label_app_kubernetes_io_instance"],
            "op"
        );
        assert_eq!(l["__meta_kubernetes_endpoint_port_name"], "metrics");
        assert_eq!(l["__meta_kubernetes_endpoint_address_target_kind"], "Pod");
        assert_eq!(l["__meta_kubernetes_pod_container_name"], "build");
    }
}
