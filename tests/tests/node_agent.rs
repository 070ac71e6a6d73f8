//! The test node agent against a real kube-apiserver v1.20.2, with `/bin/sh` standing for an
//! image (`e2e/shell`): what cluster_e2e.rs relies on, and the kubelet behaviour its scenarios
//! do not reach.
//!
//! - the Node is registered and Ready; pending pods are bound to it;
//! - env, `$(VAR)` expansion (`$$` escapes, unknown names stay) and the downward API
//!   (status.podIP, metadata.*, labels, limits.memory);
//! - the container's root is its own: `runAsUser`/`runAsGroup`, `readOnlyRootFilesystem`, a
//!   read-only hostPath mount, none of the host's other directories;
//! - a memory limit the kernel enforces: OOMKilled, exit code 137, phase Failed;
//! - `restartPolicy: Always`: restarts with `lastState`, `FallbackToLogsOnError`;
//! - deletion of a container that ignores SIGTERM: SIGKILL after the grace period, then the
//!   pod object is removed, and its cgroup with it;
//! - an image the agent does not know waits in `ErrImagePull`.
//!
//! Needs root and tests/controlplane/build.sh's binaries. IMAGEINDEX_SKIP_APISERVER=1 skips it.

use imageindex_e2e::cluster::{wait_for, TestCluster};
use imageindex_e2e::node::ImageBinary;
use imageindex_e2e::*;
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const NS: &str = "agent";

fn pod(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\n  labels: {{app: {name}}}\nspec:\n{spec}"
    )
}

fn get(cluster: &TestCluster, name: &str) -> Value {
    cluster.kubectl_json(&["get", "pod", name, "-n", NS])
}

fn terminated(p: &Value) -> &Value {
    &p["status"]["containerStatuses"][0]["state"]["terminated"]
}

/// Waits until pod `name` reached `phase`.
fn wait_phase(cluster: &TestCluster, name: &str, phase: &str) -> Value {
    wait_for(
        &format!("pod {name} to be {phase}"),
        Duration::from_secs(60),
        || {
            let p = get(cluster, name);
            (p["status"]["phase"] == phase).then_some(p)
        },
        || cluster.diagnostics(&[NS]),
    )
}

