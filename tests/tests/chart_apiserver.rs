//! The Helm chart against a real kube-apiserver v1.20.2 (tests/controlplane: etcd,
//! kube-apiserver and kube-controller-manager; no kubelet, so pods stay Pending):
//!
//! 1. `helm install` (helm 4) of the chart with default values: the CRD, the operator's
//!    Deployment, ServiceAccount, ClusterRole and binding, metrics Service and dashboard
//!    ConfigMap are created, and the ServiceAccount gets tokens (TokenRequest).
//! 2. As that ServiceAccount (impersonation): a SelfSubjectRulesReview lists exactly the rules
//!    of operator/src/rbac.rs (beside what every authenticated user may do), `kubectl auth
//!    can-i` answers yes for every verb and resource in them and no for what the operator
//!    must not do.
//! 3. The real operator binary, with the Deployment's own arguments and the ServiceAccount's
//!    token, becomes ready and reconciles an ImageIndex (claim, scan pod, status).
//! 4. A second release watching one namespace gets a Role there and no rights elsewhere.
//! 5. `helm upgrade` changes the operator's flags; `helm uninstall` removes the RBAC and
//!    keeps the CRD (and so every ImageIndex).
//!
//! Needs tests/controlplane/build.sh's binaries, the tools of scripts/setup.sh and the built
//! `operator` binary. IMAGEINDEX_SKIP_APISERVER=1 skips it (a missing control plane is
//! otherwise a failure).

use imageindex_e2e::chart::{chart_dir, kubectl_bin, rule_keys, RuleKey};
use imageindex_e2e::controlplane::{self, ControlPlane, Options};
use imageindex_e2e::{bin, free_port, http_get, repo, stdout_of_success};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const RELEASE: &str = "imageindex-operator";
const NS: &str = "imageindex-system";
const SA: &str = "imageindex-operator";

/// The control plane ([`ControlPlane`]) with what this test asks of it: README commands,
/// `kubectl auth can-i` and rules reviews as a user.
struct Cluster {
    cp: ControlPlane,
}

impl Cluster {
    fn start() -> Self {
        Cluster {
            cp: ControlPlane::start(&Options {
                prefix: "imageindex-chart-",
                ..Options::default()
            }),
        }
    }

    fn output(&self, program: PathBuf, args: &[&str]) -> Output {
        self.cp
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.cp.kubectl(args)
    }

    fn kubectl_json(&self, args: &[&str]) -> Value {
        self.cp.kubectl_json(args)
    }

    fn helm(&self, args: &[&str]) -> String {
        self.cp.helm(args)
    }

    /// Runs the one README command that starts with `prefix`, as written (from the repository
    /// root, with the tools' helm and kubectl first in PATH), and returns its stdout.
    fn readme(&self, prefix: &str) -> String {
        let all = readme_commands();
        let commands: Vec<String> = match all.iter().find(|c| *c == prefix) {
            Some(exact) => vec![exact.clone()],
            None => all.into_iter().filter(|c| c.starts_with(prefix)).collect(),
        };
        assert_eq!(
            commands.len(),
            1,
            "README commands starting with {prefix:?}: {commands:?}"
        );
        let out = self
            .cp
            .command("bash")
            .args(["-c", &commands[0]])
            .current_dir(repo())
            .output()
            .unwrap();
        stdout_of_success(&out, &format!("README command {}", commands[0]))
    }

