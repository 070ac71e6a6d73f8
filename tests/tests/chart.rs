//! The Helm chart (charts/imageindex-operator), its Grafana dashboard and the Dockerfiles,
//! checked offline: lint, render, schema validation, RBAC against operator/src/rbac.rs,
//! dashboard queries against the metrics the code exports, Dockerfiles against the workspace
//! and Debian bookworm. Needs the tools of scripts/setup.sh (helm, the tools venv with
//! kubernetes-validate, the prometheus-operator models and hadolint) and the built binaries
//! (`cargo build --workspace --bins`). The chart against a real API server is in
//! chart_apiserver.rs.

use imageindex_e2e::chart::{
    chart_dir, hadolint_bin, helm_bin, helm_template, one, parse_documents, python_bin, rule_keys,
    run_ok, write, RuleKey,
};
use imageindex_e2e::{bin, repo};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const NS: &str = "imageindex-system";
const ALL_FEATURES: &str = "ci/all-features-values.yaml";
const NAMESPACED: &str = "ci/namespaced-values.yaml";

fn values_file(name: &str) -> String {
    chart_dir().join(name).display().to_string()
}

fn render(args: &[&str]) -> Vec<Value> {
    parse_documents(&helm_template("imageindex-operator", NS, args))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn chart_crd_is_crds_imageindex_yaml() {
    let source = read(&repo().join("crds/imageindex.yaml"));
    let chart = read(&chart_dir().join("crds/imageindex.yaml"));
    assert!(
        chart == source,
        "charts/imageindex-operator/crds/imageindex.yaml differs from crds/imageindex.yaml; copy it:\n  \
         cp crds/imageindex.yaml charts/imageindex-operator/crds/imageindex.yaml"
    );
    // Helm installs it from crds/ (never templated, never deleted on uninstall).
    let rendered = helm_template("imageindex-operator", NS, &["--include-crds"]);
    assert!(
        rendered.contains(source.trim_end()),
        "helm does not ship the CRD as it is"
    );
    let crds: Vec<_> = parse_documents(&rendered)
        .into_iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .collect();
    assert_eq!(crds.len(), 1);
    assert_eq!(crds[0]["metadata"]["name"], "imageindexes.imagematch.dev");
}

#[test]
fn helm_lint_is_clean() {
    for values in [None, Some(ALL_FEATURES), Some(NAMESPACED)] {
        let mut cmd = Command::new(helm_bin());
        cmd.args(["lint", "--strict"]).arg(chart_dir());
        if let Some(v) = values {
            cmd.args(["--values", &values_file(v)]);
        }
        let out = run_ok(&mut cmd);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("0 chart(s) failed"), "{values:?}: {text}");
        // Only [INFO] findings (the chart has no icon URL to give) are allowed.
        for line in text.lines() {
            assert!(
                !line.contains("[WARNING]") && !line.contains("[ERROR]"),
                "helm lint {values:?}: {line}"
            );
        }
    }
}

#[test]
fn values_schema_rejects_typos_and_bad_values() {
    for set in [
        "imagge.tag=x",
        "operator.scrapeInterval=soon",
        "operator.watchNamespace=Not_A_Namespace",
        "indexer.image.pullPolicy=Sometimes",
        "metrics.port=70000",
        "monitoring.podMonitor.enabld=true",
        "monitoring.prometheusRule.memoryPressure.ratio=1.5",
        "monitoring.prometheusRule.oomKills.window=half an hour",
    ] {
        let out = Command::new(helm_bin())
            .args(["template", "x"])
            .arg(chart_dir())
            .args(["--set", set])
            .output()
            .expect("helm");
        assert!(
            !out.status.success(),
            "--set {set} should fail values.schema.json"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("imageindex-operator"), "--set {set}: {err}");
    }
}

/// Every manifest the chart renders (default values, every feature on, one watched
/// namespace, the CRD) and the example ImageIndexes, through tests/tools/validate_manifests.py.
#[test]
fn rendered_manifests_and_examples_validate() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = vec![
        write(
            dir.path(),
            "default.yaml",
            &helm_template("imageindex-operator", NS, &["--include-crds"]),
        ),
        write(
            dir.path(),
            "all-features.yaml",
            &helm_template(
                "imageindex-operator",
                NS,
                &["--values", &values_file(ALL_FEATURES)],
            ),
        ),
        write(
            dir.path(),
            "namespaced.yaml",
            &helm_template(
                "imageindex-operator",
                NS,
                &["--values", &values_file(NAMESPACED)],
            ),
        ),
    ];
    let mut examples: Vec<_> = std::fs::read_dir(repo().join("crds/yaml"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 3, "{examples:?}");
    files.extend(examples);
    let report = validate(&files);
    assert!(report.ok, "{}", report.text);
    for expected in [
        "OK CustomResourceDefinition/imageindexes.imagematch.dev: Kubernetes",
        "OK Deployment/imageindex-operator: Kubernetes",
        "OK ServiceAccount/imageindex-operator: Kubernetes",
        "OK ServiceAccount/imageindex-operator-sa: Kubernetes",
        "OK ClusterRole/imageindex-operator: Kubernetes",
        "OK ClusterRoleBinding/imageindex-operator: Kubernetes",
        "OK Role/imageindex-operator: Kubernetes",
        "OK RoleBinding/imageindex-operator: Kubernetes",
        "OK Service/imageindex-operator-metrics: Kubernetes",
        "OK ConfigMap/imageindex-operator-dashboard: Kubernetes",
        "OK ServiceMonitor/imageindex-operator: prometheus-operator model",
        "OK PodMonitor/imageindex-operator-indexes: prometheus-operator model",
        "OK PrometheusRule/imageindex-operator: prometheus-operator model",
        "OK ImageIndex/catalogue: CRD imageindexes.imagematch.dev openAPIV3Schema",
        "OK ImageIndex/invalid: CRD",
        "OK ImageIndex/too-small: CRD",
    ] {
        assert!(
            report.text.contains(expected),
            "missing {expected:?} in\n{}",
            report.text
        );
    }
}