#[test]
fn the_node_agent_behaves_like_a_kubelet() {
    if std::env::var("IMAGEINDEX_SKIP_APISERVER").as_deref() == Ok("1") {
        eprintln!("IMAGEINDEX_SKIP_APISERVER=1: skipped");
        return;
    }
    assert!(
        cgroups_writable(),
        "the node agent needs root (cgroups, mount namespaces, addresses on lo)"
    );
    let t0 = Instant::now();
    let mut cluster = TestCluster::start();
    cluster.start_agent_with(vec![ImageBinary {
        repository: "e2e/shell".into(),
        binary: PathBuf::from("/bin/sh"),
    }]);
    let node = cluster.kubectl_json(&["get", "node", "imageindex-node"]);
    let ready = node["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .cloned()
        .unwrap_or_default();
    assert_eq!(ready["status"], "True", "{node:#}");
    cluster.kubectl(&["create", "namespace", NS]);

    // Env, expansion and the downward API, seen by the process as positional arguments (so
    // that the shell does not interpret them again).
    cluster.apply(&pod(
        "env",
        r#"  restartPolicy: Never
  containers:
  - name: main
    image: registry.example.com/e2e/shell:1
    command: [sh, -c, 'printf "%s|" "$@" > /dev/termination-log', sh]
    args: ["$(POD_IP)", "$(MY_NAME)", "$(MY_NS)", "$(APP)", "$(LIMIT_MI)", "$(B)", "$$(A)", "$(NOPE)", "$(KUBERNETES_SERVICE_HOST)"]
    env:
    - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
    - {name: MY_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    - {name: MY_NS, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
    - {name: APP, valueFrom: {fieldRef: {fieldPath: "metadata.labels['app']"}}}
    - {name: LIMIT_MI, valueFrom: {resourceFieldRef: {resource: limits.memory, divisor: 1Mi}}}
    - {name: A, value: x}
    - {name: B, value: "$(A)-y"}
    resources: {limits: {memory: 64Mi}}
"#,
    ));
    let p = wait_phase(&cluster, "env", "Succeeded");
    let ip = p["status"]["podIP"].as_str().unwrap().to_string();
    assert!(ip.starts_with("10.244."), "{ip}");
    assert_eq!(p["spec"]["nodeName"], "imageindex-node");
    assert_eq!(terminated(&p)["reason"], "Completed");
    assert_eq!(
        terminated(&p)["message"].as_str().unwrap_or(""),
        format!("{ip}|env|{NS}|env|64|x-y|$(A)|$(NOPE)|127.0.0.1|")
    );

    // The container's own root: user, read-only root, read-only volume, no host directories.
    let data = tempfile::tempdir().unwrap();
    let shared = data.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("hello"), "hi").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(shared.join("hello"), std::fs::Permissions::from_mode(0o644)).unwrap();
    cluster.apply(&pod(
        "user",
        &format!(
            r#"  restartPolicy: Never
  securityContext: {{runAsUser: 1234, runAsGroup: 4321}}
  volumes:
  - name: data
    hostPath: {{path: {}}}
  containers:
  - name: main
    image: e2e/shell
    securityContext: {{readOnlyRootFilesystem: true, runAsNonRoot: true}}
    volumeMounts: [{{name: data, mountPath: /data, readOnly: true}}]
    command:
    - sh
    - -c
    - |
      r="$(id -u):$(id -g)"
      [ "$(cat /data/hello)" = hi ] && r="$r read"
      touch /data/x 2>/dev/null || r="$r ro-volume"
      touch /x 2>/dev/null || r="$r ro-root"
      [ -e {} ] || r="$r private-root"
      echo "$r" > /dev/termination-log
"#,
            shared.display(),
            repo().display()
        ),
    ));
    let p = wait_phase(&cluster, "user", "Succeeded");
    assert_eq!(
        terminated(&p)["message"].as_str().unwrap_or("").trim(),
        "1234:4321 read ro-volume ro-root private-root",
        "{p:#}"
    );

    // The kernel's OOM killer under the container's limit.
    cluster.apply(&pod(
        "oom",
        r#"  restartPolicy: Never
  containers:
  - name: main
    image: e2e/shell
    command: [sh, -c, 'head -c 200M /dev/zero | tail -c 150M > /dev/null']
    resources: {limits: {memory: 24Mi}, requests: {memory: 24Mi}}
"#,
    ));
    let p = wait_phase(&cluster, "oom", "Failed");
    assert_eq!(terminated(&p)["reason"], "OOMKilled", "{p:#}");
    assert_eq!(terminated(&p)["exitCode"], 137, "{p:#}");
    let run = cluster
        .agent()
        .runs()
        .into_iter()
        .find(|r| r.pod == "oom")
        .unwrap();
    let peak = run.ended.unwrap().peak_memory.unwrap();
    // The kernel charges in per-CPU batches: the peak may pass the limit by a few pages.
    assert!(
        peak <= (24 << 20) + (1 << 20),
        "the cgroup's peak {peak} is over the 24Mi limit"
    );

    // restartPolicy Always: restarts, lastState, the log as the termination message.
    cluster.apply(&pod(
        "crash",
        r#"  restartPolicy: Always
  containers:
  - name: main
    image: e2e/shell
    command: [sh, -c, 'echo boom; exit 3']
    terminationMessagePolicy: FallbackToLogsOnError
"#,
    ));
    let p = wait_for(
        "pod crash to be restarted twice",
        Duration::from_secs(60),
        || {
            let p = get(&cluster, "crash");
            (p["status"]["containerStatuses"][0]["restartCount"].as_i64() >= Some(2)).then_some(p)
        },
        || cluster.diagnostics(&[NS]),
    );
    let cs = &p["status"]["containerStatuses"][0];
    let last = &cs["lastState"]["terminated"];
    assert_eq!(
        (last["exitCode"].as_i64(), last["reason"].as_str()),
        (Some(3), Some("Error")),
        "{p:#}"
    );
    assert_eq!(
        last["message"].as_str().unwrap_or("").trim(),
        "boom",
        "{p:#}"
    );
    assert_eq!(p["status"]["phase"], "Running", "{p:#}");
    let runs = cluster
        .agent()
        .runs()
        .into_iter()
        .filter(|r| r.pod == "crash")
        .count();
    assert!(runs >= 2, "{runs} runs");

    // Deletion of a container that ignores SIGTERM: SIGKILL after the grace period.
    cluster.apply(&pod(
        "stubborn",
        r#"  restartPolicy: Never
  terminationGracePeriodSeconds: 3
  containers:
  - name: main
    image: e2e/shell
    command: [sh, -c, 'trap "" TERM; while :; do sleep 1; done']
"#,
    ));
    wait_phase(&cluster, "stubborn", "Running");
    let t = Instant::now();
    cluster.kubectl(&["delete", "pod", "stubborn", "-n", NS, "--wait=false"]);
    wait_for(
        "pod stubborn to be removed",
        Duration::from_secs(30),
        || {
            (!cluster
                .kubectl_output(&["get", "pod", "stubborn", "-n", NS])
                .status
                .success())
            .then_some(())
        },
        || cluster.diagnostics(&[NS]),
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(20),
        "removed after {took:?}, the grace period is 3 s"
    );
    let run = cluster
        .agent()
        .runs()
        .into_iter()
        .find(|r| r.pod == "stubborn")
        .unwrap();
    assert_eq!(
        run.ended.as_ref().map(|e| e.exit_code),
        Some(137),
        "{run:?}"
    );
    assert!(
        !run.cgroup.exists(),
        "{} is still there",
        run.cgroup.display()
    );

    // An image the agent does not map.
    cluster.apply(&pod(
        "unknown",
        "  containers:\n  - {name: main, image: docker.io/library/nginx:1}\n",
    ));
    let p = wait_for(
        "pod unknown to wait in ErrImagePull",
        Duration::from_secs(30),
        || {
            let p = get(&cluster, "unknown");
            (p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ErrImagePull")
                .then_some(p)
        },
        || cluster.diagnostics(&[NS]),
    );
    assert_eq!(p["status"]["phase"], "Pending");
    eprintln!(
        "node agent: stubborn pod removed {:.1} s after delete (grace 3 s); oom peak {:.1} MiB \
         under 24Mi; total {:.1} s",
        took.as_secs_f64(),
        peak as f64 / 1048576.0,
        t0.elapsed().as_secs_f64()
    );
}