    /// `kubectl auth can-i VERB RESOURCE [--subresource SUB]` as `user` in `namespace`.
    fn can_i(&self, user: &str, namespace: Option<&str>, verb: &str, resource: &str) -> bool {
        let (resource, sub) = match resource.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (resource, None),
        };
        let mut args = vec!["auth", "can-i", verb, resource];
        let sub_flag;
        if let Some(s) = sub {
            sub_flag = format!("--subresource={s}");
            args.push(&sub_flag);
        }
        let as_flag = format!("--as={user}");
        args.push(&as_flag);
        if let Some(ns) = namespace {
            args.extend(["--namespace", ns]);
        }
        let out = self.output(kubectl_bin(), &args);
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        match answer.as_str() {
            "yes" => true,
            "no" => false,
            _ => panic!(
                "kubectl {args:?}: {answer} {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// The rules `user` has in `namespace`, as a SelfSubjectRulesReview made as that user.
    fn rules_of(&self, user: &str, namespace: &str) -> Vec<RuleKey> {
        let review = self.cp.dir().join(format!("ssrr-{namespace}.yaml"));
        std::fs::write(
            &review,
            format!(
                "apiVersion: authorization.k8s.io/v1\nkind: SelfSubjectRulesReview\n\
                 spec:\n  namespace: {namespace}\n"
            ),
        )
        .unwrap();
        let out: Value = serde_json::from_str(&self.kubectl(&[
            "create",
            "-f",
            review.to_str().unwrap(),
            "-o",
            "json",
            &format!("--as={user}"),
        ]))
        .unwrap();
        assert_eq!(out["status"]["incomplete"], false, "{out}");
        rule_keys(&out["status"]["resourceRules"])
            .into_iter()
            // What every authenticated user may do (system:basic-user).
            .filter(|(group, _, _)| group != "authorization.k8s.io")
            .collect()
    }

    /// Waits until `check` returns Some, or panics with `what` after `timeout`.
    fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = check() {
                return v;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The operator process, killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The shell commands of the chart README's "Install on Kubernetes" section.
fn readme_commands() -> Vec<String> {
    imageindex_e2e::cluster::readme_commands(
        &chart_dir().join("README.md"),
        "Install on Kubernetes",
    )
}

/// README commands that cannot run here, each with the reason; every other one is run.
const README_NOT_RUN: [(&str, &str); 5] = [
    (
        "docker ",
        "no docker daemon on the test machines: scripts/images.sh builds the same Dockerfiles with buildah, and cluster_e2e.rs runs the result on a real node",
    ),
    (
        "kubectl --namespace imageindex-system rollout status",
        "no kubelet: the pod stays Pending (the operator binary runs as a process instead)",
    ),
    ("kubectl get imgidx --watch", "never returns"),
    ("kubectl port-forward", "no kubelet, no pod to forward to"),
    (
        "helm upgrade imageindex-operator ./charts/imageindex-operator --namespace imageindex-system --reuse-values --set monitoring",
        "needs the Prometheus Operator's CRDs (the PodMonitor and ServiceMonitor are validated offline in chart.rs)",
    ),
];

fn operator_rules() -> Vec<RuleKey> {
    let mut keys: Vec<RuleKey> = operator::rbac::RULES
        .iter()
        .flat_map(|r| {
            let mut verbs: Vec<String> = r.verbs.iter().map(|v| v.to_string()).collect();
            verbs.sort();
            r.resources
                .iter()
                .map(move |res| (r.api_group.to_string(), res.to_string(), verbs.clone()))
        })
        .collect();
    keys.sort();
    keys
}

/// `resource` as kubectl names it (`pods`, `deployments.apps`, `imageindexes.imagematch.dev/status`).
fn kubectl_resource(group: &str, resource: &str) -> String {
    let (res, sub) = match resource.split_once('/') {
        Some((r, s)) => (r, format!("/{s}")),
        None => (resource, String::new()),
    };
    if group.is_empty() {
        format!("{res}{sub}")
    } else {
        format!("{res}.{group}{sub}")
    }
}

fn granted(group: &str, resource: &str, verb: &str) -> bool {
    operator::rbac::RULES
        .iter()
        .any(|r| r.api_group == group && r.resources.contains(&resource) && r.verbs.contains(&verb))
}

#[test]
fn readme_commands_are_run_or_skipped_for_a_reason() {
    let commands = readme_commands();
    assert!(commands.len() >= 8, "{commands:?}");
    let run = [
        "helm install imageindex-operator",
        "kubectl apply -f crds/yaml/instance-good.yaml",
        "kubectl get imgidx catalogue -o jsonpath",
        "kubectl apply --server-side --force-conflicts -f charts/imageindex-operator/crds/imageindex.yaml",
        "helm upgrade imageindex-operator ./charts/imageindex-operator --namespace imageindex-system --reuse-values",
        "helm uninstall imageindex-operator",
    ];
    for prefix in run {
        assert!(
            commands.iter().any(|c| c.starts_with(prefix)),
            "the README no longer has the command {prefix:?} that chart_apiserver.rs runs"
        );
    }
    for c in &commands {
        let skipped = README_NOT_RUN.iter().any(|(p, _)| c.starts_with(p));
        let ran = run.iter().filter(|p| c.starts_with(*p)).count();
        assert!(
            skipped || ran >= 1,
            "README command {c:?} is neither run by chart_apiserver.rs nor skipped with a reason"
        );
    }
}

#[test]
fn chart_installs_on_a_real_api_server_with_exactly_the_operators_rights() {
    if controlplane::skipped(
        "chart_installs_on_a_real_api_server_with_exactly_the_operators_rights",
    ) {
        return;
    }
    let t0 = Instant::now();
    let cluster = Cluster::start();
    let t_up = t0.elapsed();
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();

    // 1. The README's helm install (helm 4 against a 1.20 API server).
    cluster.readme("helm install imageindex-operator");
    let status: Value =
        serde_json::from_str(&cluster.helm(&["status", RELEASE, "--namespace", NS, "-o", "json"]))
            .unwrap();
    assert_eq!(status["info"]["status"], "deployed", "{status}");
    cluster.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/imageindexes.imagematch.dev",
    ]);
    for object in [
        "deployment/imageindex-operator",
        "serviceaccount/imageindex-operator",
        "service/imageindex-operator-metrics",
        "configmap/imageindex-operator-dashboard",
    ] {
        cluster.kubectl(&["get", object, "--namespace", NS]);
    }
    cluster.kubectl(&["get", "clusterrole/imageindex-operator"]);
    cluster.kubectl(&["get", "clusterrolebinding/imageindex-operator"]);
    // The Deployment made its pod (Pending: no kubelet).
    let selector = format!("app.kubernetes.io/instance={RELEASE}");
    cluster.wait_for("the operator's pod", Duration::from_secs(30), || {
        let pods = cluster.kubectl_json(&["get", "pods", "--namespace", NS, "-l", &selector]);
        (!pods["items"].as_array().unwrap().is_empty()).then_some(())
    });

    // 2. Exactly the operator's rules, in any namespace.
    let user = format!("system:serviceaccount:{NS}:{SA}");
    cluster.kubectl(&["create", "namespace", "team-a"]);
    assert_eq!(cluster.rules_of(&user, "team-a"), operator_rules());
    let mut asked = 0;
    for rule in operator::rbac::RULES {
        for resource in rule.resources {
            for verb in rule.verbs {
                let r = kubectl_resource(rule.api_group, resource);
                assert!(
                    cluster.can_i(&user, Some("team-a"), verb, &r),
                    "the chart's ServiceAccount may not {verb} {r}"
                );
                asked += 1;
            }
        }
    }
    let forbidden = [
        ("", "secrets", "get"),
        ("", "secrets", "list"),
        ("", "configmaps", "get"),
        ("", "pods", "patch"),
        ("", "pods", "update"),
        ("", "pods/exec", "create"),
        ("", "services", "delete"),
        ("", "persistentvolumeclaims", "delete"),
        ("", "events", "create"),
        ("", "serviceaccounts", "create"),
        ("apps", "deployments", "delete"),
        ("apps", "deployments", "update"),
        ("imagematch.dev", "imageindexes", "create"),
        ("imagematch.dev", "imageindexes", "delete"),
        ("imagematch.dev", "imageindexes", "patch"),
        ("imagematch.dev", "imageindexes/status", "update"),
        ("rbac.authorization.k8s.io", "roles", "create"),
        ("rbac.authorization.k8s.io", "rolebindings", "create"),
    ];
    for (group, resource, verb) in forbidden {
        assert!(
            !granted(group, resource, verb),
            "rbac.rs now grants {verb} {resource}: update this test's list"
        );
        let r = kubectl_resource(group, resource);
        assert!(
            !cluster.can_i(&user, Some("team-a"), verb, &r),
            "the chart's ServiceAccount may {verb} {r}"
        );
        asked += 1;
    }
    for (verb, resource) in [
        ("list", "nodes"),
        ("get", "nodes"),
        ("create", "namespaces"),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
        ("update", "customresourcedefinitions.apiextensions.k8s.io"),
        ("impersonate", "users"),
    ] {
        assert!(
            !cluster.can_i(&user, None, verb, resource),
            "the chart's ServiceAccount may {verb} {resource} (cluster scope)"
        );
        asked += 1;
    }
    let t_rbac = t0.elapsed();

    // 3. The real operator, as the ServiceAccount, with the Deployment's arguments.
    // A token of the ServiceAccount from the TokenRequest API, as the kubelet mounts one.
    let token = cluster
        .kubectl(&["create", "token", SA, "--namespace", NS, "--duration=1h"])
        .trim()
        .to_string();
    let kubeconfig = cluster.cp.kubeconfig_for(SA, &token);
    let deployment = cluster.kubectl_json(&["get", "deployment", RELEASE, "--namespace", NS]);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["command"][0], "operator");
    let port = free_port();
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
            // What the kubelet does with $(POD_IP); our own port instead of 8080.
            if a.starts_with("--metrics-addr=") {
                format!("--metrics-addr=127.0.0.1:{port}")
            } else {
                a.replace("$(POD_IP)", "127.0.0.1")
            }
        })
        .collect();
    assert!(args
        .iter()
        .any(|a| a == "--indexer-image=registry.example.com/imageindex/indexer:0.1.0"));
    let log = cluster.cp.dir().join("operator.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let operator = Running(
        Command::new(bin("operator"))
            .args(&args)
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info,operator=debug")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("cannot start the operator binary"),
    );
    let log_tail = || std::fs::read_to_string(&log).unwrap_or_default();
    let start = Instant::now();
    while http_get(port, "/readyz").as_deref() != Some("ready") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the operator did not become ready as the chart's ServiceAccount:\n{}",
            log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(http_get(port, "/healthz").as_deref(), Some("ok"));
    // The README's first ImageIndex (namespace default).
    cluster.readme("kubectl apply -f crds/yaml/instance-good.yaml");
    cluster.wait_for(
        "the operator to make the index claim and the scan pod and write the status",
        Duration::from_secs(30),
        || {
            let ii =
                cluster.kubectl_json(&["get", "imgidx", "catalogue", "--namespace", "default"]);
            let phase = ii["status"]["phase"].as_str()?.to_string();
            let pods = cluster.kubectl_json(&[
                "get",
                "pods",
                "--namespace",
                "default",
                "-l",
                "app.kubernetes.io/instance=catalogue,app.kubernetes.io/component=scan",
            ]);
            let claims = cluster.kubectl_json(&["get", "pvc", "--namespace", "default"]);
            let has_claim = claims["items"]
                .as_array()?
                .iter()
                .any(|c| c["metadata"]["name"] == "catalogue-index");
            (phase == "Scanning" && has_claim && !pods["items"].as_array()?.is_empty())
                .then_some(())
        },
    );
    // Not Ready yet (no kubelet runs the scan): the endpoint is still empty.
    assert_eq!(
        cluster
            .readme("kubectl get imgidx catalogue -o jsonpath")
            .trim(),
        ""
    );
    let text = log_tail();
    assert!(
        !text.contains("forbidden") && !text.contains("Forbidden"),
        "the operator was refused something:\n{text}"
    );
    drop(operator);
    let t_operator = t0.elapsed();

    // 4. A release that watches one namespace: a Role there, nothing anywhere else.
    cluster.kubectl(&["create", "namespace", "team-b"]);
    cluster.helm(&[
        "install",
        "imageindex-team-b",
        chart,
        "--namespace",
        "team-b-system",
        "--create-namespace",
        "--skip-crds",
        "--set",
        "operator.watchNamespace=team-b",
        "--set",
        "grafana.dashboard.enabled=false",
    ]);
    let user_b = "system:serviceaccount:team-b-system:imageindex-team-b-imageindex-operator";
    assert_eq!(cluster.rules_of(user_b, "team-b"), operator_rules());
    assert_eq!(cluster.rules_of(user_b, "team-a"), Vec::<RuleKey>::new());
    assert!(cluster.can_i(user_b, Some("team-b"), "create", "pods"));
    assert!(!cluster.can_i(user_b, Some("team-a"), "create", "pods"));
    assert!(!cluster.can_i(
        user_b,
        Some("team-a"),
        "list",
        "imageindexes.imagematch.dev"
    ));
    let args = cluster.kubectl_json(&[
        "get",
        "deployment",
        "imageindex-team-b-imageindex-operator",
        "--namespace",
        "team-b-system",
    ])["spec"]["template"]["spec"]["containers"][0]["args"]
        .clone();
    assert!(
        args.as_array()
            .unwrap()
            .contains(&Value::from("--namespace=team-b")),
        "{args}"
    );

    // 5. The README's upgrade (CRD first, then the release), a changed flag, and uninstall:
    // the RBAC goes, the CRD and the ImageIndex stay.
    cluster.readme(
        "kubectl apply --server-side --force-conflicts -f charts/imageindex-operator/crds/imageindex.yaml",
    );
    cluster.readme(
        "helm upgrade imageindex-operator ./charts/imageindex-operator --namespace imageindex-system --reuse-values",
    );
    cluster.helm(&[
        "upgrade",
        RELEASE,
        chart,
        "--namespace",
        NS,
        "--reuse-values",
        "--set",
        "operator.scrapeInterval=10s",
    ]);
    let args = cluster.kubectl_json(&["get", "deployment", RELEASE, "--namespace", NS])["spec"]
        ["template"]["spec"]["containers"][0]["args"]
        .clone();
    let args = args.as_array().unwrap();
    assert!(
        args.contains(&Value::from("--scrape-interval=10s")),
        "{args:?}"
    );
    assert!(
        args.contains(&Value::from(
            "--indexer-image=registry.example.com/imageindex/indexer:0.1.0"
        )),
        "--reuse-values keeps the install's values: {args:?}"
    );
    cluster.readme("helm uninstall imageindex-operator");
    cluster.wait_for("the ClusterRole to go", Duration::from_secs(30), || {
        let out = cluster.output(kubectl_bin(), &["get", "clusterrole", RELEASE]);
        (!out.status.success()).then_some(())
    });
    cluster.kubectl(&["get", "crd", "imageindexes.imagematch.dev"]);
    cluster.kubectl(&["get", "imgidx", "catalogue", "--namespace", "default"]);
    eprintln!(
        "chart on kube-apiserver v1.20: control plane up {:.1} s, install + {asked} RBAC \
         checks {:.1} s, operator as the ServiceAccount {:.1} s, total {:.1} s",
        t_up.as_secs_f64(),
        t_rbac.as_secs_f64(),
        t_operator.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