/// The validator is not vacuous: it fails an unknown field or a wrong type in each family.
#[test]
fn manifest_validation_rejects_bad_documents() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "deployment-typo.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec:\n      containers:\n        - name: c\n          image: x\n          readinesProbe: {}\n",
            "FAIL Deployment/d",
        ),
        (
            "service-port.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n    - port: eighty\n",
            "FAIL Service/s",
        ),
        (
            "imageindex.yaml",
            "apiVersion: imagematch.dev/v1alpha1\nkind: ImageIndex\nmetadata: {name: bad}\nspec:\n  dataset: {claimName: photos, path: /c}\n  memoryLimt: 512Mi\n  preset: huge\n",
            "FAIL ImageIndex/bad",
        ),
        (
            "podmonitor.yaml",
            "apiVersion: monitoring.coreos.com/v1\nkind: PodMonitor\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {a: b}}\n  podMetricsEndpoints:\n    - port: metrics\n      relabelings:\n        - sourceLabel: [a]\n          targetLabel: b\n",
            "FAIL PodMonitor/p",
        ),
        (
            "servicemonitor.yaml",
            "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: m}\nspec:\n  selector: {}\n  endpoints:\n    - port: metrics\n      interval: 30 seconds\n",
            "FAIL ServiceMonitor/m",
        ),
        (
            "unknown.yaml",
            "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n",
            "FAIL Widget/w",
        ),
    ];
    for (name, text, expected) in cases {
        let path = write(dir.path(), name, text);
        let report = validate(&[path]);
        assert!(!report.ok, "{name} passed:\n{}", report.text);
        assert!(report.text.contains(expected), "{name}:\n{}", report.text);
    }
}

struct Report {
    ok: bool,
    text: String,
}

fn validate(files: &[std::path::PathBuf]) -> Report {
    let out = Command::new(python_bin())
        .arg(repo().join("tests/tools/validate_manifests.py"))
        // The oldest and newest schemas kubernetes-validate ships (the test API server is
        // 1.20, older than any of them: chart_apiserver.rs applies the chart to it).
        .args(["--kube-version", "1.22.0", "--kube-version", "1.31.0"])
        .arg("--crd")
        .arg(repo().join("crds/imageindex.yaml"))
        .args(files)
        .output()
        .expect("cannot run tests/tools/validate_manifests.py");
    Report {
        ok: out.status.success(),
        text: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

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

fn assert_no_wildcard(role: &Value) {
    for rule in role["rules"].as_array().unwrap() {
        for field in [
            "apiGroups",
            "resources",
            "verbs",
            "resourceNames",
            "nonResourceURLs",
        ] {
            for v in rule[field].as_array().into_iter().flatten() {
                assert!(
                    !v.as_str().unwrap_or_default().contains('*'),
                    "wildcard in {field} of {role}"
                );
            }
        }
        assert!(rule.get("nonResourceURLs").is_none(), "{rule}");
    }
}

#[test]
fn rbac_is_exactly_the_operators_rules_without_wildcards() {
    let expected = operator_rules();
    assert!(!expected.is_empty());

    // All namespaces: a ClusterRole bound to the chart's ServiceAccount.
    let docs = render(&[]);
    let role = one(&docs, "ClusterRole");
    assert_no_wildcard(role);
    assert_eq!(
        rule_keys(&role["rules"]),
        expected,
        "the chart's ClusterRole must equal operator/src/rbac.rs RULES"
    );
    assert!(
        docs.iter()
            .all(|d| d["kind"] != "Role" && d["kind"] != "RoleBinding"),
        "no Role without operator.watchNamespace"
    );
    let binding = one(&docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let sa = one(&docs, "ServiceAccount");
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NS}])
    );
    let deployment = one(&docs, "Deployment");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        sa["metadata"]["name"]
    );

    // One watched namespace: a Role and RoleBinding there, nothing cluster-wide.
    let docs = render(&["--values", &values_file(NAMESPACED)]);
    assert!(
        docs.iter()
            .all(|d| d["kind"] != "ClusterRole" && d["kind"] != "ClusterRoleBinding"),
        "no cluster-wide RBAC with operator.watchNamespace"
    );
    let role = one(&docs, "Role");
    assert_no_wildcard(role);
    assert_eq!(role["metadata"]["namespace"], "team-b");
    assert_eq!(rule_keys(&role["rules"]), expected);
    let binding = one(&docs, "RoleBinding");
    assert_eq!(binding["metadata"]["namespace"], "team-b");
    assert_eq!(binding["roleRef"]["kind"], "Role");
    assert_eq!(binding["subjects"][0]["namespace"], NS);
    let args = container(&docs)["args"].clone();
    assert!(
        args.as_array()
            .unwrap()
            .contains(&Value::from("--namespace=team-b")),
        "{args}"
    );

    // rbac.create=false: no RBAC objects at all.
    let docs = render(&["--set", "rbac.create=false"]);
    assert!(docs
        .iter()
        .all(|d| !d["kind"].as_str().unwrap_or_default().contains("Role")));
}

