//! A whole test cluster on this machine: the control plane of tests/controlplane
//! ([`ControlPlane`]: etcd, kube-apiserver, kube-controller-manager v1.20.2), alone or with a
//! real node (tests/node: containerd, kubelet, kube-proxy, kube-scheduler;
//! [`crate::real_node`]) and a local-path provisioner; kubectl and helm pointed at it, and the
//! helpers the cluster tests share: waiting with a deadline, resolving a Service to a pod
//! address, queries, and a diagnostic dump for failure messages.

use crate::chart::kubectl_bin;
use crate::controlplane::{stderr_without_skew, ControlPlane, Options};
use crate::provisioner::LocalPathProvisioner;
use crate::real_node::RealNode;
use crate::repo;
use serde_json::Value;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A control plane ([`ControlPlane`], stopped when dropped), or a control plane with a real
/// node from tests/node/up.sh (stopped with tests/node/down.sh first) and its volume
/// provisioner.
pub struct TestCluster {
    provisioner: Option<LocalPathProvisioner>,
    node: Option<RealNode>,
    /// Dropped last: the node and the provisioner stop before it.
    cp: ControlPlane,
}

/// The control plane's options: the 1.20 PV controller races with itself when a claim names
/// a pre-bound volume (the volume's status update conflicts) and retries only at its resync:
/// 15 s by default, 2 s here.
fn options() -> Options {
    Options {
        prefix: "imageindex-cluster-",
        controller_manager_args: vec!["--pvclaimbinder-sync-period=2s".into()],
        ..Options::default()
    }
}

impl TestCluster {
    /// Starts a control plane and a real node (tests/node/up.sh) that has the image archives
    /// in `images` (scripts/images.sh), and a local-path provisioner for its claims. Panics
    /// with up.sh's output if it cannot.
    pub fn start_with_node(images: &Path) -> TestCluster {
        let (cp, node) = ControlPlane::start_with(&options(), |state, env| {
            RealNode::start(state, Some(images), env)
        });
        let provisioner =
            LocalPathProvisioner::start(&cp.admin_kubeconfig(), &cp.dir().join("volumes"))
                .unwrap_or_else(|e| panic!("{e}"));
        TestCluster {
            provisioner: Some(provisioner),
            node: Some(node),
            cp,
        }
    }

    /// The real node (of [`TestCluster::start_with_node`]).
    pub fn node(&self) -> &RealNode {
        self.node
            .as_ref()
            .expect("the cluster was started with a real node")
    }

    /// Stops everything now; the error lists what the node's teardown found left behind
    /// (processes, mounts, cgroups, the bridge, iptables chains).
    pub fn stop(mut self) -> Result<(), String> {
        self.stop_node()
    }

    /// Stops the provisioner and the node, if any; keeps the scratch directory if the node's
    /// teardown left something behind (its state tells tests/node/up.sh's next run what to
    /// clean up).
    fn stop_node(&mut self) -> Result<(), String> {
        self.provisioner.take();
        let result = match self.node.take() {
            Some(mut node) => node.stop(),
            None => Ok(()),
        };
        if result.is_err() {
            self.cp.keep_dir();
        }
        result
    }

    /// Starts the control plane (panics with up.sh's output if it cannot).
    pub fn start() -> TestCluster {
        TestCluster {
            provisioner: None,
            node: None,
            cp: ControlPlane::start(&options()),
        }
    }

    /// A value of STATE_DIR/env (`APISERVER_URL`, `APISERVER_PORT`, `CA_CERT`, ...).
    pub fn env(&self, key: &str) -> &str {
        self.cp.env(key)
    }

    /// The cluster's scratch directory (control-plane and node state, volumes, helm's home).
    pub fn dir(&self) -> &Path {
        self.cp.dir()
    }

    /// The admin's kubeconfig (group system:masters).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.cp.admin_kubeconfig()
    }

    /// A command with this cluster's KUBECONFIG, a private helm home, and the tools' kubectl
    /// and helm first on PATH.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.cp.command(program)
    }

    /// `kubectl ARGS`, whatever its outcome.
    pub fn kubectl_output(&self, args: &[&str]) -> Output {
        self.cp.kubectl_output(args)
    }

    /// `kubectl ARGS`, its stdout; panics with its stderr if it fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        self.cp.kubectl(args)
    }

    /// `kubectl ARGS -o json`, parsed.
    pub fn kubectl_json(&self, args: &[&str]) -> Value {
        self.cp.kubectl_json(args)
    }

    /// `kubectl ARGS -o json` if it succeeds (e.g. `None` when the object does not exist).
    pub fn kubectl_json_opt(&self, args: &[&str]) -> Option<Value> {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        let out = self.kubectl_output(&args);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `kubectl apply -f -` with `manifest` on stdin.
    pub fn apply(&self, manifest: &str) -> String {
        let mut child = self
            .command(kubectl_bin())
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl apply");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(manifest.as_bytes())
            .expect("writing the manifest");
        let out = child.wait_with_output().expect("kubectl apply");
        assert!(
            out.status.success(),
            "kubectl apply failed:\n{}\n{manifest}",
            stderr_without_skew(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `helm ARGS`, its stdout; panics if it fails.
    pub fn helm(&self, args: &[&str]) -> String {
        self.cp.helm(args)
    }

    /// Runs a shell command line as written (from the repository root, helm and kubectl of
    /// the tools directory first on PATH); its stdout.
    pub fn shell(&self, line: &str) -> String {
        let out = self
            .command("bash")
            .args(["-c", line])
            .current_dir(repo())
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "`{line}` failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr_without_skew(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The address behind a Service URL (`http://<svc>.<ns>.svc:<port>`), from the Service's
    /// Endpoints (ready addresses only), as kube-proxy would route it; `None` while there is
    /// no ready endpoint.
    pub fn service_address(&self, url: &str) -> Option<SocketAddr> {
        let rest = url.strip_prefix("http://").unwrap_or(url);
        let host_port = rest.split('/').next().unwrap_or(rest);
        let (host, port) = host_port.rsplit_once(':')?;
        let port: i64 = port.parse().ok()?;
        let mut parts = host.split('.');
        let (svc, ns) = (parts.next()?, parts.next()?);
        let service = self.kubectl_json_opt(&["get", "service", svc, "-n", ns])?;
        let svc_port = service["spec"]["ports"]
            .as_array()?
            .iter()
            .find(|p| p["port"].as_i64() == Some(port))?
            .clone();
        let endpoints = self.kubectl_json_opt(&["get", "endpoints", svc, "-n", ns])?;
        for subset in endpoints["subsets"].as_array()? {
            let ports = subset["ports"].as_array()?;
            let ep_port = ports
                .iter()
                .find(|p| p["name"] == svc_port["name"])
                .or_else(|| (ports.len() == 1).then(|| &ports[0]))?;
            if let Some(addr) = subset["addresses"].as_array().and_then(|a| a.first()) {
                let ip: IpAddr = addr["ip"].as_str()?.parse().ok()?;
                return Some(SocketAddr::new(
                    ip,
                    u16::try_from(ep_port["port"].as_i64()?).ok()?,
                ));
            }
        }
        None
    }

    /// What a failure message needs: ImageIndexes, pods with their container states,
    /// events, and the logs of the operator, the pods and the node.
    pub fn diagnostics(&self, namespaces: &[&str]) -> String {
        let mut out = String::new();
        let mut section = |title: &str, text: String| {
            out.push_str(&format!("\n===== {title} =====\n{}\n", text.trim_end()));
        };
        let kubectl = |args: &[&str]| {
            let o = self.kubectl_output(args);
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                stderr_without_skew(&o)
            )
        };
        let has_crd = self
            .kubectl_output(&["get", "crd", "imageindexes.imagematch.dev"])
            .status
            .success();
        if has_crd {
            section(
                "kubectl get imgidx -A",
                kubectl(&["get", "imgidx", "-A", "-o", "wide"]),
            );
        }
        section(
            "pods",
            pod_summary(
                &self
                    .kubectl_json_opt(&["get", "pods", "-A"])
                    .unwrap_or_default(),
            ),
        );
        for ns in namespaces.iter().filter(|_| has_crd) {
            section(
                &format!("imgidx -n {ns} status"),
                kubectl(&[
                    "get",
                    "imgidx",
                    "-n",
                    ns,
                    "-o",
                    "jsonpath={range .items[*]}{.metadata.name}: {.status}{\"\\n\"}{end}",
                ]),
            );
        }
        for ns in namespaces {
            section(
                &format!("events -n {ns}"),
                kubectl(&["get", "events", "-n", ns, "--sort-by=.lastTimestamp"]),
            );
        }
        if let Some(node) = &self.node {
            section(
                "operator log",
                kubectl(&[
                    "logs",
                    "-n",
                    "imageindex-system",
                    "deployment/imageindex-operator",
                    "--tail=60",
                ]),
            );
            for ns in namespaces {
                let pods = self
                    .kubectl_json_opt(&["get", "pods", "-n", ns])
                    .unwrap_or_default();
                for p in pods["items"].as_array().into_iter().flatten() {
                    let pod = p["metadata"]["name"].as_str().unwrap_or("");
                    section(
                        &format!("log of {ns}/{pod}"),
                        kubectl(&["logs", "-n", ns, pod, "--tail=15"]),
                    );
                }
            }
            section("kubelet log", node.log_tail("kubelet", 40));
            section("containerd log", node.log_tail("containerd", 15));
        }
        out
    }
}

impl Drop for TestCluster {
    /// Stops the provisioner and the node (if any; its errors are printed); then the control
    /// plane stops as it drops (its scratch directory is kept with IMAGEINDEX_KEEP_CLUSTER=1
    /// or when the node's teardown left something behind).
    fn drop(&mut self) {
        if let Err(e) = self.stop_node() {
            eprintln!("{e}");
        }
    }
}

/// One line per pod: namespace/name, node, phase, IP, and its container's state.
pub fn pod_summary(pods: &Value) -> String {
    let mut lines = Vec::new();
    for p in pods["items"].as_array().into_iter().flatten() {
        let cs = &p["status"]["containerStatuses"][0];
        let state = cs["state"]
            .as_object()
            .and_then(|o| o.iter().next())
            .map(|(k, v)| {
                let detail = ["reason", "exitCode", "message"]
                    .iter()
                    .filter_map(|f| {
                        v.get(*f).map(|x| {
                            format!(
                                "{f}={}",
                                x.to_string().chars().take(160).collect::<String>()
                            )
                        })
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                format!("{k} {detail}")
            })
            .unwrap_or_default();
        lines.push(format!(
            "{}/{} node={} phase={} ip={} ready={} restarts={} {}{}",
            p["metadata"]["namespace"].as_str().unwrap_or(""),
            p["metadata"]["name"].as_str().unwrap_or(""),
            p["spec"]["nodeName"].as_str().unwrap_or("-"),
            p["status"]["phase"].as_str().unwrap_or("-"),
            p["status"]["podIP"].as_str().unwrap_or("-"),
            cs["ready"],
            cs["restartCount"],
            state,
            if p["metadata"]["deletionTimestamp"].is_null() {
                ""
            } else {
                " (deleting)"
            },
        ));
    }
    lines.join("\n")
}

/// Polls `check` every 250 ms until it returns `Some`, or panics after `timeout` with `what`
/// and `diagnose()`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
    diagnose: impl FnOnce() -> String,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                diagnose()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The shell commands of a README section (```sh blocks, `\` continuations joined).
pub fn readme_commands(readme: &Path, section: &str) -> Vec<String> {
    let text =
        std::fs::read_to_string(readme).unwrap_or_else(|e| panic!("{}: {e}", readme.display()));
    let heading = format!("## {section}");
    let Some(body) = text.split(&heading).nth(1) else {
        panic!("no {heading:?} section in {}", readme.display());
    };
    let body = body.split("\n## ").next().unwrap_or(body);
    let mut commands = Vec::new();
    let mut in_block = false;
    let mut current = String::new();
    for line in body.lines() {
        if line.starts_with("```") {
            in_block = line == "```sh";
            continue;
        }
        if !in_block {
            continue;
        }
        match line.trim_end().strip_suffix('\\') {
            Some(head) => {
                current.push_str(head.trim());
                current.push(' ');
            }
            None => {
                current.push_str(line.trim());
                commands.push(std::mem::take(&mut current));
            }
        }
    }
    commands
}

/// `POST /v1/search` with `image` as the multipart field `image`; the answer's status and
/// JSON body.
pub fn search(addr: SocketAddr, image: &[u8]) -> Result<(u16, Value), String> {
    let client = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| e.to_string())?;
    let part = reqwest::blocking::multipart::Part::bytes(image.to_vec())
        .file_name("query.jpg")
        .mime_str("image/jpeg")
        .map_err(|e| e.to_string())?;
    let form = reqwest::blocking::multipart::Form::new().part("image", part);
    let resp = client
        .post(format!("http://{addr}/v1/search"))
        .multipart(form)
        .send()
        .map_err(|e| format!("POST http://{addr}/v1/search: {e}"))?;
    let status = resp.status().as_u16();
    let text = resp.text().map_err(|e| e.to_string())?;
    let json = serde_json::from_str(&text)
        .map_err(|e| format!("status {status}, not JSON ({e}): {text}"))?;
    Ok((status, json))
}

/// `GET path` on `addr`, parsed as JSON.
pub fn get_json(addr: SocketAddr, path: &str) -> Result<Value, String> {
    let client = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let resp = client
        .get(format!("http://{addr}{path}"))
        .send()
        .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
    resp.json().map_err(|e| e.to_string())
}