fn container(docs: &[Value]) -> &Value {
    &one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
}

fn args_of(docs: &[Value]) -> Vec<String> {
    container(docs)["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .find_map(|a| a.strip_prefix(&format!("{name}=")))
}

#[test]
fn deployment_runs_the_operator_with_the_values() {
    let docs = render(&[]);
    let c = container(&docs);
    let args = args_of(&docs);
    assert_eq!(c["command"], serde_json::json!(["operator"]));
    assert_eq!(args[0], "run");
    // The chart's defaults are the operator's own.
    assert_eq!(
        flag(&args, "--indexer-image"),
        Some(operator::settings::DEFAULT_INDEXER_IMAGE)
    );
    assert_eq!(
        flag(&args, "--build-metrics-port"),
        Some(
            operator::settings::DEFAULT_BUILD_METRICS_PORT
                .to_string()
                .as_str()
        )
    );
    assert_eq!(flag(&args, "--image-pull-policy"), Some("IfNotPresent"));
    assert_eq!(flag(&args, "--scrape-interval"), Some("5s"));
    assert_eq!(flag(&args, "--namespace"), None);
    assert_eq!(
        c["image"],
        format!("imageindex/operator:{}", env!("CARGO_PKG_VERSION"))
    );
    // Bound to the pod IP from the downward API, probed on the named port.
    assert_eq!(flag(&args, "--metrics-addr"), Some("$(POD_IP):8080"));
    let pod_ip = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "POD_IP")
        .expect("env POD_IP");
    assert_eq!(pod_ip["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    assert_eq!(c["ports"][0]["name"], "metrics");
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    assert_eq!(c["ports"][0]["protocol"], "TCP");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "metrics");
    // Hardened: non-root, read-only root, no privilege escalation, no capabilities.
    let pod = &one(&docs, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert!(c["resources"]["limits"]["memory"].is_string());
    assert!(c["resources"]["requests"]["cpu"].is_string());
    // One operator at a time (no leader election).
    let spec = &one(&docs, "Deployment")["spec"];
    assert_eq!(spec["replicas"], 1);
    assert_eq!(spec["strategy"]["type"], "Recreate");
    let svc = one(&docs, "Service");
    assert_eq!(svc["spec"]["ports"][0]["protocol"], "TCP");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");
    assert_eq!(
        svc["spec"]["selector"],
        one(&docs, "Deployment")["spec"]["selector"]["matchLabels"]
    );
    // Recommended labels everywhere.
    for d in &docs {
        let labels = &d["metadata"]["labels"];
        for key in [
            "helm.sh/chart",
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
        ] {
            assert!(labels[key].is_string(), "{key} on {}", d["kind"]);
        }
    }
    // Monitoring is off by default (its CRDs may not exist); the dashboard is on.
    assert!(docs.iter().all(|d| d["kind"] != "ServiceMonitor"
        && d["kind"] != "PodMonitor"
        && d["kind"] != "PrometheusRule"));
    assert_eq!(
        one(&docs, "ConfigMap")["metadata"]["labels"]["grafana_dashboard"],
        "1"
    );

    // Values reach the flags.
    let docs = render(&["--values", &values_file(ALL_FEATURES)]);
    let args = args_of(&docs);
    assert_eq!(
        flag(&args, "--indexer-image"),
        Some("registry.example.com/imageindex/indexer:0.1.0-rc1")
    );
    assert_eq!(flag(&args, "--image-pull-policy"), Some("Always"));
    assert_eq!(flag(&args, "--build-metrics-port"), Some("9191"));
    assert_eq!(flag(&args, "--scrape-interval"), Some("2s"));
    assert_eq!(flag(&args, "--metrics-addr"), Some("0.0.0.0:8080"));
    let c = container(&docs);
    assert!(
        c["image"]
            .as_str()
            .unwrap()
            .starts_with("imageindex/operator@sha256:"),
        "{}",
        c["image"]
    );
    let pod = &one(&docs, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["imagePullSecrets"][0]["name"], "regcred");
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(pod["tolerations"][0]["key"], "dedicated");
    assert!(pod["affinity"]["nodeAffinity"].is_object());
    assert_eq!(pod["serviceAccountName"], "imageindex-operator-sa");

    // nameOverride / fullnameOverride.
    let docs = render(&["--set", "fullnameOverride=idx"]);
    assert_eq!(one(&docs, "Deployment")["metadata"]["name"], "idx");
    let docs = render(&["--set", "nameOverride=imgidx"]);
    assert_eq!(
        one(&docs, "Deployment")["metadata"]["labels"]["app.kubernetes.io/name"],
        "imgidx"
    );
}

/// Every flag the chart passes is one `operator run` accepts, with an accepted value.
#[test]
fn operator_binary_accepts_the_charts_flags() {
    let help = run_ok(Command::new(bin("operator")).args(["run", "--help"]));
    let help = String::from_utf8_lossy(&help.stdout);
    for values in [None, Some(ALL_FEATURES), Some(NAMESPACED)] {
        let mut extra = vec![];
        let file;
        if let Some(v) = values {
            file = values_file(v);
            extra = vec!["--values", file.as_str()];
        }
        let args = args_of(&render(&extra));
        for a in &args[1..] {
            let name = a.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{name} ")) || help.contains(&format!("{name}=")),
                "`operator run` has no flag {name} ({values:?}):\n{help}"
            );
        }
        // Parse the values too: run with an address that cannot be bound, so the operator
        // stops right after parsing its flags, before it looks for a cluster.
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                if a.starts_with("--metrics-addr=") {
                    "--metrics-addr=192.0.2.1:1".to_string()
                } else {
                    a.clone()
                }
            })
            .collect();
        let out = Command::new(bin("operator"))
            .args(&args)
            .env("KUBECONFIG", "/nonexistent")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("binding 192.0.2.1:1"),
            "{values:?}: the operator rejected the chart's flags {args:?}:\n{err}"
        );
    }
}

// ------------------------------------------------------------------------- the dashboard

fn dashboard() -> Value {
    serde_json::from_str(&read(&chart_dir().join("dashboards/imageindex.json")))
        .expect("dashboards/imageindex.json is JSON")
}

/// Every PromQL expression of the dashboard: panel targets and template variable queries.
fn expressions(dashboard: &Value) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = panels.pop() {
        panels.extend(p["panels"].as_array().into_iter().flatten());
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(
                t["expr"]
                    .as_str()
                    .expect("every target has an expr")
                    .to_string(),
            );
        }
    }
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap();
            exprs.push(q.to_string());
        }
    }
    exprs
}

/// The metric names a PromQL expression reads: identifiers that are not functions,
/// keywords, label names (in `{...}`, `by (...)`, `on (...)`, ...), label values (strings),
/// durations (`[...]`) or Grafana variables (`$...`). For `label_values(m, label)` only `m`.
fn metric_names(expr: &str) -> Vec<String> {
    const KEYWORDS: [&str; 6] = ["and", "or", "unless", "bool", "offset", "inf"];
    // Aggregations may be written `sum by (x) (...)`: not followed by `(` directly.
    const AGGREGATIONS: [&str; 12] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let skip_group = |i: &mut usize, open: char, close: char| {
        let mut depth = 0;
        while *i < chars.len() {
            if chars[*i] == open {
                depth += 1;
            } else if chars[*i] == close {
                depth -= 1;
                if depth == 0 {
                    *i += 1;
                    return;
                }
            } else if chars[*i] == '"' {
                *i += 1;
                while *i < chars.len() && chars[*i] != '"' {
                    *i += if chars[*i] == '\\' { 2 } else { 1 };
                }
            }
            *i += 1;
        }
    };
    let mut label_values_arg = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '{' {
            skip_group(&mut i, '{', '}');
        } else if c == '[' {
            skip_group(&mut i, '[', ']');
        } else if c == '$' {
            i += 1;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c == ',' && label_values_arg {
            // label_values(metric, label): the rest names a label.
            break;
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let called = j < chars.len() && chars[j] == '(';
            if GROUPING.contains(&word.as_str()) {
                if called {
                    i = j;
                    skip_group(&mut i, '(', ')');
                }
            } else if word == "label_values" {
                label_values_arg = true;
            } else if !called
                && !KEYWORDS.contains(&word.to_lowercase().as_str())
                && !AGGREGATIONS.contains(&word.as_str())
            {
                names.push(word);
            }
        } else if c.is_ascii_digit() || c == '.' {
            // Numbers, including 1e3 and durations outside [...].
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The non-test Rust sources of the crates that export metrics (their names are constants of
/// `imageindex_crds::metrics`, which these sources use).
fn exporting_sources() -> String {
    let mut text = String::new();
    let mut dirs = vec![repo().join("indexer/src"), repo().join("operator/src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let src = read(&p);
                // A name that only a unit test mentions is not exported.
                let code = src.split("#[cfg(test)]").next().unwrap_or_default();
                text.push_str(code);
            }
        }
    }
    text
}

/// The constant of `imageindex_crds::metrics` (crds/src/metrics.rs) whose value is `name`.
fn metric_constant(name: &str) -> Option<String> {
    if !imageindex_crds::metrics::ALL.contains(&name) {
        return None;
    }
    let src = read(&repo().join("crds/src/metrics.rs"));
    let before = &src[..src.find(&format!("\"{name}\""))?];
    let decl = before.rsplit("pub const ").next()?;
    Some(decl.split(':').next()?.trim().to_string())
}

/// Whether `sources` use the constant `ident` (as `path::IDENT`, a whole identifier).
fn uses_constant(sources: &str, ident: &str) -> bool {
    let pattern = format!("::{ident}");
    sources.match_indices(&pattern).any(|(i, m)| {
        !sources[i + m.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

#[test]
fn metric_names_are_extracted_from_promql() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.95, sum by (le, route) (rate(a_bucket{x="$y", route!~"/h|/r"}[$__rate_interval]))) / on (pod) group_left(z) b * 3600 > bool 1e3"#
        ),
        ["a_bucket", "b"]
    );
    assert_eq!(
        metric_names(r#"label_values(m{namespace="$namespace"}, imageindex)"#),
        ["m"]
    );
    assert_eq!(
        metric_names("max by (phase) (p{a=\"b\"}) == 1 unless c offset 5m"),
        ["p", "c"]
    );
}

#[test]
fn dashboard_queries_only_metrics_the_code_exports() {
    let dashboard = dashboard();
    let sources = exporting_sources();
    let mut queried = BTreeSet::new();
    for expr in expressions(&dashboard) {
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "no metric in {expr:?}");
        queried.extend(names);
    }
    let mut missing = Vec::new();
    for name in &queried {
        assert!(
            name.starts_with("imageindex_"),
            "the dashboard queries {name}, which imageindex does not export"
        );
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        let exported =
            |n: &str| metric_constant(n).is_some_and(|ident| uses_constant(&sources, &ident));
        if !exported(name) && !exported(base) {
            missing.push(name.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics that are not a constant of imageindex_crds::metrics used by the indexer or the operator: {missing:?}"
    );
    // And it shows what the issue asks for, under DESIGN.md's names.
    for needed in [
        "imageindex_memory_working_set_bytes",
        "imageindex_memory_limit_bytes",
        "imageindex_memory_rss_bytes",
        "imageindex_memory_available_bytes",
        "imageindex_images_processed_total",
        "imageindex_images_total",
        "imageindex_descriptors_total",
        "imageindex_build_phase",
        "imageindex_operator_attempts_total",
        "imageindex_http_request_duration_seconds_bucket",
        "imageindex_http_requests_total",
    ] {
        assert!(
            queried.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
    let text = dashboard.to_string();
    for q in ["histogram_quantile(0.5,", "histogram_quantile(0.95,"] {
        assert!(text.contains(q), "query latency {q}");
    }
}

#[test]
fn dashboard_selects_one_image_index_by_the_pod_monitors_labels() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "imageindex");
    let vars: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "namespace", "imageindex"]);
    // Each query of the indexer's series selects the chosen ImageIndex; only the operator's
    // own metrics (no per-ImageIndex label) do not.
    for expr in expressions(&dashboard) {
        if expr.starts_with("label_values(") {
            continue;
        }
        let operator_only = metric_names(&expr)
            .iter()
            .all(|n| n.starts_with("imageindex_operator_"));
        if !operator_only {
            assert!(
                expr.contains(r#"namespace="$namespace""#)
                    && expr.contains(r#"imageindex="$imageindex""#),
                "{expr}"
            );
        }
    }
    // The PodMonitor gives the series those labels, from the label the operator puts on
    // every pod it makes (crds/src/labels.rs).
    let docs = render(&["--values", &values_file(ALL_FEATURES)]);
    let pm = one(&docs, "PodMonitor");
    let meta = |label: &str| {
        format!(
            "__meta_kubernetes_pod_label_{}",
            label.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        )
    };
    let endpoints = pm["spec"]["podMetricsEndpoints"].as_array().unwrap();
    let ports: Vec<&str> = endpoints
        .iter()
        .map(|e| e["port"].as_str().unwrap())
        .collect();
    assert_eq!(
        ports,
        ["metrics", "http"],
        "build pods' and query pods' ports"
    );
    for e in endpoints {
        let relabel = |target: &str| {
            e["relabelings"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["targetLabel"] == target)
                .map(|r| r["sourceLabels"][0].as_str().unwrap().to_string())
        };
        assert_eq!(
            relabel("imageindex"),
            Some(meta(imageindex_crds::labels::INSTANCE))
        );
        assert_eq!(
            relabel("component"),
            Some(meta(imageindex_crds::labels::COMPONENT))
        );
        assert_eq!(
            relabel("attempt"),
            Some(meta(imageindex_crds::labels::ATTEMPT))
        );
        // The panel "Memory per shard against its limit" selects by shard.
        assert_eq!(relabel("shard"), Some(meta(imageindex_crds::labels::SHARD)));
    }
    let components = pm["spec"]["selector"]["matchExpressions"][0]["values"].clone();
    assert_eq!(
        components,
        serde_json::json!(["build", "query", "shard"]),
        "build pods, the query pods (or router) and a sharded index's shard query pods"
    );
    let panel = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["title"] == "Memory per shard against its limit")
        .expect("the memory per shard panel");
    let exprs: Vec<&str> = panel["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["expr"].as_str().unwrap())
        .collect();
    assert!(
        exprs.iter().all(|e| e.starts_with("max by (shard) (")),
        "{exprs:?}"
    );
    let selector = &pm["spec"]["selector"]["matchLabels"];
    assert_eq!(
        selector[imageindex_crds::labels::NAME],
        imageindex_crds::labels::APP
    );
    assert_eq!(
        selector[imageindex_crds::labels::MANAGED_BY],
        imageindex_crds::labels::MANAGER
    );
    // The ConfigMap carries the file as it is, where the sidecar looks for it.
    let cm = one(&docs, "ConfigMap");
    assert_eq!(cm["metadata"]["namespace"], "monitoring");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: Value =
        serde_json::from_str(cm["data"]["imageindex.json"].as_str().unwrap()).unwrap();
    assert_eq!(shipped, dashboard);
    let docs = render(&["--set", "grafana.dashboard.enabled=false"]);
    assert!(docs.iter().all(|d| d["kind"] != "ConfigMap"));
}

// ------------------------------------------------------------------------- Dockerfiles

const DOCKERFILES: [&str; 2] = ["indexer/Dockerfile", "operator/Dockerfile"];

#[test]
fn dockerfiles_pass_hadolint() {
    for file in DOCKERFILES {
        let out = Command::new(hadolint_bin())
            .args(["--no-color", "--failure-threshold", "style"])
            .arg(repo().join(file))
            .output()
            .expect("hadolint");
        assert!(
            out.status.success(),
            "hadolint {file}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A Dockerfile's instructions, continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(t);
            out.push(std::mem::take(&mut current));
        }
    }
    out
}

/// Words of `apt-get install` commands in a RUN instruction (packages, not options).
fn apt_packages(run: &str) -> Vec<String> {
    let mut pkgs = Vec::new();
    for cmd in run.split("&&") {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        if let Some(pos) = words.windows(2).position(|w| w == ["apt-get", "install"]) {
            pkgs.extend(
                words[pos + 2..]
                    .iter()
                    .filter(|w| !w.starts_with('-'))
                    .map(|w| w.to_string()),
            );
        }
    }
    pkgs
}

/// The packages that ship the shared libraries `binary` needs (readelf -d NEEDED).
fn needed_packages(binary: &Path) -> BTreeSet<String> {
    let out = run_ok(Command::new("readelf").arg("-d").arg(binary));
    let text = String::from_utf8_lossy(&out.stdout);
    let ldconfig = run_ok(Command::new("ldconfig").arg("-p"));
    let cache = String::from_utf8_lossy(&ldconfig.stdout).into_owned();
    let mut pkgs = BTreeSet::new();
    for line in text.lines().filter(|l| l.contains("(NEEDED)")) {
        let soname = line
            .split('[')
            .nth(1)
            .and_then(|s| s.split(']').next())
            .unwrap();
        let path = cache
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{soname} ")) && l.contains("x86-64"))
            .and_then(|l| l.split("=> ").nth(1))
            .unwrap_or_else(|| panic!("{soname} is not in the linker cache"));
        // dpkg knows each file under the path its package ships (/lib or /usr/lib on a
        // merged-/usr system, the soname link or its target): try each spelling.
        let path = path.trim().to_string();
        let real = std::fs::canonicalize(&path).unwrap().display().to_string();
        let mut spellings = vec![path.clone(), real.clone()];
        for p in [&path, &real] {
            if let Some(rest) = p.strip_prefix("/usr/lib/") {
                spellings.push(format!("/lib/{rest}"));
            } else if let Some(rest) = p.strip_prefix("/lib/") {
                spellings.push(format!("/usr/lib/{rest}"));
            }
        }
        let owner = spellings
            .iter()
            .find_map(|p| {
                let out = Command::new("dpkg").arg("-S").arg(p).output().ok()?;
                out.status.success().then(|| {
                    String::from_utf8_lossy(&out.stdout)
                        .split(':')
                        .next()
                        .unwrap_or_default()
                        .to_string()
                })
            })
            .unwrap_or_else(|| panic!("no Debian package owns {soname} ({spellings:?})"));
        pkgs.insert(owner);
    }
    pkgs
}

#[test]
fn dockerfiles_build_and_install_what_exists() {
    // The cargo that runs this test (cargo sets CARGO), else the one in PATH.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let metadata = run_ok(Command::new(cargo).args([
        "metadata",
        "--no-deps",
        "--format-version",
        "1",
        "--offline",
    ]));
    let metadata: Value = serde_json::from_slice(&metadata.stdout).unwrap();
    let workspace_bins: BTreeSet<(String, String)> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| t["kind"].as_array().unwrap().contains(&Value::from("bin")))
                .map(move |t| {
                    (
                        p["name"].as_str().unwrap().to_string(),
                        t["name"].as_str().unwrap().to_string(),
                    )
                })
        })
        .collect();
    let rust_version = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|p| p["rust_version"].as_str())
        .unwrap_or("1.85")
        .to_string();
    let chart_uid = one(&render(&[]), "Deployment")["spec"]["template"]["spec"]["securityContext"]
        ["runAsUser"]
        .as_i64()
        .unwrap();

    for file in DOCKERFILES {
        let text = read(&repo().join(file));
        let steps = instructions(&text);
        let stages: Vec<&String> = steps.iter().filter(|s| s.starts_with("FROM ")).collect();
        assert_eq!(stages.len(), 2, "{file}: a builder and a runtime stage");
        // Builder: the Rust toolchain on bookworm, new enough for the workspace.
        let builder = stages[0].split_whitespace().nth(1).unwrap();
        let version = builder
            .strip_prefix("rust:")
            .and_then(|v| v.strip_suffix("-bookworm"))
            .unwrap_or_else(|| panic!("{file}: builder {builder} is not rust:<version>-bookworm"));
        let parse = |v: &str| -> Vec<u32> { v.split('.').map(|n| n.parse().unwrap()).collect() };
        assert!(
            parse(version) >= parse(&rust_version),
            "{file}: rust {version} < rust-version {rust_version}"
        );
        assert!(stages[0].ends_with(" AS builder"), "{file}: {}", stages[0]);
        assert_eq!(stages[1].as_str(), "FROM debian:bookworm-slim", "{file}");

        let mut built = BTreeSet::new();
        let mut copied = Vec::new();
        let mut packages = Vec::new();
        let mut runtime_packages = Vec::new();
        let mut stage = 0;
        let mut user = None;
        for step in &steps {
            if step.starts_with("FROM ") {
                stage += 1;
            } else if let Some(run) = step.strip_prefix("RUN ") {
                let pkgs = apt_packages(run);
                if stage == 2 {
                    runtime_packages.extend(pkgs.iter().cloned());
                }
                packages.extend(pkgs);
                if let Some(rest) = run.split("cargo build").nth(1) {
                    let words: Vec<&str> = rest.split_whitespace().collect();
                    let values = |flag: &str| -> Vec<String> {
                        words
                            .windows(2)
                            .filter(|w| w[0] == flag)
                            .map(|w| w[1].to_string())
                            .collect()
                    };
                    let (packages, binaries) = (values("-p"), values("--bin"));
                    assert!(
                        !binaries.is_empty()
                            && words.contains(&"--release")
                            && words.contains(&"--locked"),
                        "{file}: {run}"
                    );
                    for binary in &binaries {
                        assert!(
                            packages.iter().any(|p| workspace_bins.contains(&(p.clone(), binary.clone()))),
                            "{file}: none of {packages:?} has a bin {binary} (workspace bins: {workspace_bins:?})"
                        );
                    }
                    // Each binary leaves the build directory (a cache mount) for /out, its
                    // debug info stripped: `objcopy --strip-debug target/release/X /out/X`.
                    for cmd in run.split("&&") {
                        let w: Vec<&str> = cmd.split_whitespace().collect();
                        if let ["objcopy", "--strip-debug", from, to] = w.as_slice() {
                            let name = from.strip_prefix("target/release/").unwrap_or_else(|| {
                                panic!("{file}: objcopy from {from}, not target/release/")
                            });
                            assert!(binaries.iter().any(|b| b == name), "{file}: {cmd}");
                            built.insert(to.to_string());
                        }
                    }
                }
            } else if let Some(copy) = step.strip_prefix("COPY ") {
                let words: Vec<&str> = copy.split_whitespace().collect();
                if words[0].starts_with("--from=") {
                    copied.push(words[1].to_string());
                } else {
                    for src in &words[..words.len() - 1] {
                        assert!(
                            repo().join(src).exists(),
                            "{file}: COPY {src}: no such file in the repository"
                        );
                    }
                }
            } else if let Some(u) = step.strip_prefix("USER ") {
                user = Some(u.to_string());
            }
        }
        assert!(!copied.is_empty(), "{file}: copies no binary");
        for c in &copied {
            assert!(
                built.contains(c),
                "{file}: COPY --from=builder {c}, which no cargo build makes"
            );
        }
        // Non-root, and the user the chart runs it as.
        assert_eq!(
            user.as_deref(),
            Some(format!("{chart_uid}:{chart_uid}").as_str()),
            "{file}: USER"
        );
        // Every apt package exists in Debian bookworm.
        for pkg in &packages {
            let out = Command::new("apt-cache")
                .args(["policy", pkg])
                .output()
                .expect("apt-cache");
            let policy = String::from_utf8_lossy(&out.stdout);
            assert!(
                policy.contains("Candidate:") && !policy.contains("Candidate: (none)"),
                "{file}: apt package {pkg} is not in this machine's Debian package lists \
                 (run apt-get update on Debian 12):\n{policy}"
            );
            assert!(
                policy.contains("bookworm") || policy.contains("/var/lib/dpkg/status"),
                "{file}: {pkg} is not from bookworm:\n{policy}"
            );
        }
        // The runtime stage installs every library the binary links, beyond the C and C++
        // runtimes debian:bookworm-slim has (libc6, libgcc-s1; libstdc++6, which apt needs).
        for binary in copied.iter().map(|c| c.rsplit('/').next().unwrap()) {
            let needed = needed_packages(&bin(binary));
            for pkg in needed {
                assert!(
                    ["libc6", "libgcc-s1", "libstdc++6"].contains(&pkg.as_str())
                        || runtime_packages.contains(&pkg),
                    "{file}: {binary} links a library of {pkg}, which the runtime stage does not install"
                );
            }
        }
    }
}

/// Both Dockerfiles build both binaries in the same builder stage, so building the second
/// image reuses the first's from the layer cache (scripts/images.sh, `docker build`).
#[test]
fn dockerfiles_share_one_builder_stage() {
    let builder = |file: &str| -> Vec<String> {
        instructions(&read(&repo().join(file)))
            .into_iter()
            .skip_while(|s| !s.starts_with("FROM "))
            .enumerate()
            .take_while(|(i, s)| *i == 0 || !s.starts_with("FROM "))
            .map(|(_, s)| s)
            .collect()
    };
    let (indexer, operator) = (builder(DOCKERFILES[0]), builder(DOCKERFILES[1]));
    assert!(indexer.len() >= 5, "{indexer:#?}");
    assert_eq!(indexer, operator);
}

// ------------------------------------------------------------------------- alert rules

/// The PrometheusRule's expressions and alerts, through promtool (Debian's prometheus
/// package): `promtool check rules` and the unit tests of tests/prometheus/rules-test.yaml
/// (a build near its limit fires after `for`, a query pod or a build at 70% does not; one OOM
/// kill does not, two in the window do, also across an operator restart; a failed build).
#[test]
fn prometheus_rules_pass_promtool() {
    let promtool = imageindex_e2e::prometheus::PROMTOOL_BIN;
    assert!(
        Path::new(promtool).is_file(),
        "{promtool} not found: apt-get install prometheus (scripts/setup.sh installs it)"
    );
    let docs = render(&["--set", "monitoring.prometheusRule.enabled=true"]);
    let rules = imageindex_e2e::prometheus::rule_file(&docs);
    assert_eq!(
        rules["groups"][0]["rules"].as_array().map(Vec::len),
        Some(3),
        "{rules:#}"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml::to_string(&rules).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        repo().join("tests/prometheus/rules-test.yaml"),
        dir.path().join("rules-test.yaml"),
    )
    .unwrap();
    let check = run_ok(
        Command::new(promtool)
            .args(["check", "rules", "rules.yaml"])
            .current_dir(dir.path()),
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains("SUCCESS: 3 rules found"));
    let test = Command::new(promtool)
        .args(["test", "rules", "rules-test.yaml"])
        .current_dir(dir.path())
        .output()
        .expect("promtool");
    assert!(
        test.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
}

// ------------------------------------------------------------------------- NOTES.txt

/// The install notes' first ImageIndex (a here-document) is valid against the CRD, and the
/// notes tell where to watch it and where the query endpoint appears.
#[test]
fn notes_create_a_valid_first_image_index() {
    for values in [None, Some(NAMESPACED)] {
        let mut cmd = Command::new(helm_bin());
        cmd.args(["install", "imageindex-operator"])
            .arg(chart_dir())
            .args(["--namespace", NS, "--dry-run=client"]);
        if let Some(v) = values {
            cmd.args(["--values", &values_file(v)]);
        }
        let out = run_ok(&mut cmd);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let notes = text.split("NOTES:").nth(1).expect("NOTES in helm's output");
        let doc = notes
            .split("<<'YAML'")
            .nth(1)
            .and_then(|s| s.split_once('\n'))
            .and_then(|(_, rest)| rest.split("\nYAML\n").next())
            .expect("a here-document ending with YAML at the start of a line");
        let dir = tempfile::tempdir().unwrap();
        let report = validate(&[write(dir.path(), "first.yaml", doc)]);
        assert!(report.ok, "{values:?}: {}", report.text);
        assert!(
            report.text.contains("OK ImageIndex/catalogue: CRD"),
            "{}",
            report.text
        );
        for needed in [
            "get imgidx --watch",
            "{.status.endpoint}",
            "catalogue-query",
        ] {
            assert!(notes.contains(needed), "NOTES lack {needed:?}:\n{notes}");
        }
        if values.is_some() {
            assert!(
                notes.contains("kubectl apply --namespace team-b -f -"),
                "{notes}"
            );
        }
    }
}
